"""Two encoders in one: an image tower and a text tower into one embedding space (CLIP)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .transforms import pretrained_data_config

LOCKABLE = (None, "image", "text")


class TwoTowerEncoder(nn.Module):
    """Sends each batch to the tower of its modality: a tokenizer's dict (``input_ids``,
    ``attention_mask``, ...) to ``text``, an image tensor ``(B, C, H, W)`` to ``image``.

    Both towers must end in the same ``embedding_size`` (a projection each, as CLIP has),
    so images and texts are compared in one space (Radford et al., "Learning Transferable
    Visual Models From Natural Language Supervision", ICML 2021). The data module takes
    the text tower's ``tokenizer`` and the image tower's preprocessing (``data_config``).

    A pretrained tower can be **locked** (Zhai et al., "LiT: Zero-Shot Transfer with
    Locked-image text Tuning", CVPR 2022): its parameters never train (``requires_grad``
    off), it stays in eval mode and runs without autograd, and the other tower learns to
    meet its embeddings. Locking a pretrained text tower keeps its sentence space, so
    captions it has never seen still land near their meaning (zero-shot), and saves its
    backward pass.

    Args:
        image: an image encoder, e.g. :class:`~lightning_metric.backbones.TimmEncoder`.
        text: a text encoder with a ``.tokenizer``, e.g.
            :class:`~lightning_metric.backbones.HFTextEncoder`.
        locked: ``"image"`` or ``"text"``: that tower is locked; None: both train.

    Raises:
        ValueError: the towers' ``embedding_size`` differ, the text tower has no
            tokenizer, or ``locked`` names no tower.
    """

    reads_images = True

    def __init__(self, image: nn.Module, text: nn.Module, locked: str | None = None):
        super().__init__()
        if locked not in LOCKABLE:
            raise ValueError(f"locked must be one of {list(LOCKABLE)}, got {locked!r}")
        sizes = (getattr(image, "embedding_size", None), getattr(text, "embedding_size", None))
        if None not in sizes and sizes[0] != sizes[1]:
            raise ValueError(
                f"the image tower gives {sizes[0]}-d and the text tower {sizes[1]}-d "
                "embeddings: give both the same model.embedding_size")
        if getattr(text, "tokenizer", None) is None:
            raise ValueError(f"the text tower {type(text).__name__} has no .tokenizer")
        self.image, self.text = image, text
        self.embedding_size = sizes[0] if sizes[0] is not None else sizes[1]
        self.locked = locked
        if locked is not None:
            getattr(self, locked).requires_grad_(False)
            getattr(self, locked).eval()

    def train(self, mode: bool = True) -> TwoTowerEncoder:
        super().train(mode)
        if self.locked is not None:
            getattr(self, self.locked).eval()
        return self

    @property
    def tokenizer(self) -> Any:
        return self.text.tokenizer

    @property
    def max_length(self) -> int | None:
        return getattr(self.text, "max_length", None)

    @property
    def data_config(self) -> dict[str, Any] | None:
        return pretrained_data_config(self.image)

    def forward(self, inputs: Tensor | Mapping[str, Tensor]) -> Tensor:
        name = "text" if isinstance(inputs, Mapping) else "image"
        if name == self.locked:
            with torch.no_grad():
                return getattr(self, name)(inputs)
        return getattr(self, name)(inputs)
