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
    """Two 3x3 conv blocks with 2x2 max pooling and a linear projection, for 1-channel images.

    The encoder of the usual plain PyTorch + PML example (conv 32 -> pool -> conv 64 ->
    pool -> flatten -> linear): the pooled feature map is kept whole (``image_size / 4``
    squared positions), not averaged away, so the projection sees where a feature is.
    Input ``(B, 1, image_size, image_size)`` (or ``(B, image_size**2)``, reshaped);
    output ``(B, embedding_size)``.

    Args:
        embedding_size: output dimension.
        channels: of the first conv layer (the second has twice as many).
        image_size: side of the square input (28 for Fashion-MNIST, 8 for digits); a
            multiple of 4.
        batch_norm: a BatchNorm in each block, after the pooling (see ``_conv_block``).
        normalize: L2-normalise the output.

    Raises:
        ValueError: at construction for an ``image_size`` that is not a positive multiple
            of 4; at ``forward`` for inputs of another shape.
    """

    in_chans = 1  # one grey channel in (the transforms convert RGB image files to it)

    def __init__(
        self,
        embedding_size: int = 128,
        channels: int = 32,
        image_size: int = 28,
        batch_norm: bool = False,
        normalize: bool = False,
    ):
        super().__init__(embedding_size, normalize)
        if image_size < 4 or image_size % 4:
            raise ValueError(f"image_size must be a positive multiple of 4, got {image_size}")
        self.image_size = image_size
        self.features = nn.Sequential(
            *_conv_block(1, channels, batch_norm), *_conv_block(channels, 2 * channels, batch_norm)
        )
        self.head = nn.Linear(2 * channels * (image_size // 4) ** 2, embedding_size)

    def forward(self, images: Tensor) -> Tensor:
        side = self.image_size
        if images.ndim == 2 and images.shape[1] == side * side:
            images = images.view(-1, 1, side, side)
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, side, side):
            raise ValueError(
                f"SmallCNN(image_size={side}) expects (B, 1, {side}, {side}) images or "
                f"(B, {side * side}) rows, got {tuple(images.shape)}"
            )
        return self.finish(self.head(self.features(images).flatten(1)))


def _conv_block(in_channels: int, out_channels: int, batch_norm: bool) -> list[nn.Module]:
    """3x3 convolution (same padding), ReLU and 2x2 max pooling; with ``batch_norm``, a
    convolution, max pooling, BatchNorm, then ReLU.

    Max pooling commutes with ReLU and with BatchNorm's per-channel affine map (for a
    positive scale), so normalising after the pooling gives the usual conv - BN - ReLU -
    pool block with its statistics taken on the pooled map, at a quarter of the cost:
    on a CPU, BatchNorm on the full 28x28 map slows a training step by about a third.
    """
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
    if batch_norm:
        return [conv, nn.MaxPool2d(2), nn.BatchNorm2d(out_channels), nn.ReLU()]
    return [conv, nn.ReLU(), nn.MaxPool2d(2)]


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
