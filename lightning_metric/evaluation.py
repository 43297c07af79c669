"""Retrieval quality of embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def precision_at_1(embeddings: Tensor, labels: Tensor, chunk_size: int = 4096) -> float:
    """Share of items whose nearest other item (cosine) has the same label.

    ``embeddings`` ``(N, D)``, ``labels`` ``(N,)``; the item itself is excluded.
    Computed in chunks of rows so memory stays ``O(chunk_size * N)``.
    """
    if embeddings.ndim != 2 or len(embeddings) != len(labels):
        raise ValueError(
            f"embeddings must be (N, D) with N == len(labels), got {tuple(embeddings.shape)} "
            f"and {len(labels)} labels"
        )
    if len(labels) < 2:
        raise ValueError("precision_at_1 needs at least 2 items")
    normalized = F.normalize(embeddings.float(), dim=1)
    hits = 0
    for start in range(0, len(labels), chunk_size):
        rows = normalized[start : start + chunk_size]
        similarity = rows @ normalized.T
        own = torch.arange(start, start + len(rows), device=rows.device)
        similarity[torch.arange(len(rows)), own] = -float("inf")
        nearest = similarity.argmax(dim=1)
        hits += int((labels[nearest] == labels[own]).sum())
    return hits / len(labels)
