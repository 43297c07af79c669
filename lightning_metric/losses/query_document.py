"""Losses on query-document pairs: embeddings of each field in, scalar out.

Row ``i`` of every argument belongs to pair (or triplet) ``i``; each is ``(B, D)`` except
the per-pair ``scores``, ``target`` and ``teacher_margin`` ``(B,)``. The batch shapes
(see :data:`~lightning_metric.losses.registry.BATCH_SHAPES`):

============================  =========================================  =============
loss                          called as                                  reference
============================  =========================================  =============
MultipleNegativesRankingLoss  ``loss(query, doc, *hard_negatives)``      sentence-transformers
CosineSimilarityLoss          ``loss(a, b, scores)``, scores in [0, 1]   sentence-transformers
CosineEmbeddingLoss           ``loss(a, b, target)``, target in {1, -1}  torch.nn
MarginRankingLoss             ``loss(query, pos, neg)``                  torch.nn
MarginMSELoss                 ``loss(query, pos, neg, teacher_margin)``  sentence-transformers
============================  =========================================  =============

Each gives the value of the reference library's loss of the same name on the same
embeddings (sentence-transformers 6.2, torch.nn). Half-precision embeddings are computed
on in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distances import CosineSimilarity
from ._paired import (
    check_pairs,
    check_per_pair,
    gather_candidates,
    get_similarity,
    mean_over_pairs,
    reject_bad_rows,
)
from ._reduction import connected_zero
from .infonce import info_nce, similarity_logits


class MultipleNegativesRankingLoss(nn.Module):
    """In-batch negatives ranking loss (MNRL, InfoNCE with a fixed scale).

    For retrieval from (query, relevant document) pairs, optionally with hard negatives:
    each query must pick its own document among every document of the batch (the other
    pairs' documents are its negatives) and every hard negative,

        loss_i = -log( exp(scale * s(q_i, d_i)) / sum_c exp(scale * s(q_i, c)) ),

    ``c`` running over all documents and all hard negatives of the batch, averaged over
    the queries. With ``symmetric=True`` each document must also pick its query among the
    batch's queries, and ``loss_i`` is the mean of the two directions (hard negatives are
    not anchors). In-batch negatives are only negatives when the batch holds no duplicate
    document.

    Inputs: ``query`` and ``doc`` ``(B, D)``; each hard negative ``(B, D)`` (row ``i`` a
    negative of query ``i``, and a candidate for every query).

    Args:
        scale: multiplies the similarities (``1 / temperature``; unitless, > 0). 20 suits
            cosine similarity; for ``"dot"`` use about 1.
        similarity: ``"cosine"`` or ``"dot"``.
        symmetric: add the document-to-query direction
            (sentence-transformers' ``MultipleNegativesSymmetricRankingLoss``).
        gather_distributed: under ``torch.distributed``, the candidates (documents, hard
            negatives and, symmetric, queries) of every rank are gathered with gradients
            and each rank's queries rank against all of them, so ``W`` ranks of ``B``
            pairs train like one batch of ``W * B``; the value returned is the mean over
            all ranks' pairs. ``False`` (default): each rank's batch alone; ``True``:
            always (``RuntimeError`` without a process group); ``None``: when a process
            group of more than one rank runs.

    Raises:
        ValueError: ``scale`` not > 0, an unknown ``similarity``; at call time, an input
            that is not a floating 2-D tensor or whose shape differs from ``query``'s.

    Reference: Henderson et al., "Efficient Natural Language Response Suggestion for
    Smart Reply", 2017; van den Oord et al., "Representation Learning with Contrastive
    Predictive Coding", 2018. Same values as sentence-transformers'
    ``MultipleNegativesRankingLoss`` (and ``MultipleNegativesSymmetricRankingLoss``) with
    the same ``scale`` and similarity.

    Example::

        >>> loss_fn = MultipleNegativesRankingLoss(scale=20.0)
        >>> query, doc, negative = torch.randn(3, 32, 384).unbind(0)
        >>> loss = loss_fn(query, doc, negative)
    """

    def __init__(
        self,
        scale: float = 20.0,
        similarity: str = "cosine",
        symmetric: bool = False,
        gather_distributed: bool | None = False,
    ):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"{type(self).__name__}: scale must be > 0, got {scale}")
        self.scale = scale
        self.similarity = similarity
        self.distance = get_similarity(similarity, type(self).__name__)
        self.symmetric = symmetric
        self.gather_distributed = gather_distributed

    def forward(self, query: Tensor, doc: Tensor, *hard_negatives: Tensor) -> Tensor:
        """Mean loss over the ``B`` queries (over all ranks' queries when gathering)."""
        name = type(self).__name__
        negatives = {f"hard_negatives[{k}]": n for k, n in enumerate(hard_negatives)}
        query, doc, *negs = check_pairs(name, query=query, doc=doc, **negatives)
        with torch.autocast(query.device.type, enabled=False):
            rows = torch.arange(len(query), device=query.device)
            docs = [doc, *negs]
            gathered = gather_candidates(
                self.gather_distributed, name, [query, *docs] if self.symmetric else docs
            )
            if gathered is None:
                if len(query) == 0:
                    return connected_zero(query, *docs)
                # Columns: every document, then every first hard negative, ...
                candidates, positives = torch.cat(docs), rows
                all_queries, query_offset = query, 0
            else:
                if sum(gathered.sizes) == 0:
                    return connected_zero(query, gathered.tensor)
                # Columns: pair j's document, then its hard negatives, for every pair j.
                everyone = gathered.tensor
                first = 1 if self.symmetric else 0
                candidates = everyone[:, first:].reshape(-1, everyone.shape[-1])
                positives = (rows + gathered.offset) * len(docs)
                all_queries = everyone[:, 0] if self.symmetric else None
                query_offset = gathered.offset
            logits = similarity_logits(self.distance, query, candidates, self.scale)
            per_query = info_nce(logits, rows, positives)
            if self.symmetric:
                back = similarity_logits(self.distance, doc, all_queries, self.scale)
                per_query = (per_query + info_nce(back, rows, rows + query_offset)) / 2
            return mean_over_pairs(per_query, gathered)

    def extra_repr(self) -> str:
        return (
            f"scale={self.scale}, similarity={self.similarity!r}, symmetric={self.symmetric}, "
            f"gather_distributed={self.gather_distributed}"
        )


MNRLoss = MultipleNegativesRankingLoss


REGRESSION_LOSSES: dict[str, type[nn.Module]] = {
    "mse": nn.MSELoss,
    "l1": nn.L1Loss,
    "smooth_l1": nn.SmoothL1Loss,
    "huber": nn.HuberLoss,
}


def _regression_loss(loss_fct: str | nn.Module, owner: str) -> nn.Module:
    if isinstance(loss_fct, nn.Module):
        return loss_fct
    if isinstance(loss_fct, str) and loss_fct in REGRESSION_LOSSES:
        return REGRESSION_LOSSES[loss_fct]()
    raise ValueError(
        f"{owner}: unknown loss_fct {loss_fct!r}: expected one of {sorted(REGRESSION_LOSSES)} "
        "or a torch.nn.Module taking (prediction, target)"
    )


class CosineSimilarityLoss(nn.Module):
    """Regression of the cosine similarity of two embeddings onto a gold score.

    For pairs labelled with a graded similarity (STS-B's 0-5 scores scaled to [0, 1]):
    ``loss = loss_fct(cos(a_i, b_i), score_i)``, by default the mean squared error.

    Inputs: ``a`` and ``b`` ``(B, D)``; ``scores`` ``(B,)`` in [0, 1] (unitless).

    Args:
        loss_fct: a regression loss of torch.nn by name, ``"mse"`` (``nn.MSELoss``),
            ``"l1"``, ``"smooth_l1"`` or ``"huber"`` (with its defaults), or any
            ``nn.Module`` called as ``loss_fct(prediction, target)`` on ``(B,)`` tensors.

    Raises:
        ValueError: an unknown ``loss_fct`` name (the message lists them); at call time,
            shapes that differ, ``scores`` not ``(B,)`` or outside [0, 1].

    Reference: Reimers & Gurevych, "Sentence-BERT", EMNLP 2019. Same values as
    sentence-transformers' ``CosineSimilarityLoss`` with the same ``loss_fct``.

    Example::

        >>> loss_fn = CosineSimilarityLoss()
        >>> a, b = torch.randn(2, 16, 384).unbind(0)
        >>> loss = loss_fn(a, b, torch.rand(16))
    """

    def __init__(self, loss_fct: str | nn.Module = "mse"):
        super().__init__()
        self.loss_fct = _regression_loss(loss_fct, type(self).__name__)
        self.distance = CosineSimilarity()

    def forward(self, a: Tensor, b: Tensor, scores: Tensor) -> Tensor:
        name = type(self).__name__
        a, b = check_pairs(name, a=a, b=b)
        scores = check_per_pair(name, "scores", scores, a)
        reject_bad_rows(name, "scores", scores, (scores < 0) | (scores > 1) | scores.isnan(),
                        "must lie in [0, 1]",
                        "(scale graded labels first, e.g. STS-B's 0-5 divided by 5)")
        with torch.autocast(a.device.type, enabled=False):
            if len(a) == 0:
                return connected_zero(a, b)
            return self.loss_fct(self.distance.pairwise(a, b), scores)


class CosineEmbeddingLoss(nn.Module):
    """Pairs labelled similar (1) or dissimilar (-1), on their cosine similarity.

    ``loss_i = 1 - cos(a_i, b_i)`` for ``target_i = 1`` and
    ``max(0, cos(a_i, b_i) - margin)`` for ``target_i = -1``, averaged over the pairs.

    Inputs: ``a`` and ``b`` ``(B, D)``; ``target`` ``(B,)`` of 1 and -1.

    Args:
        margin: dissimilar pairs are penalised above this cosine similarity (in [-1, 1];
            0 asks them to be at least orthogonal).

    Raises:
        ValueError: at call time, shapes that differ, ``target`` not ``(B,)`` or holding
            a value other than 1 and -1.

    Same values as ``torch.nn.CosineEmbeddingLoss(margin)`` (reduction ``"mean"``).

    Example::

        >>> loss_fn = CosineEmbeddingLoss(margin=0.2)
        >>> a, b = torch.randn(2, 16, 128).unbind(0)
        >>> loss = loss_fn(a, b, torch.tensor([1, -1]).repeat(8))
    """

    def __init__(self, margin: float = 0.0):
        super().__init__()
        self.margin = margin
        self.distance = CosineSimilarity()

    def forward(self, a: Tensor, b: Tensor, target: Tensor) -> Tensor:
        name = type(self).__name__
        a, b = check_pairs(name, a=a, b=b)
        target = check_per_pair(name, "target", target, a)
        reject_bad_rows(name, "target", target, (target != 1) & (target != -1),
                        "must be 1 (similar) or -1 (dissimilar)")
        with torch.autocast(a.device.type, enabled=False):
            if len(a) == 0:
                return connected_zero(a, b)
            cos = self.distance.pairwise(a, b)
            return torch.where(target > 0, 1 - cos, F.relu(cos - self.margin)).mean()

    def extra_repr(self) -> str:
        return f"margin={self.margin}"


class MarginRankingLoss(nn.Module):
    """The positive document ranked above the negative by a margin of similarity.

    ``loss_i = max(0, margin - (s(q_i, p_i) - s(q_i, n_i)))``, averaged over the triplets:
    ``torch.nn.MarginRankingLoss`` on ``x1 = s(query, pos)``, ``x2 = s(query, neg)`` with
    target 1.

    Inputs: ``query``, ``pos`` and ``neg`` ``(B, D)``.

    Args:
        margin: how much more similar the positive must be (in the similarity's units:
            cosine in [-1, 1] for ``"cosine"``); torch's default 0 stops as soon as the
            order is right, 0.1-0.3 is usual with cosine.
        similarity: ``"cosine"`` or ``"dot"``.

    Raises:
        ValueError: an unknown ``similarity``; at call time, shapes that differ.

    Same values as ``torch.nn.MarginRankingLoss(margin)`` (reduction ``"mean"``) on those
    similarities.

    Example::

        >>> loss_fn = MarginRankingLoss(margin=0.2)
        >>> query, pos, neg = torch.randn(3, 16, 128).unbind(0)
        >>> loss = loss_fn(query, pos, neg)
    """

    def __init__(self, margin: float = 0.0, similarity: str = "cosine"):
        super().__init__()
        self.margin = margin
        self.similarity = similarity
        self.distance = get_similarity(similarity, type(self).__name__)

    def forward(self, query: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        query, pos, neg = check_pairs(type(self).__name__, query=query, pos=pos, neg=neg)
        with torch.autocast(query.device.type, enabled=False):
            if len(query) == 0:
                return connected_zero(query, pos, neg)
            gap = self.distance.pairwise(query, pos) - self.distance.pairwise(query, neg)
            return F.relu(self.margin - gap).mean()

    def extra_repr(self) -> str:
        return f"margin={self.margin}, similarity={self.similarity!r}"


class MarginMSELoss(nn.Module):
    """Distillation of a teacher's score margin between a positive and a negative document.

    ``loss = mean_i (s(q_i, p_i) - s(q_i, n_i) - teacher_margin_i)^2``: the student's
    margin regresses onto the teacher's (e.g. a cross-encoder's score of the positive
    minus that of the negative, as written by ``recipes.synthesize``). Neither document
    needs to be relevant: only the margin is learnt.

    Inputs: ``query``, ``pos`` and ``neg`` ``(B, D)``; ``teacher_margin`` ``(B,)`` in the
    teacher's score units (match ``similarity``'s scale).

    Args:
        similarity: ``"dot"`` (default, raw inner product, as sentence-transformers 6.2's
            ``pairwise_dot_score``) or ``"cosine"``.

    Raises:
        ValueError: an unknown ``similarity``; at call time, shapes that differ or
            ``teacher_margin`` not ``(B,)``.

    Reference: Hofstätter et al., "Improving Efficient Neural Ranking Models with
    Cross-Architecture Knowledge Distillation", 2020. Same values as
    sentence-transformers' ``MarginMSELoss`` (one negative per query).

    Example::

        >>> loss_fn = MarginMSELoss()
        >>> query, pos, neg = torch.randn(3, 16, 384).unbind(0)
        >>> loss = loss_fn(query, pos, neg, teacher_margin=torch.randn(16))
    """

    def __init__(self, similarity: str = "dot"):
        super().__init__()
        self.similarity = similarity
        self.distance = get_similarity(similarity, type(self).__name__)

    def forward(self, query: Tensor, pos: Tensor, neg: Tensor, teacher_margin: Tensor) -> Tensor:
        name = type(self).__name__
        query, pos, neg = check_pairs(name, query=query, pos=pos, neg=neg)
        teacher_margin = check_per_pair(name, "teacher_margin", teacher_margin, query)
        with torch.autocast(query.device.type, enabled=False):
            if len(query) == 0:
                return connected_zero(query, pos, neg)
            margin = self.distance.pairwise(query, pos) - self.distance.pairwise(query, neg)
            return F.mse_loss(margin, teacher_margin.detach())

    def extra_repr(self) -> str:
        return f"similarity={self.similarity!r}"
