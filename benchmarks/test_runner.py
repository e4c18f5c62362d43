"""The runner's check catches a wrong implementation, and its records carry what the report needs."""

from __future__ import annotations

import pytest
import torch

from benchmarks import registry, runner
from benchmarks.runner import Case


def test_check_passes_for_marginops_and_fails_for_a_wrong_loss(monkeypatch):
    case = Case("marginops-torch", "ordinary", 20, 12, 300)
    assert runner.check(case)["ok"]
    real = registry.loss_function

    def scaled_gradients(name, problem, **kw):  # right loss, gradients 1% too large
        fn = real(name, problem, **kw)

        class Scale(torch.autograd.Function):
            @staticmethod
            def forward(ctx, loss):
                return loss.clone()

            @staticmethod
            def backward(ctx, g):
                return 1.01 * g

        return lambda x, W, y: Scale.apply(fn(x, W, y))

    monkeypatch.setattr(registry, "loss_function", scaled_gradients)
    result = runner.check(case)
    assert not result["ok"] and result["loss_err"] < 1e-6 and result["grad_w_err"] > 5e-3, result


@pytest.mark.parametrize("field, value", [("impl", "nope"), ("problem", "nope"), ("dtype", "int8"),
                                          ("device", "tpu"), ("reduction", "max"), ("batch", 0), ("repeats", -1)])
def test_bad_case_names_the_field(field, value):
    kw = dict(impl="naive", problem="ordinary", batch=4, dim=8, classes=16)
    with pytest.raises(ValueError, match=field if field not in ("impl",) else "implementation"):
        Case(**{**kw, field: value})


def test_unsupported_and_unavailable_cases_are_recorded_as_skipped():
    assert runner.run_case(Case("pml", "plain", 4, 8, 16))["status"] == "skipped"
    assert "CUDA" in runner.run_case(Case("liger", "plain", 4, 8, 16))["error"]


def test_records_are_long_format_with_machine_and_floor_ratio():
    case = Case("naive", "ordinary", 4, 8, 16)
    recs = runner.records_of(case, {"status": "ok", "seconds": 2.0, "extra_peak_bytes": 10,
                                    "check": {"ok": True}}, floor_seconds={"seconds": 0.5}, preset="p",
                             machine={"cpu": "x"}, date="d")
    by_metric = {r["metric"]: r["value"] for r in recs}
    assert by_metric == {"status": "ok", "seconds": 2.0, "extra_peak_bytes": 10, "ratio_to_floor": 4.0,
                         "gflops": 6 * 4 * 8 * 16 / 2.0 / 1e9, "check_ok": True}
    assert all(r["machine"] == {"cpu": "x"} and r["implementation"] == "naive" and r["classes"] == 16
               for r in recs)


def test_machine_info_names_the_cpu_and_versions():
    m = runner.machine_info()
    assert m["cpu"] and m["torch"] == torch.__version__ and m["cores"] >= 1
    assert m["cpu"] in runner.describe_machine(m)


def test_demo_summary_says_what_was_measured():
    from benchmarks import demo

    recs = []
    for impl, s, mem in (("floor", 1.0, 0), ("marginops-torch", 1.2, 20 * 2**20), ("naive", 3.6, 800 * 2**20)):
        result = {"status": "ok", "seconds": s, "extra_peak_bytes": mem, "others_cpu_share": 0.0}
        if impl != "floor":
            result.update(loss=25.0, check={"ok": True})
        recs += runner.records_of(Case(impl, "ordinary", 512, 256, 200_000), result,
                                  floor_seconds={"seconds": 1.0}, preset="demo", machine=runner.machine_info(),
                                  date="d")
    text = " ".join(demo.explain(recs).split())
    assert "3.0x faster" in text and "20 MiB of extra memory instead of 800 MiB (40x less)" in text
    assert "marginops needed 1.20x that" in text and "Other programs" not in text


def test_interleaved_mode_times_a_shape_in_one_process_with_ratios_of_minima():
    """Cases of one shape (several problems over the same kind of inputs) run round-robin in one fresh
    process: every case gets one sample per round, the median and minimum, and both ratios to the floor."""
    cases = [Case("floor", "arcface64-s", 16, 12, 600), Case("marginops-torch", "arcface64-s", 16, 12, 600),
             Case("marginops-torch", "arcface-sub3", 16, 12, 600), Case("naive", "arcface-sub3", 16, 12, 600),
             Case("marginops-torch", "plain", 16, 12, 600)]
    assert [len(u) for u in runner._units(cases, 3)] == [4, 1]  # gaussian inputs together; plain draws linear W
    records = runner.run(cases, preset="t", rounds=3, progress=False)
    by = {(r["implementation"], r["problem"], r["metric"]): r["value"] for r in records}
    for impl, problem in (("marginops-torch", "arcface64-s"), ("marginops-torch", "arcface-sub3")):
        assert by[impl, problem, "status"] == "ok" and by[impl, problem, "check_ok"] is True
        assert len(by[impl, problem, "samples"]) == 3
        assert by[impl, problem, "seconds_min"] == min(by[impl, problem, "samples"])
        floor = by["floor", "arcface64-s", "seconds_min"]
        assert by[impl, problem, "ratio_to_floor_min"] == pytest.approx(by[impl, problem, "seconds_min"] / floor)
    assert by["naive", "arcface-sub3", "status"] == "skipped"  # the naive head has no sub-centres
    assert all(r["rounds"] == 3 for r in records)


def test_against_a_revision_runs_our_cases_on_its_marginops(tmp_path):
    """``--against REV``: our implementation also runs on the other revision's marginops (here HEAD, so
    the same code), processes alternating, records tagged with its sha; the floor runs once."""
    cases = [Case(impl, "ordinary", 8, 6, 50, repeats=1) for impl in ("floor", "marginops-torch")]
    records = runner.run(cases, preset="t", against="HEAD", processes=2, progress=False)
    impls = {r["implementation"] for r in records}
    sha = next(i for i in impls if "@" in i).split("@")[1]
    assert impls == {"floor", "marginops-torch", f"marginops-torch@{sha}"}
    by = {(r["implementation"], r["metric"]): r["value"] for r in records}
    assert by[f"marginops-torch@{sha}", "status"] == "ok" and by[f"marginops-torch@{sha}", "check_ok"] is True
    assert len(by["marginops-torch", "samples"]) == 2  # one timed step per process, two processes


def test_retrieval_cases_are_checked_against_float64_brute_force():
    case = Case("marginops-topk", "top10", 40, 16, 3000, repeats=1)
    assert runner.check(case)["ok"]
    result = runner.run_case(case)
    assert result["status"] == "ok" and result["check"]["indices_equal"] > 0 and "loss" not in result
    recs = runner.records_of(case, result, floor_seconds=None, preset="p", machine={}, date="d")
    assert {r["metric"] for r in recs} >= {"queries_per_second", "extra_peak_bytes"}
    assert runner.run_case(Case("marginops-topk", "ordinary", 4, 8, 16))["status"] == "skipped"
