"""The naive, fully materialized margin softmax: the oracle for tests and the baseline for benchmarks.

This is what people write today: normalize, one big matmul into a ``B x C``
cosine matrix, the margin on the gathered target column, and
``F.cross_entropy`` over ``B x C`` logits, with plain autograd. It keeps
several ``B x C`` tensors alive and depends on nothing but torch. It is not
meant to be fast; it is meant to be obviously right.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

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
    scale: Union[float, Tensor] = 64.0,
    *,
    normalize: bool = True,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    interclass_filtering_threshold: Optional[float] = None,
    sub_centers: int = 1,
    row_weight: Optional[Tensor] = None,
) -> ReferenceOutput:
    """Margin cross-entropy computed the naive way (see module docstring).

    Semantics match :func:`marginops.margin_cross_entropy`: ignored rows
    contribute zero; ``reduction="mean"`` divides by the number of rows that
    are not ignored, and returns a zero loss when every row is ignored.

    ``scale`` may be a ``(B,)`` tensor: row ``i``'s logits are then ``scale[i] * cos``
    and its target logit ``scale[i] * psi(t_i)`` (gradients flow into it).
    ``row_weight`` ``(B,)`` multiplies each row's loss; ``"mean"`` then divides by
    the sum of the weights of the rows that are not ignored (as ``F.cross_entropy``'s
    weighted mean), a zero loss when that sum is 0.

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
    per_row_scale = scale.unsqueeze(1) if isinstance(scale, Tensor) else scale
    logits = (per_row_scale * cos).scatter(1, safe.unsqueeze(1), z.unsqueeze(1).to(cos.dtype))
    if interclass_filtering_threshold is not None:
        target = torch.zeros_like(cos, dtype=torch.bool).scatter(1, safe.unsqueeze(1), True)
        logits = logits.masked_fill((cos > interclass_filtering_threshold) & ~target, float("-inf"))
    per_row = F.cross_entropy(
        logits, labels, reduction="none", ignore_index=ignore_index, label_smoothing=label_smoothing
    )
    counted = valid.to(per_row.dtype)
    if row_weight is not None:
        counted = torch.where(valid, row_weight.to(per_row.dtype), torch.zeros_like(counted))
        per_row = torch.where(counted != 0, per_row * counted, torch.zeros_like(per_row))  # 0 even for an inf loss
    if reduction == "none":
        loss = per_row
    elif reduction == "sum":
        loss = per_row.sum()
    else:
        total = counted.sum()
        loss = per_row.sum() / torch.where(total > 0, total, torch.ones_like(total))
    with torch.no_grad():
        lse = torch.logsumexp(logits, dim=1)
        nontarget_lse = torch.logsumexp(logits.scatter(1, safe.unsqueeze(1), float("-inf")), dim=1)
        prediction = cos.argmax(dim=1)
    return ReferenceOutput(loss, lse, z.detach(), t.detach(), prediction, nontarget_lse)
