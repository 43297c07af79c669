"""The LightningModule: an encoder, a loss (+ a miner) and, for learnable losses, a loss optimizer.

Losses with parameters of their own (ArcFace's class centres, proxies,
MarginLoss's learnable beta) need a second optimizer. The module always
trains with Lightning's manual optimization, so the one code path steps one
or two optimizers alike, and owns what Lightning cannot do for it there:
gradient clipping (``gradient_clip_val``, ``gradient_clip_algorithm``) and
gradient accumulation (``accumulate_grad_batches``: both optimizers step
every N batches). Set those on the module, not the Trainer
(``recipes.train`` moves them for you). A step counts once per batch (per
accumulated group of batches) whatever the number of optimizers:
``trainer.global_step``, ``max_steps``, ``log_every_n_steps`` and
``ModelCheckpoint(every_n_train_steps=...)`` count the encoder's optimizer
steps, not the loss optimizer's too. Evaluation never changes training state:
the loss that gives ``val/loss`` / ``test/loss`` runs in eval mode, and every
buffer it holds (a memory bank's queue, running statistics) is restored
afterwards. Mixed precision, checkpoints (both
optimizers' and schedulers' states, the loss's parameters) and loggers are
Lightning's as usual. Retrieval metrics and embedding plots come from the
callbacks (:class:`~lightning_metric.callbacks.RetrievalMetrics`,
:class:`~lightning_metric.callbacks.EmbeddingPlot`), which read the embeddings
``validation_step`` / ``test_step`` return.

Batches and losses. ``(x, label)`` batches feed a labelled loss (with the miner);
a two-view loss (``VICRegLoss``, ``SelfSupervisedLoss``: ``data.views=2`` batches, the
views of an item next to each other) gets the first and the second views as
``(embeddings, ref_emb)``; an embeddings-only loss (``ManifoldLoss``) the embeddings.
A batch of paired fields (:mod:`lightning_metric.paired`: query-document, scored pairs,
triplets, image-text) is embedded field by field and the loss called with the fields,
then the target; its evaluation batches give ``{"similarity", "target"}`` for
:class:`~lightning_metric.callbacks.SimilarityCorrelation` (or retrieval items). The
registry says which a loss takes; a loss outside it may say so in ``loss_inputs``.

Fine-tuning a pretrained encoder (one with a ``.backbone``, as
:class:`~lightning_metric.backbones.TimmEncoder` has): ``freeze_backbone_epochs``
trains only the head for the first epochs, ``backbone_lr_multiplier`` gives the
backbone a smaller learning rate, ``freeze_batchnorm`` keeps its BatchNorm statistics.

Example::

    >>> module = MetricLearningModule(SmallCNN(64), losses.ArcFaceLoss(10, 64))
    >>> pl.Trainer(max_epochs=3, precision="bf16-mixed").fit(module, datamodule)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from .backbones import batchnorm_eval
from .losses.base import BaseMetricLoss
from .losses.registry import EMBEDDINGS_ONLY, LABELLED, TWO_VIEWS, entry_for
from .paired import (
    PAIR_SHAPES,
    check_paired_batch,
    embed_fields,
    is_paired,
    loss_arguments,
    paired_batch_size,
    predicted_similarity,
)

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]
CLIP_ALGORITHMS = ("norm", "value")
SCHEDULER_INTERVALS = ("epoch", "step")
FINE_TUNING_DEFAULTS = {"freeze_backbone_epochs": 0, "backbone_lr_multiplier": 1.0,
                        "freeze_batchnorm": False}


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


class MetricLearningModule(pl.LightningModule):
    """Train ``encoder`` so that ``loss`` on its embeddings goes down.

    Args:
        encoder: maps a batch of inputs to embeddings ``(B, embedding_size)``.
        loss: ``loss(embeddings, labels, indices_tuple=None) -> scalar``; its own parameters,
            if any, are stepped by ``loss_optimizer``.
        miner: optional ``miner(embeddings, labels) -> indices_tuple`` for the loss. One of
            our labelled losses takes it as its own ``miner`` (so that under DDP it mines
            this rank's items against every rank's batch); for other losses it is called
            first and its tuples are passed on. A loss that has a miner already raises.
        optimizer: ``params -> Optimizer`` for the encoder (a Hydra ``_partial_``);
            default Adam(lr=1e-3).
        loss_optimizer: the same for the loss's parameters; default: the encoder
            optimizer's type and options.
        scheduler, loss_scheduler: optional ``optimizer -> LRScheduler`` for each optimizer.
        scheduler_interval: step the schedulers every ``epoch`` or every optimizer ``step``.
        gradient_clip_val: clip gradients of both optimizers to this (0 or None: off).
        gradient_clip_algorithm: ``norm`` or ``value``.
        accumulate_grad_batches: step the optimizers every this many batches.
        freeze_backbone_epochs: for this many epochs, train only the rest of the encoder
            (its head): ``encoder.backbone``'s parameters and buffers stay bit for bit as
            they are, the backbone in eval mode (no dropout, BatchNorm statistics kept).
            Its gradients are still computed, then dropped before the step, so DDP without
            ``find_unused_parameters`` works; the cost is a full backward pass.
        backbone_lr_multiplier: ``encoder.backbone`` gets its own optimizer param group
            (``name="backbone"``, after the rest's ``name="head"``) with the optimizer's
            learning rate times this; 1: one group for the whole encoder.
        freeze_batchnorm: keep the BatchNorm layers of ``encoder.backbone`` in eval mode
            while training (running statistics unchanged; their weights still train).

    The three fine-tuning settings need an encoder with a ``.backbone`` (the pretrained
    part), as :class:`~lightning_metric.backbones.TimmEncoder` and
    :class:`~lightning_metric.backbones.HFTextEncoder` have.

    Raises:
        ValueError: a bad setting, naming it; a fine-tuning setting for an encoder
            without ``.backbone``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        loss: nn.Module,
        miner: nn.Module | None = None,
        optimizer: OptimizerFactory | None = None,
        loss_optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        loss_scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        accumulate_grad_batches: int = 1,
        freeze_backbone_epochs: int = 0,
        backbone_lr_multiplier: float = 1.0,
        freeze_batchnorm: bool = False,
    ):
        super().__init__()
        if gradient_clip_algorithm not in CLIP_ALGORITHMS:
            raise ValueError(
                f"gradient_clip_algorithm must be one of {list(CLIP_ALGORITHMS)}, got "
                f"{gradient_clip_algorithm!r}"
            )
        if scheduler_interval not in SCHEDULER_INTERVALS:
            raise ValueError(
                f"scheduler_interval must be one of {list(SCHEDULER_INTERVALS)}, got "
                f"{scheduler_interval!r}"
            )
        if accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        _check_fine_tuning(encoder, freeze_backbone_epochs, backbone_lr_multiplier,
                           freeze_batchnorm)
        self.automatic_optimization = False
        self.loss_inputs = _loss_inputs(loss, miner)
        self.encoder, self.loss, self.miner = encoder, loss, _hand_to_loss(miner, loss)
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=1e-3)
        self.loss_optimizer_factory = loss_optimizer
        self.scheduler_factories = (scheduler, loss_scheduler)
        self.scheduler_interval = scheduler_interval
        self.gradient_clip_val = gradient_clip_val or 0.0
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.accumulate_grad_batches = accumulate_grad_batches
        self.freeze_backbone_epochs = freeze_backbone_epochs
        self.backbone_lr_multiplier = backbone_lr_multiplier
        self.freeze_batchnorm = freeze_batchnorm
        self._eval_losses: list[Tensor] = []
        self._epoch_loss: Tensor | None = None   # sum of item losses of this training epoch
        self._epoch_items = 0

    @property
    def has_loss_optimizer(self) -> bool:
        return any(p.requires_grad for p in self.loss.parameters())

    def forward(self, inputs: Tensor) -> Tensor:
        """Embeddings ``(B, embedding_size)`` of a batch of inputs."""
        return self.encoder(inputs)

    # -- optimizers ---------------------------------------------------------------------
    def configure_optimizers(self):
        optimizers = [self._encoder_optimizer()]
        if self.has_loss_optimizer:
            factory = self.loss_optimizer_factory or self._same_kind_as(optimizers[0])
            optimizers.append(factory(self.loss.parameters()))
        schedulers = [
            {"scheduler": make(opt), "interval": self.scheduler_interval}
            for make, opt in zip(self.scheduler_factories, optimizers, strict=False)
            if make is not None
        ]
        return optimizers, schedulers

    def _encoder_optimizer(self) -> torch.optim.Optimizer:
        """One param group, or ``head`` + ``backbone`` groups with the backbone's lr scaled."""
        if self.backbone_lr_multiplier == 1:
            return self.optimizer_factory(self.encoder.parameters())
        backbone = {id(p) for p in self.encoder.backbone.parameters()}
        head = [p for p in self.encoder.parameters() if id(p) not in backbone]
        optimizer = self.optimizer_factory([
            {"params": head, "name": "head"},
            {"params": list(self.encoder.backbone.parameters()), "name": "backbone"},
        ])
        base_lr = optimizer.defaults.get("lr")
        if not isinstance(base_lr, int | float):
            raise ValueError(
                f"backbone_lr_multiplier={self.backbone_lr_multiplier} needs an optimizer "
                f"with a numeric lr; {type(optimizer).__name__} has lr={base_lr!r}")
        optimizer.param_groups[1]["lr"] = base_lr * self.backbone_lr_multiplier
        return optimizer

    # -- fine-tuning: the backbone's modes -----------------------------------------------
    @property
    def backbone_frozen(self) -> bool:
        """True during the first ``freeze_backbone_epochs`` epochs."""
        return self.current_epoch < self.freeze_backbone_epochs

    def train(self, mode: bool = True) -> MetricLearningModule:
        super().train(mode)
        if mode:
            self._set_backbone_modes()
        return self

    def _set_backbone_modes(self) -> None:
        """Frozen backbone: all in eval mode; else, with ``freeze_batchnorm``, its BatchNorm."""
        if not hasattr(getattr(self, "encoder", None), "backbone"):
            return
        if self.freeze_backbone_epochs and self.backbone_frozen:
            self.encoder.backbone.eval()
        elif self.freeze_batchnorm:
            batchnorm_eval(self.encoder.backbone)

    def on_train_epoch_start(self) -> None:
        # Lightning restores the modes of before validation; a new epoch may change them.
        fine_tuning = self.freeze_backbone_epochs or self.freeze_batchnorm
        if self.training and fine_tuning and hasattr(self.encoder, "backbone"):
            self.encoder.train()
            self._set_backbone_modes()

    @staticmethod
    def _same_kind_as(optimizer: torch.optim.Optimizer) -> OptimizerFactory:
        options = {k: v for k, v in optimizer.defaults.items() if k != "params"}
        return partial(type(optimizer), **options)

    # -- training -------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor] | dict, batch_idx: int) -> Tensor:
        if is_paired(batch):
            loss, batch_size = self._paired_loss(batch), paired_batch_size(batch)
        else:
            inputs, labels = batch
            loss, batch_size = self._training_loss(self(inputs), labels), len(labels)
        self._stop_if_not_finite(loss, batch_idx)
        self.manual_backward(loss / self.accumulate_grad_batches)
        if self._is_step_batch(batch_idx):
            self._step_optimizers()
        self._log_train_loss(loss.detach(), batch_size)
        return loss.detach()

    def _paired_loss(self, batch: dict) -> Tensor:
        """A paired loss on the embeddings of each field of the batch, then its target."""
        if self.loss_inputs not in PAIR_SHAPES:
            raise ValueError(
                f"{type(self.loss).__name__} takes (x, label) batches ({self.loss_inputs}), "
                "got a batch of paired fields: pick a loss for pairs (mnrl, cosine_similarity, "
                "margin_mse, clip, ...) or a labelled data set"
            )
        check_paired_batch(self.loss_inputs, type(self.loss).__name__, batch)
        return self.loss(*loss_arguments(embed_fields(self, batch), batch))

    def _training_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The loss called as its inputs kind needs (see :func:`_loss_inputs`)."""
        if self.loss_inputs in PAIR_SHAPES:
            raise ValueError(
                f"{type(self.loss).__name__} takes batches of paired fields "
                f"({self.loss_inputs}), got (x, label) batches: use data=pairs"
            )
        if self.loss_inputs == TWO_VIEWS:
            return self.loss(*split_views(embeddings, labels, self.loss))
        if self.loss_inputs == EMBEDDINGS_ONLY:
            return self.loss(embeddings)
        indices_tuple = None if self.miner is None else self.miner(embeddings, labels)
        return self.loss(embeddings, labels, indices_tuple)

    def _log_train_loss(self, loss: Tensor, batch_size: int) -> None:
        """``train/loss_step`` where it is read, ``train/loss_epoch`` (item mean) at epoch end.

        ``self.log`` costs about 0.8 ms a call on a CPU, close to a tenth of a small
        model's step, so the batch loss is logged only on the steps Lightning writes to
        the loggers (every ``trainer.log_every_n_steps``) and, while a progress bar shows
        it, on every step; the epoch mean is summed here and logged once an epoch.
        """
        weighted = loss.float() * batch_size
        self._epoch_loss = weighted if self._epoch_loss is None else self._epoch_loss + weighted
        self._epoch_items += batch_size
        trainer = self.trainer
        if trainer.progress_bar_callback is not None or _writes_logs_now(trainer):
            self.log("train/loss_step", loss, prog_bar=True, on_step=True, on_epoch=False,
                     batch_size=batch_size)

    def _is_step_batch(self, batch_idx: int) -> bool:
        last = batch_idx + 1 == self.trainer.num_training_batches
        return (batch_idx + 1) % self.accumulate_grad_batches == 0 or last

    def _step_optimizers(self) -> None:
        optimizers = self.optimizers()
        encoder_optimizer, *loss_optimizers = (
            optimizers if isinstance(optimizers, list) else [optimizers])
        # Each LightningOptimizer.step() counts a global step; only the encoder's may count,
        # so the loss optimizer steps through the strategy (same precision plugin, clipping
        # hook and gradient scaler, no step counted).
        if self.freeze_backbone_epochs and self.backbone_frozen:
            for parameter in self.encoder.backbone.parameters():
                parameter.grad = None  # the optimizers skip parameters without a gradient
        encoder_optimizer.step()
        for optimizer in loss_optimizers:
            self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=_no_closure,
                                                 model=self)
        for optimizer in (encoder_optimizer, *loss_optimizers):
            optimizer.zero_grad()
        if self.scheduler_interval == "step":
            self._step_schedulers()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Runs after AMP has unscaled the gradients, before the step.
        if self.gradient_clip_val > 0:
            self.clip_gradients(optimizer, self.gradient_clip_val, self.gradient_clip_algorithm)

    def on_train_epoch_end(self) -> None:
        if self._epoch_loss is not None:
            self.log("train/loss_epoch", self._epoch_loss / self._epoch_items, prog_bar=True,
                     on_step=False, on_epoch=True, sync_dist=True)
        self._epoch_loss, self._epoch_items = None, 0
        if self.scheduler_interval == "epoch":
            self._step_schedulers()

    def _step_schedulers(self) -> None:
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            scheduler.step()

    def _stop_if_not_finite(self, loss: Tensor, batch_idx: int) -> None:
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the loss is {loss.item()} at epoch {self.current_epoch}, batch {batch_idx} "
                f"(global step {self.global_step}); training stopped instead of going on with NaN. "
                "Try a lower learning rate, gradient clipping (model.gradient_clip_val), "
                "precision=32, or check the inputs for NaN."
            )

    # -- evaluation ----------------------------------------------------------------------------
    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch)

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch)

    def predict_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> dict[str, Tensor]:
        """``{"embeddings", "labels"[, "indices"]}`` of a batch, without the loss."""
        return self._embedded(batch)

    def _embedded(self, batch: tuple[Tensor, ...]) -> dict[str, Tensor]:
        """A ``(x, label)`` or ``(x, label, dataset index)`` batch, embedded."""
        inputs, labels, *rest = batch
        outputs = {"embeddings": self(inputs).float(), "labels": labels}
        if rest:
            outputs["indices"] = rest[0]
        return outputs

    def _eval_step(self, batch: tuple[Tensor, ...] | dict) -> dict[str, Tensor]:
        """Embeds the batch; callbacks (plots, metrics) receive the returned embeddings
        (with the items' dataset indices, when the batch carries them: exact under DDP).
        A paired batch with a target gives ``{"similarity", "target"}`` instead (see
        :meth:`_paired_eval_step`)."""
        if is_paired(batch):
            return self._paired_eval_step(batch)
        outputs = self._embedded(batch)
        if self._loss_knows(outputs["labels"]):
            with buffers_restored(self.loss):
                loss = self.loss(outputs["embeddings"], outputs["labels"])
                self._eval_losses.append(loss.detach().float())
        return outputs

    def _paired_eval_step(self, batch: dict) -> dict[str, Tensor]:
        """``{"similarity": (B,), "target": (B,)}`` of a paired batch with a target (for
        :class:`~lightning_metric.callbacks.SimilarityCorrelation`); its loss joins
        ``<stage>/loss`` when the loss takes such batches."""
        if batch.get("target") is None:
            raise ValueError(
                "evaluation batches of paired fields need a target (a score to correlate "
                "with); pairs without one are evaluated as query/gallery retrieval items")
        embeddings = embed_fields(self, batch)
        if self.loss_inputs in PAIR_SHAPES:
            check_paired_batch(self.loss_inputs, type(self.loss).__name__, batch)
            with buffers_restored(self.loss):
                loss = self.loss(*loss_arguments(embeddings, batch))
                self._eval_losses.append(loss.detach().float())
        return {"similarity": predicted_similarity(embeddings), "target": batch["target"]}

    def _loss_knows(self, labels: Tensor) -> bool:
        """False where the labels are not the loss's classes (class-disjoint evaluation) or
        the loss takes no labels (two views, embeddings alone)."""
        if self.loss_inputs != LABELLED:
            return False
        num_classes = getattr(self.loss, "num_classes", None)
        return num_classes is None or int(labels.max()) < num_classes

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, stage: str) -> None:
        if self._eval_losses:
            value = torch.stack(self._eval_losses).mean()
            self.log(f"{stage}/loss", value, prog_bar=stage == "val", sync_dist=True)
        self._eval_losses.clear()


def loss_inputs_of(loss: nn.Module) -> str:
    """What ``loss`` is called with: the registry's ``inputs``; for a loss outside the
    registry its ``loss_inputs`` attribute (``"two_views"``, ``"embeddings"``, a pair
    shape), else ``labelled``.

    Raises:
        ValueError: an unknown ``loss_inputs``.
    """
    entry = entry_for(loss)
    inputs = getattr(loss, "loss_inputs", LABELLED) if entry is None else entry.inputs
    known = (LABELLED, TWO_VIEWS, EMBEDDINGS_ONLY, *PAIR_SHAPES)
    if inputs not in known:
        raise ValueError(
            f"{type(loss).__name__}.loss_inputs={inputs!r}: expected one of {list(known)}")
    return inputs


def _loss_inputs(loss: nn.Module, miner: nn.Module | None) -> str:
    """:func:`loss_inputs_of`, refusing a miner for a loss that takes no labels.

    Raises:
        ValueError: an unknown ``loss_inputs``, or a miner with a loss that takes no labels.
    """
    inputs = loss_inputs_of(loss)
    if miner is not None and inputs != LABELLED:
        raise ValueError(
            f"{type(loss).__name__} takes no labels ({inputs}), so a miner has nothing to "
            "mine: drop the miner"
        )
    return inputs


def split_views(embeddings: Tensor, instances: Tensor, loss: nn.Module) -> tuple[Tensor, Tensor]:
    """``(B * 2, D)`` embeddings of two views an item, next to each other (``data.views=2``)
    -> the first and the second views, ``(B, D)`` each.

    Raises:
        ValueError: the batch is not pairs of views of one instance (``instances[0::2]``
            differs from ``instances[1::2]``): the data was not built with ``data.views=2``.
    """
    pairs = len(instances) % 2 == 0 and torch.equal(instances[0::2], instances[1::2])
    if not pairs:
        raise ValueError(
            f"{type(loss).__name__} takes two views of each item: train it on data.views=2 "
            f"batches (views of an item next to each other), got labels {instances[:8].tolist()}"
            f"{'...' if len(instances) > 8 else ''}"
        )
    return embeddings[0::2], embeddings[1::2]


def _hand_to_loss(miner: nn.Module | None, loss: nn.Module) -> nn.Module | None:
    """The miner the module calls itself: None when the loss takes it as its own."""
    if miner is None or not isinstance(loss, BaseMetricLoss):
        return miner
    if loss.miner is not None:
        raise ValueError(
            f"the module and its {type(loss).__name__} both have a miner: give it to one of them"
        )
    loss.miner = miner
    return None


def _check_fine_tuning(encoder: nn.Module, freeze_backbone_epochs: int,
                       backbone_lr_multiplier: float, freeze_batchnorm: bool) -> None:
    if freeze_backbone_epochs < 0:
        raise ValueError(f"freeze_backbone_epochs must be >= 0, got {freeze_backbone_epochs}")
    if not backbone_lr_multiplier > 0:
        raise ValueError(f"backbone_lr_multiplier must be > 0, got {backbone_lr_multiplier}")
    given = {"freeze_backbone_epochs": freeze_backbone_epochs,
             "backbone_lr_multiplier": backbone_lr_multiplier,
             "freeze_batchnorm": freeze_batchnorm}
    asked = {k: v for k, v in given.items() if v != FINE_TUNING_DEFAULTS[k]}
    if asked and not isinstance(getattr(encoder, "backbone", None), nn.Module):
        settings = ", ".join(f"{k}={v}" for k, v in asked.items())
        raise ValueError(
            f"{settings} needs an encoder with a .backbone (its pretrained part, as "
            f"TimmEncoder and HFTextEncoder have); {type(encoder).__name__} has none")


def _writes_logs_now(trainer: pl.Trainer) -> bool:
    """Whether Lightning sends this training step's logged values to the loggers."""
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


def _no_closure() -> None:
    """The closure of a manual-optimization step: the backward pass has already run."""
    return None


@contextmanager
def buffers_restored(module: nn.Module) -> Iterator[None]:
    """Run a block, then put every buffer of ``module`` back bit for bit.

    Guards evaluation against losses that keep state in buffers (a memory bank's queue
    and its index, running statistics): whatever the block writes into them, in place
    or by assigning a new tensor, is undone.
    """
    saved = [
        (owner, name, buffer.detach().clone())
        for owner in module.modules()
        for name, buffer in owner._buffers.items()
        if buffer is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for owner, name, copy in saved:
                current = owner._buffers.get(name)
                if current is not None and current.shape == copy.shape and (
                        current.dtype == copy.dtype):
                    current.copy_(copy)
                else:
                    owner._buffers[name] = copy
