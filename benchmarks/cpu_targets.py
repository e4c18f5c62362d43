"""The foundation issue's CPU float32 targets, every ratio measured in this one run.

Run from the repository root::

    python -m benchmarks.cpu_targets           # B=1024, D=512, C=100k; memory at C=1M (several minutes)
    python -m benchmarks.cpu_targets --quick   # small shapes, under a minute

Prints the machine, the input checks and two Markdown tables (time, extra
peak memory) with each target's PASS/FAIL, and writes the results as
long-format JSON records to ``benchmarks/results/cpu_targets.json``
(gitignored; ``--output`` to change).

How it measures:

* Every case of :data:`benchmarks.cases.CASES` runs on the same shape. The
  floor is the three GEMMs of that shape (``6 B D C`` FLOPs) with
  ``torch.mm``, timed in this process.
* Each case runs once untimed first (the warm-up). That run's loss and
  gradients are compared with the reference backend's on identical inputs:
  a case that disagrees is reported as WRONG and fails its targets.
* Then the cases are timed round-robin, ``--repeats`` rounds (3 full, 7
  quick), gradients freed (untimed) before every run; each case reports the
  median of its runs. Interleaving keeps ratios fair if the machine's load
  drifts. On a shared machine a competing job skews everything (two busy
  threads on two cores can slow a step 10x), so a run during which other
  processes took more than 10% of the CPU is rerun (up to 3 times), and
  the CPU share others took over the whole timing is printed.
* Memory: one fresh subprocess per row (:mod:`benchmarks.memory`), the
  peak RSS after one forward+backward minus the footprint with the inputs
  and gradient-sized buffers allocated.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from . import cases, harness
from .cases import Case, Shape
from .memory import measure_in_subprocess

MiB = 2**20
_CASES_BY_NAME = {c.name: c for c in cases.CASES}


@dataclass(frozen=True)
class Config:
    """Shapes and repeats of one mode (:data:`FULL` or :data:`QUICK`)."""

    time_shape: Shape
    memory_shape: Shape
    repeats: int
    max_seconds: float  # per case, over all timed runs (slow cases get fewer runs, at least one)


FULL = Config(Shape(1024, 512, 100_000), Shape(512, 256, 1_000_000), repeats=3, max_seconds=120.0)
QUICK = Config(Shape(256, 128, 20_000), Shape(512, 256, 100_000), repeats=7, max_seconds=10.0)


@dataclass(frozen=True)
class Target:
    """``time(case) / time(against) <= max_ratio`` (``<`` when ``strict``)."""

    case: str
    against: str  # "floor" or a case name
    max_ratio: float
    text: str
    strict: bool = False

    def passed(self, ratio: float) -> bool:
        return ratio < self.max_ratio if self.strict else ratio <= self.max_ratio


#: Which case each loss case is compared with in the "x baseline" column.
BASELINES = {
    "ordinary/marginops/mean": "ordinary/reference/mean",
    "ordinary/marginops/none": "ordinary/reference/mean",
    "underflow/marginops/mean": "underflow/reference/mean",
    "plain/marginops/mean": "plain/linear_cross_entropy/mean",
    "plain/linear_cross_entropy/mean": "plain/reference/mean",
}

TIME_TARGETS = (
    Target("ordinary/marginops/mean", "floor", 1.20, "<= 1.20x floor"),
    Target("ordinary/marginops/mean", "ordinary/reference/mean", 0.80, "<= 0.80x reference"),
    Target("ordinary/marginops/none", "floor", 1.45, "<= 1.45x floor"),
    Target("underflow/marginops/mean", "underflow/reference/mean", 0.20, ">= 5x faster than reference"),
    Target("plain/marginops/mean", "plain/linear_cross_entropy/mean", 1.00, "faster than F.linear_cross_entropy",
           strict=True),
)


@dataclass(frozen=True)
class MemoryRow:
    """One extra-peak-memory measurement: keyword arguments of :func:`measure_in_subprocess`."""

    case: str  # record case name
    label: str
    impl: str
    memory_budget: Optional[int] = None
    target_bytes: Optional[int] = None


MEMORY_TARGET_BYTES = 64 * MiB
MEMORY_ROWS = (
    MemoryRow("memory", "reference", "reference"),
    MemoryRow("memory", "marginops (default memory_budget)", "marginops", None, MEMORY_TARGET_BYTES),
    MemoryRow("memory-budget-32MiB", "marginops (memory_budget=32 MiB)", "marginops", 32 * MiB,
              MEMORY_TARGET_BYTES),
)


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _log(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# -- time --------------------------------------------------------------------------------------------


def run_time_cases(cfg: Config, date: str, machine: dict) -> tuple[list[str], list[dict]]:
    """Check, time and tabulate every case of :data:`cases.CASES`; returns (report lines, records)."""
    shape = cfg.time_shape
    out: list[str] = []
    records: list[dict] = []
    inputs = {name: cases.make_inputs(shape, p.inputs) for name, p in cases.PROBLEMS.items()}

    under = cases.probability_underflow(inputs["underflow"], cases.UNDERFLOW)
    probe = harness.subnormal_penalty(shape.batch, shape.classes // 4, shape.dim)
    out.append(f"Underflow case: {cases.UNDERFLOW.description}. Measured on its inputs: "
               f"{under['subnormal']:.1%} of the float32 probabilities p_ij are subnormal, "
               f"{under['zero']:.1%} are exactly 0.")
    out.append(f"Subnormal penalty of this CPU: a ({shape.batch} x {shape.classes // 4}) @ "
               f"({shape.classes // 4} x {shape.dim}) GEMM whose left operand is 25% subnormal takes "
               f"{probe['gemm']:.2f}x the time of a normal one; exp() into the subnormal range "
               f"{probe['exp']:.2f}x.")
    for metric, value in (("subnormal_fraction", under["subnormal"]), ("zero_fraction", under["zero"])):
        records.append(harness.make_record("inputs", "underflow", metric, value, machine=machine, date=date,
                                           **_shape_params(shape)))
    for metric, value in (("subnormal_gemm_slowdown", probe["gemm"]), ("subnormal_exp_slowdown", probe["exp"])):
        records.append(harness.make_record("machine", "subnormal-probe", metric, value, machine=machine,
                                           date=date, **_shape_params(shape)))

    # Warm-up run of every case, checked against the reference on the same inputs.
    refs: dict[tuple[str, str], harness.StepOutputs] = {}
    agreements: dict[str, harness.Agreement] = {}
    steps = {}
    check_lines = []
    for case in cases.CASES:
        inp = inputs[case.problem.name]
        step = cases.step_fn(case, inp)
        _log(f"warm-up {case.name}")
        _, result = harness.run_timed(step, inp.clear_grads)
        if case.impl != "floor":
            ours = harness.StepOutputs.capture(result, inp.x, inp.W)
            key = (case.problem.name, case.reduction)
            if case.impl == "reference":
                refs[key] = ours
            else:
                if key not in refs:  # e.g. reduction="none": the reference once, untimed
                    _log(f"reference {key} for the check")
                    inp.clear_grads()
                    loss = cases.forward_backward("reference", inp, case.problem, case.reduction)
                    refs[key] = harness.StepOutputs.capture(loss, inp.x, inp.W)
                agreements[case.name] = harness.agreement(ours, refs[key])
                check_lines.append(f"- {case.name} vs reference: {agreements[case.name]}")
            del ours
        inp.clear_grads()
        steps[case.name] = (step, inp.clear_grads)
    refs.clear()
    gc.collect()
    out.append("")
    out.append("Checks (warm-up run vs the reference backend, same float32 inputs; loss: max relative error, "
               "gradients: relative Frobenius error):")
    out.extend(check_lines)

    contention = harness.CpuContention()
    timings = harness.time_interleaved(steps, repeats=cfg.repeats, max_seconds=cfg.max_seconds, progress=_log)
    load = contention.report()

    floor = timings["floor"].median
    rows = []
    for case in cases.CASES:
        t = timings[case.name]
        sec = t.median
        wrong = case.name in agreements and not agreements[case.name].ok
        base_name = BASELINES.get(case.name)
        base_txt = "-"
        if base_name is not None:
            base_ratio = sec / timings[base_name].median
            base_txt = f"{base_ratio:.2f}x {_CASES_BY_NAME[base_name].impl_label}"
            records.append(harness.make_record(
                case.impl, _record_case(case), "ratio_to_baseline", base_ratio, machine=machine, date=date,
                baseline=base_name, **_case_params(case), **_shape_params(shape),
            ))
        targets = [tg for tg in TIME_TARGETS if tg.case == case.name]
        results = []
        for tg in targets:
            ratio = sec / (floor if tg.against == "floor" else timings[tg.against].median)
            ok = tg.passed(ratio) and not wrong
            results.append("PASS" if ok else ("FAIL (wrong result)" if wrong else "FAIL"))
            records.append(harness.make_record(
                case.impl, _record_case(case), "target", ratio, machine=machine, date=date,
                target=tg.text, against=tg.against, max_ratio=tg.max_ratio, passed=ok, **_shape_params(shape),
            ))
        rows.append([
            case.problem.name if case.impl != "floor" else "-",
            case.label,
            f"{sec:.3f}" + (f" (n={len(t.samples)})" if len(t.samples) != cfg.repeats else ""),
            f"{shape.flops / sec / 1e9:.0f}",
            f"{sec / floor:.2f}",
            base_txt,
            "; ".join(tg.text for tg in targets) or "-",
            "; ".join(results) or "-",
        ])
        for metric, value in (("seconds", sec), ("ratio_to_floor", sec / floor),
                              ("gflops", shape.flops / sec / 1e9)):
            records.append(harness.make_record(
                case.impl, _record_case(case), metric, value, machine=machine, date=date,
                samples=t.samples, rejected_runs=t.rejected, **_case_params(case), **_shape_params(shape),
            ))
    out.append("")
    out.append(f"Time: {shape}, float32, forward+backward; median of {cfg.repeats} interleaved runs after one "
               f"warm-up (GFLOP/s counts the floor's 6*B*D*C = {shape.flops / 1e9:.1f} GFLOP).")
    out.append("")
    out.append(_table(["problem", "implementation", "seconds", "GFLOP/s", "x floor", "x baseline", "target",
                       "result"], rows))
    if load is not None:
        out.append("")
        out.append(f"While timing ({load['wall_s']:.0f} s): other processes used {load['others_share']:.0%} of "
                   f"the machine's CPU time, hypervisor steal {load['steal_share']:.0%}."
                   + (" The machine was shared: compare ratios with care." if load["others_share"] > 0.05 else ""))
        records.append(harness.make_record("machine", "timing", "others_cpu_share", load["others_share"],
                                           machine=machine, date=date))
    rejected = {n: t.rejected for n, t in timings.items() if t.rejected}
    if rejected:
        out.append("Runs discarded and rerun because other processes took > 10% of the CPU meanwhile: "
                   + ", ".join(f"{n} {k}" for n, k in rejected.items()) + ".")
    noisy = [n for n, t in timings.items() if t.spread > 0.2]
    if noisy:
        out.append(f"Noisy (max-min > 20% of median): {', '.join(noisy)}.")
    return out, records


def _shape_params(shape: Shape) -> dict:
    return {"batch": shape.batch, "dim": shape.dim, "classes": shape.classes, "dtype": "float32"}


def _case_params(case: Case) -> dict:
    if case.impl == "floor":
        return {}
    p = case.problem
    return {"reduction": case.reduction, "margin": p.margin, "scale": p.scale, "normalize": p.normalize,
            "inputs": p.inputs}


def _record_case(case: Case) -> str:
    return "floor" if case.impl == "floor" else f"{case.problem.name}-{case.reduction}"


# -- memory ------------------------------------------------------------------------------------------


def run_memory_cases(cfg: Config, date: str, machine: dict) -> tuple[list[str], list[dict]]:
    """One fresh subprocess per :data:`MEMORY_ROWS` entry; returns (report lines, records)."""
    shape = cfg.memory_shape
    out: list[str] = []
    records: list[dict] = []
    results = []
    for row in MEMORY_ROWS:
        _log(f"memory: {row.label} at {shape} (subprocess)")
        watch = harness.CpuContention()
        results.append(measure_in_subprocess(row.impl, shape.batch, shape.dim, shape.classes,
                                             memory_budget=row.memory_budget))
        load = watch.report()
        results[-1]["others_cpu_share"] = load["others_share"] if load is not None else None
    ref = next(r for row, r in zip(MEMORY_ROWS, results) if row.impl == "reference")
    rows = []
    for row, r in zip(MEMORY_ROWS, results):
        extra = r["extra_peak_bytes"]
        loss_ok = abs(r["loss"] - ref["loss"]) <= 1e-4 * max(1.0, abs(ref["loss"]))
        passed = row.target_bytes is not None and extra <= row.target_bytes and loss_ok
        if row.target_bytes is None:
            verdict = "-"
        else:
            verdict = "PASS" if passed else ("FAIL (loss differs)" if not loss_ok else "FAIL")
        rows.append([
            row.label,
            f"{extra / MiB:,.1f}",
            f"{extra / ref['extra_peak_bytes']:.3f}" if ref["extra_peak_bytes"] > 0 else "-",
            f"{r['loss']:.6f}",
            f"{r['seconds']:.2f}" + (f" (others {r['others_cpu_share']:.0%})"
                                     if (r["others_cpu_share"] or 0) > 0.05 else ""),
            f"<= {row.target_bytes / MiB:.0f} MiB" if row.target_bytes is not None else "-",
            verdict,
        ])
        params = {k: r[k] for k in ("reduction", "memory_budget", "margin", "scale", "normalize", "inputs",
                                    "baseline_rss_bytes", "peak_rss_bytes", "rss_source", "inputs_bytes",
                                    "grads_bytes", "seconds", "others_cpu_share")}
        records.append(harness.make_record(row.impl, row.case, "extra_peak_bytes", extra, machine=machine,
                                           date=date, **params, **_shape_params(shape)))
        if row.target_bytes is not None:
            records.append(harness.make_record(row.impl, row.case, "target", extra, machine=machine, date=date,
                                               target=f"<= {row.target_bytes} bytes", passed=passed,
                                               **_shape_params(shape)))
    out.append(f"Extra peak memory: {shape}, float32, ArcFace(0.5), s=30, reduction=mean; one forward+backward "
               f"per fresh process; peak RSS (VmHWM, i.e. ru_maxrss) minus the footprint with inputs and "
               f"gradient-sized buffers allocated ({ref['baseline_rss_bytes'] / MiB:,.0f} MiB, of which inputs "
               f"{ref['inputs_bytes'] / MiB:,.0f} MiB and gradients {ref['grads_bytes'] / MiB:,.0f} MiB). "
               f"'step s' is that single run's time, not a benchmark (with the CPU share other processes "
               f"took meanwhile where above 5%).")
    out.append("")
    out.append(_table(["implementation", "extra peak MiB", "x reference", "loss", "step s (1 run)", "target",
                       "result"], rows))
    return out, records


# -- main --------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu_targets", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, under a minute")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default: 3, quick: 7)")
    parser.add_argument("--skip-memory", action="store_true", help="time only")
    parser.add_argument("--output", type=Path, default=harness.RESULTS_DIR / "cpu_targets.json",
                        help="JSON records file (default: %(default)s)")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    if args.repeats is not None:
        if args.repeats < 1:
            parser.error("--repeats must be >= 1")
        cfg = Config(cfg.time_shape, cfg.memory_shape, args.repeats, cfg.max_seconds)

    machine = harness.machine_info()
    date = harness.now_iso()
    mode = "quick" if args.quick else "full"
    _say(f"# marginops CPU targets ({mode} mode, {date})")
    _say("")
    if args.quick:
        _say("Quick mode: the targets are set for B=1024, D=512, C=100k (memory: C=1M); at these small "
             "shapes fixed per-tile costs weigh more, so a FAIL here says little. Run without --quick to check them.")
        _say("")
    _say(f"Machine: {harness.describe_machine(machine)}; load average before: "
         f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}.")
    _say("")
    lines, records = run_time_cases(cfg, date, machine)
    for line in lines:
        _say(line)
    if not args.skip_memory:
        _say("")
        mem_lines, mem_records = run_memory_cases(cfg, date, machine)
        for line in mem_lines:
            _say(line)
        records += mem_records
    for r in records:
        r["params"]["mode"] = mode
    path = harness.write_records(args.output, records)
    _say("")
    _say(f"{len(records)} records written to {path}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
