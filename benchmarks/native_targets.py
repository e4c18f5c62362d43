"""The native CPU backend against the three-GEMM floor, the torch backend and compiled peers, interleaved.

Run from the repository root::

    python -m benchmarks.native_targets                      # every case, 5 rounds
    python -m benchmarks.native_targets --cases mean-512 --rounds 3
    python -m benchmarks.native_targets --contention         # also: one busy process sharing the cores

Each case builds its inputs once, runs every implementation once untimed (the
warm-up, which also compiles), then times them round-robin for ``--rounds``
rounds: an implementation's k-th run lies in round k, so drifting load hits
all of them alike. Reported per implementation: the median and the minimum
of its rounds, and both ratios to the floor (the three GEMMs of the shape,
``torch.mm``, in the same rounds). The CPU share other processes took during
each case is printed (``/proc/stat``): on a shared machine compare ratios,
not seconds. ``--memory`` measures extra peak RSS (VmHWM after one
forward+backward minus the footprint with inputs and gradient-sized buffers)
in one fresh process per implementation: ArcFace at B=512, D=256, C=1M
(torch and native backends), plain cross-entropy at B=1024, D=512, C=100k
(native, ``torch.compile`` of the naive code, Cut Cross-Entropy's
``torch_compile`` path when installed). ``--big C`` times one native step at
B=1024, D=128 and C classes against the floor's GEMM rate on a 100k-class
chunk. Results also go to ``--output`` as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import marginops as mo

CASES = {
    # name: (B, D, C, problem, reduction)
    "mean-512": (1024, 512, 100_000, "arcface", "mean"),
    "none-512": (1024, 512, 100_000, "arcface", "none"),
    "mean-128": (1024, 128, 100_000, "arcface", "mean"),
    "mean-b256": (256, 512, 100_000, "arcface", "mean"),
    "plain": (1024, 512, 100_000, "plain", "mean"),
}
TARGETS = {  # (case, implementation): ratio to the floor it must not exceed
    ("mean-512", "native"): 1.06,
    ("none-512", "native"): 1.38,
    ("mean-128", "native"): 1.12,
    ("mean-b256", "native"): 1.15,
}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        model = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        fam = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("cpu family"))
        mod = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model\t"))
        return f"{model} (family {fam} model {mod})"
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


class Contention:
    """CPU seconds other processes took (machine busy time minus ours), from ``/proc/stat``."""

    def __init__(self):
        self.start = self._snap()

    @staticmethod
    def _snap():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:8]]
        except OSError:
            return None
        ru, ch = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        busy = (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")
        return time.perf_counter(), busy, ru.ru_utime + ru.ru_stime + ch.ru_utime + ch.ru_stime

    def share(self) -> Optional[float]:
        end = self._snap()
        if end is None or self.start is None:
            return None
        wall = end[0] - self.start[0]
        others = max(0.0, (end[1] - self.start[1]) - (end[2] - self.start[2]))
        return others / (wall * (os.cpu_count() or 1))


def make_inputs(B: int, D: int, C: int, seed: int = 0, linear: bool = False):
    """Gaussian ``x``, ``W``, labels. ``linear``: ``W`` drawn like ``nn.Linear``'s (std ``1/sqrt(D)``, logits
    ~ N(0, 1)), as the benchmark registry's plain problem. Plain cross-entropy over raw Gaussian ``W`` has
    logits of std ``sqrt(D)`` (22 at D=512), most float32 probabilities subnormal, and code that does not
    flush them (the compiled peers) then runs its backward GEMMs on the CPU's slow path: 25-30x slower,
    which measures the inputs rather than the implementations."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g).requires_grad_()
    W = (torch.randn(C, D, generator=g) / (math.sqrt(D) if linear else 1.0)).requires_grad_()
    y = torch.randint(0, C, (B,), generator=g)
    return x, W, y


def clear(*ts):
    for t in ts:
        t.grad = None


def implementations(problem: str, reduction: str, x, W, y) -> dict[str, Callable[[], None]]:
    xd, Wd = x.detach(), W.detach()

    def floor():
        logits = torch.mm(xd, Wd.t())
        torch.mm(logits, Wd)
        torch.mm(logits.t(), xd)

    steps: dict[str, Callable[[], None]] = {"floor": floor}
    if problem == "arcface":
        margin, scale, normalize = mo.ArcFace(0.5), 64.0, True
    else:
        margin, scale, normalize = None, 1.0, False

    for backend in ("torch", "native"):
        def step(backend=backend):
            loss = mo.margin_cross_entropy(x, W, y, margin, scale, normalize=normalize, reduction=reduction,
                                           backend=backend)
            loss.sum().backward()
        steps[backend] = step

    if problem == "plain":
        naive = torch.compile(lambda x, W, y: F.cross_entropy(x @ W.t(), y))

        def compiled():
            naive(x, W, y).backward()
        steps["torch.compile(naive)"] = compiled
        try:
            from cut_cross_entropy import linear_cross_entropy as cce
        except ImportError:
            cce = None
        if cce is not None:
            def cce_step():
                cce(x, W, y, impl="torch_compile").backward()
            steps["cce(torch_compile)"] = cce_step
    return steps


def run_case(name: str, rounds: int, busy: bool) -> dict:
    B, D, C, problem, reduction = CASES[name]
    x, W, y = make_inputs(B, D, C, linear=problem == "plain")
    steps = implementations(problem, reduction, x, W, y)
    for label, step in steps.items():  # warm-up (and compile)
        try:
            step()
        except Exception as e:  # a peer that cannot run here (e.g. CCE without its kernels)
            print(f"  {label}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})", file=sys.stderr)
            steps = {k: v for k, v in steps.items() if k != label}
        clear(x, W)
    samples: dict[str, list[float]] = {k: [] for k in steps}
    load = Contention()
    for _ in range(rounds):
        for label, step in steps.items():
            clear(x, W)
            gc.collect()
            t0 = time.perf_counter()
            step()
            samples[label].append(time.perf_counter() - t0)
    clear(x, W)
    share = load.share()
    return {"case": name, "B": B, "D": D, "C": C, "problem": problem, "reduction": reduction, "busy": busy,
            "others_cpu_share": share, "samples": samples}


def report(result: dict) -> list[str]:
    s = result["samples"]
    fmed, fmin = statistics.median(s["floor"]), min(s["floor"])
    flops = 6 * result["B"] * result["D"] * result["C"]
    lines = [f"### {result['case']}: B={result['B']}, D={result['D']}, C={result['C']}, {result['problem']}, "
             f"reduction={result['reduction']}" + (" (with a busy process)" if result["busy"] else "")
             + f"; other processes took {result['others_cpu_share']:.0%} of the CPU",
             "", "| implementation | median s | min s | x floor (median) | x floor (min) | GFLOP/s (min) | target |",
             "|---|---|---|---|---|---|---|"]
    for label, v in s.items():
        med, mn = statistics.median(v), min(v)
        tgt = TARGETS.get((result["case"], label))
        verdict = "-" if tgt is None else f"<= {tgt}: {'met' if mn / fmin <= tgt else 'NOT met'} (min ratio)"
        lines.append(f"| {label} | {med:.3f} | {mn:.3f} | {med / fmed:.3f} | {mn / fmin:.3f} | "
                     f"{flops / mn / 1e9:.0f} | {verdict} |")
    peers = {k: min(v) for k, v in s.items() if k not in ("floor", "torch", "native")}
    if peers and "native" in s:  # the plain case's target: faster than every compiled peer
        best = min(peers, key=peers.get)
        ok = min(s["native"]) < peers[best]
        lines += ["", f"native {min(s['native']):.3f} s against the fastest peer, {best}, {peers[best]:.3f} s "
                      f"(minima): {'faster, met' if ok else 'NOT faster, not met'}"]
    return lines


def busy_process() -> subprocess.Popen:
    """One busy process: a single-threaded GEMM loop."""
    code = ("import torch; torch.set_num_threads(1); a=torch.randn(512,512)\n"
            "while True: a = torch.mm(a, a).mul_(1e-3)")
    return subprocess.Popen([sys.executable, "-c", code])


MEMORY_CODE = r"""
import gc, sys, torch, torch.nn.functional as F, marginops as mo
from benchmarks.native_targets import make_inputs
impl, problem, B, D, C = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
x, W, y = make_inputs(B, D, C, linear=problem == "plain")  # the timed cases' inputs
margin, scale, normalize = (mo.ArcFace(0.5), 64.0, True) if problem == "arcface" else (None, 1.0, False)
if impl in ("torch", "native"):
    loss_fn = lambda x, W, y: mo.margin_cross_entropy(x, W, y, margin, scale, normalize=normalize, backend=impl)
elif impl == "torch.compile(naive)":
    loss_fn = torch.compile(lambda x, W, y: F.cross_entropy(x @ W.t(), y))
else:
    from cut_cross_entropy import linear_cross_entropy
    loss_fn = lambda x, W, y: linear_cross_entropy(x, W, y, impl="torch_compile")
loss_fn(x, W, y).backward()  # warm-up: build, load, compile at the full shape
x.grad = W.grad = None
fake = [torch.ones_like(x), torch.ones_like(W)]  # stand-ins for the gradients, so they are not counted
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
base = hwm()
del fake; gc.collect()
loss = loss_fn(x, W, y)
loss.backward()
print(hwm() - base, float(loss))
"""


#: glibc settings for the memory processes: every allocation of 64 KiB or more gets its own mapping, returned
#: to the system when freed, so resident memory follows the live allocations. With glibc's defaults, memory
#: freed earlier (the warm-up's) stays resident and is reused unseen, and the same run measured anywhere
#: from 3 to 8 MiB. (Not for timing: a mapping per allocation slows the torch backend's many temporaries.)
EXACT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def memory(impl: str, problem: str, B: int, D: int, C: int) -> tuple[int, float]:
    """Extra peak RSS of one forward+backward beyond inputs and gradients, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", MEMORY_CODE, impl, problem, str(B), str(D), str(C)],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent,
                         env={**os.environ, **EXACT_MALLOC})
    extra, loss = out.stdout.split()[-2:]
    return int(extra), float(loss)


def big_step(B: int, D: int, C: int, chunk_classes: int = 100_000) -> dict:
    """One native fwd+bwd at C classes against the floor's GEMM rate on a chunk of the same B, D."""
    x, W, y = make_inputs(B, D, chunk_classes)
    xd, Wd = x.detach(), W.detach()
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        logits = torch.mm(xd, Wd.t())
        torch.mm(logits, Wd)
        torch.mm(logits.t(), xd)
        rates.append(6 * B * D * chunk_classes / (time.perf_counter() - t0) / 1e9)
    del x, W, logits
    x, W, y = make_inputs(B, D, C)
    load = Contention()
    t0 = time.perf_counter()
    mo.margin_cross_entropy(x, W, y, mo.ArcFace(0.5), 64.0, backend="native").backward()
    sec = time.perf_counter() - t0
    return {"case": "big", "B": B, "D": D, "C": C, "seconds": sec, "gflops": 6 * B * D * C / sec / 1e9,
            "floor_chunk_gflops": max(rates), "others_cpu_share": load.share()}


def header(machine: dict) -> str:
    return (f"# native backend targets: {machine['cpu']}, ISA {machine['isa']}, {machine['cpus']} CPUs, "
            f"{machine['threads']} torch threads, torch {machine['torch']}\n"
            f"native available: {machine['native']}, tile bytes {machine['tile_bytes']}")


def slowdown_line(results: list[dict]) -> str:
    """Slowdown of each implementation with a busy process, against the same case without one."""
    quiet = next((r for r in results if r["case"] == "mean-512" and not r["busy"]), None)
    busy = next((r for r in results if r["case"] == "mean-512" and r["busy"]), None)
    if quiet is None or busy is None:
        return "slowdown with a busy process: not measured (needs mean-512 and --contention)"

    def slow(label):
        return min(busy["samples"][label]) / min(quiet["samples"][label])
    return (f"slowdown with a busy process (min over rounds): floor {slow('floor'):.2f}x, native {slow('native'):.2f}x, "
            f"torch {slow('torch'):.2f}x; native / floor {slow('native') / slow('floor'):.2f} (target <= 1.2)")


def memory_line(r: dict) -> str:
    return (f"extra peak memory {r['case'].removeprefix('memory-')} B={r['B']} D={r['D']} C={r['C']} mean, "
            f"{r['impl']}: {r['extra_peak_bytes'] / 2**20:.1f} MiB median of "
            f"{', '.join(f'{b / 2**20:.1f}' for b in r['samples'])} (loss {r['loss']:.6f})")


def big_line(r: dict) -> str:
    return (f"one step B={r['B']} D={r['D']} C={r['C']}: {r['seconds']:.1f} s, {r['gflops']:.0f} GFLOP/s (6BDC) vs the "
            f"floor's GEMMs on a 100k-class chunk {r['floor_chunk_gflops']:.0f} GFLOP/s: "
            f"{r['gflops'] / r['floor_chunk_gflops']:.0%} (target >= 70%); other processes took "
            f"{r['others_cpu_share']:.0%} of the CPU")


def render(records: dict) -> str:
    """The whole report of a records file (``--output``), as the run printed it."""
    results = records["results"]
    parts = [header(records)]
    timed = [r for r in results if "samples" in r and isinstance(r["samples"], dict)]
    for r in timed:
        parts.append("\n".join(report(r)) + "\n")
    if any(r["busy"] for r in timed):
        parts.append(slowdown_line(timed) + "\n")
    parts += [memory_line(r) for r in results if r["case"].startswith("memory-")]
    parts += [big_line(r) for r in results if r["case"] == "big"]
    return "\n".join(parts) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.native_targets", description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--contention", action="store_true", help="rerun mean-512 with a busy process on the cores")
    p.add_argument("--memory", action="store_true",
                   help="extra peak memory: ArcFace B=512 D=256 C=1M (torch, native); plain C=100k (native and peers)")
    p.add_argument("--big", type=int, default=0, metavar="C",
                   help="one native step at B=1024, D=128 and C classes (e.g. 10000000) vs the floor's GEMM rate")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/native_targets.json"))
    p.add_argument("--render", type=Path, default=None, metavar="RECORDS",
                   help="print the report of a records file (e.g. benchmarks/results/native_targets/records.json) "
                        "and exit")
    args = p.parse_args(argv)
    if args.render is not None:
        print(render(json.loads(args.render.read_text())), end="")
        return 0
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    machine = {"cpu": cpu_name(), "isa": torch.backends.cpu.get_cpu_capability(), "cpus": os.cpu_count(),
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "native": mo.backends.native.available(), "tile_bytes": mo.backends.native.tile_bytes()}
    print(header(machine))
    results = []
    for name in args.cases:
        results.append(run_case(name, args.rounds, busy=False))
        print("\n".join(report(results[-1])) + "\n", flush=True)
    if args.contention:
        proc = busy_process()
        try:
            time.sleep(1.0)
            results.append(run_case("mean-512", args.rounds, busy=True))
        finally:
            proc.kill()
            proc.wait()
        print("\n".join(report(results[-1])) + "\n")
        print(slowdown_line(results) + "\n")
    if args.memory:
        rows = [(impl, "arcface", 512, 256, 1_000_000) for impl in ("torch", "native")]
        rows += [(impl, "plain", 1024, 512, 100_000) for impl in ("native", "torch.compile(naive)", "cce")]
        for impl, problem, B, D, C in rows:
            try:  # three fresh processes each: the median is reported, every figure recorded
                runs = [memory(impl, problem, B, D, C) for _ in range(3)]
            except subprocess.CalledProcessError as e:
                print(f"extra peak memory {problem} B={B} D={D} C={C}, {impl}: failed ({e.stderr.strip()[-200:]})")
                continue
            results.append({"case": f"memory-{problem}", "impl": impl, "B": B, "D": D, "C": C,
                            "extra_peak_bytes": statistics.median(r[0] for r in runs),
                            "samples": [r[0] for r in runs], "loss": runs[0][1]})
            print(memory_line(results[-1]), flush=True)
    if args.big:
        results.append(big_step(1024, 128, args.big))
        print(big_line(results[-1]))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({**machine, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
