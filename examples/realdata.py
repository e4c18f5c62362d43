"""Shared machinery of the real-data examples (WordNet synsets, CJK glyphs).

Everything here uses marginops' public API only (:class:`marginops.MarginHead`,
:func:`marginops.topk_cosine`). It holds what the two corpora share:

* :class:`CorpusMissing` and :func:`exit_if_missing`: a missing corpus ends the
  program with the exact ``apt-get install`` command and exit status 2, no traceback;
* :func:`hash_order` / :func:`split_classes`: the deterministic class split
  (held-out classes are chosen by a hash of the class key, never by the seed);
* :class:`CachedFile`: derived data cached with a SHA-256 manifest, so a
  corrupt or stale cache is detected and rebuilt, never silently used;
* :func:`make_head`: ``--margin {softmax, normface, cosface, arcface, sphereface, simpler}``;
* :func:`retrieval_metrics`: top-1/5/10 over held-out samples and the
  answer-or-abstain curve;
* :func:`train`: the training loop (AdamW, cosine learning rate, progress bar,
  per-epoch checkpoint and resume, held-out evaluation after every epoch).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

import marginops as mo

#: ``--margin`` choices. ``softmax`` is plain softmax cross-entropy over an unnormalized linear head
#: (scale 1); ``normface`` is the normalized head with scale ``s`` and no margin; the others add their margin.
MARGINS = ("softmax", "normface", "cosface", "arcface", "sphereface", "simpler")
#: ``--m`` when not given.
DEFAULT_M = {"cosface": 0.35, "arcface": 0.5, "sphereface": 4, "simpler": 4}
DEFAULT_CACHE = Path(os.environ.get("MARGINOPS_EXAMPLES_CACHE", Path.home() / ".cache" / "marginops-examples"))
KS = (1, 5, 10)


# --------------------------------------------------------------------------------------------- corpora

class CorpusMissing(RuntimeError):
    """A corpus is not installed; the message says which ``apt-get install`` to run."""


def exit_if_missing(fn: Callable[[], Any]) -> Any:
    """Run ``fn``; on :class:`CorpusMissing` print its message to stderr and exit with status 2."""
    try:
        return fn()
    except CorpusMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def hash_order(keys: Sequence[str], salt: str) -> np.ndarray:
    """Indices of ``keys`` sorted by ``sha256(salt + key)``: a fixed pseudo-random order, the same on
    every machine and independent of any seed."""
    digests = [hashlib.sha256(f"{salt}:{k}".encode()).digest()[:8] for k in keys]
    return np.array(sorted(range(len(keys)), key=lambda i: digests[i]), dtype=np.int64)


def held_out_mask(keys: Sequence[str], fraction: float, salt: str) -> np.ndarray:
    """``True`` for keys whose hash puts them in the held-out ``fraction``."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction must lie in (0, 1), got {fraction!r}")
    u = np.array([int.from_bytes(hashlib.sha256(f"{salt}:{k}".encode()).digest()[:8], "big") / 2.0**64
                  for k in keys])
    return u < fraction


@dataclass
class Split:
    """Sample indices of a corpus split into training and held-out (evaluation) parts.

    ``train_labels`` are the training classes renumbered ``0 .. num_train_classes - 1``
    (the head's rows); ``eval_labels`` number the held-out classes ``0 .. num_eval_classes - 1``.
    """

    train_idx: np.ndarray
    train_labels: np.ndarray
    eval_idx: np.ndarray
    eval_labels: np.ndarray
    train_classes: list[str]
    eval_classes: list[str]

    @property
    def num_train_classes(self) -> int:
        return len(self.train_classes)

    @property
    def num_eval_classes(self) -> int:
        return len(self.eval_classes)


def split_classes(class_keys: Sequence[str], labels: np.ndarray, train_ok: np.ndarray, eval_ok: np.ndarray, *,
                  held_out_fraction: float, salt: str, max_classes: Optional[int] = None,
                  eval_classes: Optional[int] = None, min_train_samples: int = 2) -> Split:
    """Split samples by class: a class is held out when its key's hash falls in ``held_out_fraction``.

    Training uses the samples of non-held-out classes where ``train_ok`` (e.g. not the held-out font),
    keeping classes with at least ``min_train_samples`` such samples, the first ``max_classes`` of them in
    hash order. Evaluation uses the samples of held-out classes where ``eval_ok``, the first
    ``eval_classes`` classes in hash order (all of them by default).
    """
    for name, v in (("max_classes", max_classes), ("eval_classes", eval_classes)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive int or None, got {v!r}")
    labels = np.asarray(labels)
    held = held_out_mask(class_keys, held_out_fraction, salt)
    order = hash_order(class_keys, salt + ":order")
    n_train = np.bincount(labels[train_ok], minlength=len(class_keys))
    n_eval = np.bincount(labels[eval_ok], minlength=len(class_keys))
    train_cls = [int(c) for c in order if not held[c] and n_train[c] >= min_train_samples]
    eval_cls = [int(c) for c in order if held[c] and n_eval[c] >= 1]
    if max_classes is not None:
        train_cls = train_cls[:max_classes]
    if eval_classes is not None:
        eval_cls = eval_cls[:eval_classes]
    if not train_cls or not eval_cls:
        raise ValueError(f"the split is empty: {len(train_cls)} training and {len(eval_cls)} held-out classes")

    def pick(classes: list[int], ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        new = np.full(len(class_keys), -1, dtype=np.int64)
        new[np.array(classes)] = np.arange(len(classes))
        idx = np.nonzero(ok & (new[labels] >= 0))[0]
        return idx, new[labels[idx]]

    ti, tl = pick(train_cls, train_ok)
    ei, el = pick(eval_cls, eval_ok)
    return Split(ti, tl, ei, el, [class_keys[c] for c in train_cls], [class_keys[c] for c in eval_cls])


# --------------------------------------------------------------------------------------------- cache

class CachedFile:
    """A derived file with a JSON manifest: its SHA-256, size and the fingerprint of what it came from.

    :meth:`load` returns the path when the file exists, matches its manifest and was made from
    the same sources with the same settings (``fingerprint``); otherwise ``None``, with a message
    on stderr saying why (a corrupt file is reported, then rebuilt by the caller). :meth:`store`
    writes through a temporary file and ``os.replace``, the manifest last, so an interrupted
    write leaves no manifest that vouches for a partial file.
    """

    def __init__(self, path: Path, fingerprint: dict):
        self.path = Path(path)
        self.manifest = self.path.with_name(self.path.name + ".manifest.json")
        self.fingerprint = fingerprint

    @staticmethod
    def sha256(path: Path) -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    def load(self) -> Optional[Path]:
        if not self.path.exists() and not self.manifest.exists():
            return None
        try:
            meta = json.loads(self.manifest.read_text())
        except (OSError, ValueError) as exc:
            print(f"cache {self.path}: unreadable manifest ({exc}); rebuilding", file=sys.stderr)
            return None
        if meta.get("fingerprint") != self.fingerprint:
            print(f"cache {self.path}: made from other sources or settings; rebuilding", file=sys.stderr)
            return None
        if not self.path.exists() or self.path.stat().st_size != meta.get("size") \
                or self.sha256(self.path) != meta.get("sha256"):
            print(f"cache {self.path}: corrupt (size or SHA-256 differs from its manifest); rebuilding",
                  file=sys.stderr)
            return None
        return self.path

    def store(self, write: Callable[[Path], None]) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.manifest.exists():
            self.manifest.unlink()
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        write(tmp)
        meta = {"fingerprint": self.fingerprint, "size": tmp.stat().st_size, "sha256": self.sha256(tmp)}
        os.replace(tmp, self.path)
        tmp_m = self.manifest.with_name(self.manifest.name + f".tmp{os.getpid()}")
        tmp_m.write_text(json.dumps(meta, indent=1))
        os.replace(tmp_m, self.manifest)
        return self.path


def file_fingerprint(paths: Iterable[Path]) -> list:
    """Path, size and modification time of each source file (what a cache depends on)."""
    out = []
    for p in paths:
        st = Path(p).stat()
        out.append([str(p), st.st_size, int(st.st_mtime)])
    return out


# --------------------------------------------------------------------------------------------- heads

def make_margin(kind: str, m: Optional[float]):
    """The margin object of ``--margin kind`` with parameter ``m`` (``None``: :data:`DEFAULT_M`)."""
    if kind not in MARGINS:
        raise ValueError(f"margin must be one of {MARGINS}, got {kind!r}")
    if kind in ("softmax", "normface"):
        if m is not None:
            raise ValueError(f"--m does not apply to margin {kind!r}, got m = {m!r}")
        return None
    m = DEFAULT_M[kind] if m is None else m
    if kind == "cosface":
        return mo.CosFace(float(m))
    if kind == "arcface":
        return mo.ArcFace(float(m))
    if float(m) != int(m):
        raise ValueError(f"{kind} needs an integer m, got m = {m!r}")
    return (mo.SphereFace if kind == "sphereface" else mo.SimplerASoftmax)(int(m))


def make_head(kind: str, dim: int, classes: int, scale: float = 30.0, m: Optional[float] = None,
              **options: Any) -> mo.MarginHead:
    """``MarginHead`` over ``classes`` training classes: ``softmax`` is the unnormalized linear head
    (scale 1, plain cross-entropy); every other kind is the normalized head with scale ``scale``."""
    margin = make_margin(kind, m)
    if kind == "softmax":
        return mo.MarginHead(dim, classes, margin=None, scale=1.0, normalize=False, **options)
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    return mo.MarginHead(dim, classes, margin=margin, scale=float(scale), **options)


# --------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def embed(encoder: nn.Module, inputs: Tensor, batch: int = 1024) -> Tensor:
    """Encoder outputs of ``inputs`` in eval mode, ``batch`` rows at a time (float32, CPU)."""
    was = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    out = torch.cat([encoder(inputs[i:i + batch].to(device)).float().cpu() for i in range(0, len(inputs), batch)])
    encoder.train(was)
    return out


def neighbours(emb: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """For each row, the ``k`` other rows of highest cosine (itself excluded), by ``mo.topk_cosine``."""
    n = emb.shape[0]
    kk = min(k + 1, n)
    values, idx = mo.topk_cosine(emb, emb, kk)
    not_self = idx != torch.arange(n)[:, None]
    # put the (at most one) self entry last, keeping the order of the others
    order = torch.argsort((~not_self).to(torch.int8), dim=1, stable=True)
    values, idx = values.gather(1, order)[:, :kk - 1], idx.gather(1, order)[:, :kk - 1]
    return values[:, :k], idx[:, :k]


def retrieval_metrics(emb: Tensor, labels: Tensor, ks: Sequence[int] = KS, groups: Optional[Tensor] = None,
                      group_names: Optional[Sequence[str]] = None, curve_points: int = 201) -> dict:
    """Held-out retrieval: each sample queries all *other* held-out samples, ranked by cosine.

    * ``top{n}``: share of answerable queries (their class has another sample) with a same-class
      sample among their ``n`` nearest;
    * answer-or-abstain: the query answers with its nearest sample's class when that cosine is at
      least ``tau``, else abstains. Over ``tau``: ``precision`` = correct answers / answers (the
      must-abstain queries, whose class has no other sample, count as wrong when they answer),
      ``recall`` = correct answers / answerable queries, ``abstain_ok`` = share of must-abstain
      queries that abstain. Summaries: ``ap`` (area under precision-recall, step-wise), and the
      recall and must-abstain abstention at the lowest ``tau`` whose precision reaches 0.9.
    * with ``groups`` (e.g. the font of each glyph): ``top1_by_group`` over queries of each group.
    """
    labels = labels.long()
    n = len(labels)
    kmax = max(ks)
    values, idx = neighbours(emb, kmax)
    hits = labels[idx] == labels[:, None]
    count = torch.bincount(labels)
    answerable = count[labels] >= 2
    out: dict[str, Any] = {"queries": n, "answerable": int(answerable.sum()),
                           "must_abstain": int((~answerable).sum())}
    for k in ks:
        out[f"top{k}"] = float(hits[:, :k].any(1)[answerable].float().mean()) if answerable.any() else float("nan")
    if groups is not None:
        names = group_names or [str(g) for g in range(int(groups.max()) + 1)]
        out["top1_by_group"] = {names[g]: float(hits[:, 0][answerable & (groups == g)].float().mean())
                                for g in range(len(names)) if bool((answerable & (groups == g)).any())}
    # answer-or-abstain: sort queries by top-1 cosine, descending; answering everyone at or above tau
    cos1 = values[:, 0]
    correct = hits[:, 0] & answerable
    order = torch.argsort(cos1, descending=True, stable=True)
    tp = torch.cumsum(correct[order].double(), 0)
    answered = torch.arange(1, n + 1, dtype=torch.float64)
    prec = tp / answered
    rec = tp / max(int(answerable.sum()), 1)
    wrong_abstain = torch.cumsum((~answerable)[order].double(), 0)
    abstain_ok = 1 - wrong_abstain / max(int((~answerable).sum()), 1)
    drec = torch.diff(rec, prepend=torch.zeros(1, dtype=torch.float64))
    out["ap"] = float((prec * drec).sum())
    ok90 = torch.nonzero(prec >= 0.9).squeeze(1)
    if len(ok90):
        j = int(ok90.max())
        out["recall_at_p90"], out["abstain_ok_at_p90"], out["tau_at_p90"] = \
            float(rec[j]), float(abstain_ok[j]), float(cos1[order][j])
    else:
        out["recall_at_p90"], out["abstain_ok_at_p90"], out["tau_at_p90"] = 0.0, 1.0, float("nan")
    pick = torch.linspace(0, n - 1, min(curve_points, n)).round().long()
    out["curve"] = {"tau": cos1[order][pick].tolist(), "precision": prec[pick].tolist(),
                    "recall": rec[pick].tolist(), "abstain_ok": abstain_ok[pick].tolist()}
    return out


# --------------------------------------------------------------------------------------------- training

def add_training_args(p: argparse.ArgumentParser, *, epochs: int, batch: int, lr: float) -> None:
    p.add_argument("--margin", choices=MARGINS, default="cosface")
    p.add_argument("--scale", type=float, default=30.0, help="s of the normalized heads (default: 30)")
    p.add_argument("--m", type=float, default=None,
                   help="margin parameter (default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_M.items()) + ")")
    p.add_argument("--max-classes", type=int, default=None, help="train on the first N training classes only")
    p.add_argument("--eval-classes", type=int, default=None, help="evaluate on the first N held-out classes")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--dim", type=int, default=128, help="embedding dimension")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--backend", default="auto", help="marginops backend of the head (default: auto)")
    p.add_argument("--device", default="cpu", help="device of the encoder and head, e.g. cuda (default: cpu)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint file, written after every epoch (default: runs/<corpus>-<margin>-s<seed>.pt)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    p.add_argument("--out", type=Path, default=None,
                   help="result JSON (default: runs/<corpus>-<margin>-s<seed>.json)")
    p.add_argument("--log-every", type=int, default=20, help="steps per training-loss point")
    p.add_argument("--stop-after", type=int, default=None, metavar="EPOCHS",
                   help="stop after this many epochs in this invocation (checkpoint kept; finish with --resume)")
    p.add_argument("--margin-warmup", type=float, nargs=2, default=None, metavar=("BEGIN", "END"),
                   help="margin warm-up (mo.MarginScheduler, exponential): m held at 0 for the first BEGIN share "
                        "of the training steps, raised to its value by the END share (e.g. 0.1 0.3)")


def check_args(args: argparse.Namespace) -> None:
    for name in ("epochs", "batch", "dim", "log_every", "stop_after"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {v}")
    for name in ("max_classes", "eval_classes"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {v}")
    if not args.lr > 0:
        raise SystemExit(f"error: --lr must be > 0, got {args.lr}")
    if not (math.isfinite(args.scale) and args.scale > 0):
        raise SystemExit(f"error: --scale must be a positive finite number, got {args.scale}")
    warm = getattr(args, "margin_warmup", None)
    if warm is not None:
        if not 0.0 <= warm[0] <= warm[1] <= 1.0:
            raise SystemExit(f"error: --margin-warmup needs 0 <= BEGIN <= END <= 1, got {warm[0]} {warm[1]}")
        if args.margin not in ("cosface", "arcface"):
            raise SystemExit(f"error: --margin-warmup applies to cosface and arcface, not {args.margin}")
    held = getattr(args, "held_out", None)
    if held is not None and not 0.0 < held < 1.0:
        raise SystemExit(f"error: --held-out must lie in (0, 1), got {held}")
    try:
        make_margin(args.margin, args.m)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


@dataclass
class Task:
    """One corpus prepared for training: tensors, the split's class counts and how to augment."""

    name: str
    train_x: Tensor
    train_y: Tensor
    eval_x: Tensor
    eval_y: Tensor
    num_classes: int
    encoder: nn.Module
    augment: Optional[Callable[[Tensor, torch.Generator], Tensor]] = None
    eval_groups: Optional[Tensor] = None
    group_names: Optional[list[str]] = None
    info: dict = field(default_factory=dict)


def make_optimizer(params, args: argparse.Namespace, total: int):
    """AdamW (weight decay 1e-4) and its schedule: a linear warm-up over ``min(200, total / 10)`` steps,
    then cosine decay to 0 at step ``total``."""
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, min(200, total // 10))) * 0.5 * (1 + math.cos(math.pi * s / total)))
    return opt, sched


def epoch_batches(task: Task, args: argparse.Namespace, gen: torch.Generator):
    """One epoch of training batches ``(x, y)``: a permutation drawn from ``gen``, ``n // batch`` full
    batches, each augmented (with ``gen``) where the task augments."""
    n = len(task.train_y)
    perm = torch.randperm(n, generator=gen)
    for i in range(max(1, n // args.batch)):
        b = perm[i * args.batch:(i + 1) * args.batch]
        x = task.train_x[b]
        if task.augment is not None:
            x = task.augment(x, gen)
        yield x, task.train_y[b]


def margin_warmup(head: mo.MarginHead, args: argparse.Namespace, total: int) -> Optional[mo.MarginScheduler]:
    """``--margin-warmup BEGIN END``: a :class:`marginops.MarginScheduler` on the head's margin (exponential
    ramp from 0 to ``m`` between steps ``BEGIN * total`` and ``END * total``), or None."""
    warm = getattr(args, "margin_warmup", None)
    if warm is None:
        return None
    m = float(head.margin.params["m"])
    return mo.MarginScheduler(head.margin, start=0.0, end=m, warmup_begin=round(warm[0] * total),
                              warmup_end=round(warm[1] * total), mode="exponential")


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def train(task: Task, args: argparse.Namespace, *, quiet: bool = False) -> dict:
    """Train ``task.encoder`` + a ``MarginHead`` over ``task.num_classes``; return the result record.

    The result (also written to ``args.out`` as JSON) holds the arguments, class and sample counts,
    the training-loss trace (mean of every ``log_every`` steps), the held-out metrics after every
    epoch, the final metrics with the answer-or-abstain curve, and the training time (evaluation
    excluded). A checkpoint is written after every epoch; with ``args.resume`` training continues
    from it (same settings required). With ``args.stop_after = k`` this call stops after ``k`` epochs
    (checkpoint written, no final evaluation, nothing written to ``args.out``) and returns
    ``{"complete": False, ...}``: a later call with ``resume`` finishes the run.
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    encoder = task.encoder
    head = make_head(args.margin, args.dim, task.num_classes, args.scale, args.m, backend=args.backend)
    device = torch.device(getattr(args, "device", "cpu"))
    encoder.to(device)
    head.to(device)
    params = list(encoder.parameters()) + list(head.parameters())
    n = len(task.train_y)
    steps_per_epoch = max(1, n // args.batch)
    total = steps_per_epoch * args.epochs
    opt, sched = make_optimizer(params, args, total)
    warmup = margin_warmup(head, args, total)
    gen = torch.Generator().manual_seed(args.seed)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k in ("margin", "scale", "m", "max_classes", "eval_classes", "epochs", "batch", "lr", "dim",
                         "seed", "backend")}
    if warmup is not None:  # only then: records and checkpoints of runs without it keep their settings
        settings["margin_warmup"] = list(args.margin_warmup)
    # train_cpu_seconds: this process's CPU time in the training steps, which other jobs on the machine (or a
    # paused run) do not inflate the way they inflate the wall-clock train_seconds
    state: dict[str, Any] = {"epoch": 0, "step": 0, "train_seconds": 0.0, "train_cpu_seconds": 0.0,
                             "loss_trace": [], "history": []}
    ckpt = args.checkpoint
    if args.resume and ckpt is not None and Path(ckpt).exists():
        saved = torch.load(ckpt, weights_only=False, map_location="cpu")
        if saved["settings"] != settings or saved["num_classes"] != task.num_classes:
            raise SystemExit(f"error: checkpoint {ckpt} was made with other settings "
                             f"({saved['settings']}, {saved['num_classes']} classes); "
                             f"not resuming (delete it or drop --resume)")
        encoder.load_state_dict(saved["encoder"])
        head.load_state_dict(saved["head"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        if warmup is not None:
            warmup.load_state_dict(saved["margin_warmup"])
        gen.set_state(saved["generator"])
        torch.set_rng_state(saved["rng"]["torch"])
        np.random.set_state(saved["rng"]["numpy"])
        random.setstate(saved["rng"]["python"])
        state = saved["state"]
        if not quiet:
            print(f"resumed from {ckpt} at epoch {state['epoch']}", file=sys.stderr)

    def evaluate(final: bool) -> dict:
        emb = embed(encoder, task.eval_x)
        r = retrieval_metrics(emb, task.eval_y, groups=task.eval_groups, group_names=task.group_names)
        if not final:
            r.pop("curve")
        return r

    encoder.train()
    stop_after = getattr(args, "stop_after", None)
    epochs_now = 0
    bar = tqdm(total=total, initial=state["step"], disable=quiet, mininterval=2.0, dynamic_ncols=True,
               desc=f"{task.name} {args.margin}")
    while state["epoch"] < args.epochs:
        t0, c0 = time.perf_counter(), time.process_time()
        run_loss, run_n = 0.0, 0
        for x, y in epoch_batches(task, args, gen):
            loss = head(encoder(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if warmup is not None:
                warmup.step()
            state["step"] += 1
            run_loss += loss.detach().item()
            run_n += 1
            if run_n == args.log_every:
                state["loss_trace"].append([state["step"], run_loss / run_n])
                bar.set_postfix(loss=f"{run_loss / run_n:.3f}")
                run_loss, run_n = 0.0, 0
            bar.update(1)
        if run_n:
            state["loss_trace"].append([state["step"], run_loss / run_n])
        state["train_seconds"] += time.perf_counter() - t0
        state["train_cpu_seconds"] = state.get("train_cpu_seconds", 0.0) + time.process_time() - c0
        state["epoch"] += 1
        ev = evaluate(final=False)
        state["history"].append({"epoch": state["epoch"], "step": state["step"],
                                 "train_seconds": state["train_seconds"],
                                 **{k: ev[k] for k in ("top1", "top5", "top10", "ap")}})
        bar.write(f"epoch {state['epoch']}/{args.epochs}: loss {state['loss_trace'][-1][1]:.3f}, "
                  f"held-out top-1 {ev['top1']:.4f} top-5 {ev['top5']:.4f} top-10 {ev['top10']:.4f}, "
                  f"train {state['train_seconds']:.0f} s") if not quiet else None
        if ckpt is not None:
            Path(ckpt).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(str(ckpt) + ".tmp")
            torch.save({"settings": settings, "num_classes": task.num_classes, "encoder": encoder.state_dict(),
                        "head": head.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "generator": gen.get_state(), "rng": _rng_state(), "state": state,
                        **({"margin_warmup": warmup.state_dict()} if warmup is not None else {})}, tmp)
            os.replace(tmp, ckpt)
        epochs_now += 1
        if stop_after is not None and epochs_now >= stop_after and state["epoch"] < args.epochs:
            bar.close()
            return {"complete": False, "epoch": state["epoch"], "loss_trace": state["loss_trace"],
                    "history": state["history"]}
    bar.close()
    final = evaluate(final=True)
    result = {"complete": True, "corpus": task.name, "settings": settings, "train_classes": task.num_classes,
              "train_samples": n, "eval_classes": int(len(torch.unique(task.eval_y))),
              "eval_samples": int(len(task.eval_y)), "steps": state["step"],
              "train_seconds": state["train_seconds"], "train_cpu_seconds": state.get("train_cpu_seconds"),
              "threads": torch.get_num_threads(),
              "loss_trace": state["loss_trace"], "history": state["history"], "final": final,
              "info": task.info}
    if args.out is not None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


def default_paths(args: argparse.Namespace, corpus: str) -> None:
    stem = f"{corpus}-{args.margin}-s{args.seed}"
    if args.checkpoint is None:
        args.checkpoint = Path("runs") / f"{stem}.pt"
    if args.out is None:
        args.out = Path("runs") / f"{stem}.json"


def summary_line(result: dict) -> str:
    f = result["final"]
    return (f"{result['corpus']} {result['settings']['margin']} seed {result['settings']['seed']}: "
            f"{result['train_classes']} training classes, {result['eval_classes']} held-out classes "
            f"({f['answerable']} answerable + {f['must_abstain']} must-abstain queries); "
            f"top-1/5/10 {f['top1']:.4f}/{f['top5']:.4f}/{f['top10']:.4f}, AP {f['ap']:.4f}, "
            f"recall at precision 0.9 {f['recall_at_p90']:.4f}; train {result['train_seconds']:.0f} s")
