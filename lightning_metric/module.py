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

from .losses.base import BaseMetricLoss

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]
CLIP_ALGORITHMS = ("norm", "value")
SCHEDULER_INTERVALS = ("epoch", "step")


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
        self.automatic_optimization = False
        self.encoder, self.loss, self.miner = encoder, loss, _hand_to_loss(miner, loss)
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=1e-3)
        self.loss_optimizer_factory = loss_optimizer
        self.scheduler_factories = (scheduler, loss_scheduler)
        self.scheduler_interval = scheduler_interval
        self.gradient_clip_val = gradient_clip_val or 0.0
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.accumulate_grad_batches = accumulate_grad_batches
        self._eval_losses: list[Tensor] = []

    @property
    def has_loss_optimizer(self) -> bool:
        return any(p.requires_grad for p in self.loss.parameters())

    def forward(self, inputs: Tensor) -> Tensor:
        """Embeddings ``(B, embedding_size)`` of a batch of inputs."""
        return self.encoder(inputs)

    # -- optimizers ---------------------------------------------------------------------
    def configure_optimizers(self):
        optimizers = [self.optimizer_factory(self.encoder.parameters())]
        if self.has_loss_optimizer:
            factory = self.loss_optimizer_factory or self._same_kind_as(optimizers[0])
            optimizers.append(factory(self.loss.parameters()))
        schedulers = [
            {"scheduler": make(opt), "interval": self.scheduler_interval}
            for make, opt in zip(self.scheduler_factories, optimizers, strict=False)
            if make is not None
        ]
        return optimizers, schedulers

    @staticmethod
    def _same_kind_as(optimizer: torch.optim.Optimizer) -> OptimizerFactory:
        options = {k: v for k, v in optimizer.defaults.items() if k != "params"}
        return partial(type(optimizer), **options)

    # -- training -------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, labels = batch
        embeddings = self(inputs)
        indices_tuple = None if self.miner is None else self.miner(embeddings, labels)
        loss = self.loss(embeddings, labels, indices_tuple)
        self._stop_if_not_finite(loss, batch_idx)
        self.manual_backward(loss / self.accumulate_grad_batches)
        if self._is_step_batch(batch_idx):
            self._step_optimizers()
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=True,
                 batch_size=len(labels))
        return loss.detach()

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

    def _eval_step(self, batch: tuple[Tensor, ...]) -> dict[str, Tensor]:
        """Embeds the batch; callbacks (plots, metrics) receive the returned embeddings
        (with the items' dataset indices, when the batch carries them: exact under DDP)."""
        outputs = self._embedded(batch)
        if self._loss_knows(outputs["labels"]):
            with buffers_restored(self.loss):
                loss = self.loss(outputs["embeddings"], outputs["labels"])
                self._eval_losses.append(loss.detach().float())
        return outputs

    def _loss_knows(self, labels: Tensor) -> bool:
        """False where the labels are not the loss's classes (class-disjoint evaluation)."""
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
