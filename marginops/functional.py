"""``margin_cross_entropy``: validation, the dtype policy and the three steps of :mod:`marginops.ops`."""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import ops, reference
from ._checks import EPS, check_number, check_optional_int, check_tensor
from .backends import FusedOptions, get_backend, resolve_backend
from .backends.common import acc_dtype, inverse_norms
from .margins.adacos import AdaCos
from .margins.zoo import Margin, MarginLike, NoMargin
from .margins.subcenter import SubCenter, check_weight_rows

__all__ = ["margin_cross_entropy", "MarginStats", "REDUCTIONS"]

REDUCTIONS = ("mean", "sum", "none")
STRATEGIES = ("auto", "recompute", "workspace")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class MarginStats(NamedTuple):
    """Per-row by-products of the loss, all detached, shape (B,).

    Attributes:
        lse: log-sum-exp over all classes of the logits, with the margined
            target logit in the target column (classes removed by inter-class
            filtering left out).
        target_logit: ``s * psi(t)``, the margined target logit.
        target_cos: ``t``, the target cosine (the plain target logit when
            ``normalize=False``).
        prediction: argmax over classes of the margin-free cosine (over every
            class, filtered ones included; with sub-centres a class's cosine is
            its best sub-centre's), so training accuracy is
            ``(prediction == labels).float().mean()``.

    Rows whose label is ``ignore_index`` carry values computed as if their
    label were 0; only ``prediction`` is meaningful for them.
    """

    lse: Tensor
    target_logit: Tensor
    target_cos: Tensor
    prediction: Tensor


def _validate(x, W, y, scale, reduction, ignore_index, label_smoothing, normalize, chunk_size, memory_budget,
              strategy, validate_labels):
    check_tensor("embeddings", x, 2)
    check_tensor("weight", W, 2)
    check_tensor("labels", y, 1)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"embeddings must be a floating-point tensor ({', '.join(map(str, _FLOAT_DTYPES))}), "
                        f"got dtype {x.dtype}")
    if W.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"weight must be a floating-point tensor ({', '.join(map(str, _FLOAT_DTYPES))}), "
                        f"got dtype {W.dtype}")
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
    scale = check_number("scale", scale, low=0.0, high=math.inf, low_open=True)
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
    if not (isinstance(validate_labels, bool) or validate_labels in ("host", "device")):
        raise ValueError(f"validate_labels must be True, False, 'host' or 'device', got {validate_labels!r}")
    return scale, label_smoothing, chunk_size, memory_budget


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


def _add_row_terms(loss: Tensor, extra: Optional[Tensor], valid: Tensor, reduction: str) -> Tensor:
    """``loss`` plus a margin's per-row loss term (MagFace's regularizer), weighted and reduced like
    the rows of the loss: ignored rows add nothing, ``"mean"`` averages over the others."""
    if extra is None:
        return loss
    terms = torch.where(valid, extra, torch.zeros_like(extra)).to(loss.dtype)
    if reduction == "none":
        return loss + terms
    total = terms.sum()
    return loss + (total / valid.sum().clamp_min(1).to(total.dtype) if reduction == "mean" else total)


def row_weights(labels: Tensor, ignore_index: int, reduction: str, acc: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``(valid, safe, w)``: which rows count, the labels with ignored rows pointed at class 0, and each
    row's loss weight (0 for ignored rows; ``1 / n_valid`` for ``"mean"``, else 1)."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    w = valid.to(acc)
    if reduction == "mean":
        w = w / w.sum().clamp_min(1.0)
    return valid, safe, w


def _label_check(validate_labels, device: torch.device) -> str:
    """The :data:`marginops.ops.LABEL_CHECKS` mode for the ``validate_labels`` option on ``device``."""
    if validate_labels is False:
        return "none"
    if validate_labels is True:
        return "device" if device.type == "cuda" else "host"
    return validate_labels


def loss_dtype(x_dtype: torch.dtype, W_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The loss comes in the wider input dtype, and in at least float32 under autocast (a loss, like
    ``F.cross_entropy``, is computed and returned in full precision there)."""
    dtype = torch.promote_types(x_dtype, W_dtype)
    if device.type in ("cpu", "cuda") and _autocast_enabled(device.type):
        dtype = torch.promote_types(dtype, torch.float32)
    return dtype


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


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
    validate_labels: Union[bool, str] = True,
    interclass_filtering_threshold: Optional[float] = None,
    gradient_filter: Optional[float] = None,
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
        weight (Tensor): ``(C, D)`` class weights in ``nn.Linear`` layout, float16/bfloat16/float32/float64;
            its dtype may differ from the embeddings' (mixed precision: see *Dtypes* below).
        labels (Tensor): ``(B,)`` integer class indices in ``[0, C)`` or ``ignore_index``.
        margin (Margin, callable or None): ``psi``, applied to the target cosine.
            Any differentiable ``psi(t) -> Tensor`` of shape ``(B,)`` works. Default: None (no margin).
            :class:`marginops.SubCenter` ``(margin, k)`` makes ``weight`` ``(C * k, D)``: ``k``
            sub-centres per class (class-major), each class's cosine the largest of its ``k``
            (the gradient reaches that sub-centre only, the lowest index on ties).
        scale (float or AdaCos): ``s`` > 0, or a :class:`marginops.AdaCos` scale policy
            (its current scale is used; in training mode a dynamic one then sets the next
            step's scale from this call's statistics). Default: 64.0.
        normalize (bool): L2-normalize rows of ``embeddings`` and ``weight`` (norms
            floored at 1e-12, as ``F.normalize``). ``False`` gives plain linear
            logits ``x @ W.T``; ``scale`` and ``margin`` still apply. Default: True.
        reduction (str): ``"mean"`` (over rows that are not ignored), ``"sum"`` or
            ``"none"``. Default: ``"mean"``.
        ignore_index (int): label value whose rows contribute zero loss and zero
            gradient. Default: -100.
        label_smoothing (float): in [0, 1], PyTorch's definition (uniform over all
            ``C`` classes, margined target logit included). Default: 0.0.
        backend (str): ``"auto"``, ``"torch"``, ``"native"``, ``"triton"`` or ``"reference"``; see
            :func:`marginops.resolve_backend` for what ``"auto"`` picks (``"triton"`` for CUDA
            tensors when Triton is installed; for CPU tensors ``"native"``, the torch backend's
            tiling with compiled C++ tile kernels, when they are built, else ``"torch"``).
            ``"triton"`` runs on CPU tensors only under the Triton interpreter
            (``TRITON_INTERPRET=1``). The fused backends give reproducible gradients (no
            atomics). Default: ``"auto"``.
        chunk_size (int, optional): classes per tile (torch, native) or per forward program
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
            row blocks). ``"auto"``: the torch and native backends take ``"workspace"``
            when blocks of at least 128 rows fit the budget, the triton
            backend ``"recompute"``. Default: ``"auto"``.
        return_stats (bool): also return :class:`MarginStats`. Default: False.
        validate_labels (bool or str): check that labels lie in ``[0, C)`` or equal
            ``ignore_index``. ``True``: on CPU the labels are read and a bad one raises a
            ValueError naming it (also inside ``torch.compile``d code: the check runs inside
            marginops' operator); on CUDA a device-side assert, with no host
            synchronisation, as ``F.cross_entropy`` does. ``"host"``: the ValueError on any
            device (a sync on GPUs). ``"device"``: the device-side assert on any device.
            ``False``: no check (a bad label gives an undefined loss or an indexing error).
            Default: True.
        interclass_filtering_threshold (float, optional): in ``[-1, 1]``. A non-target
            class whose cosine with the row exceeds it is treated as label noise and
            removed from that row's softmax, as if its column were absent: it adds
            nothing to the loss, to ``stats.lse`` or to any gradient (the backends
            compare the logit ``s cos`` with ``s * threshold`` inside the tile pass). This
            differs from InsightFace's Partial FC, which multiplies such cosines by 0,
            so each still adds ``exp(0) = 1`` to its row's partition sum. The target is
            never filtered, and ``stats.prediction`` stays the argmax over *every* class
            (filtered ones included: it measures what the model predicts). Needs
            ``normalize=True`` and ``label_smoothing=0`` (else a ValueError). Default:
            None (no filtering).
        gradient_filter (float, optional): in ``(0, 1]``. Opt-in gradient filtering, as Cut
            Cross-Entropy's ``filter_eps``: in the gradient pass a tile of classes whose
            probabilities ``p_ij`` all lie below this threshold for every row of the tile is
            skipped, its (tiny) contribution to the gradients dropped. An approximation that
            saves time when most tiles are negligible (trained models, large ``C``); the loss and
            ``stats`` stay exact. Default: None (every tile, the exact gradients).

    Returns:
        The loss (a scalar, or ``(B,)`` for ``reduction="none"``) in the wider of the
        two input dtypes (at least float32 under autocast), or ``(loss, stats)`` with
        ``return_stats=True``.
        An empty batch, or one whose rows are all ignored, gives a zero loss
        and zero gradients (``F.cross_entropy`` would return NaN for ``mean``).

    Shape:
        - embeddings: :math:`(B, D)`, weight: :math:`(C, D)`, labels: :math:`(B)`
        - output: :math:`()` or :math:`(B)` for ``reduction="none"``

        where B = batch size, D = embedding size, C = number of classes.

    Dtypes (mixed precision):
        The two inputs may have different float dtypes, as under ``torch.autocast``,
        where a backbone hands bf16/fp16 embeddings to a head whose weight stays
        float32. Nothing is cast in place and the weight is never copied: the torch
        backend converts each tile to the accumulation dtype (float32; float64 when an
        input is float64) and multiplies it there, so 16-bit inputs cost no precision
        beyond their own rounding; the Triton backend multiplies tiles in the
        weight's dtype (the ``B x D`` embeddings are converted to it, never the
        ``C x D`` weight) on tensor cores, accumulating in float32. Statistics, the
        log-sum-exp and the gradient accumulators are float32 (float64 for float64
        inputs); autocast is switched off inside marginops' operators so it cannot
        recast their tiles. Each input's gradient comes in its own dtype.

    Autograd:
        One backward pass per graph as usual; a retained graph (``retain_graph=True``)
        gives the same bits on every backward. Double backward (``create_graph=True``)
        raises a RuntimeError. ``torch.compile(..., fullgraph=True)`` traces the call
        without graph breaks: marginops' work runs in ``torch.library`` custom operators.

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
    x, W = embeddings, weight
    policy = scale if isinstance(scale, AdaCos) else None
    if policy is not None:
        scale = float(policy.scale)  # validated with the rest; the call's scale is read below
    scale, label_smoothing, chunk_size, memory_budget = _validate(
        embeddings, weight, labels, scale, reduction, ignore_index, label_smoothing, normalize, chunk_size,
        memory_budget, strategy, validate_labels,
    )
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {return_stats!r}")
    margin, sub_centers, C = split_sub_centers(margin, W.shape[0], label_smoothing)
    filter_threshold = check_filter_threshold(interclass_filtering_threshold, normalize, label_smoothing)
    gradient_filter = check_gradient_filter(gradient_filter)
    if policy is not None:
        scale = policy.scale_for_step(C)
    name = resolve_backend(backend, x.device)
    psi = _resolve_margin(margin, x.shape[0])
    extra = None
    if hasattr(psi, "for_batch"):  # adaptive margins: per-row margins (and a loss term) from this batch
        psi, extra = psi.for_batch(x)
        psi = _resolve_margin(psi, x.shape[0])
    labels = labels.long()
    out_dtype = loss_dtype(x.dtype, W.dtype, x.device)
    check = _label_check(validate_labels, x.device)

    if name == "reference":
        if gradient_filter is not None:
            raise NotImplementedError("backend='reference' computes the exact gradients; gradient_filter "
                                      f"= {gradient_filter} needs a fused backend")
        ops.check_labels(labels, C, ignore_index, "host" if check != "none" else "none")
        common = torch.promote_types(x.dtype, W.dtype)
        out = reference.margin_cross_entropy_reference(
            x.to(common), W.to(common), labels, lambda t: _apply_margin(psi, t), scale, normalize=normalize,
            reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
            interclass_filtering_threshold=filter_threshold, sub_centers=sub_centers,
        )
        if policy is not None:
            policy.observe(out.nontarget_lse, out.target_cos, labels != ignore_index)
        stats = MarginStats(out.lse, out.target_logit, out.target_cos, out.prediction)
        loss = _add_row_terms(out.loss, extra, labels != ignore_index, reduction).to(out_dtype)
        return (loss, stats) if return_stats else loss

    acc = acc_dtype(x.dtype, W.dtype)
    grad_on = torch.is_grad_enabled()
    opts = FusedOptions(
        scale=scale, normalize=normalize, label_smoothing=label_smoothing, reduce=reduction != "none", eps=EPS,
        chunk_size=chunk_size, memory_budget=memory_budget, want_prediction=return_stats, strategy=strategy,
        need_x=grad_on and x.requires_grad, need_W=grad_on and W.requires_grad,
        filter_threshold=filter_threshold, sub_centers=sub_centers, gradient_filter=gradient_filter,
    )
    if strategy == "workspace" and opts.reduce and (opts.need_x or opts.need_W):
        # a budget too small for the workspace is a bad static option: say so before any operator runs
        get_backend(name).uses_workspace(x.shape[0], W.shape[0], x.shape[1], x.dtype, W.dtype, opts)
    # inverse row norms once per call, outside autograd (the operators' backwards own the normalization backward)
    inv_x = inverse_norms(x.detach(), acc, EPS) if normalize else None
    inv_w = inverse_norms(W.detach(), acc, EPS) if normalize else None
    valid, safe, w = row_weights(labels, ignore_index, reduction, acc)

    t, carrier_x, carrier_W = ops.target_cosine(x, W, labels, inv_x, inv_w, ignore_index=ignore_index,
                                                label_check=check, backend=name, opts=opts)
    z = scale * _apply_margin(psi, t)
    loss, lse, prediction, nontarget_lse = ops.margin_softmax(x, W, safe, inv_x, inv_w, z, w, carrier_x,
                                                              carrier_W, backend=name, opts=opts)
    if policy is not None:
        policy.observe(nontarget_lse, t.detach(), valid)
    loss = _add_row_terms(loss, extra, valid, reduction).to(out_dtype)
    if not return_stats:
        return loss
    return loss, MarginStats(lse, z.detach(), t.detach(), prediction)
