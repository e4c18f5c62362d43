"""What every fused backend receives: the options dataclass and the shared sizing rules.

The backend contract (see ``DESIGN.md`` section 2 and :mod:`marginops.functional`):
a fused backend is an autograd-aware callable

    loss, lse, prediction = fn(x, W, y, z, w, opts)

with ``x`` (B, D) embeddings, ``W`` (C, D) class weights, ``y`` (B,) int64
labels already mapped into [0, C) (ignored rows point at class 0), ``z`` (B,)
the margined target logit ``s * psi(t)`` (carrying autograd back to the
margin), and ``w`` (B,) the per-row loss weights (0 for ignored rows,
``1 / n_valid`` for ``reduction="mean"``). It returns the weighted loss (a
scalar when ``opts.reduce`` else per row), the per-row log-sum-exp over all
classes with the target logit ``z`` in place of ``s * t``, and the argmax of
the margin-free cosine. The target cosine's own gradient reaches ``x`` and
``W`` through ``z`` by ordinary autograd; the backend handles every other
class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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
