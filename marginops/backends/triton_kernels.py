"""The Triton kernels of the ``"triton"`` backend and their pinned launch configurations.

Device code only; :mod:`marginops.backends.triton_margin` launches them
(shapes, checks, grids) and pairs them with cuBLAS. ``python -m
marginops.aot`` compiles every kernel in every config listed here for sm_80
and sm_90 and checks for spills.

* ``_margin_fwd_kernel``: logits tiles from raw ``x``/``W`` with the inverse
  norms folded in, target column excluded, online max / sum-exp per (row
  block, class split), running argmax; optionally keeps each tile's
  exponentials and shift (the workspace strategy).
* ``_margin_grad_kernel``: ``G`` for a chunk of classes, from a recomputed
  tile or from the stored exponentials.
* ``_finish_w_kernel``: the normalization backward of ``W``, fused.

Import this module only after ``TRITON_INTERPRET`` has its final value (the
backend imports it lazily).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# -- configurations -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """One pinned launch configuration: tile sizes, warps and pipeline stages."""

    block_b: int  # rows per tile
    block_c: int  # classes per tile
    block_d: int  # features per step of the D loop
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return f"{self.block_b}x{self.block_c}x{self.block_d} w{self.num_warps} s{self.num_stages}"


#: One pinned config per kernel and input dtype, checked for zero spills on sm_80 and sm_90 by
#: ``python -m marginops.aot`` (with Triton 3.8 and 3.9; float32 runs tf32x3, three MMAs per product,
#: hence its smaller tiles). The interpreter runs the same configs (few, large blocks).
FWD_CONFIGS = {
    torch.bfloat16: KernelConfig(128, 128, 64, 8, 3),
    torch.float16: KernelConfig(128, 128, 64, 8, 3),
    torch.float32: KernelConfig(128, 64, 16, 8, 3),
    torch.float64: KernelConfig(64, 32, 16, 4, 2),
}
#: The forward of ``strategy="workspace"`` also stores each tile's exponentials: 128 x 128 16-bit tiles spill
#: then (372 bytes on sm_80), 128 x 64 do not; float32 needs one pipeline stage fewer (8 bytes on sm_80).
WORKSPACE_FWD_CONFIGS = {
    **FWD_CONFIGS,
    torch.bfloat16: KernelConfig(128, 64, 64, 8, 3),
    torch.float16: KernelConfig(128, 64, 64, 8, 3),
    torch.float32: KernelConfig(128, 64, 16, 8, 2),
}
GRAD_CONFIGS = {
    torch.bfloat16: KernelConfig(128, 128, 64, 8, 3),
    torch.float16: KernelConfig(128, 128, 64, 8, 3),
    torch.float32: KernelConfig(128, 64, 16, 8, 3),
    torch.float64: KernelConfig(64, 32, 16, 4, 2),
}
#: With sub-centres (``SUB > 1``) each class logit is a maximum over ``SUB`` products: the tile keeps the
#: running maximum and, in the gradient kernel, which sub-centre gave it. Checked at SUB = 3 for sm_80 and
#: sm_90: the shipped 16-bit forward tiles spill then (1.7 KB on sm_90), 128 x 64 do not; the gradient
#: kernel spills at 128 x 128 16-bit (5 KB) and 64 x 64 (16-28 bytes on sm_80) tiles, not at 128 x 32,
#: nor float32 at 64 x 32. Not timed on a GPU.
SUBCENTER_FWD_CONFIGS = {
    **FWD_CONFIGS,
    torch.bfloat16: KernelConfig(128, 64, 64, 8, 3),
    torch.float16: KernelConfig(128, 64, 64, 8, 3),
}
SUBCENTER_GRAD_CONFIGS = {
    **GRAD_CONFIGS,
    torch.bfloat16: KernelConfig(128, 32, 64, 8, 3),
    torch.float16: KernelConfig(128, 32, 64, 8, 3),
    torch.float32: KernelConfig(64, 32, 16, 8, 3),
}
#: The gradient kernel reading stored exponentials is elementwise (memory-bound): small tiles, many programs per SM.
WORKSPACE_GRAD_CONFIGS = {dtype: KernelConfig(32, 128, 16, 4, 1) for dtype in GRAD_CONFIGS}
#: ``_finish_w_kernel`` (streaming) per weight dtype: ``block_b`` rows per program, ``block_d`` features per
#: step (``block_c`` unused). float64 takes 8 rows: 16 spill 24-48 bytes with the unscaled variant.
FINISH_CONFIGS = {
    torch.bfloat16: KernelConfig(16, 1, 256, 4, 1),
    torch.float16: KernelConfig(16, 1, 256, 4, 1),
    torch.float32: KernelConfig(16, 1, 256, 4, 1),
    # 8 warps: with 4, the float64 finish spilled 8 bytes on sm_90 under Triton 3.6 (its unscaled variant)
    torch.float64: KernelConfig(8, 1, 256, 8, 1),
}
#: The forward aims for this many programs per SM (class splits fill the chip when B is small).
PROGRAMS_PER_SM = 2
SUPPORTED_DTYPES = tuple(FWD_CONFIGS)


# -- kernels --------------------------------------------------------------------------------------------


@triton.jit
def _logits_tile(
    x_base, w_base,  # pointer tiles of x rows (BLOCK_B, BLOCK_D) and W rows (BLOCK_C, BLOCK_D) at d = 0
    rs,  # (BLOCK_B,) row factor
    cs_ptr, offs_c,  # column factors and this tile's class offsets (read only with HAS_NORM)
    row_ok, col_ok,  # masks
    D, stride_xd, stride_wd,
    HAS_NORM: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``rs_i * (x_i . W_j) * cs_j`` for one (rows x classes) tile, walking D in BLOCK_D steps."""
    offs_d = tl.arange(0, BLOCK_D)
    x_ptrs = x_base
    w_ptrs = w_base
    acc = tl.zeros((BLOCK_B, BLOCK_C), ACC)
    for d0 in range(0, D, BLOCK_D):
        d_ok = offs_d < D - d0
        xt = tl.load(x_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(ACC)
            wt = wt.to(ACC)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=DOT_PRECISION, out_dtype=ACC)
        x_ptrs += BLOCK_D * stride_xd
        w_ptrs += BLOCK_D * stride_wd
    logits = acc * rs[:, None]
    if HAS_NORM:
        cs = tl.load(cs_ptr + offs_c, mask=col_ok, other=0.0).to(ACC)
        logits = logits * cs[None, :]
    return logits


@triton.jit
def _class_logits_tile(
    x_base, w_ptr, offs_d, offs_c, rs, cs_ptr, row_ok, col_ok, D, stride_wc, stride_xd, stride_wd,
    HAS_NORM: tl.constexpr, SUB: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Class logits of one tile: with ``SUB`` sub-centres per class (rows ``c SUB + r`` of ``W``) the
    largest of the ``SUB`` logits, and which ``r`` gave it (the first maximum); ``r = 0`` for ``SUB = 1``."""
    if SUB == 1:
        w_base = w_ptr + offs_c[:, None] * stride_wc + offs_d[None, :] * stride_wd
        best = _logits_tile(x_base, w_base, rs, cs_ptr, offs_c, row_ok, col_ok, D, stride_xd, stride_wd,
                            HAS_NORM, UPCAST, ACC, DOT_PRECISION, BLOCK_B, BLOCK_C, BLOCK_D)
        arg = tl.zeros((BLOCK_B, BLOCK_C), tl.int32)
    else:
        best = tl.full((BLOCK_B, BLOCK_C), float("-inf"), ACC)
        arg = tl.zeros((BLOCK_B, BLOCK_C), tl.int32)
        for r in tl.static_range(SUB):
            rows = offs_c * SUB + r
            w_base = w_ptr + rows[:, None] * stride_wc + offs_d[None, :] * stride_wd
            cur = _logits_tile(x_base, w_base, rs, cs_ptr, rows, row_ok, col_ok, D, stride_xd, stride_wd,
                               HAS_NORM, UPCAST, ACC, DOT_PRECISION, BLOCK_B, BLOCK_C, BLOCK_D)
            better = cur > best  # strict: the first maximum wins
            best = tl.where(better, cur, best)
            arg = tl.where(better, r, arg)
    return best, arg


@triton.jit
def _margin_fwd_kernel(
    x_ptr,  # (B, D) raw embeddings
    w_ptr,  # (C SUB, D) raw class weights (SUB sub-centres per class, class-major)
    y_ptr,  # (B,) int64 labels in [0, C)
    rs_ptr,  # (B,) row factor: s / max(|x_i|, eps), or s
    cs_ptr,  # (C SUB,) column factor 1 / max(|W_j|, eps) (read only with HAS_NORM)
    m_ptr,  # (B, S) out: per-split max of the non-target logits
    l_ptr,  # (B, S) out: per-split sum of exp(logit - max)
    pv_ptr,  # (B, S) out: per-split max over all logits (read only with HAS_PRED)
    pi_ptr,  # (B, S) out: its first class index, int64 (HAS_PRED)
    e_ptr,  # (B, C) out: exp(logit - shift) per tile, 0 in the target column (only with STORE_EXP)
    sh_ptr,  # (B, T) out: each tile's shift, T = ceil(C / BLOCK_C) (only with STORE_EXP)
    B, C, D,  # sizes
    classes_per_split,  # classes per program along axis 1 (a multiple of BLOCK_C)
    stride_xb, stride_xd,  # x strides
    stride_wc, stride_wd,  # W strides
    stride_pb,  # row stride of the four (B, S) outputs (S)
    stride_eb, stride_sb,  # row strides of the two workspace outputs
    fthr,  # inter-class filtering: non-target logits above this leave the softmax (only with FILTER)
    HAS_NORM: tl.constexpr,  # fold in the column factor
    HAS_PRED: tl.constexpr,  # track the running argmax
    STORE_EXP: tl.constexpr,  # keep each tile's exponentials and shift (strategy="workspace")
    FILTER: tl.constexpr,  # inter-class filtering
    SUB: tl.constexpr,  # sub-centres per class: a class logit is the largest of its SUB
    UPCAST: tl.constexpr,  # convert tiles to ACC right after loading (bf16 under the interpreter)
    ACC: tl.constexpr,  # accumulation dtype (float32, or float64 for float64 inputs)
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision for float32 inputs
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_b = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = offs_b < B
    offs_d = tl.arange(0, BLOCK_D)
    y = tl.load(y_ptr + offs_b, mask=row_ok, other=-1)
    rs = tl.load(rs_ptr + offs_b, mask=row_ok, other=0.0).to(ACC)
    x_base = x_ptr + offs_b[:, None] * stride_xb + offs_d[None, :] * stride_xd

    m = tl.full((BLOCK_B,), float("-inf"), ACC)
    l = tl.zeros((BLOCK_B,), ACC)
    best = tl.full((BLOCK_B,), float("-inf"), ACC)
    best_idx = tl.zeros((BLOCK_B,), tl.int64)
    c_start = pid_s.to(tl.int64) * classes_per_split
    c_end = tl.minimum(c_start + classes_per_split, C)
    for c0 in range(c_start, c_end, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        col_ok = offs_c < c_end
        logits, _ = _class_logits_tile(x_base, w_ptr, offs_d, offs_c, rs, cs_ptr, row_ok, col_ok, D, stride_wc,
                                       stride_xd, stride_wd, HAS_NORM, SUB, UPCAST, ACC, DOT_PRECISION, BLOCK_B,
                                       BLOCK_C, BLOCK_D)
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        if HAS_PRED:
            tile_best = tl.max(logits, axis=1)
            # first column holding the maximum (two plain reductions: lighter than an argmax pair-reduction)
            tile_idx = tl.min(tl.where(logits == tile_best[:, None], tl.arange(0, BLOCK_C)[None, :], BLOCK_C), axis=1)
            better = tile_best > best  # strict: the first maximum wins across tiles
            best = tl.where(better, tile_best, best)
            best_idx = tl.where(better, tile_idx.to(tl.int64) + c0, best_idx)
        logits = tl.where(offs_c[None, :] == y[:, None], float("-inf"), logits)
        if FILTER:  # after the prediction, which sees every class; the target is -inf already
            logits = tl.where(logits > fthr, float("-inf"), logits)
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no non-target class yet
        e = tl.exp(logits - shift[:, None])
        l = l * tl.exp(m - shift) + tl.sum(e, axis=1)
        m = m_new
        if STORE_EXP:  # <= 1, so 16 bits keep its relative precision; the shift restores the scale later
            tl.store(e_ptr + offs_b[:, None] * stride_eb + offs_c[None, :], e.to(e_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & col_ok[None, :])
            tl.store(sh_ptr + offs_b * stride_sb + c0 // BLOCK_C, shift, mask=row_ok)

    out = offs_b * stride_pb + pid_s
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(l_ptr + out, l, mask=row_ok)
    if HAS_PRED:
        tl.store(pv_ptr + out, best, mask=row_ok)
        tl.store(pi_ptr + out, best_idx, mask=row_ok)


@triton.jit
def _margin_grad_kernel(
    x_ptr,  # (R, D) raw embeddings of the rows
    w_ptr,  # (Cc SUB, D) raw class weights of the chunk (SUB sub-centres per class, class-major)
    y_ptr,  # (R,) int64 labels (global class indices)
    rs_ptr,  # (R,) row factor of the logits (as in the forward)
    cs_ptr,  # (Cc SUB,) column factor 1 / max(|W_j|, eps) of the chunk's rows (read only with HAS_NORM)
    lse_ptr,  # (R,) log-sum-exp over all classes, margined target included
    coef_ptr,  # (R,) g_i * s: upstream gradient times scale
    e_ptr,  # (R, Cc) the forward's stored exponentials of the chunk (read only with FROM_EXP)
    sh_ptr,  # (R, T) their per-tile shifts, over all classes (FROM_EXP)
    g_ptr,  # (R, Cc SUB) out: G in the input dtype, per row of W (0 at sub-centres that are not a maximum)
    R, Cc, D,  # sizes
    label_offset,  # the chunk's first class: column j is class label_offset + j
    smooth,  # eps / C (label smoothing), or 0
    tile_c,  # classes per forward tile: class k's shift is sh[:, k // tile_c] (FROM_EXP)
    stride_xb, stride_xd, stride_wc, stride_wd, stride_eb, stride_sb, stride_gb,
    fthr,  # inter-class filtering threshold on the logits (only with FILTER)
    HAS_NORM: tl.constexpr, FROM_EXP: tl.constexpr, SCALE_G: tl.constexpr, FILTER: tl.constexpr,
    SUB: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_b = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = offs_b < R
    col_ok = offs_c < Cc
    tile_ok = row_ok[:, None] & col_ok[None, :]
    lse = tl.load(lse_ptr + offs_b, mask=row_ok, other=0.0).to(ACC)
    if FROM_EXP:  # filtered and target columns hold 0 there (sub-centres never come this way)
        sub = tl.zeros((BLOCK_B, BLOCK_C), tl.int32)
        e = tl.load(e_ptr + offs_b[:, None] * stride_eb + offs_c[None, :], mask=tile_ok, other=0.0).to(ACC)
        tile = (label_offset + offs_c) // tile_c
        sh = tl.load(sh_ptr + offs_b[:, None] * stride_sb + tile[None, :], mask=tile_ok, other=0.0).to(ACC)
        p = e * tl.exp(sh - lse[:, None])
    else:
        offs_d = tl.arange(0, BLOCK_D)
        rs = tl.load(rs_ptr + offs_b, mask=row_ok, other=0.0).to(ACC)
        x_base = x_ptr + offs_b[:, None] * stride_xb + offs_d[None, :] * stride_xd
        logits, sub = _class_logits_tile(x_base, w_ptr, offs_d, offs_c, rs, cs_ptr, row_ok, col_ok, D, stride_wc,
                                         stride_xd, stride_wd, HAS_NORM, SUB, UPCAST, ACC, DOT_PRECISION, BLOCK_B,
                                         BLOCK_C, BLOCK_D)
        p = tl.exp(logits - lse[:, None])
        if FILTER:  # filtered columns: p = 0 (and smooth = 0: filtering excludes label smoothing)
            p = tl.where(logits > fthr, 0.0, p)
    y = tl.load(y_ptr + offs_b, mask=row_ok, other=-1) - label_offset
    coef = tl.load(coef_ptr + offs_b, mask=row_ok, other=0.0).to(ACC)
    g = p - smooth
    if SCALE_G:  # fold 1 / |W_j| into G (else the caller multiplies by normalized W rows)
        if SUB == 1:
            g = g * tl.load(cs_ptr + offs_c, mask=col_ok, other=0.0).to(ACC)[None, :]
        else:  # the norm of the sub-centre each class logit came from
            g = g * tl.load(cs_ptr + offs_c[None, :] * SUB + sub, mask=tile_ok, other=0.0).to(ACC)
    keep = tile_ok & (offs_c[None, :] != y[:, None])
    g = tl.where(keep, g * coef[:, None], 0.0)
    if SUB == 1:
        tl.store(g_ptr + offs_b[:, None] * stride_gb + offs_c[None, :], g.to(g_ptr.dtype.element_ty), mask=tile_ok)
    else:  # G per row of W: the class's value at its maximal sub-centre, 0 at the others
        for r in tl.static_range(SUB):
            tl.store(g_ptr + offs_b[:, None] * stride_gb + offs_c[None, :] * SUB + r,
                     tl.where(sub == r, g, 0.0).to(g_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _finish_w_kernel(
    dd_ptr,  # (Cc, D) dD_j = inv_w_j * dwh_j (dwh_j itself with HAS_PRE), accumulation dtype
    w_ptr,  # (Cc, D) raw class weights
    coef_ptr,  # (Cc,) inv_w_j^2 (inv_w_j^3 with HAS_PRE), 0 where the norm was clamped
    pre_ptr,  # (Cc,) inv_w_j, a factor on dD_j (read only with HAS_PRE)
    out_ptr,  # (Cc, D) out: dW_j = pre_j dD_j - W_j coef_j (W_j . dD_j), any float dtype (may alias dd_ptr)
    Cc, D, stride_dd, stride_w, stride_wd, stride_out,  # dd and out have unit feature strides, W any
    HAS_PRE: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The normalization backward of ``W``, fused: one read of each operand for the row dots, one more
    for the update (in cache when rows are short), one write in the output dtype."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < Cc
    offs_d = tl.arange(0, BLOCK_D)
    dot = tl.zeros((BLOCK_R,), ACC)
    for d0 in range(0, D, BLOCK_D):
        ok = row_ok[:, None] & (d0 + offs_d < D)[None, :]
        dd = tl.load(dd_ptr + rows[:, None] * stride_dd + (d0 + offs_d)[None, :], mask=ok, other=0.0).to(ACC)
        w = tl.load(w_ptr + rows[:, None] * stride_w + (d0 + offs_d)[None, :] * stride_wd, mask=ok,
                    other=0.0).to(ACC)
        dot += tl.sum(dd * w, axis=1)
    f = dot * tl.load(coef_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    if HAS_PRE:
        pre = tl.load(pre_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    for d0 in range(0, D, BLOCK_D):
        ok = row_ok[:, None] & (d0 + offs_d < D)[None, :]
        dd = tl.load(dd_ptr + rows[:, None] * stride_dd + (d0 + offs_d)[None, :], mask=ok, other=0.0).to(ACC)
        w = tl.load(w_ptr + rows[:, None] * stride_w + (d0 + offs_d)[None, :] * stride_wd, mask=ok,
                    other=0.0).to(ACC)
        if HAS_PRE:
            dd = dd * pre[:, None]
        out = dd - w * f[:, None]
        tl.store(out_ptr + rows[:, None] * stride_out + (d0 + offs_d)[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=ok)
