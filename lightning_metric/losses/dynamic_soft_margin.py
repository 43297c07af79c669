"""Dynamic soft margin loss: triplet margins weighted by their own running CDF.

The loss keeps a histogram of the margins ``d(a, p) - d(a, n)`` it has seen (a moving
average over batches, in the buffer ``hist_``) and weighs each margin by the fraction of
past margins below it, so the hardest triplets of the recent past weigh most, without a
margin to tune. Under DDP it computes the whole gathered batch on every rank
(``gather_mode = "global"``), so every rank updates the same histogram.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_embeddings, check_ref_emb
from ..distances import LpDistance, to_compute_dtype
from ..indices import to_triplets
from ._reduction import SubLoss, connected_zero, reduce_all
from .base import BaseMetricLoss


class DynamicSoftMarginLoss(BaseMetricLoss):
    """Dynamic soft margin loss (Zhang and Rusinkiewicz, "Learning Local Descriptors With a
    CDF-Based Dynamic Soft Margin", ICCV 2019), as PML 2.9 computes it.

    Each triplet gives the margin ``x = d(a, p) - d(a, n)`` (Euclidean distances of unit
    rows, so ``x`` lies in ``[-2, 2]``). The margins are binned on the nodes
    ``min_val + k * delta``, ``k = 0 .. num_bins - 1``, ``delta = 2 * |min_val| / num_bins``,
    each margin splitting a unit weight linearly between the two nodes around it; the
    batch's histogram ``h`` is blended into the running one
    ``hist_ <- normalise((1 - momentum) * hist_ + momentum * h)`` (``momentum = 1`` while
    ``hist_`` is all zero), and::

        loss = mean over triplets of CDF(x) * x,   CDF = cumsum(hist_) at x's bin

    Reduced already: the reducer does not apply. The gradient flows through ``x`` and
    through this batch's share of the histogram, as PML's does; the stored histogram is
    detached.

    Args:
        min_val: the lowest margin binned, ``-2`` (a negative number).
        num_bins: the number of histogram nodes, 10.
        momentum: the weight of the current batch's histogram in the running one, 0.01.
        **kwargs: ``distance`` (default: Euclidean distance of L2-normalised rows, the only
            one accepted, as in PML), ``miner``, ``embedding_regularizer``, ...

    Inputs, two modes:

    - ``embeddings`` ``(B, D)`` with ``labels`` ``(B,)``: every triplet of the batch, or the
      triplets of ``indices_tuple`` (pairs are turned into triplets); ``ref_emb`` with
      ``ref_labels`` as a reference set.
    - no labels: ``embeddings`` ``(N, D)`` and ``ref_emb`` ``(M, D)`` are matching
      descriptors, row ``i`` of one with row ``i`` of the other (HardNet's batches); the
      margin of item ``i`` is ``d(a_i, p_i)`` minus the smallest distance from ``a_i`` or
      ``p_i`` to a non-matching row of the other set (with ``N != M`` the list is padded
      with zeros to ``max(N, M)``, as PML does). Without ``ref_emb`` the set is matched
      with itself. An ``indices_tuple`` needs labels (a ValueError; PML ignores it), and
      this mode never gathers across ranks.

    State: ``hist_`` ``(num_bins,)`` is a buffer (saved in checkpoints; it follows the
    compute dtype of the embeddings, as in PML). It is written only in training mode
    (``loss.train()``): in evaluation mode (``loss.eval()``) the loss value is computed
    exactly as in training, with the blended histogram, but ``hist_`` is left as it was.

    Differences from PML 2.9: PML keeps the autograd graph of the histogram from one call
    to the next, so the second ``backward`` fails ("Trying to backward through the graph a
    second time"); here the stored histogram is detached and training runs on. A margin at
    or above the last node (``min_val + (num_bins - 1) * delta``, 1.6 by default) or below
    ``min_val`` makes PML index past its histogram (a RuntimeError); here it counts at the
    last (first) node and is weighted by the CDF there. Without labels PML cannot
    backpropagate at all (it fills the diagonal of ``cdist``'s output in place, which
    ``cdist``'s backward needs); here it can. PML writes its histogram in evaluation mode too.

    Example::

        >>> loss_fn = DynamicSoftMarginLoss(num_bins=20)
        >>> loss = loss_fn(torch.randn(32, 64), torch.arange(8).repeat(4))
    """

    def __init__(self, min_val: float = -2.0, num_bins: int = 10, momentum: float = 0.01,
                 **kwargs):
        super().__init__(**kwargs)
        distance = self.distance
        if not (type(distance) is LpDistance and distance.normalize_embeddings
                and distance.p == 2):
            raise ValueError(
                "DynamicSoftMarginLoss needs the Euclidean distance of normalised embeddings "
                f"(distance=LpDistance(normalize_embeddings=True, p=2)), got {distance}"
            )
        if int(num_bins) != num_bins or num_bins < 2:
            raise ValueError(f"num_bins must be an integer >= 2, got {num_bins!r}")
        if not min_val < 0:
            raise ValueError(f"min_val must be negative, got {min_val!r}")
        if not 0 <= momentum <= 1:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum!r}")
        self.min_val = min_val
        self.num_bins = int(num_bins)
        self.delta = 2 * abs(min_val) / num_bins
        self.momentum = momentum
        self.register_buffer("hist_", torch.zeros(self.num_bins))

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple=None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        """Loss of ``embeddings`` ``(B, D)`` with ``labels`` ``(B,)`` (see the base class), or
        of matching rows of ``embeddings`` and ``ref_emb`` when ``labels`` is None."""
        if labels is not None or indices_tuple is not None:
            return super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        check_embeddings("embeddings", embeddings)
        if ref_labels is not None:
            raise ValueError("ref_labels was given without labels")
        if ref_emb is not None:
            check_ref_emb(ref_emb, embeddings)
        with torch.autocast(embeddings.device.type, enabled=False):
            emb = to_compute_dtype(embeddings)
            ref = emb if ref_emb is None else to_compute_dtype(ref_emb)
            terms = self._weighted(self._matching_margins(emb, ref))
            if self.embedding_regularizer is not None:
                reg = self.embedding_regularizer(emb) * self.embedding_reg_weight
                terms["embedding_reg_loss"] = SubLoss(reg, reduced=True)
            return reduce_all(terms, self.reducer, lambda: connected_zero(emb, ref))

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, same_set):
        if labels is None:
            raise ValueError("DynamicSoftMarginLoss needs labels with an indices_tuple")
        a, p, n = to_triplets(indices_tuple, labels, ref_labels, same_set)
        mat = self.distance(embeddings, ref_emb)
        return self._weighted(mat[a, p] - mat[a, n])

    def _matching_margins(self, emb: Tensor, ref: Tensor) -> Tensor:
        """``d(a_i, p_i)`` minus the hardest non-matching distance of row ``i`` or column
        ``i``, zero-padded to ``max(N, M)``."""
        mat = self.distance(emb, ref)
        rows, cols = mat.shape
        size, matched = max(rows, cols), min(rows, cols)
        diagonal = torch.arange(matched, device=mat.device)
        d_pos = mat.new_zeros(size)
        d_pos[:matched] = mat[diagonal, diagonal]
        off_diagonal = torch.ones_like(mat, dtype=torch.bool)
        off_diagonal[diagonal, diagonal] = False
        masked = mat.masked_fill(~off_diagonal, torch.inf)
        closest_in_col, closest_in_row = mat.new_zeros(size), mat.new_zeros(size)
        closest_in_col[:cols] = masked.min(dim=0).values
        closest_in_row[:rows] = masked.min(dim=1).values
        return d_pos - torch.minimum(closest_in_col, closest_in_row)

    def _weighted(self, margins: Tensor) -> dict[str, SubLoss]:
        if len(margins) == 0:
            return {}
        hist = self._blended_histogram(margins)
        if self.training:
            self.hist_ = hist.detach()
        index = self._node(margins).clamp(max=self.num_bins - 1)
        return {"loss": SubLoss((torch.cumsum(hist, 0)[index] * margins).mean(), reduced=True)}

    def _node(self, margins: Tensor) -> Tensor:
        """The node at or below each margin, clamped to the first (not to the last)."""
        return torch.floor((margins.detach() - self.min_val) / self.delta).long().clamp(min=0)

    def _blended_histogram(self, margins: Tensor) -> Tensor:
        """``hist_`` blended with the batch's histogram of ``margins``, summing to 1."""
        old = self.hist_.to(device=margins.device, dtype=margins.dtype)
        position = (margins - self.min_val) / self.delta
        node = self._node(margins)
        upper = position - node  # the share of the next node, in [0, 1) inside the range
        last = node >= self.num_bins - 1
        below = margins.detach() < self.min_val
        node = node.clamp(max=self.num_bins - 2)
        # Outside the nodes' range a margin counts at the nearest end node, unweighted.
        upper = torch.where(last, torch.ones_like(upper), upper)
        upper = torch.where(below, torch.zeros_like(upper), upper)
        momentum = self.momentum if bool(old.sum() != 0) else 1.0
        hist = ((1.0 - momentum) * old).scatter_add(0, node, momentum * (1 - upper))
        hist = hist.scatter_add(0, node + 1, momentum * upper)
        return hist / hist.sum()

    def extra_repr(self) -> str:
        return f"min_val={self.min_val}, num_bins={self.num_bins}, momentum={self.momentum}"
