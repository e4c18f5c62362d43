"""The one benchmark CLI; see ``python -m benchmarks --help`` and ``docs/benchmarks.md``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import presets, registry



def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split(";")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="marginops against the naive head, in about a minute on a CPU")
    r = sub.add_parser("run", help="run a preset; records to benchmarks/results/PRESET.json")
    rep = sub.add_parser("report", help="regenerate README/docs tables and plots from the committed records")
    g = sub.add_parser("gpu-check", help="GPU tests + the gpu preset in one short window (see gpu_check.py)")
    sub.add_parser("list", help="presets and implementations")
    dist = sub.add_parser("distributed", help="per-rank memory and step time of ShardedMarginHead at several "
                          "world sizes (CPU, gloo)")
    m = sub.add_parser("model", help="predicted GPU times of the Triton backend (a model, not a measurement)")
    for name, default in (("batch", 512), ("dim", 128), ("classes", 2_000_000)):
        d.add_argument(f"--{name}", type=int, default=None, help="default: the demo preset's")
        dist.add_argument(f"--{name}", type=int, default=default,
                          help="the global batch, split evenly over the ranks" if name == "batch" else None)
    dist.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    for parser, text in ((d, "also write the records here"), (r, "instead of benchmarks/results/PRESET.json"),
                         (dist, "instead of benchmarks/results/distributed.json")):
        parser.add_argument("--output", type=Path, default=None, help=text)
    r.add_argument("preset", choices=tuple(presets.PRESETS))
    r.add_argument("--impls", nargs="+", choices=tuple(registry.IMPLS), default=None,
                   help="only these implementations (the floor is always kept)")
    r.add_argument("--timeout", type=float, default=900.0, help="seconds per case (default: 900)")
    r.add_argument("--rounds", type=int, default=None,
                   help="time interleaved, this many rounds per shape in one process (default: the preset's)")
    r.add_argument("--busy", action="store_true", help="with one busy process beside the cases")
    r.add_argument("--against", metavar="REV", default=None,
                   help="also run marginops' cases on the marginops of git revision REV, processes alternating")
    r.add_argument("--processes", type=int, default=3, help="with --against: processes per tree (default: 3)")
    rep.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page is out of date")
    rep.add_argument("--no-plots", action="store_true")
    g.add_argument("--out", type=Path, required=True, help="directory for records, tests.txt, summary.md")
    g.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shape")
    g.add_argument("--install", action="store_true", help="first pip install --no-deps -e . (no registry)")
    g.add_argument("--budget", type=float, default=300.0, help="seconds until no new case starts (default: 300)")
    m.add_argument("--efficiency", type=float, help="Triton products' rate as a fraction of cuBLAS's (default: "
                   "perf_model.DESIGN_EFFICIENCY, 0.8)")
    m.add_argument("--bandwidth-tbs", type=float, help="streaming HBM TB/s (default: the H200's, 4)")
    m.add_argument("--cublas-tflops", type=float, help="16-bit cuBLAS rate (default: the H200's, 687)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from . import demo

        return demo.main(args.batch, args.dim, args.classes, args.output)
    if args.command == "run":
        from . import runner

        preset = presets.PRESETS[args.preset]
        cases = [c for c in preset.cases if args.impls is None or c.impl in args.impls or c.impl == "floor"]
        path = args.output or runner.RESULTS_DIR / f"{preset.name}.json"
        rounds = args.rounds if args.rounds is not None else preset.rounds
        if rounds is not None and rounds < 1:
            raise SystemExit(f"--rounds must be >= 1, got {rounds}")
        records = runner.run(cases, preset=preset.name, timeout=args.timeout, output=path, rounds=rounds,
                             busy=args.busy or preset.busy, against=args.against, processes=args.processes)
        from . import report

        print(report.blocks(records)[f"preset:{preset.name}"])
        print(f"\n{len(records)} records in {path}; `python -m benchmarks report` puts them into the docs")
        return 0
    if args.command == "report":
        from . import report

        if args.check:
            stale = report.stale_pages()
            for page in stale:
                print(f"{page} differs from what the records give: run python -m benchmarks report")
            return 1 if stale else 0
        for path in report.update(plots=not args.no_plots):
            print(f"wrote {path}")
        return 0
    if args.command == "gpu-check":
        from . import gpu_check

        return gpu_check.main(args.out, dry_run=args.dry_run, install=args.install, budget=args.budget)
    if args.command == "distributed":
        from . import distributed

        return distributed.main(args.batch, args.dim, args.classes, args.worlds, args.output)
    if args.command == "model":
        from . import perf_model

        return perf_model.main(args.efficiency, args.bandwidth_tbs, args.cublas_tflops)
    if args.command == "list":
        for p in presets.PRESETS.values():
            print(f"{p.name:10} {len(p.cases):3} cases  {p.description}")
        print()
        for i in registry.IMPLS.values():
            print(f"{i.name:20} {i.label}")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
