"""Softmax losses over learned class centres, with an angular or cosine margin.

Each class ``c`` has a learned centre, column ``W[:, c]`` of ``W`` ``(embedding_size,
num_classes)``. An embedding's logits are its (scaled) similarities to every
centre, and the loss is the cross-entropy with its label, after a margin has
made the true class's logit harder to win:

- LargeMarginSoftmaxLoss: ``s |x| |W_y| psi(theta)``, ``psi`` ~ ``cos(m theta)``,
  ``m`` an integer multiplier of the angle;
- SphereFaceLoss: ``s |x| psi(theta)`` (unit-norm centres), same ``m``;
- ArcFaceLoss: ``s cos(theta + m)``, ``m`` in **degrees**;
- SubCenterArcFaceLoss: ArcFace on the closest of ``k`` centres a class, **degrees**;
- CosFaceLoss: ``s (cos(theta) - m)``, ``m`` in cosine units;
- NormalizedSoftmaxLoss: ``sim(x, W_y / |W_y|) / temperature``, no margin;

where ``theta`` is the angle between the embedding and its class centre. Values
and gradients equal pytorch-metric-learning 2.9's. Unlike PML, the margin is
computed in float32 (or float64) whatever the input dtype, without ``acos``, so
an embedding exactly on its class centre gives finite gradients; the weights
are never rewritten to the embeddings' dtype (see ``_class_weights``).

Example::

    >>> loss_fn = ArcFaceLoss(num_classes=10, embedding_size=128)   # margin 28.6 degrees
    >>> loss = loss_fn(model(x), labels)                              # labels in [0, 10)
    >>> loss_optimizer = torch.optim.SGD(loss_fn.parameters(), lr=0.01)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..distances import BaseDistance, CosineSimilarity, DotProductSimilarity, to_compute_dtype
from ..regularizers import SparseCentersRegularizer
from ._class_weights import BaseClassWeightsLoss, weighted_cross_entropy
from ._reduction import SubLoss

_EPS = 1e-12
"""``F.normalize``'s floor under a norm."""
_SIN_FLOOR = 1e-12
"""Floor under ``1 - cos^2`` so ``sqrt`` (and its gradient) stays finite at ``cos = +-1``."""


class LargeMarginSoftmaxLoss(BaseClassWeightsLoss):
    """L-Softmax: the true class's angle is multiplied by an integer ``margin``.

    The true-class logit ``|x| |W_y| cos(theta)`` becomes ``|x| |W_y| psi(theta)``
    with ``psi(theta) = (-1)^k cos(m theta) - 2k`` for ``theta`` in ``[k pi/m, (k+1) pi/m]``
    (monotonic in ``theta``); all logits are multiplied by ``scale``. Liu et al.,
    ICML 2016, "Large-Margin Softmax Loss for Convolutional Neural Networks",
    https://arxiv.org/abs/1612.02295.

    Args:
        num_classes: labels lie in ``[0, num_classes)``.
        embedding_size: the embeddings' size ``D``.
        margin: the integer angle multiplier ``m`` (``m >= 1``; 1 is the plain softmax).
        scale: multiplies every logit; > 0 (a ``ValueError`` otherwise, in every subclass).
        **kwargs: ``weight_regularizer``, ``weight_reg_weight``, ``weight_init_func``
            (default ``normal_``), ``reducer``, ``embedding_regularizer``, ... The distance
            must be cosine similarity (the default).

    Shapes: embeddings ``(B, D)``, labels ``(B,)``; learnable ``W`` ``(D, num_classes)``.

    Example::

        >>> loss_fn = LargeMarginSoftmaxLoss(num_classes=10, embedding_size=64, margin=4)
        >>> loss = loss_fn(torch.randn(32, 64), torch.randint(0, 10, (32,)))
    """

    def __init__(
        self, num_classes: int, embedding_size: int, margin: float = 4, scale: float = 1, **kwargs
    ):
        super().__init__(num_classes, embedding_size, **kwargs)
        _require_cosine(self.distance, type(self).__name__)
        self.margin = self.check_margin(margin)
        if not scale > 0:
            raise ValueError(f"{type(self).__name__}: scale must be > 0, got {scale!r}")
        self.scale = scale
        self.W = self.new_weight(embedding_size, num_classes)

    def default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def check_margin(self, margin: float) -> float:
        """L-Softmax's margin is an integer multiplier of the angle (PML truncates it too)."""
        if int(margin) < 1:
            raise ValueError(f"margin must be an integer >= 1, got {margin!r}")
        return int(margin)

    def class_loss(self, embeddings, labels, weights):
        weight = self.W.to(embeddings.dtype)
        logits, target_cos, magnitude = self.logits_and_target_cosine(embeddings, weight, labels)
        target = self.scale * magnitude * self.margin_cosine(target_cos)
        logits = logits.scatter_(1, labels.unsqueeze(1), target.unsqueeze(1))
        return {"loss": SubLoss(weighted_cross_entropy(logits, labels, weights))}

    def weight_rows(self, dtype: torch.dtype) -> Tensor:
        return self.W.to(dtype).T

    def class_logits(self, embeddings: Tensor) -> Tensor:
        """``scale * |x| |W_c| cos(theta_c) = scale * x . W_c``, ``(B, num_classes)``, no
        margin (PML's ``get_logits``)."""
        return (embeddings * self.scale) @ self.W.to(embeddings.dtype)

    def logits_and_target_cosine(self, embeddings: Tensor, weight: Tensor, labels: Tensor):
        """``(logits, cos_y, magnitude)``: every class's scaled logit before the margin
        ``(B, num_classes)``, the cosine to the own class ``(B,)`` and what multiplies the
        own class's margin cosine besides ``scale`` (here ``|x| |W_y|``).
        """
        own = weight[:, labels].T
        x_norm = torch.linalg.vector_norm(embeddings, dim=1)
        own_norm = torch.linalg.vector_norm(own, dim=1)
        cos = (embeddings * own).sum(dim=1) / (x_norm.clamp_min(_EPS) * own_norm.clamp_min(_EPS))
        return (embeddings * self.scale) @ weight, cos, x_norm * own_norm

    def margin_cosine(self, cos: Tensor) -> Tensor:
        """``psi(theta) = (-1)^k cos(m theta) - 2k`` from ``cos(theta)``, without ``acos``."""
        m = self.margin
        with torch.no_grad():
            # k = floor(theta / (pi/m)) = how many of the angles j*pi/m (j = 1..m) theta reached.
            steps = torch.arange(1, m + 1, device=cos.device, dtype=cos.dtype)
            bounds = torch.cos(steps * (math.pi / m))
            k = (cos.clamp(-1, 1).unsqueeze(1) <= bounds).sum(dim=1).to(cos.dtype)
            sign = 1 - 2 * torch.remainder(k, 2)
        return sign * _chebyshev(cos, m) - 2 * k


class SphereFaceLoss(LargeMarginSoftmaxLoss):
    """SphereFace (A-Softmax): L-Softmax with unit-norm class centres.

    The true-class logit is ``scale * |x| * psi(theta)`` and the others
    ``scale * |x| * cos(theta_c)``: only angles separate classes. Liu et al., CVPR 2017,
    "SphereFace: Deep Hypersphere Embedding for Face Recognition",
    https://arxiv.org/abs/1704.08063. Same arguments as :class:`LargeMarginSoftmaxLoss`
    (``margin`` an integer multiplier of the angle, default 4; ``scale`` default 1).

    Example::

        >>> loss_fn = SphereFaceLoss(num_classes=10, embedding_size=64)
        >>> loss = loss_fn(torch.randn(32, 64), torch.randint(0, 10, (32,)))
    """

    def class_logits(self, embeddings: Tensor) -> Tensor:
        """``scale * |x| cos(theta_c)``, ``(B, num_classes)``, no margin (PML's
        ``get_logits``)."""
        return (embeddings * self.scale) @ F.normalize(self.W.to(embeddings.dtype), dim=0)

    def logits_and_target_cosine(self, embeddings: Tensor, weight: Tensor, labels: Tensor):
        centres = F.normalize(weight, dim=0)
        x_norm = torch.linalg.vector_norm(embeddings, dim=1)
        cos = (embeddings * centres[:, labels].T).sum(dim=1) / x_norm.clamp_min(_EPS)
        return (embeddings * self.scale) @ centres, cos, x_norm


class _CosineMarginLoss(LargeMarginSoftmaxLoss):
    """Logits ``scale * cos(theta_c)`` between normalised embeddings and normalised centres;
    subclasses choose the true class's ``margin_cosine``. ``margin`` is a real number.
    """

    def check_margin(self, margin: float) -> float:
        return margin

    def class_logits(self, embeddings: Tensor) -> Tensor:
        """``scale * cos(theta_c)``, ``(B, num_classes)``, no margin (PML's ``get_logits``)."""
        centres = F.normalize(self.W.to(embeddings.dtype), dim=0)
        return (F.normalize(embeddings, dim=1) * self.scale) @ centres

    def logits_and_target_cosine(self, embeddings: Tensor, weight: Tensor, labels: Tensor):
        unit, centres = F.normalize(embeddings, dim=1), F.normalize(weight, dim=0)
        cos = (unit * centres[:, labels].T).sum(dim=1)
        return (unit * self.scale) @ centres, cos, 1.0


class CosFaceLoss(_CosineMarginLoss):
    """CosFace (Large Margin Cosine Loss): subtract ``margin`` from the true class's cosine.

    Logits are ``scale * cos(theta_c)`` between the normalised embedding and each
    normalised class centre, with ``scale * (cos(theta_y) - margin)`` for the true
    class. Wang et al., CVPR 2018, "CosFace: Large Margin Cosine Loss for Deep Face
    Recognition", https://arxiv.org/abs/1801.09414.

    Args:
        num_classes: labels lie in ``[0, num_classes)``.
        embedding_size: the embeddings' size ``D``.
        margin: in **cosine units** (0.35 subtracts 0.35 from the cosine).
        scale: multiplies every cosine (the radius of the hypersphere), 64.
        **kwargs: see :class:`LargeMarginSoftmaxLoss`.

    Shapes: embeddings ``(B, D)``, labels ``(B,)``; learnable ``W`` ``(D, num_classes)``.

    Example::

        >>> loss_fn = CosFaceLoss(num_classes=10, embedding_size=128, margin=0.35, scale=64)
        >>> loss = loss_fn(torch.randn(32, 128), torch.randint(0, 10, (32,)))
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.35,
        scale: float = 64,
        **kwargs,
    ):
        super().__init__(num_classes, embedding_size, margin=margin, scale=scale, **kwargs)

    def margin_cosine(self, cos: Tensor) -> Tensor:
        return cos - self.margin


class ArcFaceLoss(_CosineMarginLoss):
    """ArcFace (Additive Angular Margin): add ``margin`` to the angle to the true class.

    Logits are ``scale * cos(theta_c)`` with ``scale * cos(theta_y + margin)`` for the
    true class; past ``theta_y = 180° - margin``, where ``cos(theta + m)`` would turn
    back up, ``cos(theta_y) - m sin(m)`` keeps it decreasing. Deng et al., CVPR 2019,
    "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
    https://arxiv.org/abs/1801.07698.

    Args:
        num_classes: labels lie in ``[0, num_classes)``.
        embedding_size: the embeddings' size ``D``.
        margin: in **degrees** (28.6 degrees = 0.5 radians, the paper's value).
        scale: multiplies every cosine, 64.
        **kwargs: see :class:`LargeMarginSoftmaxLoss`.

    Raises:
        ValueError: ``margin`` outside ``[0, 180)`` degrees, or ``scale <= 0``.

    Shapes: embeddings ``(B, D)``, labels ``(B,)``; learnable ``W`` ``(D, num_classes)``.

    Example::

        >>> loss_fn = ArcFaceLoss(num_classes=10, embedding_size=128)   # 28.6 degrees, scale 64
        >>> loss = loss_fn(torch.randn(32, 128), torch.randint(0, 10, (32,)))
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 28.6,
        scale: float = 64,
        **kwargs,
    ):
        super().__init__(num_classes, embedding_size, margin=margin, scale=scale, **kwargs)

    def check_margin(self, margin: float) -> float:
        """Degrees in ``[0, 180)``: from 180 on, ``theta + margin`` is past 180 for any angle."""
        if not 0 <= margin < 180:
            raise ValueError(
                f"{type(self).__name__}: margin is in degrees and must lie in [0, 180) "
                f"(28.6 = 0.5 rad), got {margin!r}"
            )
        return margin

    def margin_cosine(self, cos: Tensor) -> Tensor:
        return _arc_margin_cosine(cos, math.radians(self.margin))


class SubCenterArcFaceLoss(ArcFaceLoss):
    """Sub-center ArcFace: ``sub_centers`` centres a class; each embedding uses its closest.

    A class's cosine is the largest cosine to any of its centres; then ArcFace.
    Noisy or multi-modal classes spread over several centres instead of pulling
    one centre between them. Deng et al., ECCV 2020, "Sub-center ArcFace: Boosting
    Face Recognition by Large-scale Noisy Web Faces".

    Args:
        num_classes: labels lie in ``[0, num_classes)``.
        embedding_size: the embeddings' size ``D``.
        margin: in **degrees**, 28.6.
        scale: 64.
        sub_centers: centres a class, 3.
        **kwargs: see :class:`LargeMarginSoftmaxLoss`; ``weight_regularizer="sparse_centers"``
            pulls each class's sub-centres together.

    Shapes: learnable ``W`` ``(D, num_classes * sub_centers)``, class ``c``'s centres in
    columns ``c * sub_centers`` to ``(c + 1) * sub_centers - 1`` (PML's layout).

    Example::

        >>> loss_fn = SubCenterArcFaceLoss(num_classes=10, embedding_size=128, sub_centers=3)
        >>> loss = loss_fn(torch.randn(32, 128), torch.randint(0, 10, (32,)))
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 28.6,
        scale: float = 64,
        sub_centers: int = 3,
        **kwargs,
    ):
        if kwargs.get("weight_regularizer") == "sparse_centers":
            kwargs["weight_regularizer"] = SparseCentersRegularizer(num_classes, sub_centers)
        # As in PML: build W with a column per sub-centre, then count real classes.
        super().__init__(
            num_classes * sub_centers, embedding_size, margin=margin, scale=scale, **kwargs
        )
        self.num_classes = num_classes
        self.sub_centers = sub_centers

    def class_logits(self, embeddings: Tensor) -> Tensor:
        """``scale * cos(theta_c)`` to each class's closest sub-centre, ``(B, num_classes)``,
        no margin (PML's ``get_logits``)."""
        return self._class_cosines(embeddings, self.W.to(embeddings.dtype)) * self.scale

    def logits_and_target_cosine(self, embeddings: Tensor, weight: Tensor, labels: Tensor):
        cos = self._class_cosines(embeddings, weight)
        return cos * self.scale, cos.gather(1, labels.unsqueeze(1)).squeeze(1), 1.0

    def _class_cosines(self, embeddings: Tensor, weight: Tensor) -> Tensor:
        cos = F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=0)
        # A class's cosine is its largest over its sub-centres (columns class-major).
        return cos.view(len(embeddings), self.num_classes, self.sub_centers).max(dim=2).values

    def get_outliers(
        self,
        embeddings: Tensor,
        labels: Tensor,
        threshold: float = 75,
        return_dominant_centers: bool = True,
    ):
        """Embeddings farther than ``threshold`` degrees from their class's dominant sub-centre.

        A class's dominant sub-centre is the one closest to most of its embeddings.
        Returns the outliers' indices (ordered by label, then position) and, when
        ``return_dominant_centers``, the dominant centres ``(D, num_classes)``
        (zeros for classes absent from ``labels``). Use it to drop noisy samples.
        """
        with torch.no_grad():
            emb = to_compute_dtype(embeddings)
            labels = torch.as_tensor(labels, device=emb.device)
            self.check_batch(emb, labels, same_set=True)
            labels = labels.long()
            weight = self.W.to(emb.dtype)
            centres = F.normalize(weight, dim=0).view(-1, self.num_classes, self.sub_centers)
            own = centres[:, labels, :]
            sims = torch.einsum("bd,dbs->bs", F.normalize(emb, dim=1), own)
            votes = torch.zeros(
                self.num_classes, self.sub_centers, device=emb.device, dtype=torch.long
            )
            votes.index_put_((labels, sims.argmax(dim=1)), torch.ones_like(labels), accumulate=True)
            dominant = votes.argmax(dim=1)
            dominant_sim = sims.gather(1, dominant[labels].unsqueeze(1)).squeeze(1)
            outliers = torch.where(dominant_sim < math.cos(math.radians(threshold)))[0]
            outliers = outliers[torch.argsort(labels[outliers], stable=True)]
            if not return_dominant_centers:
                return outliers
            present = torch.bincount(labels, minlength=self.num_classes) > 0
            columns = torch.arange(self.num_classes, device=emb.device) * self.sub_centers
            dominant_centres = weight[:, columns + dominant] * present
            return outliers, dominant_centres


class NormalizedSoftmaxLoss(BaseClassWeightsLoss):
    """Softmax over similarities to unit-norm class centres, divided by a temperature.

    Logits are ``sim(x, W_c / |W_c|) / temperature`` (negated for a distance);
    the loss is their cross-entropy with the label. With the default dot product
    on normalised embeddings this is the cosine softmax of Zhai & Wu, BMVC 2019,
    "Classification is a Strong Baseline for Deep Metric Learning",
    https://arxiv.org/abs/1811.12649.

    Args:
        num_classes: labels lie in ``[0, num_classes)``.
        embedding_size: the embeddings' size ``D``.
        temperature: divides the similarities (0.05 = a scale of 20).
        **kwargs: ``distance`` (default dot product of normalised embeddings),
            ``weight_regularizer``, ``weight_reg_weight``, ``weight_init_func``, ...

    Shapes: embeddings ``(B, D)``, labels ``(B,)``; learnable ``W`` ``(D, num_classes)``.

    Example::

        >>> loss_fn = NormalizedSoftmaxLoss(num_classes=10, embedding_size=128)
        >>> loss = loss_fn(torch.randn(32, 128), torch.randint(0, 10, (32,)))
    """

    def __init__(self, num_classes: int, embedding_size: int, temperature: float = 0.05, **kwargs):
        super().__init__(num_classes, embedding_size, **kwargs)
        self.temperature = temperature
        self.W = self.new_weight(embedding_size, num_classes)

    def default_distance(self) -> BaseDistance:
        return DotProductSimilarity()

    def class_loss(self, embeddings, labels, weights):
        logits = self.class_logits(embeddings)
        return {"loss": SubLoss(weighted_cross_entropy(logits, labels, weights))}

    def class_logits(self, embeddings: Tensor) -> Tensor:
        """``sim(x, W_c / |W_c|) / temperature`` (``-d(...) / temperature`` for a distance),
        ``(B, num_classes)``: the logits of the loss (PML's ``get_logits``)."""
        centres = F.normalize(self.W.to(embeddings.dtype), p=self.distance.p, dim=0)
        if isinstance(self.distance, DotProductSimilarity) and self.distance.power == 1:
            # A dot product: divide the (B, D) embeddings, not the (B, C) logits.
            queries = self.distance.maybe_normalize(embeddings) / self.temperature
            return queries @ centres
        sign = 1 if self.distance.is_inverted else -1  # a distance: closer, larger logit
        return self.distance(embeddings, centres.T) / (sign * self.temperature)

    def weight_rows(self, dtype: torch.dtype) -> Tensor:
        return self.W.to(dtype).T


def _arc_margin_cosine(cos: Tensor, margin: float) -> Tensor:
    """ArcFace's ``cos(theta + m)``, or ``cos(theta) - m sin(m)`` past ``theta = pi - m``.

    ``cos(theta + m) = cos(theta) cos(m) - sin(theta) sin(m)`` with
    ``sin(theta) = sqrt(1 - cos^2)``: no ``acos``, and a floor under ``1 - cos^2``
    keeps the gradient finite at ``cos = +-1`` (where the true one is infinite).
    """
    cos = cos.clamp(-1, 1)
    sin = torch.sqrt((1 - cos * cos).clamp(min=_SIN_FLOOR))
    shifted = cos * math.cos(margin) - sin * math.sin(margin)
    return torch.where(cos >= -math.cos(margin), shifted, cos - margin * math.sin(margin))


def _chebyshev(cos: Tensor, m: int) -> Tensor:
    """``cos(m theta)`` as the Chebyshev polynomial ``T_m(cos theta)``."""
    previous, current = torch.ones_like(cos), cos
    for _ in range(m - 1):
        previous, current = current, 2 * cos * current - previous
    return current


def _require_cosine(distance: BaseDistance, name: str) -> None:
    if not isinstance(distance, CosineSimilarity) or distance.p != 2 or distance.power != 1:
        raise ValueError(f"{name} needs the cosine similarity as its distance, got {distance!r}")


__all__ = [
    "ArcFaceLoss",
    "CosFaceLoss",
    "LargeMarginSoftmaxLoss",
    "NormalizedSoftmaxLoss",
    "SphereFaceLoss",
    "SubCenterArcFaceLoss",
]
