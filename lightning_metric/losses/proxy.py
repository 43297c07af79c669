"""Proxy losses: each class has learned proxies, and embeddings are compared with them.

Comparing a batch with ``num_classes`` proxies instead of with itself needs no
pair or triplet sampling and converges fast. The proxies are parameters of the
loss: train them with a second optimizer over ``loss.parameters()``.

- :class:`ProxyNCALoss`: softmax over (negated) distances to every proxy.
- :class:`ProxyAnchorLoss`: each proxy is an anchor; pulls its class's embeddings,
  pushes the others (log-sum-exp over the batch, per proxy).
- :class:`SoftTripleLoss`: several centres a class, softly combined.

Values and gradients equal pytorch-metric-learning 2.9's; see ``_class_weights``
for the checks and the mixed-precision behaviour they share.

Example::

    >>> loss_fn = ProxyAnchorLoss(num_classes=100, embedding_size=128)
    >>> loss = loss_fn(model(x), labels)                    # labels in [0, 100)
    >>> loss_optimizer = torch.optim.AdamW(loss_fn.parameters(), lr=1e-2)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..distances import BaseDistance, CosineSimilarity, LpDistance
from ..regularizers import SparseCentersRegularizer
from ._class_weights import BaseClassWeightsLoss, weighted_cross_entropy
from ._reduction import SubLoss


class ProxyNCALoss(BaseClassWeightsLoss):
    """NCA against one learned proxy a class: ``-log softmax_y(-softmax_scale * d(x, proxies))``.

    Movshovitz-Attias et al., ICCV 2017, "No Fuss Distance Metric Learning using
    Proxies", https://arxiv.org/abs/1703.07464.

    Args:
        num_classes: labels lie in ``[0, num_classes)``.
        embedding_size: the embeddings' size ``D``.
        softmax_scale: multiplies the (negated) distances before the softmax.
        **kwargs: ``distance`` (default squared Euclidean between normalised embeddings,
            PML's ``LpDistance(power=2)``; a similarity is used as is), ``weight_regularizer``,
            ``weight_reg_weight``, ``weight_init_func`` (default ``normal_``), ``reducer``, ...

    Shapes: embeddings ``(B, D)``, labels ``(B,)``; learnable ``proxies`` ``(num_classes, D)``.
    With a miner, an embedding weighs the number of pairs or triplets it anchors.

    Example::

        >>> loss_fn = ProxyNCALoss(num_classes=10, embedding_size=64, softmax_scale=10)
        >>> loss = loss_fn(torch.randn(32, 64), torch.randint(0, 10, (32,)))
    """

    anchors_only = True
    # get_logits returns ``self.distance`` values: the predicted class is
    # ``self.distance.closest`` (argmin for the default distance), not the argmax.
    logits_are_distances = True

    def __init__(self, num_classes: int, embedding_size: int, softmax_scale: float = 1, **kwargs):
        super().__init__(num_classes, embedding_size, **kwargs)
        self.softmax_scale = softmax_scale
        self.proxies = self.new_weight(num_classes, embedding_size)

    def default_distance(self) -> BaseDistance:
        return LpDistance(power=2)

    def class_loss(self, embeddings, labels, weights):
        # PML drops embeddings whose softmax probability underflows to 0; the stable
        # cross-entropy here never underflows, so every embedding counts.
        mat = self.class_logits(embeddings)
        logits = mat * (self.softmax_scale if self.distance.is_inverted else -self.softmax_scale)
        return {"loss": SubLoss(weighted_cross_entropy(logits, labels, weights))}

    def class_logits(self, embeddings: Tensor) -> Tensor:
        """``d(x, proxy_c)`` ``(B, num_classes)``, the distance matrix itself, as PML's
        ``get_logits`` returns it: with the default (squared Euclidean) distance *smaller*
        means closer, so the predicted class is the ``argmin`` (``loss.distance.closest``);
        the loss's softmax logits are ``-softmax_scale`` times these."""
        return self.distance(embeddings, self.proxies.to(embeddings.dtype))

    def weight_rows(self, dtype: torch.dtype) -> Tensor:
        return self.proxies.to(dtype)


class ProxyAnchorLoss(BaseClassWeightsLoss):
    """Proxy Anchor: every proxy pulls its class's embeddings and pushes all others.

    For proxy ``p`` with positives ``P`` (its class's embeddings) and negatives ``N``::

        pos(p) = log(1 + sum_{x in P} exp(alpha * (margin - s(x, p))))
        neg(p) = log(1 + sum_{x in N} exp(alpha * (s(x, p) + margin)))
        loss   = mean over proxies with positives of pos + mean over all proxies of neg

    (``s`` the cosine similarity by default; for a distance the signs flip.) Kim et al.,
    CVPR 2020, "Proxy Anchor Loss for Deep Metric Learning",
    https://arxiv.org/abs/2003.13911.

    Args:
        num_classes: labels lie in ``[0, num_classes)``.
        embedding_size: the embeddings' size ``D``.
        margin: in similarity units (cosine by default), 0.1.
        alpha: the scale inside the exponentials, 32.
        **kwargs: ``distance`` (default cosine), ``weight_regularizer``,
            ``weight_reg_weight``, ``weight_init_func`` (default ``kaiming_normal_`` with
            ``mode="fan_out"``), ``reducer``: by default PML's divisors above; a named
            reducer (``"mean"``, ...) reduces each proxy's ``pos`` and ``neg`` values instead.

    Shapes: embeddings ``(B, D)``, labels ``(B,)``; learnable ``proxies`` ``(num_classes, D)``.
    With a miner, an embedding's terms get ``log(weight)``-like offsets (PML's
    ``weight - 1`` inside the exponential).

    Example::

        >>> loss_fn = ProxyAnchorLoss(num_classes=100, embedding_size=128)
        >>> loss = loss_fn(torch.randn(32, 128), torch.randint(0, 100, (32,)))
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.1,
        alpha: float = 32,
        **kwargs,
    ):
        divides = kwargs.get("reducer") is None and kwargs.get("avg_non_zero_only") is None
        super().__init__(num_classes, embedding_size, **kwargs)
        self.divisor_reduction = divides
        self.margin = margin
        self.alpha = alpha
        self.proxies = self.new_weight(num_classes, embedding_size)

    @staticmethod
    def default_weight_init(tensor: Tensor) -> None:
        """PML's default for ProxyAnchor: ``kaiming_normal_(mode="fan_out")``."""
        nn.init.kaiming_normal_(tensor, mode="fan_out")

    def default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def class_logits(self, embeddings: Tensor) -> Tensor:
        """``s(x, proxy_c)`` ``(B, num_classes)``, cosine by default (PML's ``get_logits``)."""
        return self.distance(embeddings, self.proxies.to(embeddings.dtype))

    def class_loss(self, embeddings, labels, weights):
        sims = self.class_logits(embeddings)
        offset = 0.0 if weights is None else (weights - 1).unsqueeze(1)
        own = F.one_hot(labels, self.num_classes).bool()

        own_sim = sims.gather(1, labels.unsqueeze(1))
        pos = self.alpha * self.distance.margin(own_sim, self.margin) + offset
        pos_term = _segment_log1p_sum_exp(pos.squeeze(1), labels, self.num_classes)

        neg = self.alpha * self.distance.margin(-self.margin, sims) + offset
        neg_term = _log1p_sum_exp(neg.masked_fill(own, -math.inf), dim=0)

        if not self.divisor_reduction:
            return {"pos_loss": SubLoss(pos_term), "neg_loss": SubLoss(neg_term)}
        with_positives = torch.bincount(labels, minlength=self.num_classes).count_nonzero()
        return {
            "pos_loss": SubLoss(pos_term.sum() / with_positives.clamp(min=1), reduced=True),
            "neg_loss": SubLoss(neg_term.sum() / self.num_classes, reduced=True),
        }

    def weight_rows(self, dtype: torch.dtype) -> Tensor:
        return self.proxies.to(dtype)


class SoftTripleLoss(BaseClassWeightsLoss):
    """SoftTriple: ``centers_per_class`` centres a class, combined by a softmax.

    An embedding's similarity to class ``c`` is ``sum_k softmax_k(s_ck / gamma) * s_ck``
    over the class's centres; the loss is the cross-entropy of
    ``la * (similarity - margin * [c == y])``. Qian et al., ICCV 2019, "SoftTriple Loss:
    Deep Metric Learning Without Triplet Sampling", https://arxiv.org/abs/1909.05235.

    Args:
        num_classes: labels lie in ``[0, num_classes)``.
        embedding_size: the embeddings' size ``D``.
        centers_per_class: ``K``, 10.
        la: the scale ``lambda`` of the class similarities, 20.
        gamma: the temperature of the softmax over a class's centres, 0.1 (PML stores its
            inverse in ``gamma``; here ``gamma`` is the value given).
        margin: subtracted from the true class's similarity, 0.01.
        **kwargs: ``distance`` (a similarity; default cosine), ``weight_regularizer``
            (``"sparse_centers"`` is the paper's regulariser), ``weight_reg_weight``,
            ``weight_init_func`` (default ``kaiming_uniform_(a=sqrt(5))``), ...

    Shapes: embeddings ``(B, D)``, labels ``(B,)``; learnable ``fc``
    ``(D, num_classes * centers_per_class)``, class ``c``'s centres in columns
    ``c * K`` to ``(c + 1) * K - 1``.

    Example::

        >>> loss_fn = SoftTripleLoss(num_classes=100, embedding_size=64, centers_per_class=10)
        >>> loss = loss_fn(torch.randn(32, 64), torch.randint(0, 100, (32,)))
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        centers_per_class: int = 10,
        la: float = 20,
        gamma: float = 0.1,
        margin: float = 0.01,
        **kwargs,
    ):
        if kwargs.get("weight_regularizer") == "sparse_centers":
            kwargs["weight_regularizer"] = SparseCentersRegularizer(num_classes, centers_per_class)
        super().__init__(num_classes, embedding_size, **kwargs)
        if not self.distance.is_inverted:
            raise ValueError("SoftTripleLoss needs a similarity (e.g. cosine), not a distance")
        self.centers_per_class = centers_per_class
        self.la = la
        self.gamma = gamma
        self.margin = margin
        self.fc = self.new_weight(embedding_size, num_classes * centers_per_class)

    @staticmethod
    def default_weight_init(tensor: Tensor) -> None:
        """PML's default for SoftTriple: ``kaiming_uniform_(a=sqrt(5))``."""
        nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))

    def default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def class_logits(self, embeddings: Tensor) -> Tensor:
        """The class similarities ``sum_k softmax_k(s_ck / gamma) * s_ck`` ``(B, num_classes)``,
        before ``la`` and the margin (PML's ``get_logits``)."""
        # Centre-major columns (k * num_classes + c): the softmax over a class's centres
        # then runs over dim 1 of (B, K, C), far faster than over a trailing dim of size K.
        dim, k = self.embedding_size, self.centers_per_class
        centres = self.fc.to(embeddings.dtype).view(dim, self.num_classes, k).transpose(1, 2)
        sims = self.distance(embeddings, centres.reshape(dim, -1).T)
        sims = sims.view(len(embeddings), k, self.num_classes)
        return _SoftMaxSimilarity.apply(sims, 1.0 / self.gamma)

    def class_loss(self, embeddings, labels, weights):
        logits = self.la * self.class_logits(embeddings)
        margin = logits.new_full((len(labels), 1), -self.la * self.margin)
        logits = logits.scatter_add_(1, labels.unsqueeze(1), margin)
        return {"loss": SubLoss(weighted_cross_entropy(logits, labels, weights))}

    def weight_rows(self, dtype: torch.dtype) -> Tensor:
        return self.fc.to(dtype).T


class _SoftMaxSimilarity(torch.autograd.Function):
    """SoftTriple's class similarity: ``sum_k softmax_k(inv_gamma * s) * s_k`` over dim 1
    of ``s`` ``(B, K, C)``, giving ``(B, C)``.

    Fused: backward computes ``p_k * (1 + inv_gamma * (s_k - result))`` in one new
    tensor instead of autograd's chain of ``(B, K, C)`` temporaries.
    """

    @staticmethod
    def forward(ctx, sims: Tensor, inv_gamma: float) -> Tensor:
        assignment = torch.softmax(sims * inv_gamma, dim=1)
        similarity = (assignment * sims).sum(dim=1)
        ctx.save_for_backward(sims, assignment, similarity)
        ctx.inv_gamma = inv_gamma
        return similarity

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        sims, assignment, similarity = ctx.saved_tensors
        grad_sims = (sims - similarity.unsqueeze(1)).mul_(ctx.inv_gamma).add_(1)
        return grad_sims.mul_(assignment).mul_(grad.unsqueeze(1)), None


def _log1p_sum_exp(x: Tensor, dim: int) -> Tensor:
    """``log(1 + sum exp(x))`` along ``dim``, stable; ``-inf`` entries count as absent."""
    if x.shape[dim] == 0:
        return x.sum(dim=dim)  # log(1) = 0 for every entry, still connected to x
    shift = x.detach().amax(dim=dim, keepdim=True).clamp(min=0)
    total = torch.exp(x - shift).sum(dim=dim, keepdim=True) + torch.exp(-shift)
    return (shift + torch.log(total)).squeeze(dim)


def _segment_log1p_sum_exp(values: Tensor, segments: Tensor, num_segments: int) -> Tensor:
    """``out[s] = log(1 + sum_{i: segments[i] = s} exp(values[i]))``, ``(num_segments,)``."""
    with torch.no_grad():
        shift = torch.zeros(num_segments, dtype=values.dtype, device=values.device)
        shift = shift.scatter_reduce(0, segments, values, reduce="amax", include_self=True)
    total = torch.exp(-shift).index_add(0, segments, torch.exp(values - shift[segments]))
    return shift + torch.log(total)


__all__ = ["ProxyAnchorLoss", "ProxyNCALoss", "SoftTripleLoss"]
