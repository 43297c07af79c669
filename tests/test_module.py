"""MetricLearningModule in a plain Trainer, without Hydra: the importable path."""

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_metric import losses
from lightning_metric.callbacks import RetrievalMetrics
from lightning_metric.data import DigitsDataModule
from lightning_metric.encoders import MLP
from lightning_metric.module import MetricLearningModule, NonFiniteLossError
from lightning_metric.samplers import ClassBalancedBatchSampler


def _trainer(**kwargs) -> pl.Trainer:
    defaults = {"max_epochs": 1, "accelerator": "cpu", "logger": False,
                "enable_checkpointing": False, "enable_progress_bar": False,
                "enable_model_summary": False}
    return pl.Trainer(**{**defaults, **kwargs})


def test_module_loss_and_class_sampler_train_in_a_plain_trainer():
    pl.seed_everything(0)
    data = DigitsDataModule(batch_size=32, m_per_class=4, sampler="class")
    data.setup()
    loader = DataLoader(data.train_set, batch_sampler=ClassBalancedBatchSampler(
        data.train_labels(), batch_size=32, m_per_class=4))
    module = MetricLearningModule(MLP(64, 16), losses.TripletMarginLoss(margin=0.2))
    trainer = _trainer(max_epochs=3, callbacks=[RetrievalMetrics()])
    before = _test_precision(trainer, module, data)
    trainer.fit(module, train_dataloaders=loader)
    after = _test_precision(trainer, module, data)
    assert after > max(before, 0.85)


def _test_precision(trainer, module, data):
    return trainer.test(module, dataloaders=data.test_dataloader(), verbose=False)[0][
        "test/precision_at_1"]


def test_a_learnable_loss_gets_its_own_optimizer_of_the_same_kind():
    module = MetricLearningModule(MLP(64, 16), losses.ArcFaceLoss(10, 16),
                                  optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.5))
    optimizers, _ = module.configure_optimizers()
    assert [type(o) for o in optimizers] == [torch.optim.SGD, torch.optim.SGD]
    assert optimizers[1].defaults["lr"] == 0.1 and optimizers[1].defaults["momentum"] == 0.5
    assert optimizers[1].param_groups[0]["params"][0] is module.loss.W
    plain = MetricLearningModule(MLP(64, 16), losses.TripletMarginLoss())
    assert len(plain.configure_optimizers()[0]) == 1


class _NaNAfter(nn.Module):
    """A loss that turns NaN at its third call."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, embeddings, labels, indices_tuple=None):
        self.calls += 1
        value = embeddings.pow(2).mean()
        return value * float("nan") if self.calls >= 3 else value


def test_a_non_finite_loss_stops_training_with_a_clear_error():
    data = DigitsDataModule(batch_size=32, m_per_class=4, sampler="random")
    module = MetricLearningModule(MLP(64, 16), _NaNAfter())
    with pytest.raises(NonFiniteLossError, match=r"nan at epoch 0, batch 2.*learning rate"):
        _trainer(num_sanity_val_steps=0).fit(module, datamodule=data)


def test_gradient_clipping_bounds_the_update():
    pl.seed_everything(0)
    x, y = torch.randn(64, 64) * 100, torch.arange(8).repeat(8)
    module = MetricLearningModule(
        MLP(64, 8), losses.ContrastiveLoss(), optimizer=partial(torch.optim.SGD, lr=1.0),
        gradient_clip_val=1e-3)
    before = [p.detach().clone() for p in module.encoder.parameters()]
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    _trainer(max_steps=1).fit(module, train_dataloaders=loader)
    change = torch.cat([(p - b).flatten() for p, b in zip(module.encoder.parameters(), before,
                                                          strict=True)])
    assert 0 < change.norm() <= 1e-3 + 1e-6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gradient_clip_algorithm": "max"}, "gradient_clip_algorithm"),
        ({"accumulate_grad_batches": 0}, "accumulate_grad_batches"),
        ({"scheduler_interval": "batch"}, "scheduler_interval"),
    ],
)
def test_bad_module_settings_name_the_setting(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MetricLearningModule(MLP(64, 8), losses.ContrastiveLoss(), **kwargs)


def test_schedulers_step_both_optimizers_every_epoch():
    data = DigitsDataModule(batch_size=64, m_per_class=8, sampler="random")
    module = MetricLearningModule(
        MLP(64, 16), losses.CosFaceLoss(10, 16), optimizer=partial(torch.optim.SGD, lr=1.0),
        scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
        loss_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.1))
    trainer = _trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    model_lr, loss_lr = [opt.param_groups[0]["lr"] for opt in trainer.optimizers]
    assert model_lr == pytest.approx(0.25) and loss_lr == pytest.approx(0.01)


def test_a_module_miner_becomes_the_labelled_losss_own_so_it_sees_the_gathered_batch():
    from lightning_metric.losses import TripletMarginLoss
    from lightning_metric.miners import TripletMarginMiner

    miner = TripletMarginMiner(margin=0.1)
    module = MetricLearningModule(MLP(4, 8), TripletMarginLoss(), miner=miner)
    assert module.miner is None and module.loss.miner is miner
    embeddings, labels = torch.randn(12, 8), torch.arange(12) % 3
    expected = TripletMarginLoss()(embeddings, labels, miner(embeddings, labels))
    assert torch.allclose(module.loss(embeddings, labels), expected)
    with pytest.raises(ValueError, match="both have a miner: give it to one of them"):
        MetricLearningModule(MLP(4, 8), TripletMarginLoss(miner=miner), miner=miner)
