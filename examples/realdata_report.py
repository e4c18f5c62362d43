"""Tables and plots of the real-data runs (``examples/realdata_grid.sh``) for ``docs/results.md``.

Run from the repository root after the runs::

    python -m examples.realdata_report            # rewrites the generated part of docs/results.md
    python -m examples.realdata_report --print    # prints it instead
    python -m examples.realdata_report --untrained  # first measures the untrained encoders' floor
    python -m examples.realdata_report --integrations-only  # only the parity / recipe / sentence-transformers block

Reads the run records ``docs/results/realdata/<corpus>-<margin>-s<seed>.json`` (the full-scale grid), those
of the scale-down grid (``docs/results/realdata-small/``) and of its longer runs
(``docs/results/realdata-long/``), and the memory measurements ``docs/results/realdata/memory.jsonl``
(written by ``--memory``: the benchmark runner, one fresh process per figure),
writes ``docs/img/realdata_training.png`` (training loss and held-out top-1 over training) and
``docs/img/realdata_abstain.png`` (answer-or-abstain: precision against recall), and replaces the text
between ``<!-- realdata:begin -->`` and ``<!-- realdata:end -->`` in ``docs/results.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

RUNS = Path("docs/results/realdata")
SMALL_RUNS = Path("docs/results/realdata-small")
LONG_RUNS = Path("docs/results/realdata-long")
DOC = Path("docs/results.md")
IMG = Path("docs/img")
ORDER = ("softmax", "normface", "cosface", "arcface", "sphereface", "simpler")
LABEL = {"softmax": "softmax", "normface": "NormFace (no margin)", "cosface": "CosFace", "arcface": "ArcFace",
         "sphereface": "SphereFace", "simpler": "simpler A-Softmax"}
BEGIN, END = "<!-- realdata:begin -->", "<!-- realdata:end -->"
PARITY64 = Path("docs/results/parity-float64")
PARITY32 = Path("docs/results/parity-float32")
RECIPE_RUNS = Path("docs/results/realdata-recipe")
ST_RUNS = Path("docs/results/st-wordnet")
INTEG_BEGIN, INTEG_END = "<!-- integrations:begin -->", "<!-- integrations:end -->"
README = Path("README.md")
README_BEGIN, README_END = "<!-- realdata-summary:begin -->", "<!-- realdata-summary:end -->"


def load_runs(runs: Path) -> dict:
    out: dict = defaultdict(lambda: defaultdict(list))
    for p in sorted(runs.glob("*-s*.json")):
        r = json.loads(p.read_text())
        if r.get("complete", True):
            out[r["corpus"]][r["settings"]["margin"]].append(r)
    return out


def margin_label(r: dict) -> str:
    s = r["settings"]
    if s["margin"] == "softmax":
        return "softmax"
    if s["margin"] == "normface":
        return f"NormFace (s={s['scale']:g}, no margin)"
    m = s["m"] if s["m"] is not None else default_m(s["margin"])
    return f"{LABEL[s['margin']]} (s={s['scale']:g}, m={m:g})"


def default_m(kind: str):
    from .realdata import DEFAULT_M
    return DEFAULT_M[kind]


def stat(values: list[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(corpus: str, by_margin: dict) -> str:
    glyphs = corpus == "glyphs"
    head = ["margin", "seeds", "top-1", "top-5", "top-10", "AP", "recall @ P0.9", "must-abstain kept @ P0.9"]
    if glyphs:
        head.insert(3, "top-1, held-out font")
    head.append(time_header(r for rs in by_margin.values() for r in rs))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind in ORDER:
        rs = by_margin.get(kind)
        if not rs:
            continue
        f = [r["final"] for r in rs]
        cells = [margin_label(rs[0]), ",".join(str(r["settings"]["seed"]) for r in rs), stat([x["top1"] for x in f])]
        if glyphs:
            font = rs[0]["info"].get("held_out_font", "AR PL UKai")
            cells.append(stat([x["top1_by_group"][font] for x in f]))
        cells += [stat([x["top5"] for x in f]), stat([x["top10"] for x in f]), stat([x["ap"] for x in f]),
                  stat([x["recall_at_p90"] for x in f]), stat([x["abstain_ok_at_p90"] for x in f]),
                  stat([train_seconds(r) for r in rs], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def time_header(records) -> str:
    return "train CPU s" if all(r.get("train_cpu_seconds") for r in records) else "train s (wall, shared machine)"


def train_seconds(r: dict) -> float:
    """CPU seconds of the training steps (one thread), or wall-clock seconds in records that predate them."""
    return r.get("train_cpu_seconds") or r["train_seconds"]


def counts(corpus: str, by_margin: dict) -> str:
    r = next(iter(by_margin.values()))[0]
    f = r["final"]
    s = r["settings"]
    return (f"{r['train_classes']:,} training classes ({r['train_samples']:,} samples), {r['eval_classes']:,} held-out "
            f"classes ({r['eval_samples']:,} samples: {f['answerable']:,} answerable queries, {f['must_abstain']:,} "
            f"must-abstain); {s['epochs']} epochs of {r['steps'] // s['epochs']} steps, batch {s['batch']}, "
            f"embedding {s['dim']}, AdamW lr {s['lr']:g}, one thread")


MEMORY_CLASSES = (4000, 5000, 18_831, 20_000, 85_707)  # the runs' training classes, and all of WordNet's


def measure_memory(path: Path) -> None:
    """Extra peak memory of one forward+backward of the head at the training shapes (B=256, D=128), marginops
    (as ``backend="auto"`` runs it on this CPU) against the naive head, each case in a fresh process."""
    from benchmarks import registry, runner

    ours = "marginops-native" if registry.unavailable("marginops-native", "cpu") is None else "marginops-torch"
    cases = [runner.Case(impl, "ordinary", 256, 128, c, repeats=0, check=False)
             for c in MEMORY_CLASSES for impl in (ours, "naive")]
    records = runner.run(cases, preset="realdata-memory")
    by_case = defaultdict(dict)
    for r in records:
        by_case[(r["implementation"], r["batch"], r["dim"], r["classes"])][r["metric"]] = r["value"]
    with path.open("w") as f:
        for (impl, b, d, c), m in by_case.items():
            if m.get("status") == "ok":
                f.write(json.dumps({"impl": "reference" if impl == "naive" else "marginops", "backend": impl,
                                    "batch": b, "dim": d, "classes": c,
                                    "extra_peak_bytes": m["extra_peak_bytes"]}) + "\n")


def memory_table(path: Path) -> str:
    if not path.exists():
        return "(no memory measurements)"
    rows = defaultdict(dict)
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows[(r["batch"], r["dim"], r["classes"])][r["impl"]] = r["extra_peak_bytes"] / 2**20
    lines = ["| B x D x C | marginops | naive head (materializes B x C) | ratio |", "|---|---|---|---|"]
    for (b, d, c), v in sorted(rows.items(), key=lambda kv: kv[0][2]):
        if "marginops" in v and "reference" in v:
            lines.append(f"| {b} x {d} x {c:,} | {v['marginops']:.1f} MiB | {v['reference']:.1f} MiB | "
                         f"{v['reference'] / v['marginops']:.1f}x |")
    return "\n".join(lines)


def plots(runs: dict, img: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    img.mkdir(parents=True, exist_ok=True)
    corpora = [c for c in ("wordnet", "glyphs") if c in runs]
    colors = {k: f"C{i}" for i, k in enumerate(ORDER)}
    fig, axes = plt.subplots(len(corpora), 2, figsize=(11, 4 * len(corpora)), squeeze=False)
    for row, corpus in enumerate(corpora):
        ax_l, ax_t = axes[row]
        for kind in ORDER:
            rs = sorted(runs[corpus].get(kind, []), key=lambda r: r["settings"]["seed"])
            if not rs:
                continue
            steps, loss = zip(*rs[0]["loss_trace"])
            ax_l.plot(steps, loss, color=colors[kind], label=LABEL[kind], lw=1)
            for i, r in enumerate(rs):
                ep = [0] + [h["epoch"] for h in r["history"]]
                t1 = [float("nan")] + [h["top1"] for h in r["history"]]
                ax_t.plot(ep, t1, color=colors[kind], marker="o", ms=3, lw=1, alpha=1.0 if i == 0 else 0.4,
                          label=LABEL[kind] if i == 0 else None)
        ax_l.set(title=f"{corpus}: training loss (seed 0)", xlabel="step", ylabel="loss (each margin's own)",
                 yscale="log")
        ax_t.set(title=f"{corpus}: held-out top-1 after each epoch (all seeds)", xlabel="epoch", ylabel="top-1")
        ax_l.legend(fontsize=8)
        ax_t.legend(fontsize=8)
        ax_t.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(img / "realdata_training.png", dpi=90)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(corpora), figsize=(5.5 * len(corpora), 4.2), squeeze=False)
    for ax, corpus in zip(axes[0], corpora):
        for kind in ORDER:
            rs = sorted(runs[corpus].get(kind, []), key=lambda r: r["settings"]["seed"])
            if rs:
                c = rs[0]["final"]["curve"]
                ax.plot(c["recall"], c["precision"], color=colors[kind], label=LABEL[kind], lw=1.2)
        ax.axhline(0.9, color="grey", lw=0.6, ls="--")
        ax.set(title=f"{corpus}: answer or abstain (seed 0)", xlabel="recall (answered correctly / answerable)",
               ylabel="precision (correct / answered)", xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img / "realdata_abstain.png", dpi=90)
    plt.close(fig)
    return ["realdata_training.png", "realdata_abstain.png"]


#: The sizes of ``examples/realdata_grid.sh`` (the untrained baseline embeds the same held-out samples).
GRID_SIZES = {("wordnet", "full"): ["--max-classes", "20000", "--eval-classes", "5000", "--epochs", "10"],
              ("glyphs", "full"): ["--epochs", "6"],
              ("wordnet", "small"): ["--max-classes", "5000", "--eval-classes", "2000", "--epochs", "8"],
              ("glyphs", "small"): ["--max-classes", "4000", "--eval-classes", "1000", "--epochs", "4"]}


def untrained(corpus: str, scale: str = "full", seeds=(0, 1, 2)) -> dict:
    """Held-out metrics of the *untrained* encoder (its initialization under each seed): what the
    architecture alone gives, the floor any training must beat."""
    import importlib

    from .realdata import embed, retrieval_metrics
    mod = importlib.import_module(f"examples.train_{corpus}")
    finals = []
    for seed in seeds:
        args = mod.parse_args(GRID_SIZES[corpus, scale] + ["--seed", str(seed), "--threads", "1"])
        task = mod.build_task(args)
        r = retrieval_metrics(embed(task.encoder, task.eval_x), task.eval_y, groups=task.eval_groups,
                              group_names=task.group_names)
        r.pop("curve")
        finals.append(r)
    return {"corpus": corpus, "seeds": list(seeds), "final": finals}


def untrained_row(path: Path, glyphs: bool) -> str:
    if not path.exists():
        return ""
    u = json.loads(path.read_text())
    f = u["final"]
    cells = ["untrained encoder (no training)", ",".join(map(str, u["seeds"])), stat([x["top1"] for x in f])]
    if glyphs:
        cells.append(stat([x["top1_by_group"]["AR PL UKai"] for x in f]))
    cells += [stat([x["top5"] for x in f]), stat([x["top10"] for x in f]), stat([x["ap"] for x in f]),
              stat([x["recall_at_p90"] for x in f]), stat([x["abstain_ok_at_p90"] for x in f]), "0"]
    return "| " + " | ".join(cells) + " |"


def long_plot(long_runs: dict, short_runs: dict, img: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {k: f"C{i}" for i, k in enumerate(ORDER)}
    fig, axes = plt.subplots(1, len(long_runs), figsize=(6 * len(long_runs), 4.2), squeeze=False)
    for ax, (corpus, by_margin) in zip(axes[0], long_runs.items()):
        for kind in ORDER:
            for src, style, tag in ((short_runs.get(corpus, {}), "--", "short"), (by_margin, "-", "long")):
                rs = [r for r in src.get(kind, []) if r["settings"]["seed"] == 0]
                if rs and kind in by_margin:
                    h = rs[0]["history"]
                    ax.plot([x["step"] for x in h], [x["top1"] for x in h], style, marker="o", ms=3,
                            color=colors[kind], label=f"{LABEL[kind]}, {rs[0]['settings']['epochs']} epochs")
        ax.set(title=f"{corpus}: held-out top-1 against training steps (seed 0)", xlabel="step", ylabel="top-1")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img / "realdata_long.png", dpi=90)
    plt.close(fig)


def long_section(long_runs: dict, short_runs: dict) -> str:
    """Table of the longer runs, next to the same margins' short runs of the same seed."""
    parts = []
    for corpus, by_margin in long_runs.items():
        every = [r for src in (short_runs.get(corpus, {}), by_margin) for rs in src.values() for r in rs]
        lines = ["| margin | epochs | steps | top-1 | top-5 | top-10 | AP | recall @ P0.9 | "
                 f"{time_header(every)} |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for kind in ORDER:
            for src in (short_runs.get(corpus, {}), by_margin):
                for r in sorted(src.get(kind, []), key=lambda r: r["settings"]["seed"]):
                    if r["settings"]["seed"] != 0 or kind not in by_margin:
                        continue
                    f = r["final"]
                    lines.append(f"| {margin_label(r)} | {r['settings']['epochs']} | {r['steps']} | {f['top1']:.4f} | "
                                 f"{f['top5']:.4f} | {f['top10']:.4f} | {f['ap']:.4f} | {f['recall_at_p90']:.4f} | "
                                 f"{train_seconds(r):.0f} |")
        name = {"wordnet": "WordNet", "glyphs": "CJK glyphs"}.get(corpus, corpus)
        parts += [f"#### {name}, scale-down: longer training (seed 0), next to the same seed's short run", "",
                  "\n".join(lines), ""]
    return "\n".join(parts)


def results_tables(runs: dict, runs_dir: Path, suffix: str = "") -> list[str]:
    """Per corpus: what was trained and evaluated, and the table of margins (with the untrained encoder's
    row where ``<runs_dir>/<corpus>-untrained.json`` exists)."""
    parts = []
    names = {"wordnet": "WordNet 3.0 synsets", "glyphs": "CJK glyphs"}
    for corpus in ("wordnet", "glyphs"):
        if corpus not in runs:
            continue
        row = untrained_row(runs_dir / f"{corpus}-untrained.json", corpus == "glyphs")
        parts += [f"#### {names[corpus]}{suffix}", "", counts(corpus, runs[corpus]) + ".", "",
                  table(corpus, runs[corpus]) + ("\n" + row if row else ""), ""]
    return parts


def generated(runs: dict, runs_dir: Path, small: dict, small_dir: Path) -> str:
    parts = results_tables(runs, runs_dir)
    parts += ["#### Head's extra peak memory (one forward + backward, CosFace s=30)", "",
              memory_table(runs_dir / "memory.jsonl"), ""]
    if small:
        parts += results_tables(small, small_dir, ", scale-down (the first 5,000 synsets / 4,000 characters)")
    return "\n".join(parts)


def load_optional(runs: Path) -> dict:
    """:func:`load_runs`, or nothing where the folder does not exist."""
    return load_runs(runs) if runs.exists() else {}


def page_text(runs: dict, runs_dir: Path, small: dict, small_dir: Path, long_runs: dict) -> str:
    """The generated part of ``docs/results.md``: the grids' tables, the memory table, the longer runs."""
    text = generated(runs, runs_dir, small, small_dir)
    return text + "\n" + long_section(long_runs, small) if long_runs else text


def parity64_table(folder: Path) -> str:
    """The float64 parity records (``examples/parity.py``): per corpus and margin, the largest relative errors."""
    recs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.exists() else []
    if not recs:
        return "(no float64 parity records)"
    lines = ["| corpus | margin | classes | steps | loss | d class weight | d encoder (every parameter) | "
             "training loss, step 1 -> last |", "|---|---|---|---|---|---|---|---|"]
    for rec in sorted(recs, key=lambda r: ("wordnet", "glyphs").index(r["corpus"])):
        for r in rec["results"]:
            e = r["max_rel_err"]
            lines.append(f"| {rec['corpus']} | {LABEL[r['margin']]} | {r['classes']:,} | {r['steps']} | "
                         f"{e['loss']:.1e} | {e['d_weight']:.1e} | {e['d_encoder']:.1e} | "
                         f"{r['loss_first']:.2f} -> {r['loss_last']:.2f} |")
    worst = max(r["worst"] for r in recs)
    backends = sorted({f"{r['backend']} ({r['resolved_backend']})" for r in recs})
    return (f"marginops' head: backend {', '.join(backends)}; largest relative error over all steps, margins and "
            f"tensors: {worst:.1e} (required: <= {recs[0]['tolerance']:g}).\n\n" + "\n".join(lines))


def parity32_table(folder: Path, small: dict) -> str:
    """float32 runs of the default path and of the naive head, same seeds: held-out top-1 per seed."""
    runs = {impl: load_optional(folder / impl) for impl in ("auto", "reference")}
    if not runs["auto"] and not runs["reference"]:
        return "(no float32 parity records)"
    lines = ["| corpus | margin | head | seeds | top-1 per seed | top-1 | top-5 | AP | train CPU s |",
             "|---|---|---|---|---|---|---|---|---|"]
    names = {"auto": "marginops, default path (backend auto)", "reference": "naive head (materialized B x C)"}
    for corpus in ("wordnet", "glyphs"):
        for impl in ("auto", "reference"):
            for kind, rs in sorted(runs[impl].get(corpus, {}).items()):
                rs = sorted(rs, key=lambda r: r["settings"]["seed"])
                f = [r["final"] for r in rs]
                lines.append(f"| {corpus} | {margin_label(rs[0])} | {names[impl]} | "
                             f"{','.join(str(r['settings']['seed']) for r in rs)} | "
                             f"{' / '.join(f'{x:.4f}' for x in (v['top1'] for v in f))} | "
                             f"{stat([v['top1'] for v in f])} | {stat([v['top5'] for v in f])} | "
                             f"{stat([v['ap'] for v in f])} | {stat([train_seconds(r) for r in rs], 0)} |")
    return "\n".join(lines)


def recipe_table(recipe: dict, small: dict, rerun: dict) -> str:
    """ArcFace with margin warm-up, next to plain ArcFace run now with the same code and seeds (``rerun``: the
    float32 parity runs of the default path) and the scale-down grid's softmax, CosFace and ArcFace."""
    if not recipe:
        return "(no recipe records)"
    lines = ["| corpus | head | runs | seeds | top-1 | top-5 | top-10 | AP | recall @ P0.9 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for corpus in ("wordnet", "glyphs"):
        rows = [(margin_label(rs[0]), "scale-down grid", rs) for k in ("softmax", "cosface", "arcface")
                for rs in [small.get(corpus, {}).get(k, [])] if rs]
        rows += [(margin_label(rs[0]), "rerun with this code", rs) for rs in rerun.get(corpus, {}).values()]
        rows += [(margin_label(rs[0]) + ", margin warm-up", "recipe", rs) for rs in recipe.get(corpus, {}).values()]
        for label, what, rs in rows:
            rs = sorted(rs, key=lambda r: r["settings"]["seed"])
            f = [r["final"] for r in rs]
            lines.append(f"| {corpus} | {label} | {what} | {','.join(str(r['settings']['seed']) for r in rs)} | "
                         f"{stat([v['top1'] for v in f])} | {stat([v['top5'] for v in f])} | "
                         f"{stat([v['top10'] for v in f])} | {stat([v['ap'] for v in f])} | "
                         f"{stat([v['recall_at_p90'] for v in f])} |")
    return "\n".join(lines)


def integrations_text(parity64: Path = PARITY64, parity32: Path = PARITY32, recipe: Path = RECIPE_RUNS,
                      st: Path = ST_RUNS, small: Path = SMALL_RUNS) -> str:
    """The generated part of docs/results.md about training parity, the ArcFace recipe and sentence-transformers."""
    small_runs = load_optional(small)
    parts = ["#### Training parity, float64: marginops' gradients against the naive head's at every step", "",
             parity64_table(parity64), "",
             "#### Training parity, float32: full short trainings, default path against the naive head (ArcFace)", "",
             parity32_table(parity32, small_runs), "",
             "#### ArcFace with margin warm-up (scale-down sizes)", "",
             recipe_table(load_optional(recipe), small_runs, load_optional(parity32 / "auto")), ""]
    st_runs = load_optional(st)
    if st_runs.get("wordnet"):
        r = next(iter(st_runs["wordnet"].values()))[0]
        parts += ["#### sentence-transformers on WordNet (StaticEmbedding, BPE tokenizer, MarginSoftmaxLoss)", "",
                  counts("wordnet", st_runs["wordnet"]) + f"; {r['info']['encoder']}.", "",
                  table("wordnet", st_runs["wordnet"]), ""]
    return "\n".join(parts)


def readme_summary(runs: dict, runs_dir: Path) -> str:
    """README's table: held-out top-1 per corpus and margin (mean ± std over seeds); bold: the best, and any
    margin whose mean lies within a seed spread (its own or the best's) of it."""
    names = {"wordnet": "WordNet", "glyphs": "glyphs"}
    kinds = [k for k in ORDER if any(k in runs[c] for c in runs)]
    lines = ["| corpus (training / held-out classes) | untrained | " + " | ".join(LABEL[k] for k in kinds) + " |",
             "|" + "---|" * (len(kinds) + 2)]
    for corpus in ("wordnet", "glyphs"):
        if corpus not in runs:
            continue
        r0 = next(iter(runs[corpus].values()))[0]
        cells = [f"{names[corpus]} ({r0['train_classes']:,} / {r0['eval_classes']:,}), {r0['settings']['epochs']} epochs"]
        u = runs_dir / f"{corpus}-untrained.json"
        cells.append(stat([f["top1"] for f in json.loads(u.read_text())["final"]], 3) if u.exists() else "")
        top1 = {k: [r["final"]["top1"] for r in runs[corpus][k]] for k in kinds if k in runs[corpus]}
        mean = {k: statistics.mean(v) for k, v in top1.items()}
        sd = {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in top1.items()}
        best = max(mean, key=mean.get)
        for k in kinds:
            if k not in top1:
                cells.append("")
                continue
            v = stat(top1[k], 3)
            tied = mean[best] - mean[k] <= max(sd[best], sd[k])  # within a seed spread of the best: bold too
            cells.append(f"**{v}**" if tied else v)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replace_between(path: Path, begin: str, end: str, text: str) -> None:
    doc = path.read_text()
    if begin not in doc or end not in doc:
        raise SystemExit(f"error: {path} lacks the markers {begin} ... {end}")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(head + begin + "\n" + text + "\n" + end + tail)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=Path, default=RUNS)
    p.add_argument("--small-runs", type=Path, default=SMALL_RUNS, help="records of the scale-down grid (optional)")
    p.add_argument("--long-runs", type=Path, default=LONG_RUNS,
                   help="records of the scale-down grid's longer runs (optional)")
    p.add_argument("--doc", type=Path, default=DOC)
    p.add_argument("--readme", type=Path, default=README, help="file holding the summary table's markers")
    p.add_argument("--print", action="store_true", help="print the generated markdown instead of editing --doc")
    p.add_argument("--untrained", action="store_true",
                   help="first measure the untrained encoders (seeds 0-2) into <runs>/<corpus>-untrained.json")
    p.add_argument("--memory", action="store_true",
                   help="first measure the head's extra peak memory into <runs>/memory.jsonl (about a minute)")
    p.add_argument("--integrations-only", action="store_true",
                   help="only rewrite the parity / recipe / sentence-transformers block of --doc")
    args = p.parse_args()
    if args.integrations_only:
        replace_between(args.doc, INTEG_BEGIN, INTEG_END, integrations_text())
        print(f"updated the integrations block of {args.doc}")
        return
    if args.memory:
        measure_memory(args.runs / "memory.jsonl")
    if args.untrained:
        for corpus in ("wordnet", "glyphs"):
            (args.runs / f"{corpus}-untrained.json").write_text(json.dumps(untrained(corpus, "full"), indent=1))
    runs = load_runs(args.runs)
    if not runs:
        raise SystemExit(f"error: no run records in {args.runs}")
    plots(runs, IMG)
    small, long_runs = load_optional(args.small_runs), load_optional(args.long_runs)
    if long_runs:
        long_plot(long_runs, small, IMG)
    text = page_text(runs, args.runs, small, args.small_runs, long_runs)
    if args.print:
        print(text + "\n\n" + integrations_text() + "\n\n" + readme_summary(runs, args.runs))
        return
    replace_between(args.doc, BEGIN, END, text)
    replace_between(args.doc, INTEG_BEGIN, INTEG_END, integrations_text())
    replace_between(args.readme, README_BEGIN, README_END, readme_summary(runs, args.runs))
    print(f"updated {args.doc}, {args.readme}, {IMG}/realdata_training.png, {IMG}/realdata_abstain.png")


if __name__ == "__main__":
    main()
