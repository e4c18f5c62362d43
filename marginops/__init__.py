"""marginops: fused, memory-lean margin softmax losses for 100k-10M classes."""

from .backends import BACKEND_NAMES, DEFAULT_MEMORY_BUDGET, register_backend, resolve_backend
from .functional import MarginStats, margin_cross_entropy
from .adaptive import AdaFace, ElasticFace, MagFace
from .adacos import AdaCos
from .subcenter import DominantSubCenters, SubCenter, drop_non_dominant_sub_centers
from .margins import ArcFace, CombinedMargin, CosFace, Margin, NoMargin, SimplerASoftmax, SphereFace
from .modules import MarginHead
from .retrieval import answer_or_abstain, topk_cosine
from .schedule import MarginScheduler

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
