"""Embeddings and a FAISS index on disk: the shortest path from a trained model to a search.

``export_embeddings`` writes three files into a folder:

- ``embeddings.npy``: float32 ``(N, D)``, L2-normalised when the metric is cosine;
- ``labels.npy``: int64 ``(N,)``;
- ``index.faiss``: an exact FAISS index over the embeddings (inner product for
  cosine, L2 for euclidean), loadable with ``faiss.read_index``.

``search`` loads them back and returns the ``k`` nearest items of a query.

:func:`predict_manifest` embeds every row of a manifest (new items, labelled or not) with a
trained encoder and writes the same files, plus ``items.csv``: the manifest's rows in the
embeddings' order (row ``i`` is embedding ``i``), which ``recipes.search`` prints next to
the neighbours. Its labels are the class ids of the checkpoint's class list, ``-1`` where a
row has no label or one the checkpoint never saw.

Example::

    >>> encoder = build_encoder(cfg)
    >>> checkpoint = read_checkpoint("run/checkpoints/last.ckpt")
    >>> load_encoder_weights(encoder, checkpoint, "run/checkpoints/last.ckpt")
    >>> found = predict_manifest(encoder, "new.csv", "new_predict", transform=eval_transform,
    ...                          class_names=checkpoint_class_names(checkpoint))
    >>> found.embeddings.shape, found.labels[:3]
    (torch.Size([120, 128]), tensor([ 2, -1,  0]))
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import move_data_to_device
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .data.format_check import BOX_COLUMNS, Manifest, parse_manifest, raise_problems, read_table
from .data.items import TextCollate
from .data.manifest import manifest_dataset
from .module import MetricLearningModule

METRICS = ("cosine", "euclidean")
ITEMS_FILE = "items.csv"
_PREDICT_COLUMNS = ("path", "text", *BOX_COLUMNS)
"""Manifest columns prediction reads: problems elsewhere (labels, splits, flags) don't stop it."""


@torch.no_grad()
def embed(model: nn.Module, loader: DataLoader) -> tuple[Tensor, Tensor]:
    """Embeddings ``(N, D)`` float32 and labels ``(N,)`` of every batch of ``loader``, in
    the loader's order, in one process on the model's device (see
    :func:`predict_embeddings` for a Trainer's devices).

    Args:
        model: a :class:`~lightning_metric.MetricLearningModule` (its encoder embeds) or an
            encoder, ``inputs -> (B, D)``; put in eval mode for the pass, then restored.
        loader: ``(inputs, labels[, indices])`` batches; ``inputs`` a tensor (images) or a
            dict of tensors (a tokenizer's batch), moved to the model's device.

    Returns:
        ``(embeddings, labels)`` on the CPU; both empty when the loader is.
    """
    encoder = model.encoder if isinstance(model, MetricLearningModule) else model
    was_training = encoder.training
    encoder.eval()
    parameter = next(encoder.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    embeddings, labels = [], []
    try:
        for inputs, batch_labels, *_ in loader:
            embeddings.append(encoder(move_data_to_device(inputs, device)).float().cpu())
            labels.append(batch_labels.cpu())
    finally:
        encoder.train(was_training)
    if not embeddings:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
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
    """Write the embeddings, labels, FAISS index and ``export.json`` into ``folder``.

    Args:
        embeddings: ``(N, D)``; written as float32, L2-normalised when ``metric="cosine"``.
        labels: ``(N,)`` integer class ids (``-1``: none).
        folder: created if needed; files already there are replaced.
        metric: ``cosine`` (inner-product index) or ``euclidean`` (L2 index).

    Raises:
        ValueError: an unknown metric, shapes that disagree, NaN or inf embeddings (nothing
            is written then).
    """
    if embeddings.ndim != 2 or len(embeddings) != len(labels):
        raise ValueError(
            f"embeddings must be (N, D) with N == len(labels), got {tuple(embeddings.shape)} "
            f"and {len(labels)} labels"
        )
    folder = _write_export(index_vectors(embeddings, metric), labels, folder, metric)
    (folder / ITEMS_FILE).unlink(missing_ok=True)  # a predict folder's rows: no longer these
    return folder


def index_vectors(embeddings: Tensor, metric: str = "cosine") -> np.ndarray:
    """The float32 ``(N, D)`` array an export writes and indexes: ``embeddings``,
    L2-normalised when ``metric="cosine"``.

    Raises:
        ValueError: ``metric`` not in :data:`METRICS`; NaN or inf embeddings (with the count).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    bad = int((~torch.isfinite(embeddings)).any(dim=1).sum())
    if bad:
        raise ValueError(f"{bad} embeddings contain NaN or inf: nothing was exported")
    vectors = np.ascontiguousarray(embeddings.detach().float().cpu().numpy().copy())
    if metric == "cosine":
        faiss.normalize_L2(vectors)
    return vectors


def _write_export(vectors: np.ndarray, labels: Tensor, folder: str | Path,
                  metric: str) -> Path:
    """``embeddings.npy``, ``labels.npy``, ``index.faiss`` and ``export.json`` of ``vectors``
    (already :func:`index_vectors`) into ``folder``."""
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
        raise ValueError(f"query has dimension {query.shape[1]}, the index has {index.d} "
                         f"({folder / 'index.faiss'}): embed the query with the model of "
                         "that export")
    if metric == "cosine":
        faiss.normalize_L2(query)
    return index.search(query, min(k, index.ntotal))


# -- an export read back --------------------------------------------------------------------

@dataclass(frozen=True)
class Export:
    """An export folder read back and checked (``N`` items of dimension ``D``).

    Attributes:
        folder: the folder.
        embeddings: float32 ``(N, D)`` (``embeddings.npy``).
        labels: int64 ``(N,)`` (``labels.npy``; ``-1``: no known class).
        metric: ``cosine`` or ``euclidean`` (``export.json``).
        items: the rows of ``items.csv`` (a predict folder), all cells strings; None for a
            test-set export.
    """

    folder: Path
    embeddings: np.ndarray
    labels: np.ndarray
    metric: str
    items: pd.DataFrame | None = None


def read_export(folder: str | Path) -> Export:
    """Read an export (or predict) folder, checking that its files agree.

    Raises:
        FileNotFoundError: a file of the export is missing (all missing ones named).
        ValueError: the files disagree: row counts of embeddings, labels, items and index,
            or the embeddings' dimension and the index's (files of different runs).
    """
    folder = Path(folder)
    names = ("embeddings.npy", "labels.npy", "index.faiss", "export.json")
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"export_dir={str(folder)!r} holds no export (missing "
                                f"{missing}): write one with recipes.export or recipes.predict")
    embeddings = np.load(folder / "embeddings.npy")
    labels = np.load(folder / "labels.npy")
    index = faiss.read_index(str(folder / "index.faiss"))
    metric = json.loads((folder / "export.json").read_text())["metric"]
    items = None
    if (folder / ITEMS_FILE).is_file():
        items = pd.read_csv(folder / ITEMS_FILE, dtype=str, keep_default_na=False)
    counts = {"embeddings.npy": len(embeddings), "labels.npy": len(labels),
              "index.faiss": index.ntotal, **({ITEMS_FILE: len(items)} if items is not None
                                              else {})}
    if len(set(counts.values())) > 1 or embeddings.ndim != 2 or embeddings.shape[1] != index.d:
        raise ValueError(
            f"export_dir={str(folder)!r}: its files disagree (rows {counts}; embeddings.npy "
            f"of shape {embeddings.shape}, index.faiss of dimension {index.d}): files of "
            "different exports? export again into an empty folder")
    return Export(folder, embeddings, labels, metric, items)


# -- a checkpoint's encoder and classes ----------------------------------------------------

def read_checkpoint(ckpt_path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint (``torch.load`` on the CPU) holding a module's ``state_dict``.

    Raises:
        FileNotFoundError: ``ckpt_path`` is not a file.
        ValueError: the file holds no ``state_dict`` (not a Lightning checkpoint).
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={str(ckpt_path)!r} is not a file")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"),
                                                             Mapping):
        raise ValueError(f"ckpt_path={str(ckpt_path)!r} holds no 'state_dict': not a "
                         "checkpoint of recipes.train (or of a MetricLearningModule)")
    return dict(checkpoint)


def load_encoder_weights(encoder: nn.Module, checkpoint: Mapping[str, Any],
                         ckpt_path: str | os.PathLike = "") -> None:
    """Load the ``encoder.*`` weights of a :class:`~lightning_metric.MetricLearningModule`
    checkpoint into ``encoder`` (the loss's weights are not needed to embed).

    Raises:
        ValueError: the weights do not fit the encoder (missing, unexpected or mis-shaped
            keys, listed): the model settings differ from the run's (``model=``,
            ``model.name``, ``model.embedding_size`` ...).
    """
    state = {key[len("encoder."):]: value for key, value in checkpoint["state_dict"].items()
             if key.startswith("encoder.")}
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [f"{key} {tuple(state[key].shape)} != {tuple(expected[key].shape)}"
                 for key in sorted(set(state) & set(expected))
                 if tuple(state[key].shape) != tuple(expected[key].shape)]
    if missing or unexpected or misshaped:
        problems = [f"{label} {keys[:5]}{' ...' if len(keys) > 5 else ''} ({len(keys)})"
                    for label, keys in (("missing", missing), ("unexpected", unexpected),
                                        ("of another shape (checkpoint != model)", misshaped))
                    if keys]
        raise ValueError(
            f"ckpt_path={str(ckpt_path)!r} does not fit the configured "
            f"{type(encoder).__name__}: encoder keys " + "; ".join(problems) + ". Pass the "
            "run's model settings (model=..., model.name, model.embedding_size ...: its "
            ".hydra/overrides.yaml)")
    encoder.load_state_dict(state, strict=True)


def checkpoint_class_names(checkpoint: Mapping[str, Any]) -> tuple[str, ...]:
    """The class list a checkpoint trained on: ``class_names`` of the DataModule state
    Lightning saved (under the DataModule class's name); empty when there is none (data
    held in memory, or a bare ``state_dict``)."""
    for value in checkpoint.values():
        if isinstance(value, Mapping) and isinstance(value.get("class_names"), list | tuple):
            return tuple(str(name) for name in value["class_names"])
    return ()


# -- embedding new items: every row of a manifest --------------------------------------------

@dataclass(frozen=True)
class Predictions:
    """The embedded rows of a manifest, in its order (``N`` rows, dimension ``D``).

    Attributes:
        embeddings: float32 ``(N, D)``, L2-normalised under the cosine metric: exactly what
            ``embeddings.npy`` holds.
        labels: int64 ``(N,)``: the class id of each row's label in the checkpoint's class
            list, ``-1`` where the row has no label or one the list lacks.
        items: the manifest's rows and columns as read (CSV/TSV cells as strings).
        kind: ``image`` or ``text``.
        unlabelled: rows without a label.
        unknown: labels the class list lacks, with their row counts.
    """

    embeddings: Tensor
    labels: Tensor
    items: pd.DataFrame
    kind: str
    unlabelled: int = 0
    unknown: dict[str, int] = field(default_factory=dict)

    def summary(self, folder: str | Path | None = None) -> str:
        """What was embedded (and written into ``folder``), and how many labels are ``-1``."""
        n, dim = self.embeddings.shape
        lines = [f"embedded {n} {self.kind} items into {dim}-d vectors"
                 + (f" -> {folder}: embeddings.npy, {ITEMS_FILE}, labels.npy, index.faiss, "
                    "export.json" if folder is not None else "")]
        unseen_rows, unseen = sum(self.unknown.values()), sorted(self.unknown)
        known = n - self.unlabelled - unseen_rows
        lines.append(
            f"labels: {known} rows of the checkpoint's classes; -1 for {self.unlabelled} rows "
            f"without a label and {unseen_rows} rows whose label the checkpoint never saw"
            + (f" ({len(unseen)} labels: {unseen[:10]}{' ...' if len(unseen) > 10 else ''})"
               if unseen else ""))
        return "\n".join(lines)


def read_items(path: str | os.PathLike, root: str | os.PathLike | None = None,
               check_files: bool = True) -> tuple[Manifest, pd.DataFrame]:
    """A manifest to embed: the parsed rows and its table as read. The ``label`` column may
    be absent or have empty cells; ``split`` and the query/gallery columns are not used.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: no ``path`` / ``text`` column, empty paths or texts, bad crop boxes,
            missing or unreadable images (``check_files``): every problem, by line,
            naming ``data.path``.
    """
    manifest = parse_manifest(path, root, check_files=check_files, require_label=False)
    problems = [problem for problem in manifest.problems
                if problem.column is None or problem.column in _PREDICT_COLUMNS]
    raise_problems(problems, f"data.path={str(path)!r}")
    table, _, _ = read_table(Path(path))
    return manifest, table


def class_ids(labels: Sequence[str | None], class_names: Sequence[str]) -> Tensor:
    """``(N,)`` int64 id of each label in ``class_names``; ``-1`` for None and unknown labels."""
    ids = {name: index for index, name in enumerate(class_names)}
    return torch.tensor([ids.get(label, -1) if label is not None else -1 for label in labels],
                        dtype=torch.long)


def predict_manifest(
    model: nn.Module,
    path: str | os.PathLike,
    folder: str | os.PathLike | None = None,
    *,
    class_names: Sequence[str] = (),
    root: str | os.PathLike | None = None,
    transform: Any = None,
    tokenizer: Any = None,
    max_length: int = 128,
    batch_size: int = 512,
    num_workers: int = 0,
    metric: str = "cosine",
    check_files: bool = True,
) -> Predictions:
    """Embed every row of a manifest, whatever its ``split``, in the manifest's order, and
    (with ``folder``) write ``embeddings.npy``, ``labels.npy``, ``index.faiss``,
    ``export.json`` and ``items.csv`` (the rows, as CSV) there.

    Args:
        model: a :class:`~lightning_metric.MetricLearningModule` or an encoder, on the
            device to embed on (see :func:`embed`).
        path: the manifest (``.csv``, ``.tsv``, ``.parquet``): ``path`` or ``text``, and
            optionally ``label`` (any other column is kept in ``items.csv``).
        folder: where to write the files (None: write nothing).
        class_names: the checkpoint's classes (:func:`checkpoint_class_names`): label ``i``
            of ``labels.npy`` is ``class_names[i]``.
        root: folder the ``path`` column is relative to (default: the manifest's folder).
        transform: ``uint8 (3, H, W) -> input`` of the images: the run's eval transform.
        tokenizer, max_length: for texts, the encoder's tokenizer and the tokens kept.
        batch_size, num_workers: the loader's.
        metric: ``cosine`` (embeddings L2-normalised) or ``euclidean``.
        check_files: open every image's header first (missing, unreadable files).

    Returns:
        :class:`Predictions`: the embeddings as written, labels, rows and label counts.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: a bad manifest (every problem, naming ``data.path``); texts without a
            tokenizer or images with one (``model=``); a bad ``metric``; NaN embeddings.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    manifest, table = read_items(path, root, check_files)
    _check_kind(manifest.kind, tokenizer, path)
    labels = class_ids(manifest.labels, class_names)
    options: dict[str, Any] = {"batch_size": batch_size, "num_workers": num_workers}
    if manifest.kind == "text":
        options["collate_fn"] = TextCollate(tokenizer, max_length)
    loader = DataLoader(manifest_dataset(manifest, labels, transform), shuffle=False, **options)
    embeddings, _ = embed(model, loader)
    vectors = index_vectors(embeddings, metric)
    given = [label for label in manifest.labels if label is not None]
    known = set(class_names)
    predictions = Predictions(
        torch.from_numpy(vectors), labels, table, manifest.kind,
        unlabelled=len(manifest.labels) - len(given),
        unknown=dict(Counter(label for label in given if label not in known)))
    if folder is not None:
        write_predictions(predictions, folder, metric)
    return predictions


def _check_kind(kind: str, tokenizer: Any, path: str | os.PathLike) -> None:
    if kind == "text" and tokenizer is None:
        raise ValueError(f"data.path={str(path)!r} lists texts (a 'text' column), which need "
                         "a text model with a tokenizer: model=hf_text (the run's model)")
    if kind == "image" and tokenizer is not None:
        raise ValueError(f"data.path={str(path)!r} lists image files (a 'path' column), but "
                         "the model is a text model (it has a tokenizer): pass the run's "
                         "model=... (an image model)")


def write_predictions(predictions: Predictions, folder: str | os.PathLike,
                      metric: str = "cosine") -> Path:
    """The files of an export (``predictions.embeddings`` written as they are) and
    ``items.csv`` into ``folder``.

    Raises:
        ValueError: an unknown ``metric``.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    vectors = np.ascontiguousarray(predictions.embeddings.numpy(), dtype=np.float32)
    folder = _write_export(vectors, predictions.labels, folder, metric)
    predictions.items.to_csv(folder / ITEMS_FILE, index=False)
    return folder
