"""Fine-tuning controls of MetricLearningModule, through a real Trainer: a frozen backbone
for the first epochs, a backbone learning-rate multiplier, frozen BatchNorm statistics."""

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_metric import losses
from lightning_metric.backbones import TimmEncoder
from lightning_metric.encoders import MLP, SmallCNN
from lightning_metric.module import MetricLearningModule

TINY = "test_resnet"  # timm's 0.4M-parameter test ResNet (with BatchNorm)
QUIET = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False,
         "enable_model_summary": False, "num_sanity_val_steps": 0}


def _loader(n: int = 16, seed: int = 0) -> DataLoader:
    images = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(images, torch.arange(n) % 4), batch_size=8)


def _module(**kwargs) -> MetricLearningModule:
    pl.seed_everything(0)
    return MetricLearningModule(
        TimmEncoder(TINY, embedding_size=8), losses.ArcFaceLoss(4, 8),
        optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9), **kwargs)


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class EpochEnds(pl.Callback):
    """The backbone's and head's state after each epoch, and the backbone's mode in it."""

    def __init__(self):
        self.backbone: dict[int, dict] = {}
        self.head: dict[int, dict] = {}
        self.training: dict[int, set[bool]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        modes = self.training.setdefault(trainer.current_epoch, set())
        modes.add(pl_module.encoder.backbone.training)

    def on_train_epoch_end(self, trainer, pl_module):
        self.backbone[trainer.current_epoch] = _snapshot(pl_module.encoder.backbone)
        self.head[trainer.current_epoch] = _snapshot(pl_module.encoder.head)


def _fit(module, epochs: int, callbacks=(), ckpt_path=None, val: bool = False, **kwargs):
    ends = EpochEnds()
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[ends, *callbacks],
                         enable_checkpointing=bool(callbacks),
                         limit_val_batches=1 if val else 0, **QUIET, **kwargs)
    trainer.fit(module, train_dataloaders=_loader(),
                val_dataloaders=_loader(8, seed=1) if val else None, ckpt_path=ckpt_path)
    return ends


def test_the_backbone_stays_bit_identical_while_frozen_then_trains():
    module = _module(freeze_backbone_epochs=1)
    backbone, head = _snapshot(module.encoder.backbone), _snapshot(module.encoder.head)
    ends = _fit(module, epochs=3, val=True)
    assert _same(ends.backbone[0], backbone)  # parameters and BatchNorm statistics
    assert not _same(ends.head[0], head)
    assert not _same(ends.backbone[1], ends.backbone[0])
    assert not _same(ends.backbone[2], ends.backbone[1])
    assert ends.training == {0: {False}, 1: {True}, 2: {True}}


def test_a_resumed_run_keeps_the_backbone_frozen_and_ends_as_an_uninterrupted_one(tmp_path):
    whole = _module(freeze_backbone_epochs=2)
    _fit(whole, epochs=3)
    first = _module(freeze_backbone_epochs=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _fit(first, epochs=1, callbacks=[checkpoint])
    resumed = _module(freeze_backbone_epochs=2)
    ends = _fit(resumed, epochs=3, callbacks=[ModelCheckpoint(dirpath=tmp_path / "resumed")],
                ckpt_path=tmp_path / "last.ckpt")
    assert _same(ends.backbone[1], _snapshot(first.encoder.backbone))  # still frozen
    assert not _same(ends.backbone[2], ends.backbone[1])
    assert _same(_snapshot(resumed), _snapshot(whole))


def test_the_backbone_gets_its_own_param_group_with_a_scaled_learning_rate():
    module = _module(backbone_lr_multiplier=0.1)
    (encoder_optimizer, loss_optimizer), _ = module.configure_optimizers()
    head, backbone = encoder_optimizer.param_groups
    assert (head["name"], backbone["name"]) == ("head", "backbone")
    assert head["lr"] == 0.1 and backbone["lr"] == pytest.approx(0.01)
    assert backbone["momentum"] == head["momentum"] == 0.9
    ids = {id(p) for p in module.encoder.backbone.parameters()}
    assert {id(p) for p in backbone["params"]} == ids
    assert {id(p) for p in head["params"]} == {id(p) for p in module.encoder.head.parameters()}
    assert loss_optimizer.defaults["lr"] == 0.1  # the loss optimizer copies the base options
    assert len(_module().configure_optimizers()[0][0].param_groups) == 1


def test_a_scheduler_keeps_the_ratio_of_the_two_learning_rates():
    module = _module(backbone_lr_multiplier=0.5,
                     scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.1))
    trainer = pl.Trainer(max_epochs=1, enable_checkpointing=False, limit_val_batches=0, **QUIET)
    trainer.fit(module, train_dataloaders=_loader())
    head, backbone = trainer.optimizers[0].param_groups
    assert head["lr"] == pytest.approx(0.01) and backbone["lr"] == pytest.approx(0.005)


def test_freeze_batchnorm_keeps_the_running_statistics_while_the_rest_trains():
    module = _module(freeze_batchnorm=True)
    norms = {name: layer for name, layer in module.encoder.backbone.named_modules()
             if isinstance(layer, nn.BatchNorm2d)}
    before = _snapshot(module.encoder.backbone)
    _fit(module, epochs=2, val=True)
    after = _snapshot(module.encoder.backbone)
    for name in norms:
        for buffer in ("running_mean", "running_var"):
            assert torch.equal(after[f"{name}.{buffer}"], before[f"{name}.{buffer}"])
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert any(k.endswith(".weight") and k[: -len(".weight")] in norms for k in changed)
    assert any("conv" in k for k in changed)
    module.train()
    assert module.encoder.backbone.training and not any(n.training for n in norms.values())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"freeze_backbone_epochs": -1}, "freeze_backbone_epochs must be >= 0, got -1"),
    ({"backbone_lr_multiplier": 0.0}, "backbone_lr_multiplier must be > 0, got 0.0"),
    ({"backbone_lr_multiplier": -2}, "backbone_lr_multiplier must be > 0, got -2"),
])
def test_bad_fine_tuning_values_name_the_setting(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _module(**kwargs)


@pytest.mark.parametrize("kwargs", [{"freeze_backbone_epochs": 1},
                                    {"backbone_lr_multiplier": 0.1},
                                    {"freeze_batchnorm": True}])
def test_fine_tuning_settings_need_an_encoder_with_a_backbone(kwargs):
    (setting, value), = kwargs.items()
    with pytest.raises(ValueError, match=f"{setting}={value} needs an encoder with a .backbone"
                                         r".*SmallCNN has none"):
        MetricLearningModule(SmallCNN(8, image_size=8), losses.ContrastiveLoss(), **kwargs)
    MetricLearningModule(MLP(4, 8), losses.ContrastiveLoss())  # defaults: nothing asked
