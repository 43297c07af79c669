"""The base class of losses that learn one weight vector (or several) per class.

ArcFace, CosFace, the proxy losses and SoftTriple compare each embedding with
learned class centres ("weights", "proxies") instead of with other embeddings
of the batch. They share:

- ``num_classes`` and ``embedding_size``, checked on every call: an embedding of
  the wrong size or a label outside ``[0, num_classes)`` is a clear ``ValueError``;
- an optional ``weight_regularizer`` on the class weights (one row per centre),
  multiplied by ``weight_reg_weight``, next to the base class's embedding regularizer;
- float32 (or float64) computation: autocast is switched off inside the loss and
  the weights are *cast* to the compute dtype in ``forward``. The parameter itself
  keeps its dtype, so mixed-precision master weights stay float32 (PML rewrites
  ``W.data`` to the embeddings' dtype, which turns them float16 under AMP).

These losses have learnable parameters: train them with a second optimizer
(``loss_optimizer``) over ``loss.parameters()``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import IndicesTuple, check_embeddings
from ..distances import to_compute_dtype
from ..regularizers import get_regularizer
from ._reduction import SubLoss
from .base import BaseMetricLoss

WeightInit = Callable[[Tensor], object]


class BaseClassWeightsLoss(BaseMetricLoss):
    """A loss on ``(embeddings, labels)`` with learnable per-class weights.

    Args:
        num_classes: labels must lie in ``[0, num_classes)``.
        embedding_size: the embeddings' second dimension.
        weight_regularizer: a penalty on the class weights (one row per centre):
            ``"lp"``, ``"regular_face"``, ``"center_invariant"``, ``"sparse_centers"``
            (losses with several centres a class), a module mapping
            ``(rows, embedding_size)`` to a scalar, or None.
        weight_reg_weight: multiplies the weight regularizer's value.
        weight_init_func: called on each new weight tensor (in place), e.g.
            ``torch.nn.init.normal_``; default: the loss's own (PML's).
        **kwargs: :class:`~lightning_metric.losses.base.BaseMetricLoss` options
            (``distance``, ``reducer``, ``embedding_regularizer``, ...).

    Subclasses create their parameters with :meth:`new_weight` and implement
    :meth:`class_loss` and :meth:`weight_rows`.
    """

    gather_mode = None  # compares embeddings with class weights, not with each other

    anchors_only = False
    """Whether a miner's weights count only its anchors (PML's ``using_ref``, for ProxyNCA)."""

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        weight_regularizer: str | nn.Module | None = None,
        weight_reg_weight: float = 1.0,
        weight_init_func: WeightInit | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_classes = _positive_int("num_classes", num_classes)
        self.embedding_size = _positive_int("embedding_size", embedding_size)
        self.weight_init_func = weight_init_func or self.default_weight_init
        self.weight_regularizer = get_regularizer(weight_regularizer)
        self.weight_reg_weight = weight_reg_weight

    @staticmethod
    def default_weight_init(tensor: Tensor) -> None:
        """PML's default: ``torch.nn.init.normal_`` (mean 0, std 1)."""
        nn.init.normal_(tensor)

    def new_weight(self, *shape: int) -> nn.Parameter:
        """A float32 parameter of ``shape`` initialised with ``weight_init_func``."""
        weight = nn.Parameter(torch.empty(*shape))
        with torch.no_grad():
            self.weight_init_func(weight)
        return weight

    def compute_loss(
        self,
        embeddings: Tensor,
        labels: Tensor | None,
        indices_tuple: IndicesTuple | None,
        ref_emb: Tensor,
        ref_labels: Tensor | None,
        same_set: bool,
    ) -> dict[str, SubLoss]:
        self.check_batch(embeddings, labels, same_set)
        weights = miner_weights(indices_tuple, len(embeddings), embeddings.dtype, self.anchors_only)
        terms = self.class_loss(embeddings, labels.long(), weights)
        if self.weight_regularizer is not None:
            reg = self.weight_regularizer(self.weight_rows(embeddings.dtype))
            terms["weight_reg_loss"] = SubLoss(reg * self.weight_reg_weight, reduced=True)
        return terms

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """The class logits ``(B, num_classes)`` of ``embeddings`` ``(B, D)``: the loss as a
        classifier head.

        The values PML 2.9's ``get_logits`` returns for the same weights (see each loss's
        :meth:`class_logits` for what they are); no margin is applied, so they score
        unseen embeddings. Differentiable; computed in float32 (or float64) under autocast,
        like the loss.
        """
        check_embeddings("embeddings", embeddings)
        self._check_size(embeddings)
        with torch.autocast(embeddings.device.type, enabled=False):
            return self.class_logits(to_compute_dtype(embeddings))

    def class_logits(self, embeddings: Tensor) -> Tensor:
        """:meth:`get_logits` on embeddings already in the compute dtype."""
        raise NotImplementedError

    def class_loss(
        self, embeddings: Tensor, labels: Tensor, weights: Tensor | None
    ) -> dict[str, SubLoss]:
        """The loss's terms; ``weights`` ``(B,)`` from the miner, or None (all ones)."""
        raise NotImplementedError

    def weight_rows(self, dtype: torch.dtype) -> Tensor:
        """The class weights as ``(centres, embedding_size)`` rows, cast to ``dtype``."""
        raise NotImplementedError

    def check_batch(self, embeddings: Tensor, labels: Tensor | None, same_set: bool) -> None:
        """Clear errors for inputs that the class weights cannot take."""
        if not same_set:
            raise ValueError(f"ref_emb is not supported by {type(self).__name__}")
        self._check_size(embeddings)
        if labels is None:
            raise ValueError(f"labels are required by {type(self).__name__}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        if len(labels) == 0:
            return
        low, high = torch.stack(labels.aminmax()).tolist()  # one device sync
        if low < 0 or high >= self.num_classes:
            bad = low if low < 0 else high
            raise ValueError(
                f"label {bad} is outside the expected range [0, {self.num_classes}) "
                f"(num_classes={self.num_classes})"
            )

    def _check_size(self, embeddings: Tensor) -> None:
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings have size {embeddings.shape[1]} but {type(self).__name__} was "
                f"built with embedding_size={self.embedding_size}"
            )

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_size={self.embedding_size}"


def miner_weights(
    indices_tuple: IndicesTuple | None, batch_size: int, dtype: torch.dtype, anchors_only: bool
) -> Tensor | None:
    """How much each embedding counts when a miner chose pairs or triplets.

    An embedding's weight is the number of times it appears in ``indices_tuple``
    (only as an anchor when ``anchors_only``) divided by the largest such count;
    embeddings that never appear weigh 0. None (everyone weighs 1) without a miner
    or when the miner found nothing. PML's ``convert_to_weights``.
    """
    if indices_tuple is None or all(len(idx) == 0 for idx in indices_tuple):
        return None
    if anchors_only:
        anchors = indices_tuple[:1] if len(indices_tuple) == 3 else indices_tuple[::2]
        indices = torch.cat(list(anchors))
    else:
        indices = torch.cat(list(indices_tuple))
    counts = torch.bincount(indices, minlength=batch_size).to(dtype)
    return counts / counts.max()


def weighted_cross_entropy(logits: Tensor, labels: Tensor, weights: Tensor | None) -> Tensor:
    """Per-row cross-entropy ``(B,)``, multiplied by the miner's weights when given."""
    losses = F.cross_entropy(logits, labels, reduction="none")
    return losses if weights is None else losses * weights


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
