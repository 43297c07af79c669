"""Losses on two views of the same batch: ``loss(embeddings, ref_emb)``, no labels.

Self-supervised training embeds two augmentations of each item; row ``i`` of
``embeddings`` and row ``i`` of ``ref_emb`` are views of the same item.

- :class:`SelfSupervisedLoss` wraps any labelled loss: it labels row ``i`` of both
  views ``i`` (each item its own class) and calls the wrapped loss.
- :class:`VICRegLoss` needs no negatives: it pulls the two views together
  (invariance) and keeps each view's features spread out (variance) and
  decorrelated (covariance).

Both take ``embeddings`` and ``ref_emb`` of the same shape ``(B, D)`` and return a
scalar; values equal pytorch-metric-learning 2.9's losses of the same names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_embeddings
from ..distances import to_compute_dtype
from ..distributed import gather_no_grad, is_distributed
from ._class_weights import BaseClassWeightsLoss
from ._reduction import SubLoss, check_reducer, connected_zero, reduce_all


def check_views(embeddings: Tensor, ref_emb: Tensor) -> None:
    """Both views 2-D floating tensors of the same shape ``(B, D)`` (row i: the same item)."""
    check_embeddings("embeddings", embeddings)
    check_embeddings("ref_emb", ref_emb)
    if embeddings.shape != ref_emb.shape:
        raise ValueError(
            f"embeddings {tuple(embeddings.shape)} and ref_emb {tuple(ref_emb.shape)} must be "
            "two views of the same items: the same length and embedding size"
        )


class SelfSupervisedLoss(nn.Module):
    """Turn two views ``(embeddings, ref_emb)`` into a labelled batch for a labelled loss.

    Row ``i`` of both views gets the label ``i``: the two views of an item are each
    other's positives, every other item's views its negatives (instance discrimination,
    as in SimCLR).

    - ``symmetric=True``: the wrapped loss sees the ``2B`` rows
      ``cat([embeddings, ref_emb])`` with labels ``cat([arange(B), arange(B)])``, so each
      view is an anchor against both views of every item.
    - ``symmetric=False``: ``loss(embeddings, arange(B), ref_emb=ref_emb,
      ref_labels=arange(B))``: only ``embeddings`` are anchors, ``ref_emb`` the candidates
      (the wrapped loss must accept ``ref_emb``).

    Args:
        loss: a labelled loss of this package (``NTXentLoss``, ``TripletMarginLoss``,
            ``ContrastiveLoss``, ...). PML 2.9 accepts only thirteen named losses; any
            labelled loss works here, except those with learned class weights (ArcFace,
            proxies: the labels are item indices, not classes), which raise a ValueError.
        symmetric: see above; default True.

    Inputs: ``embeddings`` and ``ref_emb`` ``(B, D)``, the two views. A ValueError when
    their shapes differ. Under ``torch.distributed`` the labels are offset by the rank's
    position in the gathered batch, so a gathering loss does not pair item ``i`` of one
    rank with item ``i`` of another.

    Paper: Chen et al., "A Simple Framework for Contrastive Learning of Visual
    Representations", ICML 2020 (the two-view setting); PML issue #411.

    Example::

        >>> loss_fn = SelfSupervisedLoss(NTXentLoss(temperature=0.1))
        >>> view1, view2 = model(augment(x)), model(augment(x))    # (B, D) each
        >>> loss = loss_fn(view1, view2)
    """

    def __init__(self, loss: nn.Module, symmetric: bool = True):
        super().__init__()
        if isinstance(loss, (BaseClassWeightsLoss, SelfSupervisedLoss, VICRegLoss)):
            raise ValueError(
                f"SelfSupervisedLoss needs a loss that compares the items of a batch with "
                f"labels (NTXentLoss, TripletMarginLoss, ...), got {type(loss).__name__}"
            )
        self.loss = loss
        self.symmetric = symmetric

    def forward(self, embeddings: Tensor, ref_emb: Tensor) -> Tensor:
        check_views(embeddings, ref_emb)
        labels = torch.arange(len(embeddings), device=embeddings.device)
        if is_distributed():  # item ids unique over the ranks' batches, in rank order
            labels = labels + gather_no_grad(labels[:1]).offset
        if self.symmetric:
            return self.loss(torch.cat([embeddings, ref_emb]), torch.cat([labels, labels]))
        return self.loss(embeddings, labels, ref_emb=ref_emb, ref_labels=labels.clone())

    def extra_repr(self) -> str:
        return f"symmetric={self.symmetric}"


class VICRegLoss(nn.Module):
    """VICReg: Variance-Invariance-Covariance regularisation of two views.

    With ``Z = embeddings``, ``Z' = ref_emb`` ``(B, D)``::

        loss = invariance_lambda * reduce_i( mean_d (Z_id - Z'_id)^2 )
             + variance_mu * [reduce_d v(Z) + reduce_d v(Z')]
             + covariance_v * [c(Z) + c(Z')]
        v(Z)_d = relu(1 - sqrt(var_d(Z) + eps)) / 2          (unbiased variance over the batch)
        c(Z)   = sum of squared off-diagonal entries of cov(Z), divided by D

    ``reduce`` is the ``reducer`` (default ``"mean"``); the covariance term is a sum.
    The embeddings are used as they are (no normalisation, no distance).

    Args:
        invariance_lambda: weight of the invariance (mean squared error) term, 25.
        variance_mu: weight of the variance (hinge on the standard deviation) terms, 25.
        covariance_v: weight of the covariance terms, 1.
        eps: added to the variance before the square root, 1e-4.
        reducer: ``"mean"``, ``"avg_non_zero"`` or ``"sum"`` for the per-item invariance and
            the per-feature variance terms.

    Inputs: ``embeddings`` and ``ref_emb`` ``(B, D)``, two views of the same items, with
    ``B >= 2`` (variances). A ValueError for shapes that differ. Half-precision inputs are
    computed in float32. Under DDP each rank's statistics are its own batch's (no gather).

    Paper: Bardes, Ponce and LeCun, "VICReg: Variance-Invariance-Covariance
    Regularization for Self-Supervised Learning", ICLR 2022, https://arxiv.org/abs/2105.04906.

    Example::

        >>> loss_fn = VICRegLoss()
        >>> loss = loss_fn(model(augment(x)), model(augment(x)))
    """

    def __init__(
        self,
        invariance_lambda: float = 25,
        variance_mu: float = 25,
        covariance_v: float = 1,
        eps: float = 1e-4,
        reducer: str = "mean",
    ):
        super().__init__()
        self.invariance_lambda = invariance_lambda
        self.variance_mu = variance_mu
        self.covariance_v = covariance_v
        self.eps = eps
        self.reducer = check_reducer(reducer)

    def forward(self, embeddings: Tensor, ref_emb: Tensor) -> Tensor:
        check_views(embeddings, ref_emb)
        if len(embeddings) < 2:
            raise ValueError(f"VICRegLoss needs a batch of at least 2 items, got {len(embeddings)}")
        with torch.autocast(embeddings.device.type, enabled=False):
            emb, ref = to_compute_dtype(embeddings), to_compute_dtype(ref_emb)
            terms = {
                "invariance_loss": SubLoss(
                    self.invariance_lambda * (emb - ref).pow(2).mean(dim=1)
                ),
                "variance_loss1": SubLoss(self.variance_mu * self._variance(emb)),
                "variance_loss2": SubLoss(self.variance_mu * self._variance(ref)),
                "covariance_loss": SubLoss(
                    self.covariance_v * (self._covariance(emb) + self._covariance(ref)),
                    reduced=True,
                ),
            }
            return reduce_all(terms, self.reducer, lambda: connected_zero(emb, ref))

    def _variance(self, x: Tensor) -> Tensor:
        """``(D,)`` hinge on each feature's standard deviation, halved (two views)."""
        return F.relu(1 - torch.sqrt(x.var(dim=0) + self.eps)) / 2

    @staticmethod
    def _covariance(x: Tensor) -> Tensor:
        """Sum of the squared off-diagonal covariances, over ``D``."""
        n, dim = x.shape
        centred = x - x.mean(dim=0)
        cov = centred.T @ centred / (n - 1)
        off_diagonal = ~torch.eye(dim, dtype=torch.bool, device=x.device)
        return cov[off_diagonal].pow(2).sum() / dim

    def extra_repr(self) -> str:
        return (
            f"invariance_lambda={self.invariance_lambda}, variance_mu={self.variance_mu}, "
            f"covariance_v={self.covariance_v}, eps={self.eps}"
        )
