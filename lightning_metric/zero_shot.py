"""Zero-shot classification of the evaluation images by class-name captions (CLIP)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from .eval_outputs import EvalOutputsCallback
from .metrics import EmbeddingCollector

DEFAULT_TEMPLATES = ("a photo of a {}.",)
"""The template of data that names its classes but has no captions of its own."""


class ZeroShotAccuracy(EvalOutputsCallback):
    """Logs ``<stage>/zero_shot_accuracy``: each evaluation image classified by the nearest
    class embedding, the class embeddings made from captions of the class names.

    The classifier is CLIP's (Radford et al., 2021, section 3.1.4): every caption of a class
    (one per template, ``"a photo of a sneaker."``) is embedded by the module (a
    :class:`~lightning_metric.towers.TwoTowerEncoder` sends the tokens to its text tower),
    L2-normalised, averaged over the templates and normalised again; an image's class is
    the one of largest cosine similarity. Also logged, from the same ``(images, classes)``
    similarity matrix:

    - ``<stage>/image_to_text_recall_at_K``: the image's class is among its K nearest class
      embeddings (K = 1 is the zero-shot accuracy; K = 5 CLIP's top-5 accuracy);
    - ``<stage>/text_to_image_recall_at_K``: among the K images nearest to a class
      embedding there is one of that class, averaged over the classes present.

    The images and their labels are the validation / test step's outputs
    (``{"embeddings", "labels"[, "indices"]}``) of the batches whose inputs are image
    tensors (batches of texts, as a caption gallery, are skipped); under DDP they are
    gathered from every rank (:class:`~lightning_metric.metrics.EmbeddingCollector`).
    The captions come from the data module's ``class_prompts()`` (``[class][template]``,
    as :class:`~lightning_metric.data.FashionMNISTCaptionsDataModule` gives), else from its
    ``class_names`` and ``templates`` (default ``"a photo of a {}."``); data with neither
    (image-caption pairs) logs nothing. They are tokenized by the module's encoder's
    ``tokenizer`` (truncated at the data's ``max_length``).

    Args:
        templates: caption templates with one ``{}``, used with the data's ``class_names``
            instead of its ``class_prompts()``; None: the data's.
        recall_at_k: the Ks of the logged recalls (larger than the class count: skipped).

    Raises:
        ValueError: a ``recall_at_k`` below 1, a template without one ``{}``; at the end
            of an evaluation, an encoder without a tokenizer.

    Example::

        >>> trainer = pl.Trainer(callbacks=[ZeroShotAccuracy()])
        >>> trainer.validate(module, datamodule=FashionMNISTCaptionsDataModule(...))
        >>> trainer.callback_metrics["val/zero_shot_accuracy"]
    """

    def __init__(self, templates: Sequence[str] | None = None,
                 recall_at_k: Iterable[int] = (1, 5)):
        self.recall_at_k = tuple(int(k) for k in recall_at_k)
        if any(k < 1 for k in self.recall_at_k):
            raise ValueError(f"recall_at_k must be >= 1, got {list(self.recall_at_k)}")
        if templates is not None and any(t.count("{}") != 1 for t in templates):
            raise ValueError(f"templates must each hold one '{{}}', got {list(templates)}")
        self.templates = None if templates is None else tuple(templates)
        self.collector = EmbeddingCollector()
        self.last: dict[str, dict[str, float]] = {}
        """The values logged at the last evaluation of each stage."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.collector = self.collector.to(pl_module.device)

    def collect(self, trainer, pl_module, outputs: Any, batch: Any, stage: str) -> None:
        is_images = isinstance(batch, tuple | list) and isinstance(batch[0], Tensor)
        if is_images and isinstance(outputs, Mapping) and "embeddings" in outputs:
            self.collector.update(outputs["embeddings"], outputs["labels"],
                                  outputs.get("indices"))

    def finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.collector.update_called:
            return
        images, labels = self.collector.compute()   # every rank: a collective under DDP
        self.collector.reset()
        prompts = self._prompts(getattr(trainer, "datamodule", None))
        if not prompts:
            return
        classes = embed_class_prompts(pl_module, prompts, _max_length(trainer, pl_module))
        values = zero_shot_metrics(images, labels, classes, self.recall_at_k)
        self.last[stage] = {key: float(value) for key, value in values.items()}
        pl_module.log_dict({f"{stage}/{key}": value.to(pl_module.device)
                            for key, value in values.items()})

    def _prompts(self, datamodule: Any) -> list[list[str]]:
        if self.templates is None and hasattr(datamodule, "class_prompts"):
            return datamodule.class_prompts()
        names = tuple(getattr(datamodule, "class_names", ()) or ())
        templates = self.templates or tuple(getattr(datamodule, "templates", ())) \
            or DEFAULT_TEMPLATES
        return [[template.format(name) for template in templates] for name in names]


def embed_class_prompts(module: Any, prompts: Sequence[Sequence[str]],
                        max_length: int | None = None) -> Tensor:
    """``(C, D)`` unit class embeddings: each class's captions embedded by ``module`` (a
    tokenizer dict in, embeddings out), normalised, averaged and normalised again.

    Raises:
        ValueError: ``module`` (or its ``encoder``) has no ``tokenizer``.
    """
    encoder = getattr(module, "encoder", module)
    tokenizer = getattr(encoder, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"ZeroShotAccuracy embeds captions with the encoder's tokenizer: "
                         f"{type(encoder).__name__} has none (use a two-tower model)")
    texts = [text for captions in prompts for text in captions]
    options = {} if max_length is None else {"truncation": True, "max_length": max_length}
    tokens = tokenizer(texts, padding=True, return_tensors="pt", **options)
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            embedded = module({k: v.to(device) for k, v in tokens.items()}).float()
    finally:
        module.train(was_training)
    embedded = F.normalize(embedded, dim=1)
    per_class, start = [], 0
    for captions in prompts:
        per_class.append(embedded[start:start + len(captions)].mean(0))
        start += len(captions)
    return F.normalize(torch.stack(per_class), dim=1)


def zero_shot_metrics(images: Tensor, labels: Tensor, classes: Tensor,
                      recall_at_k: Iterable[int] = (1, 5)) -> dict[str, Tensor]:
    """Zero-shot accuracy and image->text / text->image Recall@K of ``(N, D)`` image
    embeddings with ``(N,)`` class ids against ``(C, D)`` class embeddings (row ``c``:
    class ``c``), by cosine similarity. Ks above ``C`` (image->text) or ``N`` (text->image)
    are skipped. Returns 0-d float tensors keyed ``zero_shot_accuracy``,
    ``image_to_text_recall_at_K``, ``text_to_image_recall_at_K``."""
    similarity = F.normalize(images.float(), dim=1) @ F.normalize(classes.float(), dim=1).T
    labels = labels.to(similarity.device)
    order = similarity.argsort(dim=1, descending=True)           # (N, C) classes, nearest first
    rank = (order == labels[:, None]).float().argmax(dim=1)      # place of the image's class
    values = {"zero_shot_accuracy": (rank == 0).float().mean()}
    present = labels.unique()
    present = present[present < len(classes)]
    by_class = similarity.T[present].argsort(dim=1, descending=True)   # (C', N) images
    for k in recall_at_k:
        if k <= len(classes):
            values[f"image_to_text_recall_at_{k}"] = (rank < k).float().mean()
        if k <= len(images) and len(present):
            hits = (labels[by_class[:, :k]] == present[:, None]).any(dim=1)
            values[f"text_to_image_recall_at_{k}"] = hits.float().mean()
    return {key: value.detach().cpu() for key, value in values.items()}


def _max_length(trainer: pl.Trainer, pl_module: pl.LightningModule) -> int | None:
    datamodule = getattr(trainer, "datamodule", None)
    length = getattr(datamodule, "max_length", None)
    if length is None:
        length = getattr(getattr(pl_module, "encoder", None), "max_length", None)
    if length is None:
        rank_zero_warn("ZeroShotAccuracy: no max_length on the data or the encoder; "
                       "captions are not truncated")
    return length
