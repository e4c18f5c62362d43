"""Plots of a benchmark report: time and extra peak memory against C, log-log, one line per implementation.

Reads the records :mod:`benchmarks.report` wrote (it measures nothing)::

    python -m benchmarks.plot                                   # benchmarks/results/report.json
    python -m benchmarks.plot path/to/report.json --output-dir docs/img

Writes one PNG per sweep in which C varies (``report_<sweep>.png``): forward+
backward seconds on the left, extra peak memory on the right, the machine,
torch version and date in the caption. Cases that did not run (skipped,
out of memory, timed out, failed) are listed under the plot, not dropped.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

from . import cases, harness

MiB = 2**20
STYLE = {  # implementation: (colour, marker)
    "floor": ("0.5", ""),
    "marginops": ("tab:red", "o"),
    "reference": ("tab:blue", "s"),
    "torch_compile": ("tab:purple", "^"),
    "pml": ("tab:green", "D"),
    "linear_cross_entropy": ("tab:orange", "v"),
    "cce": ("tab:brown", "P"),
    "liger": ("tab:pink", "X"),
}


#: Extra peak memory below this is drawn at this value (the axis starts there).
MEMORY_FLOOR_MIB = 1.0


def _fmt_count(v: float) -> str:
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if v >= div:
            return f"{v / div:g}{unit}"
    return f"{v:g}"


def load(path: Path) -> list[dict]:
    with open(path) as f:
        return json.load(f)


def _cases(records: Sequence[dict]) -> dict[str, dict[str, dict[int, dict]]]:
    """sweep -> implementation -> C -> {metric: value, "params": ...}."""
    out: dict[str, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        p = r["params"]
        if "sweep" not in p or r["implementation"] == "inputs":
            continue
        entry = out[p["sweep"]][r["implementation"]].setdefault(p["classes"], {"params": p})
        entry[r["metric"]] = r["value"]
    return out


def plot_sweep(name: str, impls: dict[str, dict[int, dict]], caption: str, path: Path) -> Optional[Path]:
    """One figure for one sweep; None when C does not vary in it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    cs = sorted({c for per_c in impls.values() for c in per_c})
    if len(cs) < 2:
        return None
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 5))
    missing = []
    any_p = next(iter(next(iter(impls.values())).values()))["params"]
    for impl, per_c in impls.items():
        colour, marker = STYLE.get(impl, ("k", "."))
        ok = sorted(c for c, m in per_c.items() if m.get("status") in ("ok", "wrong"))
        for c, m in sorted(per_c.items()):
            if m.get("status") not in ("ok", "wrong"):
                missing.append(f"{cases.IMPL_LABELS[impl]} at C={c:,}: {m.get('status')}"
                               + (f" ({m['params']['error']})" if m["params"].get("error") else ""))
        if not ok:
            continue
        label = cases.IMPL_LABELS[impl] + (" (WRONG)" if any(per_c[c]["status"] == "wrong" for c in ok) else "")
        style = dict(color=colour, marker=marker or None, linestyle="--" if impl == "floor" else "-",
                     linewidth=2.5 if impl == "marginops" else 1.5, label=label)
        ax_t.plot(ok, [per_c[c]["seconds"] for c in ok], **style)
        if impl != "floor":
            # Below MEMORY_FLOOR_MIB the RSS figure is noise (page granularity, allocator caches): clip there.
            ax_m.plot(ok, [max(per_c[c]["extra_peak_bytes"] / MiB, MEMORY_FLOOR_MIB) for c in ok], **style)
    for ax, ylabel in ((ax_t, "forward+backward time (s)"), (ax_m, "extra peak memory (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("classes C")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: _fmt_count(v)))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax_m.set_ylim(bottom=MEMORY_FLOOR_MIB / 2)
    ax_t.legend(fontsize=8)
    ax_t.set_title(f"{name}: time, B={any_p['batch']}, D={any_p['dim']}, float32")
    ax_m.set_title(f"{name}: extra peak memory (RSS beyond inputs and grads)")
    text = caption + "".join(f"\nnot shown: {m}" for m in missing)
    fig.text(0.01, 0.01, text, fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.07 + 0.025 * len(missing), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_report(json_path: Path, output_dir: Path) -> list[Path]:
    """Every plot of the report at ``json_path``; returns the files written."""
    records = load(json_path)
    if not records:
        return []
    first = records[0]
    machine = first["machine"]
    written = []
    for name, impls in _cases(records).items():
        problem = next(iter(next(iter(impls.values())).values()))["params"]["problem"]
        desc = cases.PROBLEMS[problem].description if problem in cases.PROBLEMS else problem
        path = plot_sweep(name, impls, f"{harness.describe_machine(machine)}; {first['date']}\n{desc}",
                          Path(output_dir) / f"report_{name}.png")
        if path is not None:
            written.append(path)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.split("\n")[0])
    parser.add_argument("json", type=Path, nargs="?", default=harness.RESULTS_DIR / "report.json")
    parser.add_argument("--output-dir", type=Path, default=None, help="default: next to the JSON file")
    args = parser.parse_args(argv)
    for path in plot_report(args.json, args.output_dir or args.json.parent):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
