"""Gathering a batch across the ranks of a ``torch.distributed`` job, with gradients.

In-batch losses (NT-Xent, SupCon, contrastive, triplet, ...) compare the items of
a batch with each other. Under data parallelism each rank holds ``B / W`` items;
without a gather a rank's items only meet their own rank's items, so ``W`` ranks of
``B / W`` do not train like one batch of ``B``. The losses built on
:class:`~lightning_metric.losses.BaseMetricLoss` take ``gather_distributed`` and use
:func:`gather_with_grad` to see every rank's items as candidates.

:func:`gather_with_grad` is an all-gather whose backward pass all-reduces (sums)
the gradient of the gathered tensor and hands each rank its own rows: every rank's
loss sends its gradient back to the rank that owns the item. The same idea as
open_clip's ``gather_features(gather_with_grad=True)`` and
``torch.distributed.nn.functional.all_gather``; ranks may hold batches of
different sizes (the rows are padded to the largest for the collective, then cut).
It works on gloo (CPU) and NCCL (CUDA). All ranks must call it, and later run the
backward pass through it, in the same order (as DDP requires of every collective).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


def is_initialized() -> bool:
    """A ``torch.distributed`` process group is running (of any size)."""
    return dist.is_available() and dist.is_initialized()


def is_distributed() -> bool:
    """``torch.distributed`` is available, initialised, and has more than one rank."""
    return is_initialized() and dist.get_world_size() > 1


def resolve_gather(gather_distributed: bool | None, owner: str) -> bool:
    """Whether to gather now: ``None`` means :func:`is_distributed`.

    ``True`` without an initialised process group raises a ``RuntimeError`` naming ``owner``
    (with one rank the gather is a no-op).
    """
    if gather_distributed is None:
        return is_distributed()
    if gather_distributed and not is_initialized():
        raise RuntimeError(
            f"{owner}(gather_distributed=True) needs an initialised torch.distributed process "
            "group (torch.distributed.init_process_group, DDP, torchrun or Lightning's ddp "
            "strategy); pass gather_distributed=None to gather only when one is running"
        )
    return bool(gather_distributed)


@dataclass
class Gathered:
    """Every rank's rows, concatenated in rank order.

    ``tensor`` ``(sum(sizes), ...)``; this rank's rows are ``tensor[offset : offset + size]``.
    """

    tensor: Tensor
    sizes: list[int]
    rank: int

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.rank])

    @property
    def world_size(self) -> int:
        return len(self.sizes)

    def own_rows(self) -> Tensor:
        """``(local_size,)`` indices of this rank's rows in ``tensor``."""
        return torch.arange(self.offset, self.offset + self.sizes[self.rank],
                            device=self.tensor.device)


def _batch_sizes(n: int, device: torch.device) -> list[int]:
    size = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


def _all_gather_padded(tensor: Tensor, sizes: list[int]) -> Tensor:
    """Concatenation of every rank's ``tensor`` (rows ``sizes[r]`` on rank ``r``), no grad."""
    largest = max(sizes)
    padded = tensor.new_zeros((largest, *tensor.shape[1:]))
    padded[: len(tensor)] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


class _GatherWithGrad(torch.autograd.Function):
    """All-gather forward; backward: sum the gathered gradient over ranks, keep own rows."""

    @staticmethod
    def forward(ctx, tensor: Tensor, sizes: list[int], rank: int) -> Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        return _all_gather_padded(tensor, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def gather_with_grad(tensor: Tensor) -> Gathered:
    """Every rank's ``tensor`` ``(n_r, ...)``, concatenated; gradients flow back to each owner.

    The backward pass sums, over ranks, the gradient each rank's loss gives the gathered
    tensor, and returns this rank's rows of the sum: when every rank computes its share of
    a loss ``L = sum_r L_r``, each rank receives ``dL/d(its rows)``. Without a process
    group (or with one rank) the tensor comes back as it is.
    """
    if not is_initialized():
        return Gathered(tensor, [len(tensor)], 0)
    sizes = _batch_sizes(len(tensor), tensor.device)
    rank = dist.get_rank()
    if len(sizes) == 1:
        return Gathered(tensor, sizes, rank)
    return Gathered(_GatherWithGrad.apply(tensor, sizes, rank), sizes, rank)


def gather_no_grad(tensor: Tensor, sizes: list[int] | None = None) -> Gathered:
    """Every rank's ``tensor`` concatenated in rank order, detached (labels, memory rows).

    ``sizes``: the ranks' row counts when already known (saves one collective).
    """
    if not is_initialized():
        return Gathered(tensor.detach(), [len(tensor)], 0)
    if sizes is None:
        sizes = _batch_sizes(len(tensor), tensor.device)
    rank = dist.get_rank()
    if len(sizes) == 1:
        return Gathered(tensor.detach(), sizes, rank)
    with torch.no_grad():
        return Gathered(_all_gather_padded(tensor.detach(), sizes), sizes, rank)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum over ranks of ``tensor`` (a detached copy; ``tensor`` itself without a group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor.detach()
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def world_size() -> int:
    """Ranks in the default process group (1 without one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1
