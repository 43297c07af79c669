"""Batch samplers: class-balanced (P classes x K items), random, and random without
duplicate keys in a batch (query-document and image-text rows).

All are ``torch.utils.data.Sampler`` objects that yield lists of dataset
indices (pass them as ``batch_sampler=``). Randomness comes from a
``torch.Generator`` seeded from ``(seed, epoch)``, never from the process-wide
generator, so a run is reproducible and every epoch gets a new shuffle. Under
a Lightning ``Trainer`` the epoch is set for you, in any ``DataLoader`` (yours
or a DataModule's), and a run resumed from a checkpoint draws the batches an
uninterrupted run draws: Lightning calls ``set_epoch`` on
``dataloader.batch_sampler.sampler`` at the start of every training epoch (never
on the batch sampler itself), and that is where these samplers keep their
epoch (an :class:`EpochCounter`). In a plain loop call ``sampler.set_epoch(epoch)``
yourself.

Under DDP ``batch_size`` is the **global** batch, the one an in-batch loss
gathering across ranks sees: every rank draws the same sequence of global
batches, and at each step rank ``r`` of ``W`` takes its part of that step's
batch (class groups ``r, r + W, ...`` of a class-balanced batch, items
``r, r + W, ...`` of a random one). So each rank's batch is class-balanced, the
ranks' batches of one step are disjoint and together are the global batch, and
every rank has the same number of batches per epoch: exactly the batches of a
single process, whatever the number of devices. ``num_replicas`` and ``rank``
default to those of the initialised ``torch.distributed`` process group (1 and
0 without one), so a batch sampler handed to any ``DataLoader`` under DDP shards
itself.

Example::

    >>> sampler = ClassBalancedBatchSampler(labels, batch_size=32, m_per_class=4)
    >>> loader = DataLoader(dataset, batch_sampler=sampler)
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Hashable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Sampler

from .distributed import is_initialized


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator for one epoch, independent of every other (seed, epoch)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class EpochCounter:
    """The epoch a batch sampler draws for, kept where Lightning sets it.

    Lightning's loops call ``set_epoch(epoch)`` on ``dataloader.sampler`` and on
    ``dataloader.batch_sampler.sampler`` at the start of every training epoch
    (with the restored epoch after a resume), not on the batch sampler. The batch
    samplers here hold one of these as their ``sampler`` attribute, so the
    trainer's epoch reaches them without a callback.
    """

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch = epoch


class _DistributedBatches(Sampler[list[int]]):
    """Shared epoch / rank bookkeeping: subclasses draw the global batches of an epoch and
    say how many items form an indivisible group (``group_size``) when a batch is shared
    among ranks."""

    group_size = 1

    def __init__(self, seed: int, num_replicas: int | None, rank: int | None):
        if (num_replicas is None) != (rank is None):
            raise ValueError("pass both num_replicas and rank, or neither (torch.distributed's)")
        if num_replicas is not None and (num_replicas < 1 or not 0 <= rank < num_replicas):
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        self.seed, self._num_replicas, self._rank = seed, num_replicas, rank
        self.sampler = EpochCounter()

    @property
    def num_replicas(self) -> int:
        """The ranks sharing each batch: as given, else the process group's size (else 1)."""
        if self._num_replicas is not None:
            return self._num_replicas
        return dist.get_world_size() if is_initialized() else 1

    @property
    def rank(self) -> int:
        if self._rank is not None:
            return self._rank
        return dist.get_rank() if is_initialized() else 0

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """Draw the batches of ``epoch`` from now on (a Lightning Trainer calls this for you)."""
        self.sampler.set_epoch(epoch)

    def global_batches(self, generator: torch.Generator) -> list[list[int]]:
        raise NotImplementedError

    def num_global_batches(self) -> int:
        raise NotImplementedError

    def check_shareable(self, num_replicas: int) -> None:
        """Raise if a global batch cannot give every one of ``num_replicas`` ranks a group."""

    def __len__(self) -> int:
        return self.num_global_batches()

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: the epoch is read at the first batch, not when iter() is called.
        # Lightning creates the iterator before it sets the epoch when a run resumes.
        replicas, rank = self.num_replicas, self.rank
        self.check_shareable(replicas)
        for batch in self.global_batches(epoch_generator(self.seed, self.epoch)):
            yield _part_of(batch, self.group_size, replicas, rank)


def _part_of(batch: list[int], group_size: int, replicas: int, rank: int) -> list[int]:
    """Rank ``rank``'s share of a global batch: its groups ``rank, rank + replicas, ...``."""
    if replicas == 1:
        return batch
    groups = [batch[i:i + group_size] for i in range(0, len(batch), group_size)]
    return [item for group in groups[rank::replicas] for item in group]


class ClassBalancedBatchSampler(_DistributedBatches):
    """Batches of ``batch_size // m_per_class`` distinct classes with ``m_per_class`` items each.

    Each class's items are shuffled and cut into groups of ``m_per_class``; the
    last group of a class, and classes with fewer than ``m_per_class`` items, are
    filled by drawing that class's items again (with replacement). An epoch uses
    every group once while enough classes remain to fill a batch, so every item
    is seen once per epoch where the class sizes allow.

    Under DDP ``batch_size`` is the global batch: each of the ``W`` ranks gets
    ``classes_per_batch / W`` of its classes (rank ``r`` the classes ``r, r + W, ...``
    of the batch), all ``m_per_class`` items of each.

    Args:
        labels: ``(N,)`` class label of every dataset item.
        batch_size: items per (global) batch; a multiple of ``m_per_class``.
        m_per_class: items of each class in a batch (at least 2 for positives).
        length: batches per epoch; default: the number of groups divided by the classes
            per batch.
        seed: with the epoch, seeds the draw.
        num_replicas, rank: the ranks sharing each batch and this one's place; default:
            the initialised ``torch.distributed`` group's (1 and 0 without one).

    Raises:
        ValueError: ``batch_size`` not a multiple of ``m_per_class``, more classes per batch
            than the data has, or (when iterating) fewer classes per batch than ranks.
    """

    def __init__(
        self,
        labels: Sequence[int] | Tensor,
        batch_size: int,
        m_per_class: int,
        length: int | None = None,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        super().__init__(seed, num_replicas, rank)
        labels = torch.as_tensor(labels)
        if m_per_class < 1 or batch_size < 1 or batch_size % m_per_class:
            raise ValueError(
                f"batch_size ({batch_size}) must be a positive multiple of m_per_class "
                f"({m_per_class})"
            )
        self.batch_size, self.m_per_class = batch_size, m_per_class
        self.classes_per_batch = batch_size // m_per_class
        self.group_size = m_per_class
        self.items_by_class = [torch.where(labels == c)[0] for c in torch.unique(labels)]
        if len(self.items_by_class) < self.classes_per_batch:
            raise ValueError(
                f"batch_size / m_per_class = {self.classes_per_batch} classes per batch, but the "
                f"data has only {len(self.items_by_class)} classes: lower batch_size or raise "
                "m_per_class"
            )
        if length is not None and length < 1:
            raise ValueError(f"length must be a positive number of batches, got {length}")
        self.length = length

    def check_shareable(self, num_replicas: int) -> None:
        if self.classes_per_batch < num_replicas:
            raise ValueError(
                f"batch_size / m_per_class = {self.classes_per_batch} classes per batch cannot "
                f"be shared by {num_replicas} devices (batch_size is the global batch): raise "
                "batch_size or lower m_per_class"
            )

    def _groups_per_class(self) -> list[int]:
        return [-(-len(items) // self.m_per_class) for items in self.items_by_class]

    def num_global_batches(self) -> int:
        if self.length is not None:
            return self.length
        return max(sum(self._groups_per_class()) // self.classes_per_batch, 1)

    def _class_groups(self, cls: int, generator: torch.Generator) -> list[Tensor]:
        items = self.items_by_class[cls]
        shuffled = items[torch.randperm(len(items), generator=generator)]
        short = -len(shuffled) % self.m_per_class
        if short:
            extra = items[torch.randint(len(items), (short,), generator=generator)]
            shuffled = torch.cat([shuffled, extra])
        return list(shuffled.view(-1, self.m_per_class))

    def global_batches(self, generator: torch.Generator) -> list[list[int]]:
        groups = [self._class_groups(c, generator) for c in range(len(self.items_by_class))]
        batches = []
        for _ in range(self.num_global_batches()):
            remaining = torch.tensor([len(g) for g in groups], dtype=torch.float)
            if int((remaining > 0).sum()) < self.classes_per_batch:
                for cls in torch.where(remaining == 0)[0].tolist():
                    groups[cls] = self._class_groups(cls, generator)
                remaining = torch.tensor([len(g) for g in groups], dtype=torch.float)
            chosen = torch.multinomial(remaining, self.classes_per_batch, generator=generator)
            batches.append(torch.cat([groups[c].pop() for c in chosen.tolist()]).tolist())
        return batches


class RandomBatchSampler(_DistributedBatches):
    """Batches of ``batch_size`` items drawn without replacement from a fresh permutation.

    Under DDP ``batch_size`` is the global batch: rank ``r`` of ``W`` gets its items
    ``r, r + W, ...``. A last batch too small to give every rank an item is joined to
    the one before it (nothing is dropped unless ``drop_last``).

    Args:
        num_items: dataset size.
        batch_size: items per (global) batch.
        drop_last: drop the last incomplete batch.
        seed: with the epoch, seeds the permutation.
        num_replicas, rank: the ranks sharing each batch and this one's place; default:
            the initialised ``torch.distributed`` group's (1 and 0 without one).

    Raises:
        ValueError: a non-positive size, or (when iterating) fewer items per batch than ranks.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        super().__init__(seed, num_replicas, rank)
        if batch_size < 1 or num_items < 1:
            raise ValueError(
                f"batch_size ({batch_size}) and num_items ({num_items}) must be positive"
            )
        self.num_items, self.batch_size, self.drop_last = num_items, batch_size, drop_last

    def check_shareable(self, num_replicas: int) -> None:
        if min(self.batch_size, self.num_items) < num_replicas:
            raise ValueError(
                f"batches of {min(self.batch_size, self.num_items)} items cannot be shared by "
                f"{num_replicas} devices (batch_size is the global batch)"
            )

    def num_global_batches(self) -> int:
        full, rest = divmod(self.num_items, self.batch_size)
        if self.drop_last or (rest and full and rest < self.num_replicas):
            return max(full, 1)   # dropped, or joined to the batch before it
        return full + bool(rest)

    def global_batches(self, generator: torch.Generator) -> list[list[int]]:
        order = torch.randperm(self.num_items, generator=generator)
        batches = [chunk.tolist() for chunk in order.split(self.batch_size)]
        if len(batches) > self.num_global_batches():
            last = batches.pop()
            if not self.drop_last:
                batches[-1] += last
        return batches


class NoDuplicatesBatchSampler(_DistributedBatches):
    """Random batches in which no key appears twice: in-batch negatives really are negatives.

    Each row has one or more keys (the texts and image paths of a query-document row, or a
    class label); a batch never holds two rows sharing a key, across fields too (the text of
    one row's query is another row's document: a false negative). As sentence-transformers'
    ``NoDuplicatesBatchSampler``, rows are taken in a fresh random order and a row whose key
    is already in a batch waits for a later one; unlike it, every epoch has the same number
    of batches (what Lightning counts once, before the first epoch): ``ceil(N / batch_size)``,
    all full but the last (``floor`` with ``drop_last``), and a row left over at the end is
    swapped into place with a row of a full batch. Every row is in one batch an epoch
    (unless ``drop_last`` drops the last, short batch's rows).

    Under DDP ``batch_size`` is the global batch: rank ``r`` of ``W`` gets its items
    ``r, r + W, ...``; a last batch too small to give every rank an item is joined to the
    one before it, as :class:`RandomBatchSampler` does.

    Args:
        keys: the keys of every row: a hashable (one key: a text, a label) or a tuple / list /
            set of hashables (several). A 1-D tensor of labels works too.
        batch_size: rows per (global) batch.
        drop_last: drop the last, short batch.
        seed: with the epoch, seeds the order.
        num_replicas, rank: the ranks sharing each batch and this one's place; default:
            the initialised ``torch.distributed`` group's (1 and 0 without one).

    Raises:
        ValueError: a non-positive size; a key in more rows than an epoch has batches (it
            cannot be kept once a batch: e.g. labels as keys with fewer classes than
            ``batch_size``), naming the key; (when iterating) fewer rows a batch than ranks.

    Example::

        >>> keys = list(zip(queries, documents))   # the texts of every row
        >>> sampler = NoDuplicatesBatchSampler(keys, batch_size=32)
        >>> loader = DataLoader(dataset, batch_sampler=sampler)
    """

    def __init__(
        self,
        keys: Sequence[Hashable] | Sequence[Sequence[Hashable]] | Tensor,
        batch_size: int,
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        super().__init__(seed, num_replicas, rank)
        rows = keys.tolist() if isinstance(keys, Tensor) else list(keys)
        if batch_size < 1 or not rows:
            raise ValueError(
                f"batch_size ({batch_size}) and the number of rows ({len(rows)}) must be positive"
            )
        ids: dict[Hashable, int] = {}
        self.keys = [
            frozenset(ids.setdefault(key, len(ids)) for key in _row_keys(row)) for row in rows
        ]
        self._key_names = list(ids)
        self.num_items, self.batch_size, self.drop_last = len(rows), batch_size, drop_last
        counts = Counter(key for row in self.keys for key in row)
        key, most = counts.most_common(1)[0]
        batches = self.num_global_batches()
        if most > batches and batches > 1:
            raise ValueError(
                f"the key {_shown(self._key_names[key])} is in {most} rows, more than the "
                f"{batches} batches of an epoch ({self.num_items} rows, batch_size="
                f"{batch_size}): no batching keeps it once a batch; lower batch_size or use "
                "random batches"
            )

    def check_shareable(self, num_replicas: int) -> None:
        if min(self.batch_size, self.num_items) < num_replicas:
            raise ValueError(
                f"batches of {min(self.batch_size, self.num_items)} items cannot be shared by "
                f"{num_replicas} devices (batch_size is the global batch)"
            )

    def _capacities(self) -> list[int]:
        """The size of every batch of an epoch (the same every epoch)."""
        full, rest = divmod(self.num_items, self.batch_size)
        if not full:
            return [rest]
        if self.drop_last or not rest:
            return [self.batch_size] * full
        if rest < self.num_replicas:  # joined to the batch before it
            return [self.batch_size] * (full - 1) + [self.batch_size + rest]
        return [self.batch_size] * full + [rest]

    def num_global_batches(self) -> int:
        return len(self._capacities())

    def global_batches(self, generator: torch.Generator) -> list[list[int]]:
        capacities = self._capacities()
        batches: list[list[int]] = [[] for _ in capacities]
        taken: list[set[int]] = [set() for _ in capacities]
        first_open, left_over = 0, []
        for row in torch.randperm(self.num_items, generator=generator).tolist():
            keys = self.keys[row]
            for index in range(first_open, len(capacities)):
                if len(batches[index]) < capacities[index] and taken[index].isdisjoint(keys):
                    batches[index].append(row)
                    taken[index] |= keys
                    break
            else:
                left_over.append(row)
            while first_open < len(capacities) and (
                    len(batches[first_open]) == capacities[first_open]):
                first_open += 1
        duplicates = 0
        for row in left_over:
            open_batches = [i for i, cap in enumerate(capacities) if len(batches[i]) < cap]
            if not open_batches:
                break  # drop_last: the rows of the short batch are dropped
            if not self._swap_in(row, open_batches, batches, taken):
                index = min(open_batches, key=lambda i: len(taken[i] & self.keys[row]))
                batches[index].append(row)
                taken[index] |= self.keys[row]
                duplicates += 1
        if duplicates:
            warnings.warn(
                f"NoDuplicatesBatchSampler: {duplicates} rows could not be placed without "
                f"repeating a key in their batch this epoch (epoch {self.epoch}); their keys "
                f"repeat too often for batch_size={self.batch_size}", stacklevel=2)
        return [batch for batch in batches if batch]

    def _swap_in(self, row: int, open_batches: list[int], batches: list[list[int]],
                 taken: list[set[int]]) -> bool:
        """Put ``row`` in a batch where it clashes with one row only, which moves on to an
        open batch that takes it; False when there is no such pair."""
        keys = self.keys[row]
        for target in open_batches:
            for index, batch in enumerate(batches):
                if index == target:
                    continue
                clash = taken[index] & keys
                for position, other in enumerate(batch):
                    other_keys = self.keys[other]
                    if clash <= other_keys and taken[target].isdisjoint(other_keys):
                        batch[position] = row
                        taken[index] = set().union(*(self.keys[r] for r in batch))
                        batches[target].append(other)
                        taken[target] |= other_keys
                        return True
        return False


def _row_keys(row) -> tuple:
    return tuple(row) if isinstance(row, tuple | list | set | frozenset) else (row,)


def _shown(value: Hashable) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
