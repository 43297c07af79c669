"""The base class of losses on labelled embeddings.

``loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)``
returns a scalar. The base class validates the inputs, runs the miner, casts
half-precision inputs to float32, adds the embedding regularizer and reduces;
a subclass's :meth:`compute_loss` holds only its formula.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .._checks import IndicesTuple, check_inputs
from ..distances import BaseDistance, LpDistance, get_distance, to_compute_dtype
from ..regularizers import get_regularizer
from ._reduction import SubLoss, check_reducer, connected_zero, reduce_all

Miner = Callable[..., IndicesTuple]


class BaseMetricLoss(nn.Module):
    """Embeddings and labels in, scalar loss out.

    Args:
        distance: a name (``"cosine"``, ``"dot"``, ``"euclidean"``, ``"snr"``) or a
            :class:`~lightning_metric.distances.BaseDistance`; default: the loss's own.
        reducer: ``"mean"``, ``"avg_non_zero"`` or ``"sum"``; default: the loss's own.
        miner: called as ``miner(embeddings, labels, ref_emb, ref_labels)`` when no
            ``indices_tuple`` is passed; its pairs or triplets are the ones used.
        embedding_regularizer: ``"lp"``, ``"zero_mean"``, a module mapping ``(N, D)`` to a
            scalar, or None.
        embedding_reg_weight: multiplies the regularizer's value.
        normalize_embeddings: legacy PML option, sets the distance's normalisation.
        distance_norm: legacy PML option, sets ``p`` of an Lp distance.
        power: legacy PML option, raises distances to this power.
        avg_non_zero_only: legacy PML option; ``True`` means ``"avg_non_zero"``,
            ``False`` means ``"mean"``.
    """

    default_reducer = "mean"

    def __init__(
        self,
        distance: str | BaseDistance | None = None,
        reducer: str | None = None,
        miner: Miner | None = None,
        embedding_regularizer: str | nn.Module | None = None,
        embedding_reg_weight: float = 1.0,
        normalize_embeddings: bool | None = None,
        distance_norm: float | None = None,
        power: float | None = None,
        avg_non_zero_only: bool | None = None,
    ):
        super().__init__()
        self.distance = self._resolve_distance(distance, normalize_embeddings, distance_norm, power)
        if reducer is None and avg_non_zero_only is not None:
            reducer = "avg_non_zero" if avg_non_zero_only else "mean"
        self.reducer = check_reducer(reducer or self.default_reducer)
        self.miner = miner
        self.embedding_regularizer = get_regularizer(embedding_regularizer)
        self.embedding_reg_weight = embedding_reg_weight

    def default_distance(self) -> BaseDistance:
        return LpDistance()

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple: IndicesTuple | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        """Loss of ``embeddings`` ``(B, D)`` with ``labels`` ``(B,)``.

        ``indices_tuple``: pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)`` to use instead of
        all of them. ``ref_emb`` ``(M, D)`` with ``ref_labels`` ``(M,)``: compare the batch with
        this reference set instead of with itself.
        """
        labels, ref_labels = check_inputs(embeddings, labels, ref_emb, ref_labels, indices_tuple)
        if indices_tuple is None and self.miner is not None:
            indices_tuple = self.miner(embeddings, labels, ref_emb, ref_labels)
        same_set = ref_emb is None
        # Margins, scales and exponentials amplify half-precision rounding: compute in float32
        # (or float64) whatever autocast would choose.
        with torch.autocast(embeddings.device.type, enabled=False):
            emb = to_compute_dtype(embeddings)
            ref = emb if same_set else to_compute_dtype(ref_emb)
            ref_labels = labels if same_set else ref_labels
            terms = self.compute_loss(emb, labels, indices_tuple, ref, ref_labels, same_set)
            if self.embedding_regularizer is not None:
                reg = self.embedding_regularizer(emb) * self.embedding_reg_weight
                terms["embedding_reg_loss"] = SubLoss(reg, reduced=True)
            return reduce_all(terms, self.reducer, lambda: connected_zero(emb, *self.parameters()))

    def compute_loss(
        self,
        embeddings: Tensor,
        labels: Tensor | None,
        indices_tuple: IndicesTuple | None,
        ref_emb: Tensor,
        ref_labels: Tensor | None,
        same_set: bool,
    ) -> dict[str, SubLoss]:
        """The loss's terms, before reduction; embeddings are already in the compute dtype."""
        raise NotImplementedError

    def _resolve_distance(self, distance, normalize_embeddings, distance_norm, power):
        legacy = {
            key: value
            for key, value in (
                ("normalize_embeddings", normalize_embeddings),
                ("p", distance_norm),
                ("power", power),
            )
            if value is not None
        }
        if distance is None:
            resolved = self.default_distance()
            for key, value in legacy.items():
                setattr(resolved, key, value)
            return resolved
        if isinstance(distance, BaseDistance):
            if legacy:
                raise ValueError(
                    f"pass {sorted(legacy)} to the distance object, not to the loss, when "
                    "distance is an object"
                )
            return distance
        return get_distance(distance, **legacy)
