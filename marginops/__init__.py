"""marginops: fused, memory-lean margin softmax losses for 100k-10M classes."""

import sys as _sys

from .backends import BACKEND_NAMES, DEFAULT_MEMORY_BUDGET, register_backend, resolve_backend
from .functional import MarginStats, margin_cross_entropy
from .margins import (AdaCos, AdaFace, ArcFace, CombinedMargin, CosFace, DominantSubCenters, ElasticFace, MagFace,
                      Margin, MarginScheduler, NoMargin, SimplerASoftmax, SphereFace, SubCenter,
                      drop_non_dominant_sub_centers)
from .margins import adacos as _adacos, adaptive as _adaptive, schedule as _schedule, subcenter as _subcenter
from .modules import MarginHead
from .retrieval import answer_or_abstain, topk_cosine

# The margin family's modules before 0.2 (``marginops.adaptive``, ...): aliases, so that old imports and
# pickles still resolve. ``marginops.margins`` itself is now the package, exporting the same names.
for _name, _module in (("adaptive", _adaptive), ("adacos", _adacos), ("schedule", _schedule),
                       ("subcenter", _subcenter)):
    _sys.modules[f"{__name__}.{_name}"] = _module
    globals()[_name] = _module
del _name, _module

__version__ = "0.1.0"

__all__ = [
    "margin_cross_entropy",
    "MarginStats",
    "MarginHead",
    "MarginScheduler",
    "topk_cosine",
    "answer_or_abstain",
    "Margin",
    "NoMargin",
    "CosFace",
    "ArcFace",
    "SphereFace",
    "SimplerASoftmax",
    "CombinedMargin",
    "ElasticFace",
    "AdaFace",
    "MagFace",
    "AdaCos",
    "SubCenter",
    "drop_non_dominant_sub_centers",
    "DominantSubCenters",
    "resolve_backend",
    "register_backend",
    "BACKEND_NAMES",
    "DEFAULT_MEMORY_BUDGET",
]
