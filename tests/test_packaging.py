"""The package as users get it: an sdist, built into a wheel and installed (not editable), runs the native
CPU kernels from the C++ source it ships (``marginops._csrc``), from outside the repository."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_CHECK = r"""
import sys, torch
import marginops as mo
from marginops.backends import native
assert mo.__file__.startswith(sys.argv[1]), mo.__file__
assert str(native.SOURCE).startswith(sys.argv[1]), native.SOURCE
assert native.available(), native.build_error_log()
x, W = torch.randn(6, 5, dtype=torch.float64), torch.randn(11, 5, dtype=torch.float64)
y = torch.tensor([0, 3, 3, 10, 7, 1])
ours = mo.margin_cross_entropy(x, W, y, mo.ArcFace(0.5), 8.0, backend="native")
ref = mo.margin_cross_entropy(x, W, y, mo.ArcFace(0.5), 8.0, backend="reference")
torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
print("ok", native.SOURCE)
"""


def _run(args, **kw):
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, f"{args[:4]}...\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def test_installed_package_builds_and_runs_the_native_kernels(tmp_path):
    pytest.importorskip("setuptools")
    dist, site = tmp_path / "dist", tmp_path / "site"
    # the sdist carries csrc/, the wheel built from it marginops/_csrc/
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(dist)!r}))"
    sdist = dist / _run([sys.executable, "-c", code], cwd=ROOT).stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        assert any(n.endswith("/csrc/tile_kernels.cpp") for n in tar.getnames())
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
          str(sdist)], cwd=tmp_path)
    (wheel,) = dist.glob("marginops-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "marginops/_csrc/tile_kernels.cpp" in names
    # the package list in pyproject.toml is explicit (for the csrc/ mapping): nothing of marginops/ is left out
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "marginops").rglob("*.py")}
    assert sources <= set(names), sorted(sources - set(names))
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
          str(wheel)], cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MARGINOPS_NATIVE")}
    env.update(PYTHONPATH=str(site), MARGINOPS_CACHE=str(tmp_path / "cache"))
    out = _run([sys.executable, "-c", _CHECK, str(site)], cwd=tmp_path, env=env)  # cwd: not the repository
    assert "ok" in out.stdout
