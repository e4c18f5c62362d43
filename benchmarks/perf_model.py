"""Predicted GPU time of the Triton backend against the 3-GEMM floor (a model: docs/benchmarks.md).

    python -m benchmarks model                      # H100 SXM, bf16, the gpu preset's sizes
    python -m benchmarks model --triton-tflops 650

Nothing here is measured. Each step of a call is charged its FLOPs at an
assumed rate or its HBM bytes at an assumed bandwidth, steps do not overlap
(pessimistic), and the chunking is the backend's own (:func:`grad_plan`,
:func:`workspace_rows` with the given budgets). cuBLAS is assumed to accumulate
into fp32 outputs in place (``mm``/``addmm`` with ``out_dtype``, recent PyTorch
on CUDA; older versions pay a product temporary per chunk). ``python -m benchmarks
gpu-check`` on a GPU replaces these numbers with measurements.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .registry import workspace_budget

#: The gpu preset's shapes and the GPU tests' (B, D, C).
SIZES = [(8192, 2304, 256_000), (8192, 2304, 1_000_000), (4096, 512, 100_000)]


@dataclass(frozen=True)
class Machine:
    cublas_flops: float  # dense bf16 GEMM rate cuBLAS reaches, FLOP/s
    triton_flops: float  # the same for the fused Triton GEMM kernels (1 program of 8 warps per SM)
    exp_rate: float  # exp per second, not overlapped with the MMAs
    bandwidth: float  # HBM bytes per second for streaming passes

    def gemm(self, flops: float, cublas: bool) -> float:
        return flops / (self.cublas_flops if cublas else self.triton_flops)


H100 = Machine(cublas_flops=700e12, triton_flops=500e12, exp_rate=3.9e12, bandwidth=2.8e12)


def _plans(B: int, C: int, D: int, budget: int, ws_budget: int):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the planners only; nothing is launched
    from marginops.backends import triton_margin as tm

    grad = tm.grad_plan(B, C, D, torch.bfloat16, budget)
    rows = tm.workspace_rows(B, C, torch.bfloat16, ws_budget)
    fixed = rows * tm.ExpWorkspace.row_bytes(C, torch.bfloat16)
    ws = tm.grad_plan(rows, C, D, torch.bfloat16, ws_budget, fixed=fixed)
    return grad, rows, ws


def predict(B: int, D: int, C: int, m: Machine, budget: int, ws_budget: Optional[int] = None) -> dict[str, float]:
    """Seconds per step for the floor and both strategies (bf16 inputs, fp32 accumulation)."""
    gemm = 2.0 * B * D * C
    BC, CD, BD = float(B) * C, float(C) * D, float(B) * D
    bw = m.bandwidth
    grad, rows, ws = _plans(B, C, D, budget, ws_budget or workspace_budget(B, C))
    floor = 3 * m.gemm(gemm, cublas=True)
    norms = 2 * CD / bw  # |W_j| reads W once
    # recompute: forward kernel (GEMM + exp), gradient kernel (GEMM + exp + G written in bf16), two cuBLAS
    # GEMMs reading G, dxh += G @ W accumulated by cuBLAS into fp32 per class chunk (read and written:
    # 8 B per B x D element and chunk), each dD chunk written by cuBLAS in fp32 and finished by
    # _finish_w_kernel (two reads of dD and W, one bf16 write: 4 + 8 + 4 + 2 = 18 B per C x D element)
    chunks = math.ceil(C / grad.chunk) * math.ceil(B / grad.rows)
    recompute = {
        "forward kernel": m.gemm(gemm, False) + BC / m.exp_rate,
        "gradient kernel": m.gemm(gemm, False) + BC / m.exp_rate + 2 * BC / bw,
        "cuBLAS dX, dW": 2 * m.gemm(gemm, True),
        "passes": norms + (8 * BD * chunks + 18 * CD) / bw,
    }
    # workspace: the forward kernel also stores bf16 exponentials (2 B); the gradient kernel streams them
    # (2 B in, 2 B out, one exp); dD (fp32, C x D): the first row block's GEMM writes it (4 B), each later
    # one accumulates into it (8 B); the in-place finish (16 B) and the conversion to bf16 (6 B)
    blocks = math.ceil(B / rows)
    ws_chunks = math.ceil(C / ws.chunk) * blocks
    workspace = {
        "forward kernel": m.gemm(gemm, False) + BC / m.exp_rate + 2 * BC / bw,
        "gradient kernel": BC / m.exp_rate + 4 * BC / bw,
        "cuBLAS dX, dW": 2 * m.gemm(gemm, True),
        "passes": norms + (8 * BD * ws_chunks + (4 + 8 * (blocks - 1) + 16 + 6) * CD) / bw,
    }
    return dict(floor=floor, recompute=recompute, workspace=workspace, rows=rows, blocks=blocks,
                chunk=grad.chunk)


def table(m: Machine, budget: int, ws_budget: Optional[int], sizes=SIZES) -> str:
    lines = [
        "| B | D | C | floor (ms) | recompute: fwd / grad kernel / cuBLAS / passes (ms) | recompute total | x floor "
        "| workspace: row blocks | workspace total | x floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for B, D, C in sizes:
        p = predict(B, D, C, m, budget, ws_budget)
        r, w = p["recompute"], p["workspace"]
        rt, wt = sum(r.values()), sum(w.values())
        parts = " / ".join(f"{1e3 * v:.1f}" for v in r.values())
        lines.append(f"| {B} | {D} | {C:,} | {1e3 * p['floor']:.1f} | {parts} | {1e3 * rt:.1f} | "
                     f"{rt / p['floor']:.2f}x | {p['blocks']} x {p['rows']} | {1e3 * wt:.1f} | "
                     f"{wt / p['floor']:.2f}x |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    from marginops import DEFAULT_MEMORY_BUDGET

    parser = argparse.ArgumentParser(prog="python -m benchmarks model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cublas-tflops", type=float, default=H100.cublas_flops / 1e12)
    parser.add_argument("--triton-tflops", type=float, default=H100.triton_flops / 1e12)
    parser.add_argument("--bandwidth-tbs", type=float, default=H100.bandwidth / 1e12)
    parser.add_argument("--budget", type=int, default=DEFAULT_MEMORY_BUDGET, help="memory_budget (recompute)")
    parser.add_argument("--workspace-budget", type=int, default=None,
                        help="memory_budget of the workspace strategy (default: the GPU benchmark's, "
                             "all rows in one block up to 24 GiB)")
    args = parser.parse_args(argv)
    m = Machine(args.cublas_tflops * 1e12, args.triton_tflops * 1e12, H100.exp_rate, args.bandwidth_tbs * 1e12)
    print(f"Predicted (not measured): cuBLAS {args.cublas_tflops:g} TFLOP/s, Triton GEMM kernels "
          f"{args.triton_tflops:g} TFLOP/s, exp {m.exp_rate / 1e12:g}e12/s, HBM {args.bandwidth_tbs:g} TB/s, "
          f"no overlap; recompute budget {args.budget / 2**20:g} MiB, workspace budget "
          f"{'the GPU benchmark' if args.workspace_budget is None else f'{args.workspace_budget / 2**20:g} MiB'}"
          f"; bf16, fwd + bwd.\n")
    print(table(m, args.budget, args.workspace_budget))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
