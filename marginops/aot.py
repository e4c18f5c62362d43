"""``python -m marginops.aot``: compile every shipped Triton kernel config for sm_80 and sm_90, no GPU needed.

For each kernel, feature variant (the ``HAS_*`` constexprs that change the
code), input dtype and target, the kernel goes through Triton's full pipeline
down to a cubin (``triton.compile`` with an explicit ``GPUTarget``) and one row
is printed: registers per thread, spill stores + loads (bytes, from the
``ptxas -v`` log), shared memory per program (bytes, from the compiled
metadata) and the resulting occupancy bound. The specialization mirrors a
real launch: unit inner strides, 16-divisible pointers, ``D`` and row strides.

Exit status 1 if any config spills or needs more shared memory than the
target offers per block (163 KiB on sm_80, 227 KiB on sm_90); 2 if a compile
fails.

Usage::

    python -m marginops.aot [--targets 80,90] [--dtypes bfloat16,float32] [--kernels fwd,grad]
                            [--variants stats,recompute] [--configs 64x128x32w8s2,...] [--jobs N] [--json FILE]

``--configs`` compiles candidate tile configs instead of the shipped ones (tuning).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from typing import Optional

#: Dynamic shared memory a block may use (bytes) and registers per SM, per target.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
REGISTERS_PER_SM = 65536
MAX_THREADS_PER_SM = {80: 2048, 90: 2048}
DTYPE_NAMES = ("bfloat16", "float16", "float32", "float64")
_PTR = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32", "float64": "*fp64"}


@dataclass(frozen=True)
class Job:
    kernel: str  # "fwd" | "grad" | "finish"
    variant: str  # which HAS_* constexprs are on
    dtype: str
    target: int  # 80 | 90
    config: Optional[tuple] = None  # (block_b, block_c, block_d, num_warps, num_stages); None: the shipped one


@dataclass
class Row:
    kernel: str
    variant: str
    dtype: str
    config: str
    target: str
    registers: int
    spill_bytes: int  # spill stores + spill loads
    stack_bytes: int
    shared_bytes: int
    blocks_per_sm: int  # occupancy bound from registers and shared memory
    ok: bool
    error: str = ""


#: (kernel, variant) -> the feature constexprs. "workspace" variants are strategy="workspace"'s.
#: ``filter`` (inter-class filtering) and ``sub3`` (3 sub-centres per class, the common choice) are the
#: margin-family features that change the tile code.
_PLAIN = dict(FILTER=False, SUB=1)
VARIANTS = {
    ("fwd", "stats"): dict(HAS_NORM=True, HAS_PRED=True, STORE_EXP=False, **_PLAIN),
    ("fwd", "loss"): dict(HAS_NORM=True, HAS_PRED=False, STORE_EXP=False, **_PLAIN),
    ("fwd", "unnormalized"): dict(HAS_NORM=False, HAS_PRED=False, STORE_EXP=False, **_PLAIN),
    ("fwd", "workspace"): dict(HAS_NORM=True, HAS_PRED=True, STORE_EXP=True, **_PLAIN),
    ("fwd", "filter"): dict(HAS_NORM=True, HAS_PRED=True, STORE_EXP=False, FILTER=True, SUB=1),
    ("fwd", "workspace-filter"): dict(HAS_NORM=True, HAS_PRED=True, STORE_EXP=True, FILTER=True, SUB=1),
    ("fwd", "sub3-filter"): dict(HAS_NORM=True, HAS_PRED=True, STORE_EXP=False, FILTER=True, SUB=3),
    ("grad", "recompute"): dict(HAS_NORM=True, FROM_EXP=False, SCALE_G=True, **_PLAIN),
    ("grad", "unscaled"): dict(HAS_NORM=True, FROM_EXP=False, SCALE_G=False, **_PLAIN),  # float16's G
    ("grad", "unnormalized"): dict(HAS_NORM=False, FROM_EXP=False, SCALE_G=False, **_PLAIN),
    ("grad", "workspace"): dict(HAS_NORM=True, FROM_EXP=True, SCALE_G=True, **_PLAIN),
    ("grad", "filter"): dict(HAS_NORM=True, FROM_EXP=False, SCALE_G=True, FILTER=True, SUB=1),
    ("grad", "sub3-filter"): dict(HAS_NORM=True, FROM_EXP=False, SCALE_G=True, FILTER=True, SUB=3),
    ("grad", "sub3-unscaled"): dict(HAS_NORM=True, FROM_EXP=False, SCALE_G=False, FILTER=False, SUB=3),
    ("finish", "dW"): dict(HAS_PRE=False),
    ("finish", "dW-unscaled"): dict(HAS_PRE=True),  # after float16's unscaled G
}


def _source(job: Job):
    """The ``ASTSource`` and options for one job, specialized like a real launch."""
    import torch
    import triton
    import triton.language as tl

    from .backends import triton_kernels as tk

    dtype = getattr(torch, job.dtype)
    inp = _PTR[job.dtype]
    acc = "*fp64" if job.dtype == "float64" else "*fp32"
    if job.kernel == "fwd":
        table = (tk.WORKSPACE_FWD_CONFIGS if job.variant.startswith("workspace")
                 else tk.SUBCENTER_FWD_CONFIGS if job.variant.startswith("sub") else tk.FWD_CONFIGS)
        fn, cfg = tk._margin_fwd_kernel, table[dtype]
        pointers = dict(x_ptr=inp, w_ptr=inp, y_ptr="*i64", rs_ptr=acc, cs_ptr=acc, m_ptr=acc, l_ptr=acc,
                        pv_ptr=acc, pi_ptr="*i64", e_ptr=inp, sh_ptr=acc)
        ints = dict(B="i32", C="i32", D="i32", classes_per_split="i32", stride_xb="i32", stride_wc="i32",
                    stride_pb="i32", stride_eb="i32", stride_sb="i32", fthr="fp32")
        divisible = {"D", "classes_per_split", "stride_xb", "stride_wc", "stride_eb"}
        units = ("stride_xd", "stride_wd")
    elif job.kernel == "finish":  # streaming: its "config" is rows x 1 x features per step
        fn, cfg = tk._finish_w_kernel, tk.FINISH_CONFIGS[dtype]
        pointers = dict(dd_ptr=acc, w_ptr=inp, coef_ptr=acc, pre_ptr=acc, out_ptr=inp)
        ints = dict(Cc="i32", D="i32", stride_dd="i32", stride_w="i32", stride_out="i32")
        divisible = {"D", "stride_dd", "stride_w", "stride_out"}
        units = ("stride_wd",)
    else:
        table = (tk.WORKSPACE_GRAD_CONFIGS if job.variant == "workspace"
                 else tk.SUBCENTER_GRAD_CONFIGS if job.variant.startswith("sub") else tk.GRAD_CONFIGS)
        fn, cfg = tk._margin_grad_kernel, table[dtype]
        pointers = dict(x_ptr=inp, w_ptr=inp, y_ptr="*i64", rs_ptr=acc, cs_ptr=acc, lse_ptr=acc, coef_ptr=acc,
                        e_ptr=inp, sh_ptr=acc, g_ptr=inp)
        ints = dict(R="i32", Cc="i32", D="i32", label_offset="i32", smooth="fp32", stride_xb="i32",
                    tile_c="i32", stride_wc="i32", stride_eb="i32", stride_sb="i32", stride_gb="i32", fthr="fp32")
        divisible = {"D", "stride_xb", "stride_wc", "stride_eb", "stride_gb", "tile_c"}
        units = ("stride_xd", "stride_wd")
    if job.config is not None:
        cfg = tk.KernelConfig(*job.config)
    precision = {"float32": "tf32x3", "float64": "ieee"}.get(job.dtype, "tf32")
    acc_tl = tl.float64 if job.dtype == "float64" else tl.float32
    if job.kernel == "finish":
        constexprs = dict(VARIANTS[(job.kernel, job.variant)], ACC=acc_tl, BLOCK_R=cfg.block_b, BLOCK_D=cfg.block_d)
    else:
        constexprs = dict(VARIANTS[(job.kernel, job.variant)], UPCAST=False, ACC=acc_tl, DOT_PRECISION=precision,
                          BLOCK_B=cfg.block_b, BLOCK_C=cfg.block_c, BLOCK_D=cfg.block_d)
    constexprs.update({name: 1 for name in units})
    known = set(pointers) | set(ints) | set(constexprs)
    assert known >= set(fn.arg_names), f"unspecified kernel arguments: {set(fn.arg_names) - known}"
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = pointers.get(name) or ints[name]
        if name in pointers or name in divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return src, options, cfg


_USAGE = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_job(job: Job) -> Row:
    """Compile one job and read its resource usage (runs in a worker process)."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # ptxas must run to print its log
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # 3.9's default, stated (silences its warning)
    import triton
    from triton.backends.compiler import GPUTarget

    config = ""
    try:
        src, options, cfg = _source(job)
        config = str(cfg)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=GPUTarget("cuda", job.target, 32), options=options)
        text = log.getvalue()
        regs = max(int(r) for r in _USAGE.findall(text))
        stack, stores, loads = (max(int(m[k]) for m in _SPILLS.findall(text)) for k in range(3))
        shared = int(kernel.metadata.shared)
        threads = 32 * cfg.num_warps
        by_regs = REGISTERS_PER_SM // max(1, regs * threads)
        by_threads = MAX_THREADS_PER_SM[job.target] // threads
        by_shared = SHARED_LIMIT[job.target] // shared if shared else by_threads
        ok = stores + loads == 0 and shared <= SHARED_LIMIT[job.target]
        return Row(job.kernel, job.variant, job.dtype, config, f"sm_{job.target}", regs, stores + loads, stack,
                   shared, min(by_regs, by_threads, by_shared), ok)
    except Exception as e:  # report and go on: one broken config must not hide the others
        return Row(job.kernel, job.variant, job.dtype, config, f"sm_{job.target}", -1, -1, -1, -1, 0, False,
                   f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")


def jobs(kernels, dtypes, targets, configs=(None,), variants=None) -> list[Job]:
    return [Job(k, v, d, t, c) for (k, v) in VARIANTS if k in kernels and (not variants or v in variants)
            for d in dtypes for c in configs for t in targets]


def parse_config(text: str) -> tuple:
    """``"64x128x32w8s2"`` -> ``(64, 128, 32, 8, 2)``."""
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)w(\d+)s(\d+)", text.strip())
    if not m:
        raise ValueError(f"config {text!r} is not BxCxDwWARPSsSTAGES, e.g. 64x128x32w8s2")
    return tuple(int(g) for g in m.groups())


def format_table(rows: list[Row]) -> str:
    head = ("kernel", "variant", "dtype", "config", "target", "regs", "spills", "stack", "smem", "blk/SM", "ok")
    body = [(r.kernel, r.variant, r.dtype, r.config, r.target, str(r.registers), str(r.spill_bytes),
             str(r.stack_bytes), str(r.shared_bytes), str(r.blocks_per_sm),
             "yes" if r.ok else ("ERROR " + r.error if r.error else "NO")) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in (head, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m marginops.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated")
    parser.add_argument("--dtypes", default=",".join(DTYPE_NAMES), help="input dtypes, comma-separated")
    parser.add_argument("--kernels", default="fwd,grad,finish", help="kernels, comma-separated")
    parser.add_argument("--variants", help="feature variants, comma-separated (default: all)")
    parser.add_argument("--configs", help="candidate configs instead of the shipped ones, e.g. "
                                          "64x128x32w8s2,128x64x32w8s3 (for tuning)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    targets = [int(t) for t in args.targets.split(",")]
    dtypes = args.dtypes.split(",")
    kernels = args.kernels.split(",")
    for t in targets:
        if t not in SHARED_LIMIT:
            parser.error(f"unknown target {t}; known: {sorted(SHARED_LIMIT)}")
    for d in dtypes:
        if d not in DTYPE_NAMES:
            parser.error(f"unknown dtype {d}; known: {DTYPE_NAMES}")
    configs = [parse_config(c) for c in args.configs.split(",")] if args.configs else [None]
    todo = jobs(kernels, dtypes, targets, configs, args.variants.split(",") if args.variants else None)
    if args.jobs <= 1:
        rows = [compile_job(j) for j in todo]
    else:
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            rows = list(pool.map(compile_job, todo))
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    if any(r.error for r in rows):
        print(f"{sum(bool(r.error) for r in rows)} config(s) failed to compile", file=sys.stderr)
        return 2
    bad = [r for r in rows if not r.ok]
    if bad:
        print(f"{len(bad)} config(s) spill or exceed shared memory", file=sys.stderr)
        return 1
    print(f"all {len(rows)} configs: zero spills, shared memory within limits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
