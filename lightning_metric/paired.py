"""Batches of paired fields (query-document, image-text) and how a loss is called on them.

A paired batch is a dict, as :class:`~lightning_metric.data.PairDataModule` gives it::

    {"inputs": [field_0, field_1, ...],   # one encoder input per field, row i = example i
     "target": (B,) float tensor}          # only for shapes with a target

Each field is embedded by the same encoder (a :class:`~lightning_metric.towers.TwoTowerEncoder`
sends images and texts to their own towers) and the loss is called with the fields'
embeddings in order, then the target: ``loss(query, doc, *hard_negatives)``,
``loss(a, b, scores)``, ``loss(query, pos, neg, teacher_margin)``, ``loss(image, text)``.
The shapes are the registry's (:data:`~lightning_metric.losses.registry.PAIR_LOSSES`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from .losses import registry


@dataclass(frozen=True)
class PairShape:
    """The fields and target a paired loss takes."""

    min_fields: int
    max_fields: int | None   # None: any number (hard negatives)
    target: bool

    def describe(self) -> str:
        count = (f"{self.min_fields}" if self.max_fields == self.min_fields
                 else f"at least {self.min_fields}")
        return f"{count} fields" + (" and a target" if self.target else ", no target")


PAIR_SHAPES: dict[str, PairShape] = {
    registry.PAIR: PairShape(2, None, target=False),
    registry.PAIR_SCORE: PairShape(2, 2, target=True),
    registry.PAIR_TARGET: PairShape(2, 2, target=True),
    registry.TRIPLET: PairShape(3, 3, target=False),
    registry.TRIPLET_MARGIN: PairShape(3, 3, target=True),
    registry.IMAGE_TEXT: PairShape(2, 2, target=False),
}


def is_paired(batch: Any) -> bool:
    """A paired batch (a mapping with ``"inputs"``), not an ``(x, label)`` tuple."""
    return isinstance(batch, Mapping) and "inputs" in batch


def check_paired_batch(shape: str, loss_name: str, batch: Mapping[str, Any]) -> None:
    """The batch has the fields and target the loss's shape takes.

    Raises:
        ValueError: naming the loss, its shape and what the batch holds.
    """
    spec = PAIR_SHAPES[shape]
    fields, has_target = len(batch["inputs"]), batch.get("target") is not None
    too_many = spec.max_fields is not None and fields > spec.max_fields
    if fields < spec.min_fields or too_many or has_target != spec.target:
        raise ValueError(
            f"{loss_name} takes {shape!r} batches ({spec.describe()}), got a batch of "
            f"{fields} fields {'with' if has_target else 'without'} a target: check data.fields "
            "and data.target"
        )


def paired_batch_size(batch: Mapping[str, Any]) -> int:
    """Examples in the batch (rows of its target, or of the first field)."""
    if batch.get("target") is not None:
        return len(batch["target"])
    first = batch["inputs"][0]
    return len(first["input_ids"] if isinstance(first, Mapping) else first)


def batch_size(batch: Any) -> int:
    """Examples in a paired batch or an ``(x, label[, index])`` batch."""
    return paired_batch_size(batch) if is_paired(batch) else len(batch[1])


def embed_fields(encoder: Callable[[Any], Tensor], batch: Mapping[str, Any]) -> list[Tensor]:
    """``(B, D)`` embeddings of each field, in order."""
    return [encoder(field) for field in batch["inputs"]]


def loss_arguments(embeddings: list[Tensor], batch: Mapping[str, Any]) -> list[Tensor]:
    """The loss's positional arguments: the fields' embeddings, then the target if any."""
    target = batch.get("target")
    return [*embeddings, target] if target is not None else list(embeddings)


def predicted_similarity(embeddings: list[Tensor]) -> Tensor:
    """``(B,)`` what the model says of each example, to correlate with its target: the
    cosine similarity of the first two fields, less that of the first and third when there
    is a third (a predicted margin, as MarginMSE's teacher margin)."""
    similarity = F.cosine_similarity(embeddings[0].float(), embeddings[1].float(), dim=1)
    if len(embeddings) > 2:
        similarity = similarity - F.cosine_similarity(
            embeddings[0].float(), embeddings[2].float(), dim=1)
    return similarity
