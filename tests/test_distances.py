"""Distances: the same matrices as PML's, and their direction."""

import pytest
import torch
from helpers import random_embeddings
from pytorch_metric_learning import distances as pml_distances

from lightning_metric import distances

CASES = [
    ("cosine", {}, pml_distances.CosineSimilarity, {}),
    ("dot", {}, pml_distances.DotProductSimilarity, {}),
    ("dot", {"normalize_embeddings": False}, pml_distances.DotProductSimilarity,
     {"normalize_embeddings": False}),
    ("euclidean", {}, pml_distances.LpDistance, {}),
    ("lp", {"p": 1, "power": 2, "normalize_embeddings": False}, pml_distances.LpDistance,
     {"p": 1, "power": 2, "normalize_embeddings": False}),
    ("lp", {"p": 3}, pml_distances.LpDistance, {"p": 3}),
    ("snr", {}, pml_distances.SNRDistance, {}),
    ("snr", {"normalize_embeddings": False}, pml_distances.SNRDistance,
     {"normalize_embeddings": False}),
]


@pytest.mark.parametrize(("name", "kwargs", "pml_class", "pml_kwargs"), CASES)
@pytest.mark.parametrize("with_ref", [False, True])
def test_matrix_matches_pml(name, kwargs, pml_class, pml_kwargs, with_ref):
    query = random_embeddings(10, 6, seed=1).requires_grad_(True)
    ref = random_embeddings(7, 6, seed=2) if with_ref else None
    ours = distances.get_distance(name, **kwargs)
    theirs = pml_class(**pml_kwargs)
    our_mat, their_mat = ours(query, ref), theirs(query, ref)
    torch.testing.assert_close(our_mat, their_mat, rtol=1e-10, atol=1e-10)
    (our_grad,) = torch.autograd.grad(our_mat.sin().sum(), query)
    (their_grad,) = torch.autograd.grad(their_mat.sin().sum(), query)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-8, atol=1e-8)
    assert ours.is_inverted == theirs.is_inverted


@pytest.mark.parametrize(("name", "kwargs", "pml_class", "pml_kwargs"), CASES)
def test_rowwise_matches_pml(name, kwargs, pml_class, pml_kwargs):
    query, ref = random_embeddings(9, 5, seed=3), random_embeddings(9, 5, seed=4)
    ours = distances.get_distance(name, **kwargs).pairwise(query, ref)
    theirs = pml_class(**pml_kwargs)
    expected = theirs.pairwise_distance(theirs.maybe_normalize(query), theirs.maybe_normalize(ref))
    if theirs.power != 1:
        expected = expected**theirs.power
    torch.testing.assert_close(ours, expected)


def test_hand_computed_values():
    x = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    euclid = distances.LpDistance(normalize_embeddings=False)(x)
    torch.testing.assert_close(euclid, torch.tensor([[0.0, 18**0.5], [18**0.5, 0.0]]))
    cosine = distances.CosineSimilarity()(x)
    torch.testing.assert_close(cosine, torch.tensor([[1.0, 0.8], [0.8, 1.0]]))
    dot = distances.DotProductSimilarity(normalize_embeddings=False)(x)
    torch.testing.assert_close(dot, torch.tensor([[25.0, 4.0], [4.0, 1.0]]))


def test_direction_helpers():
    values = torch.tensor([[0.1, 0.9, 0.5]])
    similarity, distance = distances.CosineSimilarity(), distances.LpDistance()
    assert similarity.closest(values, dim=1).indices.item() == 1
    assert distance.closest(values, dim=1).indices.item() == 0
    assert similarity.farthest(values, dim=1).indices.item() == 0
    assert distance.farthest(values, dim=1).indices.item() == 1
    assert similarity.margin(torch.tensor(0.2), torch.tensor(0.9)) > 0
    assert distance.margin(torch.tensor(0.9), torch.tensor(0.2)) > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["cosine", "dot", "euclidean", "snr"])
def test_half_inputs_compute_in_float32(name, dtype):
    x = random_embeddings(6, 4, dtype=dtype)
    mat = distances.get_distance(name)(x)
    assert mat.dtype == torch.float32
    assert torch.isfinite(mat).all()


def test_unknown_distance_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown distance 'manhattan'.*cosine"):
        distances.get_distance("manhattan")


@pytest.mark.parametrize("bad", [torch.randn(4), torch.randn(2, 3, 4)])
def test_non_2d_input_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="2-D"):
        distances.CosineSimilarity()(bad)


def test_mismatched_embedding_sizes_are_a_clear_error():
    with pytest.raises(ValueError, match="same embedding size"):
        distances.LpDistance()(torch.randn(3, 4), torch.randn(3, 5))
