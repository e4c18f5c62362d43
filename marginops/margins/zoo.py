"""The margin zoo: small, pure functions ``psi(t)`` of the target cosine.

Every margin maps the target cosine ``t`` (shape ``(B,)``) to the margined
target cosine ``psi(t)``; the loss then uses ``s * psi(t)`` as the target logit
and ``s * cos`` for every other class. Margins know nothing about backends: the
fused kernels only ever see the resulting target logit, and gradients flow
through ``psi`` by ordinary autograd on ``B`` scalars, so any differentiable
callable works as a margin.

Every parameter accepts a Python number or a tensor of shape ``(B,)`` (one
value per row, e.g. ElasticFace's sampled margins or AdaFace's norm-adaptive
ones). Tensor parameters are validated once, when the margin is built; that
reads their values, which synchronizes with the device.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Union

import torch
from torch import Tensor

__all__ = [
    "Margin",
    "NoMargin",
    "CosFace",
    "ArcFace",
    "SphereFace",
    "SimplerASoftmax",
    "CombinedMargin",
    "MarginLike",
]

Param = Union[float, Tensor]
MarginLike = Union["Margin", Callable[[Tensor], Tensor], None]

#: Floor on ``1 - t**2`` in the derivative of ``acos``: the exact ArcFace
#: gradient ``cos m + sin m * t / sqrt(1 - t^2)`` is unbounded at ``t -> 1``;
#: with this floor it is at most ``cos m + 1000 * sin m``. In float32 it only
#: affects the ~8 representable cosines closest to +/-1.
SIN2_FLOOR = 1e-6


class _SafeAcos(torch.autograd.Function):
    """``acos`` of ``t`` clamped to [-1, 1] with a bounded derivative."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        ctx.save_for_backward(t)
        return torch.acos(t.clamp(-1.0, 1.0))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (t,) = ctx.saved_tensors
        sin2 = (1.0 - t * t).clamp_min(SIN2_FLOOR)
        return -grad * torch.rsqrt(sin2)


def safe_acos(t: Tensor) -> Tensor:
    """``acos(clamp(t, -1, 1))`` whose derivative stays finite at ``t = +/-1``."""
    return _SafeAcos.apply(t)


def chebyshev(t: Tensor, m: int) -> Tensor:
    """``T_m(t) = cos(m * acos(t))`` for integer ``m >= 0`` as a polynomial.

    The polynomial form has an exact, bounded derivative everywhere on [-1, 1]
    (``m**2`` at ``t = 1``), unlike ``cos(m * acos(t))`` under autograd.
    """
    prev, cur = torch.ones_like(t), t
    if m == 0:
        return prev
    for _ in range(m - 1):
        prev, cur = cur, 2.0 * t * cur - prev
    return cur


def _check_param(name: str, value, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False) -> Param:
    """Validate one margin parameter (number or per-row tensor); returns it unchanged."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number or a tensor, got bool {value!r}")
    if isinstance(value, Tensor):
        if value.dim() > 1:
            raise ValueError(f"{name} must be a number or a 1-D per-row tensor, got shape {tuple(value.shape)}")
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real tensor, got dtype {value.dtype}")
        vals = value.detach().to("cpu", torch.float64).reshape(-1)
        if vals.numel() == 0:
            raise ValueError(f"{name} is an empty tensor")
        candidates = [(float(vals.min()), "minimum"), (float(vals.max()), "maximum")]
        if not bool(torch.isfinite(vals).all()):
            bad = vals[~torch.isfinite(vals)][0].item()
            raise ValueError(f"{name} must be finite, got a tensor containing {bad}")
        if integer and not bool((vals == vals.round()).all()):
            bad = vals[vals != vals.round()][0].item()
            raise ValueError(f"{name} must hold integers, got a tensor containing {bad}")
    elif isinstance(value, numbers.Real):
        value = float(value) if not integer else value
        v = float(value)
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {value!r}")
        if integer and v != round(v):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if integer:
            value = int(round(v))
        candidates = [(v, "value")]
    else:
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    for v, what in candidates:
        lo_bad = low is not None and (v < low or (low_open and v == low))
        hi_bad = high is not None and (v > high or (high_open and v == high))
        if lo_bad or hi_bad:
            lb = "(" if low_open else "["
            hb = ")" if high_open else "]"
            rng = f"{lb}{-math.inf if low is None else low:g}, {math.inf if high is None else high:g}{hb}"
            shown = value if what == "value" else f"a tensor whose {what} is {v:g}"
            raise ValueError(f"{name} must lie in {rng}, got {shown}")
    return value


def _on(p: Param, t: Tensor) -> Param:
    """A tensor parameter moved to ``t``'s device and dtype; numbers pass through."""
    return p.to(device=t.device, dtype=t.dtype) if isinstance(p, Tensor) else p


def _fmt(p: Param) -> str:
    return f"Tensor(shape={tuple(p.shape)})" if isinstance(p, Tensor) else f"{p:g}"


class Margin:
    """Base class of margins: ``psi(t)`` applied to the target cosine ``t``.

    Subclasses store their parameters in ``self.params`` (name -> number or
    per-row tensor) and implement :meth:`__call__`.
    """

    params: dict[str, Param]

    def __call__(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_batch(self, batch_size: int) -> None:
        """Raise ``ValueError`` if a per-row parameter does not have ``batch_size`` rows."""
        for name, p in self.params.items():
            if isinstance(p, Tensor) and p.dim() == 1 and p.numel() != batch_size:
                raise ValueError(
                    f"{type(self).__name__}.{name} has {p.numel()} per-row values but the batch has {batch_size} rows"
                )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={_fmt(v)}" for k, v in self.params.items())
        extra = self._extra_repr()
        return f"{type(self).__name__}({args}{', ' + extra if extra else ''})"

    def _extra_repr(self) -> str:
        return ""


class NoMargin(Margin):
    """No margin: ``psi(t) = t`` (NormFace / plain normalized softmax). ``margin=None`` is the same."""

    def __init__(self) -> None:
        self.params = {}

    def __call__(self, t: Tensor) -> Tensor:
        return t


class CosFace(Margin):
    """Additive cosine margin, CosFace / AM-Softmax: ``psi(t) = t - m``.

    Wang et al., "CosFace: Large Margin Cosine Loss" (CVPR 2018); Wang et al.,
    "Additive Margin Softmax for Face Verification" (2018).

    Args:
        m (float or Tensor (B,)): margin, finite and >= 0. Default: 0.35.
    """

    def __init__(self, m: Param = 0.35) -> None:
        self.params = {"m": _check_param("m", m, low=0.0)}

    def __call__(self, t: Tensor) -> Tensor:
        return t - _on(self.params["m"], t)


class CombinedMargin(Margin):
    """InsightFace's combined margin: ``psi(t) = cos(m1 * theta + m2) - m3``, ``theta = acos(t)``.

    Covers NormFace ``(1, 0, 0)``, ArcFace ``(1, m, 0)``, CosFace ``(1, 0, m)``
    and the combinations of Deng et al., "ArcFace: Additive Angular Margin Loss"
    (CVPR 2019), section 3.3.

    Where ``m1 * theta + m2`` passes ``pi`` the cosine would turn back up and
    reward a worse angle; past that point (``theta > theta* = (pi - m2) / m1``)
    ``psi`` continues linearly, ``psi(t) = t - cos(theta*) - 1 - m3``, which is
    continuous at ``theta*`` and monotone in ``t``.

    Args:
        m1 (float or Tensor (B,)): multiplicative angular margin, > 0. Default: 1.0.
        m2 (float or Tensor (B,)): additive angular margin in [0, pi). Default: 0.0.
        m3 (float or Tensor (B,)): additive cosine margin, >= 0. Default: 0.0.
        gradient (str): ``"exact"`` (default) differentiates the formula, with
            ``1 - t**2`` floored at ``SIN2_FLOOR`` so the derivative stays
            finite at ``t = +/-1``; ``"straight_through"`` uses the formula's
            value but passes ``d psi / d t = 1`` (InsightFace's current choice).
    """

    def __init__(self, m1: Param = 1.0, m2: Param = 0.0, m3: Param = 0.0, *, gradient: str = "exact") -> None:
        self.params = {
            "m1": _check_param("m1", m1, low=0.0, low_open=True),
            "m2": _check_param("m2", m2, low=0.0, high=math.pi, high_open=True),
            "m3": _check_param("m3", m3, low=0.0),
        }
        if gradient not in ("exact", "straight_through"):
            raise ValueError(f"gradient must be 'exact' or 'straight_through', got {gradient!r}")
        self.gradient = gradient

    def _angular(self, t: Tensor, m1: Param, m2: Param) -> Tensor:
        """``cos(m1 * theta + m2)`` with the continuous linear fallback past pi."""
        theta = safe_acos(t)
        arc = torch.cos(m1 * theta + m2)
        # theta* = (pi - m2) / m1; beyond it continue linearly in t (continuous at theta*).
        theta_star = (math.pi - m2) / m1
        cos_star = torch.cos(theta_star) if isinstance(theta_star, Tensor) else math.cos(theta_star)
        fallback = t - cos_star - 1.0
        return torch.where(theta.detach() <= theta_star, arc, fallback)

    def __call__(self, t: Tensor) -> Tensor:
        m1, m2, m3 = (_on(self.params[k], t) for k in ("m1", "m2", "m3"))
        psi = self._angular(t, m1, m2)
        if self.gradient == "straight_through":
            psi = t + (psi - t).detach()
        return psi - m3

    def _extra_repr(self) -> str:
        return f"gradient={self.gradient!r}"


class ArcFace(CombinedMargin):
    """Additive angular margin, ArcFace: ``psi(t) = cos(theta + m)``, ``theta = acos(t)``.

    Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face
    Recognition" (CVPR 2019).

    Past ``theta + m > pi`` the default continues linearly,
    ``psi(t) = t - (1 - cos m)`` (continuous at ``theta = pi - m``, a CosFace
    margin of ``1 - cos m``), see :class:`CombinedMargin`.

    Args:
        m (float or Tensor (B,)): angular margin in [0, pi). Default: 0.5.
        easy_margin (bool): apply the margin only where ``t > 0`` and use
            ``psi(t) = t`` elsewhere (the original implementation's option).
            Default: False.
        gradient (str): ``"exact"`` (default; finite at ``t = +/-1``, see
            :data:`SIN2_FLOOR`) or ``"straight_through"`` (``d psi/dt = 1``).
    """

    def __init__(self, m: Param = 0.5, easy_margin: bool = False, gradient: str = "exact") -> None:
        super().__init__(1.0, 0.0, 0.0, gradient=gradient)
        self.params = {"m": _check_param("m", m, low=0.0, high=math.pi, high_open=True)}
        if not isinstance(easy_margin, bool):
            raise TypeError(f"easy_margin must be a bool, got {easy_margin!r}")
        self.easy_margin = easy_margin

    def __call__(self, t: Tensor) -> Tensor:
        m = _on(self.params["m"], t)
        psi = self._angular(t, 1.0, m)
        if self.easy_margin:
            psi = torch.where(t > 0, psi, t)
        if self.gradient == "straight_through":
            psi = t + (psi - t).detach()
        return psi

    def _extra_repr(self) -> str:
        return f"easy_margin={self.easy_margin}, gradient={self.gradient!r}"


class _IntegerAngular(Margin):
    """Shared machinery for margins built on ``cos(m * theta)`` with integer ``m``."""

    def __init__(self, m: Param) -> None:
        m = _check_param("m", m, low=1.0, integer=True)
        self.params = {"m": m}
        self._m_max = int(m.max()) if isinstance(m, Tensor) else m

    def _cos_m_theta(self, t: Tensor) -> tuple[Tensor, Param]:
        """``(cos(m * theta), m)`` via Chebyshev polynomials; per-row ``m`` selects its degree."""
        t = t.clamp(-1.0, 1.0)
        m = self.params["m"]
        if not isinstance(m, Tensor):
            return chebyshev(t, m), m
        m = m.to(device=t.device, dtype=torch.int64).expand_as(t)
        polys = torch.stack([chebyshev(t, k) for k in range(self._m_max + 1)])
        return polys.gather(0, m.unsqueeze(0)).squeeze(0), m.to(t.dtype)


class SphereFace(_IntegerAngular):
    """Multiplicative angular margin, SphereFace / A-Softmax.

    ``psi(t) = (-1)**k * cos(m * theta) - 2 * k`` for ``theta`` in
    ``[k * pi / m, (k + 1) * pi / m]``, ``k = 0 .. m-1``: monotone in ``theta``
    and continuous. Liu et al., "SphereFace: Deep Hypersphere Embedding for
    Face Recognition" (CVPR 2017). ``cos(m * theta)`` is evaluated as the
    Chebyshev polynomial ``T_m(t)``, exact and with a bounded derivative.

    Args:
        m (int or Tensor (B,) of integers): multiplicative margin, >= 1. Default: 4.
    """

    def __init__(self, m: Param = 4) -> None:
        super().__init__(m)

    def __call__(self, t: Tensor) -> Tensor:
        cos_mt, m = self._cos_m_theta(t)
        with torch.no_grad():
            theta = torch.acos(t.detach().clamp(-1.0, 1.0))
            k = torch.floor(m * theta / math.pi)
            k = torch.minimum(k, torch.as_tensor(m, dtype=t.dtype, device=t.device) - 1).clamp_min(0)
            sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
        return sign * cos_mt - 2.0 * k


class SimplerASoftmax(_IntegerAngular):
    """The simpler alternative to A-Softmax: ``psi(t) = min(cos(m * theta), t)``.

    Keeps SphereFace's multiplicative margin where it is a penalty and falls
    back to the plain cosine where ``cos(m * theta)`` would exceed it, with no
    piecewise ``k`` bookkeeping. Reported to match AM-Softmax on sentence
    similarity. ``cos(m * theta)`` is the Chebyshev polynomial ``T_m(t)``.

    Args:
        m (int or Tensor (B,) of integers): multiplicative margin, >= 1. Default: 4.
    """

    def __init__(self, m: Param = 4) -> None:
        super().__init__(m)

    def __call__(self, t: Tensor) -> Tensor:
        cos_mt, _ = self._cos_m_theta(t)
        return torch.minimum(cos_mt, t)
