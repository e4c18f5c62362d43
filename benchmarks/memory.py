"""Extra peak memory of ONE forward+backward, measured in a fresh process (``DESIGN.md`` section 6).

Run from the repository root::

    python -m benchmarks.memory --impl marginops --batch 512 --dim 256 --classes 1000000
    python -m benchmarks.memory --impl reference --batch 512 --dim 256 --classes 1000000
    python -m benchmarks.memory --impl marginops --batch 512 --dim 256 --classes 1000000 \\
        --memory-budget 33554432 --margin cosface --scale 64
    python -m benchmarks.memory --impl linear_cross_entropy --batch 512 --dim 256 --classes 100000

It prints one JSON line with at least ``status``, ``impl``,
``extra_peak_bytes``, ``loss``, ``batch``, ``dim`` and ``classes``.

The same process can also time the step (what ``python -m benchmarks.report``
uses, one fresh process per case)::

    python -m benchmarks.memory --impl pml --problem ordinary --batch 1024 --dim 512 --classes 100000 \
        --repeats 3 --check

``--problem`` names one of :data:`benchmarks.cases.PROBLEMS` (margin, scale,
normalization and input kind at once). ``--check`` makes the warm-up of
step 1 a correctness check: the implementation and the reference run on a
small problem of the same kind and their losses and gradients are compared
(``"check"`` in the output). ``--repeats N`` times N more runs after the
measured one (step 5), interleaved with nothing, each rerun up to 3 times if
other processes took more than 10% of the CPU meanwhile; ``"seconds"`` is
then their median and ``"first_seconds"`` the measured run. ``--impl floor``
measures the three GEMMs of the shape (no loss).

A failure inside the step (an exception, e.g. a compiler error or an
allocation that fails) is printed as ``{"status": "failed" | "oom",
"error": ...}`` with exit status 0; a process the kernel kills prints nothing.

Method, in one process that has done nothing else:

1. run the same implementation once on a tiny problem, so that lazily loaded
   libraries and thread pools are in the baseline, not in the measurement;
2. allocate the inputs (``x``, ``W`` with ``requires_grad``; every element
   written), plus buffers the size of their gradients, also written
   (implementations that compile, :data:`COMPILED`, first run once on the
   first :data:`WARMUP_ROWS` rows with this ``W``, so the measured run
   does not compile);
3. reset the peak resident set size to the current one where the kernel
   allows (:func:`reset_peak_rss`: whatever the warm-up, a compiler or the
   check allocated and freed then stands no higher than the baseline), and
   read it (``ru_maxrss``, as ``VmHWM`` on Linux, see
   :func:`peak_rss_bytes`): the baseline;
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


#: Implementations that compile on first use, and the rows they compile on at the measured W (step 2).
COMPILED = ("torch_compile", "cce")
WARMUP_ROWS = 24

#: Largest check problem of ``--check`` (each side is also capped by the measured shape's).
CHECK_SHAPE = cases.Shape(48, 40, 1536)  # distinct sizes: torch.compile(dynamic=True) would tie equal ones


def _check_shape(shape: cases.Shape, problem: cases.Problem) -> cases.Shape:
    dim = min(shape.dim, CHECK_SHAPE.dim)
    if problem.inputs == "trained":
        dim = max(dim, cases.TRAINED_SPREAD_DIM + 1)
    return cases.Shape(min(shape.batch, CHECK_SHAPE.batch), dim, min(shape.classes, CHECK_SHAPE.classes))


def _check(impl: str, problem: cases.Problem, shape: cases.Shape, reduction: str, memory_budget: Optional[int],
           seed: int) -> dict:
    """Loss and gradients of ``impl`` against the reference on a small problem of the same kind."""
    from . import harness

    inp = cases.make_inputs(shape, problem.inputs, seed=seed)
    ref_loss = cases.forward_backward("reference", inp, problem, reduction)
    ref = harness.StepOutputs.capture(ref_loss, inp.x, inp.W)
    inp.clear_grads()
    loss = cases.forward_backward(impl, inp, problem, reduction, memory_budget)
    ours = harness.StepOutputs.capture(loss, inp.x, inp.W)
    agree = harness.agreement(ours, ref)
    return {"ok": agree.ok, "loss_err": agree.loss_err, "grad_x_err": agree.grad_x_err,
            "grad_w_err": agree.grad_w_err, "text": str(agree), "batch": shape.batch, "dim": shape.dim,
            "classes": shape.classes}


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS (Linux >= 4.0); False where that fails.

    So that what the warm-up, a compiler or the check allocated and freed
    does not stand above the step's own peak.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(impl: str, batch: int, dim: int, classes: int, *, reduction: str = "mean",
            memory_budget: Optional[int] = None, margin: Optional[str] = None, scale: Optional[float] = None,
            normalize: Optional[bool] = None, seed: int = 0, problem: Optional[str] = None, check: bool = False,
            repeats: int = 0, max_seconds: Optional[float] = None) -> dict:
    """Measure in *this* process (see the module docstring); only meaningful in a fresh one."""
    if impl not in cases.IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {cases.IMPLEMENTATIONS}, got {impl!r}")
    if problem is not None:
        if problem not in cases.PROBLEMS:
            raise ValueError(f"problem must be one of {tuple(cases.PROBLEMS)}, got {problem!r}")
        if (margin, scale, normalize) != (None, None, None):
            raise ValueError("--problem sets margin, scale and normalize: give either, not both")
        prob = cases.PROBLEMS[problem]
    else:
        prob = cases.default_problem(margin, scale, normalize, impl)
    if impl != "floor":
        reason = cases.unsupported(impl, prob)
        if reason is not None:
            raise ValueError(reason)
    if repeats < 0:
        raise ValueError(f"repeats must be >= 0, got {repeats}")
    shape = cases.Shape(batch, dim, classes)

    # 1. Warm-up on a small problem of the same kind (the correctness check with --check).
    agreement = None
    if impl == "floor":
        cases.three_gemms(cases.make_inputs(cases.Shape(4, 16, 16), prob.inputs, seed=seed + 1))
    elif check:
        agreement = _check(impl, prob, _check_shape(shape, prob), reduction, memory_budget, seed + 1)
    else:
        tiny = cases.make_inputs(cases.Shape(4, 16, 16), prob.inputs, seed=seed + 1)
        cases.forward_backward(impl, tiny, prob, reduction, memory_budget)
        del tiny
    gc.collect()

    # 2. Inputs and stand-ins for their gradients, all written.
    inp = cases.make_inputs(shape, prob.inputs, seed=seed)
    step = cases.step_fn(cases.Case(prob, impl, reduction), inp, memory_budget)
    if impl in COMPILED and shape.batch > WARMUP_ROWS:
        # Compiled code specializes on size ranges (inductor guards C <= 4096, say): compile for
        # this W on a few rows, so that the measured run does not compile.
        few = cases.Inputs(inp.x.detach()[:WARMUP_ROWS].clone().requires_grad_(), inp.W, inp.y[:WARMUP_ROWS].clone())
        cases.forward_backward(impl, few, prob, reduction, memory_budget)
        del few
        inp.clear_grads()
        gc.collect()
    fake_grads = [torch.ones_like(inp.x), torch.ones_like(inp.W)]
    grads_bytes = sum(g.numel() * g.element_size() for g in fake_grads)
    gc.collect()
    peak_reset = reset_peak_rss()
    baseline, source = peak_rss_bytes()  # 3.
    ru_baseline = _ru_maxrss_bytes()

    # 4. One forward+backward with the stand-ins freed.
    del fake_grads
    gc.collect()
    t0 = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - t0
    peak, _ = peak_rss_bytes()  # 5.
    ru_peak = _ru_maxrss_bytes()
    first_seconds = seconds

    # 6. Optional: more timed runs of the same step (gradients freed, untimed, before each).
    samples: list[float] = []
    rejected = 0
    others_share = None
    if repeats:
        from . import harness

        inp.clear_grads()
        watch = harness.CpuContention()
        timing = harness.time_interleaved({"step": (step, inp.clear_grads)}, repeats=repeats,
                                          max_seconds=max_seconds)["step"]
        load = watch.report()
        samples, rejected, seconds = timing.samples, timing.rejected, timing.median
        others_share = None if load is None else load["others_share"]

    return {
        "status": "ok",
        "impl": impl,
        "problem": problem,
        "extra_peak_bytes": peak - baseline,
        "loss": None if loss is None else float(loss.sum() if reduction == "none" else loss),
        "check": agreement,
        "first_seconds": first_seconds,
        "samples": samples,
        "rejected_runs": rejected,
        "others_cpu_share": others_share,
        "batch": batch,
        "dim": dim,
        "classes": classes,
        "reduction": reduction,
        "memory_budget": memory_budget,
        "margin": prob.margin,
        "scale": prob.scale,
        "normalize": prob.normalize,
        "inputs": prob.inputs,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "rss_source": source,
        "peak_reset": peak_reset,
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
    p.add_argument("--impl", required=True, choices=cases.IMPLEMENTATIONS)
    p.add_argument("--problem", choices=tuple(cases.PROBLEMS), default=None,
                   help="a named problem of benchmarks.cases (instead of --margin/--scale/--normalize)")
    p.add_argument("--check", action="store_true",
                   help="warm up with a loss+gradient check against the reference on a small problem")
    p.add_argument("--repeats", type=int, default=0, help="timed runs after the measured one (default: 0)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="fewer repeats (at least one) if they would take longer than this in total")
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
            seed=args.seed, problem=args.problem, check=args.check, repeats=args.repeats,
            max_seconds=args.max_seconds,
        )
    except ValueError as e:  # bad combination of options (mo's own argument errors included)
        parser.error(str(e))
    except (RuntimeError, MemoryError, ImportError, AssertionError) as e:  # the step itself failed
        text = f"{type(e).__name__}: {e}"
        oom = isinstance(e, MemoryError) or "alloc" in text.lower() or "out of memory" in text.lower()
        result = {"status": "oom" if oom else "failed", "impl": args.impl, "error": text[-2000:]}
    print(json.dumps(result), flush=True)
    return 0


def _command(impl: str, batch: int, dim: int, classes: int, *, reduction: str = "mean",
             memory_budget: Optional[int] = None, margin: Optional[str] = None, scale: Optional[float] = None,
             normalize: Optional[bool] = None, seed: int = 0, problem: Optional[str] = None, check: bool = False,
             repeats: int = 0, max_seconds: Optional[float] = None) -> list[str]:
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
    if problem is not None:
        cmd += ["--problem", problem]
    if check:
        cmd.append("--check")
    if repeats:
        cmd += ["--repeats", str(repeats)]
    if max_seconds is not None:
        cmd += ["--max-seconds", repr(float(max_seconds))]
    return cmd


def run_in_subprocess(impl: str, batch: int, dim: int, classes: int, *, timeout: Optional[float] = None,
                      **options) -> dict:
    """Like :func:`measure_in_subprocess`, but a failure is a result: always returns a dict with ``"status"``.

    ``"ok"``; ``"failed"`` or ``"oom"`` (an exception in the child, see the
    module docstring); ``"killed"`` (the child died of a signal, e.g. the
    kernel's OOM killer: ``SIGKILL``); ``"timeout"`` (still running after
    ``timeout`` seconds; killed); ``"error"`` (it exited non-zero or printed
    no JSON). Failures carry ``"error"`` with the child's last words.
    ``options`` are :func:`measure`'s keyword arguments.
    """
    cmd = _command(impl, batch, dim, classes, **options)
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "impl": impl, "error": f"no result after {timeout:.0f} s (killed)"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode < 0:
        sig = -proc.returncode
        why = " (SIGKILL: most likely the kernel's OOM killer)" if sig == 9 else ""
        return {"status": "killed", "impl": impl, "error": f"killed by signal {sig}{why}"}
    if proc.returncode != 0 or not lines:
        return {"status": "error", "impl": impl,
                "error": f"exit status {proc.returncode}; stderr: {proc.stderr[-1500:]}"}
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"status": "error", "impl": impl, "error": f"no JSON on the last line: {lines[-1][-500:]!r}"}


def measure_in_subprocess(impl: str, batch: int, dim: int, classes: int, *, reduction: str = "mean",
                          memory_budget: Optional[int] = None, margin: Optional[str] = None,
                          scale: Optional[float] = None, normalize: Optional[bool] = None, seed: int = 0,
                          timeout: Optional[float] = None) -> dict:
    """Run ``python -m benchmarks.memory`` in a fresh interpreter (``sys.executable``) and parse its JSON.

    Raises:
        RuntimeError: if the child fails or prints no JSON line (its stderr is included).
    """
    cmd = _command(impl, batch, dim, classes, reduction=reduction, memory_budget=memory_budget, margin=margin,
                   scale=scale, normalize=normalize, seed=seed)
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"{' '.join(cmd)} exited with {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\n"
            f"stderr:\n{proc.stderr[-4000:]}"
        )
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError as e:
        raise RuntimeError(f"{' '.join(cmd)} printed no JSON on its last line: {lines[-1]!r}") from e
    if result.get("status", "ok") != "ok":
        raise RuntimeError(f"{' '.join(cmd)}: {result['status']}: {result.get('error')}")
    return result


if __name__ == "__main__":
    sys.exit(main())
