"""The GPU window's two commands in their dry-run form (CPU, Triton interpreter, tiny shapes), and the
pieces they are made of: the children's environment, the target verdicts, the tuning table."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from benchmarks import gpu_check, presets
from marginops import tune as gpu_tune
from benchmarks.runner import REPO_ROOT, records_of

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def test_children_keep_the_callers_pythonpath(monkeypatch):
    # peers installed with `pip install --target /tmp/site` travel on PYTHONPATH: the first GPU run lost them
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/tmp/site", "/opt/more"]))
    env = gpu_check.child_env(dry_run=False)
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO_ROOT), "/tmp/site", "/opt/more"]
    monkeypatch.delenv("PYTHONPATH")
    assert gpu_check.child_env(dry_run=True)["PYTHONPATH"] == str(REPO_ROOT)
    assert gpu_check.child_env(dry_run=True)["TRITON_INTERPRET"] == "1"


def _records(target, seconds: dict, extra: dict) -> list[dict]:
    out = []
    for impl, s in seconds.items():
        case = target.case(impl)
        result = {"status": "ok", "seconds": s}
        if impl in extra:
            result["extra_peak_bytes"] = extra[impl]
        out += records_of(case, result, floor_seconds={"seconds": seconds.get("floor")}, preset="gpu-check",
                          machine={}, date="2026-12-04")
    return out


@needs_triton
def test_targets_are_judged_from_one_runs_records():
    t = next(t for t in presets.GPU_TARGETS if t.name == "llm-plain")
    band = gpu_check.formula_bytes(t)
    inside = band["total"] + 10 * 2**20
    good = _records(t, {"floor": 1.0, "marginops-triton": 1.2, "cce-exact": 1.5, "liger": 1.3, "naive": 1.25,
                        "naive-compiled": 1.4, "torch-linear-ce": 2.0},
                    {"marginops-triton": inside, "naive": 8 * inside})
    row, = gpu_check.evaluate(good, targets=(t,))
    assert row["ratio"] == pytest.approx(1.2) and row["ratio_met"] and row["memory_met"] and row["formula_met"]
    assert all(row["faster_than"].values()) and row["met"] is True
    slow = _records(t, {"floor": 1.0, "marginops-triton": 1.3, "naive": 1.25},
                    {"marginops-triton": band["upper"] + 1, "naive": 2 * inside})
    row, = gpu_check.evaluate(slow, targets=(t,))
    assert row["ratio_met"] is False and row["faster_than"]["naive"] is False and row["memory_met"] is False
    assert row["formula_met"] is False and row["faster_than"]["liger"] is None and row["met"] is False
    row, = gpu_check.evaluate([], targets=(t,))
    assert row["met"] is None and row["ratio"] is None  # not measured
    text = gpu_check.targets_text(gpu_check.evaluate(good + slow[:0], targets=(t,)))
    assert "| llm-plain |" in text and "**not met**" not in text


def test_gpu_preset_runs_the_targets_first():
    cases = presets.PRESETS["gpu"].cases
    n = 2 * len(presets.GPU_TARGETS)
    assert {(c.impl, c.problem, c.batch, c.dim, c.classes, c.dtype) for c in cases[:n]} == {
        (i, t.problem, *t.shape, t.dtype) for t in presets.GPU_TARGETS for i in ("floor", "marginops-triton")}
    assert all(c.device == "cuda" for c in cases)
    assert {c.impl for c in cases} >= {"naive", "cce-exact", "cce", "liger", "naive-compiled",
                                       "marginops-triton-filter", "marginops-triton-recompute"}


@pytest.mark.slow
@needs_triton
def test_gpu_check_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "gpu-check", "--dry-run", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads((tmp_path / "gpu-check.json").read_text())
    status = {(r["problem"], r["implementation"], r["dtype"]): r["value"] for r in records if r["metric"] == "status"}
    checked = {(r["problem"], r["implementation"], r["dtype"]) for r in records
               if r["metric"] == "check_ok" and r["value"]}
    for key in (("plain", "marginops-triton", "bfloat16"), ("arcface64", "marginops-triton", "float16"),
                ("arcface64", "marginops-triton", "float32"), ("plain", "naive", "bfloat16"),
                ("arcface64", "marginops-triton-recompute", "bfloat16")):
        assert status[key] == "ok" and key in checked, status
    assert status["plain", "floor", "bfloat16"] == "ok"
    assert status["plain", "marginops-triton-filter", "bfloat16"] == "ok"
    assert status["plain", "liger", "bfloat16"] == "skipped"
    rows = json.loads((tmp_path / "targets.json").read_text())
    assert [r["name"] for r in rows] == [t.name for t in presets.GPU_TARGETS]
    summary = (tmp_path / "summary.md").read_text()
    assert "dry run" in summary and "GPU-only tests" in summary and "## Targets" in summary
    assert "skipped" in (tmp_path / "tests.txt").read_text()  # no GPU here: the GPU tests skip
    assert "marginops-triton" in (tmp_path / "profile-face-arcface-fp16.txt").read_text()


@needs_triton
def test_gpu_tune_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "marginops.tune", "--dry-run", "--out", str(tmp_path),
                           "--dtypes", "bfloat16", "--kernels", "fwd,ws,grad", "--families", "wide"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads((tmp_path / "tune.json").read_text())["records"]
    assert len(records) == 6 and all(r["status"] == "ok" and r["seconds"] > 0 for r in records), records
    table = json.loads((tmp_path / "triton_tuned.json").read_text())["configs"]["sm0"]
    import torch

    from marginops.backends import triton_config as tc

    assert set(table) == {f"{k}/{d}/wide" for k in ("fwd", "ws", "grad") for d in ("bfloat16", "float16")}
    for kernel in ("fwd", "ws", "grad"):
        assert table[f"{kernel}/float16/wide"] == table[f"{kernel}/bfloat16/wide"]
        tried = {tc.config_for(kernel, torch.bfloat16).key()}
        tried |= {tc.parse(c).key() for c in gpu_tune.CANDIDATES["bfloat16"][kernel][1:2]}  # the dry run tries two
        assert table[f"{kernel}/bfloat16/wide"] in tried


def test_tuned_table_overrides_the_defaults_for_its_gpu_only(tmp_path, monkeypatch):
    import torch

    from marginops.backends import triton_config as tc

    path = tmp_path / "t.json"
    path.write_text(json.dumps({"configs": {"sm90": {"fwd/bfloat16/wide": "64x128x64w4s3o2t"}}}))
    monkeypatch.setenv("MARGINOPS_TRITON_TUNED", str(path))
    tc.tuned_table.cache_clear()
    try:
        assert tc.config_for("fwd", torch.bfloat16, 4096, 90) == tc.parse("64x128x64w4s3o2t")
        assert tc.config_for("fwd", torch.bfloat16, 512, 90) == tc.DEFAULTS["fwd"][torch.bfloat16]  # narrow
        assert tc.config_for("fwd", torch.bfloat16, 4096, 80) == tc.DEFAULTS["fwd"][torch.bfloat16]  # another GPU
        assert tc.config_for("fwd", torch.bfloat16, 4096) == tc.DEFAULTS["fwd"][torch.bfloat16]  # CPU
        monkeypatch.setenv("MARGINOPS_TRITON_TUNED", "0")
        tc.tuned_table.cache_clear()
        assert tc.config_for("fwd", torch.bfloat16, 4096, 90) == tc.DEFAULTS["fwd"][torch.bfloat16]
    finally:
        tc.tuned_table.cache_clear()
