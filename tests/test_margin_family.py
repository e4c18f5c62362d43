"""Inter-class filtering, AdaCos and sub-centres on the torch backend (and the reference), against
independent float64 computations; the Triton backend's checks are in tests/backends/test_triton_margin.py.

The independent computations here materialize the ``B x C`` (or ``B x C x k``) cosines in float64 and
apply each paper's formula directly, without marginops' reference.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import marginops as mo
from marginops.backends import torch_chunked

from .conftest import assert_close_to_oracle, check_against_reference, make_inputs, run

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(37, 300, 40), (1, 7, 3), (13, 50, 3)]  # ragged sizes, B = 1, D = 3


def cos64(x, W):
    return F.normalize(x.double(), dim=1) @ F.normalize(W.double(), dim=1).t()


# -- inter-class filtering --------------------------------------------------------------------------


def filtered_loss64(x, W, y, threshold, scale, margin=None, ignore_index=-100):
    """Per-row loss with the filtered columns removed from the sum, written out from the definition."""
    cos = cos64(x, W)
    rows = []
    for i in range(x.shape[0]):
        if int(y[i]) == ignore_index:
            rows.append(torch.zeros((), dtype=torch.float64))
            continue
        t = cos[i, y[i]]
        z = scale * (margin(t.reshape(1))[0] if margin is not None else t)
        others = [scale * cos[i, j] for j in range(W.shape[0]) if j != int(y[i]) and cos[i, j] <= threshold]
        rows.append(torch.logsumexp(torch.stack([z, *others]), 0) - z)
    return torch.stack(rows)


def test_reference_filtering_matches_the_definition():
    x, W, y = make_inputs(9, 23, 5, ignore=2)
    for thr in (-0.2, 0.1, 0.4):
        ours = mo.margin_cross_entropy(x, W, y, mo.ArcFace(0.3), 8.0, backend="reference", reduction="none",
                                       interclass_filtering_threshold=thr)
        want = filtered_loss64(x, W, y, thr, 8.0, mo.ArcFace(0.3))
        assert_close_to_oracle(ours, want, name=f"reference loss, threshold {thr}")
        assert (cos64(x, W) > thr).any()  # the threshold filters something


@pytest.mark.parametrize("strategy, reduction", [("auto", "mean"), ("auto", "none"), ("recompute", "mean"),
                                                 ("recompute", "none"), ("workspace", "mean")])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_torch_filtering_matches_reference(shape, strategy, reduction):
    B, C, D = shape
    x, W, y = make_inputs(B, C, D, ignore=2 if B > 2 else 0)
    check_against_reference(x, W, y, mo.CosFace(0.2), 16.0, strategy=strategy, reduction=reduction,
                            interclass_filtering_threshold=0.15, chunk_size=64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_filtering_every_dtype(dtype):
    x, W, y = make_inputs(37, 300, 40, dtype, ignore=3)
    check_against_reference(x, W, y, mo.ArcFace(0.5), interclass_filtering_threshold=0.1)


def test_filtering_loss_matches_the_definition_on_the_torch_backend():
    x, W, y = make_inputs(11, 40, 4, ignore=1)
    ours = mo.margin_cross_entropy(x, W, y, None, 10.0, reduction="none", interclass_filtering_threshold=0.25)
    assert_close_to_oracle(ours, filtered_loss64(x, W, y, 0.25, 10.0), name="loss")


def test_filtered_classes_get_no_gradient_and_keep_the_prediction():
    x, W, y = make_inputs(1, 30, 4)
    cos = cos64(x, W)[0]
    thr = float(cos.sort().values[-5])  # the 4 classes above it are filtered (the target may be one)
    filtered = (cos > thr) & (torch.arange(30) != y[0])
    assert filtered.any()
    for backend in ("torch", "reference"):
        out = run(x, W, y, mo.ArcFace(0.2), 12.0, backend=backend, interclass_filtering_threshold=thr)
        assert torch.all(out.W_grad[filtered] == 0), backend
        assert torch.all(out.W_grad[~filtered].abs().sum(1) > 0), backend
        assert int(out.stats.prediction[0]) == int(cos.argmax())  # the argmax over every class
        plain = run(x, W, y, mo.ArcFace(0.2), 12.0, backend=backend)
        assert float(out.stats.lse[0]) < float(plain.stats.lse[0])  # filtered columns leave the log-sum-exp


def test_threshold_extremes():
    x, W, y = make_inputs(8, 20, 6, ignore=1)
    # the same backend for both (on CPU "auto" may pick the native kernels, which do not filter)
    plain = mo.margin_cross_entropy(x, W, y, mo.CosFace(0.3), 20.0, reduction="none", backend="torch")
    top = mo.margin_cross_entropy(x, W, y, mo.CosFace(0.3), 20.0, reduction="none", backend="torch",
                                  interclass_filtering_threshold=1.0)
    assert torch.equal(plain, top)  # nothing lies above 1
    # -1: every non-target class is filtered (unless exactly opposite): only the target is left, loss 0
    low = mo.margin_cross_entropy(x, W, y, mo.CosFace(0.3), 20.0, reduction="none",
                                  interclass_filtering_threshold=-1.0)
    assert torch.equal(low, torch.zeros_like(low))


def test_filtering_differs_from_partial_fc_zeroing():
    """InsightFace's Partial FC sets filtered cosines to 0, so each adds exp(0) to the partition sum."""
    x, W, y = make_inputs(6, 12, 4)
    s, thr = 10.0, 0.2
    ours = mo.margin_cross_entropy(x, W, y, None, s, reduction="none", interclass_filtering_threshold=thr)
    cos = cos64(x, W)
    target = F.one_hot(y, 12).bool()
    zeroed = torch.where((cos > thr) & ~target, torch.zeros_like(cos), cos)
    partial_fc = F.cross_entropy(s * zeroed, y, reduction="none")
    n_filtered = ((cos > thr) & ~target).sum(1)
    assert bool((n_filtered > 0).any())
    differs = (ours - partial_fc).abs() > 1e-6
    assert torch.equal(differs, n_filtered > 0)  # equal exactly where nothing was filtered
    assert bool((ours[n_filtered > 0] < partial_fc[n_filtered > 0]).all())  # the exp(0) terms only add


def test_filtering_all_ignored_and_empty_batches():
    x, W, y = make_inputs(5, 9, 3)
    y[:] = -100
    out = run(x, W, y, None, 8.0, interclass_filtering_threshold=0.0)
    assert float(out.loss) == 0.0 and torch.all(out.x_grad == 0) and torch.all(out.W_grad == 0)
    out = run(x[:0], W, y[:0], None, 8.0, interclass_filtering_threshold=0.0)
    assert float(out.loss) == 0.0


@pytest.mark.parametrize("bad, error", [(1.5, ValueError), (-1.01, ValueError), (math.nan, ValueError),
                                        (math.inf, ValueError), ("0.3", TypeError), (True, TypeError)])
def test_bad_threshold(bad, error):
    x, W, y = make_inputs(4, 6, 3)
    with pytest.raises(error, match="interclass_filtering_threshold"):
        mo.margin_cross_entropy(x, W, y, interclass_filtering_threshold=bad)


def test_filtering_needs_normalize_and_no_label_smoothing():
    x, W, y = make_inputs(4, 6, 3)
    with pytest.raises(ValueError, match="normalize=True"):
        mo.margin_cross_entropy(x, W, y, normalize=False, interclass_filtering_threshold=0.3)
    with pytest.raises(ValueError, match="label_smoothing"):
        mo.margin_cross_entropy(x, W, y, label_smoothing=0.1, interclass_filtering_threshold=0.3)


def test_head_takes_the_filtering_option():
    head = mo.MarginHead(5, 17, mo.ArcFace(0.4), 16.0, dtype=torch.float64, interclass_filtering_threshold=0.2)
    x, _, y = make_inputs(6, 17, 5)
    want = mo.margin_cross_entropy(x, head.weight, y, mo.ArcFace(0.4), 16.0, interclass_filtering_threshold=0.2)
    assert torch.equal(head(x, y), want)


# -- AdaCos -------------------------------------------------------------------------------------------


def adacos_next64(x, W, y, s, ignore_index=-100):
    """The paper's dynamic scale from one batch at scale ``s``, in float64 from the B x C cosines."""
    cos = cos64(x, W)
    valid = y != ignore_index
    n = int(valid.sum())
    if n == 0:
        return s
    b_sum = 0.0
    thetas = []
    for i in range(x.shape[0]):
        if not valid[i]:
            continue
        b_sum += sum(math.exp(s * float(cos[i, j])) for j in range(W.shape[0]) if j != int(y[i]))
        thetas.append(math.acos(max(-1.0, min(1.0, float(cos[i, y[i]])))))
    theta_med = sorted(thetas)[(n - 1) // 2]  # the lower median
    return math.log(b_sum / n) / math.cos(min(math.pi / 4, theta_med))


def test_fixed_scale():
    for C in (3, 10, 85742):
        assert mo.AdaCos.fixed_scale(C) == pytest.approx(math.sqrt(2) * math.log(C - 1), rel=1e-15)
    policy = mo.AdaCos(50, dynamic=False)
    x, W, y = make_inputs(8, 50, 6)
    loss = mo.margin_cross_entropy(x, W, y, None, policy)
    assert torch.equal(loss, mo.margin_cross_entropy(x, W, y, None, math.sqrt(2) * math.log(49)))
    assert policy.history == [pytest.approx(math.sqrt(2) * math.log(49), rel=1e-15)]
    assert float(policy.scale) == pytest.approx(math.sqrt(2) * math.log(49), rel=1e-15)  # never moves


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_dynamic_scale_follows_the_paper_with_one_step_lag(backend):
    C = 40
    policy = mo.AdaCos(C)
    W = torch.randn(C, 6, dtype=torch.float64)
    expected = [mo.AdaCos.fixed_scale(C)]
    for step in range(4):
        x, _, y = make_inputs(13, C, 6, generator=torch.Generator().manual_seed(step))
        y[3] = -100 if step % 2 else y[3]  # an ignored row on some steps
        W = W + 0.3 * torch.randn_like(W)  # the weight moves between steps, as in training
        mo.margin_cross_entropy(x, W, y, None, policy, backend=backend)
        expected.append(adacos_next64(x, W, y, expected[-1]))
        assert policy.history == pytest.approx(expected[:-1], rel=1e-12)  # the scale each step used
        assert float(policy.scale) == pytest.approx(expected[-1], rel=1e-12)  # the next step's
    assert len(set(policy.history)) == 4  # it does move


def test_dynamic_scale_with_even_count_takes_the_lower_median():
    C = 12
    policy = mo.AdaCos(C)
    x, W, y = make_inputs(6, C, 4)
    mo.margin_cross_entropy(x, W, y, None, policy)
    assert float(policy.scale) == pytest.approx(adacos_next64(x, W, y, mo.AdaCos.fixed_scale(C)), rel=1e-12)


def test_adacos_keeps_its_scale_in_eval_mode_and_for_all_ignored_batches():
    C = 20
    head = mo.MarginHead(5, C, scale=mo.AdaCos(C), dtype=torch.float64)
    x, _, y = make_inputs(7, C, 5)
    s0 = float(head.scale.scale)
    head.eval()
    head(x, y)
    assert float(head.scale.scale) == s0 and head.scale.history == []
    head.train()
    head(x, torch.full_like(y, -100))
    assert float(head.scale.scale) == s0 and head.scale.history == [s0]
    loss = head(x, y)
    loss.backward()
    assert float(head.scale.scale) != s0 and len(head.scale.history) == 2
    state = head.state_dict()
    assert "scale.scale" in state
    other = mo.MarginHead(5, C, scale=mo.AdaCos(C), dtype=torch.float64)
    other.load_state_dict(state)
    assert float(other.scale.scale) == float(head.scale.scale)


def test_adacos_bad_input():
    with pytest.raises(ValueError, match="num_classes"):
        mo.AdaCos(2)
    with pytest.raises(TypeError, match="num_classes"):
        mo.AdaCos(10.0)
    with pytest.raises(TypeError, match="dynamic"):
        mo.AdaCos(10, dynamic=1)
    x, W, y = make_inputs(4, 9, 3)
    with pytest.raises(ValueError, match="num_classes = 10"):
        mo.margin_cross_entropy(x, W, y, None, mo.AdaCos(10))
    with pytest.raises(ValueError, match="AdaCos"):
        mo.MarginHead(3, 9, scale=mo.AdaCos(10))


# -- sub-centres -------------------------------------------------------------------------------------


def subcenter_loss64(x, W, y, k, scale, margin=None, ignore_index=-100):
    """Per-row loss over class cosines = max over each class's k sub-centres, from the definition."""
    cos = cos64(x, W).view(x.shape[0], -1, k).amax(2)
    out = []
    for i in range(x.shape[0]):
        if int(y[i]) == ignore_index:
            out.append(torch.zeros((), dtype=torch.float64))
            continue
        t = cos[i, y[i]]
        z = scale * (margin(t.reshape(1))[0] if margin is not None else t)
        logits = scale * cos[i].clone()
        logits[y[i]] = z
        out.append(torch.logsumexp(logits, 0) - z)
    return torch.stack(out)


def test_reference_sub_centres_match_the_definition():
    x, W, y = make_inputs(9, 3 * 11, 5, ignore=2)
    y = torch.where(y == -100, y, y % 11)
    got = mo.margin_cross_entropy(x, W, y, mo.SubCenter(mo.ArcFace(0.4), 3), 10.0, backend="reference",
                                  reduction="none")
    assert_close_to_oracle(got, subcenter_loss64(x, W, y, 3, 10.0, mo.ArcFace(0.4)), name="reference loss")


def sub_inputs(B, C, D, k, dtype=torch.float64, ignore=0):
    x, W, y = make_inputs(B, C * k, D, dtype, ignore=ignore)
    return x, W, torch.where(y == -100, y, y % C)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_torch_sub_centres_match_reference(shape, k):
    B, C, D = shape
    x, W, y = sub_inputs(B, C, D, k, ignore=2 if B > 2 else 0)
    check_against_reference(x, W, y, mo.SubCenter(mo.ArcFace(0.5), k), 16.0, chunk_size=32)
    check_against_reference(x, W, y, mo.SubCenter(mo.CosFace(0.3), k), 16.0, reduction="none",
                            interclass_filtering_threshold=0.2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_sub_centres_every_dtype(dtype):
    x, W, y = sub_inputs(37, 100, 40, 3, dtype, ignore=3)
    check_against_reference(x, W, y, mo.SubCenter(mo.ArcFace(0.5), 3))


def test_torch_sub_centres_loss_matches_the_definition():
    x, W, y = sub_inputs(10, 15, 4, 3, ignore=1)
    got = mo.margin_cross_entropy(x, W, y, mo.SubCenter(mo.CosFace(0.25), 3), 12.0, reduction="none")
    assert_close_to_oracle(got, subcenter_loss64(x, W, y, 3, 12.0, mo.CosFace(0.25)), name="loss")


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_gradient_reaches_only_the_maximal_sub_centre_lowest_on_ties(backend):
    C, k, D = 9, 3, 5
    x, W, y = sub_inputs(1, C, D, k)
    W = W.view(C, k, D)
    W[:, 2] = W[:, 0]  # a tie in every class between sub-centres 0 and 2 (the gradient must go to 0)
    W = W.reshape(C * k, D)
    out = run(x, W, y, mo.SubCenter(mo.ArcFace(0.3), k), 10.0, backend=backend)
    cos = cos64(x, W).view(C, k)
    best = cos.argmax(1)  # the first maximum
    grads = out.W_grad.view(C, k, D)
    for c in range(C):
        for r in range(k):
            nonzero = bool(grads[c, r].abs().sum() > 0)
            assert nonzero == (r == int(best[c])), (backend, c, r, cos[c].tolist())


def test_sub_centres_refuse_workspace_and_label_smoothing():
    x, W, y = sub_inputs(6, 10, 4, 3)
    W.requires_grad_()
    with pytest.raises(NotImplementedError, match="sub-centres"):  # the native backend keeps sub-centre tiles
        mo.margin_cross_entropy(x, W, y, mo.SubCenter(None, 3), strategy="workspace", backend="torch")
    with pytest.raises(NotImplementedError, match="label_smoothing"):
        mo.margin_cross_entropy(x, W, y, mo.SubCenter(None, 3), label_smoothing=0.1)
    # auto picks the recompute strategy for them
    assert not torch_chunked.uses_workspace(6, 30, 4, torch.float64, torch.float64,
                                            mo.backends.FusedOptions(scale=1.0, sub_centers=3))


@pytest.mark.parametrize("k, error", [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError),
                                      ("3", TypeError)])
def test_bad_sub_centre_count(k, error):
    with pytest.raises(error, match="sub-centres"):
        mo.SubCenter(mo.ArcFace(0.5), k)
    with pytest.raises(error, match="sub_centers"):
        mo.MarginHead(4, 10, sub_centers=k)


def test_weight_rows_must_be_a_multiple_of_k():
    x, W, y = make_inputs(4, 10, 3)
    with pytest.raises(ValueError, match="not a multiple of sub_centers = 3"):
        mo.margin_cross_entropy(x, W, y % 3, mo.SubCenter(None, 3))
    with pytest.raises(TypeError, match="SubCenter"):
        mo.SubCenter(mo.SubCenter(None, 2), 2)
    with pytest.raises(ValueError, match="outside"):  # labels index classes, not rows
        mo.margin_cross_entropy(x, W[:9], torch.tensor([0, 1, 2, 3]), mo.SubCenter(None, 3))


def test_sub_centres_with_an_adaptive_margin():
    x, W, y = sub_inputs(8, 12, 5, 3)
    margin = mo.AdaFace()
    ours = run(x, W, y, mo.SubCenter(margin, 3), 16.0)
    margin2 = mo.AdaFace()
    ref = run(x, W, y, mo.SubCenter(margin2, 3), 16.0, backend="reference")
    assert_close_to_oracle(ours.loss, ref.loss, name="loss")
    assert_close_to_oracle(ours.W_grad, ref.W_grad, name="W.grad")


def test_head_with_sub_centres():
    head = mo.MarginHead(6, 20, mo.ArcFace(0.5), 16.0, sub_centers=3, dtype=torch.float64)
    assert head.weight.shape == (60, 6)
    assert "sub_centers=3" in repr(head)
    x, _, y = make_inputs(9, 20, 6)
    want = mo.margin_cross_entropy(x, head.weight, y, mo.SubCenter(mo.ArcFace(0.5), 3), 16.0)
    assert torch.equal(head(x, y), want)
    values, indices = head.topk(x, 4)
    scores = cos64(x, head.weight.detach()).view(9, 20, 3).amax(2)
    assert torch.equal(indices, torch.sort(-scores, dim=1, stable=True).indices[:, :4])
    with pytest.raises(TypeError, match="SubCenter"):
        mo.MarginHead(6, 20, mo.SubCenter(None, 3))


@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_topk_with_sub_centres_equals_brute_force(chunk_size):
    C, k = 50, 3
    q = torch.randn(11, 8, dtype=torch.float64)
    centers = torch.randn(C * k, 8, dtype=torch.float64)
    centers[3 * k + 1] = centers[9 * k + 2]  # two classes tie through one sub-centre each
    q[0] = centers[3 * k + 1]
    values, indices = mo.topk_cosine(q, centers, 5, chunk_size=chunk_size, sub_centers=k)
    scores = cos64(q, centers).view(11, C, k).amax(2)
    order = torch.sort(-scores, dim=1, stable=True).indices[:, :5]  # ties to the lower class
    assert torch.equal(indices, order)
    assert_close_to_oracle(values, scores.gather(1, order), name="values")
    assert indices[0, 0] == 3 and indices[0, 1] == 9
    with pytest.raises(ValueError, match="k must lie in"):
        mo.topk_cosine(q, centers, C + 1, sub_centers=k)
    with pytest.raises(ValueError, match="not a multiple"):
        mo.topk_cosine(q, centers[:-1], 2, sub_centers=k)


def dominant64(W, k, x, y, max_angle=None):
    """The sub-center ArcFace post-processing from the definition, in float64."""
    C = W.shape[0] // k
    cos = cos64(x, W).view(x.shape[0], C, k)
    counts = torch.zeros(C, k, dtype=torch.int64)
    for i in range(x.shape[0]):
        if int(y[i]) < 0:
            continue
        r = int(cos[i, y[i]].argmax())
        counts[y[i], r] += 1
    dom = torch.tensor([max(range(k), key=lambda r: (int(counts[c, r]), -r)) for c in range(C)])
    kept = W.view(C, k, -1)[torch.arange(C), dom]
    keep = torch.tensor([int(y[i]) >= 0 and (max_angle is None or math.degrees(math.acos(
        max(-1.0, min(1.0, float(cos[i, y[i], dom[y[i]]]))))) <= max_angle) for i in range(x.shape[0])])
    return kept, dom, counts, keep


@pytest.mark.parametrize("max_angle", [None, 75.0, 60.0])
def test_drop_non_dominant_sub_centres(max_angle):
    C, k, D = 12, 3, 6
    W = torch.randn(C * k, D, dtype=torch.float64)
    y = torch.randint(0, C - 1, (200,))  # the last class has no samples: it keeps sub-centre 0
    # most samples of a class sit near one sub-centre, some near the others (label noise)
    pick = torch.where(torch.rand(200) < 0.7, (y % k), torch.randint(0, k, (200,)))
    x = W[y * k + pick] + 0.4 * torch.randn(200, D, dtype=torch.float64)
    y[5] = -100
    got = mo.drop_non_dominant_sub_centers(W, k, x, y, max_angle=max_angle, batch_size=37)
    want = dominant64(W, k, x, y, max_angle)
    assert got.weight.shape == (C, D)
    assert torch.equal(got.weight, want[0])
    assert torch.equal(got.dominant, want[1]) and int(got.dominant[-1]) == 0
    assert torch.equal(got.counts, want[2])
    assert torch.equal(got.keep, want[3]) and not bool(got.keep[5])
    if max_angle == 60.0:
        assert 0 < int(got.keep.sum()) < 199  # the threshold drops some samples


def test_drop_non_dominant_ties_go_to_the_lowest_sub_centre():
    W = torch.eye(4, dtype=torch.float64)  # 2 classes x 2 sub-centres
    x = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1.0]], dtype=torch.float64)
    got = mo.drop_non_dominant_sub_centers(W, 2, x, torch.tensor([0, 0, 1]))
    assert got.dominant.tolist() == [0, 1] and got.counts.tolist() == [[1, 1], [0, 1]]


def test_drop_non_dominant_bad_input():
    W = torch.randn(12, 4)
    x, y = torch.randn(5, 4), torch.randint(0, 4, (5,))
    with pytest.raises(ValueError, match="not a multiple"):
        mo.drop_non_dominant_sub_centers(W, 5, x, y)
    with pytest.raises(ValueError, match="sub-centres"):
        mo.drop_non_dominant_sub_centers(W, 0, x, y)
    with pytest.raises(ValueError, match="outside"):
        mo.drop_non_dominant_sub_centers(W, 3, x, torch.tensor([0, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match="max_angle"):
        mo.drop_non_dominant_sub_centers(W, 3, x, y, max_angle=200.0)
    with pytest.raises(ValueError, match="features"):
        mo.drop_non_dominant_sub_centers(W, 3, torch.randn(5, 3), y)


# -- the sharded head refuses what it cannot do ---------------------------------------------------------


def test_sharded_head_names_unsupported_features(monkeypatch):
    import torch.distributed as dist

    from marginops.distributed import ShardedMarginHead
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    with pytest.raises(TypeError, match="sub_centers=k"):  # sub-centres are the head's sub_centers=k
        ShardedMarginHead(4, 10, margin=mo.SubCenter(None, 2))
    with pytest.raises(NotImplementedError, match="AdaCos with class sampling"):
        ShardedMarginHead(4, 10, scale=mo.AdaCos(10), sample_rate=0.5)


@pytest.mark.slow
def test_margin_family_doc_examples_run():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "margins.md").read_text()
    block = text[text.index("<!-- margin-family"):text.index("<!-- end margin-family")]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    exec(compile(code, "docs/margins.md (margin family)", "exec"), {})


def test_no_batch_by_classes_tensor_with_sub_centres_and_filtering():
    """Every tensor the torch backend creates is far smaller than B x C (let alone B x C k)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from marginops.backends import Call, FusedOptions
    from marginops.backends.common import inverse_norms

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.largest = max(Largest.largest, t.numel())
            return out

    B, C, D, k = 64, 2000, 8, 3
    x, W, y = sub_inputs(B, C, D, k, torch.float32)
    opts = FusedOptions(scale=16.0, sub_centers=k, filter_threshold=0.3, memory_budget=64 * 1024,
                        want_prediction=True)
    call = Call(x, W, y, inverse_norms(x, torch.float32), inverse_norms(W, torch.float32), opts)
    with Largest():
        stats = torch_chunked.forward_stats(call)
        dxh, dW = torch_chunked.recompute_grads(call, torch.logaddexp(stats.lse, torch.zeros(B)), torch.ones(B))
    assert dW.shape == (C * k, D)  # the gradient itself is C k x D; nothing is B x C
    assert Largest.largest == C * k * D and Largest.largest < B * C
    Largest.largest = 0
    with Largest():
        torch_chunked.forward_stats(call)
    assert Largest.largest <= 64 * 1024 // 4, Largest.largest  # the forward's tiles stay within the budget


def test_gradcheck_with_sub_centres_and_filtering():
    x, W, y = sub_inputs(5, 7, 3, 2, ignore=1)
    margin = mo.SubCenter(mo.ArcFace(0.3), 2)

    def f(x_, W_):
        return mo.margin_cross_entropy(x_, W_, y, margin, 4.0, interclass_filtering_threshold=0.2,
                                       strategy="recompute", reduction="none")

    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(), W.clone().requires_grad_()))


def test_compiled_call_with_sub_centres_and_filtering_matches_eager():
    x, W, y = sub_inputs(9, 20, 6, 3, torch.float32, ignore=2)
    margin = mo.SubCenter(mo.CosFace(0.3), 3)

    def step(x_, W_):
        loss, stats = mo.margin_cross_entropy(x_, W_, y, margin, 16.0, interclass_filtering_threshold=0.25,
                                              return_stats=True)
        return loss, stats.prediction

    outs = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        xl, Wl = x.clone().requires_grad_(), W.clone().requires_grad_()
        loss, pred = fn(xl, Wl)
        loss.backward()
        outs.append((loss.detach(), pred, xl.grad, Wl.grad))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7) if a.is_floating_point() else torch.equal(a, b)
