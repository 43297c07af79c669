"""``get_logits``: the class logits of every classification-style loss, equal to PML 2.9's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import random_embeddings
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses

from lightning_metric import losses

NUM_CLASSES, DIM, BATCH = 7, 8, 12

# (name, our kwargs, PML kwargs): defaults first, then non-default settings.
CASES = [
    ("ArcFaceLoss", {}, {}),
    ("ArcFaceLoss", {"margin": 10, "scale": 16}, {"margin": 10, "scale": 16}),
    ("CosFaceLoss", {}, {}),
    ("CosFaceLoss", {"margin": 0.2, "scale": 30}, {"margin": 0.2, "scale": 30}),
    ("SubCenterArcFaceLoss", {}, {}),
    ("SubCenterArcFaceLoss", {"sub_centers": 2, "scale": 8}, {"sub_centers": 2, "scale": 8}),
    ("SphereFaceLoss", {}, {}),
    ("SphereFaceLoss", {"margin": 2, "scale": 3}, {"margin": 2, "scale": 3}),
    ("LargeMarginSoftmaxLoss", {}, {}),
    ("LargeMarginSoftmaxLoss", {"margin": 3, "scale": 2}, {"margin": 3, "scale": 2}),
    ("NormalizedSoftmaxLoss", {}, {}),
    ("NormalizedSoftmaxLoss", {"temperature": 0.3, "distance": "euclidean"},
     {"temperature": 0.3, "distance": pml_distances.LpDistance()}),
    ("ProxyNCALoss", {}, {}),
    ("ProxyNCALoss", {"distance": "cosine"}, {"distance": pml_distances.CosineSimilarity()}),
    ("ProxyAnchorLoss", {}, {}),
    ("SoftTripleLoss", {}, {}),
    ("SoftTripleLoss", {"centers_per_class": 3, "gamma": 0.2, "la": 5},
     {"centers_per_class": 3, "gamma": 0.2, "la": 5}),
]


def _pair(name, ours_kwargs, pml_kwargs):
    """Our loss holding PML's (PML-initialised) weights, both float64."""
    torch.manual_seed(0)
    theirs = getattr(pml_losses, name)(num_classes=NUM_CLASSES, embedding_size=DIM, **pml_kwargs)
    ours = getattr(losses, name)(num_classes=NUM_CLASSES, embedding_size=DIM, **ours_kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours.double(), theirs.double()


@pytest.mark.parametrize(
    "name,ours_kwargs,pml_kwargs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_get_logits_equal_pml(name, ours_kwargs, pml_kwargs):
    ours, theirs = _pair(name, ours_kwargs, pml_kwargs)
    x = random_embeddings(BATCH, DIM, seed=3) * 3  # norms far from 1: SphereFace, L-Softmax
    logits = ours.get_logits(x)
    assert logits.shape == (BATCH, NUM_CLASSES) and logits.dtype == torch.float64
    torch.testing.assert_close(logits, theirs.get_logits(x), rtol=1e-6, atol=1e-6)


def test_get_logits_is_differentiable_and_leaves_the_weights_alone():
    loss = losses.ArcFaceLoss(NUM_CLASSES, DIM)
    before = loss.W.detach().clone()
    x = random_embeddings(BATCH, DIM, dtype=torch.float32).requires_grad_(True)
    loss.get_logits(x).sum().backward()
    assert x.grad is not None and loss.W.grad is not None
    assert loss.W.dtype == torch.float32 and torch.equal(loss.W.detach(), before)


def test_get_logits_under_autocast_is_float32():
    loss = losses.CosFaceLoss(NUM_CLASSES, DIM)
    x = random_embeddings(BATCH, DIM, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = loss.get_logits(x)
    assert logits.dtype == torch.float32 and loss.W.dtype == torch.float32


def test_p2sgrad_logits_are_the_cosines_it_regresses():
    """PML's P2SGradLoss has no get_logits: the logits are the clamped cosines whose MSE
    with the one-hot labels is PML's loss."""
    torch.manual_seed(0)
    theirs = pml_losses.P2SGradLoss(descriptors_dim=DIM, num_classes=NUM_CLASSES).double()
    ours = losses.P2SGradLoss(descriptors_dim=DIM, num_classes=NUM_CLASSES)
    ours.load_state_dict(theirs.state_dict())
    ours = ours.double()
    with torch.no_grad():
        ours.weight.mul_(3)  # off the unit sphere, as after an optimizer step
    before = ours.weight.detach().clone()
    x = random_embeddings(BATCH, DIM, seed=4)
    labels = torch.arange(BATCH) % NUM_CLASSES
    logits = ours.get_logits(x)
    assert torch.equal(ours.weight.detach(), before)  # no in-place renorm
    expected = (F.normalize(x, dim=1) @ F.normalize(before, dim=0)).clamp(-1, 1)
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
    mse = F.mse_loss(logits, F.one_hot(labels, NUM_CLASSES).double())
    torch.testing.assert_close(mse, theirs(x, labels), rtol=1e-6, atol=1e-6)


def test_proxy_nca_logits_are_distances():
    """PML's ProxyNCA get_logits is the distance matrix: the closest proxy is the argmin."""
    loss = losses.ProxyNCALoss(NUM_CLASSES, DIM).double()
    logits = loss.get_logits(F.normalize(loss.proxies.detach(), dim=1))
    assert torch.equal(logits.argmin(dim=1), torch.arange(NUM_CLASSES))


@pytest.mark.parametrize("name", sorted({c[0] for c in CASES} | {"P2SGradLoss"}))
def test_wrong_embedding_size_is_refused(name):
    if name == "P2SGradLoss":
        loss = losses.P2SGradLoss(descriptors_dim=DIM, num_classes=NUM_CLASSES)
    else:
        loss = getattr(losses, name)(num_classes=NUM_CLASSES, embedding_size=DIM)
    with pytest.raises(ValueError, match=f"embedding_size={DIM}"):
        loss.get_logits(torch.randn(3, DIM + 1))
    with pytest.raises(ValueError, match="2-D"):
        loss.get_logits(torch.randn(DIM))
