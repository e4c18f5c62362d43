"""``margin_cross_entropy``: validation, backend dispatch and the autograd glue around the target logit."""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import reference
from .backends import FUSED_BACKENDS, FusedOptions, resolve_backend
from .backends.common import GradHandoff, normalize_backward
from .margins import Margin, MarginLike, NoMargin

__all__ = ["margin_cross_entropy", "MarginStats", "REDUCTIONS"]

REDUCTIONS = ("mean", "sum", "none")
STRATEGIES = ("auto", "recompute", "workspace")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
EPS = reference.EPS


class MarginStats(NamedTuple):
    """Per-row by-products of the loss, all detached, shape (B,).

    Attributes:
        lse: log-sum-exp over all classes of the logits, with the margined
            target logit in the target column.
        target_logit: ``s * psi(t)``, the margined target logit.
        target_cos: ``t``, the target cosine (the plain target logit when
            ``normalize=False``).
        prediction: argmax over classes of the margin-free cosine, so
            training accuracy is ``(prediction == labels).float().mean()``.

    Rows whose label is ``ignore_index`` carry values computed as if their
    label were 0; only ``prediction`` is meaningful for them.
    """

    lse: Tensor
    target_logit: Tensor
    target_cos: Tensor
    prediction: Tensor


def _check_tensor(name: str, value, dim: int) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(value.shape)}")
    return value


def _check_number(name: str, value, *, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if v < low or v > high or (low_open and v == low):
        rng = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name} must lie in {rng}, got {value!r}")
    return v


def _check_optional_int(name: str, value, low: int) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    return int(value)


def _validate(x, W, y, scale, reduction, ignore_index, label_smoothing, normalize, chunk_size, memory_budget,
              strategy, validate_labels):
    _check_tensor("embeddings", x, 2)
    _check_tensor("weight", W, 2)
    _check_tensor("labels", y, 1)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"embeddings must be a floating-point tensor, got dtype {x.dtype}")
    if W.dtype != x.dtype:
        raise TypeError(f"weight dtype {W.dtype} does not match embeddings dtype {x.dtype}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of class indices, got dtype {y.dtype}")
    if W.device != x.device or y.device != x.device:
        raise ValueError(f"embeddings, weight and labels must be on one device, got {x.device}, {W.device}, {y.device}")
    B, D = x.shape
    C, Dw = W.shape
    if Dw != D:
        raise ValueError(f"weight has {Dw} features per class but embeddings have {D} (weight is (C, D), nn.Linear layout)")
    if y.shape[0] != B:
        raise ValueError(f"labels has {y.shape[0]} entries but embeddings has {B} rows")
    if C < 1:
        raise ValueError("weight must have at least one class (row), got shape " + str(tuple(W.shape)))
    if D < 1:
        raise ValueError(f"embeddings must have at least one feature, got shape {tuple(x.shape)}")
    scale = _check_number("scale", scale, low=0.0, high=math.inf, low_open=True)
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__} {ignore_index!r}")
    label_smoothing = _check_number("label_smoothing", label_smoothing, low=0.0, high=1.0)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {normalize!r}")
    chunk_size = _check_optional_int("chunk_size", chunk_size, 1)
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "workspace" and reduction == "none":
        raise ValueError("strategy='workspace' computes gradients during the forward pass for a scalar loss; "
                         "it needs reduction 'mean' or 'sum', got reduction='none'")
    memory_budget = _check_optional_int("memory_budget", memory_budget, 1)
    if validate_labels and B > 0:
        bad = ((y < 0) | (y >= C)) & (y != ignore_index)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"labels[{i}] = {int(y[i])} is outside [0, {C}) (num_classes = {C}) and is not "
                f"ignore_index = {ignore_index}"
            )
    return scale, label_smoothing, chunk_size, memory_budget


def _resolve_margin(margin: MarginLike, batch: int):
    if margin is None:
        return NoMargin()
    if isinstance(margin, Margin):
        margin.check_batch(batch)
        return margin
    if callable(margin):
        return margin
    raise TypeError(f"margin must be a Margin, a callable psi(t) -> Tensor, or None, got {type(margin).__name__}")


def _apply_margin(psi, t: Tensor) -> Tensor:
    out = psi(t)
    if not isinstance(out, Tensor):
        raise TypeError(f"margin {psi!r} returned {type(out).__name__}, expected a Tensor shaped like t {tuple(t.shape)}")
    if out.shape != t.shape:
        raise ValueError(f"margin {psi!r} returned shape {tuple(out.shape)}, expected {tuple(t.shape)} (one value per row)")
    return out.to(t.dtype)


class _TargetCosine(torch.autograd.Function):
    """``t_i = xh_i . wh_{y_i}`` (B x D work), and the owner of the gradients of ``x`` and ``W``.

    Its backward runs after the backend's (it needs ``dt``, which flows from
    the backend's ``dz`` through the margin), takes the backend's dense
    gradients from the handoff (``dxh`` before the normalization backward,
    ``dW`` complete), adds the target terms in place and runs the
    normalization backward of ``x`` once for both: one ``C x D`` gradient
    tensor per call.
    """

    @staticmethod
    def forward(ctx, x: Tensor, W: Tensor, y: Tensor, handoff: GradHandoff, normalize: bool, acc: torch.dtype):
        xf = x.to(acc)
        wy = W.index_select(0, y).to(acc)
        if normalize:
            norms = torch.stack([torch.linalg.vector_norm(xf, dim=1), torch.linalg.vector_norm(wy, dim=1)])
            inv = 1.0 / norms.clamp_min(EPS)
            t = ((xf * inv[0].unsqueeze(1)) * (wy * inv[1].unsqueeze(1))).sum(1)  # exactly +-1 for parallel rows
            ctx.save_for_backward(x, W, y, inv, norms <= EPS)
        else:
            t = (xf * wy).sum(1)
            ctx.save_for_backward(x, W, y)
        # x and W are saved as they are (no B x D copies live until backward; the rows are re-gathered there)
        ctx.handoff = handoff
        ctx.normalize = normalize
        ctx.acc = acc
        return t

    @staticmethod
    def backward(ctx, dt: Tensor):
        x, W, y, *norm = ctx.saved_tensors
        acc = ctx.acc
        # the rows again, one allocation each (copy=True: never write into x itself)
        xh = x.to(acc, copy=True)
        wyh = W.index_select(0, y).to(acc)
        if ctx.normalize:
            inv, clamped = norm
            xh.mul_(inv[0].unsqueeze(1))
            wyh.mul_(inv[1].unsqueeze(1))
        dxh, dW_rest = ctx.handoff.take()  # dxh: w.r.t. the normalized rows, from every non-target class
        dx = dW = None
        if ctx.needs_input_grad[1]:
            dwyh = dt.unsqueeze(1) * xh
            if ctx.normalize:
                dwyh = normalize_backward(wyh, inv[1], clamped[1], dwyh)
            if dW_rest is None:
                dW_rest = torch.zeros(W.shape, dtype=dwyh.dtype, device=dwyh.device)
            # index_put_ accumulates duplicates with a sort on CUDA (index_add_ would use atomics),
            # so dW is reproducible run to run
            dW = dW_rest.index_put_((y,), dwyh.to(dW_rest.dtype), accumulate=True).to(W.dtype)
        if ctx.needs_input_grad[0]:
            if dxh is None:
                dxh = dt.unsqueeze(1) * wyh
            else:
                dxh = dxh.to(acc).addcmul_(dt.unsqueeze(1), wyh)
            if ctx.normalize:  # one normalization backward for the target and the non-target terms
                dxh = normalize_backward(xh, inv[0], clamped[0], dxh)
            dx = dxh.to(x.dtype)
        return dx, dW, None, None, None, None


def margin_cross_entropy(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    margin: MarginLike = None,
    scale: float = 64.0,
    *,
    normalize: bool = True,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    strategy: str = "auto",
    return_stats: bool = False,
    validate_labels: bool = True,
) -> Union[Tensor, tuple[Tensor, MarginStats]]:
    r"""Margin softmax cross-entropy over many classes without materializing ``B x C`` logits.

    Computes, for each row ``i`` with label ``y_i``,

    .. math::
        \cos_{ij} = \hat x_i \cdot \hat w_j,\quad t_i = \cos_{i y_i},\quad
        z_i = s\,\psi(t_i),\quad
        \ell_i = \log\Big(e^{z_i} + \sum_{j \ne y_i} e^{s \cos_{ij}}\Big) - z_i

    where ``x̂``, ``ŵ`` are the L2-normalized rows (``normalize=True``) and
    ``psi`` is the margin. This equals ``F.cross_entropy`` over the logits
    ``s * cos`` with the target logit replaced by ``s * psi(t)``, and so
    the usual CosFace / ArcFace / SphereFace heads.

    Args:
        embeddings (Tensor): ``(B, D)`` features, float16/bfloat16/float32/float64.
        weight (Tensor): ``(C, D)`` class weights in ``nn.Linear`` layout, same dtype.
        labels (Tensor): ``(B,)`` integer class indices in ``[0, C)`` or ``ignore_index``.
        margin (Margin, callable or None): ``psi``, applied to the target cosine.
            Any differentiable ``psi(t) -> Tensor`` of shape ``(B,)`` works. Default: None (no margin).
        scale (float): ``s`` > 0. Default: 64.0.
        normalize (bool): L2-normalize rows of ``embeddings`` and ``weight`` (norms
            floored at 1e-12, as ``F.normalize``). ``False`` gives plain linear
            logits ``x @ W.T``; ``scale`` and ``margin`` still apply. Default: True.
        reduction (str): ``"mean"`` (over rows that are not ignored), ``"sum"`` or
            ``"none"``. Default: ``"mean"``.
        ignore_index (int): label value whose rows contribute zero loss and zero
            gradient. Default: -100.
        label_smoothing (float): in [0, 1], PyTorch's definition (uniform over all
            ``C`` classes, margined target logit included). Default: 0.0.
        backend (str): ``"auto"``, ``"torch"``, ``"triton"`` or ``"reference"``; see
            :func:`marginops.resolve_backend` for what ``"auto"`` picks (``"triton"`` for CUDA
            tensors when Triton is installed, else ``"torch"``). ``"triton"`` runs on CPU
            tensors only under the Triton interpreter (``TRITON_INTERPRET=1``). Both fused
            backends give reproducible gradients (no atomics). Default: ``"auto"``.
        chunk_size (int, optional): classes per tile (torch) or per forward program
            (triton). Default: chosen by the backend.
        memory_budget (int, optional): bytes of scratch memory the backend may use
            beyond inputs and their gradients. Default:
            :data:`marginops.DEFAULT_MEMORY_BUDGET` (256 MiB).
        strategy (str): how the fused backends spend GEMMs and memory.
            ``"recompute"``: the forward keeps only per-row statistics and the
            backward recomputes the logits tile by tile (four GEMMs, scratch
            of a few tiles). ``"workspace"``: a block of rows across *all*
            classes is kept in a logits workspace bounded by ``memory_budget``
            and, for a scalar loss, the gradients are computed during the
            forward pass (three GEMMs; needs ``reduction`` ``"mean"``/``"sum"``
            and a budget of at least one row of ``C`` logits, else a
            ValueError; ``dW`` is accumulated in the accumulation dtype across
            row blocks). ``"auto"``: the torch backend takes ``"workspace"``
            when blocks of at least 128 rows fit the budget, the triton
            backend ``"recompute"``. Default: ``"auto"``.
        return_stats (bool): also return :class:`MarginStats`. Default: False.
        validate_labels (bool): check that labels lie in ``[0, C)``; this reads
            the labels on the host (a device sync on GPU). Default: True.

    Returns:
        The loss (a scalar, or ``(B,)`` for ``reduction="none"``) in the
        embeddings' dtype, or ``(loss, stats)`` with ``return_stats=True``.
        An empty batch, or one whose rows are all ignored, gives a zero loss
        and zero gradients (``F.cross_entropy`` would return NaN for ``mean``).

    Shape:
        - embeddings: :math:`(B, D)`, weight: :math:`(C, D)`, labels: :math:`(B)`
        - output: :math:`()` or :math:`(B)` for ``reduction="none"``

        where B = batch size, D = embedding size, C = number of classes.

    Examples::

        >>> import torch, marginops as mo
        >>> x = torch.randn(8, 16, requires_grad=True)
        >>> W = torch.randn(1000, 16, requires_grad=True)
        >>> y = torch.randint(0, 1000, (8,))
        >>> loss = mo.margin_cross_entropy(x, W, y, mo.ArcFace(0.5), scale=64.0)
        >>> loss.backward()
        >>> loss, stats = mo.margin_cross_entropy(x, W, y, mo.CosFace(0.35), 30.0, return_stats=True)
        >>> accuracy = (stats.prediction == y).float().mean()
    """
    scale, label_smoothing, chunk_size, memory_budget = _validate(
        embeddings, weight, labels, scale, reduction, ignore_index, label_smoothing, normalize, chunk_size,
        memory_budget, strategy, validate_labels,
    )
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {return_stats!r}")
    name = resolve_backend(backend, embeddings.device)
    psi = _resolve_margin(margin, embeddings.shape[0])
    labels = labels.long()

    if name == "reference":
        out = reference.margin_cross_entropy_reference(
            embeddings, weight, labels, lambda t: _apply_margin(psi, t), scale, normalize=normalize,
            reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
        )
        stats = MarginStats(out.lse, out.target_logit, out.target_cos, out.prediction)
        return (out.loss, stats) if return_stats else out.loss

    acc = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    grad_on = torch.is_grad_enabled()
    handoff = GradHandoff(need_x=grad_on and embeddings.requires_grad, need_W=grad_on and weight.requires_grad)
    t = _TargetCosine.apply(embeddings, weight, safe, handoff, normalize, acc)
    z = scale * _apply_margin(psi, t)
    if t.requires_grad:
        # x and W receive their gradients in _TargetCosine.backward; keep it on the graph
        # even when psi ignores t (constant or detached-t margins).
        z = z + t * 0.0
    w = valid.to(acc)
    if reduction == "mean":
        w = w / w.sum().clamp_min(1.0)
    opts = FusedOptions(
        scale=scale, normalize=normalize, label_smoothing=label_smoothing, reduce=reduction != "none", eps=EPS,
        chunk_size=chunk_size, memory_budget=memory_budget, want_prediction=return_stats, strategy=strategy,
    )
    loss, lse, prediction = FUSED_BACKENDS[name](embeddings.detach(), weight.detach(), safe, z, w, handoff, opts)
    if not return_stats:
        return loss
    return loss, MarginStats(lse, z.detach(), t.detach(), prediction)
