"""WordNet 3.0 synonym sets as a retrieval corpus: classes are synsets, samples are texts.

Source: Debian's ``wordnet-base`` package, ``/usr/share/wordnet/data.{noun,verb,adj,adv}``
(``apt-get install -y wordnet-base``). The files are parsed here directly (NLTK's reader wants a
``lexnames`` file the Debian package does not ship). Each data line is one synset::

    offset lex_filenum ss_type w_cnt(hex) word lex_id [word lex_id ...] p_cnt [pointers ...] [frames] | gloss

The gloss is a definition followed by quoted usage examples, separated by ``"; "``.

WordNet licence: WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved. The
licence (reproduced in full by :func:`licence_text`, which reads the header of the installed data
files, and in ``docs/results.md``) permits use, copying, modification and distribution provided
that its copyright notice and statements appear on all copies. THIS SOFTWARE AND DATABASE IS
PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES, EXPRESS OR
IMPLIED.

Samples of a synset (all lower-cased, whitespace collapsed, underscores as spaces, adjective
position markers such as ``(ip)`` removed): each lemma, the definition, each usage example.

**Texts shared by several synsets** (mostly polysemous lemma strings: "bank" names ten noun
synsets and eight verb synsets) are dropped from *every* synset they belong to: such a text does
not identify one class, so it can neither be a fair training sample (identical inputs with
different labels) nor a fair query or gallery item (a query "bank" would find another synset's
"bank" at cosine 1 and be scored on a coin toss). :attr:`WordNetCorpus.stats` counts what was
dropped, by kind. The synset keeps its other samples (its definition at least).
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .realdata import CachedFile, CorpusMissing, Split, file_fingerprint, split_classes

DEFAULT_DIRS = (Path("/usr/share/wordnet"), Path("/usr/local/share/wordnet"))
POS_FILES = ("noun", "verb", "adj", "adv")
APT_COMMAND = "apt-get install -y wordnet-base"
KINDS = ("lemma", "definition", "example")
CACHE_VERSION = 1
_MARKER = re.compile(r"\((a|p|ip)\)$")
_SPACE = re.compile(r"\s+")


@dataclass
class Synset:
    """One parsed data line: ``key`` is ``"<pos letter>:<offset>"`` (unique over the four files)."""

    key: str
    ss_type: str
    lemmas: list[str]
    definition: str
    examples: list[str]


def find_wordnet_dir(root: Optional[Path] = None) -> Path:
    """The directory holding ``data.noun``, ``data.verb``, ``data.adj`` and ``data.adv``.

    Raises :class:`CorpusMissing` (with the ``apt-get`` command) when none of ``root`` (if given)
    or :data:`DEFAULT_DIRS` has all four.
    """
    candidates = [Path(root)] if root is not None else list(DEFAULT_DIRS)
    for d in candidates:
        if all((d / f"data.{p}").is_file() for p in POS_FILES):
            return d
    where = ", ".join(str(d) for d in candidates)
    raise CorpusMissing(f"WordNet data files data.{{{','.join(POS_FILES)}}} not found in {where}. "
                        f"Install them with:\n    {APT_COMMAND}\n(or pass --wordnet-dir DIR)")


def normalize_text(s: str) -> str:
    return _SPACE.sub(" ", s.replace("_", " ")).strip().lower()


def parse_gloss(gloss: str) -> tuple[str, list[str]]:
    """Split a gloss into its definition and its quoted usage examples."""
    definition, examples = [], []
    for part in gloss.strip().split("; "):
        part = part.strip()
        if part.startswith('"'):
            end = part.rfind('"')
            text = part[1:end] if end > 0 else part[1:]
            if text.strip():
                examples.append(text.strip())
        elif part:
            definition.append(part)
    return "; ".join(definition), examples


def parse_line(line: str, pos: str) -> Optional[Synset]:
    """One synset from a data line; ``None`` for licence lines (they begin with two spaces) and blanks.

    Raises ``ValueError`` naming the line when it is malformed.
    """
    if not line.strip() or line.startswith("  "):
        return None
    head, sep, gloss = line.partition(" | ")
    tokens = head.split()
    try:
        offset, ss_type, w_cnt = tokens[0], tokens[2], int(tokens[3], 16)
        words = tokens[4:4 + 2 * w_cnt:2]
        if len(words) != w_cnt or not offset.isdigit() or w_cnt < 1:
            raise ValueError
    except (IndexError, ValueError):
        raise ValueError(f"malformed WordNet data line: {line[:120]!r}") from None
    lemmas = [_MARKER.sub("", w) for w in words]
    definition, examples = parse_gloss(gloss) if sep else ("", [])
    return Synset(f"{pos[0] if pos != 'adv' else 'r'}:{offset}", ss_type, lemmas, definition, examples)


def licence_text(root: Optional[Path] = None) -> str:
    """WordNet's licence, as the header of the installed ``data.noun`` carries it."""
    lines = []
    with open(find_wordnet_dir(root) / "data.noun", encoding="utf-8") as f:
        for line in f:
            if not line.startswith("  "):
                break
            lines.append(re.sub(r"^\s+\d+\s?", "", line.rstrip()))
    return "\n".join(lines).strip()


def parse_wordnet(root: Optional[Path] = None) -> list[Synset]:
    """Every synset of the four data files, in file order."""
    d = find_wordnet_dir(root)
    out = []
    for pos in POS_FILES:
        with open(d / f"data.{pos}", encoding="utf-8", errors="replace") as f:
            for line in f:
                s = parse_line(line, pos)
                if s is not None:
                    out.append(s)
    return out


@dataclass
class WordNetCorpus:
    """Samples of all synsets: ``texts[i]`` of class ``labels[i]`` (index into ``class_keys``), kind
    ``kinds[i]`` (index into :data:`KINDS`). ``stats`` counts synsets, samples and dropped texts."""

    texts: list[str]
    labels: np.ndarray
    kinds: np.ndarray
    class_keys: list[str]
    stats: dict = field(default_factory=dict)

    def split(self, *, held_out_fraction: float = 0.1, max_classes: Optional[int] = None,
              eval_classes: Optional[int] = None) -> Split:
        """Held-out synsets: a fixed ``held_out_fraction`` chosen by hash of the synset key. Training
        keeps synsets with at least two samples; evaluation takes every sample of the held-out ones."""
        ok = np.ones(len(self.labels), dtype=bool)
        return split_classes(self.class_keys, self.labels, ok, ok, held_out_fraction=held_out_fraction,
                             salt="wordnet", max_classes=max_classes, eval_classes=eval_classes)


def build_corpus(synsets: Sequence[Synset]) -> WordNetCorpus:
    """Samples of ``synsets``, dropping every text that belongs to more than one synset."""
    owners: dict[str, set[int]] = defaultdict(set)
    per_class: list[list[tuple[str, int]]] = []
    for c, s in enumerate(synsets):
        items = [(normalize_text(w), 0) for w in s.lemmas]
        if s.definition:
            items.append((normalize_text(s.definition), 1))
        items += [(normalize_text(e), 2) for e in s.examples]
        seen, uniq = set(), []
        for text, kind in items:
            if text and text not in seen:
                seen.add(text)
                uniq.append((text, kind))
                owners[text].add(c)
        per_class.append(uniq)
    texts, labels, kinds = [], [], []
    dropped = {k: 0 for k in KINDS}
    for c, items in enumerate(per_class):
        for text, kind in items:
            if len(owners[text]) > 1:
                dropped[KINDS[kind]] += 1
                continue
            texts.append(text)
            labels.append(c)
            kinds.append(kind)
    labels_a = np.array(labels, dtype=np.int64)
    counts = np.bincount(labels_a, minlength=len(synsets))
    shared = [t for t, o in owners.items() if len(o) > 1]
    stats = {
        "synsets": len(synsets),
        "synsets_with_2plus_lemmas": sum(len(s.lemmas) >= 2 for s in synsets),
        "lemma_occurrences": sum(len(s.lemmas) for s in synsets),
        "usage_examples": sum(len(s.examples) for s in synsets),
        "shared_texts": len(shared),
        "dropped_occurrences": dropped,
        "samples": len(texts),
        "samples_by_kind": {k: int((np.array(kinds) == i).sum()) for i, k in enumerate(KINDS)},
        "synsets_with_2plus_samples": int((counts >= 2).sum()),
        "synsets_with_1_sample": int((counts == 1).sum()),
        "synsets_with_0_samples": int((counts == 0).sum()),
    }
    return WordNetCorpus(texts, labels_a, np.array(kinds, dtype=np.int8), [s.key for s in synsets], stats)


def load_corpus(root: Optional[Path] = None, cache_dir: Optional[Path] = None) -> WordNetCorpus:
    """The corpus of the installed WordNet, from the cache in ``cache_dir`` when it is valid
    (rebuilt when missing, stale or corrupt; no caching when ``cache_dir`` is None)."""
    d = find_wordnet_dir(root)
    if cache_dir is None:
        return build_corpus(parse_wordnet(d))
    cache = CachedFile(Path(cache_dir) / "wordnet-corpus.json",
                       {"version": CACHE_VERSION, "sources": file_fingerprint(d / f"data.{p}" for p in POS_FILES)})
    path = cache.load()
    if path is not None:
        try:
            raw = json.loads(path.read_text())
            corpus = WordNetCorpus(raw["texts"], np.array(raw["labels"], dtype=np.int64),
                                   np.array(raw["kinds"], dtype=np.int8), raw["class_keys"], raw["stats"])
            if len(corpus.texts) == len(corpus.labels) == len(corpus.kinds) == corpus.stats["samples"]:
                return corpus
        except (ValueError, KeyError, TypeError):
            pass
        print(f"cache {path}: inconsistent content; rebuilding", file=sys.stderr)
    corpus = build_corpus(parse_wordnet(d))
    cache.store(lambda p: p.write_text(json.dumps({
        "texts": corpus.texts, "labels": corpus.labels.tolist(), "kinds": corpus.kinds.tolist(),
        "class_keys": corpus.class_keys, "stats": corpus.stats})))
    return corpus


def encode_texts(texts: Sequence[str], length: int = 64) -> "np.ndarray":
    """UTF-8 bytes of each text, truncated or zero-padded to ``length``, shifted by one so that 0 is
    padding: an ``(N, length)`` uint8 array (byte 255 maps to 255 as well; no WordNet text has it)."""
    out = np.zeros((len(texts), length), dtype=np.uint8)
    for i, t in enumerate(texts):
        b = np.frombuffer(t.encode("utf-8")[:length], dtype=np.uint8)
        out[i, :len(b)] = np.minimum(b.astype(np.int32) + 1, 255)
    return out
