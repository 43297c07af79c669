"""End to end: the real ``python -m recipes.train`` / ``recipes.eval`` commands in a subprocess."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy
import pytest
import torch
from conftest import REPO, SHARED_DATA
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, InstantiationException

from lightning_metric import builders

QUICK = ["trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.enable_model_summary=false",
         "callbacks.embedding_plot.on_test=false"]
WITH_PLOT = [*QUICK[:-1], "callbacks.embedding_plot.on_test=true"]


def run_recipe(run_dir: Path, *overrides: str, module: str = "recipes.train", check=True):
    env = {**os.environ, "LIGHTNING_METRIC_DATA": str(SHARED_DATA), "WANDB_API_KEY": "",
           "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    done = subprocess.run(
        [sys.executable, "-m", module, f"hydra.run.dir={run_dir}", *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{module} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def weights(checkpoint: Path) -> dict:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


@pytest.fixture(scope="module")
def triplet_run(tmp_path_factory) -> Path:
    """One run that two tests read: 3 epochs of triplet on digits with the test picture, an
    export, and both the CSV and the W&B (offline) loggers."""
    run_dir = tmp_path_factory.mktemp("triplet")
    three_epochs = [o for o in WITH_PLOT if not o.startswith("trainer.max_epochs")]
    run_recipe(run_dir, "loss=triplet", "data=digits", "export=true", "logger=[csv,wandb]",
               *three_epochs, "trainer.max_epochs=3")
    return run_dir


def test_triplet_on_digits_writes_config_checkpoints_logs_and_metrics(triplet_run, tmp_path):
    run_dir = triplet_run
    found = metrics(run_dir)
    assert found["test/precision_at_1"] > 0.8
    assert {"test/loss", "val/precision_at_1", "val/mean_average_precision_at_r"} <= set(found)
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["epoch"] == 2
    best = last["callbacks"][next(k for k in last["callbacks"] if "BestAndLast" in k)]
    assert best["monitor"] == "val/mean_average_precision_at_r"
    tested = json.loads((run_dir / "checkpoint.json").read_text())
    assert tested["monitor"] == "val/mean_average_precision_at_r"
    assert tested["path"] == str(Path(best["best_model_path"]).relative_to(run_dir))
    assert tested["score"] == pytest.approx(found["best/val/mean_average_precision_at_r"])
    assert list((run_dir / "csv").rglob("metrics.csv"))
    assert_is_a_real_picture(run_dir / "plots" / "test.png")

    eval_dir = tmp_path / "eval"
    run_recipe(eval_dir, f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "loss=triplet",
               "trainer.accelerator=cpu", "callbacks.embedding_plot.on_test=false",
               module="recipes.eval")
    assert metrics(eval_dir)["test/precision_at_1"] > 0.8

    exported = run_dir / "export"
    labels = numpy.load(exported / "labels.npy")
    assert numpy.load(exported / "embeddings.npy").shape == (len(labels), 128)
    searched = subprocess.run(
        [sys.executable, "-m", "recipes.search", str(exported), "--query", "5", "-k", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=True,
    ).stdout.splitlines()
    assert searched[0] == f"query 5 (label {labels[5]})"
    neighbour_labels = [int(line.split()[2]) for line in searched[2:]]
    assert len(neighbour_labels) == 3 and neighbour_labels.count(labels[5]) >= 2

    export_dir = tmp_path / "exported_again"
    run_recipe(tmp_path / "export_run", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
               "loss=triplet", f"export_dir={export_dir}", module="recipes.export")
    assert numpy.load(export_dir / "labels.npy").shape == labels.shape


def test_arcface_on_fashion_mnist_trains_hundreds_of_steps(tmp_path):
    run_recipe(tmp_path, "loss=arcface", "data=fmnist", "data.subset=30000", "data.download=false",
               *QUICK)
    found = metrics(tmp_path)
    assert found["test/precision_at_1"] > 0.7
    assert found["test/classification_accuracy"] > 0.7   # ArcFace's centres as a classifier
    state = weights(tmp_path / "checkpoints" / "last.ckpt")
    assert state["loss.W"].shape == (128, 10)


def test_mlp_takes_its_input_size_from_the_data(tmp_path):
    run_recipe(tmp_path, "model=mlp", "data=fmnist", "data.subset=1000", "data.download=false",
               "test=false", *QUICK)
    state = weights(tmp_path / "checkpoints" / "last.ckpt")
    assert state["encoder.net.0.weight"].shape == (256, 28 * 28)


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path):
    common = ["loss=arcface", "trainer.deterministic=true", "trainer.accelerator=cpu",
              "test=false", "trainer.enable_model_summary=false"]
    # the uninterrupted run keeps every epoch's checkpoint: its first one is where a run
    # stopped after one epoch resumes from
    run_recipe(tmp_path / "whole", *common, "trainer.max_epochs=2",
               "+callbacks.model_checkpoint.save_top_k=-1")
    first = tmp_path / "whole" / "checkpoints" / "epoch_000.ckpt"
    assert torch.load(first, weights_only=False)["epoch"] == 0
    run_recipe(tmp_path / "resumed", *common, "trainer.max_epochs=2", f"ckpt_path={first}")
    whole = weights(tmp_path / "whole" / "checkpoints" / "last.ckpt")
    resumed = weights(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    once = weights(first)
    assert not torch.equal(once["loss.W"], whole["loss.W"])
    for key, value in whole.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)
    # and it did resume: trained epoch 1 only (a deterministic run from scratch would also
    # end with the same weights)
    assert trained_epochs(tmp_path / "whole") == {0, 1}
    assert trained_epochs(tmp_path / "resumed") == {1}


def trained_epochs(run_dir: Path) -> set[int]:
    """The epochs whose training loss the run's CSV log holds."""
    (log,) = run_dir.rglob("metrics.csv")
    with log.open() as stream:
        return {int(row["epoch"]) for row in csv.DictReader(stream) if row["train/loss_epoch"]}


def test_bf16_mixed_precision_with_two_optimizers(tmp_path):
    run_recipe(tmp_path, "loss=arcface", "trainer.precision=bf16-mixed", *QUICK)
    assert metrics(tmp_path)["test/precision_at_1"] > 0.5
    state = weights(tmp_path / "checkpoints" / "last.ckpt")
    assert state["loss.W"].dtype == torch.float32
    assert torch.isfinite(state["loss.W"]).all()


def test_gradient_accumulation_steps_both_optimizers_every_n_batches(tmp_path):
    # digits: 1,442 training items -> 1,370 after validation (5%); random batches of 128 -> 11
    # batches (the last one short)
    run_recipe(tmp_path, "loss=arcface", "trainer.accumulate_grad_batches=3", *QUICK)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    steps = [int(state["step"]) for optimizer in checkpoint["optimizer_states"]
             for state in optimizer["state"].values()]
    assert len(checkpoint["optimizer_states"]) == 2
    assert set(steps) == {4}  # ceil(11 / 3): the last, partial group steps too


def test_wandb_logger_runs_offline_into_a_syncable_folder(triplet_run):
    runs = list((triplet_run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    logged = list(runs[0].rglob("media/images/embeddings/*.png"))
    assert len(logged) == 1
    assert_is_a_real_picture(logged[0])


def assert_is_a_real_picture(path: Path) -> None:
    """A PNG of plausible size with many colours: a scatter plot, not a blank canvas."""
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 300
    colours = numpy.unique((image[..., :3] * 255).astype(int).reshape(-1, 3), axis=0)
    assert len(colours) > 50


def test_a_bad_config_stops_the_command_naming_the_setting(tmp_path):
    done = run_recipe(tmp_path, "data=fmnist", "data.data_dir=/nonexistent/fmnist",
                      "data.download=false", *QUICK, check=False)
    assert done.returncode != 0
    assert "data_dir='/nonexistent/fmnist'" in done.stderr + done.stdout
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["data.m_per_class=5"], InstantiationException,   # a ValueError, Hydra-wrapped
         "data.batch_size (128) must be a multiple of data.m_per_class (5)"),
        (["loss=arcface", "loss.num_classes=3"], ValueError,
         "loss.num_classes=3 is smaller than the 10"),
        (["loss=no_such_loss"], ConfigCompositionException,
         "Could not find 'loss/no_such_loss'"),
    ],
)
def test_bad_config_fails_at_setup_naming_the_setting(tmp_path, overrides, error, message):
    """The same checks as the command's (above), in this process: the recipe's own
    composition and builders, stopped before any training step."""
    builders.register_resolvers()
    with pytest.raises(error) as raised:
        with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[*overrides, *QUICK, "logger=none",
                                              f"trainer.default_root_dir={tmp_path}",
                                              f"callbacks.model_checkpoint.dirpath={tmp_path}"])
        datamodule, module, trainer = builders.build_run(cfg)
        trainer.fit(module, datamodule=datamodule)
    assert message in str(raised.value)
    assert not list(tmp_path.glob("*.ckpt"))
