"""Triton backend: margin softmax cross-entropy fused over classes, no ``B x C`` tensor of logits kept.

The kernels are in :mod:`marginops.backends.triton_kernels`, their pinned
configs in :mod:`marginops.backends.triton_config`, the planning (strategy,
row blocks, chunks, grids, default budget) in
:mod:`marginops.backends.triton_plan`. This module reads top to bottom:
launchers (check, allocate, launch; no autograd), the two strategies built
from them and cuBLAS, then the functions of the backend interface
(:class:`marginops.backends.interface.Backend`; autograd lives in
:mod:`marginops.ops`).

**Workspace strategy (the default for a scalar loss with gradients; three
GEMMs).** Per block of rows: the forward kernel computes every logits tile
of the block (raw ``x``/``W`` tiles multiplied with the row factor
``s_i / |x_i|`` and the column factor ``1 / |W_j|`` folded in), keeps online
max / sum / argmax, and stores ``exp2(logit - shift)`` in the input dtype
(every value <= 1) with one shift per (row, tile) in float32. With the
block's log-sum-exp known, ``_grad_from_exp_kernel`` turns the stored
exponentials into ``G_ij = g_i s_i (p_ij - eps/C) / |W_j|`` (0 on the target)
*in place*, one read and one write per element, and cuBLAS forms
``dxh = G W`` (float32 output) and ``dD (+)= G^T xh``. ``dD`` goes straight
into ``dW``'s storage when there is one block of a plain (unnormalized)
head or the weight is float32/float64; otherwise it is accumulated across
blocks in a float32 ``C x D`` buffer and the normalization backward
(``_finish_w_kernel``) writes ``dW`` in the weight's dtype. The gradients
are ready when the forward returns. Rows per block: :func:`~marginops.
backends.triton_plan.workspace_plan`.

**Recompute strategy** (``reduction="none"``, class ranges, sub-centres, or
``strategy="recompute"``; four GEMMs). The forward kernel keeps per-row
statistics only; the backward walks class chunks: ``_margin_grad_kernel``
recomputes the logits tiles into ``G`` (input dtype), cuBLAS adds ``G W_chunk``
to ``dxh`` and writes ``dD_chunk = G^T xh``, and each chunk is finished into
``dW`` before the next one starts. For narrow embeddings
(``D <= FUSED_DX_MAX_D[dtype]``) ``_margin_bwd_dx_kernel`` forms ``G W_chunk`` in
the same pass as the logits, from the same ``W`` tile (one partial per class
split, summed in order), and cuBLAS does ``dD`` alone. Its scratch is bounded
by the budget.

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

**Per-row scales** (``Call.row_scale``): row ``i``'s logits are
``s r_i cos_ij``; ``r_i`` joins the row factor, the per-row threshold of
inter-class filtering and ``g_i s_i``.

Everything is reproducible run to run: no atomics, every output element
written by one program or one cuBLAS call in a fixed order. On CPU the
kernels run only under the Triton interpreter: ``TRITON_INTERPRET=1`` must be
set before triton is first imported (this module is imported lazily, on the
first call of ``backend="triton"``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import triton_plan as plan
from .common import Prepared, acc_dtype
from .interface import Call, FusedOptions, RowStats
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


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _cuda_props(index: int):
    return torch.cuda.get_device_properties(index)


def arch(device: torch.device) -> Optional[int]:
    """Compute capability as ``major * 10 + minor`` (90 for H100/H200); None off CUDA."""
    if device.type != "cuda":
        return None
    p = _cuda_props(_index(device))
    return p.major * 10 + p.minor


def _slots(device: torch.device, cfg: KernelConfig) -> int:
    """Programs of ``cfg`` that run at once: SMs times its occupancy; 1 under the interpreter."""
    if device.type != "cuda":
        return 1
    return _cuda_props(_index(device)).multi_processor_count * max(1, cfg.occupancy)


def _device_bytes(device: torch.device) -> Optional[int]:
    return _cuda_props(_index(device)).total_memory if device.type == "cuda" else None


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


def margin_fwd(x: Tensor, W: Tensor, y: Tensor, row_scale: Tensor, col_scale: Optional[Tensor], *,
               want_prediction: bool = False, classes: Optional[int] = None,
               config: Optional[KernelConfig] = None, workspace: Optional[ExpWorkspace] = None,
               sub_centers: int = 1, filter_logit=None) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Per-row log-sum-exp of ``row_scale_i * col_scale_j * (x_i . W_j)`` over ``j != y_i``, and the argmax.

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
        ``N`` (B,) in the accumulation dtype (``-inf`` when ``C == 1``), the prediction (B,) int64 and
        the largest logit (B,), target included (both None unless ``want_prediction``).
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
    # combine the splits (base 2): N = (M + log2(sum_k l_k 2^(m_k - M))) ln 2
    M = m.amax(1, keepdim=True)
    M = torch.where(torch.isfinite(M), M, torch.zeros_like(M))  # no non-target class at all (C == 1)
    N = (M.squeeze(1) + torch.log2((l * torch.exp2(m - M)).sum(1))) * LN2
    pred = top = None
    if want_prediction:
        best = pv.amax(1, keepdim=True)
        pred = torch.where(pv == best, pi, torch.full_like(pi, C)).amin(1)  # first class among the tied splits
        top = best.squeeze(1) * LN2
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


# -- per call ------------------------------------------------------------------------------------------


class _Prepared(Prepared):
    """The shared per-call quantities plus the kernels' operand, row factors and how ``G`` is scaled.

    The kernels multiply tiles in the weight's dtype: ``xk`` is ``x`` in that
    dtype (a ``B x D`` conversion when the embeddings differ, e.g. bf16
    embeddings from an autocast backbone against an fp32 weight; the ``C x D``
    weight is never copied). ``scales`` are the per-row scales ``s r_i``.
    """

    def __init__(self, call: Call):
        opts = call.opts
        _check_device(call.W)
        if (call.x.dtype == torch.float64) != (call.W.dtype == torch.float64):
            raise TypeError(f"backend='triton' does not mix float64 with other dtypes, got embeddings "
                            f"{call.x.dtype} and weight {call.W.dtype}; convert one of them")
        super().__init__(replace(call, row_scale=None))  # per-row scales are this backend's own business
        B = call.x.shape[0]
        if call.row_scale is not None and call.row_scale.shape != (B,):
            raise ValueError(f"row_scale must have shape ({B},), got {tuple(call.row_scale.shape)}")
        self.rscale = None if call.row_scale is None else call.row_scale.to(call.x.device, self.acc)
        self.scales = (torch.full((B,), opts.scale, device=call.x.device, dtype=self.acc) if self.rscale is None
                       else self.rscale * opts.scale)
        self.xk = call.x if call.x.dtype == call.W.dtype else call.x.to(call.W.dtype)
        self.row_scale = self.scales if self.inv_x is None else self.inv_x * self.scales
        # G carries 1 / |W_j| (dX multiplies raw W rows) unless that overflows the input dtype (float16)
        self.scale_g = self.inv_w is None or call.W.dtype != torch.float16
        self.gfilter = opts.gradient_filter
        if self.gfilter is not None and opts.label_smoothing > 0:
            raise NotImplementedError(f"backend='triton' does not combine gradient_filter ({self.gfilter}) with "
                                      f"label_smoothing ({opts.label_smoothing}): a skipped tile would drop its "
                                      "smoothing term")
        thr = opts.filter_threshold
        self.filter_logit = None if thr is None else self.scales * thr
        self.dtype = call.W.dtype

    def logit_sum(self, target_logit: Optional[Tensor] = None) -> Tensor:
        out = super().logit_sum(target_logit)
        return out if self.rscale is None or out.numel() == 0 else out * self.rscale

    def coef(self, g: Tensor) -> Tensor:
        """``g_i s_i``: the row factor of ``G``."""
        return g.to(self.acc) * self.scales

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


# -- the recompute strategy -----------------------------------------------------------------------------


def _recompute_grads(prep: _Prepared, lse: Tensor, coef: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """``dxh`` (accumulation dtype) and ``dW`` (weight dtype) for row factors ``coef = g s``.

    Class chunk by class chunk: the kernel recomputes the logits into ``G``
    (for ``D <= FUSED_DX_MAX_D[dtype]`` forming ``dxh += G W`` in the same pass),
    cuBLAS (or the masked kernel) multiplies, and each chunk of ``dW`` is
    finished and written in the weight's dtype before the next one starts.
    """
    opts, x, W = prep.opts, prep.xk, prep.W
    B, D, k = prep.B, prep.D, prep.k
    need_x, need_W = opts.need_x, opts.need_W
    cfg = _cfg("sub_grad" if k > 1 else "grad", x.dtype, D, x.device)
    budget = opts.memory_budget or plan.default_budget(prep.C, D, x.dtype)
    pl = plan.chunk_plan(B, prep.n_rows, D, x.dtype, budget, cfg, scaled_g=prep.scale_g)
    chunk = max(1, pl.chunk // k)  # classes per chunk
    dxh = torch.zeros(B, D, device=x.device, dtype=prep.acc) if need_x else None
    dW = torch.empty(prep.n_rows, D, device=x.device, dtype=W.dtype) if need_W else None
    xh_in = prep.xh.to(x.dtype) if need_W else None
    buf = torch.empty(pl.rows * chunk * k, device=x.device, dtype=x.dtype)
    dD_buf = torch.empty(chunk * k * D, device=x.device, dtype=prep.acc) if need_W else None
    fused = need_x and k == 1 and prep.gfilter is None and D <= FUSED_DX_MAX_D[x.dtype]  # dX in the same pass
    unscaled = need_x and not prep.scale_g and not fused
    rows_buf = torch.empty(chunk * k * D, device=x.device, dtype=x.dtype) if unscaled else None
    smooth = opts.label_smoothing / prep.C_total
    for c0 in range(0, prep.C, chunk):
        c1 = min(c0 + chunk, prep.C)
        w0, w1 = c0 * k, c1 * k
        dD = dD_buf[: (w1 - w0) * D].view(w1 - w0, D) if need_W else None
        w_rows = prep.dx_rows(w0, w1, rows_buf) if need_x and not fused else None
        for r0 in range(0, B, pl.rows):
            r1 = min(r0 + pl.rows, B)
            G = buf[: (r1 - r0) * (w1 - w0)].view(r1 - r0, w1 - w0)
            inv_w = prep.inv_w[w0:w1] if prep.inv_w is not None else None
            filt = prep.filter_logit[r0:r1] if prep.filter_logit is not None else None
            if fused:
                dxh[r0:r1] += margin_bwd_dx(x[r0:r1], W[w0:w1], prep.y_local[r0:r1], prep.row_scale[r0:r1], inv_w,
                                            lse[r0:r1], coef[r0:r1], G, label_offset=c0, smoothing=smooth,
                                            scale_g=prep.scale_g, filter_logit=filt)
                flags = None
            else:
                f = margin_grad(x[r0:r1], W[w0:w1], prep.y_local[r0:r1], prep.row_scale[r0:r1], inv_w, lse[r0:r1],
                                coef[r0:r1], G, label_offset=c0, smoothing=smooth, scale_g=prep.scale_g, config=cfg,
                                sub_centers=k, filter_logit=filt, gradient_filter=prep.gfilter)
                flags = None if f is None else _Flags(f, cfg.block_b, cfg.block_c * k)
                if need_x:
                    _dx_product(dxh[r0:r1], G, w_rows, True, flags)
            if need_W:
                _dw_product(dD, G, xh_in[r0:r1], r0 > 0, flags)
        if need_W:
            if B == 0:
                dW[w0:w1].zero_()
            else:
                prep.finish(dD, w0, w1, dW[w0:w1])
    return dxh, dW


# -- the workspace strategy -------------------------------------------------------------------------------


def _ws_kernel(opts: FusedOptions) -> str:
    return "ws_pred" if opts.want_prediction else "ws"


def _workspace_plan(prep: _Prepared) -> tuple[KernelConfig, plan.WorkspacePlan]:
    """The forward's config and the row blocks. :func:`uses_workspace` decided with the default config's
    tiles (it sees no device); a tuned config whose tiles leave no row within the budget gives way to it."""
    kernel = _ws_kernel(prep.opts)
    device_bytes = _device_bytes(prep.W.device)
    for cfg in (_cfg(kernel, prep.dtype, prep.D, prep.W.device), config_for(kernel, prep.dtype, prep.D)):
        pl = plan.workspace_plan(prep.B, prep.C, prep.D, prep.dtype, prep.opts, cfg.block_c, device_bytes)
        if pl is not None:
            return cfg, pl
    raise ValueError("the workspace does not hold one row")  # uses_workspace said it would


def _workspace_forward(prep: _Prepared, z: Tensor, g: Tensor):
    """Forward with the gradients for ``grad_output = 1`` (three GEMMs), block of rows by block of rows."""
    opts, x, W = prep.opts, prep.xk, prep.W
    B, C, D, acc = prep.B, prep.C, prep.D, prep.acc
    need_x, need_W = opts.need_x, opts.need_W
    cfg, pl = _workspace_plan(prep)
    ws = ExpWorkspace.allocate(pl.rows, C, x.dtype, x.device, cfg.block_c)
    dxh = torch.empty(B, D, device=x.device, dtype=acc) if need_x else None
    dD = dW = None
    if need_W:
        dD = torch.empty(C, D, device=x.device, dtype=torch.float32 if pl.fp32_accumulator else W.dtype)
    xh_in = (x if prep.inv_x is None and x.dtype == W.dtype else prep.xh.to(x.dtype)) if need_W else None
    gcfg = _cfg("from_exp", x.dtype, D, x.device)
    step = max(gcfg.block_c, plan.normalized_rows_chunk(C, D, x.dtype) // gcfg.block_c * gcfg.block_c)
    rows_buf = torch.empty(min(step, C) * D, device=x.device, dtype=x.dtype) if need_x and not prep.scale_g else None
    N = torch.empty(B, device=x.device, dtype=acc)
    want = opts.want_prediction
    pred = torch.empty(B, device=x.device, dtype=torch.int64) if want else prep.empty(torch.int64)
    best = torch.empty(B, device=x.device, dtype=acc) if want else prep.empty()
    coef = prep.coef(g)
    smooth = opts.label_smoothing / prep.C_total
    for b0 in range(0, B, pl.rows):
        b1 = min(b0 + pl.rows, B)
        block = ws.rows(0, b1 - b0)
        N[b0:b1], p, top = margin_fwd(x[b0:b1], W, prep.y_local[b0:b1], prep.row_scale[b0:b1], prep.inv_w,
                                      want_prediction=want, classes=opts.chunk_size, config=cfg, workspace=block,
                                      filter_logit=prep.filter_logit[b0:b1] if prep.filter_logit is not None
                                      else None)
        if want:
            pred[b0:b1], best[b0:b1] = p, top
        lse = torch.logaddexp(N[b0:b1], z[b0:b1])
        G, f, _ = grad_from_exp(block, prep.y_local[b0:b1], prep.inv_w, lse, coef[b0:b1], smoothing=smooth,
                                scale_g=prep.scale_g, gradient_filter=prep.gfilter, config=gcfg)
        flags = None if f is None else _Flags(f, gcfg.block_b, gcfg.block_c)
        if need_x:
            if prep.scale_g:
                _dx_product(dxh[b0:b1], G, W, False, flags)
            else:  # float16: normalized rows of W, chunk by chunk (chunks of whole flag tiles)
                for c0 in range(0, C, step):
                    c1 = min(c0 + step, C)
                    _dx_product(dxh[b0:b1], G[:, c0:c1], prep.dx_rows(c0, c1, rows_buf), c0 > 0, flags, c0)
        if need_W:
            _dw_product(dD, G, xh_in[b0:b1], b0 > 0, flags)
    if need_W:
        if B == 0:
            dD.zero_()
        if pl.fp32_accumulator:
            dW = torch.empty(C, D, device=x.device, dtype=W.dtype)
            prep.finish(dD, 0, C, dW)
            del dD
        else:
            dW = dD
            prep.finish(dD, 0, C, dW)
    return RowStats(N, best, pred, prep.logit_sum()), dxh, dW


# -- the backend interface (marginops.backends.interface.Backend) ---------------------------------------


def weight_grad_dtype(x_dtype: torch.dtype, W_dtype: torch.dtype, opts: FusedOptions) -> torch.dtype:
    """``dW`` comes back in the weight's dtype with either strategy (the workspace strategy accumulates in
    float32 internally where it needs to)."""
    return W_dtype


def uses_workspace(B: int, C: int, D: int, x_dtype: torch.dtype, W_dtype: torch.dtype, opts: FusedOptions) -> bool:
    """Whether a call takes the workspace strategy: ``"workspace"``, or ``"auto"`` where it applies (a scalar
    loss with gradients, the whole class range, one row per class) and its row blocks hold at least
    :data:`~marginops.backends.triton_plan.MIN_WORKSPACE_ROWS` rows. ``C`` counts rows of the weight.

    Raises:
        ValueError: ``"workspace"`` that cannot hold one row within the budget, or a class range.
        NotImplementedError: ``"workspace"`` with sub-centres.
    """
    if opts.strategy == "recompute" or B == 0 or not (opts.reduce and (opts.need_x or opts.need_W)):
        return False
    tile_c = config_for(_ws_kernel(opts), W_dtype, D).block_c
    classes = opts.classes_of(C)
    if opts.strategy == "workspace":
        if opts.sub_centers > 1:
            raise NotImplementedError(f"strategy='workspace' does not support sub-centres (sub_centers="
                                      f"{opts.sub_centers}) on backend='triton'; use strategy='recompute' or 'auto'")
        opts.require_full_range(classes)
        if plan.workspace_plan(B, classes, D, W_dtype, opts, tile_c) is None:
            need = plan.workspace_row_bytes(classes, W_dtype, tile_c)
            raise ValueError(f"strategy='workspace' needs memory_budget >= {need} bytes (one row of exponentials "
                             f"across all {classes} classes), got memory_budget={opts.memory_budget}")
        return True
    return plan.auto_takes_workspace(B, C, D, W_dtype, opts, tile_c)


def forward_stats(call: Call) -> RowStats:
    """The forward kernel over all row blocks and class splits; no gradients."""
    prep = _Prepared(call)
    opts = call.opts
    N, pred, best = margin_fwd(prep.xk, call.W, prep.y_local, prep.row_scale, prep.inv_w,
                               want_prediction=opts.want_prediction, classes=opts.chunk_size,
                               sub_centers=prep.k, filter_logit=prep.filter_logit)
    if opts.want_prediction:
        pred = pred + opts.class_start
    else:
        pred, best = prep.empty(torch.int64), prep.empty()
    return RowStats(N, best, pred, prep.logit_sum())


def forward_with_grads(call: Call, z: Tensor, g: Tensor) -> tuple[RowStats, Optional[Tensor], Optional[Tensor]]:
    """The workspace strategy: three GEMMs, gradients formed during the forward pass."""
    prep = _Prepared(call)
    call.opts.require_full_range(prep.C)
    return _workspace_forward(prep, z.to(prep.acc), g.to(prep.acc))


def recompute_grads(call: Call, lse: Tensor, g: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The recompute strategy's gradients (four GEMMs in all): ``G`` chunks from the kernel, then the products."""
    prep = _Prepared(call)
    if not (call.opts.need_x or call.opts.need_W):
        return None, None
    return _recompute_grads(prep, lse.to(prep.acc), prep.coef(g))


def scratch_bytes(B: int, C: int, D: int, dtype: torch.dtype, opts: FusedOptions,
                  device: Optional[torch.device] = None) -> dict[str, int]:
    """The scratch one training step takes beyond inputs and gradients, term by term
    (:func:`marginops.backends.triton_plan.scratch_bytes` for this backend's strategy choice and configs)."""
    device = torch.device(device or "cpu")
    workspace = uses_workspace(B, C, D, dtype, dtype, opts)
    return plan.scratch_bytes(B, opts.classes_of(C), D, dtype, opts, workspace,
                              _cfg(_ws_kernel(opts), dtype, D, device).block_c,
                              _cfg("sub_grad" if opts.sub_centers > 1 else "grad", dtype, D, device),
                              _device_bytes(device))
