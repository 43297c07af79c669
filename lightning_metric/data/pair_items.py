"""The datasets, collates and evaluation batches of :class:`~lightning_metric.data.PairDataModule`.

- :class:`PairRows` / :class:`PairCollate`: rows of paired fields, collated into the paired
  batch ``{"inputs": [...], "target": ...}`` (texts tokenized, images stacked).
- :func:`retrieval_items` / :class:`RetrievalItems` / :class:`ItemCollate`: the distinct
  values of the first two fields as ``(x, label, index)`` items for retrieval evaluation,
  labelled by the connected components of the query-positive pairs.
- :class:`SegmentBatches`: evaluation batches that never cross a field's segment (one
  modality a batch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler, default_collate

from .items import TextCollate, read_rgb, to_unit_float
from .roles import EvalRoles


def _load(value: str, kind: str, transform: Callable | None) -> Any:
    return (transform or to_unit_float)(read_rgb(value)) if kind == "image" else value


class PairRows(Dataset):
    """Row ``i`` as ``(values, target)``: a text (str) or a decoded, transformed image for
    every field, and the row's target (None without)."""

    def __init__(self, values: Sequence[np.ndarray], kinds: Sequence[str],
                 target: np.ndarray | None, transform: Callable | None):
        self.values, self.kinds, self.target, self.transform = values, kinds, target, transform

    def __len__(self) -> int:
        return len(self.values[0])

    def __getitem__(self, index: int) -> tuple[tuple, float | None]:
        loaded = tuple(_load(str(field[index]), kind, self.transform)
                       for field, kind in zip(self.values, self.kinds, strict=True))
        return loaded, None if self.target is None else float(self.target[index])


class PairCollate:
    """``[(values, target[, index]), ...]`` -> ``{"inputs": [...], "target": (B,)[,
    "indices": (B,)]}``: texts through the tokenizer, images stacked."""

    def __init__(self, kinds: Sequence[str], tokenizer: Any, max_length: int,
                 with_target: bool, with_index: bool):
        self.kinds, self.tokenizer, self.max_length = tuple(kinds), tokenizer, max_length
        self.with_target, self.with_index = with_target, with_index

    def __call__(self, batch: Sequence[tuple]) -> dict[str, Any]:
        values = [item[0] for item in batch]
        inputs = []
        for position, kind in enumerate(self.kinds):
            column = [row[position] for row in values]
            if kind == "image":
                inputs.append(torch.stack(column))
            else:
                inputs.append(dict(self.tokenizer(column, padding=True, truncation=True,
                                                  max_length=self.max_length,
                                                  return_tensors="pt")))
        out: dict[str, Any] = {"inputs": inputs}
        if self.with_target:
            out["target"] = torch.tensor([item[1] for item in batch], dtype=torch.float32)
        if self.with_index:
            out["indices"] = torch.tensor([item[2] for item in batch], dtype=torch.long)
        return out


class RetrievalItems(Dataset):
    """Distinct values of the query and gallery fields as ``(x, label)`` items, field by
    field (``segments``: each field's ``[start, end)``)."""

    def __init__(self, values: Sequence[str], kinds: Sequence[str], labels: Tensor,
                 segments: list[tuple[int, int]], transform: Callable | None):
        self.values = np.array(list(values), dtype=object)
        self.kinds, self.labels = list(kinds), labels
        self.segments, self.transform = segments, transform

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return (_load(str(self.values[index]), self.kinds[index], self.transform),
                int(self.labels[index]))


def retrieval_items(fields: Sequence[np.ndarray], kinds: Sequence[str],
                    transform: Callable | None) -> tuple[RetrievalItems, EvalRoles]:
    """The distinct values of the query field then the gallery field as items labelled by
    their connected component of the query-positive graph (union-find over the values:
    rows sharing a text or an image are one component), and their query / gallery roles."""
    queries, gallery = (list(dict.fromkeys(str(v) for v in field)) for field in fields)
    parent: dict[str, str] = {}

    def find(value: str) -> str:
        parent.setdefault(value, value)
        while parent[value] != value:
            parent[value] = parent[parent[value]]
            value = parent[value]
        return value

    for query, positive in zip(fields[0], fields[1], strict=True):
        root_q, root_p = find(str(query)), find(str(positive))
        if root_q != root_p:
            parent[root_p] = root_q
    components: dict[str, int] = {}
    values = [*queries, *gallery]
    labels = torch.tensor([components.setdefault(find(v), len(components)) for v in values],
                          dtype=torch.long)
    n_queries = len(queries)
    item_kinds = [kinds[0]] * n_queries + [kinds[1]] * len(gallery)
    segments = [(0, n_queries), (n_queries, len(values))]
    is_query = torch.zeros(len(values), dtype=torch.bool)
    is_query[:n_queries] = True
    return (RetrievalItems(values, item_kinds, labels, segments, transform),
            EvalRoles(is_query, ~is_query))


class ItemCollate:
    """``[(x, label, index), ...]`` of one field: texts through :class:`TextCollate`,
    images by PyTorch's default collation."""

    def __init__(self, tokenizer: Any, max_length: int):
        self.text = TextCollate(tokenizer, max_length)

    def __call__(self, batch: Sequence[tuple]) -> tuple:
        if isinstance(batch[0][0], str):
            return self.text(batch)
        return tuple(default_collate(batch))


class SegmentBatches(Sampler[list[int]]):
    """Evaluation batches in dataset order that never cross a segment's end (one field a
    batch). Under DDP each segment is sharded like ``DistributedSampler(shuffle=False)``
    (padded with its first items to a multiple of the ranks; the metrics drop the copies
    by index), rank ``r`` taking items ``r, r + W, ...``, so every rank has as many batches."""

    def __init__(self, segments: Sequence[tuple[int, int]], batch_size: int,
                 num_replicas: int = 1, rank: int = 0):
        self.segments, self.batch_size = list(segments), batch_size
        self.num_replicas, self.rank = num_replicas, rank

    def _parts(self) -> list[list[int]]:
        parts = []
        for start, end in self.segments:
            indices = list(range(start, end))
            if not indices:
                continue
            padding = -len(indices) % self.num_replicas
            indices += (indices * (padding // len(indices) + 1))[:padding]
            parts.append(indices[self.rank::self.num_replicas])
        return parts

    def __iter__(self) -> Iterator[list[int]]:
        for part in self._parts():
            for start in range(0, len(part), self.batch_size):
                yield part[start:start + self.batch_size]

    def __len__(self) -> int:
        return sum(-(-len(part) // self.batch_size) for part in self._parts())
