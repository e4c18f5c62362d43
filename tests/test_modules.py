"""``MarginHead``: the module wraps the functional loss around its own weight."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import marginops as mo

from .conftest import assert_close_to_oracle, make_inputs

B, C, D = 9, 23, 6


@pytest.mark.parametrize("options", [
    {},
    {"reduction": "none"},
    {"reduction": "sum", "label_smoothing": 0.2, "chunk_size": 5},
    {"normalize": False, "memory_budget": 1},
    {"ignore_index": 3, "backend": "reference"},
])
@pytest.mark.parametrize("margin", [None, mo.ArcFace(0.5), mo.CosFace(0.35), mo.SphereFace(3)], ids=repr)
def test_forward_and_grads_equal_functional_with_its_weight(margin, options):
    head = mo.MarginHead(D, C, margin=margin, scale=30.0, dtype=torch.float64, **options)
    x, _, y = make_inputs(B, C, D, ignore=2, ignore_index=options.get("ignore_index", -100))
    y[4] = 3
    x1 = x.clone().requires_grad_()
    loss = head(x1, y)
    loss.sum().backward()
    x2 = x.clone().requires_grad_()
    W2 = head.weight.detach().clone().requires_grad_()
    expected = mo.margin_cross_entropy(x2, W2, y, margin, 30.0, **options)
    expected.sum().backward()
    assert loss.shape == expected.shape
    assert_close_to_oracle(loss.detach(), expected.detach(), name="loss")
    assert_close_to_oracle(x1.grad, x2.grad, name="x.grad")
    assert_close_to_oracle(head.weight.grad, W2.grad, name="weight.grad")


def test_return_stats_option_passes_through():
    head = mo.MarginHead(D, C, margin=mo.CosFace(0.35), return_stats=True)
    x, _, y = make_inputs(B, C, D, torch.float32)
    loss, stats = head(x, y)
    assert isinstance(stats, mo.MarginStats) and stats.prediction.shape == (B,)
    assert loss.shape == ()


def test_options_are_validated_at_call_time_by_the_functional():
    head = mo.MarginHead(D, C, reduction="avg")
    x, _, y = make_inputs(B, C, D, torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        head(x, y)


@pytest.mark.parametrize("bad", ["reductoin", "bias", "eps"])
def test_unknown_option_is_a_type_error_naming_it(bad):
    with pytest.raises(TypeError, match=bad):
        mo.MarginHead(D, C, **{bad: "mean"})


@pytest.mark.parametrize("kwargs, name", [
    ({"in_features": 0, "num_classes": C}, "in_features"),
    ({"in_features": D, "num_classes": 0}, "num_classes"),
    ({"in_features": 2.5, "num_classes": C}, "in_features"),
    ({"in_features": D, "num_classes": True}, "num_classes"),
])
def test_invalid_sizes(kwargs, name):
    with pytest.raises(ValueError, match=name):
        mo.MarginHead(**kwargs)


def test_extra_repr_lists_sizes_margin_scale_and_options():
    head = mo.MarginHead(16, 100, margin=mo.ArcFace(0.5), scale=32.0, reduction="sum", label_smoothing=0.1)
    text = repr(head)
    for part in ("in_features=16", "num_classes=100", "margin=ArcFace(m=0.5", "scale=32.0", "reduction='sum'",
                 "label_smoothing=0.1"):
        assert part in text, f"{part!r} missing from {text!r}"
    assert "reduction" not in repr(mo.MarginHead(16, 100))


def test_state_dict_compatible_with_bias_free_linear():
    linear = nn.Linear(D, C, bias=False)
    head = mo.MarginHead(D, C)
    assert set(head.state_dict()) == {"weight"} and [n for n, _ in head.named_parameters()] == ["weight"]
    head.load_state_dict(linear.state_dict())  # strict: same keys and shapes
    assert torch.equal(head.weight, linear.weight)
    head2 = mo.MarginHead(D, C)
    linear.load_state_dict(head2.state_dict())
    assert torch.equal(linear.weight, head2.weight)
    with pytest.raises(RuntimeError):
        mo.MarginHead(D, C).load_state_dict(nn.Linear(D, C, bias=True).state_dict())


def test_init_normal_std_001_when_normalized():
    head = mo.MarginHead(256, 2000)  # 512k samples: std estimate within ~1e-5
    w = head.weight.detach().double()
    assert abs(float(w.mean())) < 1e-4
    assert float(w.std()) == pytest.approx(0.01, rel=0.01)
    # Gaussian, not uniform: the fraction beyond 2 sigma is ~4.55% (uniform with this std: 0%)
    assert float((w.abs() > 0.02).double().mean()) == pytest.approx(0.0455, abs=0.003)


def test_init_uniform_like_linear_when_not_normalized():
    head = mo.MarginHead(256, 2000, normalize=False)
    w = head.weight.detach().double()
    bound = 1.0 / math.sqrt(256)
    assert float(w.abs().max()) <= bound
    assert float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.01)
    head.weight.data.zero_()
    head.reset_parameters()
    assert float(head.weight.detach().abs().max()) > 0


def test_factory_kwargs_and_training_step():
    head = mo.MarginHead(D, C, margin=mo.ArcFace(0.5), dtype=torch.float64)
    assert head.weight.dtype == torch.float64 and head.weight.shape == (C, D)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    x, _, y = make_inputs(64, C, D)
    first = head(x, y).item()
    for _ in range(20):
        opt.zero_grad()
        head(x, y).backward()
        opt.step()
    assert head(x, y).item() < first


def test_head_topk_is_topk_cosine_over_its_weight():
    head = mo.MarginHead(6, 50, margin=mo.ArcFace(0.5))
    q = torch.randn(7, 6)
    values, classes = head.topk(q, 3, chunk_size=8)
    ref = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(head.weight.detach(), dim=1).t()
    top = ref.topk(3, dim=1)
    torch.testing.assert_close(values, top.values)
    assert torch.equal(classes, top.indices)
    raw = mo.MarginHead(6, 50, normalize=False, scale=1.0)
    v, c = raw.topk(q, 2)
    assert torch.equal(c, (q @ raw.weight.detach().t()).topk(2, dim=1).indices)


# -- per-call arguments ------------------------------------------------------------------------------------


def test_forward_takes_per_row_scales_and_weights():
    head = mo.MarginHead(5, 11, margin=mo.CosFace(0.3), scale=10.0, dtype=torch.float64, backend="reference")
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 3, 3, -100, 10, 7])
    s, w = torch.linspace(4.0, 24.0, 6, dtype=torch.float64), torch.tensor([0.5, 2.5, 0.0, 7.0, 1.0, 0.25])
    got = head(x, y, scale=s, row_weight=w)
    ref = mo.margin_cross_entropy(x, head.weight, y, mo.CosFace(0.3), s, row_weight=w, backend="reference")
    assert torch.equal(got, ref)
    assert "row_weight" not in mo.modules._OPTIONS  # a per-call argument, not a head option


def test_adacos_head_refuses_a_per_row_scale():
    head = mo.MarginHead(5, 11, scale=mo.AdaCos(11), backend="reference")
    x, y = torch.randn(6, 5), torch.arange(6)
    with pytest.raises(ValueError, match="AdaCos"):
        head(x, y, scale=torch.full((6,), 10.0))
    with pytest.raises(TypeError, match="per-row"):
        mo.MarginHead(5, 11, backend="reference")(x, y, scale=30.0)
