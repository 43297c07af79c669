"""The loss comparison (recipes.compare): its many-classes data, its plan, the choice on
validation, the table and, end to end, the real command on a tiny budget."""

import csv
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
from conftest import REPO, SHARED_DATA

from lightning_metric.comparison import Cell, ComparisonPlan, best_job, run_multirun
from lightning_metric.comparison.report import markdown_table, mean_and_std
from lightning_metric.comparison.runner import DONE_FILE, CellResult
from lightning_metric.data import FashionMNISTInstancesDataModule
from lightning_metric.data.fmnist_instances import random_square_crops
from lightning_metric.sweeps.records import COMPLETED, FAILED, JobRecord

FMNIST = SHARED_DATA / "fashion-mnist"
MONITOR = "val/mean_average_precision_at_r"


# -- the many-classes data ------------------------------------------------------------------
def _instances(**settings) -> FashionMNISTInstancesDataModule:
    options = {"instances": 30, "copies": 3, "batch_size": 30, "m_per_class": 3, **settings}
    data = FashionMNISTInstancesDataModule(FMNIST, download=False, **options)
    data.setup()
    return data


@pytest.fixture(scope="module")
def default_instances() -> FashionMNISTInstancesDataModule:
    return _instances(seed=0)


def _tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(x), torch.as_tensor(y)


def _same_up_to_mirror(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a, b, atol=1e-5) or torch.allclose(a, b.flip(-1), atol=1e-5))


def test_each_image_is_a_class_of_its_copies_and_validation_and_test_are_unseen_images():
    data = _instances(crop_scale=1.0)   # whole crops: each copy is its image or its mirror
    assert data.num_classes == 30
    sets = [_tensors(data.train_set), _tensors(data.val_set), _tensors(data.test_set)]
    assert [tuple(x.shape) for x, _ in sets] == [(90, 1, 28, 28)] * 3
    assert torch.equal(sets[0][1].bincount(), torch.full((30,), 3))
    assert set(sets[1][1].tolist()).isdisjoint(sets[0][1].tolist())
    sources = []
    for x, y in sets:
        for label in y.unique():
            copies = x[y == label]
            assert len(copies) == 3 and all(_same_up_to_mirror(c, copies[0]) for c in copies)
            sources.append(copies[0])
    for i, image in enumerate(sources):  # 90 different images: none trained on comes back
        assert not any(_same_up_to_mirror(image, other) for other in sources[i + 1:])


def test_augmented_copies_differ_yet_stay_in_the_unit_range(default_instances):
    x, _ = _tensors(default_instances.train_set)
    assert not torch.equal(x[0], x[1]) and not torch.equal(x[1], x[2])
    assert float(x.min()) >= 0 and float(x.max()) <= 1


def test_the_copies_are_the_same_for_a_seed_and_differ_between_seeds(default_instances):
    first, again, other = default_instances, _instances(seed=0), _instances(seed=1)
    assert torch.equal(_tensors(first.train_set)[0], _tensors(again.train_set)[0])
    assert not torch.equal(_tensors(first.train_set)[0], _tensors(other.train_set)[0])


def test_a_whole_crop_is_the_image_or_its_mirror_and_half_are_mirrored():
    images = torch.rand(400, 1, 8, 8)
    crops = random_square_crops(images, 1.0, torch.Generator().manual_seed(0))
    same = (crops - images).abs().flatten(1).amax(1) < 1e-5
    mirrored = (crops - images.flip(-1)).abs().flatten(1).amax(1) < 1e-5
    assert bool((same | mirrored).all())
    assert 150 < int(mirrored.sum()) < 250


@pytest.mark.parametrize(("settings", "named"), [
    ({"instances": 1}, "data.instances"),
    ({"copies": 1}, "data.copies"),
    ({"crop_scale": 0}, "data.crop_scale"),
    ({"protocol": "standard"}, "data.protocol='standard'"),
])
def test_bad_many_classes_settings_are_named(settings, named):
    with pytest.raises(ValueError, match=named.replace("[", r"\[")):
        FashionMNISTInstancesDataModule(FMNIST, download=False, **settings)


# -- the plan ---------------------------------------------------------------------------------
def _plan(**changes) -> ComparisonPlan:
    settings = {
        "losses": ("triplet", "arcface"), "seeds": (0, 1, 2), "setups": ("standard",),
        "setup_overrides": {"standard": ("data=fmnist",)}, "train_overrides": ("model=mlp",),
        "candidates": {"arcface": ("loss.margin=20,40", "loss.scale=32,64")},
        "optimized_metric": MONITOR, **changes}
    return ComparisonPlan(**settings)


@pytest.mark.parametrize(("changes", "named"), [
    ({"losses": ("triplet", "no_such_loss")}, "losses: unknown ['no_such_loss']"),
    ({"losses": ()}, "losses is empty"),
    ({"setups": ("seen",)}, "setups: unknown ['seen']"),
    ({"seeds": (0, 0)}, "seeds must be one or more different seeds"),
    ({"candidates": {"arcface": ("margin=20,40",)}}, "candidates.arcface: 'margin=20,40'"),
])
def test_bad_plans_are_named(changes, named):
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("]", r"\]")):
        _plan(**changes)


def test_the_search_tries_the_candidates_at_the_first_seed_then_the_choice_runs_the_others():
    plan, cell = _plan(), Cell("standard", "arcface")
    search = plan.search_command(cell, Path("out/search"), export=True)
    assert search[1:4] == ["-m", "recipes.train", "-m"]
    assert search[4:] == ["hydra.sweep.dir=out/search", "data=fmnist", "model=mlp",
                          "loss=arcface", f"optimized_metric={MONITOR}", "test=true",
                          "loss.margin=20,40", "loss.scale=32,64", "seed=0", "export=true"]
    seeds = plan.seeds_command(cell, ["loss.margin=40", "loss.scale=32"], Path("out/seeds"))
    assert seeds[-3:] == ["loss.margin=40", "loss.scale=32", "seed=1,2"]


# -- the choice and the table ----------------------------------------------------------------
def _job(number, validation, test, status=COMPLETED, seconds=10.0, seed=0):
    metrics = {f"best/{MONITOR}": validation, "test/precision_at_1": test,
               "test/r_precision": test, "test/mean_average_precision_at_r": test}
    return JobRecord(number, Path(f"job{number}"), {"seed": str(seed), "loss.margin": str(number)},
                     status, seconds=seconds, metrics=metrics if status == COMPLETED else {})


def test_the_setting_is_chosen_on_validation_never_on_test():
    jobs = [_job(0, 0.5, 0.9), _job(1, 0.7, 0.1), _job(2, 0.9, 0.5, status=FAILED)]
    assert best_job(jobs, MONITOR, Cell("s", "l")).number == 1


def test_no_completed_candidate_is_an_error_naming_the_cell():
    with pytest.raises(RuntimeError, match="standard/triplet: no candidate completed"):
        best_job([_job(0, 0.5, 0.5, status=FAILED)], MONITOR, Cell("standard", "triplet"))


def test_the_table_gives_mean_and_sample_std_over_the_seeds():
    runs = (_job(0, 0.5, 0.80, seconds=10, seed=0), _job(1, 0.6, 0.84, seconds=14, seed=1),
            _job(2, 0.7, 0.83, seconds=12, seed=2))
    result = CellResult(Cell("standard", "triplet"), ("loss.margin=0.1",), runs)
    table = markdown_table([result], "standard", MONITOR).splitlines()
    values = [0.80, 0.84, 0.83]
    expected = f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"
    assert expected == "0.8233 ± 0.0208"
    assert table[2] == (f"| triplet | `loss.margin=0.1` | {expected} | {expected} | {expected} | "
                        "0.6000 ± 0.1000 | 12 ± 2 | 3 |")
    assert mean_and_std([0.5]) == "0.5000"


def test_a_multirun_already_done_is_skipped_and_a_failing_one_names_its_command(tmp_path):
    sweep = tmp_path / "search"
    (sweep / "2").mkdir(parents=True)   # a job of an earlier, unfinished attempt
    failing = [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
    with pytest.raises(RuntimeError, match=r"exit 3\):\n.*-c .*\n...\nboom"):
        run_multirun(failing, sweep, log=lambda line: None)
    assert not sweep.exists()           # emptied before the attempt; no done.json after it
    sweep.mkdir()
    (sweep / DONE_FILE).write_text(json.dumps({"command": failing}))
    lines = []
    run_multirun(failing, sweep, log=lines.append)
    assert lines[0].startswith("done before, skipped")


# -- end to end -------------------------------------------------------------------------------
def test_the_command_compares_two_losses_over_two_seeds_and_draws_the_figure(tmp_path):
    overrides = [
        f"output_dir={tmp_path}", "losses=[triplet,arcface]", "setups=[many_classes]",
        "seeds=[0,1]",
        'setup_overrides.many_classes=["data=fmnist_instances","data.instances=40",'
        '"data.copies=4","data.batch_size=40","data.m_per_class=4"]',
        'train_overrides=["trainer.max_epochs=1","~callbacks.embedding_plot",'
        '"~callbacks.retrieval_pictures","logger=none"]',
        'candidates.triplet=["loss.margin=0.05,0.5"]', "candidates.arcface=[]",
        "figure.setup=many_classes", "figure.losses=[triplet,arcface]",
    ]
    env = {**os.environ, "LIGHTNING_METRIC_DATA": str(SHARED_DATA), "HYDRA_FULL_ERROR": "1"}
    done = subprocess.run([sys.executable, "-m", "recipes.compare", *overrides], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with (tmp_path / "results.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert [(row["loss"], row["seed"]) for row in rows] == [
        ("triplet", "0"), ("triplet", "1"), ("arcface", "0"), ("arcface", "1")]
    for row in rows:  # every number is the one its run wrote
        written = json.loads((Path(row["folder"]) / "metrics.json").read_text())
        assert math.isclose(float(row["test/precision_at_1"]), written["test/precision_at_1"])
    search = [json.loads(p.read_text()) for p in
              (tmp_path / "many_classes" / "triplet" / "search").glob("*/metrics.json")]
    winner = max(search, key=lambda metrics: metrics[f"best/{MONITOR}"])
    assert math.isclose(float(rows[0]["validation"]), winner[f"best/{MONITOR}"])
    chosen = rows[0]["chosen"]
    assert chosen in ("loss.margin=0.05", "loss.margin=0.5") and rows[1]["chosen"] == chosen
    assert f"{chosen} seed=1" in done.stdout        # the printed command of the other seed
    table = (tmp_path / "results.md").read_text()
    assert "## many_classes" in table and "| arcface | defaults |" in table
    assert f"| triplet | `{chosen}` |" in table and " ± " in table
    picture = matplotlib.image.imread(tmp_path / "umap.png")
    assert picture.shape[1] > 1.6 * picture.shape[0]   # two panels side by side
