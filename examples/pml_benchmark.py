"""pytorch-metric-learning's ArcFaceLoss against the drop-in ``marginops.integrations.pml.ArcFaceLoss``.

Run from the repository root (``pip install pytorch-metric-learning``)::

    python -m examples.pml_benchmark                  # C=200,000, B=512, D=256, float32, this CPU
    python -m examples.pml_benchmark --write-doc      # also regenerates the table in docs/integrations.md
    python -m examples.pml_benchmark --doc-only       # only regenerates it, from the committed record

One training step (forward + backward of the loss, the embeddings and ``W`` requiring
gradients), the same inputs and weights for both. **Extra peak memory**: each implementation in
a fresh process; after a first step (so that ``W.grad`` exists in both), the peak RSS is reset
(``/proc/self/clear_refs``) and the rise of the peak over one more step is the extra memory
beyond the inputs and their gradients. **Time**: both losses and the three GEMMs of the same
shape (logits, d embeddings, d W with ``torch.mm``: the floor any exact method pays) in one
process, interleaved round by round, the minimum over rounds. The record (JSON) says which CPU,
how many threads, and how much of the machine other processes took meanwhile.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from benchmarks import runner

RECORD = Path("docs/results/integrations/pml-arcface.json")
DOC = Path("docs/integrations.md")
BEGIN, END = "<!-- pml-benchmark:begin -->", "<!-- pml-benchmark:end -->"
IMPLS = ("pytorch-metric-learning", "marginops")


def make(impl: str, B: int, D: int, C: int, seed: int = 0):
    """The loss module of ``impl`` (the same ``W`` for both under one seed) and inputs ``(x, y)``."""
    if impl == "pytorch-metric-learning":
        from pytorch_metric_learning import losses
    else:
        from marginops.integrations import pml as losses
    torch.manual_seed(seed)
    loss_fn = losses.ArcFaceLoss(C, D, margin=28.6, scale=64)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, D, generator=g).requires_grad_(True)
    y = torch.randint(0, C, (B,), generator=g)
    return loss_fn, x, y


def step(loss_fn, x, y) -> float:
    loss = loss_fn(x, y)
    loss.backward()
    return loss.item()


def peak_memory(impl: str, B: int, D: int, C: int) -> dict:
    """In this (fresh) process: the rise of peak RSS over one step, after a first one."""
    loss_fn, x, y = make(impl, B, D, C)
    first = step(loss_fn, x, y)
    x.grad.zero_()
    loss_fn.W.grad.zero_()
    gc.collect()
    if not runner.reset_peak_rss():
        raise SystemExit("error: /proc/self/clear_refs is not writable; peak memory cannot be measured here")
    base = runner.peak_rss_bytes()
    second = step(loss_fn, x, y)
    return {"impl": impl, "extra_peak_bytes": runner.peak_rss_bytes() - base, "loss": second, "first_loss": first}


def timings(B: int, D: int, C: int, rounds: int) -> dict:
    """Seconds per step of each implementation and of the three GEMMs, interleaved, minimum over rounds."""
    setups = {impl: make(impl, B, D, C) for impl in IMPLS}
    x = torch.randn(B, D)
    W = setups["marginops"][0].W.detach().t().contiguous()
    G = torch.randn(B, C)

    def floor() -> float:
        torch.mm(x, W.t())
        torch.mm(G, W)
        torch.mm(G.t(), x)
        return 0.0

    cases = {**{impl: (lambda s=s: step(*s)) for impl, s in setups.items()}, "3-GEMM floor": floor}
    for fn in cases.values():  # warm-up: first-call costs (kernel build, allocations) are not a step's
        fn()
    best = {k: float("inf") for k in cases}
    names = list(cases)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            for s in setups.values():
                s[0].zero_grad(set_to_none=False)
                s[1].grad = None
            gc.collect()
            t0 = time.perf_counter()
            cases[name]()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def table(record: dict) -> str:
    """The markdown table of a record."""
    t, mem, fl = record["seconds"], record["extra_peak_mib"], record["seconds"]["3-GEMM floor"]
    lines = [f"ArcFace (28.6 degrees, s=64), one forward + backward, B={record['batch']:,}, D={record['dim']}, "
             f"C={record['classes']:,}, float32. Measured {record['date']} on {record['machine']}; "
             f"other processes took {record['others_share']:.0%} of the CPU "
             "during the timings (a shared machine: the ratios matter, not the seconds).", "",
             "| implementation | time | x 3-GEMM floor | extra peak memory |", "|---|---|---|---|",
             f"| 3-GEMM floor (`torch.mm` x 3) | {fl:.2f} s | 1.00x | - |"]
    for impl in IMPLS:
        name = "`pytorch_metric_learning.losses.ArcFaceLoss`" if impl != "marginops" else \
            "`marginops.integrations.pml.ArcFaceLoss`"
        lines.append(f"| {name} | {t[impl]:.2f} s | {t[impl] / fl:.2f}x | {mem[impl]:,.0f} MiB |")
    return "\n".join(lines)


def write_doc(record: dict, doc: Path = DOC) -> None:
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"error: {doc} lacks the markers {BEGIN} ... {END}")
    head, rest = text.split(BEGIN, 1)
    doc.write_text(head + BEGIN + "\n" + table(record) + "\n" + END + rest.split(END, 1)[1])


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classes", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=RECORD)
    p.add_argument("--write-doc", action="store_true", help=f"regenerate the table in {DOC} from the record")
    p.add_argument("--doc-only", action="store_true", help=f"regenerate the table in {DOC} from --out, measure nothing")
    p.add_argument("--memory-of", choices=IMPLS, help=argparse.SUPPRESS)  # the child process's job
    args = p.parse_args(argv)
    if args.doc_only:
        record = json.loads(args.out.read_text())
        write_doc(record)
        return record
    B, D, C = args.batch, args.dim, args.classes
    if args.memory_of:
        print(json.dumps(peak_memory(args.memory_of, B, D, C)))
        return {}
    mem = {}
    for impl in IMPLS:
        proc = subprocess.run([sys.executable, "-m", "examples.pml_benchmark", "--memory-of", impl, "--classes",
                               str(C), "--batch", str(B), "--dim", str(D)], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"error: the memory run of {impl} failed:\n{proc.stderr}")
        mem[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
    share = runner.CpuShare()
    seconds = timings(B, D, C, args.rounds)
    others = share.others()
    machine = runner.machine_info()
    record = {"batch": B, "dim": D, "classes": C, "dtype": "float32", "rounds": args.rounds,
              "seconds": seconds, "extra_peak_mib": {k: v["extra_peak_bytes"] / 2**20 for k, v in mem.items()},
              "losses": {k: v["loss"] for k, v in mem.items()}, "machine": runner.describe_machine(machine),
              "machine_info": machine, "threads": torch.get_num_threads(),
              "others_share": others[1] if others else float("nan"), "date": runner.now()[:10]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(table(record))
    if args.write_doc:
        write_doc(record)
    return record


if __name__ == "__main__":
    main()
