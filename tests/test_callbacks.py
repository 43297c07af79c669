"""Callbacks: the logged retrieval metrics equal a direct call; plots land in the run folder."""

import time

import numpy
import pytest
import pytorch_lightning as pl

from lightning_metric import losses
from lightning_metric.callbacks import EmbeddingPlot, RetrievalMetrics, ThroughputMonitor
from lightning_metric.data import DigitsDataModule
from lightning_metric.encoders import MLP
from lightning_metric.evaluation import retrieval_metrics
from lightning_metric.export import embed
from lightning_metric.module import MetricLearningModule
from lightning_metric.plot_worker import shared_worker


@pytest.fixture(scope="module")
def digits():
    data = DigitsDataModule(batch_size=32, m_per_class=4, sampler="class", eval_batch_size=100)
    data.setup()
    return data


def test_logged_metrics_equal_a_direct_call(digits, tmp_path):
    pl.seed_everything(0)
    module = MetricLearningModule(MLP(64, 16), losses.TripletMarginLoss(margin=0.2))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, default_root_dir=tmp_path,
                         enable_checkpointing=False, enable_progress_bar=False,
                         callbacks=[RetrievalMetrics(k=None), ThroughputMonitor()])
    trainer.fit(module, datamodule=digits)
    assert trainer.callback_metrics["train/samples_per_second"] > 0
    assert "val/precision_at_1" in trainer.callback_metrics
    logged = trainer.test(module, datamodule=digits, verbose=False)[0]
    embeddings, labels = embed(module.encoder, digits.test_dataloader())
    expected = retrieval_metrics(embeddings, labels, k=None)
    assert {f"test/{key}" for key in expected} <= set(logged)
    for key, value in expected.items():
        assert logged[f"test/{key}"] == pytest.approx(value, abs=1e-6), key


def test_embedding_plot_writes_validation_and_test_pictures(digits, tmp_path):
    plot = EmbeddingPlot(every_n_epochs=2, max_points=300)
    module = MetricLearningModule(MLP(64, 8), losses.ContrastiveLoss())
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, default_root_dir=tmp_path,
                         enable_checkpointing=False, enable_progress_bar=False,
                         limit_train_batches=3, callbacks=[plot])
    trainer.fit(module, datamodule=digits)
    trainer.test(module, datamodule=digits, verbose=False)
    assert [p.name for p in plot.written] == ["val_epoch_001.png", "test.png"]
    assert all(p.parent == tmp_path / "plots" and p.stat().st_size > 10_000 for p in plot.written)


def test_bad_plot_settings():
    with pytest.raises(ValueError, match="every_n_epochs"):
        EmbeddingPlot(every_n_epochs=-1)


class RecordsPictures(pl.Callback):
    """At every training epoch start: which pictures exist already. At the end of the
    first validation, before the picture callback sends that epoch's picture, it sends the
    worker ``busy_s`` seconds of sleep: the picture cannot be drawn before the next epoch
    starts unless training waits for it."""

    def __init__(self, folder, worker, busy_s):
        self.folder, self.worker, self.busy_s, self.seen = folder, worker, busy_s, []
        self.busy = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.seen.append(sorted(p.name for p in self.folder.glob("*.png")))

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0 and not self.busy:
            self.busy.append(self.worker.submit_call(time.sleep, self.busy_s))


def test_training_goes_on_while_a_picture_is_drawn_and_every_picture_is_written(digits,
                                                                                 tmp_path):
    # the process's shared worker: UMAP compiled already when an earlier test drew with it
    # (a fresh process pays ~25 s of compilation); the recorder keeps it busy for 3 s instead
    worker = shared_worker()
    plot = EmbeddingPlot(every_n_epochs=1, max_points=300, worker=worker)
    recorder = RecordsPictures(tmp_path / "plots", worker, busy_s=3)
    module = MetricLearningModule(MLP(64, 8), losses.ContrastiveLoss())
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False,
                         default_root_dir=tmp_path, enable_checkpointing=False,
                         enable_progress_bar=False, limit_train_batches=3,
                         num_sanity_val_steps=0, callbacks=[recorder, plot])
    trainer.fit(module, datamodule=digits)
    worker.wait(recorder.busy)
    # epoch 1 started before epoch 0's picture was drawn: training did not wait for it
    assert recorder.seen[1] == []
    # ... and the fit ended with every picture written
    assert [p.name for p in plot.written] == [
        "val_epoch_000.png", "val_epoch_001.png", "val_epoch_002.png"]
    assert all(p.stat().st_size > 10_000 for p in plot.written)


def test_a_picture_that_fails_in_the_worker_fails_the_wait_with_its_file(tmp_path):
    worker = shared_worker()   # running already when an earlier test drew with it
    worker.start(warm_up=False)   # else: no UMAP compilation for a picture that fails first
    job = worker.submit(numpy.zeros((3, 2)), numpy.arange(3), tmp_path / "few.png")
    with pytest.raises(RuntimeError, match="few.png failed in the plot worker: ValueError: "
                                           "a UMAP plot needs at least 4 points"):
        worker.wait([job])
    assert worker.alive   # a failed picture does not stop the worker
