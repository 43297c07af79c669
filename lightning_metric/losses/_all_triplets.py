"""The triplet margin loss reduced over *all* triplets, without enumerating them.

A batch of ``B`` items has up to ``B**3`` triplets ``(a, p, n)``; listing them
(as index tensors) or building a ``(B, B, B)`` tensor costs gigabytes at
``B = 1024``. Here each anchor's positive distances are laid out left-aligned,
``d_ap`` ``(A, P)`` (with 4 items a class, ``P = 3``), and its row of the
distance matrix is ``d_an`` ``(A, M)``; padding positives and non-negatives
hold the closest / farthest possible value (an infinity), so their violation
is ``-inf``: zero loss, zero gradient, no mask needed. A chunk of anchors then
gives every triplet's violation as a ``(chunk, P, M)`` broadcast, reduced on
the spot. The autograd graph only holds ``d_ap`` and ``d_an``: the backward
pass recomputes each chunk's violations and accumulates ``dL/d_ap`` and
``dL/d_an`` (and, with ``swap``, ``dL/d_pn``) from them, as gradient
checkpointing would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..distances import BaseDistance

CHUNK_BYTES = 8 * 2**20
"""Size of one ``(chunk, P, M)`` tensor on the CPU: small enough to stay in cache between
the element-wise passes. The peak memory is a few of them."""

ACCELERATOR_CHUNK_BYTES = 64 * 2**20
"""The same on a GPU, where fewer, larger kernels are faster."""

_SOFTPLUS_THRESHOLD = 20.0  # torch's softplus is the identity above this (gradient 1)


def closer(distance: BaseDistance, x: Tensor, y: Tensor) -> Tensor:
    """Element-wise the closer of ``x`` and ``y`` (the larger of two similarities)."""
    return torch.maximum(x, y) if distance.is_inverted else torch.minimum(x, y)


def padded_columns(mask: Tensor) -> tuple[Tensor, Tensor]:
    """The columns of each row's True entries, ascending, left-aligned and padded.

    Returns ``(columns, valid)``, both ``(N, K)`` with ``K`` the largest row count;
    padding columns are 0 and have ``valid`` False.
    """
    counts = mask.sum(dim=1)
    width = int(counts.max()) if mask.numel() else 0
    rows, cols = torch.where(mask)  # row-major: each row's columns ascending
    row_starts = torch.cumsum(counts, dim=0) - counts
    slots = torch.arange(len(rows), device=mask.device) - row_starts[rows]
    columns = torch.zeros(mask.shape[0], width, dtype=torch.long, device=mask.device)
    columns[rows, slots] = cols
    valid = torch.arange(width, device=mask.device) < counts.unsqueeze(1)
    return columns, valid


def anchor_chunks(num_anchors: int, bytes_per_anchor: int, device: torch.device):
    """Slices of anchors whose ``(chunk, P, M)`` tensors take about ``CHUNK_BYTES`` each
    (``ACCELERATOR_CHUNK_BYTES`` off the CPU)."""
    budget = CHUNK_BYTES if device.type == "cpu" else ACCELERATOR_CHUNK_BYTES
    step = max(1, budget // max(1, bytes_per_anchor))
    for start in range(0, num_anchors, step):
        yield slice(start, start + step)


@dataclass
class _Layout:
    """Everything about the triplets except the differentiable distances."""

    pos_cols: Tensor  # (A, P) reference index of each anchor's positives (0 for padding)
    neg_valid: Tensor  # (A, M) which references are each anchor's negatives
    distance: BaseDistance
    margin: float
    smooth_loss: bool
    reducer: str
    num_triplets: int
    num_active: Tensor | None = None  # triplets with a loss above 0, set by the forward pass

    def chunks(self, itemsize: int):
        per_anchor = self.pos_cols.shape[1] * self.neg_valid.shape[1] * itemsize
        return anchor_chunks(self.pos_cols.shape[0], per_anchor, self.pos_cols.device)

    @property
    def farthest(self) -> float:
        return float("-inf") if self.distance.is_inverted else float("inf")


def triplet_margin_all(
    mat: Tensor,
    pos_mask: Tensor,
    neg_mask: Tensor,
    distance: BaseDistance,
    margin: float,
    smooth_loss: bool,
    reducer: str,
    swap_mat: Tensor | None = None,
) -> tuple[Tensor, Tensor | None] | None:
    """The triplet margin loss over every triplet allowed by the masks, as ``(total, count)``.

    Args:
        mat: ``(N, M)`` anchor-to-reference distances (or similarities).
        pos_mask, neg_mask: ``(N, M)`` booleans: which references are each anchor's
            positives and negatives.
        distance: the distance that made ``mat``; gives the loss its direction.
        margin: added to every triplet's violation.
        smooth_loss: softplus instead of relu.
        reducer: ``"avg_non_zero"`` (mean of the positive losses), ``"mean"`` or ``"sum"``.
        swap_mat: ``(M, M)`` reference-to-reference matrix; when given, a triplet uses the
            positive-negative distance instead of the anchor-negative one where it is closer.

    Returns:
        The sum of the triplets' losses (differentiable) and what the reducer divides it by
        (the triplets, or those with a loss above 0; None for ``"sum"``): the loss is
        ``total / max(count, 1)``. None when there is no triplet.
    """
    anchors = torch.where(pos_mask.any(dim=1) & neg_mask.any(dim=1))[0]
    if len(anchors) == 0:
        return None
    if len(anchors) < len(mat):
        mat, pos_mask, neg_mask = mat[anchors], pos_mask[anchors], neg_mask[anchors]
    pos_cols, pos_valid = padded_columns(pos_mask)
    layout = _Layout(
        pos_cols=pos_cols,
        neg_valid=neg_mask,
        distance=distance,
        margin=margin,
        smooth_loss=smooth_loss,
        reducer=reducer,
        num_triplets=int(pos_valid.sum(dim=1).mul(neg_mask.sum(dim=1)).sum()),
    )
    d_ap = mat.gather(1, pos_cols).masked_fill(~pos_valid, -layout.farthest)
    d_an = mat.masked_fill(~neg_mask, layout.farthest)
    total = _AllTripletsLoss.apply(d_ap, d_an, swap_mat, layout)
    if reducer == "avg_non_zero":
        return total, layout.num_active
    if reducer == "mean":
        return total, total.new_tensor(float(layout.num_triplets))
    return total, None


def _violations(
    d_ap: Tensor, d_an: Tensor, swap_mat: Tensor | None, layout: _Layout, rows: slice
) -> tuple[Tensor, Tensor | None]:
    """``(chunk, P, M)`` violations ``margin(d_ap, d_an) + margin`` of the anchors in ``rows``.

    Padding triplets come out as ``-inf``. With a swap matrix, also returns the weight of
    ``d_an`` in ``closer(d_an, d_pn)``: 1 where ``d_an`` is closer, 1/2 on ties (as torch's
    min/max split them), else 0.
    """
    d_an = d_an.unsqueeze(1)
    an_weight = None
    if swap_mat is not None:
        d_pn = swap_mat[layout.pos_cols[rows]]
        d_pn.masked_fill_(~layout.neg_valid[rows].unsqueeze(1), layout.farthest)
        an_is_closer = d_an > d_pn if layout.distance.is_inverted else d_an < d_pn
        an_weight = an_is_closer.to(d_pn.dtype).add_(0.5 * (d_an == d_pn))
        d_an = closer(layout.distance, d_an, d_pn)
    violation = layout.distance.margin(d_ap.unsqueeze(2), d_an)
    violation += layout.margin
    return violation, an_weight


class _AllTripletsLoss(torch.autograd.Function):
    """Sum of the triplets' losses from ``d_ap`` ``(A, P)``, ``d_an`` ``(A, M)`` and an
    optional swap matrix; counts the non-zero ones into ``layout.num_active``."""

    @staticmethod
    def forward(ctx, d_ap, d_an, swap_mat, layout):
        total, num_active = d_ap.new_zeros(()), d_ap.new_zeros(())
        for rows in layout.chunks(d_ap.element_size()):
            violation, _ = _violations(d_ap[rows], d_an[rows], swap_mat, layout, rows)
            losses = F.softplus(violation) if layout.smooth_loss else violation.clamp_(min=0)
            total += losses.sum()
            # Losses are >= 0, so their signs count the non-zero ones (much faster than
            # count_nonzero on the CPU).
            num_active += torch.sign(losses).sum()
        layout.num_active = num_active
        ctx.save_for_backward(d_ap, d_an, swap_mat)
        ctx.layout = layout
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        d_ap, d_an, swap_mat = ctx.saved_tensors
        layout = ctx.layout
        # margin(x, y) is x - y for a distance, y - x for a similarity.
        sign = layout.distance.margin(1.0, 0.0)
        scale = grad_output
        grad_ap, grad_an = torch.empty_like(d_ap), torch.empty_like(d_an)
        grad_swap = None if swap_mat is None else torch.zeros_like(swap_mat)
        for rows in layout.chunks(d_ap.element_size()):
            violation, an_weight = _violations(d_ap[rows], d_an[rows], swap_mat, layout, rows)
            grad_v = _loss_grad(violation, layout)
            grad_ap[rows] = grad_v.sum(dim=2).mul_(sign * scale)
            if an_weight is None:
                grad_an[rows] = grad_v.sum(dim=1).mul_(-sign * scale)
                continue
            grad_an_eff = grad_v.mul_(-sign * scale)
            grad_an[rows] = (grad_an_eff * an_weight).sum(dim=1)
            grad_pn = grad_an_eff.mul_(an_weight.neg_().add_(1))
            positives = layout.pos_cols[rows].flatten()
            grad_swap.index_add_(0, positives, grad_pn.flatten(0, 1))
        return grad_ap, grad_an, grad_swap, None


def _loss_grad(violation: Tensor, layout: _Layout) -> Tensor:
    """d(loss)/d(violation) per triplet, as torch's relu / softplus backward give it.

    Overwrites ``violation``. Averaging only the non-zero losses gives no gradient to the
    zero ones: for relu those have none anyway, for softplus they are the underflowed ones.
    """
    if not layout.smooth_loss:
        return violation.gt_(0)
    grad = torch.sigmoid(violation)
    grad = torch.where(violation > _SOFTPLUS_THRESHOLD, 1.0, grad)
    if layout.reducer == "avg_non_zero":
        grad = grad.masked_fill_(F.softplus(violation) <= 0, 0)
    return grad
