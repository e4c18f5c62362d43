"""The tile engine: planning, row blocks, strategies, statistics merging and the gradient loop, written once.

A fused backend built on the engine supplies only the work on **one row
block**: rows ``[r0, r1)`` of the batch against every class of its range. The
engine cuts the batch into row blocks, picks the strategy and tile sizes for
the device (:func:`plan`), merges the statistics the blocks return
(:func:`merge_block`), hands each block its gradient inputs, and exposes the
module-level functions of :class:`~marginops.backends.interface.Backend`
through :class:`Engine`. The torch backend's row block is a loop over class
tiles in ATen (:mod:`marginops.backends.torch_chunked`); the native
backend's is one C++ call per pass whose parallel region runs the whole block
(:mod:`marginops.backends.native`); the Triton backend's is a launch of its
forward kernel over a grid of class splits and, for the gradients, its
gradient kernels with cuBLAS products (:mod:`marginops.backends.triton_margin`).

**The per-row-block interface** (:class:`RowBlockKernel`, one object per call,
built from the :class:`~marginops.backends.interface.Call`):

* ``forward_block(r0, r1, plan, workspace) -> BlockStats``: the statistics
  of rows ``[r0, r1)`` over all classes of the range, per *group* of classes
  (a tile, a group of consecutive tiles, or a kernel's class split): for each
  row and group the largest kept non-target logit (``shift``, ``-inf`` when
  there is none) and ``sum exp(logit - shift)`` over the kept non-target
  logits (relative to 0 where ``shift`` is ``-inf``); with a prediction
  wanted, the largest non-target logit (filtered ones included) and its
  first class index in the range; the row's target logit as the GEMM
  produced it (0 where the target lies outside the range; None when the
  maxima already cover the target); optionally the sum of the non-target
  logits per group (label smoothing's statistic; None: the engine computes
  it as a rank-1 term). Groups must be consecutive class intervals in
  increasing order. With a ``workspace`` (what :meth:`RowBlockKernel.new_workspace`
  allocated for the plan, by default a flat tensor of :attr:`Plan.scratch_bytes`;
  the workspace strategy), each group is one tile of ``plan.chunk`` classes
  (any groups if the workspace keeps its tiles' shifts itself,
  :attr:`RowBlockKernel.workspace_keeps_shifts`) and the block's exponentials
  ``exp(logit - shift)`` stay there, laid out as the backend likes, until
  ``gradient_block`` of the same rows.
* ``gradient_block(r0, r1, plan, grads, workspace, dxh, dD)``: add the
  gradients of the block's non-target logits to ``dxh[r0:r1]`` and ``dD``,
  from the kept exponentials (``workspace`` not None) or recomputed against
  ``grads.lse``. :class:`BlockGrads` carries the per-row coefficient
  ``coef_i = g_i s row_scale_i`` (``dL/dlogit_ij = coef_i (p_ij - eps/C)``),
  label smoothing's ``coef_i eps / C`` per row, each kept tile's factor
  ``coef_i exp(shift_ik - lse_i)`` and, with the gradient filter, which
  kept tiles it lets through (neither for a workspace that keeps its
  shifts); ``first``/``last`` say whether this is the
  first or the last row block (a backend may write ``dD`` on the first
  instead of accumulating, and finish it on the last).
* ``finish_grads(coef, dxh, dD)``: once after all row blocks (e.g. label
  smoothing as a rank-1 term, the normalization backward of ``W``).
* Class attributes and methods the planner reads: :meth:`stored_bytes`
  (bytes per row and class of the workspace, a pure function of dtypes and
  options), :meth:`workspace_budget` (the backend's budget policy,
  :class:`WorkspaceBudget`: by default rows of ``classes * stored_bytes``
  within ``opts.budget``), :meth:`tiling` (the device's tile policy,
  :class:`Tiling`), :attr:`workspace_sub_centers`,
  :attr:`workspace_keeps_shifts`, :meth:`new_weight_grad` and
  :meth:`new_workspace`.

**A GPU kernel backend on it** (Triton, :mod:`marginops.backends.triton_plan`):
its forward kernel computes a row block's statistics across all classes in
class splits, so ``forward_block`` returns one group per split, with
maxima that cover the target (``target=None``); its workspace keeps one
shift per kernel tile and its gradient kernel rescales the exponentials and
flags negligible tiles of ``G`` itself (:attr:`RowBlockKernel.workspace_keeps_shifts`).
Its budget policy sizes the default budget to the weight, lets a block of
all rows take what the ``dW`` accumulator of several would cost, and caps
it at a share of the device's memory (:class:`WorkspaceBudget`); its tiling
makes the recompute strategy's row block the whole batch (its backward
plans class chunks of ``G`` and finishes ``dW`` chunk by chunk) and takes
any workspace block the budget allows; its kernels' configs set the class
tiles.

**Strategies.** Whether a call forms its gradients in the forward pass
(:func:`takes_workspace`) is a pure function of sizes, dtypes and options,
since the shapes of the operators' outputs depend on it (``torch.compile``
traces with it): yes for a scalar loss with gradients wanted over the whole
class range when blocks of ``min(B, MIN_WORKSPACE_ROWS)`` rows of stored
exponentials fit the budget. The device then decides *how* (:func:`plan`):
with the workspace (three GEMMs) when its row blocks reach the device's
:attr:`Tiling.min_workspace_rows` (each row block reads and writes all of
``dW`` once), otherwise by recomputing the logits inside the same call (four
GEMMs, large row blocks). Calls that do not form gradients early recompute
them in the backward.

**Performance model on a GPU (a prediction, not yet measured).** The torch
backend on CUDA (:func:`gpu_tiling`): row blocks of up to 16,384 rows, tiles
of thousands of classes within the budget, products in the input dtype with
float32 results (``torch.mm(..., out_dtype=torch.float32)``), the weight
rows of a tile normalized once (``chunk x D``, cheaper than scaling the
``rows x chunk`` tile). Per tile the forward reads the float32 logits about
six times (GEMM write, max, shift, exp, sum: ~24 bytes per logit), the
recompute gradient about four (shift, exp written as bf16: ~14 bytes), the
workspace gradient once (the bf16 copy: 6 bytes). At B=8192, D=2304,
C=256k bf16 on an H200 (one GEMM 14.1 ms, elementwise at ~3.8 TB/s): with
the default 256 MiB budget the workspace has 512-row blocks, below the GPU's
1024, so the gradients are recomputed in the forward call: 4 GEMMs (56 ms) +
forward passes (~13 ms) + gradient passes (~8 ms) = ~78 ms, about 1.85x the
three-GEMM floor (42.2 ms); with ``memory_budget=4 GiB``, two 4096-row
workspace blocks: 3 GEMMs (42 ms) + forward (~13 ms) + conversions (~3 ms)
+ ``dW`` traffic (~3 ms) = ~61 ms, about 1.45x. The elementwise passes
dominate the excess; Python issues ~15 kernels per tile (~0.1 ms of host
time against ~1 ms of device time per tile), with no host synchronisation
(except the opt-in gradient filter's one flag per tile when recomputing).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .common import Prepared, acc_dtype
from .interface import DEFAULT_MEMORY_BUDGET, Call, FusedOptions, RowStats

__all__ = ["DeviceInfo", "describe", "Tiling", "cpu_tiling", "gpu_tiling", "Plan", "plan", "WorkspaceBudget",
           "takes_workspace",
           "MIN_WORKSPACE_ROWS", "BlockStats", "BlockGrads", "RowBlockKernel", "Engine", "merge_block",
           "logsumexp_groups", "exp_floor", "check_options"]


# -- devices --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceInfo:
    """What the planner knows of a device.

    Attributes:
        kind: ``"cpu"``, or ``"gpu"`` for CUDA (and any other accelerator).
        cache_bytes: a CPU core's L2 cache; a GPU's L2.
        workers: threads PyTorch runs on (CPU, read at import), or multiprocessors (GPU).
        memory_bytes: the GPU's memory (0 on a CPU).
        capability: a CUDA GPU's compute capability as ``major * 10 + minor`` (90 for H100/H200); None
            elsewhere (kernel backends pick tuned tiles by it).
    """

    kind: str
    cache_bytes: int
    workers: int
    memory_bytes: int = 0
    capability: Optional[int] = None


_DEFAULT_L2 = 1 << 20


def _l2_per_core() -> int:
    """L2 bytes per core from sysfs (Linux); 1 MiB where it cannot be read."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in sorted(base.glob("index*")):
            if (index / "level").read_text().strip() == "2" and \
                    (index / "type").read_text().strip() in ("Unified", "Data"):
                size = (index / "size").read_text().strip().upper()
                mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
                return int(size.rstrip("KMG")) * mult
    except (OSError, ValueError):
        pass
    return _DEFAULT_L2


#: This machine's CPU, read once at import (sysfs, PyTorch's thread count), so that a call's plan is a
#: pure function of its sizes and options.
CPU = DeviceInfo("cpu", _l2_per_core(), max(1, torch.get_num_threads()))


@functools.lru_cache(maxsize=None)
def _gpu(device: torch.device) -> DeviceInfo:
    props = torch.cuda.get_device_properties(device)
    return DeviceInfo("gpu", int(getattr(props, "L2_cache_size", 0) or 0), int(props.multi_processor_count),
                      int(props.total_memory), props.major * 10 + props.minor)


def describe(device: "torch.device | str") -> DeviceInfo:
    """The :class:`DeviceInfo` of ``device`` (CPU: :data:`CPU`; CUDA: its properties, cached; ``"cuda"``
    without an index: the current device)."""
    device = torch.device(device)
    if device.type == "cpu":
        return CPU
    if device.type == "cuda":
        return _gpu(device if device.index is not None else torch.device("cuda", torch.cuda.current_device()))
    return DeviceInfo("gpu", 0, 1)


# -- tile policies and plans ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tiling:
    """How a backend cuts a call into tiles on one device: data, read by :func:`plan`.

    Classes per tile are ``tile_bytes / (rows * bytes per logit)`` rounded down
    to a power of two within ``[min_chunk, max_chunk]`` (an explicit
    ``chunk_size`` wins), then shrunk to fit the budget.

    Attributes:
        tile_bytes: the size a tile aims at.
        min_chunk, max_chunk: bounds of the derived classes per tile.
        recompute_rows: rows per block of the recompute strategy.
        min_workspace_rows: fewer rows per block than this and the workspace strategy (all of ``dW``
            read and written once per block) costs more than the GEMM it saves: recompute instead.
        tiles_in_flight: tiles alive at once (one per worker of a parallel region).
        flush_subnormals: flush values below ``finfo.tiny`` before GEMMs (CPUs: a 10-50x slow path on some).
        gpu: products in the input dtype with float32 results (tensor cores), not in the accumulation dtype.
    """

    tile_bytes: int
    min_chunk: int
    max_chunk: int
    recompute_rows: int
    min_workspace_rows: int
    tiles_in_flight: int = 1
    flush_subnormals: bool = True
    gpu: bool = False


#: Fewer rows per block than this (or than the batch) and a call does not form its gradients in the
#: forward pass: the workspace's rank-R updates of dW (all of dW read and written once per block) cost
#: more than the GEMM it saves. Measured on CPUs: 80-row blocks ran at 1.47x the three-GEMM floor,
#: recompute at 1.35x, 256-row blocks at 1.09x.
MIN_WORKSPACE_ROWS = 128


def cpu_tiling(device: DeviceInfo, *, per_worker: bool) -> Tiling:
    """CPU tiles.

    ``per_worker`` (the native backend: each worker of a parallel region runs
    the GEMMs and passes of its own tiles): a tile is half of one core's L2
    (the other half holds the GEMM's weight tile and input rows), one in
    flight per worker. Otherwise (the torch backend: every ATen op spreads
    one tile over all threads) larger tiles, one at a time: 8 MiB, about the
    4096 classes x 512 rows tuned on a 2-core Zen 5 at B=1024, D=512,
    C=100k fp32.
    """
    if per_worker:
        return Tiling(tile_bytes=device.cache_bytes // 2, min_chunk=512, max_chunk=16384, recompute_rows=512,
                      min_workspace_rows=MIN_WORKSPACE_ROWS, tiles_in_flight=device.workers)
    return Tiling(tile_bytes=8 << 20, min_chunk=2048, max_chunk=8192, recompute_rows=512,
                  min_workspace_rows=MIN_WORKSPACE_ROWS)


def gpu_tiling(device: DeviceInfo) -> Tiling:
    """GPU tiles: whole row blocks of up to 16,384 rows against thousands of classes, as large as the
    budget allows (each tile is a handful of kernel launches; the GEMMs want big operands). The workspace
    strategy needs 1024-row blocks: at ~700 TFLOP/s against ~4 TB/s one GEMM over a block costs what
    reading and writing a float32 ``dW`` costs at about 600 rows."""
    return Tiling(tile_bytes=1 << 30, min_chunk=1024, max_chunk=65536, recompute_rows=16384,
                  min_workspace_rows=1024, flush_subnormals=False, gpu=True)


@dataclass(frozen=True)
class Plan:
    """A call's strategy and tiles.

    Attributes:
        strategy: ``"workspace"`` (each row block's exponentials kept, gradients formed from them) or
            ``"recompute"`` (logits recomputed for the gradients).
        rows: rows per block.
        chunk: classes per tile.
        scratch_bytes: bytes of the workspace (``"workspace"``) or of the tiles in flight (``"recompute"``).
    """

    strategy: str
    rows: int
    chunk: int
    scratch_bytes: int


def _pow2_floor(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def _derived_chunk(tiling: Tiling, rows: int, classes: int, per_logit: int, k: int) -> int:
    """Classes per tile from the tile policy (its bounds count rows of ``W``: ``k`` per class)."""
    chunk = _pow2_floor(max(1, tiling.tile_bytes // max(1, rows * per_logit)))
    low, high = max(1, -(-tiling.min_chunk // k)), max(1, tiling.max_chunk // k)
    return max(1, min(max(classes, 1), max(low, min(high, chunk))))


@dataclass(frozen=True)
class WorkspaceBudget:
    """How many bytes a call's workspace may take: a backend's budget policy, read by :func:`takes_workspace`
    and :func:`plan`.

    With ``memory_budget`` set, the workspace takes at most that many bytes.
    Without it, ``default`` bytes; a block of *all* rows may take up to
    ``one_block`` bytes more (what several blocks would need beside the
    workspace and one block does not, e.g. a float32 ``dW`` accumulator); and
    never more than ``cap`` bytes (a share of the device's memory; None: no cap).

    Attributes:
        row_bytes: bytes of one row of the workspace (every class of the range).
        default, one_block, cap: the default budget's terms, above.
    """

    row_bytes: int
    default: int = DEFAULT_MEMORY_BUDGET
    one_block: int = 0
    cap: Optional[int] = None

    def total(self, opts: FusedOptions) -> int:
        """The budget in bytes: ``opts.memory_budget``, or :attr:`default`."""
        return opts.memory_budget if opts.memory_budget is not None else self.default

    def rows(self, batch: int, opts: FusedOptions) -> int:
        """Rows of ``batch`` per workspace block within the budget (0: not one row fits)."""
        row = max(1, self.row_bytes)
        if opts.memory_budget is not None:
            return min(batch, opts.memory_budget // row)
        rows = batch if batch * row <= self.default + self.one_block else min(batch, self.default // row)
        return rows if self.cap is None else min(rows, max(1, self.cap // row))


def takes_workspace(batch: int, classes: int, opts: FusedOptions, stored: int, wanted: bool,
                    budget: Optional[WorkspaceBudget] = None) -> bool:
    """Whether a call forms its gradients in the forward pass: a pure function of sizes and options.

    ``stored`` is the workspace's bytes per row and class, ``wanted`` whether
    the call could (a scalar loss with gradients over the whole class range),
    ``budget`` the backend's budget policy (default: rows of ``classes * stored``
    bytes within ``opts.budget``).
    ``"auto"``: when ``min(batch, MIN_WORKSPACE_ROWS)`` rows fit the budget.
    ``"workspace"``: when one row does (else a ValueError); ``"recompute"``: never.
    """
    if not wanted or opts.strategy == "recompute" or batch == 0:
        return False
    budget = budget or WorkspaceBudget(classes * stored)
    least = 1 if opts.strategy == "workspace" else min(batch, MIN_WORKSPACE_ROWS)
    if budget.rows(batch, opts) >= least:
        return True
    if opts.strategy == "workspace":
        raise ValueError(f"strategy='workspace' needs memory_budget >= {budget.row_bytes} bytes (one row of "
                         f"the workspace across all {classes} classes), got memory_budget={budget.total(opts)}")
    return False


def plan(batch: int, classes: int, opts: FusedOptions, tiling: Tiling, *, stored: int, tile: int,
         workspace: bool, rows_per_class: int = 1, budget: Optional[WorkspaceBudget] = None) -> Plan:
    """Rows and tiles for one call within its budget.

    Args:
        batch, classes: rows and classes of the call.
        tiling: the device's tile policy.
        stored: bytes per row and class of the workspace.
        tile: bytes per row and class of each tile's scratch (beyond the workspace in the workspace
            strategy; 0 when the tiles live in it).
        workspace: whether the call forms its gradients in the forward pass (:func:`takes_workspace`).
        rows_per_class: rows of ``W`` per class (sub-centres): the tile policy's bounds count rows of ``W``.
        budget: the workspace's budget policy (default: rows of ``classes * stored`` bytes within
            ``opts.budget``).

    The workspace strategy's blocks hold as many rows as fit (evened out over
    the batch: no thin last block), if that reaches ``tiling.min_workspace_rows``
    (or the batch); otherwise, and for calls that do not form gradients early,
    the recompute strategy: ``min(batch, tiling.recompute_rows)`` rows and
    tiles shrunk (classes first) until ``tiling.tiles_in_flight`` of them fit ``opts.budget``.
    """
    if workspace:
        ws = budget or WorkspaceBudget(classes * stored)
        rows = max(1, ws.rows(batch, opts))
        if opts.strategy == "workspace" or rows >= min(batch, tiling.min_workspace_rows):
            rows = math.ceil(batch / math.ceil(batch / rows)) if batch else rows
            chunk = opts.chunk_size or _derived_chunk(tiling, rows, classes, tile or stored, rows_per_class)
            if tile:  # the tiles' scratch comes out of what the workspace leaves
                left = ws.total(opts) - rows * ws.row_bytes
                chunk = max(1, min(chunk, left // max(1, tiling.tiles_in_flight * rows * tile)))
            extra = tiling.tiles_in_flight * rows * chunk * tile
            return Plan("workspace", rows, min(chunk, max(classes, 1)), rows * ws.row_bytes + extra)
    rows = max(1, min(batch, tiling.recompute_rows))
    per_logit = max(1, tile)
    chunk = opts.chunk_size or _derived_chunk(tiling, rows, classes, per_logit, rows_per_class)
    chunk = max(1, min(chunk, max(classes, 1), opts.budget // max(1, tiling.tiles_in_flight * rows * per_logit)))
    return Plan("recompute", rows, chunk, tiling.tiles_in_flight * rows * chunk * tile)


# -- what a row block returns and receives ------------------------------------------------------------------

class BlockStats(NamedTuple):
    """Statistics of one row block (``R`` rows) per group of classes (``G`` groups, consecutive intervals
    in increasing class order); see the module docstring.

    Attributes:
        shift: (R, G) largest kept non-target logit (``-inf``: none).
        sumexp: (R, G) ``sum exp(logit - shift)`` over the kept non-target logits (relative to 0 where
            ``shift`` is ``-inf``).
        best: (R, G) largest non-target logit, filtered ones included; None without a prediction.
        best_index: (R, G) int64 its class index in the range, the first on ties; None without a prediction.
        logit_sum: (R, G) sum of the non-target logits, or None (the engine forms it as a rank-1 term).
        target: (R,) the target logit as the GEMM produced it; 0 where the target is outside the range. None:
            ``best`` and ``best_index`` already cover every class of the range, the target's included (a
            kernel whose running maximum sees the target column), and the engine does not compare it.
    """

    shift: Tensor
    sumexp: Tensor
    best: Optional[Tensor]
    best_index: Optional[Tensor]
    logit_sum: Optional[Tensor]
    target: Optional[Tensor]


class BlockGrads(NamedTuple):
    """What ``gradient_block`` needs for rows ``[r0, r1)`` (``R`` rows, ``T`` kept tiles).

    Attributes:
        lse: (R,) log-sum-exp of each row's logits, the margined target's included.
        coef: (R,) ``g_i s row_scale_i``: ``dL/dlogit_ij = coef_i (p_ij - eps / C)`` for a non-target ``j``.
        smoothing: (R,) ``coef_i eps / C``, or None without label smoothing.
        tile_coef: (R, T) ``coef_i exp(shift_ik - lse_i)``, the factor of kept tile ``k``'s exponentials
            (workspace strategy); None when recomputing or when the workspace keeps its shifts itself
            (:attr:`RowBlockKernel.workspace_keeps_shifts`).
        keep: (T,) bool, the kept tiles the gradient filter lets through (some probability reaches it);
            None: all of them (or recomputing, or a workspace that keeps its shifts: the backend applies
            ``opts.gradient_filter`` per tile).
        first, last: whether this is the first / last row block of the call.
    """

    lse: Tensor
    coef: Tensor
    smoothing: Optional[Tensor]
    tile_coef: Optional[Tensor]
    keep: Optional[Tensor]
    first: bool
    last: bool


def exp_floor(dtype: torch.dtype) -> float:
    """Most negative argument whose ``exp`` is still a normal number in ``dtype``."""
    return math.log(torch.finfo(dtype).tiny) + 0.5


def logsumexp_groups(shift: Tensor, sumexp: Tensor) -> Tensor:
    """Per row, ``log sum_k sumexp_k exp(shift_k)`` from (R, G) pairs; ``-inf`` where no group holds a
    logit (no overflow at any scale: every term is rescaled to the row's largest finite shift)."""
    if shift.shape[1] == 0:
        return shift.new_full((shift.shape[0],), -math.inf)
    M = shift.amax(1, keepdim=True)
    M = torch.where(torch.isfinite(M), M, torch.zeros_like(M))  # rows with no non-target class
    return M.squeeze(1) + torch.log((sumexp * torch.exp(shift - M)).sum(1))


def merge_block(stats: BlockStats) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(lse, best, best_index, logit_sum)`` of a block's rows over all its groups (best: the first group
    holding the maximum, whose index is the first class; before the target is compared)."""
    lse = logsumexp_groups(stats.shift, stats.sumexp)
    best = index = None
    if stats.best is not None:
        if stats.best.shape[1] == 0:
            best = stats.best.new_full((stats.best.shape[0],), -math.inf)
            index = torch.zeros(stats.best.shape[0], dtype=torch.int64, device=best.device)
        else:
            best, group = stats.best.max(1)  # the first group holding the maximum
            index = stats.best_index.gather(1, group.unsqueeze(1)).squeeze(1)
    logit_sum = stats.logit_sum.sum(1) if stats.logit_sum is not None else None
    return lse, best, index, logit_sum


# -- options ------------------------------------------------------------------------------------------------

#: The FusedOptions fields the engine and its backends implement. A field added later (a tile-math option)
#: must hold its default, or the call raises NotImplementedError: never a loss with an option ignored.
IMPLEMENTED = frozenset({"scale", "normalize", "label_smoothing", "reduce", "eps", "chunk_size", "memory_budget",
                         "want_prediction", "strategy", "need_x", "need_W", "class_start", "num_classes",
                         "filter_threshold", "sub_centers", "gradient_filter"})


def check_options(opts: FusedOptions) -> None:
    """NotImplementedError for an option the engine does not implement, or a combination it does not."""
    for f in dataclasses.fields(opts):
        if f.name in IMPLEMENTED:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if default is dataclasses.MISSING or getattr(opts, f.name) != default:
            raise NotImplementedError(f"FusedOptions.{f.name}={getattr(opts, f.name)!r} is not implemented by "
                                      "the tile engine")
    if opts.label_smoothing > 0 and opts.sub_centers > 1:
        raise NotImplementedError(f"label_smoothing > 0 is not combined with sub-centres (sub_centers="
                                  f"{opts.sub_centers}): its term sums class logits, maxima over sub-centres")
    if opts.label_smoothing > 0 and opts.filter_threshold is not None:
        raise NotImplementedError("label_smoothing > 0 is not combined with inter-class filtering: its term "
                                  "would sum logits of classes that filtering removes")


# -- the per-row-block interface -----------------------------------------------------------------------------

class RowBlockKernel(Prepared):
    """A backend's work on one row block, for one call; subclass it (see the module docstring).

    The shared per-call quantities come from :class:`~marginops.backends.common.Prepared`
    (``xh``, ``y_local``, ``in_range``, inverse norms, ``logit_scale``...); ``device`` is
    :func:`describe` of the weight's device.
    """

    row_scale_supported = True
    #: whether the workspace strategy keeps sub-centre tiles (else such calls recompute; an explicit
    #: ``strategy="workspace"`` raises NotImplementedError)
    workspace_sub_centers = False
    #: whether the workspace keeps each stored tile's shift itself and its gradient pass rescales the kept
    #: exponentials and applies ``opts.gradient_filter`` on its own (a GPU kernel's workspace): then
    #: ``forward_block`` may return any groups (e.g. a kernel's class splits) with a workspace too, and
    #: :class:`BlockGrads` carries no ``tile_coef`` or ``keep``
    workspace_keeps_shifts = False

    def __init__(self, call: Call):
        check_options(call.opts)
        super().__init__(call)
        self.device = describe(call.W.device)

    # -- sizes (pure functions of dtypes and options) --
    @classmethod
    def stored_bytes(cls, x_dtype: torch.dtype, W_dtype: torch.dtype, opts: FusedOptions) -> int:
        """Bytes per row and class of the workspace: one accumulation-dtype exponential per row of ``W``."""
        return torch.finfo(acc_dtype(x_dtype, W_dtype)).bits // 8 * opts.sub_centers

    @classmethod
    def workspace_budget(cls, classes: int, D: int, x_dtype: torch.dtype, W_dtype: torch.dtype,
                         opts: FusedOptions, device: Optional[DeviceInfo] = None) -> WorkspaceBudget:
        """The workspace's budget policy (:class:`WorkspaceBudget`): by default rows of ``classes`` times
        :meth:`stored_bytes` within ``opts.budget``. A pure function of sizes, dtypes and options; ``device``
        (None when deciding :func:`takes_workspace`, which sees no device) may refine it at run time."""
        return WorkspaceBudget(classes * cls.stored_bytes(x_dtype, W_dtype, opts))

    def tile_bytes(self, strategy: str) -> int:
        """Bytes per row and class of each tile's scratch beyond the workspace (``strategy="workspace"``),
        or of a recomputed tile."""
        return 0 if strategy == "workspace" else self.stored_bytes(self.x.dtype, self.W.dtype, self.opts)

    def tiling(self) -> Tiling:
        raise NotImplementedError

    def new_weight_grad(self) -> Tensor:
        """``dD`` (rows of ``W`` x D), accumulation dtype, zeroed."""
        return torch.zeros(self.n_rows, self.D, device=self.W.device, dtype=self.acc)

    def new_workspace(self, pl: Plan):
        """The workspace of a ``"workspace"`` plan, handed to every block: by default a flat
        accumulation-dtype tensor of :attr:`Plan.scratch_bytes`."""
        return torch.empty(pl.scratch_bytes // (torch.finfo(self.acc).bits // 8), device=self.W.device,
                           dtype=self.acc)

    # -- the work --
    def forward_block(self, r0: int, r1: int, pl: Plan, workspace: Optional[Tensor]) -> BlockStats:
        raise NotImplementedError

    def gradient_block(self, r0: int, r1: int, pl: Plan, grads: BlockGrads, workspace: Optional[Tensor],
                       dxh: Optional[Tensor], dD: Optional[Tensor]) -> None:
        raise NotImplementedError

    def finish_grads(self, coef: Tensor, dxh: Optional[Tensor], dD: Optional[Tensor]) -> None:
        """After the last row block; nothing by default."""

    # -- planning --
    def plan(self, grads: bool) -> Plan:
        """The call's :class:`Plan`; ``grads``: for :meth:`Engine.forward_with_grads`."""
        stored = self.stored_bytes(self.x.dtype, self.W.dtype, self.opts)
        if grads and _takes_workspace(type(self), self.B, self.C, self.D, self.x.dtype, self.W.dtype, self.opts):
            budget = self.workspace_budget(self.C, self.D, self.x.dtype, self.W.dtype, self.opts, self.device)
            pl = plan(self.B, self.C, self.opts, self.tiling(), stored=stored, tile=self.tile_bytes("workspace"),
                      workspace=True, rows_per_class=self.k, budget=budget)
            if pl.strategy == "workspace":
                return pl
        return plan(self.B, self.C, self.opts, self.tiling(), stored=stored, tile=self.tile_bytes("recompute"),
                    workspace=False, rows_per_class=self.k)

    def row_blocks(self, pl: Plan):
        for r0 in range(0, self.B, pl.rows):
            yield r0, min(r0 + pl.rows, self.B)

    def tiles(self, pl: Plan):
        """``(k, c0, c1)``: the class tiles of the range."""
        for k, c0 in enumerate(range(0, self.C, pl.chunk)):
            yield k, c0, min(c0 + pl.chunk, self.C)


def _workspace_wanted(kernel: type, C: int, opts: FusedOptions) -> bool:
    if not (opts.reduce and (opts.need_x or opts.need_W) and opts.is_full_range(C)):
        return False
    return opts.sub_centers == 1 or kernel.workspace_sub_centers


def _takes_workspace(kernel: type, B: int, C: int, D: int, x_dtype, W_dtype, opts: FusedOptions) -> bool:
    if opts.strategy == "workspace" and (opts.need_x or opts.need_W) and opts.reduce:
        opts.require_full_range(C)
        if opts.sub_centers > 1 and not kernel.workspace_sub_centers:
            raise NotImplementedError(f"strategy='workspace' does not support sub-centres (sub_centers="
                                      f"{opts.sub_centers}) on this backend; use strategy='recompute' or 'auto'")
    return takes_workspace(B, C, opts, kernel.stored_bytes(x_dtype, W_dtype, opts), _workspace_wanted(kernel, C, opts),
                           kernel.workspace_budget(C, D, x_dtype, W_dtype, opts))


# -- the loops, written once ---------------------------------------------------------------------------------

def _forward(k: RowBlockKernel, pl: Plan, workspace: Optional[Tensor] = None, on_block=None) -> RowStats:
    """Every row block's statistics, merged; ``on_block(r0, r1, stats, lse_block)`` runs after each block
    (before the next one overwrites the workspace)."""
    B, dev, acc = k.B, k.W.device, k.acc
    want = k.opts.want_prediction
    N = torch.empty(B, device=dev, dtype=acc)
    target = torch.zeros(B, device=dev, dtype=acc)  # s * t where the target is in range, else 0
    compare = True  # whether the target still competes for the prediction (BlockStats.target)
    best = torch.empty(B, device=dev, dtype=acc) if want else k.empty()
    arg = torch.empty(B, device=dev, dtype=torch.int64) if want else k.empty(torch.int64)
    smoothing = k.opts.label_smoothing > 0
    lsum = torch.empty(B, device=dev, dtype=acc) if smoothing else None
    for r0, r1 in k.row_blocks(pl):
        bs = k.forward_block(r0, r1, pl, workspace)
        N[r0:r1], b, i, s = merge_block(bs)
        if bs.target is None:
            compare = False
        else:
            target[r0:r1] = bs.target
        if want:
            best[r0:r1], arg[r0:r1] = b, i
        if smoothing:
            if s is None:
                lsum = None
            elif lsum is not None:
                lsum[r0:r1] = s
        if on_block is not None:
            on_block(r0, r1, bs, N[r0:r1])
    if want:
        if compare:  # the target competes too: first index on ties
            take = k.in_range & ((target > best) | ((target == best) & (k.y_local < arg)))
            best = torch.where(take, target, best)
            arg = torch.where(take, k.y_local, arg)
        arg = arg + k.opts.class_start
    logit_sum = (lsum if lsum is not None else k.logit_sum(target if compare else None)) if smoothing else k.empty()
    return RowStats(N, best, arg, logit_sum)


def _gradient_setup(k: RowBlockKernel, g: Tensor):
    coef = g.to(k.acc) * k.logit_scale
    smooth = coef * (k.opts.label_smoothing / k.C_total) if k.opts.label_smoothing > 0 else None
    dxh = torch.zeros(k.B, k.D, device=k.W.device, dtype=k.acc) if k.opts.need_x else None
    dD = k.new_weight_grad() if k.opts.need_W else None
    return coef, smooth, dxh, dD


def _recompute(k: RowBlockKernel, pl: Plan, lse: Tensor, coef: Tensor, smooth: Optional[Tensor],
               dxh: Optional[Tensor], dD: Optional[Tensor]) -> None:
    for r0, r1 in k.row_blocks(pl):
        grads = BlockGrads(lse[r0:r1], coef[r0:r1], smooth[r0:r1] if smooth is not None else None, None, None,
                           r0 == 0, r1 == k.B)
        k.gradient_block(r0, r1, pl, grads, None, dxh, dD)
    k.finish_grads(coef, dxh, dD)


class Engine:
    """The :class:`~marginops.backends.interface.Backend` functions for a :class:`RowBlockKernel` subclass."""

    def __init__(self, kernel: type):
        self.kernel = kernel

    def uses_workspace(self, B: int, C: int, D: int, x_dtype: torch.dtype, W_dtype: torch.dtype,
                       opts: FusedOptions) -> bool:
        """Whether the call forms its gradients in the forward pass (``C``: rows of ``W``): ``"workspace"``, or
        ``"auto"`` where it applies (a scalar loss with gradients, the whole class range, sub-centres only where
        the backend keeps them) and its row blocks hold enough rows within the backend's budget policy.

        Raises:
            ValueError: ``"workspace"`` that cannot hold one row within the budget, or a class range.
            NotImplementedError: ``"workspace"`` with sub-centres on a backend that does not keep them.
        """
        check_options(opts)
        return _takes_workspace(self.kernel, B, opts.classes_of(C), D, x_dtype, W_dtype, opts)

    def forward_stats(self, call: Call) -> RowStats:
        """Every row block's statistics across the call's classes; no gradients."""
        k = self.kernel(call)
        return _forward(k, k.plan(grads=False))

    def forward_with_grads(self, call: Call, z: Tensor, g: Tensor) -> tuple[RowStats, Optional[Tensor],
                                                                            Optional[Tensor]]:
        """Statistics and the gradients for per-row weights ``g`` in one call: each row block's exponentials
        kept in the workspace and turned into gradients once its log-sum-exp (with the target logits ``z``) is
        known (three GEMMs), or, where this device's row blocks are too thin, the logits recomputed within the
        call (four)."""
        k = self.kernel(call)
        if not _takes_workspace(self.kernel, k.B, k.C, k.D, call.x.dtype, call.W.dtype, call.opts):
            raise ValueError("forward_with_grads called for a call that does not form its gradients in the "
                             "forward pass (see uses_workspace)")
        pl = k.plan(grads=True)
        zf = z.to(k.acc)
        coef, smooth, dxh, dD = _gradient_setup(k, g)
        if pl.strategy == "recompute":  # this device's row blocks are too thin for the workspace
            stats = _forward(k, pl)
            _recompute(k, pl, torch.logaddexp(stats.lse, zf), coef, smooth, dxh, dD)
            return stats, dxh, dD
        workspace = k.new_workspace(pl)
        gf = call.opts.gradient_filter

        def gradients(r0, r1, bs: BlockStats, N_block):
            lse = torch.logaddexp(N_block, zf[r0:r1])
            c = coef[r0:r1]
            tile_coef = keep = None
            if not k.workspace_keeps_shifts:
                top = torch.exp(bs.shift - lse.unsqueeze(1))  # (R, tiles): each kept tile's largest probability
                keep = top.amax(0) >= gf if gf is not None and r1 > r0 else None
                tile_coef = c.unsqueeze(1) * top
            grads = BlockGrads(lse, c, smooth[r0:r1] if smooth is not None else None, tile_coef, keep,
                               r0 == 0, r1 == k.B)
            k.gradient_block(r0, r1, pl, grads, workspace, dxh, dD)

        stats = _forward(k, pl, workspace, gradients)
        k.finish_grads(coef, dxh, dD)
        return stats, dxh, dD

    def recompute_grads(self, call: Call, lse: Tensor, g: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """The recompute strategy's gradients for per-row weights ``g`` from the forward's log-sum-exp ``lse``:
        every tile's logits computed again (four GEMMs in all)."""
        k = self.kernel(call)
        if not (call.opts.need_x or call.opts.need_W):
            return None, None
        pl = k.plan(grads=False)
        coef, smooth, dxh, dD = _gradient_setup(k, g)
        _recompute(k, pl, lse.to(k.acc).contiguous(), coef, smooth, dxh, dD)
        return dxh, dD
