"""Triton backend: margin softmax cross-entropy fused over classes, no ``B x C`` tensor of logits kept.

The kernels are in :mod:`marginops.backends.triton_kernels`, their pinned
configs in :mod:`marginops.backends.triton_config`, the planning (budget
policy, tiles, the recompute backward's chunks, grids, memory formula) in
:mod:`marginops.backends.triton_plan`. Row blocks, strategies, statistics
merging, prediction, per-row scale coefficients and option checks are the
tile engine's (:mod:`marginops.backends.engine`). This module reads top to
bottom: launchers (check, allocate, launch; no autograd), the products
(cuBLAS, or the block-sparse kernel), the work on one row block the engine
calls (:class:`_TritonBlocks`), then the functions of the backend interface
(:class:`marginops.backends.interface.Backend`; autograd lives in
:mod:`marginops.ops`).

**Workspace strategy (the default for a scalar loss with gradients; three
GEMMs).** Per block of rows: the forward kernel computes every logits tile
of the block (raw ``x``/``W`` tiles multiplied with the row factor
``s_i / |x_i|`` and the column factor ``1 / |W_j|`` folded in), keeps online
max / sum / argmax per class split (the engine merges the splits), and
stores ``exp2(logit - shift)`` in the input dtype (every value <= 1) with
one shift per (row, tile) in float32. With the block's log-sum-exp known,
``_grad_from_exp_kernel`` turns the stored exponentials into
``G_ij = g_i s_i (p_ij - eps/C) / |W_j|`` (0 on the target) *in place*, one
read and one write per element, and cuBLAS forms ``dxh = G W`` (float32
output) and ``dD (+)= G^T xh``. ``dD`` goes straight into ``dW``'s storage
when there is one block of a plain (unnormalized) head or the weight is
float32/float64; otherwise it is accumulated across blocks in a float32
``C x D`` buffer and the normalization backward (``_finish_w_kernel``)
writes ``dW`` in the weight's dtype after the last block. The gradients are
ready when the forward returns. Rows per block: the engine's, under
:func:`~marginops.backends.triton_plan.workspace_budget`.

**Recompute strategy** (``reduction="none"``, class ranges, sub-centres, or
``strategy="recompute"``; four GEMMs). The forward kernel keeps per-row
statistics only (one row block: the whole batch); the backward walks class
chunks: ``_margin_grad_kernel`` recomputes the logits tiles into ``G``
(input dtype), cuBLAS adds ``G W_chunk`` to ``dxh`` and writes
``dD_chunk = G^T xh``, and each chunk is finished into ``dW`` before the
next one starts (no ``C x D`` accumulator: the chunks, and the rows of a
``G`` buffer when the budget is tight, are planned by
:func:`~marginops.backends.triton_plan.chunk_plan`). For narrow embeddings
(``D <= FUSED_DX_MAX_D[dtype]``) ``_margin_bwd_dx_kernel`` forms ``G W_chunk``
in the same pass as the logits, from the same ``W`` tile (one partial per
class split, summed in order), and cuBLAS does ``dD`` alone.

**float16.** ``1 / |W_j|`` is folded into ``G`` except for float16 weights,
whose range (65504) cannot hold it for tiny or zero rows (``1 / eps = 1e12``;
``inf * 0`` would turn ``x.grad`` into NaN): float16 keeps ``G`` unscaled and
multiplies normalized rows of ``W`` (``_scale_rows_kernel``, one chunk of
:func:`~marginops.backends.triton_plan.normalized_rows_chunk` rows at a
time), and the finish kernel applies ``1 / |W_j|``.

**Gradient filtering** (``opts.gradient_filter``, opt-in): the gradient
kernels flag each tile of ``G`` whose probabilities all lie below the
threshold, do not write it, and the products run in ``_masked_mm_kernel``
(block-sparse: flagged-off tiles skipped, fixed order) instead of cuBLAS.
The flags are per tile of ``G`` (64 x 128 in the workspace strategy), finer
than the engine's per-row-block decisions: the workspace keeps its shifts
(:attr:`~marginops.backends.engine.RowBlockKernel.workspace_keeps_shifts`).

**Per-row scales** (``Call.row_scale``): row ``i``'s logits are
``s r_i cos_ij``; ``r_i`` joins the row factor, the per-row threshold of
inter-class filtering and ``g_i s_i`` (the engine's per-row coefficients).

Everything is reproducible run to run: no atomics, every output element
written by one program or one cuBLAS call in a fixed order. On CPU the
kernels run only under the Triton interpreter: ``TRITON_INTERPRET=1`` must be
set before triton is first imported (this module is imported lazily, on the
first call of ``backend="triton"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import engine
from . import triton_plan as plan
from .common import acc_dtype
from .engine import BlockGrads, BlockStats, Plan, merge_block
from .interface import Call, FusedOptions
from .triton_config import DTYPES as SUPPORTED_DTYPES
from .triton_config import FUSED_DX_MAX_D as _FUSED_DX_MAX_D
from .triton_config import KernelConfig, config_for
from .triton_kernels import (LOG2E, _finish_w_kernel, _grad_from_exp_kernel, _margin_bwd_dx_kernel,
                             _margin_fwd_kernel, _margin_grad_kernel, _masked_mm_kernel, _scale_rows_kernel)

LN2 = math.log(2.0)
#: Embeddings up to ``FUSED_DX_MAX_D[dtype]`` features take the recompute backward that forms ``dX`` in the
#: same pass (:func:`margin_bwd_dx`: its ``BLOCK_B x D`` accumulator stays on chip); wider ones write ``G``
#: for two cuBLAS products.
FUSED_DX_MAX_D = dict(_FUSED_DX_MAX_D)
#: Bytes of the fused backward's per-split ``dX`` partials (they bound its class splits).
FUSED_DX_PARTIAL_BYTES = 64 * 2**20

#: The compiled kernel of each kernel's last launch (by kernel name; None under the interpreter): registers,
#: spills and shared memory for ``python -m marginops.tune``.
LAST_COMPILED: dict = {}

#: Use tensor descriptors (TMA loads) under the interpreter too, where a config asks for them (tests switch it
#: on to run that code path on a CPU; on a GPU it follows the device: sm_90 and newer).
TMA_IN_INTERPRETER = False

# -- devices and checks ---------------------------------------------------------------------------------


def is_interpreted() -> bool:
    """Whether this module's kernels run under the Triton interpreter (``TRITON_INTERPRET=1`` at import)."""
    return not isinstance(_margin_fwd_kernel, triton.runtime.JITFunction)


def _check_device(t: Tensor) -> None:
    if t.device.type != "cuda" and not is_interpreted():
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors (got {t.device}); on CPU it runs only under the Triton "
            "interpreter, with TRITON_INTERPRET=1 set before marginops' Triton kernels are first used. "
            "Use backend='torch' on CPU."
        )


def _check_inputs(x: Tensor, W: Tensor, y: Tensor) -> None:
    _check_device(x)
    if x.dtype not in SUPPORTED_DTYPES or W.dtype != x.dtype:
        raise TypeError(f"backend='triton' supports {SUPPORTED_DTYPES} inputs of one dtype, got {x.dtype}, {W.dtype}")
    if x.dim() != 2 or W.dim() != 2 or x.shape[1] != W.shape[1] or y.shape != (x.shape[0],):
        raise ValueError(f"shapes x {tuple(x.shape)}, W {tuple(W.shape)}, y {tuple(y.shape)} do not fit (B, D), (C, D), (B,)")
    if y.dtype != torch.int64:
        raise TypeError(f"labels must be int64, got {y.dtype}")
    if not y.is_contiguous():
        raise ValueError("labels must be contiguous")


def arch(device: torch.device) -> Optional[int]:
    """Compute capability as ``major * 10 + minor`` (90 for H100/H200); None off CUDA."""
    return engine.describe(device).capability if device.type == "cuda" else None


def _slots(device: torch.device, cfg: KernelConfig) -> int:
    """Programs of ``cfg`` that run at once: SMs times its occupancy; 1 under the interpreter."""
    if device.type != "cuda":
        return 1
    return engine.describe(device).workers * max(1, cfg.occupancy)


def _cfg(kernel: str, dtype: torch.dtype, D: int, device: torch.device) -> KernelConfig:
    return config_for(kernel, dtype, D, arch(device))


def _constexprs(dtype: torch.dtype) -> dict:
    acc = acc_dtype(dtype)
    if dtype == torch.float32:
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
    elif dtype == torch.float64:
        precision = "ieee"
    else:
        precision = "tf32"  # unused for 16-bit inputs
    return dict(
        UPCAST=is_interpreted() and dtype == torch.bfloat16,  # bf16 arithmetic is wrong in the interpreter
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        DOT_PRECISION=precision,
    )


def _tma_ok(t: Tensor) -> bool:
    """A 2-D tensor a TMA descriptor can describe: unit feature stride, 16-byte aligned base and rows."""
    e = t.element_size()
    return (t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * e) % 16 == 0
            and t.shape[0] > 0 and t.shape[1] * e >= 16)


def _use_tma(cfg: KernelConfig, *tensors: Tensor, sub_centers: int = 1) -> bool:
    if not cfg.tma or sub_centers != 1:
        return False
    device = tensors[0].device
    if device.type == "cuda":
        if (arch(device) or 0) < 90:
            return False
    elif not (is_interpreted() and TMA_IN_INTERPRETER):
        return False
    return all(_tma_ok(t) for t in tensors)


def _descriptors(use_tma: bool, x: Tensor, W: Tensor, cfg: KernelConfig):
    """``(x_desc, w_desc)``: host-side tensor descriptors of ``cfg``'s tiles, or the tensors themselves."""
    if not use_tma:
        return x, W
    from triton.tools.tensor_descriptor import TensorDescriptor

    return (TensorDescriptor(x, list(x.shape), list(x.stride()), [cfg.block_b, cfg.block_d]),
            TensorDescriptor(W, list(W.shape), list(W.stride()), [cfg.block_c, cfg.block_d]))


def _per_row(value, B: int, like: Tensor) -> Tensor:
    """A (B,) accumulation-dtype vector from a per-row tensor or a number."""
    acc = acc_dtype(like.dtype)
    if isinstance(value, Tensor):
        return value.to(like.device, acc).expand(B).contiguous()
    return torch.full((B,), float(value), device=like.device, dtype=acc)


# -- launchers ----------------------------------------------------------------------------------------


def classes_per_program(B: int, C: int, cfg: KernelConfig, device: torch.device, requested: Optional[int]) -> int:
    """Classes one forward program walks (a multiple of ``cfg.block_c``).

    ``requested`` (the ``chunk_size`` option) is rounded up to whole tiles.
    Otherwise the class splits are :func:`~marginops.backends.triton_plan.class_splits`'
    choice for the device (the grid with the shortest makespan at the
    config's occupancy); under the interpreter one program per row block.
    """
    tiles = triton.cdiv(C, cfg.block_c)
    if requested is not None:
        per = triton.cdiv(requested, cfg.block_c)
    else:
        splits = plan.class_splits(triton.cdiv(max(B, 1), cfg.block_b), tiles, _slots(device, cfg))
        per = triton.cdiv(tiles, splits)
    return max(1, min(per, tiles)) * cfg.block_c


@dataclass(frozen=True)
class ExpWorkspace:
    """What the workspace strategy's forward keeps of a block of rows.

    ``exp[i, j] = exp2(l_ij - shift[i, j // tile_c])`` (``l`` the base-2
    logit) in the input dtype, every value <= 1 (16 bits keep ``G``'s relative
    precision), 0 in the target and filtered columns; rows padded to 16
    bytes. ``shift`` the running max of the row's non-target base-2 logits
    after each forward tile, in the accumulation dtype. The gradient pass
    overwrites ``exp`` with ``G``.
    """

    exp: Tensor  # (R, C) view of an (R, padded C) buffer
    shift: Tensor  # (R, ceil(C / tile_c))
    tile_c: int

    @classmethod
    def allocate(cls, rows: int, C: int, dtype: torch.dtype, device, tile_c: int) -> "ExpWorkspace":
        buf = torch.empty(rows, plan.padded(C, dtype), device=device, dtype=dtype)
        return cls(buf[:, :C], torch.empty(rows, triton.cdiv(C, tile_c), device=device, dtype=acc_dtype(dtype)),
                   tile_c)

    def rows(self, r0: int, r1: int) -> "ExpWorkspace":
        return ExpWorkspace(self.exp[r0:r1], self.shift[r0:r1], self.tile_c)

    def check(self, R: int, C: int, dtype: torch.dtype) -> None:
        e, sh = self.exp, self.shift
        if (e.shape != (R, C) or e.dtype != dtype or e.stride(1) != 1 or sh.dtype != acc_dtype(dtype)
                or sh.shape != (R, triton.cdiv(C, self.tile_c)) or sh.stride(1) != 1):
            raise ValueError(f"workspace does not fit {R} rows x {C} classes of {dtype}: exp {tuple(e.shape)} "
                             f"{e.dtype}, shift {tuple(sh.shape)} {sh.dtype}, tile_c {self.tile_c}")


def margin_fwd_splits(x: Tensor, W: Tensor, y: Tensor, row_scale: Tensor, col_scale: Optional[Tensor], *,
                      want_prediction: bool = False, classes: Optional[int] = None,
                      config: Optional[KernelConfig] = None, workspace: Optional[ExpWorkspace] = None,
                      sub_centers: int = 1, filter_logit=None) -> BlockStats:
    """Per class split, the statistics of the logits ``row_scale_i * col_scale_j * (x_i . W_j)`` over
    ``j != y_i`` (and the argmax over every class), as the tile engine merges them.

    Args:
        x, W, y: ``(B, D)``, ``(C k, D)`` raw inputs of one dtype, ``(B,)`` int64 labels (a label outside
            ``[0, C)`` excludes no column).
        row_scale: ``(B,)`` (accumulation dtype), ``s_i / |x_i|`` or ``s_i``.
        col_scale: ``(C k,)`` ``1 / |W_j|``, or None (``normalize=False``).
        sub_centers: ``k``, rows of ``W`` per class (class-major); a class logit is the largest of its ``k``.
        filter_logit: inter-class filtering: non-target logits above it (a number, or ``(B,)`` per row)
            are left out (not of the prediction).
        want_prediction: also return the argmax over all classes (first index on ties).
        classes: classes per program (class splits); default: :func:`classes_per_program`.
        config: tile config; default: the pinned one (``"ws"``/``"ws_pred"`` with a ``workspace``, whose
            ``tile_c`` it must match; ``"sub_fwd"`` with sub-centres).
        workspace: optional :class:`ExpWorkspace` for ``B`` rows and ``C`` classes to fill.

    Returns:
        :class:`~marginops.backends.engine.BlockStats` with one group per class split (``S`` of them), in
        natural units: ``shift``/``sumexp`` (B, S) the largest kept non-target logit and the sum of the
        exponentials relative to it; ``best``/``best_index`` (B, S) the largest logit, target included,
        and its first class index (None unless ``want_prediction``); ``target`` None (the maxima cover
        it); ``logit_sum`` None.
    """
    _check_inputs(x, W, y)
    B, D = x.shape
    C = W.shape[0] // sub_centers
    if workspace is not None and sub_centers != 1:
        raise NotImplementedError("the workspace forward does not support sub-centres")
    acc = acc_dtype(x.dtype)
    kernel = ("sub_fwd" if sub_centers > 1 else "fwd" if workspace is None
              else "ws_pred" if want_prediction else "ws")
    cfg = config or _cfg(kernel, x.dtype, D, x.device)
    per = classes_per_program(B, C, cfg, x.device, classes)
    splits = triton.cdiv(C, per)
    m = torch.empty(B, splits, device=x.device, dtype=acc)
    l = torch.empty_like(m)
    pv = torch.empty_like(m) if want_prediction else m
    pi = torch.empty(B, splits, device=x.device, dtype=torch.int64) if want_prediction else y
    if workspace is not None:
        workspace.check(B, C, x.dtype)
        if workspace.tile_c != cfg.block_c:
            raise ValueError(f"workspace.tile_c = {workspace.tile_c} must equal the config's block_c = {cfg.block_c}")
    if B > 0 and C > 0:
        rs2 = row_scale.to(acc) * LOG2E
        thr2 = _per_row(filter_logit, B, x) * LOG2E if filter_logit is not None else rs2
        use_tma = _use_tma(cfg, x, W, sub_centers=sub_centers)
        x_desc, w_desc = _descriptors(use_tma, x, W, cfg)
        grid = (triton.cdiv(B, cfg.block_b), splits)
        LAST_COMPILED["_margin_fwd_kernel"] = _margin_fwd_kernel[grid](
            x_desc, w_desc, x, W, y, rs2, col_scale if col_scale is not None else rs2, thr2,
            m, l, pv, pi, workspace.exp if workspace else x, workspace.shift if workspace else m,
            B, C, D, per,
            x.stride(0), x.stride(1), W.stride(0), W.stride(1), splits,
            workspace.exp.stride(0) if workspace else 0, workspace.shift.stride(0) if workspace else 0,
            HAS_NORM=col_scale is not None, HAS_PRED=want_prediction, STORE_EXP=workspace is not None,
            FILTER=filter_logit is not None, SUB=sub_centers, USE_TMA=use_tma, EVEN_D=D % cfg.block_d == 0,
            **_constexprs(x.dtype), BLOCK_B=cfg.block_b, BLOCK_C=cfg.block_c, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    else:
        m.fill_(float("-inf"))
        l.zero_()
        if want_prediction:
            pv.fill_(float("-inf"))
            pi.zero_()
    # the kernel works on base-2 logits
    return BlockStats(m * LN2, l, pv * LN2 if want_prediction else None, pi if want_prediction else None, None,
                      None)


def margin_fwd(x: Tensor, W: Tensor, y: Tensor, row_scale: Tensor, col_scale: Optional[Tensor],
               **options) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """:func:`margin_fwd_splits` with the splits merged by the engine: ``N`` (B,) in the accumulation dtype
    (``-inf`` when ``C == 1``), the prediction (B,) int64 and the largest logit (B,), target included (both
    None unless ``want_prediction``)."""
    N, top, pred, _ = merge_block(margin_fwd_splits(x, W, y, row_scale, col_scale, **options))
    return N, pred, top


def margin_grad(x: Tensor, W: Tensor, y: Tensor, row_scale: Tensor, col_scale: Optional[Tensor], lse: Tensor,
                coef: Tensor, out: Tensor, *, label_offset: int = 0, smoothing: float = 0.0,
                scale_g: bool = True, config: Optional[KernelConfig] = None, sub_centers: int = 1,
                filter_logit=None, gradient_filter: Optional[float] = None) -> Optional[Tensor]:
    """Fill ``out`` (R, Cc k) with ``G_ij = coef_i (exp(l_ij - lse_i) - smoothing) col_scale_j``, 0 on targets
    (without the ``col_scale_j`` factor when ``scale_g`` is False), the logits recomputed.

    ``l_ij = row_scale_i col_scale_j (x_i . W_j)``; ``x`` (R, D) and ``W``
    (Cc k, D) may be row slices of the full inputs; column ``j`` is the class
    ``label_offset + j``. With ``sub_centers = k`` ``W`` holds ``k`` rows per
    class and each class's ``G`` sits at the sub-centre whose logit was the
    class logit (the first maximum), 0 at its others. ``filter_logit``:
    columns whose logit exceeds it get 0 (inter-class filtering).

    Returns None, or with ``gradient_filter`` the int8 tile flags
    ``(ceil(R / block_b), ceil(Cc / block_c))``: 0 for a tile whose
    probabilities all lie below the threshold, whose ``G`` was not written.
    """
    _check_inputs(x, W, y)
    R, D = x.shape
    Cc = W.shape[0] // sub_centers
    if out.shape != (R, W.shape[0]) or out.dtype != x.dtype or out.stride(1) != 1:
        raise ValueError(f"out must be ({R}, {W.shape[0]}) {x.dtype} with unit column stride, got "
                         f"{tuple(out.shape)} {out.dtype} strides {out.stride()}")
    cfg = config or _cfg("sub_grad" if sub_centers > 1 else "grad", x.dtype, D, x.device)
    flags = None
    if gradient_filter is not None:
        flags = torch.zeros(triton.cdiv(R, cfg.block_b), max(1, triton.cdiv(Cc, cfg.block_c)), device=x.device,
                            dtype=torch.int8)
    if R == 0 or Cc == 0:
        return flags
    acc = acc_dtype(x.dtype)
    rs2 = row_scale.to(acc) * LOG2E
    thr2 = _per_row(filter_logit, R, x) * LOG2E if filter_logit is not None else rs2
    use_tma = _use_tma(cfg, x, W, sub_centers=sub_centers)
    x_desc, w_desc = _descriptors(use_tma, x, W, cfg)
    grid = (triton.cdiv(R, cfg.block_b), triton.cdiv(Cc, cfg.block_c))
    LAST_COMPILED["_margin_grad_kernel"] = _margin_grad_kernel[grid](
        x_desc, w_desc, x, W, y, rs2, col_scale if col_scale is not None else rs2, thr2, lse, coef, out,
        flags if flags is not None else out,
        R, Cc, D, label_offset, float(smoothing), float(gradient_filter or 0.0),
        x.stride(0), x.stride(1), W.stride(0), W.stride(1), out.stride(0), flags.stride(0) if flags is not None else 0,
        HAS_NORM=col_scale is not None, SCALE_G=scale_g and col_scale is not None, FILTER=filter_logit is not None,
        GFILTER=gradient_filter is not None, SUB=sub_centers, USE_TMA=use_tma, EVEN_D=D % cfg.block_d == 0,
        **_constexprs(x.dtype), BLOCK_B=cfg.block_b, BLOCK_C=cfg.block_c, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return flags


def margin_bwd_dx(x: Tensor, W: Tensor, y: Tensor, row_scale: Tensor, col_scale: Optional[Tensor], lse: Tensor,
                  coef: Tensor, out: Tensor, *, label_offset: int = 0, smoothing: float = 0.0,
                  scale_g: bool = True, config: Optional[KernelConfig] = None, filter_logit=None) -> Tensor:
    """:func:`margin_grad` (one row of ``W`` per class) that also returns ``G W_rows`` (R, D) in the
    accumulation dtype, formed in the same pass: ``W_rows`` is ``W`` (``G`` with ``col_scale``) or its
    normalized rows (``scale_g`` False). Needs ``D <= FUSED_DX_MAX_D[dtype]``.

    Each program (a block of rows, a split of the classes) keeps its ``dX`` block on chip; the splits'
    partials are summed in a fixed order (no atomics).
    """
    _check_inputs(x, W, y)
    R, D = x.shape
    Cc = W.shape[0]
    if D > FUSED_DX_MAX_D[x.dtype]:
        raise ValueError(f"margin_bwd_dx needs D <= {FUSED_DX_MAX_D[x.dtype]} for {x.dtype}, got D = {D}")
    if out.shape != (R, Cc) or out.dtype != x.dtype or out.stride(1) != 1:
        raise ValueError(f"out must be ({R}, {Cc}) {x.dtype} with unit column stride, got "
                         f"{tuple(out.shape)} {out.dtype} strides {out.stride()}")
    acc = acc_dtype(x.dtype)
    if R == 0 or Cc == 0:
        return torch.zeros(R, D, device=x.device, dtype=acc)
    cfg = config or _cfg("bwd_dx", x.dtype, D, x.device)
    tiles = triton.cdiv(Cc, cfg.block_c)
    row_blocks = triton.cdiv(R, cfg.block_b)
    cap = max(1, FUSED_DX_PARTIAL_BYTES // max(1, R * D * torch.finfo(acc).bits // 8))
    splits = min(cap, plan.class_splits(row_blocks, tiles, _slots(x.device, cfg)))
    per = triton.cdiv(tiles, splits) * cfg.block_c
    splits = triton.cdiv(Cc, per)
    dx = torch.empty(splits, R, D, device=x.device, dtype=acc)
    rs2 = row_scale.to(acc) * LOG2E
    thr2 = _per_row(filter_logit, R, x) * LOG2E if filter_logit is not None else rs2
    grid = (row_blocks, splits)
    LAST_COMPILED["_margin_bwd_dx_kernel"] = _margin_bwd_dx_kernel[grid](
        x, W, y, rs2, col_scale if col_scale is not None else rs2, thr2, lse, coef, out, dx,
        R, Cc, D, label_offset, float(smoothing), per,
        x.stride(0), x.stride(1), W.stride(0), W.stride(1), out.stride(0), dx.stride(0), dx.stride(1),
        HAS_NORM=col_scale is not None, SCALE_G=scale_g and col_scale is not None, FILTER=filter_logit is not None,
        **_constexprs(x.dtype), BLOCK_B=cfg.block_b, BLOCK_C=cfg.block_c,
        D_PAD=max(16, triton.next_power_of_2(D)), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dx[0] if splits == 1 else dx.sum(0)


def grad_from_exp(ws: ExpWorkspace, y: Tensor, col_scale: Optional[Tensor], lse: Tensor, coef: Tensor, *,
                  smoothing: float = 0.0, scale_g: bool = True, gradient_filter: Optional[float] = None,
                  config: Optional[KernelConfig] = None) -> tuple[Tensor, Optional[Tensor], KernelConfig]:
    """Overwrite ``ws.exp`` (R, C) with ``G_ij = coef_i (p_ij - smoothing) col_scale_j`` (0 on targets),
    ``p_ij = exp[i, j] 2^(shift - lse_i log2 e)``; returns ``(G, flags, config)`` (flags as in
    :func:`margin_grad`, tiles of ``config.block_b x config.block_c``)."""
    G = ws.exp
    R, C = G.shape
    cfg = config or _cfg("from_exp", G.dtype, 0, G.device)
    flags = None
    if gradient_filter is not None:
        flags = torch.zeros(triton.cdiv(R, cfg.block_b), max(1, triton.cdiv(C, cfg.block_c)), device=G.device,
                            dtype=torch.int8)
    if R == 0 or C == 0:
        return G, flags, cfg
    _check_device(G)
    grid = (triton.cdiv(R, cfg.block_b), triton.cdiv(C, cfg.block_c))
    LAST_COMPILED["_grad_from_exp_kernel"] = _grad_from_exp_kernel[grid](
        G, ws.shift, y, col_scale if col_scale is not None else lse, lse, coef, flags if flags is not None else G,
        R, C, float(smoothing), float(gradient_filter or 0.0), ws.tile_c,
        G.stride(0), ws.shift.stride(0), flags.stride(0) if flags is not None else 0,
        SCALE_G=scale_g and col_scale is not None, GFILTER=gradient_filter is not None,
        ACC=_constexprs(G.dtype)["ACC"], BLOCK_R=cfg.block_b, BLOCK_C=cfg.block_c,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return G, flags, cfg


def finish_w(dD: Tensor, W: Tensor, inv_w: Tensor, clamped: Tensor, out: Tensor, scaled: bool = True) -> Tensor:
    """The backward of ``W_j / max(|W_j|, eps)`` into ``out`` (which may be ``dD``).

    ``scaled``: ``dD_j = inv_w_j dwh_j`` and ``out_j = dD_j - W_j inv_w_j^2 (W_j . dD_j)``; otherwise
    ``dD_j = dwh_j`` and ``out_j = inv_w_j dD_j - W_j inv_w_j^3 (W_j . dD_j)``. Where ``clamped`` the
    map is linear (the ``W_j`` term is dropped), as in ``F.normalize``.
    """
    _check_device(dD)
    Cc, D = dD.shape
    if W.shape != (Cc, D) or out.shape != (Cc, D) or inv_w.shape != (Cc,) or clamped.shape != (Cc,):
        raise ValueError(f"shapes dD {tuple(dD.shape)}, W {tuple(W.shape)}, inv_w {tuple(inv_w.shape)}, "
                         f"clamped {tuple(clamped.shape)}, out {tuple(out.shape)} do not fit (Cc, D), (Cc,)")
    if D > 1 and (dD.stride(1) != 1 or out.stride(1) != 1):
        raise ValueError(f"dD and out need unit feature strides, got {dD.stride()} and {out.stride()}")
    if Cc == 0:
        return out
    coef = inv_w * inv_w if scaled else inv_w * inv_w * inv_w
    coef = torch.where(clamped, torch.zeros_like(coef), coef)
    cfg = config_for("finish", W.dtype)
    grid = (triton.cdiv(Cc, cfg.block_b),)
    LAST_COMPILED["_finish_w_kernel"] = _finish_w_kernel[grid](
        dD, W, coef, inv_w, out, Cc, D, dD.stride(0), W.stride(0), W.stride(1), out.stride(0), HAS_PRE=not scaled,
        ACC=tl.float64 if dD.dtype == torch.float64 else tl.float32, BLOCK_R=cfg.block_b, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def scale_rows(W: Tensor, factor: Tensor, out: Tensor) -> Tensor:
    """``out_j = factor_j W_j`` in ``out``'s dtype (normalized rows when ``factor`` is ``1 / |W_j|``)."""
    _check_device(W)
    Cc, D = W.shape
    if out.shape != (Cc, D) or factor.shape != (Cc,) or (D > 1 and out.stride(1) != 1):
        raise ValueError(f"shapes W {tuple(W.shape)}, factor {tuple(factor.shape)}, out {tuple(out.shape)} "
                         "do not fit (Cc, D), (Cc,) with unit feature stride in out")
    if Cc == 0:
        return out
    cfg = config_for("rows", W.dtype)
    grid = (triton.cdiv(Cc, cfg.block_b),)
    LAST_COMPILED["_scale_rows_kernel"] = _scale_rows_kernel[grid](
        W, factor, out, Cc, D, W.stride(0), W.stride(1), out.stride(0),
        ACC=tl.float64 if factor.dtype == torch.float64 else tl.float32, BLOCK_R=cfg.block_b,
        BLOCK_D=cfg.block_d, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def _divisor(want: int, of: int) -> int:
    """The largest power-of-two step <= ``want`` that divides ``of`` (tile sides are powers of two)."""
    step = max(1, min(want, of))
    while of % step:
        step //= 2
    return step


def masked_mm(a: Tensor, b: Tensor, out: Tensor, flags: Tensor, *, mask_m: int, block_k: int,
              transposed_flags: bool = False, accumulate: bool = False) -> Tensor:
    """``out (+)= a @ b`` over the K tiles of ``block_k`` whose flag is set (block-sparse, fixed order).

    ``flags[i, k]`` covers rows ``[i mask_m, (i + 1) mask_m)`` of ``a`` and its
    columns ``[k block_k, (k + 1) block_k)``; ``transposed_flags``: ``flags[k, i]``.
    ``out`` is in the accumulation dtype with a unit column stride.
    """
    _check_device(a)
    M, K = a.shape
    N = b.shape[1]
    if b.shape[0] != K or out.shape != (M, N) or out.stride(1) != 1 or a.dtype != b.dtype:
        raise ValueError(f"shapes a {tuple(a.shape)}, b {tuple(b.shape)}, out {tuple(out.shape)} do not fit")
    if M == 0 or N == 0:
        return out
    cfg = config_for("masked", a.dtype)
    block_m = _divisor(cfg.block_b, mask_m)
    step_k = _divisor(cfg.block_d, block_k)
    fm, fk = (flags.stride(1), flags.stride(0)) if transposed_flags else (flags.stride(0), flags.stride(1))
    if K == 0:
        return out if accumulate else out.zero_()
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, cfg.block_c))
    LAST_COMPILED["_masked_mm_kernel"] = _masked_mm_kernel[grid](
        a, b, out, flags, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), fm, fk,
        ACCUMULATE=accumulate, **_constexprs(a.dtype), MASK_M=mask_m, MASK_K=block_k, BLOCK_M=block_m,
        BLOCK_N=cfg.block_c, BLOCK_K=step_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


# -- products: cuBLAS, or the masked kernel under gradient filtering ---------------------------------

_MM_OUT_DTYPE: dict[str, bool] = {}  # device type -> whether mm/addmm(..., out_dtype=) work there


def _gemm_into(out: Tensor, a: Tensor, b: Tensor, accumulate: bool) -> Tensor:
    """``out (+)= a @ b`` for operands in the input dtype and ``out`` in any dtype.

    cuBLAS accumulates into ``out`` in place where PyTorch offers
    ``mm``/``addmm(..., out_dtype=)`` (CUDA, recent versions). Elsewhere (CPU, older PyTorch) the product
    is formed in row pieces of at most :data:`PIECE_BYTES` of output, each rounded to the operands' dtype
    before it is accumulated.
    """
    if a.dtype == out.dtype:
        return out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
    kind = out.device.type
    if _MM_OUT_DTYPE.get(kind, True):
        try:
            if accumulate:
                return torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
            return torch.mm(a, b, out_dtype=out.dtype, out=out)
        except torch.cuda.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError, NotImplementedError):  # no such overload (older torch) or backend
            _MM_OUT_DTYPE[kind] = False
    step = max(1, PIECE_BYTES // max(1, out.shape[1] * out.element_size()))
    for i in range(0, out.shape[0], step):
        product = torch.mm(a[i:i + step], b)
        if accumulate:
            out[i:i + step].add_(product)
        else:
            out[i:i + step].copy_(product)
    return out


#: Output bytes per product piece where cuBLAS cannot accumulate into a wider ``out`` in place.
PIECE_BYTES = 2**16


@dataclass(frozen=True)
class _Flags:
    """Tile flags of a ``G`` block: ``flags[i, k]`` covers ``rows x cols`` elements."""

    flags: Tensor
    rows: int
    cols: int


def _dx_product(out: Tensor, G: Tensor, right: Tensor, accumulate: bool, flags: Optional[_Flags],
                col0: int = 0) -> None:
    """``out (+)= G @ right`` (``G``'s columns ``col0 ..`` of its flags)."""
    if flags is None:
        _gemm_into(out, G, right, accumulate)
    else:
        masked_mm(G, right, out, flags.flags[:, col0 // flags.cols:], mask_m=flags.rows, block_k=flags.cols,
                  accumulate=accumulate)


def _dw_product(out: Tensor, G: Tensor, rows: Tensor, accumulate: bool, flags: Optional[_Flags]) -> None:
    """``out (+)= G^T @ rows``."""
    if flags is None:
        _gemm_into(out, G.t(), rows, accumulate)
    else:
        masked_mm(G.t(), rows, out, flags.flags, mask_m=flags.cols, block_k=flags.rows, transposed_flags=True,
                  accumulate=accumulate)


# -- the row block (the tile engine's interface) ------------------------------------------------------


class _TritonBlocks(plan.Planning):
    """One call: the kernels' operand and row factors, and the work on one row block.

    The kernels multiply tiles in the weight's dtype: ``xk`` is ``x`` in that
    dtype (a ``B x D`` conversion when the embeddings differ, e.g. bf16
    embeddings from an autocast backbone against an fp32 weight; the ``C x D``
    weight is never copied). ``row_factor`` is ``s r_i / |x_i|`` (or
    ``s r_i``), the kernels' row factor of the logits.
    """

    def __init__(self, call: Call):
        _check_device(call.W)
        if (call.x.dtype == torch.float64) != (call.W.dtype == torch.float64):
            raise TypeError(f"backend='triton' does not mix float64 with other dtypes, got embeddings "
                            f"{call.x.dtype} and weight {call.W.dtype}; convert one of them")
        super().__init__(call)
        opts = self.opts
        if opts.gradient_filter is not None and opts.label_smoothing > 0:
            raise NotImplementedError(f"backend='triton' does not combine gradient_filter ({opts.gradient_filter})"
                                      f" with label_smoothing ({opts.label_smoothing}): a skipped tile would drop "
                                      "its smoothing term")
        self.dtype = call.W.dtype
        self.xk = call.x if call.x.dtype == call.W.dtype else call.x.to(call.W.dtype)
        self.row_factor = self.logit_scale if self.inv_x is None else self.inv_x * self.logit_scale
        thr = opts.filter_threshold
        self.filter_logit = None if thr is None else self.logit_scale * thr
        self.smooth = opts.label_smoothing / self.C_total  # folded into G by the gradient kernels
        # the workspace strategy's dW accumulator, dW product operand and float16 dX operand, across row blocks
        self._dD: Optional[Tensor] = None
        self._xh_in: Optional[Tensor] = None
        self._rows_buf: Optional[Tensor] = None

    def new_weight_grad(self) -> Tensor:
        """``dW`` in the weight's dtype, written by the gradient passes (zeroed only without rows)."""
        make = torch.zeros if self.B == 0 else torch.empty
        return make(self.n_rows, self.D, device=self.W.device, dtype=self.dtype)

    def new_workspace(self, pl: Plan) -> ExpWorkspace:
        return ExpWorkspace.allocate(pl.rows, self.C, self.dtype, self.W.device, pl.chunk)

    def dx_rows(self, c0: int, c1: int, buf: Optional[Tensor]) -> Tensor:
        """The right operand of ``dxh (+)= G @ rows`` for rows ``[c0, c1)`` of ``W``, in the input dtype."""
        if self.scale_g:
            return self.W[c0:c1]
        return scale_rows(self.W[c0:c1], self.inv_w[c0:c1], buf[: (c1 - c0) * self.D].view(c1 - c0, self.D))

    def finish(self, dD: Tensor, c0: int, c1: int, out: Tensor) -> None:
        """Write rows ``[c0, c1)`` of ``dW`` into ``out`` from their ``dD`` (the normalization backward)."""
        if self.inv_w is None:
            if out.data_ptr() != dD.data_ptr():
                out.copy_(dD)
        else:
            finish_w(dD, self.W[c0:c1], self.inv_w[c0:c1], self.w_clamped(c0, c1), out, scaled=self.scale_g)

    def _filter(self, r0: int, r1: int) -> Optional[Tensor]:
        return self.filter_logit[r0:r1] if self.filter_logit is not None else None

    # -- the engine's calls --

    def forward_block(self, r0: int, r1: int, pl: Plan, workspace: Optional[ExpWorkspace]) -> BlockStats:
        """The forward kernel over all classes of rows ``[r0, r1)``, one group per class split; with the
        workspace (its first ``r1 - r0`` rows) its exponentials and tile shifts stored."""
        options = dict(want_prediction=self.opts.want_prediction, classes=self.opts.chunk_size,
                       filter_logit=self._filter(r0, r1))
        if workspace is None:
            options.update(sub_centers=self.k)
        else:
            options.update(config=plan.workspace_config(self.C, self.D, self.dtype, self.opts, self.device),
                           workspace=workspace.rows(0, r1 - r0))
        return margin_fwd_splits(self.xk[r0:r1], self.W, self.y_local[r0:r1], self.row_factor[r0:r1], self.inv_w,
                                 **options)

    def gradient_block(self, r0: int, r1: int, pl: Plan, grads: BlockGrads, workspace: Optional[ExpWorkspace],
                       dxh: Optional[Tensor], dD: Optional[Tensor]) -> None:
        if workspace is not None:
            self._gradient_from_workspace(r0, r1, grads, workspace.rows(0, r1 - r0), dxh, dD)
        else:
            self._recompute_gradient(pl, grads, dxh, dD)

    def _gradient_from_workspace(self, r0: int, r1: int, grads: BlockGrads, block: ExpWorkspace,
                                 dxh: Optional[Tensor], dD: Optional[Tensor]) -> None:
        """``G`` in place over the block's exponentials, then ``dxh[r0:r1] = G W`` and ``dD (+)= G^T xh``;
        ``dW`` finished after the last block (from a float32 accumulator where one is needed)."""
        C, D, W = self.C, self.D, self.W
        gcfg = _cfg("from_exp", self.dtype, D, W.device)
        G, f, _ = grad_from_exp(block, self.y_local[r0:r1], self.inv_w, grads.lse, grads.coef, smoothing=self.smooth,
                                scale_g=self.scale_g, gradient_filter=self.opts.gradient_filter, config=gcfg)
        flags = None if f is None else _Flags(f, gcfg.block_b, gcfg.block_c)
        if dxh is not None:
            if self.scale_g:
                _dx_product(dxh[r0:r1], G, W, False, flags)
            else:  # float16: normalized rows of W, chunk by chunk (chunks of whole flag tiles)
                step = max(gcfg.block_c, plan.normalized_rows_chunk(C, D, self.dtype) // gcfg.block_c * gcfg.block_c)
                if self._rows_buf is None:
                    self._rows_buf = torch.empty(min(step, C) * D, device=W.device, dtype=self.dtype)
                for c0 in range(0, C, step):
                    c1 = min(c0 + step, C)
                    _dx_product(dxh[r0:r1], G[:, c0:c1], self.dx_rows(c0, c1, self._rows_buf), c0 > 0, flags, c0)
        if dD is not None:
            if grads.first:  # the dW product's operand and its accumulator, for all row blocks
                self._xh_in = self.xk if self.inv_x is None else self.xh.to(self.dtype)
                blocks = 1 if grads.last else 2
                self._dD = torch.empty(C, D, device=W.device, dtype=torch.float32) \
                    if plan.fp32_accumulator(self.dtype, blocks, self.opts.normalize) else dD
            _dw_product(self._dD, G, self._xh_in[r0:r1], not grads.first, flags)
            if grads.last:
                self.finish(self._dD, 0, C, dD)
                self._dD = self._xh_in = None

    def _recompute_gradient(self, pl: Plan, grads: BlockGrads, dxh: Optional[Tensor], dD: Optional[Tensor]) -> None:
        """Class chunk by class chunk: the kernel recomputes the logits into ``G`` (for
        ``D <= FUSED_DX_MAX_D[dtype]`` forming ``dxh += G W`` in the same pass), cuBLAS (or the masked
        kernel) multiplies, and each chunk of ``dW`` is finished and written in the weight's dtype before the
        next one starts. The engine's row block is the whole batch (:func:`~marginops.backends.triton_plan.
        tiling`): the chunks, and the rows of a ``G`` buffer, are :meth:`recompute_chunks`'."""
        assert grads.first and grads.last, "the recompute backward finishes dW per chunk: one row block"
        opts, x, W = self.opts, self.xk, self.W
        B, D, k = self.B, self.D, self.k
        cfg = self.grad_config()
        cp = self.recompute_chunks()
        chunk = pl.chunk  # classes per chunk
        lse, coef = grads.lse, grads.coef
        gfilter = opts.gradient_filter
        xh_in = self.xh.to(x.dtype) if dD is not None else None
        buf = torch.empty(cp.rows * chunk * k, device=x.device, dtype=x.dtype)
        dD_buf = torch.empty(chunk * k * D, device=x.device, dtype=self.acc) if dD is not None else None
        fused = dxh is not None and k == 1 and gfilter is None and D <= FUSED_DX_MAX_D[x.dtype]  # dX in the pass
        unscaled = dxh is not None and not self.scale_g and not fused
        rows_buf = torch.empty(chunk * k * D, device=x.device, dtype=x.dtype) if unscaled else None
        for c0 in range(0, self.C, chunk):
            c1 = min(c0 + chunk, self.C)
            w0, w1 = c0 * k, c1 * k
            dDc = dD_buf[: (w1 - w0) * D].view(w1 - w0, D) if dD is not None else None
            w_rows = self.dx_rows(w0, w1, rows_buf) if dxh is not None and not fused else None
            inv_w = self.inv_w[w0:w1] if self.inv_w is not None else None
            for r0 in range(0, B, cp.rows):
                r1 = min(r0 + cp.rows, B)
                G = buf[: (r1 - r0) * (w1 - w0)].view(r1 - r0, w1 - w0)
                if fused:
                    dxh[r0:r1] += margin_bwd_dx(x[r0:r1], W[w0:w1], self.y_local[r0:r1], self.row_factor[r0:r1],
                                                inv_w, lse[r0:r1], coef[r0:r1], G, label_offset=c0,
                                                smoothing=self.smooth, scale_g=self.scale_g,
                                                filter_logit=self._filter(r0, r1))
                    flags = None
                else:
                    f = margin_grad(x[r0:r1], W[w0:w1], self.y_local[r0:r1], self.row_factor[r0:r1], inv_w,
                                    lse[r0:r1], coef[r0:r1], G, label_offset=c0, smoothing=self.smooth,
                                    scale_g=self.scale_g, config=cfg, sub_centers=k, filter_logit=self._filter(r0, r1),
                                    gradient_filter=gfilter)
                    flags = None if f is None else _Flags(f, cfg.block_b, cfg.block_c * k)
                    if dxh is not None:
                        _dx_product(dxh[r0:r1], G, w_rows, True, flags)
                if dD is not None:
                    _dw_product(dDc, G, xh_in[r0:r1], r0 > 0, flags)
            if dD is not None:
                self.finish(dDc, w0, w1, dD[w0:w1])


_ENGINE = engine.Engine(_TritonBlocks)


# -- the backend interface (marginops.backends.interface.Backend) ---------------------------------------


def weight_grad_dtype(x_dtype: torch.dtype, W_dtype: torch.dtype, opts: FusedOptions) -> torch.dtype:
    """``dW`` comes back in the weight's dtype with either strategy (the workspace strategy accumulates in
    float32 internally where it needs to)."""
    return W_dtype


#: The engine's functions of the interface: the strategy rule, the forward, the forward with the gradients
#: (the workspace strategy) and the recompute strategy's gradients (:class:`~marginops.backends.engine.Engine`).
uses_workspace = _ENGINE.uses_workspace
forward_stats = _ENGINE.forward_stats
forward_with_grads = _ENGINE.forward_with_grads
recompute_grads = _ENGINE.recompute_grads


def scratch_bytes(B: int, C: int, D: int, dtype: torch.dtype, opts: FusedOptions,
                  device: Optional[torch.device] = None) -> dict[str, int]:
    """The scratch one training step takes beyond inputs and gradients, term by term
    (:func:`marginops.backends.triton_plan.scratch_bytes` for this backend's strategy choice and configs)."""
    device = torch.device(device or "cpu")
    described = engine.describe(device)
    classes = opts.classes_of(C)
    workspace = uses_workspace(B, C, D, dtype, dtype, opts)
    return plan.scratch_bytes(B, classes, D, dtype, opts, workspace,
                              plan.workspace_config(classes, D, dtype, opts, described).block_c,
                              _cfg("sub_grad" if opts.sub_centers > 1 else "grad", dtype, D, device),
                              described.memory_bytes or None)
