"""Pinned launch configurations of the Triton kernels, per kernel, input dtype, target and shape family.

No autotuning happens at a user's call: every launch takes one config from
:func:`config_for`. The table has two layers:

* :data:`DEFAULTS`: chosen on a CPU from the ahead-of-time compile
  (``python -m marginops.aot``: zero spills on sm_80 and sm_90, shared memory
  within the chip's limit, the occupancy each config claims);
* :data:`TUNED_FILE` (``triton_tuned.json`` beside this module), written by
  ``python -m marginops.tune`` on a GPU: the fastest correct candidate
  per (kernel, dtype, shape family) for that GPU's compute capability. It is
  shipped with the package once a GPU has produced it; an entry there
  overrides the default for that capability only.

``MARGINOPS_TRITON_TUNED=/path/to/table.json`` points at another tuned table
(what the tuning mode itself uses to try candidates), ``=0`` ignores the
shipped one. Either is read once, at the first lookup.

A *shape family* splits shapes whose best tiles differ: ``"narrow"`` (D <=
1024: few D steps per tile, the epilogue weighs more) and ``"wide"``.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

#: Kernels with a config table. ``fwd``: logits tiles and the online statistics (``ws``: the same kernel
#: storing the exponentials, ``ws_pred`` also tracking the argmax); ``grad``: logits recomputed into ``G``;
#: ``bwd_dx``: the same forming ``dX`` in the pass (narrow D; ``block_d`` unused: all of D in one step);
#: ``sub_fwd``/``sub_grad``: with sub-centres; ``from_exp`` (elementwise), ``finish`` and ``rows``
#: (streaming) and ``masked`` (the block-sparse products of gradient filtering).
KERNELS = ("fwd", "ws", "ws_pred", "grad", "bwd_dx", "sub_fwd", "sub_grad", "from_exp", "finish", "rows", "masked")
FAMILIES = ("narrow", "wide")
NARROW_D = 1024


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration.

    ``block_b`` x ``block_c`` is the tile (rows x classes; for the streaming
    kernels rows x features), ``block_d`` the features per step of the D loop
    (the K step of the products), ``num_warps``/``num_stages`` Triton's.
    ``occupancy``: programs per SM the grid planner counts on (checked
    against the compiled registers and shared memory by ``marginops.aot``).
    ``tma``: load tiles through the tensor memory accelerator (host-side
    tensor descriptors) where the device has one (sm_90+) and the strides
    allow it (16-byte aligned rows); elsewhere pointer loads.
    """

    block_b: int
    block_c: int
    block_d: int
    num_warps: int
    num_stages: int
    occupancy: int = 1
    tma: bool = False

    def __str__(self) -> str:
        return (f"{self.block_b}x{self.block_c}x{self.block_d} w{self.num_warps} s{self.num_stages}"
                f"{f' o{self.occupancy}' if self.occupancy != 1 else ''}{' tma' if self.tma else ''}")

    def key(self) -> str:
        """The compact text form ``BxCxDwWsSoO[t]`` (:func:`parse`)."""
        return (f"{self.block_b}x{self.block_c}x{self.block_d}w{self.num_warps}s{self.num_stages}"
                f"o{self.occupancy}{'t' if self.tma else ''}")


def parse(text: str) -> KernelConfig:
    """``"128x128x64w4s3o2t"`` -> a :class:`KernelConfig` (``oO`` and ``t`` optional)."""
    import re

    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)w(\d+)s(\d+)(?:o(\d+))?(t?)", text.strip())
    if not m:
        raise ValueError(f"config {text!r} is not BxCxDwWARPSsSTAGES[oOCCUPANCY][t], e.g. 128x128x64w4s3o2t")
    b, c, d, w, s, o, t = m.groups()
    return KernelConfig(int(b), int(c), int(d), int(w), int(s), int(o or 1), t == "t")


_16 = (torch.bfloat16, torch.float16)
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _table(per_dtype: dict) -> dict:
    return {dtype: per_dtype[dtype] for dtype in DTYPES}


# The 16-bit logits tiles: 128 x 128 x 64, two warpgroups (8 warps), 3 stages of TMA loads (96 KiB of shared
# memory), wgmma products: 16 KiB of operands per MFLOP from L2. One program per SM: its epilogue (scale,
# mask, exp2, max/sum) does not overlap its own products. The candidates the tuning mode tries include
# 64 x 128 and 128 x 64 tiles with one warpgroup and two programs per SM (one program's epilogue under the
# other's wgmma: Triton's stand-in for ping-pong warp specialization on sm_90, at 24 KiB per MFLOP from
# L2); 128 x 128 with one warpgroup spills (ptxas, both targets). float32 multiplies in tf32x3 (three MMAs
# per product), float64 in IEEE FMAs.
_FWD = {
    torch.bfloat16: KernelConfig(128, 128, 64, 8, 3, tma=True),
    torch.float16: KernelConfig(128, 128, 64, 8, 3, tma=True),
    torch.float32: KernelConfig(128, 64, 32, 8, 3, tma=True),
    torch.float64: KernelConfig(64, 32, 16, 4, 2),
}
_GRAD = _FWD
# storing the exponentials adds the store's registers: checked at the same tiles (with and without the argmax)
_WS = _FWD
# recompute backward with dX formed in the pass: rows x classes per tile, all of D (<= FUSED_DX_MAX_D) at once
_BWD_DX = {torch.bfloat16: KernelConfig(64, 32, 0, 8, 2), torch.float16: KernelConfig(64, 32, 0, 8, 2),
           torch.float32: KernelConfig(64, 16, 0, 8, 1), torch.float64: KernelConfig(32, 32, 0, 8, 1)}
#: The widest embeddings (features, padded to a power of two) the ``bwd_dx`` kernel takes per input dtype:
#: its ``dX`` accumulator, the x tile and a W tile of that width stay on chip without spills.
FUSED_DX_MAX_D = {torch.bfloat16: 256, torch.float16: 256, torch.float32: 64, torch.float64: 64}
_SUB_FWD = {**_FWD, torch.bfloat16: KernelConfig(128, 64, 64, 8, 3), torch.float16: KernelConfig(128, 64, 64, 8, 3),
            torch.float32: KernelConfig(64, 64, 16, 8, 3)}
_SUB_GRAD = {**_FWD, torch.bfloat16: KernelConfig(128, 32, 64, 8, 3), torch.float16: KernelConfig(128, 32, 64, 8, 3),
             torch.float32: KernelConfig(64, 32, 16, 8, 3)}
# elementwise G from stored exponentials: rows x classes per program (block_d unused); with gradient filtering
# these tiles are the ones skipped, and the masked products step over them
_FROM_EXP = {dtype: KernelConfig(64, 128, 1, 8, 1) for dtype in DTYPES}
# streaming over C x D: rows per program x features per step
_FINISH = {torch.bfloat16: KernelConfig(16, 1, 256, 4, 1), torch.float16: KernelConfig(16, 1, 256, 4, 1),
           torch.float32: KernelConfig(16, 1, 256, 4, 1), torch.float64: KernelConfig(8, 1, 256, 8, 1)}
_ROWS = {dtype: KernelConfig(16, 1, 256, 4, 1) for dtype in DTYPES}
# block-sparse products: output tile (block_b x block_c), K step block_d within a flagged tile of G
_MASKED = {torch.bfloat16: KernelConfig(64, 128, 32, 8, 3), torch.float16: KernelConfig(64, 128, 32, 8, 3),
           torch.float32: KernelConfig(64, 64, 16, 4, 2), torch.float64: KernelConfig(32, 32, 16, 4, 1)}

#: The configs chosen without a GPU (both families, every target).
DEFAULTS: dict[str, dict[torch.dtype, KernelConfig]] = {
    "fwd": _table(_FWD), "ws": _table(_WS), "ws_pred": _table(_WS), "grad": _table(_GRAD),
    "bwd_dx": _table(_BWD_DX), "sub_fwd": _table(_SUB_FWD),
    "sub_grad": _table(_SUB_GRAD), "from_exp": _table(_FROM_EXP), "finish": _table(_FINISH),
    "rows": _table(_ROWS), "masked": _table(_MASKED),
}

TUNED_FILE = Path(__file__).with_name("triton_tuned.json")


def family(D: int) -> str:
    return "narrow" if D <= NARROW_D else "wide"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@functools.cache
def tuned_table() -> dict:
    """The tuned entries in force: ``{"sm90": {"fwd/bfloat16/wide": "128x128x64w4s3o2t", ...}}`` (empty
    when there is none)."""
    where = os.environ.get("MARGINOPS_TRITON_TUNED")
    if where == "0":
        return {}
    path = Path(where) if where else TUNED_FILE
    if not path.is_file():
        return {}
    with open(path) as f:
        data = json.load(f)
    return {arch: dict(entries) for arch, entries in data.get("configs", {}).items()}


def entry_key(kernel: str, dtype: torch.dtype, fam: str) -> str:
    return f"{kernel}/{_dtype_name(dtype)}/{fam}"


def config_for(kernel: str, dtype: torch.dtype, D: int = 0, arch: Optional[int] = None) -> KernelConfig:
    """The pinned config of ``kernel`` for inputs of ``dtype`` and ``D`` features on a device of compute
    capability ``arch`` (e.g. 90; None: the defaults)."""
    if kernel not in DEFAULTS:
        raise ValueError(f"kernel must be one of {tuple(DEFAULTS)}, got {kernel!r}")
    cfg = DEFAULTS[kernel][dtype]
    if arch is not None:
        text = tuned_table().get(f"sm{arch}", {}).get(entry_key(kernel, dtype, family(D)))
        if text is not None:
            cfg = parse(text)
    return cfg


def table_rows() -> list[dict]:
    """Every default entry as a dict (docs and the aot report)."""
    return [dict(kernel=k, dtype=_dtype_name(d), **asdict(c)) for k, t in DEFAULTS.items() for d, c in t.items()]
