"""Worst-query retrieval pictures: the queries an embedding gets most wrong, with their results.

One row per query, worst average precision first: the query, its top-k retrieved
gallery items framed green (same label) or red (another label), then gallery items
of its label that the top-k missed, framed blue. Text items get the same content
as a Markdown table. The pictures read the results of the one nearest-neighbour
search of the metrics (open-metric-learning logs the same kind of picture at every
validation); they never search again.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from .evaluation import RetrievalResults

RIGHT, WRONG, MISSED = "#1a9641", "#d7191c", "#2b83ba"


@dataclass(frozen=True)
class QueryRow:
    """One query of a picture: item ids index the evaluation set (dataset order).

    Attributes:
        query: the query's item id.
        label: its label.
        average_precision: its AP@R (what ranked it among the worst).
        retrieved: item ids of its top-k results, nearest first.
        relevant: for each retrieved item, whether it has the query's label.
        missed: item ids of gallery items with its label that are not in ``retrieved``.
    """

    query: int
    label: int
    average_precision: float
    retrieved: tuple[int, ...]
    relevant: tuple[bool, ...]
    missed: tuple[int, ...] = ()


def worst_queries(average_precision: Tensor, n: int) -> Tensor:
    """Positions of the ``n`` lowest values of ``average_precision`` ``(Q,)``, lowest first.

    Ties keep query order; NaN (queries without any relevant item) are never chosen.
    """
    if n < 1:
        raise ValueError(f"the number of queries to draw must be >= 1, got {n}")
    valid = torch.nonzero(~torch.isnan(average_precision)).flatten()
    order = torch.argsort(average_precision[valid], stable=True)
    return valid[order[:n]]


def query_rows(results: RetrievalResults, n: int, top_k: int = 5,
               max_missed: int = 3) -> list[QueryRow]:
    """The ``n`` worst queries of one search (lowest AP@R first) as :class:`QueryRow` s.

    Item ids are ``results``' ids (dataset indices of the evaluation set in the metrics
    callback; the rows of the query and reference sets without ids). ``missed`` lists, in
    dataset order, up to ``max_missed`` reference items with the query's label (the query
    itself excluded) that are not among its first ``top_k`` neighbours.

    Raises:
        ValueError: ``top_k`` above the neighbours the search kept.
    """
    if top_k > results.neighbours.shape[1]:
        raise ValueError(
            f"top_k={top_k} but the search kept {results.neighbours.shape[1]} neighbours a "
            "query (RetrievalMetrics(top_k=...))")
    query_ids = results.query_ids if results.query_ids is not None else torch.arange(
        len(results.query_labels))
    reference_ids = results.reference_ids if results.reference_ids is not None else (
        torch.arange(len(results.reference_labels)))
    neighbour_ids = results.neighbour_ids()
    rows = []
    for q in results.worst_queries(n).tolist():
        found = neighbour_ids[q, :top_k]
        kept = found >= 0
        retrieved = found[kept]
        label = int(results.query_labels[q])
        same = (results.reference_labels == label) & (reference_ids != query_ids[q])
        missed = reference_ids[same & ~torch.isin(reference_ids, retrieved)][:max_missed]
        rows.append(QueryRow(
            query=int(query_ids[q]), label=label,
            average_precision=float(results.average_precision_at_r[q]),
            retrieved=tuple(retrieved.tolist()),
            relevant=tuple(results.is_relevant[q, :top_k][kept].tolist()),
            missed=tuple(missed.tolist())))
    return rows


def _as_image(item: Tensor | np.ndarray) -> np.ndarray:
    """An image tensor ``(C, H, W)`` or ``(H, W)`` as ``(H, W, 3)`` floats in [0, 1]."""
    image = torch.as_tensor(item).detach().float().cpu()
    if image.ndim == 1:  # a flattened square image (digits as an MLP sees them)
        side = int(round(image.numel() ** 0.5))
        if side * side != image.numel():
            raise ValueError(f"cannot draw a flat item of {image.numel()} values as an image")
        image = image.reshape(side, side)
    if image.ndim == 3:
        image = image.permute(1, 2, 0)
    else:
        image = image.unsqueeze(-1)
    low, high = float(image.min()), float(image.max())
    image = (image - low) / (high - low) if high > low else torch.zeros_like(image)
    if image.shape[-1] == 1:
        image = image.expand(*image.shape[:2], 3)
    return image[..., :3].numpy()


def draw_worst_queries(
    rows: Sequence[QueryRow],
    image_of: Callable[[int], Tensor | np.ndarray],
    path: str | Path,
    class_names: Sequence[str] = (),
    max_missed: int = 3,
    title: str = "",
    tile: int = 96,
) -> Path:
    """Write a PNG grid: per row a query, its results (green right, red wrong), its misses.

    ``image_of(item_id)`` returns an image tensor ``(C, H, W)``, ``(H, W)`` or a flat
    square ``(H*W,)``; each is min-max scaled and resized to ``tile`` pixels a side. It may
    also return a text (image-caption retrieval: a caption among images), written into
    its tile. Drawn
    with PIL, a few milliseconds a picture (no plotting library). Returns the written path.

    Raises:
        ValueError: no rows.
    """
    if not rows:
        raise ValueError("no query to draw")
    columns = 1 + max(len(row.retrieved) for row in rows) + max_missed
    cell_w, cell_h, top = tile + 2 * _GAP, tile + _CAPTION + 2 * _GAP, _CAPTION + 2 * _GAP
    canvas = Image.new("RGB", (columns * cell_w, top + len(rows) * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((_GAP, _GAP), title or "worst queries: green right, red wrong, blue missed",
              fill="black")
    for r, row in enumerate(rows):
        y = top + r * cell_h
        cells = [(row.query, "black",
                  f"{_name(row.label, class_names)[:14]} {row.average_precision:.2f}")]
        cells += [(item, RIGHT if right else WRONG, f"#{c + 1}")
                  for c, (item, right) in enumerate(zip(row.retrieved, row.relevant,
                                                        strict=True))]
        cells += [(item, MISSED, "missed") for item in row.missed[:max_missed]]
        for c, (item, colour, caption) in enumerate(cells):
            x = c * cell_w
            draw.text((x + _GAP, y + _GAP), caption, fill="black")
            _paste(canvas, draw, image_of(item), (x + _GAP, y + _GAP + _CAPTION), tile, colour)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


_GAP, _CAPTION, _FRAME = 4, 12, 4   # pixels
_CHAR_WIDTH = 6                      # PIL's default bitmap font, pixels a character


def _paste(canvas: Image.Image, draw: ImageDraw.ImageDraw, item: Tensor | np.ndarray | str,
           corner: tuple[int, int], tile: int, colour: str) -> None:
    """``item`` scaled into a ``tile``-pixel square at ``corner`` (a text: written into it,
    as many lines as fit), framed in ``colour``."""
    x, y = corner
    if isinstance(item, str):
        _write_text(draw, item, corner, tile)
    else:
        pixels = (_as_image(item) * 255).round().astype(np.uint8)
        image = Image.fromarray(pixels)
        small = max(image.size) < tile // 2
        image = image.resize((tile, tile), Image.NEAREST if small else Image.BILINEAR)
        canvas.paste(image, corner)
    draw.rectangle((x, y, x + tile - 1, y + tile - 1), outline=colour, width=_FRAME)


def _write_text(draw: ImageDraw.ImageDraw, text: str, corner: tuple[int, int], tile: int) -> None:
    """A text (a caption among images) wrapped inside a tile, cut with "..." if too long."""
    inner = tile - 2 * (_FRAME + 1)
    width = max(inner // _CHAR_WIDTH, 1)
    lines = textwrap.wrap(" ".join(text.split()), width) or [""]
    fit = max(inner // _CAPTION, 1)
    if len(lines) > fit:
        lines = [*lines[: fit - 1], lines[fit - 1][: width - 3] + "..."]
    x, y = corner
    for n, line in enumerate(lines):
        draw.text((x + _FRAME + 1, y + _FRAME + 1 + n * _CAPTION), line, fill="black")


def _name(label: int, class_names: Sequence[str]) -> str:
    return str(class_names[label]) if 0 <= label < len(class_names) else str(label)


def worst_queries_markdown(
    rows: Sequence[QueryRow],
    text_of: Callable[[int], str],
    class_names: Sequence[str] = (),
    max_missed: int = 3,
) -> str:
    """The same content as :func:`draw_worst_queries` for text items, as a Markdown table."""
    lines = ["| query | label | AP@R | retrieved (✓ right, ✗ wrong) | missed |",
             "|---|---|---:|---|---|"]
    for row in rows:
        retrieved = "<br>".join(
            f"{'✓' if right else '✗'} {_cell(text_of(item))}"
            for item, right in zip(row.retrieved, row.relevant, strict=True))
        missed = "<br>".join(_cell(text_of(item)) for item in row.missed[:max_missed])
        lines.append(f"| {_cell(text_of(row.query))} | {_name(row.label, class_names)} | "
                     f"{row.average_precision:.2f} | {retrieved} | {missed} |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def write_worst_queries_markdown(rows: Sequence[QueryRow], texts: dict[int, str], path: str,
                                 class_names: Sequence[str] = (), max_missed: int = 3) -> Path:
    """:func:`worst_queries_markdown` of ``texts`` (item id -> text) written to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(worst_queries_markdown(rows, texts.__getitem__, class_names, max_missed))
    return path
