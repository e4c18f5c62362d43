"""``python -m marginops.tune --out DIR [--write]``: choose the Triton kernels' pinned configs on this GPU.

Beside :mod:`marginops.aot` (which compiles the shipped configs without a GPU), this tunes them on one:
it writes the table :mod:`marginops.backends.triton_config` reads, so it ships with the package and a user
with another GPU can run it too.

In at most about 5 minutes on one H100/H200: for each kernel (``fwd``: the
statistics; ``ws``/``ws_pred``: the same storing the exponentials, without and
with the argmax; ``grad``: the logits recomputed into ``G``), input dtype and
shape family (``wide``: D > 1024, timed at B=8192, D=2304; ``narrow``: B=1024,
D=512), every candidate of :data:`CANDIDATES` is

1. compiled, in parallel worker processes that run it once on the GPU (they fill
   Triton's cache, so the timing process does not wait for the compiler);
2. checked against a float32 PyTorch computation of the same quantity (the
   non-target log-sum-exp, the stored exponentials, the argmax, ``G``);
3. read for registers, spills and shared memory (the compiled kernel) and the
   occupancy they allow;
4. timed (``triton.testing.do_bench``, median).

Every time goes to ``DIR/tune.json``; the fastest correct candidate without
spills per (kernel, dtype, family) goes to ``DIR/triton_tuned.json`` (float16
takes bfloat16's winners: the same code), with ``--write`` also to
``marginops/backends/triton_tuned.json`` (the table the package ships and
:func:`marginops.backends.triton_config.config_for` reads; other GPUs' entries
in it are kept). Candidates not started when ``--budget`` seconds have passed
are skipped (their defaults stand). Users never tune at their first call: the
table is read as shipped, and ``MARGINOPS_TRITON_TUNED=/path/table.json`` points
at another one (``=0`` ignores it).

``--dry-run`` runs the same on the CPU with the Triton interpreter at tiny
shapes (no compiler, no timing worth reading: it checks the command end to end;
a test runs it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

#: Where the worker processes run (the folder holding the ``marginops`` package being tuned).
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT = "default"
#: Candidates per kernel and dtype (``DEFAULT``: the pinned default), in the order they are timed. All compile
#: for sm_90 without spills (``python -m marginops.aot --configs ...``): the 64 x 128 and 128 x 64 tiles with
#: one warpgroup and two programs per SM hide one program's epilogue under the other's products; s4 and
#: BLOCK_D = 128 deepen the pipeline; 128 x 256 (``grad`` only: the forward's spills) halves W's reloads.
CANDIDATES = {
    "bfloat16": {
        "fwd": [DEFAULT, "128x128x64w8s4o1t", "64x128x64w4s3o2t", "128x64x64w4s3o2t", "128x128x128w8s2o1t"],
        "ws": [DEFAULT, "128x128x64w8s4o1t", "64x128x64w4s3o2t", "128x64x64w4s3o2t"],
        "ws_pred": [DEFAULT, "128x128x64w8s4o1t"],
        "grad": [DEFAULT, "128x128x64w8s4o1t", "64x128x64w4s3o2t", "128x256x64w8s3o1t"],
    },
    "float32": {
        "fwd": [DEFAULT, "64x64x32w4s3o2t", "128x64x16w8s3o1t"],
        "ws": [DEFAULT, "64x64x32w4s3o2t", "128x64x16w8s3o1t"],
        "grad": [DEFAULT, "64x64x32w4s3o2t"],
    },
}
#: ``family -> (B, D, C)`` timed per dtype (float32 at fewer classes: its products are three MMAs each).
SHAPES = {
    "bfloat16": {"wide": (8192, 2304, 65_536), "narrow": (1024, 512, 524_288)},
    "float32": {"wide": (4096, 2304, 16_384), "narrow": (1024, 512, 131_072)},
}
DRY_SHAPE = (40, 32, 300)
SCALE = 64.0


def _problem(dtype, shape, device):
    """Inputs of the arcface-like heads (normalized rows, s = 64) and float32 references of what the
    kernels compute."""
    import torch

    B, D, C = shape
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, D, generator=g, device=device).to(dtype)
    W = torch.randn(C, D, generator=g, device=device).to(dtype)
    y = torch.randint(0, C, (B,), generator=g, device=device)
    inv_x = 1 / x.float().norm(dim=1).clamp_min(1e-12)
    inv_w = 1 / W.float().norm(dim=1).clamp_min(1e-12)
    rs = SCALE * inv_x
    logits = (x.float() @ W.float().t()) * rs[:, None] * inv_w[None, :]
    N = torch.logsumexp(logits.scatter(1, y[:, None], float("-inf")), 1)
    best = logits.amax(1)
    G_rows = min(B, 64)
    lse = torch.logaddexp(N, torch.zeros_like(N))
    coef = torch.full((B,), 1.0 / B, device=device)
    G = (torch.exp(logits[:G_rows] - lse[:G_rows, None]) * inv_w[None, :] * coef[:G_rows, None]).scatter(
        1, y[:G_rows, None], 0.0)
    del logits
    return dict(x=x, W=W, y=y, rs=rs, inv_w=inv_w, N=N, best=best, lse=lse, coef=coef, G=G)


def _run(kernel, cfg, p, tm, out=None):
    """One launch of ``kernel`` with ``cfg``; returns what the check needs."""
    x, W, y = p["x"], p["W"], p["y"]
    if kernel == "grad":
        tm.margin_grad(x, W, y, p["rs"], p["inv_w"], p["lse"], p["coef"], out, config=cfg)
        return None
    ws = None
    if kernel in ("ws", "ws_pred"):
        ws = out if out is not None and out.tile_c == cfg.block_c else \
            tm.ExpWorkspace.allocate(x.shape[0], W.shape[0], x.dtype, x.device, cfg.block_c)
    N, pred, top = tm.margin_fwd(x, W, y, p["rs"], p["inv_w"], want_prediction=kernel == "ws_pred", config=cfg,
                                 workspace=ws)
    return N, pred, top, ws


def _check(kernel, cfg, p, tm) -> Optional[str]:
    """None when the candidate computes the right thing, else what is wrong."""
    import torch

    x, W = p["x"], p["W"]
    if kernel == "grad":
        G = torch.empty(x.shape[0], W.shape[0], device=x.device, dtype=x.dtype)
        _run(kernel, cfg, p, tm, G)
        rows = p["G"].shape[0]
        err = float((G[:rows].float() - p["G"]).abs().max() / p["G"].abs().max().clamp_min(1e-30))
        return None if err < 2e-2 else f"G off by {err:.2e} of its largest entry"
    N, pred, top, ws = _run(kernel, cfg, p, tm)
    tol = 1e-3 if x.dtype != torch.float32 else 1e-4
    err = float(((N - p["N"]).abs() / p["N"].abs().clamp_min(1.0)).max())
    if not err < tol:
        return f"N off by {err:.2e}"
    if ws is not None:  # the stored exponentials sum back to 1 with their shifts and N
        C = W.shape[0]
        shift = ws.shift.repeat_interleave(ws.tile_c, 1)[:, :C]
        total = (ws.exp.float() * torch.exp2(shift - (N * 1.4426950408889634)[:, None])).sum(1)
        bad = float((total - 1).abs().max())
        if not bad < 2e-2:
            return f"stored exponentials sum to 1 +- {bad:.2e}"
    if pred is not None:
        if not bool((top - p["best"]).abs().max() < 1e-3 * SCALE):
            return "the argmax's logit is off"
    return None


def _resources(tm, kernel: str) -> dict:
    name = "_margin_grad_kernel" if kernel == "grad" else "_margin_fwd_kernel"
    handle = tm.LAST_COMPILED.get(name)
    if handle is None:  # the interpreter compiles nothing
        return {}
    out = {"registers": int(handle.n_regs), "spills": int(handle.n_spills), "shared": int(handle.metadata.shared)}
    out["warps"] = int(handle.metadata.num_warps)
    return out


def _occupancy(res: dict, device) -> int:
    import torch

    if not res:
        return 1
    props = torch.cuda.get_device_properties(device)
    threads = 32 * res["warps"]
    by_regs = 65536 // max(1, -(-res["registers"] // 8) * 8 * threads)
    by_shared = (props.shared_memory_per_multiprocessor // (res["shared"] + 1024)) if res["shared"] else 64
    return max(1, min(by_regs, by_shared, 2048 // threads))


def _jobs(dtypes, kernels, families):
    return [(d, k, f, c) for d in dtypes for f in families for k in kernels if k in CANDIDATES[d]
            for c in CANDIDATES[d][k]]


def warm(jobs: list) -> None:
    """Run each job's kernel once (fills Triton's cache); called in worker processes."""
    import torch

    from marginops.backends import triton_config as tc
    from marginops.backends import triton_margin as tm

    problems = {}
    for dtype, kernel, fam, cand in jobs:
        key = (dtype, fam)
        if key not in problems:
            problems[key] = _problem(getattr(torch, dtype), SHAPES[dtype][fam], "cuda")
        cfg = tc.config_for(kernel, getattr(torch, dtype)) if cand == DEFAULT else tc.parse(cand)
        try:
            if kernel == "grad":
                p = problems[key]
                _run(kernel, cfg, p, tm, torch.empty(p["x"].shape[0], p["W"].shape[0], device="cuda",
                                                      dtype=p["x"].dtype))
            else:
                _run(kernel, cfg, problems[key], tm)
        except Exception:  # noqa: BLE001 - the timing pass records the failure
            pass
    torch.cuda.synchronize()


def _warm_in_parallel(jobs: list, workers: int, timeout: float) -> None:
    chunks = [jobs[i::workers] for i in range(workers)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])

    def one(chunk):
        if chunk:
            subprocess.run([sys.executable, "-m", "marginops.tune", "--warm", json.dumps(chunk)], cwd=REPO_ROOT,
                           env=env, capture_output=True, timeout=timeout, check=False)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, chunks))


def tune(out: Path, *, dry_run: bool = False, budget: float = 270.0, write: bool = False,
         dtypes=("bfloat16", "float32"), kernels=("fwd", "ws", "ws_pred", "grad"),
         families=("wide", "narrow")) -> int:
    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    import torch
    import triton

    from marginops.backends import triton_config as tc
    from marginops.backends import triton_margin as tm

    if not dry_run and not torch.cuda.is_available():
        print("no CUDA GPU here: use --dry-run for the CPU check", file=sys.stderr)
        return 2
    device = "cpu" if dry_run else "cuda"
    arch = 0 if dry_run else torch.cuda.get_device_capability()[0] * 10 + torch.cuda.get_device_capability()[1]
    jobs = _jobs(dtypes, kernels, families)
    if dry_run:  # the interpreter: two candidates per kernel at a tiny shape, no workers
        jobs = [j for j in jobs if CANDIDATES[j[0]][j[1]].index(j[3]) < 2]
    else:
        _warm_in_parallel(jobs, max(1, min(8, (os.cpu_count() or 2) // 2)), timeout=max(30.0, budget / 2))
    print(f"compiled {len(jobs)} candidates in {time.monotonic() - t0:.0f} s")
    records, problems = [], {}
    for dtype, kernel, fam, cand in jobs:
        rec = dict(kernel=kernel, dtype=dtype, family=fam, candidate=cand)
        if time.monotonic() - t0 > budget:
            records.append({**rec, "status": "skipped", "error": "the budget ran out"})
            continue
        dt = getattr(torch, dtype)
        shape = DRY_SHAPE if dry_run else SHAPES[dtype][fam]
        if (dtype, fam) not in problems:
            problems.clear()  # one problem in memory at a time
            problems[(dtype, fam)] = _problem(dt, shape, device)
        p = problems[(dtype, fam)]
        cfg = tc.config_for(kernel, dt) if cand == DEFAULT else tc.parse(cand)
        rec.update(config=cfg.key(), shape=list(shape))
        try:
            wrong = _check(kernel, cfg, p, tm)
            res = _resources(tm, kernel)
            rec.update(res)
            if wrong is not None:
                rec.update(status="wrong", error=wrong)
            elif res.get("spills", 0) > 0:
                rec.update(status="spills", error=f"{res['spills']} bytes of spills")
            else:
                rec["occupancy"] = min(cfg.occupancy, _occupancy(res, device)) if res else cfg.occupancy
                G = torch.empty(p["x"].shape[0], p["W"].shape[0], device=device, dtype=dt) if kernel == "grad" else None
                ws = None
                if kernel in ("ws", "ws_pred"):
                    ws = tm.ExpWorkspace.allocate(p["x"].shape[0], p["W"].shape[0], dt, device, cfg.block_c)
                fn = (lambda: _run(kernel, cfg, p, tm, G)) if G is not None else (lambda: _run(kernel, cfg, p, tm, ws))
                if dry_run:
                    t = time.perf_counter()
                    fn()
                    rec["seconds"] = time.perf_counter() - t
                else:
                    rec["seconds"] = float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")) / 1e3
                B, D, C = shape
                rec["tflops"] = 2.0 * B * C * D / rec["seconds"] / 1e12
                rec["status"] = "ok"
                del G, ws
        except Exception as e:  # noqa: BLE001 - a candidate that fails is recorded, not fatal
            rec.update(status="failed", error=f"{type(e).__name__}: {str(e)[:300]}")
        records.append(rec)
        print(f"{kernel:8} {dtype:9} {fam:7} {rec.get('config', cand):22} {rec['status']:8} "
              + (f"{1e3 * rec['seconds']:.3f} ms {rec['tflops']:.0f} TFLOP/s" if rec["status"] == "ok"
                 else rec.get("error", "")))
    table = winners(records)
    machine = dict(device=torch.cuda.get_device_name() if not dry_run else "cpu (dry run)", arch=f"sm{arch}",
                   torch=torch.__version__, triton=triton.__version__,
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    (out / "tune.json").write_text(json.dumps(dict(machine=machine, records=records), indent=1))
    tuned = dict(machine, configs={f"sm{arch}": table}, note="written by python -m marginops.tune")
    (out / "triton_tuned.json").write_text(json.dumps(tuned, indent=1))
    if write and not dry_run:
        shipped = tc.TUNED_FILE
        old = json.loads(shipped.read_text()) if shipped.is_file() else {"configs": {}}
        old.setdefault("configs", {})[f"sm{arch}"] = table
        old.setdefault("machines", {})[f"sm{arch}"] = machine
        shipped.write_text(json.dumps(old, indent=1) + "\n")
        print(f"wrote {shipped}")
    print(f"{len(table)} entries; {time.monotonic() - t0:.0f} s in all")
    bad = [r for r in records if r["candidate"] == DEFAULT and r["status"] not in ("ok", "skipped")]
    for r in bad:
        print(f"the default {r['kernel']} {r['dtype']} {r['family']} config: {r['status']} ({r.get('error')})",
              file=sys.stderr)
    return 1 if bad else 0


def winners(records: list[dict]) -> dict[str, str]:
    """``"kernel/dtype/family" -> config key`` of the fastest correct candidate; float16 takes bfloat16's."""
    best: dict[str, dict] = {}
    for r in records:
        if r["status"] != "ok":
            continue
        key = f"{r['kernel']}/{r['dtype']}/{r['family']}"
        if key not in best or r["seconds"] < best[key]["seconds"]:
            best[key] = r
    table = {}
    for key, r in best.items():
        from marginops.backends.triton_config import parse

        cfg = parse(r["config"])
        text = cfg.key().replace(f"o{cfg.occupancy}", f"o{r.get('occupancy', cfg.occupancy)}")
        table[key] = text
        if r["dtype"] == "bfloat16":
            table[key.replace("/bfloat16/", "/float16/")] = text
    return dict(sorted(table.items()))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m marginops.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="directory for tune.json and triton_tuned.json")
    parser.add_argument("--write", action="store_true", help="also write marginops/backends/triton_tuned.json")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    parser.add_argument("--budget", type=float, default=270.0, help="seconds until no candidate starts (default 270)")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--kernels", default="fwd,ws,ws_pred,grad")
    parser.add_argument("--families", default="wide,narrow")
    parser.add_argument("--warm", help=argparse.SUPPRESS)  # a worker: JSON list of jobs to compile and run once
    args = parser.parse_args(argv)
    if args.warm:
        warm([tuple(j) for j in json.loads(args.warm)])
        return 0
    if args.out is None:
        parser.error("--out is required")
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":  # the interpreter must be on before triton loads
        env = dict(os.environ, TRITON_INTERPRET="1")
        argv = sys.argv[1:] if argv is None else list(argv)
        return subprocess.run([sys.executable, "-m", "marginops.tune", *argv], cwd=REPO_ROOT, env=env,
                              check=False).returncode
    return tune(args.out, dry_run=args.dry_run, budget=args.budget, write=args.write,
                dtypes=tuple(args.dtypes.split(",")), kernels=tuple(args.kernels.split(",")),
                families=tuple(args.families.split(",")))


if __name__ == "__main__":
    sys.exit(main())
