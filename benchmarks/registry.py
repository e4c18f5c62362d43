"""The one registry: problems (what is computed), implementations (who computes it) and their inputs.

Every entry point (the runner, the presets, the GPU check, the demo and the
pytest-benchmark cases) names implementations and problems from here, so a
name means the same computation everywhere:

==============================  ====================================================================
``floor``                       the three GEMMs of the shape (logits, dX, dW; ``6 B D C`` FLOPs), no loss
``marginops-topk``              ``mo.topk_cosine`` (retrieval problems: the ``k`` nearest classes, chunked)
``brute-force-topk``            one ``B x C`` cosine matrix and ``torch.topk`` (retrieval problems)
``marginops-torch``             ``mo.margin_cross_entropy(..., backend="torch")`` (chunked PyTorch)
``marginops-native``            ``backend="native"`` (C++ tile kernels between BLAS GEMMs, CPU)
``marginops-default``           ``backend="auto"``: what a user gets
``marginops-triton``            ``backend="triton"``, default options (for a scalar loss: the workspace
                                strategy, three GEMMs, with the default budget)
``marginops-triton-recompute``  ``backend="triton"``, ``strategy="recompute"`` (four GEMMs, no logits kept)
``marginops-triton-filter``     ``backend="triton"``, ``gradient_filter=2**-12`` (Cut Cross-Entropy's
                                default threshold for bf16: tiles of negligible probabilities skipped)
``naive``                       ``normalize -> linear -> margin -> cross_entropy`` with the B x C logits
``naive-compiled``              ``torch.compile`` of ``naive``
``pml``                         pytorch-metric-learning's ``ArcFaceLoss`` / ``CosFaceLoss``
``torch-linear-ce``             ``F.linear_cross_entropy`` (recent PyTorch; plain problems only)
``cce``                         Apple's Cut Cross-Entropy, its defaults (``filter_eps="auto"``; plain only)
``cce-exact``                   Cut Cross-Entropy with ``filter_eps=None`` (the exact gradients)
``liger``                       Liger-Kernel's fused linear cross-entropy (CUDA; plain problems only)
==============================  ====================================================================
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

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


# -- problems -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """What is computed: margin, scale, normalization, and how the inputs are drawn.

    ``inputs``: ``"gaussian"`` (x, W standard normal: cosines ~ N(0, 1/D), nothing
    underflows), ``"sphere"`` (x, W uniform on a 2-sphere: every row's cosines are
    uniform on [-1, 1], so at s=64 about 1/8 of the float32 probabilities are
    subnormal), ``"linear"`` (W drawn like ``nn.Linear``: logits ~ N(0, 1)) or
    ``"trained"`` (target cosines uniform in [0.7, 0.9], the others spread like a
    trained model's, std ~0.35).
    """

    name: str
    margin: str  # "arcface" = ArcFace(0.5), "cosface" = CosFace(0.35), "none"
    scale: float
    normalize: bool
    inputs: str
    description: str
    sub_centers: int = 1  # k rows of W per class: a case's C counts rows (C / k classes)
    filter_threshold: Optional[float] = None  # inter-class filtering (marginops only)
    topk: int = 0  # > 0: not a loss but top-k cosine retrieval of the x rows among the W rows (no gradients)

    @property
    def is_plain(self) -> bool:
        """Plain linear cross-entropy: what ``F.linear_cross_entropy``, CCE and Liger compute."""
        return not self.normalize and self.scale == 1.0 and self.margin == "none"

    @property
    def is_plain_margin(self) -> bool:
        """The loss every peer computes: no sub-centres, no filtering."""
        return self.sub_centers == 1 and self.filter_threshold is None

    def margin_object(self):
        """The margin argument of ``margin_cross_entropy`` (wrapped in ``SubCenter`` for sub-centres)."""
        margin = {"arcface": mo.ArcFace(0.5), "cosface": mo.CosFace(0.35), "none": None}[self.margin]
        return mo.SubCenter(margin, self.sub_centers) if self.sub_centers > 1 else margin

    def options(self) -> dict:
        """Options of ``margin_cross_entropy`` beyond margin and scale."""
        extra = {} if self.filter_threshold is None else {"interclass_filtering_threshold": self.filter_threshold}
        return {"normalize": self.normalize, **extra}


PROBLEMS = {p.name: p for p in (
    Problem("ordinary", "arcface", 30.0, True, "gaussian", "ArcFace(0.5), s=30, Gaussian embeddings"),
    Problem("arcface64", "arcface", 64.0, True, "gaussian", "ArcFace(0.5), s=64, Gaussian embeddings"),
    Problem("underflow", "arcface", 64.0, True, "sphere",
            "ArcFace(0.5), s=64, cosines uniform on [-1, 1]: float32 probabilities underflow"),
    Problem("realistic", "arcface", 64.0, True, "trained",
            "ArcFace(0.5), s=64, a trained model's cosines (targets U(0.7, 0.9), others ~ N(0, 0.35^2))"),
    Problem("plain", "none", 1.0, False, "linear", "plain linear cross-entropy (normalize=False, s=1, no margin)"),
    Problem("arcface-sub3", "arcface", 64.0, True, "gaussian",
            "sub-center ArcFace(0.5), s=64, k=3 (C counts the 3 C/3 rows of W)", sub_centers=3),
    Problem("arcface-filter", "arcface", 64.0, True, "gaussian",
            "ArcFace(0.5), s=64, inter-class filtering at cos > 0.1", filter_threshold=0.1),
    Problem("top10", "none", 1.0, True, "queries",
            "top-10 cosine retrieval (each query a centre plus noise of the same size), no gradients", topk=10),
    Problem("arcface64-s", "arcface", 64.0, True, "gaussian", "ArcFace(0.5), s=64, Gaussian embeddings (the "
            "plain twin of arcface-sub3 and arcface-filter)"),
)}


@dataclass(frozen=True)
class Shape:
    """``batch`` rows (B), ``dim`` features (D), ``classes`` (C)."""

    batch: int
    dim: int
    classes: int

    def __post_init__(self):
        for name in ("batch", "dim", "classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

    @property
    def flops(self) -> int:
        """FLOPs of the three-GEMM floor: ``6 B D C``."""
        return 6 * self.batch * self.dim * self.classes

    def __str__(self) -> str:
        return f"B={self.batch}, D={self.dim}, C={self.classes}"


# -- inputs ---------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """Leaf tensors of a case: ``x`` (B, D) and ``W`` (C, D) requiring grad, labels ``y`` (B,)."""

    x: Tensor
    W: Tensor
    y: Tensor

    def clear_grads(self) -> None:
        self.x.grad = None
        self.W.grad = None

    def to(self, dtype: torch.dtype) -> "Inputs":
        """Detached leaf copies in ``dtype`` (labels shared)."""
        return Inputs(self.x.detach().to(dtype).requires_grad_(), self.W.detach().to(dtype).requires_grad_(),
                      self.y)


TRAINED_SPREAD_DIM = 8  # "trained" non-target cosines have std ~ 1/sqrt(8)


def _on_sphere(n: int, dim: int, k: int, gen: torch.Generator, device) -> Tensor:
    """Rows uniform on the unit sphere of the first ``k`` coordinates, plus 1% Gaussian noise elsewhere."""
    out = torch.randn(n, dim, generator=gen, device=device).mul_(0.01)
    out[:, :k] = F.normalize(torch.randn(n, k, generator=gen, device=device), dim=1)
    return out


def make_inputs(shape: Shape, kind: str, *, dtype: torch.dtype = torch.float32, device="cpu",
                seed: int = 0) -> Inputs:
    """Deterministic inputs of ``kind`` (see :class:`Problem`), drawn on ``device``, every element written."""
    B, D, C = shape.batch, shape.dim, shape.classes
    gen = torch.Generator(device=device).manual_seed(seed)
    if kind in ("gaussian", "linear"):
        x = torch.randn(B, D, generator=gen, device=device, dtype=dtype)
        W = torch.randn(C, D, generator=gen, device=device, dtype=dtype)
        if kind == "linear":
            W.mul_(D ** -0.5)
        y = torch.randint(0, C, (B,), generator=gen, device=device)
    elif kind == "sphere":
        if D < 3:
            raise ValueError(f"sphere inputs need dim >= 3, got {D}")
        x, W = _on_sphere(B, D, 3, gen, device), _on_sphere(C, D, 3, gen, device)
        y = torch.randint(0, C, (B,), generator=gen, device=device)
    elif kind == "queries":  # each query one centre plus noise: one clearly nearest class, as in the FAQ use
        W = torch.randn(C, D, generator=gen, device=device, dtype=dtype)
        y = torch.randint(0, C, (B,), generator=gen, device=device)
        x = W[y] + torch.randn(B, D, generator=gen, device=device, dtype=dtype)
    elif kind == "trained":
        if D <= TRAINED_SPREAD_DIM:
            raise ValueError(f"trained inputs need dim > {TRAINED_SPREAD_DIM}, got {D}")
        W = _on_sphere(C, D, TRAINED_SPREAD_DIM, gen, device)
        y = torch.randint(0, C, (B,), generator=gen, device=device)
        w = F.normalize(W[y], dim=1)  # x_i = t_i w + sqrt(1 - t_i^2) u_i, u_i a unit vector orthogonal to w
        u = _on_sphere(B, D, TRAINED_SPREAD_DIM, gen, device)
        u = F.normalize(u - (u * w).sum(1, keepdim=True) * w, dim=1)
        t = torch.rand(B, 1, generator=gen, device=device).mul_(0.2).add_(0.7)
        x = t * w + (1 - t * t).sqrt() * u
    else:
        raise ValueError(f"kind must be one of gaussian, linear, sphere, trained, queries; got {kind!r}")
    return Inputs(x.to(dtype).requires_grad_(), W.to(dtype).requires_grad_(), y)


def problem_inputs(problem: Problem, shape: Shape, **kwargs) -> Inputs:
    """:func:`make_inputs` of the problem's kind, labels among its ``C / k`` classes (sub-centres)."""
    inp = make_inputs(shape, problem.inputs, **kwargs)
    if problem.sub_centers > 1:
        inp.y = inp.y // problem.sub_centers
    return inp


# -- implementations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Impl:
    """An implementation: its label, what it computes, and what it needs to run."""

    name: str
    label: str
    plain_only: bool = False  # computes plain linear cross-entropy only
    margins_only: bool = False  # always normalizes and applies a margin (pml)
    module: Optional[str] = None  # import name it needs
    package: Optional[str] = None  # pip name of that module
    cuda_only: bool = False
    needs_triton: bool = False  # marginops' Triton backend: CUDA, or the interpreter on CPU
    compiles: bool = False  # compiles on first use (warmed up at the measured shape's class count)
    bxc_tensors: int = 0  # B x C float32 tensors held at the peak (to refuse cases that cannot fit)
    retrieval: bool = False  # computes top-k retrieval problems only


IMPLS = {i.name: i for i in (
    Impl("floor", "3-GEMM floor", bxc_tensors=1),
    Impl("marginops-topk", "marginops topk_cosine", retrieval=True),
    Impl("brute-force-topk", "brute force (B x C scores, torch.topk)", retrieval=True, bxc_tensors=1),
    Impl("marginops-torch", "marginops (torch)"),
    Impl("marginops-native", "marginops (native C++)"),
    Impl("marginops-default", "marginops (default backend)"),
    Impl("marginops-triton", "marginops (triton)", needs_triton=True),
    Impl("marginops-triton-recompute", "marginops (triton, recompute)", needs_triton=True),
    Impl("marginops-triton-filter", "marginops (triton, gradient_filter=2^-12)", needs_triton=True),
    Impl("naive", "naive PyTorch", bxc_tensors=5),
    Impl("naive-compiled", "torch.compile(naive)", compiles=True, bxc_tensors=4),
    Impl("pml", "pytorch-metric-learning", margins_only=True, module="pytorch_metric_learning",
         package="pytorch-metric-learning", bxc_tensors=8),
    Impl("torch-linear-ce", "F.linear_cross_entropy", plain_only=True, bxc_tensors=2),
    Impl("cce", "Cut Cross-Entropy", plain_only=True, module="cut_cross_entropy", package="cut-cross-entropy",
         compiles=True, bxc_tensors=4),
    Impl("cce-exact", "Cut Cross-Entropy, filter_eps=None", plain_only=True, module="cut_cross_entropy",
         package="cut-cross-entropy", compiles=True, bxc_tensors=4),
    Impl("liger", "Liger fused linear CE", plain_only=True, module="liger_kernel", package="liger-kernel",
         cuda_only=True, bxc_tensors=1),
)}

#: marginops' own implementations (the rest are the floor and what a user would pick instead).
OURS = ("marginops-torch", "marginops-native", "marginops-default", "marginops-triton", "marginops-triton-recompute",
        "marginops-triton-filter")
#: ``marginops-triton-filter``'s threshold: Cut Cross-Entropy's default ``filter_eps`` for bf16 (2^-12).
GRADIENT_FILTER = 2.0**-12


def check_impl(name: str) -> Impl:
    if name not in IMPLS:
        raise ValueError(f"implementation must be one of {tuple(IMPLS)}, got {name!r}")
    return IMPLS[name]


def unsupported(name: str, problem: Problem) -> Optional[str]:
    """Why ``name`` does not compute ``problem``, or None."""
    impl = check_impl(name)
    if impl.retrieval != (problem.topk > 0) and name != "floor":
        return f"{name} does not compute {problem.name} ({'a loss' if problem.topk else 'top-k retrieval'})"
    if impl.plain_only and not problem.is_plain:
        return f"{name} computes plain linear cross-entropy only"
    if impl.margins_only and (problem.margin == "none" or not problem.normalize):
        return f"{name} always normalizes and applies a margin"
    if name not in OURS and not problem.is_plain_margin:
        return f"{name} has no sub-centres or inter-class filtering"
    return None


def unavailable(name: str, device: str) -> Optional[str]:
    """Why ``name`` cannot run here on ``device`` (not installed, needs a GPU, old PyTorch), or None."""
    impl = check_impl(name)
    if impl.cuda_only and device != "cuda":
        return f"{name} needs a CUDA GPU"
    if impl.module is not None and importlib.util.find_spec(impl.module) is None:
        return f"{impl.package} is not installed"
    if impl.needs_triton:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        from marginops.backends import triton_margin

        if device != "cuda" and not triton_margin.is_interpreted():
            return "the triton backend needs a CUDA GPU (or TRITON_INTERPRET=1, the interpreter)"
    if name == "marginops-native":
        from marginops.backends import native

        if device != "cpu":
            return "the native backend runs on CPUs"
        if not native.available():
            return "the native kernels are switched off or did not build (see the warning)"
    if name == "torch-linear-ce" and not hasattr(F, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy"
    return None


def naive_loss(x: Tensor, W: Tensor, y: Tensor, margin: Optional[mo.Margin], scale: float, normalize: bool,
               reduction: str = "mean") -> Tensor:
    """What people write: ``F.normalize``, ``F.linear``, the margin on the target column, ``F.cross_entropy``."""
    if normalize:
        x, W = F.normalize(x, dim=1), F.normalize(W, dim=1)
    cos = F.linear(x, W)
    t = cos.gather(1, y.unsqueeze(1))
    z = scale * (margin(t) if margin is not None else t)
    return F.cross_entropy((scale * cos).scatter(1, y.unsqueeze(1), z), y, reduction=reduction)


def _pml(problem: Problem) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """pytorch-metric-learning's loss on our ``(C, D)`` weight (it owns a ``(D, C)`` one: we lend ``W.t()``).

    Its ArcFace margin is in degrees; it averages over rows (``reduction="mean"`` only).
    """
    from pytorch_metric_learning import losses

    if problem.margin == "arcface":
        mod = losses.ArcFaceLoss(num_classes=1, embedding_size=1, margin=math.degrees(0.5), scale=problem.scale)
    else:
        mod = losses.CosFaceLoss(num_classes=1, embedding_size=1, margin=0.35, scale=problem.scale)
    del mod.W

    def loss(x: Tensor, W: Tensor, y: Tensor) -> Tensor:
        mod.W, mod.num_classes = W.t(), W.shape[0]
        return mod(x, y)

    return loss


def loss_function(name: str, problem: Problem, *, device: str = "cpu", reduction: str = "mean",
                  memory_budget: Optional[int] = None) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``f(x, W, y) -> loss`` of implementation ``name`` on ``problem`` (not the floor).

    ``memory_budget`` goes to marginops' implementations (default: the library's).
    Raises ValueError when it does not compute the problem (:func:`unsupported`)
    and RuntimeError when it cannot run here (:func:`unavailable`).
    """
    if name == "floor":
        raise ValueError("the floor computes no loss: use step_function")
    for why, exc in ((unsupported(name, problem), ValueError), (unavailable(name, device), RuntimeError)):
        if why is not None:
            raise exc(why)
    if reduction != "mean" and name in ("pml", "cce", "cce-exact", "liger"):
        raise ValueError(f"{name} is run with reduction='mean' only, got {reduction!r}")
    margin, s, normalize = problem.margin_object(), problem.scale, problem.normalize
    if name in OURS:
        options = dict(backend={"marginops-torch": "torch", "marginops-native": "native",
                                "marginops-default": "auto"}.get(name, "triton"), memory_budget=memory_budget)
        if name == "marginops-triton-recompute":
            options["strategy"] = "recompute"
        if name == "marginops-triton-filter":
            options["gradient_filter"] = GRADIENT_FILTER

        def ours(x, W, y):
            return mo.margin_cross_entropy(x, W, y, margin, s, reduction=reduction, validate_labels=False,
                                           **problem.options(), **options)

        return ours
    if name in ("naive", "naive-compiled"):
        fn = naive_loss if name == "naive" else torch.compile(naive_loss, dynamic=True)
        return lambda x, W, y: fn(x, W, y, margin, s, normalize, reduction)
    if name == "pml":
        return _pml(problem)
    if name == "torch-linear-ce":
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda x, W, y: F.linear_cross_entropy(x, W, y, reduction=reduction, options=options)
    if name in ("cce", "cce-exact"):
        from cut_cross_entropy import linear_cross_entropy

        # "cce" is its Triton kernel (CUDA); "torch_compile" its pure-PyTorch path
        exact = {"filter_eps": None} if name == "cce-exact" else {}
        return lambda x, W, y: linear_cross_entropy(x, W, y, impl="cce" if x.is_cuda else "torch_compile", **exact)
    if name == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()

        def liger_loss(x, W, y):
            out = liger(W, x, y)
            return out[0] if isinstance(out, tuple) else out

        return liger_loss
    raise AssertionError(name)


def three_gemms(x: Tensor, W: Tensor) -> None:
    """The floor: ``logits = x W^T``, ``dX = G W``, ``dW = G^T x`` with the logits standing in for ``G``."""
    logits = x @ W.t()
    logits @ W
    logits.t() @ x


def step_function(name: str, problem: Problem, inp: Inputs, *, device: str = "cpu", reduction: str = "mean",
                  memory_budget: Optional[int] = None) -> Callable[[], Optional[Tensor]]:
    """One training step's loss work on ``inp``: forward, then backward into ``x.grad`` and ``W.grad``.

    Returns the detached loss (None for the floor). ``reduction="none"``
    backpropagates the sum of the rows.
    """
    if name == "floor":
        x, W = inp.x.detach(), inp.W.detach()
        return lambda: three_gemms(x, W)
    if problem.topk:
        if unsupported(name, problem):
            raise ValueError(unsupported(name, problem))
        q, W, k = inp.x.detach(), inp.W.detach(), problem.topk
        if name == "marginops-topk":
            return lambda: mo.topk_cosine(q, W, k)
        return lambda: torch.topk(F.normalize(q, dim=1) @ F.normalize(W, dim=1).T, k, dim=1)
    fn = loss_function(name, problem, device=device, reduction=reduction, memory_budget=memory_budget)

    def step() -> Tensor:
        loss = fn(inp.x, inp.W, inp.y)
        (loss.sum() if loss.dim() else loss).backward()
        return loss.detach()

    return step
