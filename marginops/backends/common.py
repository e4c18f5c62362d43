"""What every fused backend receives: the options dataclass, the gradient handoff, shared math.

The backend contract (see ``DESIGN.md`` section 2 and :mod:`marginops.functional`):
a fused backend is a callable

    loss, lse, prediction = fn(x, W, y, z, w, handoff, opts)

with ``x`` (B, D) embeddings and ``W`` (C, D) class weights (both detached),
``y`` (B,) int64 labels already mapped into [0, C) (ignored rows point at
class 0), ``z`` (B,) the margined target logit ``s * psi(t)`` (carrying
autograd back to the margin), and ``w`` (B,) the per-row loss weights (0 for
ignored rows, ``1 / n_valid`` for ``reduction="mean"``). It returns the
weighted loss (a scalar when ``opts.reduce`` else per row), the per-row
log-sum-exp over all classes with ``z`` in the target column, and the argmax
of the margin-free cosine.

Its backward returns the gradient for ``z`` only and leaves the dense
gradients from every non-target class in the :class:`GradHandoff`: for
``x`` with respect to the normalized rows ``xh`` (before the normalization
backward; ``x`` itself with ``normalize=False``) in the accumulation dtype,
for ``W`` complete (in the accumulation or the input dtype). The target
cosine's autograd Function runs next (it needs ``dz`` first), adds the
target terms in place and runs the normalization backward of ``x`` once, so
``W`` receives one ``C x D`` gradient tensor and no second one is ever
allocated.

:class:`Prepared` and the functions after it are the per-call math both
backends share: norms, the normalization backward of ``x``, label
smoothing's loss term, ``dz``, the handover of gradients computed in a
forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

#: Default bound on a backend's scratch memory (bytes): the logits workspace,
#: per-tile temporaries. Gradients of the inputs are not counted.
DEFAULT_MEMORY_BUDGET = 256 * 2**20


@dataclass(frozen=True)
class FusedOptions:
    """Non-tensor options of one fused call (frozen: it rides on the autograd graph)."""

    scale: float
    normalize: bool = True
    label_smoothing: float = 0.0
    reduce: bool = True  # True: return sum_i w_i * loss_i; False: per-row w_i * loss_i
    eps: float = 1e-12
    chunk_size: Optional[int] = None  # classes per tile; None: chosen by the backend
    memory_budget: Optional[int] = None  # bytes of scratch; None: DEFAULT_MEMORY_BUDGET
    want_prediction: bool = False
    strategy: str = "auto"  # "auto" | "recompute" | "workspace"; see margin_cross_entropy

    @property
    def budget(self) -> int:
        return self.memory_budget if self.memory_budget is not None else DEFAULT_MEMORY_BUDGET


class GradHandoff:
    """Carries a backend's ``dX``/``dW`` from its backward to the target-cosine backward.

    ``need_x``/``need_W`` say which gradients the caller's graph wants (the
    backend sees detached inputs). One handoff serves one call.
    """

    def __init__(self, need_x: bool, need_W: bool):
        self.need_x = need_x
        self.need_W = need_W
        self.dx: Optional[Tensor] = None
        self.dW: Optional[Tensor] = None

    def take(self) -> tuple[Optional[Tensor], Optional[Tensor]]:
        dx, dW, self.dx, self.dW = self.dx, self.dW, None, None
        return dx, dW


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of ``dtype``: float64 stays, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


class Prepared:
    """Per-call quantities shared by a backend's forward and backward: dtypes, normalized rows, norms.

    Holds the raw ``x``, ``W`` and labels ``y`` of the call; ``xh`` is ``x``
    normalized (or ``x`` itself) in the accumulation dtype, computed on first
    use and dropped by :meth:`release` (a backend's backward calls it, so that
    no ``B x D`` copy outlives the pass; a second backward recomputes it);
    ``inv_x``/``inv_w`` the inverse norms ``1 / max(|.|, eps)`` (None with
    ``normalize=False``). Nothing here is ``C x D``: passes over ``W`` walk it
    in chunks of :attr:`pass_chunk` classes.
    """

    def __init__(self, x: Tensor, W: Tensor, y: Tensor, opts: FusedOptions):
        self.opts = opts
        self.W = W
        self.y = y
        self.acc = acc_dtype(x.dtype)
        self.B, self.D = x.shape
        self.C = W.shape[0]
        elt = torch.finfo(self.acc).bits // 8
        self.pass_chunk = max(1, min(self.C, PASS_CHUNK, opts.budget // max(1, 2 * self.D * elt)))
        self.x = x
        self.inv_x: Optional[Tensor] = None
        self.inv_w: Optional[Tensor] = None
        if opts.normalize:
            norm_x = torch.linalg.vector_norm(x, dim=1, dtype=self.acc)
            self.x_clamped = norm_x <= opts.eps  # F.normalize's clamp: no projection in backward
            self.inv_x = 1.0 / norm_x.clamp_min(opts.eps)
            norm_w = torch.linalg.vector_norm(W, dim=1, dtype=self.acc)
            self.w_clamped = norm_w <= opts.eps
            self.inv_w = 1.0 / norm_w.clamp_min(opts.eps)
        self._xh: Optional[Tensor] = None
        self._class_sum: Optional[Tensor] = None

    @property
    def xh(self) -> Tensor:
        """``x`` normalized (or ``x`` itself), accumulation dtype, contiguous; cached until :meth:`release`."""
        if self._xh is None:
            xh = self.x.to(self.acc, copy=True, memory_format=torch.contiguous_format)
            self._xh = xh if self.inv_x is None else xh.mul_(self.inv_x.unsqueeze(1))
        return self._xh

    def release(self) -> None:
        """Drop the cached ``B x D`` rows (recomputed if needed again)."""
        self._xh = None

    def w_tile(self, c0: int, c1: int) -> Tensor:
        """Raw ``W[c0:c1]`` in the accumulation dtype."""
        return self.W[c0:c1].to(self.acc)

    def chunks(self):
        """``(c0, c1)`` class ranges of :attr:`pass_chunk` classes."""
        for c0 in range(0, self.C, self.pass_chunk):
            yield c0, min(c0 + self.pass_chunk, self.C)

    def class_sum(self) -> Tensor:
        """``sum_j wh_j`` (D,), for label smoothing's sum over all logits (computed once per call)."""
        if self._class_sum is None:
            total = torch.zeros(self.D, device=self.W.device, dtype=self.acc)
            for c0, c1 in self.chunks():
                wt = self.w_tile(c0, c1)
                total += wt.sum(0) if self.inv_w is None else self.inv_w[c0:c1] @ wt
            self._class_sum = total
        return self._class_sum

    def target_rows(self) -> Tensor:
        """``wh_{y_i}`` (B, D): the labels' rows of ``W``, normalized (or raw), accumulation dtype."""
        wy = self.W.index_select(0, self.y).to(self.acc)
        return wy if self.inv_w is None else wy * self.inv_w[self.y].unsqueeze(1)

    def target_logit(self) -> Tensor:
        """``s * t_i`` per row (B x D work)."""
        return self.opts.scale * (self.xh * self.target_rows()).sum(1)


def loss_and_lse(prep: Prepared, N: Tensor, z: Tensor, target_logit: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Per-row loss and log-sum-exp from the non-target LSE ``N`` and the margined target logit ``z``.

    With label smoothing (PyTorch's definition: ``(1-eps) * CE + eps * mean_j(lse - logit_j)``)
    the sum of the non-target logits comes from one GEMV; ``target_logit`` (``s * t``) is
    taken from the caller when it has it, else recomputed.
    """
    lse = torch.logaddexp(N, z)
    loss = lse - z
    eps = prep.opts.label_smoothing
    if eps > 0:
        if target_logit is None:
            target_logit = prep.target_logit()
        other = prep.opts.scale * (prep.xh @ prep.class_sum()) - target_logit  # sum_{j != y} s * cos_ij
        loss = loss + eps * (z - (other + z) / prep.C)
    return loss, lse


def weighted_loss(loss_rows: Tensor, w: Tensor, reduce: bool) -> Tensor:
    """``sum_i w_i loss_i`` (or per row), with ignored rows (``w_i = 0``) exactly 0 even if their loss is inf."""
    weighted = torch.where(w != 0, loss_rows * w, torch.zeros_like(loss_rows))
    return weighted.sum() if reduce else weighted


def target_grad(prep: Prepared, g: Tensor, z: Tensor, lse: Tensor) -> Tensor:
    """``dloss/dz`` per row for upstream weights ``g``: ``g (p_target - (1 - eps) - eps / C)``."""
    eps = prep.opts.label_smoothing
    return g * (torch.exp(z - lse) - (1.0 - eps) - eps / prep.C)


def fused_backward(ctx, grad_loss: Tensor, recompute: Callable) -> tuple:
    """The backward both fused backends' autograd Functions share.

    The forward saved ``(x, W, zf, wf, lse)`` and set ``ctx.prep``,
    ``ctx.handoff`` and ``ctx.early``. When ``ctx.early`` holds ``(dx, dW, dz)``
    (the workspace strategies computed them for ``grad_output = 1``), they are
    scaled in place by ``grad_loss`` and handed over; they serve once (a second
    backward with ``retain_graph`` recomputes). Otherwise
    ``recompute(ctx, x, lse, g)`` returns ``(dxh, dW)`` for the per-row upstream
    weights ``g`` (the handoff's contract: see the module docstring). Returns
    the gradients of the forward's inputs: ``dz`` only.
    """
    x, W, zf, wf, lse = ctx.saved_tensors  # unpacking checks nobody modified x or W in place
    prep: Prepared = ctx.prep
    handoff: GradHandoff = ctx.handoff
    if ctx.early is not None:
        dx, dW, dz = ctx.early
        ctx.early = None
        g0 = grad_loss.to(prep.acc)
        handoff.dx = dx.mul_(g0) if dx is not None else None
        handoff.dW = dW.mul_(g0) if dW is not None else None
        dz = dz * g0
    else:
        g = wf * grad_loss.to(prep.acc)
        handoff.dx = handoff.dW = None
        if handoff.need_x or handoff.need_W:
            handoff.dx, handoff.dW = recompute(ctx, x, lse, g)
        dz = target_grad(prep, g, zf, lse)
    prep.release()
    return None, None, None, dz.to(zf.dtype) if ctx.needs_input_grad[3] else None, None, None, None


def forward_outputs(ctx, loss: Tensor, lse: Tensor, pred: Optional[Tensor], x: Tensor):
    """The three outputs of a backend's forward: loss in the input dtype, then the non-differentiable
    by-products (an empty prediction when none was asked for)."""
    if pred is None:
        pred = torch.zeros(0, dtype=torch.int64, device=x.device)
    ctx.mark_non_differentiable(lse, pred)
    return loss.to(x.dtype), lse, pred
