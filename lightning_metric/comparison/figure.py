"""The comparison's figure: the test embeddings of a few losses, UMAP side by side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..plots import plot_side_by_side
from .runner import CellResult


def umap_figure(results: Sequence[CellResult], setup: str, losses: Sequence[str], path: Path,
                class_names: Sequence[str] | None = None, max_points: int = 3000) -> Path:
    """One panel a loss: the test embeddings its first-seed run exported (``export/``).

    Raises:
        ValueError: a loss of ``losses`` was not run under ``setup``, or its run has no
            export (the search of the figure's cells runs with ``export=true``).
    """
    by_cell = {(r.cell.setup, r.cell.loss): r for r in results}
    panels = []
    for loss in losses:
        result = by_cell.get((setup, loss))
        if result is None:
            raise ValueError(f"figure.losses: {loss} was not run under setup {setup!r}")
        export = result.runs[0].folder / "export"
        if not (export / "embeddings.npy").is_file():
            raise ValueError(f"figure: {export} has no embeddings.npy (run with export=true)")
        seed = result.runs[0].overrides.get("seed", "0")
        panels.append((f"{loss} ({' '.join(result.chosen) or 'defaults'}, seed {seed})",
                       np.load(export / "embeddings.npy"), np.load(export / "labels.npy")))
    return plot_side_by_side(panels, path, class_names, max_points=max_points)
