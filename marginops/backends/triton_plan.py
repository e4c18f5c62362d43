"""Planning for the Triton backend: what the tile engine reads of it, and the decisions only it makes.

Pure functions of sizes, dtypes, options and a device description
(:class:`~marginops.backends.engine.DeviceInfo`): no tensors, no kernels, no
``triton`` import. The tile engine (:mod:`marginops.backends.engine`) decides
strategies and row blocks for every backend; :class:`Planning` (the base of
the backend's row-block kernel) gives it this backend's budget policy and
tiles, and the functions below are the Triton-only decisions: the
workspace's rows (padded exponentials plus one shift per kernel tile), the
forward config, the ``dW`` accumulator, the recompute backward's ``G``
chunks, the forward grid's class splits and the memory formula.

**Strategies** (the engine's rule): ``workspace`` (three GEMMs: the gradients
are formed during the forward pass from a row block's stored exponentials)
is the default (``strategy="auto"``) wherever it applies: a scalar loss with
gradients wanted, the whole class range, one row per class, and row blocks of
at least ``min(B, 128)`` rows within the budget. Elsewhere (``reduction=
"none"``, class ranges, sub-centres, no gradients) the statistics come from
the forward kernel and the backward recomputes the logits (four GEMMs).

**The default budget** (``memory_budget=None``) is sized to the problem and
the device (:func:`workspace_budget`): the workspace may take as many bytes
as the weight itself (``C D`` elements of its dtype; at least
:data:`~marginops.backends.interface.DEFAULT_MEMORY_BUDGET`), and one block
of *all* rows is taken whenever it costs no more than that plus the float32
``dW`` accumulator it saves (several blocks need that accumulator, one block
of a plain head does not). On a GPU the workspace never exceeds
:data:`DEVICE_SHARE` of the device's memory. A caller's ``memory_budget``
bounds the workspace alone (exponentials and shifts; accumulators and
``B x D`` buffers come on top: :func:`scratch_bytes`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

from . import engine
from .engine import DeviceInfo, WorkspaceBudget
from .interface import DEFAULT_MEMORY_BUDGET, FusedOptions
from .triton_config import KernelConfig, config_for

#: The default workspace never takes more than this share of the GPU's memory.
DEVICE_SHARE = 1 / 8
#: Workspace rows are padded to this many bytes (aligned rows for vector loads and stores).
ROW_ALIGN = 16


def elt(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def acc_elt(dtype: torch.dtype) -> int:
    return 8 if dtype == torch.float64 else 4


def padded(C: int, dtype: torch.dtype) -> int:
    """Row length (elements) of the workspace for ``C`` classes: a whole number of :data:`ROW_ALIGN` bytes."""
    per = ROW_ALIGN // elt(dtype)
    return -(-C // per) * per


def workspace_row_bytes(C: int, dtype: torch.dtype, tile_c: int) -> int:
    """Bytes of one workspace row: ``C`` exponentials in the input dtype, one shift per ``tile_c`` classes."""
    return padded(C, dtype) * elt(dtype) + -(-C // tile_c) * acc_elt(dtype)


def default_budget(C: int, D: int, W_dtype: torch.dtype) -> int:
    """The default workspace budget: the weight's own bytes, at least ``DEFAULT_MEMORY_BUDGET``."""
    return max(DEFAULT_MEMORY_BUDGET, C * D * elt(W_dtype))


def workspace_budget(C: int, D: int, dtype: torch.dtype, tile_c: int,
                     device_bytes: Optional[int] = None) -> WorkspaceBudget:
    """The workspace's budget policy for ``C`` classes of ``dtype`` in forward tiles of ``tile_c`` classes:
    :func:`default_budget`, a block of all rows allowed the float32 ``dW`` accumulator it saves, and
    :data:`DEVICE_SHARE` of ``device_bytes`` (the GPU's memory; None: no cap)."""
    cap = None if device_bytes is None else int(device_bytes * DEVICE_SHARE)
    return WorkspaceBudget(workspace_row_bytes(C, dtype, tile_c), default_budget(C, D, dtype), C * D * 4, cap)


def _memory(device: Optional[DeviceInfo]) -> Optional[int]:
    return device.memory_bytes or None if device is not None else None


def workspace_config(C: int, D: int, dtype: torch.dtype, opts: FusedOptions,
                     device: Optional[DeviceInfo] = None) -> KernelConfig:
    """The workspace forward's config (``"ws"``, ``"ws_pred"`` with the prediction): the device's tuned one,
    unless its tiles leave no row within the budget (the strategy was decided with the default config's
    tiles, which see no device), then the default."""
    kernel = "ws_pred" if opts.want_prediction else "ws"
    default = config_for(kernel, dtype, D)
    cfg = config_for(kernel, dtype, D, device.capability if device is not None else None)
    if cfg != default and workspace_budget(C, D, dtype, cfg.block_c, _memory(device)).rows(1, opts) < 1:
        return default
    return cfg


def tiling(batch: int) -> engine.Tiling:
    """The engine's tile policy for this backend: the recompute strategy's row block is the whole batch
    (the backward's ``G`` chunks are planned here, :func:`chunk_plan`), and the workspace takes any block
    the budget allows (the strategy was decided before). The kernels' configs set the class tiles
    (:meth:`Planning.plan`), not ``tile_bytes`` or ``chunk_size``."""
    return engine.Tiling(tile_bytes=0, min_chunk=1, max_chunk=1, recompute_rows=max(1, batch), min_workspace_rows=1,
                         flush_subnormals=False, gpu=True)


def fp32_accumulator(dtype: torch.dtype, blocks: int, normalize: bool) -> bool:
    """Whether ``dW`` is accumulated in a float32 ``C x D`` buffer: 16-bit weights with several row blocks,
    or a normalization backward to run on it; otherwise cuBLAS writes ``dW`` (or the accumulation dtype's
    ``dD``) directly."""
    return dtype in (torch.bfloat16, torch.float16) and (blocks > 1 or normalize)


@dataclass(frozen=True)
class WorkspacePlan:
    """Rows per block and blocks, and how ``dW`` is accumulated (:func:`fp32_accumulator`)."""

    rows: int
    blocks: int
    row_bytes: int
    fp32_accumulator: bool

    @property
    def workspace_bytes(self) -> int:
        return self.rows * self.row_bytes


def workspace_plan(B: int, C: int, D: int, dtype: torch.dtype, opts: FusedOptions, tile_c: int,
                   device_bytes: Optional[int] = None) -> Optional[WorkspacePlan]:
    """The engine's row blocks of the workspace strategy (:func:`marginops.backends.engine.plan` under
    :func:`workspace_budget`), or None when not one row fits the budget.

    ``device_bytes``: the GPU's memory (caps the default budget at
    :data:`DEVICE_SHARE` of it); None on CPU and for a caller's budget.
    """
    budget = workspace_budget(C, D, dtype, tile_c, device_bytes)
    if budget.rows(max(B, 1), opts) < 1:
        return None
    pl = engine.plan(max(B, 1), C, opts, tiling(B), stored=elt(dtype), tile=0, workspace=True, budget=budget)
    blocks = -(-max(B, 1) // pl.rows)
    return WorkspacePlan(pl.rows, blocks, budget.row_bytes, fp32_accumulator(dtype, blocks, opts.normalize))


def normalized_rows_chunk(C: int, D: int, dtype: torch.dtype) -> int:
    """Rows of ``W`` normalized at a time for float16's ``dX`` product (``G`` without ``1 / |W_j|``)."""
    return max(1, min(C, DEFAULT_MEMORY_BUDGET // max(1, D * elt(dtype))))


# -- the recompute strategy's class chunks ------------------------------------------------------------


@dataclass(frozen=True)
class ChunkPlan:
    """Rows and W rows per ``G`` buffer of the recompute backward, and its bytes."""

    rows: int
    chunk: int
    buffer_bytes: int


def chunk_plan(B: int, n_rows: int, D: int, dtype: torch.dtype, budget: int, cfg: KernelConfig,
               scaled_g: bool = True) -> ChunkPlan:
    """The largest ``G`` chunk (rows of ``W``) the budget allows, all ``B`` rows at once if possible.

    Per chunk of ``k`` rows of ``W`` and ``r`` rows of ``x`` the scratch is ``G``
    (``r k`` input elements), the ``dD`` chunk (``k D``, accumulation dtype)
    and, without ``1 / |W_j|`` in ``G`` (float16), the chunk's normalized rows
    (``k D`` input elements). Classes come in whole tiles; when one tile of
    classes for all rows does not fit, the rows shrink (whole tiles) before
    the classes do, and one tile by one tile is the floor. Each chunk of ``dW``
    is finished before the next one starts: no ``C x D`` accumulator.
    """
    e = elt(dtype)
    per_class = D * (acc_elt(dtype) + (0 if scaled_g else e))
    tiles = max(1, -(-n_rows // cfg.block_c))
    rows = max(1, B)
    while True:
        fit = budget // (cfg.block_c * (rows * e + per_class))
        if fit >= 1 or rows <= cfg.block_b:
            break
        rows = max(cfg.block_b, (rows // 2) // cfg.block_b * cfg.block_b)
    per = int(max(1, min(tiles, fit)))
    per = -(-tiles // -(-tiles // per))  # even chunks
    chunk = min(n_rows, per * cfg.block_c) if n_rows > 0 else cfg.block_c
    rows = min(rows, max(B, 1))
    return ChunkPlan(rows, chunk, rows * chunk * e)


# -- grids --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def class_splits(row_blocks: int, class_tiles: int, slots: int) -> int:
    """Class splits per row block for the logits kernels: the split count whose grid finishes first.

    ``row_blocks x splits`` programs run ``slots`` at a time (SMs times
    programs per SM), each walking ``ceil(class_tiles / splits)`` tiles plus
    about one tile's worth of fixed work (loading its rows, writing its
    partial statistics); the makespan is waves times that. Ties go to fewer
    splits (fewer partials to combine).
    """
    if class_tiles <= 1 or slots <= 1:
        return 1
    best, best_cost = 1, math.inf
    candidates = {class_tiles}
    for per in range(1, math.isqrt(class_tiles) + 2):  # every distinct value of ceil(class_tiles / s)
        candidates.add(-(-class_tiles // per))
        candidates.add(per)
    for s in sorted(c for c in candidates if 1 <= c <= class_tiles):
        waves = -(-(row_blocks * s) // slots)
        cost = waves * (-(-class_tiles // s) + 1)
        if cost < best_cost:
            best, best_cost = s, cost
    return best


def grid_efficiency(row_blocks: int, class_tiles: int, slots: int) -> float:
    """Useful tile-steps over occupied slot-steps of :func:`class_splits`' grid (1.0: no idle slot)."""
    s = class_splits(row_blocks, class_tiles, slots)
    waves = -(-(row_blocks * s) // slots)
    return row_blocks * class_tiles / (waves * slots * (-(-class_tiles // s) + 1))


# -- memory ---------------------------------------------------------------------------------------------


def scratch_bytes(B: int, C: int, D: int, dtype: torch.dtype, opts: FusedOptions, workspace: bool,
                  tile_c: int, chunk_cfg: Optional[KernelConfig] = None,
                  device_bytes: Optional[int] = None) -> dict[str, int]:
    """The backend's scratch for one training step beyond inputs and gradients, term by term (bytes).

    ``workspace``: the exponentials and shifts of one row block; ``accumulator``:
    the float32 ``dW`` (16-bit weights with several blocks or a normalization);
    ``dxh``: the accumulation-dtype gradient of the embeddings (``B x D``);
    ``operands``: the embeddings in the input dtype for the ``dW`` product
    (``B x D``); ``chunks``: the recompute strategy's ``G`` and ``dD`` chunks.
    Vectors of size ``B`` or ``C`` are left out.
    """
    e, a = elt(dtype), acc_elt(dtype)
    out = dict(workspace=0, accumulator=0, chunks=0, dxh=B * D * a if opts.need_x else 0,
               operands=B * D * e if opts.need_W else 0)
    if workspace:
        plan = workspace_plan(B, C, D, dtype, opts, tile_c, device_bytes)
        if plan is None:
            raise ValueError("the workspace does not hold one row")
        out["workspace"] = plan.workspace_bytes
        out["accumulator"] = C * D * 4 if plan.fp32_accumulator and opts.need_W else 0
        if dtype == torch.float16 and opts.normalize and opts.need_x:  # normalized W rows, chunk by chunk
            out["chunks"] = normalized_rows_chunk(C, D, dtype) * D * e
    elif chunk_cfg is not None:
        budget = opts.memory_budget or default_budget(C, D, dtype)
        scaled = not (dtype == torch.float16 and opts.normalize)
        plan = chunk_plan(B, C, D, dtype, budget, chunk_cfg, scaled_g=scaled)
        out["chunks"] = plan.buffer_bytes + plan.chunk * D * (a + (0 if scaled else e))
    out["total"] = sum(out.values())
    return out


# -- what the engine reads ------------------------------------------------------------------------------


class Planning(engine.RowBlockKernel):
    """The Triton backend's sizes, budget policy and tiles as the tile engine reads them (no kernels);
    :mod:`marginops.backends.triton_margin`'s row-block kernel extends it.

    The workspace (:class:`~marginops.backends.triton_margin.ExpWorkspace`) keeps
    each kernel tile's shift, and its gradient pass applies the gradient filter
    per tile of ``G`` (:attr:`workspace_keeps_shifts`): the forward's groups are
    the kernel's class splits.
    """

    workspace_keeps_shifts = True

    @classmethod
    def stored_bytes(cls, x_dtype: torch.dtype, W_dtype: torch.dtype, opts: FusedOptions) -> int:
        """One exponential per class in the weight's dtype (rows padded and tile shifts:
        :meth:`workspace_budget`)."""
        return elt(W_dtype)

    @classmethod
    def workspace_budget(cls, classes: int, D: int, x_dtype: torch.dtype, W_dtype: torch.dtype,
                         opts: FusedOptions, device: Optional[DeviceInfo] = None) -> WorkspaceBudget:
        """:func:`workspace_budget` with the tiles of :func:`workspace_config`."""
        tile_c = workspace_config(classes, D, W_dtype, opts, device).block_c
        return workspace_budget(classes, D, W_dtype, tile_c, _memory(device))

    @property
    def scale_g(self) -> bool:
        """Whether ``G`` carries ``1 / |W_j|`` (so ``dX`` multiplies raw ``W`` rows): not for a normalized
        float16 weight, whose range cannot hold it for tiny or zero rows."""
        return self.inv_w is None or self.W.dtype != torch.float16

    def tiling(self) -> engine.Tiling:
        return tiling(self.B)

    def plan(self, grads: bool) -> engine.Plan:
        """The engine's strategy and row blocks; classes per tile from the kernels: the workspace forward's
        tile (one stored shift each), or the recompute backward's ``G`` chunk (:meth:`recompute_chunks`)."""
        pl = super().plan(grads)
        if pl.strategy == "workspace":
            return replace(pl, chunk=workspace_config(self.C, self.D, self.W.dtype, self.opts, self.device).block_c)
        cp = self.recompute_chunks()
        return replace(pl, chunk=max(1, cp.chunk // self.k), scratch_bytes=cp.buffer_bytes)

    def grad_config(self) -> KernelConfig:
        return config_for("sub_grad" if self.k > 1 else "grad", self.W.dtype, self.D, self.device.capability)

    def recompute_chunks(self) -> ChunkPlan:
        """:func:`chunk_plan` of this call (the budget: ``memory_budget``, or :func:`default_budget`)."""
        budget = self.opts.memory_budget or default_budget(self.C, self.D, self.W.dtype)
        return chunk_plan(self.B, self.n_rows, self.D, self.W.dtype, budget, self.grad_config(),
                          scaled_g=self.scale_g)


#: ``strategy="auto"``'s choice and the explicit strategies' checks (the backend's ``uses_workspace``), here
#: without triton (the performance model reads it).
uses_workspace = engine.Engine(Planning).uses_workspace
