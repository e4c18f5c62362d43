"""examples/train_st_wordnet.py on a synthetic WordNet: trains, stops, resumes to the uninterrupted run, evaluates.

Skipped without sentence-transformers and its training extras.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("datasets")
pytest.importorskip("accelerate")

from examples import train_st_wordnet  # noqa: E402
from tests.test_realdata_examples import synthetic_wordnet  # noqa: E402


def argv(tmp_path, name, *extra):
    return ["--wordnet-dir", str(tmp_path / "wn"), "--cache-dir", str(tmp_path / "cache"), "--max-classes", "50",
            "--eval-classes", "10", "--held-out", "0.2", "--epochs", "3", "--batch", "16", "--dim", "16",
            "--vocab", "300", "--threads", "1", "--log-every", "2", "--output-dir", str(tmp_path / name),
            "--out", str(tmp_path / f"{name}.json"), *extra]


def test_trains_stops_resumes_and_evaluates(tmp_path, capsys):
    synthetic_wordnet(tmp_path / "wn", classes=80)
    full = train_st_wordnet.main(argv(tmp_path, "full"))
    assert full["complete"] and full["steps"] > 0 and len(full["history"]) == 3
    assert full["loss_trace"][-1][1] < full["loss_trace"][0][1]
    assert full["final"]["top1"] > 0.5            # the synthetic synsets share a made-up stem: learnable
    assert train_st_wordnet.main(argv(tmp_path, "part", "--stop-after", "1")) is None
    assert "continue with --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--resume"):
        train_st_wordnet.main(argv(tmp_path, "part"))
    rest = train_st_wordnet.main(argv(tmp_path, "part", "--resume"))
    assert rest["info"]["resumed"] and rest["info"]["tokenizer_sha256"] == full["info"]["tokenizer_sha256"]
    assert [h["top1"] for h in rest["history"]] == pytest.approx([h["top1"] for h in full["history"]], abs=1e-6)
    assert rest["final"]["top1"] == pytest.approx(full["final"]["top1"], abs=1e-6)
    saved = json.loads((tmp_path / "part.json").read_text())
    assert saved["final"]["top1"] == rest["final"]["top1"]
    ev = train_st_wordnet.main(argv(tmp_path, "x", "--evaluate", str(tmp_path / "part" / "final")))
    assert ev["top1"] == pytest.approx(rest["final"]["top1"], abs=1e-6)
