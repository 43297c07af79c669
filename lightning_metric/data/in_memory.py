"""In-memory items fetched a batch at a time: one tensor index per batch, not one per item.

A ``DataLoader`` over a ``TensorDataset`` indexes the tensors once per item and then
stacks the items again (``default_collate``): for 128 small images that is about half a
millisecond a batch, a few percent of a small model's training step. PyTorch's fetcher
hands a dataset that defines ``__getitems__`` the batch's indices at once;
:class:`TensorBatches` answers with one fancy index per tensor, already batched, and
:func:`collate_batches` passes such batches through. The view is made by the loaders
(:func:`batched_view`); the DataModules' ``train_set`` / ``val_set`` stay plain datasets,
so a ``DataLoader`` a user builds over them behaves as usual.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset, default_collate


class _Batch(tuple):
    """A batch that is already collated."""


class TensorBatches(Dataset):
    """The rows ``rows`` of ``tensors``, fetched a batch at a time.

    ``view[i]`` is ``tuple(t[rows[i]] for t in tensors)``; ``view.__getitems__(indices)``
    is those items already collated (equal to ``default_collate`` of them), and
    ``with_index=True`` appends the positions themselves as a last ``(B,)`` tensor (the
    ``(x, label, index)`` batches of the evaluation loaders). Use with
    ``collate_fn=collate_batches``.
    """

    def __init__(self, tensors: Sequence[Tensor], rows: Tensor | None = None,
                 with_index: bool = False):
        self.tensors, self.with_index = tuple(tensors), with_index
        self.rows = rows

    def __len__(self) -> int:
        return len(self.tensors[0]) if self.rows is None else len(self.rows)

    def _fetch(self, positions: Tensor) -> tuple[Tensor, ...]:
        rows = positions if self.rows is None else self.rows[positions]
        items = tuple(tensor[rows] for tensor in self.tensors)
        return (*items, positions) if self.with_index else items

    def __getitem__(self, position: int) -> tuple[Tensor, ...]:
        return self._fetch(torch.tensor(position))

    def __getitems__(self, positions: Sequence[int]) -> _Batch:
        return _Batch(self._fetch(torch.as_tensor(positions, dtype=torch.long)))


def batched_view(dataset: Dataset, with_index: bool = False) -> TensorBatches | None:
    """A :class:`TensorBatches` over a ``TensorDataset`` (or a ``Subset`` chain over one),
    None for any other dataset (load it item by item, as usual)."""
    rows = None
    while isinstance(dataset, Subset):
        indices = torch.as_tensor(dataset.indices, dtype=torch.long)
        rows = indices if rows is None else indices[rows]
        dataset = dataset.dataset
    if not isinstance(dataset, TensorDataset):
        return None
    return TensorBatches(dataset.tensors, rows, with_index)


def collate_batches(items: _Batch | list) -> tuple[Tensor, ...] | list:
    """Pass a batch from ``TensorBatches.__getitems__`` through; ``default_collate`` others."""
    if isinstance(items, _Batch):
        return tuple(items)
    return default_collate(items)
