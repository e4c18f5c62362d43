"""What each rank runs in the distributed tests (imported by spawned processes, so a plain module).

:func:`spawn` starts ``world`` processes on 127.0.0.1 with gloo and runs one
of the case functions below on each; every case returns a picklable result
per rank, or the exception it raised, as text. Cases compare
:class:`marginops.distributed.ShardedMarginHead` with a single-process
:func:`marginops.margin_cross_entropy` on the concatenated batch and the full
weight, computed inside the same process.
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
import time
import traceback
from datetime import timedelta

from typing import Optional

from torch import Tensor

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import marginops as mo
from marginops.distributed import ShardedMarginHead

from . import dense_backend

dense_backend.register()  # backend="dense": per-row scales before the fused backends have them

#: A generous bound on one collective: a rank that died must not keep the others waiting longer.
COLLECTIVE_TIMEOUT = timedelta(seconds=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, case: str, kwargs: dict, queue) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=COLLECTIVE_TIMEOUT)
        torch.set_num_threads(1)
        try:
            result = globals()[case](rank, world, **kwargs)
        finally:
            dist.destroy_process_group()
        queue.put((rank, "ok", result))
    except BaseException as e:  # noqa: BLE001 (reported to the test, which decides)
        queue.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"))


def spawn(world: int, case: str, timeout: float = 240.0, **kwargs) -> list[tuple[str, object]]:
    """Run ``case(rank, world, **kwargs)`` on ``world`` gloo ranks; ``[(status, result)]`` in rank order.

    Raises:
        TimeoutError: when the ranks have not all finished within ``timeout`` seconds (they are killed).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, case, kwargs, queue), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    results: dict[int, tuple[str, object]] = {}
    while len(results) < world and time.monotonic() < deadline:
        if not queue.empty():
            rank, status, value = queue.get()
            results[rank] = (status, value)
        elif not any(p.is_alive() for p in procs) and queue.empty():
            break
        else:
            time.sleep(0.05)
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
    if len(results) < world:
        raise TimeoutError(f"{case}: only ranks {sorted(results)} of {world} reported within {timeout} s")
    return [results[r] for r in range(world)]


# -- the problems ----------------------------------------------------------------------------------------

def problem(world: int, *, C: int = 23, D: int = 6, sizes=(5, 3, 7), dtype=torch.float64, seed: int = 0,
            ignore=((0, 1),), sub_centers: int = 1):
    """The same full problem on every rank: per-rank batches ``sizes[:world]``, the full weight (``C *
    sub_centers`` rows), labels with the given (rank, row) pairs set to -100 and the second row sharing
    the first one's label."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(C * sub_centers, D, generator=g, dtype=torch.float64).to(dtype)
    xs, ys = [], []
    for n in sizes[:world]:
        xs.append(torch.randn(n, D, generator=g, dtype=torch.float64).to(dtype))
        ys.append(torch.randint(0, C, (n,), generator=g))
    for r, i in ignore:
        if r < world and i < len(ys[r]):
            ys[r][i] = -100
    if len(ys[0]) >= 2:
        ys[0][1] = ys[0][0] if ys[0][0] != -100 else ys[0][1]
    return W, xs, ys


class NormAdaptive(mo.Margin):
    """A stand-in adaptive margin: per-row CosFace margins and a loss term from the embedding norms
    (both differentiable), through the ``for_batch`` hook."""

    params: dict = {}

    def for_batch(self, x):
        norms = x.norm(dim=1)
        return mo.CosFace(0.1 + 0.2 * torch.sigmoid(norms - 2.5)), 0.05 * norms


def _margin(kind: str, batch: int):
    if kind == "norm-adaptive":
        return NormAdaptive()
    if kind == "per-row":
        return mo.CosFace(torch.linspace(0.1, 0.4, batch, dtype=torch.float64))
    if kind == "callable":
        return lambda t: t - 0.2 * t * t
    return {"none": None, "cosface": mo.CosFace(0.35), "arcface": mo.ArcFace(0.5), "sphereface": mo.SphereFace(4),
            }[kind]


def gather_ragged(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every rank's ``t`` (first dimensions ``sizes``) in rank order, with plain ``dist.all_gather``."""
    parts = [t.new_zeros((max(sizes), *t.shape[1:])) for _ in sizes]
    dist.all_gather(parts, torch.cat([t, t.new_zeros((max(sizes) - len(t), *t.shape[1:]))]))
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def padded_rows(sizes, cap) -> torch.Tensor:
    """Where each row of the global batch sits in the padded layout of ``max_local_batch = cap``."""
    return torch.cat([torch.arange(r * cap, r * cap + n) for r, n in enumerate(sizes)])


def _per_row(kind: str, B: int, dtype) -> Optional[Tensor]:
    """Deterministic per-row values of the global batch: ``"weight"`` in [0, 2] (one row 0), ``"scale"``
    in [8, 24]."""
    if not kind:
        return None
    g = torch.Generator().manual_seed(11)
    values = torch.rand(B, generator=g, dtype=torch.float64)
    if kind == "weight":
        values = 2 * values
        values[-1] = 0.0
    else:
        values = 8 + 16 * values
    return values.to(dtype)


def compare_with_single_process(rank: int, world: int, *, margin: str = "arcface", dtype=torch.float64,
                                sizes=(5, 3, 7), C: int = 23, max_local_batch=None, sub_centers: int = 1,
                                row_weight: str = "", row_scale: str = "", **options) -> dict:
    """Max |difference| of loss, local embedding gradient, weight block gradient; whether argmax matches.

    ``scale="adacos"`` gives both the sharded head and the single process a dynamic AdaCos policy and
    also compares the scale each holds after the step; ``row_weight="weight"`` / ``row_scale="scale"``
    pass per-row loss weights / per-row scales (each rank its own rows; the scales' gradients compared).
    A NotImplementedError (a backend without per-row scales) is returned as ``{"not_implemented": ...}``.
    """
    W, xs, ys = problem(world, C=C, sizes=sizes, dtype=dtype, sub_centers=sub_centers)
    B = sum(len(x) for x in xs)
    start = sum(len(v) for v in xs[:rank])
    mine_rows = slice(start, start + len(xs[rank]))
    scale = options.pop("scale", 16.0)
    adacos = scale == "adacos"
    if adacos:
        scale = mo.AdaCos(C)
    if max_local_batch is not None and margin == "per-row":
        raise ValueError("per-row margins cover the padded batch with max_local_batch")
    head = ShardedMarginHead(W.shape[1], C, margin=_margin(margin, B), scale=scale, dtype=dtype, return_stats=True,
                             max_local_batch=max_local_batch, sub_centers=sub_centers, **options)
    head.load_full_state_dict({"weight": W})
    weights, scales = _per_row(row_weight, B, dtype), _per_row(row_scale, B, dtype)
    x = xs[rank].clone().requires_grad_()
    local = {}
    if weights is not None:
        local["row_weight"] = weights[mine_rows]
    if scales is not None:
        local["scale"] = scales[mine_rows].clone().requires_grad_()
    try:
        loss, stats = head(x, ys[rank], **local)
    except NotImplementedError as e:
        return {"not_implemented": str(e)}
    loss.sum().backward()
    xa, Wa = torch.cat(xs).requires_grad_(), W.clone().requires_grad_()
    ref_scale = mo.AdaCos(C) if adacos else (scales.clone().requires_grad_() if scales is not None else scale)
    ref_margin = _margin(margin, B)
    if sub_centers > 1:
        ref_margin = mo.SubCenter(ref_margin, sub_centers)
    ref, ref_stats = mo.margin_cross_entropy(xa, Wa, torch.cat(ys), ref_margin, ref_scale, return_stats=True,
                                             row_weight=weights, **options)
    ref.sum().backward()
    k = sub_centers
    mine = slice(head.class_start * k, (head.class_start + head.num_local) * k)
    if max_local_batch is not None:  # stats come in the padded layout
        at = padded_rows([len(v) for v in xs], max_local_batch)
        stats = type(stats)(*(f[at] for f in stats))
        if options.get("reduction") == "none":
            loss = loss[at]

    def err(a, b):
        if a.numel() == 0:
            return 0.0
        return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()

    result = {
        "loss": err(loss.detach(), ref.detach()),
        "x.grad": err(x.grad, xa.grad[mine_rows]),
        "W.grad": err(head.weight.grad, Wa.grad[mine]),
        "lse": err(stats.lse, ref_stats.lse),
        "prediction": bool(torch.equal(stats.prediction, ref_stats.prediction)),
        "loss_dtype": str(loss.dtype),
        "range": (head.class_start, head.num_local),
    }
    if scales is not None:
        result["scale.grad"] = err(local["scale"].grad, ref_scale.grad[mine_rows])
    if adacos:  # the next step's scale: from the global statistics, the same on every rank
        every = [torch.zeros((), dtype=torch.float64) for _ in range(world)]
        dist.all_gather(every, head.scale.scale.clone())
        result["adacos"] = err(head.scale.scale, ref_scale.scale)
        result["adacos_moved"] = bool(head.scale.scale != mo.AdaCos.fixed_scale(C))
        result["adacos_same_on_every_rank"] = all(bool(torch.equal(v, every[0])) for v in every)
    return result


def compare_many(rank: int, world: int, *, configs: list[dict]) -> list[dict]:
    """:func:`compare_with_single_process` for each config, in one process group (spawning is slow)."""
    return [compare_with_single_process(rank, world, **dict(config)) for config in configs]


def checkpoint_across_world_sizes(rank: int, world: int, *, path: str, steps: int, load: bool) -> dict:
    """``load``: start from the full weight in ``path``; train ``steps`` SGD steps on the fixed
    problem; rank 0 saves the full weight to ``path``. Returns the losses seen."""
    # the global batch is the same 12 rows whatever the world size: split it evenly
    W, xs, ys = problem(3, sizes=(4, 4, 4), seed=1)
    D, C = W.shape[1], W.shape[0]
    x_all, y_all = torch.cat(xs), torch.cat(ys)
    rows = torch.tensor_split(torch.arange(len(x_all)), world)[rank]
    head = ShardedMarginHead(D, C, margin=mo.ArcFace(0.5), scale=16.0, dtype=torch.float64)
    head.load_full_state_dict(torch.load(path) if load else {"weight": W})
    opt = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.0)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = head(x_all[rows], y_all[rows])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    state = head.full_state_dict()
    if rank == 0:
        torch.save(state, path)
    dist.barrier()
    return {"losses": losses}


def bad_label_on_one_rank(rank: int, world: int) -> str:
    W, xs, ys = problem(world)
    if rank == world - 1:
        ys[rank][0] = W.shape[0] + 3
    head = ShardedMarginHead(W.shape[1], W.shape[0], margin=mo.ArcFace(0.5), dtype=torch.float64)
    head(xs[rank], ys[rank])
    return "no error"


def sizes_differ_across_ranks(rank: int, world: int) -> str:
    ShardedMarginHead(6, 23 + rank, margin=mo.ArcFace(0.5))
    return "no error"


def one_rank_raises(rank: int, world: int) -> dict:
    """Rank 1 fails before the step; the others must get an error, not wait forever."""
    W, xs, ys = problem(world)
    head = ShardedMarginHead(W.shape[1], W.shape[0], dtype=torch.float64)
    if rank == 1:
        raise RuntimeError("rank 1 failed on purpose")
    t0 = time.monotonic()
    try:
        head(xs[rank], ys[rank]).backward()
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {str(e)[:300]}", "seconds": time.monotonic() - t0}
    return {"error": None, "seconds": time.monotonic() - t0}


def tmp_path() -> str:
    fd, path = tempfile.mkstemp(suffix=".pt")
    os.close(fd)
    return path


def sampled_step(rank: int, world: int, *, sample_rate: float, margin: str = "arcface", max_local_batch=None,
                 C: int = 41, sub_centers: int = 1, **options) -> dict:
    """One sampled step against one process on the sampled classes only (their ``k`` rows each with
    sub-centres)."""
    from marginops.distributed import shard_range

    k = sub_centers
    W, xs, ys = problem(world, C=C, sizes=(6, 5, 4), sub_centers=k)
    B = sum(len(x) for x in xs)
    head = ShardedMarginHead(W.shape[1], C, margin=_margin(margin, B), scale=16.0, dtype=torch.float64,
                             sample_rate=sample_rate, seed=3, return_stats=True, max_local_batch=max_local_batch,
                             sub_centers=k, **options)
    head.load_full_state_dict({"weight": W})
    x = xs[rank].clone().requires_grad_()
    loss, stats = head(x, ys[rank])
    loss.sum().backward()
    rows = head.sampled_rows.nonzero().squeeze(1)
    assert bool((rows.view(-1, k) == rows.view(-1, k)[:, :1] + torch.arange(k)).all()), "a class's rows split"
    classes = rows[::k] // k
    count = torch.tensor([len(classes)])
    every = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(every, count)
    sampled = gather_ragged(classes + head.class_start, [int(c) for c in torch.cat(every)])
    # one process over the sampled classes only, labels renumbered
    y_all = torch.cat(ys)
    lookup = torch.full((C,), -1, dtype=torch.int64)
    lookup[sampled] = torch.arange(len(sampled))
    y_sub = torch.where(y_all != -100, lookup[y_all.clamp(0, C - 1)], y_all)
    sampled_rows = (sampled.unsqueeze(1) * k + torch.arange(k)).reshape(-1)
    xa, Ws = torch.cat(xs).requires_grad_(), W[sampled_rows].clone().requires_grad_()
    ref_margin = _margin(margin, B) if k == 1 else mo.SubCenter(_margin(margin, B), k)
    ref, ref_stats = mo.margin_cross_entropy(xa, Ws, y_sub, ref_margin, 16.0, return_stats=True, **options)
    ref.sum().backward()
    start = sum(len(v) for v in xs[:rank])
    if max_local_batch is not None:
        stats = type(stats)(*(f[padded_rows([len(v) for v in xs], max_local_batch)] for f in stats))
    mine = (sampled_rows >= head.class_start * k) & (sampled_rows < (head.class_start + head.num_local) * k)
    full_grad = torch.zeros_like(head.weight)
    full_grad[sampled_rows[mine] - head.class_start * k] = Ws.grad[mine]
    positives = {int(c) for c in y_all[y_all != -100]}
    return {
        "loss": ((loss - ref).abs().max() / ref.abs().max()).item(),
        "x.grad": ((x.grad - xa.grad[start:start + len(xs[rank])]).abs().max() / xa.grad.abs().max()).item(),
        "W.grad": ((head.weight.grad - full_grad).abs().max() / Ws.grad.abs().max()).item(),
        "prediction": bool(torch.equal(stats.prediction, sampled[ref_stats.prediction])),
        "sampled": sorted(int(c) for c in sampled),
        "positives_kept": positives <= {int(c) for c in sampled},
        "expected_count": sum(
            max(len({c for c in positives if a <= c < a + n}), math.ceil(sample_rate * n)) if max_local_batch is None
            else min(n, max(math.ceil(sample_rate * n), world * max_local_batch))
            for a, n in (shard_range(C, world, r) for r in range(world))),
    }


def eval_mode_uses_every_class(rank: int, world: int) -> float:
    """With ``head.eval()`` a sampling head gives the loss of all classes."""
    W, xs, ys = problem(world, C=41, sizes=(6, 5, 4))
    heads = [ShardedMarginHead(W.shape[1], 41, margin=mo.ArcFace(0.5), scale=16.0, dtype=torch.float64,
                               sample_rate=rate) for rate in (0.2, 1.0)]
    for head in heads:
        head.load_full_state_dict({"weight": W})
    heads[0].eval()
    with torch.no_grad():
        a, b = (head(xs[rank], ys[rank]) for head in heads)
    return (a - b).abs().item()


def sampled_optimizer_steps(rank: int, world: int, *, optimizer: str, steps: int = 3) -> dict:
    """Rows a step did not sample keep their weight and optimizer state; sampled rows move as an
    optimizer over just those rows would move them."""
    W, xs, ys = problem(world, C=41, sizes=(6, 5, 4))
    head = ShardedMarginHead(W.shape[1], 41, margin=mo.ArcFace(0.5), scale=16.0, dtype=torch.float64,
                             sample_rate=0.25, seed=5)
    head.load_full_state_dict({"weight": W})
    make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9, weight_decay=1e-3),
            "adam": lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=1e-3)}[optimizer]
    opt = make([head.weight])
    head.attach_optimizer(opt)
    report = {"unsampled_weight_unchanged": True, "unsampled_state_unchanged": True, "sampled_match": True,
              "sampled_counts": []}
    for step in range(steps):
        before = head.weight.detach().clone()
        state_before = {k: v.clone() for k, v in opt.state.get(head.weight, {}).items() if isinstance(v, Tensor)}
        opt.zero_grad()
        head(xs[rank], ys[rank]).backward()
        rows = head.sampled_rows.nonzero().squeeze(1)
        grad_rows = head.weight.grad[rows].clone()
        opt.step()
        after = head.weight.detach()
        others = torch.ones(head.num_local, dtype=torch.bool)
        others[rows] = False
        report["sampled_counts"].append(len(rows))
        report["unsampled_weight_unchanged"] &= bool(torch.equal(after[others], before[others]))
        for k, v in opt.state[head.weight].items():
            if isinstance(v, Tensor) and v.shape == head.weight.shape and k in state_before:
                report["unsampled_state_unchanged"] &= bool(torch.equal(v[others], state_before[k][others]))
        # the same optimizer, fresh, over just the sampled rows with their state
        sub = torch.nn.Parameter(before[rows].clone())
        ref_opt = make([sub])
        if state_before:
            ref_opt.state[sub] = {k: (v[rows].clone() if v.shape == head.weight.shape else v.clone())
                                  for k, v in state_before.items()}
        sub.grad = grad_rows
        ref_opt.step()
        report["sampled_match"] &= bool(torch.allclose(after[rows], sub.detach(), rtol=1e-12, atol=1e-15))
    return report


def no_host_reads(rank: int, world: int, *, sample_rate: float, max_local_batch=8) -> dict:
    """With ``max_local_batch`` (and device-side label checks) a training step reads no tensor on the
    host: every way a value reaches Python (item, tolist, bool, int, float, index) raises while it runs."""
    W, xs, ys = problem(world, C=60, sizes=(6, 5, 4))
    head = ShardedMarginHead(W.shape[1], 60, margin=mo.ArcFace(0.5), scale=16.0, dtype=torch.float64,
                             max_local_batch=max_local_batch, sample_rate=sample_rate, validate_labels="device")
    head.load_full_state_dict({"weight": W})
    x = xs[rank].clone().requires_grad_()
    reads = []
    names = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def trap(name):
        def read(self, *args, **kwargs):
            reads.append(name)
            return saved[name](self, *args, **kwargs)
        return read

    try:
        for name in names:
            setattr(torch.Tensor, name, trap(name))
        head(x, ys[rank]).backward()
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
    return {"reads": reads, "grad": x.grad is not None and bool(torch.isfinite(x.grad).all())}


def unseeded_random_margin(rank: int, world: int) -> str:
    W, xs, ys = problem(world)
    head = ShardedMarginHead(W.shape[1], W.shape[0], margin=mo.ElasticFace(seed=None), dtype=torch.float64)
    head(xs[rank], ys[rank])
    return "no error"


# -- compiled steps -------------------------------------------------------------------------------------------

def _counting_backend(graphs: list):
    """``aot_eager`` (AOTAutograd, functionalization and fake tensors, no code generation) that records
    the node count of every graph Dynamo hands it: one entry per compilation."""
    from torch._dynamo.backends.debugging import aot_eager

    def backend(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return aot_eager(gm, example_inputs)

    return backend


def compiled_steps(rank: int, world: int, *, steps: int = 3, sample_rate: float = 1.0, max_local_batch=8,
                   margin: str = "arcface", C: int = 60, sizes=(6, 5, 4), lr: float = 0.5, **options) -> dict:
    """``steps`` training steps (new batch each step, SGD on the weight) of a head compiled with
    ``torch.compile(fullgraph=True)`` when ``max_local_batch`` is set, beside the same head in eager mode.

    Returns the compilations and graph breaks Dynamo counted, and per step the largest relative
    differences (compiled vs eager) of the loss, the local embeddings' and the weight's gradients, and
    whether the predictions agree."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    k = options.get("sub_centers", 1)
    W, _, _ = problem(world, C=C, sizes=sizes, dtype=torch.float32, sub_centers=k)
    heads = []
    for _ in range(2):
        head = ShardedMarginHead(W.shape[1], C, margin=_margin(margin, 0), scale=16.0, dtype=torch.float32,
                                 sample_rate=sample_rate, seed=7, max_local_batch=max_local_batch,
                                 return_stats=True, **options)
        head.load_full_state_dict({"weight": W})
        heads.append(head)
    graphs: list = []
    eager_fn = heads[0]
    compiled_fn = torch.compile(heads[1], fullgraph=max_local_batch is not None, backend=_counting_backend(graphs))
    report = {"steps": []}
    for step in range(steps):
        _, xs, ys = problem(world, C=C, sizes=sizes, dtype=torch.float32, seed=100 + step)
        outs = []
        for head, fn in zip(heads, (eager_fn, compiled_fn)):
            x = xs[rank].clone().requires_grad_()
            head.weight.grad = None
            loss, stats = fn(x, ys[rank])
            loss.backward()
            outs.append((loss.detach(), x.grad, head.weight.grad.clone(), stats.prediction))
            with torch.no_grad():
                head.weight -= lr * head.weight.grad

        def rel(a, b):
            return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() if b.numel() else 0.0

        (le, xe, we, pe), (lc, xc, wc, pc) = outs
        report["steps"].append({"loss": rel(lc, le), "x.grad": rel(xc, xe), "W.grad": rel(wc, we),
                                "prediction": bool(torch.equal(pc, pe)), "loss_value": le.item()})
    report["compiles"] = len(graphs)
    report["graph_breaks"] = sum(counters["graph_break"].values())
    report["break_reasons"] = sorted(counters["graph_break"])[:5]
    report["same_draws"] = bool(torch.equal(heads[0].sample_step, heads[1].sample_step))
    return report


def world_cases(rank: int, world: int, *, configs: list[dict], compiled: list[dict], sampling: list[dict]) -> dict:
    """In one process group (spawning is slow), each part ``(status, results)``:
    :func:`compare_with_single_process` for each of ``configs``, :func:`compiled_steps` for each of
    ``compiled``, and :func:`sampled_step` for each of ``sampling``, twice (fresh heads, the same seed)."""
    out = {}
    parts = (("compare", compare_with_single_process, configs), ("compiled", compiled_steps, compiled),
             ("sampling", sampled_step, sampling), ("sampling_again", sampled_step, sampling))
    for part, case, cases in parts:
        try:
            out[part] = ("ok", [case(rank, world, **dict(config)) for config in cases])
        except Exception as e:  # noqa: BLE001 (reported to the test)
            out[part] = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}")
    return out


