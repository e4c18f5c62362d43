"""``python -m benchmarks demo``: what marginops does for you, in about a minute on a laptop CPU.

Runs the ``demo`` preset (marginops against the naive head and the installed
peers, each in a fresh process, checked against the float64 reference first)
and says in plain words what came out: the same loss, the time of one
training step's loss work and the extra memory it needed.
"""

from __future__ import annotations

import textwrap
from dataclasses import replace
from typing import Optional, Sequence

from . import presets, registry, report, runner
from .runner import MiB


def explain(records: Sequence[dict]) -> str:
    """The demo's table and its plain-language summary, from its records."""
    res = {key[-1]: m for key, m in next(iter(report.group(records).values())).items()}  # by implementation
    r0 = records[0]
    lines = [f"{registry.PROBLEMS[r0['problem']].description}; B={r0['batch']} embeddings of D={r0['dim']} "
             f"against C={r0['classes']:,} classes, float32 on CPU",
             f"{runner.describe_machine(r0['machine'])}", "",
             f"{'implementation':28} {'loss':>10} {'time/step':>10} {'x floor':>8} {'extra memory':>13}  check"]
    for impl, m in res.items():
        if m["status"] not in ("ok", "wrong"):
            lines.append(f"{registry.IMPLS[impl].label:28} {m['status']}: {str(m.get('error', ''))[:70]}")
            continue
        loss = f"{m['loss']:.5f}" if "loss" in m else "-"
        mem = "-" if impl == "floor" else f"{m['extra_peak_bytes'] / MiB:,.0f} MiB"
        check = {True: "OK", False: "WRONG"}.get(m.get("check_ok"), "-")
        lines.append(f"{registry.IMPLS[impl].label:28} {loss:>10} {m['seconds']:>9.2f}s "
                     f"{m.get('ratio_to_floor', float('nan')):>7.2f}x {mem:>13}  {check}")
    ours = res.get("marginops-native") or res.get("marginops-torch", {})
    naive = res.get("naive", {})
    lines.append("")
    if ours.get("status") == "ok" and naive.get("status") == "ok":
        speed = naive["seconds"] / ours["seconds"]
        mem = naive["extra_peak_bytes"] / max(ours["extra_peak_bytes"], MiB)
        lines.append(
            f"marginops computed the same loss as the naive head (difference {abs(ours['loss'] - naive['loss']):.1e};"
            f" loss and gradients were checked against the float64 reference before timing) "
            f"{'in ' + format(1 / speed, '.2f') + 'x the time' if speed < 1 else format(speed, '.1f') + 'x faster'}"
            f" and with {ours['extra_peak_bytes'] / MiB:,.0f} MiB of extra memory instead of "
            f"{naive['extra_peak_bytes'] / MiB:,.0f} MiB ({mem:,.0f}x less): the naive head holds several "
            f"B x C tensors, marginops none.")
        if res.get("floor", {}).get("seconds"):
            lines.append(f"The three matrix products any implementation must compute took "
                         f"{res['floor']['seconds']:.2f} s; marginops needed {ours.get('ratio_to_floor', 0):.2f}x that.")
        shares = [m.get("others_cpu_share") or 0 for m in res.values()]
        if max(shares) > 0.10:
            lines.append(f"Other programs took up to {max(shares):.0%} of the CPU meanwhile: times are noisier "
                         f"than on an idle machine.")
    else:
        lines.append("marginops or the naive head did not run: see the table.")
    return "\n".join(textwrap.fill(line, 110) if len(line) > 110 and "|" not in line and "  " not in line.strip()
                     else line for line in lines)


def main(batch: Optional[int] = None, dim: Optional[int] = None, classes: Optional[int] = None,
         output=None) -> int:
    cases = presets.PRESETS["demo"].cases
    b, d, c = cases[0].batch, cases[0].dim, cases[0].classes
    # marginops as backend="auto" runs it on a CPU: the native kernels, or the torch backend without them
    ours = "marginops-native" if registry.unavailable("marginops-native", "cpu") is None else "marginops-torch"
    cases = [replace(k, impl=ours if k.impl == "marginops-native" else k.impl, batch=batch or b, dim=dim or d,
                     classes=classes or c) for k in cases]
    print("marginops demo: one training step of a classification head with a margin, each implementation in a "
          "fresh process (check, then time and memory)", flush=True)
    records = runner.run(cases, preset="demo")
    if output:
        runner.write_records(output, records)
    print(explain(records))
    return 0 if all(r["value"] in ("ok", "skipped") for r in records if r["metric"] == "status") else 1
