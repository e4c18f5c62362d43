"""Fine-tune a sentence-transformers model on WordNet synsets with marginops' loss; evaluate on held-out synsets.

The FAQ use in miniature: paraphrase groups (WordNet synsets: lemmas, definition, usage examples)
are the classes of a :class:`marginops.integrations.sentence_transformers.MarginSoftmaxLoss`
trained with ``SentenceTransformerTrainer``; the held-out synsets' texts then retrieve each other
by cosine (top-1/5/10, answer or abstain), with the split and metrics of ``docs/results.md``.

Nothing is downloaded: the tokenizer is a BPE vocabulary trained with ``tokenizers`` on the
training synsets' texts only, and the encoder a randomly initialised ``StaticEmbedding`` (the mean
of its token embeddings). Run from the repository root (``apt-get install -y wordnet-base`` and
the ``[sentence-transformers]`` extra first, see ``docs/integrations.md``)::

    python -m examples.train_st_wordnet --stop-after 2     # train two epochs (a checkpoint after each), stop
    python -m examples.train_st_wordnet --resume           # continue from the last checkpoint, evaluate
    python -m examples.train_st_wordnet --evaluate runs/st-wordnet-cosface-s0/final   # a saved model

The Trainer saves the class weight with the model (a ``ClassCentres`` module, see the integration),
so ``--resume`` continues with it. Checkpoints, the tokenizer and the final model go to
``--output-dir``, the result record (the format of ``examples/realdata.py``) to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import wordnet_data
from .realdata import DEFAULT_CACHE, DEFAULT_M, MARGINS, check_args, exit_if_missing, make_margin, retrieval_metrics


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--margin", choices=MARGINS, default="cosface")
    p.add_argument("--scale", type=float, default=30.0, help="s of the normalized heads (default: 30)")
    p.add_argument("--m", type=float, default=None,
                   help="margin parameter (default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_M.items()) + ")")
    p.add_argument("--max-classes", type=int, default=5000, help="training synsets (default: 5000)")
    p.add_argument("--eval-classes", type=int, default=2000, help="held-out synsets evaluated (default: 2000)")
    p.add_argument("--held-out", type=float, default=0.1, help="share of synsets held out (default: 0.1)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.05, help="AdamW learning rate (default: 0.05)")
    p.add_argument("--dim", type=int, default=128, help="embedding dimension")
    p.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary size (default: 8192)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--backend", default="auto", help="marginops backend of the head (default: auto)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--wordnet-dir", type=Path, default=None)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--output-dir", type=Path, default=None,
                   help="checkpoints, tokenizer and final model (default: runs/st-wordnet-<margin>-s<seed>)")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default: runs/st-wordnet-<margin>-s<seed>.json)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    p.add_argument("--stop-after", type=int, default=None, metavar="EPOCHS",
                   help="stop after this many epochs in this invocation (checkpoint kept; finish with --resume)")
    p.add_argument("--evaluate", type=Path, default=None, metavar="MODEL_DIR",
                   help="only evaluate a saved model on the held-out synsets")
    p.add_argument("--log-every", type=int, default=20, help="steps per training-loss point")
    args = p.parse_args(argv)
    check_args(args)
    if args.vocab < 100:
        raise SystemExit(f"error: --vocab must be >= 100, got {args.vocab}")
    stem = f"st-wordnet-{args.margin}-s{args.seed}"
    args.output_dir = args.output_dir or Path("runs") / stem
    args.out = args.out or Path("runs") / f"{stem}.json"
    return args


def load_split(args: argparse.Namespace):
    corpus = exit_if_missing(lambda: wordnet_data.load_corpus(args.wordnet_dir, args.cache_dir))
    split = corpus.split(held_out_fraction=args.held_out, max_classes=args.max_classes, eval_classes=args.eval_classes)
    return corpus, split


def train_tokenizer(texts: Sequence[str], vocab: int, path: Path):
    """A lower-casing BPE tokenizer trained on ``texts`` (kept in ``path``: a resumed run reuses it).

    BPE, not WordPiece: ``tokenizers``' WordPiece trainer numbers (and picks among tied) tokens
    differently from run to run, its BPE trainer gives the same tokenizer every time."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    if path.exists():
        return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["[UNK]"], show_progress=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok


def make_loss(model, args: argparse.Namespace, num_classes: int):
    from marginops.integrations.sentence_transformers import MarginSoftmaxLoss
    if args.margin == "softmax":  # the plain linear head with cross-entropy, as in examples/realdata.py
        return MarginSoftmaxLoss(model, num_classes, margin=None, scale=1.0, normalize=False, backend=args.backend)
    return MarginSoftmaxLoss(model, num_classes, margin=make_margin(args.margin, args.m), scale=args.scale,
                             backend=args.backend)


def evaluate(model, texts: Sequence[str], labels: torch.Tensor, curve: bool) -> dict:
    emb = model.encode(list(texts), batch_size=1024, convert_to_tensor=True, show_progress_bar=False).float().cpu()
    r = retrieval_metrics(emb, labels)
    if not curve:
        r.pop("curve")
    return r


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    from transformers import TrainerCallback

    corpus, split = load_split(args)
    train_texts = [corpus.texts[i] for i in split.train_idx]
    eval_texts = [corpus.texts[i] for i in split.eval_idx]
    eval_labels = torch.from_numpy(split.eval_labels)
    if args.evaluate is not None:
        model = SentenceTransformer(str(args.evaluate), device=args.device, trust_remote_code=True)
        r = evaluate(model, eval_texts, eval_labels, curve=False)
        print(json.dumps({k: r[k] for k in ("top1", "top5", "top10", "ap", "recall_at_p90")}))
        return r

    out_dir = Path(args.output_dir)
    last = sorted(out_dir.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    if out_dir.exists() and last and not args.resume:
        raise SystemExit(f"error: {out_dir} holds checkpoints; pass --resume to continue, or another --output-dir")
    tok = train_tokenizer(train_texts, args.vocab, out_dir / "tokenizer.json")
    torch.manual_seed(args.seed)
    model = SentenceTransformer(modules=[StaticEmbedding(tok, embedding_dim=args.dim)], device=args.device)
    loss = make_loss(model, args, split.num_train_classes)

    steps_per_epoch = max(1, len(train_texts) // args.batch)
    total = steps_per_epoch * args.epochs
    targs = SentenceTransformerTrainingArguments(
        output_dir=str(out_dir), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch,
        learning_rate=args.lr, weight_decay=1e-4, lr_scheduler_type="cosine",
        warmup_steps=max(1, min(200, total // 10)), dataloader_drop_last=True, save_strategy="epoch",
        save_total_limit=2, logging_steps=args.log_every, seed=args.seed, report_to="none",
        use_cpu=args.device == "cpu", disable_tqdm=False, dataloader_num_workers=0)
    state_in = {"epochs_now": 0, "cpu0": time.process_time(), "wall0": time.perf_counter(), "eval_cpu": 0.0,
                "eval_wall": 0.0}

    class EpochEnd(TrainerCallback):
        """After every epoch: held-out metrics and the training time so far into the Trainer's log
        history (saved with each checkpoint, so a resumed run keeps them); ``--stop-after``."""

        def on_epoch_end(self, targs_, state, control, **kw):
            c0, w0 = time.process_time(), time.perf_counter()
            r = evaluate(model, eval_texts, eval_labels, curve=False)
            prev = [h for h in state.log_history if "heldout_top1" in h]
            base_cpu = prev[-1]["train_cpu_seconds"] if prev else 0.0
            base_wall = prev[-1]["train_seconds"] if prev else 0.0
            cpu = base_cpu + (c0 - state_in["cpu0"] - state_in["eval_cpu"])
            wall = base_wall + (w0 - state_in["wall0"] - state_in["eval_wall"])
            state_in.update(cpu0=c0, wall0=w0, eval_cpu=0.0, eval_wall=0.0)
            state.log_history.append({"epoch": round(state.epoch), "step": state.global_step,
                                      "heldout_top1": r["top1"], "heldout_top5": r["top5"],
                                      "heldout_top10": r["top10"], "heldout_ap": r["ap"],
                                      "train_cpu_seconds": cpu, "train_seconds": wall})
            print(f"epoch {round(state.epoch)}/{args.epochs}: held-out top-1 {r['top1']:.4f} top-5 {r['top5']:.4f} "
                  f"top-10 {r['top10']:.4f}", file=sys.stderr)
            state_in["eval_cpu"] += time.process_time() - c0
            state_in["eval_wall"] += time.perf_counter() - w0
            state_in["epochs_now"] += 1
            if args.stop_after is not None and state_in["epochs_now"] >= args.stop_after \
                    and state.global_step < state.max_steps:
                control.should_training_stop = True
                control.should_save = True
            return control

    ds = Dataset.from_dict({"text": train_texts, "label": split.train_labels.tolist()})
    trainer = SentenceTransformerTrainer(model=model, args=targs, train_dataset=ds, loss=loss,
                                         callbacks=[EpochEnd()])
    resume = args.resume and bool(last)
    if args.resume and not last:
        print(f"no checkpoint in {out_dir}: starting from scratch", file=sys.stderr)
    trainer.train(resume_from_checkpoint=True if resume else None)
    state = trainer.state
    if state.global_step < total:
        print(f"stopped after epoch {round(state.epoch)} of {args.epochs} (checkpoint in {out_dir}); continue with "
              f"--resume", file=sys.stderr)
        return None
    final = evaluate(model, eval_texts, eval_labels, curve=True)
    model.save(str(out_dir / "final"))
    history = [h for h in state.log_history if "heldout_top1" in h]
    settings = {"margin": args.margin, "scale": args.scale, "m": args.m, "max_classes": args.max_classes,
                "eval_classes": args.eval_classes, "epochs": args.epochs, "batch": args.batch, "lr": args.lr,
                "dim": args.dim, "seed": args.seed, "backend": args.backend, "vocab": args.vocab}
    result = {
        "complete": True, "corpus": "wordnet", "settings": settings, "train_classes": split.num_train_classes,
        "train_samples": len(train_texts), "eval_classes": int(len(torch.unique(eval_labels))),
        "eval_samples": len(eval_texts), "steps": state.global_step,
        "train_seconds": history[-1]["train_seconds"], "train_cpu_seconds": history[-1]["train_cpu_seconds"],
        "threads": torch.get_num_threads(),
        "loss_trace": [[h["step"], h["loss"]] for h in state.log_history if "loss" in h and "step" in h],
        "history": [{"epoch": h["epoch"], "step": h["step"], "train_seconds": h["train_seconds"],
                     "top1": h["heldout_top1"], "top5": h["heldout_top5"], "top10": h["heldout_top10"],
                     "ap": h["heldout_ap"]} for h in history],
        "final": final,
        "info": {"encoder": f"StaticEmbedding({args.dim}), BPE {tok.get_vocab_size()} tokens trained on the "
                            "training synsets' texts",
                 "tokenizer_sha256": hashlib.sha256(tok.to_str().encode()).hexdigest(),
                 "trainer": "SentenceTransformerTrainer",
                 "held_out_fraction": args.held_out, "resumed": resume},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    f = final
    print(f"st-wordnet {args.margin} seed {args.seed}: {split.num_train_classes} training synsets, "
          f"{result['eval_classes']} held-out; top-1/5/10 {f['top1']:.4f}/{f['top5']:.4f}/{f['top10']:.4f}, "
          f"AP {f['ap']:.4f}; train {result['train_cpu_seconds']:.0f} CPU s; model in {out_dir / 'final'}")
    return result


if __name__ == "__main__":
    main()
