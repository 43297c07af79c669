"""Exported embeddings and FAISS index: search finds the right neighbours; bad input is refused."""

import numpy as np
import pytest
import torch

from lightning_metric.export import export_embeddings, search


def clustered(n_per_class=20, classes=4, dim=8):
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(classes, dim, generator=generator) * 4
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[labels] + torch.randn(len(labels), dim, generator=generator) * 0.2, labels


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_search_returns_the_item_itself_then_its_class(tmp_path, metric):
    embeddings, labels = clustered()
    export_embeddings(embeddings, labels, tmp_path, metric=metric)
    stored = np.load(tmp_path / "embeddings.npy")
    scores, ids = search(tmp_path, stored[[3, 45]], k=5)
    assert ids[:, 0].tolist() == [3, 45]
    assert (labels[ids[0]] == labels[3]).all() and (labels[ids[1]] == labels[45]).all()
    if metric == "cosine":
        np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
        assert (np.diff(scores, axis=1) <= 1e-6).all()
    else:
        np.testing.assert_allclose(scores[:, 0], 0.0, atol=1e-5)


def test_nan_embeddings_are_refused_with_the_count(tmp_path):
    embeddings, labels = clustered()
    embeddings[[1, 7]] = float("nan")
    with pytest.raises(ValueError, match="2 embeddings contain NaN"):
        export_embeddings(embeddings, labels, tmp_path)
    assert not (tmp_path / "index.faiss").exists()


def test_bad_arguments(tmp_path):
    embeddings, labels = clustered()
    with pytest.raises(ValueError, match="metric must be one of"):
        export_embeddings(embeddings, labels, tmp_path, metric="manhattan")
    with pytest.raises(ValueError, match="N == len"):
        export_embeddings(embeddings, labels[:-1], tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no export"):
        search(tmp_path / "nothing", np.zeros(8))
    export_embeddings(embeddings, labels, tmp_path)
    with pytest.raises(ValueError, match="dimension 3, the index has 8"):
        search(tmp_path, np.zeros(3))
