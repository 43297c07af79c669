"""More of PML 2.9's miners: by angle, by hardness rank, and two that sample.

- :class:`AngularMiner` keeps the triplets whose angle at the negative exceeds ``angle``
  (in **degrees**), and :class:`HDCMiner` the hardest ``filter_percentage`` of the
  positive and of the negative pairs: both return the same tuples as PML 2.9.
- :class:`DistanceWeightedMiner` draws negatives with weights that undo the
  concentration of distances on the hypersphere, and :class:`UniformHistogramMiner`
  draws the same number of pairs from every bin of the distance histogram: both draw
  from the same distribution as PML 2.9, but from a ``torch.Generator`` of their own
  (``generator=``, or ``seed=``), never from the process-wide random state.

All of them are :class:`~lightning_metric.miners.BaseMiner` s: same call, ``ref_emb`` /
``ref_labels`` and ``ref_self_index`` as the other miners, exported from
:mod:`lightning_metric.miners`.

Example::

    >>> miner = DistanceWeightedMiner(generator=torch.Generator().manual_seed(0))
    >>> a, p, n = miner(embeddings, labels)                        # (B, D), (B,)
    >>> loss = MarginLoss(miner=miner)(embeddings, labels)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .distances import BaseDistance, LpDistance, to_compute_dtype
from .miners import BaseMiner, Pairs, Triplets, _enumerate_triplets

_PAIRWISE_EPS = 1e-6
"""``F.pairwise_distance``'s ``eps``, added to every coordinate of ``x1 - x2`` (PML measures
AngularMiner's distances with it)."""


class AngularMiner(BaseMiner):
    """Triplets whose angle at the negative is larger than ``angle`` **degrees** (PML's miner).

    For a triplet ``(a, p, n)``, with ``c = (a + p) / 2`` the centre of the anchor-positive
    segment, the angle is ``atan(|a - p| / (2 |n - c|))``: large when the negative is close
    to the pair relative to the pair's own spread, the triplets the Angular loss learns
    from. Wang et al., ICCV 2017, "Deep Metric Learning with Angular Loss",
    https://arxiv.org/abs/1708.01682.

    As in PML 2.9, the distances are measured on the embeddings *as given* and with
    ``F.pairwise_distance`` (which adds ``1e-6`` to every coordinate of the difference):
    PML insists on a normalising distance but its ``pairwise_distance`` does not normalise.
    For the paper's angle between unit vectors, pass ``normalize_embeddings=True`` (or
    normalise the embeddings first); the two agree on unit-norm embeddings.

    Args:
        angle: the threshold in **degrees** (not radians), in ``[0, 90]`` (``atan`` stays
            below 90); 20.
        normalize_embeddings: L2-normalise the embeddings before measuring; False (PML).

    Returns triplets ``(a, p, n)``, in lexicographic order.

    Example::

        >>> miner = AngularMiner(angle=20)          # degrees
        >>> a, p, n = miner(embeddings, labels)
        >>> loss = AngularLoss(miner=miner)(embeddings, labels)
    """

    def __init__(self, angle: float = 20, normalize_embeddings: bool = False):
        super().__init__(LpDistance())
        if not 0 <= angle <= 90:
            raise ValueError(f"angle is in degrees and must lie in [0, 90], got {angle!r}")
        self.angle = angle
        self.normalize_embeddings = normalize_embeddings

    def mine_embeddings(self, embeddings, ref_emb, mat, positive, negative) -> Triplets:
        emb, ref = to_compute_dtype(embeddings), to_compute_dtype(ref_emb)
        if self.normalize_embeddings:
            emb, ref = F.normalize(emb, dim=1), F.normalize(ref, dim=1)
        # ||x1 - x2 + eps||^2 for x1 a negative, x2 a centre, expanded into a matrix product.
        ref_terms = (ref * ref).sum(dim=1) + 2 * _PAIRWISE_EPS * ref.sum(dim=1)
        constant = emb.shape[1] * _PAIRWISE_EPS**2
        threshold = math.radians(self.angle)

        def keep(anchors: Tensor, positives: Tensor) -> Tensor:
            a, p = emb[anchors], ref[positives]
            ap = F.pairwise_distance(a, p, eps=_PAIRWISE_EPS)
            centres = (a + p) / 2
            centre_terms = (centres * centres).sum(dim=1) - 2 * _PAIRWISE_EPS * centres.sum(dim=1)
            squared = ref_terms - 2 * centres @ ref.T + (centre_terms + constant).unsqueeze(1)
            nc = squared.clamp_min(0).sqrt()
            return torch.atan(ap.unsqueeze(1) / (2 * nc)) > threshold

        return _enumerate_triplets(positive, negative, keep)

    def extra_repr(self) -> str:
        return f"angle={self.angle}, normalize_embeddings={self.normalize_embeddings}"


class HDCMiner(BaseMiner):
    """The hardest ``filter_percentage`` of the positive and of the negative pairs (PML's miner).

    From "Hard-Aware Deeply Cascaded Embedding" (Yuan et al., ICCV 2017,
    https://arxiv.org/abs/1611.05720): of all positive pairs, the ``ceil(filter_percentage *
    count)`` farthest; of all negative pairs, the same share of the closest ("farthest" and
    "closest" in the distance's direction). The positives and negatives are ranked
    separately, over the whole batch (not per anchor).

    Args:
        filter_percentage: the share of each kind of pair kept, in ``[0, 1]``; 0.5.
        distance: default Euclidean on normalised embeddings.

    Returns pairs ``(a1, p, a2, n)``, hardest first (``torch.topk``'s order, as in PML).

    Example::

        >>> miner = HDCMiner(filter_percentage=0.3)
        >>> loss = ContrastiveLoss(miner=miner)(embeddings, labels)
    """

    def __init__(self, filter_percentage: float = 0.5, distance: str | BaseDistance | None = None):
        super().__init__(distance)
        if not 0 <= filter_percentage <= 1:
            raise ValueError(f"filter_percentage must lie in [0, 1], got {filter_percentage!r}")
        self.filter_percentage = filter_percentage

    def mine(self, mat: Tensor, positive: Tensor, negative: Tensor) -> Pairs:
        a1, p = self._hardest(mat, positive, farthest=True)
        a2, n = self._hardest(mat, negative, farthest=False)
        return a1, p, a2, n

    def _hardest(self, mat: Tensor, mask: Tensor, farthest: bool) -> tuple[Tensor, Tensor]:
        # The pairs' values in row-major order, as PML ranks them (so ties break alike),
        # indexed by one flat position rather than two index lists.
        flat = _flat_positions(mask)
        values = mat.flatten()[flat]
        k = math.ceil(self.filter_percentage * len(values))
        largest = farthest != self.distance.is_inverted
        _, chosen = torch.topk(values, k=k, largest=largest)
        del values
        return _rows_and_columns(flat[chosen], mat.shape[1])

    def extra_repr(self) -> str:
        return f"filter_percentage={self.filter_percentage}"


class _SamplingMiner(BaseMiner):
    """A miner that draws at random, from its own ``torch.Generator``.

    ``generator``: the generator to draw from (its device is where the draws happen;
    the indices come back on the embeddings' device). Without one, the miner makes a CPU
    generator seeded with ``seed``, or with ``torch.initial_seed()`` (what
    ``torch.manual_seed`` / Lightning's ``seed_everything`` set) when ``seed`` is None.
    The process-wide random state is never read from nor advanced.
    """

    def __init__(
        self,
        distance: str | BaseDistance | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ):
        super().__init__(distance)
        if generator is not None and seed is not None:
            raise ValueError("pass either a generator or a seed, not both")
        if generator is None:
            seed = torch.initial_seed() if seed is None else seed
            generator = torch.Generator().manual_seed(int(seed))
        self.generator = generator

    def _multinomial(self, weights: Tensor, num_samples: int) -> Tensor:
        """``num_samples`` column indices a row of ``weights`` ``(R, M)``, with replacement."""
        device = weights.device
        draws = torch.multinomial(
            weights.to(self.generator.device), num_samples, replacement=True,
            generator=self.generator,
        )
        return draws.to(device)

    def _uniform(self, shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor:
        draws = torch.rand(shape, generator=self.generator, dtype=dtype,
                           device=self.generator.device)
        return draws.to(device)


class DistanceWeightedMiner(_SamplingMiner):
    """Triplets with negatives drawn by inverse distance density (PML's miner).

    On the unit sphere in ``D`` dimensions, pairwise distances ``d`` concentrate near
    ``sqrt(2)`` with density ``q(d) ~ d^(D-2) (1 - d^2 / 4)^((D-3)/2)``; drawing negatives
    with weight ``1 / q(d)`` spreads the mined distances over the whole range. Wu et al.,
    ICCV 2017, "Sampling Matters in Deep Embedding Learning",
    https://arxiv.org/abs/1706.07567.

    For each anchor ``a`` with a positive and a negative: distances are clamped below at
    ``cutoff`` (to bound the weights), a negative ``n`` weighs ``1 / q(d(a, n))`` if
    ``d(a, n) < nonzero_loss_cutoff`` and 0 otherwise (such a negative is beyond any
    margin loss's reach), and the anchor gets as many triplets as its class has items in
    the reference set (itself included, PML's count): each takes a positive uniformly at
    random and a negative in proportion to the weights. An anchor whose negatives all
    weigh 0 gets none. The distance is the Euclidean one on normalised embeddings.

    Differences from PML (same distribution otherwise): the weights are normalised per
    anchor before ``exp`` (PML subtracts one maximum over the whole matrix, positives'
    zeros included, so in high dimensions an anchor's weights can all underflow and PML
    drops the anchor); with ``ref_self_index`` the anchor's own copy is never its
    positive (PML's :class:`CrossBatchMemory` drops those triplets after drawing, leaving
    fewer).

    Args:
        cutoff: the smallest distance used for the weights; 0.5.
        nonzero_loss_cutoff: negatives at this distance or farther are never drawn; 1.4.
        generator: the ``torch.Generator`` to draw from; default: one of the miner's own.
        seed: the seed of the miner's own generator (default ``torch.initial_seed()``).

    Returns triplets ``(a, p, n)``, grouped by anchor.

    Example::

        >>> miner = DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4, seed=0)
        >>> loss = MarginLoss(miner=miner)(embeddings, labels)
    """

    def __init__(
        self,
        cutoff: float = 0.5,
        nonzero_loss_cutoff: float = 1.4,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ):
        super().__init__(LpDistance(), generator, seed)
        if not 0 <= cutoff or not nonzero_loss_cutoff > 0:
            raise ValueError(
                f"cutoff ({cutoff!r}) must be >= 0 and nonzero_loss_cutoff "
                f"({nonzero_loss_cutoff!r}) > 0"
            )
        self.cutoff = float(cutoff)
        self.nonzero_loss_cutoff = float(nonzero_loss_cutoff)

    def mine_embeddings(self, embeddings, ref_emb, mat, positive, negative) -> Triplets:
        dim = embeddings.shape[1]
        # (2 - dim) log(d) - (dim - 3) / 2 log(1 - d^2 / 4), in place on two (N, M) buffers.
        log_weights = mat.clamp(min=self.cutoff)
        usable = negative & (log_weights < self.nonzero_loss_cutoff)
        second = log_weights.square().mul_(-0.25).add_(1).log_().mul_(-(dim - 3) / 2)
        log_weights.log_().mul_(2.0 - dim).add_(second)
        del second
        usable &= torch.isfinite(log_weights)
        anchors = torch.where(positive.any(dim=1) & usable.any(dim=1))[0]
        if len(anchors) == 0:
            empty = anchors.new_empty(0)
            return empty, empty.clone(), empty.clone()
        if len(anchors) < len(mat):
            log_weights, usable = log_weights[anchors], usable[anchors]
        weights = log_weights.masked_fill_(~usable, -math.inf)
        weights = weights.sub_(weights.amax(dim=1, keepdim=True)).exp_()
        # Triplets an anchor: its class's size in the reference set, own item included.
        counts = mat.shape[1] - negative[anchors].sum(dim=1)
        most = int(counts.max())
        positives = self._multinomial(positive[anchors].to(mat.dtype), most)
        negatives = self._multinomial(weights, most)
        taken = torch.arange(most, device=mat.device) < counts.unsqueeze(1)
        rows = anchors.unsqueeze(1).expand(-1, most)
        return rows[taken], positives[taken], negatives[taken]

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, nonzero_loss_cutoff={self.nonzero_loss_cutoff}"


class UniformHistogramMiner(_SamplingMiner):
    """Pairs drawn evenly from every bin of the distance histogram (PML's miner).

    The positive pairs' distances are split into ``num_bins`` equal-width bins between
    their smallest and largest value; ``pos_per_bin`` pairs are drawn uniformly, with
    replacement, from every non-empty bin. The negative pairs likewise with
    ``neg_per_bin``. Rare distances (very hard or very easy pairs) are seen as often as
    common ones. Bins are ``[lo, hi)``, the last one ``[lo, hi]``, edges from
    ``torch.linspace`` in the distance's dtype, as in PML, so a pair falls in the same bin.

    Args:
        num_bins: bins of each histogram; 100.
        pos_per_bin: positive pairs drawn from each non-empty bin; 10.
        neg_per_bin: negative pairs drawn from each non-empty bin; 10.
        distance: default Euclidean on normalised embeddings.
        generator: the ``torch.Generator`` to draw from; default: one of the miner's own.
        seed: the seed of the miner's own generator (default ``torch.initial_seed()``).

    Returns pairs ``(a1, p, a2, n)``, bin by bin from the smallest distance up (for a
    similarity, from the smallest similarity up).

    Example::

        >>> miner = UniformHistogramMiner(num_bins=50, pos_per_bin=5, neg_per_bin=20, seed=0)
        >>> loss = ContrastiveLoss(miner=miner)(embeddings, labels)
    """

    def __init__(
        self,
        num_bins: int = 100,
        pos_per_bin: int = 10,
        neg_per_bin: int = 10,
        distance: str | BaseDistance | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ):
        super().__init__(distance, generator, seed)
        for name, value, low in (
            ("num_bins", num_bins, 1), ("pos_per_bin", pos_per_bin, 0),
            ("neg_per_bin", neg_per_bin, 0),
        ):
            if isinstance(value, bool) or int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.num_bins = int(num_bins)
        self.pos_per_bin = int(pos_per_bin)
        self.neg_per_bin = int(neg_per_bin)

    def mine(self, mat: Tensor, positive: Tensor, negative: Tensor) -> Pairs:
        a1, p = self._draw(mat, positive, self.pos_per_bin)
        a2, n = self._draw(mat, negative, self.neg_per_bin)
        return a1, p, a2, n

    def _draw(self, mat: Tensor, mask: Tensor, per_bin: int) -> tuple[Tensor, Tensor]:
        count = int(mask.sum())
        if count == 0 or per_bin == 0:
            empty = torch.empty(0, dtype=torch.long, device=mat.device)
            return empty, empty.clone()
        # Few pairs: bin the pairs' own list. Many: bin the whole matrix, the other entries
        # in an extra last bin, rather than hold two index tensors as long as the pairs.
        # Either way a bin's members stay in row-major order.
        flat = _flat_positions(mask) if 4 * count < mask.numel() else None
        values = mat.flatten()[flat] if flat is not None else mat[mask]
        low, high = torch.aminmax(values)
        edges = torch.linspace(
            low, high, self.num_bins + 1, dtype=mat.dtype, device=mat.device
        )
        # Bin i holds edges[i] <= v < edges[i + 1]; the last bin includes its upper edge.
        inner = edges[1:-1].contiguous()
        if flat is not None:
            bins = torch.searchsorted(inner, values, right=True, out_int32=True)
        else:
            del values
            bins = torch.searchsorted(inner, mat, right=True, out_int32=True).flatten()
            bins.masked_fill_(~mask.flatten(), self.num_bins)
        counts_by_chunk = torch.stack([
            torch.bincount(bins[chunk], minlength=self.num_bins + 1)[: self.num_bins]
            for chunk in _chunks(len(bins))
        ])
        counts = counts_by_chunk.sum(dim=0)
        filled = torch.where(counts > 0)[0]
        sizes = counts[filled].unsqueeze(1)
        draws = self._uniform((len(filled), per_bin), torch.float64, mat.device)
        offsets = (draws * sizes).long().clamp(max=sizes - 1)  # uniform in [0, size)
        drawn_bins = filled.repeat_interleave(per_bin)
        chosen = _nth_of_bin(bins, counts_by_chunk, drawn_bins, offsets.flatten())
        if flat is not None:
            chosen = flat[chosen]
        return _rows_and_columns(chosen, mat.shape[1])

    def extra_repr(self) -> str:
        return (
            f"num_bins={self.num_bins}, pos_per_bin={self.pos_per_bin}, "
            f"neg_per_bin={self.neg_per_bin}"
        )


def _flat_positions(mask: Tensor) -> Tensor:
    """The row-major positions of ``mask``'s True entries, ascending; int32 when they fit
    (half the memory of the int64 ``nonzero`` gives, which is freed)."""
    flat = mask.flatten().nonzero().squeeze(1)
    return flat.int() if mask.numel() <= torch.iinfo(torch.int32).max else flat


def _rows_and_columns(flat: Tensor, columns: int) -> tuple[Tensor, Tensor]:
    """Row-major positions in a matrix of ``columns`` columns -> (rows, columns), int64."""
    return (flat // columns).long(), (flat % columns).long()


SORT_CHUNK = 2**16
"""Bins are put in order this many at a time, and only where a draw falls: sorting all of a
``(B, B)`` matrix's bins at once takes about twice PML's memory at B=1024."""


def _chunks(length: int) -> list[slice]:
    return [slice(start, start + SORT_CHUNK) for start in range(0, length, SORT_CHUNK)]


def _nth_of_bin(
    bins: Tensor, counts_by_chunk: Tensor, drawn_bins: Tensor, offsets: Tensor
) -> Tensor:
    """The position in ``bins`` of each bin's ``offsets``-th member, in order of position.

    ``counts_by_chunk`` ``(chunks, num_bins)``: the members of each bin in each
    ``SORT_CHUNK`` of ``bins``. A draw's chunk is the first whose running count passes
    its offset; each chunk holding a draw is stably sorted on its own.
    """
    running = counts_by_chunk.cumsum(dim=0)  # (chunks, num_bins)
    chunk_of = (running[:, drawn_bins] <= offsets).sum(dim=0)
    offsets = offsets - (running - counts_by_chunk)[chunk_of, drawn_bins]
    chosen = torch.empty_like(offsets)
    chunks = _chunks(len(bins))
    for index in torch.unique(chunk_of).tolist():
        chunk = chunks[index]
        order = torch.argsort(bins[chunk], stable=True)
        starts = counts_by_chunk[index].cumsum(dim=0) - counts_by_chunk[index]
        here = chunk_of == index
        chosen[here] = chunk.start + order[starts[drawn_bins[here]] + offsets[here]]
    return chosen


__all__ = ["AngularMiner", "DistanceWeightedMiner", "HDCMiner", "UniformHistogramMiner"]
