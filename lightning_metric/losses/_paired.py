"""Shared pieces of the losses on paired embeddings (query-document, image-text).

These losses take one ``(B, D)`` tensor per field of a batch (row ``i`` of every field
belongs to pair ``i``) instead of embeddings and labels. This module holds their boundary
checks, the choice of similarity, and the cross-rank mean of the in-batch ones (MNRL,
CLIP), which gather the candidates of every rank with
:func:`~lightning_metric.distributed.gather_with_grad`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_embeddings
from ..distances import BaseDistance, CosineSimilarity, DotProductSimilarity
from ..distributed import Gathered, all_reduce_sum, gather_with_grad, resolve_gather

SIMILARITIES = ("cosine", "dot")


def get_similarity(similarity: str, owner: str) -> BaseDistance:
    """``"cosine"`` (rows L2-normalised) or ``"dot"`` (raw inner product), as a distance."""
    if similarity == "cosine":
        return CosineSimilarity()
    if similarity == "dot":
        return DotProductSimilarity(normalize_embeddings=False)
    raise ValueError(
        f"{owner}: unknown similarity {similarity!r}: expected one of {list(SIMILARITIES)}"
    )


def check_pairs(owner: str, **fields: Tensor) -> list[Tensor]:
    """Every field a floating 2-D tensor of the first field's shape; returned in one
    compute dtype (float32 for half-precision inputs, else the widest input dtype).

    Raises:
        ValueError: a field is not a floating 2-D tensor, or its shape differs from the
            first field's (the message names both fields and shapes).
    """
    (first_name, first), *others = fields.items()
    for name, tensor in fields.items():
        try:
            check_embeddings(name, tensor)
        except ValueError as error:
            raise ValueError(f"{owner}: {error}") from None
    for name, tensor in others:
        if tensor.shape != first.shape:
            raise ValueError(
                f"{owner}: {name} has shape {tuple(tensor.shape)} but {first_name} has shape "
                f"{tuple(first.shape)}: every field needs one row per pair and the same "
                "embedding size"
            )
    dtype = first.dtype
    for tensor in fields.values():
        dtype = torch.promote_types(dtype, tensor.dtype)
    if torch.finfo(dtype).bits < 32:
        dtype = torch.float32
    return [tensor.to(dtype) for tensor in fields.values()]


def check_per_pair(owner: str, name: str, values: Tensor, like: Tensor) -> Tensor:
    """``values`` 1-D with one entry per row of ``like``; returned in ``like``'s dtype/device.

    Raises:
        ValueError: not 1-D of length ``len(like)``.
    """
    values = torch.as_tensor(values, device=like.device)
    if values.shape != like.shape[:1]:
        raise ValueError(
            f"{owner}: {name} must have shape ({len(like)},), one value per pair, got shape "
            f"{tuple(values.shape)}"
        )
    return values.to(like.dtype)


def reject_bad_rows(owner: str, name: str, values: Tensor, bad: Tensor, rule: str,
                    hint: str = "") -> None:
    """Name the first row where ``bad`` ``(B,)`` is true, with its value.

    Raises:
        ValueError: ``"<owner>: <name> <rule>, got <value> at row <i>[ <hint>]"``.
    """
    if bad.any():
        first = int(bad.nonzero()[0])
        raise ValueError(f"{owner}: {name} {rule}, got {float(values[first])} at row {first}"
                         + (f" {hint}" if hint else ""))


def gather_candidates(gather_distributed: bool | None, owner: str, fields: list[Tensor]):
    """Every rank's rows of ``fields`` (each ``(B_r, D)``), or None when not gathering.

    One collective: the fields are stacked into ``(B_r, len(fields), D)`` and gathered with
    gradients; ``gathered.tensor[:, k]`` is field ``k`` of every rank, in rank order, and
    this rank's pairs start at row ``gathered.offset``.
    """
    if not resolve_gather(gather_distributed, owner):
        return None
    return gather_with_grad(torch.stack(fields, dim=1))


def mean_over_pairs(per_pair: Tensor, gathered: Gathered | None) -> Tensor:
    """The mean of ``per_pair`` ``(B_r,)`` over every rank's pairs.

    Without gathering, the plain mean (0 for an empty batch). Gathering, rank ``r``
    backpropagates ``W * sum(per_pair) / N`` (``N`` pairs on all ranks): the gather's
    backward sums the ranks' gradients into each owner and DDP's mean divides by ``W``, so
    the encoder gets the gradient of one process on the whole batch; the value returned is
    that process's loss on every rank (one extra all-reduce of a scalar).
    """
    total = per_pair.sum()
    if gathered is None:
        return total / max(len(per_pair), 1)
    pairs = max(sum(gathered.sizes), 1)
    objective = total * (gathered.world_size / pairs)
    value = all_reduce_sum(total) / pairs
    return objective - objective.detach() + value
