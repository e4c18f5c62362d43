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

Its backward returns the gradient for ``z`` only and leaves the (dense,
input-dtype) gradients of ``x`` and ``W`` from every non-target class in the
:class:`GradHandoff`. The target cosine's autograd Function runs next (it
needs ``dz`` first) and adds the target term in place, so ``W`` receives one
``C x D`` gradient tensor and no second one is ever allocated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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


def normalize_backward(xh: Tensor, inv_norm: Tensor, clamped: Tensor, grad: Tensor) -> Tensor:
    """Gradient through ``x / max(|x|, eps)`` given ``xh``, ``1 / max(|x|, eps)`` and ``|x| <= eps``.

    Where the norm is clamped the map is linear (``x / eps``), as in ``F.normalize``.
    """
    proj = (xh * grad).sum(1, keepdim=True)
    proj = torch.where(clamped.unsqueeze(1), torch.zeros_like(proj), proj)
    return (grad - xh * proj) * inv_norm.unsqueeze(1)


def forward_outputs(ctx, loss: Tensor, lse: Tensor, pred: Optional[Tensor], x: Tensor):
    """The three outputs of a backend's forward: loss in the input dtype, then the non-differentiable
    by-products (an empty prediction when none was asked for)."""
    if pred is None:
        pred = torch.zeros(0, dtype=torch.int64, device=x.device)
    ctx.mark_non_differentiable(lse, pred)
    return loss.to(x.dtype), lse, pred
