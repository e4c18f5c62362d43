"""Triton backend: margin softmax cross-entropy fused over classes, no ``B x C`` tensor anywhere.

Reads top to bottom: configs, the two kernels, their launchers (check,
allocate, launch; no autograd), then the autograd Function and the backend
entry point :func:`margin_softmax` (contract: :mod:`marginops.backends.common`).

* ``_margin_fwd_kernel``: one program per (row block, class split). Each class
  tile of logits is a ``tl.dot`` of *raw* ``x`` and ``W`` tiles, scaled by
  ``s / |x_i|`` per row and ``1 / |W_j|`` per column (no normalized copy of
  ``W`` is written); the target column is set to ``-inf`` before the online
  max / sum-exp, and a running argmax of the unmasked tile gives the
  prediction. Splits write partial ``(max, sum)`` pairs that the launcher
  combines into the non-target LSE ``N``.
* ``_margin_bwd_kernel``: recomputes each tile, forms
  ``P_ij = exp(s cos_ij - LSE_i) / |W_j|`` off-target and accumulates
  ``dxh += (g s) * P @ W`` and ``dD += P.T @ ((g s / |x|) * x)`` in the
  accumulation dtype, with atomics, or with ``deterministic=True`` one
  program per class tile that owns its rows of ``dD`` (no atomics on dW;
  dX keeps its atomics, so it is not bitwise reproducible).

Everything of size ``B``, ``D`` or ``C x D`` around the kernels (norms, the
label-smoothing rank-1 terms, the loss, the normalization backward) runs in
PyTorch, with the same formulas as :mod:`marginops.backends.torch_chunked`.

``opts.chunk_size`` means classes per program here (the class split; rounded
up to whole tiles); by default the classes are split so that the GPU stays
full when ``B`` is small. ``opts.memory_budget`` bounds the chunks of the
PyTorch-side ``C x D`` passes.

On CPU the kernels run only under the Triton interpreter: ``TRITON_INTERPRET=1``
must be set before triton is first imported (this module is imported lazily,
on the first call of ``backend="triton"``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import FusedOptions, GradHandoff, forward_outputs, normalize_backward

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
BWD_CONFIGS = {
    torch.bfloat16: KernelConfig(64, 128, 32, 8, 2),
    torch.float16: KernelConfig(64, 128, 32, 8, 2),
    torch.float32: KernelConfig(32, 64, 16, 4, 2),
    torch.float64: KernelConfig(32, 32, 8, 4, 1),
}
#: Forward and backward each aim for this many programs per SM (class splits fill the chip when B is small).
PROGRAMS_PER_SM = 2
SUPPORTED_DTYPES = tuple(FWD_CONFIGS)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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
def _margin_fwd_kernel(
    x_ptr,  # (B, D) raw embeddings
    w_ptr,  # (C, D) raw class weights
    y_ptr,  # (B,) int64 labels in [0, C)
    rs_ptr,  # (B,) row factor: s / max(|x_i|, eps), or s
    cs_ptr,  # (C,) column factor 1 / max(|W_j|, eps) (read only with HAS_NORM)
    m_ptr,  # (B, S) out: per-split max of the non-target logits
    l_ptr,  # (B, S) out: per-split sum of exp(logit - max)
    pv_ptr,  # (B, S) out: per-split max over all logits (read only with HAS_PRED)
    pi_ptr,  # (B, S) out: its first class index, int64 (HAS_PRED)
    B, C, D,  # sizes
    classes_per_split,  # classes per program along axis 1 (a multiple of BLOCK_C)
    stride_xb, stride_xd,  # x strides
    stride_wc, stride_wd,  # W strides
    stride_pb,  # row stride of the four (B, S) outputs (S)
    HAS_NORM: tl.constexpr,  # fold in the column factor
    HAS_PRED: tl.constexpr,  # track the running argmax
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
        w_base = w_ptr + offs_c[:, None] * stride_wc + offs_d[None, :] * stride_wd
        logits = _logits_tile(x_base, w_base, rs, cs_ptr, offs_c, row_ok, col_ok, D, stride_xd, stride_wd,
                              HAS_NORM, UPCAST, ACC, DOT_PRECISION, BLOCK_B, BLOCK_C, BLOCK_D)
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        if HAS_PRED:
            tile_best = tl.max(logits, axis=1)
            # first column holding the maximum (two plain reductions: lighter than an argmax pair-reduction)
            tile_idx = tl.min(tl.where(logits == tile_best[:, None], tl.arange(0, BLOCK_C)[None, :], BLOCK_C), axis=1)
            better = tile_best > best  # strict: the first maximum wins across tiles
            best = tl.where(better, tile_best, best)
            best_idx = tl.where(better, tile_idx.to(tl.int64) + c0, best_idx)
        logits = tl.where(offs_c[None, :] == y[:, None], float("-inf"), logits)
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no non-target class yet
        l = l * tl.exp(m - shift) + tl.sum(tl.exp(logits - shift[:, None]), axis=1)
        m = m_new

    out = offs_b * stride_pb + pid_s
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(l_ptr + out, l, mask=row_ok)
    if HAS_PRED:
        tl.store(pv_ptr + out, best, mask=row_ok)
        tl.store(pi_ptr + out, best_idx, mask=row_ok)


@triton.jit
def _margin_bwd_kernel(
    x_ptr,  # (B, D) raw embeddings
    w_ptr,  # (C, D) raw class weights
    y_ptr,  # (B,) int64 labels in [0, C)
    rs_ptr,  # (B,) row factor of the logits: s / max(|x_i|, eps), or s
    cs_ptr,  # (C,) column factor 1 / max(|W_j|, eps) (HAS_NORM)
    lse_ptr,  # (B,) LSE_i over all classes, margined target included
    gx_ptr,  # (B,) g_i * s: row factor of the dX product
    gw_ptr,  # (B,) g_i * s / max(|x_i|, eps) (or g_i * s): row factor of x in the dW product
    dx_ptr,  # (B, D) out, ACC, zero-initialized: dL/dxh from the non-target classes (HAS_DX)
    dw_ptr,  # (C, D) out, ACC, zero-initialized: dD_j = dL/dwh_j / max(|W_j|, eps) (HAS_DW)
    B, C, D,  # sizes
    rows_per_program, classes_per_program,  # the (rows x classes) rectangle of one program
    stride_xb, stride_xd,  # x strides
    stride_wc, stride_wd,  # W strides
    stride_dxb, stride_dxd,  # dx strides
    stride_dwc, stride_dwd,  # dw strides
    HAS_NORM: tl.constexpr,  # fold in the column factor
    HAS_DX: tl.constexpr,  # accumulate dx (atomically)
    HAS_DW: tl.constexpr,  # accumulate dw
    DW_ATOMIC: tl.constexpr,  # atomics on dw; False: this program owns its classes' rows of dw
    UPCAST: tl.constexpr,  # convert tiles to ACC right after loading (bf16 under the interpreter)
    ACC: tl.constexpr,  # accumulation dtype
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision for float32 inputs
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r_start = tl.program_id(0).to(tl.int64) * rows_per_program
    r_end = tl.minimum(r_start + rows_per_program, B)
    c_start = tl.program_id(1).to(tl.int64) * classes_per_program
    c_end = tl.minimum(c_start + classes_per_program, C)
    offs_d = tl.arange(0, BLOCK_D)
    for r0 in range(r_start, r_end, BLOCK_B):
        offs_b = r0 + tl.arange(0, BLOCK_B)
        row_ok = offs_b < r_end
        y = tl.load(y_ptr + offs_b, mask=row_ok, other=-1)
        rs = tl.load(rs_ptr + offs_b, mask=row_ok, other=0.0).to(ACC)
        lse = tl.load(lse_ptr + offs_b, mask=row_ok, other=0.0).to(ACC)
        if HAS_DX:
            gx = tl.load(gx_ptr + offs_b, mask=row_ok, other=0.0).to(ACC)
        if HAS_DW:
            gw = tl.load(gw_ptr + offs_b, mask=row_ok, other=0.0).to(ACC)
        x_base = x_ptr + offs_b[:, None] * stride_xb + offs_d[None, :] * stride_xd
        for c0 in range(c_start, c_end, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            col_ok = offs_c < c_end
            w_base = w_ptr + offs_c[:, None] * stride_wc + offs_d[None, :] * stride_wd
            logits = _logits_tile(x_base, w_base, rs, cs_ptr, offs_c, row_ok, col_ok, D, stride_xd, stride_wd,
                                  HAS_NORM, UPCAST, ACC, DOT_PRECISION, BLOCK_B, BLOCK_C, BLOCK_D)
            keep = row_ok[:, None] & col_ok[None, :] & (offs_c[None, :] != y[:, None])
            p = tl.where(keep, tl.exp(logits - lse[:, None]), 0.0)
            if HAS_NORM:
                p = p * tl.load(cs_ptr + offs_c, mask=col_ok, other=0.0).to(ACC)[None, :]
            if not UPCAST:
                p = p.to(w_ptr.dtype.element_ty)  # tensor-core operand; accumulation stays in ACC
            # both products, D step by D step (addresses rebuilt from 1-D offsets: nothing 2-D stays live)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                d_ok = dd < D
                if HAS_DX:
                    wt = tl.load(w_ptr + offs_c[:, None] * stride_wc + dd[None, :] * stride_wd,
                                 mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                    if UPCAST:
                        wt = wt.to(ACC)
                    part = tl.dot(p, wt, input_precision=DOT_PRECISION, out_dtype=ACC) * gx[:, None]
                    tl.atomic_add(dx_ptr + offs_b[:, None] * stride_dxb + dd[None, :] * stride_dxd, part,
                                  mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")
                if HAS_DW:
                    xt = tl.load(x_ptr + offs_b[:, None] * stride_xb + dd[None, :] * stride_xd,
                                 mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                    xg = (xt.to(ACC) * gw[:, None]).to(p.dtype)
                    part = tl.dot(tl.trans(p), xg, input_precision=DOT_PRECISION, out_dtype=ACC)
                    dw_ptrs = dw_ptr + offs_c[:, None] * stride_dwc + dd[None, :] * stride_dwd
                    dw_mask = col_ok[:, None] & d_ok[None, :]
                    if DW_ATOMIC:
                        tl.atomic_add(dw_ptrs, part, mask=dw_mask, sem="relaxed")
                    else:
                        tl.store(dw_ptrs, tl.load(dw_ptrs, mask=dw_mask, other=0.0) + part, mask=dw_mask)


# -- launchers ----------------------------------------------------------------------------------------


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


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def classes_per_program(B: int, C: int, cfg: KernelConfig, device: torch.device, requested: Optional[int]) -> int:
    """Classes one program walks (a multiple of ``cfg.block_c``).

    ``requested`` (the ``chunk_size`` option) is rounded up to whole tiles.
    Otherwise, on a GPU, the classes are split so that about
    :data:`PROGRAMS_PER_SM` programs run per SM even when ``B`` is small; under
    the interpreter one program per row block walks all classes.
    """
    tiles = triton.cdiv(C, cfg.block_c)
    if requested is not None:
        per = triton.cdiv(requested, cfg.block_c)
    elif device.type == "cuda":
        row_blocks = triton.cdiv(max(B, 1), cfg.block_b)
        index = device.index if device.index is not None else torch.cuda.current_device()
        splits = max(1, triton.cdiv(PROGRAMS_PER_SM * _sm_count(index), row_blocks))
        per = triton.cdiv(tiles, min(tiles, splits))
    else:
        per = tiles
    return max(1, min(per, tiles)) * cfg.block_c


def _constexprs(x: Tensor) -> dict:
    acc = _acc_dtype(x.dtype)
    if x.dtype == torch.float32:
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
    elif x.dtype == torch.float64:
        precision = "ieee"
    else:
        precision = "tf32"  # unused for 16-bit inputs
    return dict(
        UPCAST=is_interpreted() and x.dtype == torch.bfloat16,  # DESIGN.md section 5: bf16 math is wrong there
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        DOT_PRECISION=precision,
    )


def margin_fwd(x: Tensor, W: Tensor, y: Tensor, row_scale: Tensor, col_scale: Optional[Tensor], *,
               want_prediction: bool = False, classes: Optional[int] = None,
               config: Optional[KernelConfig] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Per-row log-sum-exp of ``row_scale_i * col_scale_j * (x_i . W_j)`` over ``j != y_i``, and the argmax.

    Args:
        x, W, y: ``(B, D)``, ``(C, D)`` raw inputs of one dtype, ``(B,)`` int64 labels in ``[0, C)``.
        row_scale: ``(B,)`` (accumulation dtype), ``s / |x_i|`` or ``s``.
        col_scale: ``(C,)`` ``1 / |W_j|``, or None (``normalize=False``).
        want_prediction: also return the argmax over all classes (first index on ties).
        classes: classes per program (class splits); default: :func:`classes_per_program`.
        config: tile config; default: :data:`FWD_CONFIGS` for the dtype.

    Returns:
        ``N`` (B,) in the accumulation dtype (``-inf`` when ``C == 1``) and the prediction (B,) int64 or None.
    """
    _check_inputs(x, W, y)
    B, D = x.shape
    C = W.shape[0]
    acc = _acc_dtype(x.dtype)
    cfg = config or FWD_CONFIGS[x.dtype]
    per = classes_per_program(B, C, cfg, x.device, classes)
    splits = triton.cdiv(C, per)
    m = torch.empty(B, splits, device=x.device, dtype=acc)
    l = torch.empty_like(m)
    pv = torch.empty_like(m) if want_prediction else m
    pi = torch.empty(B, splits, device=x.device, dtype=torch.int64) if want_prediction else y
    if B > 0:
        grid = (triton.cdiv(B, cfg.block_b), splits)
        _margin_fwd_kernel[grid](
            x, W, y, row_scale, col_scale if col_scale is not None else row_scale,
            m, l, pv, pi,
            B, C, D, per,
            x.stride(0), x.stride(1), W.stride(0), W.stride(1), splits,
            HAS_NORM=col_scale is not None, HAS_PRED=want_prediction, **_constexprs(x),
            BLOCK_B=cfg.block_b, BLOCK_C=cfg.block_c, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    # combine the splits: N = M + log(sum_k l_k exp(m_k - M))
    M = m.amax(1, keepdim=True)
    M = torch.where(torch.isfinite(M), M, torch.zeros_like(M))  # no non-target class at all (C == 1)
    N = M.squeeze(1) + torch.log((l * torch.exp(m - M)).sum(1))
    pred = None
    if want_prediction:
        top = pv.amax(1, keepdim=True)
        pred = torch.where(pv == top, pi, torch.full_like(pi, C)).amin(1)  # first class among the tied splits
    return N, pred


def margin_bwd(x: Tensor, W: Tensor, y: Tensor, row_scale: Tensor, col_scale: Optional[Tensor], lse: Tensor,
               gx: Tensor, gw: Tensor, *, need_x: bool, need_W: bool, deterministic: bool = False,
               classes: Optional[int] = None,
               config: Optional[KernelConfig] = None) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Non-target gradient products ``dxh`` (B, D) and ``dD`` (C, D), accumulation dtype.

    With ``P_ij = exp(row_scale_i col_scale_j (x_i . W_j) - lse_i) * col_scale_j`` for ``j != y_i``::

        dxh_i = gx_i * sum_j P_ij W_j          dD_j = sum_i P_ij gw_i x_i

    ``deterministic=True`` gives each program one class tile and all rows, so
    ``dD`` is accumulated without atomics in a fixed order (bitwise
    reproducible); ``dxh`` still uses atomics. Its cost: ``C / block_c``
    programs (fewer than the atomic grid when ``C`` is small), and each
    program re-reads every row of ``x``.
    """
    _check_inputs(x, W, y)
    B, D = x.shape
    C = W.shape[0]
    acc = _acc_dtype(x.dtype)
    dxh = torch.zeros(B, D, device=x.device, dtype=acc) if need_x else None
    dD = torch.zeros(C, D, device=x.device, dtype=acc) if need_W else None
    if B == 0 or not (need_x or need_W):
        return dxh, dD
    cfg = config or BWD_CONFIGS[x.dtype]
    if deterministic and need_W:
        rows, per = B, cfg.block_c
    else:
        rows = cfg.block_b
        per = classes_per_program(B, C, cfg, x.device, classes)
    grid = (triton.cdiv(B, rows), triton.cdiv(C, per))
    dx_arg = dxh if dxh is not None else row_scale
    dw_arg = dD if dD is not None else row_scale
    _margin_bwd_kernel[grid](
        x, W, y, row_scale, col_scale if col_scale is not None else row_scale, lse, gx, gw,
        dx_arg, dw_arg,
        B, C, D, rows, per,
        x.stride(0), x.stride(1), W.stride(0), W.stride(1),
        dxh.stride(0) if dxh is not None else 0, dxh.stride(1) if dxh is not None else 0,
        dD.stride(0) if dD is not None else 0, dD.stride(1) if dD is not None else 0,
        HAS_NORM=col_scale is not None, HAS_DX=need_x, HAS_DW=need_W, DW_ATOMIC=not deterministic,
        **_constexprs(x),
        BLOCK_B=cfg.block_b, BLOCK_C=cfg.block_c, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dxh, dD


# -- the autograd Function ------------------------------------------------------------------------------


class _Prepared:
    """Per-call vectors shared by the forward and the backward pass (B-, C- and D-sized only)."""

    def __init__(self, x: Tensor, W: Tensor, y: Tensor, opts: FusedOptions):
        self.opts = opts
        self.acc = _acc_dtype(x.dtype)
        self.B, self.D = x.shape
        self.C = W.shape[0]
        self.chunk = max(1, min(self.C, opts.budget // max(1, 2 * self.D * (torch.finfo(self.acc).bits // 8))))
        xf = x.to(self.acc)
        if opts.normalize:
            norm_x = torch.linalg.vector_norm(xf, dim=1)
            self.x_clamped = norm_x <= opts.eps
            self.inv_x: Optional[Tensor] = 1.0 / norm_x.clamp_min(opts.eps)
            norm_w = torch.linalg.vector_norm(W, dim=1, dtype=self.acc)
            self.w_clamped = norm_w <= opts.eps
            self.inv_w: Optional[Tensor] = 1.0 / norm_w.clamp_min(opts.eps)
            self.xh = xf * self.inv_x.unsqueeze(1)
            self.row_scale = self.inv_x * opts.scale
        else:
            self.inv_x = self.inv_w = None
            self.xh = xf
            self.row_scale = torch.full((self.B,), opts.scale, device=x.device, dtype=self.acc)
        self._class_sum: Optional[Tensor] = None

    def w_hat_rows(self, W: Tensor, index: Tensor) -> Tensor:
        wy = W.index_select(0, index).to(self.acc)
        return wy if self.inv_w is None else wy * self.inv_w[index].unsqueeze(1)

    def class_sum(self, W: Tensor) -> Tensor:
        """``sum_j wh_j`` (D,), chunked over classes (computed once per call)."""
        if self._class_sum is None:
            total = torch.zeros(self.D, device=W.device, dtype=self.acc)
            for c0 in range(0, self.C, self.chunk):
                wt = W[c0:c0 + self.chunk].to(self.acc)
                total += wt.sum(0) if self.inv_w is None else self.inv_w[c0:c0 + self.chunk] @ wt
            self._class_sum = total
        return self._class_sum

    def smoothing_other(self, W: Tensor, y: Tensor) -> Tensor:
        """``sum_{j != y_i} s * cos_ij`` per row: one GEMV minus the target."""
        return self.opts.scale * (self.xh @ self.class_sum(W) - (self.xh * self.w_hat_rows(W, y)).sum(1))


def _smoothing_grads(prep: _Prepared, W: Tensor, y: Tensor, g: Tensor, dxh: Optional[Tensor],
                     dD: Optional[Tensor]) -> None:
    """Rank-1 gradient of ``-(eps/C) * sum_{j != y} s * cos_ij`` into ``dxh`` and ``dD`` (in place)."""
    eps = prep.opts.label_smoothing
    if eps <= 0:
        return
    coef = (-prep.opts.scale * eps / prep.C) * g
    if dxh is not None:
        dxh.add_(coef.unsqueeze(1) * (prep.class_sum(W).unsqueeze(0) - prep.w_hat_rows(W, y)))
    if dD is not None:
        gx = coef.unsqueeze(1) * prep.xh
        col = prep.inv_w if prep.inv_w is not None else torch.ones(prep.C, device=W.device, dtype=prep.acc)
        dD.addr_(col, gx.sum(0))
        dD.index_add_(0, y, -gx * col[y].unsqueeze(1))


def _finish_dW(prep: _Prepared, W: Tensor, dD: Tensor) -> Tensor:
    """In place: ``dD_j`` becomes ``dW_j = dD_j - W_j inv_w_j^2 (W_j . dD_j)`` (chunked over classes)."""
    if prep.inv_w is None:
        return dD
    coef = torch.where(prep.w_clamped, torch.zeros_like(prep.inv_w), prep.inv_w * prep.inv_w)
    for c0 in range(0, prep.C, prep.chunk):
        c1 = min(c0 + prep.chunk, prep.C)
        wt = W[c0:c1].to(prep.acc)
        d = dD[c0:c1]
        d.addcmul_(wt, ((d * wt).sum(1) * coef[c0:c1]).unsqueeze(1), value=-1.0)
    return dD


class _MarginSoftmax(torch.autograd.Function):
    """Non-target part of the margin softmax CE on Triton kernels; the target logit ``z`` arrives as an input."""

    @staticmethod
    def forward(ctx, x: Tensor, W: Tensor, y: Tensor, z: Tensor, w: Tensor, handoff: GradHandoff,
                opts: FusedOptions):
        _check_inputs(x, W, y)
        prep = _Prepared(x, W, y, opts)
        N, pred = margin_fwd(x, W, y, prep.row_scale, prep.inv_w, want_prediction=opts.want_prediction,
                             classes=opts.chunk_size)
        zf = z.to(prep.acc)
        wf = w.to(prep.acc)
        lse = torch.logaddexp(N, zf)
        loss_rows = lse - zf
        eps = opts.label_smoothing
        if eps > 0:  # PyTorch's smoothing: (1-eps) * CE + eps * mean_j(lse - logit_j)
            loss_rows = loss_rows + eps * (zf - (prep.smoothing_other(W, y) + zf) / prep.C)
        weighted = torch.where(wf != 0, loss_rows * wf, torch.zeros_like(loss_rows))
        loss = weighted.sum() if opts.reduce else weighted
        ctx.prep = prep
        ctx.handoff = handoff
        ctx.save_for_backward(x, W, y, zf, wf, lse)
        return forward_outputs(ctx, loss, lse, pred, x)

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_lse, _grad_pred):
        x, W, y, zf, wf, lse = ctx.saved_tensors
        prep: _Prepared = ctx.prep
        handoff: GradHandoff = ctx.handoff
        opts = prep.opts
        g = wf * grad_loss.to(prep.acc)
        gx = g * opts.scale
        gw = gx if prep.inv_x is None else gx * prep.inv_x
        dxh, dD = margin_bwd(x, W, y, prep.row_scale, prep.inv_w, lse, gx, gw, need_x=handoff.need_x,
                             need_W=handoff.need_W, classes=opts.chunk_size)
        _smoothing_grads(prep, W, y, g, dxh, dD)
        if dxh is not None and prep.inv_x is not None:
            dxh = normalize_backward(prep.xh, prep.inv_x, prep.x_clamped, dxh)
        handoff.dx = dxh
        handoff.dW = _finish_dW(prep, W, dD) if dD is not None else None
        dz = None
        if ctx.needs_input_grad[3]:
            eps = opts.label_smoothing
            dz = (g * (torch.exp(zf - lse) - (1.0 - eps) - eps / prep.C)).to(zf.dtype)
        return None, None, None, dz, None, None, None


def margin_softmax(x: Tensor, W: Tensor, y: Tensor, z: Tensor, w: Tensor, handoff: GradHandoff,
                   opts: FusedOptions):
    """Backend entry point (see :mod:`marginops.backends.common` for the contract)."""
    return _MarginSoftmax.apply(x, W, y, z, w, handoff, opts)
