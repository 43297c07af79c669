"""Image preprocessing: torchvision ``transforms.v2`` pipelines sized for the backbone.

:func:`build_transforms` gives a training pipeline (random resized crop, horizontal
flip, colour jitter) and an evaluation pipeline (resize to ``image_size / crop_fraction``,
centre crop), both ending in ``ToDtype(float32, scale=True)`` and ``Normalize``. Their
size, mean, std, interpolation and crop fraction default to the backbone's pretrained
config (timm's ``resolve_model_data_config``), so a pretrained model sees images as it
was trained on them, and both first convert the image to the encoder's channels
(grayscale or RGB); every one can be overridden. The inputs are uint8 images ``(C, H,
W)`` as ``torchvision.io.decode_image`` gives them (PIL images work too); the outputs
are float32 ``(C, image_size, image_size)``.

Example::

    >>> train_tf, eval_tf = build_transforms({}, TimmEncoder("resnet18"))
    >>> eval_tf(torchvision.io.decode_image("cat.jpg")).shape
    torch.Size([3, 224, 224])
    >>> build_transforms({"image_size": 28, "mean": [0.5], "std": [0.5]}, SmallCNN())
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn
from torchvision.transforms import InterpolationMode, v2


@dataclass
class TransformSettings:
    """What :func:`build_transforms` reads (the ``transform`` config group's keys).

    Attributes:
        augment: random crop, flip and colour jitter for training; false: training
            uses the evaluation pipeline.
        image_size: side of the output (int) or ``[height, width]``; None: the backbone's.
        mean, std: per-channel normalisation of ``[0, 1]`` pixels; None: the backbone's.
        interpolation: ``bilinear``, ``bicubic``, ``nearest``, ...; None: the backbone's
            (``bicubic`` without a pretrained config, as timm).
        crop_fraction: evaluation resizes to ``image_size / crop_fraction``, then crops
            the centre; None: the backbone's ``crop_pct`` (0.875 without one, as timm).
        scale, ratio: ``RandomResizedCrop``'s area fraction and aspect-ratio ranges.
        hflip: probability of a horizontal flip.
        color_jitter: brightness, contrast and saturation strength (one number), or
            ``[brightness, contrast, saturation, hue]``; 0 or None: none.
        channels: of the output: 1 (``v2.Grayscale``) or 3 (``v2.RGB``, a grey channel
            repeated); None: the encoder's (its pretrained config's ``input_size``, else
            its ``in_chans``: 1 for ``SmallCNN``), else the image's own. Image files are
            read as RGB, so a grayscale encoder needs it.
    """

    augment: bool = True
    image_size: int | list[int] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    interpolation: str | None = None
    crop_fraction: float | None = None
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.5
    color_jitter: float | list[float] | None = 0.4
    channels: int | None = None

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any] | None) -> TransformSettings:
        """Settings from a dict or DictConfig; an unknown key raises, naming it."""
        settings = dict(settings or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(
                f"unknown transform setting(s) {['transform.' + k for k in unknown]}; "
                f"known: {sorted(known)}")
        return cls(**{k: _plain(v) for k, v in settings.items()})


def _plain(value: Any) -> Any:
    """OmegaConf lists as Python lists."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


def pretrained_data_config(encoder: nn.Module | None) -> dict[str, Any] | None:
    """The encoder's preprocessing config, timm's format (``input_size``, ``mean``, ``std``,
    ``interpolation``, ``crop_pct``), or None when it has none.

    Read from ``encoder.data_config`` (:class:`~lightning_metric.backbones.TimmEncoder`),
    else from a timm model's ``pretrained_cfg`` (the encoder itself or its ``.backbone``).
    """
    if encoder is None:
        return None
    config = getattr(encoder, "data_config", None)
    if config is not None:
        return dict(config)
    for candidate in (encoder, getattr(encoder, "backbone", None)):
        if getattr(candidate, "pretrained_cfg", None):
            from timm.data import resolve_model_data_config

            return resolve_model_data_config(candidate)
    return None


@dataclass(frozen=True)
class _Resolved:
    size: tuple[int, int]
    mean: list[float]
    std: list[float]
    interpolation: InterpolationMode
    crop_fraction: float
    channels: int | None


def _resolve(settings: TransformSettings, pretrained: dict[str, Any] | None,
             encoder_channels: int | None = None) -> _Resolved:
    """Each setting from the config, else the backbone's pretrained config (the channels,
    else the encoder's ``in_chans``)."""
    pretrained = pretrained or {}
    missing = [key for key, theirs in (("image_size", "input_size"), ("mean", "mean"),
                                        ("std", "std"))
               if getattr(settings, key) is None and theirs not in pretrained]
    if missing:
        raise ValueError(
            f"transform.{'/'.join(missing)} must be set: the encoder has no pretrained "
            "config to take them from (e.g. transform.image_size=28 transform.mean=[0.5] "
            "transform.std=[0.5])")
    size = settings.image_size
    size = tuple(pretrained["input_size"][-2:]) if size is None else size
    mean = list(settings.mean if settings.mean is not None else pretrained["mean"])
    std = list(settings.std if settings.std is not None else pretrained["std"])
    interpolation = settings.interpolation or pretrained.get("interpolation", "bicubic")
    crop = settings.crop_fraction
    crop = pretrained.get("crop_pct", 0.875) if crop is None else crop
    channels = settings.channels
    if channels is None:
        channels = pretrained["input_size"][0] if "input_size" in pretrained else encoder_channels
    return _Resolved(_size(size), mean, std, _interpolation(interpolation), _crop(crop),
                     _channels(channels))


def _size(size: int | Sequence[int]) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s >= 1 for s in pair):
        raise ValueError(
            f"transform.image_size must be a positive int or [height, width], got {size!r}")
    return pair


def _interpolation(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(name)
    except ValueError:
        choices = [mode.value for mode in InterpolationMode]
        raise ValueError(
            f"transform.interpolation must be one of {choices}, got {name!r}") from None


def _crop(fraction: float) -> float:
    if not 0 < fraction <= 1:
        raise ValueError(f"transform.crop_fraction must be in (0, 1], got {fraction}")
    return float(fraction)


CHANNEL_STEPS = {1: lambda: v2.Grayscale(1), 3: v2.RGB}


def _channels(channels: int | None) -> int | None:
    if channels not in (None, *CHANNEL_STEPS):
        raise ValueError(f"transform.channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    return channels


def _as_image(resolved: _Resolved) -> list[v2.Transform]:
    """``ToImage``, then to the resolved number of channels (none: the image's own)."""
    steps: list[v2.Transform] = [v2.ToImage()]
    if resolved.channels is not None:
        steps.append(CHANNEL_STEPS[resolved.channels]())
    return steps


def _check_augmentation(settings: TransformSettings) -> None:
    low, high = settings.scale
    if not 0 < low <= high <= 1:
        raise ValueError(f"transform.scale must be [low, high] in (0, 1], got {settings.scale}")
    if not 0 <= settings.hflip <= 1:
        raise ValueError(f"transform.hflip must be a probability, got {settings.hflip}")


def _normalized(resolved: _Resolved) -> list[v2.Transform]:
    if len(resolved.mean) != len(resolved.std):
        raise ValueError(
            f"transform.mean {resolved.mean} and transform.std {resolved.std} differ in length")
    if any(s <= 0 for s in resolved.std):
        raise ValueError(f"transform.std must be positive, got {resolved.std}")
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(resolved.mean, resolved.std),
            v2.ToPureTensor()]


def eval_transform(resolved: _Resolved) -> v2.Compose:
    """Resize to ``size / crop_fraction`` (the shorter side for square outputs, as timm),
    centre crop, scale to [0, 1], normalise (after the conversion to the channels)."""
    height, width = resolved.size
    resize = [math.floor(s / resolved.crop_fraction) for s in resolved.size]
    resize_to = resize[0] if height == width else resize
    return v2.Compose([
        *_as_image(resolved),
        v2.Resize(resize_to, interpolation=resolved.interpolation, antialias=True),
        v2.CenterCrop(resolved.size),
        *_normalized(resolved),
    ])


def train_transform(resolved: _Resolved, settings: TransformSettings) -> v2.Compose:
    """Random resized crop, horizontal flip, colour jitter, scale to [0, 1], normalise (after
    the conversion to the channels)."""
    _check_augmentation(settings)
    steps: list[v2.Transform] = [
        *_as_image(resolved),
        v2.RandomResizedCrop(resolved.size, scale=tuple(settings.scale),
                             ratio=tuple(settings.ratio),
                             interpolation=resolved.interpolation, antialias=True),
    ]
    if settings.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(settings.hflip))
    jitter = _color_jitter(settings.color_jitter)
    if jitter is not None:
        steps.append(jitter)
    return v2.Compose([*steps, *_normalized(resolved)])


def _color_jitter(strength: float | list[float] | None) -> v2.ColorJitter | None:
    if not strength:
        return None
    values = [strength] * 3 if isinstance(strength, int | float) else list(strength)
    if len(values) not in (3, 4) or any(v < 0 for v in values):
        raise ValueError(
            "transform.color_jitter must be a number >= 0 or [brightness, contrast, "
            f"saturation(, hue)], got {strength!r}")
    return v2.ColorJitter(*values)


def build_transforms(
    settings: Mapping[str, Any] | TransformSettings | None = None,
    encoder: nn.Module | None = None,
) -> tuple[v2.Compose, v2.Compose]:
    """``(train_transform, eval_transform)`` for ``encoder``'s images.

    Args:
        settings: the ``transform`` config (see :class:`TransformSettings`); None or ``{}``:
            the defaults, sized by the encoder's pretrained config.
        encoder: where image size, mean, std, interpolation and crop fraction come from
            when not set (a :class:`~lightning_metric.backbones.TimmEncoder`, a timm model);
            an encoder without a pretrained config (``SmallCNN``) needs ``image_size``,
            ``mean`` and ``std`` in ``settings``.

    Returns:
        Two ``torchvision.transforms.v2.Compose``, each mapping a uint8 image ``(C, H, W)``
        (or a PIL image) to float32 ``(C, height, width)``; with ``augment`` false both
        are the evaluation pipeline.

    Raises:
        ValueError: an unknown or bad setting, or a missing size/mean/std, naming it.
    """
    if not isinstance(settings, TransformSettings):
        settings = TransformSettings.from_mapping(settings)
    resolved = _resolve(settings, pretrained_data_config(encoder),
                        getattr(encoder, "in_chans", None))
    evaluation = eval_transform(resolved)
    if not settings.augment:
        return evaluation, evaluation
    return train_transform(resolved, settings), evaluation
