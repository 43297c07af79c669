"""Evaluation items that carry their dataset index, for exact metrics under DDP."""

from __future__ import annotations

from torch.utils.data import Dataset


class IndexedDataset(Dataset):
    """``dataset[i]`` with ``i`` appended: ``(x, label)`` becomes ``(x, label, i)``.

    Under DDP a ``DistributedSampler`` pads the ranks' shards to equal size by repeating
    items; the index lets the gathered embeddings drop those copies and return to the
    dataset order (:func:`lightning_metric.metrics.in_dataset_order`).
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        item = self.dataset[index]
        return (*item, index) if isinstance(item, tuple | list) else (item, index)
