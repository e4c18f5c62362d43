"""MarginScheduler: values against independent formulas, its effect on the margin and the loss, resume, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import marginops as mo
from marginops.margins.schedule import MarginScheduler

from .test_margins import expected_arcface, expected_combined


# -- independent formulas ---------------------------------------------------------------------------

def expected_value(n, start, end, b, e, mode):
    """Written from the docstring: hold ``start`` through ``b``, ``end`` from ``e`` on, ramp in between."""
    if n >= e:
        return end
    if n <= b:
        return start
    p = (n - b) / (e - b)
    # wespeaker's 1 - (1e-3)**p, divided by its value at p = 1 (0.999) so it ends exactly at `end`.
    r = p if mode == "linear" else (1.0 - 1000.0 ** (-p)) / (1.0 - 1e-3)
    return start + (end - start) * r


def values(sched, n):
    """``sched.value`` followed by the values returned by ``n`` calls of ``step``."""
    return [sched.value] + [sched.step() for _ in range(n)]


T = torch.linspace(-0.99, 0.99, 41, dtype=torch.float64)


# -- values -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["linear", "exponential"])
@pytest.mark.parametrize("start,end", [(0.0, 0.35), (0.1, 0.5), (0.5, 0.2)])
def test_values_match_formula(mode, start, end):
    b, e = 3, 13
    sched = MarginScheduler(mo.CosFace(0.35), start=start, end=end, warmup_begin=b, warmup_end=e, mode=mode)
    got = values(sched, 20)
    want = [expected_value(n, start, end, b, e, mode) for n in range(21)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-14)
    assert got[: b + 1] == [start] * (b + 1)  # hold: exactly start through warmup_begin
    assert got[e:] == [end] * (21 - e)  # exactly end from warmup_end on
    assert [sched.get_value(n) for n in range(21)] == got


def test_known_points():
    lin = MarginScheduler(mo.CosFace(), start=0.0, end=0.4, warmup_begin=10, warmup_end=20)
    assert lin.get_value(15) == pytest.approx(0.2, abs=1e-15)
    assert lin.get_value(12) == pytest.approx(0.08, abs=1e-15)
    exp = MarginScheduler(mo.CosFace(), start=0.0, end=0.4, warmup_begin=10, warmup_end=20, mode="exponential")
    assert exp.get_value(15) == pytest.approx(0.4 * (1 - 1000 ** -0.5) / 0.999, abs=1e-15)
    assert exp.get_value(15) > lin.get_value(15)  # exponential rises faster early on
    for s in (lin, exp):
        assert s.get_value(0) == 0.0 and s.get_value(10) == 0.0 and s.get_value(20) == 0.4
        assert s.get_value(10**9) == 0.4 and s.current_step == 0  # get_value has no side effects


@pytest.mark.parametrize("mode", ["linear", "exponential"])
@pytest.mark.parametrize("start,end", [(0.0, 0.5), (0.5, 0.0), (0.2, 0.2)])
def test_monotone(mode, start, end):
    sched = MarginScheduler(mo.ArcFace(), start=start, end=end, warmup_begin=5, warmup_end=1005, mode=mode)
    v = np.array(values(sched, 1100))
    d = np.diff(v) * (1 if end >= start else -1)
    assert (d >= 0).all()
    assert v.min() >= min(start, end) and v.max() <= max(start, end)
    if start != end:
        assert (d[5:1005] > 0).all()  # strictly moving inside the window


def test_zero_length_window_jumps_to_end():
    sched = MarginScheduler(mo.CosFace(), start=0.1, end=0.3, warmup_begin=4, warmup_end=4)
    assert values(sched, 6) == [0.1, 0.1, 0.1, 0.1, 0.3, 0.3, 0.3]
    now = MarginScheduler(mo.CosFace(), start=0.1, end=0.3, warmup_end=0)
    assert now.margin.params["m"] == 0.3


# -- the margin and the loss follow the schedule ----------------------------------------------------

def test_construction_writes_step0_value():
    m = mo.CosFace(0.35)
    MarginScheduler(m, start=0.05, end=0.35, warmup_end=10)
    assert m.params["m"] == 0.05


def test_replaces_per_row_tensor():
    m = mo.CosFace(torch.full((4,), 0.3))
    sched = MarginScheduler(m, start=0.0, end=0.3, warmup_end=2)
    sched.step()
    assert m.params["m"] == 0.15
    m.check_batch(7)  # a float no longer pins the batch size


@pytest.mark.parametrize("mode", ["linear", "exponential"])
def test_cosface_output_follows(mode):
    m = mo.CosFace(0.35)
    sched = MarginScheduler(m, start=0.0, end=0.35, warmup_begin=1, warmup_end=6, mode=mode)
    seen = set()
    for n in range(9):
        v = expected_value(n, 0.0, 0.35, 1, 6, mode)
        torch.testing.assert_close(m(T), T - v, rtol=0, atol=1e-15)
        seen.add(round(v, 12))
        sched.step()
    assert len(seen) == 6


def test_arcface_output_follows():
    m = mo.ArcFace(0.5)
    sched = MarginScheduler(m, start=0.0, end=0.5, warmup_end=4)
    for n in range(6):
        v = expected_value(n, 0.0, 0.5, 0, 4, "linear")
        np.testing.assert_allclose(m(T).numpy(), expected_arcface(T.numpy(), v), rtol=0, atol=1e-12)
        sched.step()
    assert not torch.equal(mo.ArcFace(0.25)(T), mo.ArcFace(0.5)(T))  # the comparison can tell values apart


@pytest.mark.parametrize("param,start,end", [("m1", 1.0, 1.35), ("m2", 0.0, 0.5), ("m3", 0.0, 0.35)])
def test_combined_output_follows(param, start, end):
    m = mo.CombinedMargin(1.0, 0.2, 0.1)
    fixed = dict(m1=1.0, m2=0.2, m3=0.1)
    sched = MarginScheduler(m, param=param, start=start, end=end, warmup_end=4, mode="exponential")
    for n in range(6):
        args = {**fixed, param: expected_value(n, start, end, 0, 4, "exponential")}
        np.testing.assert_allclose(m(T).numpy(), expected_combined(T.numpy(), **args), rtol=0, atol=1e-12)
        assert {k: m.params[k] for k in fixed if k != param} == {k: v for k, v in fixed.items() if k != param}
        sched.step()


@pytest.mark.parametrize("make", [lambda v: mo.CosFace(v), lambda v: mo.ArcFace(v)], ids=["cosface", "arcface"])
def test_loss_uses_scheduled_value(make):
    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(8, 16, generator=g), torch.randn(50, 16, generator=g)
    y = torch.randint(0, 50, (8,), generator=g)
    margin = make(0.5)
    sched = MarginScheduler(margin, start=0.0, end=0.5, warmup_end=5)
    losses = []
    for _ in range(4):
        sched.step()
        loss = mo.margin_cross_entropy(x, W, y, margin, 30.0)
        fresh = mo.margin_cross_entropy(x, W, y, make(sched.value), 30.0)
        assert torch.equal(loss, fresh)
        losses.append(loss.item())
    assert len(set(losses)) == 4  # each step's margin changed the loss


def test_head_sees_scheduled_value():
    head = mo.MarginHead(16, 50, margin=mo.CosFace(0.4), scale=30.0)
    sched = MarginScheduler(head.margin, start=0.0, end=0.4, warmup_end=2)
    x, y = torch.randn(8, 16), torch.randint(0, 50, (8,))
    before = head(x, y)
    sched.step()
    after = head(x, y)
    assert torch.equal(after, mo.margin_cross_entropy(x, head.weight, y, mo.CosFace(0.2), 30.0))
    assert not torch.equal(before, after)


# -- state_dict --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["linear", "exponential"])
def test_state_dict_resume(mode):
    kw = dict(param="m", start=0.05, end=0.45, warmup_begin=2, warmup_end=30, mode=mode)
    a = MarginScheduler(mo.ArcFace(), **kw)
    full = values(a, 40)
    b = MarginScheduler(mo.ArcFace(), **kw)
    for _ in range(17):
        b.step()
    state = b.state_dict()
    assert state == {"step": 17, **kw}
    # A scheduler built with other settings adopts the saved ones and continues exactly.
    margin = mo.ArcFace()
    c = MarginScheduler(margin, start=0.3, end=0.1, warmup_end=3)
    c.load_state_dict(state)
    assert margin.params["m"] == full[17] and c.current_step == 17
    assert values(c, 23) == full[17:]


def test_load_state_dict_validates():
    sched = MarginScheduler(mo.CosFace(), start=0.0, end=0.3, warmup_end=10)
    good = sched.state_dict()
    with pytest.raises(ValueError, match="missing.*'mode'"):
        sched.load_state_dict({k: v for k, v in good.items() if k != "mode"})
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        sched.load_state_dict({**good, "extra": 1})
    with pytest.raises(ValueError, match=r"state_dict\['step'\].*-1"):
        sched.load_state_dict({**good, "step": -1})
    with pytest.raises(ValueError, match="warmup_end"):
        sched.load_state_dict({**good, "warmup_end": -3})
    with pytest.raises(ValueError, match=r"^end=-1"):
        sched.load_state_dict({**good, "end": -1.0})
    assert sched.state_dict() == good  # a failed load changes nothing


def test_repr():
    r = repr(MarginScheduler(mo.CosFace(), start=0.0, end=0.3, warmup_end=10, mode="exponential"))
    assert r.startswith("MarginScheduler(CosFace(m=0), param='m', start=0, end=0.3")
    assert "mode='exponential'" in r and "step=0" in r


# -- validation ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(end=-0.1), ValueError, r"^end=-0\.1 is not a valid CosFace\.m"),
    (dict(start=-0.1, end=0.3), ValueError, r"^start=-0\.1"),
    (dict(end=math.nan), ValueError, r"^end must be finite, got nan"),
    (dict(start=math.inf, end=0.3), ValueError, r"^start must be finite"),
    (dict(end=True), TypeError, r"^end must be a real number"),
    (dict(end=torch.tensor(0.3)), TypeError, r"^end must be a real number"),
    (dict(end=0.3, param="s"), ValueError, r"param must name one of CosFace's parameters \['m'\], got 's'"),
    (dict(end=0.3, warmup_begin=-1, warmup_end=5), ValueError, r"warmup_begin must be >= 0, got -1"),
    (dict(end=0.3, warmup_begin=5, warmup_end=4), ValueError, r"warmup_end must be >= warmup_begin .*4 < .*5"),
    (dict(end=0.3, warmup_end=2.5), TypeError, r"warmup_end must be an int"),
    (dict(end=0.3, warmup_begin=False, warmup_end=2), TypeError, r"warmup_begin must be an int"),
    (dict(end=0.3, mode="cosine"), ValueError, r"mode must be one of .*'cosine'"),
])
def test_bad_arguments(kwargs, exc, match):
    kwargs.setdefault("warmup_end", 10)
    margin = mo.CosFace(0.35)
    with pytest.raises(exc, match=match):
        MarginScheduler(margin, **kwargs)
    assert margin.params["m"] == 0.35  # untouched


@pytest.mark.parametrize("make,param,value", [
    (lambda: mo.ArcFace(), "m", math.pi),
    (lambda: mo.ArcFace(), "m", -0.01),
    (lambda: mo.CombinedMargin(), "m1", 0.0),
    (lambda: mo.CombinedMargin(), "m2", 3.2),
    (lambda: mo.CombinedMargin(), "m3", -1.0),
])
def test_margin_bounds(make, param, value):
    with pytest.raises(ValueError, match=rf"^end={value!r} is not a valid \w+\.{param}"):
        MarginScheduler(make(), param=param, start=1.0, end=value, warmup_end=3)
    with pytest.raises(ValueError, match=rf"^start={value!r} is not a valid \w+\.{param}"):
        MarginScheduler(make(), param=param, start=value, end=1.0, warmup_end=3)


@pytest.mark.parametrize("cls", [mo.SphereFace, mo.SimplerASoftmax])
def test_integer_margins_refused(cls):
    with pytest.raises(ValueError, match=rf"{cls.__name__}'s m must be an integer"):
        MarginScheduler(cls(4), start=1.0, end=4.0, warmup_end=10)


def test_not_a_margin():
    with pytest.raises(TypeError, match="margin must be a marginops.margins.Margin, got function"):
        MarginScheduler(lambda t: t - 0.3, end=0.3, warmup_end=10)
    with pytest.raises(ValueError, match=r"NoMargin's parameters \[\]"):
        MarginScheduler(mo.NoMargin(), end=0.3, warmup_end=10)


def test_get_value_step_type():
    sched = MarginScheduler(mo.CosFace(), end=0.3, warmup_end=10)
    with pytest.raises(TypeError, match="step must be an int"):
        sched.get_value(1.5)
