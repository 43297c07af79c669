"""Pairwise similarity and distance matrices.

Every distance turns a batch of query embeddings ``(N, D)`` and reference
embeddings ``(M, D)`` into an ``(N, M)`` matrix, and knows its own direction:
for a similarity larger means closer, for a distance smaller means closer.
Losses and miners ask the distance (``closest``, ``farthest``, ``margin``)
instead of branching on its type.

Half-precision inputs are computed in float32: a float16 distance matrix
loses too much for margins of a few hundredths.

Example::

    >>> dist = get_distance("cosine")
    >>> mat = dist(torch.randn(8, 16))        # (8, 8) cosine similarities
    >>> dist.is_inverted                      # larger means closer
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def compute_dtype(tensor: Tensor) -> torch.dtype:
    """The dtype a loss computes in: float32 for half inputs, else the input's."""
    return torch.float32 if tensor.dtype in _HALF_DTYPES else tensor.dtype


def to_compute_dtype(tensor: Tensor) -> Tensor:
    """``tensor`` cast to :func:`compute_dtype` (a no-op for float32/float64)."""
    return tensor.to(compute_dtype(tensor))


class BaseDistance(nn.Module):
    """A pairwise distance or similarity between embeddings.

    Args:
        normalize_embeddings: L_p-normalise each row (with this distance's ``p``)
            before comparing.
        p: the norm order used for normalisation and, for :class:`LpDistance`,
            for the distance itself.
        power: raise every entry of the matrix to this power.
    """

    is_inverted: bool = False
    """True for similarities (larger means closer), False for distances."""

    def __init__(self, normalize_embeddings: bool = True, p: float = 2, power: float = 1):
        super().__init__()
        self.normalize_embeddings = normalize_embeddings
        self.p = p
        self.power = power

    def forward(self, query: Tensor, ref: Tensor | None = None) -> Tensor:
        """Matrix of shape ``(len(query), len(ref))``; ``ref=None`` compares query with itself."""
        _check_2d("query", query)
        if ref is not None:
            _check_2d("ref", ref)
            if ref.shape[1] != query.shape[1]:
                raise ValueError(
                    f"query and ref must have the same embedding size, got {query.shape[1]} "
                    f"and {ref.shape[1]}"
                )
        query = self.maybe_normalize(to_compute_dtype(query))
        ref = query if ref is None else self.maybe_normalize(to_compute_dtype(ref))
        mat = self._matrix(query, ref)
        return mat if self.power == 1 else mat**self.power

    def pairwise(self, query: Tensor, ref: Tensor) -> Tensor:
        """Row-by-row values of shape ``(N,)`` for two ``(N, D)`` tensors."""
        query = self.maybe_normalize(to_compute_dtype(query))
        ref = self.maybe_normalize(to_compute_dtype(ref))
        values = self._rowwise(query, ref)
        return values if self.power == 1 else values**self.power

    def maybe_normalize(self, embeddings: Tensor) -> Tensor:
        if self.normalize_embeddings:
            return F.normalize(embeddings, p=self.p, dim=1)
        return embeddings

    def margin(self, x: Tensor, y: Tensor) -> Tensor:
        """How much farther ``x`` is than ``y`` (positive when ``y`` is the closer one)."""
        return y - x if self.is_inverted else x - y

    def closest(self, values: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        """``(values, indices)`` of the closest entries along ``dim``."""
        return values.max(dim=dim) if self.is_inverted else values.min(dim=dim)

    def farthest(self, values: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        """``(values, indices)`` of the farthest entries along ``dim``."""
        return values.min(dim=dim) if self.is_inverted else values.max(dim=dim)

    def farthest_value(self, dtype: torch.dtype) -> float:
        """A value farther than any real one: used to mask entries out of a ``closest``."""
        info = torch.finfo(dtype)
        return info.min if self.is_inverted else info.max

    def closest_value(self, dtype: torch.dtype) -> float:
        """A value closer than any real one: masks entries out of a ``farthest``."""
        info = torch.finfo(dtype)
        return info.max if self.is_inverted else info.min

    def _matrix(self, query: Tensor, ref: Tensor) -> Tensor:
        raise NotImplementedError

    def _rowwise(self, query: Tensor, ref: Tensor) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"normalize_embeddings={self.normalize_embeddings}, p={self.p}, power={self.power}"


class DotProductSimilarity(BaseDistance):
    """Inner product ``<q, r>``; larger means closer. Normalises rows by default (PML's default)."""

    is_inverted = True

    def _matrix(self, query: Tensor, ref: Tensor) -> Tensor:
        return query @ ref.T

    def _rowwise(self, query: Tensor, ref: Tensor) -> Tensor:
        return (query * ref).sum(dim=1)


class CosineSimilarity(DotProductSimilarity):
    """Cosine similarity in [-1, 1]: the dot product of L2-normalised rows."""

    def __init__(self, power: float = 1, **kwargs):
        if kwargs.get("normalize_embeddings", True) is False:
            raise ValueError("CosineSimilarity always normalizes: normalize_embeddings=False")
        kwargs.pop("normalize_embeddings", None)
        super().__init__(normalize_embeddings=True, power=power, **kwargs)


class LpDistance(BaseDistance):
    """Minkowski distance ``||q - r||_p`` (Euclidean for ``p=2``); smaller means closer."""

    def _matrix(self, query: Tensor, ref: Tensor) -> Tensor:
        return torch.cdist(query, ref, p=self.p)

    def _rowwise(self, query: Tensor, ref: Tensor) -> Tensor:
        return F.pairwise_distance(query, ref, p=self.p)


class SNRDistance(BaseDistance):
    """Signal-to-noise-ratio distance ``var(q - r) / var(q)`` (Yuan et al. 2019).

    Not symmetric: the variance of the query row is the "signal".
    """

    def _matrix(self, query: Tensor, ref: Tensor) -> Tensor:
        # var(q - r) = E[(q-r)^2] - E[q-r]^2, expanded so no (N, M, D) tensor is built.
        dim = query.shape[1]
        sq_q = (query * query).sum(dim=1, keepdim=True)
        sq_r = (ref * ref).sum(dim=1)
        mean_diff = query.mean(dim=1, keepdim=True) - ref.mean(dim=1)
        sq_diff = sq_q + sq_r - 2 * query @ ref.T
        noise = (sq_diff - dim * mean_diff**2) / (dim - 1)
        return noise / torch.var(query, dim=1, keepdim=True)

    def _rowwise(self, query: Tensor, ref: Tensor) -> Tensor:
        return torch.var(query - ref, dim=1) / torch.var(query, dim=1)


_DISTANCES: dict[str, type[BaseDistance]] = {
    "cosine": CosineSimilarity,
    "dot": DotProductSimilarity,
    "euclidean": LpDistance,
    "lp": LpDistance,
    "snr": SNRDistance,
}


def get_distance(distance: str | BaseDistance, **kwargs) -> BaseDistance:
    """A distance object from a name (``cosine``, ``dot``, ``euclidean``/``lp``, ``snr``).

    ``kwargs`` (``p``, ``power``, ``normalize_embeddings``) configure a named one.
    An existing :class:`BaseDistance` is returned as is.
    """
    if isinstance(distance, BaseDistance):
        return distance
    if not isinstance(distance, str) or distance.lower() not in _DISTANCES:
        raise ValueError(
            f"unknown distance {distance!r}: expected one of {sorted(_DISTANCES)} "
            "or a lightning_metric.distances.BaseDistance"
        )
    return _DISTANCES[distance.lower()](**kwargs)


def _check_2d(name: str, tensor: Tensor) -> None:
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D of shape (batch_size, embedding_size), got shape "
            f"{tuple(tensor.shape)}"
        )
