"""Paired data in a table: query-document pairs, scored pairs, triplets, image-caption pairs.

Every row of a CSV / TSV / JSON Lines / Parquet file is one training example with several fields
(texts, or image paths) and optionally a numeric target. :class:`PairDataModule` reads
them and gives the batches the losses of
:data:`~lightning_metric.losses.registry.PAIR_LOSSES` take.

**Training batches** are dicts::

    {"inputs": [field_1, field_2, ...],   # in data.fields order
     "target": (B,) float32}              # only with a target column

where a text field is the tokenizer's dict of ``(B, L)`` tensors (``input_ids``,
``attention_mask``, ...) and an image field a ``(B, C, H, W)`` tensor (decoded in the
loader workers, then ``train_transform``).

**Validation and test batches**:

- with a target: the same dicts (``eval_transform`` for images) plus ``"indices"``, the
  ``(B,)`` row indices in the set (for de-duplicating DDP shards): the module compares the
  cosine similarity of the two fields with the target (Spearman, as sentence-transformers'
  ``EmbeddingSimilarityEvaluator``).
- without: retrieval items ``(x, label, index)`` as labelled data gives them. The distinct
  values of the first field are the queries, those of the second field the gallery
  (:meth:`PairDataModule.eval_roles`); a label is a connected component of the
  query-positive graph over the set's rows (a COCO image and its 5 captions share one).
  Items are ordered field by field and no batch holds items of two fields, so a batch is
  texts (the tokenizer's dict) or images (a tensor), never both.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Sampler

from ..losses.registry import (
    IMAGE_TEXT,
    PAIR,
    PAIR_SCORE,
    PAIR_TARGET,
    TRIPLET,
    TRIPLET_MARGIN,
)
from ..samplers import NoDuplicatesBatchSampler, RandomBatchSampler
from .format_check import FormatProblem, line_order, raise_problems
from .indexed import IndexedDataset
from .pair_items import (
    ItemCollate,
    PairCollate,
    PairRows,
    SegmentBatches,
    retrieval_items,
)
from .pair_table import PairFile, check_targets, read_pair_file
from .roles import EvalRoles

PAIR_SAMPLERS = ("auto", "no_duplicates", "random")
IN_BATCH_SHAPES = (PAIR, IMAGE_TEXT)
"""Shapes whose losses take the other rows of a batch as negatives: ``no_duplicates``."""
_STAGE_SPLIT = {"fit": "val", "validate": "val", "val": "val", "sanity_check": "val",
                "test": "test", "predict": "test"}
_SPLIT_NAMES = ("train", "val", "test")
TRAIN, VAL, TEST = range(3)
log = logging.getLogger(__name__)


def pair_shapes(fields: Sequence[str], image_fields: Sequence[str], target: str | None,
                binary_target: bool = False) -> tuple[str, ...]:
    """The batch shapes (registry names) rows of these fields serve, the first the main one.

    Raises:
        ValueError: no known shape, naming the settings and their values.
    """
    n, images = len(fields), [role for role in fields if role in image_fields]
    described = f"data.fields={list(fields)}, data.image_fields={list(image_fields)}, " \
                f"data.target={target!r}"
    if images:
        if n == 2 and len(images) == 1 and target is None:
            return (IMAGE_TEXT,)
        raise ValueError(f"{described}: image fields make one shape, image_text: one image "
                         "field and one text field, no target")
    if target is None:
        if n == 2:
            return (PAIR,)
        if n == 3:
            return (TRIPLET, PAIR)  # (query, pos, neg), or MNRL's pair with a hard negative
        if n > 3:
            return (PAIR,)  # (query, doc, *hard_negatives)
    elif n == 2:
        return (PAIR_TARGET,) if binary_target else (PAIR_SCORE,)
    elif n == 3:
        return (TRIPLET_MARGIN,)
    raise ValueError(
        f"{described} make no known batch shape: two fields (pair; with a target: "
        "pair_score or pair_target), three (triplet; with a target: triplet_margin), more "
        "(a pair with hard negatives), or an image and a text field (image_text)")


class PairDataModule(pl.LightningDataModule):
    """Rows of paired fields (texts or images) from a CSV, TSV, JSON Lines or Parquet file.

    A JSON Lines file (``.jsonl``) holds one JSON object a line, its keys the columns;
    problems name its lines as they are numbered in an editor.

    Args:
        path: the file; ``val_path`` / ``test_path`` optional files with the same columns
            holding the val / test rows (STS-B's dev.tsv and test.tsv).
        fields: role -> column, in the order the loss takes them: ``{a: sentence1, b:
            sentence2}``, ``{query: q, doc: d, neg: n}``, ``{image: image_file, text:
            caption}``.
        image_fields: the roles whose column holds image paths, relative to ``root`` (default:
            the file's folder); the other fields are texts.
        target: the target column (a score, a +1/-1 label, a teacher margin), or None.
        target_range: ``[low, high]``: targets must lie in it and are scaled to [0, 1]
            (``[0, 5]`` for STS-B); None: used as read (pair scores must then lie in
            [0, 1]; targets all +1 / -1 make the ``pair_target`` shape).
        min_target: keep only the rows whose target (as read, before ``target_range``
            scales it) is at least this, in every file; the dropped rows are counted and
            logged. The target then only chooses rows and is not passed on: STS-B pairs
            scored 4 or more become ``pair`` rows (positives for ``loss=mnrl``). None:
            every row.
        split: the column holding ``train`` / ``val`` / ``test`` (used when the file has
            it; a name other than ``split`` must be there); None: no split column.
        group: a column whose rows go to one split together when splits are cut (e.g.
            ``image_id``: an image's captions stay in one split); None: cut by row.
        val_fraction, test_fraction: share of the training rows (groups) cut out for
            validation / testing when the data has no val / test rows.
        split_seed: seeds those cuts.
        sampler: ``auto`` (``no_duplicates`` for the in-batch shapes ``pair`` and
            ``image_text``, else ``random``), ``no_duplicates``
            (:class:`~lightning_metric.samplers.NoDuplicatesBatchSampler` keyed by every
            text and image path of a row) or ``random``.
        batch_size: rows per training batch (under DDP the global batch).
        drop_last: drop the last, short training batch.
        subset: train on at most this many rows (randomly chosen by ``seed``).
        eval_batch_size: batch size of the validation and test loaders.
        seed: seeds the subset and the samplers.
        num_workers: loader workers (None: one per CPU).
        tokenizer: a Hugging Face tokenizer (needed for text fields; ``model=hf_text`` gives
            it); ``max_length``: tokens kept per text.
        train_transform, eval_transform: ``uint8 (3, H, W) image -> model input`` (None:
            float in [0, 1]).
        image_size: the side the transforms produce (declared for the model, not checked).
        pin_memory: None: when the trainer runs on a GPU. persistent_workers: keep workers.
        check_files: in ``setup``, open every distinct image's header.
        skip_bad_rows: rows with a problem are skipped, counted and listed in a warning
            (default: ``setup`` raises one ``ValueError`` listing every problem).

    Raises:
        ValueError: a bad setting (named, with its value); fields that make no known shape;
            a missing column (named, with the file and its columns); text fields without a
            tokenizer. In ``setup``: every problem of the rows, by file, line and column.
        FileNotFoundError: a file is missing.

    Example::

        >>> data = PairDataModule("stsb/train.tsv", {"a": "sentence1", "b": "sentence2"},
        ...                       target="score", target_range=[0, 5], tokenizer=tokenizer)
        >>> data.shape
        'pair_score'
    """

    class_names: tuple[str, ...] = ()
    num_classes = 0

    def __init__(
        self,
        path: str | os.PathLike,
        fields: Mapping[str, str],
        image_fields: Sequence[str] = (),
        target: str | None = None,
        target_range: Sequence[float] | None = None,
        min_target: float | None = None,
        split: str | None = "split",
        group: str | None = None,
        val_path: str | os.PathLike | None = None,
        test_path: str | os.PathLike | None = None,
        root: str | os.PathLike | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        sampler: str = "auto",
        batch_size: int = 32,
        drop_last: bool = False,
        subset: int | None = None,
        eval_batch_size: int = 256,
        seed: int = 0,
        num_workers: int | None = None,
        tokenizer: Any = None,
        max_length: int = 128,
        train_transform: Callable | None = None,
        eval_transform: Callable | None = None,
        image_size: int | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        check_files: bool = True,
        skip_bad_rows: bool = False,
    ):
        super().__init__()
        self.fields = {str(role): str(column) for role, column in dict(fields).items()}
        self.image_fields = tuple(str(role) for role in (image_fields or ()))
        _check_settings(self.fields, self.image_fields, target_range, val_fraction,
                        test_fraction, sampler, batch_size, eval_batch_size, subset,
                        num_workers, max_length)
        if min_target is not None and target is None:
            raise ValueError(f"data.min_target={min_target} keeps the rows whose target is at "
                             "least it: set data.target (the column it is compared with)")
        self.paths = {"train": Path(path), "val": None if val_path is None else Path(val_path),
                      "test": None if test_path is None else Path(test_path)}
        self.path, self.root = self.paths["train"], None if root is None else Path(root)
        self.target = target
        """The target column (read, range-checked; passed on unless ``min_target``)."""
        self.min_target = None if min_target is None else float(min_target)
        self.passes_target = target is not None and min_target is None
        """The batches carry the target (there is one and ``min_target`` does not use it up)."""
        self.target_range = None if target_range is None else tuple(map(float, target_range))
        self.split, self.group = split, group
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.split_seed, self.batch_size, self.drop_last = split_seed, batch_size, drop_last
        self.subset, self.eval_batch_size, self.seed = subset, eval_batch_size, seed
        self.num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
        self.tokenizer, self.max_length = tokenizer, max_length
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.image_size = image_size
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.check_files, self.skip_bad_rows = check_files, skip_bad_rows
        self.field_kinds = tuple("image" if role in self.image_fields else "text"
                                 for role in self.fields)
        """``image`` or ``text`` for every field, in ``fields`` order (which tower embeds it)."""
        files = self._read(check_files=False)  # the columns, and the targets for the shape
        self.shapes = pair_shapes(list(self.fields), self.image_fields,
                                  target if self.passes_target else None,
                                  _binary(files, target_range))
        """Every batch shape the rows serve, :attr:`shape` first."""
        if "text" in self.field_kinds and tokenizer is None:
            texts = [role for role, kind in zip(self.fields, self.field_kinds, strict=True)
                     if kind == "text"]
            raise ValueError(
                f"data.fields {texts} are texts, which need a tokenizer: train with "
                "model=hf_text (it gives the data its tokenizer), or pass tokenizer= to "
                "PairDataModule (data.image_fields names the image fields)")
        self.sampler = (NO_DUPLICATES if set(self.shapes) & set(IN_BATCH_SHAPES) else RANDOM) \
            if sampler == "auto" else sampler
        self.train_set = self.val_set = self.test_set = None
        self.split_rows: dict[str, np.ndarray] = {}
        self.skipped: list[FormatProblem] = []
        """The problems of the rows skipped under ``skip_bad_rows``."""
        self.dropped: dict[str, int] = {}
        """Rows of each file (``train``, ``val``, ``test``) below ``min_target``, dropped."""
        self._roles: dict[str, EvalRoles] = {}
        self._train_keys: list[tuple[str, ...]] = []

    # -- what the module reads ---------------------------------------------------------
    @property
    def shape(self) -> str:
        """The batch shape of the rows: a :data:`~lightning_metric.losses.registry.PAIR_LOSSES`
        ``inputs`` name (``pair``, ``pair_score``, ``pair_target``, ``triplet``,
        ``triplet_margin``, ``image_text``)."""
        return self.shapes[0]

    @property
    def eval_kind(self) -> str:
        """``paired`` (val/test batches are the training dicts: data with a target) or
        ``retrieval`` (val/test batches are ``(x, label, index)`` items)."""
        return "paired" if self.passes_target else "retrieval"

    def eval_roles(self, stage: str) -> EvalRoles | None:
        """Queries (the first field's items) and gallery (the second field's) of the val or
        test set, in its order; None for paired evaluation (data with a target).

        Raises:
            ValueError: an unknown stage. RuntimeError: before ``setup``.
        """
        if stage not in _STAGE_SPLIT:
            raise ValueError(f"stage must be one of {list(_STAGE_SPLIT)}, got {stage!r}")
        if self.train_set is None:
            raise RuntimeError("call setup() before eval_roles()")
        return self._roles.get(_STAGE_SPLIT[stage])

    # -- reading and checking -----------------------------------------------------------
    def _read(self, check_files: bool) -> dict[str, PairFile]:
        files = {}
        for name, path in self.paths.items():
            if path is None:
                continue
            files[name] = read_pair_file(
                path, self.fields, image_fields=self.image_fields, target=self.target,
                split=self.split if name == "train" else None, split_optional=self.split == "split",
                group=self.group, root=self.root, check_files=check_files,
                num_threads=self.num_workers or None)
            if not files[name].values:  # a column is missing: nothing else can be read
                raise_problems(files[name].problems, f"data.path={str(path)!r}")
        return files

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        files = self._read(check_files=self.check_files)
        if self.target_range is not None:
            low, high = self.target_range
            for pairs in files.values():
                check_targets(pairs, self.target, low, high,
                              f"data.target_range=[{low:g}, {high:g}]")
        elif self.shape == PAIR_SCORE:
            for pairs in files.values():
                check_targets(pairs, self.target, 0.0, 1.0,
                              "[0, 1] (pair scores; data.target_range scales other ranges)")
        problems = sorted((p for pairs in files.values() for p in pairs.problems),
                          key=lambda p: (p.file, line_order(p)))
        what = f"data.path={str(self.path)!r}"
        if problems and not self.skip_bad_rows:
            raise_problems(problems, what)
        rows = self._rows(files)
        if problems:
            self.skipped = problems
            skipped = sum(len(pairs.bad_rows) for pairs in files.values())
            shown = "\n".join(f"  {p}" for p in problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            warnings.warn(f"{what}: {skipped} rows with a problem are skipped "
                          f"(data.skip_bad_rows=true):\n{shown}{more}", stacklevel=2)
        self._build(rows)

    def _rows(self, files: dict[str, PairFile]) -> dict[str, Any]:
        """The good rows of every file (at least ``min_target``), concatenated: values per
        field, targets (scaled), split codes (-1: to be cut), groups."""
        values: list[list[str]] = [[] for _ in self.fields]
        target, split, group = [], [], []
        self.dropped = {}
        for code, name in enumerate(_SPLIT_NAMES):
            pairs = files.get(name)
            if pairs is None:
                continue
            dropped = 0
            for row in range(len(pairs)):
                if row in pairs.bad_rows:
                    continue
                if self.min_target is not None and pairs.target[row] < self.min_target:
                    dropped += 1
                    continue
                for field, column in zip(values, pairs.values, strict=True):
                    field.append(column[row])
                if self.passes_target:
                    target.append(self._scaled(pairs.target[row]))
                if name != "train":
                    split.append(code)
                else:
                    split.append(pairs.split[row] if pairs.split is not None else -1)
                group.append(f"{name}:{pairs.group[row]}" if pairs.group is not None
                             else f"{name}:{row}")
            if self.min_target is not None:
                self.dropped[name] = dropped
        if self.min_target is not None:
            kept = {name: len(files[name]) - len(files[name].bad_rows) - dropped
                    for name, dropped in self.dropped.items()}
            log.info("data.min_target=%g: dropped %d rows whose %r is below it (%s); kept %d",
                     self.min_target, sum(self.dropped.values()), self.target,
                     ", ".join(f"{name} {str(files[name].file)!r}: {kept[name]} kept, "
                               f"{count} dropped" for name, count in self.dropped.items()),
                     sum(kept.values()))
        return {"values": values, "target": target, "split": np.array(split, dtype=np.int64),
                "group": group}

    def _scaled(self, value: float) -> float:
        if self.target_range is None:
            return value
        low, high = self.target_range
        return (value - low) / (high - low)

    # -- splits ----------------------------------------------------------------------------
    def _build(self, rows: dict[str, Any]) -> None:
        split = rows["split"].copy()
        split[split == -1] = TRAIN
        generator = torch.Generator().manual_seed(self.split_seed)
        for code, fraction, name in ((TEST, self.test_fraction, "test"),
                                     (VAL, self.val_fraction, "val")):
            if not (split == code).any():
                split[self._cut(rows["group"], split, fraction, generator, name)] = code
        final = {name: np.where(split == code)[0] for code, name in enumerate(_SPLIT_NAMES)}
        if self.subset is not None and len(final["train"]) > self.subset:
            order = torch.randperm(len(final["train"]),
                                   generator=torch.Generator().manual_seed(self.seed))
            final["train"] = np.sort(final["train"][order[: self.subset].numpy()])
        if not len(final["train"]):
            raise ValueError(f"data.path={str(self.path)!r}: no training rows left")
        self.split_rows = final
        values = [np.array(field, dtype=object) for field in rows["values"]]
        target = np.array(rows["target"], dtype=np.float32) if self.passes_target else None
        train = final["train"]
        self._train_keys = [tuple(str(field[row]) for field in values) for row in train]
        self.train_set = PairRows([field[train] for field in values], self.field_kinds,
                                  None if target is None else target[train],
                                  self.train_transform)
        for name in ("val", "test"):
            chosen = final[name]
            if self.eval_kind == "paired":
                dataset = PairRows([field[chosen] for field in values], self.field_kinds,
                                   target[chosen], self.eval_transform)
            else:
                dataset, roles = retrieval_items([field[chosen] for field in values[:2]],
                                                 self.field_kinds[:2], self.eval_transform)
                self._roles[name] = roles
            setattr(self, f"{name}_set", dataset)

    def _cut(self, groups: list[str], split: np.ndarray, fraction: float,
             generator: torch.Generator, name: str) -> np.ndarray:
        """Rows of ``fraction`` of the training groups, randomly chosen."""
        train = np.where(split == TRAIN)[0]
        distinct = list(dict.fromkeys(groups[row] for row in train))
        count = int(round(len(distinct) * fraction))
        if count < 1 or count >= len(distinct):
            how = f"data.group={self.group!r}" if self.group else "rows"
            raise ValueError(
                f"data.{name}_fraction={fraction} of the {len(distinct)} training {how} of "
                f"{str(self.path)!r} leaves no {name} or no training rows: change it, or give "
                f"the data {name} rows (data.split column or data.{name}_path)")
        order = torch.randperm(len(distinct), generator=generator)[:count].tolist()
        chosen = {distinct[i] for i in order}
        return np.array([row for row in train if groups[row] in chosen], dtype=np.int64)

    # -- loaders -------------------------------------------------------------------------
    def _replicas_and_rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader_options(self, collate: Callable) -> dict[str, Any]:
        pin_memory = self.pin_memory
        if pin_memory is None:
            trainer = getattr(self, "trainer", None)
            pin_memory = trainer is not None and trainer.strategy.root_device.type == "cuda"
        options: dict[str, Any] = {"num_workers": self.num_workers, "pin_memory": pin_memory,
                                   "collate_fn": collate}
        if self.num_workers > 0:
            options["persistent_workers"] = self.persistent_workers
        return options

    def train_batch_sampler(self) -> Sampler[list[int]]:
        """The training batches' sampler (``sampler`` setting; DDP-sharded, epoch-seeded)."""
        replicas, rank = self._replicas_and_rank()
        if self.sampler == NO_DUPLICATES:
            return NoDuplicatesBatchSampler(self._train_keys, self.batch_size, self.drop_last,
                                            seed=self.seed, num_replicas=replicas, rank=rank)
        return RandomBatchSampler(len(self.train_set), self.batch_size, self.drop_last,
                                  seed=self.seed, num_replicas=replicas, rank=rank)

    def _pair_collate(self, with_index: bool) -> PairCollate:
        return PairCollate(self.field_kinds, self.tokenizer, self.max_length,
                           self.passes_target, with_index)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_sampler=self.train_batch_sampler(),
                          **self._loader_options(self._pair_collate(with_index=False)))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def _eval_loader(self, name: str) -> DataLoader:
        dataset = getattr(self, f"{name}_set")
        replicas, rank = self._replicas_and_rank()
        if self.eval_kind == "paired":
            segments = [(0, len(dataset))]
            collate = self._pair_collate(with_index=True)
        else:
            segments = dataset.segments
            collate = ItemCollate(self.tokenizer, self.max_length)
        sampler = SegmentBatches(segments, self.eval_batch_size, replicas, rank)
        return DataLoader(IndexedDataset(dataset), batch_sampler=sampler,
                          **self._loader_options(collate))


NO_DUPLICATES, RANDOM = "no_duplicates", "random"


def _binary(files: dict[str, PairFile], target_range: Sequence[float] | None) -> bool:
    """Every target read is +1 or -1 (and no range scales them): a ``pair_target`` shape."""
    if target_range is not None:
        return False
    values = {v for pairs in files.values() for v in (pairs.target or ()) if v is not None}
    return bool(values) and values <= {1.0, -1.0}


def _check_settings(fields: dict[str, str], image_fields: tuple[str, ...],
                    target_range: Sequence[float] | None, val_fraction: float,
                    test_fraction: float, sampler: str, batch_size: int, eval_batch_size: int,
                    subset: int | None, num_workers: int | None, max_length: int) -> None:
    if len(fields) < 2:
        raise ValueError(f"data.fields must map two or more roles to columns, got {fields}")
    unknown = [role for role in image_fields if role not in fields]
    if unknown:
        raise ValueError(f"data.image_fields={list(image_fields)} names roles not in "
                         f"data.fields ({list(fields)}): {unknown}")
    if target_range is not None:
        bounds = list(target_range)
        if len(bounds) != 2 or not float(bounds[0]) < float(bounds[1]):
            raise ValueError(f"data.target_range must be [low, high] with low < high, got "
                             f"{bounds}")
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < value < 1:
            raise ValueError(f"data.{name} must be in (0, 1), got {value}")
    if sampler not in PAIR_SAMPLERS:
        raise ValueError(f"data.sampler must be one of {list(PAIR_SAMPLERS)}, got {sampler!r}")
    for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                        ("max_length", max_length)):
        if value < 1:
            raise ValueError(f"data.{name} must be positive, got {value}")
    if subset is not None and subset < 1:
        raise ValueError(f"data.subset must be a positive number of rows, got {subset}")
    if num_workers is not None and num_workers < 0:
        raise ValueError(f"data.num_workers must be >= 0 (or null), got {num_workers}")
