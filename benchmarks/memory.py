"""Extra peak memory of ONE forward+backward, measured in a fresh process (``DESIGN.md`` section 6).

Run from the repository root::

    python -m benchmarks.memory --impl marginops --batch 512 --dim 256 --classes 1000000
    python -m benchmarks.memory --impl reference --batch 512 --dim 256 --classes 1000000
    python -m benchmarks.memory --impl marginops --batch 512 --dim 256 --classes 1000000 \\
        --memory-budget 33554432 --margin cosface --scale 64
    python -m benchmarks.memory --impl linear_cross_entropy --batch 512 --dim 256 --classes 100000

It prints one JSON line with at least ``impl``, ``extra_peak_bytes``,
``loss``, ``batch``, ``dim`` and ``classes``.

Method, in one process that has done nothing else:

1. run the same implementation once on a tiny problem, so that lazily loaded
   libraries and thread pools are in the baseline, not in the measurement;
2. allocate the inputs (``x``, ``W`` with ``requires_grad``; every element
   written), plus buffers the size of their gradients, also written;
3. read the peak resident set size (``ru_maxrss``, as ``VmHWM`` on Linux,
   see :func:`peak_rss_bytes`): the baseline;
4. free the stand-in gradient buffers, run forward+backward once;
5. read the peak again: ``extra_peak_bytes = after - baseline``.

So the figure is the scratch memory of the step beyond its inputs and
their gradients, which every implementation must hold anyway. The peak is a
high-water mark of the whole process, hence one measurement per process;
:func:`measure_in_subprocess` runs this module for you and parses its output.

``--impl linear_cross_entropy`` is ``F.linear_cross_entropy(x, W, y,
options=torch.nn.LinearCrossEntropyOptions())`` and computes the plain
problem only (its defaults: no margin, scale 1, ``--no-normalize``). For
``marginops`` and ``reference`` the defaults are ArcFace(0.5), scale 30,
normalized; inputs are Gaussian, or drawn like ``nn.Linear`` weights with
``--no-normalize`` (see :func:`benchmarks.cases.make_inputs`).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import cases

REPO_ROOT = Path(__file__).resolve().parent.parent


def _ru_maxrss_bytes() -> int:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in bytes (it is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _vm_hwm_bytes() -> Optional[int]:
    """``VmHWM`` from ``/proc/self/status``: the peak RSS of this process's own address space (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_bytes() -> tuple[int, str]:
    """This process's peak resident set size so far, and where it was read.

    ``ru_maxrss`` and ``VmHWM`` are the same high-water mark, except that
    Linux carries ``ru_maxrss`` across ``execve`` from the address space
    being replaced. A child that Python's ``subprocess`` starts (vfork, then
    exec) therefore begins with its *parent's* peak as its own ``ru_maxrss``,
    which would hide everything below that level. ``VmHWM`` starts afresh
    with the new program, so it is used where it exists.
    """
    hwm = _vm_hwm_bytes()
    return (hwm, "VmHWM") if hwm is not None else (_ru_maxrss_bytes(), "ru_maxrss")


def measure(impl: str, batch: int, dim: int, classes: int, *, reduction: str = "mean",
            memory_budget: Optional[int] = None, margin: Optional[str] = None, scale: Optional[float] = None,
            normalize: Optional[bool] = None, seed: int = 0) -> dict:
    """Measure in *this* process (see the module docstring); only meaningful in a fresh one."""
    if impl not in cases.LOSS_IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {cases.LOSS_IMPLEMENTATIONS}, got {impl!r}")
    problem = cases.default_problem(margin, scale, normalize, impl)
    if impl == "linear_cross_entropy" and not problem.is_plain:
        raise ValueError("--impl linear_cross_entropy computes the plain problem only: "
                         "--margin none --scale 1 --no-normalize (the defaults)")
    shape = cases.Shape(batch, dim, classes)

    # 1. Warm-up on a tiny problem of the same kind.
    tiny = cases.make_inputs(cases.Shape(4, 8, 16), problem.inputs, seed=seed + 1)
    cases.forward_backward(impl, tiny, problem, reduction, memory_budget)
    del tiny
    gc.collect()

    # 2. Inputs and stand-ins for their gradients, all written.
    inp = cases.make_inputs(shape, problem.inputs, seed=seed)
    fake_grads = [torch.ones_like(inp.x), torch.ones_like(inp.W)]
    grads_bytes = sum(g.numel() * g.element_size() for g in fake_grads)
    baseline, source = peak_rss_bytes()  # 3.
    ru_baseline = _ru_maxrss_bytes()

    # 4. One forward+backward with the stand-ins freed.
    del fake_grads
    gc.collect()
    t0 = time.perf_counter()
    loss = cases.forward_backward(impl, inp, problem, reduction, memory_budget)
    seconds = time.perf_counter() - t0
    peak, _ = peak_rss_bytes()  # 5.
    ru_peak = _ru_maxrss_bytes()

    return {
        "impl": impl,
        "extra_peak_bytes": peak - baseline,
        "loss": float(loss.sum() if reduction == "none" else loss),
        "batch": batch,
        "dim": dim,
        "classes": classes,
        "reduction": reduction,
        "memory_budget": memory_budget,
        "margin": problem.margin,
        "scale": problem.scale,
        "normalize": problem.normalize,
        "inputs": problem.inputs,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "rss_source": source,
        "ru_maxrss_baseline_bytes": ru_baseline,
        "ru_maxrss_peak_bytes": ru_peak,
        "inputs_bytes": inp.nbytes,
        "grads_bytes": grads_bytes,
        "seconds": seconds,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.memory",
        description="Extra peak memory (peak RSS) of one forward+backward; prints one JSON line.",
    )
    p.add_argument("--impl", required=True, choices=cases.LOSS_IMPLEMENTATIONS)
    p.add_argument("--batch", type=int, required=True, help="B, rows")
    p.add_argument("--dim", type=int, required=True, help="D, features")
    p.add_argument("--classes", type=int, required=True, help="C, classes")
    p.add_argument("--reduction", default="mean", choices=("mean", "sum", "none"))
    p.add_argument("--memory-budget", type=int, default=None, metavar="BYTES",
                   help="marginops' memory_budget (default: the library's default); "
                        "passed to the reference too, ignored by linear_cross_entropy")
    p.add_argument("--margin", choices=cases.MARGINS, default=None,
                   help="arcface = ArcFace(0.5), cosface = CosFace(0.35) (default: arcface; none for "
                        "linear_cross_entropy)")
    p.add_argument("--scale", type=float, default=None, help="s (default: 30; 1 for linear_cross_entropy)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="L2-normalize rows (default: on; off for linear_cross_entropy)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        result = measure(
            args.impl, args.batch, args.dim, args.classes, reduction=args.reduction,
            memory_budget=args.memory_budget, margin=args.margin, scale=args.scale, normalize=args.normalize,
            seed=args.seed,
        )
    except ValueError as e:  # bad combination of options (mo's own argument errors included)
        parser.error(str(e))
    print(json.dumps(result), flush=True)
    return 0


def measure_in_subprocess(impl: str, batch: int, dim: int, classes: int, *, reduction: str = "mean",
                          memory_budget: Optional[int] = None, margin: Optional[str] = None,
                          scale: Optional[float] = None, normalize: Optional[bool] = None, seed: int = 0,
                          timeout: Optional[float] = None) -> dict:
    """Run ``python -m benchmarks.memory`` in a fresh interpreter (``sys.executable``) and parse its JSON.

    Raises:
        RuntimeError: if the child fails or prints no JSON line (its stderr is included).
    """
    cmd = [sys.executable, "-m", "benchmarks.memory", "--impl", impl, "--batch", str(batch), "--dim", str(dim),
           "--classes", str(classes), "--reduction", reduction, "--seed", str(seed)]
    if memory_budget is not None:
        cmd += ["--memory-budget", str(memory_budget)]
    if margin is not None:
        cmd += ["--margin", margin]
    if scale is not None:
        cmd += ["--scale", repr(float(scale))]
    if normalize is not None:
        cmd.append("--normalize" if normalize else "--no-normalize")
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"{' '.join(cmd)} exited with {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\n"
            f"stderr:\n{proc.stderr[-4000:]}"
        )
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError as e:
        raise RuntimeError(f"{' '.join(cmd)} printed no JSON on its last line: {lines[-1]!r}") from e


if __name__ == "__main__":
    sys.exit(main())
