"""Dynamic soft margin loss: triplet margins weighted by their own running CDF.

The loss keeps a histogram of the margins ``d(a, p) - d(a, n)`` it has seen (a moving
average over batches, in the buffer ``hist_``) and weighs each margin by the fraction of
past margins below it, so the hardest triplets of the recent past weigh most, without a
margin to tune. Under DDP it computes the whole gathered batch on every rank
(``gather_mode = "global"``), so every rank updates the same histogram.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._checks import check_embeddings, check_ref_emb
from ..distances import LpDistance, to_compute_dtype
from ..indices import label_masks, to_triplets
from ._all_triplets import anchor_chunks, padded_columns
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
    detached. Without an ``indices_tuple`` the margins of all ``sum_a |P(a)| * |N(a)|``
    triplets are binned one chunk of anchors at a time, never listed (PML lists them from a
    ``(B, B, B)`` mask): memory stays near ``(B, B)``.

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
            terms = self._weighted(*self._statistics(self._matching_margins(emb, ref)))
            if self.embedding_regularizer is not None:
                reg = self.embedding_regularizer(emb) * self.embedding_reg_weight
                terms["embedding_reg_loss"] = SubLoss(reg, reduced=True)
            return reduce_all(terms, self.reducer, lambda: connected_zero(emb, ref))

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, same_set):
        if labels is None:
            raise ValueError("DynamicSoftMarginLoss needs labels with an indices_tuple")
        mat = self.distance(embeddings, ref_emb)
        if indices_tuple is None:
            positive, negative = label_masks(labels, ref_labels, same_set)
            return self._weighted(*self._all_triplet_statistics(mat, positive, negative))
        a, p, n = to_triplets(indices_tuple, labels, ref_labels, same_set)
        return self._weighted(*self._statistics(mat[a, p] - mat[a, n]))

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

    # The margins enter the loss only through their sums and counts per bin: below
    # ``min_val`` (bin 0), between nodes ``k`` and ``k + 1`` (bin ``k + 1``), at or past the
    # last node (bin ``num_bins``). Inside a bin the histogram's share and the CDF weight are
    # affine in the margin, so ``(sums, counts)`` give the same value and gradient as the
    # margins one by one, and every triplet of a batch is binned without being listed.

    def _bins(self, margins: Tensor) -> Tensor:
        """Each margin's bin in ``[0, num_bins]``, as a long tensor of the same shape."""
        node = torch.floor((margins.detach() - self.min_val) / self.delta)
        return node.clamp_(-1, self.num_bins - 1).add_(1).long()

    def _statistics(self, margins: Tensor) -> tuple[Tensor, Tensor]:
        """``(sums, counts)`` ``(num_bins + 1,)`` of a list of margins (differentiable sums)."""
        bins = self._bins(margins)
        sums = margins.new_zeros(self.num_bins + 1).index_add(0, bins, margins)
        return sums, torch.bincount(bins, minlength=self.num_bins + 1)

    def _all_triplet_statistics(
        self, mat: Tensor, positive: Tensor, negative: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``(sums, counts)`` of the margins ``mat[a, p] - mat[a, n]`` of every triplet the
        ``(N, M)`` masks allow, one chunk of anchors at a time (never a list of triplets)."""
        anchors = torch.where(positive.any(dim=1) & negative.any(dim=1))[0]
        if len(anchors) < len(mat):
            mat, positive, negative = mat[anchors], positive[anchors], negative[anchors]
        pos_cols, pos_valid = padded_columns(positive)
        triplets = _TripletBins(self, pos_valid, negative)
        sums = _AllTripletMarginSums.apply(mat.gather(1, pos_cols), mat, triplets)
        return sums, triplets.counts

    def _weighted(self, sums: Tensor, counts: Tensor) -> dict[str, SubLoss]:
        num_margins = int(counts.sum())
        if num_margins == 0:
            return {}
        hist = self._blended_histogram(sums, counts)
        if self.training:
            self.hist_ = hist.detach()
        # The CDF at each bin's node: the first node below min_val, the last past it.
        nodes = (torch.arange(self.num_bins + 1, device=sums.device) - 1).clamp_(min=0)
        cdf = torch.cumsum(hist, 0)[nodes]
        return {"loss": SubLoss((cdf * sums).sum() / num_margins, reduced=True)}

    def _blended_histogram(self, sums: Tensor, counts: Tensor) -> Tensor:
        """``hist_`` blended with the batch's histogram, summing to 1.

        A margin ``x`` between nodes ``k`` and ``k + 1`` gives node ``k + 1`` the share
        ``(x - min_val) / delta - k`` and node ``k`` the rest; outside the nodes' range a
        margin counts whole at the nearest end node.
        """
        old = self.hist_.to(device=sums.device, dtype=sums.dtype)
        counts = counts.to(sums.dtype)
        between = slice(1, self.num_bins)  # the bins between two nodes
        nodes = torch.arange(self.num_bins - 1, device=sums.device, dtype=sums.dtype)
        upper = (sums[between] - self.min_val * counts[between]) / self.delta
        upper = upper - nodes * counts[between]
        ends = torch.zeros_like(old)
        ends[0], ends[-1] = counts[0], counts[-1]
        batch = F.pad(counts[between] - upper, (0, 1)) + F.pad(upper, (1, 0)) + ends
        momentum = self.momentum if bool(old.sum() != 0) else 1.0
        hist = (1.0 - momentum) * old + momentum * batch
        return hist / hist.sum()

    def extra_repr(self) -> str:
        return f"min_val={self.min_val}, num_bins={self.num_bins}, momentum={self.momentum}"


@dataclass
class _TripletBins:
    """Which triplets exist, and how to bin their margins, for :class:`_AllTripletMarginSums`.

    Triplet ``(a, j, n)`` is anchor ``a``'s ``j``-th positive (``pos_valid`` ``(A, P)``) with
    reference ``n`` (``neg_valid`` ``(A, M)``). ``counts`` is set by the forward pass.
    """

    loss: DynamicSoftMarginLoss
    pos_valid: Tensor
    neg_valid: Tensor
    counts: Tensor | None = field(default=None)

    @property
    def padding_bin(self) -> int:
        """The bin of the padding triplets, after the loss's ``num_bins + 1`` margin bins."""
        return self.loss.num_bins + 1

    def chunks(self):
        anchors, positives = self.pos_valid.shape
        per_anchor = positives * self.neg_valid.shape[1] * 24  # margins, bins, float64 copy
        return anchor_chunks(anchors, per_anchor, self.pos_valid.device)

    def bins(self, d_ap: Tensor, d_an: Tensor, rows: slice) -> tuple[Tensor, Tensor]:
        """The ``(chunk, P, M)`` margins of the anchors in ``rows`` and their bins; the
        padding triplets go to :attr:`padding_bin`."""
        margins = d_ap[rows].unsqueeze(2) - d_an[rows].unsqueeze(1)
        bins = self.loss._bins(margins)
        valid = self.pos_valid[rows].unsqueeze(2) & self.neg_valid[rows].unsqueeze(1)
        return margins, bins.masked_fill_(~valid, self.padding_bin)


class _AllTripletMarginSums(torch.autograd.Function):
    """Per bin, the sum of ``d_ap[a, j] - d_an[a, n]`` over the triplets of ``triplets``:
    ``(num_bins + 1,)`` in the compute dtype, accumulated in float64. The backward
    recomputes each chunk's bins (nothing ``(A, P, M)`` is kept). Differentiable once."""

    @staticmethod
    def forward(ctx, d_ap: Tensor, d_an: Tensor, triplets: _TripletBins) -> Tensor:
        size = triplets.padding_bin + 1
        sums = torch.zeros(size, dtype=torch.float64, device=d_ap.device)
        counts = torch.zeros(size, dtype=torch.long, device=d_ap.device)
        for rows in triplets.chunks():
            margins, bins = triplets.bins(d_ap, d_an, rows)
            bins = bins.view(-1)
            sums += torch.bincount(bins, weights=margins.view(-1).double(), minlength=size)
            counts += torch.bincount(bins, minlength=size)
        triplets.counts = counts[:-1]
        ctx.save_for_backward(d_ap, d_an)
        ctx.triplets = triplets
        return sums[:-1].to(d_ap.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_sums: Tensor) -> tuple[Tensor, Tensor, None]:
        d_ap, d_an = ctx.saved_tensors
        triplets = ctx.triplets
        per_bin = F.pad(grad_sums, (0, 1))  # the padding bin has no gradient
        grad_ap, grad_an = torch.empty_like(d_ap), torch.empty_like(d_an)
        for rows in triplets.chunks():
            _, bins = triplets.bins(d_ap, d_an, rows)
            per_triplet = per_bin[bins]
            grad_ap[rows] = per_triplet.sum(dim=2)
            grad_an[rows] = per_triplet.sum(dim=1).neg_()
        return grad_ap, grad_an, None
