"""What each Triton-backend step should cost on one GPU, against the 3-GEMM floor (a model: docs/benchmarks.md).

    python -m benchmarks model                      # the H200 of the first GPU run, the target cases
    python -m benchmarks model --efficiency 0.64    # Triton GEMM kernels at today's measured efficiency

Nothing here is measured; the measured inputs are stated where they are
used. Each step of a call is charged its tensor-core work at an assumed rate,
its fused epilogue at an assumed number of SM cycles per logit (the part not
hidden under another program's products), and its HBM bytes at an assumed
streaming bandwidth. The plans are the backend's own (the tile engine's
strategy and row blocks under :mod:`marginops.backends.triton_plan`'s budget
policy, the ``dW`` accumulator, class chunks, the forward grid's waves), with
its pinned tiles (:mod:`marginops.backends.triton_config`). ``python -m
benchmarks gpu-check`` on a GPU replaces these numbers with measurements.

**Calibration.** On the first GPU run (H200, 2026-12-04) the old forward kernel
(128 x 128 tiles through ``cp.async``, one program per SM, 320 programs in
2.4 waves) took 28.7 ms at B=8192, D=2304, C=256k where cuBLAS's GEMM took
14.1 ms: with its grid's waves (81% busy) and an unhidden epilogue of 0.16
cycles per logit, its products ran at 0.64 of cuBLAS's rate. The model's
``efficiency`` is that ratio for the new kernels (TMA loads, balanced grid):
:data:`DESIGN_EFFICIENCY` is an assumption, to be replaced by what
``python -m marginops.tune`` measures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

from marginops.backends import triton_config as tc
from marginops.backends import triton_plan as tp
from marginops.backends.interface import FusedOptions

from . import presets, registry
from .runner import MiB


@dataclass(frozen=True)
class Machine:
    name: str
    sms: int
    clock: float  # SM clock (Hz)
    cublas: dict  # dtype name -> dense GEMM rate cuBLAS reaches (FLOP/s)
    tf32x3: float  # peak rate of tf32x3 products (three TF32 MMAs per product), FLOP/s
    bandwidth: float  # streaming HBM bytes per second (effective)
    epilogue_cycles: float = 0.16  # SM cycles per logit of a fused epilogue (scale, mask, exp2, max/sum, store)
    memory: int = 141 * 10**9

    def gemm(self, flops: float, dtype: str) -> float:
        return flops / self.cublas[dtype]


#: One NVIDIA H200 as measured on 2026-12-04 (torch 2.11, triton 3.6): bf16 cuBLAS 687 TFLOP/s at B=8192,
#: D=2304, C=256k (the 3-GEMM floor 42.2 ms); float32 without TF32 52 TFLOP/s (floor 558 ms); at each target
#: shape whose floor was measured, :func:`predict` takes cuBLAS's rate from that floor. Assumed: fp16 as
#: bf16; tf32x3 at a third of the 494 TFLOP/s dense TF32 peak; 4.0 TB/s of the 4.8 TB/s HBM3e peak for
#: streaming passes; 1.98 GHz.
H200 = Machine("H200", sms=132, clock=1.98e9,
               cublas={"bfloat16": 687e12, "float16": 687e12, "float32": 52e12, "float64": 0.9e12},
               tf32x3=494e12 / 3, bandwidth=4.0e12)
#: Triton GEMM kernels' product rate as a fraction of cuBLAS's: today's measured kernel (see the calibration)
#: and the assumption for the new ones (TMA loads, int32 class indices, balanced grid).
MEASURED_EFFICIENCY = 0.64
DESIGN_EFFICIENCY = 0.80


#: The GPU check's targets, with what the first GPU run measured there (:data:`benchmarks.presets.GPU_TARGETS`).
TARGETS = presets.GPU_TARGETS


def _triton_gemm(m: Machine, flops: float, dtype: str, efficiency: float) -> float:
    """Seconds of Triton products at ``efficiency`` times the rate they are measured against: cuBLAS's at 16
    bits, tf32x3's peak for float32."""
    return flops / ((m.tf32x3 if dtype == "float32" else m.cublas[dtype]) * efficiency)


def _logits_kernel(m: Machine, B: int, C: int, D: int, dtype: str, kernel: str, efficiency: float,
                   store_bytes: float) -> float:
    """A logits kernel: products at the Triton rate over its grid's busy share, then the epilogue and its
    stores, hidden under another program's products in proportion to (occupancy - 1) / occupancy."""
    cfg = tc.config_for(kernel, getattr(torch, dtype), D, 90)
    rb, ct = -(-B // cfg.block_b), -(-C // cfg.block_c)
    slots = m.sms * cfg.occupancy
    busy = tp.grid_efficiency(rb, ct, slots) if kernel != "grad" else min(1.0, rb * ct / (-(-rb * ct // slots) * slots))
    mma = _triton_gemm(m, 2.0 * B * C * D, dtype, efficiency) / busy
    epilogue = B * C * m.epilogue_cycles / (m.sms * m.clock) + store_bytes / m.bandwidth
    hidden = (cfg.occupancy - 1) / cfg.occupancy
    return mma + epilogue * (1 - hidden)


def predict(t: presets.Target, m: Machine = H200, efficiency: float = DESIGN_EFFICIENCY,
            strategy: str = "auto") -> dict:
    """Seconds per step of one forward + backward (``reduction="mean"``, default options), by step, for the
    strategy the backend takes (``"auto"``) or the one given."""
    (B, D, C), dtype, problem = t.shape, t.dtype, registry.PROBLEMS[t.problem]
    dt = getattr(torch, dtype)
    e = tp.elt(dt)
    if t.floor_ms is not None and m.cublas[dtype] == H200.cublas[dtype]:  # the rate the H200 showed at this shape
        rate = 6.0 * B * C * D / (t.floor_ms * 1e-3)
        m = replace(m, cublas={**m.cublas, dtype: rate})
    opts = FusedOptions(scale=problem.scale, normalize=problem.normalize, strategy=strategy)
    tile_c = tc.config_for("ws", dt, D, 90).block_c
    workspace = strategy == "workspace" or (strategy == "auto" and tp.uses_workspace(B, C, D, dt, dt, opts))
    bw = m.bandwidth
    gemm = 2.0 * B * C * D
    floor = 3 * m.gemm(gemm, dtype)
    steps: dict[str, float] = {}
    if problem.normalize:  # inverse norms of W (marginops.ops): one read of W
        steps["norms"] = C * D * e / bw
    if workspace:
        pl = tp.workspace_plan(B, C, D, dt, opts, tile_c, m.memory)
        padded = tp.padded(C, dt)
        steps["forward kernel (stores exp)"] = _logits_kernel(m, B, C, D, dtype, "ws", efficiency, B * padded * e)
        steps["G in place"] = 2 * B * padded * e / bw
        steps["cuBLAS dX"] = m.gemm(gemm, dtype)
        steps["cuBLAS dW"] = m.gemm(gemm, dtype)
        acc = 4 if pl.fp32_accumulator else e
        # accumulator traffic beyond the floor's own dW write: the first block writes acc bytes, later ones
        # read and write them; half of it assumed hidden under the GEMMs' products
        extra = (acc - e + 2 * acc * (pl.blocks - 1)) * C * D
        steps["dW accumulation"] = 0.5 * extra / bw
        if problem.normalize:
            steps["finish (normalization backward)"] = (acc + 2 * e) * C * D / bw
        elif pl.fp32_accumulator:
            steps["finish (to the weight's dtype)"] = (4 + e) * C * D / bw
        if dtype == "float16" and problem.normalize:  # normalized rows of W for dX, per row block
            steps["normalized rows (float16)"] = pl.blocks * 2 * C * D * e / bw
        # marginops.ops scales the gradients formed in the forward by grad_output in place (on CUDA without
        # reading it on the host, so also when it is 1): one pass over dW and dX
        steps["scale by grad_output"] = (2 * e * C * D + 8 * B * D) / bw
        plan_text = f"workspace: {pl.blocks} x {pl.rows} rows" + (", fp32 dW" if pl.fp32_accumulator else "")
    else:
        cfg = tc.config_for("grad", dt, D, 90)
        budget = tp.default_budget(C, D, dt)
        cp = tp.chunk_plan(B, C, D, dt, budget, cfg, scaled_g=not (dtype == "float16" and problem.normalize))
        chunks = math.ceil(C / cp.chunk) * math.ceil(B / cp.rows)
        steps["forward kernel"] = _logits_kernel(m, B, C, D, dtype, "fwd", efficiency, 0.0)
        steps["gradient kernel (writes G)"] = _logits_kernel(m, B, C, D, dtype, "grad", efficiency, B * C * e)
        steps["cuBLAS dX"] = m.gemm(gemm, dtype) + 8 * B * D * chunks / bw
        steps["cuBLAS dW"] = m.gemm(gemm, dtype)
        steps["finish per chunk"] = ((4 + 2 * e) if problem.normalize else (4 + e)) * C * D / bw
        plan_text = f"recompute: {chunks} chunks of {cp.chunk} classes"
    total = sum(steps.values())
    scratch = tp.scratch_bytes(B, C, D, dt, opts, workspace, tile_c, tc.config_for("grad", dt, D, 90), m.memory)
    return dict(floor=floor, steps=steps, total=total, ratio=total / floor, plan=plan_text,
                scratch=scratch["total"], workspace=workspace)


#: Short names of the steps in the table.
SHORT = {"norms": "norms", "forward kernel (stores exp)": "fwd", "G in place": "G", "cuBLAS dX": "dX",
         "cuBLAS dW": "dW", "dW accumulation": "acc", "finish (normalization backward)": "finish",
         "finish (to the weight's dtype)": "finish", "normalized rows (float16)": "rows",
         "forward kernel": "fwd", "gradient kernel (writes G)": "grad", "finish per chunk": "finish",
         "scale by grad_output": "scale"}


def table(m: Machine = H200, efficiency: float = DESIGN_EFFICIENCY) -> str:
    """The predictions for :data:`TARGETS` as a Markdown table (the docs' generated block)."""
    lines = [
        "| case | B | D | C | dtype | plan | steps (ms; legend below) | predicted | x floor | target "
        "| at today's efficiency "
        "| scratch (formula) | naive's extra / 4 (measured) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in TARGETS:
        p = predict(t, m, efficiency)
        today = predict(t, m, MEASURED_EFFICIENCY)
        steps = ", ".join(f"{SHORT[k]} {1e3 * v:.1f}" for k, v in p["steps"].items())
        quarter = f"{t.naive_extra_mib / 4:,.0f} MiB" if t.naive_extra_mib else "-"
        lines.append(f"| {t.name} | {t.shape[0]} | {t.shape[1]} | {t.shape[2]:,} | {t.dtype} | {p['plan']} | {steps} | "
                     f"{1e3 * p['total']:.1f} ms | {p['ratio']:.2f}x | <= {t.max_ratio:.2f}x | "
                     f"{today['ratio']:.2f}x | {p['scratch'] / MiB:,.0f} MiB | {quarter} |")
    return "\n".join(lines)


def main(efficiency: Optional[float] = None, bandwidth_tbs: Optional[float] = None,
         cublas_tflops: Optional[float] = None) -> int:
    """Print the table at these rates (default: :data:`DESIGN_EFFICIENCY` and the H200's)."""
    efficiency = efficiency or DESIGN_EFFICIENCY
    rate = cublas_tflops * 1e12 if cublas_tflops else H200.cublas["bfloat16"]
    m = replace(H200, bandwidth=bandwidth_tbs * 1e12 if bandwidth_tbs else H200.bandwidth,
                cublas={**H200.cublas, "bfloat16": rate, "float16": rate})
    print(f"Predicted (not measured) on {m.name}: 16-bit cuBLAS {rate / 1e12:g} TFLOP/s, Triton products "
          f"at {efficiency:g} of it (tf32x3 at {efficiency:g} x {m.tf32x3 / 1e12:.0f} TFLOP/s), "
          f"HBM {m.bandwidth / 1e12:g} TB/s, epilogue {m.epilogue_cycles} cycles per logit; fwd + bwd, "
          f"default options.\n")
    print(table(m, efficiency))
    return 0
