"""marginops.integrations.pml against pytorch-metric-learning's own classes (float64, same inputs and weights).

Tests that need the library skip without it; the ones at the end run with the library hidden, to show the
module works without it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import marginops as mo
from marginops.integrations import pml

REPO_ROOT = Path(__file__).resolve().parents[2]

#: (class name, constructor keywords) of every loss the module implements, at defaults and beside them.
LOSSES = [
    ("ArcFaceLoss", {}),
    ("ArcFaceLoss", {"margin": 40.0, "scale": 16.0}),
    ("CosFaceLoss", {}),
    ("CosFaceLoss", {"margin": 0.2, "scale": 30.0}),
    ("SubCenterArcFaceLoss", {}),
    ("SubCenterArcFaceLoss", {"sub_centers": 2, "margin": 20.0, "scale": 10.0}),
    ("NormalizedSoftmaxLoss", {}),
    ("NormalizedSoftmaxLoss", {"temperature": 0.2}),
    ("LargeMarginSoftmaxLoss", {}),
    ("LargeMarginSoftmaxLoss", {"margin": 2, "scale": 3.0}),
    ("SphereFaceLoss", {}),
    ("SphereFaceLoss", {"margin": 3, "scale": 2.0}),
]
B, D, C = 48, 12, 29


@pytest.fixture
def plosses():
    return pytest.importorskip("pytorch_metric_learning.losses")


def build(module, name: str, kw: dict, seed: int = 1, classes: int = C, dim: int = D):
    torch.manual_seed(seed)
    if name == "SubCenterArcFaceLoss":  # the library takes these two by keyword only
        return getattr(module, name)(num_classes=classes, embedding_size=dim, **kw)
    return getattr(module, name)(classes, dim, **kw)


def make_batch(loss, seed: int, *, past_pi_minus_m: int = 0, dtype=torch.float64):
    """Embeddings and labels; the first ``past_pi_minus_m`` rows point away from their class's weight
    (angle near pi), so that ArcFace's target angle passes ``pi - m`` there."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=dtype)
    y = torch.randint(0, C, (B,), generator=g)
    if past_pi_minus_m:
        k = getattr(loss, "sub_centers", 1)
        with torch.no_grad():
            rows = loss.W.t()
            for i in range(past_pi_minus_m):
                c = int(y[i])
                if k > 1:  # a class's cosine is its best sub-centre's: bunch the class's sub-centres together
                    rows[c * k + 1:(c + 1) * k] = rows[c * k] + 0.05 * torch.randn(k - 1, D, generator=g, dtype=dtype)
                x[i] = -rows[c * k:(c + 1) * k].sum(0) * 3 + 0.05 * torch.randn(D, generator=g, dtype=dtype)
    return x, y


def loss_and_grads(loss_fn, x, y, **call):
    x = x.clone().requires_grad_(True)
    loss_fn.zero_grad(set_to_none=True)
    out = loss_fn(x, y, **call)
    out.backward()
    return out.detach(), x.grad, loss_fn.W.grad


def assert_rel(a, b, tol, what):
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


def target_angles(loss, x, y):
    k = getattr(loss, "sub_centers", 1)
    w = torch.nn.functional.normalize(loss.W.detach().t().to(x.dtype), dim=1)
    cos = (torch.nn.functional.normalize(x, dim=1) @ w.t()).view(len(x), -1, k).amax(2)
    return torch.acos(cos.gather(1, y[:, None]).squeeze(1).clamp(-1, 1))


# ------------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("name, kw", LOSSES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(LOSSES)])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_same_loss_and_gradients_as_the_library(plosses, name, kw, seed, backend):
    theirs = build(plosses, name, kw, seed).double()
    ours = build(pml, name, kw, seed, ).double()
    ours.options["backend"] = backend
    assert torch.equal(theirs.W, ours.W)                       # the same initialization from the same seed
    x, y = make_batch(ours, seed, past_pi_minus_m=6)
    theirs.load_state_dict(ours.state_dict())                  # with the sub-centres make_batch moved
    if name in ("ArcFaceLoss", "SubCenterArcFaceLoss"):        # the rows built for it really pass pi - m
        assert (target_angles(ours, x, y) > math.pi - ours.margin).sum() >= 4
    lt, gxt, gwt = loss_and_grads(theirs, x, y)
    lo, gxo, gwo = loss_and_grads(ours, x, y)
    assert_rel(lo, lt, 1e-12, "loss")
    assert_rel(gxo, gxt, 1e-10, "d embeddings")
    assert_rel(gwo, gwt, 1e-10, "d W")
    assert gwo.shape == theirs.W.shape == (D, C * getattr(ours, "sub_centers", 1))


def test_arcface_past_pi_minus_m_uses_the_library_continuation():
    m = 0.5
    t = torch.tensor([math.cos(1.0), math.cos(math.pi - m - 1e-3), math.cos(math.pi - m + 1e-3), -0.999],
                     dtype=torch.float64, requires_grad=True)
    psi = pml.PMLArcFace(m)(t)
    expected = torch.stack([torch.cos(torch.acos(t[0]) + m), torch.cos(torch.acos(t[1]) + m),
                            t[2] - m * math.sin(m), t[3] - m * math.sin(m)])
    torch.testing.assert_close(psi, expected, rtol=1e-14, atol=1e-14)
    psi.sum().backward()
    assert t.grad[2:].tolist() == [1.0, 1.0]                                   # the linear branch
    # ours (marginops.ArcFace) continues with t - (1 - cos m) instead: the two differ past pi - m only
    theirs_value, ours_value = psi[3].item(), mo.ArcFace(m)(t.detach())[3].item()
    assert theirs_value == pytest.approx(-0.999 - m * math.sin(m))
    assert ours_value == pytest.approx(-0.999 - (1 - math.cos(m)))


# ------------------------------------------------------------------------------------------- reducers, miners

def _reducers(plosses):
    from pytorch_metric_learning import reducers
    return {
        "mean": reducers.MeanReducer(),
        "sum": reducers.SumReducer(),
        "avg-non-zero": reducers.AvgNonZeroReducer(),
        "threshold": reducers.ThresholdReducer(low=5.0, high=60.0),
        "class-weighted": reducers.ClassWeightedReducer(torch.linspace(0.5, 2.0, C)),
        "per-anchor": reducers.PerAnchorReducer(),
    }


@pytest.mark.parametrize("which", ["mean", "sum", "avg-non-zero", "threshold", "class-weighted", "per-anchor"])
@pytest.mark.parametrize("name", ["ArcFaceLoss", "CosFaceLoss", "SphereFaceLoss"])
def test_reducers_match(plosses, which, name):
    reducer = _reducers(plosses)[which]
    theirs = build(plosses, name, {"reducer": reducer}).double()
    ours = build(pml, name, {"reducer": reducer}).double()
    x, y = make_batch(ours, 3)
    for a, b in zip(loss_and_grads(theirs, x, y), loss_and_grads(ours, x, y)):
        assert_rel(b, a, 1e-10, which)


def test_do_nothing_reducer_returns_the_per_row_losses(plosses):
    from pytorch_metric_learning import reducers
    theirs = build(plosses, "CosFaceLoss", {"reducer": reducers.DoNothingReducer()}).double()
    ours = build(pml, "CosFaceLoss", {"reducer": reducers.DoNothingReducer()}).double()
    x, y = make_batch(ours, 4)
    a, b = theirs(x, y), ours(x, y)
    assert a.keys() == b.keys() == {"loss"}
    assert_rel(b["loss"]["losses"], a["loss"]["losses"], 1e-12, "per-row losses")
    assert torch.equal(b["loss"]["indices"], a["loss"]["indices"])


@pytest.mark.parametrize("name", ["ArcFaceLoss", "SubCenterArcFaceLoss", "NormalizedSoftmaxLoss"])
def test_regularizers_match(plosses, name):
    from pytorch_metric_learning import regularizers
    kw = {"weight_regularizer": regularizers.RegularFaceRegularizer(), "weight_reg_weight": 0.3,
          "embedding_regularizer": regularizers.LpRegularizer(), "embedding_reg_weight": 0.01}
    theirs = build(plosses, name, kw).double()
    ours = build(pml, name, kw).double()
    assert ours.sub_loss_names() == theirs.sub_loss_names()
    x, y = make_batch(ours, 5)
    for a, b in zip(loss_and_grads(theirs, x, y), loss_and_grads(ours, x, y)):
        assert_rel(b, a, 1e-10, "regularized")


@pytest.mark.parametrize("name", ["ArcFaceLoss", "CosFaceLoss", "LargeMarginSoftmaxLoss"])
def test_miner_indices_tuple_weights_rows(plosses, name):
    from pytorch_metric_learning import miners
    theirs = build(plosses, name, {}).double()
    ours = build(pml, name, {}).double()
    x, y = make_batch(ours, 6)
    y = y % 7  # repeated labels, so that the miner finds pairs
    for tup in (miners.MultiSimilarityMiner()(x, y), miners.TripletMarginMiner(margin=0.5)(x, y),
                (torch.tensor([0, 0, 3]), torch.tensor([5, 6, 3]), torch.tensor([1, 2, 9])),
                (torch.tensor([], dtype=torch.long),) * 3):
        a = loss_and_grads(theirs, x, y, indices_tuple=tup)
        b = loss_and_grads(ours, x, y, indices_tuple=tup)
        for u, v in zip(a, b):
            assert_rel(v, u, 1e-10, "indices_tuple")


def test_miner_weights_match_the_library(plosses):
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
    y = torch.arange(10)
    for tup in [(torch.tensor([0, 0, 3]), torch.tensor([5, 6, 3]), torch.tensor([1, 2, 9])),
                (torch.tensor([1, 2]), torch.tensor([2, 3]), torch.tensor([4, 4]), torch.tensor([5, 7]))]:
        assert torch.equal(pml.miner_weights(tup, y, torch.float64), lmu.convert_to_weights(tup, y, torch.float64))
    assert pml.miner_weights(None, y, torch.float64) is None
    assert pml.miner_weights((torch.tensor([], dtype=torch.long),) * 3, y, torch.float64) is None


# ------------------------------------------------------------------------------------------- interface

def test_state_dict_round_trip(plosses):
    for name, kw in [("ArcFaceLoss", {}), ("SubCenterArcFaceLoss", {}), ("SphereFaceLoss", {})]:
        theirs = build(plosses, name, kw, seed=3)
        ours = build(pml, name, kw, seed=4)
        assert list(ours.state_dict()) == list(theirs.state_dict()) == ["W"]
        ours.load_state_dict(theirs.state_dict())
        assert torch.equal(ours.W, theirs.W)
        with torch.no_grad():
            ours.W.mul_(2)
        back = build(plosses, name, kw, seed=5)
        back.load_state_dict(ours.state_dict())
        assert torch.equal(back.W, ours.W)


def test_get_logits_and_topk(plosses):
    for name, kw in LOSSES[::2]:
        theirs = build(plosses, name, kw).double()
        ours = build(pml, name, kw).double()
        x, _ = make_batch(ours, 7)
        expect = theirs.get_logits(x)
        got = ours.get_logits(x)
        assert got.shape == expect.shape == (B, C)
        assert_rel(got, expect, 1e-12, f"{name}.get_logits")
        values, idx = ours.topk(x, 3)
        assert_rel(values, expect.topk(3, dim=1).values, 1e-12, f"{name}.topk")
        assert torch.equal(idx, expect.topk(3, dim=1).indices)


def test_get_logits_refuses_large_outputs():
    loss_fn = pml.ArcFaceLoss(1000, 8)
    loss_fn.max_logits_bytes = 64 * 1000 * 4 - 1
    with pytest.raises(ValueError, match=r"64 x 1000 logits tensor of .* GiB, above max_logits_bytes"):
        loss_fn.get_logits(torch.randn(64, 8))
    assert loss_fn.get_logits(torch.randn(63, 8)).shape == (63, 1000)


def test_reexports_the_library_losses(plosses):
    from marginops.integrations import pml as losses
    assert losses.TripletMarginLoss is plosses.TripletMarginLoss
    assert losses.ContrastiveLoss is plosses.ContrastiveLoss
    from marginops.integrations.pml import MultiSimilarityLoss  # noqa: F401  (from-imports work too)
    assert losses.ArcFaceLoss is not plosses.ArcFaceLoss and "TripletMarginLoss" in dir(losses)
    with pytest.raises(AttributeError, match="NoSuchLoss"):
        losses.NoSuchLoss


def test_library_errors_and_attributes(plosses):
    from pytorch_metric_learning import distances
    loss_fn = pml.ArcFaceLoss(C, D)
    x, y = torch.randn(B, D), torch.randint(0, C, (B,))
    with pytest.raises(ValueError, match="labels are required"):
        loss_fn(x)
    with pytest.raises(ValueError, match="ref_emb is not supported"):
        loss_fn(x, y, ref_emb=x.clone(), ref_labels=y)
    with pytest.raises(ValueError, match="Number of embeddings must equal"):
        loss_fn(x, y[:-1])
    assert torch.isfinite(loss_fn(x, y, ref_emb=x, ref_labels=y))   # the same tensors are accepted, as there
    assert loss_fn.margin == pytest.approx(math.radians(28.6)) and loss_fn.scale == 64
    assert isinstance(loss_fn.distance, distances.CosineSimilarity)
    with pytest.raises(pml.UnsupportedFeatureError, match="LpDistance"):
        pml.ArcFaceLoss(C, D, distance=distances.LpDistance())
    with pytest.raises(pml.UnsupportedFeatureError, match="power"):
        pml.CosFaceLoss(C, D, distance=distances.CosineSimilarity(power=2))
    with pytest.raises(TypeError, match="unexpected keyword"):
        pml.ArcFaceLoss(C, D, margn=3)


def test_collect_stats_records_the_mean_target_angle(plosses):
    theirs = build(plosses, "ArcFaceLoss", {"collect_stats": True}).double()
    ours = build(pml, "ArcFaceLoss", {"collect_stats": True}).double()
    x, y = make_batch(ours, 8)
    theirs(x, y), ours(x, y)
    assert ours.avg_angle == pytest.approx(theirs.avg_angle, rel=1e-12)
    lm_t = build(plosses, "SphereFaceLoss", {"collect_stats": True}).double()
    lm_o = build(pml, "SphereFaceLoss", {"collect_stats": True}).double()
    lm_t(x, y), lm_o(x, y)
    assert lm_o.avg_angle == pytest.approx(lm_t.avg_angle, rel=1e-12)


def test_weight_follows_the_embeddings_dtype_as_in_the_library(plosses):
    theirs, ours = build(plosses, "CosFaceLoss", {}), build(pml, "CosFaceLoss", {})
    x, y = make_batch(ours, 9)
    theirs(x, y), ours(x, y)
    assert theirs.W.dtype == ours.W.dtype == torch.float64
    # 16-bit embeddings leave the weight alone (the library would cast it to 16 bits)
    ours.float()
    ours(x.bfloat16(), y).backward()
    assert ours.W.dtype == torch.float32 and ours.W.grad.dtype == torch.float32


def test_subcenter_outliers_match(plosses):
    theirs = build(plosses, "SubCenterArcFaceLoss", {"sub_centers": 3}, classes=6).double()
    ours = build(pml, "SubCenterArcFaceLoss", {"sub_centers": 3}, classes=6).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, D, generator=g, dtype=torch.float64)
    y = torch.arange(60) % 6                                  # every class has samples
    out_t, dom_t = theirs.get_outliers(x, y, threshold=80)
    out_o, dom_o = ours.get_outliers(x, y, threshold=80)
    assert len(out_o) > 0 and torch.equal(out_o, out_t.long())
    assert torch.equal(dom_o, dom_t)


def test_a_training_script_gives_the_same_weights(plosses):
    """Swapping the import in a training loop: 20 SGD steps of encoder + loss, the same weights after."""
    def run(module):
        torch.manual_seed(0)
        enc = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, D)).double()
        loss_fn = module.ArcFaceLoss(C, D, margin=28.6, scale=30).double()
        opt = torch.optim.SGD(list(enc.parameters()) + list(loss_fn.parameters()), lr=0.05)
        g = torch.Generator().manual_seed(1)
        for _ in range(20):
            x = torch.randn(B, 10, generator=g, dtype=torch.float64)
            y = torch.randint(0, C, (B,), generator=g)
            opt.zero_grad()
            loss_fn(enc(x), y).backward()
            opt.step()
        return [p.detach() for p in list(enc.parameters()) + list(loss_fn.parameters())]
    for a, b in zip(run(plosses), run(pml)):
        assert_rel(b, a, 1e-9, "weights after training")


# ------------------------------------------------------------------------------------------- without the library

def test_works_without_the_library():
    """Hide pytorch-metric-learning: the losses still compute the library's loss (checked against the
    materialized float64 head); reducers, regularizers and the other losses say what they need."""
    code = textwrap.dedent("""
        import sys, math, torch
        sys.modules["pytorch_metric_learning"] = None          # import fails as if it were not installed
        from marginops.integrations import pml
        from marginops.reference import margin_cross_entropy_reference as ref
        assert not pml.HAS_PML and pml.ArcFaceLoss(5, 3).reducer is None
        torch.manual_seed(0)
        loss_fn = pml.ArcFaceLoss(11, 6).double()
        x, y = torch.randn(9, 6, dtype=torch.float64), torch.randint(0, 11, (9,))
        expect = ref(x, loss_fn.W.t(), y, pml.PMLArcFace(math.radians(28.6)), 64.0, reduction="mean").loss
        assert abs(loss_fn(x, y).item() - expect.item()) <= 1e-12 * abs(expect.item()), (loss_fn(x, y), expect)
        w = torch.tensor([1.0, 0, 0.2, 0, 0, 0, 0, 0, 0], dtype=torch.float64)  # row 0 five times, row 2 once
        per_row = ref(x, loss_fn.W.t(), y, pml.PMLArcFace(math.radians(28.6)), 64.0, reduction="none").loss
        mined = loss_fn(x, y, indices_tuple=(torch.tensor([0, 0]), torch.tensor([2, 0]), torch.tensor([0, 0])))
        assert abs(mined.item() - (per_row * w).mean().item()) <= 1e-12 * per_row.sum().item()
        for kw in ({"reducer": object()}, {"weight_regularizer": object()}, {"distance": object()}):
            try:
                pml.CosFaceLoss(5, 3, **kw)
            except pml.UnsupportedFeatureError as e:
                print("refused:", e)
            else:
                raise AssertionError(kw)
        try:
            pml.TripletMarginLoss
        except AttributeError as e:
            assert "pip install pytorch-metric-learning" in str(e)
        else:
            raise AssertionError("TripletMarginLoss without the library")
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("refused:") == 3 and proc.stdout.strip().endswith("ok")


def test_large_margin_softmax_matches_the_materialized_head():
    """Without the library: L-Softmax's logits ``s |x| |W_j| cos`` and its target ``s |x| |W_y| psi(cos)``."""
    torch.manual_seed(0)
    loss_fn = pml.LargeMarginSoftmaxLoss(C, D, margin=3, scale=2.0).double()
    x, y = torch.randn(B, D, dtype=torch.float64), torch.randint(0, C, (B,))
    xn, wn = x.norm(dim=1, keepdim=True), loss_fn.W.detach().norm(dim=0, keepdim=True)
    cos = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(loss_fn.W.detach(), dim=0)
    t = cos.gather(1, y[:, None]).squeeze(1)
    logits = (cos.scatter(1, y[:, None], mo.SphereFace(3)(t)[:, None]) * xn * wn * 2.0)
    expect = torch.nn.functional.cross_entropy(logits, y)
    assert loss_fn(x, y).item() == pytest.approx(expect.item(), rel=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        pml.ArcFaceLoss(0, 4)
    with pytest.raises(ValueError, match="m must lie in"):
        pml.ArcFaceLoss(4, 4, margin=200.0)
    with pytest.raises(ValueError, match="margin must be an integer >= 1"):
        pml.SphereFaceLoss(4, 4, margin=0)
    with pytest.raises(TypeError, match="missing argument"):
        pml.SubCenterArcFaceLoss(num_classes=4)
    with pytest.raises(ValueError, match="labels"):
        pml.CosFaceLoss(4, 4)(torch.randn(3, 4), torch.tensor([0, 1, 7]))


def test_label_minus_100_counts_as_a_zero_loss_row(plosses):
    """The library's cross-entropy ignores label -100 (its mask indexing wraps, C >= 100): the row adds 0 to the
    mean over the whole batch. Ours gives the same."""
    theirs = build(plosses, "CosFaceLoss", {}, classes=150).double()
    ours = build(pml, "CosFaceLoss", {}, classes=150).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, 150, (10,), generator=g)
    y[[2, 7]] = -100
    for a, b in zip(loss_and_grads(theirs, x, y), loss_and_grads(ours, x, y)):
        assert_rel(b, a, 1e-12, "label -100")
    assert loss_and_grads(ours, x, y)[1][[2, 7]].abs().max() == 0


def test_committed_benchmark_table_is_generated_from_its_record():
    """docs/integrations.md's memory/time table is what examples/pml_benchmark.py writes from the record."""
    from examples import pml_benchmark as pb
    record = json.loads((REPO_ROOT / pb.RECORD).read_text())
    doc = (REPO_ROOT / pb.DOC).read_text()
    assert pb.BEGIN + "\n" + pb.table(record) + "\n" + pb.END in doc
    assert record["classes"] == 200_000 and record["batch"] == 512 and record["dim"] == 256


def test_miners_and_sphereface_take_the_fused_path(monkeypatch):
    """With the default reducer, miner weights become the core's row weights on a scalar reduction (the
    three-GEMM workspace path, no per-row loss tensor), and SphereFace's |x_i| the core's per-row scale
    (the raw weight, no normalized copy of it)."""
    calls = []
    real = pml.margin_cross_entropy

    def spy(x, W, y, margin, scale, **kw):
        calls.append((W, scale, kw))
        return real(x, W, y, margin, scale, **kw)

    monkeypatch.setattr(pml, "margin_cross_entropy", spy)
    torch.manual_seed(0)
    x, y = torch.randn(B, D, dtype=torch.float64, requires_grad=True), torch.randint(0, C, (B,))
    arc = pml.ArcFaceLoss(C, D).double()
    arc(x, y, indices_tuple=(torch.arange(10), torch.arange(5, 20)))
    W, scale, kw = calls[-1]
    assert kw["reduction"] == "sum" and kw["row_weight"] is not None and kw["row_weight"][:5].eq(0.5).all()
    sphere = pml.SphereFaceLoss(C, D, scale=2.0).double()
    sphere(x, y).backward()
    W, scale, kw = calls[-1]
    assert W.data_ptr() == sphere.W.data_ptr() and kw["normalize"] is True
    torch.testing.assert_close(scale, 2.0 * torch.linalg.vector_norm(x, dim=1))
