"""``python -m benchmarks compare --rev REV``: this tree against another git revision, interleaved, in one run.

A change must not slow the library down, and ratios measured on different days
(or CPUs) do not say that. The revision is checked out into a temporary git
worktree; fresh processes of the two trees then alternate, round by round, on
the same inputs. Each process runs ``margin_cross_entropy`` (ArcFace(0.5), s=30,
float32, default options): one step whose extra peak memory is measured (peak
RSS reset with ``clear_refs``, as the runner does), then ``--repeats`` timed
steps. The script below imports only ``marginops`` and torch, so it works on
any revision. Records (preset ``compare``): minimum and median seconds and
extra peak bytes per tree and reduction.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from tqdm import tqdm

from . import runner

_STEP = r"""
import json, sys, time, torch
import marginops as mo
B, D, C, reduction, repeats = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
g = torch.Generator().manual_seed(0)
x = torch.randn(B, D, generator=g).requires_grad_()
W = torch.randn(C, D, generator=g).requires_grad_()
y = torch.randint(0, C, (B,), generator=g)
def step():
    x.grad = W.grad = None
    loss = mo.margin_cross_entropy(x, W, y, mo.ArcFace(0.5), 30.0, reduction=reduction)
    loss.sum().backward()
    return loss.sum().item()
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) * 1024
step()
stand_ins = [torch.ones_like(x), torch.ones_like(W)]
x.grad = W.grad = None
open("/proc/self/clear_refs", "w").write("5")
base = hwm()
del stand_ins
loss = step()
extra = hwm() - base
seconds = []
for _ in range(repeats):
    t0 = time.perf_counter(); step(); seconds.append(time.perf_counter() - t0)
print(json.dumps({"seconds": seconds, "loss": loss, "extra_peak_bytes": extra}))
"""


def _process(tree: Path, B: int, D: int, C: int, reduction: str, repeats: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _STEP, str(B), str(D), str(C), reduction, str(repeats)],
                         env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tree, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(rev: str, B: int, D: int, C: int, reductions: Sequence[str], rounds: int, repeats: int) -> list[dict]:
    """Interleaved fresh processes of this tree and ``rev``; returns the records."""
    machine, date = runner.machine_info(), runner.now()
    results = {(r, t): [] for r in reductions for t in ("this", "other")}
    share = runner.CpuShare()
    with tempfile.TemporaryDirectory() as tmp:
        other = Path(tmp) / "other"
        subprocess.run(["git", "worktree", "add", "--detach", str(other), rev], cwd=runner.REPO_ROOT, check=True,
                       capture_output=True)
        try:
            sha = subprocess.run(["git", "rev-parse", rev], cwd=runner.REPO_ROOT, check=True, capture_output=True,
                                 text=True).stdout.strip()
            jobs = [(r, t) for _ in range(rounds) for r in reductions for t in ("this", "other")]
            for r, t in tqdm(jobs, desc=f"this tree vs {rev}", unit="process"):
                results[r, t].append(_process(runner.REPO_ROOT if t == "this" else other, B, D, C, r, repeats))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=runner.REPO_ROOT,
                           capture_output=True)
    took = share.others()
    records = []
    for (r, t), runs in results.items():
        seconds = [s for run in runs for s in run["seconds"]]
        base = {"preset": "compare", "date": date, "implementation": "this tree" if t == "this" else f"{rev} ({sha[:10]})",
                "problem": "ordinary", "batch": B, "dim": D, "classes": C, "dtype": "float32", "device": "cpu",
                "reduction": r, "memory_budget": None, "machine": machine, "rounds": rounds, "repeats": repeats}
        metrics = {"status": "ok", "seconds": statistics.median(seconds), "seconds_min": min(seconds),
                   "extra_peak_bytes": min(run["extra_peak_bytes"] for run in runs), "loss": runs[-1]["loss"],
                   "samples": seconds, "others_cpu_share": None if took is None else took[1]}
        records += [{**base, "metric": k, "value": v} for k, v in metrics.items()]
    return records


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks compare", description=__doc__.split("\n")[0])
    p.add_argument("--rev", required=True, help="git revision to compare with (e.g. main~1)")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=100_000)
    p.add_argument("--reduction", nargs="+", default=["mean", "none"], choices=("mean", "sum", "none"))
    p.add_argument("--rounds", type=int, default=5, help="fresh processes per tree and reduction")
    p.add_argument("--repeats", type=int, default=2, help="timed steps per process, after the measured one")
    p.add_argument("--output", type=Path, default=runner.RESULTS_DIR / "compare.json")
    a = p.parse_args(argv)
    for name in ("batch", "dim", "classes", "rounds", "repeats"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(a, name)}")
    records = compare(a.rev, a.batch, a.dim, a.classes, a.reduction, a.rounds, a.repeats)
    runner.write_records(a.output, records)
    from . import report

    print(report.blocks(records)["preset:compare"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
