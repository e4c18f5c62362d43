"""Train a small CNN on CJK glyphs in four font designs; evaluate on held-out characters in all five.

Run from the repository root (fonts first:
``apt-get install -y fonts-noto-cjk fonts-wqy-zenhei fonts-arphic-ukai fonts-arphic-uming``)::

    python -m examples.train_glyphs --margin arcface --max-classes 4000 --eval-classes 1000 --epochs 4 --seed 0

Classes are characters, samples their renderings (see ``examples/glyph_data.py``: which
renderings are kept, the held-out characters and the held-out font). Training renderings are
jittered on the fly (shift, rotation, scale). The encoder is three conv-BN-ReLU-pool blocks and a
linear layer; a :class:`marginops.MarginHead` spans every training character. Evaluation embeds
the held-out characters in every font, each rendering ranks all the others by cosine
(top-1/5/10, also by the query's font: the held-out font's queries are the hardest), plus the
answer-or-abstain curve. Checkpoint after every epoch, ``--resume``, result JSON in ``--out``.

Missing fonts end the program with the ``apt-get`` command to run and exit status 2.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from . import glyph_data
from .realdata import Task, add_training_args, check_args, default_paths, exit_if_missing, summary_line, train


class GlyphCNN(nn.Module):
    """Images ``(B, S, S)`` uint8 or ``(B, 1, S, S)`` float in [0, 1] -> ``(B, dim)``."""

    def __init__(self, dim: int = 128, size: int = 32, widths: Sequence[int] = (16, 32, 64)):
        super().__init__()
        layers, c = [], 1
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        side = size // 2 ** len(widths)
        self.proj = nn.Linear(c * side * side, dim)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div(255.0).unsqueeze(1)
        return self.proj(self.features(x).flatten(1))


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    return glyph_data.augment(x.float().div(255.0).unsqueeze(1), gen)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_training_args(p, epochs=6, batch=256, lr=2e-3)
    p.add_argument("--size", type=int, default=32, help="bitmap side in pixels (default: 32)")
    p.add_argument("--held-out", type=float, default=0.1, help="share of characters held out (default: 0.1)")
    p.add_argument("--held-out-font", default=glyph_data.HELD_OUT_FONT,
                   choices=[f.name for f in glyph_data.FONTS])
    p.add_argument("--no-augment", action="store_true", help="train on the clean renderings")
    args = p.parse_args(argv)
    check_args(args)
    if not 16 <= args.size <= 96 or args.size % 8:
        raise SystemExit(f"error: --size must be a multiple of 8 in [16, 96], got {args.size}")
    default_paths(args, "glyphs")
    return args


def build_task(args: argparse.Namespace, corpus: Optional[glyph_data.GlyphCorpus] = None) -> Task:
    if corpus is None:
        corpus = exit_if_missing(lambda: glyph_data.load_corpus(args.cache_dir, size=args.size))
    split = corpus.split(held_out_fraction=args.held_out, held_out_font=args.held_out_font,
                         max_classes=args.max_classes, eval_classes=args.eval_classes)
    x = torch.from_numpy(corpus.images)
    torch.manual_seed(args.seed)
    return Task("glyphs", x[split.train_idx], torch.from_numpy(split.train_labels), x[split.eval_idx],
                torch.from_numpy(split.eval_labels), split.num_train_classes, GlyphCNN(args.dim, args.size),
                augment=None if args.no_augment else _augment,
                eval_groups=torch.from_numpy(corpus.fonts[split.eval_idx].astype("int64")),
                group_names=list(corpus.font_names),
                info={"corpus_stats": corpus.stats, "held_out_fraction": args.held_out,
                      "held_out_font": args.held_out_font, "size": args.size, "augment": not args.no_augment})


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    result = train(build_task(args), args)
    print(summary_line(result))
    return result


if __name__ == "__main__":
    main()
