"""The GPU time model (``python -m benchmarks model``) counts what the kernels do.

Each test checks the model against an independent count: the floor is three
GEMMs at the cuBLAS rate; with unlimited bandwidth, free epilogues and Triton
products as fast as cuBLAS the workspace strategy costs exactly three GEMMs
and the recompute strategy four; the model reproduces the calibration it
states (the old forward kernel's measured time); the memory it predicts is the
backend's formula.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from benchmarks import perf_model
from benchmarks.__main__ import main as cli
from benchmarks.perf_model import H200, TARGETS, predict
from marginops.backends import triton_config as tc
from marginops.backends import triton_plan as tp

FREE = replace(H200, bandwidth=math.inf, epilogue_cycles=0.0, tf32x3=H200.cublas["float32"])


@pytest.mark.parametrize("t", TARGETS, ids=lambda t: t.name)
def test_floor_is_three_gemms_at_the_measured_cublas_rate(t):
    p = predict(t)
    assert p["floor"] == pytest.approx(t.floor_ms * 1e-3, rel=1e-9)  # calibrated on the first GPU run's floor
    uncalibrated = replace(t, floor_ms=None)
    assert predict(uncalibrated)["floor"] == pytest.approx(6 * math.prod(t.shape) / H200.cublas[t.dtype], rel=1e-12)


@pytest.mark.parametrize("t", TARGETS, ids=lambda t: t.name)
def test_gemm_count_of_each_strategy(t, monkeypatch):
    monkeypatch.setattr(tp, "grid_efficiency", lambda *a: 1.0)  # full waves
    t = replace(t, floor_ms=None)
    gemm = 2 * math.prod(t.shape) / FREE.cublas[t.dtype]
    ws = predict(t, FREE, efficiency=1.0, strategy="workspace")
    assert ws["steps"]["scale by grad_output"] == 0.0  # a streaming pass: free at infinite bandwidth
    rc = predict(t, FREE, efficiency=1.0, strategy="recompute")
    assert ws["total"] == pytest.approx(3 * gemm, rel=1e-9)
    assert rc["total"] == pytest.approx(4 * gemm, rel=0.02)  # the recompute grid's waves are not smoothed


def test_the_default_path_is_the_backends_choice():
    # every target is a scalar loss with gradients over the whole range: the workspace strategy
    assert all(predict(t)["workspace"] for t in TARGETS)


def test_calibration_reproduces_the_old_forward_kernel():
    # the old kernel: 128 x 128 tiles, one program per SM, 320 programs (64 row blocks x 5 splits) on 132 SMs
    t = TARGETS[0]
    B, D, C = t.shape
    busy = 64 * 2000 / (3 * 132 * 400)  # 3 waves of programs walking 400 class tiles each
    gemm = 2 * B * C * D / (6 * B * C * D / (t.floor_ms * 1e-3))
    epilogue = B * C * H200.epilogue_cycles / (H200.sms * H200.clock)
    old = gemm / perf_model.MEASURED_EFFICIENCY / busy + epilogue
    assert old == pytest.approx(28.7e-3, rel=0.03)  # torch.profiler: _margin_fwd_kernel 28.7 ms


@pytest.mark.parametrize("t", TARGETS, ids=lambda t: t.name)
def test_memory_is_the_backends_formula(t):
    p = predict(t)
    dt = getattr(torch, t.dtype)
    normalize = t.problem != "plain"
    opts = tp.FusedOptions(scale=64.0 if normalize else 1.0, normalize=normalize)
    B, D, C = t.shape
    tile_c = tc.config_for("ws", dt, D, 90).block_c
    terms = tp.scratch_bytes(B, C, D, dt, opts, True, tile_c, device_bytes=H200.memory)
    assert p["scratch"] == terms["total"]
    if t.naive_extra_mib is not None:  # the memory target: at most a quarter of the naive head's extra
        assert p["scratch"] <= t.naive_extra_mib * 2**20 / 4, t.name


def test_table_lists_every_target():
    text = perf_model.table()
    assert all(f"| {t.name} |" in text for t in TARGETS)
    assert cli(["model", "--efficiency", "0.7"]) == 0
