"""Train a small encoder with a class-sharded margin head on CPU processes.

Run (two processes on this machine, gloo)::

    torchrun --nproc_per_node=2 examples/train_sharded.py --steps 300

Each rank owns half of the classes' weights (``ShardedMarginHead``); the
encoder is replicated with ``DistributedDataParallel``. The data is
synthetic but learnable: every class has a random prototype in input space
and samples are noisy copies of it, so the training accuracy climbs from
chance towards 100%. Rank 0 shows a progress bar, prints the loss and the
accuracy every ``--log-every`` steps, and saves one checkpoint at the end:
the encoder and the head's *full* weight, loadable on any world size
(``ShardedMarginHead.load_full_state_dict``) or by a plain ``MarginHead``.
With ``--sample-rate 0.1`` each step runs over the batch's classes plus a
random 10% of the others (the loss and the accuracy are then over those).
Every rank's batch has the same, fixed size, given to the head as
``max_local_batch``: no step reads a value on the host, and with
``--compile`` the head runs as one ``torch.compile(fullgraph=True)`` graph
(compiled on the first step, never again).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import marginops as mo
from marginops.distributed import ShardedMarginHead


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classes", type=int, default=20_000)
    p.add_argument("--input-dim", type=int, default=64)
    p.add_argument("--embedding-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=256, help="rows per rank and step")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--sample-rate", type=float, default=1.0,
                   help="share of each rank's classes per step (Partial FC's class sampling); 1: all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) the head")
    p.add_argument("--checkpoint", default="sharded_head.pt")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(args.seed)  # the same prototypes and encoder initialisation on every rank
    prototypes = torch.randn(args.classes, args.input_dim)
    encoder = DistributedDataParallel(nn.Sequential(
        nn.Linear(args.input_dim, 256), nn.ReLU(), nn.Linear(256, args.embedding_dim)))
    head = ShardedMarginHead(args.embedding_dim, args.classes, margin=mo.ArcFace(0.3), scale=30.0,
                             sample_rate=args.sample_rate, seed=args.seed, max_local_batch=args.batch,
                             return_stats=True)
    head_step = torch.compile(head, fullgraph=True) if args.compile else head
    optimizer = torch.optim.SGD([*encoder.parameters(), *head.parameters()], lr=args.lr, momentum=0.9)
    head.attach_optimizer(optimizer)  # with sampling: unsampled class rows keep their weights and momentum
    data = torch.Generator().manual_seed(args.seed * 1000 + rank + 1)  # each rank draws its own batches
    bar = tqdm(range(args.steps), disable=rank != 0, desc=f"{world} ranks, {args.classes} classes")
    start = time.perf_counter()
    for step in bar:
        labels = torch.randint(0, args.classes, (args.batch,), generator=data)
        inputs = prototypes[labels] + 0.5 * torch.randn(args.batch, args.input_dim, generator=data)
        loss, stats = head_step(encoder(inputs), labels)  # the global batch's loss, the same on every rank
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0 and ((step + 1) % args.log_every == 0 or step + 1 == args.steps):
            accuracy = (stats.prediction[: args.batch] == labels).float().mean().item()  # rank 0's rows come first
            bar.write(f"step {step + 1:5d}  loss {loss.item():8.4f}  train accuracy (rank 0's rows) {accuracy:6.1%}")
    state = {"encoder": encoder.module.state_dict(), "head": head.full_state_dict(), "args": vars(args)}
    if rank == 0:
        torch.save(state, args.checkpoint)
        print(f"{args.steps} steps in {time.perf_counter() - start:.1f} s on {world} ranks; saved {args.checkpoint} "
              f"(head weight {tuple(state['head']['weight'].shape)})")
    # Free the DDP wrapper and the head (they hold the process group) while every rank is still connected:
    # released after destroy_process_group, on exit, gloo's teardown could wait forever for a peer that
    # had already gone (seen on a fresh machine: the run finished, one rank never exited).
    dist.barrier()
    del encoder, head, head_step, optimizer, state
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
