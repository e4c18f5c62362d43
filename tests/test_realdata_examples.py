"""The real-data examples: WordNet and glyph data modules on tiny fixtures, the retrieval metrics, a smoke
training run (loss falls, evaluation runs, resume continues), and missing corpora (exit status 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from examples import glyph_data, realdata, wordnet_data
from examples.realdata import CachedFile, CorpusMissing, retrieval_metrics

REPO_ROOT = Path(__file__).resolve().parent.parent

LICENCE = "  1 This software and database is being provided to you, the LICENSEE, by  \n" \
          "  2 Princeton University under the following license.  \n"
NOUN = LICENCE + (
    "00001740 03 n 02 entity 0 Bank 0 001 ~ 00001930 n 0000 | that which exists; \"the entity is here\"\n"
    "00001930 03 n 01 bank 0 000 | sloping land beside water; \"they sat on the bank\"; \"a grassy bank\"\n"
    "00002137 03 n 03 abstraction 0 abstract_entity 0 idea 1 000 | a general concept\n")
VERB = LICENCE + "00001740 29 v 01 breathe 0 000 02 + 02 00 + 08 00 | draw air into the lungs; \"breathe deeply\"\n"
ADJ = LICENCE + "00014358 00 s 02 abounding 0 galore(ip) 0 001 & 00013887 a 0000 | existing in abundance\n"
ADV = LICENCE + "00001740 02 r 01 idea 0 000 | a second idea, sharing its lemma with a noun\n"


def write_wordnet(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for pos, text in files.items():
        (root / f"data.{pos}").write_text(text)
    return root


@pytest.fixture
def tiny_wordnet(tmp_path) -> Path:
    return write_wordnet(tmp_path / "wn", {"noun": NOUN, "verb": VERB, "adj": ADJ, "adv": ADV})


# ------------------------------------------------------------------------------------------------ WordNet

def test_parse_line_fields():
    s = wordnet_data.parse_line("00014358 00 s 02 abounding 0 galore(ip) 0 001 & 00013887 a 0000 | "
                                "existing in abundance; \"abounding confidence\"; \"food galore\"", "adj")
    assert (s.key, s.ss_type, s.lemmas) == ("a:00014358", "s", ["abounding", "galore"])
    assert s.definition == "existing in abundance"
    assert s.examples == ["abounding confidence", "food galore"]
    # w_cnt is hexadecimal: 0a = ten words
    words = " ".join(f"w{i} 0" for i in range(10))
    assert len(wordnet_data.parse_line(f"00000001 03 n 0a {words} 000 | x", "noun").lemmas) == 10
    assert wordnet_data.parse_line("  1 This software and database", "noun") is None
    with pytest.raises(ValueError, match="malformed WordNet data line"):
        wordnet_data.parse_line("00000001 03 n 03 only_one 0 000 | x", "noun")


def test_corpus_drops_shared_texts(tiny_wordnet):
    synsets = wordnet_data.parse_wordnet(tiny_wordnet)
    assert [s.key for s in synsets] == ["n:00001740", "n:00001930", "n:00002137", "v:00001740", "a:00014358",
                                        "r:00001740"]
    c = wordnet_data.build_corpus(synsets)
    # "Bank"/"bank" (case-folded) and "idea" each belong to two synsets: dropped from all four occurrences
    assert "bank" not in c.texts and "idea" not in c.texts
    assert c.stats["dropped_occurrences"] == {"lemma": 4, "definition": 0, "example": 0}
    assert c.stats["shared_texts"] == 2
    by_class = {k: sorted(t for t, lab in zip(c.texts, c.labels) if c.class_keys[lab] == k) for k in c.class_keys}
    assert by_class["n:00001930"] == ["a grassy bank", "sloping land beside water", "they sat on the bank"]
    assert by_class["n:00002137"] == ["a general concept", "abstract entity", "abstraction"]
    assert by_class["a:00014358"] == ["abounding", "existing in abundance", "galore"]
    assert len(c.texts) == len(c.labels) == len(c.kinds) == c.stats["samples"] == 16
    assert c.stats["synsets_with_2plus_lemmas"] == 3 and c.stats["usage_examples"] == 4


def test_licence_is_read_from_the_data_files(tiny_wordnet):
    assert wordnet_data.licence_text(tiny_wordnet).startswith("This software and database is being provided")


def test_missing_wordnet_names_the_install_command(tmp_path):
    with pytest.raises(CorpusMissing, match="apt-get install -y wordnet-base"):
        wordnet_data.find_wordnet_dir(tmp_path)


@pytest.mark.parametrize("module", ["examples.train_wordnet", "examples.train_glyphs"])
def test_missing_corpus_exits_2_without_traceback(tmp_path, module):
    if module.endswith("wordnet"):
        cmd = [sys.executable, "-m", module, "--wordnet-dir", str(tmp_path / "nowhere"), "--cache-dir", str(tmp_path)]
        env_patch = ""
    else:  # point every font at a path that does not exist
        cmd = [sys.executable, "-c",
               "import dataclasses, sys; from examples import glyph_data as g;"
               "g.FONTS = tuple(dataclasses.replace(f, paths=('/nonexistent/x.ttc',)) for f in g.FONTS);"
               "from examples import train_glyphs; sys.argv = ['train_glyphs', '--cache-dir', sys.argv[1]];"
               "train_glyphs.main()", str(tmp_path)]
        env_patch = "fonts-noto-cjk fonts-wqy-zenhei fonts-arphic-ukai fonts-arphic-uming"
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "apt-get install -y " + (env_patch or "wordnet-base") in proc.stderr


def test_cache_roundtrip_and_corruption_rebuilds(tiny_wordnet, tmp_path, capsys):
    cache = tmp_path / "cache"
    first = wordnet_data.load_corpus(tiny_wordnet, cache)
    path = cache / "wordnet-corpus.json"
    assert path.exists() and path.with_name(path.name + ".manifest.json").exists()
    again = wordnet_data.load_corpus(tiny_wordnet, cache)
    assert again.texts == first.texts and np.array_equal(again.labels, first.labels)
    assert "rebuilding" not in capsys.readouterr().err
    # corrupt the cache with a plausible but wrong payload of the same size: the checksum catches it
    raw = json.loads(path.read_text())
    raw["labels"] = raw["labels"][::-1]
    path.write_text(json.dumps(raw).ljust(path.stat().st_size)[:path.stat().st_size])
    rebuilt = wordnet_data.load_corpus(tiny_wordnet, cache)
    assert "corrupt" in capsys.readouterr().err
    assert np.array_equal(rebuilt.labels, first.labels) and rebuilt.texts == first.texts
    # a changed source file invalidates the cache too
    write_wordnet(tiny_wordnet, {"adv": ADV + "00001999 02 r 01 quickly 0 000 | with speed\n"})
    grown = wordnet_data.load_corpus(tiny_wordnet, cache)
    assert "other sources" in capsys.readouterr().err and "quickly" in grown.texts


def test_cache_manifest_missing_or_garbled(tmp_path, capsys):
    target = tmp_path / "x.bin"
    c = CachedFile(target, {"v": 1})
    assert c.load() is None
    c.store(lambda p: p.write_bytes(b"abc"))
    assert c.load() == target
    c.manifest.write_text("{not json")
    assert c.load() is None and "unreadable manifest" in capsys.readouterr().err
    assert CachedFile(target, {"v": 2}).load() is None


def test_split_is_deterministic_and_disjoint():
    keys = [f"k{i}" for i in range(500)]
    labels = np.repeat(np.arange(500), 3)
    ok = np.ones(len(labels), dtype=bool)
    a = realdata.split_classes(keys, labels, ok, ok, held_out_fraction=0.2, salt="t", max_classes=100,
                               eval_classes=30)
    b = realdata.split_classes(keys, labels, ok, ok, held_out_fraction=0.2, salt="t", max_classes=100,
                               eval_classes=30)
    assert a.train_classes == b.train_classes and np.array_equal(a.eval_idx, b.eval_idx)
    assert a.num_train_classes == 100 and a.num_eval_classes == 30
    assert not set(a.train_classes) & set(a.eval_classes)
    assert set(np.unique(a.train_labels)) == set(range(100)) and len(a.train_idx) == 300
    # the held-out set does not depend on how many training classes are used
    c = realdata.split_classes(keys, labels, ok, ok, held_out_fraction=0.2, salt="t", eval_classes=30)
    assert c.eval_classes == a.eval_classes and c.num_train_classes > 300
    with pytest.raises(ValueError, match="max_classes"):
        realdata.split_classes(keys, labels, ok, ok, held_out_fraction=0.2, salt="t", max_classes=0)
    with pytest.raises(ValueError, match="held-out fraction"):
        realdata.split_classes(keys, labels, ok, ok, held_out_fraction=1.5, salt="t")


# ------------------------------------------------------------------------------------------------ glyphs

def test_keep_mask_drops_blank_and_shared_bitmaps():
    bm = np.zeros((5, 8, 8), dtype=np.uint8)
    bm[1, 2:4, 2:4] = 255          # unique
    bm[2, 0:3, 0:3] = 255          # shared with 3 (a placeholder box)
    bm[3, 0:3, 0:3] = 255
    bm[4, 5, 5] = 255              # inks only one pixel: below MIN_INK
    keep, st = glyph_data.keep_mask(bm)
    assert keep.tolist() == [False, True, False, False, False]
    assert st == {"blank": 2, "shared_bitmap": 2, "kept": 1}


def _one_font():
    for spec in glyph_data.FONTS:
        try:
            return glyph_data.find_fonts([spec])
        except CorpusMissing:
            continue
    pytest.skip("no CJK font installed (apt-get install -y fonts-wqy-zenhei or another of glyph_data.FONTS)")


def test_one_font_renders_and_drops_what_it_lacks(tmp_path, capsys):
    fonts = _one_font()
    # 48 Han characters, plus private-use code points no CJK font draws as distinct glyphs
    cps = list(range(0x4E00, 0x4E30)) + list(range(0xE000, 0xE008))
    corpus = glyph_data.load_corpus(tmp_path, fonts=fonts, codepoints=cps, size=32)
    st = corpus.stats[fonts[0][0].name]
    assert st["kept"] + st["blank"] + st["shared_bitmap"] == len(cps)
    kept = set(corpus.codepoints[corpus.labels].tolist())
    assert not kept & set(range(0xE000, 0xE008))     # placeholders: blank or one shared .notdef box
    assert len(kept & set(range(0x4E00, 0x4E30))) >= 40
    assert corpus.images.shape[1:] == (32, 32) and corpus.images.dtype == np.uint8
    assert all((img > 127).sum() >= glyph_data.MIN_INK for img in corpus.images)
    assert len({img.tobytes() for img in corpus.images}) == len(corpus.images)
    # cache: valid, then corrupted (a flipped byte) -> rebuilt with the same content
    npz = next(tmp_path.glob("glyphs-*.npz"))
    blob = bytearray(npz.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    npz.write_bytes(bytes(blob))
    again = glyph_data.load_corpus(tmp_path, fonts=fonts, codepoints=cps, size=32)
    assert "corrupt" in capsys.readouterr().err
    assert np.array_equal(again.images, corpus.images) and np.array_equal(again.labels, corpus.labels)


def test_glyph_split_holds_out_characters_and_font():
    rng = np.random.default_rng(0)
    n_cls, n_font = 300, 3
    labels = np.repeat(np.arange(n_cls), n_font)
    fonts = np.tile(np.arange(n_font), n_cls).astype(np.int8)
    corpus = glyph_data.GlyphCorpus(rng.integers(0, 255, (len(labels), 8, 8), dtype=np.uint8), labels, fonts,
                                    np.arange(0x4E00, 0x4E00 + n_cls), ["A", "B", "C"])
    s = corpus.split(held_out_fraction=0.2, held_out_font="C", singleton_fraction=0.25)
    assert not (fonts[s.train_idx] == 2).any()                       # the held-out font never trains
    assert not set(s.train_classes) & set(s.eval_classes)
    counts = np.bincount(s.eval_labels)
    single = counts == 1
    assert 0 < single.sum() < len(counts) and set(counts.tolist()) <= {1, 3}
    # a singleton keeps its held-out-font rendering
    assert (fonts[s.eval_idx][single[s.eval_labels]] == 2).all()
    with pytest.raises(ValueError, match="held_out_font"):
        corpus.split(held_out_font="Z")


def test_augment_keeps_shape_and_is_seeded():
    x = torch.rand(4, 1, 32, 32)
    a = glyph_data.augment(x, torch.Generator().manual_seed(1))
    b = glyph_data.augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)


# ------------------------------------------------------------------------------------------------ metrics

def test_retrieval_metrics_by_hand():
    # classes 0 (two samples), 1 (two samples), 2 (one sample: must abstain)
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    r = retrieval_metrics(emb, labels, ks=(1, 2))
    # nearest other sample: 0 -> 1 (hit), 1 -> 0 (hit), 2 -> 3 (cos 0.8 > 0.6: hit), 3 -> 4 (cos 0.96: miss)
    assert r["top1"] == pytest.approx(0.75)
    n = torch.nn.functional.normalize(emb, dim=1)
    cos = n @ n.T
    cos.fill_diagonal_(-2)
    nn1 = cos.argmax(1)
    expect_top1 = [(labels[nn1[i]] == labels[i]).item() for i in range(4)]
    assert r["top1"] == pytest.approx(sum(expect_top1) / 4)
    assert (r["answerable"], r["must_abstain"]) == (4, 1)
    top2 = cos.topk(2, dim=1).indices
    assert r["top2"] == pytest.approx(sum(bool((labels[top2[i]] == labels[i]).any()) for i in range(4)) / 4)
    # the curve: answering everyone gives precision = correct / 5 and recall = correct / 4
    assert r["curve"]["precision"][-1] == pytest.approx(sum(expect_top1) / 5)
    assert r["curve"]["recall"][-1] == pytest.approx(sum(expect_top1) / 4)
    assert r["curve"]["abstain_ok"][-1] == 0.0 and max(r["curve"]["recall"]) <= 1.0
    assert 0.0 <= r["ap"] <= 1.0


def test_neighbours_exclude_self_even_with_duplicates():
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    values, idx = realdata.neighbours(emb, 2)
    assert idx[:, 0].tolist() == [1, 0, 0] and (idx != torch.arange(3)[:, None]).all()


def test_make_margin_rejects_bad_values():
    with pytest.raises(ValueError, match="margin must be one of"):
        realdata.make_margin("bogus", None)
    with pytest.raises(ValueError, match="integer m"):
        realdata.make_margin("sphereface", 1.5)
    with pytest.raises(ValueError, match="does not apply"):
        realdata.make_margin("softmax", 0.3)
    head = realdata.make_head("softmax", 8, 5)
    assert head.scale == 1.0 and head.options["normalize"] is False


# ------------------------------------------------------------------------------------------------ training

def synthetic_wordnet(root: Path, classes: int = 60, seed: int = 0) -> Path:
    """``classes`` synsets whose three lemmas and definition share a random 5-letter stem (learnable)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lines = []
    for c in range(classes):
        stem = "".join(rng.choice(letters, 5))
        lines.append(f"{10000000 + c:08d} 03 n 03 {stem}a 0 {stem}o 0 re{stem} 0 000 | the {stem} thing; "
                     f"\"a {stem} here\"")
    return write_wordnet(root, {"noun": LICENCE + "\n".join(lines) + "\n", "verb": LICENCE, "adj": LICENCE,
                                "adv": LICENCE})


def _wordnet_args(tmp_path: Path, *extra: str):
    from examples import train_wordnet
    root = tmp_path / "wn"
    if not root.exists():
        synthetic_wordnet(root)
    return train_wordnet, train_wordnet.parse_args([
        "--wordnet-dir", str(root), "--cache-dir", str(tmp_path / "cache"), "--batch", "32", "--lr", "3e-3",
        "--dim", "32", "--log-every", "2", "--held-out", "0.2", "--threads", "1", "--margin", "cosface",
        "--checkpoint", str(tmp_path / "c.pt"), *extra])


def test_smoke_training_run(tmp_path):
    # CI's end-to-end check (well under 30 s): the loss falls and the held-out evaluation runs
    mod, args = _wordnet_args(tmp_path, "--epochs", "6", "--out", str(tmp_path / "full.json"))
    full = realdata.train(mod.build_task(args), args, quiet=True)
    trace = [loss for _, loss in full["loss_trace"]]
    assert trace[-1] < 0.7 * trace[0], trace
    f = full["final"]
    assert full["complete"] and f["answerable"] > 0 and 0.0 <= f["top1"] <= f["top5"] <= f["top10"] <= 1.0
    assert len(full["history"]) == 6 and len(f["curve"]["precision"]) > 1
    assert json.loads((tmp_path / "full.json").read_text())["final"]["top1"] == f["top1"]


def test_resume_continues_the_same_run(tmp_path):
    mod, args = _wordnet_args(tmp_path, "--epochs", "4", "--out", str(tmp_path / "full.json"))
    full = realdata.train(mod.build_task(args), args, quiet=True)
    (tmp_path / "c.pt").unlink()
    # stop after 2 of 4 epochs, then continue from the checkpoint -> the same run
    mod, args_a = _wordnet_args(tmp_path, "--epochs", "4", "--stop-after", "2",
                                "--out", str(tmp_path / "a.json"))
    part = realdata.train(mod.build_task(args_a), args_a, quiet=True)
    assert part["complete"] is False and part["epoch"] == 2 and not (tmp_path / "a.json").exists()
    mod, args_b = _wordnet_args(tmp_path, "--epochs", "4", "--resume", "--out", str(tmp_path / "b.json"))
    rest = realdata.train(mod.build_task(args_b), args_b, quiet=True)
    assert rest["complete"] and [h["epoch"] for h in rest["history"]] == [1, 2, 3, 4]
    assert np.allclose([v for _, v in rest["loss_trace"]], [v for _, v in full["loss_trace"]], rtol=1e-4, atol=1e-5)
    assert rest["final"]["top1"] == pytest.approx(full["final"]["top1"], abs=1e-6)
    # a checkpoint of other settings is refused, not silently mixed in
    mod, args_c = _wordnet_args(tmp_path, "--epochs", "5", "--resume", "--out", str(tmp_path / "c.json"))
    with pytest.raises(SystemExit, match="other settings"):
        realdata.train(mod.build_task(args_c), args_c, quiet=True)


def _synthetic_glyph_task(classes: int = 40, seed: int = 0):
    """A glyph task on random 16 x 16 bitmaps in three fonts (no font needed): the real encoder and augmentation."""
    from examples import train_glyphs
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), 3)
    fonts = np.tile(np.arange(3), classes).astype(np.int8)
    corpus = glyph_data.GlyphCorpus(rng.integers(0, 255, (len(labels), 16, 16), dtype=np.uint8), labels, fonts,
                                    np.arange(0x4E00, 0x4E00 + classes), ["Noto Sans CJK", "Noto Serif CJK",
                                                                          "AR PL UKai"])
    args = train_glyphs.parse_args(["--size", "16", "--batch", "16", "--dim", "16", "--epochs", "3",
                                    "--threads", "1"])
    return train_glyphs, args, train_glyphs.build_task(args, corpus=corpus)


@pytest.mark.parametrize("corpus", ["wordnet", "glyphs"])
def test_training_parity_float64(tmp_path, corpus):
    """The short version of examples/parity.py: every margin of the grid, the real training loop in float64,
    marginops' gradients against the naive head's at every step (relative error <= 1e-9)."""
    from examples import parity
    for kind in realdata.MARGINS:
        if corpus == "wordnet":
            mod, args = _wordnet_args(tmp_path, "--epochs", "3")
            task = None  # run_margin builds it: a fresh encoder
        else:
            mod, args, task = _synthetic_glyph_task()
        r = parity.run_margin(corpus, kind, args, mod.build_task, steps=6, backend="auto", task=task)
        assert r["steps"] == 6 and r["loss_last"] != r["loss_first"]          # the weights did move
        assert max(r["max_rel_err"].values()) <= 1e-9, (kind, r["max_rel_err"])


def test_parity_catches_a_different_head(tmp_path, monkeypatch):
    """The check is not vacuous: a naive head with another scale than ours fails it."""
    from examples import parity
    mod, args = _wordnet_args(tmp_path, "--epochs", "3")
    real = parity.naive_loss
    monkeypatch.setattr(parity, "naive_loss", lambda head, f, y: real(head, f, y) * (1 + 1e-6))
    r = parity.run_margin("wordnet", "cosface", args, mod.build_task, steps=2, backend="auto")
    assert r["max_rel_err"]["loss"] > 1e-7 and r["max_rel_err"]["d_weight"] > 1e-7


def test_float32_default_path_follows_the_naive_head(tmp_path):
    """A short float32 training, the default path against the naive head (backend reference), same seed:
    the loss traces and held-out metrics agree to rounding."""
    mod, args = _wordnet_args(tmp_path, "--epochs", "3", "--margin", "arcface")
    ours = realdata.train(mod.build_task(args), args, quiet=True)
    mod, args_ref = _wordnet_args(tmp_path, "--epochs", "3", "--margin", "arcface", "--backend", "reference",
                                  "--checkpoint", str(tmp_path / "ref.pt"))
    naive = realdata.train(mod.build_task(args_ref), args_ref, quiet=True)
    assert np.allclose([v for _, v in ours["loss_trace"]], [v for _, v in naive["loss_trace"]], rtol=1e-3)
    assert ours["final"]["top1"] == pytest.approx(naive["final"]["top1"], abs=0.02)


def test_margin_warmup_ramps_and_resumes(tmp_path):
    mod, args = _wordnet_args(tmp_path, "--epochs", "4", "--margin", "arcface", "--margin-warmup", "0.25", "0.75",
                              "--out", str(tmp_path / "w.json"))
    full = realdata.train(mod.build_task(args), args, quiet=True)
    assert full["settings"]["margin_warmup"] == [0.25, 0.75]
    head = realdata.make_head("arcface", 8, 5)
    sched = realdata.margin_warmup(head, args, total=100)
    assert head.margin.params["m"] == 0.0 and sched.get_value(25) == 0.0 and sched.get_value(75) == 0.5
    assert 0.0 < sched.get_value(50) < 0.5
    (tmp_path / "c.pt").unlink()
    mod, a = _wordnet_args(tmp_path, "--epochs", "4", "--margin", "arcface", "--margin-warmup", "0.25", "0.75",
                           "--stop-after", "2")
    realdata.train(mod.build_task(a), a, quiet=True)
    mod, b = _wordnet_args(tmp_path, "--epochs", "4", "--margin", "arcface", "--margin-warmup", "0.25", "0.75",
                           "--resume")
    rest = realdata.train(mod.build_task(b), b, quiet=True)
    assert np.allclose([v for _, v in rest["loss_trace"]], [v for _, v in full["loss_trace"]], rtol=1e-4, atol=1e-5)
    with pytest.raises(SystemExit, match="cosface and arcface"):
        _wordnet_args(tmp_path, "--margin", "sphereface", "--margin-warmup", "0.1", "0.3")


def test_report_table_means_and_spread(tmp_path):
    from examples import realdata_report

    def record(margin, seed, top1):
        final = {"top1": top1, "top5": top1 + 0.1, "top10": top1 + 0.2, "ap": 0.5, "recall_at_p90": 0.25,
                 "abstain_ok_at_p90": 0.75, "answerable": 9, "must_abstain": 1}
        return {"complete": True, "corpus": "wordnet", "train_classes": 50, "train_samples": 150, "eval_classes": 5,
                "eval_samples": 10, "steps": 12, "train_seconds": 10.0 + seed, "final": final, "info": {},
                "settings": {"margin": margin, "seed": seed, "scale": 30.0, "m": None, "epochs": 3, "batch": 32,
                             "dim": 16, "lr": 0.002}}
    for seed, top1 in enumerate((0.2, 0.4, 0.6)):
        (tmp_path / f"wordnet-cosface-s{seed}.json").write_text(json.dumps(record("cosface", seed, top1)))
    (tmp_path / "wordnet-softmax-s0.json").write_text(json.dumps(record("softmax", 0, 0.1)))
    (tmp_path / "wordnet-arcface-s0.json").write_text(json.dumps({"complete": False, "epoch": 1}))
    runs = realdata_report.load_runs(tmp_path)
    text = realdata_report.generated(runs, tmp_path, {}, tmp_path / "none")
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "0.4000 ± 0.2000" in rows["CosFace (s=30, m=0.35)"]     # mean and sample std of 0.2, 0.4, 0.6
    assert "| 0,1,2 |" in rows["CosFace (s=30, m=0.35)"] and "| 11 ± 1 |" in rows["CosFace (s=30, m=0.35)"]
    assert "| 0.1000 |" in rows["softmax"]
    assert not any(k.startswith("ArcFace") for k in rows)            # an unfinished run is left out
    assert "train s (wall, shared machine)" in text                  # records without CPU seconds
    summary = realdata_report.readme_summary(runs, tmp_path)
    assert "| **0.400 ± 0.200** |" in summary and "| 0.100 |" in summary  # the best margin in bold
    for seed in range(3):  # records with CPU seconds: those are reported
        p = tmp_path / f"wordnet-cosface-s{seed}.json"
        p.write_text(json.dumps({**json.loads(p.read_text()), "train_cpu_seconds": 5.0}))
    p = tmp_path / "wordnet-softmax-s0.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), "train_cpu_seconds": 5.0}))
    text = realdata_report.generated(realdata_report.load_runs(tmp_path), tmp_path, {}, tmp_path / "none")
    assert "train CPU s" in text and "| 5 ± 0 |" in text


@pytest.mark.parametrize("bad, message", [
    (["--max-classes", "0"], "--max-classes must be >= 1"),
    (["--scale", "-1"], "--scale must be a positive"),
    (["--held-out", "1.5"], "--held-out must lie in"),
    (["--margin", "sphereface", "--m", "2.5"], "integer m"),
    (["--margin", "softmax", "--m", "0.3"], "does not apply"),
    (["--epochs", "0"], "--epochs must be >= 1"),
])
def test_cli_rejects_bad_arguments(bad, message):
    from examples import train_wordnet
    with pytest.raises(SystemExit, match=message):
        train_wordnet.parse_args(bad)


def test_committed_pages_are_generated_from_the_committed_records():
    """docs/results.md and README's summary hold what the committed run records give, nothing typed in."""
    from examples import realdata_report as rr
    root = Path(__file__).resolve().parent.parent
    runs, small, long_ = (root / d for d in (rr.RUNS, rr.SMALL_RUNS, rr.LONG_RUNS))
    page = (root / rr.DOC).read_text()
    text = rr.page_text(rr.load_runs(runs), runs, rr.load_optional(small), small, rr.load_optional(long_))
    assert rr.BEGIN + "\n" + text + "\n" + rr.END in page
    readme = (root / rr.README).read_text()
    summary = rr.readme_summary(rr.load_runs(runs), runs)
    assert rr.README_BEGIN + "\n" + summary + "\n" + rr.README_END in readme


def test_committed_integration_sections_are_generated_from_their_records():
    """docs/results.md's parity, recipe and sentence-transformers tables hold what their records give, and every
    committed float64 parity record passed its tolerance."""
    from examples import realdata_report as rr
    root = Path(__file__).resolve().parent.parent
    dirs = [root / d for d in (rr.PARITY64, rr.PARITY32, rr.RECIPE_RUNS, rr.ST_RUNS, rr.SMALL_RUNS)]
    text = rr.integrations_text(*dirs)
    assert rr.INTEG_BEGIN + "\n" + text + "\n" + rr.INTEG_END in (root / rr.DOC).read_text()
    for p in sorted((root / rr.PARITY64).glob("*.json")):
        rec = json.loads(p.read_text())
        assert rec["passed"] and rec["worst"] <= rec["tolerance"] <= 1e-9 and rec["steps"] >= 100, p
