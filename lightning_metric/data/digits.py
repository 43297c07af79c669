"""scikit-learn's bundled 8x8 handwritten digits: no download, the default of a first run."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import Tensor

from .base import LabelledDataModule


class DigitsDataModule(LabelledDataModule):
    """1,797 grey 8x8 digits (values scaled to [0, 1]) in 10 classes, as ``(B, 1, 8, 8)``.

    There is no official test split: a fixed stratified 20% (seeded by
    ``split_seed``) is the test set.
    """

    image_size = 8
    class_names = tuple(str(d) for d in range(10))

    def __init__(self, test_fraction: float = 0.2, split_seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.test_fraction, self.split_seed = test_fraction, split_seed

    def load_splits(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.long)
        generator = torch.Generator().manual_seed(self.split_seed)
        is_test = torch.zeros(len(labels), dtype=torch.bool)
        for cls in range(10):
            members = torch.where(labels == cls)[0]
            members = members[torch.randperm(len(members), generator=generator)]
            is_test[members[: int(len(members) * self.test_fraction)]] = True
        return images[~is_test], labels[~is_test], images[is_test], labels[is_test]
