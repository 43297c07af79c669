"""Items read from files when a loader worker asks for them: images (with an optional
crop) and texts, and the batch collation of texts through a tokenizer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image

DECODED_BY_TORCHVISION = (".jpg", ".jpeg", ".png", ".webp", ".gif")
"""Suffixes ``torchvision.io.decode_image`` reads; other images (BMP, TIFF, PPM ...) go
through PIL."""


def to_unit_float(image: Tensor) -> Tensor:
    """``uint8 (C, H, W)`` -> ``float32 (C, H, W)`` in [0, 1]: the default image transform."""
    return image.float() / 255.0


class ImageFiles(Dataset):
    """``(image, label)`` of image files, decoded (as RGB) only when an item is asked for.

    Args:
        paths: ``N`` image file paths.
        labels: ``(N,)`` int64 class ids.
        transform: ``uint8 (3, H, W) -> model input`` (None: :func:`to_unit_float`).
        boxes: optional ``(N, 4)`` float crop boxes ``x1, y1, x2, y2`` in pixels (left,
            top, right, bottom; right and bottom exclusive, rounded to whole pixels), NaN
            rows for no crop. The crop comes before the transform.
    """

    def __init__(self, paths: Sequence[str], labels: Tensor, transform: Callable | None = None,
                 boxes: Tensor | None = None):
        if len(paths) != len(labels) or (boxes is not None and boxes.shape != (len(paths), 4)):
            raise ValueError(
                f"got {len(paths)} paths, {len(labels)} labels and boxes of shape "
                f"{None if boxes is None else tuple(boxes.shape)}; expected N, N and (N, 4)"
            )
        # one numpy array, not a list of str: workers then share it without copying it
        self.paths = np.array([str(p) for p in paths])
        self.labels, self.transform, self.boxes = labels, transform or to_unit_float, boxes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = read_rgb(str(self.paths[index]))
        if self.boxes is not None and not torch.isnan(self.boxes[index]).any():
            x1, y1, x2, y2 = (int(round(float(v))) for v in self.boxes[index])
            image = image[:, y1:y2, x1:x2]
        return self.transform(image), int(self.labels[index])


def read_rgb(path: str) -> Tensor:
    """The image file at ``path`` as RGB ``uint8 (3, H, W)``."""
    if path.lower().endswith(DECODED_BY_TORCHVISION):
        return decode_image(path, mode=ImageReadMode.RGB)
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


class TextItems(Dataset):
    """``(text, label)`` pairs: the tokenizer runs on whole batches (:class:`TextCollate`)."""

    def __init__(self, texts: Sequence[str], labels: Tensor):
        if len(texts) != len(labels):
            raise ValueError(f"got {len(texts)} texts and {len(labels)} labels")
        self.texts = np.array(list(texts), dtype=object)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> tuple[str, int]:
        return str(self.texts[index]), int(self.labels[index])


class TextCollate:
    """``[(text, label[, index]), ...]`` -> ``(tokens, labels[, indices])``.

    ``tokens`` is the tokenizer's output as a plain dict of ``(B, L)`` tensors
    (``input_ids``, ``attention_mask``, ...), padded to the batch's longest text and
    truncated to ``max_length``; ``labels`` and ``indices`` are ``(B,)`` int64.
    """

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, batch: Sequence[tuple]) -> tuple:
        texts, labels, *rest = zip(*batch, strict=True)
        tokens = self.tokenizer(list(texts), padding=True, truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        fields = [torch.tensor(labels, dtype=torch.long)]
        fields += [torch.tensor(values, dtype=torch.long) for values in rest]
        return (dict(tokens), *fields)
