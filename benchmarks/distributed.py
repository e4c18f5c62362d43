"""Per-rank memory and step time of ``ShardedMarginHead`` for several world sizes, on CPU with gloo.

    python -m benchmarks distributed --classes 2000000 --dim 128 --batch 512 --worlds 1 2 4

The global batch (``--batch`` rows) is split evenly over the ranks; every
world size trains the same problem (same weights, same batch, so the same
loss). Each rank, in its own fresh process: one warm-up step on one row,
then the peak resident set size is reset (``clear_refs``)
with the weight and a gradient-sized buffer in memory, the buffer is freed
and one measured step runs. Reported per rank: the bytes of its weight block
plus its gradient (what sharding divides), the extra peak of the step beyond
them (the gathered batch, tiles, statistics) and the step time. On a 2-core
machine the ranks share the cores (threads per rank = cores / world), so the
times say little about speed-up; the memory is the point. Records (preset
``distributed``, implementation ``world=N``, the largest figure over the ranks)
go to ``benchmarks/results/distributed.json``.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import runner


def _rank(rank: int, world: int, port: int, args: dict, queue) -> None:
    import marginops as mo
    from marginops.distributed import ShardedMarginHead

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    B, D, C = args["batch"], args["dim"], args["classes"]
    g = torch.Generator().manual_seed(0)  # the same global batch for every world size
    mine = torch.tensor_split(torch.arange(B), world)[rank]
    rows = len(mine)
    x = torch.randn(B, D, generator=g)[mine].requires_grad_()
    y = torch.randint(0, C, (B,), generator=g)[mine]
    head = ShardedMarginHead(D, C, margin=mo.ArcFace(0.5), scale=30.0)
    torch.manual_seed(1)
    full = torch.empty(C, D).normal_(std=0.01)  # the same weights for every world size
    head.load_full_state_dict({"weight": full})
    del full

    def step(rows: slice = slice(None)):
        loss = head(x[rows], y[rows])
        loss.backward()
        return loss.item()

    step(slice(0, 1))  # warm-up on one row: thread pools, libraries and the gradients, not the step's scratch
    dist.barrier()
    peak = runner.PeakMemory("cpu")
    peak.reset()
    head.weight.grad = x.grad = None  # the baseline held them; the step allocates them again
    t0 = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - t0
    extra = peak.extra()
    grad_bytes = head.weight.numel() * head.weight.element_size()
    queue.put({"rank": rank, "world": world, "rows": rows, "num_local": head.num_local, "loss": loss,
               "seconds": seconds, "weight_and_grad_bytes": 2 * grad_bytes,
               "extra_peak_bytes": extra})
    dist.barrier()
    dist.destroy_process_group()


def run_world(world: int, args: dict, timeout: float = 1800.0) -> list[dict]:
    """One fresh process per rank; their records in rank order."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with socket.socket() as sock:  # a free port on the loopback address
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [ctx.Process(target=_rank, args=(r, world, port, args, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    records = []
    while not queue.empty():
        records.append(queue.get())
    if len(records) != world:
        raise RuntimeError(f"world {world}: {len(records)} of {world} ranks reported (exit codes "
                           f"{[p.exitcode for p in procs]})")
    return sorted(records, key=lambda r: r["rank"])


def main(batch: int = 512, dim: int = 128, classes: int = 2_000_000, worlds: Sequence[int] = (1, 2, 4),
         output: Optional[Path] = None) -> int:
    if min(worlds) < 1:
        raise SystemExit(f"--worlds must be >= 1, got {worlds}")
    args = {"batch": batch, "dim": dim, "classes": classes}
    machine, date = runner.machine_info(), runner.now()
    records = []
    for world in worlds:
        ranks = run_world(world, args)
        base = {"preset": "distributed", "date": date, "implementation": f"world={world}", "problem": "ordinary",
                "batch": batch, "dim": dim, "classes": classes, "dtype": "float32", "device": "cpu",
                "reduction": "mean", "memory_budget": None, "machine": machine}
        metrics = {"status": "ok", "weight_and_grad_bytes": max(r["weight_and_grad_bytes"] for r in ranks),
                   "extra_peak_bytes": max(r["extra_peak_bytes"] for r in ranks),
                   "seconds": max(r["seconds"] for r in ranks), "loss": ranks[0]["loss"], "ranks": ranks}
        records += [{**base, "metric": k, "value": v} for k, v in metrics.items()]
    runner.write_records(output or runner.RESULTS_DIR / "distributed.json", records)
    from . import report

    print(report.blocks(records)["preset:distributed"])
    return 0
