"""P2SGrad: mean squared error between the cosines to learned class weights and one-hot labels.

A classification-style loss with one learned unit vector a class (``weight``,
``(descriptors_dim, num_classes)``, PML's name and layout, so a PML state_dict
loads): train it with a second optimizer over ``loss.parameters()``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._class_weights import BaseClassWeightsLoss
from ._reduction import SubLoss


class P2SGradLoss(BaseClassWeightsLoss):
    """P2SGrad (Zhang et al., "P2SGrad: Refined Gradients for Optimizing Deep Face
    Models", CVPR 2019, https://arxiv.org/abs/1905.02479).

    With ``cos_ij`` the cosine between embedding ``i`` and class weight ``j`` (clamped to
    ``[-1, 1]``)::

        loss = mean_{i, j} (cos_ij - [j == labels[i]])^2

    over all ``B * num_classes`` entries: the gradient of this MSE is the paper's
    Eq. (11), which replaces the margin-softmax gradients by the cosine itself.

    Args:
        descriptors_dim: the embeddings' size ``D`` (PML's name; also ``embedding_size``).
        num_classes: labels lie in ``[0, num_classes)``.
        **kwargs: ``weight_init_func`` (default: uniform in ``[-1, 1]``, then each column
            scaled to unit norm, PML's init), ``weight_regularizer``, ``weight_reg_weight``,
            ``embedding_regularizer``. The value is already reduced: the reducer does not
            apply.

    Shapes: embeddings ``(B, D)``, labels ``(B,)``; learnable ``weight``
    ``(descriptors_dim, num_classes)``, one unit column a class. Before every forward the
    columns are scaled back to unit norm in place (as PML does: an optimizer step moves
    them off the sphere); unlike PML the parameter keeps its dtype (float32 master weights
    under mixed precision) and is cast for the computation. An ``indices_tuple`` (miner) or
    ``ref_emb`` is a ValueError, as in PML; a wrong embedding size or an out-of-range label
    too.

    Example::

        >>> loss_fn = P2SGradLoss(descriptors_dim=128, num_classes=10)
        >>> loss = loss_fn(torch.randn(32, 128), torch.randint(0, 10, (32,)))
        >>> loss_optimizer = torch.optim.SGD(loss_fn.parameters(), lr=0.01)
    """

    def __init__(self, descriptors_dim: int, num_classes: int, **kwargs):
        super().__init__(num_classes, descriptors_dim, **kwargs)
        self.descriptors_dim = self.embedding_size
        self.weight = self.new_weight(descriptors_dim, num_classes)

    @staticmethod
    def default_weight_init(tensor: Tensor) -> None:
        """PML's: uniform in ``[-1, 1]``, each column then scaled to unit norm."""
        tensor.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, same_set):
        if indices_tuple is not None:
            raise ValueError("P2SGradLoss does not support an indices_tuple (nor a miner)")
        return super().compute_loss(embeddings, labels, None, ref_emb, ref_labels, same_set)

    def class_loss(self, embeddings, labels, weights):
        # A projection, not part of the graph (PML's renorm of W.data); .data leaves the
        # version counter alone, so a graph built before this call can still backpropagate.
        weight = self.weight.data
        weight.div_(weight.norm(dim=0).clamp_min(torch.finfo(weight.dtype).tiny))
        unit = embeddings / embeddings.norm(dim=1, keepdim=True)
        loss = _CosineOneHotMSE.apply(unit, self.weight.to(embeddings.dtype), labels)
        return {"loss": SubLoss(loss, reduced=True)}

    def class_logits(self, embeddings: Tensor) -> Tensor:
        """``cos_ij`` ``(B, num_classes)``, clamped to ``[-1, 1]``: what the loss regresses
        onto the one-hot labels. PML's P2SGradLoss has no ``get_logits``; these are the cosines
        its forward computes (with the columns of ``weight`` taken at unit norm, here without
        rewriting the parameter)."""
        weight = self.weight.to(embeddings.dtype)
        weight = weight / weight.norm(dim=0).clamp_min(torch.finfo(weight.dtype).tiny)
        return ((embeddings @ weight) / embeddings.norm(dim=1, keepdim=True)).clamp(-1, 1)

    def weight_rows(self, dtype: torch.dtype) -> Tensor:
        return self.weight.T.to(dtype)

    def extra_repr(self) -> str:
        return f"descriptors_dim={self.descriptors_dim}, num_classes={self.num_classes}"


class _CosineOneHotMSE(torch.autograd.Function):
    """``F.mse_loss((unit @ weight).clamp(-1, 1), one_hot(labels))`` keeping one ``(B, C)``
    matrix for the backward: the residual, already masked by the clamp's gradient (autograd
    keeps the cosines, the clamped cosines and the one-hot target). The squares are summed as
    ``residual . residual``, without a squared copy. Differentiable once (no double backward).

    Shapes: ``unit`` ``(B, D)`` (rows at unit norm), ``weight`` ``(D, C)``, ``labels`` ``(B,)``.
    """

    @staticmethod
    def forward(ctx, unit: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
        residual = unit @ weight
        inside = residual.abs() <= 1  # where the clamp passes the gradient on
        residual.clamp_(-1, 1)
        residual[torch.arange(len(labels), device=labels.device), labels] -= 1
        flat = residual.view(-1)
        loss = torch.dot(flat, flat) / flat.numel()
        ctx.save_for_backward(unit, weight, residual.mul_(inside))
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        unit, weight, residual = ctx.saved_tensors
        grad_cos = residual * (grad * (2 / residual.numel()))
        return grad_cos @ weight.T, unit.T @ grad_cos, None
