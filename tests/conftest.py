"""Shared test machinery: seeding, threads, the float64 oracle and the one tolerance helper.

Everything here serves one job, checking marginops against an oracle:

* :func:`assert_close_to_oracle` is the only tolerance rule in the suite;
  :func:`rounding_floors` supplies its absolute floors for full problems.
* :func:`make_inputs` builds a (x, W, y) problem; :func:`run` does one forward
  and backward and collects everything we compare; :func:`check_against_reference`
  runs ours, the reference in float64 and the reference in the input dtype
  (float32 for float64 inputs), and compares loss, gradients and every stats field.
"""

from __future__ import annotations

import os
import random
from typing import NamedTuple, Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # Importing marginops may import triton (through torch._dynamo); without a GPU the Triton tests run
    # in its interpreter, which must be switched on before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import marginops as mo  # noqa: E402

try:  # absent on a bare GPU machine (torch, triton, numpy, pytest): the GPU tests do not use it
    from hypothesis import HealthCheck, settings
except ImportError:
    settings = None
if settings is not None:
    # Hypothesis: no deadline (timings on a shared 2-core machine vary), no example database in the
    # checkout, and the autouse fixtures below are fine to share between examples (tests draw their
    # data from hypothesis).
    settings.register_profile("marginops", deadline=None, database=None, print_blob=True,
                              suppress_health_check=[HealthCheck.function_scoped_fixture])
    settings.load_profile("marginops")

#: "Small tolerance" per result dtype, relative to ``|ref| + max|ref|`` (see assert_close_to_oracle).
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2 * torch.finfo(torch.float16).eps,
    torch.bfloat16: 2 * torch.finfo(torch.bfloat16).eps,
}


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Run the suite single-threaded.

    On the 2-core test machine, with 2 threads, every ATen parallel op that
    follows an MKL GEMM waits ~8 ms for the GEMM's spinning threads, whatever
    its size (``mm`` + ``mul_`` on a 256 x 4096 tile: 23 ms, vs 1.4 ms on one
    thread), and the tiny test problems alternate the two thousands of times.
    Multi-threaded runs are covered by
    ``tests/backends/test_torch_chunked.py::test_multithreaded_matches_single_threaded``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield threads
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state (torch, numpy, random)."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield


def assert_close_to_oracle(ours, ref64, same_dtype_torch=None, *, tol: Optional[float] = None,
                           atol=0.0, name: str = "result") -> None:
    """Assert ``ours`` is no worse than plain PyTorch in the same dtype, against a float64 oracle.

    Element-wise, with ``err(a) = |a - ref64|`` computed in float64::

        err(ours) <= err(same_dtype_torch) + tol * (|ref64| + max|ref64|) + atol

    ``same_dtype_torch`` is the same quantity computed the naive way in
    ``ours``' dtype. For float64 results a float32 run may be passed instead:
    its error, scaled by ``16 * eps(float64) / eps(float32)``, estimates how
    much each element amplifies rounding (e.g. gradients that nearly cancel).
    Leave it out and the bound is ``tol`` (and ``atol``) alone. ``tol``
    defaults to :data:`TOLERANCE` for ``ours``' dtype: tight (1e-10) for
    float64, a few dozen ulps for float32 and two ulps for float16/bfloat16.
    ``atol`` (a number or a tensor broadcastable to the oracle) is an absolute
    floor for entries that cancel to exactly zero in the oracle (e.g. all
    gradients when there is a single class); see :func:`rounding_floors`.
    Non-finite oracle entries must be matched exactly; elsewhere ``ours`` must
    be finite. On failure the message names the worst element and how many
    elements failed.
    """
    ours = torch.as_tensor(ours)
    ref = torch.as_tensor(ref64).detach().to("cpu", torch.float64)
    o = ours.detach().to("cpu", torch.float64)
    assert o.shape == ref.shape, f"{name}: shape {tuple(o.shape)} != oracle shape {tuple(ref.shape)}"
    if o.numel() == 0:
        return
    if tol is None:
        tol = TOLERANCE.get(ours.dtype, TOLERANCE[torch.float64])
    finite = torch.isfinite(ref)
    if not bool(finite.all()):
        same_nonfinite = (o[~finite] == ref[~finite]) | (o[~finite].isnan() & ref[~finite].isnan())
        assert bool(same_nonfinite.all()), (
            f"{name}: non-finite oracle entries not matched:\n ours={o[~finite]}\n ref={ref[~finite]}")
    o, r = o[finite], ref[finite]
    bad_nonfinite = ~torch.isfinite(o)
    assert not bool(bad_nonfinite.any()), (
        f"{name}: {int(bad_nonfinite.sum())} non-finite values where the oracle is finite, "
        f"first at flat index {int(bad_nonfinite.nonzero()[0, 0])}"
    )
    allowed = tol * (r.abs() + r.abs().max()) + torch.as_tensor(atol, dtype=torch.float64).expand(ref.shape)[finite]
    same = None
    if same_dtype_torch is not None:
        same = torch.as_tensor(same_dtype_torch)
        ratio = torch.finfo(ours.dtype).eps / torch.finfo(same.dtype).eps
        same = same.detach().to("cpu", torch.float64)
        assert same.shape == ref.shape, f"{name}: same-dtype result has shape {tuple(same.shape)}"
        same = same[finite]
        same_err = (same - r).abs() * (1.0 if ratio == 1.0 else 16 * ratio)
        allowed = allowed + torch.where(torch.isfinite(same_err), same_err, torch.zeros_like(same_err))
    err = (o - r).abs()
    excess = err - allowed
    if bool((excess > 0).any()):
        i = int(excess.argmax())
        idx = np.unravel_index(int(finite.reshape(-1).nonzero()[i, 0]), tuple(ref.shape)) if ref.dim() else ()
        lines = [
            f"{name} ({ours.dtype}): {int((excess > 0).sum())} of {err.numel()} elements outside the oracle bound",
            f"  worst at index {tuple(int(k) for k in idx)}: ours={o[i].item()!r} oracle(float64)={r[i].item()!r}",
            f"  |ours - oracle|={err[i].item():.3e} > allowed={allowed[i].item():.3e} "
            f"(tol={tol:g}, max atol={float(torch.as_tensor(atol).max()):g}, max|oracle|={r.abs().max().item():.3e})",
        ]
        if same is not None:
            lines.append(f"  naive PyTorch={same[i].item()!r}, its error={(same[i] - r[i]).abs().item():.3e}")
        lines.append(f"  max |ours - oracle| over all elements: {err.max().item():.3e}")
        raise AssertionError("\n".join(lines))


# -- building and running problems --------------------------------------------------------------

def make_inputs(B: int, C: int, D: int, dtype=torch.float64, *, ignore: int = 0, duplicates: bool = True,
                ignore_index: int = -100, generator: Optional[torch.Generator] = None):
    """Random ``(x, W, y)``: float64 draws rounded to ``dtype``; ``ignore`` rows set to ``ignore_index``.

    With ``duplicates`` (and B >= 2) the second row shares the first row's label.
    """
    x = torch.randn(B, D, dtype=torch.float64, generator=generator).to(dtype)
    W = torch.randn(C, D, dtype=torch.float64, generator=generator).to(dtype)
    y = torch.randint(0, C, (B,), generator=generator)
    if duplicates and B >= 2:
        y[1] = y[0]
    if ignore:
        rows = torch.randperm(B, generator=generator)[:ignore]
        y[rows] = ignore_index
    return x, W, y


class Outputs(NamedTuple):
    loss: torch.Tensor
    x_grad: Optional[torch.Tensor]
    W_grad: Optional[torch.Tensor]
    stats: mo.MarginStats


def run(x, W, y, margin=None, scale=64.0, *, dtype=None, grad_x=True, grad_W=True, **options) -> Outputs:
    """One forward (with stats) and backward of ``margin_cross_entropy`` on fresh leaf copies.

    ``dtype`` converts the inputs first (the float64 oracle passes ``torch.float64``).
    The backward seeds ``loss.sum()``, i.e. ones for ``reduction="none"``.
    """
    dtype = dtype or x.dtype
    xl = x.detach().to(dtype).requires_grad_(grad_x)
    Wl = W.detach().to(dtype).requires_grad_(grad_W)
    loss, stats = mo.margin_cross_entropy(xl, Wl, y, margin, scale, return_stats=True, **options)
    if loss.requires_grad:
        loss.sum().backward()
    return Outputs(loss.detach(), xl.grad, Wl.grad, stats)


def cosines64(x, W, normalize: bool = True) -> torch.Tensor:
    """The float64 cosine (or plain logit) matrix that ``prediction`` is an argmax of."""
    x, W = x.detach().double(), W.detach().double()
    if normalize:
        x, W = F.normalize(x, dim=1, eps=1e-12), F.normalize(W, dim=1, eps=1e-12)
    return x @ W.t()


def rounding_floors(x, W, y, scale, margin, t64, *, normalize=True, reduction="mean", ignore_index=-100,
                    **_) -> dict:
    """Absolute error floors for :func:`check_against_reference`: 8 ulps of what each result is made from.

    The ulp is that of the accumulation dtype (float64 for float64 inputs,
    else float32). A gradient row is a projection of a vector of size about
    ``scale * row_weight * max(1, |psi'(t)|)`` divided by the row's norm
    (``normalize=True``), or a combination of the other operand's rows
    (``normalize=False``); when the exact result cancels to zero (one class,
    ``D = 1``) only this floor is left, in the oracle as much as in ours.
    The margined target logit moves by ``scale * |psi(t +- 8 ulps) - psi(t)|``
    when ``t`` is rounded: tiny inside (-1, 1), but ``acos`` makes it
    ``~sqrt(ulp)`` at ``t = +-1`` (ArcFace when an embedding is parallel to
    its class), where the exact ArcFace derivative also sits at its cap (~1000).
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    ulp = 8 * torch.finfo(acc).eps
    # on the CPU, whatever device the problem ran on (the oracle helper compares on the CPU)
    x64, W64, y, t64 = x.detach().cpu().double(), W.detach().cpu().double(), y.cpu(), t64.detach().cpu()
    valid = (y != ignore_index).double()
    w = valid / valid.sum().clamp_min(1.0) if reduction == "mean" else valid
    psi = margin if margin is not None else (lambda t: t)
    t = t64.detach().double().requires_grad_()
    with torch.enable_grad():
        out = psi(t)
    slope = torch.autograd.grad(out.sum(), t, allow_unused=True, materialize_grads=True)[0] \
        if out.requires_grad else torch.zeros_like(t)
    amp = w * slope.detach().abs().clamp_min(1.0)  # row weight times the target term's amplification
    labels = torch.where(y != ignore_index, y, torch.zeros_like(y))
    k = margin.k if isinstance(margin, mo.SubCenter) else 1  # the target term reaches one of the class's k rows
    per_class = torch.full((W64.shape[0],), float(w.sum()), dtype=torch.float64)
    for r in range(k):
        per_class.index_add_(0, labels * k + r, amp)
    if normalize:
        gx = amp / x64.norm(dim=1).clamp_min(1e-12)
        gW = per_class / W64.norm(dim=1).clamp_min(1e-12)
    else:
        gx = amp * (W64.abs().max().clamp_min(1.0) if W64.numel() else 1.0)
        gW = per_class * (x64.abs().max().clamp_min(1.0) if x64.numel() else 1.0)
    with torch.no_grad():
        t = t.detach()
        d = ulp * t.abs().clamp_min(1.0)
        base = psi(t).double()
        jitter = scale * torch.maximum((psi(t + d) - base).abs(), (psi(t - d) - base).abs()).double()
    row = ulp * scale + jitter  # per-row floor of z, lse and the per-row loss
    return {
        "loss": row * w if reduction == "none" else (row * w).sum() + ulp * scale,
        "x.grad": ulp * scale * gx.unsqueeze(1),
        "W.grad": ulp * scale * gW.unsqueeze(1),
        "stats.lse": row,
        "stats.target_logit": row,
        "stats.target_cos": ulp,
    }


def check_against_reference(x, W, y, margin=None, scale=64.0, *, backend="torch", grad_x=True, grad_W=True,
                            tol: Optional[float] = None, **options) -> Outputs:
    """Compare ``backend`` in ``x``'s dtype with ``backend="reference"`` in float64.

    The reference also runs in ``x``'s dtype (float32 for float64 inputs) as
    the naive PyTorch result of :func:`assert_close_to_oracle`, which checks
    loss, both gradients and all four stats fields (``tol`` passed on, absolute
    floors from :func:`rounding_floors`); ``prediction`` must be an argmax of
    the float64 cosines. ``chunk_size`` and ``memory_budget`` only go to
    ``backend``. Returns our outputs.
    """
    tuning = {k: options.pop(k) for k in ("chunk_size", "memory_budget") if k in options}
    ours = run(x, W, y, margin, scale, backend=backend, grad_x=grad_x, grad_W=grad_W, **tuning, **options)
    ref = run(x, W, y, margin, scale, dtype=torch.float64, backend="reference", grad_x=grad_x, grad_W=grad_W,
              **options)
    naive_dtype = torch.float32 if x.dtype == torch.float64 else x.dtype
    same = run(x, W, y, margin, scale, dtype=naive_dtype, backend="reference", grad_x=grad_x, grad_W=grad_W,
               **options)
    assert ours.loss.dtype == torch.promote_types(x.dtype, torch.float32)  # 16-bit inputs: a float32 loss
    pairs = [("loss", ours.loss, ref.loss, same.loss)]
    for label, o, r, s in (("x.grad", ours.x_grad, ref.x_grad, same.x_grad),
                           ("W.grad", ours.W_grad, ref.W_grad, same.W_grad)):
        got = {True: "no gradient", False: "a gradient"}
        assert (o is None) == (r is None), f"{label}: ours got {got[o is None]}, the reference got {got[r is None]}"
        if o is not None:
            assert o.dtype == x.dtype, f"{label} has dtype {o.dtype}, inputs are {x.dtype}"
            pairs.append((label, o, r, s))
    for field in ("lse", "target_logit", "target_cos"):
        pairs.append((f"stats.{field}", getattr(ours.stats, field), getattr(ref.stats, field),
                      getattr(same.stats, field)))
    floors = rounding_floors(x, W, y, scale, margin, ref.stats.target_cos, **options)
    for label, o, r, s in pairs:
        assert_close_to_oracle(o, r, s, tol=tol, atol=floors[label], name=label)
    # prediction: an argmax of the cosines; allow ties within the accumulation precision.
    pred = ours.stats.prediction
    assert pred.dtype == torch.int64 and pred.shape == y.shape
    cos = cosines64(x, W, options.get("normalize", True))
    if isinstance(margin, mo.SubCenter):  # class cosines: the largest of each class's sub-centres
        cos = cos.view(cos.shape[0], -1, margin.k).amax(2)
    if y.numel():
        picked = cos.gather(1, pred.unsqueeze(1)).squeeze(1)
        slack = 1e-12 if x.dtype == torch.float64 else 1e-5
        slack = slack * cos.abs().amax(1).clamp_min(1.0)
        assert bool((picked >= cos.amax(1) - slack).all()), (
            f"prediction {pred.tolist()} is not an argmax; reference argmax {cos.argmax(1).tolist()}"
        )
    return ours
