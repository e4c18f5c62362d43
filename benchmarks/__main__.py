"""The one benchmark CLI; see ``python -m benchmarks --help`` and ``docs/benchmarks.md``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import presets, registry

#: Subcommands with their own argument parsers: name -> (module, one line).
TOOLS = {
    "distributed": ("distributed", "per-rank memory and step time of ShardedMarginHead at several world sizes"),
    "model": ("perf_model", "predicted GPU times of the Triton backend (a model, not a measurement)"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split(";")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="marginops against the naive head, in about a minute on a CPU")
    for name in ("batch", "dim", "classes"):
        d.add_argument(f"--{name}", type=int, default=None, help="default: the demo preset's")
    d.add_argument("--output", type=Path, default=None, help="also write the records here")
    r = sub.add_parser("run", help="run a preset; records to benchmarks/results/PRESET.json")
    r.add_argument("preset", choices=tuple(presets.PRESETS))
    r.add_argument("--impls", nargs="+", choices=tuple(registry.IMPLS), default=None,
                   help="only these implementations (the floor is always kept)")
    r.add_argument("--output", type=Path, default=None)
    r.add_argument("--timeout", type=float, default=900.0, help="seconds per case (default: 900)")
    r.add_argument("--rounds", type=int, default=None,
                   help="time interleaved, this many rounds per shape in one process (default: the preset's)")
    r.add_argument("--busy", action="store_true", help="with one busy process beside the cases")
    r.add_argument("--against", metavar="REV", default=None,
                   help="also run marginops' cases on the marginops of git revision REV, processes alternating")
    r.add_argument("--processes", type=int, default=3, help="with --against: processes per tree (default: 3)")
    rep = sub.add_parser("report", help="regenerate README/docs tables and plots from the committed records")
    rep.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page is out of date")
    rep.add_argument("--no-plots", action="store_true")
    g = sub.add_parser("gpu-check", help="GPU tests + the gpu preset in one short window (see gpu_check.py)")
    g.add_argument("--out", type=Path, required=True, help="directory for records, tests.txt, summary.md")
    g.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shape")
    g.add_argument("--install", action="store_true", help="first pip install --no-deps -e . (no registry)")
    g.add_argument("--budget", type=float, default=300.0, help="seconds until no new case starts (default: 300)")
    sub.add_parser("list", help="presets and implementations")
    for name, (_, text) in TOOLS.items():
        sub.add_parser(name, help=text, add_help=False)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOLS:
        import importlib

        return importlib.import_module(f"benchmarks.{TOOLS[argv[0]][0]}").main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from . import demo

        return demo.main(args.batch, args.dim, args.classes, args.output)
    if args.command == "run":
        from . import runner

        preset = presets.get(args.preset)
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
