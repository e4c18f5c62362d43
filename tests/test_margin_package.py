"""The margin family as one package: old import paths and checkpoints saved before the move still work."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

import marginops as mo

CHECKPOINT = Path(__file__).parent / "data" / "marginhead-adaface-adacos-v0.1.pt"

OLD_PATHS = {  # module path before 0.2 -> names users imported from it
    "marginops.margins": ("Margin", "NoMargin", "CosFace", "ArcFace", "SphereFace", "SimplerASoftmax",
                          "CombinedMargin", "MarginLike", "SIN2_FLOOR", "safe_acos"),
    "marginops.adaptive": ("ElasticFace", "AdaFace", "MagFace", "ARC_MARGIN_MAX"),
    "marginops.adacos": ("AdaCos",),
    "marginops.schedule": ("MarginScheduler", "MODES", "EXP_RATE"),
    "marginops.subcenter": ("SubCenter", "DominantSubCenters", "drop_non_dominant_sub_centers",
                            "check_sub_centers"),
}


@pytest.mark.parametrize("path", sorted(OLD_PATHS))
def test_old_module_paths_still_import(path):
    module = importlib.import_module(path)
    for name in OLD_PATHS[path]:
        assert hasattr(module, name), f"{path}.{name} is gone"
    # the classes are the package's own, not copies
    for name in OLD_PATHS[path]:
        if name in mo.__all__:
            assert getattr(module, name) is getattr(mo, name)


def test_checkpoint_saved_before_the_move_loads():
    saved = torch.load(CHECKPOINT, weights_only=False)  # a whole pickled MarginHead: classes found by old paths
    old = saved["module"]
    assert type(old.margin) is mo.AdaFace and type(old.scale) is mo.AdaCos
    head = mo.MarginHead(16, 50, margin=mo.AdaFace(0.4), scale=mo.AdaCos(50), sub_centers=2, backend="torch")
    head.load_state_dict(saved["state_dict"])  # the state_dict layout is unchanged
    for key, value in saved["state_dict"].items():
        assert torch.equal(head.state_dict()[key], value), key
    head.eval()
    old.eval()
    with torch.no_grad():
        torch.testing.assert_close(head(saved["x"], saved["y"]), saved["eval_loss"], rtol=1e-6, atol=0)
        torch.testing.assert_close(old(saved["x"], saved["y"]), saved["eval_loss"], rtol=1e-6, atol=0)
