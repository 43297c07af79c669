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


def test_queries_and_gallery_get_their_own_markers_and_categories_their_colours():
    import matplotlib.pyplot as plt

    from lightning_metric.plots import _scatter

    points = numpy.arange(12, dtype=float).reshape(6, 2)
    figure, axes = plt.subplots()
    _scatter(axes, points, numpy.array([0, 0, 1, 1, 1, 0]), ("shoes", "bags"),
             numpy.array([True, False, True, False, False, True]))
    handles, names = axes.get_legend_handles_labels()
    assert names == ["shoes (query)", "shoes (gallery)", "bags (query)", "bags (gallery)"]
    assert [len(h.get_offsets()) for h in handles] == [2, 1, 1, 2]
    plt.close(figure)


def test_plot_with_roles_writes_a_picture_and_checks_lengths(tmp_path):
    generator = torch.Generator().manual_seed(0)
    embeddings, labels = torch.randn(40, 8, generator=generator), torch.arange(40) % 4
    path = plot_embeddings(embeddings, labels, tmp_path / "roles.png",
                           is_query=numpy.arange(40) % 2 == 0, categories=numpy.arange(40) % 2,
                           category_names=("tops", "shoes"))
    assert path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="categories must have one value per embedding"):
        plot_embeddings(embeddings, labels, tmp_path / "x.png", categories=numpy.zeros(3))
