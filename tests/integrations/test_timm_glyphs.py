"""examples/train_timm_glyphs.py: a timm backbone with a MarginHead on a synthetic glyph corpus (no fonts).

Skipped when timm (or the torchvision it imports) is not installed, unless MARGINOPS_REQUIRE_TIMM=1 (CI's timm
step), where that is a failure.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from examples import glyph_data, realdata, train_timm_glyphs


@pytest.fixture(scope="module")
def timm():
    try:
        return train_timm_glyphs.import_timm()
    except ImportError as exc:
        if os.environ.get("MARGINOPS_REQUIRE_TIMM") == "1":
            raise
        pytest.skip(f"timm is not importable: {exc}")


def synthetic_corpus(classes: int = 30, size: int = 16) -> glyph_data.GlyphCorpus:
    """Each class a random blob pattern, drawn in three 'fonts' by shifting it a pixel or two."""
    rng = np.random.default_rng(0)
    base = (rng.random((classes, size, size)) > 0.7).astype(np.uint8) * 255
    images = np.concatenate([np.roll(base, s, axis=2) for s in (0, 1, 2)])
    labels = np.tile(np.arange(classes), 3)
    fonts = np.repeat(np.arange(3), classes).astype(np.int8)
    return glyph_data.GlyphCorpus(images, labels, fonts, np.arange(0x4E00, 0x4E00 + classes),
                                  ["Noto Sans CJK", "Noto Serif CJK", "AR PL UKai"])


def test_timm_backbone_trains_with_a_margin_head(timm, tmp_path):
    args = train_timm_glyphs.parse_args([
        "--arch", "resnet10t", "--size", "16", "--dim", "16", "--batch", "16", "--epochs", "3", "--threads", "1",
        "--max-classes", "40", "--held-out", "0.3", "--lr", "3e-3", "--log-every", "2",
        "--checkpoint", str(tmp_path / "c.pt"), "--out", str(tmp_path / "r.json")])
    task = train_timm_glyphs.build_task(args, corpus=synthetic_corpus(60))
    assert isinstance(task.encoder.body, timm.models.resnet.ResNet)
    result = realdata.train(task, args, quiet=True)
    trace = [v for _, v in result["loss_trace"]]
    assert result["complete"] and trace[-1] < trace[0]
    assert 0.0 <= result["final"]["top1"] <= 1.0 and len(result["history"]) == 3
    assert (tmp_path / "c.pt").exists() and result["info"]["encoder"] == "timm resnet10t"


def test_encoder_reads_uint8_and_float(timm):
    enc = train_timm_glyphs.TimmEncoder("resnet10t", 8, 16)
    x = torch.randint(0, 256, (2, 16, 16), dtype=torch.uint8)
    enc.eval()
    torch.testing.assert_close(enc(x), enc(x.float().div(255).unsqueeze(1)))
