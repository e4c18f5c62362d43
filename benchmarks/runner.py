"""The one runner: every case in a fresh process, checked, timed, its extra peak memory measured; records.

A *case* is an implementation computing a problem at a shape, dtype and
device (:class:`Case`). :func:`run` runs a list of them, each in a fresh
``python -m benchmarks.runner`` process (a peak-memory figure is a high-water
mark of the whole process, and one case must not warm another's caches),
which does, in order (:func:`measure`):

1. **check**: the implementation's loss and both gradients on a small problem
   of the same kind, dtype and device, against the reference
   (``backend="reference"`` in float64). Allowed: relative errors of 1e-4
   (loss) and 1e-3 (gradients, in norm) in float32, or for 16-bit inputs twice
   what the naive code reaches in that dtype (at least 2e-2). A case that
   disagrees is recorded as ``wrong``; the floor computes no loss and is not checked;
2. **extra peak memory** of one forward+backward at the full shape, beyond the
   inputs and their gradients: with the inputs and gradient-sized buffers
   allocated, the peak is reset (``/proc/self/clear_refs`` then ``VmHWM`` on
   CPU, ``torch.cuda.reset_peak_memory_stats`` on CUDA) and read, the
   buffers freed, one step run, the peak read again;
3. **time**: on CUDA ``triton.testing.do_bench`` (median); on CPU ``repeats``
   timed steps, median, a step during which other processes took more than
   10% of the CPU rerun (up to 3 times), and the CPU share others took
   recorded (a 2-core machine shared with other jobs slows the many small
   per-tile passes far more than the GEMMs).

The parent adds the ratio to the floor of the same shape from the same run
and writes long-format records (:func:`records_of`): one row per
implementation x case x metric, each with the machine and versions.

**Interleaved timing** (``rounds``, a preset's or ``--rounds``): the cases that
share a shape and a kind of inputs run in *one* fresh process
(:func:`measure_interleaved`): each is checked and warmed up (compiled), then
they are timed round-robin, so an implementation's k-th run lies in round k
and drifting load from other processes hits all of them alike. Records then
carry the median and the minimum over rounds (``seconds``, ``seconds_min``)
and both ratios to the floor; memory is not measured in that mode (a
process's peak is shared by its cases). With ``busy`` a single-threaded GEMM
loop runs beside the cases, as another user's job would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
from tqdm import tqdm

import marginops as mo

from . import registry

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MiB, GiB = 2**20, 2**30


@dataclass(frozen=True)
class Case:
    """One measured unit. ``repeats``: timed CPU steps after the measured one (CUDA: ``do_bench``)."""

    impl: str
    problem: str
    batch: int
    dim: int
    classes: int
    dtype: str = "float32"
    device: str = "cpu"
    reduction: str = "mean"
    repeats: int = 3
    max_seconds: float = 60.0  # fewer CPU repeats (at least one) when they would take longer
    memory_budget: Optional[int] = None
    check: bool = True

    def __post_init__(self):
        registry.check_impl(self.impl)
        for field, allowed in (("problem", registry.PROBLEMS), ("dtype", registry.DTYPES), ("device", ("cpu", "cuda")),
                               ("reduction", ("mean", "sum", "none"))):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {tuple(allowed)}, got {getattr(self, field)!r}")
        if self.repeats < 0:
            raise ValueError(f"repeats must be >= 0, got {self.repeats}")
        registry.Shape(self.batch, self.dim, self.classes)

    @property
    def shape(self) -> registry.Shape:
        return registry.Shape(self.batch, self.dim, self.classes)


# -- the machine ------------------------------------------------------------------------------------


def _cpuinfo() -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                k, _, v = line.partition(":")
                out[k.strip()] = v.strip()
    except OSError:
        pass
    return out


def machine_info() -> dict:
    """The CPU (model, family, the ISA flags that matter), threads, accelerator and versions."""
    info = _cpuinfo()
    flags = info.get("flags", "").split()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    out = {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_family": info.get("cpu family"), "cpu_model": info.get("model"),
        "isa": ",".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags),
        "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["cuda"] = torch.version.cuda
    return out


def describe_machine(m: dict) -> str:
    """One line: CPU (family, ISA), cores and threads, GPU, versions."""
    family = f"family {m['cpu_family']} model {m['cpu_model']}, " if m.get("cpu_family") else ""
    cpu = f"{m['cpu']} ({family}{m.get('isa') or 'no AVX2'})"
    gpu = f", {m['gpu']}" if m.get("gpu") else ""
    return (f"{cpu}, {m['cores']} cores, {m['torch_threads']} torch threads{gpu}; torch {m['torch']}"
            + (f", triton {m['triton']}" if m.get("triton") else ""))


class CpuShare:
    """The share of the machine's CPU time other processes (and the hypervisor's steal) took since creation.

    Machine-wide busy time from ``/proc/stat`` minus this process's and its
    children's own; None where ``/proc/stat`` does not exist.
    """

    def __init__(self) -> None:
        self._start = self._snapshot()

    @staticmethod
    def _snapshot() -> Optional[tuple[float, float, float]]:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = (sum(fields[:3]) + sum(fields[5:8])) / os.sysconf("SC_CLK_TCK")  # user nice system irq softirq steal
        own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for f in ("ru_utime", "ru_stime"))
        return time.perf_counter(), busy, own

    def others(self) -> Optional[tuple[float, float]]:
        """``(others' CPU seconds, their share of the machine)`` so far."""
        end = self._snapshot()
        if self._start is None or end is None:
            return None
        wall = end[0] - self._start[0]
        others = max(0.0, (end[1] - self._start[1]) - (end[2] - self._start[2]))
        return others, others / max(wall * (os.cpu_count() or 1), 1e-9)


# -- peak memory --------------------------------------------------------------------------------------


def reset_peak_rss() -> bool:
    """Set this process's peak RSS (``VmHWM``) to its current RSS (Linux >= 4.0); False where that fails."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's peak RSS: ``VmHWM`` (``ru_maxrss`` elsewhere; on Linux it would carry the parent's
    peak across ``exec``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class PeakMemory:
    """``reset()`` then ``extra()``: bytes the peak rose above the level at the reset (CPU RSS or CUDA)."""

    def __init__(self, device: str):
        self.device = device

    def _level(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return peak_rss_bytes()

    def reset(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()
        self.base = self._level()

    def extra(self) -> int:
        return self._level() - self.base


# -- one case, in this process -----------------------------------------------------------------------


def _rel(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))


def _errors(step: Callable, inp: registry.Inputs, ref: tuple) -> tuple[float, float, float]:
    inp.clear_grads()
    loss = step()
    err = (_rel(loss, ref[0]) if loss.dim() else abs(float(loss) - float(ref[0])) / max(1.0, abs(float(ref[0]))),
           _rel(inp.x.grad, ref[1]), _rel(inp.W.grad, ref[2]))
    inp.clear_grads()
    return err


#: Two float64 cosines closer than this are a tie that float32 rounding may order either way (retrieval check).
TIE_TOL = 1e-5


def check_topk(case: Case) -> dict:
    """Step 1 for retrieval: top-k against float64 brute force on a smaller problem of the same kind; values
    within :data:`TIE_TOL`, indices equal except where the two classes' cosines are a near tie."""
    problem = registry.PROBLEMS[case.problem]
    shape = registry.Shape(min(case.batch, 64), case.dim, min(case.classes, 20_000))
    inp = registry.problem_inputs(problem, shape, dtype=registry.DTYPES[case.dtype], device=case.device, seed=1)
    values, indices = registry.step_function(case.impl, problem, inp, device=case.device)()
    q64 = torch.nn.functional.normalize(inp.x.detach().double(), dim=1)
    w64 = torch.nn.functional.normalize(inp.W.detach().double(), dim=1)
    want = torch.topk(q64 @ w64.T, problem.topk, dim=1)
    got_cos = torch.einsum("bd,bkd->bk", q64, w64[indices])
    differ = indices != want.indices
    gap = (got_cos - want.values).abs()
    value_diff = float((values.double() - want.values).abs().max())
    return {"ok": bool(torch.all(gap[differ] <= TIE_TOL)) and value_diff <= TIE_TOL, "max_value_diff": value_diff,
            "indices_equal": int((~differ).sum()), "indices_total": differ.numel()}


def check(case: Case) -> dict:
    """Step 1: loss, dX and dW on a small problem of the same kind against the float64 reference."""
    problem = registry.PROBLEMS[case.problem]
    if problem.topk:
        return check_topk(case)
    dim = min(case.dim, 40)
    if problem.inputs == "trained":
        dim = max(dim, registry.TRAINED_SPREAD_DIM + 1)
    shape = registry.Shape(min(case.batch, 48), dim, min(case.classes, 1536))
    dtype = registry.DTYPES[case.dtype]
    inp = registry.problem_inputs(problem, shape, dtype=dtype, device=case.device, seed=1)

    def reference(on: registry.Inputs) -> torch.Tensor:  # one step of the naive code, backend="reference"
        loss = mo.margin_cross_entropy(on.x, on.W, on.y, problem.margin_object(), problem.scale,
                                       reduction=case.reduction, backend="reference", **problem.options())
        (loss.sum() if loss.dim() else loss).backward()
        return loss.detach()

    ref_in = inp.to(torch.float64)
    ref = (reference(ref_in), ref_in.x.grad, ref_in.W.grad)
    step = registry.step_function(case.impl, problem, inp, device=case.device, reduction=case.reduction,
                                  memory_budget=case.memory_budget)
    errs = _errors(step, inp, ref)
    allowed = {"float64": (1e-10, 1e-8), "float32": (1e-4, 1e-3)}.get(case.dtype)
    if allowed is None:  # 16-bit inputs: no worse than twice the naive computation in the same dtype
        naive = _errors(lambda: reference(inp), inp, ref)
        allowed = (max(2e-2, 2 * naive[0]), max(2e-2, 2 * max(naive[1:])))
    ok = errs[0] <= allowed[0] and max(errs[1:]) <= allowed[1]
    return {"ok": ok, "loss_err": errs[0], "grad_x_err": errs[1], "grad_w_err": errs[2],
            "loss_tol": allowed[0], "grad_tol": allowed[1], "shape": [shape.batch, shape.dim, shape.classes]}


def _time_cpu(step: Callable, reset: Callable, repeats: int, max_seconds: float,
              limit: float = 0.10, retries: int = 3) -> tuple[list[float], int]:
    """``repeats`` timed steps (fewer if over ``max_seconds``), each rerun up to ``retries`` times when
    other processes took more than ``limit`` of the CPU meanwhile; returns (seconds, reruns)."""
    samples, rejected = [], 0
    tick = 2.0 / os.sysconf("SC_CLK_TCK")
    while len(samples) < repeats:
        for attempt in range(retries + 1):
            reset()
            share = CpuShare()
            t0 = time.perf_counter()
            step()
            dt = time.perf_counter() - t0
            took = share.others()
            if took is None or attempt == retries or took[0] <= max(limit * dt * (os.cpu_count() or 1), tick):
                break
            rejected += 1
        samples.append(dt)
        if sum(samples) + samples[0] > max_seconds:
            break
    reset()
    return samples, rejected


def _checked(case: Case) -> dict:
    """A case's result after step 1 (the floor and ``check=False`` cases are not checked)."""
    if case.impl == "floor" or not case.check:
        return {"status": "ok"}
    result = check(case)
    return {"status": "ok" if result["ok"] else "wrong", "check": result}


def measure(case: Case) -> dict:
    """Steps 1-3 of the module docstring in *this* process (meaningful only in a fresh one)."""
    problem = registry.PROBLEMS[case.problem]
    impl = registry.IMPLS[case.impl]
    dtype = registry.DTYPES[case.dtype]
    out = _checked(case)
    if "check" not in out:  # warm-up on a tiny problem: libraries and thread pools
        tiny = registry.make_inputs(registry.Shape(4, 16, 16), "gaussian", dtype=dtype, device=case.device)
        registry.step_function(case.impl, problem, tiny, device=case.device, reduction=case.reduction)()
        del tiny
    inp = registry.problem_inputs(problem, case.shape, dtype=dtype, device=case.device)
    step = registry.step_function(case.impl, problem, inp, device=case.device, reduction=case.reduction,
                                  memory_budget=case.memory_budget)
    if impl.compiles:  # compile for this W on a few rows, so that the measured step does not compile
        few = registry.Inputs(inp.x.detach()[:24].clone().requires_grad_(), inp.W, inp.y[:24].clone())
        registry.step_function(case.impl, problem, few, device=case.device, reduction=case.reduction)()
        del few
        inp.clear_grads()
    # the gradients every implementation holds (none for retrieval)
    stand_ins = [] if problem.topk else [torch.ones_like(inp.x), torch.ones_like(inp.W)]
    peak = PeakMemory(case.device)
    peak.reset()
    del stand_ins
    share = CpuShare()
    t0 = time.perf_counter()
    loss = step()
    if case.device == "cuda":
        torch.cuda.synchronize()
    out["first_seconds"] = time.perf_counter() - t0
    out["extra_peak_bytes"] = peak.extra()
    if loss is not None and not problem.topk:
        out["loss"] = float(loss.double().sum())
    if case.device == "cuda":
        from triton.testing import do_bench

        out["seconds"] = float(do_bench(step, grad_to_none=[inp.x, inp.W], return_mode="median")) / 1e3
        out["samples"] = [out["seconds"]]
    elif case.repeats:
        out["samples"], out["rejected_runs"] = _time_cpu(step, inp.clear_grads, case.repeats, case.max_seconds)
        out["seconds"] = statistics.median(out["samples"])
    else:
        out["seconds"], out["samples"] = out["first_seconds"], [out["first_seconds"]]
    took = share.others()
    out["others_cpu_share"] = None if took is None else took[1]
    return out


def _failure(e: Exception) -> dict:
    """A case's failure as its result (an OOM, a compiler error, ...)."""
    text = f"{type(e).__name__}: {e}"
    oom = isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))) or "out of memory" in text.lower()
    return {"status": "oom" if oom else "failed", "error": text[-1500:]}


def measure_interleaved(cases: Sequence[Case], rounds: int) -> list[dict]:
    """Cases of one shape in *this* process: each checked and warmed up, then timed round-robin
    for ``rounds`` rounds on the same inputs (see the module docstring); one result per case."""
    inputs: dict[str, registry.Inputs] = {}  # one set per problem (sub-centres draw fewer labels)
    results, steps = [], []
    for case in cases:
        problem = registry.PROBLEMS[case.problem]
        inp = inputs.setdefault(case.problem, registry.problem_inputs(
            problem, case.shape, dtype=registry.DTYPES[case.dtype], device=case.device))
        try:
            out = _checked(case)
            step = registry.step_function(case.impl, problem, inp, device=case.device, reduction=case.reduction,
                                          memory_budget=case.memory_budget)
            step()  # warm-up: libraries, thread pools, compilation
        except Exception as e:  # noqa: BLE001
            out, step = _failure(e), None
        inp.clear_grads()
        results.append(out)
        steps.append((step, inp))
    share = CpuShare()
    for _ in range(rounds):
        for out, (step, inp) in zip(results, steps):
            if step is None:
                continue
            gc.collect()
            t0 = time.perf_counter()
            step()
            if cases[0].device == "cuda":
                torch.cuda.synchronize()
            out.setdefault("samples", []).append(time.perf_counter() - t0)
            inp.clear_grads()
    took = share.others()
    for out in results:
        if out.get("samples"):
            out.update(seconds=statistics.median(out["samples"]), seconds_min=min(out["samples"]),
                       others_cpu_share=None if took is None else took[1])
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m benchmarks.runner '<case as JSON>'``: measure, print one JSON line (status 0 on failure too);
    ``python -m benchmarks.runner --rounds N '<cases as a JSON list>'``: :func:`measure_interleaved`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[0] == "--rounds":
        cases = [Case(**c) for c in json.loads(argv[2])]
        print(json.dumps(measure_interleaved(cases, int(argv[1]))), flush=True)
        return 0
    case = Case(**json.loads(argv[0]))
    try:
        result = measure(case)
    except Exception as e:  # noqa: BLE001 - the case's failure is its result
        result = _failure(e)
    print(json.dumps(result), flush=True)
    return 0


# -- the parent: a list of cases, each in a fresh process ---------------------------------------------


def estimate_bytes(case: Case) -> int:
    """Rough peak of a case: inputs, gradients and their stand-ins, the B x C tensors it holds, 1 GiB slack."""
    elt = torch.finfo(registry.DTYPES[case.dtype]).bits // 8
    inputs = elt * (case.batch + case.classes) * case.dim
    return 3 * inputs + registry.IMPLS[case.impl].bxc_tensors * 4 * case.batch * case.classes + GiB


def available_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


#: glibc settings for the measuring processes on CPU: every allocation of 64 KiB or more gets its own mapping,
#: returned to the system when freed, so resident memory follows the live allocations. With glibc's defaults,
#: memory freed earlier (a warm-up's) stays resident and is reused unseen: one case measured anywhere from 3 to
#: 8 MiB. Not for interleaved timing: a mapping per allocation slows code with many large temporaries.
EXACT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def why_not(case: Case) -> Optional[str]:
    """Why ``case`` cannot run here (the implementation, the device, the memory), or None."""
    why = registry.unsupported(case.impl, registry.PROBLEMS[case.problem])
    why = why or registry.unavailable(case.impl, case.device)
    if why is None and (case.device == "cpu" or torch.cuda.is_available()):
        need, avail = estimate_bytes(case), available_bytes(case.device)
        if need > 0.8 * avail:
            why = f"needs ~{need / GiB:.0f} GiB, {avail / GiB:.0f} GiB free"
    return why


def _child(args: list[str], timeout: float, env: Optional[dict], tree: Optional[Path] = None) -> "dict | list":
    """``python -m benchmarks.runner ARGS`` in a fresh process (in ``tree``, see :func:`other_tree`): its last
    output line, parsed."""
    cmd = [sys.executable, "-m", "benchmarks.runner", *args]
    try:
        proc = subprocess.run(cmd, cwd=tree or REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                              env=env or os.environ.copy())
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"no result after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        kill = " (SIGKILL: most likely the OOM killer)" if proc.returncode == -9 else ""
        return {"status": "failed", "error": f"exit status {proc.returncode}{kill}: {proc.stderr[-1500:]}"}
    return json.loads(lines[-1])


def run_unit(cases: Sequence[Case], rounds: Optional[int] = None, timeout: float = 900.0,
             env: Optional[dict] = None, tree: Optional[Path] = None) -> list[dict]:
    """Cases in one fresh process: one case (``rounds=None``: :func:`measure`) or the cases of one shape timed
    round-robin (:func:`measure_interleaved`); one result per case, each a dict with ``"status"`` (``skipped``
    with the reason where a case cannot run here)."""
    results = [None if why is None else {"status": "skipped", "error": why} for why in map(why_not, cases)]
    runnable = [c for c, r in zip(cases, results) if r is None]
    if not runnable:
        return results
    env = dict(env or os.environ)
    if rounds:
        out = _child(["--rounds", str(rounds), json.dumps([dataclasses.asdict(c) for c in runnable])], timeout, env,
                     tree)
    else:  # one case
        if runnable[0].device == "cpu":
            env.update(EXACT_MALLOC)
        out = [_child([json.dumps(dataclasses.asdict(runnable[0]))], timeout, env, tree)]
    outs = iter(out if isinstance(out, list) else [out] * len(runnable))  # a process that failed: for each case
    return [r if r is not None else next(outs) for r in results]


def run_case(case: Case, timeout: float = 900.0, env: Optional[dict] = None, tree: Optional[Path] = None) -> dict:
    """One case in a fresh process, or the reason it was not run; always a dict with ``"status"``."""
    return run_unit([case], timeout=timeout, env=env, tree=tree)[0]


@contextlib.contextmanager
def other_tree(rev: str):
    """A folder where ``python -m benchmarks.runner`` runs *this* benchmarks code on ``marginops`` of git
    revision ``rev`` (a temporary worktree); yields ``(folder, short sha)``."""
    sha = subprocess.run(["git", "rev-parse", "--short=10", rev], cwd=REPO_ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        other, folder = Path(tmp) / "other", Path(tmp) / "run"
        subprocess.run(["git", "worktree", "add", "--detach", str(other), sha], cwd=REPO_ROOT, check=True,
                       capture_output=True)
        try:
            folder.mkdir()
            (folder / "marginops").symlink_to(other / "marginops")
            (folder / "benchmarks").symlink_to(REPO_ROOT / "benchmarks")
            yield folder, sha
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=REPO_ROOT, capture_output=True)


def busy_process() -> subprocess.Popen:
    """Another user's job: one single-threaded GEMM loop, until killed."""
    code = ("import torch; torch.set_num_threads(1); a = torch.randn(512, 512)\n"
            "while True: a = torch.mm(a, a).mul_(1e-3)")
    return subprocess.Popen([sys.executable, "-c", code])


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def records_of(case: Case, result: dict, *, floor_seconds: Optional[dict], preset: str, machine: dict,
               date: str, **extra) -> list[dict]:
    """Long-format records of one case: one per metric, each with the case, machine and versions.

    ``floor_seconds``: the floor's ``seconds`` (and ``seconds_min``) at the case's shape in the same run.
    """
    impl = case.impl + (f"@{extra['tree']}" if extra.get("tree") else "")
    base = {"preset": preset, "date": date, "implementation": impl, "problem": case.problem,
            "batch": case.batch, "dim": case.dim, "classes": case.classes, "dtype": case.dtype,
            "device": case.device, "reduction": case.reduction, "memory_budget": case.memory_budget,
            "machine": machine, **extra}
    metrics: dict = {"status": result["status"]}
    if result.get("error"):
        metrics["error"] = result["error"]
    for k in ("seconds", "seconds_min", "first_seconds", "extra_peak_bytes", "loss", "others_cpu_share",
              "rejected_runs", "samples"):
        if result.get(k) is not None:
            metrics[k] = result[k]
    best = result.get("seconds_min", result.get("seconds"))
    if best and registry.PROBLEMS[case.problem].topk:
        metrics["queries_per_second"] = case.batch / best
    elif best:
        metrics["gflops"] = case.shape.flops / best / 1e9
    floor = floor_seconds or {}
    for k, ratio in (("seconds", "ratio_to_floor"), ("seconds_min", "ratio_to_floor_min")):
        if k in result and floor.get(k):
            metrics[ratio] = result[k] / floor[k]
    for k, v in (result.get("check") or {}).items():
        metrics[f"check_{k}"] = v
    return [{**base, "metric": k, "value": v} for k, v in metrics.items()]


def _units(cases: Sequence[Case], rounds: Optional[int]) -> list[list[Case]]:
    """What runs in one process: each case alone, or (interleaved) the cases of one shape whose problems draw
    the same kind of inputs."""
    if not rounds:
        return [[c] for c in cases]
    units: dict[tuple, list[Case]] = {}
    for c in cases:
        kind = registry.PROBLEMS[c.problem].inputs
        units.setdefault((kind, c.batch, c.dim, c.classes, c.dtype, c.device), []).append(c)
    return list(units.values())


def _merge(results: Sequence[dict]) -> dict:
    """One case's results from several processes: samples pooled, the lowest memory, the first failure."""
    bad = next((r for r in results if r.get("status") != "ok"), None)
    if bad is not None:
        return bad
    out = dict(results[0])
    samples = [s for r in results for s in r.get("samples", [])]
    if samples:
        out.update(samples=samples, seconds=statistics.median(samples), seconds_min=min(samples))
    if all(r.get("extra_peak_bytes") is not None for r in results):
        out["extra_peak_bytes"] = min(r["extra_peak_bytes"] for r in results)
    return out


def run(cases: Iterable[Case], *, preset: str, timeout: float = 900.0, progress: bool = True,
        deadline: Optional[float] = None, env: Optional[dict] = None, output: Optional[Path] = None,
        rounds: Optional[int] = None, busy: bool = False, against: Optional[str] = None,
        processes: int = 3, **extra) -> list[dict]:
    """Run ``cases`` (each floor before the cases of its shape), return their records.

    ``rounds``: time interleaved, ``rounds`` rounds per problem and shape (module
    docstring); ``busy``: with one busy process beside the cases. ``against``: a git
    revision; marginops' cases also run on its ``marginops`` (recorded as
    ``IMPL@SHA``), fresh processes of the two trees alternating ``processes`` times
    per case, samples pooled. ``deadline``
    (``time.monotonic()``): cases not started by then are recorded as ``skipped``.
    ``output``: the records so far are written there after every case (a long run
    that is stopped keeps what it measured). ``extra`` goes into every record.
    """
    cases = list(cases)
    if rounds:
        extra.update(rounds=rounds)
    if busy:
        extra.update(busy=True)
    machine, date = machine_info(), now()
    floors: dict[tuple, dict] = {}
    records = []
    with contextlib.ExitStack() as stack:
        trees: dict[str, Optional[Path]] = {"": None}  # short sha -> folder ("": this tree)
        if against is not None:
            folder, sha = stack.enter_context(other_tree(against))
            trees[sha] = folder
        if busy:
            hog = busy_process()
            stack.callback(lambda: (hog.kill(), hog.wait()))
        bar = tqdm(_units(cases, rounds), desc=preset, unit="case", disable=not progress, file=sys.stderr)
        for unit in bar:
            bar.set_postfix_str(f"{', '.join(c.impl for c in unit)} {unit[0].shape}")
            if deadline is not None and time.monotonic() > deadline:
                late = {"status": "skipped", "error": "the time budget ran out before it started"}
                runs = {sha: [[late] * len(unit)] for sha in trees}
            else:
                runs = {sha: [] for sha in trees}
                for _ in range(processes if against is not None else 1):
                    for sha, folder in trees.items():  # the trees' processes alternating
                        runs[sha].append(run_unit(unit, rounds, timeout, env, folder))
            keys = [(c.batch, c.dim, c.classes, c.dtype, c.device) for c in unit]
            for sha, per_process in runs.items():
                results = [_merge(r) for r in zip(*per_process)]
                if not sha:
                    floors.update((k, r) for k, c, r in zip(keys, unit, results)
                                  if c.impl == "floor" and r.get("seconds"))
                for key, case, result in zip(keys, unit, results):
                    if not sha or case.impl in registry.OURS:  # the other revision's floor and peers: the same code
                        records += records_of(case, result, floor_seconds=floors.get(key), preset=preset,
                                              machine=machine, date=date, **extra, **({"tree": sha} if sha else {}))
            if output is not None:
                write_records(output, records)
    return records


def write_records(path: Path, records: Sequence[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")  # one record per line
    return path


def load_records(paths: Iterable[Path]) -> list[dict]:
    """Every record of the given JSON files (files that hold something else are passed over)."""
    out = []
    for p in sorted(paths):
        data = json.loads(Path(p).read_text())
        if isinstance(data, list) and all(isinstance(r, dict) and "metric" in r for r in data):
            out += data
    return out


if __name__ == "__main__":
    sys.exit(main())
