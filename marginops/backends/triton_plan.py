"""Planning for the Triton backend: which strategy, how many rows per block, classes per chunk, grids.

Pure functions of sizes, dtypes, options and (at call time) the device's
memory and SM count: no tensors, no kernels. Everything the backend decides
before it launches lives here, so that moving the backend onto a shared
planning engine means moving this module.

**Strategies.** ``workspace`` (three GEMMs: the gradients are formed during
the forward pass from a row block's stored exponentials) is the default
(``strategy="auto"``) wherever it applies: a scalar loss with gradients
wanted, the whole class range, one row per class. Elsewhere (``reduction=
"none"``, class ranges, sub-centres, no gradients) the statistics come from
the forward kernel and the backward recomputes the logits (four GEMMs).

**The default budget** (``memory_budget=None``) is sized to the problem and
the device: the workspace may take as many bytes as the weight itself
(``C D`` elements of its dtype; at least
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
from dataclasses import dataclass
from typing import Optional

import torch

from .interface import DEFAULT_MEMORY_BUDGET, FusedOptions
from .triton_config import KernelConfig

#: ``strategy="auto"`` takes the workspace only if its row blocks hold at least this many rows (or all of B):
#: below it the extra ``C x D`` accumulation per block costs more than the GEMM the workspace saves.
MIN_WORKSPACE_ROWS = 128
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


@dataclass(frozen=True)
class WorkspacePlan:
    """Rows per block and blocks, and how ``dW`` is accumulated."""

    rows: int
    blocks: int
    row_bytes: int
    #: a float32 ``C x D`` accumulator for ``dW`` (16-bit weights: several blocks, or a normalization
    #: backward to run on it); otherwise cuBLAS writes ``dW`` (or the accumulation dtype's ``dD``) directly
    fp32_accumulator: bool

    @property
    def workspace_bytes(self) -> int:
        return self.rows * self.row_bytes


def workspace_plan(B: int, C: int, D: int, dtype: torch.dtype, opts: FusedOptions, tile_c: int,
                   device_bytes: Optional[int] = None) -> Optional[WorkspacePlan]:
    """The row blocks of the workspace strategy, or None when not one row fits the budget.

    ``device_bytes``: the GPU's memory (caps the default budget at
    :data:`DEVICE_SHARE` of it); None on CPU and for a caller's budget.
    """
    row = workspace_row_bytes(C, dtype, tile_c)
    B = max(B, 1)
    if opts.memory_budget is None:
        budget = default_budget(C, D, dtype)
        one_block = B * row <= budget + C * D * 4  # all rows cost no more than blocks + their accumulator
        rows = B if one_block else budget // row
        if device_bytes is not None:
            rows = min(rows, max(1, int(device_bytes * DEVICE_SHARE) // row))
    else:
        rows = min(B, opts.memory_budget // row)
    if rows < 1:
        return None
    blocks = -(-B // rows)
    rows = -(-B // blocks)  # even blocks
    half = dtype in (torch.bfloat16, torch.float16)
    return WorkspacePlan(rows, blocks, row, fp32_accumulator=half and (blocks > 1 or opts.normalize))


def workspace_applies(opts: FusedOptions, C: int) -> bool:
    """Whether the call's options allow the workspace strategy (scalar loss, gradients, whole range, k = 1)."""
    return (opts.reduce and (opts.need_x or opts.need_W) and opts.sub_centers == 1
            and opts.is_full_range(opts.classes_of(C)))


def normalized_rows_chunk(C: int, D: int, dtype: torch.dtype) -> int:
    """Rows of ``W`` normalized at a time for float16's ``dX`` product (``G`` without ``1 / |W_j|``)."""
    return max(1, min(C, DEFAULT_MEMORY_BUDGET // max(1, D * elt(dtype))))


def min_rows_for_auto(B: int) -> int:
    return min(max(B, 1), MIN_WORKSPACE_ROWS)


def auto_takes_workspace(B: int, C: int, D: int, dtype: torch.dtype, opts: FusedOptions, tile_c: int) -> bool:
    """``strategy="auto"``'s choice for a weight of ``C`` rows: the workspace where it applies
    (:func:`workspace_applies`) and its row blocks hold at least :data:`MIN_WORKSPACE_ROWS` rows (or all
    of ``B``) within the budget."""
    if B == 0 or opts.strategy == "recompute" or not workspace_applies(opts, C):
        return False
    p = workspace_plan(B, opts.classes_of(C), D, dtype, opts, tile_c)
    return p is not None and p.rows >= min_rows_for_auto(B)


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
    the classes do, and one tile by one tile is the floor.
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
