"""Boundary checks shared by losses and miners: clear errors instead of broadcasts."""

from __future__ import annotations

import torch
from torch import Tensor

IndicesTuple = tuple[Tensor, Tensor, Tensor] | tuple[Tensor, Tensor, Tensor, Tensor]


def check_embeddings(name: str, embeddings: Tensor) -> None:
    """``embeddings`` must be a floating 2-D tensor ``(batch_size, embedding_size)``."""
    if not isinstance(embeddings, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(embeddings).__name__}")
    if embeddings.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D of shape (batch_size, embedding_size), got shape "
            f"{tuple(embeddings.shape)}"
        )
    if not embeddings.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {embeddings.dtype}")


def check_labels(name: str, labels: Tensor | None, embeddings: Tensor) -> Tensor | None:
    """``labels`` must be 1-D with one entry per embedding row; returned on its device."""
    if labels is None:
        return None
    if not isinstance(labels, Tensor):
        labels = torch.as_tensor(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D of shape (batch_size,), got {tuple(labels.shape)}")
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"{name} has {labels.shape[0]} entries but there are {embeddings.shape[0]} "
            "embeddings: they must have the same length"
        )
    return labels.to(embeddings.device)


def check_ref_emb(ref_emb: Tensor, embeddings: Tensor) -> None:
    """``ref_emb`` a floating 2-D tensor of the embeddings' size (any number of rows)."""
    check_embeddings("ref_emb", ref_emb)
    if ref_emb.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"ref_emb has embedding size {ref_emb.shape[1]} but embeddings have "
            f"{embeddings.shape[1]}"
        )


def check_inputs(
    embeddings: Tensor,
    labels: Tensor | None,
    ref_emb: Tensor | None,
    ref_labels: Tensor | None,
    indices_tuple: IndicesTuple | None,
) -> tuple[Tensor | None, Tensor | None]:
    """Validate a loss's or miner's inputs; return ``(labels, ref_labels)`` on the right device."""
    check_embeddings("embeddings", embeddings)
    labels = check_labels("labels", labels, embeddings)
    if ref_emb is None and ref_labels is not None:
        raise ValueError("ref_labels was given without ref_emb")
    if ref_emb is not None:
        check_ref_emb(ref_emb, embeddings)
        if ref_labels is None and labels is not None:
            raise ValueError("ref_emb was given without ref_labels: pass both or neither")
        ref_labels = check_labels("ref_labels", ref_labels, ref_emb)
    if labels is None and indices_tuple is None:
        raise ValueError("labels are required when no indices_tuple is given")
    if indices_tuple is not None:
        n_ref = embeddings.shape[0] if ref_emb is None else ref_emb.shape[0]
        check_indices_tuple(indices_tuple, embeddings.shape[0], n_ref)
    return labels, ref_labels


def check_indices_tuple(indices_tuple: IndicesTuple, n_query: int, n_ref: int) -> None:
    """Pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)`` of in-range 1-D integer indices."""
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        raise ValueError(
            "indices_tuple must be triplets (anchors, positives, negatives) or pairs "
            "(anchors1, positives, anchors2, negatives)"
        )
    for i, idx in enumerate(indices_tuple):
        if not isinstance(idx, Tensor) or idx.ndim != 1 or idx.is_floating_point():
            raise ValueError(f"indices_tuple[{i}] must be a 1-D integer tensor")
    lengths = [len(x) for x in indices_tuple]
    groups = [(0, 1, 2)] if len(indices_tuple) == 3 else [(0, 1), (2, 3)]
    for group in groups:
        if len({lengths[i] for i in group}) != 1:
            raise ValueError(
                f"indices_tuple entries {group} must have equal lengths, got {lengths}"
            )
    anchor_positions = (0,) if len(indices_tuple) == 3 else (0, 2)
    for i, idx in enumerate(indices_tuple):
        limit = n_query if i in anchor_positions else n_ref
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= limit):
            raise ValueError(f"indices_tuple[{i}] has indices outside [0, {limit})")
