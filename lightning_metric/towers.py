"""Two encoders in one: an image tower and a text tower into one embedding space (CLIP)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from .transforms import pretrained_data_config


class TwoTowerEncoder(nn.Module):
    """Sends each batch to the tower of its modality: a tokenizer's dict (``input_ids``,
    ``attention_mask``, ...) to ``text``, an image tensor ``(B, C, H, W)`` to ``image``.

    Both towers must end in the same ``embedding_size`` (a projection each, as CLIP has),
    so images and texts are compared in one space (Radford et al., "Learning Transferable
    Visual Models From Natural Language Supervision", ICML 2021). The data module takes
    the text tower's ``tokenizer`` and the image tower's preprocessing (``data_config``).

    Args:
        image: an image encoder, e.g. :class:`~lightning_metric.backbones.TimmEncoder`.
        text: a text encoder with a ``.tokenizer``, e.g.
            :class:`~lightning_metric.backbones.HFTextEncoder`.

    Raises:
        ValueError: the towers' ``embedding_size`` differ, or the text tower has no
            tokenizer.
    """

    reads_images = True

    def __init__(self, image: nn.Module, text: nn.Module):
        super().__init__()
        sizes = (getattr(image, "embedding_size", None), getattr(text, "embedding_size", None))
        if None not in sizes and sizes[0] != sizes[1]:
            raise ValueError(
                f"the image tower gives {sizes[0]}-d and the text tower {sizes[1]}-d "
                "embeddings: give both the same model.embedding_size")
        if getattr(text, "tokenizer", None) is None:
            raise ValueError(f"the text tower {type(text).__name__} has no .tokenizer")
        self.image, self.text = image, text
        self.embedding_size = sizes[0] if sizes[0] is not None else sizes[1]

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
        if isinstance(inputs, Mapping):
            return self.text(inputs)
        return self.image(inputs)
