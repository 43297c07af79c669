"""Lightning callbacks of the recipes."""

from __future__ import annotations

import time

import pytorch_lightning as pl


class ThroughputMonitor(pl.Callback):
    """Logs ``train/samples_per_second``: training items of an epoch over its wall time.

    The time runs from the epoch's first batch to the end of its last one, so
    validation and checkpointing are not counted.
    """

    def __init__(self):
        self._start: float | None = None
        self._samples = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._samples = None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._samples += len(batch[-1])
        self._end = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start is not None and self._samples:
            rate = self._samples / max(self._end - self._start, 1e-9)
            pl_module.log("train/samples_per_second", rate, on_epoch=True)
