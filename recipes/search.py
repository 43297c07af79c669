"""Nearest neighbours of an exported item: ``python -m recipes.search EXPORT_DIR --query I``.

Loads ``index.faiss``, ``embeddings.npy`` and ``labels.npy`` written by ``recipes.export``
or ``recipes.predict`` and prints the top-k neighbours of item ``I`` (itself excluded):
rank, item id, label (``-1``: none), score. A predict folder's ``items.csv`` adds each
item's row: its ``path`` or ``text``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from lightning_metric.export import read_export, search

SHOWN_CHARACTERS = 100
"""Longer texts are cut to this many characters."""


def describe(items: pd.DataFrame | None, item: int) -> str:
    """Row ``item`` of ``items.csv`` in a line: its ``path`` or ``text`` (else every cell)."""
    if items is None:
        return ""
    row = items.iloc[item]
    for column in ("path", "text"):
        if column in items.columns:
            value = " ".join(str(row[column]).split())
            break
    else:
        value = ", ".join(f"{key}={cell}" for key, cell in row.items())
    return value if len(value) <= SHOWN_CHARACTERS else value[: SHOWN_CHARACTERS - 3] + "..."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--query", type=int, default=0, help="index of the query item")
    parser.add_argument("-k", type=int, default=5)
    args = parser.parse_args()
    if args.k < 1:
        parser.error(f"-k must be at least 1, got {args.k}")
    try:
        exported = read_export(args.export_dir)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    embeddings, labels, items = exported.embeddings, exported.labels, exported.items
    if not 0 <= args.query < len(embeddings):
        parser.error(f"--query must be in [0, {len(embeddings)}), got {args.query}")
    scores, ids = search(args.export_dir, embeddings[args.query], k=args.k + 1)
    shown = describe(items, args.query)
    print(f"query {args.query} (label {labels[args.query]})" + (f": {shown}" if shown else ""))
    column = "" if items is None else "  " + next(
        (name for name in ("path", "text") if name in items.columns), "row")
    print("rank  item  label  score" + column)
    neighbours = [(i, s) for i, s in zip(ids[0], scores[0], strict=True)
                  if i != args.query and i >= 0]
    for rank, (item, score) in enumerate(neighbours[: args.k], start=1):
        shown = describe(items, item)
        print(f"{rank:>4}  {item:>4}  {labels[item]:>5}  {score:.4f}"
              + (f"  {shown}" if shown else ""))


if __name__ == "__main__":
    main()
