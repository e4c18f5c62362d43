"""pytest-benchmark over the registry: every implementation that runs here, on each problem it computes.

    pytest benchmarks/test_bench.py --benchmark-only            # time them
    pytest benchmarks/test_bench.py --benchmark-json=out.json

Each case times forward+backward at a small CPU shape (one warm-up round, then
a few rounds, gradients freed before each), then checks the implementation's
loss and gradients against the float64 reference (the runner's check): a fast
wrong answer fails. Ratios to the floor, fresh processes and peak memory are
the runner's job (``python -m benchmarks run PRESET``).
"""

from __future__ import annotations

import pytest

from benchmarks import registry, runner

SHAPE = registry.Shape(128, 64, 8192)
CASES = [runner.Case(impl, problem, SHAPE.batch, SHAPE.dim, SHAPE.classes)
         for problem in ("ordinary", "plain") for impl in registry.IMPLS
         if registry.unsupported(impl, registry.PROBLEMS[problem]) is None
         and (problem == "ordinary" or impl != "floor")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.problem}/{c.impl}")
def test_forward_backward(benchmark, case):
    reason = registry.unavailable(case.impl, case.device)
    if reason is None and registry.IMPLS[case.impl].needs_triton and case.device != "cuda":
        # in Triton's interpreter a case takes a minute and times nothing worth having; the interpreter
        # checks the kernels' results in tests/backends/test_triton_margin.py
        reason = "Triton's interpreter: no timing worth having (run on a CUDA GPU)"
    if reason is not None:
        pytest.skip(reason)
    problem = registry.PROBLEMS[case.problem]
    inp = registry.make_inputs(SHAPE, problem.inputs)
    step = registry.step_function(case.impl, problem, inp)
    benchmark.group = f"fwd+bwd {SHAPE}"
    benchmark.extra_info.update(implementation=case.impl, problem=case.problem, floor_flops=SHAPE.flops)
    benchmark.pedantic(step, setup=inp.clear_grads, rounds=3, iterations=1, warmup_rounds=1)
    if case.impl != "floor":
        result = runner.check(case)
        assert result["ok"], result
