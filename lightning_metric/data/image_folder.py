"""Images in one folder per class (torchvision's ``ImageFolder`` layout), read lazily."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from .base import SPLITS, TEST, TRAIN, Items, LabelledDataModule, stratified_cut
from .format_check import FormatProblem, image_headers, pair_problems, raise_problems
from .items import ImageFiles


class ImageFolderDataModule(LabelledDataModule):
    """Image files in one sub-folder per class: ``root/<class>/<image>``.

    With ``train/``, ``val/`` and ``test/`` sub-trees (``root/train/<class>/<image>``...;
    ``train/`` required, the others optional) those are the splits; otherwise (and for
    a missing ``test/``) a stratified ``test_fraction`` of each class is the test set
    (under ``class_disjoint``, of each evaluation class: the training classes keep all
    their images), and validation is cut out of the training images (``val_fraction``)
    where there is no ``val/``. Class names are the folder names, sorted (their index
    is the label). Files without an image extension (``IMG_EXTENSIONS``) are skipped
    with a warning that counts them.

    Images are decoded as RGB ``uint8 (3, H, W)`` in the loader workers and go through
    ``train_transform`` / ``eval_transform`` (None: ``float32`` in [0, 1]; the images of
    a batch must then have one size). ``setup`` only lists the files (and, with
    ``check_files``, reads every image's header to report unreadable files).

    Args:
        root: the folder.
        test_fraction: share of each class held out for testing when there is no ``test/``.
        split_seed: seeds that test split.
        check_files: in ``setup``, open every image's header and stop on unreadable files.
        **kwargs: :class:`~lightning_metric.data.base.LabelledDataModule` options.

    Raises:
        FileNotFoundError: ``root`` (or ``root/train``) holds no class folder.
        ValueError: bad settings; in ``setup``: unreadable images, a class with one image in
            a split that needs pairs.

    Example::

        >>> data = ImageFolderDataModule("birds/", eval_transform=resize, train_transform=aug)
        >>> data.num_classes   # read from the folders, no image opened
        200
    """

    reads_files = True

    def __init__(self, root: str | os.PathLike, test_fraction: float = 0.2, split_seed: int = 0,
                 check_files: bool = True, **kwargs):
        self.root = Path(root)
        if not 0 < test_fraction < 1:
            raise ValueError(f"data.test_fraction must be in (0, 1), got {test_fraction}")
        self.trees = split_trees(self.root)
        self.class_names = folder_class_names(self.root)
        self.test_fraction, self.split_seed = test_fraction, split_seed
        self.check_files = check_files
        self.paths: list[str] = []
        self._unreadable: list[FormatProblem] = []
        super().__init__(**kwargs)

    def load_items(self) -> Items:
        class_to_idx = {name: index for index, name in enumerate(self.class_names)}
        paths, labels, split = [], [], []
        skipped = 0
        for name, tree in self.trees.items():
            found = make_dataset(tree, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
            skipped += _count_files(tree, self.class_names) - len(found)
            paths += [path for path, _ in found]
            labels += [label for _, label in found]
            split += [SPLITS.index(name)] * len(found)
        if skipped:
            warnings.warn(f"data.root={str(self.root)!r}: skipped {skipped} files without an "
                          f"image extension {IMG_EXTENSIONS}", stacklevel=2)
        self._unreadable = (unreadable_images(paths, self.num_workers or None)
                            if self.check_files else [])
        labels_t, split_t = torch.tensor(labels, dtype=torch.long), torch.tensor(split)
        if not (split_t == TEST).any():
            split_t[self._test_cut(labels_t, split_t)] = TEST
            self.split_origin["test"] = f"cut by data.test_fraction={self.test_fraction}"
        self.paths = paths
        return Items(labels_t, split_t, ImageFiles(paths, labels_t, self.train_transform),
                     ImageFiles(paths, labels_t, self.eval_transform))

    def _test_cut(self, labels: Tensor, split: Tensor) -> Tensor:
        candidates = torch.where(split == TRAIN)[0]
        if self.protocol == "class_disjoint":
            candidates = candidates[labels[candidates] >= self.num_classes]
        return stratified_cut(labels, candidates, self.test_fraction, self.split_seed)

    def check_split_rows(self, labels: Tensor, rows: dict[str, Tensor]) -> None:
        """Raises the unreadable images and the classes alone in a split that needs pairs."""
        names = [self.class_names[label] for label in labels.tolist()]

        def make(row: int, message: str) -> FormatProblem:
            return FormatProblem(self.paths[row], None, None, message)

        needs = {split: "; ".join(["every item is a query retrieving among the others",
                                   *([self.split_origin[split]] if split in self.split_origin
                                     else [])])
                 for split in ("val", "test")}
        if self.sampler == "class" and self.m_per_class >= 2:
            needs["train"] = f"class-balanced batches with data.m_per_class={self.m_per_class}"
        rows_by_split = {split: indices.tolist() for split, indices in rows.items()}
        raise_problems(self._unreadable + pair_problems(make, names, rows_by_split, needs),
                       f"the images of data.root={str(self.root)!r}")


def split_trees(root: Path) -> dict[str, Path]:
    """``{split: folder}``: ``root/train`` (``val``, ``test``) when ``root/train`` exists and
    every sub-folder is a split's, else ``{"train": root}``.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"data.root={str(root)!r} is not a folder")
    folders = {entry.name for entry in os.scandir(root) if entry.is_dir()}
    if "train" in folders and folders <= set(SPLITS):
        return {name: root / name for name in SPLITS if name in folders}
    return {"train": root}


def folder_class_names(root: str | os.PathLike) -> tuple[str, ...]:
    """The class names of an image folder (its class folders, sorted), without opening a
    file: what ``data.num_classes`` counts (halved under ``class_disjoint``).

    Raises:
        FileNotFoundError: ``root`` is not a folder or holds no class folder.
    """
    names = tuple(sorted(set().union(
        *(_class_folders(tree) for tree in split_trees(Path(root)).values()))))
    if not names:
        raise FileNotFoundError(f"data.root={str(root)!r} holds no class folder")
    return names


def _class_folders(tree: Path) -> list[str]:
    try:
        return find_classes(tree)[0]
    except FileNotFoundError:  # a split folder without class folders
        return []


def _count_files(tree: Path, class_names: tuple[str, ...]) -> int:
    total = 0
    for name in class_names:
        for _, _, files in os.walk(tree / name, followlinks=True):
            total += len(files)
    return total


def unreadable_images(paths: list[str], num_threads: int | None = None) -> list[FormatProblem]:
    """A problem for every missing or unreadable image (its header, via ``PIL``)."""
    headers = image_headers([Path(path) for path in paths], num_threads)
    return [FormatProblem(path, None, None, header)
            for path, header in zip(paths, headers, strict=True) if isinstance(header, str)]


def check_image_folder(root: str | os.PathLike,
                       num_threads: int | None = None) -> list[FormatProblem]:
    """Every missing or unreadable image of an image folder (as :class:`ImageFolderDataModule`
    lists it), without building a DataModule.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
    """
    trees = split_trees(Path(root))
    names = folder_class_names(root)
    class_to_idx = {name: index for index, name in enumerate(names)}
    paths = [path for tree in trees.values()
             for path, _ in make_dataset(tree, class_to_idx, IMG_EXTENSIONS, allow_empty=True)]
    return unreadable_images(paths, num_threads)
