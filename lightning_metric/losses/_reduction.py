"""Reducers: how per-element, per-pair or per-triplet losses become one scalar.

A loss computes a dict of named :class:`SubLoss` terms (its main loss and any
regularizer); each term is reduced with the loss's reducer and the results are
summed. Empty terms give a connected zero, so backpropagation still reaches
the embeddings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

REDUCERS = ("mean", "avg_non_zero", "sum")


@dataclass
class SubLoss:
    """Losses to reduce: ``values`` of shape ``(n,)``, or a 0-d tensor when ``reduced``.

    A term made with :meth:`ratio` is reduced too, but kept as ``total / count``: a sum over
    elements (pairs, triplets, anchors) and how many elements the reducer divides by, so
    that a loss split over ranks can add up the totals and the counts (see
    :meth:`BaseMetricLoss.forward`).
    """

    values: Tensor
    reduced: bool = False
    count: Tensor | None = None
    split: bool = False

    @classmethod
    def ratio(cls, total: Tensor, count: Tensor | None) -> SubLoss:
        """The term ``total / max(count, 1)``; ``count`` None: ``total`` itself (reducer "sum")."""
        return cls(total, reduced=True, count=count, split=True)

    def total_and_count(self, reducer: str) -> tuple[Tensor, Tensor | None]:
        """The term as ``(sum over its elements, count to divide by)`` (count None: a sum).

        Only for per-element terms and :meth:`ratio` terms, whose sums over ranks are the
        sums of the whole batch.
        """
        if self.split:
            return self.values, self.count
        if self.reduced:
            raise ValueError("a reduced term cannot be split into a total and a count")
        values = self.values
        if reducer == "sum":
            return values.sum(), None
        if reducer == "avg_non_zero":
            active = values > 0
            return (values * active).sum(), active.sum()
        return values.sum(), values.new_tensor(float(values.numel()))


def check_reducer(reducer: str) -> str:
    if reducer not in REDUCERS:
        raise ValueError(f"unknown reducer {reducer!r}: expected one of {list(REDUCERS)}")
    return reducer


Zero = Tensor | Callable[[], Tensor]
"""A connected zero, or a function making one when it is needed (it may be costly)."""


def _zero(zero: Zero) -> Tensor:
    return zero() if callable(zero) else zero


def reduce(values: Tensor, reducer: str, zero: Zero) -> Tensor:
    """One scalar from ``values`` ``(n,)``; ``zero`` (a connected zero) when nothing counts.

    - ``mean``: the mean of all values;
    - ``avg_non_zero``: the mean of the values above 0 (PML's AvgNonZeroReducer);
    - ``sum``: the sum.
    """
    if reducer == "avg_non_zero":
        values = values[values > 0]
    if values.numel() == 0:
        return _zero(zero)
    if reducer == "sum":
        return values.sum()
    return values.mean()


def reduce_all(terms: dict[str, SubLoss], reducer: str, zero: Zero) -> Tensor:
    """The sum over terms of each term reduced with ``reducer`` (``zero`` when there are none)."""
    total = None
    for term in terms.values():
        if term.split:
            value = term.values if term.count is None else term.values / term.count.clamp(min=1)
        elif term.reduced:
            value = term.values
        else:
            value = reduce(term.values, reducer, zero)
        total = value if total is None else total + value
    return _zero(zero) if total is None else total


def connected_zero(*tensors: Tensor | None) -> Tensor:
    """``0`` that depends on every given tensor, so gradients (of zero) reach all of them."""
    present = [t for t in tensors if t is not None]
    zero = (present[0] * 0).sum()
    for tensor in present[1:]:
        zero = zero + (tensor * 0).sum().to(zero.dtype)
    return zero


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values[mask]`` computed without indexing (0 when the mask is empty)."""
    count = mask.sum()
    return torch.where(mask, values, torch.zeros_like(values)).sum() / count.clamp(min=1)
