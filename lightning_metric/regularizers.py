"""Regularizers: a penalty on embeddings (or, for learnable losses, on their weights).

A regularizer maps a ``(N, D)`` tensor to a scalar: the mean over rows of a
per-row penalty. Losses add ``reg_weight * regularizer(x)`` to their value.

Example::

    >>> loss = TripletMarginLoss(embedding_regularizer="lp", embedding_reg_weight=0.01)

Weight regularizers (for losses with learned class centres, passed as
``weight_regularizer``) take the centres as rows ``(num_centres, D)``:
:class:`RegularFaceRegularizer`, :class:`CenterInvariantRegularizer`,
:class:`SparseCentersRegularizer` (SoftTriple's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distances import BaseDistance, CosineSimilarity, get_distance


class BaseRegularizer(nn.Module):
    """Mean over rows of :meth:`per_row`."""

    def forward(self, x: Tensor) -> Tensor:
        return self.per_row(x).mean()

    def per_row(self, x: Tensor) -> Tensor:
        raise NotImplementedError


class LpRegularizer(BaseRegularizer):
    """``||x_i||_p ** power`` per row: keeps embedding norms small."""

    def __init__(self, p: float = 2, power: float = 1):
        super().__init__()
        self.p = p
        self.power = power

    def per_row(self, x: Tensor) -> Tensor:
        norms = x.norm(p=self.p, dim=1)
        return norms if self.power == 1 else norms**self.power


class ZeroMeanRegularizer(BaseRegularizer):
    """``|sum_j x_ij|`` per row: pushes each embedding's entries to average zero."""

    def per_row(self, x: Tensor) -> Tensor:
        return x.sum(dim=1).abs()


class RegularFaceRegularizer(BaseRegularizer):
    """Per class centre, its similarity to the nearest other centre: pushes centres apart.

    RegularFace (Zhao et al., CVPR 2019, "RegularFace: Deep Face Recognition via
    Exclusive Regularization"). Which centre is nearest is chosen without gradient;
    the similarity to it is differentiated (w.r.t. both centres).

    Args:
        distance: a similarity (larger means closer); default cosine.

    Example::

        >>> loss = ArcFaceLoss(10, 128, weight_regularizer=RegularFaceRegularizer())
    """

    chunk_rows = 4096
    """Rows of the ``(centres, centres)`` similarity matrix held at once while searching."""

    def __init__(self, distance: str | BaseDistance | None = None):
        super().__init__()
        self.distance = CosineSimilarity() if distance is None else get_distance(distance)
        if not self.distance.is_inverted:
            raise ValueError("RegularFaceRegularizer needs a similarity (e.g. cosine)")

    def per_row(self, x: Tensor) -> Tensor:
        return self.distance.pairwise(x, x[self._nearest_other(x)])

    def _nearest_other(self, x: Tensor) -> Tensor:
        """For each row, the index of the most similar other row (itself when it is alone)."""
        nearest = torch.empty(len(x), dtype=torch.long, device=x.device)
        with torch.no_grad():
            for start in range(0, len(x), self.chunk_rows):
                rows = torch.arange(start, min(start + self.chunk_rows, len(x)), device=x.device)
                sims = self.distance(x[rows], x)
                sims[torch.arange(len(rows), device=x.device), rows] = torch.finfo(sims.dtype).min
                nearest[rows] = sims.argmax(dim=1)
        return nearest


class CenterInvariantRegularizer(BaseRegularizer):
    """``(||w_i||^2 - mean_j ||w_j||^2)^2 / 4`` per centre: gives all centres the same norm.

    Center-invariant loss (Wu et al., 2017, "Deep Face Recognition with Center
    Invariant Loss").
    """

    def per_row(self, x: Tensor) -> Tensor:
        squared_norms = (x * x).sum(dim=1)
        return (squared_norms - squared_norms.mean()) ** 2 / 4


class SparseCentersRegularizer(BaseRegularizer):
    """Pulls together the centres of each class, so that unneeded ones merge (SoftTriple).

    The value is ``sum sqrt(2 - 2 cos(w_a, w_b)) / (2 * pairs)`` over every pair
    ``a < b`` of centres of the same class (Qian et al., ICCV 2019, "SoftTriple
    Loss"). Rows are ordered class by class: rows ``c * centers_per_class`` to
    ``(c + 1) * centers_per_class - 1`` are class ``c``'s centres (SoftTriple's
    ``fc.t()``). Only the within-class blocks are computed, never the full
    ``(centres, centres)`` matrix.

    Example::

        >>> loss = SoftTripleLoss(100, 64, weight_regularizer="sparse_centers")
    """

    def __init__(self, num_classes: int, centers_per_class: int):
        super().__init__()
        if centers_per_class < 2:
            raise ValueError(
                f"SparseCentersRegularizer needs centers_per_class > 1, got {centers_per_class}"
            )
        self.num_classes = num_classes
        self.centers_per_class = centers_per_class

    def forward(self, x: Tensor) -> Tensor:
        k = self.centers_per_class
        if x.shape[0] != self.num_classes * k:
            raise ValueError(
                f"expected num_classes * centers_per_class = {self.num_classes * k} rows, "
                f"got {x.shape[0]}"
            )
        centres = F.normalize(x, dim=1).view(self.num_classes, k, -1)
        sims = centres @ centres.transpose(1, 2)
        first, second = torch.triu_indices(k, k, offset=1, device=x.device)
        same_class = sims[:, first, second]
        tiny = torch.finfo(x.dtype).tiny
        reg = torch.sqrt(2.0 + tiny - (2.0 * same_class).clamp(max=2))
        return reg.sum() / (2 * same_class.numel())


_REGULARIZERS: dict[str, type[BaseRegularizer]] = {
    "lp": LpRegularizer,
    "zero_mean": ZeroMeanRegularizer,
    "regular_face": RegularFaceRegularizer,
    "center_invariant": CenterInvariantRegularizer,
    "sparse_centers": SparseCentersRegularizer,
}


def get_regularizer(regularizer: str | nn.Module | None, **kwargs) -> nn.Module | None:
    """A regularizer from a name, a module, or None; ``kwargs`` go to a named one's constructor.

    Names: ``lp``, ``zero_mean`` (embeddings); ``regular_face``, ``center_invariant``,
    ``sparse_centers`` (class weights; ``sparse_centers`` needs ``num_classes`` and
    ``centers_per_class``).
    """
    if regularizer is None or isinstance(regularizer, nn.Module):
        return regularizer
    if not isinstance(regularizer, str) or regularizer not in _REGULARIZERS:
        raise ValueError(
            f"unknown regularizer {regularizer!r}: expected one of {sorted(_REGULARIZERS)}, "
            "a torch.nn.Module or None"
        )
    return _REGULARIZERS[regularizer](**kwargs)
