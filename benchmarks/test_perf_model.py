"""The GPU time model (``python -m benchmarks model``) counts what the kernels do.

Each test checks the model against an independent count: the floor is three
GEMMs at the cuBLAS rate, and with unlimited bandwidth and ``exp`` throughput
the recompute strategy costs exactly four GEMMs (two in Triton kernels, two in
cuBLAS) and the workspace strategy three (one in a Triton kernel).
"""

from __future__ import annotations

import importlib.util
import math

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (the model uses the Triton backend's planners)", allow_module_level=True)

from benchmarks import perf_model
from benchmarks.perf_model import Machine, predict

BUDGET = 256 * 2**20


@pytest.mark.parametrize("B, D, C", perf_model.SIZES)
def test_floor_is_three_gemms_at_the_cublas_rate(B, D, C):
    p = predict(B, D, C, perf_model.H100, BUDGET)
    assert p["floor"] == pytest.approx(6 * B * D * C / perf_model.H100.cublas_flops, rel=1e-12)


@pytest.mark.parametrize("B, D, C", perf_model.SIZES)
def test_gemm_count_of_each_strategy(B, D, C):
    m = Machine(cublas_flops=700e12, triton_flops=350e12, exp_rate=math.inf, bandwidth=math.inf)
    p = predict(B, D, C, m, BUDGET)
    gemm = 2 * B * D * C
    assert sum(p["recompute"].values()) == pytest.approx(2 * gemm / 350e12 + 2 * gemm / 700e12, rel=1e-12)
    assert sum(p["workspace"].values()) == pytest.approx(gemm / 350e12 + 2 * gemm / 700e12, rel=1e-12)


def test_streaming_passes_scale_with_bandwidth():
    B, D, C = perf_model.SIZES[0]
    slow = predict(B, D, C, Machine(700e12, 500e12, math.inf, 1e12), BUDGET)["recompute"]["passes"]
    fast = predict(B, D, C, Machine(700e12, 500e12, math.inf, 2e12), BUDGET)["recompute"]["passes"]
    assert slow == pytest.approx(2 * fast, rel=1e-12) and slow > 0
