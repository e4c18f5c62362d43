"""Triton backend: margin softmax cross-entropy fused over classes, no ``B x C`` tensor anywhere.

The kernels and their pinned configs are in :mod:`marginops.backends.triton_kernels`.
This module reads top to bottom: their launchers (check, allocate, launch;
no autograd), the gradient passes that pair the gradient kernel with cuBLAS
GEMMs, then the functions of the backend interface
(:class:`marginops.backends.interface.Backend`; autograd lives in
:mod:`marginops.ops`). Labels outside the weight's class range never match a
column, so a range is just a weight slice with ``class_start`` subtracted from
the labels.

* ``_margin_fwd_kernel``: one program per (row block, class split). Each class
  tile of logits is a ``tl.dot`` of *raw* ``x`` and ``W`` tiles, scaled by
  ``s / |x_i|`` per row and ``1 / |W_j|`` per column (no normalized copy of
  ``W`` is written); the target column is set to ``-inf`` before the online
  max / sum-exp, and a running argmax of the unmasked tile gives the
  prediction. Splits write partial ``(max, sum)`` pairs that the launcher
  combines into the non-target LSE ``N``. With ``STORE_EXP`` it also keeps each
  tile's exponentials (input dtype) and shift (``strategy="workspace"``).
* ``_margin_grad_kernel``: one program per (row block, class tile) of a chunk
  of classes. It recomputes the logits tile (or reads the forward's stored
  exponentials) and writes ``G_ij = g_i s (exp(s cos_ij - LSE_i) - eps/C) / |W_j|``
  off the target column, in the input dtype, into a ``rows x chunk`` buffer. Two
  cuBLAS GEMMs then give ``dxh += G @ W_chunk`` (fp32 accumulation across
  chunks) and ``dD_chunk = G.T @ xh`` (complete: all rows at once), whose
  normalization backward and conversion to the input dtype happen chunk by
  chunk. No atomics anywhere: the gradients are reproducible run to run.

``strategy="recompute"`` (the default here) is the design that keeps no
logits: four GEMMs (forward kernel, gradient kernel, two cuBLAS). Its scratch
is the ``G`` chunk and one ``dD`` chunk, bounded by ``opts.memory_budget``;
``dW`` is written in the input dtype directly, and for 16-bit inputs ``dxh``
is the only other fp32 buffer (``B x D``). ``strategy="workspace"`` keeps a row
block's exponentials over all classes (input dtype, one shift per tile and
row) and, for a scalar loss, forms the gradients during the forward pass:
three GEMMs, workspace bounded by the budget, ``dD`` accumulated in the
accumulation dtype across row blocks.

The normalization backward of ``W`` is a third kernel (``_finish_w_kernel``);
everything of size ``B`` or ``D`` around the kernels (the label-smoothing
sum, the target rows) runs in PyTorch with :mod:`marginops.backends.common`,
shared with the torch backend; the loss and the normalization backward of
``x`` are :mod:`marginops.ops`'. Label smoothing's gradient is the ``- eps/C``
inside ``G``.

Inter-class filtering (``opts.filter_threshold``) is one more mask in both
kernels (``FILTER``; the threshold ``s * threshold`` travels as a float32
scalar). Sub-centres (``opts.sub_centers = k``, the ``SUB`` constexpr) make
each class tile the maximum of ``k`` logits tiles of strided rows of ``W``
(and, in the gradient kernel, the index of the first maximum): ``G`` is
written per row of ``W``, the class's value at its maximal sub-centre, so
the cuBLAS products are unchanged. Their tiles are
:data:`~marginops.backends.triton_kernels.SUBCENTER_FWD_CONFIGS` /
``SUBCENTER_GRAD_CONFIGS``; the workspace strategy refuses sub-centres.

``opts.chunk_size`` means classes per forward program here (the class
split; rounded up to whole tiles); by default the classes are split so that
the GPU stays full when ``B`` is small.

On CPU the kernels run only under the Triton interpreter: ``TRITON_INTERPRET=1``
must be set before triton is first imported (this module is imported lazily,
on the first call of ``backend="triton"``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import Prepared, acc_dtype
from .interface import Call, FusedOptions, RowStats
from .triton_kernels import (FINISH_CONFIGS, FWD_CONFIGS, GRAD_CONFIGS,
                             PROGRAMS_PER_SM, SUBCENTER_FWD_CONFIGS, SUBCENTER_GRAD_CONFIGS, SUPPORTED_DTYPES,
                             WORKSPACE_FWD_CONFIGS, WORKSPACE_GRAD_CONFIGS,
                             KernelConfig, _finish_w_kernel, _margin_fwd_kernel, _margin_grad_kernel)

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
    acc = acc_dtype(x.dtype)
    if x.dtype == torch.float32:
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
    elif x.dtype == torch.float64:
        precision = "ieee"
    else:
        precision = "tf32"  # unused for 16-bit inputs
    return dict(
        UPCAST=is_interpreted() and x.dtype == torch.bfloat16,  # bf16 arithmetic is wrong in the interpreter
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        DOT_PRECISION=precision,
    )


@dataclass(frozen=True)
class ExpWorkspace:
    """What the workspace strategy's forward keeps of a block of rows, for the gradient kernel.

    ``exp[i, j] = exp(l_ij - shift[i, j // tile_c])`` in the input dtype (every
    value is <= 1, so 16 bits keep the relative precision of ``G``; the target
    column holds 0), ``shift`` the running max of the non-target logits after
    each forward tile, in the accumulation dtype. ``p_ij = exp[i, j] *
    exp(shift - LSE_i)``: half the bytes of fp32 logits.
    """

    exp: Tensor  # (R, C)
    shift: Tensor  # (R, ceil(C / tile_c))
    tile_c: int

    @staticmethod
    def row_bytes(C: int, dtype: torch.dtype) -> int:
        """Bytes per row for ``C`` classes and inputs of ``dtype``."""
        tile_c = WORKSPACE_FWD_CONFIGS[dtype].block_c
        return C * (torch.finfo(dtype).bits // 8) + triton.cdiv(C, tile_c) * (torch.finfo(acc_dtype(dtype)).bits // 8)

    @classmethod
    def allocate(cls, rows: int, C: int, dtype: torch.dtype, device) -> "ExpWorkspace":
        tile_c = WORKSPACE_FWD_CONFIGS[dtype].block_c
        return cls(torch.empty(rows, C, device=device, dtype=dtype),
                   torch.empty(rows, triton.cdiv(C, tile_c), device=device, dtype=acc_dtype(dtype)), tile_c)

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
               config: Optional[KernelConfig] = None,
               workspace: Optional[ExpWorkspace] = None, sub_centers: int = 1,
               filter_logit: Optional[float] = None) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Per-row log-sum-exp of ``row_scale_i * col_scale_j * (x_i . W_j)`` over ``j != y_i``, and the argmax.

    Args:
        x, W, y: ``(B, D)``, ``(C k, D)`` raw inputs of one dtype, ``(B,)`` int64 labels in ``[0, C)``.
        row_scale: ``(B,)`` (accumulation dtype), ``s / |x_i|`` or ``s``.
        col_scale: ``(C k,)`` ``1 / |W_j|``, or None (``normalize=False``).
        sub_centers: ``k``, rows of ``W`` per class (class-major); a class logit is the largest of its ``k``.
        filter_logit: inter-class filtering: non-target logits above it are left out (not of the prediction).
        want_prediction: also return the argmax over all classes (first index on ties).
        classes: classes per program (class splits); default: :func:`classes_per_program`.
        config: tile config; default: :data:`FWD_CONFIGS` for the dtype
            (:data:`WORKSPACE_FWD_CONFIGS` with a ``workspace``, whose ``tile_c`` it must match).
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
    table = SUBCENTER_FWD_CONFIGS if sub_centers > 1 else FWD_CONFIGS if workspace is None else WORKSPACE_FWD_CONFIGS
    cfg = config or table[x.dtype]
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
    if B > 0:
        grid = (triton.cdiv(B, cfg.block_b), splits)
        _margin_fwd_kernel[grid](
            x, W, y, row_scale, col_scale if col_scale is not None else row_scale,
            m, l, pv, pi, workspace.exp if workspace else x, workspace.shift if workspace else m,
            B, C, D, per,
            x.stride(0), x.stride(1), W.stride(0), W.stride(1), splits,
            workspace.exp.stride(0) if workspace else 0, workspace.shift.stride(0) if workspace else 0,
            float(filter_logit) if filter_logit is not None else 0.0,
            HAS_NORM=col_scale is not None, HAS_PRED=want_prediction, STORE_EXP=workspace is not None,
            FILTER=filter_logit is not None, SUB=sub_centers, **_constexprs(x),
            BLOCK_B=cfg.block_b, BLOCK_C=cfg.block_c, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    # combine the splits: N = M + log(sum_k l_k exp(m_k - M))
    M = m.amax(1, keepdim=True)
    M = torch.where(torch.isfinite(M), M, torch.zeros_like(M))  # no non-target class at all (C == 1)
    N = M.squeeze(1) + torch.log((l * torch.exp(m - M)).sum(1))
    pred = top = None
    if want_prediction:
        top = pv.amax(1, keepdim=True)
        pred = torch.where(pv == top, pi, torch.full_like(pi, C)).amin(1)  # first class among the tied splits
        top = top.squeeze(1)
    return N, pred, top




def margin_grad(x: Tensor, W: Tensor, y: Tensor, row_scale: Tensor, col_scale: Optional[Tensor], lse: Tensor,
                coef: Tensor, out: Tensor, *, label_offset: int = 0, smoothing: float = 0.0,
                workspace: Optional[ExpWorkspace] = None, scale_g: bool = True,
                config: Optional[KernelConfig] = None, sub_centers: int = 1,
                filter_logit: Optional[float] = None) -> Tensor:
    """Fill ``out`` (R, Cc) with ``G_ij = coef_i (exp(l_ij - lse_i) - smoothing) col_scale_j``, 0 on targets
    (without the ``col_scale_j`` factor when ``scale_g`` is False).

    Here ``l_ij = row_scale_i col_scale_j (x_i . W_j)`` is recomputed, or
    ``exp(l_ij - lse_i)`` comes from a forward's ``workspace`` (R rows, all
    classes). ``x`` (R, D) and ``W`` (Cc, D) may be row slices of the full
    inputs; column ``j`` is the class ``label_offset + j`` (the target test
    against ``y``, and the column of the workspace). With ``sub_centers = k``
    ``W`` holds ``k`` rows per class and ``out`` is ``(R, Cc k)``, a column per
    row of ``W``: each class's ``G`` sits at the sub-centre whose logit was the
    class logit (the first maximum), 0 at its others. ``filter_logit``: columns
    whose logit exceeds it get 0 (inter-class filtering).
    """
    _check_inputs(x, W, y)
    R, D = x.shape
    Cc = W.shape[0] // sub_centers
    if out.shape != (R, W.shape[0]) or out.dtype != x.dtype or out.stride(1) != 1:
        raise ValueError(f"out must be ({R}, {W.shape[0]}) {x.dtype} with unit column stride, got "
                         f"{tuple(out.shape)} {out.dtype} strides {out.stride()}")
    if workspace is not None and (sub_centers != 1 or filter_logit is not None):
        raise NotImplementedError("the workspace gradient takes neither sub-centres nor a filter (the stored "
                                  "exponentials are already filtered)")
    if workspace is not None:
        workspace.check(R, workspace.exp.shape[1], x.dtype)
        if label_offset + Cc > workspace.exp.shape[1]:
            raise ValueError(f"classes [{label_offset}, {label_offset + Cc}) are outside the workspace's "
                             f"{workspace.exp.shape[1]}")
    if R == 0 or Cc == 0:
        return out
    table = SUBCENTER_GRAD_CONFIGS if sub_centers > 1 else GRAD_CONFIGS if workspace is None else WORKSPACE_GRAD_CONFIGS
    cfg = config or table[x.dtype]
    grid = (triton.cdiv(R, cfg.block_b), triton.cdiv(Cc, cfg.block_c))
    _margin_grad_kernel[grid](
        x, W, y, row_scale, col_scale if col_scale is not None else row_scale, lse, coef,
        workspace.exp[:, label_offset:] if workspace else out, workspace.shift if workspace else lse, out,
        R, Cc, D, label_offset, float(smoothing), workspace.tile_c if workspace else 1,
        x.stride(0), x.stride(1), W.stride(0), W.stride(1), workspace.exp.stride(0) if workspace else 0,
        workspace.shift.stride(0) if workspace else 0, out.stride(0),
        float(filter_logit) if filter_logit is not None else 0.0,
        HAS_NORM=col_scale is not None, FROM_EXP=workspace is not None,
        SCALE_G=scale_g and col_scale is not None, FILTER=filter_logit is not None, SUB=sub_centers,
        **_constexprs(x),
        BLOCK_B=cfg.block_b, BLOCK_C=cfg.block_c, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


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
    cfg = FINISH_CONFIGS[W.dtype]
    _finish_w_kernel[(triton.cdiv(Cc, cfg.block_b),)](
        dD, W, coef, inv_w, out, Cc, D, dD.stride(0), W.stride(0), W.stride(1), out.stride(0), HAS_PRE=not scaled,
        ACC=tl.float64 if dD.dtype == torch.float64 else tl.float32, BLOCK_R=cfg.block_b, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


# -- the gradient passes: G chunks from the kernels, products from cuBLAS ------------------------------

_MM_OUT_DTYPE: dict[str, bool] = {}  # device type -> whether mm/addmm(..., out_dtype=) work there


def _gemm_into(out: Tensor, a: Tensor, b: Tensor, accumulate: bool) -> Tensor:
    """``out = a @ b`` or ``out += a @ b`` with ``out`` in the accumulation dtype.

    In place (cuBLAS writes or accumulates into ``out``, no temporary) when the
    operands share its dtype, or for 16-bit operands where PyTorch offers
    ``out_dtype`` (CUDA, recent versions). Elsewhere one product temporary,
    rounded to the operands' dtype before it is accumulated.
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
    product = torch.mm(a, b)
    return out.add_(product) if accumulate else out.copy_(product)


@dataclass(frozen=True)
class GradPlan:
    """Rows and classes per ``G`` buffer, and its bytes."""

    rows: int
    chunk: int
    buffer_bytes: int


def grad_plan(B: int, C: int, D: int, dtype: torch.dtype, budget: int, fixed: int = 0,
              config: Optional[KernelConfig] = None) -> GradPlan:
    """The largest ``G`` chunk the budget allows, all rows at once if possible.

    Per chunk of ``k`` classes and ``r`` rows the scratch is ``G`` (``r k``
    input elements) and the ``dD`` chunk (``k D``, accumulation dtype), plus,
    where cuBLAS cannot write fp32 from 16-bit operands in place, the two
    products in the input dtype (``k D`` and ``r D``), and for float16 the
    chunk's normalized ``W`` rows (``k D``, and an fp32 temporary); ``fixed``
    bytes (the workspace strategy's exponentials) come off the budget first.
    Classes come in whole tiles; below one tile of classes for all rows, the
    rows shrink (whole tiles) before the classes do, and one tile by one tile
    is the floor.
    """
    cfg = config or GRAD_CONFIGS[dtype]
    elt = torch.finfo(dtype).bits // 8
    both = elt + torch.finfo(acc_dtype(dtype)).bits // 8
    if dtype == torch.float16:
        both += 6  # normalized W rows of the chunk (see _Prepared.scale_g)
    left = max(0, budget - fixed)
    tiles = max(1, triton.cdiv(C, cfg.block_c))
    rows = max(1, B)
    while True:
        per_tile = cfg.block_c * (rows * elt + D * both)
        fit = (left - rows * D * elt) // per_tile
        if fit >= 1 or rows <= cfg.block_b:
            break
        rows = max(cfg.block_b, (rows // 2) // cfg.block_b * cfg.block_b)
    per = int(max(1, min(tiles, fit)))
    tiles_per_chunk = triton.cdiv(tiles, triton.cdiv(tiles, per))  # even chunks
    chunk = min(C, tiles_per_chunk * cfg.block_c) if C > 0 else cfg.block_c
    rows = min(rows, max(B, 1))
    return GradPlan(rows, chunk, rows * chunk * elt)


def _chunk_grads(prep: "_Prepared", x: Tensor, xh_in: Optional[Tensor], lse: Tensor, coef: Tensor, b0: int,
                 b1: int, c0: int, c1: int, buf: Tensor, row_step: int, dxh: Optional[Tensor],
                 dD: Optional[Tensor], block: Optional[ExpWorkspace] = None) -> None:
    """Classes ``[c0, c1)`` against rows ``[b0, b1)``, ``row_step`` rows of ``G`` (in ``buf``) at a time:
    the kernel fills ``G``, then ``dxh[r0:r1] += G @ rows`` and ``dD (+)= G.T @ xh[r0:r1]``.

    ``dD`` is the chunk's ``(c1 - c0) k`` rows of ``W`` (accumulation dtype): the batch's first rows write it, later
    ones add to it (no zeroing pass). ``rows`` is ``W[c0:c1]``, or its normalized rows when ``G`` does
    not carry ``1 / |W_j|`` (:meth:`_Prepared.dx_rows`). ``block`` holds rows ``[b0, b1)``'s stored
    exponentials (workspace strategy), else the logits are recomputed.
    """
    W, k = prep.W, prep.k
    w0, w1 = c0 * k, c1 * k  # the classes' rows of W
    w_rows = prep.dx_rows(w0, w1) if dxh is not None else None
    for r0 in range(b0, b1, row_step):
        r1 = min(r0 + row_step, b1)
        G = buf[: (r1 - r0) * (w1 - w0)].view(r1 - r0, w1 - w0)
        margin_grad(x[r0:r1], W[w0:w1], prep.y_local[r0:r1], prep.row_scale[r0:r1],
                    prep.inv_w[w0:w1] if prep.inv_w is not None else None, lse[r0:r1], coef[r0:r1], G,
                    label_offset=c0, smoothing=prep.opts.label_smoothing / prep.C_total,
                    workspace=block.rows(r0 - b0, r1 - b0) if block is not None else None, scale_g=prep.scale_g,
                    sub_centers=k, filter_logit=prep.filter_logit if block is None else None)
        if dxh is not None:
            _gemm_into(dxh[r0:r1], G, w_rows, accumulate=True)
        if dD is not None:
            _gemm_into(dD, G.t(), xh_in[r0:r1], accumulate=r0 > 0)


def _recompute_grads(prep: "_Prepared", x: Tensor, lse: Tensor, coef: Tensor, need_x: bool,
                     need_W: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """``dxh`` (w.r.t. the normalized rows, accumulation dtype) and ``dW`` (input dtype) for per-row
    upstream weights ``coef / s``.

    Class chunk by class chunk: the kernel recomputes the logits into ``G``,
    cuBLAS multiplies, and each chunk of ``dW`` is finished (normalization
    backward) and written in the input dtype before the next one starts.
    """
    B, C, D, k = prep.B, prep.C, prep.D, prep.k
    pl = grad_plan(B, prep.n_rows, D, x.dtype, prep.opts.budget)  # planned in rows of W
    chunk = max(1, pl.chunk // k)  # classes per chunk
    dxh = torch.zeros(B, D, device=x.device, dtype=prep.acc) if need_x else None
    dW = torch.empty(prep.n_rows, D, device=x.device, dtype=x.dtype) if need_W else None
    xh_in = prep.xh.to(x.dtype) if need_W else None
    buf = torch.empty(pl.rows * chunk * k, device=x.device, dtype=x.dtype)
    dD_buf = torch.empty(chunk * k * D, device=x.device, dtype=prep.acc) if need_W else None
    for c0 in range(0, C, chunk):
        c1 = min(c0 + chunk, C)
        dD = dD_buf[: (c1 - c0) * k * D].view((c1 - c0) * k, D) if dD_buf is not None else None
        _chunk_grads(prep, x, xh_in, lse, coef, 0, B, c0, c1, buf, pl.rows, dxh, dD)
        if dW is not None:
            _finish_chunk(prep, dD if B > 0 else None, c0 * k, c1 * k, dW[c0 * k:c1 * k])
    return dxh, dW


def _finish_chunk(prep: "_Prepared", dD: Optional[Tensor], c0: int, c1: int, out: Tensor) -> None:
    """Write rows ``[c0, c1)`` of ``dW`` (``out``, any dtype, may be ``dD``) from the chunk's ``dD``
    (None: no rows)."""
    if dD is None:
        out.zero_()
    elif prep.inv_w is None:
        out.copy_(dD)
    else:
        finish_w(dD, prep.W[c0:c1], prep.inv_w[c0:c1], prep.w_clamped(c0, c1), out, scaled=prep.scale_g)


#: Share of the budget the workspace strategy leaves for ``G`` chunks (the rest holds the exponentials).
WORKSPACE_G_FRACTION = 0.25


def workspace_rows(B: int, C: int, dtype: torch.dtype, budget: int) -> int:
    """Rows per block of the workspace strategy: as many as fit in an :class:`ExpWorkspace` of
    ``1 - WORKSPACE_G_FRACTION`` of the budget; blocks evened out.

    Raises:
        ValueError: when not even one row fits.
    """
    per_row = ExpWorkspace.row_bytes(C, dtype)
    rows = min(B, int(budget * (1 - WORKSPACE_G_FRACTION)) // per_row)
    if rows < 1:
        need = math.ceil(per_row / (1 - WORKSPACE_G_FRACTION))
        raise ValueError(f"strategy='workspace' needs memory_budget >= {need} bytes (one row of exponentials "
                         f"across all {C} classes, plus the gradient buffer), got memory_budget={budget}")
    return math.ceil(B / math.ceil(B / rows))


def _workspace_forward(prep: "_Prepared", x: Tensor, z: Tensor, g: Tensor, need_x: bool, need_W: bool):
    """Forward with the gradients for ``grad_output = 1`` (three GEMMs).

    Per block of rows, the forward kernel keeps the exponentials of every tile
    (:class:`ExpWorkspace`), the block's LSE follows, then the gradient kernel
    streams them into ``G`` chunk by chunk and cuBLAS multiplies. ``dD`` (all
    classes, accumulation dtype) is summed across row blocks and finished at
    the end: the fewer blocks (the larger the budget), the less traffic.
    """
    B, C, D, acc = prep.B, prep.C, prep.D, prep.acc
    budget = prep.opts.budget
    rows = workspace_rows(B, C, x.dtype, budget)
    pl = grad_plan(rows, C, D, x.dtype, budget, fixed=rows * ExpWorkspace.row_bytes(C, x.dtype))
    ws = ExpWorkspace.allocate(rows, C, x.dtype, x.device)
    buf = torch.empty(pl.rows * pl.chunk, device=x.device, dtype=x.dtype)
    dxh = torch.zeros(B, D, device=x.device, dtype=acc) if need_x else None
    dD = torch.empty(C, D, device=x.device, dtype=acc) if need_W else None
    xh_in = prep.xh.to(x.dtype) if need_W else None
    N = torch.empty(B, device=x.device, dtype=acc)
    lse = torch.empty_like(N)
    want = prep.opts.want_prediction
    pred = torch.empty(B, device=x.device, dtype=torch.int64) if want else prep.empty(torch.int64)
    best = torch.empty(B, device=x.device, dtype=acc) if want else prep.empty()
    coef = g * prep.opts.scale
    for b0 in range(0, B, rows):
        b1 = min(b0 + rows, B)
        block = ws.rows(0, b1 - b0)
        N[b0:b1], p, top = margin_fwd(x[b0:b1], prep.W, prep.y_local[b0:b1], prep.row_scale[b0:b1],
                                      prep.inv_w, want_prediction=want, classes=prep.opts.chunk_size,
                                      workspace=block, filter_logit=prep.filter_logit)
        if want:
            pred[b0:b1], best[b0:b1] = p, top
        lse[b0:b1] = torch.logaddexp(N[b0:b1], z[b0:b1])
        for c0 in range(0, C, pl.chunk):
            c1 = min(c0 + pl.chunk, C)
            _chunk_grads(prep, x, xh_in, lse, coef, b0, b1, c0, c1, buf, pl.rows, dxh,
                         dD[c0:c1] if dD is not None else None, block=block)
    if dD is not None:
        for c0 in range(0, C, pl.chunk):
            _finish_chunk(prep, dD[c0:c0 + pl.chunk], c0, min(c0 + pl.chunk, C), dD[c0:c0 + pl.chunk])
    return RowStats(N, best, pred, prep.logit_sum()), dxh, dD


# -- the backend interface (marginops.backends.interface.Backend) ---------------------------------------


class _Prepared(Prepared):
    """The shared per-call quantities plus the kernels' operand, row factor and how ``G`` is scaled.

    The kernels multiply tiles in the weight's dtype: ``xk`` is ``x`` in that
    dtype (a ``B x D`` conversion when the embeddings differ, e.g. bf16
    embeddings from an autocast backbone against an fp32 weight; the ``C x D``
    weight is never copied).
    """

    def __init__(self, call: Call):
        super().__init__(call)
        opts = call.opts
        _check_device(call.W)
        if (call.x.dtype == torch.float64) != (call.W.dtype == torch.float64):
            raise TypeError(f"backend='triton' does not mix float64 with other dtypes, got embeddings "
                            f"{call.x.dtype} and weight {call.W.dtype}; convert one of them")
        self.xk = call.x if call.x.dtype == call.W.dtype else call.x.to(call.W.dtype)
        if self.inv_x is not None:
            self.row_scale = self.inv_x * opts.scale
        else:
            self.row_scale = torch.full((self.B,), opts.scale, device=call.x.device, dtype=self.acc)
        # G carries 1 / |W_j| (dX multiplies raw W rows) unless that overflows the input dtype: float16
        # (max 65504) cannot hold s / |W_j| for tiny or zero rows (1 / eps = 1e12), so float16 keeps G
        # unscaled and multiplies normalized rows of each chunk instead.
        self.scale_g = self.inv_w is None or call.W.dtype != torch.float16
        if self.opts.gradient_filter is not None:  # not yet implemented here: never silently exact
            raise NotImplementedError(f"gradient_filter is not implemented by this backend yet "
                                      f"(gradient_filter={self.opts.gradient_filter})")
        thr = opts.filter_threshold
        self.filter_logit = None if thr is None else opts.scale * thr  # compared in float32 by the kernels

    def dx_rows(self, c0: int, c1: int) -> Tensor:
        """The right operand of ``dxh += G @ rows`` for classes ``[c0, c1)``, in the input dtype."""
        if self.scale_g:
            return self.W[c0:c1]
        return (self.W[c0:c1] * self.inv_w[c0:c1].unsqueeze(1)).to(self.W.dtype)  # one fp32 temporary


def weight_grad_dtype(x_dtype: torch.dtype, W_dtype: torch.dtype, opts: FusedOptions) -> torch.dtype:
    """The recompute strategy writes ``dW`` in the weight's dtype chunk by chunk (no fp32 ``C x D``
    copy); the workspace strategy accumulates it across row blocks in the accumulation dtype."""
    return acc_dtype(x_dtype, W_dtype) if _wants_workspace(opts) else W_dtype


def _wants_workspace(opts: FusedOptions) -> bool:
    return opts.strategy == "workspace" and opts.reduce and (opts.need_x or opts.need_W)


def uses_workspace(B: int, C: int, D: int, x_dtype: torch.dtype, W_dtype: torch.dtype, opts: FusedOptions) -> bool:
    """Only when asked for (``strategy="workspace"``, a scalar loss, gradients wanted): ``"auto"`` recomputes.

    Raises:
        ValueError: when the workspace cannot hold one row within the budget, or the weight is not
            the whole class range.
    """
    if not _wants_workspace(opts) or B == 0:
        return False
    if opts.sub_centers > 1:
        raise NotImplementedError(f"strategy='workspace' does not support sub-centres (sub_centers="
                                  f"{opts.sub_centers}) on backend='triton'; use strategy='recompute' or 'auto'")
    opts.require_full_range(C)
    workspace_rows(B, C, W_dtype, opts.budget)  # raises when not one row fits
    return True


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
    opts = call.opts
    return _workspace_forward(prep, prep.xk, z.to(prep.acc), g.to(prep.acc), opts.need_x, opts.need_W)


def recompute_grads(call: Call, lse: Tensor, g: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The recompute strategy's gradients (four GEMMs in all): ``G`` chunks from the kernel, cuBLAS products."""
    prep = _Prepared(call)
    opts = call.opts
    if not (opts.need_x or opts.need_W):
        return None, None
    return _recompute_grads(prep, prep.xk, lse.to(prep.acc), g.to(prep.acc) * opts.scale, opts.need_x,
                            opts.need_W)
