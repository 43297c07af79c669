"""Hard-negative synthesis for MarginMSE: (query, positive) pairs in, (query, pos, neg, margin) out.

A teacher encoder embeds every query, positive and corpus text once (L2-normalised, so
inner product is cosine similarity); a FAISS inner-product index over the corpus finds,
for each query, its ``top_k`` most similar corpus texts that are neither one of its
positives nor the query itself (texts compared with case and runs of whitespace
ignored), and ``num_negatives`` of them become its hard negatives. Every
(query, positive, negative) is labelled with the teacher's margin
``cos(q, pos) - cos(q, neg)``, the target :class:`~lightning_metric.losses.MarginMSELoss`
regresses the student's margin onto (Hofstätter et al. 2020, "Improving Efficient Neural
Ranking Models with Cross-Architecture Knowledge Distillation"). The written table has the
columns ``query, pos, neg, margin``::

    python -m recipes.train data=pairs data.path=triplets.tsv model=hf_text \\
      'data.fields={query: query, pos: pos, neg: neg}' data.target=margin loss=margin_mse

Example::

    >>> teacher = HFTextEncoder("/path/to/all-MiniLM-L6-v2")
    >>> pairs = read_pairs("pairs.tsv", query="question", positive="answer")
    >>> triplets = synthesize(teacher, pairs, num_negatives=3)
    >>> write_triplets(triplets, "triplets.tsv"); print(triplets.summary)
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .data.format_check import raise_problems
from .data.pair_table import read_pair_file

SAMPLING = ("top", "random")
OUTPUT_COLUMNS = ("query", "pos", "neg", "margin")
OUTPUT_TYPES = {".tsv": "\t", ".csv": ",", ".jsonl": None}


@dataclass
class Pairs:
    """Distinct (query, positive) pairs in file order, and the file they came from."""

    queries: list[str]
    positives: list[str]
    source: str
    duplicates: int = 0
    """Rows repeating an earlier (query, positive) pair, left out."""

    def __len__(self) -> int:
        return len(self.queries)


@dataclass
class Summary:
    """What :func:`synthesize` did, counted."""

    queries: int
    pairs: int
    corpus: int
    rows: int = 0
    """(query, pos, neg) rows written: every pair of a query times its negatives."""
    negatives: int = 0
    """(query, negative) pairs mined."""
    no_negative: int = 0
    """Queries without a negative in their top ``top_k`` (their pairs are not written)."""
    short: int = 0
    """Queries with fewer than ``num_negatives`` negatives (a small corpus)."""
    was_positive: int = 0
    """Candidates passed over for being a positive of the query."""
    was_query: int = 0
    """Candidates passed over for being the query itself."""
    duplicates: int = 0
    top_k: int = 0
    num_negatives: int = 0

    def __str__(self) -> str:
        return (f"synthesize: {self.queries} queries ({self.pairs} pairs), a corpus of "
                f"{self.corpus} texts: {self.rows} (query, pos, neg) rows with "
                f"{self.negatives} negatives; skipped: {self.no_negative} queries without a "
                f"negative in their top {self.top_k} (not written), {self.short} queries with "
                f"fewer than {self.num_negatives} negatives, {self.was_positive} candidates "
                f"that were a positive of the query, {self.was_query} that were the query, "
                f"{self.duplicates} duplicate pairs")


@dataclass
class Triplets:
    """The synthesised rows: ``query[i], pos[i], neg[i]`` and the teacher's ``margin[i]``."""

    query: list[str] = field(default_factory=list)
    pos: list[str] = field(default_factory=list)
    neg: list[str] = field(default_factory=list)
    margin: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float64))
    summary: Summary | None = None

    def __len__(self) -> int:
        return len(self.query)


def text_key(text: str) -> str:
    """What two texts must share to be "the same text": case and whitespace runs ignored."""
    return " ".join(text.split()).casefold()


def read_pairs(path: str | os.PathLike, query: str = "query", positive: str = "pos",
               setting: str = "pairs") -> Pairs:
    """The distinct (query, positive) pairs of a CSV / TSV / JSON Lines / Parquet file.

    Args:
        path: the file.
        query, positive: the columns holding the queries and their positives.
        setting: the config group messages name (``pairs.path``, ``pairs.query`` ...).

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unreadable file, a missing column (named, with the columns found), no
            rows, empty texts (every one by line and column).
    """
    table = read_pair_file(path, {"query": query, "positive": positive}, setting=setting,
                           check_files=False, field_settings={
                               "query": f"{setting}.query", "positive": f"{setting}.positive"})
    raise_problems(table.problems, f"{setting}.path={str(path)!r}")
    seen: dict[tuple[str, str], None] = {}
    for pair in zip(*table.values, strict=True):
        seen.setdefault(pair, None)
    queries = [q for q, _ in seen]
    positives = [p for _, p in seen]
    return Pairs(queries, positives, str(path), duplicates=len(table) - len(seen))


def read_corpus(path: str | os.PathLike, column: str = "text",
                setting: str = "corpus") -> list[str]:
    """The texts of one column of a file, in file order (duplicates kept: see
    :func:`synthesize`).

    Raises:
        FileNotFoundError, ValueError: as :func:`read_pairs`.
    """
    table = read_pair_file(path, {"text": column}, setting=setting, check_files=False,
                           field_settings={"text": f"{setting}.column"})
    raise_problems(table.problems, f"{setting}.path={str(path)!r}")
    return [str(text) for text in table.values[0]]


def embed_texts(encoder: nn.Module, texts: Sequence[str], batch_size: int = 64,
                device: torch.device | str = "cpu", max_length: int | None = None,
                progress: bool = True) -> np.ndarray:
    """``(N, D)`` float32 L2-normalised embeddings of ``texts`` by a text encoder (one with
    a Hugging Face ``.tokenizer``, such as :class:`~lightning_metric.backbones.HFTextEncoder`),
    in eval mode, longest texts first (less padding), in batches of ``batch_size``.

    Raises:
        ValueError: the encoder has no tokenizer (an image model), a bad ``batch_size``.
    """
    tokenizer = getattr(encoder, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"the teacher {type(encoder).__name__} has no tokenizer: synthesis "
                         "embeds texts, use a text model (model=hf_text)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    max_length = max_length or getattr(encoder, "max_length", None) or 128
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    vectors: np.ndarray | None = None
    encoder = encoder.to(device).eval()
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc="embedding", unit="batch",
                          disable=not progress):
            chosen = order[start:start + batch_size]
            tokens = tokenizer([texts[i] for i in chosen], padding=True, truncation=True,
                               max_length=max_length, return_tensors="pt")
            out = encoder({k: v.to(device) for k, v in tokens.items()}).float()
            out = torch.nn.functional.normalize(out, dim=1).cpu().numpy()
            if vectors is None:
                vectors = np.empty((len(texts), out.shape[1]), dtype=np.float32)
            vectors[chosen] = out
    return vectors if vectors is not None else np.zeros((0, 0), dtype=np.float32)


def synthesize(teacher: nn.Module, pairs: Pairs, corpus: Sequence[str] | None = None,
               num_negatives: int = 3, top_k: int = 20, sampling: str = "top", seed: int = 0,
               batch_size: int = 64, device: torch.device | str = "cpu",
               max_length: int | None = None, progress: bool = True) -> Triplets:
    """Mine hard negatives for every query and label each (query, pos, neg) with the teacher.

    Args:
        teacher: a text encoder (:func:`embed_texts`); its embeddings are L2-normalised.
        pairs: the (query, positive) pairs (:func:`read_pairs`).
        corpus: the texts negatives come from (duplicates, equal up to case and whitespace,
            kept once); None: the pairs' positives.
        num_negatives: negatives a query (``>= 1``).
        top_k: how deep to look: the ``top_k`` corpus texts most similar to the query that
            are neither one of its positives nor the query (``>= num_negatives``).
        sampling: ``top`` (the ``num_negatives`` most similar of them, the hardest) or
            ``random`` (drawn from them, seeded by ``seed``).
        batch_size: texts the teacher embeds at once.
        device: where the teacher runs.
        max_length: tokens kept per text (None: the teacher's ``max_length``, else 128).
        progress: tqdm progress bars.

    Returns:
        One row per (pair, negative of its query), in the pairs' order, the negatives of a
        query most similar first; ``margin = cos(q, pos) - cos(q, neg)`` (float64 of the
        float32 embeddings). ``.summary`` counts what was written and skipped.

    Raises:
        ValueError: a bad setting (named, with its value), no pairs, an empty corpus.
    """
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    if top_k < num_negatives:
        raise ValueError(f"top_k ({top_k}) must be >= num_negatives ({num_negatives}): "
                         "negatives are chosen from the top_k candidates")
    if sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {list(SAMPLING)}, got {sampling!r}")
    if not len(pairs):
        raise ValueError(f"{pairs.source}: no (query, positive) pairs")
    corpus = _distinct(pairs.positives if corpus is None else corpus)
    if not corpus:
        raise ValueError("the corpus is empty: no negatives to mine")
    queries = list(dict.fromkeys(pairs.queries))
    positives_of: dict[str, set[str]] = {}
    for query, positive in zip(pairs.queries, pairs.positives, strict=True):
        positives_of.setdefault(query, set()).add(text_key(positive))
    texts = list(dict.fromkeys([*queries, *pairs.positives, *corpus]))
    row_of = {text: row for row, text in enumerate(texts)}
    vectors = embed_texts(teacher, texts, batch_size, device, max_length, progress)
    query_rows = np.array([row_of[q] for q in queries])
    corpus_rows = np.array([row_of[c] for c in corpus])
    summary = Summary(len(queries), len(pairs), len(corpus), duplicates=pairs.duplicates,
                      top_k=top_k, num_negatives=num_negatives)
    negatives = _mine(vectors[query_rows], vectors[corpus_rows], queries, corpus, positives_of,
                      num_negatives, top_k, sampling, seed, summary, progress)
    triplets = Triplets(summary=summary)
    for query, positive in zip(pairs.queries, pairs.positives, strict=True):
        for negative in negatives[query]:
            triplets.query.append(query)
            triplets.pos.append(positive)
            triplets.neg.append(negative)
    q, p, n = (vectors[[row_of[t] for t in column]].astype(np.float64)
               for column in (triplets.query, triplets.pos, triplets.neg))
    triplets.margin = (q * p).sum(1) - (q * n).sum(1)
    summary.rows = len(triplets)
    return triplets


def _distinct(texts: Sequence[str]) -> list[str]:
    """The texts, each :func:`text_key` once (its first spelling), in order."""
    first: dict[str, str] = {}
    for text in texts:
        first.setdefault(text_key(text), text)
    return list(first.values())


def _mine(query_vectors: np.ndarray, corpus_vectors: np.ndarray, queries: list[str],
          corpus: list[str], positives_of: dict[str, set[str]], num_negatives: int,
          top_k: int, sampling: str, seed: int, summary: Summary,
          progress: bool) -> dict[str, list[str]]:
    """Each query's negatives, most similar first (see :func:`synthesize`)."""
    import faiss

    index = faiss.IndexFlatIP(corpus_vectors.shape[1])
    index.add(np.ascontiguousarray(corpus_vectors, dtype=np.float32))
    corpus_keys = [text_key(text) for text in corpus]
    generator = np.random.default_rng(seed)
    negatives: dict[str, list[str]] = {}
    chunk = 1024
    for start in tqdm(range(0, len(queries), chunk), desc="mining", unit="chunk",
                      disable=not progress):
        block = queries[start:start + chunk]
        # the corpus holds each key once: at most one hit a positive, one the query itself
        depth = min(len(corpus), top_k + 1 + max(len(positives_of[q]) for q in block))
        _, found = index.search(np.ascontiguousarray(query_vectors[start:start + chunk]), depth)
        for query, hits in zip(block, found, strict=True):
            own, positives = text_key(query), positives_of[query]
            candidates = []
            for hit in hits:
                if hit < 0 or len(candidates) == top_k:
                    break
                key = corpus_keys[hit]
                if key in positives:
                    summary.was_positive += 1
                elif key == own:
                    summary.was_query += 1
                else:
                    candidates.append(int(hit))
            if sampling == "random" and len(candidates) > num_negatives:
                chosen = np.sort(generator.choice(len(candidates), num_negatives, replace=False))
                candidates = [candidates[i] for i in chosen]
            negatives[query] = [corpus[i] for i in candidates[:num_negatives]]
            summary.negatives += len(negatives[query])
            summary.no_negative += not negatives[query]
            summary.short += 0 < len(negatives[query]) < num_negatives
    return negatives


def write_triplets(triplets: Triplets, path: str | os.PathLike) -> Path:
    """Write ``query, pos, neg, margin`` rows to a .tsv / .csv (quoted as the csv module
    does: texts may hold tabs, quotes and newlines) or .jsonl file; folders are made.

    Raises:
        ValueError: another file type.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_TYPES:
        raise ValueError(f"output={str(path)!r} must end in one of {list(OUTPUT_TYPES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = zip(triplets.query, triplets.pos, triplets.neg,
               (float(m) for m in triplets.margin), strict=True)
    with open(path, "w", newline="", encoding="utf-8") as stream:
        if OUTPUT_TYPES[suffix] is None:
            for row in rows:
                stream.write(json.dumps(dict(zip(OUTPUT_COLUMNS, row, strict=True)),
                                        ensure_ascii=False) + "\n")
        else:
            writer = csv.writer(stream, delimiter=OUTPUT_TYPES[suffix], lineterminator="\n")
            writer.writerow(OUTPUT_COLUMNS)
            writer.writerows((q, p, n, repr(m)) for q, p, n, m in rows)
    return path

