"""Which pairs and triplets of a batch a loss looks at.

Indices tuples follow PML's convention: pairs are ``(a1, p, a2, n)`` (positive
pairs ``(a1[i], p[i])``, negative pairs ``(a2[j], n[j])``), triplets are
``(a, p, n)``. Anchors index the query embeddings, the others index the
reference set (the query set itself when there is no ``ref_emb``).

``same_set`` says whether the reference set is the query set: then an item is
never its own positive.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import IndicesTuple


def label_masks(labels: Tensor, ref_labels: Tensor, same_set: bool) -> tuple[Tensor, Tensor]:
    """Boolean ``(N, M)`` masks ``(positive, negative)`` from labels.

    ``positive[i, j]``: same label (and ``i != j`` when ``same_set``);
    ``negative[i, j]``: different label.
    """
    positive = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
    negative = ~positive
    if same_set:
        positive.fill_diagonal_(False)
    return positive, negative


def all_pairs(labels: Tensor, ref_labels: Tensor, same_set: bool) -> IndicesTuple:
    """Every positive and negative pair, row-major: ``(a1, p, a2, n)``."""
    positive, negative = label_masks(labels, ref_labels, same_set)
    a1, p = torch.where(positive)
    a2, n = torch.where(negative)
    return a1, p, a2, n


def to_pairs(
    indices_tuple: IndicesTuple | None, labels: Tensor, ref_labels: Tensor, same_set: bool
) -> IndicesTuple:
    """Pairs from nothing (all pairs), pairs (as given) or triplets (``(a, p, a, n)``)."""
    if indices_tuple is None:
        return all_pairs(labels, ref_labels, same_set)
    if len(indices_tuple) == 4:
        return tuple(indices_tuple)
    a, p, n = indices_tuple
    return a, p, a, n


def pairs_to_triplets(pairs: IndicesTuple) -> tuple[Tensor, Tensor, Tensor]:
    """Every (positive pair, negative pair) combination that shares its anchor.

    Ordered by positive pair, then by negative pair, as PML orders them.
    """
    a1, p, a2, n = pairs
    pos_idx, neg_idx = torch.where(a1.unsqueeze(1) == a2.unsqueeze(0))
    return a1[pos_idx], p[pos_idx], n[neg_idx]


def all_triplets(labels: Tensor, ref_labels: Tensor, same_set: bool) -> tuple[Tensor, ...]:
    """Every triplet ``(a, p, n)`` in ``(a, p, n)`` lexicographic order.

    Builds the triplets one anchor at a time, never a ``(B, B, B)`` tensor; the
    result itself has ``sum_a |P(a)| * |N(a)|`` entries, so losses that only need
    a reduction over all triplets should use a matrix path instead.
    """
    positive, negative = label_masks(labels, ref_labels, same_set)
    n_pos = positive.sum(dim=1)
    n_neg = negative.sum(dim=1)
    counts = n_pos * n_neg
    anchors = torch.repeat_interleave(torch.arange(len(labels), device=labels.device), counts)
    if len(anchors) == 0:
        empty = torch.empty(0, dtype=torch.long, device=labels.device)
        return empty, empty.clone(), empty.clone()
    pos_lists = [torch.where(row)[0] for row in positive]
    neg_lists = [torch.where(row)[0] for row in negative]
    p_parts, n_parts = [], []
    for pos, neg in zip(pos_lists, neg_lists, strict=True):
        if len(pos) and len(neg):
            p_parts.append(pos.repeat_interleave(len(neg)))
            n_parts.append(neg.repeat(len(pos)))
    return anchors, torch.cat(p_parts), torch.cat(n_parts)


def random_triplets(
    labels: Tensor,
    ref_labels: Tensor,
    same_set: bool,
    triplets_per_anchor: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``triplets_per_anchor`` random triplets for every anchor that has a positive and a negative.

    Positives and negatives are drawn uniformly with replacement from the anchor's
    own positives and negatives.
    """
    if triplets_per_anchor < 1:
        raise ValueError(f"triplets_per_anchor must be >= 1 or 'all', got {triplets_per_anchor}")
    positive, negative = label_masks(labels, ref_labels, same_set)
    n_pos, n_neg = positive.sum(dim=1), negative.sum(dim=1)
    anchors = torch.where((n_pos > 0) & (n_neg > 0))[0].repeat_interleave(triplets_per_anchor)
    positives = _draw(positive, n_pos, anchors, generator)
    return anchors, positives, _draw(negative, n_neg, anchors, generator)


def _draw(mask: Tensor, counts: Tensor, rows: Tensor, generator: torch.Generator | None) -> Tensor:
    """For each entry of ``rows``, the column of a uniformly drawn True entry of ``mask[row]``."""
    true_first = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)
    uniform = torch.rand(len(rows), generator=generator, device=mask.device)
    k = (uniform * counts[rows]).long().clamp(max=mask.shape[1] - 1)
    return true_first[rows, k]


def to_triplets(
    indices_tuple: IndicesTuple | None,
    labels: Tensor,
    ref_labels: Tensor,
    same_set: bool,
    triplets_per_anchor: int | str = "all",
) -> tuple[Tensor, Tensor, Tensor]:
    """Triplets from nothing (all, or random per anchor), triplets (as given) or pairs."""
    if indices_tuple is None:
        if triplets_per_anchor == "all":
            return all_triplets(labels, ref_labels, same_set)
        return random_triplets(labels, ref_labels, same_set, int(triplets_per_anchor))
    if len(indices_tuple) == 3:
        return tuple(indices_tuple)
    return pairs_to_triplets(indices_tuple)


def pair_masks(pairs: IndicesTuple, shape: tuple[int, int], device) -> tuple[Tensor, Tensor]:
    """Boolean ``(N, M)`` masks of the positive and negative pairs in ``pairs``."""
    a1, p, a2, n = pairs
    pos_mask = torch.zeros(shape, dtype=torch.bool, device=device)
    neg_mask = torch.zeros(shape, dtype=torch.bool, device=device)
    pos_mask[a1, p] = True
    neg_mask[a2, n] = True
    return pos_mask, neg_mask
