"""From a Hydra config to the objects of a run: data, module, trainer.

The recipes in ``recipes/`` stay thin: they call these functions, then
``trainer.fit`` / ``trainer.test``. Every check that can fail on a bad config
runs here, before training starts, and names the setting.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from .data.image_folder import folder_class_names
from .data.manifest import manifest_class_names
from .losses.registry import entry_for, resolve_sampler
from .module import FINE_TUNING_DEFAULTS, MetricLearningModule, loss_inputs_of
from .paired import PAIR_SHAPES
from .transforms import build_transforms

# Trainer settings that Lightning refuses under manual optimization: the module does them.
_MOVED_TO_MODULE = ("gradient_clip_val", "accumulate_grad_batches")


def register_resolvers() -> None:
    """Resolvers of the configs: ``${train_classes:N,protocol}`` (classes trained on),
    ``${folder_classes:root,protocol}`` / ``${manifest_classes:path,protocol}`` (the same,
    counted from an image folder's class folders or a manifest's labels, no image opened),
    ``${mul:a,b}`` and ``${wandb_offline:}``."""
    resolvers = {
        "train_classes": _train_classes,
        "folder_classes": lambda root, protocol: _train_classes(
            len(folder_class_names(root)), protocol),
        "manifest_classes": lambda path, protocol: _train_classes(
            len(manifest_class_names(path)), protocol),
        "mul": lambda a, b: int(a) * int(b),
        "wandb_offline": lambda: not os.environ.get("WANDB_API_KEY"),
    }
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def _train_classes(total: int, protocol: str) -> int:
    return int(total) // 2 if protocol == "class_disjoint" else int(total)


def resolve_device(name: str) -> torch.device:
    """The ``device`` setting of the embedding recipes (predict, synthesize): ``auto`` (a
    GPU when there is one), or any torch device name.

    Raises:
        ValueError: not a torch device name, or a CUDA device without CUDA.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device={name!r} is not a torch device (auto, cpu, cuda, cuda:1 "
                         "...)") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}, but no CUDA device is available: use device=cpu")
    return device


def sampler_for(loss: nn.Module, requested: str) -> str:
    """``class`` or ``random`` for this loss (outside the registry, ``auto`` means ``class``);
    for a loss on paired fields, the request itself (the pairs data module resolves it)."""
    entry = entry_for(loss)
    if entry is None:
        return "class" if requested == "auto" else requested
    return resolve_sampler(requested, entry.name)


def build_encoder(cfg: DictConfig) -> nn.Module:
    """``model.encoder``, instantiated."""
    return hydra.utils.instantiate(cfg.model.encoder)


def _loss_needs_embedding_size(cfg: DictConfig) -> bool:
    """The loss takes ``embedding_size`` and the config leaves it null (the backbone's)."""
    return "embedding_size" in cfg.loss and cfg.loss.embedding_size is None


def build_loss(cfg: DictConfig, encoder: nn.Module | None = None) -> nn.Module:
    """``loss`` (with ``miner``); a null ``embedding_size`` (``model.embedding_size=null``:
    the backbone's feature size) is taken from ``encoder.embedding_size`` (an encoder is
    built from ``model.encoder`` for it when none is given).

    Raises:
        ValueError: ``embedding_size`` is null and the encoder does not say its size.
    """
    options = {}
    if cfg.get("miner"):
        options["miner"] = hydra.utils.instantiate(cfg.miner)
    if _loss_needs_embedding_size(cfg):
        encoder = build_encoder(cfg) if encoder is None else encoder
        size = getattr(encoder, "embedding_size", None)
        if size is None:
            raise ValueError(
                f"loss.embedding_size is null (model.embedding_size=null) and "
                f"{type(encoder).__name__} has no embedding_size attribute: set it")
        options["embedding_size"] = int(size)
    return hydra.utils.instantiate(cfg.loss, **options)


def _needs_encoder(cfg: DictConfig) -> bool:
    """The data module takes something from the encoder: transforms or a tokenizer."""
    return cfg.get("transform") is not None or "max_length" in cfg.model


def data_inputs(cfg: DictConfig, encoder: nn.Module) -> dict[str, Any]:
    """What the data module gets from the encoder: ``train_transform``/``eval_transform``
    (when ``cfg.transform`` is set and the encoder reads images, sized by its pretrained
    config: an encoder with a tokenizer reads only texts unless it says ``reads_images``),
    and ``tokenizer``/``max_length`` (when the encoder has a ``.tokenizer``)."""
    inputs: dict[str, Any] = {}
    tokenizer = getattr(encoder, "tokenizer", None)
    reads_images = getattr(encoder, "reads_images", tokenizer is None)  # two towers: both
    if cfg.get("transform") is not None and reads_images:
        settings = OmegaConf.to_container(cfg.transform, resolve=True)
        inputs["train_transform"], inputs["eval_transform"] = build_transforms(settings, encoder)
    if tokenizer is not None:
        inputs["tokenizer"] = tokenizer
        inputs["max_length"] = cfg.model.get("max_length", getattr(encoder, "max_length", 128))
    return inputs


def build_datamodule(cfg: DictConfig, loss: nn.Module,
                     encoder: nn.Module | None = None) -> pl.LightningDataModule:
    """``data``, with the sampler the loss needs and what it takes from the encoder
    (:func:`data_inputs`). Without ``encoder``, one is built from ``model.encoder`` when
    ``transform`` is set or the model has a ``max_length`` (text); pass the run's own to
    avoid building it twice."""
    sampler = sampler_for(loss, cfg.sampler.name)
    if encoder is None and _needs_encoder(cfg):
        encoder = build_encoder(cfg)
    inputs = data_inputs(cfg, encoder) if encoder is not None else {}
    datamodule = hydra.utils.instantiate(cfg.data, sampler=sampler, **inputs)
    check_batch_shape(loss, datamodule)
    check_classes(loss, datamodule)
    return datamodule


def check_batch_shape(loss: nn.Module, datamodule: pl.LightningDataModule) -> None:
    """The data gives the batches the loss takes: paired fields (``data=pairs``, whose
    ``shapes`` say which) for a pair loss, ``(x, label)`` items for the others.

    Raises:
        ValueError: naming the loss, what it takes and what the data gives.
    """
    takes = loss_inputs_of(loss)
    gives = getattr(datamodule, "shapes", None)  # None: (x, label) items
    name = type(loss).__name__
    if gives is None and takes in PAIR_SHAPES:
        raise ValueError(f"{name} takes batches of paired fields ({takes}), but "
                         f"{type(datamodule).__name__} gives (x, label) items: use data=pairs")
    if gives is not None and takes not in gives:
        raise ValueError(f"{name} takes {takes!r} batches, but data=pairs with these fields "
                         f"and target gives {list(gives)}: choose a loss for them "
                         "(pair: mnrl; pair_score: cosine_similarity; pair_target: "
                         "cosine_embedding; triplet: margin_ranking, mnrl; triplet_margin: "
                         "margin_mse; image_text: clip) or change data.fields / data.target")


def check_classes(loss: nn.Module, datamodule: pl.LightningDataModule) -> None:
    """A loss with class weights must have room for every training class."""
    num_classes = getattr(loss, "num_classes", None)
    if num_classes is not None and num_classes < datamodule.num_classes:
        raise ValueError(
            f"loss.num_classes={num_classes} is smaller than the {datamodule.num_classes} "
            "training classes of the data: leave it at ${data.num_classes}"
        )


def build_module(cfg: DictConfig, loss: nn.Module,
                 encoder: nn.Module | None = None) -> MetricLearningModule:
    """The module: ``encoder`` (built from ``model.encoder`` when None), the loss, the
    optimizers and schedulers, and the ``model`` settings (absent fine-tuning keys: off)."""
    encoder = build_encoder(cfg) if encoder is None else encoder
    loss_optimizer = None
    if cfg.loss_optimizer.get("_target_"):
        loss_optimizer = hydra.utils.instantiate(cfg.loss_optimizer)
    scheduler = hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    trainer_cfg = cfg.trainer
    return MetricLearningModule(
        encoder=encoder,
        loss=loss,
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        loss_optimizer=loss_optimizer,
        scheduler=scheduler,
        loss_scheduler=scheduler,
        scheduler_interval=cfg.model.scheduler_interval,
        gradient_clip_val=_one_setting(cfg.model, trainer_cfg, "gradient_clip_val", None),
        gradient_clip_algorithm=cfg.model.gradient_clip_algorithm,
        accumulate_grad_batches=_one_setting(cfg.model, trainer_cfg, "accumulate_grad_batches", 1),
        **{key: cfg.model.get(key, default) for key, default in FINE_TUNING_DEFAULTS.items()},
    )


def _one_setting(model_cfg: DictConfig, trainer_cfg: DictConfig, key: str, default):
    """``key`` from ``model`` or ``trainer`` (set in one place, or the same in both)."""
    in_model, in_trainer = model_cfg.get(key, default), trainer_cfg.get(key, default)
    if in_model != default and in_trainer != default and in_model != in_trainer:
        raise ValueError(
            f"model.{key}={in_model} and trainer.{key}={in_trainer} disagree: set one of them"
        )
    return in_model if in_model != default else in_trainer


def check_trainer_length(trainer_cfg: DictConfig) -> None:
    """A run must end: ``max_epochs=-1`` (Lightning's "forever") needs a step or time limit.

    Raises:
        ValueError: ``trainer.max_epochs`` below 1 (other than -1 with a limit), or -1 with
            neither ``trainer.max_steps`` nor ``trainer.max_time``.
    """
    max_epochs = trainer_cfg.get("max_epochs")
    if max_epochs is None or max_epochs >= 1:
        return
    bounded = (trainer_cfg.get("max_steps") or -1) > 0 or trainer_cfg.get("max_time")
    if max_epochs == -1 and bounded:
        return
    raise ValueError(
        f"trainer.max_epochs={max_epochs}: a run needs at least 1 epoch"
        + (" (-1 trains forever unless trainer.max_steps or trainer.max_time is set)"
           if max_epochs == -1 else "")
    )


def build_trainer(cfg: DictConfig) -> pl.Trainer:
    check_trainer_length(cfg.trainer)
    trainer_kwargs = {k: v for k, v in cfg.trainer.items() if k not in _MOVED_TO_MODULE}
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    if not cfg.get("test", True):  # no test stage: no test-time pictures, no worker for them
        for callback in callbacks:
            if getattr(callback, "on_test", None) is True:
                callback.on_test = False
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values()]
    return hydra.utils.instantiate(
        OmegaConf.create(trainer_kwargs), callbacks=callbacks, logger=loggers or False
    )


def build_run(cfg: DictConfig) -> tuple[pl.LightningDataModule, MetricLearningModule, pl.Trainer]:
    """Seed, then the data, the module (with its loss and encoder) and the trainer of a run.

    One encoder serves the data module (transforms, tokenizer) and the module. It is
    built after the loss, as before encoders fed the data (same seed, same initial
    weights), unless the loss needs its ``embedding_size``.
    """
    pl.seed_everything(cfg.seed, workers=True)
    encoder = build_encoder(cfg) if _loss_needs_embedding_size(cfg) else None
    loss = build_loss(cfg, encoder)
    encoder = build_encoder(cfg) if encoder is None else encoder
    datamodule = build_datamodule(cfg, loss, encoder)
    return datamodule, build_module(cfg, loss, encoder), build_trainer(cfg)


def write_metrics(path: Path, metrics: dict[str, float]) -> None:
    """``metrics.json``: flat ``stage/name`` keys with float values."""
    path.write_text(json.dumps(dict(sorted(metrics.items())), indent=2) + "\n")


def write_checkpoint_record(path: Path, checkpoint: ModelCheckpoint | None, run_dir: Path) -> None:
    """``checkpoint.json``: the tested checkpoint (relative to ``run_dir`` when inside it),
    its monitored metric and score; ``path`` null when the last weights were tested."""
    record = {"path": None, "monitor": None, "score": None}
    if checkpoint is not None:
        best = Path(checkpoint.best_model_path)
        record = {
            "path": str(best.relative_to(run_dir) if best.is_relative_to(run_dir) else best),
            "monitor": checkpoint.monitor,
            "score": float(checkpoint.best_model_score),
        }
    path.write_text(json.dumps(record, indent=2) + "\n")


def scalar_metrics(trainer: pl.Trainer, prefix: str) -> dict[str, float]:
    return {
        key: float(value) for key, value in trainer.callback_metrics.items()
        if key.startswith(prefix)
    }


SUMMARY_METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r", "recall_at_4",
                   "spearman", "pearson", "zero_shot_accuracy")


def test_summary(metrics: dict[str, float], checkpoint: ModelCheckpoint | None,
                 run_dir: Path) -> str:
    """Two lines for the end of a run: which weights were tested, and their main test metrics.

    ``checkpoint``: the callback whose best checkpoint was tested (None: the last weights).
    """
    if checkpoint is None:
        chosen = "the last weights"
    else:
        path = Path(checkpoint.best_model_path)
        shown = path.relative_to(run_dir) if path.is_relative_to(run_dir) else path
        chosen = f"{shown} (best {checkpoint.monitor} = {float(checkpoint.best_model_score):.4f})"
    values = "  ".join(
        f"{name} {metrics[f'test/{name}']:.4f}" for name in SUMMARY_METRICS
        if f"test/{name}" in metrics
    )
    return f"Tested {chosen}:\n  {values}"
