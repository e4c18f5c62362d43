"""``python -m benchmarks gpu-check --out DIR``: the GPU targets and the GPU-only tests, in one command.

On one H100/H200, from the repository root, in at most about 6 minutes (Triton's
compilation included), with nothing but torch, triton, numpy and pytest
installed and no network:

1. optionally (``--install``) ``pip install --no-deps --no-build-isolation -e .``
   (nothing from a registry; running from the repository root needs no install);
2. the GPU-only tests (``tests/backends/test_triton_margin.py -k test_cuda_``: the
   compiled kernels against the reference, TMA loads, int64 offsets,
   gradient filtering's error and speed, memory and time guards);
3. the ``gpu`` preset through the one runner (:data:`benchmarks.presets.GPU_TARGETS`):
   at every target shape the floor and ``marginops-triton`` (default options),
   then ``naive``, then the peers (``cce-exact``, ``cce``, ``liger``,
   ``torch-linear-ce``, ``torch.compile(naive)``) and marginops' other paths.
   Peers that are not importable are recorded as skipped. Cases not started
   when ``--budget`` seconds have passed are recorded as skipped;
4. every target judged from the records of this run (:func:`evaluate`): the ratio
   to the floor, the peers it must beat, the extra peak memory against a quarter
   of the naive head's and against the backend's formula
   (:func:`marginops.backends.triton_margin.scratch_bytes`);
5. if time is left, ``torch.profiler`` tables of three steps of the face head in
   bf16 and in fp16 (where the time goes, kernel by kernel).

Writes ``DIR/gpu-check.json`` (records, the format of ``benchmarks/results``),
``DIR/targets.json``, ``DIR/tests.txt``, ``DIR/summary.md`` and the profiles.
``--dry-run`` does the same on the CPU at a tiny shape with the Triton
interpreter (no speed figures: it checks that the command works; a test runs
it). Exit status 1 when a test fails or a marginops case does not run correctly.

The GPU window that runs it (the peers as wheels, the one call of the device tool, what to commit
afterwards) is in ``docs/benchmarks.md``, "The GPU window: tuning, then the check".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from . import presets, registry, report, runner
from .runner import MiB

DRY_SHAPE = (37, 40, 300)
#: Bytes per element of ``x`` that marginops' own autograd path holds beside the backend's scratch at the peak
#: (the target term's backward and the normalization backward of ``x``: measured about 24-28 on CPU), and
#: allowance for the allocator's rounding and cuBLAS's workspace.
OPS_BYTES_PER_X_ELEMENT = 32
ALLOCATOR_SLACK = 96 * MiB


def child_env(dry_run: bool) -> dict:
    """The environment of every child: the caller's, the repository root first on ``PYTHONPATH`` (the
    caller's entries kept: peers installed with ``pip install --target DIR`` travel on it)."""
    env = dict(os.environ)
    parts = [str(runner.REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
    return env


def dry_cases(cases) -> tuple:
    """The dry run's cases: each implementation once at the tiny shape (bfloat16, and marginops in every dtype of
    the targets), no compiling peers (they take minutes on a CPU; the GPU run has them)."""
    out = {}
    for c in cases:
        if not registry.IMPLS[c.impl].compiles and (c.impl == "marginops-triton" or c.dtype == "bfloat16"):
            out.setdefault((c.impl, c.dtype), replace(c, batch=DRY_SHAPE[0], dim=DRY_SHAPE[1], classes=DRY_SHAPE[2],
                                                      device="cpu", repeats=min(c.repeats, 1), memory_budget=None))
    return tuple(out.values())


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


def formula_bytes(t: presets.Target) -> dict:
    """The backend's scratch formula for ``marginops-triton`` at the target, and the band a measurement must
    fall in: ``[total, total + OPS_BYTES_PER_X_ELEMENT B D + 16 C + ALLOCATOR_SLACK]``."""
    import torch

    from marginops.backends import FusedOptions
    from marginops.backends import triton_margin as tm

    B, D, C = t.shape
    problem = registry.PROBLEMS[t.problem]
    opts = FusedOptions(scale=problem.scale, normalize=problem.normalize)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    terms = tm.scratch_bytes(B, C, D, registry.DTYPES[t.dtype], opts, device)
    terms["upper"] = terms["total"] + OPS_BYTES_PER_X_ELEMENT * B * D + 16 * C + ALLOCATOR_SLACK
    return terms


def evaluate(records: list[dict], targets=presets.GPU_TARGETS, shape=None) -> list[dict]:
    """Each target judged from ``records`` (one run) as the report judges a preset's (:func:`report.judge`):
    ``met`` is True, False or None (not measured)."""
    cases = next(iter(report.group(records).values()), {})
    rows = []
    for t in targets:
        t = replace(t, shape=shape or t.shape)
        ours, _, ratio, ratio_met = report.judge(cases, t)
        naive = report.judge(cases, replace(t, metric="extra_peak_bytes", max_ratio=0.25, against="naive"))
        beats = {}
        for p in t.faster_than:  # the plain-only peers ran on the plain problem at the target's shape
            other = "plain" if registry.IMPLS[p].plain_only else None
            beats[p] = report.judge(cases, replace(t, against=p, max_ratio=1.0, against_problem=other))[3]
        extra = (ours or {}).get("extra_peak_bytes")
        formula = formula_bytes(t)
        formula_met = None if extra is None else formula["total"] <= extra <= formula["upper"]
        verdicts = [ratio_met, naive[3], formula_met, *beats.values()]
        met = False if False in verdicts else (None if None in verdicts else True)
        rows.append(dict(name=t.name, shape=list(t.shape), dtype=t.dtype, problem=t.problem, max_ratio=t.max_ratio,
                         seconds=(ours or {}).get("seconds"), ratio=ratio, ratio_met=ratio_met, faster_than=beats,
                         extra_peak_bytes=extra, naive_extra_peak_bytes=(naive[1] or {}).get("extra_peak_bytes"),
                         memory_met=naive[3], formula_bytes=formula["total"], formula_upper=formula["upper"],
                         formula_met=formula_met, met=met))
    return rows


def targets_text(rows: list[dict]) -> str:
    yes = report.verdict
    out = []
    for r in rows:
        ratio = "not measured" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        extra = "-" if r["extra_peak_bytes"] is None else f"{r['extra_peak_bytes'] / MiB:,.0f} MiB"
        out.append([r["name"], ", ".join(f"{v:,}" for v in r["shape"]), r["dtype"],
                    f"{ratio} (<= {r['max_ratio']:.2f}x)",
                    ", ".join(f"{p}: {yes(v)}" for p, v in r["faster_than"].items()) or "-", extra,
                    yes(r["memory_met"]),
                    f"{r['formula_bytes'] / MiB:,.0f}-{r['formula_upper'] / MiB:,.0f} MiB: {yes(r['formula_met'])}",
                    "not measured" if r["met"] is None else yes(r["met"])])
    return report._table(["target", "B, D, C", "dtype", "x floor (target)", "faster than", "extra peak",
                          "<= naive / 4", "formula (band)", "result"], out)


def profile(t: presets.Target, path: Path, *, shape=None, steps: int = 3) -> None:
    """``torch.profiler``'s table (time by kernel) of ``steps`` steps of ``marginops-triton`` at ``t``."""
    import torch
    from torch.profiler import ProfilerActivity

    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, D, C = shape or t.shape
    problem = registry.PROBLEMS[t.problem]
    inp = registry.make_inputs(registry.Shape(B, D, C), problem.inputs, dtype=registry.DTYPES[t.dtype],
                               device=device)
    step = registry.step_function("marginops-triton", problem, inp, device=device)
    step()  # compiled and warm
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            inp.clear_grads()
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    path.write_text(f"marginops-triton, {t.name}: B={B}, D={D}, C={C}, {t.dtype}, {steps} steps on {device}\n\n"
                    + prof.key_averages().table(sort_by=key, row_limit=15))


def main(out: Path, *, dry_run: bool = False, install: bool = False, budget: float = 300.0,
         test_timeout: float = 120.0, total: float = 360.0) -> int:
    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    env = child_env(dry_run)
    title = "# GPU check" + (" (dry run: CPU, Triton interpreter, tiny shape; times mean nothing)" if dry_run else "")
    lines = [title, ""]
    if dry_run:  # before marginops' Triton module is first imported (here and in every child)
        os.environ["TRITON_INTERPRET"] = "1"
    elif not __import__("torch").cuda.is_available():
        print("no CUDA GPU here: use --dry-run for the CPU check", file=sys.stderr)
        return 2
    if install:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                               "-e", "."], cwd=runner.REPO_ROOT, capture_output=True, text=True)
        lines.append(f"- `pip install --no-deps --no-build-isolation -e .`: exit status {proc.returncode}"
                     + (f" ({proc.stderr.strip().splitlines()[-1]})" if proc.returncode and proc.stderr.strip() else ""))
    from marginops.backends import triton_config as tc

    tuned = tc.tuned_table()
    configs = ", ".join(f"{a} ({len(e)} entries)" for a, e in tuned.items())
    lines.append(f"- configs: {'tuned ' + configs if tuned else 'the defaults (no tuned table)'}")
    peers = {name: registry.unavailable(name, "cuda" if not dry_run else "cpu") or "available"
             for name in ("cce", "liger")}
    lines.append("- peers: " + ", ".join(f"{k}: {v}" for k, v in peers.items()))
    tests_ok, tests_line = _tests(out, env, test_timeout)
    lines.append(f"- GPU-only tests (`pytest -k test_cuda_ tests/backends/test_triton_margin.py`): {tests_line} "
                 f"({time.monotonic() - t0:.0f} s so far; output in `tests.txt`)")
    preset = presets.PRESETS["gpu"]
    shape = DRY_SHAPE if dry_run else None
    cases = dry_cases(preset.cases) if dry_run else preset.cases
    records = runner.run(cases, preset="gpu-check" if not dry_run else "gpu-check-dry-run", env=env,
                         deadline=t0 + budget, timeout=120.0, output=out / "gpu-check.json")
    cases_done = next(iter(report.group(records).values()))
    rows = evaluate(records, shape=shape)
    (out / "targets.json").write_text(json.dumps(rows, indent=1))
    lines += [f"- cases: {len(cases_done)} in {time.monotonic() - t0:.0f} s", "",
              report._machine_line(cases_done), "", "## Targets", "", targets_text(rows), "",
              "## Every case", "", report.full_table(cases_done), ""]
    for t in presets.GPU_TARGETS:
        if t.name.startswith("face-arcface") and time.monotonic() - t0 < total - 30:
            name = f"profile-{t.name}.txt"
            cmd = [sys.executable, "-m", "benchmarks.gpu_check", "profile", t.name, str(out / name)]
            proc = subprocess.run(cmd + (["--dry-run"] if dry_run else []), cwd=runner.REPO_ROOT, env=env,
                                  capture_output=True, text=True, timeout=max(30.0, total - (time.monotonic() - t0)))
            lines.append(f"- `{name}`: torch.profiler, 3 steps of marginops-triton at {t.name}" if proc.returncode == 0
                         else f"- `{name}` failed: {proc.stderr.strip()[-300:]}")
    lines.append(f"\n{time.monotonic() - t0:.0f} s in all")
    (out / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))
    ours_bad = [k for k, m in cases_done.items() if k[-1] in registry.OURS
                and m.get("status") not in ("ok", "skipped")]
    return 0 if tests_ok and not ours_bad else 1


if __name__ == "__main__":  # python -m benchmarks.gpu_check profile TARGET PATH [--dry-run]: one profile, a child
    _, what, name, where, *rest = sys.argv
    assert what == "profile", sys.argv
    target = next(t for t in presets.GPU_TARGETS if t.name == name)
    profile(target, Path(where), shape=DRY_SHAPE if "--dry-run" in rest else None)
