"""The native CPU backend: the oracle suite, its kernels, building, options it hands to the torch backend.

Every test here needs the compiled kernels; the ``native`` fixture fails (never
skips) when they cannot be built, unless ``MARGINOPS_NATIVE=0`` switched the
backend off on purpose.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings

import marginops as mo
from marginops.backends import FusedOptions, native
from marginops.backends import torch_chunked as tc
from marginops.backends.interface import Call, check_backend

from ..conftest import assert_close_to_oracle, check_against_reference, make_inputs, run
from ..test_functional import MARGINS, check_random_problem, problems
from .ranges import LABELS_13, check_ranges_match_whole

B, C, D = 13, 37, 8
ROOT = Path(__file__).resolve().parents[2]

#: Tilings that exercise both strategies, several tiles per row and several row blocks.
TILINGS = {
    "workspace": dict(chunk_size=5),
    "workspace-1-row": dict(chunk_size=4, memory_budget=40 * 8, strategy="workspace"),  # 1 row in float64
    "recompute": dict(chunk_size=5, memory_budget=600),
    "recompute-1": dict(memory_budget=1),  # one class per tile
}


@pytest.fixture(autouse=True)
def native_built():
    if not native.enabled():
        pytest.skip(f"switched off by {native.ENV}={os.environ.get(native.ENV)}")
    assert native.available(), f"the native kernels failed to build: see {native.build_error_log()}"


# -- the oracle ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction, tiling", [(r, t) for r in ("mean", "sum", "none") for t in TILINGS
                                               if not (r == "none" and TILINGS[t].get("strategy") == "workspace")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("margin", ["arcface", "cosface", "sphereface", "none"])
def test_matches_the_oracle(margin, dtype, reduction, tiling):
    x, W, y = make_inputs(B, C, D, dtype, ignore=2)  # duplicate labels, ignored rows
    check_against_reference(x, W, y, MARGINS[margin](B), 30.0, backend="native", reduction=reduction,
                            label_smoothing=0.1, **TILINGS[tiling])


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1, 5, 3), (7, 1, 3), (2, 2, 1), (5, 300, 3)], ids=str)
def test_ragged_shapes_smoothing_and_plain_mode(shape, dtype, label_smoothing, normalize):
    b, c, d = shape
    x, W, y = make_inputs(b, c, d, dtype, ignore=1 if b > 2 else 0)
    for tiling in ("workspace", "recompute"):
        check_against_reference(x, W, y, mo.ArcFace(0.4), 30.0 if normalize else 1.5, backend="native",
                                normalize=normalize, label_smoothing=label_smoothing, **TILINGS[tiling])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_per_row_margins_and_all_ignored_rows(reduction):
    x, W, y = make_inputs(B, C, D, torch.float64)
    margin = mo.CosFace(torch.linspace(0.0, 0.6, B, dtype=torch.float64))
    check_against_reference(x, W, y, margin, 30.0, backend="native", reduction=reduction, chunk_size=6)
    ignored = torch.full_like(y, -100)
    out = run(x, W, ignored, mo.ArcFace(0.5), backend="native", reduction=reduction, chunk_size=6)
    assert torch.count_nonzero(out.loss) == 0
    assert torch.count_nonzero(out.x_grad) == 0 and torch.count_nonzero(out.W_grad) == 0


@settings(max_examples=60)
@given(problems())
def test_random_problems_match_reference(problem):
    check_random_problem(problem, backend="native")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_inputs_accumulate_in_float32(dtype):
    x, W, y = make_inputs(B, C, D, dtype, ignore=1)
    ours = run(x, W, y, mo.ArcFace(0.5), 30.0, backend="native", chunk_size=5, label_smoothing=0.1)
    same = run(x, W, y, mo.ArcFace(0.5), 30.0, backend="torch", chunk_size=5, label_smoothing=0.1)
    ref = run(x, W, y, mo.ArcFace(0.5), 30.0, dtype=torch.float64, backend="reference", label_smoothing=0.1)
    assert ours.loss.dtype == torch.float32 and ours.x_grad.dtype == dtype and ours.W_grad.dtype == dtype
    for name, o, s, r in (("loss", ours.loss, same.loss, ref.loss), ("x.grad", ours.x_grad, same.x_grad, ref.x_grad),
                          ("W.grad", ours.W_grad, same.W_grad, ref.W_grad)):
        # no worse than the torch backend (same fp32 accumulation) by more than one rounding of the result
        assert_close_to_oracle(o, r, s, name=name)


@pytest.mark.parametrize("strategy", ["workspace", "recompute"])
def test_agrees_with_the_torch_backend_across_many_tiles(strategy):
    x, W, y = make_inputs(96, 5000, 24, torch.float32, ignore=5)
    kw = dict(label_smoothing=0.1, strategy=strategy)
    ours = run(x, W, y, mo.ArcFace(0.5), 64.0, backend="native", **kw)
    ref = run(x, W, y, mo.ArcFace(0.5), 64.0, dtype=torch.float64, backend="reference", **kw)
    same = run(x, W, y, mo.ArcFace(0.5), 64.0, backend="torch", **kw)
    for name in ("loss", "x_grad", "W_grad"):
        assert_close_to_oracle(getattr(ours, name), getattr(ref, name), getattr(same, name), name=name)
    assert torch.equal(ours.stats.prediction, same.stats.prediction)


@pytest.mark.parametrize("normalize, label_smoothing", [(True, 0.1), (True, 0.0), (False, 0.1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_class_ranges_combine_to_the_whole(dtype, normalize, label_smoothing):
    x, W, _ = make_inputs(13, 37, D, dtype)
    y = torch.tensor(LABELS_13)
    for chunk in (None, 3):
        check_ranges_match_whole(native, x, W, y, normalize=normalize, label_smoothing=label_smoothing,
                                 scale=30.0 if normalize else 1.0, chunk_size=chunk)
    check_ranges_match_whole(native, x[:0], W, y[:0])


@pytest.mark.parametrize("reduction, tiling", [("mean", "workspace"), ("none", "recompute"),
                                               ("sum", "recompute-1")])
def test_gradcheck(reduction, tiling):
    x, W, y = make_inputs(4, 7, 3, ignore=1)
    x.requires_grad_()
    W.requires_grad_()
    kw = dict(backend="native", reduction=reduction, label_smoothing=0.1, **TILINGS[tiling])
    assert torch.autograd.gradcheck(lambda x, W: mo.margin_cross_entropy(x, W, y, mo.ArcFace(0.4), 3.0, **kw),
                                    (x, W), nondet_tol=1e-12)


@pytest.mark.parametrize("backend", ["native", "auto"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    x, W, y = make_inputs(B, C, D, torch.float32, ignore=1)

    def step(x, W, y):
        return mo.margin_cross_entropy(x, W, y, mo.ArcFace(0.5), 30.0, backend=backend, label_smoothing=0.1,
                                       chunk_size=5)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    xe, We = x.clone().requires_grad_(), W.clone().requires_grad_()
    xc, Wc = x.clone().requires_grad_(), W.clone().requires_grad_()
    eager = step(xe, We, y)
    eager.backward()
    got = compiled(xc, Wc, y)
    got.backward()
    assert torch.equal(got, eager)
    assert torch.equal(xc.grad, xe.grad) and torch.equal(Wc.grad, We.grad)


def test_native_ops_pass_opcheck():
    ops = torch.ops.marginops_native
    R, c = 5, 7
    tile = torch.randn(R, c)
    inv_w = torch.rand(c) + 0.5
    y = torch.tensor([0, 3, 6, 9, -2])
    m_t, s_t = torch.empty(R, 2), torch.empty(R, 2)
    fwd_args = (tile, inv_w, 2.0, y, 0, True, -87.0, m_t[:, 0], s_t[:, 0], torch.zeros(R),
                torch.full((R,), -math.inf), torch.zeros(R, dtype=torch.int64), torch.zeros(R))
    torch.library.opcheck(ops.fwd_tile.default, fwd_args)
    grad_args = (torch.randn(R, c), inv_w, y, 0, True, 2.0, torch.randn(R), torch.rand(R), torch.rand(R),
                 -87.0, torch.finfo(torch.float32).tiny)
    torch.library.opcheck(ops.grad_tile.default, grad_args)
    torch.library.opcheck(ops.normalize_w_backward.default, (torch.randn(c, 4), torch.randn(c, 4), inv_w, 1e12))
    # the row-block drivers: 3 tiles of 3 classes (the last one short), workspace kept
    xh, W, T, chunk = torch.randn(R, 4), torch.randn(c, 4), 3, 3
    ws = torch.empty(T * R * chunk)
    fwd_block_args = (xh, W, inv_w, y, 2.0, -87.0, chunk, ws, R * chunk, 2, 2, torch.empty(R, T), torch.empty(R, T),
                      torch.zeros(R), torch.empty(R, T, dtype=torch.int64), torch.zeros(R, T))
    torch.library.opcheck(ops.fwd_block.default, fwd_block_args)
    # without a workspace: statistics per group of tiles (2 groups of the 3 tiles)
    G = 2
    fwd_block_args = (xh, W, inv_w, y, 2.0, -87.0, chunk, None, R * chunk, 2, G, torch.empty(R, G),
                      torch.empty(R, G), torch.zeros(R), torch.empty(R, G, dtype=torch.int64), torch.zeros(R, G))
    torch.library.opcheck(ops.fwd_block.default, fwd_block_args)
    bwd_block_args = (xh, xh.clone(), W, inv_w, y, 2.0, -87.0, torch.finfo(torch.float32).tiny, chunk, ws, R * chunk,
                      torch.randn(R), torch.rand(R, T), torch.rand(R), True, True, 1e12, 2, 8, torch.zeros(R, 4),
                      torch.empty(c, 4))
    torch.library.opcheck(ops.bwd_block.default, bwd_block_args)


# -- the kernels against PyTorch, directly -------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("store", [True, False])
def test_forward_tile_kernel(dtype, store):
    R, c, c0, s = 9, 37, 100, 3.0
    raw = torch.randn(R, c, dtype=dtype)
    raw[2, 5] = raw[2, 30] = 100.0  # a tie: the first index wins
    inv_w = torch.rand(c, dtype=dtype) + 0.5
    inv_w[30] = inv_w[5]
    y = torch.tensor([100, 105, 136, 137, 99, 110, 120, 100, 5])  # in the tile, at its edges, outside
    floor = tc._exp_floor(dtype)
    tile = raw.clone()
    m, sm, target = torch.empty(R, dtype=dtype), torch.empty(R, dtype=dtype), torch.zeros(R, dtype=dtype)
    best = torch.full((R,), -math.inf, dtype=dtype)
    best[8] = 1e9  # an earlier tile's maximum that this one does not beat
    arg = torch.zeros(R, dtype=torch.int64)
    lsum = torch.ones(R, dtype=dtype)  # accumulates
    torch.ops.marginops_native.fwd_tile(tile, inv_w, s, y, c0, store, floor, m, sm, target, best, arg, lsum)
    logits = raw * (s * inv_w)
    col = y - c0
    inside = (col >= 0) & (col < c)
    mask = torch.zeros(R, c, dtype=torch.bool)
    mask[inside.nonzero().squeeze(1), col[inside]] = True
    masked = logits.masked_fill(mask, -math.inf)
    tol = dict(rtol=1e-12, atol=0) if dtype == torch.float64 else dict(rtol=2e-6, atol=0)
    torch.testing.assert_close(m, masked.amax(1), **tol)
    e = (masked - m.unsqueeze(1)).clamp_min(floor).exp().masked_fill(mask, 0.0)
    torch.testing.assert_close(sm, e.sum(1), **tol)
    torch.testing.assert_close(target[inside], logits[mask], **tol)
    assert torch.equal(target[~inside], torch.zeros_like(target[~inside]))
    torch.testing.assert_close(lsum, 1 + logits.masked_fill(mask, 0.0).sum(1), rtol=1e-5, atol=1e-5)
    expect_arg = masked.argmax(1) + c0
    assert torch.equal(arg[:8], expect_arg[:8]) and arg[8] == 0 and best[8] == 1e9
    assert arg[2] == c0 + 5
    if store:
        torch.testing.assert_close(tile, e, **tol)
        tiny = torch.finfo(dtype).tiny
        assert not bool(((tile != 0) & (tile.abs() < tiny)).any()), "a subnormal was stored"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("from_logits", [True, False])
def test_gradient_tile_kernel_flushes_subnormals(dtype, from_logits):
    R, c, c0, s = 6, 45, 7, 5.0
    info = torch.finfo(dtype)
    raw = torch.randn(R, c, dtype=dtype) * 30
    inv_w = torch.rand(c, dtype=dtype) + 0.5
    inv_w[3] = info.tiny * 4  # products with this column fall into the subnormal range
    y = torch.tensor([7, 8, 51, 52, 0, 20])
    shift = torch.randn(R, dtype=dtype) * 5 + 40
    a = torch.rand(R, dtype=dtype) + 0.1
    a[1] = info.tiny  # a whole row of subnormal products
    b = torch.rand(R, dtype=dtype) * 1e-3
    floor, tiny = tc._exp_floor(dtype), info.tiny
    tile = raw.clone() if from_logits else raw.abs().div(raw.abs().max()).clone()
    p = (tile * (s * inv_w) - shift.unsqueeze(1)).clamp_min(floor).exp() if from_logits else tile.clone()
    expect = (a.unsqueeze(1) * p - b.unsqueeze(1)) * inv_w
    expect = expect.masked_fill(expect.abs() < tiny, 0.0)
    col = y - c0
    for i in range(R):
        if 0 <= col[i] < c:
            expect[i, col[i]] = 0
    torch.ops.marginops_native.grad_tile(tile, inv_w, y, c0, from_logits, s, shift, a, b, floor, tiny)
    tol = dict(rtol=1e-12, atol=0) if dtype == torch.float64 else dict(rtol=1e-5, atol=0)
    torch.testing.assert_close(tile, expect, **tol)
    assert not bool(((tile != 0) & (tile.abs() < tiny)).any()), "a subnormal reached the GEMM operand"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_normalize_backward_kernel(dtype):
    c, d = 11, 19
    W = torch.randn(c, d, dtype=dtype)
    W[4] = 0  # a clamped row: no projection
    inv = torch.linalg.vector_norm(W, dim=1).clamp_min(1e-12).reciprocal()
    dD = torch.randn(c, d, dtype=dtype)
    limit = float(torch.full((), 1e-12, dtype=dtype).reciprocal())
    coef = torch.where(inv >= limit, torch.zeros_like(inv), inv * inv)
    expect = dD - W * ((W * dD).sum(1) * coef).unsqueeze(1)
    got = dD.clone()
    torch.ops.marginops_native.normalize_w_backward(got, W, inv, limit)
    torch.testing.assert_close(got, expect, rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=1e-12)
    assert torch.equal(got[4], dD[4])


# -- planning, threads, options -------------------------------------------------------------------

def test_tiles_are_sized_from_the_cache():
    assert native.tile_bytes() == native._l2_per_core() // 2  # half of one core's L2
    opts = FusedOptions(scale=1.0)
    for batch, classes in ((1024, 100_000), (256, 100_000), (17, 5000), (4096, 1_000_000), (1, 1)):
        for fused in (True, False):
            p = native.plan(batch, classes, 4, opts, fused)
            assert p.workspace_bytes <= opts.budget
            assert 1 <= p.chunk <= max(classes, 1)
            if classes >= native.MIN_CHUNK:
                assert native.MIN_CHUNK <= p.chunk <= native.MAX_CHUNK
                assert p.chunk & (p.chunk - 1) == 0 or p.chunk == classes  # a power of two, or all classes
            if p.strategy == "fused" and classes >= 4 * native.MIN_CHUNK:
                assert p.rows * p.chunk * 4 <= max(native.tile_bytes(), p.rows * native.MIN_CHUNK * 4)
    explicit = native.plan(1024, 100_000, 4, FusedOptions(scale=1.0, chunk_size=777), True)
    assert explicit.chunk == 777


def test_strategy_choice_matches_the_torch_backends_rules():
    for red, grads, expect in ((True, True, True), (False, True, False), (True, False, False)):
        opts = FusedOptions(scale=1.0, reduce=red, need_x=grads, need_W=grads)
        assert native.uses_workspace(256, 10_000, 64, torch.float32, torch.float32, opts) is expect
    tiny = FusedOptions(scale=1.0, memory_budget=600)
    assert not native.uses_workspace(B, C, D, torch.float32, torch.float32, tiny)
    with pytest.raises(ValueError, match="memory_budget"):
        native.uses_workspace(B, C, D, torch.float32, torch.float32,
                              FusedOptions(scale=1.0, memory_budget=10, strategy="workspace"))
    with pytest.raises(ValueError, match="whole class range"):
        native.uses_workspace(B, 30, D, torch.float32, torch.float32,
                              FusedOptions(scale=1.0, strategy="workspace", class_start=5, num_classes=40))


@pytest.mark.parametrize("strategy", ["workspace", "recompute"])
def test_multithreaded_matches_single_threaded(_one_thread, strategy):
    x, W, y = make_inputs(300, 2000, 16, torch.float64, ignore=3)
    kw = dict(backend="native", strategy=strategy, label_smoothing=0.1, chunk_size=512)
    one = run(x, W, y, mo.ArcFace(0.5), **kw)
    torch.set_num_threads(max(2, _one_thread))
    try:
        many = run(x, W, y, mo.ArcFace(0.5), **kw)
        again = run(x, W, y, mo.ArcFace(0.5), **kw)
    finally:
        torch.set_num_threads(1)
    for a, b, c in zip(one[:3], many[:3], again[:3]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        assert torch.equal(b, c), "gradients differ run to run"


def test_implements_the_interface_and_auto_picks_it_on_cpu(monkeypatch):
    check_backend(native)
    assert mo.backends.get_backend("native") is native
    assert mo.resolve_backend("auto", "cpu") == "native"
    x, W, y = make_inputs(B, C, D)
    assert torch.equal(run(x, W, y, backend="auto").loss, run(x, W, y, backend="native").loss)
    monkeypatch.setenv(native.ENV, "0")
    assert mo.resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(RuntimeError, match=native.ENV):
        run(x, W, y, backend="native")


def test_options_it_does_not_implement_run_on_the_torch_backend(monkeypatch):
    """A FusedOptions field added later (a tile-math option) sends the call to the torch backend while it is
    set, never a loss with the option ignored."""

    @dataclasses.dataclass(frozen=True)
    class Wider(FusedOptions):
        sub_centers: int = 1

    calls = []
    for name in ("uses_workspace", "forward_stats", "forward_with_grads", "recompute_grads"):
        real = getattr(tc, name)
        monkeypatch.setattr(tc, name, (lambda f, n: lambda *a, **k: calls.append(n) or f(*a, **k))(real, name))
    assert native.supports(Wider(scale=1.0)) and not native.supports(Wider(scale=1.0, sub_centers=3))
    x, W, y = make_inputs(B, C, D, torch.float64)
    inv_x = torch.linalg.vector_norm(x, dim=1).reciprocal()
    inv_w = torch.linalg.vector_norm(W, dim=1).reciprocal()
    for opts in (Wider(scale=3.0, sub_centers=3), Wider(scale=3.0)):
        calls.clear()
        call = Call(x, W, y, inv_x, inv_w, opts)
        stats = native.forward_stats(call)
        native.recompute_grads(call, stats.lse, torch.ones(B, dtype=x.dtype))
        native.uses_workspace(B, C, D, x.dtype, W.dtype, opts)
        assert calls == (["forward_stats", "recompute_grads", "uses_workspace"] if opts.sub_centers != 1 else [])


def test_a_failed_build_warns_once_and_the_torch_backend_serves(tmp_path):
    """No usable compiler: one warning naming a file with the compiler's message; auto uses torch."""
    code = (
        "import warnings, torch, marginops as mo\n"
        "from marginops.backends import native\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    assert mo.resolve_backend('auto', 'cpu') == 'torch'\n"
        "    x, W = torch.randn(4, 3, requires_grad=True), torch.randn(6, 3)\n"
        "    mo.margin_cross_entropy(x, W, torch.tensor([0, 1, 2, 5]), mo.ArcFace(0.5), 10.0).backward()\n"
        "    assert mo.resolve_backend('auto', 'cpu') == 'torch'\n"
        "ours = [str(m.message) for m in w if 'native' in str(m.message)]\n"
        "assert len(ours) == 1, ours\n"
        "print(native.build_error_log())\n"
        "try:\n"
        "    mo.margin_cross_entropy(x, W, torch.tensor([0, 1, 2, 5]), None, 1.0, backend='native')\n"
        "except RuntimeError as e:\n"
        "    assert native.build_error_log() in str(e)\n"
        "else:\n"
        "    raise AssertionError('backend=native ran without kernels')\n"
    )
    env = dict(os.environ, MARGINOPS_CACHE=str(tmp_path), CXX=str(tmp_path / "no-such-compiler"))
    env.pop(native.ENV, None)
    env.pop("TORCH_EXTENSIONS_DIR", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    log = Path(out.stdout.strip().splitlines()[-1])
    assert log.is_file() and log.stat().st_size > 0
    assert "no-such-compiler" in log.read_text() or "rror" in log.read_text()


def test_a_stale_build_lock_does_not_hang_concurrent_loads():
    """A build killed midway leaves PyTorch's ``lock`` file behind; two processes loading at once (ranks on
    one machine) must still both get the kernels, not wait forever."""
    (native._build_dir() / "lock").write_text("")
    code = "from marginops.backends import native\nassert native.load(), native.build_error_log()\n"
    env = {k: v for k, v in os.environ.items() if k != native.ENV}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        for p in procs:
            assert p.wait(timeout=240) == 0, p.stderr.read()
    finally:
        for p in procs:
            p.kill()
    assert not (native._build_dir() / "lock").exists()


def test_switched_off_by_the_environment():
    env = dict(os.environ, **{native.ENV: "0"})
    code = ("import marginops as mo; from marginops.backends import native\n"
            "assert mo.resolve_backend('auto', 'cpu') == 'torch'\n"
            "assert not native._state['tried'], 'nothing is built when switched off'\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr


def test_bad_input_raises_the_named_errors_before_any_kernel():
    x, W, y = make_inputs(B, C, D)
    with pytest.raises(ValueError, match="labels"):
        mo.margin_cross_entropy(x, W, torch.full((B,), C + 3), mo.ArcFace(0.5), backend="native")
    with pytest.raises(ValueError, match="chunk_size"):
        mo.margin_cross_entropy(x, W, y, mo.ArcFace(0.5), backend="native", chunk_size=0)
    with pytest.raises(ValueError, match="memory_budget"):
        mo.margin_cross_entropy(x.requires_grad_(), W, y, mo.ArcFace(0.5), backend="native", strategy="workspace",
                                memory_budget=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mo.margin_cross_entropy(x, W, y, mo.ArcFace(0.5), backend="native")


@pytest.mark.parametrize("groups", [1, 3, 32, 1000])
def test_any_number_of_tile_groups(monkeypatch, groups):
    """Tiles form shrinking groups in both passes; any count (more groups than tiles included) gives the result."""
    monkeypatch.setattr(native, "GROUPS", groups)
    x, W, y = make_inputs(B, C, D, torch.float64, ignore=2)
    for tiling in ("workspace", "recompute"):
        check_against_reference(x, W, y, mo.ArcFace(0.5), 30.0, backend="native", label_smoothing=0.1,
                                **TILINGS[tiling])


@pytest.mark.parametrize("groups", [1, 3, 16])
@pytest.mark.parametrize("strategy", ["workspace", "recompute"])
def test_prediction_ties_across_tiles_and_groups_take_the_first_class(monkeypatch, groups, strategy):
    """Class rows repeat every 5 classes, so each row's maximum lies in many tiles and groups: the
    prediction is its first class, and the loss is the reference's (group statistics merge exactly)."""
    monkeypatch.setattr(native, "GROUPS", groups)
    x, W, y = make_inputs(9, 40, D, torch.float64)
    W = W[torch.arange(40) % 5].contiguous()
    y = torch.tensor([0, 7, 13, 39, 22, 5, 1, 30, 2])
    ours = run(x, W, y, mo.CosFace(0.3), 30.0, backend="native", chunk_size=4, strategy=strategy)
    ref = run(x, W, y, mo.CosFace(0.3), 30.0, backend="reference")
    torch.testing.assert_close(ours.loss, ref.loss, rtol=1e-12, atol=1e-12)
    assert torch.equal(ours.stats.prediction, ref.stats.prediction)
    assert bool((ours.stats.prediction < 5).all())  # the first copy of each row's best class
