"""GPU benchmark of one training step's loss work (forward + backward), bf16, against the 3-GEMM floor.

Run from the repository root on a machine with a CUDA GPU::

    python -m benchmarks.gpu                       # all sizes below
    python -m benchmarks.gpu --sizes 8192x2304x100000 --impls floor,marginops-triton
    python -m benchmarks.gpu --smoke               # CPU, Triton interpreter, tiny sizes: checks it runs

Implementations (each skipped with a note when unavailable):

* ``floor``: the three GEMMs of the shape (logits, dX, dW: ``6 B D C`` FLOPs), ``torch.mm``;
* ``marginops-triton`` / ``marginops-torch``: ``mo.margin_cross_entropy`` with that backend;
* ``marginops-triton-workspace``: the triton backend with ``strategy="workspace"`` (three GEMMs) and a
  budget that holds every row's exponentials (:func:`workspace_budget`);
* ``naive``: the fully materialized computation (``backend="reference"``);
* ``naive-compiled``: ``torch.compile`` of ``naive``;
* ``linear_cross_entropy``: ``F.linear_cross_entropy`` (chunked options; plain problem only);
* ``cut_cross_entropy``, ``liger``: Apple's Cut Cross-Entropy and Liger's fused linear CE, when installed
  (plain problem only).

Two problems: ``arcface`` (normalized, ArcFace(0.5), s=64) for the margin
implementations and ``plain`` (``normalize=False``, s=1, no margin: ordinary
linear cross-entropy) for every implementation, so the peers that cannot do
margins are compared on the problem they solve.

Time: ``triton.testing.do_bench`` (median, ms) of forward + backward with the
gradients freed between runs. Memory: ``torch.cuda.max_memory_allocated``
during one step minus the memory held before it (inputs), reported beside
the gradients' own size. Results are long-format JSON records
(``benchmarks/results/gpu.json``; ``--output`` to change) that a plotter can read.

``--smoke`` runs every available implementation once on tiny sizes on the
CPU (marginops' kernels under ``TRITON_INTERPRET=1``, wall-clock timing, no
memory) so that this script cannot rot on machines without a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

SIZES = [(b, d, c) for b in (4096, 8192) for d in (512, 2304) for c in (100_000, 1_000_000)]
SMOKE_SIZES = [(37, 40, 300)]
IMPLS = ("floor", "marginops-triton", "marginops-triton-workspace", "marginops-torch", "naive", "naive-compiled",
         "linear_cross_entropy", "cut_cross_entropy", "liger")
#: Implementations that only compute plain linear cross-entropy.
PLAIN_ONLY = ("linear_cross_entropy", "cut_cross_entropy", "liger")


@dataclass
class Result:
    impl: str
    problem: str
    size: tuple[int, int, int]
    ms: Optional[float] = None
    extra_bytes: Optional[int] = None
    note: str = ""


#: At most this much scratch for ``marginops-triton-workspace`` (an 80 GB GPU holds it beside C = 1M, D = 2304).
WORKSPACE_BUDGET_CAP = 24 * 2**30


def workspace_budget(B: int, C: int) -> int:
    """``memory_budget`` for the workspace strategy: all ``B`` rows of 16-bit exponentials in one block
    (2 bytes per logit, a quarter more for the ``G`` chunks, and slack), capped at 24 GiB."""
    return min(WORKSPACE_BUDGET_CAP, 3 * B * C)


def _loss_factory(impl: str, problem: str) -> Optional[Callable]:
    """``f(x, W, y) -> scalar loss`` for ``impl``, or None when it is not available here."""
    import torch
    import torch.nn.functional as F

    import marginops as mo

    plain = problem == "plain"
    margin = None if plain else mo.ArcFace(0.5)
    scale = 1.0 if plain else 64.0
    if impl in ("marginops-triton", "marginops-triton-workspace", "marginops-torch", "naive", "naive-compiled"):
        backend = {"marginops-torch": "torch", "naive": "reference", "naive-compiled": "reference"}.get(impl, "triton")
        workspace = impl == "marginops-triton-workspace"

        def f(x, W, y):
            opts = dict(strategy="workspace", memory_budget=workspace_budget(len(x), len(W))) if workspace else {}
            return mo.margin_cross_entropy(x, W, y, margin, scale, normalize=not plain, backend=backend,
                                           validate_labels=False, **opts)

        if impl == "naive-compiled":
            return torch.compile(f)
        return f
    if not plain:
        return None
    if impl == "linear_cross_entropy":
        if not hasattr(F, "linear_cross_entropy"):
            return None
        return lambda x, W, y: F.linear_cross_entropy(x, W, y, options=torch.nn.LinearCrossEntropyOptions())
    if impl == "cut_cross_entropy":
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError:
            return None
        return lambda x, W, y: linear_cross_entropy(x, W, y)
    if impl == "liger":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            return None
        liger = LigerFusedLinearCrossEntropyLoss()

        def f(x, W, y):
            out = liger(W, x, y)  # (lin_weight, input, target)
            return out[0] if isinstance(out, tuple) else out

        return f
    raise ValueError(f"unknown implementation {impl!r}")


def _time(fn: Callable[[], object], device: str) -> float:
    """Median milliseconds: ``do_bench`` on a GPU, a few wall-clock runs on the CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, return_mode="median"))
    fn()
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) * 1e3)
    return sorted(runs)[1]


def measure(impl: str, problem: str, size: tuple[int, int, int], device: str, dtype) -> Result:
    import torch

    B, D, C = size
    res = Result(impl, problem, size)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, D, device=device, dtype=dtype, generator=gen).requires_grad_()
    W = torch.randn(C, D, device=device, dtype=dtype, generator=gen)
    if problem == "plain":
        W.mul_(D ** -0.5)
    W.requires_grad_()
    y = torch.randint(0, C, (B,), device=device, generator=gen)

    if impl == "floor":
        xd, Wd = x.detach(), W.detach()

        def step():
            logits = xd @ Wd.t()
            logits @ Wd, logits.t() @ xd
    else:
        f = _loss_factory(impl, problem)
        if f is None:
            res.note = "not available here (or not for this problem)"
            return res

        def step():
            x.grad = W.grad = None
            f(x, W, y).backward()

    try:
        step()  # warm-up: compiles kernels, autotunes peers
        if device == "cuda":
            torch.cuda.synchronize()
            x.grad = W.grad = None
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            res.extra_bytes = torch.cuda.max_memory_allocated() - base
        res.ms = _time(step, device)
    except Exception as e:  # out of memory for the naive ones at 1M classes, a peer's unsupported dtype, ...
        res.note = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        if device == "cuda":
            torch.cuda.empty_cache()
    return res


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU under the Triton interpreter")
    parser.add_argument("--sizes", help="BxDxC[,BxDxC...] (default: B in {4096, 8192}, D in {512, 2304}, "
                                        "C in {100k, 1M})")
    parser.add_argument("--impls", default=",".join(IMPLS), help="implementations, comma-separated")
    parser.add_argument("--problems", default="arcface,plain")
    parser.add_argument("--output", help="JSON records (default: benchmarks/results/gpu.json; smoke: none)")
    args = parser.parse_args(argv)

    if args.smoke:
        # must precede the first import of marginops' Triton kernels
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from . import harness

    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        torch.set_num_threads(1)  # tiny ops after an MKL GEMM wait for its spinning threads (tests/conftest.py)
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU: run with --smoke for the CPU check")
    sizes = SMOKE_SIZES if args.smoke and not args.sizes else [
        tuple(int(v) for v in s.split("x")) for s in (args.sizes or "").split(",") if s] or SIZES
    impls = [i for i in args.impls.split(",") if i]
    for i in impls:
        if i not in IMPLS:
            parser.error(f"unknown implementation {i!r}; known: {IMPLS}")
    if args.smoke:
        impls = [i for i in impls if i != "naive-compiled"]  # inductor on CPU needs a C++ toolchain: too slow here
    dtype = torch.bfloat16

    machine = harness.machine_info()
    if device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name()
    date = harness.now_iso()
    records, failed = [], 0
    if args.smoke:
        print("smoke mode: CPU, Triton interpreter; the times below say nothing about speed")
    print(f"{'problem':8} {'B x D x C':>20} {'implementation':22} {'ms':>10} {'x floor':>8} {'extra MiB':>10} "
          f"{'grads MiB':>10}  note")
    for size in sizes:
        B, D, C = size
        floor_ms = None
        grads_mib = (B + C) * D * 2 / 2**20
        for problem in args.problems.split(","):
            for impl in impls:
                if impl == "floor" and problem != args.problems.split(",")[0]:
                    continue
                r = measure(impl, problem, size, device, dtype)
                if impl == "floor":
                    floor_ms = r.ms
                ratio = f"{r.ms / floor_ms:.2f}" if r.ms and floor_ms else "-"
                extra = f"{r.extra_bytes / 2**20:.0f}" if r.extra_bytes is not None else "-"
                ms = f"{r.ms:.2f}" if r.ms is not None else "-"
                print(f"{problem:8} {B:>6}x{D:>5}x{C:>7} {impl:22} {ms:>10} {ratio:>8} {extra:>10} "
                      f"{grads_mib:>10.0f}  {r.note}")
                if r.ms is None and impl in ("floor", "marginops-triton"):
                    failed += 1
                params = dict(batch=B, dim=D, classes=C, dtype="bfloat16", device=device, smoke=args.smoke)
                case = f"{problem}/{impl}"
                records.append(harness.make_record(impl, case, "ms", r.ms, machine=machine, date=date, note=r.note,
                                                   **params))
                if r.extra_bytes is not None:
                    records.append(harness.make_record(impl, case, "extra_bytes", r.extra_bytes, machine=machine,
                                                       date=date, **params))
                if r.ms and floor_ms:
                    records.append(harness.make_record(impl, case, "ratio_to_floor", r.ms / floor_ms,
                                                       machine=machine, date=date, **params))
    out = args.output or (None if args.smoke else str(harness.RESULTS_DIR / "gpu.json"))
    if out:
        print("records:", harness.write_records(out, records))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
