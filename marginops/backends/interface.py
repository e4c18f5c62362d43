"""The contract between :mod:`marginops.ops` (the one autograd path) and a fused backend.

A backend is one module with the functions of :class:`Backend`: tile math
over a range of classes, nothing else. It never sees the margin, autograd or
the target cosine; :mod:`marginops.ops` owns those and calls the backend from
inside its custom ops.

**Class ranges.** The weight rows a backend receives may be classes
``[opts.class_start, opts.class_start + C_local)`` of ``opts.num_classes``
(class-sharded training: each process owns one range). Labels are global
class indices; a label outside the range means the row's target lives in
another range, and every class of this range is a non-target for that row.
Each range yields a :class:`RowStats`; :func:`combine_stats` merges the
ranges exactly (log-add-exp of the non-target log-sum-exps, first-index
argmax, sum of the logit sums), and the backward of every range takes the
combined per-row log-sum-exp.

**Tile-math options.** ``FusedOptions.filter_threshold`` (inter-class
filtering), ``FusedOptions.sub_centers``, ``FusedOptions.gradient_filter``
and ``Call.row_scale`` change what a tile computes; a
backend that cannot do one must raise NotImplementedError naming it, never
ignore it (backends built on :mod:`marginops.backends.engine` implement all
of them). With ``sub_centers = k`` the weight has ``k`` rows per class and
``C_local`` above counts classes (``W`` has ``k C_local`` rows, ``dW`` too).

**Gradients.** Both gradient functions return the contributions of the
non-target logits of the range, label smoothing's included:

* ``dxh`` (B, D) in the accumulation dtype, *with respect to the normalized
  embeddings* (the caller adds the target term and runs the normalization
  backward of ``x`` once);
* ``dW`` (C_local, D) complete (its normalization backward done), in the
  dtype :meth:`Backend.weight_grad_dtype` announces before the call; the
  caller adds the target rows into it in place, so only one ``C x D``
  gradient exists per call.

A new backend is one module implementing these functions, registered with
:func:`marginops.register_backend` (the built-in ones are listed in
:data:`marginops.backends.BACKENDS`), plus its tests.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple, Optional, Protocol

import torch
from torch import Tensor

#: Default bound on a backend's scratch memory (bytes): the logits workspace,
#: per-tile temporaries. Gradients of the inputs are not counted.
DEFAULT_MEMORY_BUDGET = 256 * 2**20


@dataclass(frozen=True)
class FusedOptions:
    """Non-tensor options of one fused call."""

    scale: float
    normalize: bool = True
    label_smoothing: float = 0.0
    reduce: bool = True  # True: the loss is sum_i w_i * loss_i; False: per-row w_i * loss_i
    eps: float = 1e-12
    chunk_size: Optional[int] = None  # classes per tile; None: chosen by the backend
    memory_budget: Optional[int] = None  # bytes of scratch; None: DEFAULT_MEMORY_BUDGET
    want_prediction: bool = False
    strategy: str = "auto"  # "auto" | "recompute" | "workspace"; see margin_cross_entropy
    need_x: bool = True  # gradients wanted for the embeddings
    need_W: bool = True  # gradients wanted for the weight
    class_start: int = 0  # global index of the weight's first row
    num_classes: Optional[int] = None  # all classes, this range and the others; None: the weight's rows
    # Inter-class filtering: a non-target class whose cosine exceeds this is left out of the softmax
    # (loss, log-sum-exp and gradients) as if its column were absent; None: no filtering. The backend
    # compares the logit ``s cos`` with ``s * filter_threshold``. Not combined with label smoothing.
    filter_threshold: Optional[float] = None
    # Sub-centres per class: the weight has ``k * classes`` rows, class-major (class c's are rows
    # c k .. c k + k - 1); a class's cosine is the largest of its rows', and its gradient goes to
    # that row only (the lowest index on ties). 1: one row per class.
    sub_centers: int = 1
    # Opt-in gradient filtering (Cut Cross-Entropy's ``filter_eps``): in the gradient pass, a tile whose
    # probabilities ``exp(logit - lse)`` all lie below this threshold adds nothing (it is skipped, not
    # computed). An approximation, off (None) by default; the loss and the statistics stay exact.
    gradient_filter: Optional[float] = None

    @property
    def budget(self) -> int:
        return self.memory_budget if self.memory_budget is not None else DEFAULT_MEMORY_BUDGET

    def total_classes(self, local: int) -> int:
        """``C_total`` for a range of ``local`` classes."""
        return self.num_classes if self.num_classes is not None else local

    def classes_of(self, rows: int) -> int:
        """Classes held by a weight of ``rows`` rows (``rows / sub_centers``)."""
        return rows // self.sub_centers

    def is_full_range(self, local: int) -> bool:
        return self.class_start == 0 and self.total_classes(local) == local

    def require_full_range(self, local: int) -> None:
        """Raise the workspace strategy's ValueError unless a weight of ``local`` rows is every class."""
        if not self.is_full_range(local):
            raise ValueError("strategy='workspace' needs the whole class range (the gradients need the final "
                             f"log-sum-exp during the pass), got classes [{self.class_start}, "
                             f"{self.class_start + local}) of {self.total_classes(local)}")


@dataclass(frozen=True)
class Call:
    """The tensors of one fused call.

    ``x`` (B, D) and ``W`` (C_local, D) are the raw inputs (their dtypes may
    differ: the backend decides how it multiplies them, see
    :meth:`Backend.weight_grad_dtype`); ``y`` (B,) int64 global labels, ignored rows
    already pointed at a valid class (their row weight is 0); ``inv_x``
    (B,) and ``inv_w`` (C_local,) the inverse row norms ``1 / max(|row|, eps)``
    in the accumulation dtype (a row whose norm was clamped has exactly
    ``1 / eps``), or None when ``opts.normalize`` is False; ``row_scale``
    (B,) per-row factors on ``opts.scale``, or None.
    """

    x: Tensor
    W: Tensor
    y: Tensor
    inv_x: Optional[Tensor]
    inv_w: Optional[Tensor]
    opts: FusedOptions
    #: Per-row scale factors (B,), accumulation dtype, positive, or None: with them every logit of row
    #: ``i`` is ``opts.scale * row_scale[i] * cos_ij`` (the target logit ``z`` is the caller's), and the
    #: statistics and gradients a backend returns are those of these logits.
    row_scale: Optional[Tensor] = None


class RowStats(NamedTuple):
    """Per-row partial statistics of one class range, each (B,).

    Attributes:
        lse: log-sum-exp of the range's non-target logits (``-inf`` when there are none).
        max: the largest margin-free logit of the range, target included (``-inf`` when the
            range is empty); empty (0,) unless ``opts.want_prediction``.
        argmax: its global class index, the first one on ties; empty unless ``opts.want_prediction``.
        logit_sum: the sum of the range's non-target logits (label smoothing's term); empty (0,)
            unless ``opts.label_smoothing > 0``.
    """

    lse: Tensor
    max: Tensor
    argmax: Tensor
    logit_sum: Tensor


def combine_stats(parts: "list[RowStats] | tuple[RowStats, ...]") -> RowStats:
    """Merge the statistics of disjoint class ranges, exactly.

    Log-sum-exps combine by log-add-exp (no exp/sum round trip: no overflow at
    any scale, ``-inf`` stays ``-inf``), the argmax is the first index among the
    ranges that hold the maximum (ties go to the lower class index, as within a
    range), logit sums add.
    """
    if not parts:
        raise ValueError("combine_stats needs at least one RowStats")
    lse = functools.reduce(torch.logaddexp, (p.lse for p in parts))
    best, arg = parts[0].max, parts[0].argmax
    for p in parts[1:]:
        better = (p.max > best) | ((p.max == best) & (p.argmax < arg))
        best, arg = torch.where(better, p.max, best), torch.where(better, p.argmax, arg)
    logit_sum = parts[0].logit_sum
    for p in parts[1:]:
        logit_sum = logit_sum + p.logit_sum
    return RowStats(lse, best, arg, logit_sum)


class Backend(Protocol):
    """What a fused backend module provides (its module-level functions)."""

    def weight_grad_dtype(self, x_dtype: torch.dtype, W_dtype: torch.dtype, opts: FusedOptions) -> torch.dtype:
        """The dtype in which the backend returns ``dW`` for inputs of these dtypes."""

    def uses_workspace(self, B: int, C: int, D: int, x_dtype: torch.dtype, W_dtype: torch.dtype,
                       opts: FusedOptions) -> bool:
        """Whether a call of these sizes takes the workspace strategy (gradients in the forward pass).

        A pure function of sizes and options, so that shapes are known before
        the call (``torch.compile`` traces with it). Raises ValueError for a
        strategy that cannot run within the budget.
        """

    def forward_stats(self, call: Call) -> RowStats:
        """The per-row statistics of the range (no gradients)."""

    def forward_with_grads(self, call: Call, z: Tensor, g: Tensor) -> tuple[RowStats, Optional[Tensor],
                                                                            Optional[Tensor]]:
        """The statistics and, for per-row upstream weights ``g`` and margined target logits ``z``,
        ``(dxh, dW)`` (None where ``opts.need_x``/``opts.need_W`` is False).

        Needs the whole class range (the gradients need the final log-sum-exp
        during the pass).
        """

    def recompute_grads(self, call: Call, lse: Tensor, g: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """``(dxh, dW)`` of the range for upstream weights ``g`` given the combined per-row ``lse``."""


REQUIRED = ("weight_grad_dtype", "uses_workspace", "forward_stats", "forward_with_grads", "recompute_grads")


def check_backend(module) -> None:
    """Raise TypeError unless ``module`` provides every function of :class:`Backend`."""
    missing = [name for name in REQUIRED if not callable(getattr(module, name, None))]
    if missing:
        raise TypeError(f"backend {getattr(module, '__name__', module)!r} lacks {missing}")
