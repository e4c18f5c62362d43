"""The README's summary table and docs/benchmarks.md are what the committed records give."""

from __future__ import annotations

from benchmarks import presets, report
from benchmarks.runner import Case, records_of


def test_committed_pages_match_the_committed_records():
    # the acceptance check: a fresh clone regenerates the same tables (python -m benchmarks report)
    assert report.stale_pages() == [], "run: python -m benchmarks report"


def test_summary_block_is_in_the_readme():
    text = report.PAGES[0].read_text()
    assert "<!-- generated: summary -->" in text and "(no records" not in text


def _records(seconds: dict[str, float], extra: int = 10) -> list[dict]:
    out = []
    for impl, s in seconds.items():
        impl, _, reduction = impl.partition(":")
        case = Case(impl, "ordinary", 1024, 512, 100_000, reduction=reduction or "mean")
        out += records_of(case, {"status": "ok", "seconds": s, "extra_peak_bytes": extra},
                          floor_seconds={"seconds": 1.0},
                          preset="targets", machine={"cpu": "x", "cores": 2, "torch_threads": 2, "torch": "t"},
                          date="2026-01-01")
    return out


def test_targets_are_judged_from_the_records():
    target = presets.PRESETS["targets"]
    met = report.targets_table(report.group(_records({"floor": 1.0, "naive": 3.0, "marginops-torch": 1.1,
                                                      "marginops-torch:none": 1.5}))["targets"], target)
    missed = report.targets_table(report.group(_records({"floor": 1.0, "naive": 1.2, "marginops-torch": 1.3}))
                                  ["targets"], target)
    assert "| <= 1.20x the floor | 1.10x 3-GEMM floor | met |" in met
    assert "| <= 0.80x naive | 0.37x naive PyTorch | met |" in met
    assert "| reduction='none': <= 1.45x the floor | 1.50x 3-GEMM floor | **not met** |" in met
    assert "| <= 1.20x the floor | 1.30x 3-GEMM floor | **not met** |" in missed
    assert "| <= 0.80x naive | 1.08x naive PyTorch | **not met** |" in missed
    assert "not measured" in met  # no underflow case among these records


def test_render_replaces_only_generated_blocks():
    text = "intro\n<!-- generated: a -->\nold\n<!-- end generated -->\nmiddle\n<!-- generated: b -->\nkeep\n" \
           "<!-- end generated -->\n<!-- generated: c -->\n<!-- end generated -->\n"
    out = report.render(text, {"a": "new", "c": "filled"})
    assert out == text.replace("old", "new").replace("c -->\n", "c -->\nfilled\n")
