"""``margin_cross_entropy``: one prepared call (:mod:`marginops.prepare`) through the operators of
:mod:`marginops.ops`, or through the float64-capable oracle for ``backend="reference"``."""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import ops, reference
from .margins.adacos import AdaCos
from .margins.zoo import MarginLike
from .prepare import (REDUCTIONS, SINGLE_PROCESS, Exchange, PreparedCall, add_row_terms, apply_margin,
                      prepare_call)

__all__ = ["margin_cross_entropy", "MarginStats", "REDUCTIONS", "fused_loss"]


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


def fused_loss(call: PreparedCall, exchange: Exchange = SINGLE_PROCESS) -> tuple[Tensor, MarginStats]:
    """The loss of a prepared call on a fused backend, and its :class:`MarginStats`.

    The steps of :mod:`marginops.ops`, with ``exchange`` joining the processes
    of a class-sharded call at its fixed points (the single-process exchange is
    the identity): the target cosine, the margin, the fused pass over the
    weight's classes, the loss; then the AdaCos policy's observation and the
    margin's per-row loss term.
    """
    opts = call.opts
    t, carrier_x, carrier_W = ops.target_cosine(
        call.x, call.W, call.labels, call.inv_x, call.inv_w, row_scale=call.row_scale, row_weight=call.row_weight,
        ignore_index=call.ignore_index, label_check=call.label_check, backend=call.backend, opts=opts)
    t = exchange.share_target(t)
    scale = call.scale if call.row_scale is None else exchange.replicate(call.row_scale)
    z = scale * apply_margin(call.psi, t)
    loss, lse, stats = ops.margin_softmax(call.x, call.W, call.safe, call.inv_x, call.inv_w, call.row_scale, z,
                                          call.w, carrier_x, carrier_W, backend=call.backend, opts=opts,
                                          combine=exchange.combine)
    if call.policy is not None:
        call.policy.observe(stats.lse, t.detach(), call.valid)
    loss = add_row_terms(loss, call.extra, call.w, call.reduction).to(call.out_dtype)
    return loss, MarginStats(lse, z.detach(), t.detach(), stats.argmax)


def _reference_loss(call: PreparedCall) -> tuple[Tensor, MarginStats]:
    """The loss of a prepared call on the materialized oracle (:mod:`marginops.reference`)."""
    opts = call.opts
    host = "host" if call.label_check != "none" else "none"
    ops.check_labels(call.labels, call.num_classes, call.ignore_index, host)
    ops.check_row_values("scale", call.row_scale, host, positive=True)
    ops.check_row_values("row_weight", call.row_weight, host, positive=False)
    common = torch.promote_types(call.x.dtype, call.W.dtype)
    out = reference.margin_cross_entropy_reference(
        call.x.to(common), call.W.to(common), call.labels, lambda t: apply_margin(call.psi, t),
        call.scale if call.row_scale is None else call.row_scale.to(common), normalize=opts.normalize,
        reduction=call.reduction, ignore_index=call.ignore_index, label_smoothing=opts.label_smoothing,
        interclass_filtering_threshold=opts.filter_threshold, sub_centers=opts.sub_centers,
        row_weight=call.row_weight,
    )
    if call.policy is not None:
        call.policy.observe(out.nontarget_lse, out.target_cos, call.valid)
    loss = add_row_terms(out.loss, call.extra, call.w, call.reduction).to(call.out_dtype)
    return loss, MarginStats(out.lse, out.target_logit, out.target_cos, out.prediction)


def margin_cross_entropy(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    margin: MarginLike = None,
    scale: Union[float, Tensor, AdaCos] = 64.0,
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
) -> Union[Tensor, tuple[Tensor, MarginStats]]:
    r"""Margin softmax cross-entropy over many classes without materializing ``B x C`` logits.

    Computes, for each row ``i`` with label ``y_i``,

    .. math::
        \cos_{ij} = \hat x_i \cdot \hat w_j,\quad t_i = \cos_{i y_i},\quad
        z_i = s\,\psi(t_i),\quad
        \ell_i = \log\Big(e^{z_i} + \sum_{j \ne y_i} e^{s \cos_{ij}}\Big) - z_i

    where ``x̂``, ``ŵ`` are the L2-normalized rows (``normalize=True``) and
    ``psi`` is the margin (with per-row scales, ``s_i`` in place of ``s`` in
    row ``i``). This equals ``F.cross_entropy`` over the logits ``s * cos``
    with the target logit replaced by ``s * psi(t)``, and so the usual
    CosFace / ArcFace / SphereFace heads.

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
        scale (float, Tensor or AdaCos): ``s`` > 0; or a ``(B,)`` floating-point tensor of
            per-row scales ``s_i`` (positive, finite; a 0-d tensor applies to every row): row
            ``i``'s logits are ``s_i cos_ij`` and its target logit ``s_i psi(t_i)``, and the tensor
            receives its gradient when it requires one (a learnable or per-sample temperature);
            or a :class:`marginops.AdaCos` scale policy (its current scale is used; in training
            mode a dynamic one then sets the next step's scale from this call's statistics).
            The fused backends receive per-row scales as
            :attr:`marginops.backends.Call.row_scale` (with ``FusedOptions.scale = 1``). Default: 64.0.
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
            beyond inputs and their gradients. Default: :data:`marginops.DEFAULT_MEMORY_BUDGET`
            (256 MiB) on the torch and native backends; on the triton backend the weight's own
            bytes (at least 256 MiB, at most an eighth of the GPU's memory; see
            ``docs/benchmarks.md``).
        strategy (str): how the fused backends spend GEMMs and memory.
            ``"recompute"``: the forward keeps only per-row statistics and the
            backward recomputes the logits tile by tile (four GEMMs, scratch
            of a few tiles). ``"workspace"``: a block of rows across *all*
            classes is kept in a workspace bounded by ``memory_budget``
            and, for a scalar loss, the gradients are computed during the
            forward pass (three GEMMs; needs ``reduction`` ``"mean"``/``"sum"``
            and a budget of at least one row of ``C`` logits, else a
            ValueError). ``"auto"``: ``"workspace"`` for a scalar loss with gradients over the
            whole class range when blocks of at least 128 rows (or the whole batch) fit the
            budget, else ``"recompute"``. Default: ``"auto"``.
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
        row_weight (Tensor, optional): ``(B,)`` non-negative, finite loss weights, one per row,
            treated as constants (no gradient): row ``i``'s loss (a margin's per-row term
            included) is multiplied by ``row_weight[i]``; ignored rows stay 0; ``"mean"``
            divides by the sum of the weights of the rows that are not ignored (as
            ``F.cross_entropy``'s weighted mean; a zero sum gives a zero loss). A miner's
            selection of rows (e.g. pytorch-metric-learning's ``indices_tuple``) maps onto it
            as 0/1 weights. Default: None (every row weighs 1).

    Returns:
        The loss (a scalar, or ``(B,)`` for ``reduction="none"``) in the wider of the
        two input dtypes and at least float32 (16-bit inputs give a float32 loss), or
        ``(loss, stats)`` with ``return_stats=True``.
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
        log-sum-exp, the loss and the gradient accumulators are float32 (float64 for
        float64 inputs): the loss is not rounded to 16 bits, which alone would cost
        2-3e-3 of it. Autocast is switched off inside marginops' operators so it cannot
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
    call = prepare_call(
        embeddings, weight, labels, margin, scale, normalize=normalize, reduction=reduction,
        ignore_index=ignore_index, label_smoothing=label_smoothing, backend=backend, chunk_size=chunk_size,
        memory_budget=memory_budget, strategy=strategy, return_stats=return_stats, validate_labels=validate_labels,
        interclass_filtering_threshold=interclass_filtering_threshold, gradient_filter=gradient_filter,
        row_weight=row_weight,
    )
    loss, stats = _reference_loss(call) if call.backend == "reference" else fused_loss(call)
    return (loss, stats) if return_stats else loss
