"""The naive, fully materialized margin softmax: the oracle for tests and the baseline for benchmarks.

This is what people write today: normalize, one big matmul into a ``B x C``
cosine matrix, the margin on the gathered target column, and
``F.cross_entropy`` over ``B x C`` logits, with plain autograd. It keeps
several ``B x C`` tensors alive and depends on nothing but torch. It is not
meant to be fast; it is meant to be obviously right.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import EPS  # the floor on norms of F.normalize and the fused backends



class ReferenceOutput(NamedTuple):
    loss: Tensor
    lse: Tensor
    target_logit: Tensor
    target_cos: Tensor
    prediction: Tensor
    nontarget_lse: Tensor  # log-sum-exp of the non-target logits alone (filtered ones left out)


def margin_cross_entropy_reference(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    margin: Optional[Callable[[Tensor], Tensor]] = None,
    scale: float = 64.0,
    *,
    normalize: bool = True,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    interclass_filtering_threshold: Optional[float] = None,
    sub_centers: int = 1,
) -> ReferenceOutput:
    """Margin cross-entropy computed the naive way (see module docstring).

    Semantics match :func:`marginops.margin_cross_entropy`: ignored rows
    contribute zero; ``reduction="mean"`` divides by the number of rows that
    are not ignored, and returns a zero loss when every row is ignored.

    ``sub_centers = k``: ``weight`` has ``k`` rows per class (class-major) and the
    ``B x C`` class cosines are the maxima of the ``B x C x k`` sub-centre cosines,
    taken by ``argmax`` + ``gather`` so that the gradient goes to the first maximum
    only. ``interclass_filtering_threshold``: non-target logits whose class cosine
    exceeds it are set to ``-inf`` (masked out of the softmax); ``lse`` leaves them
    out, ``prediction`` does not (it is the argmax over every class).
    """
    if normalize:
        cos = F.linear(F.normalize(embeddings, dim=1, eps=EPS), F.normalize(weight, dim=1, eps=EPS))
    else:
        cos = F.linear(embeddings, weight)
    if sub_centers > 1:
        cos = cos.view(cos.shape[0], -1, sub_centers)
        cos = cos.gather(2, cos.argmax(2, keepdim=True)).squeeze(2)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    t = cos.gather(1, safe.unsqueeze(1)).squeeze(1)
    z = scale * (margin(t) if margin is not None else t)
    logits = (scale * cos).scatter(1, safe.unsqueeze(1), z.unsqueeze(1).to(cos.dtype))
    if interclass_filtering_threshold is not None:
        target = torch.zeros_like(cos, dtype=torch.bool).scatter(1, safe.unsqueeze(1), True)
        logits = logits.masked_fill((cos > interclass_filtering_threshold) & ~target, float("-inf"))
    per_row = F.cross_entropy(
        logits, labels, reduction="none", ignore_index=ignore_index, label_smoothing=label_smoothing
    )
    if reduction == "none":
        loss = per_row
    elif reduction == "sum":
        loss = per_row.sum()
    else:
        loss = per_row.sum() / valid.sum().clamp_min(1).to(per_row.dtype)
    with torch.no_grad():
        lse = torch.logsumexp(logits, dim=1)
        nontarget_lse = torch.logsumexp(logits.scatter(1, safe.unsqueeze(1), float("-inf")), dim=1)
        prediction = cos.argmax(dim=1)
    return ReferenceOutput(loss, lse, z.detach(), t.detach(), prediction, nontarget_lse)
