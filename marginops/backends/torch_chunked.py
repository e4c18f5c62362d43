"""Pure-PyTorch fused backend: margin softmax cross-entropy in class tiles of ATen operations, any device.

Never allocates anything of size ``B x C``. Planning, row blocks, strategies,
statistics merging and the gradient loop are the tile engine's
(:mod:`marginops.backends.engine`); this module supplies the work on one row
block: a loop over class tiles (``rows x chunk`` logits), each produced by
one GEMM against the tile's weight rows normalized once (``chunk x D``,
cheaper than scaling the ``rows x chunk`` tile), then a few elementwise
ATen passes while the tile is in cache.

* **CPU** (:func:`~marginops.backends.engine.cpu_tiling`): products in the
  accumulation dtype (float32, float64 for float64 inputs); probabilities
  below ``finfo.tiny`` are flushed to zero before any GEMM and ``exp`` is
  never fed arguments whose result would be subnormal: both are 10-50x
  slow paths on some CPUs (``docs/design.md``, numerics).
* **GPU** (:func:`~marginops.backends.engine.gpu_tiling`): large tiles (row
  blocks of up to 16,384 rows against thousands of classes), products in the
  weight's dtype with float32 results (``torch.mm(..., out_dtype=...)`` where
  PyTorch offers it, else a 16-bit product accumulated into float32: never a
  16-bit product multiplied in float32), no host synchronisation per tile.
  The engine's docstring has the performance model.

The module-level functions at the end implement
:class:`marginops.backends.interface.Backend`, class ranges included (a label
outside the weight's range never matches a column); sub-centres,
inter-class filtering, gradient filtering and per-row scales included.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import engine
from .common import acc_dtype, clamped, gemm_into, normalize_backward
from .engine import BlockGrads, BlockStats, Plan, RowBlockKernel
from .interface import Call, FusedOptions

__all__ = ["weight_grad_dtype", "uses_workspace", "forward_stats", "forward_with_grads", "recompute_grads"]


class _TorchTiles(RowBlockKernel):
    """One call: the shared per-call quantities plus this backend's tile operations."""

    def __init__(self, call: Call):
        super().__init__(call)
        self.tiling_ = self.tiling()
        gpu = self.tiling_.gpu
        #: dtype of the GEMM operands: the accumulation dtype on CPUs; on GPUs the weight's (tensor cores,
        #: float32 results), float64 staying float64
        self.op = self.W.dtype if gpu and self.acc != torch.float64 else self.acc
        self.flush = self.tiling_.flush_subnormals
        self.floor = engine.exp_floor(self.acc)
        self.tiny = torch.finfo(self.acc).tiny
        thr = self.opts.filter_threshold
        # inter-class filtering compares logits: s_i cos > s_i * threshold
        self.filter_logit = None if thr is None else self.logit_scale * thr
        self._xs: Optional[Tensor] = None
        self._scratch: Optional[Tensor] = None
        self._raw: Optional[Tensor] = None

    def tiling(self) -> engine.Tiling:
        if self.device.kind == "gpu":
            return engine.gpu_tiling(self.device)
        return engine.cpu_tiling(self.device, per_worker=False)

    def tile_bytes(self, strategy: str) -> int:
        """Per row and class: a 16-bit copy of each tile for the products (GPUs); recomputed tiles also
        hold their float32 logits, and with sub-centres the ``k`` sub-centre logits."""
        acc_b = torch.finfo(self.acc).bits // 8
        op_b = torch.finfo(self.op).bits // 8 if self.op != self.acc else 0
        if strategy == "workspace":
            return op_b
        k = self.k
        return acc_b * (1 + k if k > 1 else 1) + op_b * k

    # -- operands --

    @property
    def xs(self) -> Tensor:
        """``s_i * xh_i``, the left operand of every logits GEMM, in the products' dtype; cached."""
        if self._xs is None:
            self._xs = (self.xh * self.logit_scale.unsqueeze(1)).to(self.op)
        return self._xs

    def w_rows(self, w0: int, w1: int, dtype: Optional[torch.dtype] = None) -> Tensor:
        """Rows ``[w0, w1)`` of ``W`` normalized (or raw), in ``dtype`` (default: the products')."""
        wt = self.W[w0:w1].to(self.acc)
        if self.inv_w is not None:
            wt = wt * self.inv_w[w0:w1].unsqueeze(1)
        return wt.to(dtype or self.op)

    def scratch(self, size: int) -> Tensor:
        if self._scratch is None or self._scratch.numel() < size:
            self._scratch = torch.empty(size, device=self.W.device, dtype=self.acc)
        return self._scratch[:size]

    def raw(self, size: int) -> Optional[Tensor]:
        """Flat scratch for the sub-centre logits of a tile (None without sub-centres)."""
        if self.k == 1:
            return None
        if self._raw is None or self._raw.numel() < size:
            self._raw = torch.empty(size, device=self.W.device, dtype=self.acc)
        return self._raw[:size]

    # -- tile operations --

    def logits_tile(self, out: Tensor, r0: int, r1: int, c0: int, c1: int, wt: Tensor, raw: Optional[Tensor],
                    want_sub: bool = False) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """Fill ``out`` (r x c) with the class logits ``s_i * cos``, the target column set to -inf.

        ``wt`` holds the normalized rows of classes ``[c0, c1)``. With sub-centres the ``r x (c k)``
        sub-centre logits go to ``raw`` and each class takes the largest of its ``k``. Returns ``(index,
        in_tile, target_value, sub)``: each row's target column clamped into the tile, whether it really
        lies there, the logit that was there before masking, and (sub-centres with ``want_sub``, else
        None) the ``r x c x 1`` index of the sub-centre each class logit came from (the first maximum).
        """
        sub = None
        if self.k == 1:
            gemm_into(out, self.xs[r0:r1], wt.t())
        else:
            R, n, k = r1 - r0, c1 - c0, self.k
            rl = raw[: R * n * k].view(R, n * k)
            gemm_into(rl, self.xs[r0:r1], wt.t())
            r3 = rl.view(R, n, k)
            # elementwise over the k strided slices (a reduction over a size-k inner dim is slow)
            out.copy_(r3[:, :, 0])
            if want_sub:
                sub = torch.zeros(R, n, 1, device=out.device, dtype=torch.uint8)
            for r in range(1, k):
                cur = r3[:, :, r]
                if want_sub:  # strictly greater: the first maximum stays
                    sub = torch.where((cur > out).unsqueeze(2), r, sub)
                torch.maximum(out, cur, out=out)
        y = self.y_local[r0:r1]
        idx = (y - c0).clamp_(0, c1 - c0 - 1).unsqueeze(1)
        in_tile = (y >= c0) & (y < c1)
        before = out.gather(1, idx).squeeze(1)
        masked = torch.where(in_tile, torch.full_like(before, -math.inf), before)
        out.scatter_(1, idx, masked.unsqueeze(1))
        return idx, in_tile, before, sub

    def filter_tile(self, out: Tensor, r0: int, r1: int, fill: bool = True) -> Optional[Tensor]:
        """Inter-class filtering: the mask of non-target logits above ``s_i * threshold`` (None without
        filtering); with ``fill`` they become -inf in place (before a max; :meth:`exp_tile` zeroes them
        after the exponential either way)."""
        if self.filter_logit is None:
            return None
        mask = out > self.filter_logit[r0:r1].unsqueeze(1)  # the target column is -inf already: never filtered
        if fill:
            out.masked_fill_(mask, -math.inf)
        return mask

    def exp_tile(self, out: Tensor, shift: Tensor, idx: Tensor, in_tile: Tensor,
                 filtered: Optional[Tensor] = None) -> None:
        """``out = exp(out - shift)`` in place with the target column (and ``filtered`` entries) exactly 0."""
        out.sub_(shift.unsqueeze(1))
        if self.flush:
            out.clamp_min_(self.floor)
        out.exp_()
        kept = out.gather(1, idx).squeeze(1)
        out.scatter_(1, idx, torch.where(in_tile, torch.zeros_like(kept), kept).unsqueeze(1))
        if filtered is not None:
            out.masked_fill_(filtered, 0.0)

    def spread(self, p: Tensor, sub: Optional[Tensor], raw: Optional[Tensor]) -> Tensor:
        """Class-tile weights ``p`` (r x c) as weights of the rows of ``W``: ``p`` itself, or with
        sub-centres an ``r x (c k)`` tile (in ``raw``) holding each class's weight at the sub-centre
        its logit came from and 0 at the others."""
        if sub is None:
            return p
        R, n = p.shape
        out = raw[: R * n * self.k].view(R, n, self.k)
        at = sub == torch.arange(self.k, device=sub.device, dtype=sub.dtype)  # (r, c, k) one-hot
        torch.mul(p.unsqueeze(2), at, out=out)
        return out.view(R, n * self.k)

    def grad_tile(self, p: Tensor, factor: Tensor, w0: int, w1: int, wt: Tensor, r0: int, r1: int,
                  dxh: Optional[Tensor], dD: Optional[Tensor]) -> None:
        """Accumulate both GEMMs for ``G = factor_i * p`` from a tile ``p >= 0`` over rows ``[w0, w1)``.

        The signed per-row factor is applied on the small ``rows x D`` side of
        each GEMM, so the big tile stays non-negative (its entries are
        exponentials clamped above the subnormal range, or 0).
        """
        pg = p if p.dtype == self.op else p.to(self.op)
        f = factor.unsqueeze(1)
        if dxh is not None:
            prod = gemm_into(torch.empty(r1 - r0, self.D, device=p.device, dtype=self.acc), pg, wt)
            dxh[r0:r1].addcmul_(prod, f)
        if dD is not None:
            xf = self.xh[r0:r1] * f
            if self.flush:
                xf.masked_fill_(xf.abs() < self.tiny, 0.0)
            gemm_into(dD[w0:w1], pg.t(), xf.to(self.op), accumulate=True)

    # -- the row block (engine interface) --

    def forward_block(self, r0: int, r1: int, pl: Plan, workspace: Optional[Tensor]) -> BlockStats:
        R, k = r1 - r0, self.k
        T = math.ceil(self.C / pl.chunk)
        dev, acc = self.W.device, self.acc
        want = self.opts.want_prediction
        shift = torch.empty(R, T, device=dev, dtype=acc)
        sumexp = torch.empty(R, T, device=dev, dtype=acc)
        best = torch.empty(R, T, device=dev, dtype=acc) if want else None
        index = torch.empty(R, T, device=dev, dtype=torch.int64) if want else None
        target = torch.zeros(R, device=dev, dtype=acc)
        raw = self.raw(R * pl.chunk * k)
        for kk, c0, c1 in self.tiles(pl):
            n = c1 - c0
            buf = workspace[kk * R * pl.chunk:][: R * n] if workspace is not None else self.scratch(R * n)
            tile = buf.view(R, n)
            idx, in_tile, before, _ = self.logits_tile(tile, r0, r1, c0, c1, self.w_rows(c0 * k, c1 * k), raw)
            target = torch.where(in_tile, before, target)
            if want:
                mx, am = tile.max(1)  # non-target only; the engine compares the target
                best[:, kk] = mx
                index[:, kk] = am + c0
            filtered = self.filter_tile(tile, r0, r1)  # after the prediction: it sees every class
            if not want or filtered is not None:
                mx = tile.amax(1)
            self.exp_tile(tile, torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx)), idx, in_tile, filtered)
            shift[:, kk] = mx  # -inf where the tile held only the target (or only filtered classes)
            sumexp[:, kk] = tile.sum(1)
        return BlockStats(shift, sumexp, best, index, None, target)

    def gradient_block(self, r0: int, r1: int, pl: Plan, grads: BlockGrads, workspace: Optional[Tensor],
                       dxh: Optional[Tensor], dD: Optional[Tensor]) -> None:
        R, k = r1 - r0, self.k
        keep = grads.keep.tolist() if grads.keep is not None else None  # one read per row block
        cutoff = self.opts.gradient_filter
        raw = self.raw(R * pl.chunk * k)
        for kk, c0, c1 in self.tiles(pl):
            n = c1 - c0
            if workspace is not None:
                if keep is not None and not keep[kk]:
                    continue
                p = workspace[kk * R * pl.chunk:][: R * n].view(R, n)
                factor = grads.tile_coef[:, kk]
                wt = self.w_rows(c0 * k, c1 * k)
            else:
                tile = self.scratch(R * n).view(R, n)
                wt = self.w_rows(c0 * k, c1 * k)
                idx, in_tile, _, sub = self.logits_tile(tile, r0, r1, c0, c1, wt, raw, want_sub=True)
                filtered = self.filter_tile(tile, r0, r1, fill=False)  # exp may overflow there: zeroed after
                self.exp_tile(tile, grads.lse, idx, in_tile, filtered)
                if cutoff is not None and bool(tile.amax() < cutoff):  # a host read: the opt-in's price
                    continue
                # with sub-centres each class's weight goes to the sub-centre its logit came from
                p, factor = self.spread(tile, sub, raw), grads.coef
            self.grad_tile(p, factor, c0 * k, c1 * k, wt, r0, r1, dxh, dD)

    def finish_grads(self, coef: Tensor, dxh: Optional[Tensor], dD: Optional[Tensor]) -> None:
        """Label smoothing's rank-1 term, then the normalization backward of ``W`` chunk by chunk."""
        self._smoothing_grads(coef, dxh, dD)
        if dD is not None and self.inv_w is not None:
            for c0, c1 in self.chunks():
                inv = self.inv_w[c0:c1]
                normalize_backward(self.w_rows(c0, c1, self.acc), inv, clamped(inv, self.opts.eps), dD[c0:c1])

    def _smoothing_grads(self, coef: Tensor, dxh: Optional[Tensor], dD: Optional[Tensor]) -> None:
        """Rank-1 gradient of ``-(eps/C) * sum_{j != y} s_i cos_ij`` into dxh and dD (in place)."""
        eps = self.opts.label_smoothing
        if eps <= 0:
            return
        rows = (-eps / self.C_total) * coef  # (B,)
        if dxh is not None:
            dxh.add_(rows.unsqueeze(1) * (self.class_sum().unsqueeze(0) - self.target_rows()))
        if dD is not None:
            gx = rows.unsqueeze(1) * self.xh  # (B, D)
            dD.add_(gx.sum(0))
            own = self.in_range.to(gx.dtype)  # targets in another range are not among these rows
            # sort-based on CUDA (index_add_ would use atomics): reproducible with duplicate labels
            dD.index_put_((self.target_index(),), -gx * own.unsqueeze(1), accumulate=True)


_ENGINE = engine.Engine(_TorchTiles)


# -- the backend interface (marginops.backends.interface.Backend) -------------------------------------


def weight_grad_dtype(x_dtype: torch.dtype, W_dtype: torch.dtype, opts: FusedOptions) -> torch.dtype:
    """``dW`` is accumulated and returned in the accumulation dtype (float32, or float64)."""
    return acc_dtype(x_dtype, W_dtype)


#: The engine's functions of the interface: the strategy rule, the forward, the forward with the gradients
#: (the workspace strategy) and the recompute strategy's gradients (:class:`~marginops.backends.engine.Engine`).
uses_workspace = _ENGINE.uses_workspace
forward_stats = _ENGINE.forward_stats
forward_with_grads = _ENGINE.forward_with_grads
recompute_grads = _ENGINE.recompute_grads
