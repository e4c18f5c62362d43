"""The chunked PyTorch backend on the tile engine: both strategies, and independence from the tiling.

The planner's own tests are in ``test_engine.py``."""

from __future__ import annotations

import math

import pytest
import torch

import marginops as mo
from marginops.backends import engine
from marginops.backends import torch_chunked as tc
from marginops.backends.interface import FusedOptions

from ..conftest import assert_close_to_oracle, check_against_reference, make_inputs, run
from .ranges import LABELS_13, check_ranges_match_whole

B, C, D = 13, 37, 8
#: 600 bytes: no 13-row block over all 37+ classes fits (>= 13 * 37 * 4 bytes), so recompute runs.
SMALL_BUDGET = 600
TILING = engine.cpu_tiling(engine.CPU, per_worker=False)


@pytest.fixture
def plans(monkeypatch):
    """Records the Plan of every forward pass the engine runs during the test."""
    made = []

    def spy(k, pl, *args, **kwargs):
        made.append(pl)
        return real(k, pl, *args, **kwargs)

    real = engine._forward
    monkeypatch.setattr(engine, "_forward", spy)
    return made


@pytest.mark.parametrize("strategy", ["recompute", "workspace"])
def test_explicit_strategy_end_to_end(plans, strategy):
    x, W, y = make_inputs(B, C, D, ignore=2)
    check_against_reference(x, W, y, mo.ArcFace(0.5), label_smoothing=0.1, strategy=strategy,
                            memory_budget=SMALL_BUDGET if strategy == "workspace" else None, backend="torch")
    assert [p.strategy for p in plans] == [strategy]
    assert strategy == "recompute" or plans[0].rows < B  # the small budget forced several row blocks


def test_workspace_without_room_for_one_row_is_refused():
    x, W, y = make_inputs(B, C, D)
    W.requires_grad_()
    with pytest.raises(ValueError, match=r"strategy='workspace' needs memory_budget >= \d+ bytes"):
        mo.margin_cross_entropy(x, W, y, strategy="workspace", memory_budget=8, backend="torch")


# -- the strategies in action ---------------------------------------------------------------------

@pytest.mark.parametrize("reduction, grads, expected", [
    ("mean", True, "workspace"), ("sum", True, "workspace"), ("none", True, "recompute"),
    ("mean", False, "recompute"),
])
def test_calls_pick_the_documented_strategy(plans, reduction, grads, expected):
    x, W, y = make_inputs(B, C, D)
    run(x, W, y, mo.ArcFace(0.5), reduction=reduction, grad_x=grads, grad_W=grads, backend="torch")
    assert [p.strategy for p in plans] == [expected]
    plans.clear()
    run(x, W, y, mo.ArcFace(0.5), reduction=reduction, grad_x=grads, grad_W=grads, memory_budget=SMALL_BUDGET,
        backend="torch")
    assert [p.strategy for p in plans] == ["recompute"]


def test_forward_under_no_grad_keeps_no_workspace(plans):
    x, W, y = make_inputs(B, C, D)
    with torch.no_grad():
        mo.margin_cross_entropy(x.requires_grad_(), W.requires_grad_(), y, mo.CosFace(0.35), backend="torch")
    assert [p.strategy for p in plans] == ["recompute"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("margin", [None, mo.CosFace(0.35), mo.ArcFace(0.5), mo.SphereFace(4)], ids=repr)
def test_strategies_agree_with_each_other_and_the_reference(plans, margin, reduction, dtype):
    x, W, y = make_inputs(B, C, D, dtype, ignore=2)
    kept = check_against_reference(x, W, y, margin, reduction=reduction, label_smoothing=0.1, chunk_size=5,
                                   backend="torch")
    recompute = check_against_reference(x, W, y, margin, reduction=reduction, label_smoothing=0.1, chunk_size=5,
                                        memory_budget=SMALL_BUDGET, backend="torch")
    assert [p.strategy for p in plans] == ["workspace", "recompute"]
    for name, a, b in zip(("loss", "x.grad", "W.grad"), kept[:3], recompute[:3]):
        assert_close_to_oracle(a, b.double(), name=f"workspace vs recompute {name}",
                               tol=None if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("reduction, budget, strategy", [
    ("mean", None, "workspace"),
    ("sum", None, "workspace"),
    ("none", None, "recompute"),  # recompute with any chunk: "none" never keeps the logits
    ("mean", SMALL_BUDGET, "recompute"),  # the budget caps recompute tiles at 600 // (13 * 8) = 5 classes
])
def test_results_independent_of_chunk_size(plans, reduction, budget, strategy):
    x, W, y = make_inputs(B, C, D, ignore=2)
    chunks = (None, 1, 3, 7, C, C + 5)
    base = None
    for chunk in chunks:  # every prediction is checked to be an argmax by check_against_reference
        out = check_against_reference(x, W, y, mo.ArcFace(0.5), reduction=reduction, label_smoothing=0.1,
                                      chunk_size=chunk, memory_budget=budget, backend="torch")
        if base is None:
            base = out
            continue
        for name, a, b in zip(("loss", "x.grad", "W.grad"), out[:3], base[:3]):
            assert_close_to_oracle(a, b, name=f"chunk_size={chunk} vs default: {name}")
    assert {p.strategy for p in plans} == {strategy}
    cap = C if budget is None else budget // (B * 8)
    assert [p.chunk for p in plans] == [min(c or C, C, cap) for c in chunks]


@pytest.mark.parametrize("batch, budget, strategy", [
    (200, 128 * C * 8, "workspace"),  # 128 rows of 37 classes fit: 2 even blocks of 100 rows
    (TILING.recompute_rows + 88, SMALL_BUDGET, "recompute"),  # more rows than one recompute block
])
def test_several_row_blocks(plans, batch, budget, strategy):
    x, W, y = make_inputs(batch, C, D, ignore=7)
    check_against_reference(x, W, y, mo.ArcFace(0.5), label_smoothing=0.1, chunk_size=5, memory_budget=budget,
                            reduction="sum", backend="torch")
    (p,) = plans
    assert p.strategy == strategy and p.rows < batch


@pytest.mark.parametrize("strategy", ["workspace", "recompute"])
def test_multithreaded_matches_single_threaded(plans, _one_thread, strategy):
    """The rest of the suite runs on one thread (see conftest); check a larger problem on all of them."""
    x, W, y = make_inputs(300, 3001, 64, torch.float32, ignore=5)
    options = dict(chunk_size=512, memory_budget=None if strategy == "workspace" else 2**18)
    single = run(x, W, y, mo.ArcFace(0.5), backend="torch", **options)
    assert plans[0].strategy == strategy
    torch.set_num_threads(max(2, _one_thread))
    try:
        multi = check_against_reference(x, W, y, mo.ArcFace(0.5), backend="torch", **options)
    finally:
        torch.set_num_threads(1)
    for name, a, b in zip(("loss", "x.grad", "W.grad"), multi[:3], single[:3]):
        assert_close_to_oracle(a, b.double(), name=f"threads: {name}")


# -- class ranges (the backend interface) ---------------------------------------------------------

@pytest.mark.parametrize("normalize, label_smoothing", [(True, 0.1), (True, 0.0), (False, 0.1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_class_ranges_combine_to_the_whole(dtype, normalize, label_smoothing):
    x, W, _ = make_inputs(13, 37, D, dtype)
    y = torch.tensor(LABELS_13)
    check_ranges_match_whole(tc, x, W, y, normalize=normalize, label_smoothing=label_smoothing,
                             scale=30.0 if normalize else 1.0)


def test_class_ranges_with_tiny_tiles_and_an_empty_batch():
    x, W, _ = make_inputs(13, 37, D, torch.float32)
    y = torch.tensor(LABELS_13)
    check_ranges_match_whole(tc, x, W, y, chunk_size=3)  # ranges over several tiles, targets at tile edges
    check_ranges_match_whole(tc, x[:0], W, y[:0])


def test_workspace_needs_the_whole_class_range():
    opts = FusedOptions(scale=1.0, strategy="workspace", class_start=5, num_classes=40)
    with pytest.raises(ValueError, match="whole class range"):
        tc.uses_workspace(13, 30, D, torch.float32, torch.float32, opts)
    auto = FusedOptions(scale=1.0, class_start=5, num_classes=40)
    assert not tc.uses_workspace(13, 30, D, torch.float32, torch.float32, auto)  # auto recomputes a range


def test_both_backends_implement_the_interface():
    from marginops.backends import get_backend
    from marginops.backends.interface import check_backend

    check_backend(tc)
    assert get_backend("torch") is tc
    with pytest.raises(TypeError, match="lacks"):
        check_backend(math)
    with pytest.raises(ValueError, match="fused backend must be one of"):
        get_backend("reference")


def test_a_registered_backend_module_serves_every_call(monkeypatch):
    """Adding a backend is one module: here one that wraps this backend's functions and counts calls."""
    import types

    from marginops import backends

    monkeypatch.setattr(backends, "BACKENDS", dict(backends.BACKENDS))
    monkeypatch.setattr(backends, "_LOADED", dict(backends._LOADED))
    calls = []
    toy = types.ModuleType("toy_backend")
    for name in ("weight_grad_dtype", "uses_workspace", "forward_stats", "forward_with_grads", "recompute_grads"):
        setattr(toy, name, (lambda f, n: lambda *a, **k: calls.append(n) or f(*a, **k))(getattr(tc, name), name))
    mo.register_backend("toy", toy)
    x, W, y = make_inputs(B, C, D, ignore=2)
    for strategy, expected in (("auto", "forward_with_grads"), ("recompute", "recompute_grads")):
        calls.clear()
        ours = run(x, W, y, mo.ArcFace(0.5), backend="toy", strategy=strategy, label_smoothing=0.1)
        ref = run(x, W, y, mo.ArcFace(0.5), backend="torch", strategy=strategy, label_smoothing=0.1)
        assert expected in calls
        for a, b in zip(ours[:3], ref[:3]):
            assert torch.equal(a, b)
    with pytest.raises(TypeError, match="lacks"):
        mo.register_backend("broken", types.ModuleType("broken"))
    for bad in ("auto", "reference", ""):
        with pytest.raises(ValueError, match="backend name"):
            mo.register_backend(bad, toy)
