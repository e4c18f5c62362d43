"""The benchmark report: marginops against every peer, side by side, over sweeps of C (and B, D).

Run from the repository root::

    python -m benchmarks.report --quick          # small shapes, under 2 minutes
    python -m benchmarks.report                  # the CPU sweeps of the README (about an hour on 2 cores)
    python -m benchmarks.report --sweeps huge    # only some sweeps (see --help for their names)

Every (sweep, shape, implementation) case runs in a fresh subprocess
(``python -m benchmarks.memory ... --check --repeats N``, see
:mod:`benchmarks.memory`), which

1. checks the implementation's loss and gradients against the reference on
   a small problem of the same kind (a fast wrong answer is not a result;
   a case that disagrees is marked ``WRONG``),
2. measures the extra peak memory of one forward+backward at the full shape
   (peak RSS beyond the inputs and their gradients),
3. times N more runs and reports their median (runs during which other
   processes took > 10% of the CPU are rerun, up to 3 times).

The three-GEMM floor (``torch.mm``: logits, dX, dW) of each shape runs as a
case of the same report, and every time is also given as a ratio to it. A
case that fails, runs out of memory, is killed or times out is recorded
with that status; a case whose estimated memory (see :data:`BXC_TENSORS`)
exceeds 80% of the memory available now is not started and recorded as
``skipped`` with the estimate, so that the machine's OOM killer is never
the one to decide. Peers that are not installed, or need a GPU, are
recorded as ``skipped`` with the reason.

Outputs (``benchmarks/results/`` is gitignored; ``--output-dir`` to change):
``report.json`` (long-format records: implementation, case, metric, value,
params, machine, versions, date), ``report.md`` (the tables) and the plots
of :mod:`benchmarks.plot` (time and extra peak memory against C).

GPU sizes: this report is CPU-only for now (the only marginops backend is
``backend="torch"``); GPU benchmarking comes with the Triton backend.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from . import cases, harness
from .cases import Shape
from .memory import run_in_subprocess

MiB = 2**20
GiB = 2**30

#: B x C float32 tensors each implementation holds at its peak beyond the
#: inputs and their gradients, rounded up (used only to refuse cases that
#: cannot fit; the report measures the real figure): marginops keeps a
#: bounded workspace; the naive code the cosines, logits, softmax and its
#: gradient; pytorch-metric-learning adds a target mask and scaled copies.
BXC_TENSORS = {"floor": 1, "marginops": 0, "reference": 5, "linear_cross_entropy": 2, "torch_compile": 4,
               "pml": 8, "cce": 4, "liger": 1}
#: Fraction of the currently available memory a case may be estimated to need.
MEMORY_HEADROOM = 0.8


@dataclass(frozen=True)
class Sweep:
    """Shapes on which a problem is measured, for every implementation that computes it."""

    name: str
    problem: cases.Problem
    shapes: tuple[Shape, ...]
    repeats: int
    max_seconds: float  # per case, over its timed runs (at least one)
    description: str
    impls: Optional[tuple[str, ...]] = None  # default: all that compute the problem
    timeout: Optional[float] = None  # seconds per case, if longer than the default (--timeout overrides)

    def implementations(self) -> list[str]:
        impls = self.impls or cases.IMPLEMENTATIONS
        return [i for i in impls if i == "floor" or cases.unsupported(i, self.problem) is None]


def _cs(*cs: int, batch: int, dim: int) -> tuple[Shape, ...]:
    return tuple(Shape(batch, dim, c) for c in cs)


FULL = (
    Sweep("classes", cases.ORDINARY, _cs(10_000, 30_000, 100_000, 300_000, 1_000_000, batch=1024, dim=512),
          repeats=3, max_seconds=60.0, description="C sweep, ArcFace(0.5), s=30, B=1024, D=512"),
    Sweep("realistic", cases.REALISTIC, _cs(100_000, batch=1024, dim=512), repeats=3, max_seconds=60.0,
          description="realistic logits (trained-model cosines, s=64), B=1024, D=512"),
    Sweep("huge", cases.ORDINARY, _cs(10_000_000, batch=1024, dim=128), repeats=0, max_seconds=0.0,
          description="one training step at C=10M, D=128, B=1024", impls=("floor", "marginops", "reference"),
          timeout=1800.0),
    Sweep("classes-plain", cases.PLAIN, _cs(10_000, 100_000, 1_000_000, batch=1024, dim=512),
          repeats=3, max_seconds=60.0, description="C sweep, plain linear cross-entropy, B=1024, D=512"),
    Sweep("batch", cases.ORDINARY, tuple(Shape(b, 512, 100_000) for b in (256, 4096)), repeats=2,
          max_seconds=60.0, description="B sweep, ArcFace, D=512, C=100k (B=1024 is in 'classes')",
          impls=("floor", "marginops", "reference", "torch_compile", "pml")),
    Sweep("dim", cases.ORDINARY, tuple(Shape(1024, d, 100_000) for d in (128, 2048)), repeats=2,
          max_seconds=60.0, description="D sweep, ArcFace, B=1024, C=100k (D=512 is in 'classes')",
          impls=("floor", "marginops", "reference", "torch_compile", "pml")),
)

QUICK = (
    Sweep("classes", cases.ORDINARY, _cs(5_000, 20_000, batch=256, dim=128), repeats=3, max_seconds=5.0,
          description="C sweep, ArcFace(0.5), s=30, B=256, D=128 (quick)"),
    Sweep("classes-plain", cases.PLAIN, _cs(20_000, batch=256, dim=128), repeats=3, max_seconds=5.0,
          description="plain linear cross-entropy, B=256, D=128, C=20k (quick)"),
    Sweep("realistic", cases.REALISTIC, _cs(20_000, batch=256, dim=128), repeats=3, max_seconds=5.0,
          description="realistic logits (trained-model cosines, s=64), B=256, D=128 (quick)",
          impls=("floor", "marginops", "reference")),
)


def estimate_bytes(impl: str, shape: Shape) -> int:
    """Rough peak footprint of a case: inputs, gradients (and their stand-ins), B x C scratch, 1 GiB slack."""
    inputs = 4 * (shape.batch + shape.classes) * shape.dim
    return 3 * inputs + BXC_TENSORS[impl] * 4 * shape.batch * shape.classes + GiB


def available_bytes() -> int:
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# -- running -----------------------------------------------------------------------------------------


def run_case(sweep: Sweep, shape: Shape, impl: str, timeout: float) -> dict:
    """One case in a fresh subprocess, or the reason it was not run; always a dict with ``"status"``."""
    reason = None if impl == "floor" else cases.unavailable(impl)
    if reason is not None:
        return {"status": "skipped", "error": reason}
    need, avail = estimate_bytes(impl, shape), available_bytes()
    if need > MEMORY_HEADROOM * avail:
        return {"status": "skipped", "estimated_bytes": need,
                "error": f"needs ~{need / GiB:.0f} GiB, {avail / GiB:.0f} GiB available"}
    watch = harness.CpuContention()
    result = run_in_subprocess(impl, shape.batch, shape.dim, shape.classes, timeout=timeout,
                               problem=sweep.problem.name, check=impl != "floor", repeats=sweep.repeats,
                               max_seconds=sweep.max_seconds)
    load = watch.report()
    if load is not None and result.get("others_cpu_share") is None:
        result["others_cpu_share"] = load["others_share"]
    result["estimated_bytes"] = need
    if result["status"] == "ok" and result.get("check") is not None and not result["check"]["ok"]:
        result["status"] = "wrong"
        result["error"] = f"disagrees with the reference: {result['check']['text']}"
    return result


def underflow_records(sweep: Sweep, shape: Shape, machine: dict, date: str) -> list[dict]:
    """Fractions of subnormal / zero float32 probabilities on the case's inputs (problems that underflow)."""
    if sweep.problem.inputs not in ("sphere", "trained"):
        return []
    if estimate_bytes("marginops", shape) > MEMORY_HEADROOM * available_bytes():
        return []
    fractions = cases.probability_underflow(cases.make_inputs(shape, sweep.problem.inputs), sweep.problem)
    params = {"sweep": sweep.name, "problem": sweep.problem.name, "batch": shape.batch, "dim": shape.dim,
              "classes": shape.classes, "dtype": "float32"}
    return [harness.make_record("inputs", sweep.name, f"{kind}_probability_fraction", value, machine=machine,
                                date=date, **params) for kind, value in fractions.items()]


def records_of(sweep: Sweep, shape: Shape, impl: str, r: dict, floor: Optional[dict], reference: Optional[dict],
               machine: dict, date: str) -> list[dict]:
    """The long-format records of one case."""
    params = {"sweep": sweep.name, "problem": sweep.problem.name, "batch": shape.batch, "dim": shape.dim,
              "classes": shape.classes, "dtype": "float32", "reduction": "mean",
              "error": r.get("error"), "estimated_bytes": r.get("estimated_bytes"),
              "others_cpu_share": r.get("others_cpu_share"), "samples": r.get("samples"),
              "rejected_runs": r.get("rejected_runs"), "check": r.get("check")}
    rec = lambda metric, value: harness.make_record(impl, sweep.name, metric, value, machine=machine, date=date,
                                                    **params)
    out = [rec("status", r["status"])]
    if r["status"] not in ("ok", "wrong"):
        return out
    sec = r["seconds"]
    out.append(rec("seconds", sec))
    out.append(rec("first_seconds", r["first_seconds"]))
    out.append(rec("extra_peak_bytes", r["extra_peak_bytes"]))
    out.append(rec("gflops", shape.flops / sec / 1e9))
    if floor is not None and floor["status"] == "ok":
        out.append(rec("ratio_to_floor", sec / floor["seconds"]))
    if r.get("loss") is not None:
        out.append(rec("loss", r["loss"]))
        if reference is not None and reference["status"] == "ok" and impl != "reference":
            ref_loss = reference["loss"]
            out.append(rec("loss_rel_err_vs_reference", abs(r["loss"] - ref_loss) / max(1.0, abs(ref_loss))))
    return out


# -- tables ------------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _fmt_c(c: int) -> str:
    return f"{c // 1_000_000}M" if c % 1_000_000 == 0 else (f"{c // 1000}k" if c % 1000 == 0 else str(c))


def markdown(records: Sequence[dict]) -> str:
    """The report's tables, one per sweep, from its records."""
    by_case: dict[tuple, dict[str, object]] = {}
    order: list[tuple] = []
    for r in records:
        p = r["params"]
        if "sweep" not in p or r["implementation"] == "inputs":
            continue
        key = (p["sweep"], p["batch"], p["dim"], p["classes"], r["implementation"])
        if key not in by_case:
            by_case[key] = {"params": p}
            order.append(key)
        by_case[key][r["metric"]] = r["value"]
    out = []
    sweeps = list(dict.fromkeys(k[0] for k in order))
    for name in sweeps:
        rows = []
        for key in (k for k in order if k[0] == name):
            m = by_case[key]
            p = m["params"]
            status = m.get("status")
            if status in ("ok", "wrong"):
                sec = m["seconds"]
                time_txt = f"{sec:.3f}"
                ratio = f"{m['ratio_to_floor']:.2f}" if "ratio_to_floor" in m else "-"
                mem = f"{m['extra_peak_bytes'] / MiB:,.0f}"
                check = "OK" if status == "ok" else "**WRONG**"
                if p.get("check") is None:
                    check = "-"
                note = "" if status == "ok" else p["error"]
            else:
                time_txt = ratio = mem = check = "-"
                note = f"**{status}**: {p.get('error') or ''}"
            others = p.get("others_cpu_share")
            rows.append([f"{p['batch']}", f"{p['dim']}", _fmt_c(p["classes"]), cases.IMPL_LABELS[key[4]],
                         time_txt, ratio, mem, check, "-" if others is None else f"{others:.0%}", note])
        out.append(f"### {name}")
        out.append("")
        for r in records:
            p = r["params"]
            if r["implementation"] == "inputs" and p.get("sweep") == name and r["metric"].startswith("subnormal"):
                zero = next(z["value"] for z in records if z["implementation"] == "inputs"
                            and z["params"] == p and z["metric"].startswith("zero"))
                out.append(f"Inputs at B={p['batch']}, D={p['dim']}, C={p['classes']:,}: {r['value']:.1%} of the "
                           f"float32 probabilities are subnormal, {zero:.1%} exactly 0.")
                out.append("")
        out.append(_table(["B", "D", "C", "implementation", "fwd+bwd s", "x floor", "extra peak MiB", "check",
                           "others' CPU", "note"], rows))
        out.append("")
    return "\n".join(out)


def headline(records: Sequence[dict], sweep: str) -> str:
    """One sweep as a pivot table: implementations down, C across; cells "seconds (x floor), extra MiB"."""
    cases_ = {k: v for k, v in _by_case(records).items() if k[0] == sweep}
    cs = sorted({k[3] for k in cases_})
    impls = list(dict.fromkeys(k[4] for k in cases_))
    rows = []
    for impl in impls:
        row = [cases.IMPL_LABELS[impl]]
        for c in cs:
            m = next((v for k, v in cases_.items() if k[3] == c and k[4] == impl), None)
            if m is None:
                row.append("")
            elif m.get("status") in ("ok", "wrong"):
                ratio = f" ({m['ratio_to_floor']:.2f}x)" if "ratio_to_floor" in m else ""
                mem = "" if impl == "floor" else f", {m['extra_peak_bytes'] / MiB:,.0f} MiB"
                row.append(f"{m['seconds']:.2f} s{ratio}{mem}" + (" WRONG" if m["status"] == "wrong" else ""))
            else:
                row.append(m.get("status", "?"))
        rows.append(row)
    return _table(["implementation"] + [f"C={_fmt_c(c)}" for c in cs], rows)


#: The issue's acceptance point: marginops fwd+bwd faster than every peer that runs here.
ACCEPTANCE_SHAPE = Shape(1024, 512, 100_000)


def _by_case(records: Sequence[dict]) -> dict[tuple, dict]:
    """(sweep, B, D, C, implementation) -> {metric: value}."""
    out: dict[tuple, dict] = {}
    for r in records:
        p = r["params"]
        if "sweep" in p and r["implementation"] != "inputs":
            key = (p["sweep"], p["batch"], p["dim"], p["classes"], r["implementation"])
            out.setdefault(key, {})[r["metric"]] = r["value"]
    return out


def acceptance(records: Sequence[dict]) -> list[str]:
    """The acceptance checks, as Markdown lines, on whatever the records hold.

    Time: at :data:`ACCEPTANCE_SHAPE`, per sweep, marginops against every
    other loss implementation that ran (status ok). Memory: at every shape,
    marginops' extra peak memory against every other loss implementation
    that ran. Cases that did not run are named, not counted as beaten.
    """
    cases_ = _by_case(records)
    lines = []
    shapes = sorted({k[:4] for k in cases_})
    for sweep, b, d, c in shapes:
        mo_ = cases_.get((sweep, b, d, c, "marginops"))
        if mo_ is None or mo_.get("status") != "ok":
            if mo_ is not None:
                lines.append(f"- {sweep} B={b} D={d} C={c:,}: marginops did not run ({mo_.get('status')}).")
            continue
        others = {k[4]: v for k, v in cases_.items() if k[:4] == (sweep, b, d, c) and k[4] not in ("marginops", "floor")}
        ran = {i: v for i, v in others.items() if v.get("status") == "ok"}
        missing = [f"{cases.IMPL_LABELS[i]} ({v.get('status')})" for i, v in others.items() if i not in ran]
        slower = [cases.IMPL_LABELS[i] for i, v in ran.items() if v["seconds"] <= mo_["seconds"]]
        more_mem = [cases.IMPL_LABELS[i] for i, v in ran.items() if v["extra_peak_bytes"] <= mo_["extra_peak_bytes"]]
        tail = f"; did not run: {', '.join(missing)}" if missing else ""
        if (b, d, c) == (ACCEPTANCE_SHAPE.batch, ACCEPTANCE_SHAPE.dim, ACCEPTANCE_SHAPE.classes):
            verdict = "met" if not slower else f"NOT met: {', '.join(slower)} as fast or faster"
            lines.append(f"- time, {sweep} B={b} D={d} C={c:,}: marginops {mo_['seconds']:.3f} s vs "
                         + ", ".join(f"{cases.IMPL_LABELS[i]} {v['seconds']:.3f} s" for i, v in ran.items())
                         + f": {verdict}{tail}.")
        verdict = "lowest" if not more_mem else f"NOT lowest: {', '.join(more_mem)} at or below"
        lines.append(f"- memory, {sweep} B={b} D={d} C={c:,}: marginops {mo_['extra_peak_bytes'] / MiB:,.0f} MiB vs "
                     + (", ".join(f"{cases.IMPL_LABELS[i]} {v['extra_peak_bytes'] / MiB:,.0f} MiB"
                                  for i, v in ran.items()) or "nothing else ran")
                     + f": {verdict}{tail}.")
    return lines


def write_outputs(records: Sequence[dict], output_dir: Path, json_path: Path, *, plot: bool = True) -> None:
    """``report.md`` (printed too) and, with ``plot``, the plots, from the records of one report."""
    machine = records[0]["machine"]
    date = records[0]["date"]
    mode = records[0]["params"].get("mode", "?")
    lines = [f"# marginops benchmark report ({mode}, {date})", "",
             f"Machine: {harness.describe_machine(machine)}.", ""]
    for load in (r for r in records if r["implementation"] == "machine" and r["case"] == "report"):
        lines += [f"Over the whole run ({load['params']['wall_s']:.0f} s, {load['date']}) other processes used "
                  f"{load['value']:.0%} of the machine's CPU (hypervisor steal {load['params']['steal_share']:.0%}); "
                  f"the 'others' CPU' column is that share during each case's timed runs.", ""]
    sweeps = {s.name: s for s in FULL + QUICK if (mode == "quick") == (s in QUICK)}
    for name in dict.fromkeys(r["params"]["sweep"] for r in records if "sweep" in r["params"]):
        if name in sweeps:
            s = sweeps[name]
            lines.append(f"- **{name}**: {s.description}; {s.problem.description}.")
    for name in ("classes", "classes-plain"):
        if any(r["params"].get("sweep") == name for r in records):
            lines += ["", f"Headline, sweep {name}: fwd+bwd seconds (x floor), extra peak memory", "",
                      headline(records, name)]
    lines += ["", markdown(records), "## Acceptance", ""] + acceptance(records) + [""]
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    md_path = Path(output_dir) / "report.md"
    md_path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"{len(records)} records; tables: {md_path}")
    if plot:
        from . import plot as plotting

        for path in plotting.plot_report(json_path, output_dir):
            print(f"plot: {path}")


# -- main --------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, under 2 minutes")
    parser.add_argument("--sweeps", nargs="+", default=None, metavar="NAME",
                        help=f"run only these sweeps (full: {', '.join(s.name for s in FULL)})")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per case before it is killed (default: 600, 1800 for 'huge'; quick: 60)")
    parser.add_argument("--output-dir", type=Path, default=harness.RESULTS_DIR,
                        help="where report.json, report.md and the plots go (default: %(default)s)")
    parser.add_argument("--no-plot", action="store_true", help="records and tables only")
    parser.add_argument("--render", type=Path, nargs="+", default=None, metavar="JSON",
                        help="measure nothing: rebuild report.md and the plots from these report.json files "
                             "(several: merged, in order, into OUTPUT_DIR/report.json)")
    args = parser.parse_args(argv)
    if args.render is not None:
        records = [r for path in args.render for r in json.loads(path.read_text())]
        json_path = args.render[0]
        if len(args.render) > 1:
            json_path = harness.write_records(args.output_dir / "report.json", records)
        write_outputs(records, args.output_dir, json_path, plot=not args.no_plot)
        return 0
    sweeps = QUICK if args.quick else FULL
    if args.sweeps:
        unknown = set(args.sweeps) - {s.name for s in sweeps}
        if unknown:
            parser.error(f"unknown sweep(s) {sorted(unknown)}; choose from {[s.name for s in sweeps]}")
        sweeps = tuple(s for s in sweeps if s.name in args.sweeps)
    default_timeout = 60.0 if args.quick else 600.0

    from tqdm import tqdm

    machine = harness.machine_info()
    date = harness.now_iso()
    mode = "quick" if args.quick else "full"
    jobs = [(s, shape, impl) for s in sweeps for shape in s.shapes for impl in s.implementations()]
    records: list[dict] = []
    whole = harness.CpuContention()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.output_dir / "report.json"
    bar = tqdm(jobs, unit="case", file=sys.stderr, dynamic_ncols=True)
    results: dict[tuple, dict] = {}
    for sweep, shape, impl in bar:
        bar.set_description(f"{sweep.name} C={_fmt_c(shape.classes)} B={shape.batch} D={shape.dim} {impl}")
        timeout = args.timeout or max(default_timeout, sweep.timeout or 0.0)
        r = run_case(sweep, shape, impl, timeout)
        results[(sweep.name, shape, impl)] = r
        if r["status"] != "ok":
            bar.write(f"{sweep.name} {shape} {impl}: {r['status']}: {r.get('error')}")
        floor = results.get((sweep.name, shape, "floor"))
        ref = results.get((sweep.name, shape, "reference"))
        records += records_of(sweep, shape, impl, r, floor, ref, machine, date)
        if impl == sweep.implementations()[-1]:
            records += underflow_records(sweep, shape, machine, date)
        for rec in records:
            rec["params"]["mode"] = mode
        harness.write_records(json_path, records)  # after every case: an interrupted run keeps its results
    bar.close()
    load = whole.report()
    if load is not None:
        records.append(harness.make_record("machine", "report", "others_cpu_share", load["others_share"],
                                           machine=machine, date=date, wall_s=load["wall_s"],
                                           steal_share=load["steal_share"]))
    for r in records:
        r["params"]["mode"] = mode
    harness.write_records(json_path, records)
    write_outputs(records, args.output_dir, json_path, plot=not args.no_plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
