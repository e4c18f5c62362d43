"""Argument checks and numeric constants shared by every module; depends on nothing of marginops.

Each check raises a ``TypeError`` or ``ValueError`` that names the argument and
the bad value, and returns the value normalized (``float``/``int``).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

__all__ = ["EPS", "FLOAT_DTYPES", "check_tensor", "check_float_dtype", "check_number", "check_optional_int"]

#: Floor on row norms when normalizing (``F.normalize``'s default): ``x / max(|x|, EPS)``.
EPS = 1e-12
#: The floating-point dtypes embeddings, weights and per-row values may have.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, value, dim: int) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(value.shape)}")
    return value


def check_float_dtype(name: str, value: Tensor) -> Tensor:
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor ({', '.join(map(str, FLOAT_DTYPES))}), "
                        f"got dtype {value.dtype}")
    return value


def check_number(name: str, value, *, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if v < low or v > high or (low_open and v == low):
        rng = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name} must lie in {rng}, got {value!r}")
    return v


def check_optional_int(name: str, value, low: int) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    return int(value)
