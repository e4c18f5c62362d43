"""topk_cosine and answer_or_abstain against brute force: the full score matrix and a stable sort."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from marginops.retrieval import TILE_BYTES, answer_or_abstain, topk_cosine

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Absolute slack on scores of magnitude <= 1 in the accumulation dtype (rounding of a short dot product).
SLACK = {torch.float32: 1e-5, torch.float64: 1e-12}


def acc_of(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def brute_scores(q: torch.Tensor, W: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """The full ``B x C`` matrix, on the same (possibly 16-bit-rounded) inputs, in the accumulation dtype."""
    acc = acc_of(q.dtype, W.dtype)
    q, W = q.to(acc), W.to(acc)
    if normalize:
        q, W = F.normalize(q, dim=1), F.normalize(W, dim=1)
    return q @ W.T


def brute_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First ``k`` by ``(-score, index)``: a stable descending sort keeps the lower index first among ties."""
    v, i = torch.sort(scores, dim=1, descending=True, stable=True)
    return v[:, :k], i[:, :k]


def assert_matches(values, indices, scores, k, *, slack: float, exact: bool = False) -> None:
    """``(values, indices)`` is brute force's top ``k`` of ``scores``.

    ``exact``: indices and values identical (for inputs whose scores are computed exactly). Otherwise
    values agree within ``slack`` (times the scale of the scores), each returned value is its class's
    brute-force score, and an index may differ from brute force's only where the two classes' scores
    lie within ``slack`` of each other (a near tie that rounding may order either way).
    """
    B = scores.shape[0]
    ref_v, ref_i = brute_topk(scores, k)
    assert values.shape == indices.shape == (B, k)
    assert indices.dtype == torch.int64
    if exact:
        assert torch.equal(indices, ref_i), f"indices {indices.tolist()} != brute force {ref_i.tolist()}"
        assert torch.equal(values, ref_v.to(values.dtype))
        return
    if B == 0:
        return
    tol = slack * max(1.0, float(scores.abs().max()))
    v = values.double()
    assert bool(torch.all(v[:, :-1] >= v[:, 1:])), "values not sorted descending"
    assert float((v - ref_v.double()).abs().max()) <= tol, "values differ from brute force"
    assert all(len(set(row)) == k for row in indices.tolist()), "a class returned twice"
    own = torch.gather(scores, 1, indices).double()
    assert float((own - v).abs().max()) <= tol, "a value is not its class's score"
    differ = indices != ref_i
    gap = (own - torch.gather(scores, 1, ref_i).double()).abs()
    assert bool(torch.all(gap[differ] <= tol)), (
        f"indices differ from brute force beyond a near tie: {indices[differ].tolist()} vs {ref_i[differ].tolist()}")


def check(q, W, k, *, chunk_size=None, normalize=True, exact=False):
    values, indices = topk_cosine(q, W, k, chunk_size=chunk_size, normalize=normalize)
    acc = acc_of(q.dtype, W.dtype)
    assert values.dtype == acc and values.device == q.device
    scores = brute_scores(q, W, normalize)
    assert_matches(values, indices, scores, k, slack=SLACK[acc], exact=exact)
    return values, indices


# -- against brute force ---------------------------------------------------------------------------


@pytest.mark.parametrize("B,C,D", [(1, 1, 1), (1, 37, 3), (5, 37, 1), (7, 100, 3), (3, 64, 16)])
@pytest.mark.parametrize("chunk_size", [1, 7, 16, 1000, None])
@pytest.mark.parametrize("k", ["1", "mid", "C"])
def test_matches_brute_force(B, C, D, chunk_size, k):
    k = {"1": 1, "mid": max(1, C // 3), "C": C}[k]
    check(torch.randn(B, D), torch.randn(C, D), k, chunk_size=chunk_size)


@pytest.mark.parametrize("qdtype", DTYPES)
@pytest.mark.parametrize("wdtype", DTYPES)
def test_dtypes_and_mixed_dtypes(qdtype, wdtype):
    # brute force runs on the same rounded inputs, so only the accumulation's rounding separates the two
    q, W = torch.randn(6, 24).to(qdtype), torch.randn(150, 24).to(wdtype)
    for chunk_size in (16, None):
        check(q, W, 5, chunk_size=chunk_size)
    check(q, W, 150, chunk_size=41)


@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_dot_product(dtype):
    q, W = (torch.randn(4, 5) * 3).to(dtype), (torch.randn(70, 5) * 2).to(dtype)
    check(q, W, 6, chunk_size=9, normalize=False)
    values, _ = topk_cosine(q, W, 1, normalize=False)
    assert float(values.abs().max()) > 1.0  # really not cosines


def test_does_not_modify_inputs():
    q, W = torch.randn(3, 4), torch.randn(20, 4) * 5
    q0, W0 = q.clone(), W.clone()
    topk_cosine(q, W, 3, chunk_size=6)
    assert torch.equal(q, q0) and torch.equal(W, W0)


# -- exact ties --------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 8, 100, None])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_go_to_the_lower_index(chunk_size, normalize):
    # Small integers: every dot product is exact and duplicate rows have bit-identical norms, so the
    # scores tie exactly. Zero rows tie at 0 with everything.
    base = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    W = base[torch.tensor([3, 0, 1, 0, 2, 3, 0, 1, 3, 2, 0, 3])]  # duplicates spread over chunks
    q = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    for k in (1, 2, 3, 4, 7, 12):
        check(q, W, k, chunk_size=chunk_size, normalize=normalize, exact=True)


def test_ties_do_not_depend_on_topks_choice(monkeypatch):
    """torch.topk may keep any of equal values: make it prefer the highest index, results must not move."""
    def topk_preferring_high_indices(input, k, dim=-1, largest=True, sorted=True):
        n = input.shape[dim]
        v, i = torch.sort(input.flip(dim), dim=dim, descending=largest, stable=True)
        return v.narrow(dim, 0, k), n - 1 - i.narrow(dim, 0, k)

    W = torch.zeros(30, 2)
    W[::3, 0] = 1.0  # classes 0, 3, 6, ... tie at cosine 1 with q[0]
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # the adversary really does keep high indices among ties
    assert sorted(topk_preferring_high_indices(torch.zeros(1, 6), 2)[1][0].tolist()) == [4, 5]
    monkeypatch.setattr(torch, "topk", topk_preferring_high_indices)
    for chunk_size in (4, 7, 30):
        for k in (1, 3, 12, 30):
            values, indices = check(q, W, k, chunk_size=chunk_size, exact=True)
        assert indices[0, :3].tolist() == [0, 3, 6] and values[0, 0] == 1.0


def test_zero_query_ties_everywhere():
    values, indices = topk_cosine(torch.zeros(2, 4), torch.randn(9, 4), 4, chunk_size=2)
    assert torch.equal(values, torch.zeros(2, 4))
    assert indices.tolist() == [[0, 1, 2, 3]] * 2


def test_assert_matches_catches_wrong_answers():
    """The comparison used above can fail: a swapped pair of distinct scores and a wrong tie-break."""
    scores = torch.tensor([[0.9, 0.5, 0.5, 0.1]])
    with pytest.raises(AssertionError):
        assert_matches(torch.tensor([[0.5, 0.9]]), torch.tensor([[1, 0]]), scores, 2, slack=1e-5)
    with pytest.raises(AssertionError):
        assert_matches(torch.tensor([[0.9, 0.5]]), torch.tensor([[0, 3]]), scores, 2, slack=1e-5)
    with pytest.raises(AssertionError):
        assert_matches(torch.tensor([[0.9, 0.5]]), torch.tensor([[0, 2]]), scores, 2, slack=1e-5, exact=True)
    assert_matches(torch.tensor([[0.9, 0.5]]), torch.tensor([[0, 1]]), scores, 2, slack=1e-5, exact=True)


# -- shapes, autograd, memory ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch(dtype):
    values, indices = topk_cosine(torch.empty(0, 3, dtype=dtype), torch.randn(10, 3), 4)
    assert values.shape == indices.shape == (0, 4)
    assert values.dtype == acc_of(dtype, torch.float32) and indices.dtype == torch.int64
    answers, cosines = answer_or_abstain(torch.empty(0, 3), torch.randn(10, 3), 0.0)
    assert answers.shape == cosines.shape == (0,)


@pytest.mark.parametrize("grad_mode", [True, False])
def test_no_autograd_graph(grad_mode):
    q = torch.randn(4, 6, requires_grad=True)
    W = torch.randn(50, 6, dtype=torch.float64, requires_grad=True)
    with torch.set_grad_enabled(grad_mode):
        values, indices = topk_cosine(q, W, 3, chunk_size=8)
        answers, cosines = answer_or_abstain(q, W, 0.0)
    for t in (values, indices, answers, cosines):
        assert not t.requires_grad and t.grad_fn is None
    check(q.detach(), W.detach(), 3)


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor (elements and bytes) any aten op produces."""

    def __init__(self):
        super().__init__()
        self.numel = self.nbytes = 0
        self.mm_shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.mm.default:
            self.mm_shapes.append(tuple(out.shape))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
                self.nbytes = max(self.nbytes, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_temporaries_stay_within_a_tile(wdtype):
    B, C, D, chunk, k = 64, 5000, 8, 256, 5
    q, W = torch.randn(B, D), torch.randn(C, D).to(wdtype)
    with _LargestOutput() as probe:
        topk_cosine(q, W, k, chunk_size=chunk)
    assert probe.mm_shapes and all(s[0] == B and s[1] <= chunk for s in probe.mm_shapes)
    # no B x C scores and no converted or normalized copy of the whole C x D centres
    assert probe.numel <= max(B * chunk, chunk * D, B * 2 * k), probe.numel


def test_default_chunk_bounds_the_tile():
    B, C, D = 256, 40_000, 4  # B x C float32 scores would be 39 MiB, several tiles
    assert B * C * 4 > TILE_BYTES
    q, W = torch.randn(B, D), torch.randn(C, D)
    with _LargestOutput() as probe:
        values, indices = topk_cosine(q, W, 3)
    assert len(probe.mm_shapes) >= 2
    assert probe.nbytes <= TILE_BYTES and probe.numel < B * C
    assert_matches(values, indices, brute_scores(q, W), 3, slack=SLACK[torch.float32])


@given(B=st.integers(0, 6), C=st.integers(1, 40), D=st.integers(1, 5), data=st.data(),
       qdtype=st.sampled_from(DTYPES), wdtype=st.sampled_from(DTYPES), normalize=st.booleans(),
       integers=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_hypothesis_shapes(B, C, D, data, qdtype, wdtype, normalize, integers, seed):
    k = data.draw(st.integers(1, C), label="k")
    chunk_size = data.draw(st.one_of(st.none(), st.integers(1, C + 3)), label="chunk_size")
    gen = torch.Generator().manual_seed(seed)
    if integers:  # many exact ties
        q = torch.randint(-1, 2, (B, D), generator=gen).to(qdtype)
        W = torch.randint(-1, 2, (C, D), generator=gen).to(wdtype)
    else:
        q, W = torch.randn(B, D, generator=gen).to(qdtype), torch.randn(C, D, generator=gen).to(wdtype)
    check(q, W, k, chunk_size=chunk_size, normalize=normalize, exact=integers and not normalize)


# -- answer_or_abstain -----------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [-1.0, -0.2, 0.0, 0.6, 0.7, 1.0])
def test_answer_or_abstain_matches_brute_force(threshold):
    q, W = torch.randn(40, 16), torch.randn(300, 16)  # best cosines spread over about [0.5, 0.8]
    answers, cosines = answer_or_abstain(q, W, threshold, chunk_size=64)
    ref_v, ref_i = brute_topk(brute_scores(q, W), 1)
    ref_v, ref_i = ref_v.squeeze(1), ref_i.squeeze(1)
    assert torch.allclose(cosines, ref_v, atol=1e-6, rtol=0)
    clear = (ref_v - threshold).abs() > 1e-6  # rows not within rounding of the threshold
    expected = torch.where(ref_v >= threshold, ref_i, torch.full_like(ref_i, -1))
    assert torch.equal(answers[clear], expected[clear])
    if threshold == -1.0:
        assert bool((answers >= 0).all())
    if 0.0 < threshold < 1.0:
        assert bool((answers == -1).any()) and bool((answers >= 0).any())  # both outcomes exercised


def test_answer_or_abstain_threshold_edges():
    W = torch.eye(4, dtype=torch.float64)[torch.tensor([0, 1, 1, 2])]  # class 2 duplicates class 1
    q = torch.tensor([[0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0], [-1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]],
                     dtype=torch.float64)
    answers, cosines = answer_or_abstain(q, W, 1.0)
    assert answers.tolist() == [1, -1, -1, -1] and cosines.dtype == torch.float64
    answers, _ = answer_or_abstain(q, W, -1.0)
    assert answers.tolist() == [1, 0, 1, 0]
    # antipodal to the only centre: cosine -1 (up to rounding, clamped), still answered at threshold -1
    answers, cosines = answer_or_abstain(torch.tensor([[-3.0, -1.0]]), torch.tensor([[3.0, 1.0]]), -1.0)
    assert answers.tolist() == [0] and cosines.tolist() == pytest.approx([-1.0])


@pytest.mark.parametrize("bad", [1.5, -1.01, math.nan, math.inf, -math.inf])
def test_answer_or_abstain_bad_threshold(bad):
    with pytest.raises(ValueError, match="threshold"):
        answer_or_abstain(torch.randn(2, 3), torch.randn(4, 3), bad)


def test_answer_or_abstain_threshold_type():
    with pytest.raises(TypeError, match="threshold"):
        answer_or_abstain(torch.randn(2, 3), torch.randn(4, 3), "0.5")


# -- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,kwargs,error,match", [
    ((torch.randn(2, 3), torch.randn(5, 3), 0), {}, ValueError, r"k .*C = 5.*k = 0"),
    ((torch.randn(2, 3), torch.randn(5, 3), 6), {}, ValueError, r"k .*C = 5.*k = 6"),
    ((torch.randn(2, 3), torch.randn(0, 3), 1), {}, ValueError, r"k .*C = 0"),
    ((torch.randn(2, 3), torch.randn(5, 3), 2.0), {}, TypeError, "k must be an int"),
    ((torch.randn(2, 3), torch.randn(5, 3), True), {}, TypeError, "k must be an int"),
    ((torch.randn(3), torch.randn(5, 3), 1), {}, ValueError, "queries must be 2-D"),
    ((torch.randn(2, 3), torch.randn(5, 3, 1), 1), {}, ValueError, "centers must be 2-D"),
    ((torch.randn(2, 3).numpy(), torch.randn(5, 3), 1), {}, TypeError, "queries must be a torch.Tensor"),
    ((torch.randn(2, 3), torch.randn(5, 4), 1), {}, ValueError, "centers has 4 features.*queries have 3"),
    ((torch.randn(2, 0), torch.randn(5, 0), 1), {}, ValueError, "at least one feature"),
    ((torch.ones(2, 3, dtype=torch.long), torch.randn(5, 3), 1), {}, TypeError, "queries must be a floating"),
    ((torch.randn(2, 3), torch.ones(5, 3, dtype=torch.int32), 1), {}, TypeError, "centers must be a floating"),
    ((torch.randn(2, 3), torch.randn(5, 3, dtype=torch.complex64), 1), {}, TypeError, "centers must be a floating"),
    ((torch.randn(2, 3), torch.randn(5, 3), 1), {"chunk_size": 0}, ValueError, "chunk_size"),
    ((torch.randn(2, 3), torch.randn(5, 3), 1), {"chunk_size": 2.5}, TypeError, "chunk_size"),
    ((torch.randn(2, 3), torch.randn(5, 3), 1), {"normalize": 1}, TypeError, "normalize"),
    ((torch.randn(2, 3), torch.randn(5, 3, device="meta"), 1), {}, ValueError, "queries and centers.*device"),
])
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        topk_cosine(*args, **kwargs)


def test_answer_or_abstain_validates_tensors():
    with pytest.raises(ValueError, match="centers has 4 features"):
        answer_or_abstain(torch.randn(2, 3), torch.randn(5, 4), 0.5)
    with pytest.raises(ValueError, match="chunk_size"):
        answer_or_abstain(torch.randn(2, 3), torch.randn(5, 3), 0.5, chunk_size=0)
