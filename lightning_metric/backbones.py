"""Pretrained backbones: timm image models and Hugging Face text encoders.

Each encoder is a pretrained network (``.backbone``) followed by a head (``.head``): a
linear projection to ``embedding_size``, or ``nn.Identity`` when ``embedding_size`` is
None (the backbone's own feature size), and an optional L2 normalisation. The module's
fine-tuning controls (``freeze_backbone_epochs``, ``backbone_lr_multiplier``,
``freeze_batchnorm``) act on ``.backbone``.

Offline machines load weights from disk: ``TimmEncoder(pretrained_path=FILE)`` and
``HFTextEncoder(name=FOLDER)``.

Example::

    >>> encoder = TimmEncoder("resnet18", pretrained_path="resnet18.safetensors",
    ...                       embedding_size=128)
    >>> encoder(images).shape              # images: (B, 3, 224, 224) float
    torch.Size([B, 128])
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

POOLINGS = ("mean", "cls")


class _PretrainedEncoder(nn.Module):
    """Shared tail: ``.backbone`` features -> ``.head`` projection -> optional L2 norm."""

    backbone: nn.Module

    def _make_head(self, feature_size: int, embedding_size: int | None, normalize: bool) -> None:
        if embedding_size is not None and embedding_size < 1:
            raise ValueError(
                f"embedding_size must be positive (or null to keep the backbone's "
                f"{feature_size} features), got {embedding_size}")
        self.feature_size = feature_size
        self.embedding_size = feature_size if embedding_size is None else embedding_size
        self.head = nn.Identity() if embedding_size is None else nn.Linear(
            feature_size, embedding_size)
        self.normalize = normalize

    def _finish(self, features: Tensor) -> Tensor:
        embeddings = self.head(features)
        return F.normalize(embeddings, dim=1) if self.normalize else embeddings


def batchnorm_eval(module: nn.Module) -> None:
    """Put every BatchNorm layer inside ``module`` in eval mode (running statistics are
    used and no longer updated; the affine weights still train)."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()


class TimmEncoder(_PretrainedEncoder):
    """Any timm image model, globally pooled (``num_classes=0``), then a projection.

    Input ``(B, C, H, W)`` float images, normalised as ``.data_config`` says (see
    :func:`lightning_metric.transforms.build_transforms`); output ``(B, embedding_size)``.

    Args:
        name: a timm model name (``timm.list_models()``), e.g. ``resnet18``,
            ``vit_small_patch16_224.augreg_in21k``.
        pretrained: load timm's pretrained weights (downloaded from the Hugging Face hub;
            needs internet unless they are in the cache).
        pretrained_path: load the weights from this file instead (``.safetensors``,
            ``.pth``, ``.bin``: a state dict of the timm model, as timm's hub files
            (``model.safetensors``) hold or ``encoder.backbone.state_dict()`` saved; a
            classifier in it is dropped; see :func:`load_timm_weights`). How offline
            machines load pretrained weights; implies ``pretrained``.
        embedding_size: size of the linear projection; None keeps the backbone's
            ``num_features``.
        normalize: L2-normalise the embeddings.
        freeze_batchnorm: keep the backbone's BatchNorm layers in eval mode when training
            (running statistics stay those of the pretrained weights).
        in_chans: channels of the input images: 3 (RGB), 1 for grayscale (Fashion-MNIST,
            X-rays). Pretrained RGB weights are adapted as timm adapts them (the first
            convolution's kernels summed over the colour channels, ``adapt_input_conv``),
            and ``.data_config``'s mean and std become the colour channels' averages.
        **timm_kwargs: passed to ``timm.create_model`` (``drop_rate``, ...).

    Raises:
        ValueError: an unknown model name (with close names), a bad ``embedding_size`` or
            ``in_chans``, weights in ``pretrained_path`` that do not fit the model.
        FileNotFoundError: ``pretrained_path`` is not a file.
    """

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        pretrained_path: str | Path | None = None,
        embedding_size: int | None = None,
        normalize: bool = False,
        freeze_batchnorm: bool = False,
        in_chans: int = 3,
        **timm_kwargs: Any,
    ):
        super().__init__()
        import timm

        _check_timm_name(name)
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(
                f"model.in_chans must be a positive number of channels, got {in_chans!r}")
        path = None if pretrained_path is None else Path(pretrained_path).expanduser()
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"pretrained_path={str(pretrained_path)!r} is not a file")
        self.backbone = timm.create_model(
            name, pretrained=pretrained and path is None, num_classes=0, in_chans=in_chans,
            **timm_kwargs)
        if path is not None:
            load_timm_weights(self.backbone, path)
        self.name, self.freeze_batchnorm, self.in_chans = name, freeze_batchnorm, in_chans
        self._make_head(self.backbone.num_features, embedding_size, normalize)

    @property
    def data_config(self) -> dict[str, Any]:
        """timm's resolved preprocessing: ``input_size`` (C, H, W), ``interpolation``,
        ``mean``, ``std``, ``crop_pct``, ``crop_mode`` (``timm.data.resolve_model_data_config``),
        with ``C = in_chans`` and, for other than 3 channels, ``mean`` and ``std`` the
        averages of the pretrained ones (timm keeps its RGB values there)."""
        from timm.data import resolve_model_data_config

        config = resolve_model_data_config(self.backbone)
        return _with_channels(config, self.in_chans)

    def train(self, mode: bool = True) -> TimmEncoder:
        super().train(mode)
        if mode and self.freeze_batchnorm:
            batchnorm_eval(self.backbone)
        return self

    def forward(self, images: Tensor) -> Tensor:
        return self._finish(self.backbone(images))


def _with_channels(config: dict[str, Any], in_chans: int) -> dict[str, Any]:
    """A timm data config for ``in_chans`` input channels: its ``input_size`` says so, and
    a ``mean`` / ``std`` of another length is replaced by its average, once a channel."""
    config = dict(config, input_size=(in_chans, *config["input_size"][1:]))
    for key in ("mean", "std"):
        values = tuple(config[key])
        if len(values) != in_chans:
            config[key] = (sum(values) / len(values),) * in_chans
    return config


def _adapt_input_convs(model: nn.Module, state: dict[str, Tensor],
                       expected: dict[str, Tensor]) -> None:
    """Pretrained first-convolution weights for another number of input channels (an RGB
    file, a grayscale model): adapted in ``state`` to ``expected`` (the model's own state
    dict) as timm adapts downloaded ones."""
    from timm.models import adapt_input_conv

    first_convs = (model.pretrained_cfg or {}).get("first_conv") or ()
    for name in (first_convs,) if isinstance(first_convs, str) else first_convs:
        key = f"{name}.weight"
        weight, wanted = state.get(key), expected.get(key)
        if (weight is not None and wanted is not None and weight.ndim == 4
                and weight.shape[1] != wanted.shape[1]):
            state[key] = adapt_input_conv(wanted.shape[1], weight, base_chans=weight.shape[1])


def load_timm_weights(model: nn.Module, path: str | Path) -> None:
    """Load a timm model's weights from a local file, checking that every key fits.

    ``path``: ``.safetensors``, ``.pth``/``.bin``/``.pt`` (a state dict, or a checkpoint
    holding one under ``state_dict``/``model``, read by ``timm.models.load_state_dict``),
    or ``.npz`` (timm's ``model.load_pretrained``, for the models that have it). A
    classifier in the file that the model lacks (``num_classes=0``) is dropped, and so is a
    ``backbone.`` prefix (a whole :class:`TimmEncoder`'s state dict). The first
    convolution of a model with other input channels than the file's (``in_chans=1``,
    RGB weights) is adapted by timm's ``adapt_input_conv``.

    Raises:
        ValueError: the file's weights do not fit the model (missing, unexpected or
            mis-shaped keys, listed).
    """
    from timm.models import load_state_dict

    path = Path(path)
    if path.suffix == ".npz" and hasattr(model, "load_pretrained"):
        model.load_pretrained(str(path))
        return
    state = load_state_dict(str(path))
    expected = model.state_dict()
    if _is_encoder_state(state) and not _is_encoder_state(expected):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    classifier = (model.pretrained_cfg or {}).get("classifier") or ()
    for prefix in (classifier,) if isinstance(classifier, str) else classifier:
        for suffix in ("weight", "bias"):
            if f"{prefix}.{suffix}" not in expected:
                state.pop(f"{prefix}.{suffix}", None)
    _adapt_input_convs(model, state, expected)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(k for k in set(state) & set(expected)
                       if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or misshaped:
        problems = [f"{label} {keys[:5]}{' ...' if len(keys) > 5 else ''} ({len(keys)})"
                    for label, keys in (("missing", missing), ("unexpected", unexpected),
                                        ("of another shape", misshaped)) if keys]
        raise ValueError(
            f"pretrained_path={str(path)!r} does not fit the timm model "
            f"{type(model).__name__}: keys " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def _is_encoder_state(state: Mapping[str, Any]) -> bool:
    """Keys of a whole encoder: ``backbone.*`` (and ``head.*``)."""
    return bool(state) and all(k.startswith(("backbone.", "head.")) for k in state)


def _check_timm_name(name: str) -> None:
    import timm

    architecture = name.split(".", 1)[0]
    if name.startswith(("hf-hub:", "hf_hub:", "local-dir:")) or timm.is_model(architecture):
        return
    close = difflib.get_close_matches(architecture, timm.list_models(), n=10, cutoff=0.6)
    close = close or timm.list_models(f"*{architecture[:5]}*")[:20]
    hint = f"; close names: {close}" if close else "; see timm.list_models()"
    raise ValueError(f"model.name={name!r} is not a timm model{hint}")


class HFTextEncoder(_PretrainedEncoder):
    """A Hugging Face ``transformers`` encoder with mean or CLS pooling, then a projection.

    ``forward`` takes the tokenizer's batch, a dict ``{input_ids, attention_mask, ...}``
    of ``(B, L)`` tensors (make one with :meth:`tokenize`, or let the DataModule's collate
    use ``.tokenizer``), and returns ``(B, embedding_size)``. Mean pooling averages the
    last hidden states over the attention mask, as sentence-transformers' ``Pooling``
    does: with ``pooling="mean"`` and ``normalize=True``, a sentence-transformers
    checkpoint such as all-MiniLM-L6-v2 gives the embeddings of
    ``SentenceTransformer(name).encode(...)``.

    Args:
        name: a hub id (``sentence-transformers/all-MiniLM-L6-v2``) or a local folder
            (offline: set ``HF_HUB_OFFLINE=1`` and give the folder).
        pooling: ``mean`` (over the attention mask) or ``cls`` (the first token's state).
        max_length: longest tokenised input; longer texts are truncated.
        embedding_size: size of the linear projection; None keeps the hidden size.
        normalize: L2-normalise the embeddings.

    Raises:
        ValueError: an unknown ``pooling``, a ``max_length`` below 1.
        OSError: ``name`` is neither a local folder nor a reachable hub model.
    """

    def __init__(
        self,
        name: str = "sentence-transformers/all-MiniLM-L6-v2",
        pooling: str = "mean",
        max_length: int = 128,
        embedding_size: int | None = None,
        normalize: bool = True,
    ):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name)
            self.backbone = AutoModel.from_pretrained(name)
        except OSError as error:
            raise OSError(
                f"model.name={name!r}: cannot load a transformers model from it ({error}). "
                "Offline, give a local folder holding config.json, the weights and the "
                "tokenizer files."
            ) from error
        # transformers hands the model over in eval mode; a new nn.Module trains (dropout on)
        self.backbone.train()
        self.name, self.pooling, self.max_length = name, pooling, max_length
        self._make_head(self.backbone.config.hidden_size, embedding_size, normalize)

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """The batch ``forward`` takes: padded to the longest text, truncated at
        ``max_length``."""
        return dict(self.tokenizer(list(texts), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt"))

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise ValueError(
                "HFTextEncoder takes the tokenizer's dict {input_ids, attention_mask, ...}, "
                f"got {type(batch).__name__}; tokenize texts with encoder.tokenize(texts)")
        inputs = {k: v for k, v in batch.items() if k in self.tokenizer.model_input_names}
        hidden = self.backbone(**inputs).last_hidden_state
        if self.pooling == "cls":
            return self._finish(hidden[:, 0])
        mask = inputs.get("attention_mask")
        if mask is None:
            return self._finish(hidden.mean(1))
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return self._finish(pooled)
