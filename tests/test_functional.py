"""``margin_cross_entropy``: the torch backend against the float64 reference, peers, edge cases, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import marginops as mo

from .conftest import assert_close_to_oracle, check_against_reference, make_inputs, run

B, C, D = 13, 37, 8  # C = 37 is prime: no chunk size below it divides it

#: Margins as factories of the batch size (per-row margins need it).
MARGINS = {
    "none": lambda n: None,
    "nomargin": lambda n: mo.NoMargin(),
    "cosface": lambda n: mo.CosFace(0.35),
    "arcface": lambda n: mo.ArcFace(0.5),
    "arcface-easy": lambda n: mo.ArcFace(0.5, easy_margin=True),
    "arcface-st": lambda n: mo.ArcFace(0.5, gradient="straight_through"),
    "sphereface": lambda n: mo.SphereFace(4),
    "simpler": lambda n: mo.SimplerASoftmax(3),
    "combined": lambda n: mo.CombinedMargin(0.9, 0.4, 0.15),
    "combined-st": lambda n: mo.CombinedMargin(1.2, 0.3, 0.1, gradient="straight_through"),
    "callable": lambda n: (lambda t: t - 0.2 * t * t - 0.1),
    "per-row-cosface": lambda n: mo.CosFace(torch.linspace(0.0, 0.6, n)),
    "per-row-arcface": lambda n: mo.ArcFace(torch.linspace(0.1, 2.5, n, dtype=torch.float64)),
    "per-row-sphereface": lambda n: mo.SphereFace(torch.arange(n) % 4 + 1),
    "per-row-combined": lambda n: mo.CombinedMargin(torch.linspace(0.8, 1.4, n), 0.3, torch.linspace(0, 0.3, n)),
}
#: chunk_size=5 never divides C = 37 (ragged last tile). With memory_budget=600 bytes no 13-row block
#: over all classes fits, so the recompute strategy runs, still with 5-class tiles.
STRATEGIES = {
    "fused": dict(chunk_size=5),
    "recompute": dict(chunk_size=5, memory_budget=600),
    "recompute-1": dict(memory_budget=1),  # one class per tile
}
REDUCTIONS = ("mean", "sum", "none")


def _scale(normalize: bool) -> float:
    return 64.0 if normalize else 1.5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("strategy", ["fused", "recompute"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("margin", MARGINS)
def test_matches_reference(margin, reduction, normalize, strategy, dtype):
    x, W, y = make_inputs(B, C, D, dtype, ignore=2)
    check_against_reference(x, W, y, MARGINS[margin](B), _scale(normalize), normalize=normalize,
                            reduction=reduction, **STRATEGIES[strategy])


@pytest.mark.parametrize("label_smoothing", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("margin", ["none", "arcface", "sphereface", "per-row-cosface"])
def test_label_smoothing_matches_reference(margin, reduction, normalize, strategy, label_smoothing):
    x, W, y = make_inputs(B, C, D, ignore=3)
    check_against_reference(x, W, y, MARGINS[margin](B), _scale(normalize), normalize=normalize,
                            reduction=reduction, label_smoothing=label_smoothing, **STRATEGIES[strategy])


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ignore_index_may_be_a_valid_class(reduction, strategy):
    x, W, y = make_inputs(B, C, D)
    y[[2, 5, 6]] = 3  # rows labelled 3 are ignored; class 3 still competes in every other row
    ours = check_against_reference(x, W, y, mo.ArcFace(0.5), reduction=reduction, ignore_index=3,
                                   **STRATEGIES[strategy])
    assert torch.equal(ours.x_grad[[2, 5, 6]], torch.zeros(3, D, dtype=x.dtype))


@pytest.mark.parametrize("margin", [m for m in MARGINS if not m.endswith("-st")])  # st: not the true derivative
@pytest.mark.parametrize("reduction, strategy", [("mean", "fused"), ("sum", "recompute-1"), ("none", "recompute-1"),
                                                 ("sum", "fused")])
def test_gradcheck_torch_backend(margin, reduction, strategy):
    # gradcheck backpropagates twice through one graph: after a fused forward the second
    # backward recomputes, so the two agree to rounding rather than bitwise (nondet_tol).
    x, W, y = make_inputs(4, 7, 3, ignore=1)
    x.requires_grad_()
    W.requires_grad_()
    psi = MARGINS[margin](4)
    kwargs = dict(backend="torch", reduction=reduction, label_smoothing=0.1, **STRATEGIES[strategy])
    assert torch.autograd.gradcheck(lambda x, W: mo.margin_cross_entropy(x, W, y, psi, 3.0, **kwargs), (x, W),
                                    nondet_tol=1e-12)


# -- hypothesis: random shapes, labels, margins and options -------------------------------------

def _per_row(draw, n, lo, hi, integer=False):
    elems = st.integers(int(lo), int(hi)) if integer else st.floats(lo, hi)
    return torch.tensor(draw(st.lists(elems, min_size=n, max_size=n)), dtype=torch.float64)


@st.composite
def problems(draw):
    b = draw(st.integers(1, 24))
    c = draw(st.integers(1, 40))
    d = draw(st.integers(1, 12))
    labels = draw(st.lists(st.one_of(st.integers(0, c - 1), st.just(-100)), min_size=b, max_size=b))
    kind = draw(st.sampled_from(["none", "cosface", "arcface", "arcface-easy", "sphereface", "simpler",
                                 "combined", "combined-st"]))
    per_row = draw(st.booleans())
    if kind == "none":
        margin = None
    elif kind == "cosface":
        margin = mo.CosFace(_per_row(draw, b, 0, 1) if per_row else draw(st.floats(0, 1)))
    elif kind.startswith("arcface"):
        margin = mo.ArcFace(_per_row(draw, b, 0, 3) if per_row else draw(st.floats(0, 3)),
                            easy_margin=kind == "arcface-easy")
    elif kind in ("sphereface", "simpler"):
        cls = mo.SphereFace if kind == "sphereface" else mo.SimplerASoftmax
        margin = cls(_per_row(draw, b, 1, 5, integer=True) if per_row else draw(st.integers(1, 5)))
    else:
        margin = mo.CombinedMargin(
            _per_row(draw, b, 0.5, 1.5) if per_row else draw(st.floats(0.5, 1.5)),
            draw(st.floats(0, 1)), _per_row(draw, b, 0, 0.5) if per_row else draw(st.floats(0, 0.5)),
            gradient="straight_through" if kind == "combined-st" else "exact")
    options = dict(
        normalize=draw(st.booleans()),
        reduction=draw(st.sampled_from(REDUCTIONS)),
        label_smoothing=draw(st.sampled_from([0.0, 0.0, 0.1, 1.0]) | st.floats(0, 1)),
        chunk_size=draw(st.none() | st.integers(1, 12)),
        memory_budget=draw(st.sampled_from([None, 1, 600, 4096])),
    )
    return b, c, d, torch.tensor(labels, dtype=torch.int64), margin, options, draw(st.integers(0, 2**32 - 1))


@settings(max_examples=100)
@given(problems())
def test_random_problems_match_reference(problem):
    check_random_problem(problem)


def check_random_problem(problem, **kwargs) -> None:
    """One drawn :func:`problems` case against the float64 reference (``kwargs``: e.g. the backend)."""
    b, c, d, y, margin, options, seed = problem
    x, W, _ = make_inputs(b, c, d, generator=torch.Generator().manual_seed(seed))
    scale = 30.0 if options["normalize"] else 1.0
    check_against_reference(x, W, y, margin, scale, **options, **kwargs)


# -- peers: plain mode is ordinary softmax cross-entropy ----------------------------------------

PEERS = {"cross_entropy": lambda x, W, y, **kw: F.cross_entropy(x @ W.t(), y, **kw)}
if hasattr(F, "linear_cross_entropy"):  # torch >= 2.13
    PEERS["linear_cross_entropy"] = lambda x, W, y, **kw: F.linear_cross_entropy(x, W, y, **kw)


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_plain_mode_equals_pytorch_cross_entropy(reduction, strategy, label_smoothing, dtype, peer):
    x, W, y = make_inputs(B, C, D, dtype, ignore=3)
    ours = run(x, W, y, None, 1.0, normalize=False, reduction=reduction, label_smoothing=label_smoothing,
               backend="torch", **STRATEGIES[strategy])

    def peer_run(dt):
        xl, Wl = x.detach().to(dt).requires_grad_(), W.detach().to(dt).requires_grad_()
        loss = PEERS[peer](xl, Wl, y, reduction=reduction, ignore_index=-100, label_smoothing=label_smoothing)
        loss.sum().backward()
        return loss.detach(), xl.grad, Wl.grad

    ref, same = peer_run(torch.float64), peer_run(dtype)
    for name, o, r, s in zip(("loss", "x.grad", "W.grad"), (ours.loss, ours.x_grad, ours.W_grad), ref, same):
        assert_close_to_oracle(o, r, None if dtype == torch.float64 else s, name=name)


# -- edge cases ----------------------------------------------------------------------------------

@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("batch", ["empty", "all-ignored"])
def test_empty_and_all_ignored_batches_give_zero_loss_and_grads(batch, reduction, strategy, label_smoothing):
    n = 0 if batch == "empty" else 5
    x, W, _ = make_inputs(n, C, D)
    y = torch.full((n,), -100, dtype=torch.int64)
    out = run(x, W, y, mo.ArcFace(0.5), backend="torch", reduction=reduction, label_smoothing=label_smoothing,
              **STRATEGIES[strategy])
    assert out.loss.shape == ((n,) if reduction == "none" else ())
    assert bool(torch.isfinite(out.loss).all()) and bool((out.loss == 0).all())
    assert out.x_grad is not None and out.W_grad is not None, "x and W require grad: both must get a gradient"
    assert torch.equal(out.x_grad, torch.zeros(n, D, dtype=x.dtype))
    assert torch.equal(out.W_grad, torch.zeros(C, D, dtype=W.dtype))
    assert out.stats.prediction.shape == (n,)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("margin", ["none", "cosface", "arcface", "sphereface", "combined"])
def test_zero_norm_rows(margin, reduction, strategy, dtype):
    x, W, y = make_inputs(B, C, D, dtype, ignore=1)
    y[4] = 3
    x[1] = 0.0  # a zero embedding
    W[3] = 0.0  # a zero class row that is also row 4's target
    W[10] = 0.0
    out = check_against_reference(x, W, y, MARGINS[margin](B), reduction=reduction, label_smoothing=0.1,
                                  **STRATEGIES[strategy])
    assert all(bool(torch.isfinite(t).all()) for t in (out.loss, out.x_grad, out.W_grad))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_non_contiguous_inputs(reduction, strategy):
    x, W, y = make_inputs(B, C, D, ignore=2)
    x_base = torch.zeros(B, 2 * D, dtype=x.dtype)
    x_base[:, ::2] = x
    W_base = W.t().contiguous()  # (D, C); W_base.t() is W as a transposed view
    y_base = torch.stack([y, torch.zeros_like(y)], 1).reshape(-1)
    x_base.requires_grad_()
    W_base.requires_grad_()
    xv, Wv, yv = x_base[:, ::2], W_base.t(), y_base[::2]
    assert not xv.is_contiguous() and not Wv.is_contiguous() and not yv.is_contiguous()
    loss = mo.margin_cross_entropy(xv, Wv, yv, mo.ArcFace(0.5), reduction=reduction, backend="torch",
                                   **STRATEGIES[strategy])
    loss.sum().backward()
    ref = run(x, W, y, mo.ArcFace(0.5), backend="reference", reduction=reduction)
    assert_close_to_oracle(loss.detach(), ref.loss, name="loss")
    assert_close_to_oracle(x_base.grad[:, ::2], ref.x_grad, name="x.grad")
    assert torch.equal(x_base.grad[:, 1::2], torch.zeros(B, D, dtype=x.dtype))
    assert_close_to_oracle(W_base.grad.t(), ref.W_grad, name="W.grad")
    # strided leaves (no view op in the graph) as well
    check_against_reference(xv.detach(), Wv.detach(), yv, mo.ArcFace(0.5), reduction=reduction,
                            **STRATEGIES[strategy])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("margin", ["none", "cosface", "arcface"])
@pytest.mark.parametrize("scale", [1e3, 1e-3])
def test_extreme_scales(scale, margin, strategy, dtype):
    x, W, y = make_inputs(B, C, D, dtype, ignore=1)
    out = check_against_reference(x, W, y, MARGINS[margin](B), scale, label_smoothing=0.1, **STRATEGIES[strategy])
    assert all(bool(torch.isfinite(t).all()) for t in (out.loss, out.x_grad, out.W_grad))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strategy", ["fused", "recompute"])
@pytest.mark.parametrize("margin", ["cosface", "arcface", "arcface-easy", "sphereface", "simpler", "combined",
                                    "per-row-arcface"])
def test_cosines_of_exactly_plus_minus_one(margin, strategy, dtype):
    x, W, y = make_inputs(B, C, D, dtype)
    x[0] = 2.5 * W[y[0]]  # t = 1 (up to rounding of the norms)
    x[2] = W[y[2]]
    x[3] = -W[y[3]]  # t = -1
    x[4] = -3.0 * W[y[4]]
    # In float32, t lands within a few ulps of +-1, where acos turns an ulp into ~sqrt(ulp) = 3e-4 of
    # angle, and the exact derivative sits at its cap (~1000, marginops.margins.SIN2_FLOOR): PyTorch
    # and we both carry errors ~1000x the usual there, which a dozen-ulp tolerance cannot absorb.
    tol = 1e-3 if dtype == torch.float32 and margin.startswith(("arcface", "combined")) else None
    out = check_against_reference(x, W, y, MARGINS[margin](B), scale=30.0, tol=tol, **STRATEGIES[strategy])
    assert all(bool(torch.isfinite(t).all()) for t in (out.loss, out.x_grad, out.W_grad))
    assert out.stats.target_cos[[0, 2]].double().sub(1).abs().max() < 1e-2
    assert out.stats.target_cos[[3, 4]].double().add(1).abs().max() < 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("margin", ["none", "cosface", "arcface", "sphereface"])
def test_half_precision_inputs_relative_oracle(margin, reduction, strategy, dtype):
    x, W, y = make_inputs(16, 101, 32, dtype, ignore=2)
    opts = dict(STRATEGIES[strategy], chunk_size=16)
    check_against_reference(x, W, y, MARGINS[margin](16), reduction=reduction, **opts)


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_inputs_give_a_float32_loss(dtype, reduction, backend):
    """The loss is not rounded to 16 bits: float32, within float32 rounding of the float64 loss of the
    same (rounded) inputs, where a 16-bit loss would be off by about 2**-9 of itself."""
    x, W, y = make_inputs(64, 300, 32, dtype, ignore=3)
    loss = mo.margin_cross_entropy(x, W, y, mo.ArcFace(0.5), 30.0, backend=backend, reduction=reduction,
                                   label_smoothing=0.1)
    ref = mo.margin_cross_entropy(x.double(), W.double(), y, mo.ArcFace(0.5), 30.0, backend="reference",
                                  reduction=reduction, label_smoothing=0.1)
    assert loss.dtype == torch.float32
    assert_close_to_oracle(loss, ref, tol=1e-5, name="loss")
    rounded = (ref.to(dtype).double() - ref).abs().max() / ref.abs().max()
    assert rounded > 100 * ((loss.double() - ref).abs().max() / ref.abs().max()), "the test would not see it"


# -- autograd behaviour ------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_retain_graph_second_backward_gives_same_grads(reduction, strategy):
    x, W, y = make_inputs(B, C, D, ignore=2)
    x.requires_grad_()
    W.requires_grad_()
    loss = mo.margin_cross_entropy(x, W, y, mo.ArcFace(0.5), backend="torch", reduction=reduction,
                                   label_smoothing=0.1, **STRATEGIES[strategy]).sum()
    first = torch.autograd.grad(loss, (x, W), retain_graph=True)
    second = torch.autograd.grad(loss, (x, W), retain_graph=True)
    loss.backward(retain_graph=True)
    loss.backward()  # accumulates: twice the gradient
    ref = run(x, W, y, mo.ArcFace(0.5), backend="reference", reduction=reduction, label_smoothing=0.1)
    for name, a, b, acc, r in (("x", first[0], second[0], x.grad, ref.x_grad),
                               ("W", first[1], second[1], W.grad, ref.W_grad)):
        assert_close_to_oracle(a, r, name=f"first {name}.grad")
        assert_close_to_oracle(b, r, name=f"second {name}.grad")
        assert_close_to_oracle(acc, 2 * r, name=f"accumulated {name}.grad")


@pytest.mark.parametrize("upstream", [0.0, -2.5])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_upstream_gradient_scales_the_result(strategy, upstream):
    x, W, y = make_inputs(B, C, D, ignore=2)
    x.requires_grad_()
    W.requires_grad_()
    loss = mo.margin_cross_entropy(x, W, y, mo.CosFace(0.35), backend="torch", **STRATEGIES[strategy])
    gx, gW = torch.autograd.grad(loss, (x, W), grad_outputs=torch.tensor(upstream, dtype=x.dtype))
    ref = run(x, W, y, mo.CosFace(0.35), backend="reference")
    assert_close_to_oracle(gx, upstream * ref.x_grad, name="x.grad")
    assert_close_to_oracle(gW, upstream * ref.W_grad, name="W.grad")


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_forward_without_autograd(reduction, strategy, mode):
    x, W, y = make_inputs(B, C, D, ignore=2)
    x.requires_grad_()
    W.requires_grad_()
    with mode():
        loss, stats = mo.margin_cross_entropy(x, W, y, mo.ArcFace(0.5), backend="torch", reduction=reduction,
                                              return_stats=True, **STRATEGIES[strategy])
    assert not loss.requires_grad
    ref, ref_stats = mo.margin_cross_entropy(x.detach(), W.detach(), y, mo.ArcFace(0.5), backend="reference",
                                             reduction=reduction, return_stats=True)
    assert_close_to_oracle(loss, ref, name="loss")
    assert_close_to_oracle(stats.lse, ref_stats.lse, name="lse")
    assert torch.equal(stats.prediction, ref_stats.prediction)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("frozen", ["x", "W", "both"])
def test_frozen_inputs(frozen, reduction, strategy, dtype):
    x, W, y = make_inputs(B, C, D, dtype, ignore=2)
    out = check_against_reference(x, W, y, mo.ArcFace(0.5), grad_x=frozen == "W", grad_W=frozen == "x",
                                  reduction=reduction, label_smoothing=0.1, **STRATEGIES[strategy])
    assert (out.x_grad is None) == (frozen in ("x", "both"))
    assert (out.W_grad is None) == (frozen in ("W", "both"))


#: margins with parameters that require grad: (name, number of params, factory from the param tensors)
TRAINABLE = {
    "cosface-per-row": (1, lambda p: mo.CosFace(p[0])),
    "cosface-0d": (1, lambda p: mo.CosFace(p[0][0])),
    "arcface-per-row": (1, lambda p: mo.ArcFace(p[0])),
    "combined-per-row": (3, lambda p: mo.CombinedMargin(p[0] + 0.8, p[1], p[2])),
    "callable": (1, lambda p: (lambda t: t * torch.cos(p[0]) - p[0] ** 2)),
}


@pytest.mark.parametrize("inputs_frozen", [False, True])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("margin", TRAINABLE)
def test_margin_parameters_receive_reference_gradient(margin, reduction, strategy, inputs_frozen):
    x, W, y = make_inputs(B, C, D, ignore=2)
    n_params, factory = TRAINABLE[margin]
    grads = {}
    for backend in ("torch", "reference"):
        params = [torch.linspace(0.1, 0.5, B, dtype=torch.float64).roll(k).requires_grad_() for k in range(n_params)]
        opts = STRATEGIES[strategy] if backend == "torch" else {}
        run(x, W, y, factory(params), backend=backend, reduction=reduction, grad_x=not inputs_frozen,
            grad_W=not inputs_frozen, **opts)
        grads[backend] = [p.grad for p in params]
    for k, (ours, ref) in enumerate(zip(grads["torch"], grads["reference"])):
        assert ours is not None, f"margin parameter {k} got no gradient"
        assert_close_to_oracle(ours, ref, name=f"margin parameter {k} grad")


#: margins whose output does not depend on t through autograd
T_INDEPENDENT = {
    "constant": lambda: (lambda t: torch.full_like(t, 0.5)),
    "detached-t-trainable-m": lambda: (
        lambda t, m=torch.tensor(0.3, dtype=torch.float64, requires_grad=True): t.detach() - m),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("psi", T_INDEPENDENT)
def test_margin_that_ignores_t_still_trains_x_and_W(psi, reduction, strategy):
    # psi may be any differentiable function of t, a constant included: the non-target
    # classes still give x and W their usual gradients.
    x, W, y = make_inputs(B, C, D, ignore=2)
    check_against_reference(x, W, y, T_INDEPENDENT[psi](), reduction=reduction, **STRATEGIES[strategy])


def test_labels_of_any_integer_dtype_and_validate_labels_flag():
    x, W, y = make_inputs(B, C, D, ignore=2)
    base = run(x, W, y, mo.ArcFace(0.5))
    for labels, kw in ((y.int(), {}), (y.short(), {}), (y, {"validate_labels": False})):
        out = run(x, W, labels, mo.ArcFace(0.5), **kw)
        assert torch.equal(out.loss, base.loss) and torch.equal(out.x_grad, base.x_grad)


def test_auto_backend_on_cpu_is_native_when_built_else_torch(monkeypatch):
    from marginops.backends import native

    cpu = "native" if native.available() else "torch"
    assert mo.resolve_backend("auto", "cpu") == cpu
    assert mo.resolve_backend("auto", torch.device("cpu")) == cpu
    assert mo.resolve_backend("reference") == "reference"
    assert mo.resolve_backend("torch") == "torch"
    assert set(mo.BACKEND_NAMES) >= {"auto", "torch", "native", "reference"}
    x, W, y = make_inputs(B, C, D)
    assert torch.equal(run(x, W, y, backend="auto").loss, run(x, W, y, backend=cpu).loss)
    monkeypatch.setenv(native.ENV, "0")
    assert mo.resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(ValueError, match="backend"):
        mo.resolve_backend("cuda")


def test_stats_are_detached_and_consistent():
    x, W, y = make_inputs(B, C, D, ignore=2)
    x.requires_grad_()
    loss, stats = mo.margin_cross_entropy(x, W, y, mo.CosFace(0.35), 30.0, reduction="none", return_stats=True)
    assert isinstance(stats, mo.MarginStats)
    assert not any(t.requires_grad for t in stats)
    valid = y != -100
    # per-row loss = lse - target_logit, and target_logit = s * (t - m)
    assert_close_to_oracle(loss.detach()[valid], (stats.lse - stats.target_logit)[valid], name="lse - z")
    assert_close_to_oracle(stats.target_logit, 30.0 * (stats.target_cos - 0.35), name="target_logit")


# -- input validation --------------------------------------------------------------------------

def _bad_labels_first_index():
    y = torch.arange(B) % C
    y[3], y[5] = C + 5, -7
    return y


ERRORS = [
    # (id, overrides of the valid call, exception, regex the message must match)
    ("label-too-large", dict(labels=torch.full((B,), C)), ValueError, rf"labels\[0\] = {C}\b"),
    ("label-negative", dict(labels=torch.tensor([0] * 4 + [-1] + [0] * (B - 5))), ValueError, r"labels\[4\] = -1\b"),
    ("label-first-bad", dict(labels=_bad_labels_first_index()), ValueError, rf"labels\[3\] = {C + 5}\b"),
    ("label-ignore-other", dict(labels=torch.full((B,), -100), ignore_index=-1), ValueError, r"labels\[0\] = -100"),
    ("labels-float", dict(labels=torch.zeros(B)), TypeError, "labels"),
    ("labels-bool", dict(labels=torch.zeros(B, dtype=torch.bool)), TypeError, "labels"),
    ("labels-2d", dict(labels=torch.zeros(B, 1, dtype=torch.int64)), ValueError, "labels"),
    ("labels-list", dict(labels=[0] * B), TypeError, "labels"),
    ("embeddings-1d", dict(embeddings=torch.randn(D, dtype=torch.float64)), ValueError, "embeddings"),
    ("embeddings-3d", dict(embeddings=torch.randn(B, D, 1, dtype=torch.float64)), ValueError, "embeddings"),
    ("embeddings-int", dict(embeddings=torch.ones(B, D, dtype=torch.int64),
                            weight=torch.ones(C, D, dtype=torch.int64)), TypeError, "embeddings"),
    ("embeddings-numpy", dict(embeddings=torch.randn(B, D, dtype=torch.float64).numpy()), TypeError, "embeddings"),
    ("embeddings-no-features", dict(embeddings=torch.randn(B, 0, dtype=torch.float64),
                                    weight=torch.randn(C, 0, dtype=torch.float64)), ValueError, "embeddings"),
    ("weight-1d", dict(weight=torch.randn(C, dtype=torch.float64)), ValueError, "weight"),
    ("weight-3d", dict(weight=torch.randn(C, D, 2, dtype=torch.float64)), ValueError, "weight"),
    ("weight-no-classes", dict(weight=torch.randn(0, D, dtype=torch.float64), labels=torch.full((B,), -100)),
     ValueError, "weight"),
    ("batch-mismatch", dict(labels=torch.zeros(B + 1, dtype=torch.int64)), ValueError, "labels"),
    ("feature-mismatch", dict(weight=torch.randn(C, D + 1, dtype=torch.float64)), ValueError, "weight"),
    ("transposed-weight", dict(weight=torch.randn(D, C, dtype=torch.float64)), ValueError, "weight"),
    ("weight-int", dict(weight=torch.ones(C, D, dtype=torch.int64)), TypeError, "weight"),
    ("weight-complex", dict(weight=torch.ones(C, D, dtype=torch.complex64)), TypeError, "weight"),
    ("embeddings-complex", dict(embeddings=torch.ones(B, D, dtype=torch.complex128)), TypeError, "embeddings"),
    ("validate-labels-str", dict(validate_labels="sync"), ValueError, "validate_labels"),
    ("scale-nan", dict(scale=float("nan")), ValueError, "scale"),
    ("scale-inf", dict(scale=float("inf")), ValueError, "scale"),
    ("scale-zero", dict(scale=0.0), ValueError, "scale"),
    ("scale-negative", dict(scale=-1.0), ValueError, "scale"),
    ("scale-str", dict(scale="64"), TypeError, "scale"),
    ("scale-bool", dict(scale=True), TypeError, "scale"),
    ("scale-tensor-length", dict(scale=torch.tensor([64.0, 32.0])), ValueError, r"scale must be a 0-d tensor or"),
    ("scale-tensor-2d", dict(scale=torch.full((B, 1), 64.0)), ValueError, "scale"),
    ("scale-tensor-int", dict(scale=torch.full((B,), 64)), TypeError, "scale"),
    ("scale-tensor-negative", dict(scale=torch.full((B,), 64.0).index_fill(0, torch.tensor([2]), -1.0)),
     ValueError, r"scale\[2\] = -1.0"),
    ("scale-tensor-zero", dict(scale=torch.full((B,), 64.0).index_fill(0, torch.tensor([0]), 0.0)),
     ValueError, r"scale\[0\] = 0.0.*positive and finite"),
    ("scale-tensor-nan", dict(scale=torch.full((B,), 64.0).index_fill(0, torch.tensor([B - 1]), float("nan"))),
     ValueError, rf"scale\[{B - 1}\] = nan"),
    ("row-weight-negative", dict(row_weight=torch.ones(B).index_fill(0, torch.tensor([1]), -0.5)), ValueError,
     r"row_weight\[1\] = -0.5.*non-negative and finite"),
    ("row-weight-inf", dict(row_weight=torch.ones(B).index_fill(0, torch.tensor([3]), float("inf"))), ValueError,
     r"row_weight\[3\] = inf"),
    ("row-weight-length", dict(row_weight=torch.ones(B + 1)), ValueError, rf"row_weight must be \({B},\)"),
    ("row-weight-int", dict(row_weight=torch.ones(B, dtype=torch.int64)), TypeError, "row_weight"),
    ("row-weight-list", dict(row_weight=[1.0] * B), TypeError, "row_weight"),
    ("reduction-typo", dict(reduction="avg"), ValueError, "reduction"),
    ("reduction-case", dict(reduction="MEAN"), ValueError, "reduction"),
    ("reduction-none-object", dict(reduction=None), ValueError, "reduction"),
    ("smoothing-negative", dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    ("smoothing-above-one", dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    ("smoothing-nan", dict(label_smoothing=float("nan")), ValueError, "label_smoothing"),
    ("smoothing-str", dict(label_smoothing="0.1"), TypeError, "label_smoothing"),
    ("backend-unknown", dict(backend="cuda"), ValueError, "backend"),
    ("backend-none", dict(backend=None), ValueError, "backend"),
    ("chunk-zero", dict(chunk_size=0), ValueError, "chunk_size"),
    ("chunk-negative", dict(chunk_size=-4), ValueError, "chunk_size"),
    ("chunk-float", dict(chunk_size=2.5), TypeError, "chunk_size"),
    ("chunk-bool", dict(chunk_size=True), TypeError, "chunk_size"),
    ("budget-zero", dict(memory_budget=0), ValueError, "memory_budget"),
    ("budget-negative", dict(memory_budget=-1), ValueError, "memory_budget"),
    ("budget-float", dict(memory_budget=1e6), TypeError, "memory_budget"),
    ("strategy-unknown", dict(strategy="fused"), ValueError, "strategy"),
    ("gradient-filter-zero", dict(gradient_filter=0.0), ValueError, "gradient_filter"),
    ("gradient-filter-above-one", dict(gradient_filter=1.5), ValueError, "gradient_filter"),
    ("gradient-filter-str", dict(gradient_filter="high"), TypeError, "gradient_filter"),
    ("strategy-none", dict(strategy=None), ValueError, "strategy"),
    ("workspace-per-row", dict(strategy="workspace", reduction="none"), ValueError, "strategy='workspace'"),
    ("ignore-index-float", dict(ignore_index=-100.0), TypeError, "ignore_index"),
    ("normalize-str", dict(normalize="yes"), TypeError, "normalize"),
    ("return-stats-int", dict(return_stats=1), TypeError, "return_stats"),
    ("margin-not-callable", dict(margin=0.35), TypeError, "margin"),
    ("margin-wrong-shape", dict(margin=lambda t: t[:1]), ValueError, "margin"),
    ("margin-scalar-output", dict(margin=lambda t: t.sum()), ValueError, "margin"),
    ("margin-2d-output", dict(margin=lambda t: t.unsqueeze(1)), ValueError, "margin"),
    ("margin-returns-float", dict(margin=lambda t: 0.5), TypeError, "margin"),
    ("margin-per-row-length", dict(margin=mo.CosFace(torch.full((B + 2,), 0.3))), ValueError, r"\bm\b"),
]


@pytest.mark.parametrize("backend", ["torch", "native", "reference"])
@pytest.mark.parametrize("overrides, exc, pattern", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_invalid_inputs_raise_naming_the_argument(overrides, exc, pattern, backend):
    x, W, y = make_inputs(B, C, D)
    call = dict(embeddings=x, weight=W, labels=y, margin=mo.ArcFace(0.5), scale=64.0, backend=backend)
    call.update(overrides)
    args = [call.pop(k) for k in ("embeddings", "weight", "labels", "margin", "scale")]
    with pytest.raises(exc, match=pattern):
        mo.margin_cross_entropy(*args, **call)


def test_label_error_message_names_range_and_ignore_index():
    x, W, _ = make_inputs(B, C, D)
    with pytest.raises(ValueError, match=rf"\[0, {C}\).*ignore_index = -100"):
        mo.margin_cross_entropy(x, W, torch.full((B,), C + 1))
