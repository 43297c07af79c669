"""The base of the callbacks that read what the validation and test steps return."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

VAL, TEST = "val", "test"


class EvalOutputsCallback(pl.Callback):
    """Routes every validation / test batch's step outputs to :meth:`collect` and each
    stage's end to :meth:`finish`, with the stage name (``"val"`` or ``"test"``).

    Subclasses (:class:`~lightning_metric.callbacks.RetrievalMetrics`,
    :class:`~lightning_metric.callbacks.SimilarityCorrelation`,
    :class:`~lightning_metric.zero_shot.ZeroShotAccuracy`,
    :class:`~lightning_metric.classification.ClassificationAccuracy`) write the two
    methods; Lightning's four hooks stay here.
    """

    def collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                batch: Any, stage: str) -> None:
        raise NotImplementedError

    def finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        raise NotImplementedError

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx=0) -> None:
        self.collect(trainer, pl_module, outputs, batch, VAL)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                          dataloader_idx=0) -> None:
        self.collect(trainer, pl_module, outputs, batch, TEST)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.finish(trainer, pl_module, VAL)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self.finish(trainer, pl_module, TEST)
