"""Time one step of this checkout against another git revision, interleaved, in one run.

A change to the library must not slow it down; ratios measured on different
days (or CPUs) do not say that. This checks the revision out into a temporary
worktree and alternates fresh processes of the two trees, round by round, on
the same inputs::

    python -m benchmarks.compare_revisions --rev main~3 --batch 1024 --dim 512 --classes 100000 \\
        --reduction mean none --rounds 5

Each process times forward+backward of ``margin_cross_entropy`` (ArcFace(0.5),
scale 30, fp32, default options) ``--repeats`` times after a warm-up; the
report gives, per reduction, the minimum and median over all runs for both
trees and their ratio (this tree / the other), plus the machine. Minima of
interleaved rounds are the robust comparison on a noisy shared machine.
``--memory B D C`` also measures the extra peak memory of one step in a fresh
process of each tree (``python -m benchmarks.memory``, each tree's own), as
many times as there are rounds. Records go to
``benchmarks/results/compare_revisions.json`` (``--output``).
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

from .harness import RESULTS_DIR, describe_machine, machine_info

REPO = Path(__file__).resolve().parents[1]

_STEP = r"""
import json, sys, time, torch
import marginops as mo
B, D, C, reduction, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
g = torch.Generator().manual_seed(seed)
x = torch.randn(B, D, generator=g).requires_grad_()
W = torch.randn(C, D, generator=g).requires_grad_()
y = torch.randint(0, C, (B,), generator=g)
def step():
    x.grad = W.grad = None
    loss = mo.margin_cross_entropy(x, W, y, mo.ArcFace(0.5), 30.0, reduction=reduction)
    loss.sum().backward()
    return loss.sum().item()
step()
seconds = []
for _ in range(int(sys.argv[6])):
    t0 = time.perf_counter(); loss = step(); seconds.append(time.perf_counter() - t0)
print(json.dumps({"seconds": seconds, "loss": loss}))
"""


def _time_in_process(tree: Path, B: int, D: int, C: int, reduction: str, repeats: int, seed: int = 0) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", _STEP, str(B), str(D), str(C), reduction, str(seed), str(repeats)],
                         env=env, cwd=tree, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _memory_in_process(tree: Path, B: int, D: int, C: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--impl", "marginops", "--batch", str(B),
                          "--dim", str(D), "--classes", str(C)], env=env, cwd=tree, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(rev: str, B: int, D: int, C: int, reductions: Sequence[str], rounds: int, repeats: int = 2,
            memory: Optional[Sequence[int]] = None) -> dict:
    """Interleaved timings of this tree and ``rev``; returns the record."""
    with tempfile.TemporaryDirectory() as tmp:
        other = Path(tmp) / "other"
        subprocess.run(["git", "worktree", "add", "--detach", str(other), rev], cwd=REPO, check=True,
                       capture_output=True)
        try:
            sha = subprocess.run(["git", "rev-parse", rev], cwd=REPO, check=True, capture_output=True,
                                 text=True).stdout.strip()
            times: dict = {r: {"this": [], "other": []} for r in reductions}
            losses: dict = {r: {} for r in reductions}
            peaks: dict = {"this": [], "other": []}
            jobs = [(k, r, name) for k in range(rounds) for r in (*reductions, *(["memory"] if memory else []))
                    for name in ("this", "other")]
            for k, r, name in tqdm(jobs, desc=f"this tree vs {rev}", unit="process"):
                tree = REPO if name == "this" else other
                if r == "memory":
                    peaks[name].append(_memory_in_process(tree, *memory)["extra_peak_bytes"])
                    continue
                res = _time_in_process(tree, B, D, C, r, repeats)
                times[r][name].extend(res["seconds"])
                losses[r][name] = res["loss"]
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=REPO, check=False,
                           capture_output=True)
    summary = {}
    for r in reductions:
        t = times[r]
        summary[r] = {
            "this_min": min(t["this"]), "other_min": min(t["other"]),
            "this_median": statistics.median(t["this"]), "other_median": statistics.median(t["other"]),
            "ratio_min": min(t["this"]) / min(t["other"]),
            "ratio_median": statistics.median(t["this"]) / statistics.median(t["other"]),
            "loss_this": losses[r]["this"], "loss_other": losses[r]["other"],
        }
    if memory:
        summary["memory"] = {"shape": list(memory), "this_min": min(peaks["this"]), "other_min": min(peaks["other"]),
                             "this_max": max(peaks["this"]), "other_max": max(peaks["other"]),
                             "ratio_min": min(peaks["this"]) / min(peaks["other"])}
    return {"rev": rev, "sha": sha, "batch": B, "dim": D, "classes": C, "rounds": rounds, "repeats": repeats,
            "times": times, "extra_peak_bytes": peaks, "summary": summary, "machine": machine_info()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare_revisions", description=__doc__.split("\n")[0])
    p.add_argument("--rev", required=True, help="git revision to compare with (e.g. main~1)")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=100_000)
    p.add_argument("--reduction", nargs="+", default=["mean", "none"], choices=("mean", "sum", "none"))
    p.add_argument("--rounds", type=int, default=5, help="fresh processes per tree and reduction")
    p.add_argument("--repeats", type=int, default=2, help="timed steps per process, after a warm-up")
    p.add_argument("--memory", type=int, nargs=3, metavar=("B", "D", "C"), default=None,
                   help="also measure the extra peak memory of one step of this shape")
    p.add_argument("--output", type=Path, default=RESULTS_DIR / "compare_revisions.json")
    a = p.parse_args(argv)
    rec = compare(a.rev, a.batch, a.dim, a.classes, a.reduction, a.rounds, a.repeats, a.memory)
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(rec, indent=1) + "\n")
    print(f"B={a.batch}, D={a.dim}, C={a.classes}, {a.rounds} interleaved rounds; "
          f"this tree vs {a.rev} ({rec['sha'][:10]}) on {describe_machine(rec['machine'])}")
    print(f"{'reduction':>9} | {'this min':>9} | {'other min':>9} | {'ratio (min)':>11} | {'ratio (median)':>14}")
    for r in a.reduction:
        s = rec["summary"][r]
        print(f"{r:>9} | {s['this_min']:8.3f}s | {s['other_min']:8.3f}s | {s['ratio_min']:11.3f} | "
              f"{s['ratio_median']:14.3f}")
    if a.memory:
        m = rec["summary"]["memory"]
        print(f"extra peak memory, B, D, C = {tuple(a.memory)}: this tree {m['this_min'] / 2**20:.1f}-"
              f"{m['this_max'] / 2**20:.1f} MiB, {a.rev} {m['other_min'] / 2**20:.1f}-{m['other_max'] / 2**20:.1f} MiB "
              f"(ratio of minima {m['ratio_min']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
