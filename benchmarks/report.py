"""Tables and plots from the committed records: ``python -m benchmarks report`` (measures nothing).

The README's summary table, every table of ``docs/benchmarks.md`` and the
plots under ``docs/img/`` are generated here from ``benchmarks/results/*.json``.
A generated part of a Markdown file lies between ``<!-- generated: NAME -->``
and ``<!-- end generated -->``; :func:`update` rewrites those parts and
nothing else, and ``benchmarks/test_report.py`` fails when a committed page
differs from what the committed records give.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

from . import presets, registry
from .runner import REPO_ROOT, RESULTS_DIR, MiB, describe_machine, load_records

PAGES = (REPO_ROOT / "README.md", REPO_ROOT / "docs" / "benchmarks.md")
IMG_DIR = REPO_ROOT / "docs" / "img"
#: The README's summary: the GPU first (the latest of these presets holding this problem and shape), then
#: the CPU (this preset at this shape).
GPU_SUMMARY = (("gpu-check", "gpu"), "arcface64", (8192, 2304, 256_000))
SUMMARY = ("demo", (512, 256, 200_000))
CASE_FIELDS = ("problem", "batch", "dim", "classes", "dtype", "device", "reduction", "memory_budget")


def _fmt_c(c: int) -> str:
    return f"{c // 1_000_000}M" if c % 1_000_000 == 0 else (f"{c // 1000}k" if c % 1000 == 0 else str(c))


def _label(impl: str) -> str:
    return registry.IMPLS[impl].label if impl in registry.IMPLS else impl


def group(records: Sequence[dict]) -> dict[str, dict[tuple, dict]]:
    """preset -> (case fields..., implementation) -> {metric: value, "_record": first record}, in run order."""
    out: dict[str, dict[tuple, dict]] = defaultdict(dict)
    for r in records:
        key = tuple(r.get(f) for f in CASE_FIELDS) + (r["implementation"],)
        entry = out[r["preset"]].setdefault(key, {"_record": r})
        entry[r["metric"]] = r["value"]
    return out


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _mib(v) -> str:
    return f"{v / MiB:,.1f}" if v is not None else "-"


#: Columns of the full tables: metric, header, format.
COLUMNS = (
    ("seconds", "seconds", lambda v: f"{v:.3f}"),
    ("seconds_min", "min s", lambda v: f"{v:.3f}"),
    ("ratio_to_floor", "x floor", lambda v: f"{v:.2f}"),
    ("ratio_to_floor_min", "x floor (min)", lambda v: f"{v:.3f}"),
    ("gflops", "GFLOP/s", lambda v: f"{v:,.0f}"),
    ("extra_peak_bytes", "extra peak MiB", _mib),
    ("queries_per_second", "queries/s", lambda v: f"{v:,.0f}"),
    ("weight_and_grad_bytes", "weight+grad MiB per rank", _mib),
    ("check_ok", "check", lambda v: "OK" if v else "**WRONG**"),
    ("others_cpu_share", "others' CPU", lambda v: f"{v:.0%}"),
)


def _case_text(key: tuple) -> list[str]:
    problem, b, d, c, dtype, device, reduction, budget = key[:8]
    extra = [] if reduction in ("mean", None) else [f"reduction={reduction}"]
    if budget:
        extra.append(f"memory_budget={budget // MiB} MiB")
    return [str(problem) + (f" ({', '.join(extra)})" if extra else ""), f"{b}", f"{d}", _fmt_c(c)]


def full_table(cases: dict[tuple, dict]) -> str:
    """Every case of one preset: problem, shape, implementation and its metrics, with a note on failures."""
    cols = [c for c in COLUMNS if any(c[0] in m for m in cases.values())]
    rows = []
    for key, m in cases.items():
        status = m.get("status", "ok")
        note = "" if status == "ok" else f"{status}: {str(m.get('error', ''))[:90]}".replace("|", "/").replace("\n", " ")
        rows.append(_case_text(key) + [_label(key[-1])]
                    + [fmt(m[k]) if m.get(k) is not None else "-" for k, _, fmt in cols] + [note])
    return _table(["problem", "B", "D", "C", "implementation"] + [h for _, h, _ in cols] + ["note"], rows)


def _machine_line(cases: dict[tuple, dict]) -> str:
    r = next(iter(cases.values()))["_record"]
    shares = [m["others_cpu_share"] for m in cases.values() if m.get("others_cpu_share") is not None]
    span = f"{min(shares):.0%}" + (f"-{max(shares):.0%}" if f"{max(shares):.0%}" != f"{min(shares):.0%}" else "") \
        if shares else ""
    load = f"; other processes took {span} of the CPU during the cases" if shares else ""
    dtype_device = f"{r['dtype']} on {r['device']}" if r.get("dtype") else ""
    return f"Measured {r['date'][:10]} on {describe_machine(r['machine'])}; {dtype_device}{load}."


def verdict(met: Optional[bool]) -> str:
    return "-" if met is None else ("met" if met else "**not met**")


def judge(cases: dict[tuple, dict], t: presets.Target) -> tuple[Optional[dict], Optional[dict], Optional[float],
                                                                  Optional[bool]]:
    """Target ``t`` among one preset's ``cases``: ``(ours, base, value, met)``, the two cases' metrics, the ratio
    of ``t.metric`` (or the bytes, without ``against``) and whether it is met, each None where not measured.

    A ratio compares the implementation with ``against`` at the same shape: the floor of that shape, or
    the other implementation on the same problem with ``reduction="mean"``. A case that computed a wrong
    result does not meet its targets.
    """
    ours_key, ours = next(((k, m) for k, m in cases.items() if k[0] == t.problem and k[6] == t.reduction
                           and k[7] == t.memory_budget and k[-1] == t.impl and t.metric in m
                           and t.shape in (None, k[1:4]) and t.dtype in (None, k[4])), (None, None))
    base = None
    if ours is not None and t.against is not None:
        other = t.against_problem or t.problem
        bases = [(k, m) for k, m in cases.items() if k[1:6] == ours_key[1:6] and k[-1] == t.against
                 and t.metric in m and (t.against == "floor" or (k[0] == other and k[6] == "mean"))]
        # the floor measured beside this very case where there is one (same problem and reduction)
        bases.sort(key=lambda km: km[0][0] != ours_key[0] or km[0][6] != ours_key[6])
        base = bases[0][1] if bases else None
    if ours is None or (t.against is not None and base is None):
        return ours, base, None, None
    top, bottom = ours[t.metric], base[t.metric] if t.against is not None else 1
    value = top / bottom if bottom else math.inf
    return ours, base, value, top <= t.max_ratio * bottom and ours.get("check_ok", True) is not False


def targets_table(cases: dict[tuple, dict], preset: presets.Preset) -> str:
    """Each target of the preset: the measured ratio (or bytes) and whether it is met (:func:`judge`)."""
    rows = []
    for t in preset.targets:
        value, met = judge(cases, t)[2:]
        measured = "not measured" if value is None else (
            f"{value / MiB:,.1f} MiB" if t.against is None else f"{value:.2f}x {_label(t.against)}")
        rows.append([t.name, measured, verdict(met)])
    return _table(["target", "measured", "result"], rows)


def _summary_table(cases: dict[tuple, dict], b: int, d: int, c: int) -> str:
    rows = []
    for key, m in cases.items():
        if m.get("status") != "ok":
            rows.append([_label(key[-1]), m.get("status", "?"), "-", "-"])
            continue
        mem = "-" if key[-1] == "floor" else f"{m['extra_peak_bytes'] / MiB:,.0f} MiB"
        time = f"{m['seconds']:.2f} s" if m["seconds"] >= 1 else f"{m['seconds'] * 1e3:.1f} ms"
        rows.append([_label(key[-1]), time, f"{m.get('ratio_to_floor', float('nan')):.2f}x",
                     mem])
    p = registry.PROBLEMS[next(iter(cases))[0]]
    head = (f"One training step's loss (forward + backward), {p.description}, B={b:,}, D={d}, C={c:,}. "
            f"{_machine_line(cases)}")
    return head + "\n\n" + _table(["implementation", "time", "x 3-GEMM floor", "extra peak memory"], rows)


def summary(records: Sequence[dict]) -> str:
    """The README's tables: the latest GPU run at its shape, then the CPU summary preset at its shape."""
    grouped = group(records)
    parts = []
    names, problem, (b, d, c) = GPU_SUMMARY
    gpu = [(next(iter(cs.values()))["_record"]["date"], cs) for n, cs in grouped.items() if n in names]
    gpu = [(date, {k: m for k, m in cs.items() if k[0] == problem and k[1:4] == (b, d, c)}) for date, cs in gpu]
    gpu = [x for x in gpu if x[1]]
    if gpu:
        parts.append("**GPU.** " + _summary_table(max(gpu, key=lambda x: x[0])[1], b, d, c))
    name, (b, d, c) = SUMMARY
    cases = {k: m for k, m in grouped.get(name, {}).items() if k[1:4] == (b, d, c)}
    parts.append("**CPU.** " + _summary_table(cases, b, d, c) if cases
                 else f"(no records of the `{name}` preset at B={b}, D={d}, C={c} yet)")
    return "\n\n".join(parts)


def model_table() -> Optional[str]:
    """The GPU time model's table at its default rates (None without triton: its planners need it)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return None
    from . import perf_model

    return perf_model.table()


def blocks(records: Sequence[dict]) -> dict[str, str]:
    """Every generated block, by name."""
    out = {"summary": summary(records)}
    model = model_table()
    if model is not None:
        out["model"] = model
    for name, cases in group(records).items():
        text = [_machine_line(cases), "", full_table(cases)]
        if name in presets.PRESETS and presets.PRESETS[name].targets:
            text += ["", targets_table(cases, presets.PRESETS[name])]
        out[f"preset:{name}"] = "\n".join(text)
    return out


_BLOCK = re.compile(r"(<!-- generated: (?P<name>[^ ]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


def render(text: str, generated: dict[str, str]) -> str:
    """``text`` with each generated block that ``generated`` names replaced (the others are kept)."""
    def block(m: re.Match) -> str:
        new = generated.get(m.group("name"))
        return m.group(1) + (m.group("body") if new is None else new.rstrip("\n") + "\n") + m.group(4)

    return _BLOCK.sub(block, text)


def plot(records: Sequence[dict], preset: str, path: Path) -> Optional[Path]:
    """Time and extra peak memory against C for one preset (None if C does not vary)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = group(records).get(preset, {})
    by_impl: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    for key, m in cases.items():
        if m.get("status") == "ok":
            by_impl[key[-1]].append((key[3], m))
    if len({c for pts in by_impl.values() for c, _ in pts}) < 2:
        return None
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl, pts in by_impl.items():
        cs = [c for c, _ in pts]
        colour = f"C{list(registry.IMPLS).index(impl) % 10}" if impl in registry.IMPLS else "k"
        style = dict(marker="o", linestyle="--" if impl == "floor" else "-", label=_label(impl), color=colour,
                     linewidth=2.5 if impl in registry.OURS else 1.2)
        ax_t.plot(cs, [m["seconds"] for _, m in pts], **style)
        if impl != "floor":
            ax_m.plot(cs, [max(m["extra_peak_bytes"] / MiB, 1.0) for _, m in pts], **style)
    for ax, label in ((ax_t, "forward+backward (s)"), (ax_m, "extra peak memory (MiB)")):
        ax.set(xscale="log", yscale="log", xlabel="classes C", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    r = next(iter(cases.values()))["_record"]
    fig.suptitle(f"{presets.PRESETS[preset].description if preset in presets.PRESETS else preset}\n"
                 f"{describe_machine(r['machine'])}", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path


def update(records: Optional[Sequence[dict]] = None, pages: Sequence[Path] = PAGES, plots: bool = True,
           write: bool = True) -> list[Path]:
    """Rewrite the generated blocks of ``pages`` and the plots from ``records`` (default: the committed ones);
    returns the files written (``write=False``: writes nothing, returns the pages that are out of date)."""
    records = load_records([*RESULTS_DIR.glob("*.json"), *RESULTS_DIR.glob("gpu/*.json")]) if records is None else records
    generated = blocks(records)
    written = [page for page in pages if render(page.read_text(), generated) != page.read_text()]
    if not write:
        return written
    for page in written:
        page.write_text(render(page.read_text(), generated))
    if plots:
        for name in ("classes", "plain"):
            path = plot(records, name, IMG_DIR / f"benchmark_{name}.png")
            if path is not None:
                written.append(path)
    return written


def stale_pages(records: Optional[Sequence[dict]] = None, pages: Sequence[Path] = PAGES) -> list[Path]:
    """The pages whose generated blocks differ from what ``records`` (default: the committed ones) give."""
    return update(records, pages, write=False)
