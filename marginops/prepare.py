"""One preparation of a call, shared by :func:`marginops.margin_cross_entropy` and the sharded head.

:func:`prepare_call` turns the arguments of one call into a :class:`PreparedCall`:

1. validation: shapes, dtypes, devices and every option (a TypeError or
   ValueError naming the argument and the bad value);
2. the margin: a :class:`~marginops.SubCenter` unwrapped into its margin and
   ``k``; an adaptive margin's ``for_batch`` hook run on the batch;
3. the scale: a number, a per-row tensor (:attr:`PreparedCall.row_scale`) or an
   :class:`~marginops.AdaCos` policy (its scale for this step);
4. the backend and its :class:`~marginops.backends.FusedOptions`;
5. the inverse row norms, once per call and outside autograd (the operators'
   backwards own the normalization backward);
6. the row weights: 0 for ignored rows, the caller's ``row_weight``, and the
   ``"mean"`` normalization folded in.

The class-sharded head prepares the gathered global batch against its own
block of classes (``class_start``, ``num_classes``) and passes an
:class:`Exchange` that says how the ranks' pieces meet; the single-process
:data:`SINGLE_PROCESS` is the identity. Nothing here runs a backend.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from ._checks import EPS, FLOAT_DTYPES, check_float_dtype, check_number, check_optional_int, check_tensor
from .margins.adacos import AdaCos
from .backends import FusedOptions, RowStats, get_backend, resolve_backend
from .backends.common import acc_dtype, inverse_norms
from .margins.zoo import Margin, MarginLike, NoMargin
from .margins.subcenter import SubCenter, check_weight_rows

__all__ = ["REDUCTIONS", "STRATEGIES", "Exchange", "SINGLE_PROCESS", "PreparedCall", "prepare_call", "apply_margin",
           "add_row_terms", "loss_dtype", "split_sub_centers", "label_check"]

REDUCTIONS = ("mean", "sum", "none")
STRATEGIES = ("auto", "recompute", "workspace")

Scale = Union[float, Tensor, AdaCos]


class Exchange:
    """How the pieces of one call meet across the processes that share its classes.

    This base class is one process: every method is the identity (or the plain
    hook call). :class:`marginops.distributed.ShardedMarginHead` overrides them
    with traceable collectives; :func:`marginops.functional.fused_loss` calls
    them at fixed points of every call.
    """

    #: processes that compute the same loss from the same global batch
    world_size: int = 1

    def replicate(self, t: Tensor) -> Tensor:
        """``t`` as an input of something every process computes identically from the global batch
        (the margin's parameters, the target logit's scale): its gradient is shared out so that the
        sum over processes counts it once."""
        return t

    def share_target(self, t_mine: Tensor) -> Tensor:
        """Every row's target cosine from this process's part (0 where another process owns the
        target's class); the gradient reaches the owner's part."""
        return t_mine

    def combine(self, stats: RowStats) -> RowStats:
        """The statistics of every class from this process's class range."""
        return stats

    def batch_margin(self, margin, x: Tensor):
        """``margin.for_batch(x)`` for an adaptive margin: ``(psi, extra)``."""
        return margin.for_batch(x)


#: The exchange of a single-process call.
SINGLE_PROCESS = Exchange()


@dataclass(frozen=True)
class PreparedCall:
    """Everything one call needs after :func:`prepare_call`; tensors are ``B``-sized or the inputs.

    Attributes:
        x, W: the embeddings ``(B, D)`` and the weight rows ``(C_rows, D)``, as given (autograd intact).
        labels: ``(B,)`` int64 class indices (``ignore_index`` kept).
        valid: ``(B,)`` bool, rows that are not ignored.
        safe: ``labels`` with ignored rows pointed at class 0.
        w: ``(B,)`` each row's loss weight in the accumulation dtype: 0 for ignored rows, the
            caller's ``row_weight`` otherwise (1 without), divided by the total weight of the rows
            that count for ``"mean"``.
        row_weight: the caller's row weights (detached) as given, for the value check, or None.
        inv_x, inv_w: inverse row norms ``1 / max(|row|, EPS)`` (accumulation dtype), None when
            ``normalize=False`` or for the reference backend.
        psi: the margin for this batch (a :class:`~marginops.Margin` or a callable).
        extra: an adaptive margin's per-row loss term ``(B,)``, or None.
        scale: the float scale (``opts.scale``); 1.0 with a per-row scale.
        row_scale: ``(B,)`` per-row scales in the accumulation dtype (differentiable), or None.
        policy: the :class:`~marginops.AdaCos` policy that supplied the scale, or None.
        opts: the fused backends' options.
        backend: the resolved backend name (``"reference"`` included).
        label_check: a :data:`marginops.ops.LABEL_CHECKS` mode.
        reduction, ignore_index, return_stats: as given.
        num_classes: all classes ``C`` (every range's, not sub-centre rows).
        out_dtype: the dtype of the returned loss.
    """

    x: Tensor
    W: Tensor
    labels: Tensor
    valid: Tensor
    safe: Tensor
    w: Tensor
    row_weight: Optional[Tensor]
    inv_x: Optional[Tensor]
    inv_w: Optional[Tensor]
    psi: Callable[[Tensor], Tensor]
    extra: Optional[Tensor]
    scale: float
    row_scale: Optional[Tensor]
    policy: Optional[AdaCos]
    opts: FusedOptions
    backend: str
    label_check: str
    reduction: str
    ignore_index: int
    return_stats: bool
    num_classes: int
    out_dtype: torch.dtype


# -- validation --------------------------------------------------------------------------------------------


def _check_inputs(x, W, y) -> None:
    check_tensor("embeddings", x, 2)
    check_tensor("weight", W, 2)
    check_tensor("labels", y, 1)
    for name, t in (("embeddings", x), ("weight", W)):
        check_float_dtype(name, t)
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


def _check_row_tensor(name: str, value, x: Tensor, *, allow_scalar: bool) -> Tensor:
    """A ``(B,)`` real tensor on ``x``'s device (a 0-d one broadcast to ``(B,)`` when allowed)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    B = x.shape[0]
    if value.dim() == 0 and allow_scalar:
        value = value.expand(B)
    if value.shape != (B,):
        expected = f"a 0-d tensor or ({B},)" if allow_scalar else f"({B},)"
        raise ValueError(f"{name} must be {expected} (one value per row of embeddings), got shape "
                         f"{tuple(value.shape)}")
    if value.device != x.device:
        raise ValueError(f"{name} must be on the embeddings' device {x.device}, got {value.device}")
    return value


def _check_scale(scale, x: Tensor) -> tuple[float, Optional[Tensor]]:
    """``(float scale, per-row scale or None)``; the per-row values are checked inside the operators."""
    if isinstance(scale, Tensor):
        return 1.0, _check_row_tensor("scale", scale, x, allow_scalar=True)
    return check_number("scale", scale, low=0.0, high=math.inf, low_open=True), None


def check_filter_threshold(threshold, normalize: bool, label_smoothing: float) -> Optional[float]:
    """The ``interclass_filtering_threshold`` option, validated (None: no filtering)."""
    if threshold is None:
        return None
    threshold = check_number("interclass_filtering_threshold", threshold, low=-1.0, high=1.0)
    if not normalize:
        raise ValueError("interclass_filtering_threshold is a cosine threshold and needs normalize=True")
    if label_smoothing > 0:
        raise ValueError("interclass_filtering_threshold cannot be combined with label_smoothing > 0 (the "
                         "smoothing term would sum logits of classes that filtering removes from the softmax)")
    return threshold


def check_gradient_filter(threshold) -> Optional[float]:
    """The ``gradient_filter`` option, validated: a probability in ``(0, 1]``, or None (off)."""
    if threshold is None:
        return None
    return check_number("gradient_filter", threshold, low=0.0, high=1.0, low_open=True)


def split_sub_centers(margin, weight_rows: int, label_smoothing: float):
    """``(margin, k, classes)``: a :class:`SubCenter` unwrapped into its margin and ``k``."""
    if not isinstance(margin, SubCenter):
        return margin, 1, weight_rows
    k = margin.k
    classes = check_weight_rows(weight_rows, k)
    if k > 1 and label_smoothing > 0:
        raise NotImplementedError(f"label_smoothing > 0 is not supported with sub-centres (k = {k}): its "
                                  "term sums the class logits, which are maxima over sub-centres")
    return margin.margin, k, classes


def label_check(validate_labels, device: torch.device) -> str:
    """The :data:`marginops.ops.LABEL_CHECKS` mode for the ``validate_labels`` option on ``device``."""
    if not (isinstance(validate_labels, bool) or validate_labels in ("host", "device")):
        raise ValueError(f"validate_labels must be True, False, 'host' or 'device', got {validate_labels!r}")
    if validate_labels is False:
        return "none"
    if validate_labels is True:
        return "device" if device.type == "cuda" else "host"
    return validate_labels


# -- the margin --------------------------------------------------------------------------------------------


def _resolve_margin(margin: MarginLike, batch: int):
    if margin is None:
        return NoMargin()
    if isinstance(margin, Margin):
        margin.check_batch(batch)
        return margin
    if callable(margin):
        return margin
    raise TypeError(f"margin must be a Margin, a callable psi(t) -> Tensor, or None, got {type(margin).__name__}")


def apply_margin(psi, t: Tensor) -> Tensor:
    """``psi(t)``, checked to be a tensor shaped like ``t``, in ``t``'s dtype."""
    out = psi(t)
    if not isinstance(out, Tensor):
        raise TypeError(f"margin {psi!r} returned {type(out).__name__}, expected a Tensor shaped like t {tuple(t.shape)}")
    if out.shape != t.shape:
        raise ValueError(f"margin {psi!r} returned shape {tuple(out.shape)}, expected {tuple(t.shape)} (one value per row)")
    return out.to(t.dtype)


# -- dtypes and row weights ---------------------------------------------------------------------------------


def loss_dtype(x_dtype: torch.dtype, W_dtype: torch.dtype) -> torch.dtype:
    """The loss comes in the wider input dtype, and in at least float32 (16-bit inputs give a float32
    loss, as ``F.cross_entropy`` under autocast and the fused cross-entropy kernels of Cut
    Cross-Entropy and Liger do: rounding the loss to 16 bits alone would cost 2-3e-3 of it)."""
    return torch.promote_types(torch.promote_types(x_dtype, W_dtype), torch.float32)


def _row_weights(valid: Tensor, row_weight: Optional[Tensor], reduction: str, acc: torch.dtype) -> Tensor:
    """Each row's loss weight: 0 for ignored rows, ``row_weight`` (or 1) otherwise; ``"mean"`` divides by
    their sum (as ``F.cross_entropy``'s weighted mean; a zero sum leaves every weight 0)."""
    w = valid.to(acc)
    if row_weight is not None:
        w = torch.where(valid, row_weight.to(acc), torch.zeros_like(w))
    if reduction == "mean":
        total = w.sum()
        w = w / torch.where(total > 0, total, torch.ones_like(total))
    return w


def add_row_terms(loss: Tensor, extra: Optional[Tensor], w: Tensor, reduction: str) -> Tensor:
    """``loss`` plus a margin's per-row loss term (MagFace's regularizer), weighted and reduced like the
    rows of the loss (``w``: ignored rows add nothing, ``"mean"`` averages over the others)."""
    if extra is None:
        return loss
    weighted = extra.to(loss.dtype) * w.to(loss.dtype)
    terms = torch.where(w != 0, weighted, torch.zeros_like(weighted))
    return loss + (terms if reduction == "none" else terms.sum())


# -- the preparation -----------------------------------------------------------------------------------------


def prepare_call(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    margin: MarginLike,
    scale: Scale,
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
    validate_labels: Union[bool, str] = True,
    interclass_filtering_threshold: Optional[float] = None,
    gradient_filter: Optional[float] = None,
    row_weight: Optional[Tensor] = None,
    class_start: int = 0,
    num_classes: Optional[int] = None,
    exchange: Exchange = SINGLE_PROCESS,
) -> PreparedCall:
    """Validate one call's arguments and derive what the operators need (see the module docstring).

    The arguments are those of :func:`marginops.margin_cross_entropy`. ``weight``
    may hold a range of the classes: classes ``[class_start, class_start + C_local)``
    of ``num_classes`` (default: the weight's own classes), labels staying global.

    Raises:
        TypeError, ValueError: a bad argument, named with its value.
        NotImplementedError: an option the chosen combination cannot run.
    """
    x, W = embeddings, weight
    _check_inputs(x, W, labels)
    policy = scale if isinstance(scale, AdaCos) else None
    scale, row_scale = _check_scale(float(policy.scale) if policy is not None else scale, x)
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__} {ignore_index!r}")
    label_smoothing = check_number("label_smoothing", label_smoothing, low=0.0, high=1.0)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {normalize!r}")
    chunk_size = check_optional_int("chunk_size", chunk_size, 1)
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "workspace" and reduction == "none":
        raise ValueError("strategy='workspace' computes gradients during the forward pass for a scalar loss; "
                         "it needs reduction 'mean' or 'sum', got reduction='none'")
    memory_budget = check_optional_int("memory_budget", memory_budget, 1)
    label_check_mode = label_check(validate_labels, x.device)
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {return_stats!r}")
    if row_weight is not None:
        row_weight = _check_row_tensor("row_weight", row_weight, x, allow_scalar=False).detach()
    margin, sub_centers, local_classes = split_sub_centers(margin, W.shape[0], label_smoothing)
    total = local_classes if num_classes is None else num_classes
    filter_threshold = check_filter_threshold(interclass_filtering_threshold, normalize, label_smoothing)
    gradient_filter = check_gradient_filter(gradient_filter)
    if policy is not None:
        scale = policy.scale_for_step(total)
    name = resolve_backend(backend, x.device)
    if name == "reference" and gradient_filter is not None:
        raise NotImplementedError("backend='reference' computes the exact gradients; gradient_filter "
                                  f"= {gradient_filter} needs a fused backend")

    psi = _resolve_margin(margin, x.shape[0])
    extra = None
    if hasattr(psi, "for_batch"):  # adaptive margins: per-row margins (and a loss term) from this batch
        psi, extra = exchange.batch_margin(psi, x)
        psi = _resolve_margin(psi, x.shape[0])

    acc = acc_dtype(x.dtype, W.dtype)
    labels = labels.long()
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    w = _row_weights(valid, row_weight, reduction, acc)
    grad_on = torch.is_grad_enabled()
    need_scale = grad_on and row_scale is not None and row_scale.requires_grad
    opts = FusedOptions(
        scale=scale, normalize=normalize, label_smoothing=label_smoothing, reduce=reduction != "none", eps=EPS,
        chunk_size=chunk_size, memory_budget=memory_budget, want_prediction=return_stats, strategy=strategy,
        # the gradient of a per-row scale is read off the embeddings' one (see marginops.ops)
        need_x=grad_on and (x.requires_grad or need_scale), need_W=grad_on and W.requires_grad,
        class_start=class_start, num_classes=num_classes, filter_threshold=filter_threshold,
        sub_centers=sub_centers, gradient_filter=gradient_filter,
    )
    inv_x = inv_w = None
    if name != "reference":
        if strategy == "workspace" and opts.reduce and (opts.need_x or opts.need_W):
            # a budget too small for the workspace is a bad static option: say so before any operator runs
            get_backend(name).uses_workspace(x.shape[0], W.shape[0], x.shape[1], x.dtype, W.dtype, opts)
        if normalize:
            inv_x = inverse_norms(x.detach(), acc, EPS)
            inv_w = inverse_norms(W.detach(), acc, EPS)
    return PreparedCall(
        x=x, W=W, labels=labels, valid=valid, safe=safe, w=w, row_weight=row_weight, inv_x=inv_x, inv_w=inv_w,
        psi=psi, extra=extra, scale=scale, row_scale=None if row_scale is None else row_scale.to(acc),
        policy=policy, opts=opts, backend=name, label_check=label_check_mode, reduction=reduction,
        ignore_index=int(ignore_index), return_stats=return_stats, num_classes=total,
        out_dtype=loss_dtype(x.dtype, W.dtype),
    )
