"""Sub-centres (sub-center ArcFace): ``k`` centres per class, the class cosine the largest of them.

Deng et al., "Sub-center ArcFace: Boosting Face Recognition by Large-scale
Noisy Web Faces", ECCV 2020. Each class owns ``k`` rows of the weight
(class-major: class ``c`` holds rows ``c k .. c k + k - 1``); the cosine of
a sample with class ``c`` is ``max_r cos(x, w_{c k + r})`` and the gradient
of that class's logit reaches only the sub-centre that attains the maximum
(the lowest index on ties). Clean samples gather around one dominant
sub-centre per class; noisy ones are pulled to the others, and after
training :func:`drop_non_dominant_sub_centers` keeps the dominant one
(optionally also saying which samples lie far from it).

In the fused loss the max over sub-centres is taken inside the tile pass:
each tile of ``k`` times the classes' sub-centre logits is reduced to a tile
of class logits before the softmax statistics, so nothing of size
``B x C k`` (or ``B x C``) exists.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .zoo import MarginLike, NoMargin
from .._checks import EPS, check_number, check_optional_int, check_tensor

__all__ = ["SubCenter", "check_sub_centers", "drop_non_dominant_sub_centers", "DominantSubCenters"]


def check_sub_centers(k, name: str = "k") -> int:
    """``k`` as an int ``>= 1`` (TypeError for a non-int, ValueError below 1)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{name} (sub-centres per class) must be an int, got {type(k).__name__} {k!r}")
    if k < 1:
        raise ValueError(f"{name} (sub-centres per class) must be >= 1, got {k!r}")
    return int(k)


def check_weight_rows(rows: int, k: int, name: str = "weight") -> int:
    """The number of classes of a weight with ``rows`` rows and ``k`` sub-centres per class."""
    if rows % k:
        raise ValueError(f"{name} has {rows} rows, not a multiple of sub_centers = {k} (the weight of k "
                         "sub-centres per class is (C * k, D), class-major)")
    return rows // k


class SubCenter:
    """Wraps a margin for a weight of ``k`` sub-centres per class (sub-center ArcFace).

    The wrapped margin ``psi`` is applied to the target class's cosine, which is
    the largest cosine among its ``k`` sub-centres; every other class enters
    the softmax with the largest of its ``k`` cosines too. Pass it as the
    ``margin`` of :func:`marginops.margin_cross_entropy` with a weight of shape
    ``(C * k, D)`` (class ``c``'s sub-centres are rows ``c k .. c k + k - 1``), or
    use ``MarginHead(..., sub_centers=k)``, which wraps its margin in this.

    Args:
        margin: any margin (a :class:`~marginops.Margin`, an adaptive margin, a callable
            ``psi(t)``), or None for no margin.
        k (int): sub-centres per class, ``>= 1``. Default: 3 (the paper's choice).

    Examples::

        >>> import torch, marginops as mo
        >>> W = torch.randn(1000 * 3, 64, requires_grad=True)        # 1000 classes, 3 sub-centres each
        >>> x, y = torch.randn(8, 64), torch.randint(0, 1000, (8,))
        >>> loss = mo.margin_cross_entropy(x, W, y, mo.SubCenter(mo.ArcFace(0.5), k=3), scale=64.0)
    """

    def __init__(self, margin: MarginLike = None, k: int = 3):
        if isinstance(margin, SubCenter):
            raise TypeError("SubCenter cannot wrap another SubCenter; give the inner margin and one k")
        if margin is not None and not callable(margin):
            raise TypeError(f"margin must be a Margin, a callable psi(t) -> Tensor, or None, got "
                            f"{type(margin).__name__}")
        self.margin = margin if margin is not None else NoMargin()
        self.k = check_sub_centers(k)

    def __call__(self, t: Tensor) -> Tensor:
        return self.margin(t)

    def __repr__(self) -> str:
        return f"SubCenter({self.margin!r}, k={self.k})"


class DominantSubCenters(NamedTuple):
    """What :func:`drop_non_dominant_sub_centers` returns.

    Attributes:
        weight: ``(C, D)`` the dominant sub-centre of each class (a copy, the input's dtype).
        dominant: ``(C,)`` int64, which of its ``k`` sub-centres each class kept.
        counts: ``(C, k)`` int64, how many samples of the class chose each sub-centre.
        keep: ``(N,)`` bool, samples within ``max_angle`` of their class's dominant
            sub-centre (all True without ``max_angle``; False for ignored samples).
    """

    weight: Tensor
    dominant: Tensor
    counts: Tensor
    keep: Tensor


def drop_non_dominant_sub_centers(weight: Tensor, k: int, embeddings: Tensor, labels: Tensor, *,
                                  max_angle: Optional[float] = None, ignore_index: int = -100,
                                  batch_size: int = 4096) -> DominantSubCenters:
    """After sub-centre training: keep each class's dominant sub-centre, a ``(C, D)`` weight.

    As in sub-center ArcFace (Deng et al., ECCV 2020, section 3.2): each
    training sample is assigned to the sub-centre of its class nearest to it
    (largest cosine, the lowest index on ties); a class's dominant sub-centre is
    the one most of its samples chose (the lowest index on equal counts; for a
    class without samples, sub-centre 0). The paper then drops the non-dominant
    sub-centres and, to clean the data set, the samples whose angle to the
    dominant sub-centre exceeds a threshold (75 degrees there): ``max_angle``.

    Work is ``N k D`` (each sample against its own class's ``k`` rows), in
    batches of ``batch_size`` samples; nothing of size ``N x C`` exists.

    Args:
        weight (Tensor): ``(C * k, D)`` trained sub-centres, class-major.
        k (int): sub-centres per class, ``>= 1``.
        embeddings (Tensor): ``(N, D)`` embeddings of the training samples.
        labels (Tensor): ``(N,)`` their classes in ``[0, C)``, or ``ignore_index``.
        max_angle (float, optional): in degrees, ``[0, 180]``: ``keep`` marks the samples
            within this angle of their class's dominant sub-centre. Default: None (keep all).
        ignore_index (int): label of samples to leave out. Default: -100.
        batch_size (int): samples per step. Default: 4096.

    Returns:
        :class:`DominantSubCenters` ``(weight, dominant, counts, keep)``.

    Raises:
        TypeError: non-tensors, non-float embeddings/weight, non-integer labels, a non-int ``k``.
        ValueError: ``k < 1``; rows of ``weight`` not a multiple of ``k``; mismatched shapes;
            labels outside ``[0, C)``; ``max_angle`` outside ``[0, 180]``.
    """

    k = check_sub_centers(k)
    check_tensor("weight", weight, 2)
    check_tensor("embeddings", embeddings, 2)
    check_tensor("labels", labels, 1)
    for name, t in (("weight", weight), ("embeddings", embeddings)):
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    C = check_weight_rows(weight.shape[0], k)
    N, D = embeddings.shape
    if weight.shape[1] != D:
        raise ValueError(f"weight has {weight.shape[1]} features per row but embeddings have {D}")
    if labels.shape[0] != N:
        raise ValueError(f"labels has {labels.shape[0]} entries but embeddings has {N} rows")
    batch_size = check_optional_int("batch_size", batch_size, 1)
    if max_angle is not None:
        max_angle = check_number("max_angle", max_angle, low=0.0, high=180.0)
    labels = labels.to(weight.device).long()
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= C))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels[{i}] = {int(labels[i])} is outside [0, {C}) and is not ignore_index = "
                         f"{ignore_index}")
    acc = torch.float64 if torch.float64 in (weight.dtype, embeddings.dtype) else torch.float32
    offsets = torch.arange(k, device=weight.device)
    with torch.no_grad():
        counts = torch.zeros(C * k, dtype=torch.int64, device=weight.device)
        for a in range(0, N, batch_size):
            part = slice(a, a + batch_size)
            cos, rows = _own_cosines(weight, embeddings[part].to(weight.device), labels[part], valid[part], k,
                                     offsets, acc)
            chosen = rows.gather(1, cos.argmax(1, keepdim=True)).squeeze(1)[valid[part]]  # the first maximum
            counts.index_add_(0, chosen, torch.ones_like(chosen))
        counts = counts.view(C, k)
        dominant = counts.argmax(1)  # the first maximum: the lowest index on equal counts (and 0 for none)
        kept = weight.detach().view(C, k, D).gather(1, dominant.view(C, 1, 1).expand(C, 1, D)).squeeze(1).clone()
        keep = valid.clone()
        if max_angle is not None:
            limit = math.cos(math.radians(max_angle))
            wd = F.normalize(kept.to(acc), dim=1, eps=EPS)
            for a in range(0, N, batch_size):
                xb = F.normalize(embeddings[a:a + batch_size].to(weight.device, acc), dim=1, eps=EPS)
                yb = torch.where(valid[a:a + batch_size], labels[a:a + batch_size], 0)
                cos = (xb * wd[yb]).sum(1).clamp(-1.0, 1.0)
                keep[a:a + batch_size] &= cos >= limit
    return DominantSubCenters(kept, dominant, counts, keep)


def _own_cosines(weight: Tensor, x: Tensor, y: Tensor, valid: Tensor, k: int, offsets: Tensor, acc: torch.dtype):
    """Cosines ``(n, k)`` of each sample with its own class's sub-centres, and their rows (ignored
    samples are pointed at class 0)."""
    safe = torch.where(valid, y, torch.zeros_like(y))
    rows = safe.unsqueeze(1) * k + offsets
    w = F.normalize(weight.detach().index_select(0, rows.reshape(-1)).to(acc), dim=1, eps=EPS)
    xh = F.normalize(x.detach().to(acc), dim=1, eps=EPS)
    cos = torch.bmm(w.view(-1, k, x.shape[1]), xh.unsqueeze(2)).squeeze(2)
    return cos, rows
