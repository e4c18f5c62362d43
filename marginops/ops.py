"""The one autograd path: custom operators that every backend runs behind.

One call of :func:`marginops.margin_cross_entropy` is three steps on the autograd graph::

    t, carrier_x, carrier_W = target_cosine(x, W, labels, ...)      # B x D work
    z = s * psi(t)                                                  # the margin: plain autograd on B scalars
    loss, lse, prediction = margin_softmax(x, W, ..., z, carrier_x, carrier_W)   # the B x C x D work

Both are ``torch.library`` custom operators with fake (meta) implementations
and registered autograd, so ``torch.compile`` traces them as single nodes
(no graph break), and everything their backward needs goes through
``save_for_backward``.

**Why the carriers.** The dense gradients (``dX`` over every class, the
``C x D`` ``dW``) come out of ``margin_softmax``'s backward, which runs first;
the target terms need ``dt``, which only exists after autograd has gone back
through the margin. ``target_cosine`` therefore also returns two
zero-storage tensors shaped like ``x`` and ``W`` (a zero scalar expanded);
``margin_softmax`` takes them as inputs and returns its dense gradients as
their gradients, so the engine hands them to ``target_cosine``'s backward,
in order, with ``dt``. That backward adds the target rows into ``dW`` in
place (one ``C x D`` gradient per call, never a second dense copy) and runs
the normalization backward of ``x`` once.

**Gradients formed in the forward pass** (the workspace strategy) are outputs
of ``margin_softmax`` and saved like any other tensor. The backward hands
them over without a copy when the graph is not kept; with
``retain_graph=True`` (or under ``torch.compile``, whose backward is
functional) it hands over scaled copies and leaves the saved ones intact,
so a second backward gives the same bits.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
from torch import Tensor

from .backends import get_backend
from .backends.common import acc_dtype, clamped, normalize_backward
from .backends.interface import Call, FusedOptions

__all__ = ["target_cosine", "margin_softmax", "LABEL_CHECKS", "add_target_terms", "loss_from_stats", "target_grad",
           "check_labels"]

#: How ``target_cosine`` checks labels: ``"host"`` reads them (a ValueError; a device sync on GPUs),
#: ``"device"`` asserts on the device without a sync (as ``F.cross_entropy`` does), ``"none"`` trusts them.
LABEL_CHECKS = ("host", "device", "none")


def _keep_graph() -> bool:
    """Whether the running backward keeps the graph (``retain_graph=True``); True when unknown."""
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)  # torch >= 2.4 has it
    if query is None:
        return True
    try:
        return bool(query())
    except RuntimeError:  # not inside the autograd engine (e.g. a functorch transform)
        return True


def _owns_saved_tensors() -> bool:
    """Whether a backward may overwrite what its forward saved: eager, and the graph is not kept."""
    return not torch.compiler.is_compiling() and not _keep_graph()


def _no_double_backward(op: str) -> None:
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(f"marginops: double backward (create_graph=True) through {op} is not supported; "
                           "its backward is not differentiable")


def _no_autocast(device: torch.device):
    """The operators pick their own dtypes; autocast must not recast the tiles inside them."""
    return torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else nullcontext()


# -- labels --------------------------------------------------------------------------------------------


def check_labels(labels: Tensor, num_classes: int, ignore_index: int, mode: str) -> None:
    """Check that every label is in ``[0, num_classes)`` or ``ignore_index`` (see :data:`LABEL_CHECKS`)."""
    if mode == "none" or labels.numel() == 0:
        return
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    if mode == "device":
        message = f"marginops: a label is outside [0, {num_classes}) and is not ignore_index = {ignore_index}"
        try:
            torch._assert_async(~bad.any(), message)
        except TypeError:  # older torch: no message argument
            torch._assert_async(~bad.any())
        return
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels[{i}] = {int(labels[i])} is outside [0, {num_classes}) (num_classes = "
                         f"{num_classes}) and is not ignore_index = {ignore_index}")


# -- target_cosine ---------------------------------------------------------------------------------------


def _carriers(x: Tensor, W: Tensor, need_x: bool, need_W: bool, backend: str, strategy: str, reduce: bool):
    """Zero-storage stand-ins for the dense gradients, in the dtypes the backend will return them in."""
    acc = acc_dtype(x.dtype, W.dtype)
    opts = FusedOptions(scale=1.0, reduce=reduce, strategy=strategy, need_x=need_x, need_W=need_W)
    W_grad_dtype = get_backend(backend).weight_grad_dtype(x.dtype, W.dtype, opts)
    cx = x.new_zeros((), dtype=acc).expand(x.shape) if need_x else x.new_zeros(0, dtype=acc)
    cW = W.new_zeros((), dtype=W_grad_dtype).expand(W.shape) if need_W else W.new_zeros(0, dtype=W_grad_dtype)
    return cx, cW


@torch.library.custom_op("marginops::target_cosine", mutates_args=())
def _target_cosine(x: Tensor, W: Tensor, labels: Tensor, inv_x: Optional[Tensor], inv_w: Optional[Tensor],
                   ignore_index: int, label_check: str, need_x: bool, need_W: bool, backend: str,
                   strategy: str, reduce: bool, sub_centers: int) -> tuple[Tensor, Tensor, Tensor]:
    check_labels(labels, W.shape[0] // sub_centers, ignore_index, label_check)
    with _no_autocast(x.device):
        rows = target_rows_index(x, W, _safe(labels, ignore_index), inv_x, inv_w, sub_centers)
        t = _target_dot(x, W, rows, inv_x, inv_w)
    return (t, *_carriers(x, W, need_x, need_W, backend, strategy, reduce))


@_target_cosine.register_fake
def _(x, W, labels, inv_x, inv_w, ignore_index, label_check, need_x, need_W, backend, strategy, reduce, sub_centers):
    return (x.new_empty(x.shape[0], dtype=acc_dtype(x.dtype, W.dtype)),
            *_carriers(x, W, need_x, need_W, backend, strategy, reduce))


def _safe(labels: Tensor, ignore_index: int) -> Tensor:
    """Labels with ignored rows pointed at class 0 (their row weight is 0)."""
    return torch.where(labels != ignore_index, labels, torch.zeros_like(labels))


def target_rows_index(x: Tensor, W: Tensor, y: Tensor, inv_x: Optional[Tensor], inv_w: Optional[Tensor],
                      sub_centers: int) -> Tensor:
    """The row of ``W`` that holds each row's target cosine: ``y`` itself with one row per class; with
    ``k = sub_centers`` rows per class (class-major), the sub-centre ``y k + r`` of largest cosine, the
    lowest ``r`` on ties (``B k D`` work: the ``k`` rows of each target class, no more)."""
    if sub_centers == 1:
        return y
    acc = acc_dtype(x.dtype, W.dtype)
    B, D = x.shape
    rows = y.unsqueeze(1) * sub_centers + torch.arange(sub_centers, device=y.device)  # (B, k)
    wk = W.index_select(0, rows.reshape(-1)).to(acc).view(B, sub_centers, D)
    xh = x.to(acc)
    if inv_x is not None:
        xh = xh * inv_x.unsqueeze(1)
        wk = wk * inv_w[rows].unsqueeze(2)
    cos = torch.bmm(wk, xh.unsqueeze(2)).squeeze(2)  # (B, k)
    return rows.gather(1, cos.argmax(1, keepdim=True)).squeeze(1)  # argmax: the first maximum


def _target_rows(x: Tensor, W: Tensor, y: Tensor, inv_x: Optional[Tensor], inv_w: Optional[Tensor]):
    """``(xh, wh_y, (inv_x, clamped_x), (inv_w_y, clamped_w_y))`` in the accumulation dtype (fresh tensors)."""
    acc = acc_dtype(x.dtype, W.dtype)
    xh = x.to(acc, copy=True)
    wy = W.index_select(0, y).to(acc)
    if inv_x is None:
        return xh, wy, (None, None), (None, None)
    inv_w = inv_w[y]
    xh.mul_(inv_x.unsqueeze(1))
    wy.mul_(inv_w.unsqueeze(1))
    return xh, wy, (inv_x, clamped(inv_x)), (inv_w, clamped(inv_w))


def _target_dot(x, W, y, inv_x, inv_w) -> Tensor:
    xh, wy, _, _ = _target_rows(x, W, y, inv_x, inv_w)
    return (xh * wy).sum(1)  # exactly +-1 for parallel normalized rows


def _target_cosine_setup(ctx, inputs, output):
    x, W, labels, inv_x, inv_w, ignore_index, *_, sub_centers = inputs
    ctx.save_for_backward(x, W, labels, inv_x, inv_w)
    ctx.ignore_index = ignore_index
    ctx.sub_centers = sub_centers
    ctx.set_materialize_grads(False)


def _target_cosine_backward(ctx, dt: Optional[Tensor], d_carrier_x: Optional[Tensor],
                            d_carrier_W: Optional[Tensor]):
    """Add the target terms to the dense gradients the carriers bring, normalize ``x``'s once."""
    _no_double_backward("target_cosine")
    x, W, labels, inv_x, inv_w = ctx.saved_tensors
    need_x, need_W = ctx.needs_input_grad[:2]
    rows = target_rows_index(x, W, _safe(labels, ctx.ignore_index), inv_x, inv_w, ctx.sub_centers)
    dx, dW = add_target_terms(x, W, rows, inv_x, inv_w, dt, d_carrier_x, d_carrier_W, need_x, need_W)
    return dx, dW, None, None, None, None, None, None, None, None, None, None, None


def add_target_terms(x: Tensor, W: Tensor, rows: Tensor, inv_x: Optional[Tensor], inv_w: Optional[Tensor],
                     dt: Optional[Tensor], dxh: Optional[Tensor], dW: Optional[Tensor], need_x: bool,
                     need_W: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The backward of ``t_i = xh_i . wh_{rows_i}`` added to the dense gradients ``dxh`` and ``dW``.

    ``dxh`` (w.r.t. the normalized ``x``, or None) and ``dW`` (complete, or None)
    come from the non-target classes; the target rows are added into ``dW`` in
    place and the normalization backward of ``x`` runs once for both terms.
    ``dt`` may be None (the margin ignores ``t``); rows whose target is not
    among ``W``'s rows carry ``dt_i = 0``. Returns ``(dx, dW)`` in the inputs' dtypes.
    """
    dx = None
    xh, wyh, (inv_x, clamped_x), (inv_w, clamped_w) = _target_rows(x, W, rows, inv_x, inv_w)
    if need_W:
        if dt is not None:
            dwyh = dt.unsqueeze(1) * xh
            if inv_w is not None:
                dwyh = normalize_backward(wyh, inv_w, clamped_w, dwyh)
            if dW is None:
                dW = torch.zeros(W.shape, dtype=dwyh.dtype, device=W.device)
            # index_put_ accumulates duplicates with a sort on CUDA (index_add_ would use atomics),
            # so dW is reproducible run to run
            dW = dW.index_put_((rows,), dwyh.to(dW.dtype), accumulate=True)
        if dW is not None:
            dW = dW.to(W.dtype)
    else:
        dW = None
    if need_x:
        if dt is not None:
            dxh = dt.unsqueeze(1) * wyh if dxh is None else dxh.to(wyh.dtype).addcmul_(dt.unsqueeze(1), wyh)
        if dxh is not None:
            if inv_x is not None:  # one normalization backward for the target and the non-target terms
                dxh = normalize_backward(xh, inv_x, clamped_x, dxh)
            dx = dxh.to(x.dtype)
    return dx, dW


_target_cosine.register_autograd(_target_cosine_backward, setup_context=_target_cosine_setup)


def target_cosine(x: Tensor, W: Tensor, labels: Tensor, inv_x: Optional[Tensor], inv_w: Optional[Tensor], *,
                  ignore_index: int, label_check: str, backend: str, opts: FusedOptions) -> tuple[Tensor, Tensor,
                                                                                                Tensor]:
    """``t_i = xh_i . wh_{y_i}`` (accumulation dtype; class 0 for ignored rows) and the carriers.

    With ``opts.sub_centers = k > 1`` the weight holds ``k`` rows per class and ``t_i`` is the largest
    cosine among the target class's rows (:func:`target_rows_index`); its gradient goes to that row.

    ``labels`` are checked here (``label_check``, see :data:`LABEL_CHECKS`), the
    first place they index anything. The carriers are zero-storage tensors
    shaped like ``x`` and ``W`` (``(0,)`` where no gradient is wanted), in the
    dtypes ``backend`` returns the gradients in, to pass to :func:`margin_softmax`.
    """
    return _target_cosine(x, W, labels, inv_x, inv_w, ignore_index, label_check, opts.need_x, opts.need_W,
                          backend, opts.strategy, opts.reduce, opts.sub_centers)


# -- margin_softmax ------------------------------------------------------------------------------------


def _options(scale, normalize, label_smoothing, reduce, chunk_size, memory_budget, strategy, want_prediction,
             need_x, need_W, filter_threshold, sub_centers, gradient_filter=None) -> FusedOptions:
    return FusedOptions(scale=scale, normalize=normalize, label_smoothing=label_smoothing, reduce=reduce,
                        chunk_size=chunk_size, memory_budget=memory_budget, strategy=strategy,
                        want_prediction=want_prediction, need_x=need_x, need_W=need_W,
                        filter_threshold=filter_threshold, sub_centers=sub_centers,
                        gradient_filter=gradient_filter)


def _early_shapes(x: Tensor, W: Tensor, backend: str, opts: FusedOptions):
    """Whether the call forms its gradients in the forward pass, and the dtype of that ``dW``."""
    module = get_backend(backend)
    early = module.uses_workspace(x.shape[0], W.shape[0], x.shape[1], x.dtype, W.dtype, opts)
    return early, module.weight_grad_dtype(x.dtype, W.dtype, opts)


def loss_from_stats(stats, z: Tensor, w: Tensor, label_smoothing: float, num_classes: int,
                    reduce: bool) -> tuple[Tensor, Tensor]:
    """The weighted loss (summed, or per row) and the per-row log-sum-exp from the statistics of all
    classes (:class:`~marginops.backends.RowStats`) and the margined target logits ``z``."""
    lse = torch.logaddexp(stats.lse, z)
    loss = lse - z
    if label_smoothing > 0:  # PyTorch's definition: (1 - eps) CE + eps mean_j (lse - logit_j)
        loss = loss + label_smoothing * (z - (stats.logit_sum + z) / num_classes)
    # ignored rows (w = 0) are exactly 0 even where their loss is inf
    loss = torch.where(w != 0, loss * w, torch.zeros_like(loss))
    return (loss.sum() if reduce else loss), lse


def target_grad(g: Tensor, z: Tensor, lse: Tensor, label_smoothing: float, num_classes: int) -> Tensor:
    """``dloss/dz`` per row for upstream weights ``g``: ``g (p_target - (1 - eps) - eps / C)``."""
    return g * (torch.exp(z - lse) - (1.0 - label_smoothing) - label_smoothing / num_classes)


@torch.library.custom_op("marginops::margin_softmax", mutates_args=())
def _margin_softmax(x: Tensor, W: Tensor, y: Tensor, inv_x: Optional[Tensor], inv_w: Optional[Tensor], z: Tensor,
                    w: Tensor, carrier_x: Tensor, carrier_W: Tensor, backend: str, scale: float, normalize: bool,
                    label_smoothing: float, reduce: bool, chunk_size: Optional[int],
                    memory_budget: Optional[int], strategy: str, want_prediction: bool, need_x: bool,
                    need_W: bool, filter_threshold: Optional[float], sub_centers: int,
                    gradient_filter: Optional[float]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    opts = _options(scale, normalize, label_smoothing, reduce, chunk_size, memory_budget, strategy, want_prediction,
                    need_x, need_W, filter_threshold, sub_centers, gradient_filter)
    num_classes = W.shape[0] // sub_centers
    module = get_backend(backend)
    call = Call(x, W, y, inv_x, inv_w, opts)
    acc = acc_dtype(x.dtype, W.dtype)
    zf, wf = z.to(acc), w.to(acc)
    dx = dW = dz = None
    with _no_autocast(x.device):
        if module.uses_workspace(x.shape[0], W.shape[0], x.shape[1], x.dtype, W.dtype, opts):
            stats, dx, dW = module.forward_with_grads(call, zf, wf)  # gradients for grad_output = 1
        else:
            stats = module.forward_stats(call)
        loss, lse = loss_from_stats(stats, zf, wf, label_smoothing, num_classes, reduce)
        if dx is not None or dW is not None:
            dz = target_grad(wf, zf, lse, label_smoothing, num_classes)
    pred = stats.argmax if want_prediction else x.new_zeros(0, dtype=torch.int64)
    # outputs may not alias each other: a fresh empty stand-in for each gradient not formed
    return (loss, lse, pred, *(t if t is not None else x.new_zeros(0, dtype=acc) for t in (dx, dW, dz)),
            stats.lse.clone())


@_margin_softmax.register_fake
def _(x, W, y, inv_x, inv_w, z, w, carrier_x, carrier_W, backend, scale, normalize, label_smoothing, reduce,
      chunk_size, memory_budget, strategy, want_prediction, need_x, need_W, filter_threshold, sub_centers,
      gradient_filter):
    opts = _options(scale, normalize, label_smoothing, reduce, chunk_size, memory_budget, strategy, want_prediction,
                    need_x, need_W, filter_threshold, sub_centers, gradient_filter)
    acc = acc_dtype(x.dtype, W.dtype)
    B = x.shape[0]
    early, W_grad_dtype = _early_shapes(x, W, backend, opts)
    return (x.new_empty(() if reduce else (B,), dtype=acc), x.new_empty(B, dtype=acc),
            x.new_empty(B if want_prediction else 0, dtype=torch.int64),
            x.new_empty(x.shape if early and need_x else 0, dtype=acc),
            W.new_empty(W.shape, dtype=W_grad_dtype) if early and need_W else x.new_empty(0, dtype=acc),
            x.new_empty(B if early else 0, dtype=acc), x.new_empty(B, dtype=acc))


@torch.library.custom_op("marginops::margin_softmax_grads", mutates_args=())
def _margin_softmax_grads(x: Tensor, W: Tensor, y: Tensor, inv_x: Optional[Tensor], inv_w: Optional[Tensor],
                          lse: Tensor, g: Tensor, backend: str, scale: float, normalize: bool,
                          label_smoothing: float, chunk_size: Optional[int], memory_budget: Optional[int],
                          strategy: str, need_x: bool, need_W: bool, filter_threshold: Optional[float],
                          sub_centers: int, gradient_filter: Optional[float]) -> tuple[Tensor, Tensor]:
    opts = _options(scale, normalize, label_smoothing, False, chunk_size, memory_budget, strategy, False,
                    need_x, need_W, filter_threshold, sub_centers, gradient_filter)
    with _no_autocast(x.device):
        dxh, dW = get_backend(backend).recompute_grads(Call(x, W, y, inv_x, inv_w, opts), lse, g)
    return (dxh if dxh is not None else x.new_zeros(0, dtype=lse.dtype),
            dW if dW is not None else x.new_zeros(0, dtype=lse.dtype))


@_margin_softmax_grads.register_fake
def _(x, W, y, inv_x, inv_w, lse, g, backend, scale, normalize, label_smoothing, chunk_size, memory_budget,
      strategy, need_x, need_W, filter_threshold, sub_centers, gradient_filter):
    opts = _options(scale, normalize, label_smoothing, False, chunk_size, memory_budget, strategy, False,
                    need_x, need_W, filter_threshold, sub_centers, gradient_filter)
    W_grad_dtype = get_backend(backend).weight_grad_dtype(x.dtype, W.dtype, opts)
    return (x.new_empty(x.shape if need_x else 0, dtype=lse.dtype),
            W.new_empty(W.shape, dtype=W_grad_dtype) if need_W else x.new_empty(0, dtype=lse.dtype))


#: inputs of marginops::margin_softmax: its backward returns one gradient (or None) each
_SOFTMAX_INPUTS = len(torch.ops.marginops.margin_softmax.default._schema.arguments)


def _margin_softmax_setup(ctx, inputs, output):
    x, W, y, inv_x, inv_w, z, w, carrier_x, carrier_W, backend, *options = inputs
    loss, lse, pred, early_dx, early_dW, early_dz, nontarget_lse = output
    ctx.save_for_backward(x, W, y, inv_x, inv_w, z, w, lse, early_dx, early_dW, early_dz)
    ctx.backend = backend
    ctx.options = options
    ctx.early = early_dz.numel() > 0
    ctx.mark_non_differentiable(lse, pred, early_dx, early_dW, early_dz, nontarget_lse)
    ctx.set_materialize_grads(False)


def _margin_softmax_backward(ctx, grad_loss: Optional[Tensor], *unused):
    grads = [None] * _SOFTMAX_INPUTS
    if grad_loss is None:
        return tuple(grads)
    _no_double_backward("margin_softmax")
    x, W, y, inv_x, inv_w, z, w, lse, early_dx, early_dW, early_dz = ctx.saved_tensors
    (scale, normalize, label_smoothing, reduce, chunk_size, memory_budget, strategy, _, need_x, need_W,
     filter_threshold, sub_centers, gradient_filter) = ctx.options
    g0 = grad_loss.to(lse.dtype)
    if ctx.early:
        # the forward formed the gradients for grad_output = 1; hand them over scaled, in place when
        # nothing will read them again (see the module docstring)
        own = _owns_saved_tensors()
        # the usual grad_output of 1 (loss.backward()) skips a pass over the C x D gradient; the check
        # reads a scalar, so only where that costs no device sync
        unit = own and g0.device.type == "cpu" and bool(g0 == 1)
        dxh = (early_dx if unit else early_dx.mul_(g0) if own else early_dx * g0) if need_x else None
        dW = (early_dW if unit else early_dW.mul_(g0) if own else early_dW * g0) if need_W else None
        dz = early_dz * g0
    else:
        g = w.to(lse.dtype) * g0
        dxh = dW = None
        if need_x or need_W:
            dxh, dW = _margin_softmax_grads(x, W, y, inv_x, inv_w, lse, g, ctx.backend, scale, normalize,
                                            label_smoothing, chunk_size, memory_budget, strategy, need_x, need_W,
                                            filter_threshold, sub_centers, gradient_filter)
            dxh, dW = (dxh if need_x else None), (dW if need_W else None)
        dz = target_grad(g, z.to(lse.dtype), lse, label_smoothing, W.shape[0] // sub_centers)
    grads[5] = dz.to(z.dtype) if ctx.needs_input_grad[5] else None
    grads[7], grads[8] = dxh, dW
    return tuple(grads)


_margin_softmax.register_autograd(_margin_softmax_backward, setup_context=_margin_softmax_setup)


def margin_softmax(x: Tensor, W: Tensor, y: Tensor, inv_x: Optional[Tensor], inv_w: Optional[Tensor], z: Tensor,
                   w: Tensor, carrier_x: Tensor, carrier_W: Tensor, *, backend: str,
                   opts: FusedOptions) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The non-target part of the loss on fused backend ``backend``: ``(loss, lse, prediction, nontarget_lse)``.

    ``y`` holds labels with ignored rows pointed at class 0, ``z`` the margined
    target logits, ``w`` the per-row loss weights (0 for ignored rows). The loss
    (accumulation dtype) is ``sum_i w_i loss_i`` or per row; ``lse`` the per-row
    log-sum-exp with ``z`` in the target column; ``prediction`` the first argmax
    of the margin-free logits (empty unless ``opts.want_prediction``); ``nontarget_lse`` the per-row
    log-sum-exp of the non-target logits alone (what :class:`marginops.AdaCos` reads). The
    gradients of ``x`` and ``W`` leave through the carriers' gradients (see the
    module docstring); ``z`` receives its own.
    """
    if opts.class_start != 0 or opts.num_classes not in (None, W.shape[0] // opts.sub_centers):
        raise ValueError("margin_softmax runs over the whole class range; a backend's class ranges are combined "
                         "with marginops.backends.combine_stats")
    out = _margin_softmax(x, W, y, inv_x, inv_w, z, w, carrier_x, carrier_W, backend, opts.scale,
                          opts.normalize, opts.label_smoothing, opts.reduce, opts.chunk_size, opts.memory_budget,
                          opts.strategy, opts.want_prediction, opts.need_x, opts.need_W, opts.filter_threshold,
                          opts.sub_centers, opts.gradient_filter)
    return out[0], out[1], out[2], out[6]
