"""``nn.Module`` heads: the drop-in replacement for ``nn.Linear(D, C, bias=False)`` + a margin loss."""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .margins.adacos import AdaCos
from .functional import margin_cross_entropy
from .retrieval import topk_cosine
from .margins.zoo import MarginLike
from .margins.subcenter import SubCenter, check_sub_centers

__all__ = ["MarginHead"]

#: Arguments of :func:`marginops.margin_cross_entropy` that belong to one call (given to ``forward``).
PER_CALL = ("row_weight",)
#: Its keyword-only options that a head holds (given to the constructor).
_OPTIONS = tuple(
    name for name, p in inspect.signature(margin_cross_entropy).parameters.items()
    if p.kind is p.KEYWORD_ONLY and name not in PER_CALL
)


def call_scale(head_scale, scale: Optional[Tensor]):
    """The scale of one forward: the head's, or the per-row ``scale`` given to ``forward`` (refused
    with an AdaCos policy, whose statistics are those of its own single scale)."""
    if scale is None:
        return head_scale
    if isinstance(head_scale, AdaCos):
        raise ValueError("this head's scale is an AdaCos policy, which sets one scale per step from its "
                         "statistics; a per-row scale cannot be given to forward (build the head with a number)")
    if not isinstance(scale, Tensor):
        raise TypeError(f"forward's scale must be a (B,) tensor of per-row scales (or None), got "
                        f"{type(scale).__name__}; a fixed scale belongs to the constructor")
    return scale


def init_class_weights(weight: Tensor, normalize: bool) -> None:
    """In place: ``N(0, 0.01^2)`` for normalized heads (only directions matter), else ``nn.Linear``'s
    ``U(-1/sqrt(D), 1/sqrt(D))``."""
    if normalize:
        nn.init.normal_(weight, std=0.01)
    else:
        bound = 1.0 / math.sqrt(weight.shape[1])
        nn.init.uniform_(weight, -bound, bound)


class MarginHead(nn.Module):
    r"""Classification head with a margin softmax loss, computed without ``B x C`` logits.

    Owns ``weight`` of shape ``(num_classes, in_features)`` (``nn.Linear``
    layout, so checkpoints of ``nn.Linear(D, C, bias=False)`` heads load
    as-is) and returns :func:`marginops.margin_cross_entropy` of its input.

    Initialization: with ``normalize=True`` only the direction of each class
    row matters and ``weight`` is drawn from ``N(0, 0.01^2)`` (InsightFace's
    choice for margin heads); with ``normalize=False`` it follows
    ``nn.Linear``'s default, ``U(-1/sqrt(D), 1/sqrt(D))``.

    Args:
        in_features (int): embedding size ``D``.
        num_classes (int): number of classes ``C``.
        margin (Margin, callable or None): the margin ``psi``. Default: None.
        scale (float or AdaCos): ``s``, or a :class:`marginops.AdaCos` scale policy (a
            submodule then: it follows the head's train/eval mode and its scale is in
            ``state_dict``). Default: 64.0.
        sub_centers (int): ``k`` sub-centres per class (sub-center ArcFace): ``weight`` is
            ``(num_classes * k, in_features)``, class-major, and the margin is wrapped in
            :class:`marginops.SubCenter`. Default: 1.
        device, dtype: factory arguments for ``weight``.
        **options: any keyword-only option of :func:`marginops.margin_cross_entropy`
            (``normalize``, ``reduction``, ``ignore_index``, ``label_smoothing``,
            ``backend``, ``chunk_size``, ``memory_budget``, ``return_stats``, ...).

    ``forward(embeddings, labels, *, scale=None, row_weight=None)``: ``scale`` a
    ``(B,)`` tensor of per-row scales for this call in place of the head's (not with
    an AdaCos policy: a ValueError), ``row_weight`` ``(B,)`` per-row loss weights;
    both as in :func:`marginops.margin_cross_entropy`.

    Shape:
        - embeddings: :math:`(B, D)`, labels: :math:`(B)`
        - output: :math:`()` or :math:`(B)` for ``reduction="none"``

    Examples::

        >>> import torch, marginops as mo
        >>> head = mo.MarginHead(128, 10_000, margin=mo.ArcFace(0.5), scale=64.0)
        >>> x = torch.randn(32, 128, requires_grad=True)
        >>> loss = head(x, torch.randint(0, 10_000, (32,)))
        >>> loss.backward()
    """

    def __init__(self, in_features: int, num_classes: int, margin: MarginLike = None,
                 scale: "float | AdaCos" = 64.0, *, sub_centers: int = 1, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None, **options: Any):
        super().__init__()
        for name, value in (("in_features", in_features), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; valid options are {list(_OPTIONS)}")
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.sub_centers = check_sub_centers(sub_centers, "sub_centers")
        if isinstance(margin, SubCenter):
            raise TypeError("give MarginHead the inner margin and sub_centers=k; it wraps the margin in SubCenter")
        if isinstance(scale, AdaCos) and scale.num_classes != self.num_classes:
            raise ValueError(f"AdaCos was built for num_classes = {scale.num_classes}, the head has "
                             f"{self.num_classes}")
        self.margin = margin
        self.scale = scale  # an AdaCos policy becomes a submodule
        self.options = dict(options)
        self.weight = nn.Parameter(torch.empty(self.num_classes * self.sub_centers, self.in_features, device=device,
                                               dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_class_weights(self.weight, self.options.get("normalize", True))

    def forward(self, embeddings: Tensor, labels: Tensor, *, scale: Optional[Tensor] = None,
                row_weight: Optional[Tensor] = None):
        margin = SubCenter(self.margin, self.sub_centers) if self.sub_centers > 1 else self.margin
        return margin_cross_entropy(embeddings, self.weight, labels, margin, call_scale(self.scale, scale),
                                    row_weight=row_weight, **self.options)

    def topk(self, embeddings: Tensor, k: int, *, chunk_size: Optional[int] = None) -> tuple[Tensor, Tensor]:
        """The ``k`` classes whose centres (rows of ``weight``) are closest to each embedding:
        ``(cosines, indices)``, each ``(B, k)``, by :func:`marginops.topk_cosine` (chunked over
        classes, no ``B x C`` matrix; ties go to the lower class index). With ``normalize=False`` the
        scores are plain dot products, as in the head's logits. With sub-centres a class scores the
        largest cosine of its sub-centres."""
        return topk_cosine(embeddings, self.weight, k, chunk_size=chunk_size,
                           normalize=self.options.get("normalize", True), sub_centers=self.sub_centers)

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        sub = f", sub_centers={self.sub_centers}" if self.sub_centers > 1 else ""
        scale = "AdaCos" if isinstance(self.scale, AdaCos) else self.scale  # the submodule prints itself
        return (f"in_features={self.in_features}, num_classes={self.num_classes}{sub}, margin={self.margin!r}, "
                f"scale={scale}{opts}")
