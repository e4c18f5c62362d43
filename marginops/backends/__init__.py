"""Backend registry: names to modules implementing :class:`~marginops.backends.interface.Backend`.

``"reference"`` is the naive materialized computation (:mod:`marginops.reference`)
and is dispatched separately by :func:`marginops.margin_cross_entropy`.

``"triton"`` (:mod:`marginops.backends.triton_margin`) is imported on first use,
so ``import marginops`` works without Triton and the Triton interpreter can be
switched on (``TRITON_INTERPRET=1``) before its kernels are defined.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import torch

from .interface import DEFAULT_MEMORY_BUDGET, Backend, Call, FusedOptions, RowStats, check_backend, combine_stats

#: Fused backends: name -> module path (imported on first use by :func:`get_backend`); more with
#: :func:`register_backend`.
BACKENDS: dict[str, str] = {
    "torch": "marginops.backends.torch_chunked",
    "triton": "marginops.backends.triton_margin",
    "native": "marginops.backends.native",
}
BACKEND_NAMES = ("auto", "reference", *BACKENDS)  # the built-in names
_HAS_TRITON = importlib.util.find_spec("triton") is not None  # looked up once: "auto" stays traceable
_LOADED: dict[str, ModuleType] = {}  # imported backends; "torch" up front, so that looking it up stays traceable


def get_backend(name: str) -> ModuleType:
    """The module of fused backend ``name`` (see :data:`BACKENDS`), imported on first use.

    Raises:
        ValueError: for a name that is not a fused backend.
        RuntimeError: when the backend's module fails to import (Triton missing).
    """
    if name in _LOADED:
        return _LOADED[name]
    if name not in BACKENDS:
        raise ValueError(f"fused backend must be one of {tuple(BACKENDS)}, got {name!r}")
    try:
        module = importlib.import_module(BACKENDS[name])
    except ImportError as e:
        raise RuntimeError(f"backend={name!r} failed to import: {e}") from e
    check_backend(module)
    _LOADED[name] = module
    return module


def register_backend(name: str, module: "ModuleType | str") -> None:
    """Make ``module`` available as ``backend=name`` (a module object, or its import path, imported on first use).

    The module implements :class:`~marginops.backends.interface.Backend`; that is
    checked now for a module object, on first use for a path.

    Raises:
        ValueError: for a name that is taken by ``"auto"`` or ``"reference"``, or not a non-empty string.
        TypeError: for a module that lacks a function of the interface.
    """
    if not isinstance(name, str) or not name or name in ("auto", "reference"):
        raise ValueError(f"backend name must be a non-empty string other than 'auto' and 'reference', got {name!r}")
    if isinstance(module, ModuleType):
        check_backend(module)
        _LOADED[name] = module
        BACKENDS[name] = module.__name__
    elif isinstance(module, str):
        _LOADED.pop(name, None)
        BACKENDS[name] = module
    else:
        raise TypeError(f"module must be a module or an import path, got {type(module).__name__}")


def resolve_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """The concrete backend that ``backend`` (possibly ``"auto"``) selects for tensors on ``device``.

    ``"auto"`` picks ``"triton"`` for CUDA tensors when Triton is installed;
    for CPU tensors the native backend ``"native"`` (the chunked tiling with
    compiled C++ tile kernels, built on first use) when it is available
    (:func:`marginops.backends.native.available`: not switched off by
    ``MARGINOPS_NATIVE=0`` and the kernels built), else the chunked PyTorch
    backend ``"torch"``. On a GPU the torch backend also runs (16-bit products
    with float32 results over large tiles: the engine's GPU plan), while the
    Triton backend forms the logits and their epilogue in fused tensor-core
    kernels; ``docs/benchmarks.md`` has the model behind this choice and the
    GPU records.
    ``"triton"`` on CPU tensors runs only under the Triton interpreter
    (``TRITON_INTERPRET=1``, for tests) and otherwise raises a RuntimeError
    when called.

    Raises:
        ValueError: for an unknown backend name.
    """
    names = ("auto", "reference", *BACKENDS)
    if not isinstance(backend, str) or backend not in names:
        raise ValueError(f"backend must be one of {names}, got {backend!r}")
    if backend != "auto":
        return backend
    kind = torch.device(device).type
    if kind == "cuda" and _HAS_TRITON:
        return "triton"
    if kind == "cpu" and _LOADED["native"].available():
        return "native"
    return "torch"


_LOADED["torch"] = get_backend("torch")
_LOADED["native"] = get_backend("native")  # importing it builds nothing: the kernels are built on first use

__all__ = [
    "BACKENDS",
    "BACKEND_NAMES",
    "DEFAULT_MEMORY_BUDGET",
    "Backend",
    "Call",
    "FusedOptions",
    "RowStats",
    "combine_stats",
    "get_backend",
    "register_backend",
    "resolve_backend",
]
