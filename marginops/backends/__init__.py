"""Backend registry: one dict from name to implementation, one function that resolves ``"auto"``.

A fused backend is a callable following the contract in
:mod:`marginops.backends.common`. ``"reference"`` is the naive materialized
computation (:mod:`marginops.reference`) and is dispatched separately by
:func:`marginops.margin_cross_entropy`.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import torch_chunked
from .common import DEFAULT_MEMORY_BUDGET, FusedOptions

FUSED_BACKENDS: dict[str, Callable] = {
    "torch": torch_chunked.margin_softmax,
}
BACKEND_NAMES = ("auto", "reference", *FUSED_BACKENDS)


def resolve_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """The concrete backend that ``backend`` (possibly ``"auto"``) selects for tensors on ``device``.

    ``"auto"`` picks the fastest implementation available for the device:
    today the chunked PyTorch backend everywhere.

    Raises:
        ValueError: for an unknown backend name.
    """
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    if backend != "auto":
        return backend
    return "torch"


__all__ = ["FUSED_BACKENDS", "BACKEND_NAMES", "resolve_backend", "FusedOptions", "DEFAULT_MEMORY_BUDGET"]
