"""UMAP pictures: a real PNG with a legend of class names, and clear errors on bad input."""

import matplotlib.image
import numpy
import pytest
import torch

from lightning_metric.plots import fixed_subset, plot_embeddings


def test_plot_is_a_picture_of_separated_classes(tmp_path):
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=generator) * 5
    labels = torch.arange(3).repeat_interleave(60)
    embeddings = centres[labels] + torch.randn(180, 16, generator=generator) * 0.3
    path = plot_embeddings(embeddings, labels, tmp_path / "p.png", ["cat", "dog", "owl"])
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 300
    colours = numpy.unique((image[..., :3] * 255).astype(int).reshape(-1, 3), axis=0)
    assert len(colours) > 50


def test_subset_is_fixed_and_bounded():
    first, second = fixed_subset(10_000, 500, seed=1), fixed_subset(10_000, 500, seed=1)
    assert torch.equal(first, second) and len(first) == 500 and len(first.unique()) == 500
    assert torch.equal(fixed_subset(7, 500, seed=1), torch.arange(7))


@pytest.mark.parametrize(
    ("embeddings", "labels", "message"),
    [
        (torch.randn(10, 4), torch.zeros(9), "N == len"),
        (torch.randn(3, 4), torch.zeros(3), "at least 4"),
    ],
)
def test_bad_input(tmp_path, embeddings, labels, message):
    with pytest.raises(ValueError, match=message):
        plot_embeddings(embeddings, labels.long(), tmp_path / "p.png")
