"""Pictures of embeddings: a 2-D UMAP projection coloured by class."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

MAX_LEGEND = 20
"""Classes named in a picture's legend at most; more are drawn without one."""


def fixed_subset(n: int, max_points: int, seed: int) -> Tensor:
    """Indices of at most ``max_points`` of ``n`` items, the same for the same (n, seed)."""
    if n <= max_points:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:max_points].sort().values


def umap_2d(embeddings: np.ndarray, seed: int) -> np.ndarray:
    """``(N, D)`` -> ``(N, 2)`` with UMAP (cosine metric); tiny sets use fewer neighbours."""
    import umap  # slow to import: only when a plot is made

    neighbours = max(2, min(15, len(embeddings) - 1))
    reducer = umap.UMAP(n_components=2, n_neighbors=neighbours, metric="cosine",
                        random_state=seed, n_jobs=1)
    return reducer.fit_transform(embeddings)


def plot_embeddings(
    embeddings: Tensor,
    labels: Tensor,
    path: str | Path,
    class_names: Sequence[str] | None = None,
    max_points: int = 5000,
    seed: int = 0,
    title: str = "",
    is_query: Tensor | np.ndarray | None = None,
    categories: Tensor | np.ndarray | None = None,
    category_names: Sequence[str] = (),
) -> Path:
    """Write a PNG of the UMAP projection of up to ``max_points`` embeddings ``(N, D)``.

    Points are coloured by ``labels`` ``(N,)``, the legend naming each class
    (``class_names[label]`` when given), or by ``categories`` ``(N,)`` when given (named by
    ``category_names``): the view of data with many classes and a few categories. With
    ``is_query`` ``(N,)`` bool (data with a separate gallery), queries are drawn as
    circles and gallery items as crosses. Returns the written path.

    Raises:
        ValueError: shapes that do not match, or fewer than 4 points.
    """
    n = len(labels)
    if embeddings.ndim != 2 or len(embeddings) != n:
        raise ValueError(
            f"embeddings must be (N, D) with N == len(labels), got {tuple(embeddings.shape)} "
            f"and {n} labels"
        )
    for name, values in (("is_query", is_query), ("categories", categories)):
        if values is not None and len(values) != n:
            raise ValueError(f"{name} must have one value per embedding ({n}), got {len(values)}")
    if n < 4:
        raise ValueError(f"a UMAP plot needs at least 4 points, got {n}")
    keep = fixed_subset(n, max_points, seed)
    points = umap_2d(embeddings[keep].detach().float().cpu().numpy(), seed)
    if categories is not None:
        colour_ids, names = np.asarray(categories)[keep.numpy()], category_names
    else:
        colour_ids, names = labels[keep].cpu().numpy(), class_names
    queries = None if is_query is None else np.asarray(is_query, dtype=bool)[keep.numpy()]
    figure, axes = plt.subplots(figsize=(7, 6), dpi=100)
    _scatter(axes, points, colour_ids, names, queries)
    _title_without_ticks(axes, title or f"UMAP of {len(keep)} embeddings")
    return _save(figure, path)


def plot_side_by_side(
    panels: Sequence[tuple[str, np.ndarray, np.ndarray]],
    path: str | Path,
    class_names: Sequence[str] | None = None,
    max_points: int = 5000,
    seed: int = 0,
) -> Path:
    """Write one PNG of several UMAP projections side by side (one loss each, say).

    Args:
        panels: ``(title, embeddings (N, D), labels (N,))`` per panel; each panel draws the
            same ``max_points`` items when the sets are the same size.
        path: the PNG written (folders created).
        class_names: the legend's names of the labels.

    Raises:
        ValueError: no panel, shapes that do not match, or fewer than 4 points.
    """
    if not panels:
        raise ValueError("plot_side_by_side needs at least one panel")
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5.5), dpi=100,
                                squeeze=False)
    for panel_axes, (title, embeddings, labels) in zip(axes[0], panels, strict=True):
        if embeddings.ndim != 2 or len(embeddings) != len(labels) or len(labels) < 4:
            raise ValueError(f"panel {title!r}: embeddings must be (N, D), N >= 4, with one "
                             f"label each; got {embeddings.shape} and {len(labels)} labels")
        keep = fixed_subset(len(labels), max_points, seed).numpy()
        points = umap_2d(np.asarray(embeddings, dtype=np.float32)[keep], seed)
        _scatter(panel_axes, points, np.asarray(labels)[keep], class_names, None)
        _title_without_ticks(panel_axes, title)
    return _save(figure, path)


def _title_without_ticks(axes, title: str) -> None:
    """UMAP's axes have no units: a title and no ticks."""
    axes.set_title(title)
    axes.set_xticks([])
    axes.set_yticks([])


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, bbox_inches="tight")
    plt.close(figure)
    return path


def _scatter(axes, points: np.ndarray, colour_ids: np.ndarray, names: Sequence[str] | None,
             queries: np.ndarray | None) -> None:
    """One colour per id (named in the legend, up to ``MAX_LEGEND`` ids); circles for queries,
    crosses for gallery."""
    values = np.unique(colour_ids)
    colours = plt.get_cmap("tab20" if len(values) > 10 else "tab10")
    shapes = [("o", np.ones(len(points), dtype=bool), "")]
    if queries is not None:
        shapes = [("o", queries, " (query)"), ("x", ~queries, " (gallery)")]
    for i, value in enumerate(values):
        name = names[value] if names is not None and 0 <= value < len(names) else value
        for marker, members, suffix in shapes:
            chosen = (colour_ids == value) & members
            if chosen.any():
                axes.scatter(points[chosen, 0], points[chosen, 1], s=4 if marker == "o" else 8,
                             marker=marker, color=colours(i % colours.N),
                             label=f"{name}{suffix}", linewidths=0.6)
    if len(values) <= MAX_LEGEND:  # a legend of hundreds of instances hides the picture
        axes.legend(markerscale=3, fontsize=7, loc="best")
