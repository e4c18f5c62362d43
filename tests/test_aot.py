"""``python -m marginops.aot``: every shipped Triton kernel config compiles for sm_80 and sm_90 without spills,
within shared memory and its claimed occupancy, with ``wgmma`` products and TMA loads where sm_90 should
have them.

Compiles for real GPUs with no GPU present (Triton's full pipeline and the
bundled ``ptxas``), in a subprocess so the interpreter setting of the Triton
tests does not leak in.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

REPO_ROOT = Path(__file__).resolve().parent.parent


def _aot(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "marginops.aot", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_every_shipped_config_compiles_without_spills(tmp_path):
    # --quick: every feature variant in bfloat16 and the default path's in every dtype, both targets (the
    # full matrix, `python -m marginops.aot`, takes three times as long; docs/benchmarks.md records its run)
    from marginops.aot import DTYPE_NAMES, QUICK_VARIANTS, SHARED_LIMIT, VARIANTS

    out = tmp_path / "aot.json"
    proc = _aot("--quick", "--json", str(out))
    assert proc.returncode == 0, f"aot failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    rows = json.loads(out.read_text())["rows"]
    seen = {(r["kernel"], r["variant"], r["dtype"], r["target"]) for r in rows}
    expected = {(k, v, d, f"sm_{t}") for (k, v) in VARIANTS for d in DTYPE_NAMES for t in SHARED_LIMIT
                if d == "bfloat16" or (k, v) in QUICK_VARIANTS}
    assert seen == expected
    for r in rows:
        assert r["ok"] and r["spill_bytes"] == 0 and 0 < r["registers"] <= 255, r
        assert 0 <= r["shared_bytes"] <= SHARED_LIMIT[int(r["target"][3:])], r
        assert r["blocks_per_sm"] >= r["occupancy"], r
        if r["kernel"] in ("fwd", "grad", "bwd_dx", "masked"):
            assert r["shared_bytes"] > 0, r  # the GEMM kernels stage tiles in shared memory
            if r["dtype"] != "float64":  # tensor cores: wgmma on Hopper, mma.sync on Ampere
                assert (r["wgmma"] > 0) if r["target"] == "sm_90" else (r["mma"] > 0 and r["wgmma"] == 0), r
            if r["target"] == "sm_80":
                assert r["tma"] == 0, r
        tma = r["target"] == "sm_90" and "tma" in r["config"] and r["kernel"] in ("fwd", "grad") \
            and not r["variant"].startswith("sub")
        assert (r["tma"] > 0) == tma, r  # the shipped 16-bit and float32 logits tiles load through TMA on sm_90
    assert "zero spills" in proc.stdout


def test_exit_status_is_nonzero_when_a_config_spills():
    # the exponentials-storing forward at 128 x 128 bf16 tiles with one warpgroup spills (measured 1156 bytes)
    proc = _aot("--kernels", "fwd", "--variants", "ws", "--dtypes", "bfloat16", "--targets", "80",
                "--configs", "128x128x64w4s3o2", "--jobs", "1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "spill" in proc.stderr and " NO" in proc.stdout


def test_bad_arguments_are_refused():
    proc = _aot("--targets", "75")
    assert proc.returncode == 2 and "unknown target" in proc.stderr
    proc = _aot("--configs", "128x128")
    assert proc.returncode == 2 and "BxCxD" in proc.stderr
