"""A margin softmax loss for ``SentenceTransformerTrainer`` (sentence-transformers 6.x).

Paraphrase groups (FAQ answers, synsets, intents) as classes::

    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from marginops.integrations.sentence_transformers import MarginSoftmaxLoss
    import marginops as mo

    loss = MarginSoftmaxLoss(model, num_classes=90_000, margin=mo.CosFace(0.35), scale=30.0)
    trainer = SentenceTransformerTrainer(model=model, train_dataset=ds, loss=loss)   # ds: ("text", "label")
    trainer.train()

**Where the class weight lives.** ``SentenceTransformerTrainer`` saves the model's modules
and nothing of the loss, so a weight kept in the loss would be lost at every checkpoint (and
the optimizer state saved for it would be restored onto a freshly initialized weight on
resume). The class weight is therefore a module of the model: :class:`ClassCentres`, appended
as the model's last module. It passes the features through unchanged (``encode`` is not
affected) and the Trainer saves it in every checkpoint (``<checkpoint>/<i>_ClassCentres/``)
and loads it when training resumes (``trainer.train(resume_from_checkpoint=...)``) or when it
loads the best model. A model saved with it reloads with it
(``SentenceTransformer(path, trust_remote_code=True)``: the module's class is marginops', outside
sentence-transformers); :func:`without_centres` gives the plain encoder for deployment, and
``model[-1].answer_or_abstain`` answers queries with the trained class centres.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn

from .. import CosFace, SubCenter, answer_or_abstain, margin_cross_entropy, topk_cosine
from ..margins import MarginLike
from ..modules import _OPTIONS, init_class_weights

try:
    from sentence_transformers.base.modules import Module as _STModule
except ImportError as exc:  # pragma: no cover - the module is only usable with the library
    raise ImportError("marginops.integrations.sentence_transformers needs sentence-transformers >= 6: "
                      "pip install 'sentence-transformers[train]' (see docs/integrations.md for keeping your "
                      "torch version)") from exc

__all__ = ["MarginSoftmaxLoss", "ClassCentres", "without_centres"]


class ClassCentres(_STModule):
    """The margin head's class weight as a module of a ``SentenceTransformer``; its forward is the identity.

    ``weight`` is ``(num_classes * sub_centers, in_features)`` (``nn.Linear`` layout, class-major
    sub-centres). Saved and loaded with the model (``config.json`` and ``model.safetensors`` in its
    folder of the model directory).

    Args:
        in_features (int): the model's embedding size ``D``.
        num_classes (int): ``C``.
        sub_centers (int): ``k`` rows per class. Default: 1.
        normalize (bool): the head normalizes (decides the initialization). Default: True.
    """

    config_keys = ["in_features", "num_classes", "sub_centers", "normalize"]

    def __init__(self, in_features: int, num_classes: int, sub_centers: int = 1, normalize: bool = True):
        super().__init__()
        for name, v in (("in_features", in_features), ("num_classes", num_classes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_features, self.num_classes = in_features, num_classes
        self.sub_centers = SubCenter(None, sub_centers).k  # validated as SubCenter's k
        self.normalize = bool(normalize)
        self.weight = nn.Parameter(torch.empty(num_classes * self.sub_centers, in_features))
        init_class_weights(self.weight, self.normalize)

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        return features

    def get_embedding_dimension(self) -> int:
        """The features pass through: the model's embedding size."""
        return self.in_features

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.save_config(output_path)
        self.save_torch_weights(output_path, safe_serialization=safe_serialization)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token=None, cache_folder=None, revision=None,
             local_files_only: bool = False, **kwargs) -> "ClassCentres":
        hub = {"subfolder": subfolder, "token": token, "cache_folder": cache_folder, "revision": revision,
               "local_files_only": local_files_only}
        config = cls.load_config(model_name_or_path, **hub)
        return cls.load_torch_weights(model_name_or_path, model=cls(**config), **hub)

    @torch.no_grad()
    def topk(self, embeddings: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` classes whose centres are closest to each embedding (cosines, indices), no ``B x C``."""
        return topk_cosine(embeddings, self.weight, k, sub_centers=self.sub_centers)

    @torch.no_grad()
    def answer_or_abstain(self, embeddings: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
        """Each embedding's nearest class where its cosine reaches ``threshold``, else ``-1`` (and the cosine)."""
        if self.sub_centers > 1:
            values, idx = self.topk(embeddings, 1)
            values, idx = values[:, 0], idx[:, 0]
            return torch.where(values >= threshold, idx, torch.full_like(idx, -1)), values
        return answer_or_abstain(embeddings, self.weight, threshold)

    def __repr__(self) -> str:
        sub = f", sub_centers={self.sub_centers}" if self.sub_centers > 1 else ""
        return f"ClassCentres(in_features={self.in_features}, num_classes={self.num_classes}{sub})"


def _embedding_dimension(model) -> int:
    get = getattr(model, "get_embedding_dimension", None) or getattr(model, "get_sentence_embedding_dimension", None)
    dim = get() if callable(get) else None
    if not isinstance(dim, int):
        raise ValueError("the model does not say its embedding dimension (get_embedding_dimension() returned "
                         f"{dim!r}); pass embedding_dimension=")
    return dim


def _find_centres(model) -> Optional[ClassCentres]:
    last = list(model.children())[-1] if len(list(model.children())) else None
    return last if isinstance(last, ClassCentres) else None


def without_centres(model):
    """The model without its :class:`ClassCentres` module (the plain encoder, e.g. before publishing it).

    Returns the model itself after removing the module in place; a model without one is returned as is.
    """
    if _find_centres(model) is not None:
        del model[len(model) - 1]
    return model


class MarginSoftmaxLoss(nn.Module):
    r"""Margin softmax (CosFace, ArcFace, any margin) over the classes of the training samples.

    The dataset holds texts and an integer ``label`` column (the class, e.g. the paraphrase group);
    with several text columns, each column's embedding is a sample of the row's class. The loss is
    :func:`marginops.margin_cross_entropy` of the embeddings against the class weight, computed
    without ``B x C`` logits.

    The class weight is a :class:`ClassCentres` module appended to ``model`` (so that the Trainer
    saves it with every checkpoint and restores it on resume; see the module docstring). If the
    model's last module already is a ``ClassCentres`` of the same shape (a model saved with it, or a
    second loss on the same model) it is reused.

    Args:
        model (SentenceTransformer): the model to train.
        num_classes (int): ``C``.
        margin (Margin, callable or None): ``psi``. Default: ``marginops.CosFace(0.35)``.
        scale (float): ``s``. Default: 30.0.
        sub_centers (int): ``k`` sub-centres per class. Default: 1.
        embedding_dimension (int, optional): ``D``; read from the model when not given.
        **options: keyword options of :func:`marginops.margin_cross_entropy` (``label_smoothing``,
            ``backend``, ``memory_budget``, ...).

    Inputs:
        +---------------------------------------+--------+
        | Inputs                                | Labels |
        +=======================================+========+
        | single texts (or several columns)     | class  |
        +---------------------------------------+--------+
    """

    def __init__(self, model, num_classes: int, margin: MarginLike = CosFace(0.35), scale: float = 30.0, *,
                 sub_centers: int = 1, embedding_dimension: Optional[int] = None, **options: Any):
        super().__init__()
        valid = [o for o in _OPTIONS if o != "return_stats"]  # the Trainer wants the loss alone
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; valid options are {valid}")
        if options.get("reduction", "mean") == "none":
            raise ValueError("reduction='none' gives a loss per row; the Trainer needs a scalar ('mean' or 'sum')")
        if isinstance(margin, SubCenter):
            raise TypeError("give MarginSoftmaxLoss the inner margin and sub_centers=k")
        self.model = model
        self.margin, self.scale, self.options = margin, scale, dict(options)
        dim = _embedding_dimension(model) if embedding_dimension is None else embedding_dimension
        normalize = self.options.get("normalize", True)
        centres = _find_centres(model)
        if centres is not None:
            if (centres.in_features, centres.num_classes, centres.sub_centers) != (dim, num_classes, sub_centers):
                raise ValueError(f"the model's last module is {centres!r}, not the ({dim}, {num_classes}, "
                                 f"sub_centers={sub_centers}) this loss needs; remove it with without_centres(model)")
        else:
            param = next(model.parameters(), None)
            centres = ClassCentres(dim, num_classes, sub_centers, normalize)
            if param is not None:
                centres.to(device=param.device)
            model.append(centres)
        # the loss reaches the weight through the model (not registered here: it is the model's parameter)
        self.__dict__["_centres"] = centres

    @property
    def centres(self) -> ClassCentres:
        return self.__dict__["_centres"]

    @property
    def num_classes(self) -> int:
        return self.centres.num_classes

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        reps = [self.model(features)["sentence_embedding"] for features in sentence_features]
        x = reps[0] if len(reps) == 1 else torch.cat(reps)
        y = labels if len(reps) == 1 else labels.repeat(len(reps))
        k = self.centres.sub_centers
        margin = SubCenter(self.margin, k) if k > 1 else self.margin
        return margin_cross_entropy(x, self.centres.weight, y.to(x.device), margin, self.scale, **self.options)

    def get_config_dict(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "margin": repr(self.margin), "scale": self.scale,
                "sub_centers": self.centres.sub_centers, **self.options}

    @property
    def citation(self) -> str:
        return """
@inproceedings{wang2018cosface,
    title = {CosFace: Large Margin Cosine Loss for Deep Face Recognition},
    author = {Wang, Hao and Wang, Yitong and Zhou, Zheng and Ji, Xing and Gong, Dihong and Zhou, Jingchao and Li, Zhifeng and Liu, Wei},
    booktitle = {CVPR},
    year = {2018},
}
"""
