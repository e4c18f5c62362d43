"""Named lists of cases (presets) and the targets some of them check; ``python -m benchmarks run NAME``.

Targets are stated where they are checked: each :class:`Target` compares one
measured figure with another of the same run (or a fixed number of bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .runner import Case, MiB

CPU_PEERS = ("floor", "marginops-native", "marginops-torch", "naive", "naive-compiled", "pml")
PLAIN_PEERS = ("floor", "marginops-native", "marginops-torch", "naive", "naive-compiled", "torch-linear-ce", "cce")


@dataclass(frozen=True)
class Target:
    """``metric(impl) <= max_ratio * metric(against)`` at one case of a preset (``against=None``: bytes).

    ``against`` is an implementation at the same shape: the floor, or another one on ``against_problem``
    (default: the same problem) with ``reduction="mean"``. ``shape`` and ``dtype`` pick the case where the
    preset has several (default: the first that matches). A GPU target (:data:`GPU_TARGETS`: ``marginops-triton``
    against the floor) must also be at least as fast as each of ``faster_than`` (plain-only peers on the plain
    problem) and hold at most a quarter of ``naive``'s extra peak memory; ``peers`` run beside it, and
    ``floor_ms`` and ``naive_extra_mib`` are what the first GPU run measured there (H200, 2026-12-04: records
    in benchmarks/results/gpu/, the probe's figures from issue 18), the model's inputs (:mod:`.perf_model`).
    """

    name: str
    problem: str
    impl: str
    metric: str  # "seconds", "seconds_min" or "extra_peak_bytes"
    max_ratio: float
    against: Optional[str] = None  # an implementation of the same case, "floor", or None
    reduction: str = "mean"
    memory_budget: Optional[int] = None
    against_problem: Optional[str] = None  # the other implementation's problem (default: the same)
    shape: Optional[tuple[int, int, int]] = None
    dtype: Optional[str] = None
    faster_than: tuple[str, ...] = ()
    peers: tuple[str, ...] = ()
    floor_ms: Optional[float] = None
    naive_extra_mib: Optional[float] = None

    def case(self, impl: str, **options) -> Case:
        """``impl`` at the target's shape and dtype on a GPU."""
        return Case(impl, self.problem, *self.shape, dtype=self.dtype, device="cuda", **options)


@dataclass(frozen=True)
class Preset:
    """Named cases; ``rounds``: timed interleaved (see :mod:`benchmarks.runner`); ``busy``: beside a busy process."""

    name: str
    description: str
    cases: tuple[Case, ...]
    targets: tuple[Target, ...] = ()
    rounds: Optional[int] = None
    busy: bool = False


def gpu_target(name: str, problem: str, shape, dtype: str, max_ratio: float, measured=(None, None), **kw) -> Target:
    """``marginops-triton`` against the floor at ``shape`` in ``dtype``; ``measured``: (floor ms, naive's MiB)."""
    return Target(name, problem, "marginops-triton", "seconds", max_ratio, "floor", shape=shape, dtype=dtype,
                  floor_ms=measured[0], naive_extra_mib=measured[1], **kw)


_PLAIN_PEERS = ("cce-exact", "cce", "liger", "naive-compiled")
_CCE, _LLM, _FACE = (8192, 2304, 256_000), (8192, 4096, 128_256), (1024, 512, 2_000_000)
#: The GPU targets (one H200), in the order the GPU check runs them, with the floor (ms) and the naive head's
#: extra peak memory (MiB) the first GPU run measured. Exact peers only in ``faster_than`` (Cut
#: Cross-Entropy's default filters gradients; ``cce-exact`` is its exact setting).
GPU_TARGETS = (
    gpu_target("cce-plain", "plain", _CCE, "bfloat16", 1.25, (42.2, 14_838), faster_than=("cce-exact",),
               peers=_PLAIN_PEERS),
    gpu_target("cce-arcface", "arcface64", _CCE, "bfloat16", 1.25, (42.7, 16_001), faster_than=("cce-exact",),
               peers=("naive-compiled",)),
    gpu_target("cce-arcface-1M", "arcface64", (8192, 2304, 1_000_000), "bfloat16", 1.25, (169.0, None)),
    gpu_target("llm-plain", "plain", _LLM, "bfloat16", 1.25, (36.8, 11.7 * 1024),
               faster_than=("cce-exact", "liger", "naive", "naive-compiled", "torch-linear-ce"),
               peers=_PLAIN_PEERS + ("torch-linear-ce",)),
    gpu_target("face-arcface", "arcface64", _FACE, "bfloat16", 1.35, (10.7, 40 * 1024)),
    gpu_target("face-arcface-fp16", "arcface64", _FACE, "float16", 1.35, (10.6, 40 * 1024)),
    gpu_target("cce-arcface-fp32", "arcface64", _CCE, "float32", 1.0, (558.0, None)),
)


def gpu_cases(targets=GPU_TARGETS) -> tuple[Case, ...]:
    """The GPU check's cases, most important first (a deadline skips the tail): the floor and marginops at
    every target, then ``naive`` (the memory targets need it), the peers, and marginops' other paths (the
    recompute strategy; gradient filtering, approximate by design, so not checked against the reference)."""
    cases = [t.case(i) for t in targets for i in ("floor", "marginops-triton")]
    cases += [t.case("naive") for t in targets]
    cases += [t.case(p) for t in targets for p in t.peers if p not in ("naive-compiled",)]
    cases += [t.case("naive-compiled") for t in targets if "naive-compiled" in t.peers]
    cases += [targets[0].case("marginops-triton-filter", check=False), targets[1].case("marginops-triton-recompute")]
    return tuple(dict.fromkeys(cases))


def sweep(problem: str, impls, shapes, **options) -> tuple[Case, ...]:
    """Every implementation at every shape, shape by shape (the floor first)."""
    return tuple(Case(i, problem, b, d, c, **options) for (b, d, c) in shapes for i in impls)


_NATIVE = ("floor", "marginops-native", "marginops-torch")
_TARGET_SHAPE = (1024, 512, 100_000)
_TARGET_MEMORY = (512, 256, 1_000_000)

PRESETS = {p.name: p for p in (
    Preset("demo", "the demo: ArcFace(0.5), s=30, B=512, D=256, C=200k, float32, CPU",
           sweep("ordinary", ("floor", "marginops-native", "naive", "pml"), [(512, 256, 200_000)], repeats=2)),
    Preset("quick", "small shapes in a few minutes: ArcFace and plain CE at B=256, D=128, C=20k",
           sweep("ordinary", CPU_PEERS, [(256, 128, 20_000)], repeats=3, max_seconds=5.0)
           + sweep("plain", PLAIN_PEERS[1:], [(256, 128, 20_000)], repeats=3, max_seconds=5.0)),
    Preset("targets", "the CPU float32 targets at B=1024, D=512, C=100k (memory: B=512, D=256, C=1M)",
           sweep("ordinary", ("floor", "naive", "marginops-torch"), [_TARGET_SHAPE])
           + (Case("marginops-torch", "ordinary", *_TARGET_SHAPE, reduction="none"),)
           + sweep("underflow", ("naive", "marginops-torch"), [_TARGET_SHAPE])
           + sweep("plain", ("naive", "torch-linear-ce", "marginops-torch"), [_TARGET_SHAPE], repeats=1)
           + sweep("ordinary", ("naive", "marginops-torch"), [_TARGET_MEMORY], repeats=0)
           + (Case("marginops-torch", "ordinary", *_TARGET_MEMORY, repeats=0, memory_budget=32 * MiB),),
           targets=(
               Target("<= 1.20x the floor", "ordinary", "marginops-torch", "seconds", 1.20, "floor"),
               Target("<= 0.80x naive", "ordinary", "marginops-torch", "seconds", 0.80, "naive"),
               Target("reduction='none': <= 1.45x the floor", "ordinary", "marginops-torch", "seconds", 1.45,
                      "floor", reduction="none"),
               Target("underflowing probabilities: >= 5x faster than naive", "underflow", "marginops-torch",
                      "seconds", 0.20, "naive"),
               Target("plain CE: faster than F.linear_cross_entropy", "plain", "marginops-torch", "seconds", 1.0,
                      "torch-linear-ce"),
               Target("extra peak memory at C=1M <= 64 MiB", "ordinary", "marginops-torch", "extra_peak_bytes",
                      64 * MiB, shape=_TARGET_MEMORY),
           )),
    Preset("classes", "C sweep: ArcFace(0.5), s=30, B=1024, D=512, float32",
           sweep("ordinary", CPU_PEERS, [(1024, 512, c) for c in (10_000, 30_000, 100_000, 300_000, 1_000_000)],
                 repeats=2)),
    Preset("plain", "C sweep of plain linear cross-entropy, B=1024, D=512, float32",
           sweep("plain", PLAIN_PEERS, [(1024, 512, c) for c in (10_000, 100_000)], repeats=2)),
    Preset("realistic", "a trained model's cosines (s=64: many probabilities underflow), B=1024, D=512, C=100k",
           sweep("realistic", CPU_PEERS, [_TARGET_SHAPE], repeats=2)),
    Preset("shapes", "B and D sweeps, ArcFace, C=100k",
           sweep("ordinary", CPU_PEERS, [(256, 512, 100_000), (4096, 512, 100_000), (1024, 128, 100_000),
                                          (1024, 2048, 100_000)], repeats=2)),
    Preset("huge", "one training step at C=10M, D=128, B=1024 (GFLOP/s against the floor's at C=100k)",
           sweep("ordinary", ("floor",), [(1024, 128, 100_000)], repeats=2)
           + sweep("ordinary", ("marginops-native", "marginops-torch"), [(1024, 128, 10_000_000)], repeats=0)),
    Preset("retrieval", "top-10 cosine retrieval among 1M centres, D=256, 1024 queries: topk_cosine against brute "
           "force", sweep("top10", ("marginops-topk", "brute-force-topk"), [(1024, 256, 1_000_000)], repeats=3)),
    Preset("compare", "this tree against a revision (run compare --against REV): ArcFace(0.5), s=30, the "
           "default backend, B=1024, D=512, C=100k", sweep("ordinary", ("marginops-default",), [_TARGET_SHAPE])
           + (Case("marginops-default", "ordinary", *_TARGET_SHAPE, reduction="none"),), rounds=2),
    Preset("native", "the native backend's targets: ArcFace(0.5), s=64, float32, interleaved (ratios of minima)",
           sweep("arcface64", _NATIVE, [_TARGET_SHAPE, (1024, 128, 100_000), (256, 512, 100_000)])
           + (Case("marginops-native", "arcface64", *_TARGET_SHAPE, reduction="none"),)
           + sweep("plain", ("floor", "marginops-native", "naive-compiled", "cce"), [_TARGET_SHAPE]),
           targets=(
               Target("B=1024, D=512, C=100k: <= 1.06x the floor", "arcface64", "marginops-native", "seconds_min",
                      1.06, "floor"),
               Target("reduction='none' (four GEMMs): <= 1.38x the floor", "arcface64", "marginops-native",
                      "seconds_min", 1.38, "floor", reduction="none"),
               Target("plain CE: faster than torch.compile(naive)", "plain", "marginops-native", "seconds_min",
                      1.0, "naive-compiled"),
               Target("plain CE: faster than Cut Cross-Entropy (torch_compile)", "plain", "marginops-native",
                      "seconds_min", 1.0, "cce"),
           ), rounds=4),
    Preset("native-busy", "the native backend beside one busy process (B=1024, D=512, C=100k): compare its "
           "ratios with the native preset's", sweep("arcface64", _NATIVE, [_TARGET_SHAPE]), rounds=4, busy=True),
    Preset("native-memory", "extra peak memory: ArcFace at B=512, D=256, C=1M; plain CE at C=100k",
           sweep("arcface64", ("marginops-native", "marginops-torch"), [_TARGET_MEMORY], repeats=0)
           + sweep("plain", ("marginops-native", "naive-compiled", "cce"), [_TARGET_SHAPE], repeats=0),
           targets=(
               Target("ArcFace, C=1M: native <= the torch backend", "arcface64", "marginops-native",
                      "extra_peak_bytes", 1.0, "marginops-torch"),
           )),
    Preset("engine", "sub-centres and inter-class filtering on the native backend against plain ArcFace, "
           "interleaved",
           sweep("arcface64-s", ("floor", "marginops-native"), [(256, 128, 60_000), _TARGET_SHAPE])
           + sweep("arcface-sub3", ("marginops-native",), [(256, 128, 60_000)])
           + sweep("arcface-filter", ("marginops-native",), [_TARGET_SHAPE]),
           targets=(
               Target("sub-centres k=3, B=256, C=20k, D=128: <= 1.2x plain ArcFace over the same 60k rows",
                      "arcface-sub3", "marginops-native", "seconds_min", 1.2, "marginops-native",
                      against_problem="arcface64-s"),
               Target("inter-class filtering, B=1024, D=512, C=100k: <= 1.05x the same call without it",
                      "arcface-filter", "marginops-native", "seconds_min", 1.05, "marginops-native",
                      against_problem="arcface64-s"),
           ), rounds=5),
    Preset("gpu", "one GPU: the GPU targets (Cut Cross-Entropy's shape at 256k and 1M classes, an LLM head, a "
                  "face head in bf16 and fp16, float32), marginops beside the floor, naive and the peers",
           gpu_cases()),
)}

