"""Drop-in integrations with the libraries people already train with.

* :mod:`marginops.integrations.pml`: pytorch-metric-learning's classification losses
  (``ArcFaceLoss``, ``CosFaceLoss``, ``SubCenterArcFaceLoss``, ...) with its constructor
  arguments, call signature and ``state_dict`` layout, computed by marginops; the library's
  other losses are re-exported when it is installed.
* :mod:`marginops.integrations.sentence_transformers`: ``MarginSoftmaxLoss`` for
  ``SentenceTransformerTrainer``.

Neither module is imported here: each imports its library (or works without it) when you
import it. ``docs/integrations.md`` says what matches exactly and what raises.
"""

__all__ = ["pml", "sentence_transformers"]
