"""``python -m benchmarks gpu-check --out DIR``: everything a short GPU window should answer, in one command.

On one H100/H200 (about 8 minutes with Triton's compilation), from the
repository root, with nothing but torch, triton, numpy and pytest installed
and no network:

1. optionally (``--install``) ``pip install --no-deps --no-build-isolation -e .``
   (nothing from a registry; running from the repository root needs no install);
2. the GPU-only tests (``tests/backends/test_triton_margin.py -k test_cuda_``: the
   compiled kernels against the reference at scale, int64 offsets, memory and
   time guards);
3. the ``gpu`` preset through the one runner: ``marginops-triton`` (both
   strategies), ``marginops-torch``, the floor, ``naive``, ``naive-compiled``
   and the peers that are installed (``torch-linear-ce``, ``cce``, ``liger``;
   absent ones are recorded as skipped) at B=8192, D=2304, C=256k and 1M,
   bfloat16. Cases not started when ``--budget`` seconds have passed are
   recorded as skipped, so the command ends inside the window.

Writes ``DIR/gpu-check.json`` (records, the format of ``benchmarks/results``;
copy it there and run ``python -m benchmarks report``), ``DIR/tests.txt`` and
``DIR/summary.md``. ``--dry-run`` does the same on the CPU at a tiny shape with
the Triton interpreter (no speed figures: it checks that the command works; a
test runs it). Exit status 1 when a test fails or a marginops case does not
run correctly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from . import presets, registry, report, runner


def _tests(out: Path, env: dict, timeout: float) -> tuple[bool, str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "test_cuda_",
           "tests/backends/test_triton_margin.py"]
    try:
        proc = subprocess.run(cmd, cwd=runner.REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        text, ok = proc.stdout + proc.stderr, proc.returncode in (0, 5)  # 5: nothing collected
    except subprocess.TimeoutExpired as e:
        text, ok = f"timed out after {timeout:.0f} s\n{e.stdout or ''}", False
    (out / "tests.txt").write_text(" ".join(cmd) + "\n\n" + text)
    last = [ln for ln in text.splitlines() if ln.strip()]
    return ok, last[-1] if last else "(no output)"


def main(out: Path, *, dry_run: bool = False, install: bool = False, budget: float = 420.0,
         test_timeout: float = 240.0) -> int:
    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(runner.REPO_ROOT)}
    lines = [f"# GPU check{' (dry run: CPU, Triton interpreter, tiny shape; times mean nothing)' if dry_run else ''}",
             ""]
    if dry_run:  # before marginops' Triton module is first imported (here and in every child)
        os.environ["TRITON_INTERPRET"] = env["TRITON_INTERPRET"] = "1"
    elif not __import__("torch").cuda.is_available():
        print("no CUDA GPU here: use --dry-run for the CPU check", file=sys.stderr)
        return 2
    if install:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                               "-e", "."], cwd=runner.REPO_ROOT, capture_output=True, text=True)
        lines.append(f"- `pip install --no-deps --no-build-isolation -e .`: exit status {proc.returncode}"
                     + (f" ({proc.stderr.strip().splitlines()[-1]})" if proc.returncode and proc.stderr.strip() else ""))
    tests_ok, tests_line = _tests(out, env, test_timeout)
    lines.append(f"- GPU-only tests (`pytest -k test_cuda_ tests/backends/test_triton_margin.py`): {tests_line} "
                 f"({time.monotonic() - t0:.0f} s so far; output in `tests.txt`)")
    preset = presets.PRESETS["gpu"]
    cases = presets.tiny(preset) if dry_run else preset.cases
    if dry_run:  # compiling peers take minutes on a CPU; the GPU run has them
        cases = tuple(c for c in cases if not registry.IMPLS[c.impl].compiles)
    records = runner.run(cases, preset="gpu-check" if not dry_run else "gpu-check-dry-run", env=env,
                         deadline=t0 + budget, timeout=max(60.0, budget), output=out / "gpu-check.json")
    grouped = report.group(records)
    cases_done = next(iter(grouped.values()))
    lines += [f"- cases: {len(cases_done)} in {time.monotonic() - t0:.0f} s in all", "",
              report._machine_line(cases_done), "", report.full_table(cases_done), ""]
    (out / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))
    ours_bad = [k for k, m in cases_done.items() if k[-1] in registry.OURS
                and m.get("status") not in ("ok", "skipped")]
    return 0 if tests_ok and not ours_bad else 1
