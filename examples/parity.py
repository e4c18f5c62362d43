"""Training parity: marginops' head against the naive materialized head on the real training loop, float64.

Run from the repository root (corpora as in ``docs/results.md``)::

    python -m examples.parity --corpus wordnet --out docs/results/parity-float64/wordnet.json
    python -m examples.parity --corpus glyphs --out docs/results/parity-float64/glyphs.json

For each margin of the grid (``softmax`` ... ``simpler``), the corpus's training loop of
``examples/realdata.py`` (its encoder, batches, augmentation, AdamW and learning-rate schedule) runs
``--steps`` steps in float64. At every step both heads see the same parameters and the same batch:
one forward of the encoder, then the loss and the gradients of every parameter (encoder and class
weight) through marginops' ``MarginHead`` (``--backend``, default ``auto``) and through the naive
head (``marginops.reference``: normalize, a ``B x C`` matmul, the margin on the gathered target, and
``F.cross_entropy``), compared; then one optimizer step with marginops' gradients, shared by both.
The record holds, per margin, the largest relative error of the loss and of each gradient over the
steps (``max |ours - naive| / max |naive|`` per tensor), which the check requires to stay at or
below ``--tolerance`` (default 1e-9; exit status 1 otherwise).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from marginops.reference import margin_cross_entropy_reference

from .realdata import MARGINS, epoch_batches, make_head, make_optimizer

#: The headline sizes of ``examples/realdata_grid.sh`` (the class counts the results page trains on).
SIZES = {"wordnet": ["--max-classes", "20000", "--eval-classes", "5000", "--epochs", "10"],
         "glyphs": ["--epochs", "6"]}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |ours - ref| / max |ref|`` (0 where both are zero)."""
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def naive_loss(head, feats: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss of the same head computed the naive way: every ``B x C`` tensor materialized."""
    normalize = head.options.get("normalize", True)
    return margin_cross_entropy_reference(feats, head.weight, y, head.margin, float(head.scale),
                                          normalize=normalize).loss


def run_margin(corpus: str, kind: str, task_args: argparse.Namespace, build_task, steps: int, backend: str,
               task=None) -> dict:
    """``steps`` float64 steps of the training loop with ``kind``'s head; the largest errors seen."""
    task = build_task(task_args) if task is None else task
    torch.manual_seed(task_args.seed)
    encoder = task.encoder.double()
    head = make_head(kind, task_args.dim, task.num_classes, task_args.scale, None, backend=backend).double()
    enc_params = list(encoder.parameters())
    params = enc_params + [head.weight]
    per_epoch = max(1, len(task.train_y) // task_args.batch)
    opt, sched = make_optimizer(params, task_args, per_epoch * task_args.epochs)
    gen = torch.Generator().manual_seed(task_args.seed)
    worst = {"loss": 0.0, "d_weight": 0.0, "d_encoder": 0.0}
    losses = []
    step = 0
    while step < steps:
        for x, y in epoch_batches(task, task_args, gen):
            feats = encoder(x.double() if x.is_floating_point() else x)
            ours = head(feats, y)
            g_ours = torch.autograd.grad(ours, params, retain_graph=True)
            ref = naive_loss(head, feats, y)
            g_ref = torch.autograd.grad(ref, params)
            worst["loss"] = max(worst["loss"], rel_err(ours.detach(), ref.detach()))
            worst["d_weight"] = max(worst["d_weight"], rel_err(g_ours[-1], g_ref[-1]))
            worst["d_encoder"] = max(worst["d_encoder"], max(rel_err(a, b) for a, b in zip(g_ours[:-1], g_ref[:-1])))
            for p, g in zip(params, g_ours):
                p.grad = g
            opt.step()
            sched.step()
            losses.append(ours.item())
            step += 1
            if step == steps:
                break
    return {"corpus": corpus, "margin": kind, "steps": steps, "classes": task.num_classes, "batch": task_args.batch,
            "max_rel_err": worst, "loss_first": losses[0], "loss_last": losses[-1]}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", choices=sorted(SIZES), required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--margins", nargs="+", choices=MARGINS, default=list(MARGINS))
    p.add_argument("--backend", default="auto", help="marginops backend (default: auto)")
    p.add_argument("--tolerance", type=float, default=1e-9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="record JSON")
    p.add_argument("task_args", nargs="*", help="arguments for the corpus's training script (after --), "
                                                "default: the results page's headline sizes")
    args = p.parse_args(argv)
    if args.steps < 1:
        raise SystemExit(f"error: --steps must be >= 1, got {args.steps}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    mod = importlib.import_module(f"examples.train_{args.corpus}")
    task_args = mod.parse_args((args.task_args or SIZES[args.corpus]) + ["--seed", str(args.seed)])
    results, t0 = [], time.perf_counter()
    for kind in args.margins:
        r = run_margin(args.corpus, kind, task_args, mod.build_task, args.steps, args.backend)
        results.append(r)
        e = r["max_rel_err"]
        print(f"{args.corpus} {kind}: {r['steps']} steps, {r['classes']} classes; largest relative error: loss "
              f"{e['loss']:.2e}, d weight {e['d_weight']:.2e}, d encoder {e['d_encoder']:.2e}", file=sys.stderr)
    worst = max(max(r["max_rel_err"].values()) for r in results)
    record = {"corpus": args.corpus, "steps": args.steps, "dtype": "float64", "backend": args.backend,
              "resolved_backend": __import__("marginops").resolve_backend(args.backend, torch.device("cpu")),
              "tolerance": args.tolerance, "worst": worst, "passed": worst <= args.tolerance,
              "seconds": time.perf_counter() - t0, "results": results}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1))
    print(f"{args.corpus}: worst relative error {worst:.2e} (tolerance {args.tolerance:g}): "
          f"{'passed' if record['passed'] else 'FAILED'}")
    if not record["passed"]:
        raise SystemExit(1)
    return record


if __name__ == "__main__":
    main()
