"""DDP with 2 real CPU processes (gloo): exact evaluation, shared training batches, the recipe.

Each rank embeds its shard of the evaluation set (a ``DistributedSampler`` pads the
shards with repeated items when the set's size is odd); the gathered embeddings drop
those copies by dataset index and return to dataset order before the metrics.
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy
import pytest
import pytorch_lightning as pl
import torch
from conftest import REPO, SHARED_DATA
from torch.utils.data import DataLoader, TensorDataset

import lightning_metric.metrics as metrics_module
from lightning_metric import MetricLearningModule, RetrievalMetric
from lightning_metric.callbacks import EmbeddingPlot, RetrievalMetrics
from lightning_metric.data import DigitsDataModule
from lightning_metric.data.indexed import IndexedDataset
from lightning_metric.encoders import SmallCNN
from lightning_metric.losses import TripletMarginLoss
from lightning_metric.metrics import EmbeddingCollector, in_dataset_order
from lightning_metric.plot_worker import PlotWorker
from lightning_metric.samplers import ClassBalancedBatchSampler, RandomBatchSampler

ODD_VALIDATION = 0.105   # 151 of the 1,442 training digits; the test split has 355
# the ranks are forked from this process: real processes, without the ~15 s that each
# spawned rank spends importing torch and Lightning again
STRATEGY = "ddp_fork"


# -- the ordering rule, in one process -----------------------------------------------------------


def test_in_dataset_order_drops_repeated_indices_and_sorts():
    indices = torch.tensor([4, 0, 2, 1, 3, 0])   # rank 0: 4 0 2, rank 1: 1 3 0 (padding)
    values = torch.tensor([40.0, 0.0, 20.0, 10.0, 30.0, 99.0])
    (ordered,) = in_dataset_order(indices, values)
    assert ordered.tolist() == [0.0, 10.0, 20.0, 30.0, 40.0]


def test_retrieval_metric_with_indices_equals_the_unpadded_set():
    generator = torch.Generator().manual_seed(0)
    embeddings, labels = torch.randn(11, 4, generator=generator), torch.arange(11) % 3
    plain = RetrievalMetric(k="max_bin_count")
    plain.update(embeddings, labels)
    # two "ranks" of a padded DistributedSampler: items 0..10 and a repeat of item 0
    indexed = RetrievalMetric(k="max_bin_count")
    order = torch.tensor([0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 0])
    indexed.update(embeddings[order[:6]], labels[order[:6]], order[:6])
    indexed.update(embeddings[order[6:]], labels[order[6:]], order[6:])
    expected, found = plain.compute(), indexed.compute()
    assert found.keys() == expected.keys()
    for name in expected:
        assert float(found[name]) == pytest.approx(float(expected[name]), abs=1e-7), name


def test_indices_with_some_batches_only_are_refused():
    metric = RetrievalMetric()
    metric.update(torch.randn(3, 2), torch.arange(3), torch.arange(3))
    with pytest.raises(ValueError, match="pass indices with every batch of an epoch or with none"):
        metric.update(torch.randn(3, 2), torch.arange(3))
    with pytest.raises(ValueError, match=r"indices must be \(3,\) integer dataset indices"):
        EmbeddingCollector().update(torch.randn(3, 2), torch.arange(3), torch.zeros(3))


def test_without_indices_under_ddp_a_warning_says_padding_counts_twice(monkeypatch):
    monkeypatch.setattr(metrics_module, "is_distributed", lambda: True)
    metric = RetrievalMetric()
    metric.update(torch.randn(6, 2), torch.arange(6) % 2)
    with pytest.warns(UserWarning, match="counted twice"):
        metric._collected("query")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        indexed = RetrievalMetric()
        indexed.update(torch.randn(6, 2), torch.arange(6) % 2, torch.arange(6))
        indexed._collected("query")


def test_indexed_dataset_appends_the_index():
    dataset = IndexedDataset(TensorDataset(torch.arange(5.0), torch.arange(5) * 10))
    x, label, index = dataset[3]
    assert (float(x), int(label), index) == (3.0, 30, 3) and len(dataset) == 5


def test_evaluation_batches_carry_their_dataset_index_in_order():
    datamodule = DigitsDataModule(val_fraction=ODD_VALIDATION, eval_batch_size=64)
    datamodule.setup()
    indices = torch.cat([batch[2] for batch in datamodule.test_dataloader()])
    assert indices.tolist() == list(range(len(datamodule.test_set)))


# -- two real processes ----------------------------------------------------------------------------


def trained_module() -> MetricLearningModule:
    pl.seed_everything(0)
    module = MetricLearningModule(SmallCNN(embedding_size=32, image_size=8), TripletMarginLoss())
    datamodule = DigitsDataModule(sampler="class", val_fraction=ODD_VALIDATION)
    pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(module, datamodule)
    return module


def evaluate(module: MetricLearningModule, devices: int, tmp_path: Path) -> dict[str, float]:
    """Validation and test metrics through the callbacks, on ``devices`` CPU processes."""
    datamodule = DigitsDataModule(sampler="class", val_fraction=ODD_VALIDATION,
                                  eval_batch_size=64)
    callbacks = [RetrievalMetrics()]
    if devices > 1:   # the picture gathers too (a UMAP costs ~40 s here: drawn once)
        # its own worker, started by rank 0: a forked rank cannot use a worker that this
        # process started (the shared one, when an earlier test drew a picture)
        callbacks.append(EmbeddingPlot(on_test=True, max_points=400, worker=PlotWorker(),
                                       dirpath=str(tmp_path / "plots")))
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=STRATEGY if devices > 1 else "auto",
        use_distributed_sampler=False, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks,
    )
    found = {}
    for stage, run in (("val", trainer.validate), ("test", trainer.test)):
        run(module, datamodule=datamodule)
        found.update({k: float(v) for k, v in trainer.callback_metrics.items()
                      if k.startswith(f"{stage}/") and k != f"{stage}/loss"})
    return found


def test_two_processes_give_the_metrics_of_one_on_odd_sized_sets(tmp_path):
    module = trained_module()
    one, two = evaluate(module, 1, tmp_path), evaluate(module, 2, tmp_path)
    assert {"val/precision_at_1", "test/mean_average_precision_at_r"} <= one.keys()
    assert one.keys() == two.keys()
    for name, value in one.items():
        assert two[name] == pytest.approx(value, abs=1e-6), name
    assert one["test/precision_at_1"] < 0.999   # not the inflated "own copy" 1.0
    pictures = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pictures == ["test.png"]   # written once, by rank 0


class OwnModule(pl.LightningModule):
    """Someone else's module: their loop, our RetrievalMetric, indices from the batch."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder
        self.retrieval = RetrievalMetric(k="max_bin_count")

    def validation_step(self, batch, batch_idx):
        inputs, labels, indices = batch
        self.retrieval.update(self.encoder(inputs), labels, indices)

    def on_validation_epoch_end(self):
        self.log_dict({f"own/{k}": v for k, v in self.retrieval.compute().items()})
        self.retrieval.reset()


def own_metrics(encoder: torch.nn.Module, devices: int) -> dict[str, float]:
    datamodule = DigitsDataModule()
    datamodule.setup()
    dataset = IndexedDataset(datamodule.test_set)   # 355 items: padding on 2 ranks
    trainer = pl.Trainer(accelerator="cpu", devices=devices,
                         strategy=STRATEGY if devices > 1 else "auto", logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    # Lightning's own DistributedSampler (use_distributed_sampler=True, the default)
    trainer.validate(OwnModule(encoder), DataLoader(dataset, batch_size=50))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_retrieval_metric_in_someone_elses_module_is_exact_under_ddp():
    torch.manual_seed(0)
    encoder = SmallCNN(embedding_size=16, image_size=8)
    one, two = own_metrics(encoder, 1), own_metrics(encoder, 2)
    assert "own/precision_at_1" in one and one.keys() == two.keys()
    for name, value in one.items():
        assert two[name] == pytest.approx(value, abs=1e-6), name


# -- the recipe on two processes -------------------------------------------------------------------


def recipe(module: str, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LIGHTNING_METRIC_DATA": str(SHARED_DATA), "HYDRA_FULL_ERROR": "1",
           "WANDB_SILENT": "true"}
    done = subprocess.run(
        [sys.executable, "-m", module, f"hydra.run.dir={run_dir}", "data=digits",
         "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         "callbacks.embedding_plot.on_test=false", *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_the_recipe_trains_on_two_cpu_processes_and_writes_once(tmp_path):
    done = recipe("recipes.train", tmp_path / "ddp", "trainer=ddp_cpu", "trainer.devices=2",
                  "trainer.max_epochs=2", "export=true")
    assert done.stdout.count("Tested checkpoints/") == 1          # rank 0 alone reports
    found = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    recipe("recipes.train", tmp_path / "one", "trainer.max_epochs=2")
    expected = json.loads((tmp_path / "one" / "metrics.json").read_text())
    for name in ("test/precision_at_1", "test/mean_average_precision_at_r"):
        assert found[name] == pytest.approx(expected[name], abs=0.05), name
    exported = torch.from_numpy(numpy.load(tmp_path / "ddp" / "export" / "labels.npy"))
    datamodule = DigitsDataModule()
    datamodule.setup()
    assert torch.equal(exported, datamodule.test_set.tensors[1])   # every item once, in order

    # the same checkpoint evaluated on 1 and on 2 processes: the same retrieval metrics
    checkpoint = tmp_path / "ddp" / "checkpoints" / "last.ckpt"
    recipe("recipes.eval", tmp_path / "eval1", f"ckpt_path={checkpoint}")
    recipe("recipes.eval", tmp_path / "eval2", f"ckpt_path={checkpoint}", "trainer=ddp_cpu",
           "trainer.devices=2")
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text())
                for d in ("eval1", "eval2"))
    retrieval = [k for k in one if k != "test/loss"]
    assert len(retrieval) > 5
    for name in retrieval:
        assert two[name] == pytest.approx(one[name], abs=1e-6), name


# -- training batches on two processes -------------------------------------------------------------


class RecordsBatches(pl.LightningModule):
    """Items are their own index (x = i): each rank writes the items of its batches."""

    def __init__(self, folder: Path):
        super().__init__()
        self.layer, self.folder = torch.nn.Linear(1, 2), folder

    def training_step(self, batch, batch_idx):
        inputs, _ = batch
        with (self.folder / f"rank{self.global_rank}.txt").open("a") as stream:
            stream.write(" ".join(str(int(i)) for i in inputs.flatten()) + "\n")
        return self.layer(inputs).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def recorded_batches(folder: Path, sampler_kind: str, devices: int) -> list[list[list[int]]]:
    folder.mkdir()
    labels = torch.arange(12).repeat_interleave(6)          # 12 classes x 6 items
    dataset = TensorDataset(torch.arange(len(labels)).float().unsqueeze(1), labels)
    sampler = (ClassBalancedBatchSampler(labels, 24, 6, seed=2) if sampler_kind == "class"
               else RandomBatchSampler(len(labels), 20, seed=2))   # ranks: the process group's
    trainer = pl.Trainer(accelerator="cpu", devices=devices, max_epochs=1,
                         strategy=STRATEGY if devices > 1 else "auto",
                         use_distributed_sampler=False, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(RecordsBatches(folder), DataLoader(dataset, batch_sampler=sampler))
    return [[[int(i) for i in line.split()] for line in path.read_text().splitlines()]
            for path in sorted(folder.glob("rank*.txt"))]


@pytest.mark.parametrize("sampler_kind", ["class", "random"])
def test_two_ranks_train_on_disjoint_shares_of_the_single_process_batches(tmp_path,
                                                                          sampler_kind):
    (single,) = recorded_batches(tmp_path / "one", sampler_kind, 1)
    rank0, rank1 = recorded_batches(tmp_path / "two", sampler_kind, 2)
    assert len(rank0) == len(rank1) == len(single)
    for whole, part0, part1 in zip(single, rank0, rank1, strict=True):
        assert sorted(part0 + part1) == sorted(whole)
    assert not set(sum(rank0, [])) & set(sum(rank1, []))   # disjoint over the epoch
