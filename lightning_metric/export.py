"""Embeddings and a FAISS index on disk: the shortest path from a trained model to a search.

``export_embeddings`` writes three files into a folder:

- ``embeddings.npy``: float32 ``(N, D)``, L2-normalised when the metric is cosine;
- ``labels.npy``: int64 ``(N,)``;
- ``index.faiss``: an exact FAISS index over the embeddings (inner product for
  cosine, L2 for euclidean), loadable with ``faiss.read_index``.

``search`` loads them back and returns the ``k`` nearest items of a query.
"""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

METRICS = ("cosine", "euclidean")


@torch.no_grad()
def embed(encoder: nn.Module, loader: DataLoader) -> tuple[Tensor, Tensor]:
    """Embeddings ``(N, D)`` and labels ``(N,)`` of every ``(x, label[, index])`` batch of
    ``loader``, in one process (see :func:`predict_embeddings` for a Trainer's devices)."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    embeddings, labels = [], []
    for inputs, batch_labels, *_ in loader:
        embeddings.append(encoder(inputs.to(device)).float().cpu())
        labels.append(batch_labels.cpu())
    encoder.train(was_training)
    return torch.cat(embeddings), torch.cat(labels)


def predict_embeddings(trainer: pl.Trainer, module: pl.LightningModule,
                       datamodule: pl.LightningDataModule) -> tuple[Tensor, Tensor]:
    """Embeddings ``(N, D)`` and labels ``(N,)`` of the datamodule's predict set, through
    ``trainer.predict``: under DDP each rank embeds its shard, and every rank gets all of
    them back in dataset order (padding's copies dropped), as one process would.

    The module's ``predict_step`` returns ``{"embeddings", "labels"[, "indices"]}``
    (``MetricLearningModule``'s does).
    """
    from .metrics import EmbeddingCollector

    outputs = trainer.predict(module, datamodule=datamodule, return_predictions=True)
    collector = EmbeddingCollector().to(module.device)
    for batch in outputs:
        collector.update(batch["embeddings"], batch["labels"], batch.get("indices"))
    embeddings, labels = collector.compute()
    return embeddings.cpu(), labels.cpu()


def export_embeddings(
    embeddings: Tensor, labels: Tensor, folder: str | Path, metric: str = "cosine"
) -> Path:
    """Write the embeddings, labels, FAISS index and ``export.json`` into ``folder``."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    if embeddings.ndim != 2 or len(embeddings) != len(labels):
        raise ValueError(
            f"embeddings must be (N, D) with N == len(labels), got {tuple(embeddings.shape)} "
            f"and {len(labels)} labels"
        )
    bad = int((~torch.isfinite(embeddings)).any(dim=1).sum())
    if bad:
        raise ValueError(f"{bad} embeddings contain NaN or inf: nothing was exported")
    vectors = embeddings.detach().float().cpu().numpy().copy()
    if metric == "cosine":
        faiss.normalize_L2(vectors)
    index = faiss.IndexFlatIP(vectors.shape[1]) if metric == "cosine" else faiss.IndexFlatL2(
        vectors.shape[1])
    index.add(vectors)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "embeddings.npy", vectors)
    np.save(folder / "labels.npy", labels.cpu().numpy().astype(np.int64))
    faiss.write_index(index, str(folder / "index.faiss"))
    (folder / "export.json").write_text(json.dumps({"metric": metric, "count": len(vectors)}))
    return folder


def search(folder: str | Path, query: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, ids)``, each ``(Q, k)``, of the nearest exported items to ``query`` ``(Q, D)``.

    Scores are cosine similarities (larger is closer) or squared L2 distances.
    """
    folder = Path(folder)
    missing = [n for n in ("index.faiss", "export.json") if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} holds no export (missing {missing})")
    index = faiss.read_index(str(folder / "index.faiss"))
    metric = json.loads((folder / "export.json").read_text())["metric"]
    query = np.ascontiguousarray(np.atleast_2d(query), dtype=np.float32)
    if query.shape[1] != index.d:
        raise ValueError(f"query has dimension {query.shape[1]}, the index has {index.d}")
    if metric == "cosine":
        faiss.normalize_L2(query)
    return index.search(query, min(k, index.ntotal))
