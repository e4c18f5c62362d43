"""Peak memory through the runner: marginops never materializes B x C, so its scratch stays within the
budget as C grows, while the naive head's grows with B x C (which shows the probe can see it)."""

from __future__ import annotations

import math

import pytest

from benchmarks.runner import Case, run_case

MiB = 2**20
BATCH, DIM = 256, 64
CLASSES = (16_384, 65_536)
BUDGET = 4 * MiB
#: marginops' extra peak must stay below this (the budget bounds its scratch; slack for per-tile
#: temporaries and allocator overhead).
BOUND = 3 * BUDGET + 16 * MiB


@pytest.fixture(scope="module")
def measured():
    out = {}
    for impl in ("marginops-torch", "naive"):
        for c in CLASSES:
            r = run_case(Case(impl, "ordinary", BATCH, DIM, c, repeats=0, check=False, memory_budget=BUDGET))
            assert r["status"] == "ok", r
            assert isinstance(r["extra_peak_bytes"], int) and math.isfinite(r["loss"])
            out[impl, c] = r
    return out


def _report(m):
    return ", ".join(f"{impl} C={c}: {r['extra_peak_bytes'] / MiB:.1f} MiB" for (impl, c), r in m.items())


def test_naive_grows_with_classes(measured):
    small, large = (measured["naive", c]["extra_peak_bytes"] for c in CLASSES)
    assert small > BATCH * CLASSES[0] * 4 and small > BOUND, _report(measured)
    assert large > 2 * small, _report(measured)


@pytest.mark.parametrize("classes", CLASSES)
def test_marginops_extra_peak_within_budget_bound(measured, classes):
    extra = measured["marginops-torch", classes]["extra_peak_bytes"]
    assert extra < BOUND, f"{extra / MiB:.1f} MiB >= {BOUND / MiB:.0f} MiB; {_report(measured)}"


def test_marginops_extra_peak_does_not_grow_like_batch_times_classes(measured):
    small, large = (measured["marginops-torch", c]["extra_peak_bytes"] for c in CLASSES)
    assert large - small < BATCH * (CLASSES[1] - CLASSES[0]) * 4 // 4, _report(measured)


@pytest.mark.parametrize("classes", CLASSES)
def test_both_computed_the_same_loss(measured, classes):
    ours, naive = measured["marginops-torch", classes]["loss"], measured["naive", classes]["loss"]
    assert ours == pytest.approx(naive, rel=1e-5)
