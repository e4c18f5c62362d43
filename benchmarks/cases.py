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
  options, plain problems only), and the peers a user would pick instead
  (:data:`PEERS`): ``"torch_compile"`` (the naive code under
  ``torch.compile``), ``"pml"`` (pytorch-metric-learning's
  ``ArcFaceLoss``/``CosFaceLoss``), ``"cce"`` (Apple's Cut Cross-Entropy,
  plain problems only) and ``"liger"`` (GPU only). :func:`unavailable` and
  :func:`unsupported` say why a peer cannot run here or cannot compute a
  problem;
* a :class:`Case` is a problem, an implementation and a reduction: one timed unit.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import marginops as mo

IMPLEMENTATIONS = ("floor", "marginops", "reference", "linear_cross_entropy", "torch_compile", "pml", "cce", "liger")
LOSS_IMPLEMENTATIONS = IMPLEMENTATIONS[1:]
#: Implementations that are not this library (each checked against the reference before it is timed).
PEERS = ("linear_cross_entropy", "torch_compile", "pml", "cce", "liger")
MARGINS = ("arcface", "cosface", "none")
INPUT_KINDS = ("gaussian", "sphere", "linear", "trained")

#: Labels of the implementations for tables and plots.
IMPL_LABELS = {
    "floor": "3-GEMM floor (torch.mm)",
    "marginops": "marginops",
    "reference": "reference (naive)",
    "linear_cross_entropy": "F.linear_cross_entropy",
    "torch_compile": "torch.compile(naive)",
    "pml": "pytorch-metric-learning",
    "cce": "Cut Cross-Entropy (torch_compile)",
    "liger": "Liger fused linear CE",
}


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

#: Cosines with the spread of a trained model: every target cosine uniform in
#: [0.7, 0.9], the non-target cosines spread around 0 with standard deviation
#: about ``1/sqrt(TRAINED_SPREAD_DIM)`` (~0.35), s = 64. The logits then span
#: about 100 nats, so many float32 probabilities are subnormal or zero
#: (:func:`probability_underflow` measures how many).
REALISTIC = Problem(
    "realistic", "arcface", 64.0, True, "trained",
    "ArcFace(0.5), s=64, target cosines U(0.7, 0.9), non-targets ~ N(0, 0.35^2) (a trained model's spread)",
)

PROBLEMS = {p.name: p for p in (ORDINARY, UNDERFLOW, PLAIN, REALISTIC)}


def unsupported(impl: str, problem: Problem) -> Optional[str]:
    """Why ``impl`` does not compute ``problem`` (e.g. a plain-CE-only peer and a margin), or None if it does."""
    if impl in ("linear_cross_entropy", "cce", "liger") and not problem.is_plain:
        return f"{impl} only computes plain problems (normalize=False, s=1, no margin)"
    if impl == "pml" and (problem.margin == "none" or not problem.normalize):
        return "pytorch-metric-learning's ArcFaceLoss/CosFaceLoss always normalize and apply a margin"
    return None


@dataclass(frozen=True)
class Case:
    """One timed unit: an implementation computing a problem's loss with one reduction."""

    problem: Problem
    impl: str
    reduction: str = "mean"

    def __post_init__(self):
        if self.impl not in IMPLEMENTATIONS:
            raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {self.impl!r}")
        reason = unsupported(self.impl, self.problem)
        if reason is not None:
            raise ValueError(reason)

    @property
    def name(self) -> str:
        if self.impl == "floor":
            return "floor"
        return f"{self.problem.name}/{self.impl}/{self.reduction}"

    @property
    def impl_label(self) -> str:
        """The implementation's name for tables."""
        return IMPL_LABELS[self.impl] if self.impl not in ("marginops", "reference") else self.impl

    @property
    def label(self) -> str:
        """Implementation and reduction for tables."""
        return self.impl_label if self.impl not in ("marginops", "reference") else f"{self.impl} {self.reduction}"


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

#: The peers on the problems they compute (``reduction="mean"``), for
#: ``pytest benchmarks/ --benchmark-only``; :func:`unavailable` says which
#: cannot run here. ``python -m benchmarks.report`` runs them over sweeps.
PEER_CASES: tuple[Case, ...] = tuple(
    Case(problem, impl) for problem in (ORDINARY, PLAIN) for impl in PEERS
    if impl != "linear_cross_entropy" and unsupported(impl, problem) is None
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


#: ``"trained"`` inputs live (up to 1% noise) in this many dimensions, so non-target cosines have std ~ 1/sqrt(8).
TRAINED_SPREAD_DIM = 8
#: ``"trained"`` target cosines are uniform in this interval.
TRAINED_TARGET_COS = (0.7, 0.9)


def _sphere_rows(n: int, dim: int, gen: torch.Generator, dtype: torch.dtype, k: int = 3) -> Tensor:
    """Rows uniform on the unit sphere of the first ``k`` coordinates, plus 1% noise elsewhere."""
    out = torch.randn(n, dim, generator=gen, dtype=dtype).mul_(0.01)
    head = torch.randn(n, k, generator=gen, dtype=dtype)
    out[:, :k] = F.normalize(head, dim=1)
    return out


def _trained_rows(W: Tensor, y: Tensor, gen: torch.Generator) -> Tensor:
    """Embeddings at a cosine uniform in :data:`TRAINED_TARGET_COS` to their class's weight row.

    ``x_i = t_i w_hat + sqrt(1 - t_i^2) u_i`` with ``u_i`` a unit vector
    orthogonal to ``w_hat = W[y_i] / |W[y_i]|``, drawn like the weight rows,
    so ``cos(x_i, W[y_i]) = t_i`` and the other cosines spread like those
    between weight rows.
    """
    B, D = y.shape[0], W.shape[1]
    w = F.normalize(W[y], dim=1)
    u = _sphere_rows(B, D, gen, W.dtype, TRAINED_SPREAD_DIM)
    u = F.normalize(u - (u * w).sum(1, keepdim=True) * w, dim=1)
    lo, hi = TRAINED_TARGET_COS
    t = torch.rand(B, 1, generator=gen, dtype=W.dtype).mul_(hi - lo).add_(lo)
    return t * w + (1 - t * t).sqrt() * u


def make_inputs(shape: Shape, kind: str, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Inputs:
    """Deterministic inputs of ``kind``.

    * ``"gaussian"``: ``x``, ``W`` standard normal.
    * ``"sphere"``: ``x``, ``W`` uniform on a 2-sphere (see :data:`UNDERFLOW`), ``dim >= 3``.
    * ``"linear"``: ``x`` standard normal, ``W`` normal with std ``1/sqrt(D)``
      (``x . W_j`` ~ N(0, 1)).
    * ``"trained"``: a trained model's cosines (see :data:`REALISTIC`): ``W``
      rows uniform on the sphere of the first :data:`TRAINED_SPREAD_DIM`
      coordinates (plus 1% noise), each ``x_i`` at a cosine uniform in
      :data:`TRAINED_TARGET_COS` to ``W[y_i]``; ``dim > TRAINED_SPREAD_DIM``.

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
    elif kind == "trained":
        if D <= TRAINED_SPREAD_DIM:
            raise ValueError(f"trained inputs need dim > {TRAINED_SPREAD_DIM}, got {D}")
        W = _sphere_rows(C, D, gen, dtype, TRAINED_SPREAD_DIM)
        y = torch.randint(0, C, (B,), generator=gen)
        x = _trained_rows(W, y, gen)
        return Inputs(x.requires_grad_(), W.requires_grad_(), y)
    else:
        x = torch.randn(B, D, generator=gen, dtype=dtype)
        W = torch.randn(C, D, generator=gen, dtype=dtype)
        if kind == "linear":
            W.mul_(D ** -0.5)
    y = torch.randint(0, C, (B,), generator=gen)
    return Inputs(x.requires_grad_(), W.requires_grad_(), y)


# -- one forward+backward per implementation ------------------------------------------------------


def unavailable(impl: str) -> Optional[str]:
    """Why ``impl`` cannot run in this environment (not installed, needs a GPU), or None if it can."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl == "liger":
        if not torch.cuda.is_available():
            return "Liger-Kernel is GPU-only (Triton kernels); skipped on CPU"
        return None if importlib.util.find_spec("liger_kernel") else "liger-kernel not installed"
    module = {"pml": ("pytorch_metric_learning", "pytorch-metric-learning"),
              "cce": ("cut_cross_entropy", "cut-cross-entropy")}.get(impl)
    if module is not None and importlib.util.find_spec(module[0]) is None:
        return f"{module[1]} not installed (pip install -e .[bench])"
    return None


def naive_margin_loss(x: Tensor, W: Tensor, y: Tensor, margin: Optional[mo.Margin], scale: float,
                      normalize: bool, reduction: str) -> Tensor:
    """What people write today: F.normalize + F.linear + margin on the target column + F.cross_entropy.

    The loss of :func:`marginops.reference.margin_cross_entropy_reference`
    without its statistics (what ``"torch_compile"`` compiles).
    """
    if normalize:
        x, W = F.normalize(x, dim=1), F.normalize(W, dim=1)
    cos = F.linear(x, W)
    t = cos.gather(1, y.unsqueeze(1))
    z = scale * (margin(t) if margin is not None else t)
    logits = (scale * cos).scatter(1, y.unsqueeze(1), z)
    return F.cross_entropy(logits, y, reduction=reduction)


#: One compiled naive loss per (problem, reduction) in this process. Compiled
#: with ``dynamic=True``, so a warm-up on a small shape compiles it once and
#: larger shapes reuse the code (no recompilation inside a measurement).
_COMPILED: dict[tuple[str, str], Callable[[Tensor, Tensor, Tensor], Tensor]] = {}


def _compiled_naive(problem: Problem, reduction: str) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    key = (problem.name, reduction)
    if key not in _COMPILED:
        margin = problem.margin_object()
        fn = torch.compile(naive_margin_loss, dynamic=True)
        _COMPILED[key] = lambda x, W, y: fn(x, W, y, margin, problem.scale, problem.normalize, reduction)
    return _COMPILED[key]


def _pml_loss(inp: Inputs, problem: Problem, reduction: str) -> Callable[[], Tensor]:
    """pytorch-metric-learning's ArcFaceLoss / CosFaceLoss on our ``x``, ``W``, ``y``.

    Its module owns a ``(D, C)`` weight; we give it ``W.t()`` (a view of our
    ``(C, D)`` leaf, so gradients land in ``W.grad``). Its ArcFace margin is
    in degrees (``degrees(0.5)`` = 28.65 for our ArcFace(0.5)); past
    ``theta + m > pi`` it continues with ``cos theta - m sin m`` where
    marginops uses ``cos theta - (1 - cos m)`` (no difference unless a target
    cosine is below ``cos(pi - m)`` = -0.88). It always normalizes, uses
    ``scale`` as ``s``, and averages per-row losses (``reduction="mean"``
    only).
    """
    from pytorch_metric_learning import losses

    if reduction != "mean":
        raise ValueError("the pml peer computes reduction='mean' only")
    if problem.margin == "arcface":
        mod = losses.ArcFaceLoss(num_classes=1, embedding_size=1, margin=math.degrees(0.5), scale=problem.scale)
    else:
        mod = losses.CosFaceLoss(num_classes=1, embedding_size=1, margin=0.35, scale=problem.scale)
    del mod.W  # a (1, 1) placeholder: ours comes in below, without allocating a second (D, C) weight
    mod.num_classes = inp.W.shape[0]

    def run() -> Tensor:
        mod.W = inp.W.t()
        return mod(inp.x, inp.y)

    return run


def make_loss(impl: str, inp: Inputs, problem: Problem, reduction: str = "mean",
              memory_budget: Optional[int] = None) -> Callable[[], Tensor]:
    """A zero-argument forward (with autograd) of ``impl`` on ``inp``; set-up (modules, compilation) done once.

    ``torch_compile`` compiles lazily: its first call compiles (untimed, as
    the warm-up). Raises ValueError if ``impl`` cannot compute ``problem``
    and RuntimeError if it is unavailable here (:func:`unavailable`).
    """
    if impl not in LOSS_IMPLEMENTATIONS:
        raise ValueError(f"no loss for implementation {impl!r}; expected one of {LOSS_IMPLEMENTATIONS}")
    reason = unsupported(impl, problem)
    if reason is not None:
        raise ValueError(reason)
    reason = unavailable(impl)
    if reason is not None:
        raise RuntimeError(reason)
    if impl in ("marginops", "reference"):
        margin = problem.margin_object()
        backend = "torch" if impl == "marginops" else "reference"
        return lambda: mo.margin_cross_entropy(
            inp.x, inp.W, inp.y, margin, problem.scale, normalize=problem.normalize,
            reduction=reduction, backend=backend, memory_budget=memory_budget,
        )
    if impl == "linear_cross_entropy":
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda: F.linear_cross_entropy(inp.x, inp.W, inp.y, reduction=reduction, options=options)
    if impl == "torch_compile":
        fn = _compiled_naive(problem, reduction)
        return lambda: fn(inp.x, inp.W, inp.y)
    if impl == "pml":
        return _pml_loss(inp, problem, reduction)
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy as cce_linear_cross_entropy

        # The Triton "cce" implementation needs a GPU; "torch_compile" is CCE's pure-PyTorch path.
        cce_impl = "cce" if inp.x.is_cuda else "torch_compile"
        return lambda: cce_linear_cross_entropy(inp.x, inp.W, inp.y, reduction=reduction, impl=cce_impl)
    if impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        mod = LigerFusedLinearCrossEntropyLoss(reduction=reduction)
        return lambda: mod(inp.W, inp.x, inp.y)
    raise AssertionError(impl)


def loss_fn(impl: str, inp: Inputs, problem: Problem, reduction: str = "mean",
            memory_budget: Optional[int] = None) -> Tensor:
    """The loss (with autograd) that ``impl`` computes for ``problem``; forward only."""
    return make_loss(impl, inp, problem, reduction, memory_budget)()


def _backward(loss: Tensor) -> Tensor:
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach()


def forward_backward(impl: str, inp: Inputs, problem: Problem, reduction: str = "mean",
                     memory_budget: Optional[int] = None) -> Tensor:
    """One training step's loss work: forward, then backward into ``inp.x.grad`` and ``inp.W.grad``.

    ``reduction="none"`` backpropagates ``loss.sum()``. Returns the detached loss.
    """
    return _backward(loss_fn(impl, inp, problem, reduction, memory_budget))


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
    loss = make_loss(case.impl, inp, case.problem, case.reduction, memory_budget)
    return lambda: _backward(loss())


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
