"""``python -m benchmarks.perf_model`` (the predicted GPU times in docs/performance.md) keeps running.

In a subprocess: the model imports the Triton backend's planners, and the
interpreter setting of the Triton tests must not depend on import order.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

REPO_ROOT = Path(__file__).resolve().parent.parent


def _model(*args: str) -> list[list[str]]:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.perf_model", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Predicted (not measured)" in proc.stdout
    return [[c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines()
            if re.match(r"\| \d", line)]


def test_predictions_cover_the_benchmark_sizes_and_respect_the_gemm_count():
    from benchmarks.gpu import SIZES

    rows = _model()
    assert [(int(r[0]), int(r[1]), int(r[2].replace(",", ""))) for r in rows] == SIZES
    for r in rows:
        recompute, workspace = float(r[6].rstrip("x")), float(r[9].rstrip("x"))
        assert recompute >= 4 / 3  # four GEMMs can never beat 4/3 of the three-GEMM floor
        assert workspace >= 1.0


def test_faster_triton_kernels_predict_less_time():
    slow, fast = _model("--triton-tflops", "400"), _model("--triton-tflops", "800")
    for a, b in zip(slow, fast):
        assert float(b[5]) < float(a[5])  # recompute total (ms)
