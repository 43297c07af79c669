"""Many classes with few examples each, made from Fashion-MNIST: every image its own class.

The spec's second FMNIST claim (ArcFace and CosFace struggle with many classes of few
examples each) needs a data set that ten-class Fashion-MNIST is not. This one is built
honestly from it: ``instances`` training images become classes ``0..instances-1``,
each of ``copies`` augmented copies of its image (a random square crop, then a
horizontal flip half of the time, drawn once from a generator seeded by ``seed``);
``instances`` other training images, copied the same way, are the validation classes,
and ``instances`` test-file images the test classes. The protocol is
``class_disjoint``: validation and test retrieve the copies of images never trained on,
as in Stanford Online Products (Oh Song et al., CVPR 2016).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

from .fmnist import FashionMNISTDataModule


class FashionMNISTInstancesDataModule(FashionMNISTDataModule):
    """``instances`` classes of ``copies`` augmented copies of one Fashion-MNIST image each.

    Items are ``(1, 28, 28)`` in [0, 1] as in
    :class:`~lightning_metric.data.FashionMNISTDataModule`. The training split holds
    ``2 * instances`` images (the first half trained on, the second half validated on),
    the test split ``instances`` images of the test file; each image's ``copies`` copies
    share its label. Images are picked at random without replacement, by ``seed``.

    Args:
        data_dir, download: as for :class:`~lightning_metric.data.FashionMNISTDataModule`.
        instances: images (classes) in each of train, validation and test.
        copies: augmented copies of each image (its class's items, >= 2).
        crop_scale: smallest area fraction of the random square crop, in (0, 1].
        protocol: must be ``class_disjoint`` (the validation and test images are unseen).
        **kwargs: :class:`~lightning_metric.data.base.LabelledDataModule` options.

    Raises:
        ValueError: ``instances`` below 2 or above what the files hold, ``copies`` below 2,
            ``crop_scale`` out of range, a protocol other than ``class_disjoint``.
    """

    def __init__(self, data_dir: str | Path, download: bool = True, instances: int = 1000,
                 copies: int = 5, crop_scale: float = 0.6,
                 protocol: str = "class_disjoint", **kwargs):
        if not 2 <= instances <= 10_000:
            raise ValueError(f"data.instances must be in [2, 10000] (the test file holds "
                             f"10,000 images), got {instances}")
        if copies < 2:
            raise ValueError(f"data.copies must be >= 2 (a class needs two items), got {copies}")
        if not 0 < crop_scale <= 1:
            raise ValueError(f"data.crop_scale must be in (0, 1], got {crop_scale}")
        if protocol != "class_disjoint":
            raise ValueError(
                f"data.protocol={protocol!r}: FashionMNISTInstancesDataModule validates and "
                "tests on images never trained on, so its protocol is class_disjoint")
        self.instances, self.copies, self.crop_scale = instances, copies, crop_scale
        self.class_names = tuple(f"image {i}" for i in range(2 * instances))
        super().__init__(data_dir, download=download, protocol=protocol, **kwargs)

    def load_splits(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        train_x, _, test_x, _ = super().load_splits()
        generator = torch.Generator().manual_seed(self.seed)
        picked_train = torch.randperm(len(train_x), generator=generator)[: 2 * self.instances]
        picked_test = torch.randperm(len(test_x), generator=generator)[: self.instances]
        copies_train, labels_train = self._copies(train_x[picked_train], first_label=0,
                                                  generator=generator)
        # test labels continue after the trained half, so that class_disjoint keeps them all
        copies_test, labels_test = self._copies(test_x[picked_test],
                                                first_label=self.instances, generator=generator)
        return copies_train, labels_train, copies_test, labels_test

    def _copies(self, images: Tensor, first_label: int,
                generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(N * copies, 1, 28, 28)`` augmented copies, an image's next to each other, and
        their ``(N * copies,)`` labels ``first_label + image``."""
        repeated = images.repeat_interleave(self.copies, dim=0)
        labels = first_label + torch.arange(len(images)).repeat_interleave(self.copies)
        return random_square_crops(repeated, self.crop_scale, generator), labels


def random_square_crops(images: Tensor, min_area: float, generator: torch.Generator) -> Tensor:
    """Each image of ``(N, C, H, W)`` cropped to a random square of area fraction uniform in
    ``[min_area, 1]`` at a uniform position, resized back to ``H x W`` (bilinear) and
    flipped left-right half of the time: torchvision's ``RandomResizedCrop(ratio=(1, 1))``
    then ``RandomHorizontalFlip()``, drawn for the whole batch in one ``grid_sample`` (a
    per-image torchvision call takes about a minute for 15,000 images on a CPU)."""
    n = len(images)
    side = (min_area + (1 - min_area) * torch.rand(n, generator=generator)).sqrt()
    shift = (1 - side)[:, None] * (2 * torch.rand(n, 2, generator=generator) - 1)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = side * flip, side
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", align_corners=False).clamp(0, 1)
