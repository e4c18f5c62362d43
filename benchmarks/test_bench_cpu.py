"""pytest-benchmark cases: every case of :data:`benchmarks.cases.CASES` and the peers of
:data:`benchmarks.cases.PEER_CASES` at a moderate CPU shape.

Run from the repository root::

    pytest benchmarks/ --benchmark-only
    pytest benchmarks/ --benchmark-only -m "not slow"        # skip the slowest baselines
    pytest benchmarks/ --benchmark-only --benchmark-json=benchmarks/results/bench.json

``pytest tests/`` (the unit tests; ``testpaths = ["tests"]``) does not collect
this file. Each case runs forward+backward on B=512, D=256, C=50,000
float32, one warm-up round then a few timed rounds, with the gradients freed
before each round outside the timing. After timing, the case's loss and
gradients are checked against the reference backend on the same inputs: a
fast wrong answer fails. Peers that are not installed or need a GPU are
skipped with the reason (``torch.compile`` peers compile in their warm-up
round). ``extra_info`` carries the shape, the floor's FLOPs
and the achieved GFLOP/s; ratios to the floor are the job of
``python -m benchmarks.cpu_targets``, which times all cases in one run.
"""

from __future__ import annotations

import pytest

from benchmarks import cases, harness

SHAPE = cases.Shape(512, 256, 50_000)
ROUNDS = 3

#: Cases that take several times longer than the rest: deselect with ``-m "not slow"``.
SLOW = {"plain/linear_cross_entropy/mean"}


@pytest.fixture(scope="module")
def inputs():
    """One set of inputs per problem, built lazily and shared by the module's cases."""
    cache: dict[str, cases.Inputs] = {}

    def get(problem: cases.Problem) -> cases.Inputs:
        if problem.name not in cache:
            cache[problem.name] = cases.make_inputs(SHAPE, problem.inputs)
        return cache[problem.name]

    return get


@pytest.fixture(scope="module")
def reference_outputs(inputs):
    """Reference backend outputs per (problem, reduction), computed once each."""
    cache: dict[tuple[str, str], harness.StepOutputs] = {}

    def get(case: cases.Case) -> harness.StepOutputs:
        key = (case.problem.name, case.reduction)
        if key not in cache:
            inp = inputs(case.problem)
            inp.clear_grads()
            loss = cases.forward_backward("reference", inp, case.problem, case.reduction)
            cache[key] = harness.StepOutputs.capture(loss, inp.x, inp.W)
            inp.clear_grads()
        return cache[key]

    return get


def _param(case: cases.Case):
    marks = [pytest.mark.slow] if case.name in SLOW else []
    return pytest.param(case, id=case.name, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in cases.CASES + cases.PEER_CASES])
def test_forward_backward(benchmark, case, inputs, reference_outputs):
    reason = cases.unavailable(case.impl)
    if reason is not None:
        pytest.skip(reason)
    inp = inputs(case.problem)
    step = cases.step_fn(case, inp)
    benchmark.group = f"fwd+bwd {SHAPE}"
    benchmark.extra_info.update(
        implementation=case.impl, problem=case.problem.name if case.impl != "floor" else "-",
        reduction=case.reduction if case.impl != "floor" else "-", batch=SHAPE.batch, dim=SHAPE.dim,
        classes=SHAPE.classes, floor_flops=SHAPE.flops,
    )

    def setup():
        inp.clear_grads()

    result = benchmark.pedantic(step, setup=setup, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gflops"] = SHAPE.flops / benchmark.stats.stats.median / 1e9

    if case.impl not in ("floor", "reference"):
        ours = harness.StepOutputs.capture(result, inp.x, inp.W)
        inp.clear_grads()
        check = harness.agreement(ours, reference_outputs(case))
        assert check.ok, f"{case.name} disagrees with the reference: {check}"
    inp.clear_grads()
