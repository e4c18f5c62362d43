"""Class-sharded margin heads over ``torch.distributed``: each process owns a block of classes.

Past a few million classes the class weights and their gradient no longer fit
one device. :class:`ShardedMarginHead` splits the classes into contiguous
blocks, one per rank of a process group (sizes differ by at most one), and
computes the loss of the *global* batch without any ``B x C`` tensor on any
rank. It runs the same preparation (:mod:`marginops.prepare`) and the same
custom operators (:mod:`marginops.ops`) as a single-process call, on the
gathered batch against this rank's classes; the ranks meet at the points an
:class:`~marginops.prepare.Exchange` names, through traceable collectives
(``torch.distributed._functional_collectives``). One step, on every rank::

    x, y, s, w = all_gather(local embeddings, labels,          B x D floats, 3 B scalars (B = the global
                            per-row scales and weights)        batch; s and w only when given)
    t_r        = target_cosine(x, W_r, y)                      this rank's classes: 0 where the label is another's
    t          = all_reduce(t_r)                               B scalars: each label's owner supplies its cosine
    stats_r    = margin_stats(x, W_r, y)                       the B x C_r x D pass over this rank's classes
    stats      = combine(all_gather(stats_r))                  world x B x (1 to 3) floats (+ world x B int64 argmax
                                                               with return_stats), merged by log-add-exp
    loss       = margin_loss(stats, z = s psi(t))              the same global loss on every rank
    backward:    margin_grads(x, W_r, lse)                     this rank's classes with the global log-sum-exp;
                 reduce_scatter(dX)                            dW_r stays local; each rank receives the sum of
                                                               every rank's partial dX over its own rows

So per step a rank sends ``B * D`` floats twice (the gather and the gradient's
reduce-scatter) plus ``O(world * B)`` scalars, independent of the number of
classes. Partial FC (InsightFace) all-gathers the same embeddings and labels
and reduces the same embedding gradient, but also keeps a ``B x C_local``
logits matrix on every rank.

With ``sample_rate < 1`` (training mode) each step runs over every class of
the global batch plus a uniform draw of the others (Partial FC's class
sampling); :meth:`ShardedMarginHead.attach_optimizer` keeps the unsampled
rows' weights and optimizer state untouched. The draw is a counter-based hash
of ``(seed, step, rank, class)`` computed with tensor operations, the step
being a tensor buffer (:attr:`ShardedMarginHead.sample_step`): compiled steps
neither recompile nor synchronise for it.

**Compiling.** With ``max_local_batch`` a step (embeddings -> head -> loss, and
its backward) compiles with ``torch.compile(fullgraph=True)``: no graph break,
one compilation for every step (the sizes, the sampled counts and the layout
are fixed by the bound). Without it the ragged local batch sizes are read on
the host each step: one graph break there (``.tolist()`` of the gathered
sizes), one more with class sampling (the number each rank draws, which
depends on the batch's labels, compiles again whenever it changes), and each
new combination of local sizes compiles again (measured: one more compilation
per new combination, up to Dynamo's recompile limit), so keep the sizes fixed
or give the bound. An AdaCos scale is read on the host every training step
(as in one process).

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
import torch.distributed._functional_collectives as fc
from torch import Tensor, nn

from . import ops
from .margins.adacos import AdaCos
from .backends import RowStats, combine_stats
from .functional import fused_loss
from .margins.zoo import MarginLike
from .modules import _OPTIONS, call_scale, init_class_weights
from .prepare import Exchange, label_check, prepare_call
from .margins.subcenter import SubCenter, check_sub_centers

__all__ = ["ShardedMarginHead", "shard_range"]

#: Options of :func:`marginops.margin_cross_entropy` the sharded head does not take (it plans its own passes).
_UNSUPPORTED = ("strategy",)

# the gathers, without and with a backward that reduce-scatters (renamed in torch 2.13; the old names warn there)
_all_gather = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor
_all_gather_autograd = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd

_MASK31 = 2**31 - 1
# above every drawn score (below 2**(31 + bits of num_local) <= 2**62 for fewer than 2**31 classes per
# rank): the batch's classes are always sampled
_POSITIVE = 1 << 62


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(class_start, num_local)`` of ``rank``: contiguous blocks whose sizes differ by at most one."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, base + (1 if rank < extra else 0)


# -- the ranks' exchange -----------------------------------------------------------------------------------
#
# Every rank computes the same global loss from the gathered batch. A gathered tensor's gradient is
# partial on every rank (each rank differentiates through its own classes only) and the gather's backward
# sums it across ranks; a quantity summed from per-rank parts (the target cosine) is used identically on
# every rank, so its gradient reaches each part once; a quantity every rank computes identically from the
# gathered batch (the margin's parameters, the target logit's scale) has its gradient shared out.


def _gather_rows(t: Tensor, sizes: list[int], group, autograd: bool) -> Tensor:
    """Every rank's ``t`` (first dimensions ``sizes``) in rank order, padded to the largest for the
    collective; with ``autograd`` the gradient of each rank's rows is summed over ranks and handed back."""
    most = max(sizes)
    if t.shape[0] < most:
        t = torch.cat([t, t.new_zeros((most - t.shape[0], *t.shape[1:]))])
    gather = _all_gather_autograd if autograd else _all_gather
    every = gather(t.contiguous(), 0, group)
    if all(n == most for n in sizes):
        return every
    return torch.cat([every[r * most:r * most + n] for r, n in enumerate(sizes)])


class _RankExchange(Exchange):
    """The :class:`~marginops.prepare.Exchange` of one step of a :class:`ShardedMarginHead`."""

    def __init__(self, group, world_size: int):
        self.group, self.world_size = group, world_size

    def replicate(self, t: Tensor) -> Tensor:
        if self.world_size == 1:
            return t
        frozen = t.detach()
        return frozen + (t - frozen) / self.world_size  # the value of t, 1 / world of its gradient

    def share_target(self, t_mine: Tensor) -> Tensor:
        frozen = t_mine.detach()
        # exact: every row's cosine comes from its owner, zeros from the others; the gradient reaches t_mine
        return t_mine + (fc.all_reduce(frozen, "sum", self.group) - frozen)

    def combine(self, stats: RowStats) -> RowStats:
        names = [name for name in ("lse", "max", "logit_sum") if getattr(stats, name).numel()]
        packed = torch.stack([getattr(stats, name) for name in names])  # the floats: one collective
        every = _all_gather(packed, 0, self.group).view(self.world_size, *packed.shape)
        args = [stats.argmax] * self.world_size  # empty without prediction
        if stats.argmax.numel():
            args = _all_gather(stats.argmax.contiguous(), 0, self.group).view(self.world_size, -1).unbind(0)
        return combine_stats([stats._replace(argmax=arg, **dict(zip(names, part.unbind(0))))
                              for part, arg in zip(every.unbind(0), args)])

    def batch_margin(self, margin, x: Tensor):
        if getattr(margin, "seed", 0) is None:
            raise ValueError(f"{type(margin).__name__} draws random margins: give it an int seed so that every "
                             "rank draws the same ones (seed=None draws from each process's own RNG)")
        return margin.for_batch(self.replicate(x))


def _mix(h: Tensor) -> Tensor:
    """A bijection of 31-bit integers (xor-shift-multiply rounds; no product leaves int64's range)."""
    for multiplier in (0x2C1B3C6D, 0x297A2D39, 0x5BD1E995 & _MASK31):
        h = ((h ^ (h >> 15)) * multiplier) & _MASK31
    return h ^ (h >> 16)


# -- the module ------------------------------------------------------------------------------------------


class ShardedMarginHead(nn.Module):
    r"""A :class:`~marginops.MarginHead` whose classes are split across the ranks of a process group.

    Rank ``r`` owns classes ``[class_start, class_start + num_local)`` (contiguous
    blocks, sizes differing by at most one) and its ``weight`` holds only those
    rows (``k`` per class with sub-centres). ``forward(local_embeddings,
    local_labels)`` returns the loss of the global batch (every rank's rows, in
    rank order; local batches may differ in size), the same on every rank;
    backward gives ``local_embeddings`` and the weight block the gradients a
    single :class:`~marginops.MarginHead` gives on the concatenated batch and the
    full weight. No rank holds a ``B x C`` tensor or any other rank's weights.
    See the module docstring for what is sent per step and how a step compiles.

    Args:
        in_features (int): embedding size ``D``, the same on every rank.
        num_classes (int): all classes ``C``, the same on every rank (at least the world size).
        margin (Margin, callable or None): as for :func:`marginops.margin_cross_entropy`;
            an adaptive margin sees the global batch, and one that draws random margins
            needs an int seed (every rank must draw the same ones).
        scale (float or AdaCos): ``s``, or a :class:`marginops.AdaCos` policy for ``num_classes``
            (a submodule; it observes the global batch's statistics, identically on every rank,
            so every rank keeps the same scale; not with class sampling). Default: 64.0.
        sub_centers (int): ``k`` sub-centres per class (sub-center ArcFace): each rank holds
            whole classes, ``weight`` is ``(num_local * k, in_features)``, class-major, and
            checkpoints are those of ``MarginHead(..., sub_centers=k)``. Default: 1.
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
            ``(seed, n, r)`` (``n`` is :attr:`sample_step`, a tensor buffer: restore it to resume a
            run's draws). Default: 0.
        max_local_batch (int, optional): a bound on every rank's local batch. Without it, the
            gathered batch sizes (and, when sampling, the sampled counts) are read on the host each
            step, a synchronisation on GPUs and a graph break under ``torch.compile``. With it,
            every rank pads its batch to the bound with ignored rows and each rank samples a fixed
            number of classes (at least ``world * max_local_batch``, so that every label fits), so
            the step never waits for the host and compiles whole; the global batch and ``stats``
            are then in the padded layout (rank ``r``'s rows at
            ``[r * max_local_batch, r * max_local_batch + B_r)``). Default: None.
        device, dtype: factory arguments for ``weight``.
        **options: keyword options of :func:`marginops.margin_cross_entropy` (``normalize``,
            ``reduction``, ``ignore_index``, ``label_smoothing``, ``backend``, ``chunk_size``,
            ``memory_budget``, ``return_stats``, ``validate_labels``, ...); ``strategy`` is not taken
            (the sharded head always recomputes: the gradients need the global log-sum-exp).

    ``forward(local_embeddings, local_labels, *, scale=None, row_weight=None)``: ``scale``
    a ``(B_local,)`` tensor of per-row scales for this rank's rows in place of the head's
    (not with AdaCos), ``row_weight`` ``(B_local,)`` loss weights of this rank's rows;
    both as in :func:`marginops.margin_cross_entropy`, and given on every rank or on none.

    Raises:
        RuntimeError: when torch.distributed is not initialised.
        ValueError: for sizes that differ across ranks (on every rank), or fewer classes than ranks.

    Examples::

        >>> # torchrun --nproc_per_node=2 train.py
        >>> dist.init_process_group("gloo")
        >>> head = ShardedMarginHead(512, 1_000_000, margin=mo.ArcFace(0.5), scale=64.0, max_local_batch=256)
        >>> step = torch.compile(lambda x, y: head(x, y), fullgraph=True)
        >>> loss = step(local_embeddings, local_labels)   # the global batch's loss
        >>> loss.backward()
    """

    sample_step: Tensor
    sampled_rows: Tensor

    def __init__(self, in_features: int, num_classes: int, margin: MarginLike = None,
                 scale: "float | AdaCos" = 64.0, *, sub_centers: int = 1, process_group=None,
                 sample_rate: float = 1.0, seed: int = 0, max_local_batch: Optional[int] = None,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None, **options: Any):
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
        self.sub_centers = check_sub_centers(sub_centers, "sub_centers")
        if isinstance(margin, SubCenter):
            raise TypeError("give ShardedMarginHead the inner margin and sub_centers=k; it wraps the margin in "
                            "SubCenter (each rank then holds the k rows of each of its classes)")
        if isinstance(scale, AdaCos):
            if scale.num_classes != self.num_classes:
                raise ValueError(f"AdaCos was built for num_classes = {scale.num_classes}, the head has "
                                 f"{self.num_classes}")
            if self.sample_rate < 1:
                raise NotImplementedError("AdaCos with class sampling (sample_rate < 1): its statistics would be "
                                          "those of the sampled classes, not of the num_classes it scales for; "
                                          "give a fixed scale (e.g. AdaCos.fixed_scale(num_classes))")
        self.class_start, self.num_local = shard_range(self.num_classes, self.world_size, self.rank)
        self.margin, self.scale, self.options = margin, scale, dict(options)  # an AdaCos policy: a submodule
        self.weight = nn.Parameter(torch.empty(self.num_local * self.sub_centers, self.in_features, device=device,
                                               dtype=dtype))
        # rows of weight sampled by the forwards since the last optimizer step (see attach_optimizer)
        self.register_buffer("sampled_rows", torch.zeros(self.weight.shape[0], dtype=torch.bool, device=device),
                             persistent=False)
        # training forwards that sampled so far: the counter of the draws
        self.register_buffer("sample_step", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        self._exchange = _RankExchange(process_group if process_group is not None else dist.group.WORLD,
                                       self.world_size)
        self._check_same_on_every_rank()
        self.reset_parameters()

    def _check_same_on_every_rank(self) -> None:
        mine = torch.tensor([self.in_features, self.num_classes, self.sub_centers], dtype=torch.int64,
                            device=self.weight.device)
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine, group=self.process_group)
        for r, other in enumerate(every):
            if not torch.equal(other, mine):
                d, c, k = other.tolist()
                raise ValueError(f"ShardedMarginHead sizes differ across ranks: rank {self.rank} has in_features="
                                 f"{self.in_features}, num_classes={self.num_classes}, sub_centers="
                                 f"{self.sub_centers}; rank {r} has in_features={d}, num_classes={c}, "
                                 f"sub_centers={k}")

    def reset_parameters(self) -> None:
        """As :meth:`marginops.MarginHead.reset_parameters`, for this rank's rows."""
        init_class_weights(self.weight, self.options.get("normalize", True))

    # -- the step ------------------------------------------------------------------------------------

    def forward(self, local_embeddings: Tensor, local_labels: Tensor, *, scale: Optional[Tensor] = None,
                row_weight: Optional[Tensor] = None):
        """The loss of the global batch (or ``(loss, stats)`` with ``return_stats=True``, stats over
        the global batch: ``stats.prediction`` is the argmax over all classes)."""
        o = dict(self.options)
        ignore_index = o.get("ignore_index", -100)
        x_local, y_local = local_embeddings, local_labels
        if not isinstance(x_local, Tensor) or x_local.dim() != 2 or x_local.shape[1] != self.in_features:
            raise ValueError(f"local_embeddings must be (B_local, {self.in_features}), got "
                             f"{tuple(x_local.shape) if isinstance(x_local, Tensor) else type(x_local).__name__}")
        if not isinstance(y_local, Tensor) or y_local.shape != (x_local.shape[0],):
            raise ValueError(f"local_labels must be ({x_local.shape[0]},), got "
                             f"{tuple(y_local.shape) if isinstance(y_local, Tensor) else type(y_local).__name__}")
        head_scale = call_scale(self.scale, scale)
        rows = [(x_local, 0.0, True), (y_local.long(), ignore_index, False)]
        for name, value, fill in (("scale", scale, 1.0), ("row_weight", row_weight, 0.0)):
            if value is not None:  # per-row values of the local batch, gathered like its rows
                if isinstance(value, Tensor) and value.dim() == 0 and name == "scale":
                    value = value.expand(x_local.shape[0])
                if not isinstance(value, Tensor) or value.shape != (x_local.shape[0],):
                    raise ValueError(f"{name} must be a ({x_local.shape[0]},) tensor (one value per local row), "
                                     f"got {tuple(value.shape) if isinstance(value, Tensor) else value!r}")
                rows.append((value, fill, name == "scale"))
        # 1. the global batch: sizes first (ragged local batches), then rows, labels and per-row values
        cap = self.max_local_batch
        if cap is None:  # ragged sizes, read on the host: a synchronisation on GPUs, a graph break when compiled
            n = torch.tensor([x_local.shape[0]], dtype=torch.int64, device=x_local.device)
            sizes = [int(s) for s in fc.wait_tensor(_all_gather(n, 0, self._exchange.group)).tolist()]
        else:  # every rank pads to the bound: padding rows are ignored rows, no size to read
            if x_local.shape[0] > cap:
                raise ValueError(f"local batch of {x_local.shape[0]} rows exceeds max_local_batch = {cap}")
            pad = cap - x_local.shape[0]
            rows = [(torch.cat([t, t.new_full((pad, *t.shape[1:]), fill)]), fill, grad) for t, fill, grad in rows]
            sizes = [cap] * self.world_size
        x, y, *per_row = (_gather_rows(t, sizes, self._exchange.group, grad) for t, _, grad in rows)
        if scale is not None:
            head_scale = per_row.pop(0)
        if row_weight is not None:
            row_weight = per_row.pop(0)
        W, class_start, num_classes, index = self.weight, self.class_start, self.num_classes, None
        if self.sample_rate < 1 and self.training:
            # 1b. class sampling: this step runs over the sampled classes of every rank, renumbered
            # labels are checked before they are renumbered (a bad one would silently become class 0)
            y = ops.checked_labels(y, self.num_classes, ignore_index, label_check(o.get("validate_labels", True),
                                                                                  y.device))
            index, class_start, num_classes, y = self._sample(y, ignore_index)
            W = W.index_select(0, self._rows_of(index))  # its backward scatters the sampled rows' gradient
        # 2. the call, prepared and run as in one process, on this rank's classes of the global batch
        margin = SubCenter(self.margin, self.sub_centers) if self.sub_centers > 1 else self.margin
        call = prepare_call(x, W, y, margin, head_scale, **{**o, "strategy": "recompute"}, row_weight=row_weight,
                            class_start=class_start, num_classes=num_classes, exchange=self._exchange)
        if call.backend == "reference":
            raise ValueError("ShardedMarginHead runs a fused backend; backend='reference' is single-process only")
        loss, stats = fused_loss(call, self._exchange)
        if not call.return_stats:
            return loss
        if index is not None:  # back from the sampled numbering to class indices
            prediction = stats.prediction
            mine = (prediction >= class_start) & (prediction < class_start + len(index))
            picked = index[(prediction - class_start).clamp(0, len(index) - 1)] + self.class_start
            prediction = fc.all_reduce(torch.where(mine, picked, torch.zeros_like(picked)), "sum",
                                       self._exchange.group)
            stats = stats._replace(prediction=prediction)
        return loss, stats

    # -- class sampling ------------------------------------------------------------------------------

    def _rows_of(self, classes: Tensor) -> Tensor:
        """The rows of ``weight`` that hold ``classes`` (local indices): ``k`` per class."""
        if self.sub_centers == 1:
            return classes
        offsets = torch.arange(self.sub_centers, device=classes.device)
        return (classes.unsqueeze(1) * self.sub_centers + offsets).reshape(-1)

    def _sample(self, y: Tensor, ignore_index: int) -> tuple[Tensor, int, int, Tensor]:
        """Draw this step's classes: ``(index, class_start, num_classes, labels)``.

        ``index`` (sorted) are this rank's sampled classes: every class of the global batch ``y`` that
        lives here, then draws among the others up to ``ceil(sample_rate * num_local)`` (with
        ``max_local_batch``: up to a fixed count, see :meth:`_sample_counts`). The sampled classes of all
        ranks, in rank order, are the step's classes; ``class_start`` is where this rank's start,
        ``num_classes`` how many there are, and ``labels`` is ``y`` renumbered into them (ignored rows
        unchanged; every rank computes the same).
        """
        device = y.device
        valid = y != ignore_index
        counts = self._sample_counts()
        if counts is None:  # how many each rank draws depends on the labels: read on the host
            counts = [max(int(p), self._draws(n)) for p, n in zip(self._positives_per_rank(y, valid).tolist(),
                                                                  self._local_sizes())]
        k = counts[self.rank]
        local = y - self.class_start
        mine = valid & (local >= 0) & (local < self.num_local)
        at = local.clamp(0, self.num_local - 1)
        positive = torch.zeros(self.num_local, dtype=torch.int64, device=device).index_add_(0, at, mine.long()) > 0
        # scores: the batch's classes above every draw; draws unique (class index in the low bits)
        classes = torch.arange(self.num_local, device=device)
        bits = max(1, self.num_local.bit_length())
        drawn = (self._draw_scores(classes) << bits) | classes
        scores = torch.where(positive, classes + _POSITIVE, drawn)
        index = scores.topk(k).indices.sort().values
        with torch.no_grad():
            self.sample_step.add_(1)
            self.sampled_rows[self._rows_of(index)] = True
        start = sum(counts[: self.rank])
        position = torch.full((self.num_local,), -1, dtype=torch.int64, device=device).index_put(
            (index,), torch.arange(k, device=device))
        renumbered = torch.where(mine, start + position[at], torch.zeros_like(y))
        renumbered = fc.all_reduce(renumbered, "sum", self._exchange.group)  # each label renumbered by its owner
        return index, start, sum(counts), torch.where(valid, renumbered, y)

    def _draw_scores(self, classes: Tensor) -> Tensor:
        """31-bit pseudo-random scores of this rank's ``classes`` at step :attr:`sample_step`: a hash of
        ``(seed, step, rank, class)`` in tensor arithmetic, traceable and the same on every device."""
        key = _mix(torch.full_like(classes[:1], (self.seed * 0x9E3779B1) & _MASK31) ^ (self.sample_step & _MASK31))
        key = _mix(key ^ ((self.rank * 0x7FEB352D) & _MASK31))
        return _mix(((classes * 0x846CA68B) & _MASK31) ^ key)

    def _local_sizes(self) -> list[int]:
        return [shard_range(self.num_classes, self.world_size, r)[1] for r in range(self.world_size)]

    def _positives_per_rank(self, y: Tensor, valid: Tensor) -> Tensor:
        """``(world,)`` how many distinct classes of the global batch each rank owns (``B log B`` work)."""
        labels = torch.sort(torch.where(valid, y, torch.full_like(y, -1))).values
        first = torch.ones_like(labels, dtype=torch.bool)
        first[1:] = labels[1:] != labels[:-1]
        starts = [shard_range(self.num_classes, self.world_size, r)[0] for r in range(1, self.world_size)]
        starts = torch.tensor(starts, dtype=torch.int64, device=y.device)
        owner = torch.bucketize(labels, starts, right=True)
        per_rank = torch.zeros(self.world_size, dtype=torch.int64, device=y.device)
        return per_rank.index_add_(0, owner, (first & (labels >= 0)).long())

    def _draws(self, num_local: int) -> int:
        return min(num_local, math.ceil(self.sample_rate * num_local))

    def _sample_counts(self) -> Optional[list[int]]:
        """Classes each rank samples when that is fixed in advance (with ``max_local_batch``: enough
        for every label of the padded global batch, so no count has to be read), else None."""
        if self.max_local_batch is None:
            return None
        return [min(n, max(self._draws(n), self.world_size * self.max_local_batch)) for n in self._local_sizes()]

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
            if self.sample_rate >= 1 or len(rows) == self.weight.shape[0]:
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
        """The whole ``(num_classes * sub_centers, in_features)`` weight, gathered on every rank (a collective)."""
        sizes = [n * self.sub_centers for n in self._local_sizes()]
        return _gather_rows(self.weight.detach(), sizes, self._exchange.group, autograd=False).clone()

    def full_state_dict(self) -> dict[str, Tensor]:
        """``{"weight": full weight}`` plus the rest of the head's state (an AdaCos scale): loads into a
        :class:`~marginops.MarginHead` with the same ``sub_centers`` or, with :meth:`load_full_state_dict`,
        into a sharded head on any world size (a collective)."""
        state = {name: value for name, value in self.state_dict().items() if name != "weight"}
        return {"weight": self.full_weight(), **state}

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load this rank's rows from a full ``{"weight": (num_classes * sub_centers, in_features)}`` state
        (and the rest of the head's state, when present)."""
        full = state["weight"]
        rows = self.num_classes * self.sub_centers
        if tuple(full.shape) != (rows, self.in_features):
            raise ValueError(f"weight must be ({rows}, {self.in_features}), got {tuple(full.shape)}")
        k = self.sub_centers
        with torch.no_grad():
            self.weight.copy_(full[self.class_start * k:(self.class_start + self.num_local) * k])
        rest = {name: value for name, value in state.items() if name != "weight"}
        if rest:
            self.load_state_dict({"weight": self.weight.detach(), **rest})

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        sub = f", sub_centers={self.sub_centers}" if self.sub_centers > 1 else ""
        scale = "AdaCos" if isinstance(self.scale, AdaCos) else self.scale
        return (f"in_features={self.in_features}, num_classes={self.num_classes}{sub}, classes=[{self.class_start}, "
                f"{self.class_start + self.num_local}) on rank {self.rank} of {self.world_size}, "
                f"margin={self.margin!r}, scale={scale}{opts}")
