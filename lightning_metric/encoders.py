"""Encoders: the networks that turn an input into an embedding.

Any ``nn.Module`` mapping a batch to ``(B, embedding_size)`` works with the
training module (point Hydra's ``_target_`` at it); these are the small ones
the recipes use by default.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class _Embedder(nn.Module):
    """Shared tail: a linear projection to ``embedding_size``, optionally L2-normalised."""

    def __init__(self, embedding_size: int, normalize: bool):
        super().__init__()
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be positive, got {embedding_size}")
        self.embedding_size = embedding_size
        self.normalize = normalize

    def finish(self, embeddings: Tensor) -> Tensor:
        return F.normalize(embeddings, dim=1) if self.normalize else embeddings


class SmallCNN(_Embedder):
    """Two conv blocks and a projection, for 1-channel square images (28x28 FMNIST, 8x8 digits).

    Input ``(B, 1, H, W)`` (or ``(B, H*W)``, reshaped to a square); output
    ``(B, embedding_size)``.
    """

    def __init__(self, embedding_size: int = 64, channels: int = 32, normalize: bool = False):
        super().__init__(embedding_size, normalize)
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.BatchNorm2d(2 * channels),
            nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(8 * channels, embedding_size)

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim == 2:
            side = int(images.shape[1] ** 0.5)
            if side * side != images.shape[1]:
                raise ValueError(f"flat input of width {images.shape[1]} is not a square image")
            images = images.view(-1, 1, side, side)
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"SmallCNN expects (B, 1, H, W) images, got {tuple(images.shape)}")
        return self.finish(self.head(self.features(images).flatten(1)))


class MLP(_Embedder):
    """Fully connected encoder for flat features ``(B, in_features)`` (images are flattened)."""

    def __init__(
        self,
        in_features: int,
        embedding_size: int = 64,
        hidden_sizes: tuple[int, ...] = (256,),
        normalize: bool = False,
    ):
        super().__init__(embedding_size, normalize)
        layers: list[nn.Module] = []
        width = in_features
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, embedding_size))
        self.net = nn.Sequential(*layers)
        self.in_features = in_features

    def forward(self, inputs: Tensor) -> Tensor:
        flat = inputs.flatten(1)
        if flat.shape[1] != self.in_features:
            raise ValueError(
                f"MLP was built for in_features={self.in_features}, got inputs of shape "
                f"{tuple(inputs.shape)}"
            )
        return self.finish(self.net(flat))
