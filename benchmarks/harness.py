"""Measurement tools shared by the benchmark entry points: timer, output checks, machine facts, records.

Nothing here knows about losses or implementations (that is
:mod:`benchmarks.cases`). Used by ``python -m benchmarks.cpu_targets`` and
``pytest benchmarks/ --benchmark-only``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# -- machine ---------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa() -> str:
    """The widest x86 vector extensions the CPU reports (``avx512f``, ``avx2``, ``amx_tile``), or ``""``."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return ""
    return ",".join(name for name in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if name in flags)


def machine_info() -> dict:
    """Facts every record carries: CPU, its vector ISA, cores, threads, versions."""
    return {
        "cpu": cpu_model(),
        "isa": cpu_isa(),
        "processor": platform.processor(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def describe_machine(info: dict) -> str:
    return (
        f"{info['cpu']} ({info.get('isa') or 'ISA unknown'}), {info['cores']} cores ({info['torch_threads']} torch threads), "
        f"torch {info['torch']}, Python {info['python']}"
    )


class CpuContention:
    """How much CPU other processes (and the hypervisor) took while we measured.

    Reads the machine-wide busy and steal time from ``/proc/stat`` and
    subtracts this process's own CPU time: on a shared machine a competing
    job slows every timing and skews ratios. Linux only; elsewhere reports
    nothing.
    """

    def __init__(self) -> None:
        self._start = self._snapshot()

    @staticmethod
    def _snapshot():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        user, nice, system, idle, iowait, irq, softirq = fields[:7]
        steal = fields[7] if len(fields) > 7 else 0
        ru = resource.getrusage(resource.RUSAGE_SELF)
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {
            "wall": time.perf_counter(),
            "busy": (user + nice + system + irq + softirq) / hz,
            "steal": steal / hz,
            "self": ru.ru_utime + ru.ru_stime + ch.ru_utime + ch.ru_stime,
        }

    def report(self) -> Optional[dict]:
        """``{"wall_s", "others_cpu_s", "others_share", "steal_share"}`` since construction."""
        end = self._snapshot()
        if self._start is None or end is None:
            return None
        wall = end["wall"] - self._start["wall"]
        capacity = wall * (os.cpu_count() or 1)
        others = max(0.0, (end["busy"] - self._start["busy"]) - (end["self"] - self._start["self"]))
        steal = end["steal"] - self._start["steal"]
        return {
            "wall_s": wall,
            "others_cpu_s": others,
            "others_share": others / capacity if capacity else 0.0,
            "steal_share": steal / capacity if capacity else 0.0,
        }


# -- timing ----------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Seconds of one step: the median of ``samples`` (the warm-up run is not among them)."""

    samples: list[float] = field(default_factory=list)
    rejected: int = 0  # runs discarded because other processes competed for the CPU

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def spread(self) -> float:
        """(max - min) / median of the samples: a noise indicator."""
        if len(self.samples) < 2:
            return 0.0
        return (max(self.samples) - min(self.samples)) / self.median


def run_timed(step: Callable[[], object], reset: Callable[[], None]) -> tuple[float, object]:
    """``reset()`` (untimed), then ``step()`` timed with ``time.perf_counter``."""
    reset()
    t0 = time.perf_counter()
    out = step()
    return time.perf_counter() - t0, out


def time_interleaved(steps: dict[str, tuple[Callable[[], object], Callable[[], None]]], *, repeats: int,
                     max_seconds: Optional[float] = None, contention_limit: Optional[float] = 0.10,
                     retries: int = 3, progress: Callable[[str], None] = lambda s: None) -> dict[str, Timing]:
    """Time several steps round-robin: every step's *k*-th run lies in round *k*.

    Each step must already be warmed up; ``reset`` runs untimed before each
    run. Interleaving spreads slow drift over all steps alike, so the ratios
    between them stay fair. A run during which other processes took more
    than ``contention_limit`` of the machine's CPU (see :class:`CpuContention`;
    short runs get two clock ticks of slack) is discarded and rerun, up to
    ``retries`` times, after which it is kept; the rule is the same for
    every step. A step whose runs would take longer than ``max_seconds`` in
    total is timed fewer times (at least once).
    """
    timings = {name: Timing() for name in steps}
    budget = {name: repeats for name in steps}
    tick = 1.0 / os.sysconf("SC_CLK_TCK")
    for k in range(repeats):
        for name, (step, reset) in steps.items():
            if k >= budget[name]:
                continue
            for attempt in range(retries + 1):
                watch = CpuContention()
                dt, _ = run_timed(step, reset)
                load = watch.report()
                reset()
                if (contention_limit is None or load is None or attempt == retries
                        or load["others_cpu_s"] <= max(contention_limit * load["wall_s"] * (os.cpu_count() or 1),
                                                       2 * tick)):
                    break
                timings[name].rejected += 1
            timings[name].samples.append(dt)
            if k == 0 and max_seconds is not None:
                budget[name] = max(1, min(repeats, int(max_seconds // max(dt, 1e-9))))
        progress(f"round {k + 1}/{repeats} done")
    return timings


def subnormal_penalty(rows: int, inner: int, cols: int, *, fraction: float = 0.25, seed: int = 0) -> dict:
    """How much slower this CPU runs float32 work on subnormal numbers (best of 3 runs each).

    ``"gemm"``: a ``(rows x inner) @ (inner x cols)`` product whose left operand
    has ``fraction`` of its entries subnormal, over the same product with
    normal entries. ``"exp"``: ``exp`` of a ``rows x inner`` tensor whose
    results are subnormal (``exp(-95)``) over one whose results are normal.
    Some CPUs take a microcode assist per subnormal (DESIGN.md section 4
    quotes 47x for such a GEMM); others run them at full speed.
    """
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(rows, inner, generator=gen).add_(0.5)
    b = torch.randn(inner, cols, generator=gen)
    sub = a.clone()
    sub[torch.rand(rows, inner, generator=gen) < fraction] = torch.finfo(torch.float32).tiny / 4
    e_normal = torch.full((rows, inner), -50.0)
    e_sub = torch.full((rows, inner), -95.0)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    return {
        "gemm": best(lambda: torch.mm(sub, b)) / best(lambda: torch.mm(a, b)),
        "exp": best(lambda: torch.exp(e_sub)) / best(lambda: torch.exp(e_normal)),
    }


# -- checking outputs ------------------------------------------------------------------------------


@dataclass
class StepOutputs:
    """What a step produced: the loss (scalar or per row) and the two input gradients."""

    loss: Tensor
    grad_x: Optional[Tensor]
    grad_w: Optional[Tensor]

    @classmethod
    def capture(cls, loss: Tensor, x: Tensor, W: Tensor) -> "StepOutputs":
        return cls(
            loss.detach().clone(),
            None if x.grad is None else x.grad.detach().clone(),
            None if W.grad is None else W.grad.detach().clone(),
        )


@dataclass
class Agreement:
    """Errors of one step's outputs against a baseline's on the same inputs."""

    loss_err: float  # max |a - b| / max(1, |b|) over loss entries
    grad_x_err: float  # ||a - b|| / ||b|| (Frobenius)
    grad_w_err: float
    loss_tol: float
    grad_tol: float

    @property
    def ok(self) -> bool:
        return (self.loss_err <= self.loss_tol and self.grad_x_err <= self.grad_tol
                and self.grad_w_err <= self.grad_tol)

    def __str__(self) -> str:
        return (f"loss {self.loss_err:.1e}, dX {self.grad_x_err:.1e}, dW {self.grad_w_err:.1e} "
                f"(tol {self.loss_tol:.0e} / {self.grad_tol:.0e}): {'OK' if self.ok else 'MISMATCH'}")


def _rel_norm(a: Optional[Tensor], b: Optional[Tensor]) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    a, b = a.double(), b.double()
    den = torch.linalg.vector_norm(b).item()
    return torch.linalg.vector_norm(a - b).item() / max(den, 1e-30)


def agreement(ours: StepOutputs, base: StepOutputs, *, loss_tol: float = 1e-4,
              grad_tol: float = 1e-3) -> Agreement:
    """Compare float32 outputs computed on identical inputs (loss relative per entry, grads in norm)."""
    a, b = ours.loss.double(), base.loss.double()
    if a.shape != b.shape:
        loss_err = float("inf")
    else:
        loss_err = ((a - b).abs() / b.abs().clamp_min(1.0)).max().item() if a.numel() else 0.0
    return Agreement(loss_err, _rel_norm(ours.grad_x, base.grad_x), _rel_norm(ours.grad_w, base.grad_w),
                     loss_tol, grad_tol)


# -- records ---------------------------------------------------------------------------------------


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def make_record(implementation: str, case: str, metric: str, value, *, machine: dict, date: str,
                **params) -> dict:
    """One long-format result record (what the plotter reads)."""
    return {
        "implementation": implementation,
        "case": case,
        "metric": metric,
        "value": value,
        "params": params,
        "machine": machine,
        "torch": machine.get("torch", torch.__version__),
        "date": date,
    }


def write_records(path: Path, records: Sequence[dict]) -> Path:
    """Write ``records`` as a JSON list (one run per file; the directory is created, and gitignored)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(list(records), f, indent=1)
        f.write("\n")
    return path
