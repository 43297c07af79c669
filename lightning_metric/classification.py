"""Closed-set classification accuracy of a classification-style loss, next to retrieval.

A loss with learned class weights (ArcFace, CosFace, ProxyNCA, P2SGrad, ...) is also a
classifier head: ``loss.get_logits(embeddings)`` scores every class. When the evaluated
items belong to the loss's classes (the standard protocol, not class-disjoint), the
fraction of items whose best-scoring class is their label says how well the embeddings
separate the training classes.

Example::

    >>> trainer = pl.Trainer(callbacks=[RetrievalMetrics(), ClassificationAccuracy()])
    >>> trainer.test(module, datamodule=data)   # logs test/classification_accuracy
"""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from .eval_outputs import VAL, EvalOutputsCallback
from .metrics import EmbeddingCollector

log = logging.getLogger(__name__)


def predicted_classes(loss: nn.Module, embeddings: Tensor, chunk_size: int = 4096) -> Tensor:
    """The class ``(N,)`` that ``loss.get_logits`` scores closest for each embedding ``(N, D)``.

    The logits are scores (argmax) unless the loss's class sets ``logits_are_distances =
    True``: then they are values of ``loss.distance``, which knows its direction (argmin
    for a distance, argmax for a similarity).
    """
    predictions = []
    with torch.no_grad():
        for chunk in embeddings.split(chunk_size):
            logits = loss.get_logits(chunk)
            if getattr(type(loss), "logits_are_distances", False):
                predictions.append(loss.distance.closest(logits, dim=1)[1])
            else:
                predictions.append(logits.argmax(dim=1))
    return torch.cat(predictions) if predictions else embeddings.new_zeros(0, dtype=torch.long)


def classification_accuracy(loss: nn.Module, embeddings: Tensor, labels: Tensor) -> float:
    """The fraction of ``embeddings`` ``(N, D)`` whose predicted class (see
    :func:`predicted_classes`) equals its label ``(N,)``."""
    if len(labels) == 0:
        raise ValueError("classification_accuracy needs at least one item, got none")
    correct = predicted_classes(loss, embeddings) == labels.to(embeddings.device)
    return correct.float().mean().item()


class ClassificationAccuracy(EvalOutputsCallback):
    """Logs ``<stage>/classification_accuracy`` for losses that are classifiers.

    For a module whose ``loss`` has ``get_logits`` (and ``num_classes``), the validation
    and test embeddings (``{"embeddings", "labels"[, "indices"]}`` returned by the module's
    steps) are collected; at the epoch's end, gathered from every process under DDP (in
    dataset order, padded duplicates dropped, when the steps return indices), each item's
    predicted class is compared with its label (:func:`classification_accuracy`). The
    value, the same on every rank, is logged.

    Nothing is collected or logged for a loss without ``get_logits`` (triplet, contrastive,
    ...). When some label lies outside ``[0, num_classes)`` (class-disjoint evaluation:
    the evaluated classes are not the loss's), the accuracy is skipped and one log line a
    stage says why.

    Args:
        on_validation: also log ``val/classification_accuracy`` (default True).
    """

    def __init__(self, on_validation: bool = True):
        self.on_validation = on_validation
        self.collector = EmbeddingCollector()
        self._skipped: set[str] = set()

    @staticmethod
    def _classifier(pl_module: pl.LightningModule) -> nn.Module | None:
        loss = getattr(pl_module, "loss", None)
        has_classes = getattr(loss, "num_classes", None) is not None
        return loss if callable(getattr(loss, "get_logits", None)) and has_classes else None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.collector = self.collector.to(pl_module.device)

    def collect(self, trainer, pl_module, outputs, batch, stage: str) -> None:
        if stage == VAL and not self.on_validation:
            return
        if (self._classifier(pl_module) is not None and isinstance(outputs, dict)
                and "embeddings" in outputs):
            self.collector.update(outputs["embeddings"], outputs["labels"],
                                  outputs.get("indices"))

    def finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        loss = self._classifier(pl_module)
        if loss is None or not self.collector.update_called:
            self.collector.reset()
            return
        embeddings, labels = self.collector.compute()   # collective: every rank calls it
        self.collector.reset()
        if len(labels) == 0:
            return
        num_classes = loss.num_classes
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            if stage not in self._skipped and pl_module.trainer.is_global_zero:
                log.info(
                    "ClassificationAccuracy: %s labels lie outside the loss's classes [0, %d) "
                    "(class-disjoint evaluation): %s/classification_accuracy is not logged",
                    stage, num_classes, stage)
            self._skipped.add(stage)
            return
        value = classification_accuracy(loss, embeddings, labels)
        pl_module.log(f"{stage}/classification_accuracy",
                      torch.tensor(value, dtype=torch.float32, device=pl_module.device))
