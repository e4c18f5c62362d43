"""CJK characters in several font designs as a retrieval corpus: classes are characters, samples
are renderings.

Fonts (Debian packages): Noto Sans CJK SC and Noto Serif CJK SC (``fonts-noto-cjk``),
WenQuanYi Zen Hei (``fonts-wqy-zenhei``), AR PL UKai CN (``fonts-arphic-ukai``) and AR PL UMing CN
(``fonts-arphic-uming``)::

    apt-get install -y fonts-noto-cjk fonts-wqy-zenhei fonts-arphic-ukai fonts-arphic-uming

Characters: the CJK Unified Ideographs block, U+4E00..U+9FFF. Each is drawn with each font in
white on black, centred on its ink box, in a ``size x size`` grey-scale bitmap (Pillow).

**Fonts lie**: a font asked for a code point it lacks draws nothing, or its ``.notdef`` box, or
some other shared placeholder. A character is kept *for a font* only if its bitmap inks (at least
:data:`MIN_INK` pixels above half intensity) and no other character of that font has the very same
bitmap (byte for byte); every character sharing a bitmap is dropped for that font, the real owner
included, since it cannot be told from the placeholders. :attr:`GlyphCorpus.stats` counts both.

Split: held-out characters (10% by a hash of the code point) never appear in training; the
held-out font (AR PL UKai, the brush-style design, by default) never appears in training either.
Training samples: training characters in the other fonts (augmented on the fly by
:func:`augment`); evaluation samples: held-out characters in every font that keeps them, except
that 20% of the held-out characters keep a single rendering, to make the must-abstain queries.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .realdata import CachedFile, CorpusMissing, Split, file_fingerprint, held_out_mask, split_classes


@dataclass(frozen=True)
class FontSpec:
    name: str
    package: str
    paths: tuple[str, ...]
    family: str  # the face of a collection (.ttc) to use, by its family name


FONTS = (
    FontSpec("Noto Sans CJK", "fonts-noto-cjk", ("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",),
             "Noto Sans CJK SC"),
    FontSpec("Noto Serif CJK", "fonts-noto-cjk", ("/usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc",),
             "Noto Serif CJK SC"),
    FontSpec("WenQuanYi Zen Hei", "fonts-wqy-zenhei", ("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",),
             "WenQuanYi Zen Hei"),
    FontSpec("AR PL UKai", "fonts-arphic-ukai", ("/usr/share/fonts/truetype/arphic/ukai.ttc",), "AR PL UKai CN"),
    FontSpec("AR PL UMing", "fonts-arphic-uming", ("/usr/share/fonts/truetype/arphic/uming.ttc",),
             "AR PL UMing CN"),
)
HELD_OUT_FONT = "AR PL UKai"
CJK_RANGE = (0x4E00, 0xA000)  # U+4E00 .. U+9FFF
MIN_INK = 4
CACHE_VERSION = 1


def _pil():
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        raise CorpusMissing("Pillow is needed to render glyphs. Install it with:\n    pip install Pillow") from None
    return Image, ImageDraw, ImageFont


def find_fonts(specs: Optional[Sequence[FontSpec]] = None) -> list[tuple[FontSpec, Path, int]]:
    """``(spec, file, face index)`` of each font of ``specs`` (default: :data:`FONTS`); :class:`CorpusMissing`
    naming the ``apt-get`` command for every package whose font is missing."""
    specs = FONTS if specs is None else specs
    paths = [next((Path(p) for p in spec.paths if Path(p).is_file()), None) for spec in specs]
    missing = [spec for spec, path in zip(specs, paths) if path is None]
    if missing:
        pkgs = " ".join(dict.fromkeys(s.package for s in missing))
        raise CorpusMissing(f"font(s) not found: {', '.join(s.name for s in missing)}. Install them with:\n"
                            f"    apt-get install -y {pkgs}")
    _, _, ImageFont = _pil()
    found = []
    for spec, path in zip(specs, paths):
        index = None
        for i in range(32):
            try:
                if " ".join(ImageFont.truetype(str(path), 12, index=i).getname()[:1]) == spec.family:
                    index = i
                    break
            except OSError:
                break
        if index is None:
            raise CorpusMissing(f"{path} has no face named {spec.family!r}; reinstall it with:\n"
                                f"    apt-get install --reinstall -y {spec.package}")
        found.append((spec, path, index))
    return found


def render_font(path: Path, index: int, codepoints: Sequence[int], size: int = 32) -> np.ndarray:
    """``(len(codepoints), size, size)`` uint8 bitmaps, each character centred on its ink box."""
    Image, ImageDraw, ImageFont = _pil()
    font = ImageFont.truetype(str(path), round(size * 0.875), index=index)
    out = np.zeros((len(codepoints), size, size), dtype=np.uint8)
    for i, cp in enumerate(codepoints):
        ch = chr(cp)
        im = Image.new("L", (size, size), 0)
        box = font.getbbox(ch)
        ImageDraw.Draw(im).text((size / 2 - (box[0] + box[2]) / 2, size / 2 - (box[1] + box[3]) / 2), ch,
                                fill=255, font=font)
        out[i] = np.asarray(im)
    return out


def keep_mask(bitmaps: np.ndarray) -> tuple[np.ndarray, dict]:
    """Which bitmaps a font really draws: inked, and not byte-identical to another bitmap of the font."""
    inks = (bitmaps > 127).reshape(len(bitmaps), -1).sum(1) >= MIN_INK
    digests = [hashlib.sha1(b.tobytes()).digest() for b in bitmaps]
    count: dict[bytes, int] = {}
    for d, ok in zip(digests, inks):
        if ok:
            count[d] = count.get(d, 0) + 1
    unique = np.array([count.get(d, 0) == 1 for d in digests])
    keep = inks & unique
    return keep, {"blank": int((~inks).sum()), "shared_bitmap": int((inks & ~unique).sum()), "kept": int(keep.sum())}


@dataclass
class GlyphCorpus:
    """Sample ``i`` is ``images[i]`` (uint8, ``size x size``): character ``codepoints[labels[i]]`` in font
    ``font_names[fonts[i]]``. ``stats`` counts, per font, the blank and shared bitmaps dropped."""

    images: np.ndarray
    labels: np.ndarray
    fonts: np.ndarray
    codepoints: np.ndarray
    font_names: list[str]
    stats: dict = field(default_factory=dict)

    @property
    def class_keys(self) -> list[str]:
        return [f"U+{cp:04X}" for cp in self.codepoints]

    def split(self, *, held_out_fraction: float = 0.1, held_out_font: Optional[str] = HELD_OUT_FONT,
              max_classes: Optional[int] = None, eval_classes: Optional[int] = None,
              singleton_fraction: float = 0.2) -> Split:
        """Held-out characters by hash; training never sees them nor ``held_out_font``. A training character
        needs at least two fonts. Evaluation takes every rendering of the held-out characters, except that
        a ``singleton_fraction`` of them (by another hash) keep one rendering only (in the held-out font
        where it has one, else in the first font that has it): characters the gallery lacks, whose
        queries must abstain (nearly every character has several fonts, so few would otherwise)."""
        train_ok = np.ones(len(self.labels), dtype=bool)
        held_font = -1
        if held_out_font is not None:
            if held_out_font not in self.font_names:
                raise ValueError(f"held_out_font must be one of {self.font_names}, got {held_out_font!r}")
            held_font = self.font_names.index(held_out_font)
            train_ok = self.fonts != held_font
        if not 0.0 <= singleton_fraction < 1.0:
            raise ValueError(f"singleton_fraction must lie in [0, 1), got {singleton_fraction!r}")
        eval_ok = np.ones_like(train_ok)
        if singleton_fraction > 0:
            single = held_out_mask(self.class_keys, singleton_fraction, "glyphs-singleton")
            chosen: dict[int, int] = {}
            for i in np.nonzero(single[self.labels])[0]:
                c = int(self.labels[i])
                j = chosen.get(c)
                better = self.fonts[i] == held_font or (self.fonts[j] != held_font and self.fonts[i] < self.fonts[j]) \
                    if j is not None else True
                if better:
                    chosen[c] = int(i)
            eval_ok[np.nonzero(single[self.labels])[0]] = False
            eval_ok[np.array(sorted(chosen.values()), dtype=np.int64)] = True
        return split_classes(self.class_keys, self.labels, train_ok, eval_ok,
                             held_out_fraction=held_out_fraction, salt="glyphs", max_classes=max_classes,
                             eval_classes=eval_classes)


def build_corpus(fonts: Sequence[tuple[FontSpec, Path, int]], codepoints: Sequence[int],
                 size: int = 32) -> GlyphCorpus:
    """Render ``codepoints`` in every font and keep the (font, character) pairs that really ink."""
    cps = np.asarray(codepoints, dtype=np.int64)
    images, labels, font_of, stats = [], [], [], {}
    for f, (spec, path, index) in enumerate(fonts):
        bitmaps = render_font(path, index, cps, size)
        keep, st = keep_mask(bitmaps)
        stats[spec.name] = st
        images.append(bitmaps[keep])
        labels.append(np.nonzero(keep)[0])
        font_of.append(np.full(int(keep.sum()), f, dtype=np.int8))
    labels_a = np.concatenate(labels)
    per_class = np.bincount(labels_a, minlength=len(cps))
    stats["characters"] = len(cps)
    stats["characters_by_fonts"] = {str(k): int((per_class == k).sum()) for k in range(len(fonts) + 1)}
    return GlyphCorpus(np.concatenate(images), labels_a, np.concatenate(font_of), cps,
                       [spec.name for spec, _, _ in fonts], stats)


def load_corpus(cache_dir: Optional[Path] = None, *, fonts: Optional[Sequence[tuple[FontSpec, Path, int]]] = None,
                codepoints: Optional[Sequence[int]] = None, size: int = 32) -> GlyphCorpus:
    """The corpus from the cache in ``cache_dir`` when it is valid (rebuilt when missing, stale or
    corrupt; no caching when ``cache_dir`` is None). Rendering all five fonts takes about a minute."""
    import json
    fonts = find_fonts() if fonts is None else list(fonts)
    cps = list(range(*CJK_RANGE)) if codepoints is None else [int(c) for c in codepoints]
    if cache_dir is None:
        return build_corpus(fonts, cps, size)
    key = hashlib.sha256(json.dumps(cps).encode()).hexdigest()[:16]
    cache = CachedFile(Path(cache_dir) / f"glyphs-{size}px-{key}.npz", {
        "version": CACHE_VERSION, "size": size, "codepoints": key, "min_ink": MIN_INK,
        "fonts": [[s.name, s.family, i] for s, _, i in fonts], "sources": file_fingerprint(p for _, p, _ in fonts)})
    path = cache.load()
    if path is not None:
        try:
            with np.load(path, allow_pickle=False) as z:
                corpus = GlyphCorpus(z["images"], z["labels"], z["fonts"], z["codepoints"],
                                     [str(s) for s in z["font_names"]], json.loads(str(z["stats"])))
            n = len(corpus.images)
            if n == len(corpus.labels) == len(corpus.fonts) and corpus.images.shape[1:] == (size, size):
                return corpus
        except (OSError, ValueError, KeyError):
            pass
        print(f"cache {path}: inconsistent content; rebuilding", file=sys.stderr)
    corpus = build_corpus(fonts, cps, size)

    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez(f, images=corpus.images, labels=corpus.labels, fonts=corpus.fonts, codepoints=corpus.codepoints,
                     font_names=np.array(corpus.font_names), stats=np.array(json.dumps(corpus.stats)))
    cache.store(write)
    return corpus


def augment(x: Tensor, gen: torch.Generator, max_shift: float = 0.08, max_rotate: float = 0.1,
            scale_range: tuple[float, float] = (0.9, 1.1)) -> Tensor:
    """Random affine jitter of a batch ``(B, 1, H, W)``: shift up to ``max_shift`` of the width,
    rotation up to ``max_rotate`` radians, scale in ``scale_range``."""
    b = x.shape[0]
    r = torch.rand(b, 4, generator=gen)
    ang = (r[:, 0] * 2 - 1) * max_rotate
    sc = scale_range[0] + r[:, 1] * (scale_range[1] - scale_range[0])
    tx, ty = ((r[:, 2:] * 2 - 1) * max_shift * 2).unbind(1)
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
