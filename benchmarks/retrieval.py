"""Top-k cosine retrieval: :func:`marginops.retrieval.topk_cosine` against brute force, in one run.

Run from the repository root::

    python -m benchmarks retrieval --classes 1000000 --dim 256 --queries 1024 --k 10
    python -m benchmarks retrieval --classes 20000 --dim 64 --queries 128 --k 5   # seconds

Brute force is ``F.normalize`` of both inputs, one ``B x C`` matmul and
``torch.topk`` over it (at B=1024, C=1M: a 4 GB score matrix). Prints the
machine, a Markdown table (best time, queries/s, extra peak memory) and the
agreement of the two results, and writes records (preset ``retrieval``; the
batch is the number of queries) to ``benchmarks/results/retrieval.json``.

How it measures, per implementation, in a fresh subprocess (the peak RSS is
a high-water mark of the whole process):

1. one call on a tiny problem (libraries and thread pools load outside the measurement);
2. the float32 inputs: ``C`` Gaussian centres and ``B`` queries, each a
   centre plus Gaussian noise of the same size (so each has one clearly
   nearest class, as in the FAQ use), seeded identically in every process;
3. reset the peak RSS to the current RSS (``/proc/self/clear_refs``) and read
   it: the baseline; one call; the peak again: ``extra_peak_bytes`` is the
   difference, the scratch beyond the inputs;
4. ``--repeats`` more calls, timed; the best of all calls is reported.

The parent then compares the two results: the largest value difference, and
whether every index that differs is a near tie (the two classes' float64
cosines within :data:`TIE_TOL`, which float32 rounding may order either way).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import runner

IMPLS = ("topk_cosine", "brute_force")
MiB = 2**20
#: Two float64 cosines closer than this are a tie that float32 rounding (D <= a few thousand) may swap.
TIE_TOL = 1e-5


def make_inputs(queries: int, classes: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(classes, dim, generator=gen)
    labels = torch.randint(0, classes, (queries,), generator=gen)
    q = W[labels] + torch.randn(queries, dim, generator=gen)
    return q, W


def brute_force(q: torch.Tensor, W: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What people write: the full ``B x C`` cosine matrix and ``torch.topk``."""
    with torch.no_grad():
        return torch.topk(F.normalize(q, dim=1) @ F.normalize(W, dim=1).T, k, dim=1)


def _function(impl: str, chunk_size: Optional[int]):
    if impl == "brute_force":
        return brute_force
    from marginops.retrieval import topk_cosine

    return lambda q, W, k: topk_cosine(q, W, k, chunk_size=chunk_size)


def measure(impl: str, queries: int, classes: int, dim: int, k: int, *, repeats: int, seed: int,
            chunk_size: Optional[int], result_file: Optional[str]) -> dict:
    """Steps 1-4 of the module docstring, in *this* process (only meaningful in a fresh one)."""
    fn = _function(impl, chunk_size)
    fn(*make_inputs(4, 16, 8, seed + 1), 2)  # 1.
    q, W = make_inputs(queries, classes, dim, seed)  # 2.
    gc.collect()
    peak = runner.PeakMemory("cpu")  # 3.
    peak.reset()
    t0 = time.perf_counter()
    values, indices = fn(q, W, k)
    times = [time.perf_counter() - t0]
    extra = peak.extra()
    share = runner.CpuShare()
    for _ in range(repeats):  # 4.
        t0 = time.perf_counter()
        fn(q, W, k)
        times.append(time.perf_counter() - t0)
    took = share.others()
    if result_file:
        torch.save({"values": values, "indices": indices}, result_file)
    return {
        "status": "ok", "impl": impl, "best_seconds": min(times), "seconds": times,
        "queries_per_second": queries / min(times), "extra_peak_bytes": extra,
        "others_cpu_share": None if took is None else took[1],
        "torch_threads": torch.get_num_threads(),
    }


def run_child(impl: str, args: argparse.Namespace, result_file: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks", "retrieval", "--child", impl, "--result-file", result_file,
           "--classes", str(args.classes), "--dim", str(args.dim), "--queries", str(args.queries),
           "--k", str(args.k), "--repeats", str(args.repeats), "--seed", str(args.seed)]
    if args.chunk_size is not None:
        cmd += ["--chunk-size", str(args.chunk_size)]
    proc = subprocess.run(cmd, cwd=runner.REPO_ROOT, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        why = " (SIGKILL: most likely the OOM killer)" if proc.returncode == -9 else ""
        return {"status": "failed", "impl": impl, "error": f"exit status {proc.returncode}{why}: {proc.stderr[-1500:]}"}
    return json.loads(lines[-1])


def agreement(ours: dict, brute: dict, q: torch.Tensor, W: torch.Tensor) -> dict:
    """Values close, and indices equal except where the two classes' float64 cosines are a near tie."""
    q64 = F.normalize(q.double(), dim=1)

    def cos64(idx: torch.Tensor) -> torch.Tensor:  # (B, k) float64 cosines of the given classes
        return torch.einsum("bd,bkd->bk", q64, F.normalize(W[idx].double(), dim=2))

    differ = ours["indices"] != brute["indices"]
    gap = (cos64(ours["indices"]) - cos64(brute["indices"])).abs()
    return {
        "max_value_diff": float((ours["values"].double() - brute["values"].double()).abs().max()),
        "indices_equal": int((~differ).sum()),
        "indices_total": differ.numel(),
        "max_tie_gap": float(gap[differ].max()) if bool(differ.any()) else 0.0,
        "ok": bool(torch.all(gap[differ] <= TIE_TOL))
              and float((ours["values"].double() - brute["values"].double()).abs().max()) <= TIE_TOL,
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks retrieval", description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=1_000_000, help="C, centres (default: 1000000)")
    p.add_argument("--dim", type=int, default=256, help="D, features (default: 256)")
    p.add_argument("--queries", type=int, default=1024, help="B, queries per call (default: 1024)")
    p.add_argument("--k", type=int, default=10, help="classes per query (default: 10)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the measured one (default: 3)")
    p.add_argument("--chunk-size", type=int, default=None, help="topk_cosine's chunk_size (default: its own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=runner.RESULTS_DIR / "retrieval.json")
    p.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.queries, args.classes, args.dim, args.k, repeats=args.repeats,
                                 seed=args.seed, chunk_size=args.chunk_size, result_file=args.result_file)))
        return 0

    machine = runner.machine_info()
    results, outputs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for impl in IMPLS:
            path = str(Path(tmp) / f"{impl}.pt")
            results[impl] = run_child(impl, args, path)
            if results[impl]["status"] == "ok":
                outputs[impl] = torch.load(path)
    check = None
    if len(outputs) == 2:
        check = agreement(outputs["topk_cosine"], outputs["brute_force"],
                          *make_inputs(args.queries, args.classes, args.dim, args.seed))
    records = records_of(results, check, args, machine, runner.now())
    runner.write_records(args.output, records)
    from . import report

    print(report.blocks(records)["preset:retrieval"])
    if check is not None:
        print(f"agreement: max |value diff| {check['max_value_diff']:.1e}; indices equal "
              f"{check['indices_equal']}/{check['indices_total']}; differing ones all near ties "
              f"(float64 gap <= {TIE_TOL:g}, largest {check['max_tie_gap']:.1e}): {'OK' if check['ok'] else 'MISMATCH'}")
    return 0 if check is not None and check["ok"] else 1


def records_of(results: dict, check: Optional[dict], args, machine: dict, date: str) -> list[dict]:
    """Long-format records: per implementation its best time, queries/s and extra peak memory."""
    records = []
    for impl, r in results.items():
        base = {"preset": "retrieval", "date": date, "implementation": impl, "problem": f"top-{args.k} cosine",
                "batch": args.queries, "dim": args.dim, "classes": args.classes, "dtype": "float32",
                "device": "cpu", "reduction": None, "memory_budget": None, "machine": machine}
        metrics = {"status": r["status"]}
        if r["status"] == "ok":
            metrics.update(seconds=r["best_seconds"], queries_per_second=r["queries_per_second"],
                           extra_peak_bytes=r["extra_peak_bytes"], others_cpu_share=r["others_cpu_share"],
                           samples=r["seconds"])
        else:
            metrics["error"] = r.get("error")
        if impl == "topk_cosine" and check is not None:
            metrics.update(check_ok=check["ok"], check_max_value_diff=check["max_value_diff"],
                           check_indices_equal=check["indices_equal"])
        records += [{**base, "metric": k, "value": v} for k, v in metrics.items()]
    return records


if __name__ == "__main__":
    sys.exit(main())
