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
) -> Path:
    """Write a PNG of the UMAP projection of up to ``max_points`` embeddings ``(N, D)``.

    Points are coloured by ``labels`` ``(N,)``; the legend names each class
    (``class_names[label]`` when given). Returns the written path.
    """
    if embeddings.ndim != 2 or len(embeddings) != len(labels):
        raise ValueError(
            f"embeddings must be (N, D) with N == len(labels), got {tuple(embeddings.shape)} "
            f"and {len(labels)} labels"
        )
    if len(embeddings) < 4:
        raise ValueError(f"a UMAP plot needs at least 4 points, got {len(embeddings)}")
    keep = fixed_subset(len(embeddings), max_points, seed)
    points = umap_2d(embeddings[keep].detach().float().cpu().numpy(), seed)
    kept_labels = labels[keep].cpu().numpy()
    figure, axes = plt.subplots(figsize=(7, 6), dpi=100)
    colours = plt.get_cmap("tab20" if len(np.unique(kept_labels)) > 10 else "tab10")
    for i, label in enumerate(np.unique(kept_labels)):
        chosen = kept_labels == label
        name = class_names[label] if class_names is not None and label < len(class_names) else label
        axes.scatter(points[chosen, 0], points[chosen, 1], s=4, color=colours(i % colours.N),
                     label=str(name))
    axes.legend(markerscale=3, fontsize=7, loc="best")
    axes.set_title(title or f"UMAP of {len(keep)} embeddings")
    axes.set_xticks([])
    axes.set_yticks([])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, bbox_inches="tight")
    plt.close(figure)
    return path
