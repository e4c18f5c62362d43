"""``python -m marginops.aot``: compile every shipped Triton kernel config for sm_80 and sm_90, no GPU needed.

For each kernel, feature variant (the ``HAS_*`` constexprs that change the
code), input dtype and target, the kernel goes through Triton's full pipeline
down to a cubin (``triton.compile`` with an explicit ``GPUTarget``) and one row
is printed: registers per thread, spill stores + loads (bytes, from the
``ptxas -v`` log), shared memory per program (bytes, from the compiled
metadata), the occupancy bound (programs per SM) against the occupancy the
config claims (the grid planner counts on it), and what the PTX issues:
``wgmma`` (Hopper warpgroup MMAs), ``mma.sync`` (Ampere MMAs), TMA loads
(``cp.async.bulk.tensor``) and ``cp.async`` copies. The specialization mirrors
a real launch: unit inner strides, 16-divisible pointers, ``D`` and row
strides, and on sm_90 host-side tensor descriptors where the config asks for
TMA.

Exit status 1 if any config spills, needs more shared memory than the target
offers per block (163 KiB on sm_80, 227 KiB on sm_90), misses its occupancy,
or on sm_90 multiplies 16-bit/float32 tiles without ``wgmma`` or a TMA config
loads without TMA; 2 if a compile fails.

Usage::

    python -m marginops.aot [--targets 80,90] [--dtypes bfloat16,float32] [--kernels fwd,grad]
                            [--variants stats,recompute] [--configs 128x128x64w4s3o2t,...] [--jobs N]
                            [--json FILE] [--markdown] [--quick]

``--configs`` compiles candidate tile configs instead of the shipped ones (tuning);
``--markdown`` prints the table as Markdown (docs).
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
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
REGISTERS_PER_SM = 65536
MAX_THREADS_PER_SM = {80: 2048, 90: 2048}
DTYPE_NAMES = ("bfloat16", "float16", "float32", "float64")
_PTR = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32", "float64": "*fp64"}
_DESC = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}
#: PTX instructions counted per kernel (static counts in the PTX text, not executed instructions).
INSTRUCTIONS = {"wgmma": "wgmma.mma_async", "mma": "mma.sync", "tma": "cp.async.bulk.tensor",
                "cp_async": "cp.async.cg.shared", "ex2": "ex2.approx"}
#: Streaming and elementwise kernels, and float64 (no tensor-core path), need no MMA instruction.
_GEMM_KERNELS = ("fwd", "grad", "bwd_dx", "masked")


@dataclass(frozen=True)
class Job:
    kernel: str  # "fwd" | "grad" | "bwd_dx" | "from_exp" | "finish" | "rows" | "masked"
    variant: str  # which HAS_* constexprs are on
    dtype: str
    target: int  # 80 | 90
    config: Optional[str] = None  # a config's key (BxCxDwWsSoO[t]); None: the shipped one
    family: str = "wide"  # the shape family whose shipped config is compiled


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
    blocks_per_sm: int  # occupancy bound from registers, threads and shared memory
    occupancy: int  # programs per SM the config claims
    wgmma: int = 0
    mma: int = 0
    tma: int = 0
    cp_async: int = 0
    ex2: int = 0
    ok: bool = False
    error: str = ""
    family: str = "wide"


#: (kernel, variant) -> (config table, feature constexprs). "ws" variants are the workspace strategy's.
#: ``filter`` (inter-class filtering), ``gfilter`` (gradient filtering) and ``sub3`` (3 sub-centres per
#: class, the common choice) are the features that change the tile code.
_F = dict(FILTER=False, SUB=1)
VARIANTS = {
    ("fwd", "stats"): ("fwd", dict(HAS_NORM=True, HAS_PRED=True, STORE_EXP=False, **_F)),
    ("fwd", "loss"): ("fwd", dict(HAS_NORM=True, HAS_PRED=False, STORE_EXP=False, **_F)),
    ("fwd", "unnormalized"): ("fwd", dict(HAS_NORM=False, HAS_PRED=False, STORE_EXP=False, **_F)),
    ("fwd", "filter"): ("fwd", dict(HAS_NORM=True, HAS_PRED=True, STORE_EXP=False, FILTER=True, SUB=1)),
    ("fwd", "ws"): ("ws", dict(HAS_NORM=True, HAS_PRED=False, STORE_EXP=True, **_F)),
    ("fwd", "ws-stats"): ("ws_pred", dict(HAS_NORM=True, HAS_PRED=True, STORE_EXP=True, **_F)),
    ("fwd", "ws-unnormalized"): ("ws", dict(HAS_NORM=False, HAS_PRED=False, STORE_EXP=True, **_F)),
    ("fwd", "ws-filter"): ("ws_pred", dict(HAS_NORM=True, HAS_PRED=True, STORE_EXP=True, FILTER=True, SUB=1)),
    ("fwd", "sub3-filter"): ("sub_fwd", dict(HAS_NORM=True, HAS_PRED=True, STORE_EXP=False, FILTER=True, SUB=3)),
    ("grad", "recompute"): ("grad", dict(HAS_NORM=True, SCALE_G=True, GFILTER=False, **_F)),
    ("grad", "unscaled"): ("grad", dict(HAS_NORM=True, SCALE_G=False, GFILTER=False, **_F)),  # float16's G
    ("grad", "unnormalized"): ("grad", dict(HAS_NORM=False, SCALE_G=False, GFILTER=False, **_F)),
    ("grad", "filter"): ("grad", dict(HAS_NORM=True, SCALE_G=True, GFILTER=False, FILTER=True, SUB=1)),
    ("grad", "gfilter"): ("grad", dict(HAS_NORM=True, SCALE_G=True, GFILTER=True, **_F)),
    ("grad", "sub3-filter"): ("sub_grad", dict(HAS_NORM=True, SCALE_G=True, GFILTER=False, FILTER=True, SUB=3)),
    ("grad", "sub3-unscaled"): ("sub_grad", dict(HAS_NORM=True, SCALE_G=False, GFILTER=False, FILTER=False,
                                                 SUB=3)),
    ("bwd_dx", "recompute"): ("bwd_dx", dict(HAS_NORM=True, SCALE_G=True, FILTER=False)),  # the widest D
    ("bwd_dx", "unscaled"): ("bwd_dx", dict(HAS_NORM=True, SCALE_G=False, FILTER=False)),
    ("bwd_dx", "filter"): ("bwd_dx", dict(HAS_NORM=True, SCALE_G=True, FILTER=True)),
    ("from_exp", "scaled"): ("from_exp", dict(SCALE_G=True, GFILTER=False)),
    ("from_exp", "unscaled"): ("from_exp", dict(SCALE_G=False, GFILTER=False)),
    ("from_exp", "gfilter"): ("from_exp", dict(SCALE_G=True, GFILTER=True)),
    ("finish", "dW"): ("finish", dict(HAS_PRE=False)),
    ("finish", "dW-unscaled"): ("finish", dict(HAS_PRE=True)),  # after float16's unscaled G
    ("rows", "normalize"): ("rows", {}),
    ("masked", "dX"): ("masked", dict(ACCUMULATE=False, MASK_M=64, MASK_K=128)),  # flags of the G pass's tiles
    ("masked", "dW"): ("masked", dict(ACCUMULATE=True, MASK_M=128, MASK_K=64)),
}


def _config(job: Job):
    from .backends import triton_config as tc

    import torch

    table, _ = VARIANTS[(job.kernel, job.variant)]
    if job.config is not None:
        return tc.parse(job.config)
    D = 512 if job.family == "narrow" else 4096
    return tc.config_for(table, getattr(torch, job.dtype), D, job.target)


def _source(job: Job):
    """The ``ASTSource`` and options for one job, specialized like a real launch."""
    import triton
    import triton.language as tl

    from .backends import triton_kernels as tk

    inp = _PTR[job.dtype]
    acc = "*fp64" if job.dtype == "float64" else "*fp32"
    acc_tl = tl.float64 if job.dtype == "float64" else tl.float32
    precision = {"float32": "tf32x3", "float64": "ieee"}.get(job.dtype, "tf32")
    table, features = VARIANTS[(job.kernel, job.variant)]
    cfg = _config(job)
    use_tma = False
    if job.kernel in ("fwd", "grad"):
        use_tma = cfg.tma and job.target >= 90 and features.get("SUB", 1) == 1
        if use_tma:
            x_desc = f"tensordesc<{_DESC[job.dtype]}[{cfg.block_b},{cfg.block_d}]>"
            w_desc = f"tensordesc<{_DESC[job.dtype]}[{cfg.block_c},{cfg.block_d}]>"
        else:
            x_desc = w_desc = inp
        common = dict(x_desc=x_desc, w_desc=w_desc, x_ptr=inp, w_ptr=inp, y_ptr="*i64", rs_ptr=acc, cs_ptr=acc,
                      ft_ptr=acc)
        tiles = dict(USE_TMA=use_tma, EVEN_D=True, UPCAST=False, ACC=acc_tl, DOT_PRECISION=precision,
                     BLOCK_B=cfg.block_b, BLOCK_C=cfg.block_c, BLOCK_D=cfg.block_d)
    if job.kernel == "fwd":
        fn = tk._margin_fwd_kernel
        pointers = dict(common, m_ptr=acc, l_ptr=acc, pv_ptr=acc, pi_ptr="*i64", e_ptr=inp, sh_ptr=acc)
        ints = dict(B="i32", C="i32", D="i32", classes_per_split="i32", stride_xb="i32", stride_wc="i32",
                    stride_pb="i32", stride_eb="i32", stride_sb="i32")
        divisible = {"D", "classes_per_split", "stride_xb", "stride_wc", "stride_eb"}
        units = ("stride_xd", "stride_wd")
        constexprs = dict(features, **tiles)
    elif job.kernel == "grad":
        fn = tk._margin_grad_kernel
        pointers = dict(common, lse_ptr=acc, coef_ptr=acc, g_ptr=inp, flag_ptr="*i8")
        ints = dict(R="i32", Cc="i32", D="i32", label_offset="i32", smooth="fp32", gthr="fp32", stride_xb="i32",
                    stride_wc="i32", stride_gb="i32", stride_fb="i32")
        divisible = {"D", "stride_xb", "stride_wc", "stride_gb"}
        units = ("stride_xd", "stride_wd")
        constexprs = dict(features, **tiles)
    elif job.kernel == "bwd_dx":
        fn = tk._margin_bwd_dx_kernel
        pointers = dict(x_ptr=inp, w_ptr=inp, y_ptr="*i64", rs_ptr=acc, cs_ptr=acc, ft_ptr=acc, lse_ptr=acc,
                        coef_ptr=acc, g_ptr=inp, dx_ptr=acc)
        ints = dict(R="i32", Cc="i32", D="i32", label_offset="i32", smooth="fp32", classes_per_split="i32",
                    stride_xb="i32", stride_wc="i32", stride_gb="i32", stride_ds="i32", stride_db="i32")
        divisible = {"D", "classes_per_split", "stride_xb", "stride_wc", "stride_gb", "stride_ds", "stride_db"}
        units = ("stride_xd", "stride_wd")
        from .backends.triton_config import FUSED_DX_MAX_D

        import torch

        constexprs = dict(features, UPCAST=False, ACC=acc_tl, DOT_PRECISION=precision, BLOCK_B=cfg.block_b,
                          BLOCK_C=cfg.block_c, D_PAD=FUSED_DX_MAX_D[getattr(torch, job.dtype)])
    elif job.kernel == "from_exp":
        fn = tk._grad_from_exp_kernel
        pointers = dict(e_ptr=inp, sh_ptr=acc, y_ptr="*i64", cs_ptr=acc, lse_ptr=acc, coef_ptr=acc, flag_ptr="*i8")
        ints = dict(R="i32", C="i32", smooth="fp32", gthr="fp32", tile_c="i32", stride_eb="i32", stride_sb="i32",
                    stride_fb="i32")
        divisible = {"stride_eb", "tile_c"}
        units = ()
        constexprs = dict(features, ACC=acc_tl, BLOCK_R=cfg.block_b, BLOCK_C=cfg.block_c)
    elif job.kernel == "finish":  # streaming: its "config" is rows x 1 x features per step
        fn = tk._finish_w_kernel
        pointers = dict(dd_ptr=acc, w_ptr=inp, coef_ptr=acc, pre_ptr=acc, out_ptr=inp)
        ints = dict(Cc="i32", D="i32", stride_dd="i32", stride_w="i32", stride_out="i32")
        divisible = {"D", "stride_dd", "stride_w", "stride_out"}
        units = ("stride_wd",)
        constexprs = dict(features, ACC=acc_tl, BLOCK_R=cfg.block_b, BLOCK_D=cfg.block_d)
    elif job.kernel == "rows":
        fn = tk._scale_rows_kernel
        pointers = dict(w_ptr=inp, s_ptr=acc, out_ptr=inp)
        ints = dict(Cc="i32", D="i32", stride_w="i32", stride_out="i32")
        divisible = {"D", "stride_w", "stride_out"}
        units = ("stride_wd",)
        constexprs = dict(features, ACC=acc_tl, BLOCK_R=cfg.block_b, BLOCK_D=cfg.block_d)
    else:  # masked products: dX = G W (K over classes), dW = G^T xh (K over rows: G read transposed)
        fn = tk._masked_mm_kernel
        pointers = dict(a_ptr=inp, b_ptr=inp, out_ptr=acc, flag_ptr="*i8")
        ints = dict(M="i32", N="i32", K="i32", stride_am="i32", stride_ak="i32", stride_bk="i32",
                    stride_om="i32", stride_fm="i32", stride_fk="i32")
        divisible = {"N", "stride_bk", "stride_om"}
        units = ("stride_bn",)
        block_m = min(cfg.block_b, features["MASK_M"])
        constexprs = dict(features, UPCAST=False, ACC=acc_tl, DOT_PRECISION=precision, BLOCK_M=block_m,
                          BLOCK_N=cfg.block_c, BLOCK_K=min(cfg.block_d, features["MASK_K"]))
        if job.variant == "dX":  # G row-major: K contiguous
            units = units + ("stride_ak",)
        else:  # G^T: M contiguous
            units = units + ("stride_am",)
            ints.pop("stride_am")
            ints["stride_ak"] = "i32"
    constexprs.update({name: 1 for name in units})
    for name in units:
        ints.pop(name, None)
    known = set(pointers) | set(ints) | set(constexprs)
    assert known >= set(fn.arg_names), f"unspecified kernel arguments: {set(fn.arg_names) - known}"
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = pointers.get(name) or ints[name]
        if (name in pointers and not signature[name].startswith("tensordesc")) or name in divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return src, options, cfg, use_tma


_USAGE = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_job(job: Job) -> Row:
    """Compile one job and read its resource usage and instructions (runs in a worker process)."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # ptxas must run to print its log
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # 3.9's default, stated (silences its warning)
    import triton
    from triton.backends.compiler import GPUTarget

    config, claimed = "", 1
    try:
        src, options, cfg, use_tma = _source(job)
        config, claimed = str(cfg), cfg.occupancy
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=GPUTarget("cuda", job.target, 32), options=options)
        text = log.getvalue()
        regs = max(int(r) for r in _USAGE.findall(text))
        stack, stores, loads = (max(int(m[k]) for m in _SPILLS.findall(text)) for k in range(3))
        shared = int(kernel.metadata.shared)
        ptx = kernel.asm["ptx"]
        counts = {name: ptx.count(pattern) for name, pattern in INSTRUCTIONS.items()}
        threads = 32 * cfg.num_warps
        by_regs = REGISTERS_PER_SM // max(1, -(-regs // 8) * 8 * threads)  # registers come in units of 8
        by_threads = MAX_THREADS_PER_SM[job.target] // threads
        by_shared = SHARED_PER_SM[job.target] // (shared + 1024) if shared else by_threads  # 1 KiB reserved
        blocks = min(by_regs, by_threads, by_shared)
        ok = stores + loads == 0 and shared <= SHARED_LIMIT[job.target] and blocks >= claimed
        if job.target >= 90 and job.kernel in _GEMM_KERNELS and job.dtype != "float64":
            ok = ok and counts["wgmma"] > 0  # the products run on Hopper's warpgroup MMAs
        if use_tma:
            ok = ok and counts["tma"] > 0
        return Row(job.kernel, job.variant, job.dtype, config, f"sm_{job.target}", regs, stores + loads, stack,
                   shared, blocks, claimed, ok=ok, family=job.family, **counts)
    except Exception as e:  # report and go on: one broken config must not hide the others
        return Row(job.kernel, job.variant, job.dtype, config, f"sm_{job.target}", -1, -1, -1, -1, 0, claimed,
                   ok=False, family=job.family,
                   error=f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")


#: ``--quick`` (the CI test): every variant in bfloat16, and these in every dtype.
QUICK_VARIANTS = {("fwd", "stats"), ("fwd", "ws"), ("grad", "recompute"), ("bwd_dx", "recompute"),
                  ("from_exp", "scaled"), ("finish", "dW"), ("masked", "dX")}


def jobs(kernels, dtypes, targets, configs=(None,), variants=None, families=("wide",), quick=False) -> list[Job]:
    return [Job(k, v, d, t, c, f) for (k, v) in VARIANTS if k in kernels and (not variants or v in variants)
            for d in dtypes if not quick or d == "bfloat16" or (k, v) in QUICK_VARIANTS
            for c in configs for t in targets for f in families]


def parse_config(text: str) -> str:
    """A candidate config's text, checked (``"64x128x32w8s2"``, optionally ``o2`` and ``t``)."""
    from .backends.triton_config import parse

    return parse(text).key()


_HEAD = ("kernel", "variant", "dtype", "config", "target", "regs", "spills", "stack", "smem", "blk/SM", "claimed",
         "wgmma", "mma", "tma", "cp.async", "ok")


def _cells(r: Row) -> tuple:
    return (r.kernel, r.variant, r.dtype, r.config, r.target, str(r.registers), str(r.spill_bytes),
            str(r.stack_bytes), str(r.shared_bytes), str(r.blocks_per_sm), str(r.occupancy), str(r.wgmma),
            str(r.mma), str(r.tma), str(r.cp_async), "yes" if r.ok else ("ERROR " + r.error if r.error else "NO"))


def format_table(rows: list[Row]) -> str:
    body = [_cells(r) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(_HEAD, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in (_HEAD, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(_HEAD) + " |", "|" + "---|" * len(_HEAD)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m marginops.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated")
    parser.add_argument("--dtypes", default=",".join(DTYPE_NAMES), help="input dtypes, comma-separated")
    parser.add_argument("--kernels", default="fwd,grad,bwd_dx,from_exp,finish,rows,masked",
                        help="kernels, comma-separated")
    parser.add_argument("--variants", help="feature variants, comma-separated (default: all)")
    parser.add_argument("--families", default="wide", help="shape families whose shipped configs to compile "
                                                           "(narrow: D <= 1024, wide)")
    parser.add_argument("--configs", help="candidate configs instead of the shipped ones, e.g. "
                                          "128x128x64w4s3o2t,128x64x64w8s3 (for tuning)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--quick", action="store_true", help="every variant in bfloat16, the default path's in "
                                                             "every dtype (the CI test; about a third of the jobs)")
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
    try:
        configs = [parse_config(c) for c in args.configs.split(",")] if args.configs else [None]
    except ValueError as e:
        parser.error(str(e))
    todo = jobs(kernels, dtypes, targets, configs, args.variants.split(",") if args.variants else None,
                tuple(args.families.split(",")), quick=args.quick)
    if args.jobs <= 1:
        rows = [compile_job(j) for j in todo]
    else:
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            rows = list(pool.map(compile_job, todo))
    import triton

    print(f"triton {triton.__version__}")
    print(format_markdown(rows) if args.markdown else format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "rows": [asdict(r) for r in rows]}, f, indent=1)
    if any(r.error for r in rows):
        print(f"{sum(bool(r.error) for r in rows)} config(s) failed to compile", file=sys.stderr)
        return 2
    bad = [r for r in rows if not r.ok]
    if bad:
        print(f"{len(bad)} config(s) spill, exceed shared memory, miss their occupancy or their instructions",
              file=sys.stderr)
        return 1
    print(f"all {len(rows)} configs: zero spills, shared memory and occupancy within limits, "
          "wgmma/TMA where expected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
