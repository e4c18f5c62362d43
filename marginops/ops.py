"""The one autograd path: the custom operators every call runs through, in one process or class-sharded.

One call of :func:`marginops.margin_cross_entropy` (and one step of
:class:`marginops.distributed.ShardedMarginHead`) is, on the autograd graph::

    t, carrier_x, carrier_W = target_cosine(x, W, labels, ...)     # B x D work; 0 where the target is another rank's
    t = exchange.share_target(t)                                   # sharded: the owners' cosines, summed over ranks
    z = s * psi(t)                                                 # the margin: plain autograd on B scalars
    stats, early = margin_stats(x, W, ..., z, w)                   # the B x C x D work over this weight's classes
    stats = exchange.combine(stats)                                # sharded: every rank's, gathered and merged
    loss, lse = margin_loss(x, W, ..., z, w, stats, early, carrier_x, carrier_W)   # B work; backward: the gradients

(:func:`margin_softmax` runs the last three.) The operators are
``torch.library`` custom operators with fake (meta) implementations, so
``torch.compile`` traces each as a single node (no graph break); the
exchange between them is plain, traceable torch. Their schemas::

    marginops::target_cosine(Tensor x, Tensor W, Tensor labels, Tensor? inv_x, Tensor? inv_w,
        Tensor? row_scale, Tensor? row_weight, int ignore_index, str label_check, str backend, <options>)
        -> (Tensor t, Tensor carrier_x, Tensor carrier_W)
    marginops::margin_stats(Tensor x, Tensor W, Tensor y, Tensor? inv_x, Tensor? inv_w, Tensor? row_scale,
        Tensor z, Tensor w, str backend, <options>)
        -> (Tensor lse, Tensor max, Tensor argmax, Tensor logit_sum, Tensor early_dxh, Tensor early_dW)
    marginops::margin_loss(Tensor x, Tensor W, Tensor y, Tensor? inv_x, Tensor? inv_w, Tensor? row_scale,
        Tensor z, Tensor w, Tensor nontarget_lse, Tensor logit_sum, Tensor early_dxh, Tensor early_dW,
        Tensor carrier_x, Tensor carrier_W, str backend, <options>) -> (Tensor loss, Tensor lse)
    marginops::margin_grads(Tensor x, Tensor W, Tensor y, Tensor? inv_x, Tensor? inv_w, Tensor? row_scale,
        Tensor lse, Tensor g, str backend, <options>) -> (Tensor dxh, Tensor dW)

where ``<options>`` are the fields of :class:`~marginops.backends.FusedOptions`
(:data:`OPTIONS_SCHEMA`). ``margin_stats`` has no autograd (it runs on detached
inputs); ``margin_loss`` carries the gradients of ``x``, ``W``, ``z`` and the
per-row scale; ``margin_grads`` is its recompute backward.

**Why the carriers.** The dense gradients (``dX`` over every class, the
``C x D`` ``dW``) come out of ``margin_loss``'s backward, which runs first;
the target terms need ``dt``, which only exists after autograd has gone back
through the margin. ``target_cosine`` therefore also returns two
zero-storage tensors shaped like ``x`` and ``W`` (a zero scalar expanded);
``margin_loss`` takes them as inputs and returns its dense gradients as
their gradients, so the engine hands them to ``target_cosine``'s backward,
in order, with ``dt``. That backward adds the target rows into ``dW`` in
place (one ``C x D`` gradient per call, never a second dense copy) and runs
the normalization backward of ``x`` once.

**Gradients formed in the forward pass** (the workspace strategy, one process
only: it needs every class's log-sum-exp during the pass) come out of
``margin_stats`` and go into ``margin_loss``, which saves them like any other
tensor. Its backward hands them over without a copy when the graph is not
kept; with ``retain_graph=True`` (or under ``torch.compile``, whose backward is
functional) it hands over scaled copies and leaves the saved ones intact, so
a second backward gives the same bits.

**Per-row scales.** With ``row_scale`` (``s_i``, ``opts.scale`` then 1) every
logit of row ``i`` is ``s_i cos_ij`` and the target logit ``z_i = s_i psi(t_i)``
is the caller's. The non-target logits are linear in ``s_i``, so their part of
``d loss / d s_i`` is ``sum_j G_ij cos_ij / s_i = (xh_i . dxh_i) / s_i``, with
``dxh`` the backend's gradient with respect to the normalized row (label
smoothing's ``-eps/C`` terms included): no pass over the classes beyond the one
that forms ``dxh``, which the backend is asked for whenever ``s`` needs a
gradient (``opts.need_x``). The target part reaches ``s_i`` through ``z`` by
plain autograd.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Optional

import torch
from torch import Tensor

from .backends import get_backend
from .backends.common import acc_dtype, clamped, normalize_backward
from .backends.interface import Call, FusedOptions, RowStats

__all__ = ["target_cosine", "margin_softmax", "margin_stats", "LABEL_CHECKS", "OPTIONS_SCHEMA", "add_target_terms",
           "loss_from_stats", "target_grad", "check_labels", "checked_labels", "check_row_values", "target_rows_index"]

#: How ``target_cosine`` checks labels (and per-row scales and weights): ``"host"`` reads them (a
#: ValueError; a device sync on GPUs), ``"device"`` asserts on the device without a sync (as
#: ``F.cross_entropy`` does), ``"none"`` trusts them.
LABEL_CHECKS = ("host", "device", "none")

#: The :class:`FusedOptions` fields every operator takes after its tensors and ``backend``, in order.
_OPTION_FIELDS = (("scale", "float"), ("normalize", "bool"), ("label_smoothing", "float"), ("reduce", "bool"),
                  ("eps", "float"), ("chunk_size", "int?"), ("memory_budget", "int?"), ("want_prediction", "bool"),
                  ("strategy", "str"), ("need_x", "bool"), ("need_W", "bool"), ("class_start", "int"),
                  ("num_classes", "int?"), ("filter_threshold", "float?"), ("sub_centers", "int"),
                  ("gradient_filter", "float?"))
OPTIONS_SCHEMA = ", ".join(f"{kind} {name}" for name, kind in _OPTION_FIELDS)


def _flat(opts: FusedOptions) -> tuple:
    return tuple(getattr(opts, name) for name, _ in _OPTION_FIELDS)


def _options(args) -> FusedOptions:
    return FusedOptions(**dict(zip((name for name, _ in _OPTION_FIELDS), args)))


def _custom_op(name: str, tensors: str, outputs: str):
    schema = f"({tensors}, str backend, {OPTIONS_SCHEMA}) -> ({outputs})"
    return torch.library.custom_op(f"marginops::{name}", mutates_args=(), schema=schema)


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


def _empty(like: Tensor, dtype: torch.dtype) -> Tensor:
    """A fresh (0,) stand-in for an output that was not asked for (outputs may not alias each other)."""
    return like.new_zeros(0, dtype=dtype)


# -- checks of labels and per-row values ---------------------------------------------------------------------


def _device_assert(ok: Tensor, message: str) -> None:
    try:
        torch._assert_async(ok, message)
    except TypeError:  # older torch: no message argument
        torch._assert_async(ok)


def check_labels(labels: Tensor, num_classes: int, ignore_index: int, mode: str) -> None:
    """Check that every label is in ``[0, num_classes)`` or ``ignore_index`` (see :data:`LABEL_CHECKS`)."""
    if mode == "none" or labels.numel() == 0:
        return
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    if mode == "device":
        _device_assert(~bad.any(), f"marginops: a label is outside [0, {num_classes}) and is not ignore_index = "
                                   f"{ignore_index}")
        return
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels[{i}] = {int(labels[i])} is outside [0, {num_classes}) (num_classes = "
                         f"{num_classes}) and is not ignore_index = {ignore_index}")


def check_row_values(name: str, values: Optional[Tensor], mode: str, *, positive: bool) -> None:
    """Check that per-row values are finite and positive (``positive``) or non-negative, in ``mode``."""
    if values is None or mode == "none" or values.numel() == 0:
        return
    bad = ~torch.isfinite(values) | ((values <= 0) if positive else (values < 0))
    what = "positive and finite" if positive else "non-negative and finite"
    if mode == "device":
        _device_assert(~bad.any(), f"marginops: a value of {name} is not {what}")
        return
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}[{i}] = {float(values[i])!r}: every value of {name} must be {what}")


@torch.library.custom_op("marginops::checked_labels", mutates_args=())
def checked_labels(labels: Tensor, num_classes: int, ignore_index: int, mode: str) -> Tensor:
    """``labels`` (a copy) once :func:`check_labels` passed: for labels that are renumbered before
    :func:`target_cosine` sees them (the sharded head's class sampling); an operator, so that the host
    check runs inside a compiled graph without breaking it."""
    check_labels(labels, num_classes, ignore_index, mode)
    return labels.clone()


@checked_labels.register_fake
def _(labels, num_classes, ignore_index, mode):
    return torch.empty_like(labels)


# -- target_cosine -------------------------------------------------------------------------------------------


def _carriers(x: Tensor, W: Tensor, backend: str, opts: FusedOptions):
    """Zero-storage stand-ins for the dense gradients, in the dtypes the backend will return them in."""
    acc = acc_dtype(x.dtype, W.dtype)
    W_grad_dtype = get_backend(backend).weight_grad_dtype(x.dtype, W.dtype, opts)
    cx = x.new_zeros((), dtype=acc).expand(x.shape) if opts.need_x else _empty(x, acc)
    cW = W.new_zeros((), dtype=W_grad_dtype).expand(W.shape) if opts.need_W else _empty(W, W_grad_dtype)
    return cx, cW


def _owned_rows(labels: Tensor, ignore_index: int, opts: FusedOptions, local_classes: int):
    """``(local, owned)``: each row's target class relative to this weight's first class (clamped into
    range; ignored rows point at class 0) and whether that class is among this weight's."""
    local = _safe(labels, ignore_index) - opts.class_start
    owned = (local >= 0) & (local < local_classes)
    return torch.where(owned, local, torch.zeros_like(local)), owned


@_custom_op("target_cosine", "Tensor x, Tensor W, Tensor labels, Tensor? inv_x, Tensor? inv_w, Tensor? row_scale, "
            "Tensor? row_weight, int ignore_index, str label_check", "Tensor t, Tensor carrier_x, Tensor carrier_W")
def _target_cosine(x, W, labels, inv_x, inv_w, row_scale, row_weight, ignore_index, label_check, backend, *options):
    opts = _options(options)
    local_classes = W.shape[0] // opts.sub_centers
    check_labels(labels, opts.total_classes(local_classes), ignore_index, label_check)
    check_row_values("scale", row_scale, label_check, positive=True)
    check_row_values("row_weight", row_weight, label_check, positive=False)
    with _no_autocast(x.device):
        local, owned = _owned_rows(labels, ignore_index, opts, local_classes)
        rows = target_rows_index(x, W, local, inv_x, inv_w, opts.sub_centers)
        t = _target_dot(x, W, rows, inv_x, inv_w)
        if not opts.is_full_range(local_classes):
            t = torch.where(owned, t, torch.zeros_like(t))
    return (t, *_carriers(x, W, backend, opts))


@_target_cosine.register_fake
def _(x, W, labels, inv_x, inv_w, row_scale, row_weight, ignore_index, label_check, backend, *options):
    return (x.new_empty(x.shape[0], dtype=acc_dtype(x.dtype, W.dtype)), *_carriers(x, W, backend, _options(options)))


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


_TARGET_INPUTS = 10 + len(_OPTION_FIELDS)


def _target_cosine_setup(ctx, inputs, output):
    x, W, labels, inv_x, inv_w, row_scale, row_weight, ignore_index, label_check, backend, *options = inputs
    ctx.save_for_backward(x, W, labels, inv_x, inv_w)
    ctx.ignore_index = ignore_index
    ctx.opts = _options(options)
    ctx.set_materialize_grads(False)


def _target_cosine_backward(ctx, dt: Optional[Tensor], d_carrier_x: Optional[Tensor],
                            d_carrier_W: Optional[Tensor]):
    """Add the target terms to the dense gradients the carriers bring, normalize ``x``'s once."""
    _no_double_backward("target_cosine")
    x, W, labels, inv_x, inv_w = ctx.saved_tensors
    need_x, need_W = ctx.needs_input_grad[:2]
    opts = ctx.opts
    local_classes = W.shape[0] // opts.sub_centers
    local, owned = _owned_rows(labels, ctx.ignore_index, opts, local_classes)
    rows = target_rows_index(x, W, local, inv_x, inv_w, opts.sub_centers)
    if dt is not None and not opts.is_full_range(local_classes):
        dt = torch.where(owned, dt, torch.zeros_like(dt))  # another rank adds the target terms of its classes
    dx, dW = add_target_terms(x, W, rows, inv_x, inv_w, dt, d_carrier_x, d_carrier_W, need_x, need_W)
    return (dx, dW) + (None,) * (_TARGET_INPUTS - 2)


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
                  row_scale: Optional[Tensor] = None, row_weight: Optional[Tensor] = None, ignore_index: int,
                  label_check: str, backend: str, opts: FusedOptions) -> tuple[Tensor, Tensor, Tensor]:
    """``t_i = xh_i . wh_{y_i}`` (accumulation dtype; class 0 for ignored rows) and the carriers.

    With ``opts.sub_centers = k > 1`` the weight holds ``k`` rows per class and ``t_i`` is the largest
    cosine among the target class's rows (:func:`target_rows_index`); its gradient goes to that row.
    With a class range (``opts.class_start``, ``opts.num_classes``) ``t_i`` is 0 for rows whose target
    class is not among the weight's, and the target terms of the backward are this range's only.

    ``labels`` (global class indices) are checked here (``label_check``, see
    :data:`LABEL_CHECKS`), the first place they index anything, and so are the
    values of ``row_scale`` (positive, finite) and ``row_weight`` (non-negative,
    finite), which are only read. The carriers are zero-storage tensors shaped
    like ``x`` and ``W`` (``(0,)`` where no gradient is wanted: ``opts.need_x``,
    ``opts.need_W``), in the dtypes ``backend`` returns the gradients in, to pass
    to :func:`margin_softmax`.
    """
    return _target_cosine(x, W, labels, inv_x, inv_w, None if row_scale is None else row_scale.detach(),
                          row_weight, ignore_index, label_check, backend, *_flat(opts))


# -- margin_stats ----------------------------------------------------------------------------------------------


def _early(x: Tensor, W: Tensor, backend: str, opts: FusedOptions) -> bool:
    """Whether the call forms its gradients in the forward pass (a pure function of sizes and options)."""
    return get_backend(backend).uses_workspace(x.shape[0], W.shape[0], x.shape[1], x.dtype, W.dtype, opts)


def _fresh(tensors) -> tuple:
    """The tensors, any that is or shares storage with an earlier one cloned (outputs may not alias)."""
    seen, out = set(), []
    for t in tensors:
        keys = {("id", id(t))} | ({("storage", t.untyped_storage().data_ptr())} if t.numel() else set())
        if keys & seen:
            t = t.clone()
            keys = {("id", id(t))} | ({("storage", t.untyped_storage().data_ptr())} if t.numel() else set())
        seen |= keys
        out.append(t)
    return tuple(out)


@_custom_op("margin_stats", "Tensor x, Tensor W, Tensor y, Tensor? inv_x, Tensor? inv_w, Tensor? row_scale, "
            "Tensor z, Tensor w", "Tensor lse, Tensor max, Tensor argmax, Tensor logit_sum, Tensor early_dxh, "
            "Tensor early_dW")
def _margin_stats(x, W, y, inv_x, inv_w, row_scale, z, w, backend, *options):
    opts = _options(options)
    module = get_backend(backend)
    call = Call(x, W, y, inv_x, inv_w, opts, row_scale=row_scale)
    acc = acc_dtype(x.dtype, W.dtype)
    dxh = dW = None
    with _no_autocast(x.device):
        if _early(x, W, backend, opts):
            stats, dxh, dW = module.forward_with_grads(call, z.to(acc), w.to(acc))  # for grad_output = 1
        else:
            stats = module.forward_stats(call)
    W_grad_dtype = module.weight_grad_dtype(x.dtype, W.dtype, opts)
    return _fresh((stats.lse, stats.max, stats.argmax, stats.logit_sum,
                   dxh if dxh is not None else _empty(x, acc), dW if dW is not None else _empty(W, W_grad_dtype)))


@_margin_stats.register_fake
def _(x, W, y, inv_x, inv_w, row_scale, z, w, backend, *options):
    opts = _options(options)
    acc = acc_dtype(x.dtype, W.dtype)
    B = x.shape[0]
    early = _early(x, W, backend, opts)
    W_grad_dtype = get_backend(backend).weight_grad_dtype(x.dtype, W.dtype, opts)
    rows = B if opts.want_prediction else 0
    return (x.new_empty(B, dtype=acc), x.new_empty(rows, dtype=acc), x.new_empty(rows, dtype=torch.int64),
            x.new_empty(B if opts.label_smoothing > 0 else 0, dtype=acc),
            x.new_empty(x.shape if early and opts.need_x else 0, dtype=acc),
            W.new_empty(W.shape if early and opts.need_W else 0, dtype=W_grad_dtype))


def margin_stats(x: Tensor, W: Tensor, y: Tensor, inv_x: Optional[Tensor], inv_w: Optional[Tensor],
                 row_scale: Optional[Tensor], z: Tensor, w: Tensor, *, backend: str,
                 opts: FusedOptions) -> tuple[RowStats, Tensor, Tensor]:
    """This weight's :class:`~marginops.backends.RowStats` and the gradients formed in the pass.

    The pass over the weight's classes, outside autograd (the inputs are
    detached): ``(stats, early_dxh, early_dW)``, the early gradients (for a unit
    upstream gradient and row weights ``w``) being ``(0,)`` unless the backend
    takes the workspace strategy.
    """
    detached = (None if t is None else t.detach() for t in (row_scale, z, w))
    lse, best, arg, logit_sum, early_dxh, early_dW = _margin_stats(x.detach(), W.detach(), y, inv_x, inv_w,
                                                                   *detached, backend, *_flat(opts))
    return RowStats(lse, best, arg, logit_sum), early_dxh, early_dW


# -- margin_loss -------------------------------------------------------------------------------------------------


def loss_from_stats(nontarget_lse: Tensor, logit_sum: Tensor, z: Tensor, w: Tensor, label_smoothing: float,
                    num_classes: int, reduce: bool) -> tuple[Tensor, Tensor]:
    """The weighted loss (summed, or per row) and the per-row log-sum-exp from the statistics of all
    classes (``RowStats.lse`` and ``RowStats.logit_sum``) and the margined target logits ``z``."""
    lse = torch.logaddexp(nontarget_lse, z)
    loss = lse - z
    if label_smoothing > 0:  # PyTorch's definition: (1 - eps) CE + eps mean_j (lse - logit_j)
        loss = loss + label_smoothing * (z - (logit_sum + z) / num_classes)
    # rows of weight 0 (ignored ones) are exactly 0 even where their loss is inf
    loss = torch.where(w != 0, loss * w, torch.zeros_like(loss))
    return (loss.sum() if reduce else loss), lse


def target_grad(g: Tensor, z: Tensor, lse: Tensor, label_smoothing: float, num_classes: int) -> Tensor:
    """``dloss/dz`` per row for upstream weights ``g``: ``g (p_target - (1 - eps) - eps / C)``."""
    return g * (torch.exp(z - lse) - (1.0 - label_smoothing) - label_smoothing / num_classes)


def _num_classes(W: Tensor, opts: FusedOptions) -> int:
    return opts.total_classes(W.shape[0] // opts.sub_centers)


@_custom_op("margin_loss", "Tensor x, Tensor W, Tensor y, Tensor? inv_x, Tensor? inv_w, Tensor? row_scale, "
            "Tensor z, Tensor w, Tensor nontarget_lse, Tensor logit_sum, Tensor early_dxh, Tensor early_dW, "
            "Tensor carrier_x, Tensor carrier_W", "Tensor loss, Tensor lse")
def _margin_loss(x, W, y, inv_x, inv_w, row_scale, z, w, nontarget_lse, logit_sum, early_dxh, early_dW, carrier_x,
                 carrier_W, backend, *options):
    opts = _options(options)
    acc = acc_dtype(x.dtype, W.dtype)
    return loss_from_stats(nontarget_lse, logit_sum, z.to(acc), w.to(acc), opts.label_smoothing,
                           _num_classes(W, opts), opts.reduce)


@_margin_loss.register_fake
def _(x, W, y, inv_x, inv_w, row_scale, z, w, nontarget_lse, logit_sum, early_dxh, early_dW, carrier_x, carrier_W,
      backend, *options):
    opts = _options(options)
    acc = acc_dtype(x.dtype, W.dtype)
    B = x.shape[0]
    return x.new_empty(() if opts.reduce else (B,), dtype=acc), x.new_empty(B, dtype=acc)


#: inputs of marginops::margin_loss: its backward returns one gradient (or None) each
_LOSS_INPUTS = 15 + len(_OPTION_FIELDS)
_Z, _ROW_SCALE, _CARRIER_X, _CARRIER_W = 6, 5, 12, 13


def _margin_loss_setup(ctx, inputs, output):
    (x, W, y, inv_x, inv_w, row_scale, z, w, _lse, _sum, early_dxh, early_dW, _cx, _cW, backend,
     *options) = inputs
    loss, lse = output
    ctx.save_for_backward(x, W, y, inv_x, inv_w, row_scale, z, w, lse, early_dxh, early_dW)
    ctx.backend = backend
    ctx.opts = _options(options)
    ctx.early = early_dxh.numel() > 0 or early_dW.numel() > 0
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _handed_over(early: Tensor, g0: Tensor, own: bool, unit: bool) -> Tensor:
    """A gradient formed in the forward pass for grad_output = 1, scaled to ``g0``: in place when the
    backward owns it (see the module docstring), untouched for the usual ``g0 = 1``."""
    return early if unit else early.mul_(g0) if own else early * g0


def _margin_loss_backward(ctx, grad_loss: Optional[Tensor], _grad_lse):
    grads = [None] * _LOSS_INPUTS
    if grad_loss is None:
        return tuple(grads)
    _no_double_backward("margin_loss")
    x, W, y, inv_x, inv_w, row_scale, z, w, lse, early_dxh, early_dW = ctx.saved_tensors
    opts = ctx.opts
    g0 = grad_loss.to(lse.dtype)
    g = w.to(lse.dtype) * g0
    dxh = dW = None
    if ctx.early:
        own = _owns_saved_tensors()
        # the usual grad_output of 1 (loss.backward()) skips a pass over the C x D gradient; the check
        # reads a scalar, so only where that costs no device sync
        unit = own and g0.device.type == "cpu" and bool(g0 == 1)
        dxh = _handed_over(early_dxh, g0, own, unit) if opts.need_x else None
        dW = _handed_over(early_dW, g0, own, unit) if opts.need_W else None
    elif opts.need_x or opts.need_W:
        dxh, dW = _margin_grads(x, W, y, inv_x, inv_w, row_scale, lse, g, ctx.backend, *_flat(opts))
        dxh, dW = (dxh if opts.need_x else None), (dW if opts.need_W else None)
    if ctx.needs_input_grad[_ROW_SCALE] and dxh is not None:
        grads[_ROW_SCALE] = _row_scale_grad(x, inv_x, row_scale, dxh)
    grads[_Z] = target_grad(g, z.to(lse.dtype), lse, opts.label_smoothing,
                            _num_classes(W, opts)).to(z.dtype) if ctx.needs_input_grad[_Z] else None
    grads[_CARRIER_X], grads[_CARRIER_W] = dxh, dW
    return tuple(grads)


def _row_scale_grad(x: Tensor, inv_x: Optional[Tensor], row_scale: Tensor, dxh: Tensor) -> Tensor:
    """The non-target part of ``d loss / d s_i``: ``(xh_i . dxh_i) / s_i`` (see the module docstring)."""
    xh = x.to(dxh.dtype)
    if inv_x is not None:
        xh = xh * inv_x.unsqueeze(1)
    dots = torch.bmm(xh.unsqueeze(1), dxh.unsqueeze(2)).view(-1)
    return (dots / row_scale).to(row_scale.dtype)


_margin_loss.register_autograd(_margin_loss_backward, setup_context=_margin_loss_setup)


@_custom_op("margin_grads", "Tensor x, Tensor W, Tensor y, Tensor? inv_x, Tensor? inv_w, Tensor? row_scale, "
            "Tensor lse, Tensor g", "Tensor dxh, Tensor dW")
def _margin_grads(x, W, y, inv_x, inv_w, row_scale, lse, g, backend, *options):
    opts = _options(options)
    module = get_backend(backend)
    with _no_autocast(x.device):
        dxh, dW = module.recompute_grads(Call(x, W, y, inv_x, inv_w, opts, row_scale=row_scale), lse, g)
    return (dxh if dxh is not None else _empty(x, lse.dtype),
            dW if dW is not None else _empty(W, module.weight_grad_dtype(x.dtype, W.dtype, opts)))


@_margin_grads.register_fake
def _(x, W, y, inv_x, inv_w, row_scale, lse, g, backend, *options):
    opts = _options(options)
    W_grad_dtype = get_backend(backend).weight_grad_dtype(x.dtype, W.dtype, opts)
    return (x.new_empty(x.shape if opts.need_x else 0, dtype=lse.dtype),
            W.new_empty(W.shape if opts.need_W else 0, dtype=W_grad_dtype))


def margin_softmax(x: Tensor, W: Tensor, y: Tensor, inv_x: Optional[Tensor], inv_w: Optional[Tensor],
                   row_scale: Optional[Tensor], z: Tensor, w: Tensor, carrier_x: Tensor, carrier_W: Tensor, *,
                   backend: str, opts: FusedOptions,
                   combine: Optional[Callable[[RowStats], RowStats]] = None) -> tuple[Tensor, Tensor, RowStats]:
    """The non-target part of the loss on fused backend ``backend``: ``(loss, lse, stats)``.

    ``y`` holds global labels with ignored rows pointed at class 0, ``z`` the
    margined target logits, ``w`` the per-row loss weights (0 for ignored rows),
    ``row_scale`` the per-row scales or None. :func:`margin_stats` runs over the
    weight's classes; ``combine`` (class-sharded calls) turns its statistics
    into those of every class; ``marginops::margin_loss`` then gives the loss
    (accumulation dtype; ``sum_i w_i loss_i`` or per row) and ``lse``, the
    per-row log-sum-exp with ``z`` in the target column. ``stats`` are the
    combined statistics: ``stats.lse`` the non-target log-sum-exp (what
    :class:`marginops.AdaCos` reads), ``stats.argmax`` the first argmax of the
    margin-free logits (empty unless ``opts.want_prediction``). The gradients of
    ``x`` and ``W`` leave through the carriers' gradients (see the module
    docstring); ``z`` and ``row_scale`` receive their own.
    """
    stats, early_dxh, early_dW = margin_stats(x, W, y, inv_x, inv_w, row_scale, z, w, backend=backend, opts=opts)
    if combine is not None:
        stats = combine(stats)
    loss, lse = _margin_loss(x, W, y, inv_x, inv_w, row_scale, z, w, stats.lse, stats.logit_sum, early_dxh, early_dW,
                             carrier_x, carrier_W, backend, *_flat(opts))
    return loss, lse, stats
