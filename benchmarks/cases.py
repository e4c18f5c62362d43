"""The one benchmark case list, the inputs of each case, and one forward+backward per implementation.

Every benchmark entry point draws from here, so the script, the memory probe
and the pytest-benchmark cases measure exactly the same computations:

* ``python -m benchmarks.cpu_targets`` (the CPU target table),
* ``python -m benchmarks.memory`` (peak memory of one step in a fresh process),
* ``pytest benchmarks/ --benchmark-only`` (``benchmarks/test_bench_cpu.py``).

Vocabulary:

* a :class:`Problem` says *what* is computed: margin, scale, ``normalize``
  and how the inputs are drawn (which decides whether probabilities underflow);
* an *implementation* says *who* computes it: ``"floor"`` (the three GEMMs of
  the same shape, no loss at all), ``"marginops"`` (``backend="torch"``),
  ``"reference"`` (``backend="reference"``, the naive materialized baseline)
  or ``"linear_cross_entropy"`` (``F.linear_cross_entropy`` with its chunked
  options, plain problems only);
* a :class:`Case` is a problem, an implementation and a reduction: one timed unit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import marginops as mo

IMPLEMENTATIONS = ("floor", "marginops", "reference", "linear_cross_entropy")
LOSS_IMPLEMENTATIONS = ("marginops", "reference", "linear_cross_entropy")
MARGINS = ("arcface", "cosface", "none")
INPUT_KINDS = ("gaussian", "sphere", "linear")


@dataclass(frozen=True)
class Shape:
    """Problem size: ``batch`` rows (B), ``dim`` features (D), ``classes`` (C)."""

    batch: int
    dim: int
    classes: int

    @property
    def flops(self) -> int:
        """FLOPs of the three-GEMM floor (logits, dX, dW): ``6 * B * D * C``."""
        return 6 * self.batch * self.dim * self.classes

    def __str__(self) -> str:
        return f"B={self.batch}, D={self.dim}, C={self.classes}"


@dataclass(frozen=True)
class Problem:
    """What is computed and on which inputs.

    Attributes:
        name: short identifier used in case names and records.
        margin: ``"arcface"`` (``mo.ArcFace(0.5)``), ``"cosface"``
            (``mo.CosFace(0.35)``) or ``"none"``.
        scale: ``s``.
        normalize: L2-normalize embeddings and class weights.
        inputs: how :func:`make_inputs` draws ``x`` and ``W`` (see there).
        description: one line for reports.
    """

    name: str
    margin: str
    scale: float
    normalize: bool
    inputs: str
    description: str = ""

    def __post_init__(self):
        if self.margin not in MARGINS:
            raise ValueError(f"margin must be one of {MARGINS}, got {self.margin!r}")
        if self.inputs not in INPUT_KINDS:
            raise ValueError(f"inputs must be one of {INPUT_KINDS}, got {self.inputs!r}")

    @property
    def is_plain(self) -> bool:
        """Plain linear cross-entropy: what ``F.linear_cross_entropy`` computes."""
        return not self.normalize and self.scale == 1.0 and self.margin == "none"

    def margin_object(self) -> Optional[mo.Margin]:
        return {"arcface": lambda: mo.ArcFace(0.5), "cosface": lambda: mo.CosFace(0.35), "none": lambda: None}[
            self.margin
        ]()


#: Face-recognition-like training step: random Gaussian embeddings, cosines
#: concentrate near 0 (std ~ 1/sqrt(D)), so ``s * cos`` spans a few units and
#: nothing underflows.
ORDINARY = Problem(
    "ordinary", "arcface", 30.0, True, "gaussian",
    "ArcFace(0.5), s=30, Gaussian embeddings (cosines ~ N(0, 1/D): no underflow)",
)

#: Probabilities underflow float32. Embeddings and class weights are drawn
#: uniformly on a 2-sphere spanned by the first three coordinates (plus 1%
#: Gaussian noise in the others), so every row's cosines are uniform on
#: [-1, 1] (Archimedes' hat-box theorem). With s = 64 the logits spread over
#: 128 nats, so ``log p_ij = s * cos_ij - LSE_i`` is spread over about
#: [-135, -7]: the classes with ``log p`` in [-103.3, -87.3] get a subnormal
#: float32 probability (about 1/8 of all entries) and those below flush to
#: 0. :func:`probability_underflow` measures the fractions on the real inputs.
UNDERFLOW = Problem(
    "underflow", "arcface", 64.0, True, "sphere",
    "ArcFace(0.5), s=64, cosines uniform on [-1, 1] (3-D sphere embeddings): probabilities underflow",
)

#: Plain linear cross-entropy (``normalize=False, scale=1, margin=None``), the
#: one problem ``F.linear_cross_entropy`` also solves. Weights are drawn like
#: ``nn.Linear``'s (std ~ 1/sqrt(D)) so logits are ~ N(0, 1): no underflow.
PLAIN = Problem(
    "plain", "none", 1.0, False, "linear",
    "normalize=False, s=1, no margin, logits ~ N(0, 1)",
)

PROBLEMS = {p.name: p for p in (ORDINARY, UNDERFLOW, PLAIN)}


@dataclass(frozen=True)
class Case:
    """One timed unit: an implementation computing a problem's loss with one reduction."""

    problem: Problem
    impl: str
    reduction: str = "mean"

    def __post_init__(self):
        if self.impl not in IMPLEMENTATIONS:
            raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {self.impl!r}")
        if self.impl == "linear_cross_entropy" and not self.problem.is_plain:
            raise ValueError("linear_cross_entropy only computes plain problems (normalize=False, s=1, no margin)")

    @property
    def name(self) -> str:
        if self.impl == "floor":
            return "floor"
        return f"{self.problem.name}/{self.impl}/{self.reduction}"

    @property
    def impl_label(self) -> str:
        """The implementation's name for tables."""
        return {"floor": "3-GEMM floor (torch.mm)", "linear_cross_entropy": "F.linear_cross_entropy"}.get(
            self.impl, self.impl)

    @property
    def label(self) -> str:
        """Implementation and reduction for tables."""
        return self.impl_label if self.impl in ("floor", "linear_cross_entropy") else f"{self.impl} {self.reduction}"


#: The case list, in the order the target script runs it: within each
#: problem the reference first, so its outputs are at hand to check the others.
CASES: tuple[Case, ...] = (
    Case(ORDINARY, "floor"),
    Case(ORDINARY, "reference", "mean"),
    Case(ORDINARY, "marginops", "mean"),
    Case(ORDINARY, "marginops", "none"),
    Case(UNDERFLOW, "reference", "mean"),
    Case(UNDERFLOW, "marginops", "mean"),
    Case(PLAIN, "reference", "mean"),
    Case(PLAIN, "linear_cross_entropy", "mean"),
    Case(PLAIN, "marginops", "mean"),
)


# -- inputs ---------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """Leaf tensors of one case: ``x`` (B, D) and ``W`` (C, D) requiring grad, ``y`` (B,) int64."""

    x: Tensor
    W: Tensor
    y: Tensor

    def clear_grads(self) -> None:
        """Free the gradients (each timed step then starts from ``grad = None``, as after ``zero_grad``)."""
        self.x.grad = None
        self.W.grad = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.x, self.W, self.y))


def _sphere_rows(n: int, dim: int, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    """Rows uniform on the unit 2-sphere of the first three coordinates, plus 1% noise elsewhere."""
    out = torch.randn(n, dim, generator=gen, dtype=dtype).mul_(0.01)
    head = torch.randn(n, 3, generator=gen, dtype=dtype)
    out[:, :3] = F.normalize(head, dim=1)
    return out


def make_inputs(shape: Shape, kind: str, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Inputs:
    """Deterministic inputs of ``kind``.

    * ``"gaussian"``: ``x``, ``W`` standard normal.
    * ``"sphere"``: ``x``, ``W`` uniform on a 2-sphere (see :data:`UNDERFLOW`), ``dim >= 3``.
    * ``"linear"``: ``x`` standard normal, ``W`` normal with std ``1/sqrt(D)``
      (``x . W_j`` ~ N(0, 1)).

    Labels are uniform over the classes. Every element is written, so the
    memory is resident when this returns.
    """
    if kind not in INPUT_KINDS:
        raise ValueError(f"kind must be one of {INPUT_KINDS}, got {kind!r}")
    B, D, C = shape.batch, shape.dim, shape.classes
    gen = torch.Generator().manual_seed(seed)
    if kind == "sphere":
        if D < 3:
            raise ValueError(f"sphere inputs need dim >= 3, got {D}")
        x = _sphere_rows(B, D, gen, dtype)
        W = _sphere_rows(C, D, gen, dtype)
    else:
        x = torch.randn(B, D, generator=gen, dtype=dtype)
        W = torch.randn(C, D, generator=gen, dtype=dtype)
        if kind == "linear":
            W.mul_(D ** -0.5)
    y = torch.randint(0, C, (B,), generator=gen)
    return Inputs(x.requires_grad_(), W.requires_grad_(), y)


# -- one forward+backward per implementation ------------------------------------------------------


def loss_fn(impl: str, inp: Inputs, problem: Problem, reduction: str = "mean",
            memory_budget: Optional[int] = None) -> Tensor:
    """The loss (with autograd) that ``impl`` computes for ``problem``; forward only."""
    if impl in ("marginops", "reference"):
        return mo.margin_cross_entropy(
            inp.x, inp.W, inp.y, problem.margin_object(), problem.scale, normalize=problem.normalize,
            reduction=reduction, backend="torch" if impl == "marginops" else "reference",
            memory_budget=memory_budget,
        )
    if impl == "linear_cross_entropy":
        if not problem.is_plain:
            raise ValueError("linear_cross_entropy only computes plain problems (normalize=False, s=1, no margin)")
        return F.linear_cross_entropy(
            inp.x, inp.W, inp.y, reduction=reduction, options=torch.nn.LinearCrossEntropyOptions()
        )
    raise ValueError(f"no loss for implementation {impl!r}; expected one of {LOSS_IMPLEMENTATIONS}")


def forward_backward(impl: str, inp: Inputs, problem: Problem, reduction: str = "mean",
                     memory_budget: Optional[int] = None) -> Tensor:
    """One training step's loss work: forward, then backward into ``inp.x.grad`` and ``inp.W.grad``.

    ``reduction="none"`` backpropagates ``loss.sum()``. Returns the detached loss.
    """
    loss = loss_fn(impl, inp, problem, reduction, memory_budget)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach()


def three_gemms(inp: Inputs) -> None:
    """The floor: the three GEMMs any fwd+bwd of this shape must do, with plain ``torch.mm``.

    logits = x W^T (B x C), dX = G W (B x D), dW = G^T x (C x D), with the
    logits standing in for G (no subnormals: they are ~ N(0, D)).
    """
    x, W = inp.x.detach(), inp.W.detach()
    logits = torch.mm(x, W.t())
    torch.mm(logits, W)
    torch.mm(logits.t(), x)


def step_fn(case: Case, inp: Inputs, memory_budget: Optional[int] = None) -> Callable[[], Optional[Tensor]]:
    """A zero-argument callable running ``case`` once on ``inp`` (what the timers call)."""
    if case.impl == "floor":
        return lambda: three_gemms(inp)
    return lambda: forward_backward(case.impl, inp, case.problem, case.reduction, memory_budget)


# -- facts about the inputs -----------------------------------------------------------------------


@torch.no_grad()
def probability_underflow(inp: Inputs, problem: Problem, rows_per_block: int = 64) -> dict[str, float]:
    """Fractions of the float32 softmax probabilities ``p_ij`` that are subnormal or exactly zero.

    Computed the reference's way (materialized logits with the margined
    target, ``torch.softmax`` in float32) in row blocks, so it needs only
    ``rows_per_block x C`` memory.
    """
    tiny = torch.finfo(torch.float32).tiny
    x, W = inp.x.detach().float(), inp.W.detach().float()
    if problem.normalize:
        x, W = F.normalize(x, dim=1), F.normalize(W, dim=1)
    psi = problem.margin_object()
    sub = zero = 0
    for r0 in range(0, x.shape[0], rows_per_block):
        cos = x[r0:r0 + rows_per_block] @ W.t()
        yb = inp.y[r0:r0 + rows_per_block].unsqueeze(1)
        t = cos.gather(1, yb).squeeze(1)
        z = problem.scale * (psi(t) if psi is not None else t)
        logits = (problem.scale * cos).scatter_(1, yb, z.unsqueeze(1))
        p = torch.softmax(logits, dim=1)
        sub += int(((p > 0) & (p < tiny)).sum())
        zero += int((p == 0).sum())
    total = x.shape[0] * W.shape[0]
    return {"subnormal": sub / total, "zero": zero / total}


def default_problem(margin: Optional[str], scale: Optional[float], normalize: Optional[bool], impl: str) -> Problem:
    """The problem the memory CLI measures: plain for ``linear_cross_entropy``, else ArcFace(0.5), s=30."""
    if impl == "linear_cross_entropy":
        margin = "none" if margin is None else margin
        scale = 1.0 if scale is None else scale
        normalize = False if normalize is None else normalize
    else:
        margin = "arcface" if margin is None else margin
        scale = 30.0 if scale is None else scale
        normalize = True if normalize is None else normalize
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    return Problem("cli", margin, float(scale), normalize, "gaussian" if normalize else "linear")
