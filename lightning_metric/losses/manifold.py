"""Manifold loss: similarities diffused by a random walk over the batch and learned proxies.

An unsupervised loss with ``K`` learned proxies (``proxies``, ``(K, l)``, PML's name
and layout, so a PML state_dict loads): train them with a second optimizer over
``loss.parameters()``. It takes no labels: each embedding is assigned a proxy
(its "meta-class"), given by the caller or drawn at random.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_embeddings
from ..distances import BaseDistance, CosineSimilarity, to_compute_dtype
from .base import BaseMetricLoss


class ManifoldLoss(BaseMetricLoss):
    """Manifold loss (Aziere and Todorovic, "Ensemble Deep Manifold Similarity Learning
    using Hard Proxies", CVPR 2019).

    The ``N`` embeddings and ``K`` proxies are the nodes of a graph with affinities
    ``S = exp(max(s, 0) / 0.5)`` (``s`` the cosine similarity, no self-loops), normalised
    to ``S_bar = D^-1/2 S D^-1/2``. The random walk's stationary similarities are
    ``F = (1 - alpha) (I - alpha S_bar)^-1`` ``(N + K, N + K)``. With ``m_i`` the proxy of
    embedding ``i``::

        loss_int = mean_i log(1 + sum_{k != m_i, x_ik >= 0} exp(x_ik)),
                   x_ik = F[i, k] - F[i, m_i] + margin               (embedding to proxy)
        loss_ctx = the same with x_ik = cos(F[i], F[k]) - cos(F[i], F[m_i]) + margin
                   (rows of F: the embedding's and the proxy's context)
        loss     = loss_int + lambdaC * loss_ctx

    Args:
        l: the embeddings' size (a ValueError for embeddings of another size).
        K: number of proxies, 50.
        lambdaC: weight of the context loss, ``>= 0``; ``math.inf`` means the context loss
            alone.
        alpha: the random walk's restart parameter in ``(0, 1)``, 0.8.
        margin: 5e-4.
        generator: the ``torch.Generator`` the random proxy assignment is drawn from;
            None: the global RNG (as PML, so ``torch.manual_seed`` reproduces PML's draw).
        **kwargs: ``distance`` (default cosine similarity), ``embedding_regularizer``.
            The value is already reduced: the reducer does not apply.

    Inputs: ``embeddings`` ``(N, l)`` and optionally ``indices_tuple``: not a tuple but
    the meta-classes, a ``(N,)`` integer tensor in ``[0, K)`` (PML's convention). Without
    it every proxy gets at least one embedding and the rest are drawn uniformly, which
    needs ``N >= K`` (a ValueError otherwise). Labels and ``ref_emb`` are a ValueError.
    Not gathered under DDP: each rank's batch is a graph of its own.

    Difference from PML 2.9: PML computes ``loss_int + inf * loss_ctx`` for
    ``lambdaC=math.inf`` (``inf`` or NaN, never the context loss its docstring promises);
    here it is ``loss_ctx``. PML inverts ``I - alpha S_bar`` in float32 even for float64
    embeddings; here in the embeddings' dtype (float32 for half precision).

    Example::

        >>> loss_fn = ManifoldLoss(l=64, K=8)
        >>> loss = loss_fn(torch.randn(32, 64))
        >>> loss_optimizer = torch.optim.SGD(loss_fn.parameters(), lr=0.01)
    """

    gather_mode = None

    def __init__(
        self,
        l: int,  # noqa: E741 (PML's name)
        K: int = 50,  # noqa: N803 (PML's name)
        lambdaC: float = 1.0,  # noqa: N803 (PML's name)
        alpha: float = 0.8,
        margin: float = 5e-4,
        generator: torch.Generator | None = None,
        **kwargs,
    ):
        if kwargs.pop("gather_distributed", None):
            raise ValueError(
                "ManifoldLoss is not gathered across ranks (gather_distributed=True): each "
                "rank's batch is a graph of its own"
            )
        super().__init__(**kwargs)
        for name, value in (("l", l), ("K", K)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if lambdaC < 0:
            raise ValueError(f"lambdaC must be non-negative, got {lambdaC!r}")
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
        self.l, self.K = int(l), int(K)
        self.lambdaC, self.alpha, self.margin = lambdaC, alpha, margin
        self.generator = generator
        self.proxies = nn.Parameter(torch.randn(self.K, self.l))

    def default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple: Tensor | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        """Loss of ``embeddings`` ``(N, l)``; ``indices_tuple``: the meta-classes ``(N,)``."""
        check_embeddings("embeddings", embeddings)
        if labels is not None:
            raise ValueError(
                "ManifoldLoss takes no labels: pass the embeddings' proxies (meta-classes) "
                "as indices_tuple, or nothing to draw them"
            )
        if ref_emb is not None or ref_labels is not None:
            raise ValueError("ManifoldLoss does not support ref_emb / ref_labels")
        if embeddings.shape[1] != self.l:
            raise ValueError(
                f"embeddings have size {embeddings.shape[1]} but ManifoldLoss was built with "
                f"l={self.l}"
            )
        meta = self._meta_classes(indices_tuple, len(embeddings)).to(embeddings.device)
        with torch.autocast(embeddings.device.type, enabled=False):
            emb = to_compute_dtype(embeddings)
            loss = self._loss(emb, meta)
            if self.embedding_regularizer is not None:
                loss = loss + self.embedding_regularizer(emb) * self.embedding_reg_weight
            return loss

    def _meta_classes(self, given: Tensor | None, n: int) -> Tensor:
        if given is not None:
            if (
                not isinstance(given, Tensor) or given.shape != (n,) or given.is_floating_point()
                or (n and (int(given.min()) < 0 or int(given.max()) >= self.K))
            ):
                raise ValueError(
                    f"ManifoldLoss's indices_tuple must be the meta-classes: an integer tensor "
                    f"of shape ({n},) with values in [0, K={self.K})"
                )
            return given.long()
        if n < self.K:
            raise ValueError(
                f"ManifoldLoss draws at least one embedding a proxy: the batch ({n}) must "
                f"hold at least K={self.K} embeddings, or pass the meta-classes"
            )
        drawn = torch.randint(0, self.K, (n - self.K,), generator=self.generator)
        meta = torch.cat((torch.arange(self.K), drawn))
        return meta[torch.randperm(n, generator=self.generator)]

    def _loss(self, emb: Tensor, meta: Tensor) -> Tensor:
        n, total = len(emb), len(emb) + self.K
        nodes = torch.cat([emb, self.proxies.to(emb.dtype)])
        eye = torch.eye(total, dtype=torch.bool, device=emb.device)
        affinity = torch.exp(self.distance(nodes).clamp(min=0) / 0.5).masked_fill(eye, 0)
        scale = affinity.sum(dim=1).pow(-0.5)
        normalised = affinity * scale.unsqueeze(1) * scale.unsqueeze(0)
        walk = (1 - self.alpha) * torch.linalg.inv(eye.to(emb.dtype) - self.alpha * normalised)
        own = F.one_hot(meta, self.K).bool()
        context = F.normalize(walk[:n], dim=1) @ F.normalize(walk[n:], dim=1).T
        loss_ctx = _hinge_log_sum_exp(context, own, meta, self.margin)
        if math.isinf(self.lambdaC):
            return loss_ctx
        return _hinge_log_sum_exp(walk[:n, n:], own, meta, self.margin) + self.lambdaC * loss_ctx

    def extra_repr(self) -> str:
        return (
            f"l={self.l}, K={self.K}, lambdaC={self.lambdaC}, alpha={self.alpha}, "
            f"margin={self.margin}"
        )


def _hinge_log_sum_exp(scores: Tensor, own: Tensor, meta: Tensor, margin: float) -> Tensor:
    """``mean_i log(1 + sum_{k != m_i, x_ik >= 0} exp(x_ik))``, ``x = scores - scores[i, m_i]
    + margin`` for ``scores`` ``(N, K)``."""
    rows = torch.arange(len(scores), device=scores.device)
    x = scores - scores[rows, meta].unsqueeze(1) + margin
    keep = ~own & (x >= 0)
    return torch.log1p(torch.where(keep, x, -math.inf).exp().sum(dim=1)).mean()
