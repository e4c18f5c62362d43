"""Backend registry: one dict from name to implementation, one function that resolves ``"auto"``.

A fused backend is a callable following the contract in
:mod:`marginops.backends.common`. ``"reference"`` is the naive materialized
computation (:mod:`marginops.reference`) and is dispatched separately by
:func:`marginops.margin_cross_entropy`.

``"triton"`` (:mod:`marginops.backends.triton_margin`) is imported on its
first call, so ``import marginops`` works without Triton and the Triton
interpreter can be switched on (``TRITON_INTERPRET=1``) before its kernels are
defined.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch

from . import torch_chunked
from .common import DEFAULT_MEMORY_BUDGET, FusedOptions


def _triton_margin_softmax(*args):
    """The Triton backend, imported on first use (see the module docstring)."""
    try:
        from . import triton_margin
    except ImportError as e:
        raise RuntimeError(f"backend='triton' needs the triton package, which failed to import: {e}") from e
    return triton_margin.margin_softmax(*args)


FUSED_BACKENDS: dict[str, Callable] = {
    "torch": torch_chunked.margin_softmax,
    "triton": _triton_margin_softmax,
}
BACKEND_NAMES = ("auto", "reference", *FUSED_BACKENDS)


def resolve_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """The concrete backend that ``backend`` (possibly ``"auto"``) selects for tensors on ``device``.

    ``"auto"`` picks ``"triton"`` for CUDA tensors when Triton is installed
    and the chunked PyTorch backend ``"torch"`` otherwise. On a GPU the torch
    backend runs its GEMMs in the accumulation dtype (fp32 for 16-bit inputs)
    plus several elementwise passes per tile, while the Triton backend runs
    16-bit tensor-core GEMMs with fused epilogues; ``docs/performance.md`` has
    the model behind this choice, a prediction until measured on a GPU.
    ``"triton"`` on CPU tensors runs only under the Triton interpreter
    (``TRITON_INTERPRET=1``, for tests) and otherwise raises a RuntimeError
    when called.

    Raises:
        ValueError: for an unknown backend name.
    """
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    if backend != "auto":
        return backend
    if torch.device(device).type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "torch"


__all__ = [
    "BACKEND_NAMES",
    "DEFAULT_MEMORY_BUDGET",
    "FUSED_BACKENDS",
    "FusedOptions",
    "resolve_backend",
]
