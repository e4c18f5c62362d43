"""Class-sharded margin heads over ``torch.distributed``: each process owns a block of classes.

Past a few million classes the class weights and their gradient no longer fit
one device. :class:`ShardedMarginHead` splits the classes into contiguous
blocks, one per rank of a process group (sizes differ by at most one), and
computes the loss of the *global* batch without any ``B x C`` tensor on any
rank. One step, on every rank::

    sizes    = all_gather(local batch size)                     world int64 (none with max_local_batch)
    x, y     = all_gather(local embeddings, local labels)       B x D floats, B labels (ragged: padded to the largest)
    stats_r  = backend.forward_stats(x, W_r, y)                 this rank's classes only
    stats    = combine(all_gather(stats_r))                     world x B x 4 scalars, log-add-exp
    t        = all_reduce(t_r)                                  B scalars: the owner of each label supplies it
    loss     = the same global loss on every rank
    backward: dW_r stays local; the partial dX of every rank is all-reduced and each rank keeps its own rows

With ``sample_rate < 1`` (training mode) each step runs over every class of
the global batch plus a uniform draw of the others (Partial FC's class
sampling); :meth:`ShardedMarginHead.attach_optimizer` keeps the unsampled
rows' weights and optimizer state untouched.

So per step a rank sends ``B_total * D`` floats twice (the gather and the
gradient reduction) plus ``O(world * B_total)`` scalars, independent of the
number of classes. Partial FC (InsightFace) all-gathers the same embeddings
and labels, and reduces the same embedding gradient, but also keeps a
``B_total x C_local`` logits matrix on every rank.

The loss every rank returns is the global loss; its backward gives each
rank's embeddings ``d loss / d local_embeddings`` and its weight block the
matching rows of the full weight gradient: the same numbers a single
:class:`~marginops.MarginHead` gives on the concatenated batch and the full
weight. (A backbone wrapped in ``DistributedDataParallel`` averages its
gradients over ranks, which divides them by the world size relative to
that single-process head; scale its learning rate, or the loss fed to it,
if you compare the two.)
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import ops
from .backends import Call, FusedOptions, RowStats, combine_stats, get_backend, resolve_backend
from .backends.common import acc_dtype, inverse_norms
from .margins.adacos import AdaCos
from .functional import (MarginStats, _add_row_terms, _apply_margin, _label_check, _resolve_margin, _validate,
                         check_filter_threshold, check_gradient_filter, loss_dtype, row_weights)
from .margins.subcenter import SubCenter
from .margins.zoo import MarginLike
from .modules import _OPTIONS, init_class_weights

__all__ = ["ShardedMarginHead", "shard_range"]

#: Options of :func:`marginops.margin_cross_entropy` the sharded head does not take (it plans its own passes).
_UNSUPPORTED = ("strategy",)


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(class_start, num_local)`` of ``rank``: contiguous blocks whose sizes differ by at most one."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, base + (1 if rank < extra else 0)


# -- collectives with autograd ---------------------------------------------------------------------------
#
# Every rank computes the same global loss from the gathered batch. Each
# collective's backward is the gradient of that one loss: a gathered tensor's
# gradient is partial on every rank (each rank differentiates through its own
# classes only) and is summed across ranks; a quantity summed from per-rank
# parts is used identically on every rank, so its gradient passes through.


def _all_gather_rows(t: Tensor, sizes: list[int], group) -> Tensor:
    """Concatenate every rank's ``t`` (first dimensions ``sizes``), padding to the largest for the collective."""
    most = max(sizes)
    padded = t.new_zeros((most, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _GatherRows(torch.autograd.Function):
    """All ranks' rows in rank order; backward: sum the partial gradients, keep this rank's rows."""

    @staticmethod
    def forward(ctx, t: Tensor, sizes: list[int], rank: int, group) -> Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _all_gather_rows(t, sizes, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None, None, None


class _SumOverRanks(torch.autograd.Function):
    """``sum_r t_r``; every rank uses the sum identically, so the gradient passes through."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        total = t.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _Replicated(torch.autograd.Function):
    """Identity for a quantity every rank computes identically from the gathered batch: each rank's
    gradient is ``1 / world`` of the whole, so the gather's sum across ranks counts it once."""

    @staticmethod
    def forward(ctx, t: Tensor, world: int) -> Tensor:
        ctx.world = world
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad / ctx.world, None


# -- the two halves of the loss on one rank's classes -----------------------------------------------------


class _ShardTarget(torch.autograd.Function):
    """``t_i`` for the rows whose label is among this rank's classes (0 elsewhere), and the carriers.

    As :func:`marginops.ops.target_cosine`: the carriers bring the dense
    gradients of :class:`_ShardSoftmax` back here, where the target rows this
    rank owns are added.
    """

    @staticmethod
    def forward(ctx, x: Tensor, W: Tensor, y: Tensor, inv_x: Optional[Tensor], inv_w: Optional[Tensor],
                class_start: int, W_grad_dtype: torch.dtype):
        local = y - class_start
        owned = (local >= 0) & (local < W.shape[0])
        rows = torch.where(owned, local, torch.zeros_like(local))
        ctx.save_for_backward(x, W, rows, owned, inv_x, inv_w)
        ctx.set_materialize_grads(False)
        acc = acc_dtype(x.dtype, W.dtype)
        t = ops._target_dot(x, W, rows, inv_x, inv_w)
        t = torch.where(owned, t, torch.zeros_like(t))
        carrier_x = x.new_zeros((), dtype=acc).expand(x.shape)
        carrier_W = W.new_zeros((), dtype=W_grad_dtype).expand(W.shape)
        return t, carrier_x, carrier_W

    @staticmethod
    def backward(ctx, dt, d_carrier_x, d_carrier_W):
        ops._no_double_backward("ShardedMarginHead")
        x, W, rows, owned, inv_x, inv_w = ctx.saved_tensors
        if dt is not None:
            dt = torch.where(owned, dt, torch.zeros_like(dt))
        dx, dW = ops.add_target_terms(x, W, rows, inv_x, inv_w, dt, d_carrier_x, d_carrier_W,
                                      ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dx, dW, None, None, None, None, None


class _ShardSoftmax(torch.autograd.Function):
    """The non-target part of the global loss: this rank's statistics, combined over all ranks."""

    @staticmethod
    def forward(ctx, x: Tensor, W: Tensor, y: Tensor, inv_x: Optional[Tensor], inv_w: Optional[Tensor], z: Tensor,
                w: Tensor, carrier_x: Tensor, carrier_W: Tensor, backend: str, opts: FusedOptions, group):
        module = get_backend(backend)
        call = Call(x, W, y, inv_x, inv_w, opts)
        acc = acc_dtype(x.dtype, W.dtype)
        zf, wf = z.to(acc), w.to(acc)
        with ops._no_autocast(x.device):
            mine = module.forward_stats(call)
            stats = _combine_over_ranks(mine, group, opts)
            loss, lse = ops.loss_from_stats(stats, zf, wf, opts.label_smoothing, opts.num_classes, opts.reduce)
        ctx.save_for_backward(x, W, y, inv_x, inv_w, zf, wf, lse)
        ctx.backend, ctx.opts = backend, opts
        ctx.set_materialize_grads(False)
        pred = stats.argmax if opts.want_prediction else y.new_zeros(0)
        ctx.mark_non_differentiable(lse, pred)
        return loss, lse, pred

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse, _grad_pred):
        if grad_loss is None:
            return (None,) * 12
        ops._no_double_backward("ShardedMarginHead")
        x, W, y, inv_x, inv_w, z, w, lse, = ctx.saved_tensors
        opts = ctx.opts
        g = w * grad_loss.to(lse.dtype)
        dxh = dW = None
        if ctx.needs_input_grad[7] or ctx.needs_input_grad[8]:
            with ops._no_autocast(x.device):
                dxh, dW = get_backend(ctx.backend).recompute_grads(Call(x, W, y, inv_x, inv_w, opts), lse, g)
        dz = ops.target_grad(g, z, lse, opts.label_smoothing, opts.num_classes)
        return None, None, None, None, None, dz, None, dxh, dW, None, None, None


def _combine_over_ranks(mine: RowStats, group, opts: FusedOptions) -> RowStats:
    """Every rank's :class:`RowStats` gathered (``world x B`` scalars each) and combined exactly."""
    world = dist.get_world_size(group)
    # the statistics this call has: one float collective for them, one int64 one for the argmax
    names = ["lse", *(["max"] if opts.want_prediction else []), *(["logit_sum"] if opts.label_smoothing > 0 else [])]
    packed = torch.stack([getattr(mine, name) for name in names])
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed, group=group)
    args = [mine.argmax] * world  # empty without prediction
    if opts.want_prediction:
        args = [torch.empty_like(mine.argmax) for _ in range(world)]
        dist.all_gather(args, mine.argmax.contiguous(), group=group)
    return combine_stats([mine._replace(argmax=arg, **dict(zip(names, p))) for p, arg in zip(gathered, args)])


# -- the module ------------------------------------------------------------------------------------------


class ShardedMarginHead(nn.Module):
    r"""A :class:`~marginops.MarginHead` whose classes are split across the ranks of a process group.

    Rank ``r`` owns classes ``[class_start, class_start + num_local)`` (contiguous
    blocks, sizes differing by at most one) and its ``weight`` holds only those
    rows. ``forward(local_embeddings, local_labels)`` returns the loss of the
    global batch (every rank's rows, in rank order; local batches may differ in
    size), the same on every rank; backward gives ``local_embeddings`` and the
    weight block the gradients a single :class:`~marginops.MarginHead` gives on
    the concatenated batch and the full weight. No rank holds a ``B x C`` tensor
    or any other rank's weights. See the module docstring for what is sent.

    Args:
        in_features (int): embedding size ``D``, the same on every rank.
        num_classes (int): all classes ``C``, the same on every rank (at least the world size).
        margin (Margin, callable or None): as for :func:`marginops.margin_cross_entropy`.
        scale (float): ``s``. Default: 64.0.
        process_group: the group whose ranks share the classes. Default: the default group
            (``torch.distributed.init_process_group`` must have run).
        sample_rate (float): in training mode, the share of this rank's classes each step runs over
            (Partial FC's class sampling): every class that is a label of the global batch is kept, the
            rest of the share is drawn uniformly from the other classes, and only the sampled rows of
            ``weight`` get a gradient. ``0`` keeps the batch's classes only; ``1`` (default) samples
            nothing. In eval mode every class is used. With a stateful optimizer, call
            :meth:`attach_optimizer` so that the rows a step did not sample keep their weights *and*
            optimizer state. Default: 1.0.
        seed (int): seed of the class sampling; the draw of step ``n`` on rank ``r`` depends only on
            ``(seed, n, r)``. Default: 0.
        max_local_batch (int, optional): a bound on every rank's local batch. Without it, the
            gathered batch sizes (and, when sampling, the sampled counts) are read on the host each
            step, a synchronisation on GPUs. With it, every rank pads its batch to the bound with
            ignored rows and each rank samples a fixed number of classes (at least
            ``world * max_local_batch``, so that every label fits), so the step never waits for
            the host; the global batch and ``stats`` are then in the padded layout (rank ``r``'s rows
            at ``[r * max_local_batch, r * max_local_batch + B_r)``). Default: None.
        device, dtype: factory arguments for ``weight``.
        **options: keyword options of :func:`marginops.margin_cross_entropy` (``normalize``,
            ``reduction``, ``ignore_index``, ``label_smoothing``, ``backend``, ``chunk_size``,
            ``memory_budget``, ``return_stats``, ``validate_labels``); ``strategy`` is not taken (the
            sharded head always recomputes: the gradients need the global log-sum-exp).

    Raises:
        RuntimeError: when torch.distributed is not initialised.
        ValueError: for sizes that differ across ranks (on every rank), or fewer classes than ranks.

    Examples::

        >>> # torchrun --nproc_per_node=2 train.py
        >>> dist.init_process_group("gloo")
        >>> head = ShardedMarginHead(512, 1_000_000, margin=mo.ArcFace(0.5), scale=64.0)
        >>> loss = head(local_embeddings, local_labels)   # the global batch's loss
        >>> loss.backward()
    """

    def __init__(self, in_features: int, num_classes: int, margin: MarginLike = None, scale: float = 64.0, *,
                 process_group=None, sample_rate: float = 1.0, seed: int = 0,
                 max_local_batch: Optional[int] = None, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None, **options: Any):
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ShardedMarginHead needs torch.distributed initialised first "
                               "(torch.distributed.init_process_group, e.g. under torchrun)")
        for name, value in (("in_features", in_features), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real) or not 0 <= sample_rate <= 1:
            raise ValueError(f"sample_rate must be a number in [0, 1], got {sample_rate!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
        self.sample_rate, self.seed = float(sample_rate), int(seed)
        if max_local_batch is not None and (isinstance(max_local_batch, bool)
                                            or not isinstance(max_local_batch, numbers.Integral)
                                            or max_local_batch < 1):
            raise ValueError(f"max_local_batch must be a positive int or None, got {max_local_batch!r}")
        self.max_local_batch = None if max_local_batch is None else int(max_local_batch)
        self.sample_step = 0  # training forwards that sampled so far: the draw's counter
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; valid options are {list(_OPTIONS)}")
        taken = sorted(set(options) & set(_UNSUPPORTED))
        if taken:
            raise TypeError(f"ShardedMarginHead does not take {taken}: it always recomputes (the gradients "
                            "need the global log-sum-exp)")
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.in_features, self.num_classes = int(in_features), int(num_classes)
        if self.num_classes < self.world_size:
            raise ValueError(f"num_classes = {num_classes} is smaller than the world size {self.world_size}: "
                             "every rank needs at least one class")
        if isinstance(margin, SubCenter):
            raise NotImplementedError("ShardedMarginHead does not support sub-centres (SubCenter); use MarginHead")
        if isinstance(scale, AdaCos):
            raise NotImplementedError("ShardedMarginHead does not support the AdaCos scale; give a fixed scale "
                                      "(e.g. AdaCos.fixed_scale(num_classes))")
        self.class_start, self.num_local = shard_range(self.num_classes, self.world_size, self.rank)
        self.margin, self.scale, self.options = margin, scale, dict(options)
        self.weight = nn.Parameter(torch.empty(self.num_local, self.in_features, device=device, dtype=dtype))
        # rows sampled by the forwards since the last optimizer step (see attach_optimizer)
        self.register_buffer("sampled_rows", torch.zeros(self.num_local, dtype=torch.bool, device=device),
                             persistent=False)
        self._check_same_on_every_rank()
        self.reset_parameters()

    def _check_same_on_every_rank(self) -> None:
        mine = torch.tensor([self.in_features, self.num_classes], dtype=torch.int64, device=self.weight.device)
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine, group=self.process_group)
        for r, other in enumerate(every):
            if not torch.equal(other, mine):
                d, c = other.tolist()
                raise ValueError(f"ShardedMarginHead sizes differ across ranks: rank {self.rank} has in_features="
                                 f"{self.in_features}, num_classes={self.num_classes}; rank {r} has "
                                 f"in_features={d}, num_classes={c}")

    def reset_parameters(self) -> None:
        """As :meth:`marginops.MarginHead.reset_parameters`, for this rank's rows."""
        init_class_weights(self.weight, self.options.get("normalize", True))

    # -- the step ------------------------------------------------------------------------------------

    def forward(self, local_embeddings: Tensor, local_labels: Tensor):
        """The loss of the global batch (or ``(loss, stats)`` with ``return_stats=True``, stats over
        the global batch: ``stats.prediction`` is the argmax over all classes)."""
        o = dict(self.options)
        x_local, y_local = local_embeddings, local_labels
        W = self.weight
        reduction = o.get("reduction", "mean")
        ignore_index = o.get("ignore_index", -100)
        normalize = o.get("normalize", True)
        return_stats = o.get("return_stats", False)
        if not isinstance(x_local, Tensor) or x_local.dim() != 2 or x_local.shape[1] != self.in_features:
            raise ValueError(f"local_embeddings must be (B_local, {self.in_features}), got "
                             f"{tuple(x_local.shape) if isinstance(x_local, Tensor) else type(x_local).__name__}")
        group = self.process_group
        # 1. the global batch: sizes first (ragged local batches), then rows and labels
        if not isinstance(y_local, Tensor) or y_local.shape != (x_local.shape[0],):
            raise ValueError(f"local_labels must be ({x_local.shape[0]},), got "
                             f"{tuple(y_local.shape) if isinstance(y_local, Tensor) else type(y_local).__name__}")
        cap = self.max_local_batch
        if cap is None:  # ragged sizes, read on the host: one synchronisation on GPUs
            n = torch.tensor([x_local.shape[0]], dtype=torch.int64, device=x_local.device)
            every = [torch.empty_like(n) for _ in range(self.world_size)]
            dist.all_gather(every, n, group=group)
            sizes = [int(s) for s in torch.cat(every).tolist()]
        else:  # every rank pads to the bound: padding rows are ignored rows, no size to read
            if x_local.shape[0] > cap:
                raise ValueError(f"local batch of {x_local.shape[0]} rows exceeds max_local_batch = {cap}")
            pad = cap - x_local.shape[0]
            x_local = torch.cat([x_local, x_local.new_zeros(pad, self.in_features)])
            y_local = torch.cat([y_local.long(), y_local.new_full((pad,), ignore_index, dtype=torch.int64)])
            sizes = [cap] * self.world_size
        y = _all_gather_rows(y_local.long(), sizes, group)
        x = _GatherRows.apply(x_local, sizes, self.rank, group)
        # the same checks as margin_cross_entropy, on the global batch (every rank sees the same data,
        # so every rank raises the same error and none is left waiting in a collective)
        scale, label_smoothing, chunk_size, memory_budget = _validate(
            x, W, y, self.scale, reduction, ignore_index, o.get("label_smoothing", 0.0), normalize,
            o.get("chunk_size"), o.get("memory_budget"), "recompute", o.get("validate_labels", True))
        filter_threshold = check_filter_threshold(o.get("interclass_filtering_threshold"), normalize, label_smoothing)
        ops.check_labels(y, self.num_classes, ignore_index, _label_check(o.get("validate_labels", True), x.device))
        name = resolve_backend(o.get("backend", "auto"), x.device)
        if name == "reference":
            raise ValueError("ShardedMarginHead runs a fused backend; backend='reference' is single-process only")
        psi = _resolve_margin(self.margin, x.shape[0])
        extra = None
        if hasattr(psi, "for_batch"):  # adaptive margins see the global batch, identically on every rank
            if hasattr(psi, "seed") and psi.seed is None:
                raise ValueError(f"{type(psi).__name__} draws random margins: give it an int seed so that every "
                                 "rank draws the same ones (seed=None draws from each process's own RNG)")
            psi, extra = psi.for_batch(_Replicated.apply(x, self.world_size))
            psi = _resolve_margin(psi, x.shape[0])
        class_start, num_classes, index = self.class_start, self.num_classes, None
        if self.sample_rate < 1 and self.training:
            # 1b. class sampling: this step runs over the sampled classes of every rank, renumbered
            index, class_start, num_classes, y = self._sample(y, ignore_index)
            W = W.index_select(0, index)  # its backward scatters the sampled rows' gradient into weight
        acc = acc_dtype(x.dtype, W.dtype)
        grad_on = torch.is_grad_enabled()
        opts = FusedOptions(scale=scale, normalize=normalize, label_smoothing=label_smoothing,
                            reduce=reduction != "none", chunk_size=chunk_size, memory_budget=memory_budget,
                            want_prediction=return_stats, strategy="recompute",
                            need_x=grad_on and x.requires_grad, need_W=grad_on and W.requires_grad,
                            class_start=class_start, num_classes=num_classes, filter_threshold=filter_threshold,
                            gradient_filter=check_gradient_filter(o.get("gradient_filter")))
        inv_x = inverse_norms(x.detach(), acc) if normalize else None
        inv_w = inverse_norms(W.detach(), acc) if normalize else None
        valid, safe, w = row_weights(y, ignore_index, reduction, acc)
        # 2. the target cosine from the rank that owns each label, shared
        W_grad_dtype = get_backend(name).weight_grad_dtype(x.dtype, W.dtype, opts)
        t_mine, carrier_x, carrier_W = _ShardTarget.apply(x, W, safe, inv_x, inv_w, class_start, W_grad_dtype)
        t = _SumOverRanks.apply(t_mine, group)
        z = scale * _apply_margin(psi, t)
        # 3. the non-target part over this rank's classes, statistics combined over all ranks
        loss, lse, prediction = _ShardSoftmax.apply(x, W, safe, inv_x, inv_w, z, w, carrier_x, carrier_W, name,
                                                    opts, group)
        loss = _add_row_terms(loss, extra, valid, reduction).to(loss_dtype(x.dtype, W.dtype, x.device))
        if not return_stats:
            return loss
        if index is not None:  # back from the sampled numbering to class indices
            mine = (prediction >= class_start) & (prediction < class_start + len(index))
            picked = index[(prediction - class_start).clamp(0, len(index) - 1)] + self.class_start
            prediction = torch.where(mine, picked, torch.zeros_like(picked))
            dist.all_reduce(prediction, group=group)
        return loss, MarginStats(lse, z.detach(), t.detach(), prediction)

    # -- class sampling ------------------------------------------------------------------------------

    def _sample(self, y: Tensor, ignore_index: int) -> tuple[Tensor, int, int, Tensor]:
        """Draw this step's classes: ``(index, class_start, num_classes, labels)``.

        ``index`` (sorted) are this rank's sampled rows: every class of the global batch ``y`` that
        lives here, then uniform draws among the others up to ``ceil(sample_rate * num_local)``.
        The sampled classes of all ranks, in rank order, are the step's classes; ``class_start`` is
        where this rank's start, ``num_classes`` how many there are, and ``labels`` is ``y``
        renumbered into them (ignored rows unchanged; every rank computes the same).
        """
        group, device = self.process_group, y.device
        valid = y != ignore_index
        local = y - self.class_start
        mine = valid & (local >= 0) & (local < self.num_local)
        hits = torch.zeros(self.num_local, dtype=torch.int64, device=device)
        positive = hits.scatter_add_(0, local.clamp(0, self.num_local - 1), mine.long()) > 0
        counts = self._sample_counts()
        k = counts[self.rank] if counts is not None else max(int(positive.sum()), self._draws(self.num_local))
        g = torch.Generator(device=device).manual_seed((self.seed * 0x9E3779B1 + self.sample_step * 1_000_003
                                                        + self.rank * 7919) % 2**62)
        self.sample_step += 1
        scores = torch.rand(self.num_local, generator=g, device=device)
        scores = torch.where(positive, torch.full_like(scores, 2.0), scores)  # positives first, then the draws
        index = scores.topk(k).indices.sort().values
        if counts is None:  # how many each rank drew, read on the host: one synchronisation on GPUs
            every = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(self.world_size)]
            dist.all_gather(every, torch.tensor([k], dtype=torch.int64, device=device), group=group)
            counts = [int(c) for c in torch.cat(every).tolist()]
        start = sum(counts[: self.rank])
        position = torch.full((self.num_local,), -1, dtype=torch.int64, device=device)
        position[index] = torch.arange(k, device=device)
        renumbered = torch.where(mine, start + position[local.clamp(0, self.num_local - 1)], torch.zeros_like(y))
        dist.all_reduce(renumbered, group=group)  # each label renumbered by the rank that owns it
        with torch.no_grad():
            self.sampled_rows[index] = True
        return index, start, sum(counts), torch.where(valid, renumbered, y)

    def _draws(self, num_local: int) -> int:
        return min(num_local, math.ceil(self.sample_rate * num_local))

    def _sample_counts(self) -> Optional[list[int]]:
        """Classes each rank samples when that is fixed in advance (with ``max_local_batch``: enough
        for every label of the padded global batch, so no count has to be read), else None."""
        if self.max_local_batch is None:
            return None
        sizes = [shard_range(self.num_classes, self.world_size, r)[1] for r in range(self.world_size)]
        return [min(n, max(self._draws(n), self.world_size * self.max_local_batch)) for n in sizes]

    def attach_optimizer(self, optimizer: torch.optim.Optimizer):
        """Make ``optimizer`` update only the rows that this step sampled, leaving the others' weights
        *and* optimizer state (momentum, Adam moments, ...) as they were.

        Around each ``optimizer.step()`` the weight, its gradient and every per-element state tensor
        shaped like it are narrowed to the sampled rows, then scattered back (hooks on the
        optimizer; scalar state such as Adam's step count is shared by all rows). Rows sampled for
        the first time start from zero state. Without sampling the hooks do nothing. Returns the two
        hook handles.
        """
        p = self.weight
        if not any(q is p for group in optimizer.param_groups for q in group["params"]):
            raise ValueError("attach_optimizer: the optimizer does not hold this head's weight")
        stash: dict = {}

        def narrow(opt, args, kwargs):
            rows = self.sampled_rows.nonzero().squeeze(1)
            if self.sample_rate >= 1 or len(rows) == self.num_local:
                return
            state = opt.state.get(p, {})
            full = {k: v for k, v in state.items() if isinstance(v, Tensor) and v.shape == p.shape}
            stash.update(rows=rows, data=p.data, grad=p.grad, state=full)
            p.data = p.data.index_select(0, rows)
            if p.grad is not None:
                p.grad = p.grad.index_select(0, rows)
            for k, v in full.items():
                state[k] = v.index_select(0, rows)

        def widen(opt, args, kwargs):
            if stash:
                rows, data, grad, full = stash["rows"], stash["data"], stash["grad"], stash["state"]
                stash.clear()
                with torch.no_grad():
                    data.index_copy_(0, rows, p.data)
                    p.data, p.grad = data, grad
                    state = opt.state.get(p, {})
                    narrowed = (len(rows), *data.shape[1:])
                    for k, v in list(state.items()):
                        if isinstance(v, Tensor) and tuple(v.shape) == narrowed:
                            whole = full.get(k)
                            if whole is None:
                                whole = torch.zeros_like(data, dtype=v.dtype)
                            state[k] = whole.index_copy_(0, rows, v)
            with torch.no_grad():
                self.sampled_rows.zero_()

        return optimizer.register_step_pre_hook(narrow), optimizer.register_step_post_hook(widen)

    # -- checkpoints ---------------------------------------------------------------------------------

    def full_weight(self) -> Tensor:
        """The whole ``(num_classes, in_features)`` weight, gathered on every rank (a collective)."""
        sizes = [shard_range(self.num_classes, self.world_size, r)[1] for r in range(self.world_size)]
        return _all_gather_rows(self.weight.detach(), sizes, self.process_group)

    def full_state_dict(self) -> dict[str, Tensor]:
        """``{"weight": full weight}``: loads into a :class:`~marginops.MarginHead` or, with
        :meth:`load_full_state_dict`, into a sharded head on any world size (a collective)."""
        return {"weight": self.full_weight()}

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load this rank's rows from a full ``{"weight": (num_classes, in_features)}`` state."""
        full = state["weight"]
        if tuple(full.shape) != (self.num_classes, self.in_features):
            raise ValueError(f"weight must be ({self.num_classes}, {self.in_features}), got {tuple(full.shape)}")
        with torch.no_grad():
            self.weight.copy_(full[self.class_start:self.class_start + self.num_local])

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, classes=[{self.class_start}, "
                f"{self.class_start + self.num_local}) on rank {self.rank} of {self.world_size}, "
                f"margin={self.margin!r}, scale={self.scale}{opts}")
