"""ClassificationAccuracy: argmax (argmin for ProxyNCA's distances) of the loss's logits."""

import logging

import pytest
import pytorch_lightning as pl
import torch

from lightning_metric import losses
from lightning_metric.callbacks import RetrievalMetrics
from lightning_metric.classification import ClassificationAccuracy, classification_accuracy
from lightning_metric.data import DigitsDataModule
from lightning_metric.encoders import MLP
from lightning_metric.export import embed
from lightning_metric.module import MetricLearningModule


class _Module:
    """What the callback reads of a LightningModule: ``loss``, ``device``, ``log``, ``trainer``."""

    def __init__(self, loss):
        self.loss, self.device, self.logged = loss, torch.device("cpu"), {}
        self.trainer = type("Trainer", (), {"is_global_zero": True})()

    def log(self, name, value, **kwargs):
        self.logged[name] = float(value)


def _test_epoch(loss, embeddings, labels) -> dict[str, float]:
    module, callback = _Module(loss), ClassificationAccuracy()
    callback.setup(None, module, "test")
    for start in range(0, len(labels), 2):   # batches of two
        outputs = {"embeddings": embeddings[start:start + 2], "labels": labels[start:start + 2]}
        callback.on_test_batch_end(None, module, outputs, None, start)
    callback.on_test_epoch_end(None, module)
    return module.logged


def _arcface() -> losses.ArcFaceLoss:
    loss = losses.ArcFaceLoss(num_classes=3, embedding_size=2)
    with torch.no_grad():   # class centres (columns of W) at 0, 90 and 180 degrees
        loss.W.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]]))
    return loss


def test_arcface_accuracy_by_hand():
    # Closest centres: 0, 1, 2, 1, 0 (by angle); labels 0, 1, 1, 1, 2: 3 of 5 right.
    embeddings = torch.tensor([[2.0, 0.1], [0.1, 3.0], [-1.0, 0.2], [0.3, 1.0], [1.0, -0.2]])
    labels = torch.tensor([0, 1, 1, 1, 2])
    assert _test_epoch(_arcface(), embeddings, labels) == {
        "test/classification_accuracy": pytest.approx(0.6)}


def test_proxy_nca_predicts_the_closest_proxy():
    loss = losses.ProxyNCALoss(num_classes=3, embedding_size=3)
    with torch.no_grad():
        loss.proxies.copy_(torch.eye(3))
    embeddings = torch.tensor([[1.0, 0.1, 0.0], [0.0, 1.0, 0.2], [0.1, 0.0, 1.0], [0.9, 0.2, 0.0]])
    labels = torch.tensor([0, 1, 2, 1])
    distances = loss.get_logits(embeddings)
    assert distances.argmin(dim=1).tolist() == [0, 1, 2, 0]   # smaller is closer
    assert distances.argmax(dim=1).tolist() != [0, 1, 2, 0]
    assert classification_accuracy(loss, embeddings, labels) == pytest.approx(0.75)
    assert _test_epoch(loss, embeddings, labels) == {
        "test/classification_accuracy": pytest.approx(0.75)}


def test_nothing_for_a_loss_without_logits():
    embeddings, labels = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    assert _test_epoch(losses.TripletMarginLoss(), embeddings, labels) == {}


def test_class_disjoint_labels_are_skipped_with_one_line(caplog):
    embeddings, labels = torch.randn(4, 2), torch.tensor([3, 3, 4, 4])   # not classes 0..2
    with caplog.at_level(logging.INFO, logger="lightning_metric.classification"):
        assert _test_epoch(_arcface(), embeddings, labels) == {}
    lines = [r for r in caplog.records if "class-disjoint" in r.getMessage()]
    assert len(lines) == 1


def test_logged_by_trainer_test_equals_a_direct_computation(tmp_path):
    pl.seed_everything(0)
    data = DigitsDataModule(batch_size=32, m_per_class=4, sampler="class", eval_batch_size=100)
    loss = losses.ArcFaceLoss(num_classes=10, embedding_size=16)
    module = MetricLearningModule(MLP(64, 16), loss)
    trainer = pl.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path,
                         enable_checkpointing=False, enable_progress_bar=False,
                         callbacks=[RetrievalMetrics(k=None), ClassificationAccuracy()])
    logged = trainer.test(module, datamodule=data, verbose=False)[0]
    embeddings, labels = embed(module.encoder, data.test_dataloader())
    expected = classification_accuracy(loss, embeddings, labels)
    assert "test/precision_at_1" in logged
    assert logged["test/classification_accuracy"] == pytest.approx(expected, abs=1e-6)
