"""The DataModule shared by labelled data sets: splits, evaluation protocols, samplers.

A subclass only loads its arrays (:meth:`load_splits`); this class validates
them, cuts the validation split, applies the evaluation protocol and builds
the loaders:

- ``standard``: train on every class of the train split; validation is a
  held-out part of it; test is the test split.
- ``class_disjoint``: train on the first half of the classes (relabelled
  ``0..C/2-1``); validation and test retrieve among the unseen other half
  (validation from the train split's items of those classes, test from the
  test split): the usual metric-learning protocol.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from ..samplers import ClassBalancedBatchSampler, RandomBatchSampler
from .indexed import IndexedDataset

PROTOCOLS = ("standard", "class_disjoint")
SAMPLERS = ("class", "random")


class LabelledDataModule(pl.LightningDataModule):
    """Items with integer class labels, in ``(x, label)`` batches.

    Args:
        batch_size: items per training batch; under DDP the global batch, shared by the
            devices (see :mod:`lightning_metric.samplers`).
        sampler: ``class`` (P classes x ``m_per_class`` items) or ``random``; resolve
            ``auto`` with :func:`lightning_metric.losses.registry.resolve_sampler` first.
        m_per_class: items per class in a class-balanced batch.
        batches_per_epoch: training batches per epoch (default: one pass over the data).
        drop_last: with the ``random`` sampler, drop the last, incomplete batch of an
            epoch. Off by default: an epoch is one pass over every training item, as
            with ``DataLoader(shuffle=True)``. (Class-balanced batches are always full.)
        val_fraction: share of the training items held out for validation.
        protocol: ``standard`` or ``class_disjoint`` (see the module docstring).
        subset: use at most this many training items (stratified), for quick runs.
        eval_batch_size: batch size of the validation and test loaders.
        seed: seeds the split and the samplers.
        num_workers: DataLoader workers.
        num_classes: optional check: the number of training classes the config expects.
        image_size: optional check: the side of the square images the config expects
            (what ``model.encoder.image_size`` is set from).
    """

    def __init__(
        self,
        batch_size: int = 64,
        sampler: str = "class",
        m_per_class: int = 16,
        batches_per_epoch: int | None = None,
        drop_last: bool = False,
        val_fraction: float = 0.1,
        protocol: str = "standard",
        subset: int | None = None,
        eval_batch_size: int = 512,
        seed: int = 0,
        num_workers: int = 0,
        num_classes: int | None = None,
        image_size: int | None = None,
    ):
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"data.sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"data.protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if sampler == "class" and (batch_size % m_per_class or m_per_class < 1):
            raise ValueError(
                f"data.batch_size ({batch_size}) must be a multiple of data.m_per_class "
                f"({m_per_class})"
            )
        if subset is not None and subset < 1:
            raise ValueError(f"data.subset must be a positive number of items, got {subset}")
        self.batch_size, self.sampler, self.m_per_class = batch_size, sampler, m_per_class
        self.batches_per_epoch, self.drop_last = batches_per_epoch, drop_last
        self.val_fraction, self.protocol = val_fraction, protocol
        self.subset, self.eval_batch_size = subset, eval_batch_size
        self.seed, self.num_workers = seed, num_workers
        self.train_set = self.val_set = self.test_set = None
        if num_classes is not None and num_classes != self.num_classes:
            raise ValueError(
                f"data.num_classes={num_classes}, but {type(self).__name__} with "
                f"protocol={protocol!r} trains on {self.num_classes} classes"
            )

        if image_size is not None and image_size != self.image_size:
            raise ValueError(
                f"data.image_size={image_size}, but {type(self).__name__} holds images of side "
                f"{self.image_size}"
            )

    # -- what a subclass provides -------------------------------------------------
    def load_splits(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(train_x, train_y, test_x, test_y)``: float inputs and integer labels 0..C-1."""
        raise NotImplementedError

    class_names: tuple[str, ...] = ()
    image_size: int | None = None  # side of the square images, where the items are images

    # -- the rest -------------------------------------------------------------------
    @property
    def total_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_classes(self) -> int:
        """Classes the model trains on (half of them under ``class_disjoint``)."""
        return self.total_classes // 2 if self.protocol == "class_disjoint" else self.total_classes

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_x, train_y, test_x, test_y = self.load_splits()
        _check_labels(train_y, self.total_classes, "train")
        _check_labels(test_y, self.total_classes, "test")
        generator = torch.Generator().manual_seed(self.seed)
        order = _stratified_order(train_y, generator)
        if self.subset is not None:
            order = order[: self.subset]
        train_x, train_y = train_x[order], train_y[order]
        n_val = max(int(len(train_y) * self.val_fraction), 1)
        val_x, val_y = train_x[:n_val], train_y[:n_val]
        fit_x, fit_y = train_x[n_val:], train_y[n_val:]
        if self.protocol == "class_disjoint":
            seen = self.num_classes
            fit_x, fit_y = fit_x[fit_y < seen], fit_y[fit_y < seen]
            val_x, val_y = train_x[train_y >= seen], train_y[train_y >= seen]
            test_x, test_y = test_x[test_y >= seen], test_y[test_y >= seen]
        self.train_set = TensorDataset(fit_x, fit_y)
        self.val_set = TensorDataset(val_x, val_y)
        self.test_set = TensorDataset(test_x, test_y)

    def train_labels(self) -> Tensor:
        return self.train_set.tensors[1]

    def _batch_sampler(self):
        trainer = getattr(self, "trainer", None)
        replicas = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        if self.sampler == "class":
            return ClassBalancedBatchSampler(
                self.train_labels(), self.batch_size, self.m_per_class,
                length=self.batches_per_epoch, seed=self.seed, num_replicas=replicas, rank=rank,
            )
        return RandomBatchSampler(
            len(self.train_set), self.batch_size, drop_last=self.drop_last, seed=self.seed,
            num_replicas=replicas, rank=rank,
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_sampler=self._batch_sampler(),
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        """The test items (what ``recipes.train export=true`` embeds)."""
        return self._eval_loader(self.test_set)

    def _eval_loader(self, dataset) -> DataLoader:
        """``(x, label, dataset index)`` batches in dataset order; under DDP each rank gets
        its shard (``DistributedSampler`` without shuffling, padded to equal size), and the
        metrics drop the padding's copies by index."""
        trainer = getattr(self, "trainer", None)
        sampler = None
        if trainer is not None and trainer.world_size > 1:
            sampler = DistributedSampler(dataset, num_replicas=trainer.world_size,
                                         rank=trainer.global_rank, shuffle=False)
        return DataLoader(IndexedDataset(dataset), batch_size=self.eval_batch_size,
                          sampler=sampler, num_workers=self.num_workers)


def _stratified_order(labels: Tensor, generator: torch.Generator) -> Tensor:
    """A permutation that interleaves the classes, so any prefix is roughly stratified."""
    order = torch.randperm(len(labels), generator=generator)
    shuffled = labels[order]
    rank_in_class = torch.zeros_like(shuffled)
    for cls in shuffled.unique():
        members = shuffled == cls
        rank_in_class[members] = torch.arange(int(members.sum()))
    return order[torch.argsort(rank_in_class * (int(labels.max()) + 1) + shuffled, stable=True)]


def _check_labels(labels: Tensor, num_classes: int, split: str) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{split} labels must lie in [0, {num_classes}), found "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
