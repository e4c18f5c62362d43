"""Per-row scales and per-row loss weights of ``margin_cross_entropy``, on every backend.

A per-row scale reaches a fused backend as ``Call.row_scale``. A backend that
does not implement it yet raises NotImplementedError, and the tests here skip
that backend saying so: they run for real once it does. The dense test backend
(:mod:`tests.dense_backend`) implements it the obvious way, so the operators'
side (the scale's gradient, the workspace hand-over) is tested meanwhile. The checks do not lean
on the oracle's own per-row code: a call with per-row scales must equal, row
by row, calls with each row's scale as a number (rows isolated with one-hot
row weights), and ``d loss / d s_i`` must equal central differences of those
calls; row weights must give the weighted sum of the unweighted row losses
and their gradients.
"""

from __future__ import annotations

import pytest
import torch

import marginops as mo

from . import dense_backend
from .conftest import assert_close_to_oracle, make_inputs

dense_backend.register()

B, C, D = 6, 11, 5
REDUCTIONS = ("mean", "sum", "none")
SCALE_BACKENDS = ["reference", "dense", "torch", "native", "triton"]
WEIGHT_BACKENDS = ["reference", "dense", "torch", "native"]  # weights never reach a backend

#: name -> (margin, options)
CASES = {
    "cosface": (mo.CosFace(0.35), {}),
    "arcface-smoothing": (mo.ArcFace(0.5), dict(label_smoothing=0.1)),
    "sphereface": (mo.SphereFace(3), {}),
    "unnormalized": (None, dict(normalize=False)),
    "filtering": (mo.ArcFace(0.3), dict(interclass_filtering_threshold=0.2)),
    "sub-centres": (mo.SubCenter(mo.CosFace(0.2), 2), {}),
}


def _per_row_scales(dtype=torch.float64) -> torch.Tensor:
    return torch.linspace(4.0, 24.0, B, dtype=torch.float64).roll(2).to(dtype)


def _inputs(case: str, dtype=torch.float64):
    margin, options = CASES[case]
    rows = C * (margin.k if isinstance(margin, mo.SubCenter) else 1)
    x, W, y = make_inputs(B, rows, D, dtype, ignore=1)
    y = y % C
    y[y == (-100 % C)] = 0
    y[3] = -100
    if options.get("normalize") is False:  # keep plain logits at a sensible size
        x, W = x / 2, W / 2
    return margin, options, x, W, y


def _or_skip(backend: str, fn):
    """``fn()``, or a skip naming the backend when it does not implement per-row scales yet."""
    try:
        return fn()
    except NotImplementedError as e:
        if "row_scale" in str(e) or "per-row scale" in str(e):
            pytest.skip(f"backend={backend!r} does not implement per-row scales (Call.row_scale) yet: {e}")
        if "dense test backend" in str(e):
            pytest.skip(str(e))
        raise


def _forward_backward(x, W, y, margin, scale, **options):
    xl, Wl = x.clone().requires_grad_(), W.clone().requires_grad_()
    loss = mo.margin_cross_entropy(xl, Wl, y, margin, scale, **options)
    loss.sum().backward()
    return loss.detach(), xl.grad, Wl.grad


def _row_by_row(x, W, y, margin, scales, backend, **options):
    """Each row alone at its own scale (a number): ``(losses (B,), x.grad, W.grad)`` of their sum."""
    losses, gx, gW = [], torch.zeros_like(x), torch.zeros_like(W)
    for i in range(len(y)):
        onehot = torch.zeros(len(y), dtype=x.dtype).index_fill(0, torch.tensor([i]), 1.0)
        loss, dx, dW = _forward_backward(x, W, y, margin, float(scales[i]), backend=backend, reduction="sum",
                                         row_weight=onehot, **options)
        losses.append(loss)
        gx += dx
        gW += dW
    return torch.stack(losses), gx, gW


def _reduced(losses: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return losses
    return losses.sum() / ((y != -100).sum() if reduction == "mean" else 1)


#: (backend, strategy): the reference backend has no strategies
PATHS = [("reference", None)] + [(b, s) for b in SCALE_BACKENDS[1:] for s in ("auto", "recompute")]


@pytest.mark.parametrize("backend, strategy", PATHS, ids=[f"{b}-{s}" if s else b for b, s in PATHS])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES)
def test_per_row_scale_is_each_row_at_its_own_scale(case, reduction, backend, strategy):
    margin, options, x, W, y = _inputs(case)
    if strategy is not None:
        options = dict(options, strategy=strategy, chunk_size=4)
    s = _per_row_scales().requires_grad_()
    xl, Wl = x.clone().requires_grad_(), W.clone().requires_grad_()
    loss = _or_skip(backend, lambda: mo.margin_cross_entropy(xl, Wl, y, margin, s, backend=backend,
                                                             reduction=reduction, **options))
    _or_skip(backend, lambda: loss.sum().backward())
    losses, gx, gW = _row_by_row(x, W, y, margin, s.detach(), backend, **options)
    if reduction == "mean":
        gx, gW = gx / (y != -100).sum(), gW / (y != -100).sum()
    assert_close_to_oracle(loss, _reduced(losses, y, reduction), tol=1e-12, name="loss")
    assert_close_to_oracle(xl.grad, gx, tol=1e-12, name="x.grad")
    assert_close_to_oracle(Wl.grad, gW, tol=1e-12, name="W.grad")
    # d loss / d s_i: central differences of row i's loss at scales s_i +- h
    numeric = torch.zeros(B, dtype=torch.float64)
    for i, si in enumerate(s.detach().tolist()):
        h = 1e-5 * si
        onehot = torch.zeros(B, dtype=torch.float64).index_fill(0, torch.tensor([i]), 1.0)
        at = [mo.margin_cross_entropy(x, W, y, margin, si + d, backend=backend, reduction="sum",
                                      row_weight=onehot, **options) for d in (h, -h)]
        numeric[i] = (at[0] - at[1]) / (2 * h)
    if reduction == "mean":
        numeric = numeric / (y != -100).sum()
    assert s.grad is not None and s.grad[3] == 0, "the ignored row's scale gets no gradient"
    assert_close_to_oracle(s.grad, numeric, tol=1e-7, atol=1e-9, name="scale.grad")


@pytest.mark.parametrize("backend", SCALE_BACKENDS[:-1])
@pytest.mark.parametrize("case", ["default", "sum-smoothing", "recompute", "none-arcface"])
def test_per_row_scale_gradcheck(case, backend):
    margin, options = {
        "default": (mo.CosFace(0.35), {}),
        "sum-smoothing": (mo.CosFace(0.35), dict(reduction="sum", label_smoothing=0.1)),
        "recompute": (mo.ArcFace(0.5), dict(strategy="recompute")),
        "none-arcface": (mo.ArcFace(0.5), dict(reduction="none", label_smoothing=0.1)),
    }[case]
    if backend == "reference":
        options.pop("strategy", None)
    x, W, y = make_inputs(5, 9, 4, torch.float64, ignore=1)
    s = (_per_row_scales()[:5] / 2).requires_grad_()

    def f(x_, W_, s_):
        return mo.margin_cross_entropy(x_, W_, y, margin, s_, backend=backend, **options)

    _or_skip(backend, lambda: f(x, W, s))
    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(), W.clone().requires_grad_(), s))


@pytest.mark.parametrize("backend", SCALE_BACKENDS[:-1])
@pytest.mark.parametrize("strategy", ["auto", "recompute"])
@pytest.mark.parametrize("frozen", ["x", "W", "both"])
def test_scale_gradient_with_frozen_inputs(frozen, strategy, backend):
    """The backend is asked for the embedding gradient whenever the scale needs one."""
    x, W, y = make_inputs(B, C, D, torch.float64, ignore=1)
    options = {} if backend == "reference" else dict(strategy=strategy)
    grads = {}
    for which in ("none", frozen):
        xl = x.clone().requires_grad_(which not in ("x", "both"))
        Wl = W.clone().requires_grad_(which not in ("W", "both"))
        s = _per_row_scales().requires_grad_()
        loss = _or_skip(backend, lambda: mo.margin_cross_entropy(xl, Wl, y, mo.ArcFace(0.4), s, backend=backend,
                                                                 label_smoothing=0.1, **options))
        loss.backward()
        grads[which] = (s.grad, xl.grad, Wl.grad)
    assert_close_to_oracle(grads[frozen][0], grads["none"][0], tol=1e-13, name="scale.grad")
    assert (grads[frozen][1] is None) == (frozen in ("x", "both"))
    assert (grads[frozen][2] is None) == (frozen in ("W", "both"))


@pytest.mark.parametrize("backend", SCALE_BACKENDS)
def test_scalar_tensor_scale_equals_the_number(backend):
    x, W, y = make_inputs(B, C, D, torch.float64, ignore=1)
    s = torch.tensor(12.0, dtype=torch.float64, requires_grad=True)
    tensor = _or_skip(backend, lambda: _forward_backward(x, W, y, mo.ArcFace(0.5), s, backend=backend,
                                                         label_smoothing=0.1))
    number = _forward_backward(x, W, y, mo.ArcFace(0.5), 12.0, backend=backend, label_smoothing=0.1)
    for name, a, b in zip(("loss", "x.grad", "W.grad"), tensor, number):
        assert_close_to_oracle(a, b, tol=1e-13, name=name)
    # its gradient: the sum of the per-row ones (central difference of the number-scale loss)
    s.grad = None
    mo.margin_cross_entropy(x, W, y, mo.ArcFace(0.5), s, backend=backend, label_smoothing=0.1).backward()
    h = 1e-5
    at = [mo.margin_cross_entropy(x, W, y, mo.ArcFace(0.5), 12.0 + d, backend=backend, label_smoothing=0.1)
          for d in (h, -h)]
    assert_close_to_oracle(s.grad, (at[0] - at[1]) / (2 * h), tol=1e-7, name="scale.grad")


def test_per_row_scale_in_16_bit_is_float32():
    x, W, y = make_inputs(B, C, D, torch.bfloat16, ignore=1)
    s = _per_row_scales(torch.float32).requires_grad_()
    loss = mo.margin_cross_entropy(x, W, y, mo.CosFace(0.3), s, backend="reference")
    loss.backward()
    assert loss.dtype == torch.float32 and s.grad.dtype == torch.float32


# -- row weights ------------------------------------------------------------------------------------------


def _weights(dtype=torch.float64) -> torch.Tensor:
    """A zero, weights above and below 1, and a non-zero weight on the ignored row (row 3)."""
    return torch.tensor([0.5, 2.5, 0.0, 7.0, 1.0, 0.25], dtype=dtype)


#: (backend, strategy, reduction); the workspace strategy needs a scalar loss
WEIGHT_PATHS = [("reference", None, r) for r in REDUCTIONS] + [
    (b, s, r) for b in WEIGHT_BACKENDS[1:] for s in ("auto", "workspace", "recompute") for r in REDUCTIONS
    if not (s == "workspace" and r == "none")]


@pytest.mark.parametrize("backend, strategy, reduction", WEIGHT_PATHS,
                         ids=["-".join(filter(None, p)) for p in WEIGHT_PATHS])
def test_row_weight_weighs_each_row_loss(backend, strategy, reduction):
    options = {} if strategy is None else dict(strategy=strategy, chunk_size=4)
    margin, _, x, W, y = _inputs("arcface-smoothing")
    w = _weights()
    loss, gx, gW = _forward_backward(x, W, y, margin, 16.0, backend=backend, reduction=reduction, row_weight=w,
                                     label_smoothing=0.1, **options)
    xl, Wl = x.clone().requires_grad_(), W.clone().requires_grad_()
    rows = mo.margin_cross_entropy(xl, Wl, y, margin, 16.0, backend=backend, reduction="none",
                                   label_smoothing=0.1)
    counted = torch.where(y != -100, w, torch.zeros_like(w))
    factor = counted / counted.sum() if reduction == "mean" else counted
    ref_gx, ref_gW = torch.autograd.grad(rows, (xl, Wl), grad_outputs=factor)
    expected = factor * rows.detach()
    assert_close_to_oracle(loss, expected if reduction == "none" else expected.sum(), tol=1e-13, name="loss")
    assert_close_to_oracle(gx, ref_gx, tol=1e-13, name="x.grad")
    assert_close_to_oracle(gW, ref_gW, tol=1e-13, name="W.grad")
    assert torch.equal(gx[[2, 3]], torch.zeros_like(gx[[2, 3]])), "zero-weight and ignored rows get no gradient"


@pytest.mark.parametrize("backend", WEIGHT_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_zero_one_weights_equal_ignoring_the_rows(reduction, backend):
    margin, _, x, W, y = _inputs("cosface")
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    weighted = _forward_backward(x, W, y, margin, 16.0, backend=backend, reduction=reduction, row_weight=keep)
    ignored = _forward_backward(x, W, torch.where(keep > 0, y, torch.full_like(y, -100)), margin, 16.0,
                                backend=backend, reduction=reduction)
    for name, a, b in zip(("loss", "x.grad", "W.grad"), weighted, ignored):
        assert_close_to_oracle(a, b, tol=1e-14, name=name)


@pytest.mark.parametrize("backend", WEIGHT_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_zero_weights_give_zero_loss_and_gradients(reduction, backend):
    margin, _, x, W, y = _inputs("cosface")
    loss, gx, gW = _forward_backward(x, W, y, margin, 16.0, backend=backend, reduction=reduction,
                                     row_weight=torch.zeros(B, dtype=torch.float64))
    assert bool((loss == 0).all()) and not bool(gx.any()) and not bool(gW.any())


@pytest.mark.parametrize("backend", WEIGHT_BACKENDS)
def test_row_weight_also_weighs_the_margins_own_row_terms(backend):
    """MagFace's regularizer is part of each row's loss: weighted with it."""
    x, W, y = make_inputs(B, C, D, torch.float64, ignore=1)
    x = x * 20  # MagFace's norms in its [l_a, u_a] range
    w = _weights()
    weighted = mo.margin_cross_entropy(x, W, y, mo.MagFace(), 16.0, backend=backend, reduction="none", row_weight=w)
    plain = mo.margin_cross_entropy(x, W, y, mo.MagFace(), 16.0, backend=backend, reduction="none")
    assert_close_to_oracle(weighted, torch.where(y != -100, w * plain, torch.zeros_like(plain)), tol=1e-14,
                           name="loss")


def test_row_weight_is_a_constant():
    margin, _, x, W, y = _inputs("cosface")
    w = _weights().requires_grad_()
    loss = mo.margin_cross_entropy(x.requires_grad_(), W, y, margin, 16.0, row_weight=w)
    loss.backward()
    assert w.grad is None and x.grad is not None
