"""The tile engine's three native CPU targets (issue 19), each an interleaved A/B in fresh processes.

Run from the repository root::

    python -m benchmarks.engine_targets                          # all three, 5 rounds, against main
    python -m benchmarks.engine_targets --cases arcface --rev main~3 --rounds 7

* ``arcface``: native ArcFace(0.5), s=30, float32, B=1024, D=512, C=100k,
  ``reduction`` mean and none, this tree against ``--rev`` (checked out into
  a temporary git worktree): within 3% (``this / rev <= 1.03``).
* ``subcenter``: native SubCenter(ArcFace(0.5), k=3), B=256, C=20k, D=128
  against plain native ArcFace over the same ``C k = 60k`` weight rows: within
  1.2x.
* ``filter``: native ArcFace at B=1024, D=512, C=100k with
  ``interclass_filtering_threshold=0.1`` against the same call without it:
  within 1.05x.

Each measurement is one fresh process (one untimed step, then ``--repeats``
timed steps, forward and backward); the two sides of a comparison alternate
round by round, and the ratio is of the minima over all their steps. Each
tree builds its native kernels once, untimed, in its own cache directory.
The CPU share other processes took is printed: on a shared machine the
figures are preliminary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from . import runner

TARGETS = {"arcface": 1.03, "subcenter": 1.2, "filter": 1.05}

_STEP = r"""
import json, sys, time, torch
import marginops as mo
from marginops.backends import native
assert native.available(), native.build_error_log()
case, variant, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
g = torch.Generator().manual_seed(0)
options = {}
if case == "arcface":
    B, D, rows, margin, classes = 1024, 512, 100_000, mo.ArcFace(0.5), 100_000
    options["reduction"] = variant
elif case == "subcenter":
    B, D, rows = 256, 128, 60_000
    margin = mo.SubCenter(mo.ArcFace(0.5), 3) if variant == "sub-centres" else mo.ArcFace(0.5)
    classes = 20_000 if variant == "sub-centres" else rows
else:
    B, D, rows, margin, classes = 1024, 512, 100_000, mo.ArcFace(0.5), 100_000
    if variant == "filtering":
        options["interclass_filtering_threshold"] = 0.1
x = torch.randn(B, D, generator=g).requires_grad_()
W = torch.randn(rows, D, generator=g).requires_grad_()
y = torch.randint(0, classes, (B,), generator=g)
def step():
    x.grad = W.grad = None
    loss = mo.margin_cross_entropy(x, W, y, margin, 30.0, backend="native", **options)
    loss.sum().backward()
step()
seconds = []
for _ in range(repeats):
    t0 = time.perf_counter(); step(); seconds.append(time.perf_counter() - t0)
print(json.dumps(seconds))
"""

VARIANTS = {"arcface": ("mean", "none"), "subcenter": ("plain", "sub-centres"), "filter": ("plain", "filtering")}


def _process(tree: Path, cache: Path, case: str, variant: str, repeats: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "MARGINOPS_CACHE": str(cache)}
    env.pop("MARGINOPS_NATIVE", None)
    out = subprocess.run([sys.executable, "-c", _STEP, case, variant, str(repeats)], env=env, cwd=tree,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{case}/{variant} in {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _build(tree: Path, cache: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree), "MARGINOPS_CACHE": str(cache)}
    env.pop("MARGINOPS_NATIVE", None)
    subprocess.run([sys.executable, "-c", "from marginops.backends import native; assert native.available()"],
                   env=env, cwd=tree, check=True)


def run(cases: Sequence[str], rev: str, rounds: int, repeats: int, cache_root: Path) -> dict:
    """``{case: {side: min seconds}}`` plus the ratios; prints as it goes."""
    share = runner.CpuShare()
    results: dict = {}
    here = runner.REPO_ROOT
    with tempfile.TemporaryDirectory() as tmp:
        other: Optional[Path] = None
        if "arcface" in cases:
            other = Path(tmp) / "other"
            subprocess.run(["git", "worktree", "add", "--detach", str(other), rev], cwd=here, check=True,
                           capture_output=True)
        try:
            trees = {"this": (here, cache_root / "this")}
            if other is not None:
                trees[rev] = (other, cache_root / "rev")
            for tree, cache in trees.values():
                _build(tree, cache)
            for case in cases:
                if case == "arcface":  # this tree against rev, per reduction
                    sides = [(t, v) for v in VARIANTS[case] for t in trees]
                else:  # two variants in this tree
                    sides = [("this", v) for v in VARIANTS[case]]
                times = {s: [] for s in sides}
                for r in range(rounds):
                    order = sides if r % 2 == 0 else sides[::-1]
                    for tree_name, variant in order:
                        tree, cache = trees[tree_name]
                        times[tree_name, variant] += _process(tree, cache, case, variant, repeats)
                best = {f"{t}/{v}": min(s) for (t, v), s in times.items()}
                if case == "arcface":
                    ratios = {v: best[f"this/{v}"] / best[f"{rev}/{v}"] for v in VARIANTS[case]}
                else:
                    a, b = VARIANTS[case]
                    ratios = {b: best[f"this/{b}"] / best[f"this/{a}"]}
                results[case] = {"min_seconds": best, "ratios": ratios, "target": TARGETS[case]}
                print(f"{case}: " + ", ".join(f"{k} {v:.3f} s" for k, v in best.items()) + " | " +
                      ", ".join(f"{k} ratio {v:.3f} (target <= {TARGETS[case]})" for k, v in ratios.items()),
                      flush=True)
        finally:
            if other is not None:
                subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=here, capture_output=True)
    took = share.others()
    results["machine"] = runner.machine_info()
    results["others_cpu_share"] = None if took is None else took[1]
    if took is not None:
        print(f"other processes took {100 * took[1]:.0f}% of the machine's CPU time meanwhile")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.engine_targets", description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--rev", default="main", help="git revision the arcface case compares with")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2, help="timed steps per process, after an untimed one")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "marginops-engine-targets",
                   help="build caches of the two trees (kept between runs)")
    p.add_argument("--output", type=Path, default=None, help="write the results here as JSON")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.repeats < 1:
        p.error("--rounds and --repeats must be >= 1")
    results = run(a.cases, a.rev, a.rounds, a.repeats, a.cache)
    if a.output is not None:
        a.output.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
