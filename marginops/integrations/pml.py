"""pytorch-metric-learning's classification losses, computed by marginops.

Swap ``from pytorch_metric_learning import losses`` for::

    from marginops.integrations import pml as losses

and ``losses.ArcFaceLoss(num_classes, embedding_size, margin=28.6, scale=64)``, ``CosFaceLoss``,
``SubCenterArcFaceLoss``, ``NormalizedSoftmaxLoss``, ``LargeMarginSoftmaxLoss`` and ``SphereFaceLoss``
take pytorch-metric-learning 2.9's constructor arguments and defaults, its call
``loss_fn(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)``, its weight
initialization (``W ~ N(0, 1)``, shaped ``(embedding_size, num_classes)``) and its ``state_dict``
(one entry, ``"W"``), so a checkpoint of either class loads into the other. The loss and its
gradients are those of the library's class on the same inputs and weights, computed without the
``B x C`` logits (see ``docs/integrations.md`` for what matches and what raises).

When pytorch-metric-learning is installed, every other name of ``pytorch_metric_learning.losses``
(``TripletMarginLoss``, ``ContrastiveLoss``, ...) is re-exported from here unchanged, and reducers,
regularizers and ``collect_stats`` work as in the library (their code runs on our per-row losses).
Without it the classes here still work, with the default reducer and no regularizers.
"""

from __future__ import annotations

import copy
import math
import numbers
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import (ArcFace, CosFace, Margin, SphereFace, SubCenter, drop_non_dominant_sub_centers, margin_cross_entropy,
               topk_cosine)
from ..margins import safe_acos
from ..reference import EPS

try:  # optional: the library whose interface this module implements
    from pytorch_metric_learning import distances as _pml_distances
    from pytorch_metric_learning import losses as _pml_losses
    from pytorch_metric_learning import reducers as _pml_reducers
    from pytorch_metric_learning.utils import common_functions as _pml_cf
except ImportError:  # pragma: no cover - exercised by the tests that run without it
    _pml_losses = _pml_distances = _pml_reducers = _pml_cf = None

#: Whether pytorch-metric-learning is importable (its reducers, regularizers and other losses are then usable).
HAS_PML = _pml_losses is not None

#: Largest ``B x C`` output :meth:`get_logits` builds by default (bytes); set ``loss_fn.max_logits_bytes``.
DEFAULT_MAX_LOGITS_BYTES = 2 * 2**30

#: marginops options the losses accept besides pytorch-metric-learning's arguments.
MARGINOPS_OPTIONS = ("backend", "chunk_size", "memory_budget", "strategy")

__all__ = [
    "ArcFaceLoss", "CosFaceLoss", "SubCenterArcFaceLoss", "NormalizedSoftmaxLoss", "LargeMarginSoftmaxLoss",
    "SphereFaceLoss", "PMLArcFace", "UnsupportedFeatureError", "miner_weights", "HAS_PML",
]


class UnsupportedFeatureError(NotImplementedError):
    """A pytorch-metric-learning feature these losses cannot compute as the library does.

    Raised for a distance other than the loss's default one and, without pytorch-metric-learning
    installed, for reducers and regularizers (their code is the library's). The message says
    which feature and why.
    """


class PMLArcFace(Margin):
    """ArcFace as pytorch-metric-learning computes it: ``cos(theta + m)``, and ``t - m sin(m)`` past ``pi - m``.

    ``psi(t) = cos(theta + m)`` for ``theta = acos(t) <= pi - m``, else ``t - m * sin(m)`` (the
    library's monotone continuation, which jumps at ``theta = pi - m``; :class:`marginops.ArcFace`
    continues with ``t - (1 - cos m)`` instead, which is continuous). The derivative is the exact
    one, finite at ``t = +-1`` (see :data:`marginops.margins.SIN2_FLOOR`).

    Args:
        m (float or Tensor (B,)): angular margin in radians, in ``[0, pi)``. Default: 0.5.
    """

    def __init__(self, m: Union[float, Tensor] = 0.5) -> None:
        self.params = {"m": ArcFace(m).params["m"]}  # ArcFace's validation: a number or (B,) tensor in [0, pi)

    def __call__(self, t: Tensor) -> Tensor:
        m = self.params["m"]
        m = m.to(device=t.device, dtype=t.dtype) if isinstance(m, Tensor) else m
        theta = safe_acos(t)
        fallback = t - m * (torch.sin(m) if isinstance(m, Tensor) else math.sin(m))
        return torch.where(theta.detach() <= math.pi - m, torch.cos(theta + m), fallback)


class _OnRawLogits:
    """A margin for ``normalize=False`` logits whose target value is ``t = n * cos``: ``n * psi(t / d)``.

    ``n`` is the product of the row's norms (``|x_i|``, or ``|x_i| |W_{y_i}|``) and ``d`` the same norms
    floored at ``eps`` (the cosine of ``F.normalize``d rows). Both are ``(B,)`` and carry gradients.
    """

    def __init__(self, margin: Callable[[Tensor], Tensor], norm: Tensor, denominator: Tensor):
        self.margin, self.norm, self.denominator = margin, norm, denominator

    def __call__(self, t: Tensor) -> Tensor:
        return self.norm * self.margin(t / self.denominator)

    def __repr__(self) -> str:
        return f"{self.margin!r} on raw logits"


def miner_weights(indices_tuple: Optional[Sequence[Tensor]], labels: Tensor, dtype: torch.dtype) -> Optional[Tensor]:
    """Per-row loss weights from a miner's ``indices_tuple``, as pytorch-metric-learning computes them.

    Each row's weight is the number of times it appears in the tuple over the largest such count
    (0 for rows that do not appear); None (every weight 1) when ``indices_tuple`` is None or empty.
    """
    if indices_tuple is None or all(len(t) == 0 for t in indices_tuple):
        return None
    indices = torch.cat([torch.as_tensor(t, device=labels.device) for t in indices_tuple], dim=0)
    indices, counts = torch.unique(indices, return_counts=True)
    weights = torch.zeros(labels.shape[0], device=labels.device, dtype=dtype)
    weights[indices] = counts.to(dtype) / torch.max(counts)
    return weights


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class _ClassifierLoss(nn.Module):
    """What the losses share: the weight ``W`` ``(embedding_size, rows)``, the call, reducers, get_logits.

    Subclasses say how the logits are formed: :attr:`_normalize_x` / :attr:`_normalize_w` (which
    rows are L2-normalized before the product), :meth:`_margin` (the target's ``psi``) and
    :attr:`_logit_scale` (the scale ``s``).
    """

    _normalize_x = True
    _normalize_w = True
    _sub_centers = 1
    _default_distance = "CosineSimilarity"
    _has_angles = True  # records avg_angle under collect_stats, as the library's margin losses do

    def __init__(self, num_classes: int, embedding_size: int, *, weight_rows: Optional[int] = None,
                 weight_regularizer=None, weight_reg_weight: float = 1, weight_init_func: Optional[Callable] = None,
                 embedding_regularizer=None, embedding_reg_weight: float = 1, reducer=None, distance=None,
                 collect_stats: Optional[bool] = None, **options: Any):
        super().__init__()
        unknown = sorted(set(options) - set(MARGINOPS_OPTIONS))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword argument(s) {unknown}; it takes "
                            f"pytorch-metric-learning's arguments and the marginops options {list(MARGINOPS_OPTIONS)}")
        self.num_classes = _positive_int("num_classes", num_classes)
        self.embedding_size = _positive_int("embedding_size", embedding_size)
        self.options = dict(options)
        self.collect_stats = bool(_pml_cf.COLLECT_STATS if collect_stats is None and HAS_PML else collect_stats)
        self.max_logits_bytes = DEFAULT_MAX_LOGITS_BYTES
        for name, reg in (("weight_regularizer", weight_regularizer), ("embedding_regularizer", embedding_regularizer)):
            if reg is not None and not HAS_PML:
                raise UnsupportedFeatureError(f"{name} needs pytorch-metric-learning (its regularizers are the "
                                              "library's code): pip install pytorch-metric-learning")
        self.weight_regularizer, self.weight_reg_weight = weight_regularizer, weight_reg_weight
        self.embedding_regularizer, self.embedding_reg_weight = embedding_regularizer, embedding_reg_weight
        self.distance = self._check_distance(distance)
        self._set_reducer(reducer)
        self.weight_init_func = weight_init_func if weight_init_func is not None else nn.init.normal_
        rows = self.num_classes if weight_rows is None else weight_rows
        self.W = nn.Parameter(torch.empty(self.embedding_size, rows))
        self.weight_init_func(self.W)
        self._record_these = ["num_classes", "margin", "scale"]
        self._record_these_stats = ["avg_angle"] if self.collect_stats and self._has_angles else []
        self.avg_angle = 0

    # ------------------------------------------------------------------------------------ configuration

    def _check_distance(self, distance):
        if distance is None:
            return getattr(_pml_distances, self._default_distance)() if HAS_PML else None
        if not HAS_PML:
            raise UnsupportedFeatureError("distance objects are pytorch-metric-learning's; install it to pass one")
        default = getattr(_pml_distances, self._default_distance)
        if (type(distance) is not default or getattr(distance, "power", 1) != 1 or getattr(distance, "p", 2) != 2
                or not getattr(distance, "normalize_embeddings", True)):
            settings = {k: getattr(distance, k, None) for k in ("p", "power", "normalize_embeddings")}
            raise UnsupportedFeatureError(
                f"{type(self).__name__} computes its logits with the default {default.__name__}() (normalized "
                f"embeddings, p=2, power=1); got {type(distance).__name__} with {settings}")
        return distance

    def sub_loss_names(self) -> list[str]:
        """``["loss"]`` and the regularization losses, in pytorch-metric-learning's order."""
        return (["loss"] + (["weight_reg_loss"] if self.weight_regularizer is not None else [])
                + (["embedding_reg_loss"] if self.embedding_regularizer is not None else []))

    def _set_reducer(self, reducer) -> None:
        """The reducer pytorch-metric-learning would build (a copy of ``reducer`` per sub-loss when there
        are regularizers); None without the library, where only the default (mean) reduction exists."""
        if not HAS_PML:
            if reducer is not None:
                raise UnsupportedFeatureError("reducer objects are pytorch-metric-learning's; without it these "
                                              "losses use the default reduction (the mean over the batch)")
            self.reducer = None
            return
        if isinstance(reducer, (_pml_reducers.MultipleReducers, _pml_reducers.DoNothingReducer)):
            self.reducer = reducer
        elif len(self.sub_loss_names()) == 1:
            self.reducer = _pml_reducers.MeanReducer() if reducer is None else copy.deepcopy(reducer)
        else:
            self.reducer = _pml_reducers.MultipleReducers(
                {k: _pml_reducers.MeanReducer() if reducer is None else copy.deepcopy(reducer)
                 for k in self.sub_loss_names()})

    def _plain_mean(self) -> bool:
        """True when the loss is the batch mean of the per-row losses (the fused path applies)."""
        return (self.weight_regularizer is None and self.embedding_regularizer is None
                and (self.reducer is None or type(self.reducer) is _pml_reducers.MeanReducer))

    # ------------------------------------------------------------------------------------ per subclass

    def _margin(self) -> Optional[Callable[[Tensor], Tensor]]:
        raise NotImplementedError

    @property
    def _logit_scale(self) -> float:
        return float(self.scale)

    def _class_rows(self) -> Tensor:
        """The weight as ``(rows, D)`` rows (a transposed view of ``W``; normalized where the logits need it)."""
        return self.W.t()

    # ------------------------------------------------------------------------------------ the loss

    def _follow_embeddings(self, embeddings: Tensor) -> None:
        """As the library does, move ``W`` to the embeddings' device and (float32/float64) dtype; 16-bit
        embeddings leave the weight's dtype alone (the kernels multiply mixed precision as it is)."""
        dtype = embeddings.dtype if embeddings.dtype in (torch.float32, torch.float64) else self.W.dtype
        if self.W.device != embeddings.device or self.W.dtype != dtype:
            self.W.data = self.W.data.to(device=embeddings.device, dtype=dtype)

    def _head_inputs(self, x: Tensor, labels: Tensor):
        """``(weight (rows, D), margin, normalize, scale)`` for :func:`marginops.margin_cross_entropy`."""
        margin = self._margin()
        if self._sub_centers > 1:
            margin = SubCenter(margin, self._sub_centers)
        return self._class_rows(), margin, True, self._logit_scale

    def forward(self, embeddings: Tensor, labels: Optional[Tensor] = None, indices_tuple=None,
                ref_emb: Optional[Tensor] = None, ref_labels: Optional[Tensor] = None):
        """The loss of ``embeddings`` ``(B, D)`` with ``labels`` ``(B,)``, as pytorch-metric-learning's call.

        ``indices_tuple`` (a miner's output) weights each row by how often it appears; ``ref_emb`` and
        ``ref_labels`` are not supported (ValueError), as in the library. Returns what the reducer
        returns (a scalar with the default one).
        """
        if labels is not None and embeddings.shape[0] != labels.shape[0]:
            raise ValueError("Number of embeddings must equal number of labels")
        if labels is not None and labels.ndim != 1:
            raise ValueError("labels must be a 1D tensor of shape (batch_size,)")
        if labels is not None and labels.device != embeddings.device:
            labels = labels.to(embeddings.device)
        if ref_emb is None:
            ref_emb, ref_labels = embeddings, labels
        elif ref_labels is not None and ref_labels.device != ref_emb.device:
            ref_labels = ref_labels.to(ref_emb.device)
        if labels is None:
            raise ValueError("labels are required for this loss function")
        if ref_emb is not embeddings or ref_labels is not labels:
            raise ValueError("ref_emb is not supported for this loss function")
        if self.collect_stats:
            self.avg_angle = 0
        self._follow_embeddings(embeddings)
        weights = miner_weights(indices_tuple, labels, embeddings.dtype)
        weight, margin, normalize, scale = self._head_inputs(embeddings, labels)
        # the library's default MeanReducer is the mean over the batch of the (miner-weighted) per-row losses: a
        # scalar reduction, so the fused head forms the gradients in its forward pass (three GEMMs)
        fused = self._plain_mean()
        out = margin_cross_entropy(embeddings, weight, labels, margin, scale, normalize=normalize,
                                   reduction="sum" if fused else "none", return_stats=self.collect_stats,
                                   row_weight=weights if fused else None, **self.options)
        if self.collect_stats:
            out, stats = out
            self._record_angles(stats.target_cos, margin)
        if fused:
            if self.reducer is not None and self.reducer.collect_stats:
                self.reducer.losses_size = embeddings.shape[0]
            return out / embeddings.shape[0]
        losses = out if weights is None else out * weights
        if self.reducer is None:
            return losses.mean()
        loss_dict = {"loss": {"losses": losses, "indices": torch.arange(embeddings.shape[0], device=embeddings.device),
                              "reduction_type": "element"}}
        if self.weight_regularizer is not None:
            loss_dict["weight_reg_loss"] = {"losses": self.weight_regularizer(self.W.t()) * self.weight_reg_weight,
                                            "indices": None, "reduction_type": "already_reduced"}
        if self.embedding_regularizer is not None:
            loss_dict["embedding_reg_loss"] = {
                "losses": self.embedding_regularizer(embeddings) * self.embedding_reg_weight, "indices": None,
                "reduction_type": "already_reduced"}
        return self.reducer(loss_dict, embeddings, labels)

    def _record_angles(self, target_cos: Tensor, margin) -> None:
        """``avg_angle``: the mean angle (degrees) between the embeddings and their class's weight."""
        if not self._has_angles:
            return
        with torch.no_grad():
            cos = target_cos / margin.denominator if isinstance(margin, _OnRawLogits) else target_cos
            self.avg_angle = math.degrees(torch.acos(cos.clamp(-1, 1)).mean().item())

    # ------------------------------------------------------------------------------------ logits

    def _logit_parts(self) -> tuple[Tensor, bool, bool]:
        """``(class rows (rows, D), normalize embeddings, normalize class rows)`` of the margin-free logits."""
        return self.W.t(), self._normalize_x, self._normalize_w

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """The ``(B, num_classes)`` margin-free logits, as the library's ``get_logits``.

        Built class chunk by class chunk (no normalized copy of the whole weight); refused with a
        ValueError when the ``B x C`` result would exceed :attr:`max_logits_bytes` (default 2 GiB):
        :meth:`topk` gives the best classes without it.
        """
        B = embeddings.shape[0]
        size = B * self.num_classes * embeddings.element_size()
        if size > self.max_logits_bytes:
            raise ValueError(
                f"get_logits would build a {B} x {self.num_classes} logits tensor of {size / 2**30:.2f} GiB, above "
                f"max_logits_bytes = {self.max_logits_bytes / 2**30:.2f} GiB; use loss_fn.topk(embeddings, k) for the "
                f"best classes without it, or raise loss_fn.max_logits_bytes")
        rows, norm_x, norm_w = self._logit_parts()
        q = F.normalize(embeddings, dim=1, eps=EPS) if norm_x else embeddings
        k = self._sub_centers
        out = embeddings.new_empty(B, self.num_classes)
        step = max(1, (64 * 2**20) // max(1, (B + self.embedding_size) * k * embeddings.element_size()))
        for c0 in range(0, self.num_classes, step):
            c1 = min(c0 + step, self.num_classes)
            w = rows[c0 * k:c1 * k].to(q.dtype)
            w = F.normalize(w, dim=1, eps=EPS) if norm_w else w
            tile = q @ w.t()
            if k > 1:
                tile = tile.view(B, c1 - c0, k).amax(2)
            out[:, c0:c1] = tile * self._logit_scale
        return out

    @torch.no_grad()
    def topk(self, embeddings: Tensor, k: int, *, chunk_size: Optional[int] = None) -> tuple[Tensor, Tensor]:
        """The ``k`` largest logits of :meth:`get_logits` and their classes, ``(B, k)`` each, without the
        ``B x C`` matrix (:func:`marginops.topk_cosine`; ties go to the lower class index)."""
        rows, norm_x, norm_w = self._logit_parts()
        if norm_x != norm_w:  # the embedding's norm multiplies every logit of the row: the order is the cosine's
            values, idx = topk_cosine(embeddings, rows, k, chunk_size=chunk_size, sub_centers=self._sub_centers)
            return values * torch.linalg.vector_norm(embeddings, dim=1, keepdim=True) * self._logit_scale, idx
        values, idx = topk_cosine(embeddings, rows, k, chunk_size=chunk_size, normalize=norm_x,
                                  sub_centers=self._sub_centers)
        return values * self._logit_scale, idx

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, margin={self.margin}, "
                f"scale={self.scale}" + "".join(f", {k}={v!r}" for k, v in self.options.items()))


class ArcFaceLoss(_ClassifierLoss):
    r"""ArcFace (additive angular margin), pytorch-metric-learning's ``ArcFaceLoss``.

    Logits ``s * cos(theta_ij)``, the target's ``s * cos(theta + m)``; past ``theta > pi - m`` the
    target logit is ``s * (cos(theta) - m sin(m))`` as in the library (:class:`PMLArcFace`).

    Args:
        num_classes (int): ``C``.
        embedding_size (int): ``D``.
        margin (float): angular margin in **degrees**. Default: 28.6 (0.5 rad).
        scale (float): ``s``. Default: 64.
        **kwargs: pytorch-metric-learning's ``weight_init_func``, ``weight_regularizer``,
            ``weight_reg_weight``, ``embedding_regularizer``, ``embedding_reg_weight``, ``reducer``,
            ``distance`` (its default only), ``collect_stats``; and marginops' ``backend``,
            ``chunk_size``, ``memory_budget``, ``strategy``.

    Shape:
        - ``W``: :math:`(D, C)`, the library's layout (``state_dict`` key ``"W"``)
        - embeddings: :math:`(B, D)`, labels: :math:`(B)`, output: :math:`()`

    Examples::

        >>> import torch
        >>> from marginops.integrations import pml as losses
        >>> loss_fn = losses.ArcFaceLoss(1000, 128, margin=28.6, scale=64)
        >>> loss = loss_fn(torch.randn(32, 128), torch.randint(0, 1000, (32,)))
    """

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 28.6, scale: float = 64, **kwargs):
        super().__init__(num_classes, embedding_size, **kwargs)
        self.margin = math.radians(margin)  # the library keeps the margin in radians after construction
        self.scale = scale
        self._psi = PMLArcFace(self.margin)

    def _margin(self):
        return self._psi


class CosFaceLoss(_ClassifierLoss):
    r"""CosFace / AM-Softmax (additive cosine margin), pytorch-metric-learning's ``CosFaceLoss``.

    Logits ``s * cos(theta_ij)``, the target's ``s * (cos(theta) - m)``.

    Args:
        num_classes (int), embedding_size (int): ``C`` and ``D`` (positional or keyword).
        margin (float): ``m``, keyword. Default: 0.35.
        scale (float): ``s``, keyword. Default: 64.
        **kwargs: as :class:`ArcFaceLoss`.
    """

    def __init__(self, *args, margin: float = 0.35, scale: float = 64, **kwargs):
        super().__init__(*args, **kwargs)
        self.margin, self.scale = margin, scale
        self._psi = CosFace(margin)

    def _margin(self):
        return self._psi


class SubCenterArcFaceLoss(ArcFaceLoss):
    r"""Sub-center ArcFace, pytorch-metric-learning's ``SubCenterArcFaceLoss``.

    ``W`` is ``(embedding_size, num_classes * sub_centers)``; class ``c`` owns columns
    ``c * sub_centers .. c * sub_centers + sub_centers - 1`` and its cosine is the largest of them.

    Args:
        num_classes (int), embedding_size (int): ``C`` and ``D``.
        margin (float): degrees. Default: 28.6.
        scale (float): Default: 64.
        sub_centers (int): ``k``. Default: 3.
        **kwargs: as :class:`ArcFaceLoss`.
    """

    def __init__(self, *args, margin: float = 28.6, scale: float = 64, sub_centers: int = 3, **kwargs):
        names = ("num_classes", "embedding_size")
        given = dict(zip(names, args))
        if len(args) > 2:
            raise TypeError(f"SubCenterArcFaceLoss takes num_classes and embedding_size, got {len(args)} positional "
                            "arguments")
        for n in names:
            if n in kwargs:
                given[n] = kwargs.pop(n)
        missing = [n for n in names if n not in given]
        if missing:
            raise TypeError(f"SubCenterArcFaceLoss missing argument(s) {missing}")
        k = _positive_int("sub_centers", sub_centers)
        _ClassifierLoss.__init__(self, given["num_classes"], given["embedding_size"],
                                 weight_rows=_positive_int("num_classes", given["num_classes"]) * k, **kwargs)
        self.margin, self.scale = math.radians(margin), scale
        self.sub_centers = self._sub_centers = k
        self._psi = PMLArcFace(self.margin)

    def get_outliers(self, embeddings: Tensor, labels: Tensor, threshold: float = 75,
                     return_dominant_centers: bool = True) -> tuple[Tensor, Tensor]:
        """Samples farther than ``threshold`` degrees from their class's dominant sub-centre.

        As the library: returns ``(outliers, dominant_centers)`` (it returns the pair whatever
        ``return_dominant_centers`` says): the outliers' indices, ordered by class then index,
        and the ``(embedding_size, num_classes)`` dominant sub-centres (a class with no sample
        takes its sub-centre 0, where the library leaves the column uninitialized).
        """
        if labels.shape[0] != embeddings.shape[0]:
            raise ValueError("Number of embeddings must equal number of labels")
        self._follow_embeddings(embeddings)
        res = drop_non_dominant_sub_centers(self.W.t(), self.sub_centers, embeddings, labels.to(embeddings.device),
                                            max_angle=float(threshold))
        labels = labels.to(embeddings.device).long()
        far = torch.nonzero(~res.keep & (labels != -100)).squeeze(1)
        far = far[torch.argsort(labels[far], stable=True)]
        return far, res.weight.t()


class NormalizedSoftmaxLoss(_ClassifierLoss):
    r"""NormFace (normalized softmax, no margin), pytorch-metric-learning's ``NormalizedSoftmaxLoss``.

    Logits ``cos(theta_ij) / temperature``.

    Args:
        num_classes (int), embedding_size (int): ``C`` and ``D``.
        temperature (float): Default: 0.05 (a scale of 20).
        **kwargs: as :class:`ArcFaceLoss` (its default distance is ``DotProductSimilarity()``).
    """

    _default_distance = "DotProductSimilarity"
    _has_angles = False

    def __init__(self, num_classes: int, embedding_size: int, temperature: float = 0.05, **kwargs):
        super().__init__(num_classes, embedding_size, **kwargs)
        self.temperature = temperature
        self._record_these = ["embedding_size", "num_classes", "temperature"]

    def _margin(self):
        return None

    @property
    def _logit_scale(self) -> float:
        return 1.0 / float(self.temperature)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, temperature={self.temperature}"


class LargeMarginSoftmaxLoss(_ClassifierLoss):
    r"""L-Softmax (multiplicative angular margin on unnormalized logits), pytorch-metric-learning's
    ``LargeMarginSoftmaxLoss``.

    Logits ``s * |x_i| |W_j| cos(theta_ij) = s * x_i . W_j`` (no normalization), the target's
    ``s * |x_i| |W_y| psi(cos theta)`` with SphereFace's ``psi`` (``(-1)^k cos(m theta) - 2k``): the
    fused head takes plain dot products and the target's margin sees the row's two norms.

    Args:
        num_classes (int), embedding_size (int): ``C`` and ``D``.
        margin (int): ``m`` (truncated to an int, as the library does), >= 1. Default: 4.
        scale (float): ``s``. Default: 1.
        **kwargs: as :class:`ArcFaceLoss`.
    """

    _normalize_x = False
    _normalize_w = False

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 4, scale: float = 1, **kwargs):
        super().__init__(num_classes, embedding_size, **kwargs)
        self.margin, self.scale = int(margin), scale
        if self.margin < 1:
            raise ValueError(f"margin must be an integer >= 1 (it is truncated with int()), got {margin!r}")
        self._psi = SphereFace(self.margin)

    def _margin(self):
        return self._psi

    def _head_inputs(self, x: Tensor, labels: Tensor):
        rows = self.W.t()
        target = rows.index_select(0, labels.clamp(0, self.num_classes - 1))
        nx, nw = torch.linalg.vector_norm(x, dim=1), torch.linalg.vector_norm(target, dim=1)
        return (rows, _OnRawLogits(self._psi, nx * nw, nx.clamp_min(EPS) * nw.clamp_min(EPS)), False,
                self._logit_scale)


class SphereFaceLoss(LargeMarginSoftmaxLoss):
    r"""SphereFace / A-Softmax, pytorch-metric-learning's ``SphereFaceLoss``.

    Only the weight is normalized: logits ``s * |x_i| cos(theta_ij)``, the target's
    ``s * |x_i| psi(cos theta)``: the fused head's per-row scale ``s |x_i|`` (differentiable, so
    the gradient through the norm flows), with no copy of the weight and no ``B x C`` tensor.

    Args:
        num_classes (int), embedding_size (int): ``C`` and ``D``.
        margin (int): ``m``, >= 1. Default: 4.
        scale (float): ``s``. Default: 1.
        **kwargs: as :class:`ArcFaceLoss`.
    """

    _normalize_w = True

    def _head_inputs(self, x: Tensor, labels: Tensor):
        # a zero embedding has all logits 0 either way; the floor keeps the per-row scale positive
        row_scale = self._logit_scale * torch.linalg.vector_norm(x, dim=1).clamp_min(EPS)
        return self.W.t(), self._psi, True, row_scale



def __getattr__(name: str):
    """pytorch-metric-learning's other losses (``TripletMarginLoss``, ...), when it is installed."""
    if not name.startswith("_") and HAS_PML and hasattr(_pml_losses, name):
        return getattr(_pml_losses, name)
    if not name.startswith("_") and name[:1].isupper():
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}" + (
            "" if HAS_PML else " (the other losses are pytorch-metric-learning's, which is not installed: "
                               "pip install pytorch-metric-learning)"))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    extra = [n for n in dir(_pml_losses) if not n.startswith("_")] if HAS_PML else []
    return sorted(set(globals()) | set(extra))
