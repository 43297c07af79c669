"""Instance loss: a softmax over the batch's cosine similarities, one cross-entropy a row.

Under DDP it computes the whole gathered batch on every rank (``gather_mode = "global"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..distances import BaseDistance, CosineSimilarity
from ._reduction import SubLoss
from .base import BaseMetricLoss


class InstanceLoss(BaseMetricLoss):
    """Instance loss (Zheng et al., "Dual-Path Convolutional Image-Text Embeddings with
    Instance Loss", ACM TOMM 2020, https://arxiv.org/abs/1711.05535), as PML 2.9 computes it.

    The ``(B, B)`` cosine similarities times ``gamma`` are logits (the diagonal, an
    item's similarity with itself, included); row ``i``'s target is the column
    ``rank(labels[i])``, the rank of its label among the batch's sorted distinct labels::

        loss_i = -log softmax(gamma * cos(x_i, x_.))[rank(labels[i])]

    With one label an item (``labels = arange(B)``, the paper's instance classes) the
    target is the item itself: each item is pushed away from all others. With repeated
    labels the target column is an index into the batch, not a class: this is PML's
    formula, kept for equal values.

    Args:
        gamma: the scale of the similarities (inverse temperature), 64.
        **kwargs: ``reducer`` (default ``"mean"`` over items), ``embedding_regularizer``, ...
            ``distance`` must be cosine (a ValueError otherwise).

    Inputs: ``embeddings`` ``(B, D)`` with ``labels`` ``(B,)`` (required). An
    ``indices_tuple`` or ``ref_emb`` is a ValueError (PML does not take them either).

    Example::

        >>> loss_fn = InstanceLoss(gamma=32)
        >>> loss = loss_fn(torch.randn(32, 64), torch.arange(32))
    """

    def __init__(self, gamma: float = 64, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(self.distance, CosineSimilarity):
            raise ValueError(
                f"InstanceLoss needs distance='cosine', got {type(self.distance).__name__}"
            )
        self.gamma = gamma

    def default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, same_set):
        if labels is None:
            raise ValueError("InstanceLoss needs labels")
        if indices_tuple is not None:
            raise ValueError("InstanceLoss does not support an indices_tuple (nor a miner)")
        if not same_set:
            raise ValueError("InstanceLoss does not support ref_emb / ref_labels")
        logits = self.distance(embeddings).mul_(self.gamma)  # nothing saved the raw matrix
        _, target = torch.unique(labels, return_inverse=True)
        return {"loss": SubLoss(row_cross_entropy(logits, target))}

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}"


OWN_CROSS_ENTROPY_FROM = 256 * 256
"""Logit matrices of at least this many entries use :class:`_CrossEntropy` (less memory);
smaller ones autograd's, which is faster there (a Python ``Function`` costs ~0.1 ms a call)."""


def row_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """``(N,)`` ``F.cross_entropy(logits (N, M), target (N,), reduction="none")``."""
    if logits.numel() >= OWN_CROSS_ENTROPY_FROM:
        return _CrossEntropy.apply(logits, target)
    return F.cross_entropy(logits, target, reduction="none")


class _CrossEntropy(torch.autograd.Function):
    """Row-wise ``F.cross_entropy(logits, target, reduction="none")`` keeping one ``(N, M)``
    matrix, the softmax, for the backward (autograd's keeps the log-softmax and builds two
    gradients beside it). ``lse = max(x) - log(max(softmax(x)))``, as in ``_RowLogSumExp``
    (``infonce.py``). Differentiable once (no double backward).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor) -> Tensor:
        probs = torch.softmax(logits, dim=1)
        ctx.save_for_backward(probs, target)
        picked = logits.gather(1, target.unsqueeze(1)).squeeze(1)
        return logits.amax(dim=1) - probs.amax(dim=1).log() - picked

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        probs, target = ctx.saved_tensors
        grad_logits = probs * grad.unsqueeze(1)
        grad_logits.scatter_add_(1, target.unsqueeze(1), -grad.unsqueeze(1))
        return grad_logits, None
