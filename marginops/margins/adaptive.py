"""Adaptive margins: per-row margins chosen from the batch (ElasticFace, AdaFace, MagFace).

An adaptive margin is a :class:`~marginops.margins.Margin` with a method
``for_batch(embeddings) -> (psi, extra)``. :func:`marginops.margin_cross_entropy`
(and :class:`marginops.MarginHead`, :class:`marginops.distributed.ShardedMarginHead`)
calls it once per call with the raw, un-normalized ``(B, D)`` embeddings and then

* uses ``psi`` (an ordinary margin whose parameters are per-row ``(B,)`` tensors)
  as the margin of this call, and
* adds ``extra`` (``None`` or a ``(B,)`` per-row loss term, differentiable with
  respect to the embeddings) to the per-row loss, weighted like the rows
  (ignored rows add nothing, ``"mean"`` averages over the others).

The margins here cannot be applied to a bare target cosine: calling one as
``psi(t)`` raises a TypeError, since it needs the embeddings first.

The per-batch margins are built without re-validating their per-row values
(which would read them on the host, a device synchronization per step): every
value is valid by construction (clamped draws, clipped scalers, affine maps of
clamped norms).
"""

from __future__ import annotations

import hashlib
import math
import numbers
from typing import Optional

import torch
from torch import Tensor, nn

from .zoo import ArcFace, CosFace, Margin, _check_param, _on, safe_acos

__all__ = ["ElasticFace", "AdaFace", "MagFace"]

#: Largest angular margin an ElasticFace-Arc draw is clamped to (ArcFace needs ``m < pi``).
ARC_MARGIN_MAX = math.pi - 1e-3


def _real(name: str, value, **bounds) -> float:
    """A real Python number (not a bool, not a tensor) within ``bounds`` (see ``_check_param``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(_check_param(name, value, **bounds))


def _acc(x: Tensor) -> torch.dtype:
    """float64 for float64 embeddings, else float32 (norms of 16-bit rows would overflow)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _row_norms(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x.to(_acc(x)), dim=1)


def _with_m(margin: Margin, m: Tensor) -> Margin:
    """``margin`` with its parameter ``m`` replaced by per-row values known to be valid."""
    margin.params = {"m": m}
    return margin


class _NeedsBatch:
    """Mixin: an adaptive margin applied to a bare target cosine is an error that says what to do."""

    def _refuse(self) -> None:
        raise TypeError(
            f"{type(self).__name__} is an adaptive margin: it chooses its margins from the embeddings, so it "
            f"cannot be applied to a target cosine alone. Pass it to margin_cross_entropy / MarginHead, or call "
            f"psi, extra = margin.for_batch(embeddings) and use psi."
        )


# -- ElasticFace ------------------------------------------------------------------------------------------


class _RankedByTarget(Margin):
    """ElasticFace+: ``base`` with the sorted margins ``m`` handed out by rank of the target cosine
    (the row with the k-th smallest ``t`` gets the k-th smallest margin)."""

    def __init__(self, base: Margin, m_sorted: Tensor) -> None:
        self.base = base
        self.params = {"m": m_sorted}

    def __call__(self, t: Tensor) -> Tensor:
        m = self.params["m"].to(t.device)
        order = torch.argsort(t.detach(), stable=True)
        assigned = torch.empty_like(m).scatter_(0, order, m)
        return _with_m(self.base, assigned)(t)

    def _extra_repr(self) -> str:
        return f"base={type(self.base).__name__}, ranked_by_target=True"


class ElasticFace(_NeedsBatch, Margin):
    r"""Elastic margin: a fresh Gaussian margin per row and call, on ArcFace or CosFace.

    Boutros et al., "ElasticFace: Elastic Margin Loss for Deep Face Recognition"
    (CVPR Workshops 2022). Each call draws, for every row ``i``,

    .. math::
        m_i \sim \mathcal N(m, \sigma^2),\qquad
        \psi_i(t) = \cos(\arccos t + m_i) \;\text{(kind="arc")}\quad\text{or}\quad
        \psi_i(t) = t - m_i \;\text{(kind="cos")}

    i.e. :class:`~marginops.ArcFace` / :class:`~marginops.CosFace` with per-row
    ``m``; ``for_batch`` returns that margin and no extra loss term.

    Clamping: each draw is clamped to the margin's valid range, ``[0, pi - 1e-3]``
    (:data:`ARC_MARGIN_MAX`) for ``"arc"`` and ``[0, inf)`` for ``"cos"`` (a negative
    margin would be a bonus). With the defaults the lower bound is 10 standard
    deviations away and is practically never hit; the official code does not clamp.

    Randomness: with an int ``seed`` the draws are reproducible and the draws of
    the ``n``-th call (``n = 0, 1, ...``, counted by :attr:`calls`) depend only on
    ``(seed, n)`` and the batch size: they come from a CPU ``torch.Generator``
    seeded with a hash of ``(seed, n)``, drawn in float64 and then moved to the
    embeddings' device (float64 for float64 embeddings, else float32). To resume
    a run, restore :attr:`calls`. :meth:`sample` gives the draws of any call
    without advancing the counter. Across ranks of a sharded head an int seed
    makes every rank draw the same margins. With ``seed=None`` the draws come
    from torch's global RNG on the embeddings' device (``torch.manual_seed``
    governs them), and :attr:`calls` still counts.

    ElasticFace+ (``plus=True``): the drawn margins are sorted and handed out by
    rank of the target cosine, the largest margin to the row with the largest
    target cosine (so the margin grows with ``t`` within the batch). The ranking
    uses the target cosines the loss computes, including those of ignored rows
    (computed as for label 0); the official code ranks only the rows it keeps.

    Args:
        m (float): mean margin, in [0, pi) for ``"arc"``, >= 0 for ``"cos"``. Default: 0.5.
        sigma (float): standard deviation of the margin, >= 0. Default: 0.05.
        kind (str): ``"arc"`` (ElasticFace-Arc) or ``"cos"`` (ElasticFace-Cos). Default: ``"arc"``.
        seed (int, optional): seed of the per-call generators; None uses the global RNG. Default: None.
        plus (bool): ElasticFace+ (see above). Default: False.

    Raises:
        TypeError: a parameter of the wrong type (``m``/``sigma`` not real numbers,
            ``kind`` not a str, ``seed`` not an int or None, ``plus`` not a bool).
        ValueError: ``kind`` unknown, ``m`` or ``sigma`` out of range or not finite.
    """

    def __init__(self, m: float = 0.5, sigma: float = 0.05, kind: str = "arc", seed: Optional[int] = None,
                 plus: bool = False) -> None:
        if not isinstance(kind, str):
            raise TypeError(f"kind must be 'arc' or 'cos', got {type(kind).__name__} {kind!r}")
        if kind not in ("arc", "cos"):
            raise ValueError(f"kind must be 'arc' or 'cos', got {kind!r}")
        if kind == "arc":
            m = _real("m", m, low=0.0, high=math.pi, high_open=True)
        else:
            m = _real("m", m, low=0.0)
        sigma = _real("sigma", sigma, low=0.0)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}")
        if not isinstance(plus, bool):
            raise TypeError(f"plus must be a bool, got {type(plus).__name__} {plus!r}")
        self.params = {"m": m, "sigma": sigma}
        self.kind = kind
        self.seed = None if seed is None else int(seed)
        self.plus = plus
        #: Number of ``for_batch`` calls so far: the index ``n`` of the next call's draws.
        self.calls = 0

    def __call__(self, t: Tensor) -> Tensor:
        self._refuse()

    def _generator(self, call: int) -> torch.Generator:
        digest = hashlib.blake2b(f"marginops.ElasticFace:{self.seed}:{call}".encode(), digest_size=8).digest()
        return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))

    def sample(self, batch_size: int, call: Optional[int] = None, *, device=None,
               dtype: torch.dtype = torch.float32) -> Tensor:
        """The clamped margins ``(batch_size,)`` of call ``call`` (default: the next one, :attr:`calls`),
        without advancing the counter. With ``seed=None`` this draws from the global RNG (``call`` ignored)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 0:
            raise ValueError(f"batch_size must be a non-negative int, got {batch_size!r}")
        m, sigma = float(self.params["m"]), float(self.params["sigma"])
        if self.seed is None:
            z = torch.randn(int(batch_size), device=device, dtype=dtype)
        else:
            call = self.calls if call is None else call
            if isinstance(call, bool) or not isinstance(call, numbers.Integral) or call < 0:
                raise ValueError(f"call must be a non-negative int, got {call!r}")
            z = torch.randn(int(batch_size), generator=self._generator(int(call)), dtype=torch.float64)
        high = ARC_MARGIN_MAX if self.kind == "arc" else None
        return (m + sigma * z).clamp(0.0, high).to(device=device, dtype=dtype)

    def for_batch(self, embeddings: Tensor) -> tuple[Margin, None]:
        """Draw this call's margins (advancing :attr:`calls`); returns ``(ArcFace or CosFace, None)``."""
        margins = self.sample(embeddings.shape[0], device=embeddings.device, dtype=_acc(embeddings))
        self.calls += 1
        base = ArcFace() if self.kind == "arc" else CosFace()
        if self.plus:
            return _RankedByTarget(base, torch.sort(margins).values), None
        return _with_m(base, margins), None

    def _extra_repr(self) -> str:
        return f"kind={self.kind!r}, seed={self.seed}, plus={self.plus}, calls={self.calls}"


# -- AdaFace ----------------------------------------------------------------------------------------------


class _AdaFaceBatch(Margin):
    """AdaFace's margin for one batch: ``cos(clamp(acos t + g_angular, eps, pi - eps)) - g_additive``."""

    def __init__(self, g_angular: Tensor, g_additive: Tensor, eps: float) -> None:
        self.params = {"g_angular": g_angular, "g_additive": g_additive}
        self.eps = eps

    def __call__(self, t: Tensor) -> Tensor:
        g_ang, g_add = _on(self.params["g_angular"], t), _on(self.params["g_additive"], t)
        theta = (safe_acos(t) + g_ang).clamp(self.eps, math.pi - self.eps)
        return torch.cos(theta) - g_add

    def _extra_repr(self) -> str:
        return f"eps={self.eps:g}"


class AdaFace(_NeedsBatch, nn.Module, Margin):
    r"""Quality-adaptive margin: the feature norm (an image-quality proxy) picks the margin.

    Kim et al., "AdaFace: Quality Adaptive Margin for Face Recognition" (CVPR
    2022); formulas as in the official code (``mk-minchul/AdaFace``, ``head.py``).
    With ``n_i = clamp(||x_i||, 0.001, 100)`` (detached: no gradient reaches the
    norm through the margin) and running statistics ``mu``, ``sd``,

    .. math::
        \hat n_i = \operatorname{clip}\Big(h\,\frac{n_i - \mu}{sd + \varepsilon}, -1, 1\Big),\quad
        g_{angle,i} = -m\,\hat n_i,\quad g_{add,i} = m + m\,\hat n_i,

    .. math::
        \psi_i(t) = \cos\big(\operatorname{clamp}(\arccos t + g_{angle,i},\ \varepsilon,\ \pi - \varepsilon)\big)
                    - g_{add,i}

    so high-norm (good) rows get an ArcFace-like margin and low-norm (poor) rows
    a CosFace-like one. The clamp is the official code's; where it binds the
    derivative with respect to ``t`` is zero, as there. ``arccos`` is
    :func:`marginops.margins.safe_acos` (finite derivative at ``t = +/-1``).
    Unlike the official code, ``t`` itself is not clamped to ``[-1 + eps, 1 - eps]``
    and the non-target cosines are left as they are.

    Running statistics: buffers ``batch_mean`` (initially 20) and ``batch_std``
    (initially 100), shape ``(1,)`` as in the official code, so they go into the
    ``state_dict`` of a :class:`~marginops.MarginHead` holding this margin. In
    training mode (``self.training``) each call first updates them by an
    exponential moving average of the batch's norms, without gradient,

        ``batch_mean = t_alpha * mean(n) + (1 - t_alpha) * batch_mean``,
        ``batch_std = t_alpha * std(n) + (1 - t_alpha) * batch_std``

    (``std`` unbiased, as ``torch.std``), and then uses the updated values, as
    the official code does. A batch of one row updates only ``batch_mean`` (its
    std is undefined); an empty batch updates nothing. The statistics include
    rows whose label is ignored (the margin does not see labels). In eval mode
    (``.eval()``) the stored statistics are used as they are and never updated
    (the official code updates on every call, but only ever runs its head in
    training). Under a sharded head the statistics are those of the global batch.

    Args:
        m (float): margin, >= 0. Default: 0.4.
        h (float): concentration ``h`` of the scaler, >= 0. Default: 0.333.
        t_alpha (float): EMA momentum in [0, 1]. Default: 0.01.
        eps (float): in (0, pi/2): added to ``batch_std`` and the angle clamp. Default: 1e-3.

    Raises:
        TypeError: a parameter that is not a real number (bools included).
        ValueError: a parameter out of range or not finite.
    """

    batch_mean: Tensor
    batch_std: Tensor

    def __init__(self, m: float = 0.4, h: float = 0.333, t_alpha: float = 0.01, eps: float = 1e-3) -> None:
        nn.Module.__init__(self)
        self.params = {
            "m": _real("m", m, low=0.0),
            "h": _real("h", h, low=0.0),
            "t_alpha": _real("t_alpha", t_alpha, low=0.0, high=1.0),
            "eps": _real("eps", eps, low=0.0, high=math.pi / 2, low_open=True, high_open=True),
        }
        self.register_buffer("batch_mean", torch.full((1,), 20.0))
        self.register_buffer("batch_std", torch.full((1,), 100.0))

    def forward(self, t: Tensor) -> Tensor:
        self._refuse()

    def for_batch(self, embeddings: Tensor) -> tuple[Margin, None]:
        """Update the running statistics (training mode only) and return ``(this batch's margin, None)``."""
        m, h, alpha, eps = (float(self.params[k]) for k in ("m", "h", "t_alpha", "eps"))
        norms = _row_norms(embeddings.detach()).clamp(0.001, 100.0)
        if self.training and norms.numel() > 0:
            with torch.no_grad():
                self.batch_mean.copy_(alpha * norms.mean() + (1.0 - alpha) * self.batch_mean)
                if norms.numel() > 1:
                    self.batch_std.copy_(alpha * norms.std() + (1.0 - alpha) * self.batch_std)
        mean = self.batch_mean.detach().to(norms.device, norms.dtype)
        std = self.batch_std.detach().to(norms.device, norms.dtype)
        scaler = ((norms - mean) / (std + eps) * h).clamp(-1.0, 1.0)
        return _AdaFaceBatch(-m * scaler, m + m * scaler, eps), None

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v:g}" for k, v in self.params.items())


# -- MagFace ----------------------------------------------------------------------------------------------


class MagFace(_NeedsBatch, Margin):
    r"""Magnitude-aware margin with a norm regularizer: the norm learns to measure quality.

    Meng et al., "MagFace: A Universal Representation for Face Recognition and
    Quality Assessment" (CVPR 2021). With ``a_i = clamp(||x_i||, l_a, u_a)``
    (*not* detached: the margin and the regularizer both shape the norm),

    .. math::
        m(a_i) = \frac{u_m - l_m}{u_a - l_a}\,(a_i - l_a) + l_m,\qquad
        \psi_i(t) = \cos(\arccos t + m(a_i)),\qquad
        g(a_i) = \frac{1}{a_i} + \frac{a_i}{u_a^2}

    ``for_batch`` returns :class:`~marginops.ArcFace` with per-row ``m(a_i)`` and
    the per-row extra loss ``lambda_g * g(a_i)``, so the loss is the paper's
    ``L = mean_i (L_mag,i + lambda_g * g(a_i))`` over non-ignored rows.

    MagFace reads the norms of the *un-normalized* embeddings while its logits
    use the normalized ones; marginops normalizes inside the loss, so pass the
    backbone's raw embeddings (and keep ``normalize=True``). Past ``theta + m > pi``
    the margin is ArcFace's continuous linear fallback, ``t - (1 - cos m)``, where
    the official code uses ``t - m sin m`` (only for ``t < -cos m``).

    Args:
        l_a (float): lower norm bound, > 0. Default: 10.0.
        u_a (float): upper norm bound, > ``l_a``. Default: 110.0.
        l_m (float): margin at ``l_a``, in [0, pi). Default: 0.45.
        u_m (float): margin at ``u_a``, in [``l_m``, pi). Default: 0.8.
        lambda_g (float): weight of the regularizer, >= 0. Default: 35.0.

    Raises:
        TypeError: a parameter that is not a real number (bools included).
        ValueError: a parameter out of range or not finite, ``u_a <= l_a`` or ``u_m < l_m``.
    """

    def __init__(self, l_a: float = 10.0, u_a: float = 110.0, l_m: float = 0.45, u_m: float = 0.8,
                 lambda_g: float = 35.0) -> None:
        l_a = _real("l_a", l_a, low=0.0, low_open=True)
        u_a = _real("u_a", u_a, low=0.0, low_open=True)
        if u_a <= l_a:
            raise ValueError(f"u_a must be greater than l_a, got u_a={u_a!r} and l_a={l_a!r}")
        l_m = _real("l_m", l_m, low=0.0, high=math.pi, high_open=True)
        u_m = _real("u_m", u_m, low=0.0, high=math.pi, high_open=True)
        if u_m < l_m:
            raise ValueError(f"u_m must be at least l_m, got u_m={u_m!r} and l_m={l_m!r}")
        lambda_g = _real("lambda_g", lambda_g, low=0.0)
        self.params = {"l_a": l_a, "u_a": u_a, "l_m": l_m, "u_m": u_m, "lambda_g": lambda_g}

    def __call__(self, t: Tensor) -> Tensor:
        self._refuse()

    def for_batch(self, embeddings: Tensor) -> tuple[Margin, Tensor]:
        """``(ArcFace(m(a)), lambda_g * g(a))`` for this batch; both carry gradients to the norms."""
        l_a, u_a, l_m, u_m, lambda_g = (float(self.params[k]) for k in ("l_a", "u_a", "l_m", "u_m", "lambda_g"))
        a = _row_norms(embeddings).clamp(l_a, u_a)
        m = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m
        extra = lambda_g * (1.0 / a + a / (u_a * u_a))
        return _with_m(ArcFace(), m), extra
