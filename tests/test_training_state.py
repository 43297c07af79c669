"""Training state across epochs, steps, evaluations and a resume, through a real Trainer."""

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from lightning_metric import losses
from lightning_metric.callbacks import BestAndLastCheckpoint
from lightning_metric.data import DigitsDataModule
from lightning_metric.encoders import MLP
from lightning_metric.module import MetricLearningModule, buffers_restored
from lightning_metric.samplers import ClassBalancedBatchSampler, RandomBatchSampler

QUIET = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False,
         "enable_model_summary": False}


def _trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(**{"enable_checkpointing": False, **QUIET, **kwargs})


class BatchRecorder(pl.Callback):
    """Each training batch's items (identified by their pixel sums), per epoch."""

    def __init__(self):
        self.epochs: dict[int, list[list[float]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        items = batch[0].flatten(1).sum(1).tolist()
        self.epochs.setdefault(trainer.current_epoch, []).append(items)


def _fit_recording(datamodule=None, loader=None, epochs=3, seed=0, **trainer_kwargs):
    pl.seed_everything(seed)
    recorder = BatchRecorder()
    module = MetricLearningModule(MLP(64, 8), losses.TripletMarginLoss())
    trainer = _trainer(max_epochs=epochs, limit_val_batches=0, callbacks=[recorder],
                       **trainer_kwargs)
    trainer.fit(module, datamodule=datamodule, train_dataloaders=loader)
    return recorder.epochs


# -- 1. every epoch gets a new shuffle ---------------------------------------------------------


@pytest.mark.parametrize("sampler", ["random", "class"])
def test_datamodule_batches_differ_every_epoch_and_repeat_for_the_same_seed(sampler):
    epochs = _fit_recording(DigitsDataModule(sampler=sampler, seed=5))
    assert len(epochs) == 3
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]
    assert _fit_recording(DigitsDataModule(sampler=sampler, seed=5)) == epochs
    assert _fit_recording(DigitsDataModule(sampler=sampler, seed=6))[0] != epochs[0]


@pytest.mark.parametrize("make_sampler", [
    lambda labels: ClassBalancedBatchSampler(labels, batch_size=32, m_per_class=4, seed=1),
    lambda labels: RandomBatchSampler(len(labels), batch_size=32, seed=1),
])
def test_a_users_own_dataloader_with_our_batch_sampler_reshuffles(make_sampler):
    data = DigitsDataModule()
    data.setup()
    loader = DataLoader(data.train_set, batch_sampler=make_sampler(data.train_labels()))
    epochs = _fit_recording(loader=loader)
    assert epochs[0] != epochs[1] != epochs[2]
    assert sorted(map(sorted, epochs[1])) != sorted(map(sorted, epochs[0]))


# no_duplicates: no digit twice in a batch (and an epoch of batches must hold the
# largest class, 132 digits, once a batch)
RESUMED_SAMPLERS = [{"sampler": "random"}, {"sampler": "class"},
                    {"sampler": "no_duplicates", "batch_size": 8}]


@pytest.mark.parametrize("settings", RESUMED_SAMPLERS, ids=lambda s: s["sampler"])
def test_a_resumed_run_sees_the_batches_of_an_uninterrupted_one(settings, tmp_path):
    whole = _fit_recording(DigitsDataModule(**settings))
    checkpoint = BestAndLastCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    pl.seed_everything(0)
    first = MetricLearningModule(MLP(64, 8), losses.TripletMarginLoss())
    _trainer(max_epochs=2, limit_val_batches=0, enable_checkpointing=True,
             callbacks=[checkpoint]).fit(first, datamodule=DigitsDataModule(**settings))
    recorder = BatchRecorder()
    resumed = MetricLearningModule(MLP(64, 8), losses.TripletMarginLoss())
    _trainer(max_epochs=3, limit_val_batches=0, callbacks=[recorder]).fit(
        resumed, datamodule=DigitsDataModule(**settings), ckpt_path=tmp_path / "last.ckpt")
    assert list(recorder.epochs) == [2]
    assert recorder.epochs[2] == whole[2]
    assert whole[2] != whole[1]  # the epoch's own batches, not a repeat of the last ones


def test_set_epoch_rejects_a_bad_epoch():
    sampler = RandomBatchSampler(10, 2)
    with pytest.raises(ValueError, match="epoch must be a non-negative int"):
        sampler.set_epoch(-1)


# -- 2. steps count batches, whatever the number of optimizers ---------------------------------


@pytest.mark.parametrize("loss", [
    lambda: losses.ArcFaceLoss(10, 8),
    lambda: losses.MarginLoss(learn_beta=True, num_classes=10),
    lambda: losses.TripletMarginLoss(),
])
def test_max_steps_trains_that_many_batches(loss):
    recorder = BatchRecorder()
    module = MetricLearningModule(MLP(64, 8), loss())
    trainer = _trainer(max_steps=5, limit_val_batches=0, callbacks=[recorder])
    trainer.fit(module, datamodule=DigitsDataModule(sampler="random"))
    assert sum(len(batches) for batches in recorder.epochs.values()) == 5
    assert trainer.global_step == 5


def test_logged_steps_and_step_checkpoints_count_batches(tmp_path):
    # digits: 1,294 training items in random batches of 64 -> 21 batches an epoch (the last 14)
    every_4 = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}",
                              every_n_train_steps=4, save_top_k=-1)
    module = MetricLearningModule(MLP(64, 8), losses.ArcFaceLoss(10, 8))
    trainer = _trainer(max_epochs=2, limit_val_batches=0, log_every_n_steps=1,
                       logger=CSVLogger(tmp_path), enable_checkpointing=True, callbacks=[every_4])
    trainer.fit(module, datamodule=DigitsDataModule(sampler="random"))
    assert trainer.global_step == 42
    names = sorted(int(p.stem.split("=")[1]) for p in (tmp_path / "ckpt").glob("step=*.ckpt"))
    assert names == list(range(4, 43, 4))
    rows = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    steps = [int(r.split(",")[header.index("step")]) for r in rows[1:]
             if r.split(",")[header.index("train/loss_step")]]
    assert steps == list(range(42))


class LossRecorder(pl.Callback):
    """Each training batch's loss and size, per epoch."""

    def __init__(self):
        self.epochs: dict[int, list[tuple[float, int]]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.epochs.setdefault(trainer.current_epoch, []).append(
            (float(outputs["loss"]), len(batch[1])))


@pytest.mark.parametrize("progress_bar", [False, True])
def test_batch_loss_logged_every_n_steps_and_epoch_loss_is_the_item_mean(tmp_path, progress_bar):
    # digits: 1,294 training items in random batches of 64 -> 21 batches an epoch (the last 14)
    recorder = LossRecorder()
    module = MetricLearningModule(MLP(64, 8), losses.ArcFaceLoss(10, 8))
    trainer = _trainer(max_epochs=2, limit_val_batches=0, log_every_n_steps=5,
                       logger=CSVLogger(tmp_path), callbacks=[recorder],
                       enable_progress_bar=progress_bar)
    trainer.fit(module, datamodule=DigitsDataModule(sampler="random"))
    rows = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    cells = [dict(zip(header, row.split(","), strict=True)) for row in rows[1:]]
    logged = [(int(c["step"]), float(c["train/loss_step"])) for c in cells if c["train/loss_step"]]
    every_batch = [loss for epoch in (0, 1) for loss, _ in recorder.epochs[epoch]]
    assert [step for step, _ in logged] == list(range(4, 42, 5))
    assert [value for _, value in logged] == pytest.approx(every_batch[4::5], rel=1e-6)
    epoch_means = [float(c["train/loss_epoch"]) for c in cells if c["train/loss_epoch"]]
    expected = [sum(loss * n for loss, n in recorder.epochs[e]) / sum(n for _, n in
                recorder.epochs[e]) for e in (0, 1)]
    assert epoch_means == pytest.approx(expected, rel=1e-5)
    if progress_bar:
        assert "train/loss_step" in trainer.progress_bar_metrics


# -- 3. evaluation never changes training state ------------------------------------------------


class _CountingLoss(nn.Module):
    """A loss that counts its calls and remembers its last batch in buffers."""

    def __init__(self):
        super().__init__()
        self.inner = losses.ContrastiveLoss()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_batch", torch.zeros(1))

    def forward(self, embeddings, labels, indices_tuple=None):
        self.calls += 1
        self.last_batch = embeddings.detach().sum(1)  # a new tensor, not written in place
        return self.inner(embeddings, labels, indices_tuple)


def _buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in module.named_buffers()}


@pytest.mark.parametrize("make_loss", [
    lambda: losses.CrossBatchMemory(losses.ContrastiveLoss(), 8, 256),
    lambda: losses.DynamicSoftMarginLoss(momentum=0.5),   # its margin histogram, hist_
    _CountingLoss,
])
@pytest.mark.parametrize("stage", ["validate", "test"])
def test_evaluation_leaves_the_losss_state_bit_identical(make_loss, stage):
    data = DigitsDataModule()
    module = MetricLearningModule(MLP(64, 8), make_loss())
    trainer = _trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    before = _buffers(module.loss)
    assert any(b.any() for b in before.values())
    results = getattr(_trainer(), stage)(module, datamodule=data, verbose=False)
    assert f"{'val' if stage == 'validate' else 'test'}/loss" in results[0]
    after = _buffers(module.loss)
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name


def test_sanity_check_and_validation_inside_fit_leave_the_memory_to_training():
    # 3 training batches of 64 go into the memory; 2 sanity-check batches and the
    # validation at the epoch's end must not.
    data = DigitsDataModule(sampler="class", batch_size=64, m_per_class=8)
    xbm = losses.CrossBatchMemory(losses.ContrastiveLoss(), 8, 1024)
    module = MetricLearningModule(MLP(64, 8), xbm)
    trainer = _trainer(max_epochs=1, limit_train_batches=3, num_sanity_val_steps=2)
    trainer.fit(module, datamodule=data)
    assert int(xbm.queue_idx) == 3 * 64


def test_buffers_restored_puts_back_buffers_written_in_place_or_replaced():
    loss = _CountingLoss()
    before = _buffers(loss)
    with buffers_restored(loss):
        loss(torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]))
        assert int(loss.calls) == 1
    for name, value in before.items():
        assert torch.equal(dict(loss.named_buffers())[name], value)


# -- 7. checkpoints: later wins ties, last.ckpt is the last epoch -------------------------------


class _FixedMetric(pl.Callback):
    """Logs ``val/score`` from a fixed list, one value per validation."""

    def __init__(self, values):
        self.values = list(values)

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            pl_module.log("val/score", self.values[trainer.current_epoch])


def _fit_with_checkpoint(checkpoint, values, tmp_path, ckpt_path=None, max_epochs=None):
    module = MetricLearningModule(MLP(64, 8), losses.TripletMarginLoss())
    trainer = _trainer(max_epochs=max_epochs or len(values), limit_train_batches=2,
                       limit_val_batches=1, num_sanity_val_steps=0, enable_checkpointing=True,
                       callbacks=[_FixedMetric(values), checkpoint], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=DigitsDataModule(), ckpt_path=ckpt_path)
    return trainer


def _epoch_of(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["epoch"]


def test_last_ckpt_is_the_last_epoch_after_the_metric_plateaus(tmp_path):
    values = [0.5, 0.9, 0.8, 0.7, 0.6]
    ours = BestAndLastCheckpoint(dirpath=tmp_path / "ours", monitor="val/score", mode="max",
                                 save_last=True, filename="{epoch}")
    _fit_with_checkpoint(ours, values, tmp_path)
    assert _epoch_of(tmp_path / "ours" / "last.ckpt") == len(values) - 1
    assert _epoch_of(ours.best_model_path) == 1
    # Lightning's own ModelCheckpoint leaves last.ckpt at the best epoch here.
    theirs = ModelCheckpoint(dirpath=tmp_path / "theirs", monitor="val/score", mode="max",
                             save_last=True)
    _fit_with_checkpoint(theirs, values, tmp_path)
    assert _epoch_of(tmp_path / "theirs" / "last.ckpt") == 1


@pytest.mark.parametrize("mode, values", [("max", [0.5, 1.0, 1.0, 1.0]),
                                          ("min", [0.9, 0.2, 0.2, 0.2])])
def test_a_tie_on_the_monitored_value_keeps_the_later_checkpoint(mode, values, tmp_path):
    checkpoint = BestAndLastCheckpoint(dirpath=tmp_path, monitor="val/score", mode=mode,
                                       save_last=True, filename="{epoch}")
    _fit_with_checkpoint(checkpoint, values, tmp_path)
    assert _epoch_of(checkpoint.best_model_path) == 3
    assert sorted(p.name for p in tmp_path.glob("epoch=*.ckpt")) == ["epoch=3.ckpt"]


def test_resuming_from_last_ckpt_continues_after_its_epoch(tmp_path):
    values = [0.9, 0.1, 0.1, 0.1, 0.1, 0.1]
    first = BestAndLastCheckpoint(dirpath=tmp_path, monitor="val/score", mode="max",
                                  save_last=True)
    _fit_with_checkpoint(first, values, tmp_path, max_epochs=3)
    recorder = BatchRecorder()
    module = MetricLearningModule(MLP(64, 8), losses.TripletMarginLoss())
    trainer = _trainer(max_epochs=5, limit_train_batches=2, limit_val_batches=0,
                       callbacks=[recorder])
    trainer.fit(module, datamodule=DigitsDataModule(), ckpt_path=tmp_path / "last.ckpt")
    assert list(recorder.epochs) == [3, 4]
