"""The tile engine: its planner (CPU and GPU tile policies), statistics merging, option checks, and what it
gives the backends on it: per-row scales, gradient filtering, the torch backend's GPU code path (16-bit
products, large tiles) run on CPU tensors, and the Triton backend's row blocks through its loops."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import marginops as mo
from marginops.backends import engine, native
from marginops.backends import torch_chunked as tc
from marginops.backends.common import Prepared, inverse_norms
from marginops.backends.interface import DEFAULT_MEMORY_BUDGET, Call, FusedOptions

from ..conftest import TOLERANCE, assert_close_to_oracle, make_inputs, run
from .ranges import LABELS_13, assert_is_argmax, check_ranges_match_whole, class_logits64

BACKENDS = {"torch": tc, "native": native}


@pytest.fixture(params=["torch", "native"])
def backend(request):
    if request.param == "native" and not native.available():
        pytest.fail(f"the native kernels failed to build: see {native.build_error_log()}")
    return BACKENDS[request.param]


# -- the planner ----------------------------------------------------------------------------------

CPU_TORCH = engine.cpu_tiling(engine.CPU, per_worker=False)
#: an H200-like device description (no GPU needed: the plan is a pure function of it and the sizes)
H200 = engine.DeviceInfo("gpu", cache_bytes=60 << 20, workers=132, memory_bytes=141 << 30)


def opts(chunk_size=None, memory_budget=None, strategy="auto", **kw):
    return FusedOptions(scale=1.0, chunk_size=chunk_size, memory_budget=memory_budget, strategy=strategy, **kw)


def test_workspace_when_the_whole_batch_fits():
    B, C = 256, 10_000
    assert engine.takes_workspace(B, C, opts(), 4, wanted=True)
    p = engine.plan(B, C, opts(), CPU_TORCH, stored=4, tile=0, workspace=True)
    assert p.strategy == "workspace" and p.rows == B and p.scratch_bytes == B * C * 4 <= DEFAULT_MEMORY_BUDGET


@pytest.mark.parametrize("batch", [1000, 1010, 4096])
def test_workspace_rows_are_evened_out_within_the_budget(batch):
    C = 10_000
    fit = engine.MIN_WORKSPACE_ROWS + 28
    o = opts(memory_budget=fit * C * 4 + 17)
    assert engine.takes_workspace(batch, C, o, 4, True)
    p = engine.plan(batch, C, o, CPU_TORCH, stored=4, tile=0, workspace=True)
    assert p.strategy == "workspace" and p.rows <= fit and p.scratch_bytes == p.rows * C * 4 <= o.budget
    assert math.ceil(batch / p.rows) == math.ceil(batch / fit)  # evening out adds no block
    last = batch - (math.ceil(batch / p.rows) - 1) * p.rows
    assert last > p.rows - math.ceil(batch / p.rows)  # no thin last block


def test_recompute_when_fewer_than_min_rows_fit_or_not_wanted():
    C = 10_000
    few = opts(memory_budget=(engine.MIN_WORKSPACE_ROWS - 1) * C * 4)
    assert not engine.takes_workspace(1000, C, few, 4, True)
    assert engine.takes_workspace(10, C, opts(memory_budget=10 * C * 4), 4, True)  # a small batch: all its rows
    assert not engine.takes_workspace(10, C, opts(memory_budget=10 * C * 4 - 1), 4, True)
    assert not engine.takes_workspace(256, C, opts(), 4, wanted=False)
    assert not engine.takes_workspace(0, C, opts(), 4, True)
    p = engine.plan(256, C, opts(), CPU_TORCH, stored=4, tile=4, workspace=False)
    assert p.strategy == "recompute" and p.rows == min(256, CPU_TORCH.recompute_rows)


def test_explicit_strategies():
    C = 10_000
    three = opts(memory_budget=3 * C * 4, strategy="workspace")  # 3 rows: below MIN_WORKSPACE_ROWS
    assert engine.takes_workspace(1000, C, three, 4, True)
    assert engine.plan(1000, C, three, CPU_TORCH, stored=4, tile=0, workspace=True).rows == 3
    assert not engine.takes_workspace(1000, C, opts(strategy="recompute"), 4, True)
    with pytest.raises(ValueError, match=f"memory_budget >= {C * 4} bytes"):
        engine.takes_workspace(1000, C, opts(memory_budget=C * 4 - 1, strategy="workspace"), 4, True)


def test_recompute_tiles_shrink_classes_first_to_the_budget():
    p = engine.plan(1000, 10_000, opts(chunk_size=2048, memory_budget=512 * 100 * 4), CPU_TORCH, stored=4, tile=4,
                    workspace=False)
    assert p == engine.Plan("recompute", 512, 100, 512 * 100 * 4)
    tiny = engine.plan(1000, 10_000, opts(memory_budget=1), CPU_TORCH, stored=8, tile=8, workspace=False)
    assert tiny.strategy == "recompute" and tiny.chunk == 1


def test_a_backends_budget_policy():
    """WorkspaceBudget: without memory_budget a default sized by the backend, a block of all rows allowed what
    several blocks would spend beside the workspace, a device cap; an explicit memory_budget bounds the
    workspace alone."""
    row = 1000
    wb = engine.WorkspaceBudget(row, default=200 * row, one_block=50 * row)
    assert wb.rows(250, opts()) == 250  # all rows cost no more than the default plus the allowance
    assert wb.rows(251, opts()) == 200  # else the default's rows
    assert replace(wb, cap=30 * row).rows(250, opts()) == 30
    assert replace(wb, cap=1).rows(10, opts()) == 1  # a cap below one row still leaves one
    assert replace(wb, cap=1).rows(10, opts(memory_budget=20 * row + 1)) == 10  # the caller's budget alone
    assert wb.rows(150, opts(memory_budget=20 * row + 1)) == 20 and wb.rows(5, opts(memory_budget=row - 1)) == 0
    assert engine.takes_workspace(251, 7, opts(), 1, True, wb)
    p = engine.plan(251, 7, opts(), CPU_TORCH, stored=1, tile=0, workspace=True, budget=wb)
    assert (p.strategy, p.rows, p.scratch_bytes) == ("workspace", 126, 126 * row)  # two even blocks of <= 200
    assert not engine.takes_workspace(1000, 7, opts(), 1, True, replace(wb, cap=100 * row))  # 100 < 128 rows
    with pytest.raises(ValueError, match=f"memory_budget >= {row} bytes"):
        engine.takes_workspace(1000, 7, opts(memory_budget=row - 1, strategy="workspace"), 1, True, wb)
    # the default policy: rows of classes x stored bytes within opts.budget
    assert engine.WorkspaceBudget(10_000 * 4).rows(10**6, opts()) == DEFAULT_MEMORY_BUDGET // (10_000 * 4)


def test_cpu_tiles_are_sized_from_the_cache():
    native_tiling = engine.cpu_tiling(engine.CPU, per_worker=True)
    assert native_tiling.tile_bytes == engine.CPU.cache_bytes // 2  # half of one core's L2
    assert native_tiling.tiles_in_flight == engine.CPU.workers
    for batch, classes in ((1024, 100_000), (256, 100_000), (17, 5000), (4096, 1_000_000), (1, 1)):
        for ws in (True, False):
            o = opts()
            p = engine.plan(batch, classes, o, native_tiling, stored=4, tile=0 if ws else 4,
                            workspace=ws and engine.takes_workspace(batch, classes, o, 4, True))
            assert p.scratch_bytes <= o.budget and 1 <= p.chunk <= max(classes, 1)
            if classes >= native_tiling.min_chunk:
                assert native_tiling.min_chunk <= p.chunk <= native_tiling.max_chunk
                assert p.chunk & (p.chunk - 1) == 0 or p.chunk == classes  # a power of two, or all classes
    explicit = engine.plan(1024, 100_000, opts(chunk_size=777), native_tiling, stored=4, tile=0, workspace=True)
    assert explicit.chunk == 777


@settings(max_examples=200)
@given(batch=st.integers(0, 5000), classes=st.integers(1, 100_000), elt=st.sampled_from([4, 8]),
       chunk_size=st.none() | st.integers(1, 10_000), budget=st.none() | st.integers(1, 2**28),
       wanted=st.booleans(), gpu=st.booleans(), k=st.sampled_from([1, 3]))
def test_plan_invariants(batch, classes, elt, chunk_size, budget, wanted, gpu, k):
    o = opts(chunk_size, budget)
    tiling = engine.gpu_tiling(H200) if gpu else engine.cpu_tiling(engine.CPU, per_worker=True)
    stored = elt * k
    early = engine.takes_workspace(batch, classes, o, stored, wanted)
    p = engine.plan(batch, classes, o, tiling, stored=stored, tile=2 if gpu else 0, workspace=early,
                    rows_per_class=k)
    limit = o.budget
    assert 1 <= p.chunk <= classes and p.rows >= 1
    if chunk_size is None and budget is None and classes * k >= tiling.min_chunk:  # bounds count rows of W
        assert p.chunk * k >= tiling.min_chunk
    if chunk_size is not None:
        assert p.chunk <= chunk_size
    if p.strategy == "workspace":
        assert early and batch >= 1
        fit = limit // (classes * stored)
        assert fit >= min(batch, engine.MIN_WORKSPACE_ROWS)  # the documented condition
        assert p.rows <= min(batch, fit)
        # blocks are thick enough before evening out (which keeps their number)
        assert min(batch, fit) >= min(batch, tiling.min_workspace_rows)
        if not gpu:
            assert p.scratch_bytes == p.rows * classes * stored <= limit
    else:
        recompute = engine.plan(batch, classes, o, tiling, stored=stored, tile=stored, workspace=False,
                                rows_per_class=k)
        assert recompute.rows == max(1, min(batch, tiling.recompute_rows))
        assert recompute.chunk == 1 or recompute.scratch_bytes <= limit


def test_gpu_plan_at_the_cut_cross_entropy_shape():
    """B=8192, D=2304, C=256k bf16 (stored float32 exponentials, 16-bit tile copies): a pure function of sizes
    and the device description."""
    B, C = 8192, 256_000
    tiling = engine.gpu_tiling(H200)
    o = FusedOptions(scale=64.0)
    assert engine.takes_workspace(B, C, o, 4, True)  # shapes: the gradients come out of the forward call
    p = engine.plan(B, C, o, tiling, stored=4, tile=2, workspace=True)
    assert p.strategy == "recompute"  # 256-row workspace blocks would rewrite the 2.4 GB float32 dW 32 times
    p = engine.plan(B, C, o, tiling, stored=4, tile=6, workspace=False)
    assert p.rows == B  # one row block
    assert p.chunk >= tiling.min_chunk and math.ceil(C / p.chunk) <= 256  # few Python iterations
    assert p.scratch_bytes <= o.budget
    big = replace(o, memory_budget=4 << 30)
    p = engine.plan(B, C, big, tiling, stored=4, tile=2, workspace=True)
    assert p.strategy == "workspace" and p.rows == 4096 and p.scratch_bytes <= big.budget
    assert p.chunk >= tiling.min_chunk


def test_describe():
    assert engine.describe("cpu") is engine.CPU and engine.CPU.kind == "cpu" and engine.CPU.cache_bytes > 0
    assert engine.describe(torch.device("meta")).kind == "gpu"  # any other device: planned as an accelerator


# -- merging ---------------------------------------------------------------------------------------

def test_merge_is_exact_and_takes_the_first_group_on_ties():
    ninf = -math.inf
    shift = torch.tensor([[1.0, 3.0, 3.0], [ninf, ninf, ninf], [ninf, 2.0, ninf]], dtype=torch.float64)
    sumexp = torch.tensor([[2.0, 1.5, 1.0], [0.0, 0.0, 0.0], [0.0, 4.0, 0.0]], dtype=torch.float64)
    best = shift.clone()
    index = torch.tensor([[0, 7, 12], [0, 5, 10], [0, 6, 10]])
    stats = engine.BlockStats(shift, sumexp, best, index, None, torch.zeros(3, dtype=torch.float64))
    lse, mx, arg, lsum = engine.merge_block(stats)
    expect = torch.tensor([math.log(2 * math.e + 2.5 * math.e ** 3), ninf, 2 + math.log(4.0)], dtype=torch.float64)
    torch.testing.assert_close(lse, expect, rtol=1e-15, atol=0)
    assert arg.tolist() == [7, 0, 6] and mx[0] == 3.0 and lsum is None
    empty = engine.BlockStats(*(torch.empty(2, 0, dtype=torch.float64) for _ in range(2)),
                              torch.empty(2, 0, dtype=torch.float64), torch.empty(2, 0, dtype=torch.int64),
                              torch.ones(2, 0), torch.zeros(2, dtype=torch.float64))
    lse, mx, arg, lsum = engine.merge_block(empty)
    assert lse.tolist() == [ninf, ninf] and mx.tolist() == [ninf, ninf] and lsum.tolist() == [0.0, 0.0]


# -- options ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Wider(FusedOptions):
    new_tile_option: int = 0  # a tile-math option added later, unknown to the engine


def test_an_option_the_engine_does_not_implement_is_refused(backend):
    x, W, y = make_inputs(5, 7, 3)
    inv_x, inv_w = inverse_norms(x, x.dtype), inverse_norms(W, W.dtype)
    ok = Call(x, W, y, inv_x, inv_w, _Wider(scale=2.0))
    backend.forward_stats(ok)  # at its default: fine
    call = Call(x, W, y, inv_x, inv_w, _Wider(scale=2.0, new_tile_option=3))
    for f in (lambda: backend.forward_stats(call), lambda: backend.recompute_grads(call, torch.zeros(5), torch.ones(5)),
              lambda: backend.uses_workspace(5, 7, 3, x.dtype, W.dtype, call.opts)):
        with pytest.raises(NotImplementedError, match="new_tile_option"):
            f()
    for bad in (dict(label_smoothing=0.1, sub_centers=7), dict(label_smoothing=0.1, filter_threshold=0.3)):
        with pytest.raises(NotImplementedError, match="label_smoothing"):
            backend.forward_stats(Call(x, W, y, inv_x, inv_w, FusedOptions(scale=2.0, **bad)))


# -- a float64 oracle at the backend interface (per-row scales, filtering, sub-centres) -----------------

def oracle(x, W, y, opts: FusedOptions, row_scale, lse=None, g=None):
    """Float64 statistics ``(lse, max, argmax, logit_sum)`` of a range and, given the combined ``lse`` and
    ``g``, ``(dxh, dW)``: every logit of row ``i`` is ``s row_scale_i cos_ij`` (naive, materialized)."""
    x64, W64 = x.detach().double(), W.detach().double().clone().requires_grad_()
    xh = F.normalize(x64, dim=1, eps=opts.eps) if opts.normalize else x64
    xh = xh.detach().requires_grad_()
    wh = F.normalize(W64, dim=1, eps=opts.eps) if opts.normalize else W64
    B, k = x.shape[0], opts.sub_centers
    C = W.shape[0] // k
    sub_cos = (xh @ wh.t()).view(B, C, k)
    sub = sub_cos.detach().argmax(2, keepdim=True)  # the first maximum
    cos = sub_cos.gather(2, sub).squeeze(2)
    factor = opts.scale * (row_scale.double() if row_scale is not None else torch.ones(B, dtype=torch.float64))
    logits = cos * factor.unsqueeze(1)
    yl = y - opts.class_start
    target = torch.zeros(B, C, dtype=torch.bool)
    rows = ((yl >= 0) & (yl < C)).nonzero().squeeze(1)
    target[rows, yl[rows]] = True
    kept = ~target
    if opts.filter_threshold is not None:
        kept &= ~(logits.detach() > (factor * opts.filter_threshold).unsqueeze(1))
    masked = logits.detach().masked_fill(~kept, -math.inf)
    stats = (torch.logsumexp(masked, 1), logits.detach().amax(1),
             logits.detach().argmax(1) + opts.class_start, logits.detach().masked_fill(target, 0.0).sum(1))
    if lse is None:
        return stats
    p = torch.exp(masked - lse.double().unsqueeze(1))
    smooth = (opts.label_smoothing / opts.total_classes(C)) * (~target).double()
    G = g.double().unsqueeze(1) * factor.unsqueeze(1) * (p - smooth)
    (logits / factor.unsqueeze(1) * G).sum().backward()  # dL/dcos = G
    return stats, xh.grad, W64.grad


def check_call(backend, x, W, y, opts, row_scale, strategy, tol=None):
    """Statistics and gradients of ``backend`` for one call against :func:`oracle`."""
    inv = (lambda t: inverse_norms(t, torch.float64 if x.dtype == torch.float64 else torch.float32)) \
        if opts.normalize else (lambda t: None)
    call = Call(x, W, y, inv(x), inv(W), opts, row_scale)
    ref = oracle(x, W, y, opts, row_scale)
    B = x.shape[0]
    z = ref[0].new_empty(B).uniform_(-3, 3)  # margined target logits
    lse = torch.logaddexp(ref[0], z)
    g = torch.rand(B, dtype=torch.float64) + 0.5
    g[0] = 0.0  # an ignored row
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if strategy == "workspace":
        assert backend.uses_workspace(B, W.shape[0], x.shape[1], x.dtype, W.dtype, opts)
        stats, dxh, dW = backend.forward_with_grads(call, z.to(acc), g.to(acc))
    else:
        stats = backend.forward_stats(call)
        dxh, dW = backend.recompute_grads(call, lse.to(acc), g.to(acc))
    _, ref_dxh, ref_dW = oracle(x, W, y, opts, row_scale, lse, g)
    lse_ref, max_ref, arg_ref, lsum_ref = ref
    assert_close_to_oracle(stats.lse, lse_ref, tol=tol, name="lse")
    if opts.want_prediction:
        assert_close_to_oracle(stats.max, max_ref, tol=tol, name="max")
        assert_is_argmax(stats.argmax - opts.class_start, class_logits64(x, W, opts, row_scale),
                         1e-12 if tol is None else tol)
    if opts.label_smoothing > 0:
        assert_close_to_oracle(stats.logit_sum, lsum_ref, tol=tol, atol=1e-12 * W.shape[0], name="logit sum")
    scale = (opts.scale * (row_scale.double().max() if row_scale is not None else 1.0))
    assert_close_to_oracle(dxh, ref_dxh, tol=tol, atol=1e-13 * float(scale), name="dxh")
    assert_close_to_oracle(dW, ref_dW, tol=tol, atol=1e-13 * float(scale) * B, name="dW")


FEATURES = {
    "plain": dict(),
    "smoothing": dict(label_smoothing=0.2),
    "filtering": dict(filter_threshold=0.1),
    "sub-centres": dict(sub_centers=3),
    "sub-centres+filtering": dict(sub_centers=2, filter_threshold=0.0),
    "unnormalized": dict(normalize=False, label_smoothing=0.1),
}


@pytest.mark.parametrize("strategy", ["workspace", "recompute"])
@pytest.mark.parametrize("feature", FEATURES)
def test_per_row_scales_match_the_oracle(backend, feature, strategy):
    features = FEATURES[feature]
    k = features.get("sub_centers", 1)
    B, C, D = 13, 37, 5
    x, W, _ = make_inputs(B, C * k, D)
    y = torch.tensor(LABELS_13)
    row_scale = torch.rand(B, dtype=torch.float64) * 3 + 0.2
    o = FusedOptions(scale=4.0, chunk_size=5, strategy=strategy, want_prediction=True, **features)
    if strategy == "workspace" and k > 1 and backend is tc:
        with pytest.raises(NotImplementedError, match="sub-centres"):
            backend.uses_workspace(B, C * k, D, x.dtype, W.dtype, o)
        return
    check_call(backend, x, W, y, o, row_scale, strategy)
    check_call(backend, x, W, y, o, None, strategy)  # without per-row scales: the same oracle with ones
    # float32 inputs: within float32 rounding of the float64 oracle
    check_call(backend, x.float(), W.float(), y, o, row_scale.float(), strategy, tol=2e-5)


def test_per_row_scales_with_several_row_blocks_and_groups(backend, monkeypatch):
    monkeypatch.setattr(native, "GROUPS", 3)
    x, W, y = make_inputs(40, 30, 4)
    row_scale = torch.rand(40, dtype=torch.float64) + 0.5
    for strategy, budget in (("workspace", 9 * 30 * 8), ("recompute", None)):  # 9-row workspace blocks
        o = FusedOptions(scale=6.0, chunk_size=4, strategy=strategy, memory_budget=budget, want_prediction=True,
                         label_smoothing=0.1)
        check_call(backend, x, W, y, o, row_scale, strategy)


@pytest.mark.parametrize("features", [dict(filter_threshold=0.1), dict(sub_centers=3),
                                      dict(sub_centers=2, filter_threshold=0.0, chunk_size=4)], ids=str)
def test_class_ranges_with_filtering_and_sub_centres(backend, features):
    # each range filters and takes its sub-centre maxima on its own; the statistics still combine exactly
    k = features.get("sub_centers", 1)
    x, W, _ = make_inputs(13, 37 * k, 8, torch.float64)
    check_ranges_match_whole(backend, x, W, torch.tensor(LABELS_13), label_smoothing=0.0, **features)


@pytest.mark.parametrize("features", [dict(), dict(filter_threshold=0.1), dict(sub_centers=3)], ids=str)
def test_per_row_scales_over_class_ranges(backend, features):
    k = features.get("sub_centers", 1)
    x, W, _ = make_inputs(13, 37 * k, 6)
    row_scale = torch.rand(13, dtype=torch.float64) + 0.5
    check_ranges_match_whole(backend, x, W, torch.tensor(LABELS_13), row_scale=row_scale, chunk_size=4,
                             label_smoothing=0.0 if features else 0.1, **features)


def test_bad_row_scale_shape_is_named(backend):
    x, W, y = make_inputs(5, 7, 3)
    with pytest.raises(ValueError, match="row_scale"):
        backend.forward_stats(Call(x, W, y, None, None, FusedOptions(scale=1.0, normalize=False),
                                   torch.ones(4, dtype=torch.float64)))


# -- gradient filtering ---------------------------------------------------------------------------------

def _filter_problem(dtype=torch.float64):
    """20 rows near e0, 40 classes in 4 tiles of 10: tiles 0 and 2 near e0 (probabilities ~0.05), tiles 1
    and 3 near -e0 (~1e-5 at s = 4)."""
    gen = torch.Generator().manual_seed(7)
    D = 6
    e0 = torch.zeros(D, dtype=torch.float64)
    e0[0] = 1.0
    x = e0 + 0.15 * torch.randn(20, D, dtype=torch.float64, generator=gen)
    W = 0.15 * torch.randn(40, D, dtype=torch.float64, generator=gen)
    near = torch.tensor([c // 10 in (0, 2) for c in range(40)])
    W[near] += e0
    W[~near] -= e0
    y = torch.randint(0, 40, (20,), generator=gen)
    y[y // 10 % 2 == 1] -= 10  # targets among the near classes
    return x.to(dtype), W.to(dtype), y, near


@pytest.mark.parametrize("strategy", ["workspace", "recompute"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_gradient_filter_skips_negligible_tiles(backend, strategy, label_smoothing):
    """With a threshold between the two kinds of tiles the gradients are the exact ones with the far tiles'
    probability terms removed (label smoothing's term stays exact), and differ from the exact ones."""
    x, W, y, near = _filter_problem()
    B = x.shape[0]
    o = FusedOptions(scale=4.0, chunk_size=10, strategy=strategy, label_smoothing=label_smoothing)
    inv_x, inv_w = inverse_norms(x, x.dtype), inverse_norms(W, W.dtype)
    lse_ref = oracle(x, W, y, o, None)[0]
    z = torch.full((B,), 2.0, dtype=torch.float64)
    lse = torch.logaddexp(lse_ref, z)
    g = torch.rand(B, dtype=torch.float64) + 0.5

    def grads(threshold):
        call = Call(x, W, y, inv_x, inv_w, replace(o, gradient_filter=threshold))
        if strategy == "workspace":
            _, dxh, dW = backend.forward_with_grads(call, z, g)
            return dxh, dW
        return backend.recompute_grads(call, lse, g)

    exact = grads(None)
    # the oracle with the far classes' probabilities removed
    x64, W64 = x.detach().double(), W.detach().double().clone().requires_grad_()
    xh = F.normalize(x64, dim=1).requires_grad_()
    wh = F.normalize(W64, dim=1)
    logits = 4.0 * xh @ wh.t()
    target = F.one_hot(y, 40).bool()
    p = torch.exp(logits.detach().masked_fill(target, -math.inf) - lse.unsqueeze(1))
    for t in range(4):  # the far tiles lie below the threshold for every row, the near ones do not
        assert (float(p[:, 10 * t:10 * t + 10].max()) > 1e-3) == (t in (0, 2))
    kept_p = p * near.double()
    G = g.unsqueeze(1) * 4.0 * (kept_p - label_smoothing / 40 * (~target).double())
    (logits / 4.0 * G).sum().backward()
    filtered = grads(1e-3)
    assert_close_to_oracle(filtered[0], xh.grad, name="dxh without the far tiles")
    assert_close_to_oracle(filtered[1], W64.grad, name="dW without the far tiles")
    assert (filtered[0] - exact[0]).abs().max() > 1e-6  # the far tiles really were left out
    # a threshold no tile lies below changes nothing, bit for bit
    for a, b in zip(grads(1e-30), exact):
        assert torch.equal(a, b)


@pytest.mark.parametrize("strategy", ["workspace", "recompute"])
def test_gradient_filter_error_is_bounded_by_what_it_drops(backend, strategy):
    """Random data: every dropped probability is below the threshold, so each row's error is at most
    ``|coef_i| sum_{j: p_ij < threshold} p_ij`` (rows of unit norm), and each class's (before the
    normalization backward, a projection times ``1 / |W_j|``) at most ``sum_i |coef_i| p_ij`` over the same."""
    B, C, D = 8, 300, 8
    x, W, y = make_inputs(B, C, D)
    threshold = 0.05
    o = FusedOptions(scale=30.0, chunk_size=4, strategy=strategy)
    inv_x, inv_w = inverse_norms(x, x.dtype), inverse_norms(W, W.dtype)
    z = torch.full((B,), 3.0, dtype=torch.float64)
    lse = torch.logaddexp(oracle(x, W, y, o, None)[0], z)
    g = torch.rand(B, dtype=torch.float64) + 0.5
    _, ref_dxh, ref_dW = oracle(x, W, y, o, None, lse, g)
    call = Call(x, W, y, inv_x, inv_w, replace(o, gradient_filter=threshold))
    if strategy == "workspace":
        _, dxh, dW = backend.forward_with_grads(call, z, g)
    else:
        dxh, dW = backend.recompute_grads(call, lse, g)
    xh, wh = F.normalize(x, dim=1), F.normalize(W, dim=1)
    p = torch.exp((o.scale * xh @ wh.t()).masked_fill(F.one_hot(y, C).bool(), -math.inf) - lse.unsqueeze(1))
    small = torch.where(p < threshold, p, torch.zeros_like(p))
    coef = (g * o.scale).abs()
    row_bound = coef * small.sum(1) + 1e-12
    class_bound = inv_w * (coef.unsqueeze(1) * small).sum(0) + 1e-12
    assert bool(((dxh - ref_dxh).norm(dim=1) <= row_bound).all())
    assert bool(((dW - ref_dW).norm(dim=1) <= class_bound).all())
    assert float((dxh - ref_dxh).abs().max()) > 1e-9  # something was dropped


# -- the torch backend's GPU code path, on CPU tensors ----------------------------------------------------

@pytest.fixture
def gpu_like(monkeypatch):
    """Plan the torch backend as for an H200 and record the dtypes of every GEMM's operands."""
    monkeypatch.setattr(engine, "describe", lambda device: H200)
    operands = []
    real = tc.gemm_into

    def spy(out, a, b, accumulate=False):
        operands.append((a.dtype, b.dtype, out.dtype))
        return real(out, a, b, accumulate)

    monkeypatch.setattr(tc, "gemm_into", spy)
    return operands


@pytest.mark.parametrize("budget", [None, 180 * 37 * 4], ids=["workspace", "recompute-in-forward"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_path_multiplies_16_bit_tiles(gpu_like, dtype, reduction, budget):
    """16-bit products with float32 results (on CPU: a 16-bit product accumulated into float32), no worse than
    PyTorch in the same dtype against the float64 oracle."""
    B, C, D = 300, 37, 16
    x, W, y = make_inputs(B, C, D, dtype, ignore=3)
    kw = dict(label_smoothing=0.1, chunk_size=8, memory_budget=budget)
    ours = run(x, W, y, mo.ArcFace(0.5), 16.0, backend="torch", reduction=reduction, **kw)
    kw.pop("chunk_size"), kw.pop("memory_budget")
    same = run(x, W, y, mo.ArcFace(0.5), 16.0, backend="reference", reduction=reduction, **kw)
    ref = run(x, W, y, mo.ArcFace(0.5), 16.0, dtype=torch.float64, backend="reference", reduction=reduction, **kw)
    assert gpu_like and all(a == dtype and b == dtype and out == torch.float32 for a, b, out in gpu_like)
    # the loss comes in float32 but carries its 16-bit inputs' precision: that dtype's tolerance
    assert_close_to_oracle(ours.loss, ref.loss, same.loss, tol=TOLERANCE[dtype], name="loss")
    for name in ("x_grad", "W_grad"):
        assert_close_to_oracle(getattr(ours, name), getattr(ref, name), getattr(same, name), name=name)


def test_gpu_path_with_every_feature(gpu_like):
    """Sub-centres, filtering, per-row scales and prediction on the GPU path, bf16, against the oracle."""
    for features in (dict(sub_centers=3), dict(filter_threshold=0.05)):
        k = features.get("sub_centers", 1)
        x, W, _ = make_inputs(13, 37 * k, 16)
        row_scale = torch.rand(13, dtype=torch.float64) + 0.5
        o = FusedOptions(scale=8.0, chunk_size=6, strategy="recompute", want_prediction=True, **features)
        check_call(tc, x.bfloat16(), W.bfloat16(), torch.tensor(LABELS_13), o, row_scale.float(), "recompute",
                   tol=0.1)
    assert all(a == torch.bfloat16 for a, _, _ in gpu_like)


def test_gpu_plan_issues_few_tiles(gpu_like, monkeypatch):
    """Whole row blocks against wide tiles: one row block and a handful of tiles where the CPU plan has many."""
    plans = []
    real = engine._forward
    monkeypatch.setattr(engine, "_forward", lambda k, pl, *a, **kw: plans.append(pl) or real(k, pl, *a, **kw))
    x, W, y = make_inputs(600, 5000, 8, torch.bfloat16)
    run(x, W, y, mo.ArcFace(0.5), backend="torch", reduction="none")
    (p,) = plans
    assert p.rows == 600 and math.ceil(5000 / p.chunk) <= 5


def test_a_backend_without_per_row_scales_refuses_them_by_name():
    """The refusal is a flag of the shared per-call state (``Prepared.row_scale_supported``): per-call state
    that does not declare per-row scales refuses a call carrying them, never ignoring them silently; the
    engine's state declares them."""
    x, W, y = make_inputs(5, 7, 3, torch.float32)
    inv_x, inv_w = inverse_norms(x, x.dtype), inverse_norms(W, W.dtype)
    call = Call(x, W, y, inv_x, inv_w, FusedOptions(scale=2.0), torch.ones(5))
    with pytest.raises(NotImplementedError, match="row_scale"):
        Prepared(call)
    assert engine.RowBlockKernel.row_scale_supported


def test_the_triton_backend_runs_on_the_engine(monkeypatch):
    """The Triton backend supplies only its row-block work: its statistics and gradients come out of the
    engine's loops, here with per-row scales, filtering and the prediction, against this module's float64 oracle
    (its kernels under the Triton interpreter on CPU)."""
    pytest.importorskip("triton")
    from marginops.backends import get_backend

    triton_backend = get_backend("triton")
    loops = []
    for name in ("_forward", "_recompute"):
        real = getattr(engine, name)
        monkeypatch.setattr(engine, name, lambda *a, real=real, name=name, **kw: loops.append(name) or real(*a, **kw))
    x, W, _ = make_inputs(13, 37, 5)
    row_scale = torch.rand(13, dtype=torch.float64) * 3 + 0.2
    for strategy in ("workspace", "recompute"):
        o = FusedOptions(scale=4.0, strategy=strategy, want_prediction=True, filter_threshold=0.1)
        check_call(triton_backend, x, W, torch.tensor(LABELS_13), o, row_scale, strategy)
    assert loops == ["_forward", "_forward", "_recompute"]
