"""Train a timm backbone (random init) with a marginops ``MarginHead`` on CJK glyphs; evaluate on held-out characters.

The glyph corpus, split, augmentation, training loop and evaluation of ``examples/train_glyphs.py``
(see ``docs/results.md``), with the encoder replaced by any timm model built from scratch
(``timm.create_model(arch, pretrained=False, in_chans=1, num_classes=dim)``: timm's classifier
layer is the projection to the embedding). Run from the repository root (fonts and the
``[timm]`` extra first, see ``docs/integrations.md``)::

    python -m examples.train_timm_glyphs --arch resnet10t --margin arcface --seed 0          # CPU, reduced scale
    python -m examples.train_timm_glyphs --device cuda --max-classes 18831 --epochs 20 --batch 512   # on a GPU

timm imports torchvision. PyPI's torchvision wheels are built against CUDA builds of torch; beside
a CPU-only torch their compiled operators do not load and ``import torchvision`` fails. timm's
classification models use none of those operators, so :func:`import_timm` then declares the
operators' schemas that torchvision registers fake kernels for, and torchvision's Python part
(transforms, ``FrozenBatchNorm2d``) imports; where torchvision works it changes nothing.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from . import glyph_data, train_glyphs
from .realdata import Task, add_training_args, check_args, default_paths, summary_line, train

#: The schema declared for a torchvision operator whose compiled kernel did not load (only its name matters:
#: torchvision registers a fake kernel for it at import, nothing calls it).
_OP_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


def import_timm():
    """``import timm``, declaring the torchvision operators a CPU-only torch lacks (see the module docstring).

    Raises ImportError naming the install commands when timm or torchvision is missing.
    """
    declared: list[str] = []
    for _ in range(16):
        try:
            return importlib.import_module("timm")
        except ImportError as exc:
            raise ImportError(f"{exc}; install timm: pip install --no-deps timm && pip install huggingface_hub "
                              "safetensors pyyaml, and a torchvision matching your torch "
                              "(see docs/integrations.md)") from exc
        except RuntimeError as exc:
            m = re.search(r"operator torchvision::(\w+) does not exist", str(exc))
            if m is None or m.group(1) in declared:
                raise
            for name in [k for k in sys.modules if k == "torchvision" or k.startswith(("torchvision.", "timm"))]:
                del sys.modules[name]
            _library().define(m.group(1) + _OP_SCHEMA)
            declared.append(m.group(1))
    raise RuntimeError(f"torchvision still fails to import after declaring {declared}")


_LIB: list = []


def _library():
    if not _LIB:  # kept alive for the process: the declared schemas live as long as this object
        _LIB.append(torch.library.Library("torchvision", "DEF"))
    return _LIB[0]


class TimmEncoder(nn.Module):
    """Glyphs ``(B, S, S)`` uint8 or ``(B, 1, S, S)`` float in [0, 1] -> ``(B, dim)`` through a timm model."""

    def __init__(self, arch: str, dim: int, size: int, **kwargs):
        super().__init__()
        timm = import_timm()
        extra = {"img_size": size, "patch_size": 4} if arch.startswith(("vit", "deit")) else {}
        self.body = timm.create_model(arch, pretrained=False, in_chans=1, num_classes=dim, **extra, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div(255.0).unsqueeze(1)
        return self.body(x)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_training_args(p, epochs=3, batch=128, lr=2e-3)
    p.set_defaults(max_classes=1000, eval_classes=500, margin="arcface")
    p.add_argument("--arch", default="resnet10t", help="timm model name (default: resnet10t)")
    p.add_argument("--size", type=int, default=32, help="bitmap side in pixels (default: 32)")
    p.add_argument("--held-out", type=float, default=0.1, help="share of characters held out (default: 0.1)")
    p.add_argument("--held-out-font", default=glyph_data.HELD_OUT_FONT, choices=[f.name for f in glyph_data.FONTS])
    p.add_argument("--no-augment", action="store_true", help="train on the clean renderings")
    args = p.parse_args(argv)
    check_args(args)
    if not 16 <= args.size <= 96 or args.size % 8:
        raise SystemExit(f"error: --size must be a multiple of 8 in [16, 96], got {args.size}")
    default_paths(args, f"timm-{args.arch}-glyphs")
    return args


def build_task(args: argparse.Namespace, corpus: Optional[glyph_data.GlyphCorpus] = None) -> Task:
    """``examples/train_glyphs.py``'s task (corpus, split, augmentation), its encoder replaced by the timm model."""
    task = train_glyphs.build_task(args, corpus)
    torch.manual_seed(args.seed)
    task.encoder = TimmEncoder(args.arch, args.dim, args.size)
    task.info["encoder"] = f"timm {args.arch}"
    return task


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    result = train(build_task(args), args)
    print(summary_line(result))
    return result


if __name__ == "__main__":
    main()
