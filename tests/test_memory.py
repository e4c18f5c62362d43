"""Peak memory: marginops never materializes B x C, so its scratch stays within the budget as C grows.

Measured by ``python -m benchmarks.memory`` (see its docstring), one fresh
process per measurement. Contract used here: it takes ``--impl``, ``--batch``,
``--dim``, ``--classes`` and ``--memory-budget BYTES`` and prints one JSON line
with ``impl``, ``extra_peak_bytes`` (peak RSS beyond the inputs and their
gradients, for one forward+backward) and ``loss``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20
BATCH, DIM = 256, 64
CLASSES = (16_384, 65_536)
BUDGET = 4 * MiB
#: marginops' extra peak must stay below this at every C (the budget bounds its scratch, with
#: slack for per-tile temporaries and allocator overhead).
BOUND = 3 * BUDGET + 16 * MiB

if not (REPO_ROOT / "benchmarks" / "memory.py").exists():
    pytest.skip("benchmarks/memory.py (the memory probe) is not in this checkout", allow_module_level=True)


def _measure(impl: str, classes: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.memory", "--impl", impl, "--batch", str(BATCH), "--dim", str(DIM),
           "--classes", str(classes), "--memory-budget", str(BUDGET)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines, f"{' '.join(cmd)} printed nothing"
    record = json.loads(lines[-1])
    assert record["impl"] == impl
    assert isinstance(record["extra_peak_bytes"], int) and math.isfinite(record["loss"])
    return record


@pytest.fixture(scope="module")
def measurements():
    return {(impl, c): _measure(impl, c) for impl in ("marginops", "reference") for c in CLASSES}


def _report(m):
    return ", ".join(f"{impl} C={c}: {r['extra_peak_bytes'] / MiB:.1f} MiB" for (impl, c), r in m.items())


def test_reference_grows_with_classes(measurements):
    # The probe must be able to see a B x C tensor, or the marginops bound below proves nothing.
    small, large = (measurements["reference", c]["extra_peak_bytes"] for c in CLASSES)
    one_logits = BATCH * CLASSES[0] * 4  # one float32 B x C tensor at the smaller C
    assert small > one_logits and small > BOUND, _report(measurements)
    assert large > 2 * small, _report(measurements)  # 4x the classes: roughly linear growth


@pytest.mark.parametrize("classes", CLASSES)
def test_marginops_extra_peak_within_budget_bound(measurements, classes):
    extra = measurements["marginops", classes]["extra_peak_bytes"]
    assert extra < BOUND, f"extra peak {extra / MiB:.1f} MiB >= {BOUND / MiB:.0f} MiB; {_report(measurements)}"


def test_marginops_extra_peak_does_not_grow_like_batch_times_classes(measurements):
    small, large = (measurements["marginops", c]["extra_peak_bytes"] for c in CLASSES)
    quarter_logits = BATCH * (CLASSES[1] - CLASSES[0]) * 4 // 4
    assert large - small < quarter_logits, _report(measurements)


@pytest.mark.parametrize("classes", CLASSES)
def test_both_implementations_computed_the_same_loss(measurements, classes):
    ours, ref = measurements["marginops", classes]["loss"], measurements["reference", classes]["loss"]
    assert ours == pytest.approx(ref, rel=1e-5)
