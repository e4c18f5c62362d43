"""Nearest class centres for new samples: top-k cosine search over ``C`` centres without ``B x C`` scores.

After training, a :class:`marginops.MarginHead`'s ``weight`` holds one centre
per class. :func:`topk_cosine` finds, for each query, the ``k`` centres of
highest cosine, walking the classes in chunks so that only a ``B x chunk``
tile of scores exists at a time; :func:`answer_or_abstain` turns the best
match into an answer, or ``-1`` where no centre is close enough.

Examples::

    >>> import torch
    >>> from marginops.retrieval import topk_cosine, answer_or_abstain
    >>> centers = torch.randn(100_000, 128)     # e.g. head.weight.detach()
    >>> queries = torch.randn(16, 128)
    >>> values, indices = topk_cosine(queries, centers, k=5)
    >>> answers, cosines = answer_or_abstain(queries, centers, threshold=0.3)
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .backends.common import acc_dtype
from ._checks import EPS, check_float_dtype, check_number, check_optional_int, check_tensor
from .margins.subcenter import check_sub_centers, check_weight_rows

__all__ = ["topk_cosine", "answer_or_abstain", "TILE_BYTES"]


#: Bytes of the ``B x chunk`` score tile when ``chunk_size`` is not given (8 MiB: 2048 classes at B = 1024
#: in float32, which ran faster on a 2-core Xeon than 8192, the tile staying nearer the caches).
TILE_BYTES = 8 * 2**20


def _validate(queries, centers, k, chunk_size, normalize, sub_centers=1) -> tuple[int, Optional[int]]:
    check_tensor("queries", queries, 2)
    check_tensor("centers", centers, 2)
    for name, t in (("queries", queries), ("centers", centers)):
        check_float_dtype(name, t)
    if queries.device != centers.device:
        raise ValueError(f"queries and centers must be on one device, got {queries.device} and {centers.device}")
    (_, D), (C, Dc) = queries.shape, centers.shape
    C = check_weight_rows(C, check_sub_centers(sub_centers, "sub_centers"), "centers")
    if Dc != D:
        raise ValueError(f"centers has {Dc} features per class but queries have {D} (centers is (C, D))")
    if D < 1:
        raise ValueError(f"queries and centers must have at least one feature, got D = {D}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__} {k!r}")
    if not 1 <= k <= C:
        raise ValueError(f"k must lie in [1, C] where C = {C} is the number of classes (centres"
                         f"{' / sub_centers' if sub_centers > 1 else ''}), got k = {k}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {normalize!r}")
    return int(k), check_optional_int("chunk_size", chunk_size, 1)


def _default_chunk(batch: int, dtype: torch.dtype) -> int:
    """Classes per chunk such that the ``batch x chunk`` score tile takes about :data:`TILE_BYTES`."""
    itemsize = torch.finfo(dtype).bits // 8
    return max(1, TILE_BYTES // (max(batch, 1) * itemsize))


def _chunk_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of each row of ``scores``, ties at the cut going to the lower column.

    ``torch.topk`` picks arbitrarily among equal values. Taking one entry more
    shows where that matters: a row whose ``(k+1)``-th value equals its
    ``k``-th has more tied entries at the cut than fit, and is redone with a
    stable sort (rare with real data; counting ties over the whole tile
    instead would cost about as much as the matmul).
    """
    n = scores.shape[1]
    values, cols = torch.topk(scores, min(k + 1, n), dim=1)
    if n > k:
        overflow = values[:, k] == values[:, k - 1]
        values, cols = values[:, :k], cols[:, :k]
        if bool(overflow.any()):
            rows = overflow.nonzero().squeeze(1)
            v, c = torch.sort(scores[rows], dim=1, descending=True, stable=True)
            values[rows], cols[rows] = v[:, :k], c[:, :k]
    return values, cols


def topk_cosine(queries: Tensor, centers: Tensor, k: int, *, chunk_size: Optional[int] = None,
                normalize: bool = True, sub_centers: int = 1) -> tuple[Tensor, Tensor]:
    r"""The ``k`` centres of highest cosine for each query, without a ``B x C`` score matrix.

    Scores are ``cos_ij = q̂_i · ĉ_j`` (rows L2-normalized with norms floored
    at 1e-12, as ``F.normalize``; a zero row has cosine 0 with everything),
    or plain dot products ``q_i · c_j`` with ``normalize=False``. Classes are
    processed ``chunk_size`` at a time: each chunk of centres is converted to
    the accumulation dtype and normalized on its own (the ``C x D`` centres
    are never copied whole), multiplied with the queries, and its best
    ``k`` are merged into the running best ``k``.

    Ties are broken exactly by the lower class index: the result is the
    first ``k`` of all classes sorted by ``(-score, index)``, whatever the
    chunking. Runs under ``torch.no_grad``: the results never require grad.

    Args:
        queries (Tensor): ``(B, D)`` samples, float16/bfloat16/float32/float64.
        centers (Tensor): ``(C, D)`` class centres (e.g. ``MarginHead.weight``), any of
            the same dtypes, not necessarily the queries'.
        k (int): how many classes per query, in ``[1, C]``.
        chunk_size (int, optional): classes per chunk. Default: as many as keep the
            ``B x chunk`` tile within :data:`TILE_BYTES` (8 MiB).
        normalize (bool): cosine (True) or plain dot product (False). Default: True.
        sub_centers (int): ``centers`` holds this many rows per class (class-major, as the
            weight of a sub-centre head); a class scores the largest of its rows' scores and
            the indices are classes. ``chunk_size`` then counts classes. Default: 1.

    Returns:
        ``(values, indices)``, each ``(B, k)``, sorted by descending score:
        ``values`` in float32 (float64 if either input is float64, which is also
        the dtype the scores are computed in), ``indices`` int64 class indices.

    Raises:
        TypeError: a non-tensor, a non-float tensor, or a non-int ``k``/``chunk_size``.
        ValueError: tensors that are not 2-D, on different devices or with different
            feature counts; ``D = 0``; ``k`` outside ``[1, C]``; ``chunk_size < 1``.
    """
    k, chunk_size = _validate(queries, centers, k, chunk_size, normalize, sub_centers)
    sub = sub_centers
    B, C = queries.shape[0], centers.shape[0] // sub
    acc = acc_dtype(queries.dtype, centers.dtype)
    chunk = min(C, chunk_size or max(1, _default_chunk(B, acc) // sub))
    with torch.no_grad():
        q = queries.to(acc)
        if normalize:
            q = F.normalize(q, dim=1, eps=EPS)
        best_v = q.new_empty(B, 0)
        best_i = torch.empty(B, 0, dtype=torch.long, device=q.device)
        for start in range(0, C, chunk):
            c = centers[start * sub:(start + chunk) * sub].to(acc)
            if normalize:
                c = F.normalize(c, dim=1, eps=EPS)  # a new tensor: the caller's centres stay untouched
            scores = torch.mm(q, c.t())
            if sub > 1:  # a class scores its best sub-centre
                scores = scores.view(B, -1, sub).amax(2)
            v, i = _chunk_topk(scores, min(k, scores.shape[1]))
            # Merge: running best (lower indices) first, then this chunk's in index order, and a stable
            # sort by value keeps that order among equal values, i.e. ties go to the lower index.
            i, order = torch.sort(i + start, dim=1)
            v = torch.gather(v, 1, order)
            v, order = torch.sort(torch.cat([best_v, v], dim=1), dim=1, descending=True, stable=True)
            best_v = v[:, :k]
            best_i = torch.gather(torch.cat([best_i, i], dim=1), 1, order[:, :k])
    return best_v, best_i


def answer_or_abstain(queries: Tensor, centers: Tensor, threshold: float, *,
                      chunk_size: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """The nearest class of each query by cosine, or ``-1`` (abstain) where it is not close enough.

    Args:
        queries (Tensor): ``(B, D)`` samples.
        centers (Tensor): ``(C, D)`` class centres, ``C >= 1``.
        threshold (float): the least cosine that gives an answer, in ``[-1, 1]``.
            ``-1`` always answers; ``1`` answers only where the computed cosine
            reaches 1 (rounding may leave an exact match just below it).
        chunk_size (int, optional): as for :func:`topk_cosine`.

    Returns:
        ``(answers, cosines)``, each ``(B,)``: ``answers`` int64, the top-1 class
        index (lowest index among ties) where its cosine is ``>= threshold``, else
        ``-1``; ``cosines`` the top-1 cosine (float32, float64 for float64 inputs),
        clamped to ``[-1, 1]`` so that rounding cannot push it past the threshold's range.

    Raises:
        TypeError, ValueError: as :func:`topk_cosine`; ValueError for a ``threshold``
        that is not finite or outside ``[-1, 1]`` (TypeError if it is not a number).
    """
    threshold = check_number("threshold", threshold, low=-1.0, high=1.0)
    values, indices = topk_cosine(queries, centers, 1, chunk_size=chunk_size)
    cosines = values.squeeze(1).clamp(-1.0, 1.0)
    answers = torch.where(cosines >= threshold, indices.squeeze(1), torch.full_like(indices.squeeze(1), -1))
    return answers, cosines
