"""The margin zoo against independent float64 formulas, plus its gradients and validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import marginops as mo
from marginops.margins.zoo import SIN2_FLOOR

from .conftest import assert_close_to_oracle


# -- independent formulas (numpy, float64), written from the papers / docstrings -----------------

def _theta(t):
    return np.arccos(np.clip(t, -1.0, 1.0))


def expected_cosface(t, m):
    return t - m


def expected_arcface(t, m, easy_margin=False):
    theta = _theta(t)
    # cos(theta + m) until theta + m reaches pi, then the CosFace-like continuation t - (1 - cos m).
    psi = np.where(theta + m <= np.pi, np.cos(theta + m), t - (1.0 - np.cos(m)))
    return np.where(t > 0, psi, t) if easy_margin else psi


def expected_combined(t, m1, m2, m3):
    theta = _theta(t)
    theta_star = (np.pi - m2) / m1
    return np.where(theta <= theta_star, np.cos(m1 * theta + m2), t - np.cos(theta_star) - 1.0) - m3


def expected_sphereface(t, m):
    theta = _theta(t)
    k = np.clip(np.floor(m * theta / np.pi), 0, m - 1)
    return (-1.0) ** k * np.cos(m * theta) - 2.0 * k


def expected_simpler(t, m):
    return np.minimum(np.cos(m * _theta(t)), t)


def _roots_of(f, grid=np.linspace(-1, 1, 200_001)):
    """Approximate points where ``f`` changes sign on [-1, 1] (kinks of min(.,.) margins)."""
    v = f(grid)
    return list(grid[:-1][np.sign(v[:-1]) != np.sign(v[1:])])


# (id, factory, expected formula, kinks(t) of the formula) with keyword parameters.
CASES = [
    ("none", lambda: mo.NoMargin(), lambda t: t, lambda: [], {}),
    ("cosface-0", mo.CosFace, expected_cosface, lambda m: [], {"m": 0.0}),
    ("cosface-0.35", mo.CosFace, expected_cosface, lambda m: [], {"m": 0.35}),
    ("cosface-1.2", mo.CosFace, expected_cosface, lambda m: [], {"m": 1.2}),
    *[(f"arcface-{m}", mo.ArcFace, expected_arcface, lambda m: [math.cos(math.pi - m)], {"m": m})
      for m in (0.0, 0.3, 0.5, 1.0, 2.0)],
    *[(f"arcface-easy-{m}", lambda m: mo.ArcFace(m, easy_margin=True),
       lambda t, m: expected_arcface(t, m, easy_margin=True), lambda m: [0.0, math.cos(math.pi - m)], {"m": m})
      for m in (0.5, 2.0)],
    *[(f"sphereface-{m}", mo.SphereFace, expected_sphereface,
       lambda m: [math.cos(k * math.pi / m) for k in range(1, m)], {"m": m}) for m in (1, 2, 3, 4, 5)],
    *[(f"simpler-{m}", mo.SimplerASoftmax, expected_simpler,
       lambda m: _roots_of(lambda t: np.cos(m * _theta(t)) - t) if m > 1 else [], {"m": m}) for m in (1, 2, 4)],
    *[(f"combined-{m1}-{m2}-{m3}", mo.CombinedMargin, expected_combined,
       lambda m1, m2, m3: [math.cos((math.pi - m2) / m1)] if (math.pi - m2) / m1 < math.pi else [],
       {"m1": m1, "m2": m2, "m3": m3})
      for m1, m2, m3 in ((1.0, 0.0, 0.0), (1.0, 0.5, 0.0), (1.0, 0.0, 0.35), (0.9, 0.4, 0.15), (1.35, 0.2, 0.1),
                         (0.5, 0.3, 0.0))],
]
IDS = [c[0] for c in CASES]


def _build(case, **override):
    _, factory, _, _, params = case
    return factory(**{**params, **override})


def _grid(n=4001):
    """[-1, 1] inclusive, plus random interior points (float64)."""
    return torch.cat([torch.linspace(-1.0, 1.0, n, dtype=torch.float64), torch.rand(500, dtype=torch.float64) * 2 - 1])


def _away_from_kinks(case, t, gap=2e-3):
    _, _, _, kinks, params = case
    keep = torch.ones_like(t, dtype=torch.bool)
    for k in kinks(**params):
        keep &= (t - k).abs() > gap
    return t[keep]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_value_matches_independent_formula(case):
    _, _, expected, _, params = case
    t = _grid()
    ours = _build(case)(t)
    assert ours.shape == t.shape and ours.dtype == t.dtype
    assert_close_to_oracle(ours, torch.from_numpy(expected(t.numpy(), **params)), name=f"psi {case[0]}")


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_input_keeps_dtype(case, dtype):
    _, _, expected, _, params = case
    t = _grid(201).to(dtype)
    ours = _build(case)(t)
    assert ours.dtype == dtype and ours.shape == t.shape
    assert bool(torch.isfinite(ours).all())
    # Evaluating the same formula on the rounded inputs, psi is a few ulps of the result away
    # (the formulas are at most m^2-Lipschitz; m <= 5 here).
    ref = torch.from_numpy(expected(t.double().numpy(), **params))
    assert_close_to_oracle(ours, ref, tol=40 * torch.finfo(dtype).eps, name=f"psi {case[0]} {dtype}")


FALLBACK = [c for c in CASES if c[0].startswith(("arcface", "combined")) and c[3](**c[4])
            and c[3](**c[4])[-1] > -1.0]


@pytest.mark.parametrize("case", FALLBACK, ids=[c[0] for c in FALLBACK])
@pytest.mark.parametrize("delta", [1e-4, 1e-7, 1e-10])
def test_fallback_is_continuous_where_the_angle_reaches_pi(case, delta):
    t_star = case[3](**case[4])[-1]  # cos(theta*), where m1 * theta + m2 = pi
    psi = _build(case)
    lo, hi = psi(torch.tensor([t_star - delta, t_star + delta], dtype=torch.float64))
    # slope is <= 1 on both sides of theta*, so the jump is at most ~2 * delta.
    assert abs(float(hi - lo)) <= 2.5 * delta + 1e-12, f"jump {float(hi - lo):.3e} across t* = {t_star}"


MONOTONE = [c for c in CASES if not c[0].startswith(("simpler", "arcface-easy"))]


@pytest.mark.parametrize("case", MONOTONE, ids=[c[0] for c in MONOTONE])
def test_monotone_non_decreasing_in_t(case):
    t = torch.linspace(-1.0, 1.0, 100_001, dtype=torch.float64)
    d = torch.diff(_build(case)(t))
    assert float(d.min()) >= -1e-12, f"psi decreases by {-float(d.min()):.3e} at t = {float(t[int(d.argmin())])}"


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7])
def test_sphereface_monotone_and_continuous(m):
    t = torch.linspace(-1.0, 1.0, 200_001, dtype=torch.float64)
    psi = mo.SphereFace(m)(t)
    d = torch.diff(psi)
    assert float(d.min()) >= -1e-12
    # |d psi / d t| = m |sin(m theta) / sin(theta)| <= m^2: no jumps anywhere (a piece mismatch would be ~2).
    assert float(d.max()) <= m * m * float(t[1] - t[0]) * (1 + 1e-6) + 1e-12
    assert float(psi[0]) == pytest.approx(1.0 - 2.0 * m, abs=1e-12)  # psi(-1) = 1 - 2m
    assert float(psi[-1]) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exact_gradient_finite_at_plus_minus_one(case, dtype):
    eps = torch.finfo(dtype).eps
    # exactly +-1, and the slightly-out-of-range cosines rounding can produce
    t = torch.tensor([-1.0 - eps, -1.0, 1.0, 1.0 + eps], dtype=dtype, requires_grad=True)
    psi = _build(case)(t)
    (g,) = torch.autograd.grad(psi.sum(), t)
    assert bool(torch.isfinite(psi).all()) and bool(torch.isfinite(g).all()), f"psi={psi}, grad={g}"


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("t0", [-1.0, 1.0])
def test_sphereface_derivative_at_ends_is_m_squared(m, t0):
    # T_m'(1) = m^2; at t = -1 the last piece (-1)^(m-1) T_m has derivative m^2 as well.
    t = torch.tensor([t0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(mo.SphereFace(m)(t).sum(), t)
    assert float(g) == pytest.approx(m * m, rel=1e-12)


@pytest.mark.parametrize("m", [0.1, 0.5, 1.0])
def test_arcface_exact_gradient_at_one_is_bounded(m):
    t = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(mo.ArcFace(m)(t).sum(), t)
    bound = math.cos(m) + math.sin(m) / math.sqrt(SIN2_FLOOR)  # documented cap of cos m + sin m t / sqrt(1-t^2)
    assert 0.0 < float(g) <= bound * (1 + 1e-12)


ST_MARGINS = {
    "arcface": (lambda gradient: mo.ArcFace(0.5, gradient=gradient)),
    "arcface-large": (lambda gradient: mo.ArcFace(2.0, gradient=gradient)),
    "arcface-easy": (lambda gradient: mo.ArcFace(0.5, easy_margin=True, gradient=gradient)),
    "combined": (lambda gradient: mo.CombinedMargin(1.2, 0.3, 0.2, gradient=gradient)),
    "combined-per-row": (lambda gradient: mo.CombinedMargin(
        torch.linspace(0.8, 1.3, 4503, dtype=torch.float64), 0.3, torch.full((4503,), 0.1), gradient=gradient)),
}


@pytest.mark.parametrize("name", ST_MARGINS)
def test_straight_through_gradient_is_one_and_value_unchanged(name):
    t = _grid(4003).requires_grad_()  # 4503 points, both ends and the fallback region included
    psi = ST_MARGINS[name]("straight_through")(t)
    (g,) = torch.autograd.grad(psi.sum(), t)
    assert torch.equal(g, torch.ones_like(g))
    assert_close_to_oracle(psi, ST_MARGINS[name]("exact")(t.detach()), name="straight-through value")


PER_ROW = {
    "cosface": (mo.CosFace, {"m": [0.0, 0.1, 0.35, 0.5, 1.0, 0.2, 0.7]}),
    "arcface": (mo.ArcFace, {"m": [0.0, 0.2, 0.5, 1.0, 2.0, 3.0, 0.5]}),
    "arcface-easy": (lambda m: mo.ArcFace(m, easy_margin=True), {"m": [0.0, 0.2, 0.5, 1.0, 2.0, 3.0, 0.5]}),
    "sphereface": (mo.SphereFace, {"m": [1, 2, 3, 4, 5, 4, 2]}),
    "simpler": (mo.SimplerASoftmax, {"m": [1, 2, 3, 4, 5, 4, 2]}),
    "combined": (mo.CombinedMargin, {"m1": [1.0, 0.9, 1.2, 0.5, 1.0, 1.35, 2.0],
                                     "m2": [0.0, 0.4, 0.2, 0.3, 0.5, 0.0, 1.0],
                                     "m3": [0.0, 0.15, 0.1, 0.0, 0.35, 0.2, 0.0]}),
    "combined-mixed": (lambda m1, m2: mo.CombinedMargin(m1, m2, 0.1),
                       {"m1": [1.0, 0.9, 1.2, 0.5, 1.0, 1.35, 2.0], "m2": 0.3}),
}


PER_ROW_DTYPES = [(name, dtype) for name in PER_ROW for dtype in (torch.float64, torch.float32)] + [
    ("sphereface", torch.int64), ("simpler", torch.int64)]


@pytest.mark.parametrize("name, tensor_dtype", PER_ROW_DTYPES)
def test_per_row_tensor_params_equal_per_row_scalars(name, tensor_dtype):
    factory, params = PER_ROW[name]
    B = 7
    tensors = {k: torch.tensor(v, dtype=tensor_dtype) if isinstance(v, list) else v for k, v in params.items()}
    for t_row in (torch.linspace(-0.99, 0.99, B, dtype=torch.float64),
                  torch.tensor([-1.0, 1.0, -0.95, 0.97, -0.3, 0.0, 0.6], dtype=torch.float64)):
        t = t_row.clone().requires_grad_()
        psi = factory(**tensors)(t)
        (g,) = torch.autograd.grad(psi.sum(), t)
        for i in range(B):
            scalars = {k: (v[i] if isinstance(v, list) else v) for k, v in params.items()}
            ti = t_row[i:i + 1].clone().requires_grad_()
            psi_i = factory(**scalars)(ti)
            (gi,) = torch.autograd.grad(psi_i.sum(), ti)
            assert_close_to_oracle(psi[i:i + 1], psi_i, tol=1e-6 if tensor_dtype == torch.float32 else None,
                                   name=f"{name} row {i} value")
            assert_close_to_oracle(g[i:i + 1], gi, tol=1e-6 if tensor_dtype == torch.float32 else None,
                                   name=f"{name} row {i} grad")


def test_per_row_param_tensor_params_follow_input_dtype():
    t = torch.linspace(-0.9, 0.9, 5, dtype=torch.float32)
    for margin in (mo.CosFace(torch.full((5,), 0.35, dtype=torch.float64)),
                   mo.ArcFace(torch.full((5,), 0.5, dtype=torch.float64)),
                   mo.SphereFace(torch.full((5,), 3, dtype=torch.int64))):
        assert margin(t).dtype == torch.float32


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradcheck_interior(case):
    t = _away_from_kinks(case, torch.linspace(-0.97, 0.97, 41, dtype=torch.float64) + 0.0037)
    assert t.numel() >= 20
    psi = _build(case)
    assert torch.autograd.gradcheck(psi, (t.requires_grad_(),), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name, factory", [
    ("cosface-m", lambda m: mo.CosFace(m)),
    ("arcface-m", lambda m: mo.ArcFace(m)),
    ("combined-m1", lambda m: mo.CombinedMargin(m + 0.5, 0.3, 0.1)),
    ("combined-m2", lambda m: mo.CombinedMargin(1.1, m, 0.1)),
    ("combined-m3", lambda m: mo.CombinedMargin(1.1, 0.3, m)),
])
def test_gradcheck_wrt_per_row_params(name, factory):
    t = torch.tensor([-0.6, -0.2, 0.1, 0.45, 0.8, 0.93], dtype=torch.float64)
    m = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.35, 0.25], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, t: factory(m)(t), (m, t.requires_grad_()), eps=1e-6, atol=1e-7)


# -- validation -------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
INVALID = [
    # (factory, kwargs, exception, parameter named in the message)
    (mo.ArcFace, {"m": -0.1}, ValueError, "m"),
    (mo.ArcFace, {"m": math.pi}, ValueError, "m"),
    (mo.ArcFace, {"m": 4.0}, ValueError, "m"),
    (mo.ArcFace, {"m": torch.tensor([0.1, math.pi])}, ValueError, "m"),
    (mo.ArcFace, {"m": 0.5, "gradient": "approx"}, ValueError, "gradient"),
    (mo.ArcFace, {"m": 0.5, "easy_margin": "yes"}, TypeError, "easy_margin"),
    (mo.SphereFace, {"m": 2.5}, ValueError, "m"),
    (mo.SphereFace, {"m": 0}, ValueError, "m"),
    (mo.SphereFace, {"m": -3}, ValueError, "m"),
    (mo.SphereFace, {"m": torch.tensor([2.0, 2.5])}, ValueError, "m"),
    (mo.SimplerASoftmax, {"m": 1.5}, ValueError, "m"),
    (mo.SimplerASoftmax, {"m": torch.tensor([0, 2])}, ValueError, "m"),
    (mo.CosFace, {"m": -0.1}, ValueError, "m"),
    (mo.CosFace, {"m": torch.tensor([0.2, -0.1])}, ValueError, "m"),
    (mo.CosFace, {"m": True}, TypeError, "m"),
    (mo.CosFace, {"m": "0.35"}, TypeError, "m"),
    (mo.CosFace, {"m": None}, TypeError, "m"),
    (mo.CosFace, {"m": [0.1, 0.2]}, TypeError, "m"),
    (mo.CosFace, {"m": torch.full((2, 2), 0.1)}, ValueError, "m"),
    (mo.CosFace, {"m": torch.tensor([True, False])}, TypeError, "m"),
    (mo.CosFace, {"m": torch.tensor([0.1 + 0.1j])}, TypeError, "m"),
    (mo.CosFace, {"m": torch.empty(0)}, ValueError, "m"),
    (mo.CosFace, {"m": NAN}, ValueError, "m"),
    (mo.CosFace, {"m": INF}, ValueError, "m"),
    (mo.CosFace, {"m": torch.tensor([0.1, NAN])}, ValueError, "m"),
    (mo.ArcFace, {"m": NAN}, ValueError, "m"),
    (mo.SphereFace, {"m": INF}, ValueError, "m"),
    (mo.SphereFace, {"m": True}, TypeError, "m"),
    (mo.CombinedMargin, {"m1": 0.0}, ValueError, "m1"),
    (mo.CombinedMargin, {"m1": -1.0}, ValueError, "m1"),
    (mo.CombinedMargin, {"m2": -0.1}, ValueError, "m2"),
    (mo.CombinedMargin, {"m2": math.pi}, ValueError, "m2"),
    (mo.CombinedMargin, {"m3": -0.5}, ValueError, "m3"),
    (mo.CombinedMargin, {"m2": torch.tensor([[0.1]])}, ValueError, "m2"),
    (mo.CombinedMargin, {"m3": NAN}, ValueError, "m3"),
    (mo.CombinedMargin, {"m1": False}, TypeError, "m1"),
    (mo.CombinedMargin, {"gradient": "straight-through"}, ValueError, "gradient"),
]


def _invalid_id(factory, kwargs):
    shown = ",".join(f"{k}={'tensor' + str(list(v.shape)) if isinstance(v, torch.Tensor) else repr(v)}"
                     for k, v in kwargs.items())
    return f"{factory.__name__}({shown})"


@pytest.mark.parametrize("factory, kwargs, exc, param", INVALID, ids=[_invalid_id(f, k) for f, k, _, _ in INVALID])
def test_invalid_parameters_raise_naming_the_parameter(factory, kwargs, exc, param):
    with pytest.raises(exc, match=rf"\b{param}\b"):
        factory(**kwargs)


@pytest.mark.parametrize("factory, kwargs", [
    (mo.CosFace, {"m": 0}), (mo.ArcFace, {"m": 0.0}), (mo.ArcFace, {"m": 3.14}), (mo.SphereFace, {"m": 1}),
    (mo.SphereFace, {"m": 4.0}), (mo.SphereFace, {"m": torch.tensor([1.0, 3.0])}),
    (mo.CombinedMargin, {"m1": 0.01, "m2": 0.0, "m3": 0.0}), (mo.CosFace, {"m": torch.tensor(0.3)}),
])
def test_boundary_parameters_are_accepted(factory, kwargs):
    psi = factory(**kwargs)(torch.tensor([-0.5, 0.5], dtype=torch.float64))
    assert psi.shape == (2,) and bool(torch.isfinite(psi).all())


def test_repr_names_class_and_parameters():
    assert repr(mo.CosFace(0.35)) == "CosFace(m=0.35)"
    r = repr(mo.ArcFace(torch.full((3,), 0.5), easy_margin=True, gradient="straight_through"))
    assert "ArcFace(" in r and "shape=(3,)" in r and "easy_margin=True" in r and "straight_through" in r
