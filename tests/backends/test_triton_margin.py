"""The Triton backend against the float64 reference: in the interpreter on CPU, compiled on a GPU.

Without CUDA the kernels run under the Triton interpreter: ``TRITON_INTERPRET=1``
is set below, before triton is first imported, and stays set for the session.
Tests marked ``cuda`` need a GPU and skip cleanly without one.

Shapes are ragged on purpose: B = 37, C = 300, D = 40 divide no block size.
``SMALL`` tiles (16 x 32 x 16) make the same problems walk several row blocks,
class tiles and D steps; the shipped configs cover them in one row block.
``TMA_IN_INTERPRETER`` runs the tensor-descriptor loads of sm_90 on the CPU too.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("triton") is None:  # not importorskip: triton must not be imported yet
    pytest.skip("triton is not installed", allow_module_level=True)

CUDA = torch.cuda.is_available()
if not CUDA:
    # Before triton itself is imported (its standard library, tl.max, tl.sum, ..., is decorated then), and
    # left set: the first launch imports more of triton, which checks it again. Nothing else in the suite
    # uses triton.
    os.environ["TRITON_INTERPRET"] = "1"
import triton

import marginops as mo
from marginops.backends import BACKENDS, resolve_backend
from marginops.backends import triton_config as tc
from marginops.backends import triton_margin as tm
from marginops.backends import triton_plan as tp

from ..conftest import assert_close_to_oracle, check_against_reference, make_inputs, run
from .ranges import LABELS_13, check_ranges_match_whole

DEVICE = "cuda" if CUDA else "cpu"
REPO_ROOT = Path(__file__).resolve().parents[2]
B, C, D = 37, 300, 40
SMALL = tc.KernelConfig(16, 32, 16, 4, 1)
SMALL_TMA = tc.KernelConfig(16, 32, 16, 4, 1, tma=True)
#: the kernels whose tiles the ``tiles`` fixture shrinks (the streaming ones keep theirs)
TILED = ("fwd", "ws", "ws_pred", "grad", "bwd_dx", "sub_fwd", "sub_grad", "from_exp")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled kernels)")

if not CUDA and (not tm.is_interpreted() or isinstance(triton.language.standard.sum, triton.runtime.JITFunction)):
    raise RuntimeError("triton (or marginops.backends.triton_margin) was imported before this module could set "
                       "TRITON_INTERPRET=1; the interpreter tests need it set first")


def use_tiles(monkeypatch, cfg):
    for kernel in TILED:
        for dtype in tc.DTYPES:
            monkeypatch.setitem(tc.DEFAULTS[kernel], dtype, cfg)


@pytest.fixture(params=["shipped", "small"])
def tiles(request, monkeypatch):
    """Run with the shipped configs, or with SMALL tiles for every dtype and every logits kernel."""
    if request.param == "small":
        use_tiles(monkeypatch, SMALL)
    return request.param


@pytest.fixture
def tma(monkeypatch):
    """Tensor-descriptor (TMA) loads in the interpreter for configs that ask for them."""
    monkeypatch.setattr(tm, "TMA_IN_INTERPRETER", True)


def check(x, W, y, margin=None, scale=64.0, **options):
    return check_against_reference(x.to(DEVICE), W.to(DEVICE), y.to(DEVICE), margin, scale, backend="triton",
                                   **options)


def inputs(dtype=torch.float32, b=B, c=C, d=D, **kwargs):
    return make_inputs(b, c, d, dtype, **kwargs)


# -- against the reference ----------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("margin", [None, mo.ArcFace(0.5)], ids=repr)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(tiles, dtype, margin, reduction):
    # ignore_index rows and a duplicated label (rows 0 and 1) in every problem
    x, W, y = inputs(dtype, ignore=3)
    check(x, W, y, margin, reduction=reduction)


@pytest.mark.parametrize("margin", [mo.CosFace(0.35), mo.SphereFace(4), mo.CombinedMargin(0.9, 0.4, 0.15)], ids=repr)
def test_other_margins(margin):
    # the kernels never see the margin (it only moves z): one dtype and reduction suffice
    x, W, y = inputs(ignore=3)
    check(x, W, y, margin, reduction="none")


@pytest.mark.parametrize("chunk_size", [1, 70, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_class_splits_match_reference(tiles, dtype, chunk_size):
    # chunk_size = classes per program, rounded up to whole tiles: several splits whose partial
    # (max, sum) pairs and argmaxes are combined after the kernel
    x, W, y = inputs(dtype, ignore=2)
    check(x, W, y, mo.ArcFace(0.5), chunk_size=chunk_size, label_smoothing=0.1)


@pytest.mark.parametrize("label_smoothing", [0.1, 1.0])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_label_smoothing_and_normalize(tiles, reduction, normalize, label_smoothing):
    x, W, y = inputs(ignore=3)
    check(x, W, y, mo.CosFace(0.35), 64.0 if normalize else 1.5, normalize=normalize, reduction=reduction,
          label_smoothing=label_smoothing)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_label_smoothing_and_normalize_false(dtype):
    x, W, y = inputs(dtype, ignore=3)
    check(x, W, y, mo.ArcFace(0.5), label_smoothing=0.2)
    check(x, W, y, mo.CosFace(0.35), 1.5, normalize=False, reduction="none")


@pytest.mark.parametrize("margin", ["per-row-cosface", "per-row-arcface", "callable"])
def test_per_row_and_callable_margins(tiles, margin):
    psi = {
        "per-row-cosface": mo.CosFace(torch.linspace(0.0, 0.6, B)),
        "per-row-arcface": mo.ArcFace(torch.linspace(0.1, 2.5, B, dtype=torch.float64)),
        "callable": lambda t: t - 0.2 * t * t - 0.1,
    }[margin]
    x, W, y = inputs(ignore=2)
    check(x, W, y, psi, label_smoothing=0.1)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_scalar_and_per_row_upstream_gradients(reduction):
    x, W, y = inputs(ignore=2)
    v = torch.randn(B, dtype=torch.float64) if reduction == "none" else torch.tensor(-2.5, dtype=torch.float64)
    grads = {}
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float64)):
        xl = x.to(DEVICE, dtype).requires_grad_()
        Wl = W.to(DEVICE, dtype).requires_grad_()
        loss = mo.margin_cross_entropy(xl, Wl, y.to(DEVICE), mo.ArcFace(0.5), backend=backend, reduction=reduction,
                                       label_smoothing=0.1)
        grads[backend] = torch.autograd.grad(loss, (xl, Wl), v.to(DEVICE, dtype))
    for name, ours, ref in zip(("x.grad", "W.grad"), grads["triton"], grads["reference"]):
        assert_close_to_oracle(ours, ref, tol=1e-5, name=name)


@pytest.mark.parametrize("strategy", ["recompute", "workspace"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_strided_inputs(dtype, strategy):
    # transposed views (feature stride != 1), e.g. a weight stored as (D, C): every kernel takes strides
    x, W, y = inputs(dtype, ignore=2)
    x_t = x.t().contiguous().t()
    W_t = W.t().contiguous().t()
    assert x_t.stride(1) != 1 and W_t.stride(1) != 1
    out = check(x_t, W_t, y, mo.ArcFace(0.5), label_smoothing=0.1, strategy=strategy, memory_budget=50_000)
    assert out.W_grad.shape == W.shape


@pytest.mark.parametrize("strategy", ["recompute", "workspace"])
@pytest.mark.parametrize("scale", [1e-3, 1e3], ids=["tiny-scale", "huge-scale"])
def test_extreme_scales_and_cosines_of_plus_minus_one(scale, strategy):
    # s = 1e3 drives most probabilities to 0 and a few rows' LSE to their largest logit; s = 1e-3 makes
    # every class nearly equally likely. Rows 0-3 hold t = +-1 exactly (up to the norms' rounding).
    x, W, y = inputs(torch.float64, ignore=2)
    x[0] = 2.5 * W[y[0]]
    x[2] = -W[y[2]]
    x[3] = W[y[3]]
    out = check(x, W, y, mo.CosFace(0.35), scale, label_smoothing=0.1, strategy=strategy)
    assert all(bool(torch.isfinite(t).all()) for t in (out.loss, out.x_grad, out.W_grad))


def test_ignore_index_may_be_a_valid_class():
    x, W, y = inputs()
    y[[2, 5, 6]] = 3  # rows labelled 3 are ignored; class 3 still competes in every other row
    out = check(x, W, y, mo.ArcFace(0.5), ignore_index=3)
    assert torch.equal(out.x_grad[[2, 5, 6]].cpu(), torch.zeros(3, D))


def test_many_duplicate_labels(tiles):
    x, W, y = inputs()
    y[: B // 2] = 7  # half the batch on one class: its dW row gathers many contributions
    y[B // 2:] = C - 1  # the other half on the last class (in the ragged last tile)
    check(x, W, y, mo.ArcFace(0.5), reduction="sum")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_grad_only_for_one_input(dtype):
    x, W, y = inputs(dtype, ignore=2)
    check(x, W, y, mo.ArcFace(0.5), grad_x=False)
    check(x, W, y, mo.ArcFace(0.5), grad_W=False)


def test_single_class_and_empty_and_all_ignored_batches():
    x, W, y = inputs(c=1)
    check(x, W, y, mo.CosFace(0.35), reduction="none")  # no non-target class: N = -inf, loss 0
    x, W, y = inputs(b=0)
    out = run(x.to(DEVICE), W.to(DEVICE), y.to(DEVICE), mo.ArcFace(0.5), backend="triton")
    assert out.loss.item() == 0.0 and out.x_grad.shape == (0, D) and not out.W_grad.any()
    x, W, y = inputs(ignore=B)
    out = check(x, W, y, mo.ArcFace(0.5))
    assert out.loss.item() == 0.0 and not out.x_grad.any() and not out.W_grad.any()


def test_gradcheck_float64():
    x, W, y = inputs(torch.float64, b=5, c=9, d=4, ignore=1)
    x, W = x.to(DEVICE).requires_grad_(), W.to(DEVICE).requires_grad_()

    def f(x, W):
        return mo.margin_cross_entropy(x, W, y.to(DEVICE), mo.ArcFace(0.5), 8.0, backend="triton",
                                       reduction="none", label_smoothing=0.1)

    assert torch.autograd.gradcheck(f, (x, W))


def test_retain_graph_second_backward():
    x, W, y = inputs(ignore=2)
    x, W = x.to(DEVICE).requires_grad_(), W.to(DEVICE).requires_grad_()
    loss = mo.margin_cross_entropy(x, W, y.to(DEVICE), mo.ArcFace(0.5), backend="triton")
    first = torch.autograd.grad(loss, (x, W), retain_graph=True)
    second = torch.autograd.grad(loss, (x, W))
    ref = run(x, W, y.to(DEVICE), mo.ArcFace(0.5), dtype=torch.float64, backend="reference")
    for a, b, r, name in zip(first, second, (ref.x_grad, ref.W_grad), "xW"):
        assert torch.equal(a, b) or CUDA, f"{name}.grad differs between two backwards in the interpreter"
        assert_close_to_oracle(a, r, tol=1e-5, name=f"{name}.grad")


def _peak_torch_allocation(fn) -> int:
    """Peak bytes of PyTorch CPU allocations while ``fn`` runs (the profiler's memory events; the
    interpreter's own NumPy copies are not PyTorch allocations and do not count)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    if not events or not hasattr(events[0], "nbytes"):
        pytest.skip("this torch's profiler gives no per-allocation sizes")
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.skipif(CUDA, reason="measures CPU allocations; the GPU test measures max_memory_allocated")
@pytest.mark.parametrize("dtype, strategy, budget", [(torch.bfloat16, "recompute", 2**16),
                                                     (torch.float32, "recompute", 2**16),
                                                     (torch.bfloat16, "workspace", 2**19),
                                                     (torch.bfloat16, "auto", None),
                                                     (torch.float16, "auto", None)], ids=str)
def test_extra_memory_is_the_formula(dtype, strategy, budget):
    # one training step beyond its gradients: the backend's own scratch (tm.scratch_bytes: workspace or
    # chunks, the fp32 dW accumulator, dxh, the dW operand), plus B x D temporaries (normalized rows, the
    # target term's backward in marginops.ops: about 28 bytes per element of x), C-sized vectors and, on CPU,
    # the product pieces where PyTorch cannot accumulate into a float32 output in place (tm.PIECE_BYTES)
    b, c, d = 128, 2048, 64
    x, W, y = inputs(dtype, b=b, c=c, d=d)
    x.requires_grad_()
    W.requires_grad_()

    def step():
        mo.margin_cross_entropy(x, W, y, mo.ArcFace(0.5), backend="triton", memory_budget=budget,
                                strategy=strategy).backward()

    step()
    x.grad = W.grad = None  # freed before the profiler starts: it sees allocations only, then frees of them
    extra = _peak_torch_allocation(step) - (b + c) * d * dtype.itemsize
    opts = tm.FusedOptions(scale=64.0, memory_budget=budget, strategy=strategy)
    terms = tm.scratch_bytes(b, c, d, dtype, opts)
    print(f"{strategy} {dtype}: extra {extra / 2**20:.2f} MiB, formula {terms}")
    if strategy == "recompute":
        assert terms["total"] < b * c * dtype.itemsize  # below one B x C logits tensor
    assert extra <= terms["total"] + 28 * b * d + 32 * c + 3 * tm.PIECE_BYTES
    assert extra >= terms["total"] // 2  # the formula is not a loose bound (the GPU check compares it exactly)


# -- prediction ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [None, 64])
def test_prediction_is_the_first_argmax_across_tiles_and_splits(tiles, chunk_size):
    x, W, y = inputs(torch.float64)
    for c in (50, 150, 290):  # copies of class 5 in later tiles and splits tie with it
        W[c] = W[5]
    x[:4] = W[5] * 3.0  # rows 0-3 point at class 5 (row 0's label is the target itself)
    y[2] = 150
    out = run(x.to(DEVICE), W.to(DEVICE), y.to(DEVICE), mo.CosFace(0.35), backend="triton", chunk_size=chunk_size)
    ref = run(x, W, y, mo.CosFace(0.35), backend="reference")
    assert out.stats.prediction[:4].tolist() == [5, 5, 5, 5]
    assert torch.equal(out.stats.prediction.cpu(), ref.stats.prediction)


def test_prediction_not_computed_unless_asked(monkeypatch):
    asked = []
    real = tm.margin_fwd_splits

    def spy(*args, **kwargs):
        asked.append(kwargs.get("want_prediction", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(tm, "margin_fwd_splits", spy)
    x, W, y = (t.to(DEVICE) for t in inputs())
    mo.margin_cross_entropy(x, W, y, backend="triton")
    assert asked and not any(asked)  # the forward kernel ran without its argmax
    asked.clear()
    _, stats = mo.margin_cross_entropy(x, W, y, backend="triton", return_stats=True)
    assert asked and all(asked)
    ref = mo.margin_cross_entropy(x.cpu(), W.cpu(), y.cpu(), backend="reference", return_stats=True)[1]
    assert torch.equal(stats.prediction.cpu(), ref.prediction)


# -- launchers -----------------------------------------------------------------------------------------

def _logits64(x, W, scale):
    xh = torch.nn.functional.normalize(x.double(), dim=1)
    wh = torch.nn.functional.normalize(W.double(), dim=1)
    return scale * xh @ wh.t()


@pytest.mark.parametrize("classes", [None, 32, 100, C])
def test_fwd_launcher_against_logsumexp(classes):
    x, W, y = inputs(torch.float32)
    x, W, y = x.to(DEVICE), W.to(DEVICE), y.to(DEVICE)
    inv_x = 1 / x.norm(dim=1)
    inv_w = 1 / W.norm(dim=1)
    N, pred, _ = tm.margin_fwd(x, W, y, 30.0 * inv_x, inv_w, want_prediction=True, classes=classes, config=SMALL)
    logits = _logits64(x.cpu(), W.cpu(), 30.0)
    masked = logits.scatter(1, y.cpu().unsqueeze(1), float("-inf"))
    assert_close_to_oracle(N, torch.logsumexp(masked, 1), tol=1e-6, name="N")
    assert torch.equal(pred.cpu(), logits.argmax(1))


def _g_reference(x, W, y, s, eps, lse, coef):
    inv_w = 1 / W.norm(dim=1)
    logits = _logits64(x.cpu(), W.cpu(), s)
    ref = (torch.exp(logits - lse.cpu().double().unsqueeze(1)) - eps / W.shape[0]) * inv_w.cpu().double()
    return (coef.cpu().double().unsqueeze(1) * ref).scatter(1, y.cpu().unsqueeze(1), 0.0), logits


def test_grad_launcher_matches_the_formula():
    # one chunk of classes [c0, c1) and a row range, labels global: the launcher as the passes use it
    x, W, y = (t.to(DEVICE) for t in inputs(torch.float32))
    s, eps = 30.0, 0.1
    inv_x, inv_w = 1 / x.norm(dim=1), 1 / W.norm(dim=1)
    lse = torch.logsumexp(_logits64(x.cpu(), W.cpu(), s), 1).float().to(DEVICE) + 0.3  # any value >= the logits
    coef = torch.randn(B, device=DEVICE)
    coef[[3, 8]] = 0.0
    ref, _ = _g_reference(x, W, y, s, eps, lse, coef)
    r0, r1, c0, c1 = 5, 30, 70, 250
    G = torch.full((r1 - r0, c1 - c0), float("nan"), device=DEVICE)
    tm.margin_grad(x[r0:r1], W[c0:c1], y[r0:r1], s * inv_x[r0:r1], inv_w[c0:c1], lse[r0:r1], coef[r0:r1], G,
                   label_offset=c0, smoothing=eps / C, config=SMALL)
    assert ((y[r0:r1] >= c0) & (y[r0:r1] < c1)).any(), "the chunk must hold some targets"
    assert_close_to_oracle(G, ref[r0:r1, c0:c1], tol=1e-5, name="G")


def test_grad_from_exp_launcher_matches_the_formula():
    # what a forward leaves: exp2(base-2 logit - shift of its tile), any shift >= the tile's logits; G in place
    x, W, y = (t.to(DEVICE) for t in inputs(torch.float32))
    s, eps = 30.0, 0.1
    lse = torch.logsumexp(_logits64(x.cpu(), W.cpu(), s), 1).float().to(DEVICE) + 0.3
    coef = torch.randn(B, device=DEVICE)
    ref, logits = _g_reference(x, W, y, s, eps, lse, coef)
    ws = tm.ExpWorkspace.allocate(B, C, torch.float32, DEVICE, tile_c=64)
    T = ws.shift.shape[1]
    l2 = logits * tp.math.log2(tp.math.e)
    padded = torch.nn.functional.pad(l2, (0, T * 64 - C), value=float("-inf"))
    shift = padded.view(B, T, 64).amax(2) + torch.rand(B, T)
    ws.exp.copy_(torch.exp2(l2 - shift[:, torch.arange(C) // 64]))
    ws.shift.copy_(shift)
    assert ws.exp.stride(0) == tp.padded(C, torch.float32) and ws.exp.stride(0) % 4 == 0  # 16-byte rows
    G, flags, _ = tm.grad_from_exp(ws, y, 1 / W.norm(dim=1), lse, coef, smoothing=eps / C)
    assert G.data_ptr() == ws.exp.data_ptr() and flags is None
    assert_close_to_oracle(G, ref, tol=1e-5, name="G")


def test_workspace_launchers_check_their_buffers():
    x, W, y = (t.to(DEVICE) for t in inputs(torch.float32))
    ones = torch.ones(B, device=DEVICE)
    tile_c = tc.config_for("ws", torch.float32).block_c
    good = tm.ExpWorkspace.allocate(B, C, torch.float32, DEVICE, tile_c)
    with pytest.raises(ValueError, match="workspace does not fit"):
        tm.margin_fwd(x, W, y, ones, None, workspace=good.rows(0, B - 1))
    with pytest.raises(ValueError, match="tile_c"):
        tm.margin_fwd(x, W, y, ones, None, workspace=good, config=SMALL)
    G = torch.empty(B, 50, device=DEVICE)
    with pytest.raises(ValueError, match="out must be"):
        tm.margin_grad(x, W[:50], y, ones, None, ones, ones, G.double())


def test_masked_mm_launcher_skips_exactly_the_flagged_off_tiles():
    a = torch.randn(45, 70, dtype=torch.float64)
    b = torch.randn(70, 33, dtype=torch.float64)
    flags = (torch.rand(3, 5) > 0.4).to(torch.int8)  # tiles of 16 rows x 16 columns of a
    keep = flags.repeat_interleave(16, 0).repeat_interleave(16, 1)[:45, :70].double()
    out = torch.full((45, 33), 2.0, dtype=torch.float64, device=DEVICE)  # overwritten
    tm.masked_mm(a.to(DEVICE), b.to(DEVICE), out, flags.to(DEVICE), mask_m=16, block_k=16)
    ref = (a * keep) @ b
    assert_close_to_oracle(out, ref, tol=1e-12, name="masked product")
    # the transposed product (the dW side): flags read transposed, accumulated into out
    out_t = torch.ones(70, 33, dtype=torch.float64).to(DEVICE)
    c = torch.randn(45, 33, dtype=torch.float64)
    tm.masked_mm(a.t().to(DEVICE), c.to(DEVICE), out_t, flags.to(DEVICE), mask_m=16, block_k=16,
                 transposed_flags=True, accumulate=True)
    assert_close_to_oracle(out_t, 1.0 + (a * keep).t() @ c, tol=1e-12, name="transposed masked product")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_finish_w_launcher_matches_the_normalization_backward(dtype):
    # D = 300 walks two feature steps (the second ragged); rows 2 and 5 have a clamped (zero) norm
    Cc, Dd = 37, 300
    W = torch.randn(Cc, Dd, dtype=torch.float64)
    W[[2, 5]] = 0.0
    dD = torch.randn(Cc, Dd, dtype=torch.float64)
    norm = W.norm(dim=1)
    inv, clamped = 1 / norm.clamp_min(1e-12), norm <= 1e-12
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.empty(Cc, Dd, dtype=dtype, device=DEVICE)
    tm.finish_w(dD.to(DEVICE, acc), W.to(DEVICE, dtype), inv.to(DEVICE, acc), clamped.to(DEVICE), out)
    Wr = W.to(dtype).double()  # the kernel sees W rounded to its dtype
    coef = torch.where(clamped, 0.0, inv * inv)
    ref = dD - Wr * (coef * (dD * Wr).sum(1)).unsqueeze(1)
    assert_close_to_oracle(out[[2, 5]], dD[[2, 5]], name="dW of clamped rows (passed through)")
    # bf16: the interpreter truncates fp32 -> bf16 stores (a GPU rounds to nearest): the default 2-ulp bound
    assert_close_to_oracle(out, ref, tol=None if dtype == torch.bfloat16 else 1e-5, name="dW")


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the interpreter's float16 inf rows
@pytest.mark.parametrize("strategy", ["recompute", "workspace"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_zero_weight_rows_keep_x_grad_finite(dtype, strategy):
    # zero-padded classes: 1 / max(|W_j|, eps) = 1e12 must not reach a float16 G (it would overflow,
    # and inf * 0 would turn x.grad into NaN); compare with the torch backend (float32 inside)
    x, W, y = inputs(dtype, ignore=2)
    W[[4, 150, C - 1]] = 0.0
    y[y == 150] = 151
    ours = run(x.to(DEVICE), W.to(DEVICE), y.to(DEVICE), mo.ArcFace(0.5), 30.0, backend="triton",
               strategy=strategy, reduction="sum")
    ref = run(x, W, y, mo.ArcFace(0.5), 30.0, backend="torch", reduction="sum")
    assert torch.isfinite(ours.loss) and torch.isfinite(ours.x_grad).all()
    assert_close_to_oracle(ours.x_grad.float(), ref.x_grad.double(), tol=2e-2, name="x.grad")
    rows = torch.ones(C, dtype=torch.bool)
    rows[[4, 150, C - 1]] = False
    # the zero rows' gradients are 1e12-scale (F.normalize's x / eps): inf in float16 for both backends
    assert torch.equal(torch.isfinite(ours.W_grad.cpu()), torch.isfinite(ref.W_grad))
    assert_close_to_oracle(ours.W_grad[rows].float(), ref.W_grad[rows].double(), tol=2e-2, name="W.grad")


def test_gradients_repeat_bitwise_and_match_across_chunkings():
    # no atomics anywhere: two runs agree bit for bit; chunkings agree to rounding
    x, W, y = inputs(torch.float32, ignore=2)
    y[:6] = 7  # duplicate labels: the target-row scatter must be reproducible too
    runs = [run(x.to(DEVICE), W.to(DEVICE), y.to(DEVICE), mo.ArcFace(0.5), backend="triton", label_smoothing=0.1,
                memory_budget=budget) for budget in (None, None, 40_000)]
    assert torch.equal(runs[0].x_grad, runs[1].x_grad) and torch.equal(runs[0].W_grad, runs[1].W_grad)
    assert_close_to_oracle(runs[2].x_grad, runs[0].x_grad.double(), tol=1e-5, name="x.grad, small chunks")
    assert_close_to_oracle(runs[2].W_grad, runs[0].W_grad.double(), tol=1e-5, name="W.grad, small chunks")


# -- the two strategies and the memory budget ------------------------------------------------------

@pytest.mark.parametrize("dtype, budget, fused", [
    *[(d, b, True) for d in (torch.float32, torch.bfloat16) for b in (None, 3_000, 200_000)],
    (torch.float32, 3_000, False), (torch.bfloat16, 200_000, False), (torch.float16, None, True),
    (torch.float16, 200_000, False)], ids=str)
def test_recompute_chunks_within_any_budget(dtype, budget, fused, monkeypatch):
    # small budgets split G into several class chunks, then into row blocks too; D = 40 takes the backward
    # that forms dX in the same pass unless it is switched off
    if not fused:
        monkeypatch.setitem(tm.FUSED_DX_MAX_D, dtype, 0)
    calls = []
    real = tm.margin_bwd_dx
    monkeypatch.setattr(tm, "margin_bwd_dx", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, W, y = inputs(dtype, ignore=2)
    check(x, W, y, mo.ArcFace(0.5), label_smoothing=0.1, memory_budget=budget, strategy="recompute")
    assert bool(calls) == fused


def test_fused_dx_launcher_matches_the_formula(monkeypatch):
    # several class splits (as on a GPU with many SMs), their partials summed in order; rows of G as
    # margin_grad writes them; normalized rows for the unscaled G of float16
    monkeypatch.setattr(tm, "_slots", lambda device, cfg: 64)
    x, W, y = (t.to(DEVICE) for t in inputs(torch.float32))
    s, eps = 30.0, 0.1
    inv_x, inv_w = 1 / x.norm(dim=1), 1 / W.norm(dim=1)
    lse = torch.logsumexp(_logits64(x.cpu(), W.cpu(), s), 1).float().to(DEVICE) + 0.3
    coef = torch.randn(B, device=DEVICE)
    ref, _ = _g_reference(x, W, y, s, eps, lse, coef)
    for scale_g in (True, False):
        G = torch.full((B, C), float("nan"), device=DEVICE)
        dx = tm.margin_bwd_dx(x, W, y, s * inv_x, inv_w, lse, coef, G, smoothing=eps / C, scale_g=scale_g,
                              config=tc.KernelConfig(16, 32, 0, 4, 1))
        Gref = ref if scale_g else ref / inv_w.cpu().double()
        assert_close_to_oracle(G, Gref, tol=1e-5, name="G")
        rows = W.cpu().double() if scale_g else torch.nn.functional.normalize(W.cpu().double(), dim=1)
        assert_close_to_oracle(dx, Gref @ rows, tol=1e-5, name="dX")
    with pytest.raises(ValueError, match="D <= "):
        tm.margin_bwd_dx(x.repeat(1, 4), W.repeat(1, 4), y, inv_x, inv_w, lse, coef, G)


@pytest.mark.parametrize("budget", [None, 8_000], ids=["one-block", "row-blocks"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_workspace_strategy_matches_reference(tiles, dtype, reduction, budget, monkeypatch):
    blocks = []
    real_fwd = tm.margin_fwd_splits
    monkeypatch.setattr(tm, "margin_fwd_splits", lambda x, *a, **k: blocks.append(len(x)) or real_fwd(x, *a, **k))
    x, W, y = inputs(dtype, ignore=3)
    out = check(x, W, y, mo.ArcFace(0.5), reduction=reduction, label_smoothing=0.1, memory_budget=budget,
                strategy="workspace")
    ref = run(x, W, y, mo.ArcFace(0.5), backend="reference", reduction=reduction, label_smoothing=0.1)
    assert torch.equal(out.stats.prediction.cpu(), ref.stats.prediction)
    # the forward ran block by block over the rows (the workspace holds one block)
    opts = tm.FusedOptions(scale=64.0, memory_budget=budget, strategy="workspace")
    pl = tp.workspace_plan(B, C, D, dtype, opts, tc.config_for("ws", dtype).block_c)
    assert (pl.blocks == 1) == (budget is None)
    assert sum(blocks) == B and len(blocks) == pl.blocks, blocks


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_workspace_hands_over_dW_in_the_weight_dtype(dtype, normalize, monkeypatch):
    # one block of a plain head: cuBLAS writes dW directly; several blocks or a normalization: a float32
    # accumulator for 16-bit weights (the accumulation dtype's dW for float32 ones)
    handed = []
    real = tm.forward_with_grads
    monkeypatch.setattr(tm, "forward_with_grads", lambda *a: handed.append(real(*a)) or handed[-1])
    x, W, y = inputs(dtype, ignore=2)
    for budget in (None, 20_000):
        check(x, W, y, None if not normalize else mo.ArcFace(0.5), 64.0 if normalize else 1.0,
              normalize=normalize, memory_budget=budget, strategy="workspace")
        _, dx, dW = handed.pop()
        assert dW.dtype == dtype and dx.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_recompute_hands_over_dW_in_the_input_dtype(dtype, monkeypatch):
    # no fp32 C x D copy of the weight gradient: chunks are finished straight into W.grad's dtype
    handed = []
    real = tm.recompute_grads
    monkeypatch.setattr(tm, "recompute_grads", lambda *a: handed.append(real(*a)) or handed[-1])
    x, W, y = inputs(dtype, ignore=2)
    check(x, W, y, mo.ArcFace(0.5), memory_budget=40_000, strategy="recompute")
    (dx, dW), = handed
    assert dW.dtype == dtype and dx.dtype == torch.float32


def test_workspace_strategy_second_backward_and_upstream_scale():
    x, W, y = inputs(ignore=2)
    x, W = x.to(DEVICE).requires_grad_(), W.to(DEVICE).requires_grad_()
    loss = mo.margin_cross_entropy(x, W, y.to(DEVICE), mo.ArcFace(0.5), backend="triton", strategy="workspace")
    first = torch.autograd.grad(loss, (x, W), torch.tensor(-3.0, device=DEVICE), retain_graph=True)
    second = torch.autograd.grad(loss, (x, W), torch.tensor(-3.0, device=DEVICE))  # the saved gradients again
    ref = run(x, W, y.to(DEVICE), mo.ArcFace(0.5), dtype=torch.float64, backend="reference")
    for a, b, r, name in zip(first, second, (ref.x_grad, ref.W_grad), "xW"):
        assert_close_to_oracle(a, -3.0 * r, tol=1e-5, name=f"{name}.grad (workspace)")
        assert torch.equal(a, b), f"{name}.grad differs between two backward passes over one graph"


def test_workspace_strategy_refuses_what_it_cannot_do():
    x, W, y = (t.to(DEVICE) for t in inputs())
    with pytest.raises(ValueError, match="reduction='none'"):
        mo.margin_cross_entropy(x, W, y, backend="triton", strategy="workspace", reduction="none")
    with pytest.raises(ValueError, match=r"memory_budget >= \d+ bytes"):
        mo.margin_cross_entropy(x, W.requires_grad_(), y, backend="triton", strategy="workspace", memory_budget=100)
    with pytest.raises(ValueError, match="strategy must be one of"):
        mo.margin_cross_entropy(x, W, y, backend="triton", strategy="fused")
    # without gradients the workspace is not needed: a plain forward
    with torch.no_grad():
        loss = mo.margin_cross_entropy(x, W, y, backend="triton", strategy="workspace", memory_budget=100)
    assert torch.isfinite(loss)


def test_chunk_plan():
    cfg = SMALL
    big = tp.chunk_plan(1000, 100_000, 64, torch.bfloat16, 2**30, cfg)
    assert big.rows == 1000 and big.chunk == 100_000  # everything fits at once
    mid = tp.chunk_plan(1000, 100_000, 64, torch.bfloat16, 2**22, cfg)
    assert mid.rows == 1000 and mid.chunk % 32 == 0 and mid.buffer_bytes <= 2**22
    assert mid.chunk * (1000 * 2 + 64 * 4) <= 2**22  # G and the fp32 dD chunk
    unscaled = tp.chunk_plan(1000, 100_000, 64, torch.float16, 2**22, cfg, scaled_g=False)
    assert unscaled.chunk * (1000 * 2 + 64 * 6) <= 2**22 and unscaled.chunk < mid.chunk  # + normalized rows
    small = tp.chunk_plan(1000, 100_000, 64, torch.float32, 10_000, cfg)
    assert (small.rows, small.chunk) == (16, 32)  # the floor: one tile
    assert tp.chunk_plan(0, 10, 8, torch.float32, 2**20, cfg).rows == 1


def test_workspace_plan_and_default_budget():
    opts = tm.FusedOptions(scale=1.0)
    row = tp.workspace_row_bytes(1000, torch.float32, 64)
    assert row == 1000 * 4 + 16 * 4  # exponentials and one shift per 64-class tile
    assert tp.workspace_row_bytes(1001, torch.bfloat16, 64) == 1008 * 2 + 16 * 4  # rows padded to 16 bytes
    ten = tm.FusedOptions(scale=1.0, memory_budget=10 * row + 1)
    assert tp.workspace_plan(1000, 1000, 8, torch.float32, ten, 64).rows == 10
    assert tp.workspace_plan(25, 1000, 8, torch.float32, ten, 64).rows == 9  # 3 even blocks, not 10+10+5
    assert tp.workspace_plan(25, 1000, 8, torch.float32, tm.FusedOptions(scale=1.0, memory_budget=4000), 64) is None
    # the default: one block of all rows when it costs no more than the weight's bytes plus the fp32
    # accumulator it saves, else blocks of about D rows (the weight's bytes)
    MiB = 2**20

    def default(B, C, D, normalize=True, device_bytes=None):
        return tp.workspace_plan(B, C, D, torch.bfloat16, tm.FusedOptions(scale=1.0, normalize=normalize), 128,
                                 device_bytes)

    llm = default(8192, 128_256, 4096, normalize=False)  # plain LLM head: one block, dW straight from cuBLAS
    assert (llm.blocks, llm.fp32_accumulator) == (1, False)
    assert llm.workspace_bytes + 8192 * 4096 * 4 < 2995 * MiB  # a quarter of the naive head's extra (11.7 GiB)
    cce = default(8192, 256_000, 2304)  # B > 3 D: blocks of about D rows and the fp32 accumulator
    assert cce.blocks == 4 and cce.fp32_accumulator and cce.rows == 2048
    face = default(1024, 2_000_000, 512)
    assert face.blocks == 1 and face.fp32_accumulator  # the normalization backward needs it
    capped = default(1024, 2_000_000, 512, device_bytes=16 * 2**30)  # 1/8 of a 16 GiB card
    assert capped.blocks > 1 and capped.workspace_bytes <= 2 * 2**30
    assert tp.default_budget(10, 10, torch.float32) == mo.DEFAULT_MEMORY_BUDGET


def test_auto_takes_the_workspace_where_it_applies():
    f = tm.FusedOptions
    bf = torch.bfloat16
    assert tm.uses_workspace(B, C, D, bf, bf, f(scale=1.0))
    assert not tm.uses_workspace(B, C, D, bf, bf, f(scale=1.0, reduce=False))  # reduction="none"
    assert not tm.uses_workspace(B, C, D, bf, bf, f(scale=1.0, need_x=False, need_W=False))  # no gradients
    assert not tm.uses_workspace(B, C, D, bf, bf, f(scale=1.0, class_start=5, num_classes=400))  # a range
    assert not tm.uses_workspace(B, 3 * C, D, bf, bf, f(scale=1.0, sub_centers=3))
    assert not tm.uses_workspace(B, C, D, bf, bf, f(scale=1.0, strategy="recompute"))
    assert not tm.uses_workspace(1000, C, D, bf, bf, f(scale=1.0, memory_budget=60 * 700))  # blocks < 128 rows
    assert tm.uses_workspace(1000, C, D, bf, bf, f(scale=1.0, memory_budget=60 * 700, strategy="workspace"))
    assert tm.weight_grad_dtype(bf, bf, f(scale=1.0, strategy="workspace")) == bf


def test_class_splits_fill_the_device():
    # B = 8192 in 128-row blocks (64) x 2000 class tiles on 132 SMs x 2 programs: the grid's waves are full
    s = tp.class_splits(64, 2000, 264)
    assert tp.grid_efficiency(64, 2000, 264) > 0.95 and 64 * s >= 264
    assert tp.class_splits(64, 2000, 1) == 1 and tp.class_splits(8, 1, 264) == 1
    small_b = tp.class_splits(8, 16_000, 264)  # B = 1024: many splits so that every SM is busy
    assert 8 * small_b >= 264 and tp.grid_efficiency(8, 16_000, 264) > 0.9


def test_classes_per_program():
    cfg = tc.KernelConfig(64, 128, 64, 8, 3)
    cpu = torch.device("cpu")
    assert tm.classes_per_program(37, 1000, cfg, cpu, None) == 8 * 128  # interpreter: all classes
    assert tm.classes_per_program(37, 1000, cfg, cpu, 1) == 128  # whole tiles
    assert tm.classes_per_program(37, 1000, cfg, cpu, 129) == 256
    assert tm.classes_per_program(37, 1000, cfg, cpu, 10**9) == 8 * 128


def test_launchers_reject_bad_inputs():
    x, W, y = (t.to(DEVICE) for t in inputs(torch.float32))
    ones = torch.ones(B, device=DEVICE)
    with pytest.raises(TypeError, match="dtype|supports"):
        tm.margin_fwd(x.to(torch.int32), W.to(torch.int32), y, ones, None)
    with pytest.raises(TypeError, match="int64"):
        tm.margin_fwd(x, W, y.int(), ones, None)
    with pytest.raises(ValueError, match="shapes"):
        tm.margin_fwd(x, W[:, :-1], y, ones, None)
    with pytest.raises(ValueError, match="contiguous"):
        tm.margin_fwd(x, W, torch.stack([y, y], 1)[:, 0], ones, None)


# -- the tensor memory accelerator (host-side tensor descriptors) ----------------------------------------

@pytest.mark.parametrize("cfg", ["shipped", "small"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tma_loads_match_reference(tma, monkeypatch, dtype, cfg):
    # sm_90's loads, run by the interpreter: ragged B and C, D = 40 (16-byte rows for every dtype), tiles out
    # of range in both directions (TMA fills them with zeros)
    if cfg == "small":
        use_tiles(monkeypatch, SMALL_TMA)
    made = []
    real = tm._descriptors
    monkeypatch.setattr(tm, "_descriptors", lambda use, *a: made.append(use) or real(use, *a))
    x, W, y = inputs(dtype, ignore=3)
    check(x, W, y, mo.ArcFace(0.5), label_smoothing=0.1)  # the workspace strategy
    check(x, W, y, mo.CosFace(0.35), reduction="none", interclass_filtering_threshold=0.2)  # recompute
    wanted = cfg == "small" or tc.config_for("fwd", dtype).tma
    assert made and all(made) == wanted and any(made) == wanted


def test_tma_needs_aligned_rows(tma, monkeypatch):
    # D = 7 float32 rows are 28 bytes: not a multiple of 16, so the launchers fall back to pointer loads
    use_tiles(monkeypatch, SMALL_TMA)
    made = []
    real = tm._descriptors
    monkeypatch.setattr(tm, "_descriptors", lambda use, *a: made.append(use) or real(use, *a))
    x, W, y = inputs(torch.float32, d=7, ignore=2)
    check(x, W, y, mo.ArcFace(0.5))
    assert made and not any(made)


# -- dW across row blocks: float32 accumulation, against float64 and the naive bf16 head ----------------------

def test_weight_gradient_across_row_blocks_is_no_worse_than_the_naive_bf16_head():
    # 4 row blocks of 24 rows: the weight gradient's block contributions are summed in a float32 C x D buffer
    # and rounded to bf16 once (after the normalization backward). Accumulating in bf16 instead (simulated
    # here: each block's product rounded, then the running sum rounded) rounds once per block.
    b, c, d = 96, 300, 40
    x, W, y = inputs(torch.bfloat16, b=b, c=c, d=d, ignore=3)
    opts = tm.FusedOptions(scale=64.0, memory_budget=24 * tp.workspace_row_bytes(c, torch.bfloat16, 128))
    assert tp.workspace_plan(b, c, d, torch.bfloat16, opts, tc.config_for("ws", torch.bfloat16).block_c).blocks == 4
    ours = run(x.to(DEVICE), W.to(DEVICE), y.to(DEVICE), mo.ArcFace(0.5), strategy="workspace", backend="triton",
               memory_budget=opts.memory_budget)
    ref = run(x, W, y, mo.ArcFace(0.5), dtype=torch.float64, backend="reference")
    naive = run(x, W, y, mo.ArcFace(0.5), dtype=torch.bfloat16, backend="reference")

    def err(dW):
        return float((dW.cpu().double() - ref.W_grad).norm() / ref.W_grad.norm())

    # float32 against bf16 accumulation on equal footing: from the float64 gradient with respect to the cosines,
    # rounded to bf16 like G, and bf16 normalized embeddings
    safe = torch.where(y >= 0, y, 0)
    xh = torch.nn.functional.normalize(x.double(), dim=1)
    Wd = W.double().requires_grad_()
    wh = torch.nn.functional.normalize(Wd, dim=1)
    cos = (xh @ wh.t()).detach().requires_grad_()
    t = cos.gather(1, safe.unsqueeze(1)).squeeze(1)
    logits = (64.0 * cos).scatter(1, safe.unsqueeze(1), (64.0 * mo.ArcFace(0.5)(t)).unsqueeze(1))
    w = (y >= 0).double() / (y >= 0).sum()
    loss = ((torch.logsumexp(logits, 1) - logits.gather(1, safe.unsqueeze(1)).squeeze(1)) * w).sum()
    G = torch.autograd.grad(loss, cos)[0]
    parts = [G[r0:r0 + 24].bfloat16().double().t() @ xh[r0:r0 + 24].bfloat16().double() for r0 in range(0, b, 24)]
    acc16 = parts[0].bfloat16()
    for part in parts[1:]:
        acc16 = (acc16.double() + part.bfloat16().double()).bfloat16()
    acc32 = sum(parts).float()  # float32 accumulation, one rounding at the end

    def finished(dwh):  # the normalization backward, rounded to the weight's dtype once
        return torch.autograd.grad(wh, Wd, dwh.double(), retain_graph=True)[0].bfloat16()

    e_ours, e_naive = err(ours.W_grad), err(naive.W_grad)
    e_acc32, e_acc16 = err(finished(acc32)), err(finished(acc16))
    print(f"dW relative error vs float64, 4 row blocks: marginops {e_ours:.2e} (float32 accumulation; the "
          f"interpreter truncates float32 -> bf16, a GPU rounds), naive bf16 head {e_naive:.2e}; from the "
          f"same bf16 G and xh: float32 accumulation {e_acc32:.2e}, bf16 accumulation {e_acc16:.2e}")
    assert e_ours <= e_naive
    assert e_acc32 < e_acc16


# -- gradient filtering ----------------------------------------------------------------------------------------

def _filtered_oracle(x, W, y, scale, margin, thr, tile_rows, tile_cols):
    """Float64 gradients with every (tile_rows x tile_cols) tile of non-target probabilities below ``thr``
    dropped, and how many tiles were dropped (rows with ignore_index weigh 0 and drop nothing of value)."""
    safe = torch.where(y >= 0, y, 0)
    xd = x.double().requires_grad_()
    Wd = W.double().requires_grad_()
    xh, wh = torch.nn.functional.normalize(xd, dim=1), torch.nn.functional.normalize(Wd, dim=1)
    cos = xh @ wh.t()
    t = cos.gather(1, safe.unsqueeze(1)).squeeze(1)
    logits = (scale * cos).scatter(1, safe.unsqueeze(1), (scale * margin(t)).unsqueeze(1))
    with torch.no_grad():
        p = torch.softmax(logits, 1).scatter(1, safe.unsqueeze(1), 0.0)
        R, Cn = p.shape
        pad = torch.nn.functional.pad(p, (0, -Cn % tile_cols, 0, -R % tile_rows))
        tmax = pad.view(pad.shape[0] // tile_rows, tile_rows, -1, tile_cols).amax((1, 3))
        keep = (tmax >= thr).repeat_interleave(tile_rows, 0).repeat_interleave(tile_cols, 1)[:R, :Cn]
        keep = keep | torch.nn.functional.one_hot(safe, Cn).bool()  # the target term is never filtered
    valid = (y >= 0).double()
    w = valid / valid.sum()
    loss = ((torch.logsumexp(logits, 1) - logits.gather(1, safe.unsqueeze(1)).squeeze(1)) * w).sum()
    # the dropped entries' logits gradients removed: d(loss)/dlogits masked
    glog = torch.autograd.grad(loss, logits, retain_graph=True)[0] * keep
    gx, gW = torch.autograd.grad(logits, (xd, Wd), glog)
    return gx, gW, int((tmax < thr).sum())


@pytest.mark.parametrize("dtype, strategy", [(torch.float32, "workspace"), (torch.float32, "recompute"),
                                             (torch.bfloat16, "workspace")], ids=str)
def test_gradient_filter_skips_exactly_the_negligible_tiles(dtype, strategy, monkeypatch):
    # SMALL tiles (16 x 32): the gradients are the float64 ones with the skipped tiles' terms removed, and the
    # loss and statistics stay exact. Thresholds sit between tile maxima (no tile decided by rounding).
    use_tiles(monkeypatch, SMALL)
    x, W, y = inputs(dtype, ignore=3)
    margin, scale = mo.ArcFace(0.3), 16.0
    exact = run(x.to(DEVICE), W.to(DEVICE), y.to(DEVICE), margin, scale, backend="triton", strategy=strategy)
    gx0, gW0, _ = _filtered_oracle(x, W, y, scale, margin, 0.0, 16, 32)
    safe = torch.where(y >= 0, y, 0)
    cos = torch.nn.functional.normalize(x.double(), dim=1) @ torch.nn.functional.normalize(W.double(), dim=1).t()
    logits = (scale * cos).scatter(1, safe.unsqueeze(1), scale * margin(cos.gather(1, safe.unsqueeze(1))))
    p = torch.softmax(logits, 1).scatter(1, safe.unsqueeze(1), 0.0)
    tmax = torch.nn.functional.pad(p, (0, -C % 32, 0, -B % 16)).view(-(-B // 16), 16, -1, 32).amax((1, 3))
    levels = tmax.flatten().sort().values
    for q in (0.3, 0.7):
        i = int(q * len(levels))
        thr = float((levels[i - 1] * levels[i]).sqrt())
        assert levels[i] > 1.01 * levels[i - 1]
        ours = run(x.to(DEVICE), W.to(DEVICE), y.to(DEVICE), margin, scale, backend="triton", strategy=strategy,
                   gradient_filter=thr)
        gx, gW, dropped = _filtered_oracle(x, W, y, scale, margin, thr, 16, 32)
        assert dropped > 0
        assert torch.equal(ours.loss, exact.loss) and torch.equal(ours.stats.lse, exact.stats.lse)
        assert_close_to_oracle(ours.x_grad, gx, tol=2e-2 if dtype == torch.bfloat16 else 1e-5, name="x.grad")
        assert_close_to_oracle(ours.W_grad, gW, tol=2e-2 if dtype == torch.bfloat16 else 1e-5, name="W.grad")
        err = float((ours.W_grad.cpu().double() - gW0).norm() / gW0.norm())
        print(f"{strategy} {dtype}: gradient_filter={thr:.2e} dropped {dropped} of {tmax.numel()} tiles; "
              f"W.grad relative error against the exact gradients {err:.2e}")


def test_gradient_filter_of_one_drops_every_non_target_term():
    x, W, y = inputs(torch.float32, ignore=2)
    ours = run(x.to(DEVICE), W.to(DEVICE), y.to(DEVICE), mo.ArcFace(0.5), backend="triton", gradient_filter=1.0)
    gx, gW, _ = _filtered_oracle(x, W, y, 64.0, mo.ArcFace(0.5), 1.0 + 1e-9, 64, 128)
    assert_close_to_oracle(ours.W_grad, gW, tol=1e-5, name="W.grad (targets only)")
    assert_close_to_oracle(ours.x_grad, gx, tol=1e-5, name="x.grad (targets only)")
    with pytest.raises(NotImplementedError, match="label_smoothing"):
        run(x.to(DEVICE), W.to(DEVICE), y.to(DEVICE), backend="triton", gradient_filter=1e-3, label_smoothing=0.1)


# -- per-row scales (Call.row_scale) ----------------------------------------------------------------------

@pytest.mark.parametrize("filtering", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_per_row_scales_against_a_float64_oracle(dtype, filtering):
    # every logit of row i is s r_i cos_ij: statistics and both gradient paths against the formulas in float64
    from marginops.backends import Call
    from marginops.backends.common import inverse_norms

    x, W, y = inputs(dtype)
    s, eps, thr = 20.0, 0.0 if filtering else 0.1, None
    if filtering:  # a threshold in the widest gap between sorted cosines near 0.15 (no rounding decides it)
        cos = (torch.nn.functional.normalize(x.double(), dim=1) @ torch.nn.functional.normalize(W.double(), dim=1)
               .t()).flatten().sort().values
        near = cos[(cos > 0.1) & (cos < 0.2)]
        i = int((near[1:] - near[:-1]).argmax())
        thr = float(near[i] + near[i + 1]) / 2
    r = torch.rand(B, dtype=torch.float64) * 1.5 + 0.25
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    xs, Ws, ys = x.to(DEVICE), W.to(DEVICE), y.to(DEVICE)
    inv_x, inv_w = inverse_norms(xs, acc), inverse_norms(Ws, acc)
    opts = tm.FusedOptions(scale=s, label_smoothing=eps, want_prediction=True, filter_threshold=thr)
    call = Call(xs, Ws, ys, inv_x, inv_w, opts, row_scale=r.to(DEVICE, acc))
    # the oracle
    xh = torch.nn.functional.normalize(x.double(), dim=1)
    wh = torch.nn.functional.normalize(W.double(), dim=1)
    cos = xh @ wh.t()
    logits = s * r.unsqueeze(1) * cos
    target = torch.nn.functional.one_hot(y, C).bool()
    out = target | (cos > thr if thr is not None else torch.zeros_like(target))
    N = torch.logsumexp(logits.masked_fill(out, float("-inf")), 1)
    stats = tm.forward_stats(call)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_close_to_oracle(stats.lse, N, tol=tol, name="N")
    assert torch.equal(stats.argmax.cpu(), cos.argmax(1))
    if eps:
        assert_close_to_oracle(stats.logit_sum, logits.masked_fill(target, 0.0).sum(1), tol=tol, atol=1e-4,
                               name="logit sum")
    z = torch.randn(B, dtype=torch.float64) * 5
    lse = torch.logaddexp(N, z)
    g = torch.rand(B, dtype=torch.float64) + 0.5
    G = (torch.exp(logits - lse.unsqueeze(1)) - eps / C) * (g * s * r).unsqueeze(1)
    G = G.masked_fill(out, 0.0)
    dxh = G @ wh
    dwh = G.t() @ xh
    dW = (dwh - wh * (wh * dwh).sum(1, keepdim=True)) / W.double().norm(dim=1, keepdim=True)
    for name, got in (("recompute", tm.recompute_grads(call, lse.to(DEVICE, acc), g.to(DEVICE, acc))),
                      ("workspace", tm.forward_with_grads(call, z.to(DEVICE, acc), g.to(DEVICE, acc))[1:])):
        assert_close_to_oracle(got[0], dxh, tol=tol, name=f"dxh ({name})")
        assert_close_to_oracle(got[1], dW, tol=tol, name=f"dW ({name})")


# -- class ranges and mixed dtypes (the backend interface) ------------------------------------------------

@pytest.mark.parametrize("normalize, label_smoothing", [(True, 0.1), (True, 0.0), (False, 0.1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_class_ranges_combine_to_the_whole(tiles, dtype, normalize, label_smoothing):
    x, W, _ = make_inputs(13, 37, 8, dtype)
    y = torch.tensor(LABELS_13)
    check_ranges_match_whole(tm, x.to(DEVICE), W.to(DEVICE), y.to(DEVICE), normalize=normalize,
                             label_smoothing=label_smoothing, scale=30.0 if normalize else 1.0)


def test_workspace_needs_the_whole_class_range():
    opts = tm.FusedOptions(scale=1.0, strategy="workspace", class_start=5, num_classes=400)
    with pytest.raises(ValueError, match="whole class range"):
        tm.uses_workspace(B, C, D, torch.float32, torch.float32, opts)


@pytest.mark.parametrize("strategy", ["recompute", "workspace"])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_embeddings_against_a_float32_weight(x_dtype, strategy):
    # autocast's setting: tiles multiplied in the weight's dtype, gradients in each input's own dtype
    x, W, y = inputs(torch.float32, ignore=2)
    xl = x.to(x_dtype).to(DEVICE).requires_grad_()
    Wl = W.to(DEVICE).requires_grad_()
    loss = mo.margin_cross_entropy(xl, Wl, y.to(DEVICE), mo.ArcFace(0.5), 30.0, backend="triton",
                                   strategy=strategy)
    loss.backward()
    assert loss.dtype == torch.float32 and xl.grad.dtype == x_dtype and Wl.grad.dtype == torch.float32
    ref = run(xl.detach().double(), Wl.detach(), y, mo.ArcFace(0.5), 30.0, dtype=torch.float64,
              backend="reference")
    assert_close_to_oracle(loss, ref.loss, tol=1e-5, name="loss")
    assert_close_to_oracle(Wl.grad, ref.W_grad, tol=1e-5, atol=1e-6, name="W.grad")
    assert_close_to_oracle(xl.grad, ref.x_grad, tol=2 * torch.finfo(x_dtype).eps, name="x.grad")


def test_float64_does_not_mix_with_other_dtypes():
    x, W, y = inputs(torch.float64)
    with pytest.raises(TypeError, match="does not mix float64"):
        mo.margin_cross_entropy(x.to(DEVICE), W.float().to(DEVICE), y.to(DEVICE), backend="triton")


# -- registration -----------------------------------------------------------------------------------------

def test_registered_and_auto_for_cuda_tensors():
    assert "triton" in BACKENDS and "triton" in mo.BACKEND_NAMES
    assert resolve_backend("auto", "cuda") == "triton"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "triton"
    from marginops.backends import native

    assert resolve_backend("auto", "cpu") == ("native" if native.available() else "torch")
    assert resolve_backend("triton", "cpu") == "triton"


def test_cpu_without_interpreter_refuses_clearly():
    code = (
        "import torch, marginops as mo\n"
        "x, W, y = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])\n"
        "try:\n"
        "    mo.margin_cross_entropy(x, W, y, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('refused:', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=REPO_ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused:" in proc.stdout and "TRITON_INTERPRET=1" in proc.stdout and "backend='torch'" in proc.stdout


# -- GPU only: compiled kernels, memory, time ---------------------------------------------------------------

@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_cuda_compiled_matches_reference_at_scale(dtype):
    x, W, y = inputs(dtype, b=1000, c=50_003, d=136, ignore=10)
    check(x, W, y, mo.ArcFace(0.5), label_smoothing=0.1)
    check(x, W, y, mo.CosFace(0.35), reduction="none")


@cuda
def test_cuda_int64_offsets():
    # C * D >= 2^31 elements: offsets past int32 in W and dW
    Cb, Db = 4_200_000, 512
    x = torch.randn(64, Db, device="cuda", dtype=torch.bfloat16)
    W = torch.randn(Cb, Db, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(Cb - 1000, Cb, (64,), device="cuda")  # targets in the far rows
    W.requires_grad_()
    loss = mo.margin_cross_entropy(x, W, y, mo.ArcFace(0.5), backend="triton")
    loss.backward()
    far = W.grad[Cb - 1000:].float()
    assert torch.isfinite(loss) and far.abs().sum() > 0
    ref_loss = mo.margin_cross_entropy(x, W.detach(), y, mo.ArcFace(0.5), backend="torch")
    assert abs(loss.item() - ref_loss.item()) < 1e-2 * max(1.0, abs(ref_loss.item()))


def _cuda_bf16_problem(b: int, c: int, d: int):
    """Leaf bf16 embeddings and weights on the GPU, and labels."""
    x = torch.randn(b, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    W = torch.randn(c, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    return x, W, torch.randint(0, c, (b,), device="cuda")


@cuda
def test_cuda_memory_is_the_formula():
    # default options (the workspace strategy): the backend's scratch formula, plus marginops' own B x D
    # buffers (about 28 bytes per element of x) and the allocator's rounding; never a B x C tensor
    Bm, Cm, Dm = 4096, 100_000, 512
    x, W, y = _cuda_bf16_problem(Bm, Cm, Dm)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    mo.margin_cross_entropy(x, W, y, mo.ArcFace(0.5), backend="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - (x.numel() + W.numel()) * 2  # beyond the gradients
    terms = tm.scratch_bytes(Bm, Cm, Dm, torch.bfloat16, tm.FusedOptions(scale=64.0), x.device)
    print(f"extra peak beyond inputs and gradients: {extra / 2**20:.1f} MiB; formula {terms}")
    assert terms["total"] <= extra <= terms["total"] + 32 * Bm * Dm + 16 * Cm + 64 * 2**20


@cuda
def test_cuda_time_within_a_few_gemm_floors():
    from triton.testing import do_bench

    Bt, Ct, Dt = 4096, 100_000, 512
    x, W, y = _cuda_bf16_problem(Bt, Ct, Dt)
    G = torch.randn(Bt, Ct, device="cuda", dtype=torch.bfloat16)

    def floor():
        x @ W.t(), G @ W, G.t() @ x

    def ours(strategy):
        mo.margin_cross_entropy(x, W, y, mo.ArcFace(0.5), backend="triton", validate_labels=False,
                                strategy=strategy).backward()

    base = do_bench(floor)
    for strategy in ("auto", "recompute"):
        ratio = do_bench(lambda: ours(strategy)) / base
        print(f"triton {strategy} fwd+bwd / 3-GEMM floor = {ratio:.2f}")
        # a regression guard, not the design targets (the GPU check measures those)
        assert ratio < 4.0, strategy


@cuda
def test_cuda_hopper_kernels_use_tma_and_wgmma():
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA and wgmma are sm_90 instructions")
    x, W, y = _cuda_bf16_problem(512, 10_000, 256)
    mo.margin_cross_entropy(x, W, y, mo.ArcFace(0.5), backend="triton").backward()
    ptx = tm.LAST_COMPILED["_margin_fwd_kernel"].asm["ptx"]
    assert "cp.async.bulk.tensor" in ptx and "wgmma.mma_async" in ptx


@cuda
@pytest.mark.parametrize("strategy", ["auto", "recompute"])
def test_cuda_gradients_repeat_bitwise(strategy):
    x, W, y = inputs(torch.bfloat16, b=2000, c=30_011, d=136, ignore=10)
    runs = [run(x.cuda(), W.cuda(), y.cuda(), mo.ArcFace(0.5), backend="triton", strategy=strategy,
                label_smoothing=0.1) for _ in range(2)]
    assert torch.equal(runs[0].x_grad, runs[1].x_grad) and torch.equal(runs[0].W_grad, runs[1].W_grad)


@cuda
def test_cuda_gradient_filter_error_and_speed():
    # Cut Cross-Entropy's default threshold for bf16 (2^-12) at a face-head-like shape: the gradients' error
    # against the exact path, and both times (printed: the GPU check records them at the target shape)
    from triton.testing import do_bench

    x, W, y = _cuda_bf16_problem(4096, 200_000, 512)
    out = {}
    for name, thr in (("exact", None), ("filtered", 2.0**-12)):
        def step():
            x.grad = W.grad = None
            mo.margin_cross_entropy(x, W, y, mo.ArcFace(0.5), backend="triton", validate_labels=False,
                                    gradient_filter=thr).backward()

        step()
        out[name] = (x.grad.float().clone(), W.grad.float().clone(), do_bench(step))
    err = [float((f - e).norm() / e.norm()) for f, e in zip(out["filtered"][:2], out["exact"][:2])]
    print(f"gradient_filter=2^-12: x.grad error {err[0]:.2e}, W.grad error {err[1]:.2e} (relative, against the "
          f"exact path); {out['exact'][2]:.2f} ms exact, {out['filtered'][2]:.2f} ms filtered")
    assert max(err) < 0.05


# -- the margin family: inter-class filtering, sub-centres, AdaCos --------------------------------------

@pytest.mark.parametrize("strategy", ["recompute", "workspace"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_interclass_filtering_matches_reference(tiles, dtype, strategy):
    x, W, y = inputs(dtype, ignore=3)
    check(x, W, y, mo.ArcFace(0.5), strategy=strategy, interclass_filtering_threshold=0.1)


@pytest.mark.parametrize("chunk_size", [1, 70])
def test_interclass_filtering_with_class_splits(chunk_size):
    x, W, y = inputs(ignore=2)
    out = check(x, W, y, mo.CosFace(0.3), 16.0, reduction="none", chunk_size=chunk_size,
                interclass_filtering_threshold=-0.05)
    plain = run(x, W, y, mo.CosFace(0.3), 16.0, backend="triton", reduction="none", chunk_size=chunk_size)
    assert torch.equal(out.stats.prediction, plain.stats.prediction)  # the prediction sees every class
    assert bool((out.stats.lse <= plain.stats.lse).all())


def _sub_inputs(dtype=torch.float32, k=3, c=100, **kwargs):
    x, W, y = make_inputs(B, c * k, D, dtype, **kwargs)
    return x, W, torch.where(y == -100, y, y % c)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sub_centres_match_reference(tiles, dtype):
    x, W, y = _sub_inputs(dtype, ignore=3)
    check(x, W, y, mo.SubCenter(mo.ArcFace(0.5), 3))


@pytest.mark.parametrize("k", [2, 4])
def test_sub_centres_with_filtering_and_class_splits(tiles, k):
    x, W, y = _sub_inputs(torch.float64, k=k, c=61, ignore=2)
    check(x, W, y, mo.SubCenter(mo.CosFace(0.3), k), 16.0, reduction="none", chunk_size=40,
          interclass_filtering_threshold=0.05, memory_budget=20_000)


def test_sub_centre_gradient_reaches_only_the_first_maximum():
    C_, k = 40, 3
    x, W, y = _sub_inputs(torch.float64, k=k, c=C_)
    W = W.view(C_, k, D)
    W[:, 1] = W[:, 0]  # ties in every class: the gradient must reach sub-centre 0 only
    W = W.reshape(C_ * k, D)
    out = run(x[:1].to(DEVICE), W.to(DEVICE), y[:1].to(DEVICE), mo.SubCenter(mo.ArcFace(0.3), k), 10.0,
              backend="triton")
    cos = torch.nn.functional.normalize(W, dim=1) @ torch.nn.functional.normalize(x[0], dim=0)
    best = cos.view(C_, k).argmax(1)
    hit = out.W_grad.cpu().view(C_, k, D).abs().sum(2) > 0
    assert torch.equal(hit, torch.nn.functional.one_hot(best, k).bool())


def test_sub_centres_refuse_the_workspace_strategy():
    x, W, y = _sub_inputs(ignore=1)
    with pytest.raises(NotImplementedError, match="sub-centres"):
        mo.margin_cross_entropy(x.to(DEVICE), W.to(DEVICE).requires_grad_(), y.to(DEVICE),
                                mo.SubCenter(None, 3), backend="triton", strategy="workspace")


@pytest.mark.parametrize("features", [dict(filter_threshold=0.1), dict(sub_centers=3, filter_threshold=0.0)],
                         ids=str)
def test_class_ranges_with_filtering_and_sub_centres(tiles, features):
    k = features.get("sub_centers", 1)
    x, W, _ = make_inputs(13, 37 * k, D, torch.float64)
    check_ranges_match_whole(tm, x.to(DEVICE), W.to(DEVICE), torch.tensor(LABELS_13).to(DEVICE),
                             label_smoothing=0.0, **features)


def test_adacos_scale_matches_the_torch_backend():
    # the statistics AdaCos reads come out of the fused pass: the scale sequence is the torch backend's
    policies = {name: mo.AdaCos(C) for name in ("triton", "torch")}
    W = torch.randn(C, D)
    for step in range(3):
        x, _, y = make_inputs(B, C, D, torch.float32, ignore=2, generator=torch.Generator().manual_seed(step))
        for name, policy in policies.items():
            mo.margin_cross_entropy(x.to(DEVICE), W.to(DEVICE), y.to(DEVICE), None, policy, backend=name)
        W = W + 0.2 * torch.randn_like(W)
    assert policies["triton"].history == pytest.approx(policies["torch"].history, rel=1e-5)
    assert len(set(policies["triton"].history)) == 3


def test_family_on_tiny_and_all_ignored_batches():
    # B = 1, D = 3, 7 classes of 2 sub-centres, filtering on; then a batch whose rows are all ignored
    x, W, y = make_inputs(1, 14, 3, torch.float64)
    check(x, W, y % 7, mo.SubCenter(mo.ArcFace(0.4), 2), 8.0, interclass_filtering_threshold=0.1)
    x, W, y = make_inputs(5, 14, 3, torch.float32, ignore=5)
    out = check(x, W, y, mo.SubCenter(None, 2), 8.0, interclass_filtering_threshold=0.1)
    assert out.loss.item() == 0.0 and not out.x_grad.any() and not out.W_grad.any()
