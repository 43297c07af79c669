"""Shared fixtures for parity tests against pytorch-metric-learning (the test oracle)."""

from __future__ import annotations

import torch

BATCH = 16
DIM = 8


def label_patterns(batch: int = BATCH) -> dict[str, torch.Tensor]:
    """The label patterns every labelled loss and miner is checked on."""
    assert batch % 4 == 0
    return {
        "four_per_class": torch.arange(batch // 4).repeat_interleave(4),
        "imbalanced_singletons": torch.tensor(
            [0] * (batch // 2) + [1] * (batch // 4) + list(range(2, 2 + batch // 4))
        ),
        "two_views": torch.arange(batch // 2).repeat(2),
        "no_positive_pair": torch.arange(batch),
        "single_class": torch.zeros(batch, dtype=torch.long),
    }


PATTERN_NAMES = list(label_patterns())


def random_embeddings(
    n: int = BATCH, dim: int = DIM, seed: int = 0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=generator, dtype=torch.float64).to(dtype)


def subset_of_triplets(labels: torch.Tensor, seed: int = 0, keep: float = 0.3):
    """A fixed random subset of all triplets: stands in for a miner's output."""
    pos = labels[:, None] == labels[None, :]
    pos.fill_diagonal_(False)
    neg = labels[:, None] != labels[None, :]
    a, p, n = torch.where(pos[:, :, None] & neg[:, None, :])
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.rand(len(a), generator=generator) < keep
    return a[chosen], p[chosen], n[chosen]


def subset_of_pairs(labels: torch.Tensor, seed: int = 0, keep: float = 0.5):
    """A fixed random subset of all positive and negative pairs."""
    pos = labels[:, None] == labels[None, :]
    pos.fill_diagonal_(False)
    neg = labels[:, None] != labels[None, :]
    generator = torch.Generator().manual_seed(seed)
    a1, p = torch.where(pos & (torch.rand(pos.shape, generator=generator) < keep))
    a2, n = torch.where(neg & (torch.rand(neg.shape, generator=generator) < keep))
    return a1, p, a2, n


def value_and_grad(loss_fn, embeddings, labels, ref_emb=None, ref_labels=None, **kwargs):
    """Loss value and gradient w.r.t. the embeddings (and ref_emb when given)."""
    emb = embeddings.detach().clone().requires_grad_(True)
    ref = None if ref_emb is None else ref_emb.detach().clone().requires_grad_(True)
    if ref is None:
        value = loss_fn(emb, labels, **kwargs)
    else:
        value = loss_fn(emb, labels, ref_emb=ref, ref_labels=ref_labels, **kwargs)
    value.backward()
    grads = [emb.grad] if ref is None else [emb.grad, ref.grad]
    grads = [torch.zeros_like(emb) if g is None else g for g in grads]
    return value.detach(), grads


def assert_parity(ours, theirs, embeddings, labels, rtol=1e-5, atol=1e-8, **kwargs):
    """Our loss equals PML's, value and gradients, on the same inputs."""
    our_value, our_grads = value_and_grad(ours, embeddings, labels, **kwargs)
    their_value, their_grads = value_and_grad(theirs, embeddings, labels, **kwargs)
    torch.testing.assert_close(
        our_value.to(their_value.dtype), their_value, rtol=rtol, atol=atol, msg="loss value"
    )
    for ours_g, theirs_g in zip(our_grads, their_grads, strict=True):
        torch.testing.assert_close(ours_g, theirs_g, rtol=rtol, atol=atol, msg="gradient")
    return our_value


def value_and_all_grads(loss_fn, embeddings, labels, **kwargs):
    """Value, embedding gradient and parameter gradients of one forward/backward."""
    loss_fn.zero_grad()
    emb = embeddings.detach().clone().requires_grad_(True)
    value = loss_fn(emb, labels, **kwargs)
    value.backward()
    params = {k: p.grad.clone() for k, p in loss_fn.named_parameters()}
    return value.detach(), emb.grad, params


def assert_full_parity(ours, theirs, embeddings, labels, rtol=1e-5, atol=1e-8, **kwargs):
    """Same value, gradient w.r.t. the embeddings and w.r.t. every learnable tensor."""
    our_value, our_grad, our_params = value_and_all_grads(ours, embeddings, labels, **kwargs)
    their_value, their_grad, their_params = value_and_all_grads(
        theirs, embeddings, labels, **kwargs
    )
    torch.testing.assert_close(our_value, their_value, rtol=rtol, atol=atol, msg="loss value")
    torch.testing.assert_close(our_grad, their_grad, rtol=rtol, atol=atol, msg="embedding grad")
    assert our_params.keys() == their_params.keys()
    for key, grad in our_params.items():
        torch.testing.assert_close(
            grad, their_params[key], rtol=rtol, atol=atol, msg=f"grad of {key}"
        )
