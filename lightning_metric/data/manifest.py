"""Items listed in a table (CSV, TSV or Parquet): image files or texts, with their labels."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor

from .base import TEST, TRAIN, Items, LabelledDataModule, stratified_cut
from .format_check import (
    PARQUET,
    SEPARATORS,
    FormatProblem,
    Manifest,
    cell,
    line_order,
    parse_manifest,
    raise_problems,
    split_problems,
)
from .items import ImageFiles, TextCollate, TextItems
from .roles import EvalRoles

_STAGE_SPLIT = {"fit": "val", "validate": "val", "val": "val", "sanity_check": "val",
                "test": "test", "predict": "test"}


class ManifestDataModule(LabelledDataModule):
    """Image files or texts listed in a manifest, with their labels.

    The manifest (``.csv``, ``.tsv`` or ``.parquet``) has a ``label`` column and exactly one
    of ``path`` (an image file, relative to the manifest's folder or ``root``) or ``text``;
    optional: ``split`` (``train``/``val``/``test``), ``is_query`` / ``is_gallery``
    (``1``/``0``/``true``/``false``: separate query and gallery items in val/test, see
    :meth:`eval_roles`), ``category`` (metrics per category), ``bbox_x1, bbox_y1, bbox_x2,
    bbox_y2`` (crop the image to that box, in pixels, before the transforms). Other columns
    are ignored.

    Labels (strings or integers) map to ``0..C-1`` in sorted order (integers by value):
    ``class_names[i]`` is the label of class ``i``; the mapping is saved in checkpoints
    (:meth:`state_dict`). Without a ``split`` column, or without test items, the data is
    split like :class:`~lightning_metric.data.ImageFolderDataModule` (``test_fraction``).

    ``setup`` checks the whole manifest first (:func:`~lightning_metric.data.check_manifest`)
    and raises one ``ValueError`` listing every problem by file, line and column. Images
    are decoded in the loader workers (RGB ``uint8 (3, H, W)``, cropped, then
    ``train_transform`` / ``eval_transform``). Text batches are ``(tokens, labels)`` with
    ``tokens`` the ``tokenizer``'s dict of ``(B, L)`` tensors (padded, truncated to
    ``max_length``).

    Args:
        path: the manifest file.
        root: folder the ``path`` column is relative to (default: the manifest's folder).
        test_fraction: share of each class held out for testing when there is no test split.
        split_seed: seeds that test split.
        check_files: in ``setup``, open every image's header (missing, unreadable files,
            crop boxes outside the image).
        **kwargs: :class:`~lightning_metric.data.base.LabelledDataModule` options.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the manifest's columns are wrong (all column problems listed); text
            items without a ``tokenizer``; bad settings. In ``setup``: every problem of the
            rows, files and splits.

    Example::

        >>> data = ManifestDataModule("shop/items.csv", eval_transform=resize)
        >>> data.class_names[:2], data.num_classes
        (('bag', 'dress'), 12)
    """

    reads_files = True

    def __init__(self, path: str | os.PathLike, root: str | os.PathLike | None = None,
                 test_fraction: float = 0.2, split_seed: int = 0, check_files: bool = True,
                 **kwargs):
        if not 0 < test_fraction < 1:
            raise ValueError(f"data.test_fraction must be in (0, 1), got {test_fraction}")
        self.path, self.root = Path(path), None if root is None else Path(root)
        self.test_fraction, self.split_seed = test_fraction, split_seed
        self.check_files = check_files
        manifest = parse_manifest(self.path, self.root, check_files=False)
        if not manifest.readable:
            raise_problems(manifest.problems, f"data.path={str(self.path)!r}")
        self.kind = manifest.kind
        if self.kind == "text" and kwargs.get("tokenizer") is None:
            raise ValueError(
                f"data.path={str(self.path)!r} lists texts (a 'text' column), which need a "
                "tokenizer: train with model=hf_text (it gives the data its tokenizer), or "
                "pass tokenizer= to ManifestDataModule"
            )
        self.class_names = label_names(manifest.labels)
        self.manifest: Manifest | None = None
        super().__init__(**kwargs)

    # -- items ------------------------------------------------------------------------
    def load_items(self) -> Items:
        manifest = parse_manifest(self.path, self.root, check_files=self.check_files,
                                  num_threads=self.num_workers or None)
        self.manifest = manifest
        unknown = sorted(set(manifest.labels) - set(self.class_names) - {None})
        if manifest.blocking or unknown:
            extra = [FormatProblem(str(self.path), None, "label", "labels missing from the "
                                   f"class list (the checkpoint's?): {unknown}")] if unknown else []
            raise_problems(manifest.problems + extra, f"data.path={str(self.path)!r}")
        ids = {name: index for index, name in enumerate(self.class_names)}
        labels = torch.tensor([ids[label] for label in manifest.labels], dtype=torch.long)
        split = torch.tensor(manifest.split if manifest.split is not None
                             else [TRAIN] * len(manifest), dtype=torch.long)
        if not (split == TEST).any():
            split[self._test_cut(labels, split)] = TEST
            self.split_origin["test"] = f"cut by data.test_fraction={self.test_fraction}"
        return Items(labels, split, *(manifest_dataset(manifest, labels, transform)
                                      for transform in (self.train_transform,
                                                        self.eval_transform)))

    def _test_cut(self, labels: Tensor, split: Tensor) -> Tensor:
        candidates = torch.where(split == TRAIN)[0]
        if self.protocol == "class_disjoint":
            candidates = candidates[labels[candidates] >= self.num_classes]
        return stratified_cut(labels, candidates, self.test_fraction, self.split_seed)

    def collate_fn(self) -> Callable | None:
        return TextCollate(self.tokenizer, self.max_length) if self.kind == "text" else None

    def check_split_rows(self, labels: Tensor, rows: dict[str, Tensor]) -> None:
        """Raises every problem of the manifest (rows, files, pairs in the final splits)."""
        rows_by_split = {split: indices.tolist() for split, indices in rows.items()}
        problems = self.manifest.problems + split_problems(
            self.manifest, rows_by_split, self.sampler, self.m_per_class, self.split_origin)
        raise_problems(sorted(problems, key=line_order), f"data.path={str(self.path)!r}")
        self._warn_unused_eval_items(rows_by_split)

    def _warn_unused_eval_items(self, rows_by_split: dict[str, list[int]]) -> None:
        if self.manifest.is_query is None:
            return
        for split in ("val", "test"):
            unused = sum(1 for row in rows_by_split[split]
                         if not self.manifest.is_query[row] and not self.manifest.is_gallery[row])
            if unused:
                warnings.warn(f"data.path={str(self.path)!r}: {unused} {split} items are neither "
                              "a query nor a gallery item (is_query=0, is_gallery=0): they are "
                              "embedded but never used by the metrics", stacklevel=2)

    # -- evaluation roles ---------------------------------------------------------------
    def eval_roles(self, stage: str) -> EvalRoles | None:
        """Query / gallery flags (and categories) of the val or test set, in its order.

        Args:
            stage: ``val`` / ``validate`` / ``fit`` (the val set) or ``test`` / ``predict``.

        Returns:
            None when the manifest has neither ``is_query``/``is_gallery`` nor ``category``
            (self-retrieval); else :class:`~lightning_metric.data.roles.EvalRoles` with
            ``(N,)`` tensors for the ``N`` items of that set (a missing flag column: True).

        Raises:
            ValueError: an unknown stage. RuntimeError: before ``setup``.
        """
        if stage not in _STAGE_SPLIT:
            raise ValueError(f"stage must be one of {list(_STAGE_SPLIT)}, got {stage!r}")
        if self.manifest is None or not self.split_rows:
            raise RuntimeError("call setup() before eval_roles()")
        manifest = self.manifest
        if manifest.is_query is None and manifest.categories is None:
            return None
        rows = self.split_rows[_STAGE_SPLIT[stage]].tolist()
        if manifest.is_query is None:
            is_query = is_gallery = torch.ones(len(rows), dtype=torch.bool)
        else:
            is_query = torch.tensor([manifest.is_query[row] for row in rows], dtype=torch.bool)
            is_gallery = torch.tensor([manifest.is_gallery[row] for row in rows],
                                      dtype=torch.bool)
        if manifest.categories is None:
            return EvalRoles(is_query, is_gallery)
        names = tuple(sorted(set(manifest.categories)))
        ids = {name: index for index, name in enumerate(names)}
        categories = torch.tensor([ids[manifest.categories[row]] for row in rows])
        return EvalRoles(is_query, is_gallery, categories, names)


def manifest_dataset(manifest: Manifest, labels: Tensor,
                     transform: Callable | None = None) -> ImageFiles | TextItems:
    """Every row of ``manifest`` as ``(input, label)``, in its order: the image (cropped to
    its box, then ``transform``; None: float in [0, 1]) or the text."""
    if manifest.kind == "text":
        return TextItems(manifest.texts, labels)
    boxes = None
    if manifest.boxes is not None:
        nan = (float("nan"),) * 4
        boxes = torch.tensor([box or nan for box in manifest.boxes], dtype=torch.float64)
    return ImageFiles([str(path) for path in manifest.paths], labels, transform, boxes)


def manifest_class_names(path: str | os.PathLike) -> tuple[str, ...]:
    """The class names of a manifest (its distinct labels, sorted as
    :class:`ManifestDataModule` sorts them), reading only the ``label`` column: what
    ``data.num_classes`` counts (halved under ``class_disjoint``).

    Raises:
        FileNotFoundError: ``path`` is not a file. ValueError: not a manifest, or no
            ``label`` column.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.path={str(path)!r} is not a file")
    suffix = path.suffix.lower()
    if suffix not in (*PARQUET, *SEPARATORS):
        raise ValueError(f"data.path={str(path)!r}: a manifest must be a .csv, .tsv or .parquet "
                         "file")
    try:
        if suffix in PARQUET:
            labels = pd.read_parquet(path, columns=["label"])["label"]
        else:
            labels = pd.read_csv(path, sep=SEPARATORS[suffix], usecols=["label"], dtype=str,
                                 keep_default_na=False)["label"]
    except (KeyError, ValueError) as error:
        raise ValueError(f"data.path={str(path)!r}: no 'label' column ({error})") from error
    return label_names([cell(value) for value in labels.tolist()])


def label_names(labels: Sequence[str | None]) -> tuple[str, ...]:
    """The distinct labels, sorted: by value when all are integers, else as strings."""
    distinct = {label for label in labels if label is not None}
    if all(re.fullmatch(r"[+-]?\d+", label) for label in distinct):
        return tuple(sorted(distinct, key=int))
    return tuple(sorted(distinct))
