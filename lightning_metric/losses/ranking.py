"""Ranking losses: optimise a retrieval metric of the batch directly.

:class:`FastAPLoss` is one minus a differentiable average precision, computed
from soft histograms of each anchor's distances to its positives and negatives.
Under DDP (``gather_distributed``) it computes the whole gathered batch on every rank
(``gather_mode = "global"``, see :class:`~lightning_metric.losses.BaseMetricLoss`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..distances import BaseDistance, LpDistance, to_compute_dtype
from ..indices import label_masks
from ._reduction import SubLoss
from .base import BaseMetricLoss
from .neighbourhood import occurrence_weights


def soft_histograms(
    dist: Tensor, masks: list[Tensor], num_bins: int, max_value: float
) -> list[Tensor]:
    """Triangular-kernel histograms ``(N, num_bins + 1)`` of each row of ``dist``, one per mask.

    Bin ``e`` is centred on ``e * delta`` (``delta = max_value / num_bins``) and an entry
    ``d`` adds ``relu(1 - |d - centre| / delta)`` to it. Only the three bins around ``d``
    can be non-zero, so instead of a ``(num_bins + 1, N, M)`` pulse tensor this computes
    three ``(N, M)`` ones and scatters them into their bins. ``masks`` (boolean ``(N, M)``)
    must be disjoint: all histograms are filled by the same scatter.
    """
    rows = dist.shape[0]
    width = num_bins + 3  # one padding bin on each side, dropped at the end
    delta = max_value / num_bins
    centres = torch.linspace(0.0, max_value, num_bins + 1, dtype=dist.dtype, device=dist.device)
    padded = torch.cat([centres[:1] - delta, centres, centres[-1:] + delta])
    nearest = torch.round(dist.detach() / delta).clamp_(0, num_bins).long()
    # Slot of bin "nearest - 1" in the histogram of each entry's mask; unmasked entries weigh 0.
    first_slot = nearest.clone()
    in_any = torch.zeros_like(dist)
    for k, mask in enumerate(masks):
        first_slot += k * width * mask
        in_any += mask
    flat = torch.zeros(rows, len(masks) * width, dtype=dist.dtype, device=dist.device)
    for offset in range(3):  # bins nearest - 1, nearest, nearest + 1
        pulse = F.relu(1 - (dist - padded[nearest + offset]).abs() / delta)
        flat = flat.scatter_add(1, first_slot + offset, pulse * in_any)
    return [hist[:, 1:-1] for hist in flat.view(rows, len(masks), width).unbind(1)]


class FastAPLoss(BaseMetricLoss):
    """FastAP: one minus a histogram approximation of each anchor's average precision.

    For learning to rank: every item of the batch is a query, its same-label items
    the relevant results. Distances to the other items are binned into
    ``num_bins + 1`` soft (triangular) bins over ``[0, 2 ** power]`` (the range of
    squared Euclidean distances between unit vectors for ``power=2``); the average
    precision is then computed bin by bin. The loss is ``1 - AP`` averaged over
    queries with at least one positive. The distance must be a normalised Euclidean
    :class:`~lightning_metric.distances.LpDistance` (``p=2``; default ``power=2``).

    Inputs: ``embeddings`` ``(B, D)`` with ``labels`` ``(B,)`` (required), optionally
    ``indices_tuple`` (only used to weigh queries by how often they appear, as PML
    does). A reference set is not supported.

    Args:
        num_bins: the number of histogram intervals (there are ``num_bins + 1`` bins).

    Paper: Cakir et al., "Deep Metric Learning to Rank", CVPR 2019. Same values as
    PML's ``FastAPLoss``.

    Example::

        >>> loss_fn = FastAPLoss(num_bins=10)
        >>> embeddings, labels = torch.randn(32, 64), torch.arange(8).repeat(4)
        >>> loss = loss_fn(embeddings, labels)
    """

    def __init__(self, num_bins: int = 10, **kwargs):
        super().__init__(**kwargs)
        distance = self.distance
        if not (
            isinstance(distance, LpDistance) and distance.normalize_embeddings and distance.p == 2
        ):
            raise ValueError(
                "FastAPLoss requires a normalised Euclidean distance: "
                "LpDistance(normalize_embeddings=True, p=2)"
            )
        self.num_bins = int(num_bins)

    def default_distance(self) -> BaseDistance:
        return LpDistance(power=2)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, same_set):
        if labels is None:
            raise ValueError("FastAPLoss needs labels")
        if not same_set:
            raise ValueError("FastAPLoss does not support ref_emb / ref_labels")
        positive, negative = label_masks(labels, labels, True)
        num_positives = positive.sum(dim=1)
        has_positive = num_positives > 0
        if not has_positive.any():
            return {}
        dist = to_compute_dtype(self.distance(embeddings))
        max_value = 2.0**self.distance.power
        pos_hist, neg_hist = soft_histograms(dist, [positive, negative], self.num_bins, max_value)
        # Precision at each bin, weighted by the positives that land in it.
        cum_pos = pos_hist.cumsum(dim=1)
        cum_all = (pos_hist + neg_hist).cumsum(dim=1)
        weighted = pos_hist * cum_pos
        counted = (weighted > 0) & (cum_all > 0)
        if not counted.any():
            return {}
        safe_cum_all = torch.where(counted, cum_all, torch.ones_like(cum_all))
        precision_sum = torch.where(counted, weighted / safe_cum_all, 0.0).sum(dim=1)
        average_precision = precision_sum[has_positive] / num_positives[has_positive]
        weights = occurrence_weights(
            indices_tuple, len(embeddings), False, dist.dtype, dist.device
        )
        return {"loss": SubLoss((1 - average_precision) * weights[has_positive])}

    def extra_repr(self) -> str:
        return f"num_bins={self.num_bins}"
