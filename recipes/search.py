"""Nearest neighbours of an exported item: ``python -m recipes.search EXPORT_DIR --query I``.

Loads ``index.faiss``, ``embeddings.npy`` and ``labels.npy`` written by
``recipes.export`` and prints the top-k neighbours of item ``I`` (itself excluded).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lightning_metric.export import search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--query", type=int, default=0, help="index of the query item")
    parser.add_argument("-k", type=int, default=5)
    args = parser.parse_args()
    embeddings = np.load(args.export_dir / "embeddings.npy")
    labels = np.load(args.export_dir / "labels.npy")
    if not 0 <= args.query < len(embeddings):
        parser.error(f"--query must be in [0, {len(embeddings)}), got {args.query}")
    scores, ids = search(args.export_dir, embeddings[args.query], k=args.k + 1)
    print(f"query {args.query} (label {labels[args.query]})")
    print("rank  item  label  score")
    neighbours = [(i, s) for i, s in zip(ids[0], scores[0], strict=True) if i != args.query]
    for rank, (item, score) in enumerate(neighbours[: args.k], start=1):
        print(f"{rank:>4}  {item:>4}  {labels[item]:>5}  {score:.4f}")


if __name__ == "__main__":
    main()
