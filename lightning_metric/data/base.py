"""The DataModule shared by labelled data sets: splits, evaluation protocols, samplers.

A subclass gives its items one of two ways, and this class validates them, cuts
the validation split, applies the evaluation protocol and builds the loaders:

- in memory (:meth:`~LabelledDataModule.load_splits`): ``(train_x, train_y, test_x,
  test_y)`` tensors (digits, Fashion-MNIST); the sets are ``TensorDataset`` objects.
- as items (:meth:`~LabelledDataModule.load_items`): the labels and split of every
  item, and a dataset that loads item ``i`` only when asked (image files, texts); the
  sets are ``torch.utils.data.Subset`` views of it, so nothing is read in ``setup``.

The protocols:

- ``standard``: train on every class of the train split; validation is the val split
  where the data has one, else a held-out stratified part of the train split; test is
  the test split.
- ``class_disjoint``: train on the first half of the classes (relabelled
  ``0..C/2-1``); validation and test retrieve among the unseen other half
  (validation from the val split, or the train split's items of those classes; test
  from the test split): the usual metric-learning protocol.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

from ..samplers import ClassBalancedBatchSampler, NoDuplicatesBatchSampler, RandomBatchSampler
from .in_memory import batched_view, collate_batches
from .indexed import IndexedDataset
from .roles import EvalRoles
from .views import MultiViewDataset, collate_views

PROTOCOLS = ("standard", "class_disjoint")
SAMPLERS = ("class", "random", "no_duplicates")
SPLITS = ("train", "val", "test")
TRAIN, VAL, TEST = range(3)
"""Split codes of :attr:`Items.split`."""

log = logging.getLogger(__name__)

Transform = Callable[[Tensor], Any]


@dataclass(frozen=True)
class Items:
    """What a data set of items gives :class:`LabelledDataModule` (``N`` items).

    Attributes:
        labels: ``(N,)`` int64 class ids in ``0..C-1``.
        split: ``(N,)`` int64 split codes ``TRAIN`` / ``VAL`` / ``TEST`` (0 / 1 / 2). With no
            ``VAL`` item, validation is cut out of the train items (``val_fraction``).
        train: the ``N`` items as training examples (``train_transform``), loaded lazily.
        eval: the ``N`` items as evaluation examples (``eval_transform``), loaded lazily.
    """

    labels: Tensor
    split: Tensor
    train: Dataset
    eval: Dataset


class LabelledDataModule(pl.LightningDataModule):
    """Items with integer class labels, in ``(x, label)`` batches.

    Args:
        batch_size: items per training batch; under DDP the global batch, shared by the
            devices (see :mod:`lightning_metric.samplers`).
        sampler: ``class`` (P classes x ``m_per_class`` items), ``random`` or
            ``no_duplicates`` (random batches in which no label appears twice: in-batch
            negatives that are all of other classes); resolve ``auto`` with
            :func:`lightning_metric.losses.registry.resolve_sampler` first.
        m_per_class: items per class in a class-balanced batch.
        batches_per_epoch: training batches per epoch (default: one pass over the data).
        drop_last: with the ``random`` sampler, drop the last, incomplete batch of an
            epoch. Off by default: an epoch is one pass over every training item, as
            with ``DataLoader(shuffle=True)``. (Class-balanced batches are always full.)
        val_fraction: share of the training items held out for validation (when the data
            has no val split of its own), stratified; a class never has a single validation
            item (it gets a second one, or none).
        protocol: ``standard`` or ``class_disjoint`` (see the module docstring).
        subset: use at most this many training items (stratified), for quick runs.
        eval_batch_size: batch size of the validation and test loaders.
        seed: seeds the split and the samplers.
        num_workers: DataLoader workers; None: 0 for data in memory, ``os.cpu_count()`` for
            data read from files (:attr:`reads_files`).
        num_classes: optional check: the number of training classes the config expects.
        image_size: optional check: the side of the square images the config expects
            (what ``model.encoder.image_size`` is set from); for data read from files, the
            side the transforms produce (kept as ``image_size``, not checked).
        train_transform: ``uint8 (C, H, W) image -> model input`` for training items read
            from files (None: ``float32`` in [0, 1]); unused by data in memory.
        eval_transform: the same for validation, test and predict items.
        tokenizer: a Hugging Face tokenizer, for text items (``model=hf_text`` sets it).
        max_length: tokens kept per text (longer ones are truncated).
        pin_memory: pin the batches' memory; None: when the trainer runs on a GPU.
        persistent_workers: keep the loader workers between epochs (when ``num_workers > 0``).
        views: 2 or more: self-supervised training (:mod:`~lightning_metric.data.views`):
            each training batch holds ``batch_size / views`` random items, each as ``views``
            augmentations labelled by the item's index (its class label unused; the
            ``sampler`` setting too); in-memory images are augmented by
            ``train_transform``, which must then be given. Evaluation is unchanged.

    Raises:
        ValueError: a setting out of range, named ``data.<setting>`` with its value.
    """

    reads_files: bool = False
    """True where items are read from files in the loader workers (``num_workers`` default)."""

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
        num_workers: int | None = None,
        num_classes: int | None = None,
        image_size: int | None = None,
        train_transform: Transform | None = None,
        eval_transform: Transform | None = None,
        tokenizer: Any = None,
        max_length: int = 128,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        views: int = 1,
    ):
        super().__init__()
        if views < 1 or (views > 1 and batch_size % views):
            raise ValueError(
                f"data.views must be >= 1 and divide data.batch_size ({batch_size}), got {views}")
        if views > 1 and tokenizer is not None:
            raise ValueError(f"data.views={views}: views are augmentations of images, not texts")
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
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0 (or null), got {num_workers}")
        if max_length < 1:
            raise ValueError(f"data.max_length must be a positive token count, got {max_length}")
        self.batch_size, self.sampler, self.m_per_class = batch_size, sampler, m_per_class
        self.batches_per_epoch, self.drop_last = batches_per_epoch, drop_last
        self.val_fraction, self.protocol = val_fraction, protocol
        self.subset, self.eval_batch_size = subset, eval_batch_size
        self.seed = seed
        if num_workers is None:
            num_workers = (os.cpu_count() or 1) if self.reads_files else 0
        self.num_workers = num_workers
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.tokenizer, self.max_length = tokenizer, max_length
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.views = views
        self.train_set = self.val_set = self.test_set = None
        self.split_rows: dict[str, Tensor] = {}
        self.split_origin: dict[str, str] = {}
        """How a split was made where the data did not give it (for error messages)."""
        self._train_labels: Tensor | None = None
        self._check_num_classes(num_classes)
        if self.reads_files:  # the side the transforms produce: declared, not checked
            self.image_size = image_size
        elif image_size is not None and image_size != self.image_size:
            raise ValueError(
                f"data.image_size={image_size}, but {type(self).__name__} holds images of side "
                f"{self.image_size}"
            )

    def _check_num_classes(self, num_classes: int | None) -> None:
        if num_classes is not None and num_classes != self.num_classes:
            raise ValueError(
                f"data.num_classes={num_classes}, but {type(self).__name__} with "
                f"protocol={self.protocol!r} trains on {self.num_classes} classes"
            )

    # -- what a subclass provides -------------------------------------------------
    def load_splits(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(train_x, train_y, test_x, test_y)``: float inputs and integer labels 0..C-1."""
        raise NotImplementedError

    def load_items(self) -> Items | None:
        """The data as lazily loaded items, or None (the default) for :meth:`load_splits`."""
        return None

    def collate_fn(self) -> Callable | None:
        """The loaders' ``collate_fn`` (None: PyTorch's default)."""
        return None

    def eval_roles(self, stage: str) -> EvalRoles | None:
        """Query / gallery roles of the ``val`` or ``test`` set, in its dataset order.

        None (the default): self-retrieval, every item is a query and a gallery item.
        """
        return None

    def check_split_rows(self, labels: Tensor, rows: dict[str, Tensor]) -> None:
        """Called by :meth:`setup` with the items' labels and the rows of each final set
        (``train``, ``val``, ``test``), before the sets are built: raise to stop there."""

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
        self.split_origin = {}
        items = self.load_items()
        if items is None:
            self._setup_tensors()
        else:
            self._setup_items(items)

    def _setup_tensors(self) -> None:
        train_x, train_y, test_x, test_y = self.load_splits()
        _check_labels(train_y, self.total_classes, "train")
        _check_labels(test_y, self.total_classes, "test")
        fit, val, test = self._split(train_y, test_y)
        self.train_set = TensorDataset(train_x[fit], train_y[fit])
        self.val_set = TensorDataset(train_x[val], train_y[val])
        self.test_set = TensorDataset(test_x[test], test_y[test])
        self._train_labels = train_y[fit]

    def _setup_items(self, items: Items) -> None:
        _check_labels(items.labels, self.total_classes, "item")
        rows = {name: torch.where(items.split == code)[0] for code, name in enumerate(SPLITS)}
        has_val = len(rows["val"]) > 0
        fit, val, test = self._split(
            items.labels[rows["train"]], items.labels[rows["test"]],
            items.labels[rows["val"]] if has_val else None,
        )
        if not has_val and self.protocol == "standard":
            self.split_origin["val"] = f"cut out of train by data.val_fraction={self.val_fraction}"
        val_rows = rows["val"] if has_val else rows["train"]
        final = {"train": rows["train"][fit], "val": val_rows[val], "test": rows["test"][test]}
        self._report_protocol(rows, final)
        self.check_split_rows(items.labels, final)
        self._check_not_empty(final, len(rows["train"]), has_val)
        self.split_rows = final
        self.train_set = Subset(items.train, final["train"].tolist())
        self.val_set = Subset(items.eval, final["val"].tolist())
        self.test_set = Subset(items.eval, final["test"].tolist())
        self._train_labels = items.labels[final["train"]]

    def _check_not_empty(self, final: dict[str, Tensor], n_train: int, has_val: bool) -> None:
        for name, rows in final.items():
            if len(rows):
                continue
            if name == "val" and not has_val and self.protocol == "standard":
                raise ValueError(
                    f"no validation items: data.val_fraction={self.val_fraction} of the "
                    f"{n_train} training items leaves no class with two (a class never "
                    "validates on a single item): raise it, or give the data a val split"
                )
            how = [f"data.protocol={self.protocol!r}"]
            if self.subset:
                how.append(f"data.subset={self.subset}")
            if name in self.split_origin:  # a cut never leaves a class a single item
                how.append(f"{self.split_origin[name]}, of classes with 4 or more items")
            raise ValueError(f"{type(self).__name__} has no {name} items ({'; '.join(how)})")

    def _split(
        self, train_y: Tensor, test_y: Tensor, val_y: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Positions of the fit, validation and test items: fit and test into ``train_y`` and
        ``test_y``; validation into ``val_y``, or into ``train_y`` when it is None."""
        generator = torch.Generator().manual_seed(self.seed)
        order = _stratified_order(train_y, generator)
        if self.subset is not None:
            order = order[: self.subset]
        if val_y is None and self.protocol == "class_disjoint":  # no cut, see below
            fit = val = val_pool = order
            val_labels = train_y
        elif val_y is None:
            n_val = max(int(len(order) * self.val_fraction), 1)
            val, fit = _paired(order[:n_val], order[n_val:], train_y)
            val_pool, val_labels = order, train_y
        else:
            val = val_pool = torch.arange(len(val_y))
            fit, val_labels = order, val_y
        test = torch.arange(len(test_y))
        if self.protocol == "class_disjoint":  # validation is the unseen classes: no cut
            seen = self.num_classes
            fit = order[train_y[order] < seen]
            val = val_pool[val_labels[val_pool] >= seen]
            test = test[test_y >= seen]
        return fit, val, test

    def _report_protocol(self, rows: dict[str, Tensor], final: dict[str, Tensor]) -> None:
        """Says how many items the protocol (and ``subset``) leaves out: a warning for data
        read from files (items a user listed), a log line for data in memory."""
        unused = sum(len(r) for r in rows.values()) - sum(len(r) for r in final.values())
        if not unused:
            return
        message = (
            f"{self.protocol}: {unused} items are not used (training on {len(final['train'])} "
            f"items, validating on {len(final['val'])}, testing on {len(final['test'])})"
        )
        if self.protocol == "class_disjoint":
            message += (f": training classes 0..{self.num_classes - 1}, evaluation classes "
                        f"{self.num_classes}..{self.total_classes - 1}")
        if self.subset is not None:
            message += f"; data.subset={self.subset}"
        if self.reads_files:
            warnings.warn(message, stacklevel=3)
        else:
            log.info(message)

    # -- checkpoints: the class ids of data read from files ---------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"class_names": [...]}`` for data read from files (Lightning keeps it in
        checkpoints), so a resumed or evaluated run gives each class its trained id."""
        return {"class_names": list(self.class_names)} if self.reads_files else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the saved class ids: classes of the checkpoint keep their ids, classes
        new to the data follow them (sorted, with a warning). Sets up again if needed
        (Lightning restores the DataModule after ``setup``).

        Raises:
            ValueError: the data is in memory and its classes differ from the saved ones.
        """
        saved = tuple(state_dict.get("class_names", ()))
        if not saved or saved == tuple(self.class_names):
            return
        if not self.reads_files:
            raise ValueError(
                f"the checkpoint's classes {list(saved)} differ from {type(self).__name__}'s "
                f"{list(self.class_names)}"
            )
        new = sorted(set(self.class_names) - set(saved))
        if new:
            warnings.warn(
                f"{len(new)} classes of the data are not in the checkpoint's class list and "
                f"get the ids {len(saved)}..{len(saved) + len(new) - 1}: {new[:10]}",
                stacklevel=2,
            )
        was_set_up = self.train_set is not None
        self.class_names = (*saved, *new)
        self.train_set = self.val_set = self.test_set = None
        if was_set_up:
            self.setup()

    def train_labels(self) -> Tensor:
        """``(N_train,)`` labels of the training set, in its order (what the samplers need)."""
        if self._train_labels is None:
            raise RuntimeError("call setup() before train_labels()")
        return self._train_labels

    def _replicas_and_rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _batch_sampler(self):
        replicas, rank = self._replicas_and_rank()
        if self.sampler == "class":
            return ClassBalancedBatchSampler(
                self.train_labels(), self.batch_size, self.m_per_class,
                length=self.batches_per_epoch, seed=self.seed, num_replicas=replicas, rank=rank,
            )
        if self.sampler == "no_duplicates":  # random batches, no label twice in one
            labels = self.train_labels()
            classes = len(torch.unique(labels))
            if self.batch_size > classes:
                raise ValueError(
                    f"data.sampler=no_duplicates puts no label twice in a batch: "
                    f"data.batch_size ({self.batch_size}) must be at most the {classes} "
                    "training classes")
            return NoDuplicatesBatchSampler(
                labels, self.batch_size, drop_last=self.drop_last, seed=self.seed,
                num_replicas=replicas, rank=rank,
            )
        return RandomBatchSampler(
            len(self.train_set), self.batch_size, drop_last=self.drop_last, seed=self.seed,
            num_replicas=replicas, rank=rank,
        )

    def _loader_options(self) -> dict[str, Any]:
        """Workers, memory pinning and collation shared by every loader."""
        pin_memory = self.pin_memory
        if pin_memory is None:
            trainer = getattr(self, "trainer", None)
            pin_memory = trainer is not None and trainer.strategy.root_device.type == "cuda"
        options: dict[str, Any] = {"num_workers": self.num_workers, "pin_memory": pin_memory}
        if self.num_workers > 0:
            options["persistent_workers"] = self.persistent_workers
        collate = self.collate_fn()
        if collate is not None:
            options["collate_fn"] = collate
        return options

    def train_dataloader(self) -> DataLoader:
        if self.views > 1:
            return self._multi_view_loader()
        dataset, options = self._fetched_by_batch(self.train_set, with_index=False)
        return DataLoader(dataset, batch_sampler=self._batch_sampler(), **options)

    def _multi_view_loader(self) -> DataLoader:
        """Random items, each as ``views`` augmentations sharing the item's index as label."""
        if not self.reads_files and self.train_transform is None:
            raise ValueError(
                f"data.views={self.views} needs augmentations of the in-memory images: set "
                "transform=default (with small_cnn also transform.image_size, transform.mean "
                "and transform.std, e.g. 28, [0.0], [1.0])")
        transform = None if self.reads_files else self.train_transform
        replicas, rank = self._replicas_and_rank()
        sampler = RandomBatchSampler(
            len(self.train_set), self.batch_size // self.views, drop_last=self.drop_last,
            seed=self.seed, num_replicas=replicas, rank=rank)
        return DataLoader(MultiViewDataset(self.train_set, self.views, transform),
                          batch_sampler=sampler,
                          **{**self._loader_options(), "collate_fn": collate_views})

    def _fetched_by_batch(self, dataset, with_index: bool) -> tuple[Any, dict[str, Any]]:
        """In-memory tensors: a view that fetches a whole batch with one index per tensor
        (:mod:`~lightning_metric.data.in_memory`); other data sets as they are."""
        options = self._loader_options()
        view = None if "collate_fn" in options else batched_view(dataset, with_index)
        if view is None:
            return (IndexedDataset(dataset) if with_index else dataset), options
        return view, {**options, "collate_fn": collate_batches}

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
        dataset, options = self._fetched_by_batch(dataset, with_index=True)
        return DataLoader(dataset, batch_size=self.eval_batch_size, sampler=sampler, **options)


def stratified_cut(labels: Tensor, candidates: Tensor, fraction: float, seed: int) -> Tensor:
    """``int(fraction * n_c)`` randomly drawn items of each class among ``candidates`` (2
    instead of 1, or 0 where fewer than 4: no class alone in the cut).

    Args:
        labels: ``(N,)`` class ids of every item.
        candidates: ``(M,)`` item indices to draw from.
        fraction: share of each class's candidates to draw, in [0, 1).
        seed: seeds the draw (the same seed gives the same items).

    Returns:
        ``(K,)`` sorted item indices, a subset of ``candidates``.
    """
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for cls in labels[candidates].unique().tolist():
        members = candidates[labels[candidates] == cls]
        members = members[torch.randperm(len(members), generator=generator)]
        chosen.append(members[: _paired_count(len(members), fraction)])
    return torch.cat(chosen).sort().values if chosen else candidates[:0]


def _paired_count(n: int, fraction: float) -> int:
    """``int(n * fraction)``, but never 1 (an item alone in its class retrieves nothing):
    2 where two or more items stay behind, else 0."""
    count = int(n * fraction)
    return count if count != 1 else (2 if n >= 4 else 0)


def _paired(val: Tensor, fit: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """No class with a single validation item (it would have no positive to retrieve): a
    second item joins it from ``fit`` where two or more stay there, else it goes back."""
    if not len(val):
        return val, fit
    counts = torch.bincount(labels[val], minlength=int(labels.max()) + 1)
    for cls in torch.where(counts == 1)[0].tolist():
        in_fit = fit[labels[fit] == cls]
        if len(in_fit) >= 3:
            val, fit = torch.cat([val, in_fit[:1]]), fit[fit != in_fit[0]]
        else:
            alone = val[labels[val] == cls]
            val, fit = val[val != alone[0]], torch.cat([fit, alone])
    return val, fit


def _stratified_order(labels: Tensor, generator: torch.Generator) -> Tensor:
    """A permutation that interleaves the classes, so any prefix is roughly stratified."""
    order = torch.randperm(len(labels), generator=generator)
    if not len(labels):
        return order
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
