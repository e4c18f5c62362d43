"""Adaptive margins (ElasticFace, AdaFace, MagFace) end to end against naive float64 formulas.

The oracle below is written from the papers / official code, independently of marginops: normalize,
the full cosine matrix, the target logit replaced by the paper's formula, ``F.cross_entropy`` with
``ignore_index``, plus MagFace's regularizer averaged over the rows that are not ignored.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import marginops as mo
from marginops.margins.adaptive import ARC_MARGIN_MAX, AdaFace, ElasticFace, MagFace
from marginops.margins.schedule import MarginScheduler

from .conftest import assert_close_to_oracle, make_inputs, run

B, C, D = 8, 50, 16
SCALE = 30.0
IGNORE = -100


# -- the naive oracle ---------------------------------------------------------------------------------------

def naive(x, W, y, target, scale=SCALE, reduction="mean", extra=None, run_dtype=None):
    """Loss and both gradients the naive way; ``target(t, x, run_dtype)`` gives the margined target
    cosine (``run_dtype``: the dtype of the run being checked, default ``x``'s) and ``extra(x)`` the
    per-row extra term (or None). The backward seeds ``loss.sum()`` like ``run``."""
    run_dtype = run_dtype or x.dtype
    x = x.detach().clone().requires_grad_()
    W = W.detach().clone().requires_grad_()
    cos = (x / x.norm(dim=1, keepdim=True)) @ (W / W.norm(dim=1, keepdim=True)).t()
    valid = y != IGNORE
    safe = torch.where(valid, y, torch.zeros_like(y))
    t = cos.gather(1, safe[:, None])[:, 0]
    z = target(t, x, run_dtype)
    onehot = F.one_hot(safe, W.shape[0]).bool()
    logits = scale * torch.where(onehot, z[:, None], cos)
    loss = F.cross_entropy(logits, y, ignore_index=IGNORE, reduction=reduction)
    if extra is not None:
        e = torch.where(valid, extra(x), torch.zeros(()))
        loss = loss + {"none": e, "sum": e.sum(), "mean": e.sum() / valid.sum()}[reduction]
    loss.sum().backward()
    return loss.detach(), x.grad, W.grad


def inputs(norms, dtype=torch.float64, parallel_row=None):
    """(x, W, y) with row norms ``norms``, one ignored row, and optionally a row parallel to its class."""
    x, W, y = make_inputs(B, C, D, torch.float64, ignore=1)
    x = F.normalize(x, dim=1) * torch.as_tensor(norms, dtype=torch.float64)[:, None]
    if parallel_row is not None:
        r = parallel_row
        assert y[r] != IGNORE
        x[r] = F.normalize(W[y[r]], dim=0) * x[r].norm()
    return x.to(dtype), W.to(dtype), y


NORMS = [0.5, 6.0, 12.0, 25.0, 40.0, 70.0, 105.0, 140.0]  # both sides of every clamp used below


def _acos_plus(t, m):
    """cos(acos t + m), asserting the test data stays where ArcFace has no fallback."""
    theta = torch.acos(t)
    assert bool((theta + m < math.pi).all()), "test data reaches ArcFace's fallback"
    return torch.cos(theta + m)


# -- the cases: (margin factory(dtype), target(t, x), extra(x) or None) ---------------------------------------

def elastic_case(kind, plus=False):
    def make(dtype):
        return ElasticFace(0.5 if kind == "arc" else 0.35, 0.05, kind=kind, seed=1234, plus=plus)

    def target(t, x, run_dtype):
        # the draws of call 0, as the run under test makes them (float64 or float32), are the random input
        m = make(run_dtype).sample(x.shape[0], 0, dtype=run_dtype).to(t.dtype)
        if plus:  # larger target cosine, larger margin: the k-th smallest t gets the k-th smallest m
            m = torch.empty_like(m).scatter_(0, torch.argsort(t.detach()), torch.sort(m).values)
        return _acos_plus(t, m) if kind == "arc" else t - m

    return make, target, None


def adaface_case(m=0.4, h=0.333, t_alpha=0.01, eps=1e-3):
    def make(dtype):
        margin = AdaFace(m, h, t_alpha, eps)
        return margin.double() if dtype == torch.float64 else margin

    def target(t, x, run_dtype=None):
        # official head.py, first training step from batch_mean=20, batch_std=100 (norms detached)
        norms = x.detach().norm(dim=1).clamp(0.001, 100)
        mean = norms.mean() * t_alpha + (1 - t_alpha) * 20.0
        std = norms.std() * t_alpha + (1 - t_alpha) * 100.0
        scaler = ((norms - mean) / (std + eps) * h).clip(-1, 1)
        g_angular = m * scaler * -1
        theta = t.clamp(-1 + eps, 1 - eps).acos()
        theta_m = torch.clip(theta + g_angular, min=eps, max=math.pi - eps)
        g_add = m + m * scaler
        return theta_m.cos() - g_add

    return make, target, None


def magface_case(l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0, detach=False):
    def make(dtype):
        return MagFace(l_a, u_a, l_m, u_m, lambda_g)

    def norm(x):
        a = x.norm(dim=1).clamp(l_a, u_a)
        return a.detach() if detach else a

    def target(t, x, run_dtype=None):
        ada_margin = (u_m - l_m) / (u_a - l_a) * (norm(x) - l_a) + l_m
        return _acos_plus(t, ada_margin)

    def extra(x):
        a = norm(x)
        return lambda_g * (1 / (u_a ** 2) * a + 1 / a)

    return make, target, extra


CASES = {
    "elastic-arc": elastic_case("arc"),
    "elastic-cos": elastic_case("cos"),
    "elastic-arc-plus": elastic_case("arc", plus=True),
    "elastic-cos-plus": elastic_case("cos", plus=True),
    "adaface": adaface_case(),
    "adaface-sharp": adaface_case(m=0.4, h=1.0, t_alpha=1.0),
    "magface": magface_case(),
}


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(CASES))
def test_end_to_end_against_naive_formula(case, reduction, backend):
    make, target, extra = CASES[case]
    x, W, y = inputs(NORMS, parallel_row=None if case.startswith("elastic") or case == "magface" else 7)
    # float64: tight against the float64 oracle
    ref = naive(x, W, y, target, reduction=reduction, extra=extra)
    ours = run(x, W, y, make(torch.float64), SCALE, backend=backend, reduction=reduction)
    assert ours.loss.dtype == torch.float64
    for name, o, r in zip(("loss", "x.grad", "W.grad"), (ours.loss, ours.x_grad, ours.W_grad), ref):
        assert_close_to_oracle(o, r, name=f"{case} float64 {name}")
    # float32: no worse than the naive computation in float32, against the float64 oracle
    x32, W32 = x.float(), W.float()
    ref64 = naive(x32.double(), W32.double(), y, target, reduction=reduction, extra=extra, run_dtype=torch.float32)
    same = naive(x32, W32, y, target, reduction=reduction, extra=extra)
    ours32 = run(x32, W32, y, make(torch.float32), SCALE, backend=backend, reduction=reduction)
    assert ours32.loss.dtype == torch.float32
    for name, o, r, s in zip(("loss", "x.grad", "W.grad"), (ours32.loss, ours32.x_grad, ours32.W_grad), ref64,
                             same):
        assert_close_to_oracle(o, r, s, name=f"{case} float32 {name}")


def test_ignored_row_changes_nothing_else():
    """The ignored row adds neither loss nor gradient (MagFace's regularizer included)."""
    make, target, extra = CASES["magface"]
    x, W, y = inputs(NORMS)
    out = run(x, W, y, make(torch.float64), SCALE, reduction="none")
    ignored = y == IGNORE
    assert int(ignored.sum()) == 1
    assert bool((out.loss[ignored] == 0).all())
    assert bool((out.x_grad[ignored] == 0).all())
    # and "mean" divides by the 7 remaining rows
    mean = run(x, W, y, make(torch.float64), SCALE, reduction="mean").loss
    assert_close_to_oracle(mean, out.loss.sum() / 7)


# -- AdaFace -------------------------------------------------------------------------------------------------

def test_adaface_buffers_follow_the_ema_in_training_only():
    x, W, y = inputs(NORMS)
    ada = AdaFace(t_alpha=0.3).double()
    mean, std = 20.0, 100.0
    for step in range(3):
        xs = x * (1 + step)  # different norms each step
        mo.margin_cross_entropy(xs, W, y, ada, SCALE)
        n = xs.norm(dim=1).clamp(0.001, 100)
        mean = 0.3 * n.mean().item() + 0.7 * mean
        std = 0.3 * n.std().item() + 0.7 * std
        assert ada.batch_mean.item() == pytest.approx(mean, rel=1e-12)
        assert ada.batch_std.item() == pytest.approx(std, rel=1e-12)
    assert not ada.batch_mean.requires_grad and ada.batch_mean.shape == (1,)
    ada.eval()
    before = (ada.batch_mean.clone(), ada.batch_std.clone())
    psi, extra = ada.for_batch(x * 5)
    assert extra is None
    assert torch.equal(ada.batch_mean, before[0]) and torch.equal(ada.batch_std, before[1])
    # eval mode uses the stored statistics
    n = (x * 5).norm(dim=1).clamp(0.001, 100)
    scaler = ((n - before[0]) / (before[1] + 1e-3) * 0.333).clamp(-1, 1)
    assert torch.allclose(psi.params["g_angular"], -0.4 * scaler, rtol=0, atol=1e-15)
    assert torch.allclose(psi.params["g_additive"], 0.4 + 0.4 * scaler, rtol=0, atol=1e-15)


def test_adaface_one_row_and_empty_batches_keep_finite_statistics():
    ada = AdaFace(t_alpha=0.5)
    ada.for_batch(torch.full((1, 4), 5.0))  # norm 10: mean moves, std (undefined) stays
    assert ada.batch_mean.item() == pytest.approx(15.0) and ada.batch_std.item() == 100.0
    psi, _ = ada.for_batch(torch.zeros(0, 4))
    assert ada.batch_mean.item() == pytest.approx(15.0) and psi.params["g_angular"].shape == (0,)


def test_adaface_in_margin_head_state_dict_round_trip():
    head = mo.MarginHead(8, 50, margin=AdaFace(t_alpha=0.5))
    sd = head.state_dict()
    assert "margin.batch_mean" in sd and "margin.batch_std" in sd
    x, y = torch.randn(16, 8) * 30, torch.randint(0, 50, (16,))
    head(x, y).backward()
    assert head.margin.batch_mean.item() != 20.0
    other = mo.MarginHead(8, 50, margin=AdaFace(t_alpha=0.5))
    other.load_state_dict(head.state_dict())
    assert torch.equal(other.margin.batch_mean, head.margin.batch_mean)
    assert torch.equal(other.margin.batch_std, head.margin.batch_std)
    assert torch.equal(other(x, y), head(x, y))  # both update identically in training mode
    head.eval()
    kept = head.margin.batch_mean.clone()
    head(x * 3, y)
    assert torch.equal(head.margin.batch_mean, kept)


def _radial(grad, x):
    """Component of each row's gradient along the row: nonzero only if the loss sees the norm."""
    return (grad * F.normalize(x, dim=1)).sum(1)


def test_adaface_norms_are_detached():
    make, target, _ = CASES["adaface-sharp"]
    x, W, y = inputs(NORMS)
    ours = run(x, W, y, make(torch.float64), SCALE)
    detached = naive(x, W, y, target)

    def attached_target(t, x_, _):  # the same formula with the norm left in the graph
        norms = x_.norm(dim=1).clamp(0.001, 100)
        scaler = ((norms - norms.mean()) / (norms.std() + 1e-3)).clip(-1, 1)
        theta = t.clamp(-1 + 1e-3, 1 - 1e-3).acos()
        return torch.clip(theta - 0.4 * scaler, 1e-3, math.pi - 1e-3).cos() - (0.4 + 0.4 * scaler)

    attached = naive(x, W, y, attached_target)
    assert_close_to_oracle(ours.x_grad, detached[1], name="x.grad")
    assert (ours.x_grad - attached[1]).abs().max() > 1e-4  # the oracle above could tell them apart
    assert _radial(ours.x_grad, x).abs().max() < 1e-12


# -- MagFace -------------------------------------------------------------------------------------------------

def test_magface_gradient_reaches_the_norm():
    x, W, y = inputs(NORMS)
    ours = run(x, W, y, MagFace(), SCALE)
    _, target, extra = magface_case()
    _, target_d, extra_d = magface_case(detach=True)
    attached = naive(x, W, y, target, extra=extra)
    detached = naive(x, W, y, target_d, extra=extra_d)
    assert_close_to_oracle(ours.x_grad, attached[1], name="x.grad")
    assert (ours.x_grad - detached[1]).abs().max() > 1e-4
    radial = _radial(ours.x_grad, x)
    norms = x.norm(dim=1)
    inside = (norms > 10) & (norms < 110) & (y != IGNORE)
    assert bool((radial[inside].abs() > 1e-6).all())
    assert radial[~inside].abs().max() < 1e-12  # clamped norms and the ignored row: no radial gradient


def test_magface_per_batch_margin_and_regularizer():
    x = torch.tensor([[5.0, 0.0], [0.0, 60.0], [200.0, 0.0]])
    psi, extra = MagFace().for_batch(x)
    assert isinstance(psi, mo.ArcFace)
    assert torch.allclose(psi.params["m"], torch.tensor([0.45, 0.45 + 0.35 * 0.5, 0.8]))
    a = torch.tensor([10.0, 60.0, 110.0])
    assert torch.allclose(extra, 35.0 * (1 / a + a / 110.0 ** 2))


# -- ElasticFace ---------------------------------------------------------------------------------------------

def test_elastic_seeded_draws_reproducible_and_call_indexed():
    x = torch.randn(32, 8)
    a, b = ElasticFace(seed=7), ElasticFace(seed=7)
    da = [a.for_batch(x)[0].params["m"] for _ in range(3)]
    db = [b.for_batch(x)[0].params["m"] for _ in range(3)]
    for u, v in zip(da, db):
        assert torch.equal(u, v)
    assert not torch.equal(da[0], da[1]) and not torch.equal(da[1], da[2])
    assert a.calls == 3
    c = ElasticFace(seed=7)
    c.calls = 2  # resuming: the third call's draws depend on (seed, 2) only
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(c.for_batch(x)[0].params["m"], da[2])
    assert torch.equal(ElasticFace(seed=7).sample(32, 1), da[1])
    assert not torch.equal(ElasticFace(seed=8).for_batch(x)[0].params["m"], da[0])


def test_elastic_unseeded_uses_the_global_rng():
    x = torch.randn(16, 8)
    torch.manual_seed(5)
    first = ElasticFace().for_batch(x)[0].params["m"]
    torch.manual_seed(5)
    again = ElasticFace().for_batch(x)[0].params["m"]
    assert torch.equal(first, again)


@pytest.mark.parametrize("kind,m", [("arc", 0.5), ("cos", 0.35)])
def test_elastic_draw_distribution_and_margin_kind(kind, m):
    sigma = 0.05
    draws = ElasticFace(m, sigma, kind=kind, seed=3).sample(200_000, dtype=torch.float64)
    assert abs(draws.mean().item() - m) < 5 * sigma / math.sqrt(draws.numel())
    assert draws.std().item() == pytest.approx(sigma, rel=0.01)
    x = torch.randn(6, 8, dtype=torch.float64)
    psi, extra = ElasticFace(m, sigma, kind=kind, seed=3).for_batch(x)
    assert extra is None and isinstance(psi, mo.ArcFace if kind == "arc" else mo.CosFace)
    mi = psi.params["m"]
    assert mi.shape == (6,) and mi.dtype == torch.float64
    t = torch.linspace(-0.5, 0.9, 6, dtype=torch.float64)
    want = torch.cos(torch.acos(t) + mi) if kind == "arc" else t - mi
    assert torch.allclose(psi(t), want, rtol=0, atol=1e-14)


def test_elastic_draws_are_clamped_to_the_valid_range():
    low = ElasticFace(0.0, 1.0, kind="cos", seed=0).sample(10_000)
    assert low.min().item() == 0.0 and (low > 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    high = ElasticFace(3.1, 1.0, kind="arc", seed=0).sample(10_000, dtype=torch.float64)
    assert high.max().item() == pytest.approx(ARC_MARGIN_MAX) and high.min().item() == 0.0
    psi, _ = ElasticFace(3.1, 1.0, kind="arc", seed=0).for_batch(torch.randn(64, 4))
    assert torch.isfinite(psi(torch.linspace(-1, 1, 64))).all()


def test_elastic_plus_gives_larger_margins_to_larger_target_cosines():
    draws = ElasticFace(0.35, 0.1, kind="cos", seed=9).sample(10, dtype=torch.float64)
    psi, _ = ElasticFace(0.35, 0.1, kind="cos", seed=9, plus=True).for_batch(torch.randn(10, 4, dtype=torch.float64))
    t = torch.tensor([0.3, -0.2, 0.9, 0.1, 0.5, -0.6, 0.0, 0.7, 0.2, 0.4], dtype=torch.float64)
    assigned = t - psi(t)
    assert torch.allclose(torch.sort(assigned).values, torch.sort(draws).values, rtol=0, atol=1e-15)
    order = torch.argsort(t)
    assert bool((assigned[order].diff() >= 0).all())
    assert not bool((assigned.diff() >= 0).all())  # the ranking is by t, not by row


def test_scheduler_drives_elastic_mean_margin():
    ef = ElasticFace(0.5, 0.0, kind="cos", seed=0)
    sched = MarginScheduler(ef, start=0.1, end=0.5, warmup_end=4)
    assert ef.for_batch(torch.randn(3, 2))[0].params["m"].tolist() == pytest.approx([0.1] * 3)
    sched.step()
    assert ef.for_batch(torch.randn(3, 2))[0].params["m"].tolist() == pytest.approx([0.2] * 3)


# -- validation ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("factory,error,match", [
    (lambda: ElasticFace(m=-0.1), ValueError, r"^m must lie in \[0, 3.14159\), got -0.1"),
    (lambda: ElasticFace(m=3.2), ValueError, r"^m must lie in"),
    (lambda: ElasticFace(m=float("nan")), ValueError, r"^m must be finite"),
    (lambda: ElasticFace(m=torch.tensor(0.5)), TypeError, r"^m must be a real number, got Tensor"),
    (lambda: ElasticFace(sigma=-1.0), ValueError, r"^sigma must lie in \[0, inf\], got -1"),
    (lambda: ElasticFace(sigma=True), TypeError, r"^sigma must be a real number, got bool"),
    (lambda: ElasticFace(kind="sphere"), ValueError, r"^kind must be 'arc' or 'cos', got 'sphere'"),
    (lambda: ElasticFace(kind=1), TypeError, r"^kind must be 'arc' or 'cos', got int"),
    (lambda: ElasticFace(seed=1.5), TypeError, r"^seed must be an int or None, got float 1.5"),
    (lambda: ElasticFace(seed=True), TypeError, r"^seed must be an int or None, got bool"),
    (lambda: ElasticFace(plus=1), TypeError, r"^plus must be a bool, got int 1"),
    (lambda: AdaFace(m=-0.4), ValueError, r"^m must lie in \[0, inf\], got -0.4"),
    (lambda: AdaFace(h=-1.0), ValueError, r"^h must lie in"),
    (lambda: AdaFace(t_alpha=1.5), ValueError, r"^t_alpha must lie in \[0, 1\], got 1.5"),
    (lambda: AdaFace(eps=0.0), ValueError, r"^eps must lie in \(0, 1.5708\), got 0"),
    (lambda: AdaFace(eps="1e-3"), TypeError, r"^eps must be a real number, got str"),
    (lambda: MagFace(l_a=0.0), ValueError, r"^l_a must lie in \(0, inf\], got 0"),
    (lambda: MagFace(l_a=10.0, u_a=10.0), ValueError, r"^u_a must be greater than l_a, got u_a=10.0 and l_a=10.0"),
    (lambda: MagFace(l_m=0.8, u_m=0.45), ValueError, r"^u_m must be at least l_m, got u_m=0.45 and l_m=0.8"),
    (lambda: MagFace(u_m=3.2), ValueError, r"^u_m must lie in"),
    (lambda: MagFace(lambda_g=-1.0), ValueError, r"^lambda_g must lie in"),
    (lambda: MagFace(lambda_g=None), TypeError, r"^lambda_g must be a real number, got NoneType"),
])
def test_bad_parameters_raise_named_errors(factory, error, match):
    with pytest.raises(error, match=match):
        factory()


@pytest.mark.parametrize("margin", [ElasticFace(), AdaFace(), MagFace()], ids=["elastic", "adaface", "magface"])
def test_adaptive_margin_applied_to_a_bare_cosine_says_what_to_do(margin):
    with pytest.raises(TypeError, match="adaptive margin.*for_batch"):
        margin(torch.zeros(3))


def test_sample_arguments_are_checked():
    with pytest.raises(ValueError, match="batch_size must be a non-negative int, got -1"):
        ElasticFace(seed=0).sample(-1)
    with pytest.raises(ValueError, match="call must be a non-negative int, got -2"):
        ElasticFace(seed=0).sample(3, -2)
