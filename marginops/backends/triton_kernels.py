"""The Triton kernels of the ``"triton"`` backend (device code only).

:mod:`marginops.backends.triton_margin` launches them (checks, grids,
descriptors) and pairs them with cuBLAS; their launch configs are in
:mod:`marginops.backends.triton_config`; ``python -m marginops.aot``
compiles every one for sm_80 and sm_90 and reads registers, spills, shared
memory and the instructions in the PTX.

Logits kernels (one family: they share :func:`_logits_tile`):

* ``_margin_fwd_kernel``: per (row block, class split), logits tiles from raw
  ``x``/``W`` with the row factor ``s log2(e) / |x_i|`` and the column factor
  ``1 / |W_j|`` folded in, so the online max / sum run on ``exp2``; the target
  column excluded; a running argmax; optionally each tile's exponentials and
  shift stored (the workspace strategy).
* ``_margin_grad_kernel``: per (row block, class tile) of a chunk, the logits
  recomputed and ``G`` written (the recompute strategy).
* ``_margin_bwd_dx_kernel``: the recompute strategy's backward for narrow
  embeddings (D <= 256): per (row block, class split) the logits recomputed,
  ``G`` written for the ``dW`` product and ``dX += G W`` formed in the same
  pass from the same W tile (its accumulator stays on chip).

Streaming kernels: ``_grad_from_exp_kernel`` turns stored exponentials into
``G`` in place; ``_finish_w_kernel`` is the normalization backward of ``W``;
``_scale_rows_kernel`` writes normalized rows of ``W`` (float16's ``dX``
operand). ``_masked_mm_kernel`` is the block-sparse product of gradient
filtering (tiles of ``G`` flagged negligible are skipped).

On sm_90 the logits kernels load through the tensor memory accelerator
(host-side tensor descriptors, ``USE_TMA``) and multiply with ``wgmma``;
elsewhere (sm_80, unaligned strides, sub-centres' strided rows) they load
through pointers. No kernel uses atomics: every output element is written
by one program, in a fixed order.

Import this module only after ``TRITON_INTERPRET`` has its final value (the
backend imports it lazily).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _logits_tile(
    x_desc, w_desc,  # TMA descriptors of x (BLOCK_B x BLOCK_D blocks) and W (BLOCK_C x BLOCK_D), with USE_TMA
    x_ptr, w_ptr,  # the same tensors as pointers (without USE_TMA)
    row0, wrow0,  # first row of x and of W of the tile
    rows_x, rows_w,  # (BLOCK_B,) and (BLOCK_C,) int64 row indices, clamped into range (pointer loads)
    D, stride_xb, stride_xd, stride_wc, stride_wd,
    USE_TMA: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``x_i . W_j`` for one (rows x W rows) tile, accumulated over D in ``ACC``."""
    acc = tl.zeros((BLOCK_B, BLOCK_C), ACC)
    if USE_TMA:  # out-of-range rows and features arrive as zeros
        for d0 in range(0, D, BLOCK_D):
            xt = x_desc.load([row0, d0])
            wt = w_desc.load([wrow0, d0])
            if UPCAST:
                xt = xt.to(ACC)
                wt = wt.to(ACC)
            acc = tl.dot(xt, wt.T, acc, input_precision=DOT_PRECISION, out_dtype=ACC)
    else:
        offs_d = tl.arange(0, BLOCK_D)
        x_ptrs = x_ptr + rows_x[:, None] * stride_xb + offs_d[None, :] * stride_xd
        w_ptrs = w_ptr + rows_w[:, None] * stride_wc + offs_d[None, :] * stride_wd
        for d0 in range(0, D, BLOCK_D):
            if EVEN_D:  # rows are clamped into range: no mask at all
                xt = tl.load(x_ptrs)
                wt = tl.load(w_ptrs)
            else:
                d_ok = offs_d < D - d0
                xt = tl.load(x_ptrs, mask=d_ok[None, :], other=0.0)
                wt = tl.load(w_ptrs, mask=d_ok[None, :], other=0.0)
            if UPCAST:
                xt = xt.to(ACC)
                wt = wt.to(ACC)
            acc = tl.dot(xt, tl.trans(wt), acc, input_precision=DOT_PRECISION, out_dtype=ACC)
            x_ptrs += BLOCK_D * stride_xd
            w_ptrs += BLOCK_D * stride_wd
    return acc


@triton.jit
def _class_logits(
    x_desc, w_desc, x_ptr, w_ptr, row0, c0, rows_x, offs_c, rs, cs_ptr, col_ok, n_wrows,
    D, stride_xb, stride_xd, stride_wc, stride_wd,
    HAS_NORM: tl.constexpr, SUB: tl.constexpr, USE_TMA: tl.constexpr, EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Scaled class logits of one tile (base-2 units when ``rs`` carries ``log2 e``): with ``SUB``
    sub-centres per class (rows ``c SUB + r`` of ``W``) the largest of the ``SUB``, and which ``r``
    gave it (the first maximum); ``r = 0`` for ``SUB = 1``."""
    if SUB == 1:
        rows_w = tl.minimum(offs_c, n_wrows - 1).to(tl.int64)
        acc = _logits_tile(x_desc, w_desc, x_ptr, w_ptr, row0, c0, rows_x, rows_w, D, stride_xb, stride_xd,
                           stride_wc, stride_wd, USE_TMA, EVEN_D, UPCAST, ACC, DOT_PRECISION, BLOCK_B, BLOCK_C,
                           BLOCK_D)
        best = acc * rs[:, None]
        if HAS_NORM:
            best = best * tl.load(cs_ptr + offs_c, mask=col_ok, other=0.0).to(ACC)[None, :]
        arg = tl.zeros((BLOCK_B, BLOCK_C), tl.int32)
    else:
        best = tl.full((BLOCK_B, BLOCK_C), float("-inf"), ACC)
        arg = tl.zeros((BLOCK_B, BLOCK_C), tl.int32)
        for r in tl.static_range(SUB):
            wrows = offs_c * SUB + r
            rows_w = tl.minimum(wrows, n_wrows - 1).to(tl.int64)
            acc = _logits_tile(x_desc, w_desc, x_ptr, w_ptr, row0, c0, rows_x, rows_w, D, stride_xb,
                               stride_xd, stride_wc, stride_wd, False, EVEN_D, UPCAST, ACC, DOT_PRECISION,
                               BLOCK_B, BLOCK_C, BLOCK_D)
            cur = acc * rs[:, None]
            if HAS_NORM:
                cur = cur * tl.load(cs_ptr + wrows, mask=col_ok, other=0.0).to(ACC)[None, :]
            better = cur > best  # strict: the first maximum wins
            best = tl.where(better, cur, best)
            arg = tl.where(better, r, arg)
    return best, arg


@triton.jit
def _g_tile(p, keep, coef, cs, smooth):
    """``G = coef_i (p - smooth) cs`` where ``keep`` (off the target, in range), else 0: the gradient of the
    tile's logits for upstream row factors ``coef`` (``cs``: ``1 / |W_j|`` folded in, or 1)."""
    return tl.where(keep, (p - smooth) * cs * coef[:, None], 0.0)


@triton.jit
def _written(p, keep, gthr, flag_ptr, GFILTER: tl.constexpr):
    """Whether a tile of ``G`` is written: always, or with ``GFILTER`` only where one of its probabilities
    (among ``keep``) reaches ``gthr``; that decision is stored at ``flag_ptr`` for the masked products."""
    if GFILTER:
        write = tl.max(tl.max(tl.where(keep, p, 0.0), axis=1), axis=0) >= gthr
        tl.store(flag_ptr, write.to(tl.int8))
    else:
        write = tl.full((), 1, tl.int1)
    return write


@triton.jit
def _margin_fwd_kernel(
    x_desc, w_desc,  # TMA descriptors of x and W (USE_TMA), else x and W again
    x_ptr,  # (B, D) raw embeddings
    w_ptr,  # (C SUB, D) raw class weights (SUB sub-centres per class, class-major)
    y_ptr,  # (B,) int64 labels in [0, C) (any other value: no target in this range)
    rs_ptr,  # (B,) row factor: s_i log2(e) / max(|x_i|, eps), or s_i log2(e)
    cs_ptr,  # (C SUB,) column factor 1 / max(|W_j|, eps) (read only with HAS_NORM)
    ft_ptr,  # (B,) per-row filtering threshold on the base-2 logits (read only with FILTER)
    m_ptr,  # (B, S) out: per-split max of the non-target base-2 logits
    l_ptr,  # (B, S) out: per-split sum of exp2(logit - max)
    pv_ptr,  # (B, S) out: per-split max over all base-2 logits (read only with HAS_PRED)
    pi_ptr,  # (B, S) out: its first class index, int64 (HAS_PRED)
    e_ptr,  # (B, >= C) out: exp2(logit - shift) per tile, 0 in the target column (only with STORE_EXP)
    sh_ptr,  # (B, T) out: each tile's shift, T = ceil(C / BLOCK_C) (only with STORE_EXP)
    B, C, D,  # sizes
    classes_per_split,  # classes per program along axis 1 (a multiple of BLOCK_C)
    stride_xb, stride_xd,  # x strides
    stride_wc, stride_wd,  # W strides
    stride_pb,  # row stride of the four (B, S) outputs (S)
    stride_eb, stride_sb,  # row strides of the two workspace outputs
    HAS_NORM: tl.constexpr,  # fold in the column factor
    HAS_PRED: tl.constexpr,  # track the running argmax
    STORE_EXP: tl.constexpr,  # keep each tile's exponentials and shift (the workspace strategy)
    FILTER: tl.constexpr,  # inter-class filtering
    SUB: tl.constexpr,  # sub-centres per class: a class logit is the largest of its SUB
    USE_TMA: tl.constexpr,  # load tiles through descriptors (sm_90, SUB = 1)
    EVEN_D: tl.constexpr,  # D is a multiple of BLOCK_D (pointer loads without masks)
    UPCAST: tl.constexpr,  # convert tiles to ACC right after loading (bf16 under the interpreter)
    ACC: tl.constexpr,  # accumulation dtype (float32, or float64 for float64 inputs)
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision for float32 inputs
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    row0 = pid_b * BLOCK_B
    offs_b = row0.to(tl.int64) + tl.arange(0, BLOCK_B)
    row_ok = offs_b < B
    rows_x = tl.minimum(offs_b, B - 1)
    y = tl.load(y_ptr + offs_b, mask=row_ok, other=-1)
    y = tl.where((y >= 0) & (y < C), y, -1).to(tl.int32)
    rs = tl.load(rs_ptr + offs_b, mask=row_ok, other=0.0).to(ACC)
    if FILTER:
        thr = tl.load(ft_ptr + offs_b, mask=row_ok, other=0.0).to(ACC)

    m = tl.full((BLOCK_B,), float("-inf"), ACC)
    l = tl.zeros((BLOCK_B,), ACC)
    best = tl.full((BLOCK_B,), float("-inf"), ACC)
    best_idx = tl.zeros((BLOCK_B,), tl.int32)
    c_start = pid_s * classes_per_split
    c_end = tl.minimum(c_start + classes_per_split, C)
    for c0 in range(c_start, c_end, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        col_ok = offs_c < c_end
        logits, _ = _class_logits(x_desc, w_desc, x_ptr, w_ptr, row0, c0, rows_x, offs_c, rs, cs_ptr, col_ok,
                                  C * SUB, D, stride_xb, stride_xd, stride_wc, stride_wd, HAS_NORM, SUB, USE_TMA,
                                  EVEN_D, UPCAST, ACC, DOT_PRECISION, BLOCK_B, BLOCK_C, BLOCK_D)
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        if HAS_PRED:
            tile_best = tl.max(logits, axis=1)
            # first column holding the maximum (two plain reductions: lighter than an argmax pair-reduction)
            tile_idx = tl.min(tl.where(logits == tile_best[:, None], tl.arange(0, BLOCK_C)[None, :], BLOCK_C), axis=1)
            better = tile_best > best  # strict: the first maximum wins across tiles
            best = tl.where(better, tile_best, best)
            best_idx = tl.where(better, tile_idx + c0, best_idx)
        logits = tl.where(offs_c[None, :] == y[:, None], float("-inf"), logits)
        if FILTER:  # after the prediction, which sees every class; the target is -inf already
            logits = tl.where(logits > thr[:, None], float("-inf"), logits)
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no non-target class yet
        e = tl.exp2(logits - shift[:, None])
        l = l * tl.exp2(m - shift) + tl.sum(e, axis=1)
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
        tl.store(pi_ptr + out, best_idx.to(tl.int64), mask=row_ok)


@triton.jit
def _margin_grad_kernel(
    x_desc, w_desc,  # TMA descriptors of x and of the chunk's W rows (USE_TMA), else x and W again
    x_ptr,  # (R, D) raw embeddings of the rows
    w_ptr,  # (Cc SUB, D) raw class weights of the chunk (SUB sub-centres per class, class-major)
    y_ptr,  # (R,) int64 labels (global class indices)
    rs_ptr,  # (R,) row factor of the base-2 logits (as in the forward)
    cs_ptr,  # (Cc SUB,) column factor 1 / max(|W_j|, eps) of the chunk's rows (read only with HAS_NORM)
    ft_ptr,  # (R,) per-row filtering threshold on the base-2 logits (FILTER)
    lse_ptr,  # (R,) log-sum-exp over all classes, margined target included (natural log)
    coef_ptr,  # (R,) g_i s_i: upstream gradient times the row's scale
    g_ptr,  # (R, Cc SUB) out: G in the input dtype, per row of W (0 at sub-centres that are not a maximum)
    flag_ptr,  # (ceil(R / BLOCK_B), ceil(Cc / BLOCK_C)) out, int8: 1 where a tile has p >= gthr (GFILTER)
    R, Cc, D,  # sizes
    label_offset,  # the chunk's first class: column j is class label_offset + j
    smooth,  # eps / C (label smoothing), or 0
    gthr,  # gradient filtering: a tile whose probabilities all lie below it is not written (GFILTER)
    stride_xb, stride_xd, stride_wc, stride_wd, stride_gb, stride_fb,
    HAS_NORM: tl.constexpr, SCALE_G: tl.constexpr, FILTER: tl.constexpr, GFILTER: tl.constexpr,
    SUB: tl.constexpr, USE_TMA: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    row0 = pid_b * BLOCK_B
    c0 = pid_c * BLOCK_C
    offs_b = row0.to(tl.int64) + tl.arange(0, BLOCK_B)
    offs_c = c0 + tl.arange(0, BLOCK_C)
    row_ok = offs_b < R
    col_ok = offs_c < Cc
    tile_ok = row_ok[:, None] & col_ok[None, :]
    rs = tl.load(rs_ptr + offs_b, mask=row_ok, other=0.0).to(ACC)
    logits, sub = _class_logits(x_desc, w_desc, x_ptr, w_ptr, row0, c0, tl.minimum(offs_b, R - 1), offs_c, rs,
                                cs_ptr, col_ok, Cc * SUB, D, stride_xb, stride_xd, stride_wc, stride_wd, HAS_NORM,
                                SUB, USE_TMA, EVEN_D, UPCAST, ACC, DOT_PRECISION, BLOCK_B, BLOCK_C, BLOCK_D)
    lse2 = tl.load(lse_ptr + offs_b, mask=row_ok, other=0.0).to(ACC) * 1.4426950408889634
    p = tl.exp2(logits - lse2[:, None])
    if FILTER:  # filtered columns: p = 0 (and smooth = 0: filtering excludes label smoothing)
        thr = tl.load(ft_ptr + offs_b, mask=row_ok, other=0.0).to(ACC)
        p = tl.where(logits > thr[:, None], 0.0, p)
    y = tl.load(y_ptr + offs_b, mask=row_ok, other=-1) - label_offset
    y = tl.where((y >= 0) & (y < Cc), y, -1).to(tl.int32)
    coef = tl.load(coef_ptr + offs_b, mask=row_ok, other=0.0).to(ACC)
    keep = tile_ok & (offs_c[None, :] != y[:, None])
    cs = 1.0
    if SCALE_G:  # fold 1 / |W_j| into G (else the caller multiplies by normalized W rows)
        if SUB == 1:
            cs = tl.load(cs_ptr + offs_c, mask=col_ok, other=0.0).to(ACC)[None, :]
        else:  # the norm of the sub-centre each class logit came from
            cs = tl.load(cs_ptr + offs_c[None, :] * SUB + sub, mask=tile_ok, other=0.0).to(ACC)
    g = _g_tile(p, keep, coef, cs, smooth)
    if _written(p, keep, gthr, flag_ptr + pid_b * stride_fb + pid_c, GFILTER):
        if SUB == 1:
            tl.store(g_ptr + offs_b[:, None] * stride_gb + offs_c[None, :], g.to(g_ptr.dtype.element_ty),
                     mask=tile_ok)
        else:  # G per row of W: the class's value at its maximal sub-centre, 0 at the others
            for r in tl.static_range(SUB):
                tl.store(g_ptr + offs_b[:, None] * stride_gb + offs_c[None, :] * SUB + r,
                         tl.where(sub == r, g, 0.0).to(g_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _margin_bwd_dx_kernel(
    x_ptr,  # (R, D) raw embeddings of the rows
    w_ptr,  # (Cc, D) raw class weights of the chunk
    y_ptr,  # (R,) int64 labels (global class indices)
    rs_ptr,  # (R,) row factor of the base-2 logits
    cs_ptr,  # (Cc,) column factor 1 / max(|W_j|, eps) (read only with HAS_NORM)
    ft_ptr,  # (R,) per-row filtering threshold on the base-2 logits (FILTER)
    lse_ptr,  # (R,) log-sum-exp over all classes (natural log)
    coef_ptr,  # (R,) g_i s_i
    g_ptr,  # (R, Cc) out: G in the input dtype (the dW product's operand)
    dx_ptr,  # (S, R, D) out: each class split's G W, accumulation dtype (summed over S in a fixed order)
    R, Cc, D,
    label_offset, smooth,
    classes_per_split,  # classes per program along axis 1 (a multiple of BLOCK_C)
    stride_xb, stride_xd, stride_wc, stride_wd, stride_gb, stride_ds, stride_db,
    HAS_NORM: tl.constexpr, SCALE_G: tl.constexpr, FILTER: tl.constexpr, UPCAST: tl.constexpr,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, D_PAD: tl.constexpr,
):
    """The recompute backward with one product in the same pass, for D <= D_PAD (narrow embeddings): per
    (row block, class split), each class tile's W rows are loaded once, whole (all D), and serve both the
    logits (``x W^T``) and ``dX += G W``; ``G`` is also written for cuBLAS's ``G^T xh``. The ``dX``
    accumulator (BLOCK_B x D_PAD) stays on chip across the split's class tiles: no atomics, one partial
    per split."""
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_b = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_b < R
    d_ok = offs_d < D
    xt = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_d[None, :] * stride_xd,
                 mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        xt = xt.to(ACC)
    rs = tl.load(rs_ptr + offs_b, mask=row_ok, other=0.0).to(ACC)
    lse2 = tl.load(lse_ptr + offs_b, mask=row_ok, other=0.0).to(ACC) * 1.4426950408889634
    coef = tl.load(coef_ptr + offs_b, mask=row_ok, other=0.0).to(ACC)
    y = tl.load(y_ptr + offs_b, mask=row_ok, other=-1) - label_offset
    y = tl.where((y >= 0) & (y < Cc), y, -1).to(tl.int32)
    if FILTER:
        thr = tl.load(ft_ptr + offs_b, mask=row_ok, other=0.0).to(ACC)
    acc_dx = tl.zeros((BLOCK_B, D_PAD), ACC)
    c_start = pid_s * classes_per_split
    c_end = tl.minimum(c_start + classes_per_split, Cc)
    for c0 in range(c_start, c_end, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        col_ok = offs_c < c_end
        wt = tl.load(w_ptr + offs_c.to(tl.int64)[:, None] * stride_wc + offs_d[None, :] * stride_wd,
                     mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            wt = wt.to(ACC)
        logits = tl.dot(xt, tl.trans(wt), input_precision=DOT_PRECISION, out_dtype=ACC) * rs[:, None]
        if HAS_NORM:
            cs = tl.load(cs_ptr + offs_c, mask=col_ok, other=0.0).to(ACC)
            logits = logits * cs[None, :]
        p = tl.exp2(logits - lse2[:, None])
        if FILTER:
            p = tl.where(logits > thr[:, None], 0.0, p)
        keep = row_ok[:, None] & col_ok[None, :] & (offs_c[None, :] != y[:, None])
        cs_g = 1.0
        if SCALE_G:
            cs_g = cs[None, :]
        g = _g_tile(p, keep, coef, cs_g, smooth)
        gq = g.to(g_ptr.dtype.element_ty)
        tl.store(g_ptr + offs_b[:, None] * stride_gb + offs_c[None, :], gq, mask=row_ok[:, None] & col_ok[None, :])
        if UPCAST:
            gq = gq.to(ACC)
        if HAS_NORM and not SCALE_G:  # G without 1 / |W_j| (float16): multiply the normalized rows instead
            wt = (wt.to(ACC) * cs[:, None]).to(wt.dtype)
        acc_dx = tl.dot(gq, wt, acc_dx, input_precision=DOT_PRECISION, out_dtype=ACC)  # the product, same pass
    tl.store(dx_ptr + pid_s * stride_ds + offs_b[:, None] * stride_db + offs_d[None, :], acc_dx,
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _grad_from_exp_kernel(
    e_ptr,  # (R, >= C) in: the forward's exp2(logit - shift) (0 in target and filtered columns); out: G
    sh_ptr,  # (R, T) each forward tile's shift (base 2)
    y_ptr,  # (R,) int64 labels
    cs_ptr,  # (C,) 1 / max(|W_j|, eps) (read only with SCALE_G)
    lse_ptr,  # (R,) log-sum-exp over all classes (natural log)
    coef_ptr,  # (R,) g_i s_i
    flag_ptr,  # (ceil(R / BLOCK_R), ceil(C / BLOCK_C)) out, int8 (GFILTER)
    R, C,
    smooth, gthr,
    tile_c,  # classes per forward tile: class j's shift is sh[:, j // tile_c]
    stride_eb, stride_sb, stride_fb,
    SCALE_G: tl.constexpr, GFILTER: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``G_ij = coef_i (p_ij - smooth) [/ |W_j|]`` off the target, ``p = e 2^(shift - lse2)``, written over
    the exponentials (same dtype, same place): one read and one write per element."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = offs_r < R
    col_ok = offs_c < C
    ok = row_ok[:, None] & col_ok[None, :]
    ptrs = e_ptr + offs_r[:, None] * stride_eb + offs_c[None, :]
    e = tl.load(ptrs, mask=ok, other=0.0).to(ACC)
    sh = tl.load(sh_ptr + offs_r[:, None] * stride_sb + (offs_c // tile_c)[None, :], mask=ok, other=0.0).to(ACC)
    lse2 = tl.load(lse_ptr + offs_r, mask=row_ok, other=0.0).to(ACC) * 1.4426950408889634
    p = e * tl.exp2(sh - lse2[:, None])
    y = tl.load(y_ptr + offs_r, mask=row_ok, other=-1)
    keep = ok & (offs_c[None, :] != y[:, None])
    coef = tl.load(coef_ptr + offs_r, mask=row_ok, other=0.0).to(ACC)
    cs = 1.0
    if SCALE_G:
        cs = tl.load(cs_ptr + offs_c, mask=col_ok, other=0.0).to(ACC)[None, :]
    g = _g_tile(p, keep, coef, cs, smooth)
    if _written(p, keep, gthr, flag_ptr + pid_r * stride_fb + pid_c, GFILTER):
        tl.store(ptrs, g.to(e_ptr.dtype.element_ty), mask=ok)


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


@triton.jit
def _scale_rows_kernel(
    w_ptr,  # (Cc, D) raw rows
    s_ptr,  # (Cc,) factor per row (accumulation dtype)
    out_ptr,  # (Cc, D) out: s_j W_j in out's dtype
    Cc, D, stride_w, stride_wd, stride_out,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < Cc
    offs_d = tl.arange(0, BLOCK_D)
    s = tl.load(s_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    for d0 in range(0, D, BLOCK_D):
        ok = row_ok[:, None] & (d0 + offs_d < D)[None, :]
        w = tl.load(w_ptr + rows[:, None] * stride_w + (d0 + offs_d)[None, :] * stride_wd, mask=ok,
                    other=0.0).to(ACC)
        tl.store(out_ptr + rows[:, None] * stride_out + (d0 + offs_d)[None, :],
                 (w * s[:, None]).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _masked_mm_kernel(
    a_ptr,  # (M, K) left operand (any strides: G, or G transposed)
    b_ptr,  # (K, N) right operand
    out_ptr,  # (M, N) out, accumulation dtype, unit column stride
    flag_ptr,  # int8 tile flags: tile (m // MASK_M, k // MASK_K) takes part where it is nonzero
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_om,
    stride_fm, stride_fk,  # flag strides per M tile and per K tile
    ACCUMULATE: tl.constexpr,  # out += (else out =)
    UPCAST: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    MASK_M: tl.constexpr,  # rows of a flag tile (a multiple of BLOCK_M)
    MASK_K: tl.constexpr,  # K extent of a flag tile (a multiple of BLOCK_K)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out = A @ B`` over the K tiles whose flag is set, in a fixed order (no atomics): the products of
    gradient filtering, which skip the tiles of ``G`` the gradient kernels flagged negligible."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    flags = flag_ptr + ((pid_m * BLOCK_M) // MASK_M) * stride_fm
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for kt in range(0, tl.cdiv(K, MASK_K)):
        if tl.load(flags + kt * stride_fk) != 0:
            for ks in range(0, MASK_K, BLOCK_K):
                k = kt * MASK_K + ks + offs_k
                k_ok = k < K
                a = tl.load(a_ptr + offs_m[:, None] * stride_am + k[None, :].to(tl.int64) * stride_ak,
                            mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_ptr + k[:, None].to(tl.int64) * stride_bk + offs_n[None, :] * stride_bn,
                            mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                if UPCAST:
                    a = a.to(ACC)
                    b = b.to(ACC)
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=ACC)
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out, mask=ok, other=0.0)
    tl.store(out, acc, mask=ok)
