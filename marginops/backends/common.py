"""Per-call math every fused backend shares: dtypes, norms, normalized rows, the target rows of a range.

:class:`Prepared` wraps one :class:`~marginops.backends.interface.Call`;
backends subclass it for their tile helpers. It lives for one call of one
backend function: nothing here outlives a forward or a backward (the norms
arrive with the call, computed once by :mod:`marginops.ops`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .interface import DEFAULT_MEMORY_BUDGET, Call, FusedOptions

__all__ = ["DEFAULT_MEMORY_BUDGET", "FusedOptions", "Call", "Prepared", "acc_dtype", "clamped", "inverse_norms",
           "normalize_backward", "gemm_into", "PASS_CHUNK"]


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of ``dtypes``: float64 if any is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


#: Classes per step of the per-call ``C x D`` passes (class sum, the torch backend's normalization backward).
PASS_CHUNK = 8192


def normalize_backward(xh: Tensor, inv_norm: Tensor, clamped: Tensor, grad: Tensor) -> Tensor:
    """Gradient through ``x / max(|x|, eps)`` given ``xh``, ``1 / max(|x|, eps)`` and ``|x| <= eps``.

    Overwrites and returns ``grad`` (no temporary of its size). Where the norm
    is clamped the map is linear (``x / eps``), as in ``F.normalize``.
    """
    proj = torch.bmm(xh.unsqueeze(1), grad.unsqueeze(2)).view(-1)  # row dots without an elementwise product
    proj = torch.where(clamped, torch.zeros_like(proj), proj)
    return grad.addcmul_(xh, proj.unsqueeze(1), value=-1.0).mul_(inv_norm.unsqueeze(1))


_MM_OUT_DTYPE: dict[str, bool] = {}  # device type -> whether mm/addmm(..., out_dtype=) work there


def gemm_into(out: Tensor, a: Tensor, b: Tensor, accumulate: bool = False) -> Tensor:
    """``out = a @ b`` (or ``out += a @ b``) with ``out`` in the accumulation dtype and ``a``, ``b`` in
    the operands' (possibly 16-bit) dtype.

    In place when the operands share ``out``'s dtype, or for 16-bit operands
    where PyTorch offers ``out_dtype`` (CUDA, recent versions: a 16-bit
    product with float32 accumulation and result). Elsewhere one product
    temporary in the operands' dtype, then added or copied into ``out``.
    """
    if a.dtype == out.dtype:
        return out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
    kind = out.device.type
    if _MM_OUT_DTYPE.get(kind, kind == "cuda"):
        try:
            if accumulate:
                return torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
            return torch.mm(a, b, out_dtype=out.dtype, out=out)
        except (TypeError, RuntimeError, NotImplementedError) as e:  # no such overload (older torch) or backend
            if "out of memory" in str(e):
                raise
            _MM_OUT_DTYPE[kind] = False
    product = torch.mm(a, b)
    return out.add_(product) if accumulate else out.copy_(product)


def inverse_norms(rows: Tensor, dtype: torch.dtype, eps: float = 1e-12) -> Tensor:
    """``1 / max(|row|, eps)`` per row of ``rows`` in ``dtype``, with no temporary beyond the result."""
    return torch.linalg.vector_norm(rows, dim=1, dtype=dtype).clamp_min_(eps).reciprocal_()


def clamped(inv_norm: Tensor, eps: float = 1e-12) -> Tensor:
    """Which rows had ``|row| <= eps``: their inverse norm is ``1 / eps`` exactly (``F.normalize``'s clamp,
    where the normalization is linear and its backward drops the projection)."""
    limit = torch.full((), eps, dtype=inv_norm.dtype, device=inv_norm.device).reciprocal_()
    return inv_norm >= limit


class Prepared:
    """One call's inputs and the quantities derived from them.

    ``xh`` is ``x`` normalized (or ``x`` itself) in the accumulation dtype,
    computed on first use; ``inv_x``/``inv_w`` the inverse norms
    ``1 / max(|.|, eps)`` that came with the call (None with ``normalize=False``). ``y`` holds the
    global labels, ``y_local`` the labels relative to the weight's first row
    and ``in_range`` which rows' targets are among this weight's rows;
    ``logit_scale`` (B,) is each row's factor on its cosines, ``s`` times the
    call's per-row scale. Nothing here is ``C x D``: passes over ``W`` walk it
    in chunks of :attr:`pass_chunk` classes.
    """

    #: Whether the backend multiplies per-row scales (``Call.row_scale``); a backend that does not is
    #: refused such calls here, never silently ignoring them.
    row_scale_supported = False

    def __init__(self, call: Call):
        opts = call.opts
        if call.row_scale is not None and not self.row_scale_supported:
            raise NotImplementedError("per-row scales (Call.row_scale) are not implemented by this backend yet")
        self.call = call
        self.opts = opts
        self.x, self.W, self.y = call.x, call.W, call.y
        self.acc = acc_dtype(call.x.dtype, call.W.dtype)
        self.B, self.D = call.x.shape
        self.k = opts.sub_centers
        self.n_rows = call.W.shape[0]  # rows of W: classes times sub-centres
        self.C = opts.classes_of(self.n_rows)  # classes of this range
        self.C_total = opts.total_classes(self.C)
        self.y_local = self.y - opts.class_start
        self.in_range = (self.y_local >= 0) & (self.y_local < self.C)
        elt = torch.finfo(self.acc).bits // 8
        self.pass_chunk = max(1, min(self.n_rows, PASS_CHUNK, opts.budget // max(1, 2 * self.D * elt)))
        self.inv_x, self.inv_w = call.inv_x, call.inv_w
        if call.row_scale is None:
            self.logit_scale = torch.full((self.B,), opts.scale, device=call.x.device, dtype=self.acc)
        else:
            if call.row_scale.shape != (self.B,):
                raise ValueError(f"row_scale must have shape ({self.B},), got {tuple(call.row_scale.shape)}")
            self.logit_scale = call.row_scale.to(self.acc) * opts.scale
        self._xh: Optional[Tensor] = None
        self._class_sum: Optional[Tensor] = None

    @property
    def xh(self) -> Tensor:
        """``x`` normalized (or ``x`` itself), accumulation dtype, contiguous; cached for the call."""
        if self._xh is None:
            xh = self.x.to(self.acc, copy=True, memory_format=torch.contiguous_format)
            self._xh = xh if self.inv_x is None else xh.mul_(self.inv_x.unsqueeze(1))
        return self._xh

    def w_tile(self, c0: int, c1: int) -> Tensor:
        """Raw ``W[c0:c1]`` in the accumulation dtype."""
        return self.W[c0:c1].to(self.acc)

    def chunks(self):
        """``(c0, c1)`` ranges of :attr:`pass_chunk` rows of ``W`` (classes, or sub-centres)."""
        for c0 in range(0, self.n_rows, self.pass_chunk):
            yield c0, min(c0 + self.pass_chunk, self.n_rows)

    def class_sum(self) -> Tensor:
        """``sum_j wh_j`` (D,) over this weight's rows, for label smoothing (computed once per call)."""
        if self._class_sum is None:
            total = torch.zeros(self.D, device=self.W.device, dtype=self.acc)
            for c0, c1 in self.chunks():
                wt = self.w_tile(c0, c1)
                total += wt.sum(0) if self.inv_w is None else self.inv_w[c0:c1] @ wt
            self._class_sum = total
        return self._class_sum

    def w_clamped(self, c0: int, c1: int) -> Tensor:
        """:func:`clamped` for classes ``[c0, c1)`` (computed per chunk: no ``C``-sized mask)."""
        return clamped(self.inv_w[c0:c1], self.opts.eps)

    def target_index(self) -> Tensor:
        """Each row's target row of ``W``, clamped into range (valid only where :attr:`in_range`; one
        row per class: label smoothing, the only user, is not combined with sub-centres)."""
        return self.y_local.clamp(0, max(self.C - 1, 0))

    def target_rows(self) -> Tensor:
        """``wh_{y_i}`` (B, D), normalized (or raw), accumulation dtype; zero rows where the target
        lies outside this weight's range."""
        idx = self.target_index()
        wy = self.W.index_select(0, idx).to(self.acc)
        factor = self.in_range.to(self.acc)
        if self.inv_w is not None:
            factor = factor * self.inv_w[idx]
        return wy * factor.unsqueeze(1)

    def target_logit(self) -> Tensor:
        """``s_i * t_i`` per row (``s_i``: :attr:`logit_scale`) where the target is in range, else 0 (B x D
        work)."""
        return self.logit_scale * (self.xh * self.target_rows()).sum(1)

    def logit_sum(self, target_logit: Optional[Tensor] = None) -> Tensor:
        """Sum of the range's non-target logits per row: ``s_i xh_i . sum_j wh_j`` less the target's; an
        empty (0,) tensor without label smoothing (the statistic is only needed for it).

        ``target_logit`` (``s_i * t_i`` where in range, 0 elsewhere) is taken from the
        caller when it has it, else recomputed.
        """
        if self.opts.label_smoothing <= 0:
            return self.empty()
        if target_logit is None:
            target_logit = self.target_logit()
        return self.logit_scale * (self.xh @ self.class_sum()) - target_logit

    def empty(self, dtype=None) -> Tensor:
        """A (0,) tensor: the stand-in for a statistic that was not asked for."""
        return torch.zeros(0, device=self.x.device, dtype=dtype or self.acc)
