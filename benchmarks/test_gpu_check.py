"""The GPU check's dry run (CPU, Triton interpreter, tiny shape) runs the same command end to end."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from benchmarks.runner import REPO_ROOT


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_gpu_check_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "gpu-check", "--dry-run", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads((tmp_path / "gpu-check.json").read_text())
    status = {(r["problem"], r["implementation"]): r["value"] for r in records if r["metric"] == "status"}
    checked = {(r["problem"], r["implementation"]) for r in records if r["metric"] == "check_ok" and r["value"]}
    for impl in ("marginops-triton", "marginops-triton-ws", "marginops-torch", "naive"):
        assert status["arcface64", impl] == "ok" and ("arcface64", impl) in checked, status
    assert status["arcface64", "floor"] == "ok"
    assert status["plain", "marginops-triton"] == "ok" and ("plain", "marginops-triton") in checked
    assert status["plain", "liger"] == "skipped"
    assert all(r["dtype"] == "bfloat16" for r in records)
    summary = (tmp_path / "summary.md").read_text()
    assert "dry run" in summary and "GPU-only tests" in summary and "marginops (triton, workspace)" in summary
    assert "skipped" in (tmp_path / "tests.txt").read_text()  # no GPU here: the GPU tests skip
