"""Train a character-level CNN on WordNet synsets with a margin head; evaluate on held-out synsets.

Run from the repository root (``apt-get install -y wordnet-base`` first)::

    python -m examples.train_wordnet --margin cosface --max-classes 5000 --eval-classes 2000 --epochs 8 --seed 0

Classes are synsets, samples their lemmas, definitions and usage examples (see
``examples/wordnet_data.py`` for the parsing and for how texts shared by several synsets are
handled). The encoder reads UTF-8 bytes (first ``--length`` of them) through one convolution
over byte trigrams and a max-pool over positions; a :class:`marginops.MarginHead` spans every
training synset. After every epoch the held-out synsets' samples are embedded and each ranks all
the others by cosine (top-1/5/10); the final record adds the answer-or-abstain curve. A checkpoint is written after
every epoch (``--resume`` continues from it), the result record to ``--out`` as JSON.

A missing WordNet ends the program with the ``apt-get`` command to run and exit status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import wordnet_data
from .realdata import Task, add_training_args, check_args, default_paths, exit_if_missing, summary_line, train


class CharCNN(nn.Module):
    """Bytes ``(B, L)`` (0 = padding) -> ``(B, dim)``: byte embedding, one convolution over ``kernel``
    bytes (character n-grams), max-pool over the text's positions, linear projection."""

    def __init__(self, dim: int = 128, width: int = 256, char_dim: int = 48, kernel: int = 3):
        super().__init__()
        self.emb = nn.Embedding(256, char_dim, padding_idx=0)
        self.conv = nn.Conv1d(char_dim, width, kernel, padding=kernel // 2)
        self.proj = nn.Linear(width, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x.long()
        pad = (x == 0)[:, None, :]
        h = F.relu(self.conv(self.emb(x).transpose(1, 2)))
        return self.proj(h.masked_fill(pad, 0.0).amax(2))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_training_args(p, epochs=6, batch=256, lr=2e-3)
    p.add_argument("--wordnet-dir", type=Path, default=None,
                   help="directory of data.{noun,verb,adj,adv} (default: /usr/share/wordnet)")
    p.add_argument("--length", type=int, default=48, help="bytes read per text (default: 48)")
    p.add_argument("--held-out", type=float, default=0.1, help="share of synsets held out (default: 0.1)")
    args = p.parse_args(argv)
    check_args(args)
    default_paths(args, "wordnet")
    return args


def build_task(args: argparse.Namespace) -> Task:
    corpus = exit_if_missing(lambda: wordnet_data.load_corpus(args.wordnet_dir, args.cache_dir))
    split = corpus.split(held_out_fraction=args.held_out, max_classes=args.max_classes,
                         eval_classes=args.eval_classes)
    x = torch.from_numpy(wordnet_data.encode_texts(corpus.texts, args.length))
    torch.manual_seed(args.seed)
    return Task("wordnet", x[split.train_idx], torch.from_numpy(split.train_labels), x[split.eval_idx],
                torch.from_numpy(split.eval_labels), split.num_train_classes, CharCNN(args.dim),
                info={"corpus_stats": corpus.stats, "held_out_fraction": args.held_out, "length": args.length})


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    result = train(build_task(args), args)
    print(summary_line(result))
    return result


if __name__ == "__main__":
    main()
