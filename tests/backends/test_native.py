"""The native CPU backend: the oracle suite (sub-centres and filtering included), its kernels, building.

Every test here needs the compiled kernels; the ``native`` fixture fails (never
skips) when they cannot be built, unless ``MARGINOPS_NATIVE=0`` switched the
backend off on purpose.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

import marginops as mo
from marginops.backends import FusedOptions, engine, native
from marginops.backends.interface import check_backend

from ..conftest import assert_close_to_oracle, check_against_reference, make_inputs, run
from ..test_functional import MARGINS, check_random_problem, problems
from .ranges import LABELS_13, assert_is_argmax, check_ranges_match_whole, class_logits64

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
    logits = class_logits64(x, W, FusedOptions(scale=64.0))
    assert_is_argmax(ours.stats.prediction, logits, 1e-5)  # near-ties may round either way


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


def _fwd_outputs(R, G, dtype, want=True, smoothing=True):
    return (torch.empty(R, G, dtype=dtype), torch.empty(R, G, dtype=dtype), torch.zeros(R, dtype=dtype),
            torch.empty(R, G, dtype=dtype) if want else torch.empty(0, dtype=dtype),
            torch.empty(R, G, dtype=torch.int64) if want else torch.empty(0, dtype=torch.int64),
            torch.zeros(R, G, dtype=dtype) if smoothing else torch.empty(0, dtype=dtype))


def test_native_ops_pass_opcheck():
    ops = torch.ops.marginops_native
    R, c, D, chunk = 5, 7, 4, 3
    T = math.ceil(c / chunk)
    xh, W = torch.randn(R, D), torch.randn(c, D)
    inv_w = torch.rand(c) + 0.5
    y = torch.tensor([0, 3, 6, 9, -2])
    sv = torch.rand(R) + 1.0
    ws = torch.empty(T * R * chunk)
    for filt in (False, True):  # 3 tiles of 3 classes (the last one short), workspace kept
        args = (xh, W, inv_w, y, sv, 1, -87.0, filt, 0.2, chunk, ws, R * chunk, 2, 2, *_fwd_outputs(R, T, xh.dtype))
        torch.library.opcheck(ops.fwd_block.default, args)
    # without a workspace: statistics per group of tiles (2 groups of the 3 tiles); sub-centres (k = 2)
    G = 2
    torch.library.opcheck(ops.fwd_block.default, (xh, torch.randn(2 * c, D), torch.rand(2 * c) + 0.5, y, sv, 2,
                                                  -87.0, False, 0.0, chunk, None, R * chunk * 2, 2, G,
                                                  *_fwd_outputs(R, G, xh.dtype, smoothing=False)))
    tiny = torch.finfo(torch.float32).tiny
    bwd_args = (xh, xh.clone(), W, inv_w, y, sv, 1, -87.0, tiny, False, 0.0, chunk, ws, R * chunk, torch.randn(R),
                torch.rand(R, T), torch.rand(R), torch.tensor([True, False, True]), 0.0, True, True, 1e12, 2, 8,
                torch.zeros(R, D), torch.empty(c, D))
    torch.library.opcheck(ops.bwd_block.default, bwd_args)
    recompute_args = (xh, xh.clone(), W, inv_w, y, sv, 1, -87.0, tiny, True, 0.3, chunk, None, R * chunk,
                      torch.randn(R), torch.rand(R), torch.empty(0), torch.empty(0, dtype=torch.bool), 0.01, True,
                      True, 1e12, 2, 8, torch.zeros(R, D), torch.empty(c, D))
    torch.library.opcheck(ops.bwd_block.default, recompute_args)


# -- the kernels against PyTorch, directly -------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("store", [True, False])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("filt", [False, True])
def test_forward_block_kernel(dtype, store, k, filt):
    """One row block, 3 tiles, one group (or one per tile with the workspace): with ``W`` the identity the raw
    tile is ``xh`` itself, so every expected value follows from ``xh`` exactly."""
    R, c, chunk = 9, 37, 16
    T = math.ceil(c / chunk)
    n = c * k
    xh = torch.randn(R, n, dtype=dtype)
    W = torch.eye(n, dtype=dtype)
    inv_w = torch.rand(n, dtype=dtype) + 0.5
    xh[2, 5 * k] = xh[2, 30 * k] = 100.0  # a tie across tiles: the first class wins
    inv_w[30 * k] = inv_w[5 * k]
    y = torch.tensor([0, 15, 16, 36, 37, -3, 20, 0, 5])  # at tile edges, outside
    sv = torch.rand(R, dtype=dtype) + 1.0
    thr = 0.5
    floor = engine.exp_floor(dtype)
    ws = torch.empty(R * c * k, dtype=dtype) if store else None
    G = T if store else 1
    m, s_, target, best, arg, lsum = _fwd_outputs(R, G, dtype)
    torch.ops.marginops_native.fwd_block(xh, W, inv_w, y, sv, k, floor, filt, thr, chunk, ws, R * chunk * k, 2, 1,
                                         m, s_, target, best, arg, lsum)
    sub_logits = (xh * inv_w * sv.unsqueeze(1)).view(R, c, k)
    logits = sub_logits.amax(2)
    mask = torch.zeros(R, c, dtype=torch.bool)
    inside = (y >= 0) & (y < c)
    mask[inside.nonzero().squeeze(1), y[inside]] = True
    filtered = (logits > (sv * thr).unsqueeze(1)) & ~mask if filt else torch.zeros_like(mask)
    tol = dict(rtol=1e-12, atol=0) if dtype == torch.float64 else dict(rtol=2e-6, atol=0)
    nontarget = logits.masked_fill(mask, -math.inf)
    kept = nontarget.masked_fill(filtered, -math.inf)
    bounds = [(g * chunk, min(c, (g + 1) * chunk)) for g in range(T)] if store else [(0, c)]
    for g, (c0, c1) in enumerate(bounds):
        mg = kept[:, c0:c1].amax(1)
        torch.testing.assert_close(m[:, g], mg, **tol)
        e = (kept[:, c0:c1] - torch.where(torch.isfinite(mg), mg, 0).unsqueeze(1)).clamp_min(floor).exp()
        e = e.masked_fill(mask[:, c0:c1] | filtered[:, c0:c1], 0.0)
        torch.testing.assert_close(s_[:, g], e.sum(1), **tol)
        pm, pa = nontarget[:, c0:c1].max(1)
        torch.testing.assert_close(best[:, g], pm, **tol)
        has = torch.isfinite(pm)
        assert torch.equal(arg[has, g], pa[has] + c0)
        torch.testing.assert_close(lsum[:, g], logits[:, c0:c1].masked_fill(mask[:, c0:c1], 0.0).sum(1),
                                   rtol=1e-5, atol=1e-5)
        if store:  # each class's exponential at the sub-centre that gave its logit, 0 at the others
            kept_tile = ws[R * c0 * k:][: R * (c1 - c0) * k].view(R, c1 - c0, k)
            at = F.one_hot(sub_logits[:, c0:c1].argmax(2), k).bool()
            torch.testing.assert_close(kept_tile, torch.where(at, e.unsqueeze(2), torch.zeros_like(kept_tile)), **tol)
            tiny = torch.finfo(dtype).tiny
            assert not bool(((kept_tile != 0) & (kept_tile.abs() < tiny)).any()), "a subnormal was stored"
    torch.testing.assert_close(target[inside], logits[mask], **tol)
    assert torch.equal(target[~inside], torch.zeros_like(target[~inside]))
    assert int(arg[2, 0]) == 5  # the tie: the first of the two classes


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradient_block_kernel_flushes_subnormals(dtype):
    """Kept tiles become ``G = (a p - b) inv_w`` in place (target column 0, subnormals flushed) and feed
    ``dxh += G W`` and ``dD = G^T xg`` with the normalization backward of ``W``; a tile the gradient filter
    drops adds nothing but label smoothing's term."""
    R, c, D, chunk = 6, 45, 7, 16
    T = math.ceil(c / chunk)
    info = torch.finfo(dtype)
    p = torch.rand(R, c, dtype=dtype)
    W = torch.randn(c, D, dtype=dtype)
    inv_w = torch.rand(c, dtype=dtype) + 0.5
    inv_w[3] = info.tiny * 4  # products with this column fall into the subnormal range
    y = torch.tensor([7, 8, 51, 16, 0, 20])
    a = torch.rand(R, T, dtype=dtype) + 0.1
    a[1] = info.tiny  # a whole row of subnormal products
    b = torch.rand(R, dtype=dtype) * 1e-3
    keep = torch.tensor([True, False, True])
    xh = torch.randn(R, D, dtype=dtype)
    ws = torch.cat([p[:, c0:c0 + chunk].reshape(-1) for c0 in range(0, c, chunk)])
    dxh, dD = torch.zeros(R, D, dtype=dtype), torch.empty(c, D, dtype=dtype)
    limit = 1.0 / 1e-12 if dtype == torch.float64 else float(torch.tensor(1e-12).reciprocal())
    torch.ops.marginops_native.bwd_block(xh, xh, W, inv_w, y, torch.ones(R, dtype=dtype), 1, engine.exp_floor(dtype),
                                         info.tiny, False, 0.0, chunk, ws, R * chunk, torch.zeros(R, dtype=dtype), a,
                                         b, keep, 0.0, True, True, limit, 2, 2, dxh, dD)
    a_cols = torch.cat([a[:, t:t + 1].expand(R, min(chunk, c - t * chunk)) for t in range(T)], 1)
    drop = torch.cat([torch.full((min(chunk, c - t * chunk),), not bool(keep[t])) for t in range(T)])
    G = (torch.where(drop, torch.zeros_like(a_cols), a_cols) * p - b.unsqueeze(1)) * inv_w
    G = G.masked_fill(G.abs() < info.tiny, 0.0)
    inside = (y >= 0) & (y < c)
    G[inside.nonzero().squeeze(1), y[inside]] = 0
    tol = dict(rtol=1e-12, atol=1e-300) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-30)
    got = torch.cat([ws[t * R * chunk:][: R * min(chunk, c - t * chunk)].view(R, -1) for t in range(T)], 1)
    torch.testing.assert_close(got, G, **tol)
    assert not bool(((got != 0) & (got.abs() < info.tiny)).any()), "a subnormal reached the GEMM operand"
    torch.testing.assert_close(dxh, G @ W, rtol=1e-10 if dtype == torch.float64 else 1e-4, atol=1e-6)
    dwh = G.t() @ xh
    coef = torch.where(inv_w >= limit, torch.zeros_like(inv_w), inv_w * inv_w)
    expect = dwh - W * ((W * dwh).sum(1) * coef).unsqueeze(1)
    torch.testing.assert_close(dD, expect, rtol=1e-10 if dtype == torch.float64 else 1e-4, atol=1e-5)


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


@pytest.mark.parametrize("tiling", ["workspace", "recompute", "recompute-1"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("features", [dict(k=3), dict(threshold=0.2), dict(k=2, threshold=0.0)], ids=str)
def test_sub_centres_and_filtering_match_the_oracle(features, dtype, tiling):
    """In the C++ kernels, both strategies, against the float64 reference (prediction over every class)."""
    k, threshold = features.get("k", 1), features.get("threshold")
    x, W, y = make_inputs(B, C * k, D, dtype, ignore=2)
    y[y >= C] = y[y >= C] % C
    margin = mo.SubCenter(mo.ArcFace(0.4), k) if k > 1 else mo.ArcFace(0.4)
    check_against_reference(x, W, y, margin, 16.0, backend="native", interclass_filtering_threshold=threshold,
                            **TILINGS[tiling])


def test_sub_centre_gradient_reaches_only_the_first_maximal_row():
    Cs, k = 9, 3
    x, W, y = make_inputs(4, Cs * k, 5)
    y = y % Cs
    W = W.view(Cs, k, 5)
    W[:, 2] = W[:, 0]  # a tie in every class between sub-centres 0 and 2 (the gradient must go to 0)
    W = W.reshape(Cs * k, 5)
    for strategy in ("workspace", "recompute"):
        out = run(x, W, y, mo.SubCenter(mo.ArcFace(0.3), k), 10.0, backend="native", strategy=strategy,
                  chunk_size=4)
        grads = out.W_grad.view(Cs, k, 5)
        assert grads[:, 2].abs().sum() == 0 and grads[:, :2].abs().sum() > 0


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
    """Class rows repeat every 5 classes, so each row's maximum lies in many tiles and groups: the prediction
    is its first class. The oracle is exact by construction: small-integer vectors and a power-of-two scale
    without normalization make every logit an exact integer in any summation order, so the expected class is
    the first maximum of five integer dot products, whatever BLAS rounds."""
    monkeypatch.setattr(native, "GROUPS", groups)
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-3, 4, (9, D), generator=gen).double()
    base = torch.randint(-3, 4, (5, D), generator=gen).double()
    W = base[torch.arange(40) % 5].contiguous()
    y = torch.tensor([0, 7, 13, 39, 22, 5, 1, 30, 2])
    ours = run(x, W, y, mo.CosFace(0.3), 0.125, backend="native", chunk_size=4, strategy=strategy, normalize=False)
    dots = (x.long() @ base.long().t())  # exact integers
    top = dots.amax(1, keepdim=True)
    expect = (dots == top).long().argmax(1)  # the first of the five classes holding the maximum
    target_dot = (x.long() * base[y % 5].long()).sum(1)
    y_first = torch.where((target_dot == top.squeeze(1)) & (y < expect), y, expect)  # the target may come first
    assert torch.equal(ours.stats.prediction, y_first)
    ref = run(x, W, y, mo.CosFace(0.3), 0.125, backend="reference", normalize=False)
    torch.testing.assert_close(ours.loss, ref.loss, rtol=1e-12, atol=1e-12)
