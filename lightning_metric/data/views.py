"""Self-supervised training data: each item as several augmented views of one instance.

SimCLR-style training needs no class labels: every image gives ``views`` independent
augmentations that share an *instance* label (the item's index), so a labelled
contrastive loss (``NTXentLoss``, ``SupConLoss``) pulls the views of one image together
and pushes other images away (the spec's "NTXent only works with the Instance
dataset"). ``data.views=2`` turns a data module's training set into such a set;
validation and test keep the data's own labels, when it has any.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate


class MultiViewDataset(Dataset):
    """``(views (V, ...), instance)``: item ``i`` of ``dataset`` augmented ``V`` times.

    Each view reads ``dataset[i]`` again (a dataset that augments its items, as image
    files with a ``train_transform`` do, gives a new augmentation each time) and applies
    ``transform`` when given (in-memory tensors). The item's own label is dropped: the
    instance label is ``i``.

    Args:
        dataset: ``(x, label)`` items.
        views: augmentations per item (>= 2).
        transform: applied to each view's ``x`` (random: each call draws anew).

    Raises:
        ValueError: ``views`` below 2.
    """

    def __init__(self, dataset: Dataset, views: int = 2, transform: Callable | None = None):
        if views < 2:
            raise ValueError(f"data.views must be >= 2 for several views an item, got {views}")
        self.dataset, self.views, self.transform = dataset, views, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def _view(self, index: int) -> Tensor:
        item = self.dataset[index][0]
        return self.transform(item) if self.transform is not None else item

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return torch.stack([self._view(index) for _ in range(self.views)]), index


def collate_views(batch: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    """``B`` items of ``V`` views -> ``(B * V, ...)`` inputs and ``(B * V,)`` instance labels,
    the views of one item next to each other."""
    views, instances = default_collate(batch)
    return views.flatten(0, 1), instances.repeat_interleave(views.shape[1])
