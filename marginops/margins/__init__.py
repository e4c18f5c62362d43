"""The margin family: what happens to the target logit (and the scale).

A margin is a function ``psi`` of the target cosine ``t``; the loss uses
``s * psi(t)`` as the target logit and ``s * cos`` for every other class. The
fused kernels never see it: it runs by ordinary autograd on ``B`` scalars.

* :mod:`~marginops.margins.zoo`: the fixed margins (``NoMargin``, ``CosFace``,
  ``ArcFace``, ``SphereFace``, ``SimplerASoftmax``, ``CombinedMargin``) and the
  ``Margin`` base class;
* :mod:`~marginops.margins.adaptive`: per-row margins from the batch
  (``ElasticFace``, ``AdaFace``, ``MagFace``);
* :mod:`~marginops.margins.schedule`: margin warm-up (``MarginScheduler``);
* :mod:`~marginops.margins.adacos`: the AdaCos scale policy;
* :mod:`~marginops.margins.subcenter`: sub-centres (``SubCenter``: ``k`` weight
  rows per class, a class's cosine the largest of its ``k``) and the pruning of
  non-dominant sub-centres.

Before version 0.2 these were the modules ``marginops.margins`` (now
:mod:`~marginops.margins.zoo`), ``marginops.adaptive``, ``marginops.adacos``,
``marginops.schedule`` and ``marginops.subcenter``; those import paths still
work (aliases registered by :mod:`marginops`), so older scripts and pickled
checkpoints load.
"""

from .zoo import (SIN2_FLOOR, ArcFace, CombinedMargin, CosFace, Margin, MarginLike, NoMargin, Param,
                  SimplerASoftmax, SphereFace, chebyshev, safe_acos)
from .adaptive import AdaFace, ElasticFace, MagFace
from .adacos import AdaCos
from .schedule import MarginScheduler
from .subcenter import DominantSubCenters, SubCenter, drop_non_dominant_sub_centers

__all__ = [
    "Margin", "MarginLike", "NoMargin", "CosFace", "ArcFace", "SphereFace", "SimplerASoftmax", "CombinedMargin",
    "ElasticFace", "AdaFace", "MagFace", "AdaCos", "MarginScheduler", "SubCenter", "DominantSubCenters",
    "drop_non_dominant_sub_centers", "SIN2_FLOOR", "safe_acos", "chebyshev", "Param",
]
