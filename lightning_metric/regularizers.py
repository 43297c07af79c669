"""Regularizers: a penalty on embeddings (or, for learnable losses, on their weights).

A regularizer maps a ``(N, D)`` tensor to a scalar: the mean over rows of a
per-row penalty. Losses add ``reg_weight * regularizer(x)`` to their value.

Example::

    >>> loss = TripletMarginLoss(embedding_regularizer="lp", embedding_reg_weight=0.01)
"""

from __future__ import annotations

from torch import Tensor, nn


class BaseRegularizer(nn.Module):
    """Mean over rows of :meth:`per_row`."""

    def forward(self, x: Tensor) -> Tensor:
        return self.per_row(x).mean()

    def per_row(self, x: Tensor) -> Tensor:
        raise NotImplementedError


class LpRegularizer(BaseRegularizer):
    """``||x_i||_p ** power`` per row: keeps embedding norms small."""

    def __init__(self, p: float = 2, power: float = 1):
        super().__init__()
        self.p = p
        self.power = power

    def per_row(self, x: Tensor) -> Tensor:
        norms = x.norm(p=self.p, dim=1)
        return norms if self.power == 1 else norms**self.power


class ZeroMeanRegularizer(BaseRegularizer):
    """``|sum_j x_ij|`` per row: pushes each embedding's entries to average zero."""

    def per_row(self, x: Tensor) -> Tensor:
        return x.sum(dim=1).abs()


_REGULARIZERS: dict[str, type[BaseRegularizer]] = {
    "lp": LpRegularizer,
    "zero_mean": ZeroMeanRegularizer,
}


def get_regularizer(regularizer: str | nn.Module | None) -> nn.Module | None:
    """A regularizer from a name (``lp``, ``zero_mean``), a module, or None."""
    if regularizer is None or isinstance(regularizer, nn.Module):
        return regularizer
    if not isinstance(regularizer, str) or regularizer not in _REGULARIZERS:
        raise ValueError(
            f"unknown regularizer {regularizer!r}: expected one of {sorted(_REGULARIZERS)}, "
            "a torch.nn.Module or None"
        )
    return _REGULARIZERS[regularizer]()
