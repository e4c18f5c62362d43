"""Pure-PyTorch fused backend: margin softmax cross-entropy chunked over classes.

Never allocates anything of size ``B x C``. The logits are produced tile by
tile (``rows x chunk_size``) with ``torch.mm`` against the raw weight, the
inverse class norms are folded into each tile (no normalized copy of ``W`` is
written), and every elementwise step runs on a tile while it is in cache.

The module-level functions at the end implement
:class:`marginops.backends.interface.Backend`, class ranges included (a
label outside the weight's range never matches a column). Two strategies,
picked per call by :func:`plan`:

* ``"fused"`` (three GEMMs): for ``reduction`` ``"mean"``/``"sum"`` with
  gradients required, each row block's logits over *all* classes are kept in
  a workspace bounded by the memory budget; once the block's log-sum-exp is
  known, ``dX`` and ``dW`` are computed during the forward pass and the
  backward only multiplies them by the incoming scalar gradient.
* ``"recompute"`` (four GEMMs): the forward keeps only per-row statistics and
  the backward recomputes each tile. Used for ``reduction="none"``, for
  forward-only calls (one GEMM), and when a row block across all classes
  does not fit the budget.

Probabilities below ``finfo.tiny`` are flushed to zero before any GEMM and
``exp`` is never fed arguments whose result would be subnormal: both are
10-50x slow paths on some CPUs (``docs/design.md``, numerics).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import Prepared, acc_dtype
from .interface import Call, FusedOptions, RowStats

# Tile sizes, tuned on a 2-core AMD EPYC (Zen 5) at B=1024, D=512, C=100k fp32
# (`python -m benchmarks run targets`); a tile of logits stays within a few MiB.
#: Classes per tile of the fused strategy (its rows are set by the budget).
FUSED_CHUNK = 4096
#: Fewer rows per block than this and the fused strategy's rank-R updates of
#: dW (all of dW read and written once per block) cost more than the GEMM the
#: strategy saves: recompute instead. Measured: 80-row blocks ran at 1.47x the
#: three-GEMM floor, recompute at 1.35x, 256-row blocks at 1.09x.
MIN_FUSED_ROWS = 128
#: Tile of the recompute strategy: rows x classes.
RECOMPUTE_ROWS = 512
RECOMPUTE_CHUNK = 2048


@dataclass(frozen=True)
class Plan:
    strategy: str  # "fused" | "recompute"
    rows: int  # rows per block
    chunk: int  # classes per tile
    workspace_bytes: int


def plan(batch: int, num_classes: int, element_size: int, opts: FusedOptions, fused_wanted: bool) -> Plan:
    """Choose the strategy and tile sizes for one call within ``opts.budget``.

    ``opts.strategy="auto"``: fused when gradients are wanted for a scalar
    reduction and a block of at least ``min(batch, MIN_FUSED_ROWS)`` rows
    across all classes fits the budget; blocks are then evened out
    (``ceil(B / blocks)`` rows each). Otherwise recompute, with tiles shrunk
    to fit the budget. ``"workspace"`` takes the fused strategy whenever it
    applies, with as few rows as fit (a ValueError if not even one row
    does); ``"recompute"`` never takes it.
    """
    budget = opts.budget
    if fused_wanted and opts.strategy != "recompute":
        chunk = min(opts.chunk_size or FUSED_CHUNK, max(num_classes, 1))
        padded = math.ceil(num_classes / chunk) * chunk
        rows = min(batch, budget // max(padded * element_size, 1))
        least = 1 if opts.strategy == "workspace" else max(1, min(batch, MIN_FUSED_ROWS))
        if rows >= least:
            rows = math.ceil(batch / math.ceil(batch / rows))  # even blocks: no thin last block
            return Plan("fused", rows, chunk, rows * padded * element_size)
        if opts.strategy == "workspace":
            raise ValueError(
                f"strategy='workspace' needs memory_budget >= {padded * element_size} bytes (one row of logits "
                f"across all {num_classes} classes), got memory_budget={budget}"
            )
    chunk = min(opts.chunk_size or RECOMPUTE_CHUNK, max(num_classes, 1))
    rows = max(1, min(batch, RECOMPUTE_ROWS))
    chunk = max(1, min(chunk, budget // max(rows * element_size, 1)))  # shrink the chunk before the rows
    return Plan("recompute", rows, chunk, rows * chunk * element_size)


def _exp_floor(dtype: torch.dtype) -> float:
    """Most negative argument whose ``exp`` is still a normal number."""
    return math.log(torch.finfo(dtype).tiny) + 0.5


class _Prepared(Prepared):
    """The shared per-call quantities plus this backend's tile operations."""

    def __init__(self, call: Call):
        super().__init__(call)
        self.floor = _exp_floor(self.acc)
        self.tiny = torch.finfo(self.acc).tiny
        self._xs: Optional[Tensor] = None
        if self.opts.gradient_filter is not None:  # not yet implemented here: never silently exact
            raise NotImplementedError(f"gradient_filter is not implemented by this backend yet "
                                      f"(gradient_filter={self.opts.gradient_filter})")
        thr = self.opts.filter_threshold
        # inter-class filtering compares logits: s * cos > s * threshold
        self.filter_logit = None if thr is None else self.opts.scale * thr

    @property
    def xs(self) -> Tensor:
        """``s * xh``, the left operand of every logits GEMM; cached for the call."""
        if self._xs is None:
            self._xs = self.xh * self.opts.scale
        return self._xs

    def finish_w_grad(self, dD: Tensor, c0: int, c1: int) -> Tensor:
        """In place for classes ``[c0, c1)``: ``dD_j = inv_w_j * dwh_j`` becomes
        ``dW_j = dD_j - W_j inv_w_j^2 (W_j . dD_j)``."""
        if self.inv_w is not None:
            inv = self.inv_w[c0:c1]
            coef = torch.where(self.w_clamped(c0, c1), torch.zeros_like(inv), inv * inv)
            wt = self.w_tile(c0, c1)
            dots = torch.bmm(dD.unsqueeze(1), wt.unsqueeze(2)).view(-1)
            dD.addcmul_(wt, (dots * coef).unsqueeze(1), value=-1.0)
        return dD

    def finish_w_grads(self, dD: Tensor) -> Tensor:
        """:meth:`finish_w_grad` over all classes (``dD`` is ``C x D``), chunk by chunk, in place."""
        if self.inv_w is not None:
            for c0, c1 in self.chunks():
                self.finish_w_grad(dD[c0:c1], c0, c1)
        return dD

    def w_class_tile(self, c0: int, c1: int) -> Tensor:
        """The rows of ``W`` of classes ``[c0, c1)`` (all their sub-centres), accumulation dtype."""
        return self.w_tile(c0 * self.k, c1 * self.k)

    def logits_tile(self, out: Tensor, r0: int, r1: int, c0: int, c1: int, wt: Tensor,
                    raw: Optional[Tensor] = None, want_sub: bool = False) -> tuple[Tensor, Tensor, Tensor,
                                                                                   Optional[Tensor]]:
        """Fill ``out`` (r x c) with the class logits ``s * cos``, the target column set to -inf.

        ``wt`` holds the rows of classes ``[c0, c1)`` (:meth:`w_class_tile`). With
        sub-centres the ``r x (c k)`` sub-centre logits go to ``raw`` (flat scratch) and each class
        takes the largest of its ``k``. Returns ``(index, in_tile, target_value, sub)``: each row's
        target column clamped into the tile, whether it really lies there, the logit that was there
        before masking, and (sub-centres with ``want_sub``, else None) the ``r x c x 1`` index of the
        sub-centre each class logit came from (the first maximum).
        """
        sub = None
        if self.k == 1:
            torch.mm(self.xs[r0:r1], wt.t(), out=out)
            if self.inv_w is not None:
                out.mul_(self.inv_w[c0:c1])
        else:
            R, n, k = r1 - r0, c1 - c0, self.k
            rl = raw[: R * n * k].view(R, n * k)
            torch.mm(self.xs[r0:r1], wt.t(), out=rl)
            if self.inv_w is not None:
                rl.mul_(self.inv_w[c0 * k:c1 * k])
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

    def filter_tile(self, out: Tensor, fill: bool = True) -> Optional[Tensor]:
        """Inter-class filtering: the mask of non-target logits above ``s * threshold`` (None without
        filtering); with ``fill`` they become -inf in place (before a max; :meth:`exp_tile` zeroes
        them after the exponential either way)."""
        if self.filter_logit is None:
            return None
        mask = out > self.filter_logit  # the target column is -inf already: never filtered
        if fill:
            out.masked_fill_(mask, -math.inf)
        return mask

    def exp_tile(self, out: Tensor, shift: Tensor, idx: Tensor, in_tile: Tensor,
                 filtered: Optional[Tensor] = None) -> None:
        """``out = exp(out - shift)`` in place with the target column (and ``filtered`` entries) exactly 0."""
        out.sub_(shift.unsqueeze(1)).clamp_min_(self.floor).exp_()
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

    def grad_tile(self, p: Tensor, row_scale: Tensor, c0: int, c1: int, wt: Tensor, r0: int, r1: int,
                  dxh: Optional[Tensor], dD: Optional[Tensor]) -> None:
        """Accumulate both GEMMs for ``G = row_scale * p * inv_w`` from an exp tile ``p`` (>= 0).

        The signed per-row scale is applied on the small ``rows x D`` side of
        each GEMM, so the big tile stays non-negative and one threshold pass
        flushes its subnormals.
        """
        if self.inv_w is not None:
            p.mul_(self.inv_w[c0:c1])
            F.threshold_(p, self.tiny, 0.0)  # flush subnormals before the GEMMs
        f = row_scale.unsqueeze(1)
        if dxh is not None:
            dxh[r0:r1].addcmul_(torch.mm(p, wt), f)
        if dD is not None:
            xf = self.xh[r0:r1] * f
            xf.masked_fill_(xf.abs() < self.tiny, 0.0)
            dD[c0:c1].addmm_(p.t(), xf)

    # -- passes ---------------------------------------------------------------------------------

    def tiles(self, pl: "Plan"):
        for r0 in range(0, self.B, pl.rows):
            r1 = min(r0 + pl.rows, self.B)
            yield r0, r1, [(c0, min(c0 + pl.chunk, self.C)) for c0 in range(0, self.C, pl.chunk)]


def _combine(m_tiles: Tensor, s_tiles: Tensor) -> Tensor:
    """log-sum-exp over tiles from per-tile (shift, sum) pairs, shape (R, T) each."""
    M = m_tiles.amax(1, keepdim=True)
    M = torch.where(torch.isfinite(M), M, torch.zeros_like(M))  # rows with no non-target class
    return M.squeeze(1) + torch.log((s_tiles * torch.exp(m_tiles - M)).sum(1))


class _RunningPrediction:
    """Argmax of ``s * cos`` over all classes, first index on ties, tile by tile."""

    def __init__(self, rows: int, device, dtype):
        self.best = torch.full((rows,), -math.inf, device=device, dtype=dtype)
        self.index = torch.zeros(rows, device=device, dtype=torch.int64)

    def update(self, values: Tensor, indices: Tensor, c0: int) -> None:
        better = values > self.best
        self.best = torch.where(better, values, self.best)
        self.index = torch.where(better, indices + c0, self.index)

    def finish(self, target: Tensor, y_local: Tensor, in_range: Tensor) -> tuple[Tensor, Tensor]:
        """``(max, local argmax)`` with each row's target logit (where in range) taken into account."""
        take = in_range & ((target > self.best) | ((target == self.best) & (y_local < self.index)))
        return torch.where(take, target, self.best), torch.where(take, y_local, self.index)


def _row_block_stats(prep: _Prepared, r0: int, r1: int, cols, pl: Plan, store: Optional[Tensor], want_pred: bool):
    """Process one row block across all classes.

    Returns ``(m_tiles, s_tiles, target, pred)``: per-tile shifts and sums of
    ``exp(logit - shift)`` over non-target classes, each row's target logit
    ``s * t`` as the GEMM produced it, and the running prediction. With
    ``store`` the exp'd tiles stay there (tile k at offset ``k * rows * chunk``).
    """
    R = r1 - r0
    T = len(cols)
    dev, acc = prep.W.device, prep.acc
    m_tiles = torch.empty(R, T, device=dev, dtype=acc)
    s_tiles = torch.empty(R, T, device=dev, dtype=acc)
    target = torch.zeros(R, device=dev, dtype=acc)
    pred = _RunningPrediction(R, dev, acc) if want_pred else None
    scratch = None if store is not None else torch.empty(R * pl.chunk, device=dev, dtype=acc)
    raw = torch.empty(R * pl.chunk * prep.k, device=dev, dtype=acc) if prep.k > 1 else None
    for k, (c0, c1) in enumerate(cols):
        buf = store[k * pl.rows * pl.chunk:][: R * (c1 - c0)] if store is not None else scratch[: R * (c1 - c0)]
        tile = buf.view(R, c1 - c0)
        wt = prep.w_class_tile(c0, c1)
        idx, in_tile, before, _ = prep.logits_tile(tile, r0, r1, c0, c1, wt, raw)
        target = torch.where(in_tile, before, target)
        if pred is not None:
            mx, am = tile.max(1)  # non-target only; the target is compared in finish()
            pred.update(mx, am, c0)
        filtered = prep.filter_tile(tile)  # after the prediction: it sees every class
        if pred is None or filtered is not None:
            mx = tile.amax(1)
        shift = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        prep.exp_tile(tile, shift, idx, in_tile, filtered)
        m_tiles[:, k] = mx  # -inf where the tile held only the target
        s_tiles[:, k] = tile.sum(1)
    return m_tiles, s_tiles, target, pred


def _smoothing_grads(prep: _Prepared, g: Tensor, dxh: Optional[Tensor], dD: Optional[Tensor]) -> None:
    """Rank-1 gradient of ``-(eps/C) * sum_{j != y} s * cos_ij`` into dxh and dD (in place)."""
    eps = prep.opts.label_smoothing
    if eps <= 0:
        return
    coef = -prep.opts.scale * eps / prep.C_total
    inv_w = prep.inv_w
    if dxh is not None:
        dxh.add_((coef * g).unsqueeze(1) * (prep.class_sum().unsqueeze(0) - prep.target_rows()))
    if dD is not None:
        gx = (coef * g).unsqueeze(1) * prep.xh  # (B, D)
        col = inv_w if inv_w is not None else torch.ones(prep.C, device=gx.device, dtype=gx.dtype)
        dD.addr_(col, gx.sum(0))
        idx = prep.target_index()
        own = col[idx] * prep.in_range.to(col.dtype)  # targets in another range are not among these rows
        # sort-based on CUDA (index_add_ would use atomics): reproducible with duplicate labels
        dD.index_put_((idx,), -gx * own.unsqueeze(1), accumulate=True)


def _forward(prep: _Prepared, pl: Plan, want_pred: bool, store: Optional[Tensor] = None, block_done=None):
    """One pass over all tiles, row block by row block.

    Returns the range's :class:`RowStats`. With ``store`` the exp'd tiles of
    each block stay there and ``block_done(r0, r1, cols, m_tiles, N_block)``
    runs before the next block overwrites them.
    """
    B = prep.B
    N = torch.empty(B, device=prep.W.device, dtype=prep.acc)
    target = torch.empty_like(N)  # s * t as the GEMM produced it; 0 where the target is in another range
    best = torch.empty_like(N) if want_pred else prep.empty()
    arg = torch.empty(B, device=N.device, dtype=torch.int64) if want_pred else prep.empty(torch.int64)
    for r0, r1, cols in prep.tiles(pl):
        m_t, s_t, tgt, rp = _row_block_stats(prep, r0, r1, cols, pl, store, want_pred)
        N[r0:r1] = _combine(m_t, s_t)
        target[r0:r1] = tgt
        if rp is not None:
            best[r0:r1], arg[r0:r1] = rp.finish(tgt, prep.y_local[r0:r1], prep.in_range[r0:r1])
        if block_done is not None:
            block_done(r0, r1, cols, m_t, N[r0:r1])
    if want_pred:
        arg += prep.opts.class_start
    return RowStats(N, best, arg, prep.logit_sum(target))


def _forward_fused(prep: _Prepared, pl: Plan, z: Tensor, g: Tensor):
    """Forward with gradients for upstream row weights ``g``: three GEMMs."""
    B, dev, acc = prep.B, prep.W.device, prep.acc
    store = torch.empty(pl.workspace_bytes // (torch.finfo(acc).bits // 8), device=dev, dtype=acc)
    dxh = torch.zeros(B, prep.D, device=dev, dtype=acc) if prep.opts.need_x else None
    dD = torch.zeros(prep.n_rows, prep.D, device=dev, dtype=acc) if prep.opts.need_W else None
    zf = z.to(acc)
    g = g.to(acc)

    def gradients(r0, r1, cols, m_t, N_block):
        lse = torch.logaddexp(N_block, zf[r0:r1])
        R = r1 - r0
        for k, (c0, c1) in enumerate(cols):
            tile = store[k * pl.rows * pl.chunk:][: R * (c1 - c0)].view(R, c1 - c0)
            row_scale = g[r0:r1] * prep.opts.scale * torch.exp(m_t[:, k] - lse)
            prep.grad_tile(tile, row_scale, c0, c1, prep.w_class_tile(c0, c1), r0, r1, dxh, dD)

    stats = _forward(prep, pl, prep.opts.want_prediction, store, gradients)
    _smoothing_grads(prep, g, dxh, dD)
    return stats, dxh, prep.finish_w_grads(dD) if dD is not None else None


# -- the backend interface (marginops.backends.interface.Backend) -------------------------------------


def weight_grad_dtype(x_dtype: torch.dtype, W_dtype: torch.dtype, opts: FusedOptions) -> torch.dtype:
    """``dW`` is accumulated and returned in the accumulation dtype (float32, or float64)."""
    return acc_dtype(x_dtype, W_dtype)


def _plan(B: int, C: int, x_dtype: torch.dtype, W_dtype: torch.dtype, opts: FusedOptions, grads: bool) -> Plan:
    """The plan for ``C`` classes (sub-centre tiles count ``1 + k`` elements per class: the ``k``
    sub-centre logits and the class logit)."""
    elt = torch.finfo(acc_dtype(x_dtype, W_dtype)).bits // 8
    fused_wanted = (grads and opts.reduce and (opts.need_x or opts.need_W) and opts.is_full_range(C)
                    and opts.sub_centers == 1)
    if opts.strategy == "workspace" and grads:
        opts.require_full_range(C)
        _workspace_supports(opts)
    return plan(B, C, elt * (1 + opts.sub_centers) if opts.sub_centers > 1 else elt, opts, fused_wanted)


def _workspace_supports(opts: FusedOptions) -> None:
    if opts.sub_centers > 1:
        raise NotImplementedError(f"strategy='workspace' does not support sub-centres (sub_centers="
                                  f"{opts.sub_centers}); use strategy='recompute' or 'auto'")


def uses_workspace(B: int, C: int, D: int, x_dtype: torch.dtype, W_dtype: torch.dtype, opts: FusedOptions) -> bool:
    """The fused strategy (three GEMMs) when :func:`plan` picks it for a call that wants gradients
    (never with sub-centres: ``strategy="workspace"`` raises NotImplementedError for them). ``C`` is the
    weight's rows."""
    return B > 0 and _plan(B, opts.classes_of(C), x_dtype, W_dtype, opts, grads=True).strategy == "fused"


def forward_stats(call: Call) -> RowStats:
    """One GEMM per tile; no gradients."""
    prep = _Prepared(call)
    return _forward(prep, _plan(prep.B, prep.C, call.x.dtype, call.W.dtype, call.opts, grads=False),
                    call.opts.want_prediction)


def forward_with_grads(call: Call, z: Tensor, g: Tensor) -> tuple[RowStats, Optional[Tensor], Optional[Tensor]]:
    """The fused strategy: each row block's logits kept in the workspace, gradients formed in the pass."""
    prep = _Prepared(call)
    pl = _plan(prep.B, prep.C, call.x.dtype, call.W.dtype, call.opts, grads=True)
    if pl.strategy != "fused":
        raise ValueError(f"forward_with_grads called for a call planned as {pl.strategy!r}")
    return _forward_fused(prep, pl, z, g)


def recompute_grads(call: Call, lse: Tensor, g: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Recompute every tile (four GEMMs in all) for per-row upstream weights ``g``."""
    prep = _Prepared(call)
    opts = call.opts
    x = call.x
    pl = _plan(prep.B, prep.C, x.dtype, call.W.dtype, opts, grads=False)
    lse = lse.to(prep.acc)
    g = g.to(prep.acc)
    dxh = torch.zeros(prep.B, prep.D, device=x.device, dtype=prep.acc) if opts.need_x else None
    dD = torch.zeros(prep.n_rows, prep.D, device=x.device, dtype=prep.acc) if opts.need_W else None
    if dxh is None and dD is None:
        return None, None
    scratch = torch.empty(pl.rows * pl.chunk, device=x.device, dtype=prep.acc)
    k = prep.k
    raw = torch.empty(pl.rows * pl.chunk * k, device=x.device, dtype=prep.acc) if k > 1 else None
    for r0, r1, cols in prep.tiles(pl):
        row_scale = g[r0:r1] * opts.scale
        for c0, c1 in cols:
            tile = scratch[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
            wt = prep.w_class_tile(c0, c1)
            idx, in_tile, _, sub = prep.logits_tile(tile, r0, r1, c0, c1, wt, raw, want_sub=True)
            filtered = prep.filter_tile(tile, fill=False)  # exp may overflow there: zeroed right after
            prep.exp_tile(tile, lse[r0:r1], idx, in_tile, filtered)
            # with sub-centres each class's weight goes to the sub-centre its logit came from
            prep.grad_tile(prep.spread(tile, sub, raw), row_scale, c0 * k, c1 * k, wt, r0, r1, dxh, dD)
    del scratch, raw
    _smoothing_grads(prep, g, dxh, dD)
    return dxh, prep.finish_w_grads(dD) if dD is not None else None
