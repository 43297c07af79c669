"""Histogram loss: the probability that a negative pair is more similar than a positive one.

The similarities of the batch's positive pairs and of its negative pairs are
estimated as two soft histograms over ``[-1, 1]``; the loss is the probability
that a random negative pair scores above a random positive pair. It has a
single setting, the bin width. Under DDP it computes the whole gathered batch on
every rank (``gather_mode = "global"``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..distances import BaseDistance, CosineSimilarity
from ..indices import label_masks, to_triplets
from ._reduction import SubLoss
from .base import BaseMetricLoss


class HistogramLoss(BaseMetricLoss):
    """Histogram loss (Ustinova and Lempitsky, NeurIPS 2016).

    Each pair similarity ``s`` in ``[-1, 1]`` adds linear weights to the two nodes of its
    bin (nodes ``-1, -1 + delta, ..., 1``); dividing by the number of pairs gives the
    densities ``p+`` (positive pairs) and ``p-`` (negative pairs) and::

        loss = sum_r p-_r * sum_{q <= r} p+_q

    (an estimate of ``P(s_negative > s_positive)``). Each unordered pair ``{i, j}`` counts
    once. The pairs are those of the triplets: without an ``indices_tuple``, the pairs of
    items that have both a positive and a negative in the batch (either item of the pair);
    with one, the pairs of its triplets (pairs are turned into triplets first). Reduced
    already: the reducer does not apply.

    Args:
        n_bins: number of bins over ``[-1, 1]``; default 100 when ``delta`` is None too.
        delta: bin width, ``2 / n_bins``; give one of the two (both must agree).
        **kwargs: ``distance`` (default cosine similarity: a similarity in ``[-1, 1]``;
            a distance is refused), ``embedding_regularizer``, ...

    Inputs: ``embeddings`` ``(B, D)`` with ``labels`` ``(B,)``, or an ``indices_tuple``;
    ``ref_emb`` is not supported (a ValueError).

    Differences from PML 2.9: a similarity of exactly 1 (two identical embeddings, or
    rounding above 1) crashes PML's ``scatter_add_`` (bin index out of range); here it lies
    in the last bin (similarities are clamped to ``[-1, 1]``). The bin index is computed
    in the embeddings' dtype (PML: float32), which can differ only for a similarity
    within float32 rounding of a bin edge.

    Paper: "Learning Deep Embeddings with Histogram Loss", https://arxiv.org/abs/1611.00822.

    Example::

        >>> loss_fn = HistogramLoss(n_bins=50)
        >>> loss = loss_fn(torch.randn(32, 64), torch.arange(8).repeat(4))
    """

    def __init__(self, n_bins: int | None = None, delta: float | None = None, **kwargs):
        super().__init__(**kwargs)
        if not self.distance.is_inverted:
            raise ValueError(
                "HistogramLoss bins similarities in [-1, 1]: distance must be a similarity "
                f"(cosine), got {type(self.distance).__name__}"
            )
        if n_bins is not None and (int(n_bins) != n_bins or n_bins < 1):
            raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
        if delta is not None and not 0 < delta <= 2:
            raise ValueError(f"delta must lie in (0, 2], got {delta!r}")
        if delta is not None and n_bins is not None and not math.isclose(delta, 2 / n_bins):
            raise ValueError(
                f"delta and n_bins must satisfy delta = 2 / n_bins, got delta={delta} and "
                f"n_bins={n_bins}"
            )
        if delta is None and n_bins is None:
            n_bins = 100
        self.delta = delta if delta is not None else 2 / n_bins

    def default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, same_set):
        if not same_set:
            raise ValueError("HistogramLoss does not support ref_emb / ref_labels")
        n = len(embeddings)
        if indices_tuple is None:
            positive, negative = label_masks(labels, labels, True)
            anchors = positive.any(dim=1) & negative.any(dim=1)
            counted = anchors.unsqueeze(1) | anchors.unsqueeze(0)
            upper = torch.ones(n, n, dtype=torch.bool, device=embeddings.device).triu_(1)
            pos_pairs = positive & counted & upper
            neg_pairs = negative & counted & upper
        else:
            a, p, neg = to_triplets(indices_tuple, labels, labels, True)
            pos_pairs = _unordered_pair_mask(a, p, n)
            neg_pairs = _unordered_pair_mask(a, neg, n)
        if not pos_pairs.any():  # no triplet
            return {}
        mat = self.distance(embeddings).clamp(-1, 1)
        cdf_pos = torch.cumsum(self._density(mat[pos_pairs]), dim=0)
        loss = (self._density(mat[neg_pairs]) * cdf_pos).sum()
        return {"loss": SubLoss(loss, reduced=True)}

    def _density(self, sims: Tensor) -> Tensor:
        """``(nodes,)`` linear-interpolation histogram of ``sims`` ``(n,)``, summing to 1."""
        nodes = round(1 + 2 / self.delta)
        bins = torch.floor((sims.detach() + 1) / self.delta).long().clamp_(0, nodes - 2)
        upper_weight = (sims + 1 - bins * self.delta) / self.delta
        lower_weight = ((bins + 1) * self.delta - 1 - sims) / self.delta
        density = sims.new_zeros(nodes)
        density = density.scatter_add(0, bins + 1, upper_weight)
        density = density.scatter_add(0, bins, lower_weight)
        return density / len(sims)

    def extra_repr(self) -> str:
        return f"delta={self.delta}"


def _unordered_pair_mask(first: Tensor, second: Tensor, n: int) -> Tensor:
    """``(n, n)`` mask of the pairs ``{first[k], second[k]}``, at ``(min, max)``."""
    mask = torch.zeros(n, n, dtype=torch.bool, device=first.device)
    mask[torch.minimum(first, second), torch.maximum(first, second)] = True
    return mask
