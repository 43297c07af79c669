"""Sweeps: the summary, its picture and the early checks, on hand-made job folders and end to end.

The end-to-end tests run the real ``python -m recipes.train -m ...`` in a subprocess on
digits with one short epoch per job.
"""

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import numpy
import pytest
import yaml
from conftest import REPO, SHARED_DATA
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from lightning_metric import builders
from lightning_metric.builders import check_trainer_length
from lightning_metric.sweeps import (
    Objective,
    SweepConfigError,
    best_command,
    check_sweep,
    plot_sweep,
    read_jobs,
    write_summary,
)
from lightning_metric.sweeps.checks import jobs_to_check, values_per_key
from lightning_metric.sweeps.plots import parameter_importances, swept_parameters
from lightning_metric.sweeps.summary import CSV_FILE, MARKDOWN_FILE

builders.register_resolvers()
MONITOR = "val/mean_average_precision_at_r"
OBJECTIVE = Objective(MONITOR)


# -- hand-made job folders -----------------------------------------------------------------------


def make_job(sweep_dir: Path, number: int, overrides: list[str], status: str = "completed",
             best: float | None = None, error: str = "", report_end: bool = True) -> Path:
    """A job folder as a multirun leaves it: Hydra's config, and (if the job reported its end)
    job.json, metrics.json and checkpoint.json."""
    folder = sweep_dir / str(number)
    (folder / ".hydra").mkdir(parents=True)
    hydra = {"hydra": {"job": {"num": number}, "overrides": {"task": overrides}}}
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    if not report_end:
        return folder
    job = {"number": number, "overrides": overrides, "status": status, "error": error,
           "seconds": 1.5 + number}
    (folder / "job.json").write_text(json.dumps(job))
    if best is not None:
        metrics = {f"best/{MONITOR}": best, MONITOR: best - 0.01,
                   "test/precision_at_1": best + 0.1}
        (folder / "metrics.json").write_text(json.dumps(metrics))
        (folder / "checkpoint.json").write_text(json.dumps(
            {"path": "checkpoints/epoch_000.ckpt", "monitor": MONITOR, "score": best}))
    return folder


def grid_sweep(sweep_dir: Path) -> list:
    values = {(20, 16): 0.50, (20, 64): 0.46, (40, 16): 0.47, (40, 64): 0.44}
    for number, ((margin, scale), best) in enumerate(values.items()):
        make_job(sweep_dir, number, ["loss=arcface", f"loss.margin={margin}",
                                     f"loss.scale={scale}", "trainer.max_epochs=1"], best=best)
    return read_jobs(sweep_dir)


def read_csv(path: Path) -> list[dict]:
    with path.open() as stream:
        return list(csv.DictReader(stream))


def test_summary_has_a_row_per_job_with_every_override_and_the_monitored_metric(tmp_path):
    jobs = grid_sweep(tmp_path)
    make_job(tmp_path, 4, ["loss=arcface", "loss.margin=60", "loss.scale=16",
                           "trainer.max_epochs=1"], status="failed", error="ValueError: boom")
    make_job(tmp_path, 5, ["loss=arcface", "loss.margin=60", "loss.scale=64",
                           "trainer.max_epochs=1"], report_end=False)
    jobs = read_jobs(tmp_path)
    write_summary(tmp_path, jobs, OBJECTIVE)

    rows = read_csv(tmp_path / CSV_FILE)
    assert [row["job"] for row in rows] == ["0", "1", "2", "3", "4", "5"]
    assert [row["loss.margin"] for row in rows] == ["20", "20", "40", "40", "60", "60"]
    assert [row["loss.scale"] for row in rows] == ["16", "64", "16", "64", "16", "64"]
    assert {row["trainer.max_epochs"] for row in rows} == {"1"}
    assert [row["status"] for row in rows] == ["completed"] * 4 + ["failed", "unfinished"]
    assert rows[0][f"best {MONITOR}"] == "0.5000"
    assert rows[0][f"last {MONITOR}"] == "0.4900"
    assert rows[0]["test/precision_at_1"] == "0.6000"
    assert rows[0]["checkpoint"] == "checkpoints/epoch_000.ckpt"
    assert rows[1]["seconds"] == "2.5"
    assert rows[4]["error"] == "ValueError: boom" and rows[4][f"best {MONITOR}"] == ""
    assert rows[5]["seconds"] == ""

    markdown = (tmp_path / MARKDOWN_FILE).read_text().splitlines()
    table = [line for line in markdown if line.startswith("| ")]
    jobs_in_order = [line.split(" | ")[0].strip("| ") for line in table[2:]]
    assert jobs_in_order == ["0", "2", "1", "3", "4", "5"]   # best first, no value last
    assert table[0].startswith("| job | status | loss | loss.margin | loss.scale |")


def test_best_first_respects_min_mode_and_the_best_command_repeats_the_best_job(tmp_path):
    jobs = grid_sweep(tmp_path)
    assert [j.number for j in OBJECTIVE.ranked(jobs)] == [0, 2, 1, 3]
    assert [j.number for j in Objective(MONITOR, "min").ranked(jobs)] == [3, 1, 2, 0]
    command = best_command(jobs, OBJECTIVE, "python -m recipes.train")
    assert command == ("python -m recipes.train loss=arcface loss.margin=20 loss.scale=16 "
                       "trainer.max_epochs=1")


def test_the_best_command_leaves_out_the_search_config_and_quotes_for_the_shell(tmp_path):
    make_job(tmp_path, 0, ["hparams_search=arcface_optuna", "loss=arcface",
                           "loss.margin=12.5", "+tags=[a,b]"], best=0.3)
    command = best_command(read_jobs(tmp_path), OBJECTIVE, "python -m recipes.train")
    assert command == "python -m recipes.train loss=arcface loss.margin=12.5 '+tags=[a,b]'"


def test_no_best_command_when_no_job_has_a_value(tmp_path):
    make_job(tmp_path, 0, ["loss.margin=1"], status="failed", error="x")
    assert best_command(read_jobs(tmp_path), OBJECTIVE, "python -m recipes.train") is None


def test_an_objective_with_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode must be 'max' or 'min', got 'maximize'"):
        Objective(MONITOR, "maximize")


def picture(path: Path) -> numpy.ndarray:
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 300
    colours = numpy.unique((image[..., :3] * 255).astype(int).reshape(-1, 3), axis=0)
    assert len(colours) > 20, "a blank picture"
    return image


def test_two_numeric_parameters_on_a_grid_give_a_heatmap_with_a_cell_a_job(tmp_path):
    jobs = grid_sweep(tmp_path)
    assert swept_parameters(jobs) == ["loss.margin", "loss.scale"]
    assert plot_sweep(jobs, OBJECTIVE, tmp_path / "h.png") == "heatmap"
    picture(tmp_path / "h.png")


def test_scattered_trials_give_a_scatter_one_parameter_a_line_a_category_bars(tmp_path):
    for number, (margin, scale) in enumerate([(11.5, 20.1), (33.2, 50.7), (48.0, 9.9)]):
        make_job(tmp_path / "optuna", number, [f"loss.margin={margin}", f"loss.scale={scale}"],
                 best=0.3 + number / 10)
    scattered = read_jobs(tmp_path / "optuna")
    assert plot_sweep(scattered, OBJECTIVE, tmp_path / "s.png") == "scatter"
    picture(tmp_path / "s.png")

    for number, margin in enumerate([0.05, 0.1, 0.2]):
        make_job(tmp_path / "line", number, ["loss=triplet", f"loss.margin={margin}"],
                 best=0.5 + number / 10)
    assert plot_sweep(read_jobs(tmp_path / "line"), OBJECTIVE, tmp_path / "l.png") == "line"
    picture(tmp_path / "l.png")

    for number, loss in enumerate(["arcface", "cosface", "triplet"]):
        make_job(tmp_path / "bars", number, [f"loss={loss}"], best=0.5 + number / 10)
    assert plot_sweep(read_jobs(tmp_path / "bars"), OBJECTIVE, tmp_path / "b.png") == "bars"
    picture(tmp_path / "b.png")


def test_three_swept_parameters_give_no_picture(tmp_path):
    for number in range(3):
        make_job(tmp_path, number, [f"loss.margin={number}", f"loss.scale={number}",
                                    f"optimizer.lr={number}"], best=0.5)
    assert plot_sweep(read_jobs(tmp_path), OBJECTIVE, tmp_path / "h.png") is None
    assert not (tmp_path / "h.png").exists()


def test_parameter_importance_finds_the_parameter_that_moves_the_metric(tmp_path):
    generator = numpy.random.default_rng(0)
    for number in range(12):
        margin, scale = generator.uniform(10, 60), generator.uniform(8, 64)
        make_job(tmp_path, number, [f"loss.margin={margin}", f"loss.scale={scale}"],
                 best=1.0 - margin / 100)   # only the margin matters
    jobs = read_jobs(tmp_path)
    importances = parameter_importances(jobs, OBJECTIVE, swept_parameters(jobs))
    assert set(importances) == {"loss.margin", "loss.scale"}
    assert importances["loss.margin"] > 0.8


# -- the early checks' expansion of a sweep into jobs ---------------------------------------------


def test_sweep_overrides_expand_into_every_job_and_optuna_ranges_into_their_ends():
    assert values_per_key(["loss.margin=20,40", "loss=arcface", "seed=range(0,2)"]) == {
        "loss.margin": ["loss.margin=20", "loss.margin=40"], "loss": ["loss=arcface"],
        "seed": ["seed=0", "seed=1"]}
    assert values_per_key(["optimizer.lr=tag(log, interval(0.0001, 0.01))"]) == {
        "optimizer.lr": ["optimizer.lr=0.0001", "optimizer.lr=0.01"]}
    jobs = jobs_to_check(["loss.scale=16,64", "loss.margin=20,40"], {"loss": "arcface"})
    assert sorted(map(tuple, jobs)) == sorted([
        ("loss=arcface", "loss.scale=16", "loss.margin=20"),
        ("loss=arcface", "loss.scale=16", "loss.margin=40"),
        ("loss=arcface", "loss.scale=64", "loss.margin=20"),
        ("loss=arcface", "loss.scale=64", "loss.margin=40"),
    ])
    # a task override replaces the search space's entry for the same key
    assert jobs_to_check(["loss=cosface"], {"loss": "arcface"}) == [["loss=cosface"]]


def test_a_large_sweep_is_checked_one_value_at_a_time_for_every_group_choice():
    margins = ",".join(str(m) for m in range(10, 210, 10))          # 20 margins, 10 to 200
    overrides = ["loss=cosface,arcface", f"loss.margin={margins}", "loss.scale=16,32,64"]
    jobs = jobs_to_check(overrides, None)                          # 120 jobs: too many
    assert len(jobs) == 2 * (1 + 19 + 2)
    assert ["loss=arcface", "loss.margin=200", "loss.scale=16"] in jobs
    checked = {override for job in jobs for override in job}
    assert checked == {"loss=cosface", "loss=arcface", "loss.scale=16", "loss.scale=32",
                       "loss.scale=64", *(f"loss.margin={m}" for m in range(10, 210, 10))}


def test_an_optuna_search_is_checked_at_the_ends_of_every_range():
    params = {"loss": "arcface", "loss.margin": "interval(10, 60)", "loss.scale": "interval(8, 64)",
              "optimizer.lr": "tag(log, interval(0.0001, 0.01))"}
    jobs = jobs_to_check([], params)
    assert len(jobs) == 8                                          # 2**3 corners
    assert ["loss=arcface", "loss.margin=60.0", "loss.scale=64.0", "optimizer.lr=0.01"] in jobs
    params["loss_optimizer.lr"] = "tag(log, interval(0.0001, 0.1))"
    assert len(jobs_to_check([], params)) == 1 + 4                 # 16 corners: one at a time


@pytest.mark.parametrize("search", ["arcface_optuna", "cosface_optuna", "triplet_optuna"])
def test_the_shipped_optuna_searches_compose_and_build_at_both_ends_of_every_range(search):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        config = compose("train", overrides=[f"hparams_search={search}", "data=digits"],
                         return_hydra_config=True)
        assert config.hydra.sweeper._target_.endswith("OptunaSweeper")
        assert config.hydra.sweeper.sampler.seed == 1234
        assert check_sweep(config) >= 5


def test_check_sweep_raises_with_every_problem_and_its_jobs():
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        config = compose("train", return_hydra_config=True)
        with open_dict(config):   # what a multirun's config holds (compose takes no sweeps)
            config.hydra.overrides.task = ["loss=arcface,cosface", "loss.margin=30,200",
                                           "data=digits"]
        with pytest.raises(SweepConfigError) as raised:
            check_sweep(config)
    message = str(raised.value)
    assert message.startswith("The sweep stops before any job trains: its 4 job configs have "
                              "1 problem:")
    assert "(in: loss=arcface loss.margin=200 data=digits)" in message


@pytest.mark.parametrize(("trainer", "message"), [
    ({"max_epochs": -1}, "trainer.max_epochs=-1: a run needs at least 1 epoch .-1 trains forever"),
    ({"max_epochs": 0}, r"trainer.max_epochs=0: a run needs at least 1 epoch$"),
])
def test_a_run_that_would_never_end_or_never_train_is_refused(trainer, message):
    with pytest.raises(ValueError, match=message):
        check_trainer_length(OmegaConf.create(trainer))


@pytest.mark.parametrize("trainer", [{"max_epochs": 3}, {"max_epochs": -1, "max_steps": 10},
                                     {"max_epochs": -1, "max_time": "00:00:10:00"},
                                     {"max_epochs": None}])
def test_runs_that_end_are_accepted(trainer):
    check_trainer_length(OmegaConf.create(trainer))


# -- end to end: the real command -----------------------------------------------------------------

QUICK = ["data=digits", "trainer.max_epochs=1", "trainer.limit_train_batches=5",
         "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
         "trainer.enable_model_summary=false", "callbacks.embedding_plot.on_test=false",
         "logger=none"]


def run_sweep(sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LIGHTNING_METRIC_DATA": str(SHARED_DATA), "WANDB_SILENT": "true",
           "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", "recipes.train", "-m", f"hydra.sweep.dir={sweep_dir}",
         *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )


def succeeded(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_a_2x2_sweep_writes_its_summary_table_heatmap_and_best_command(tmp_path):
    out = succeeded(run_sweep(tmp_path, "loss=arcface", "loss.margin=20,40", "loss.scale=16,64",
                              *QUICK))
    rows = read_csv(tmp_path / CSV_FILE)
    assert len(rows) == 4
    assert [(r["loss.margin"], r["loss.scale"]) for r in rows] == [
        ("20", "16"), ("20", "64"), ("40", "16"), ("40", "64")]
    for row in rows:
        metrics = json.loads((tmp_path / row["job"] / "metrics.json").read_text())
        assert row["status"] == "completed"
        assert float(row[f"best {MONITOR}"]) == pytest.approx(metrics[f"best/{MONITOR}"], abs=1e-4)
        assert float(row["test/precision_at_1"]) == pytest.approx(
            metrics["test/precision_at_1"], abs=1e-4)
        assert (tmp_path / row["job"] / row["checkpoint"]).is_file()
        assert float(row["seconds"]) > 0
    best = max(rows, key=lambda r: float(r[f"best {MONITOR}"]))
    markdown = (tmp_path / MARKDOWN_FILE).read_text()
    assert markdown.splitlines()[4].startswith(f"| {best['job']} | completed |")
    picture(tmp_path / "sweep_heatmap.png")
    assert (f"python -m recipes.train loss=arcface loss.margin={best['loss.margin']} "
            f"loss.scale={best['loss.scale']} data=digits") in out


def test_an_optuna_search_of_3_trials_writes_its_summary_and_plots(tmp_path):
    out = succeeded(run_sweep(tmp_path, "hparams_search=arcface_optuna",
                              "hydra.sweeper.n_trials=3", *QUICK))
    rows = read_csv(tmp_path / CSV_FILE)
    assert len(rows) == 3
    for row in rows:
        assert row["status"] == "completed" and row["loss"] == "arcface"
        assert 10 <= float(row["loss.margin"]) <= 60 and 8 <= float(row["loss.scale"]) <= 64
        assert 1e-4 <= float(row["optimizer.lr"]) <= 1e-2
        assert 1e-4 <= float(row["loss_optimizer.lr"]) <= 1e-1
    assert len({row["loss.margin"] for row in rows}) == 3
    results = OmegaConf.load(tmp_path / "optimization_results.yaml")
    best = max(rows, key=lambda r: float(r[f"best {MONITOR}"]))
    assert results.best_value == pytest.approx(float(best[f"best {MONITOR}"]), abs=1e-4)
    picture(tmp_path / "optuna_history.png")
    picture(tmp_path / "optuna_importance.png")
    assert "hparams_search" not in out.split("repeat it with:")[1]


def test_a_failed_job_gets_a_row_with_its_error_and_the_others_keep_theirs(tmp_path):
    done = run_sweep(tmp_path, "trainer.max_epochs=1,-1",
                     *[o for o in QUICK if not o.startswith("trainer.max_epochs")])
    assert done.returncode != 0
    rows = read_csv(tmp_path / CSV_FILE)
    assert [(r["trainer.max_epochs"], r["status"]) for r in rows] == [
        ("1", "completed"), ("-1", "failed")]
    assert float(rows[0][f"best {MONITOR}"]) > 0
    assert "ValueError: trainer.max_epochs=-1" in rows[1]["error"]
    assert "failed" in (tmp_path / MARKDOWN_FILE).read_text()


@pytest.mark.parametrize(("overrides", "messages"), [
    (["loss=triplet", "loss.scale=16,64"],
     ["loss.scale: loss=triplet has no setting 'scale'",
      "Its settings (loss.*): margin, swap, smooth_loss, triplets_per_anchor"]),
    (["loss=arcface", "loss.margn=20,40"],
     ["loss.margn: loss=arcface has no setting 'margn'",
      "Its settings (loss.*): num_classes, embedding_size, margin, scale"]),
    (["loss=arcface,cosface", "loss.scale=-16,64"],
     ["ArcFaceLoss: scale must be > 0, got -16", "CosFaceLoss: scale must be > 0, got -16"]),
    (["loss=arcface", "loss.margin=30,200"],
     ["ArcFaceLoss: margin is in degrees and must lie in [0, 180)", "got 200",
      "(in: loss=arcface loss.margin=200"]),
])
def test_a_bad_sweep_stops_before_any_job_trains(tmp_path, overrides, messages):
    start = time.perf_counter()
    done = run_sweep(tmp_path, *overrides, *QUICK)
    seconds = time.perf_counter() - start
    assert done.returncode != 0
    assert "The sweep stops before any job trains" in done.stderr
    for message in messages:
        assert message in done.stderr
    assert not list(tmp_path.glob("*/checkpoints")), "a job trained"
    assert seconds < 60


def test_the_slurm_launcher_follows_the_trainer_and_composes_with_ddp(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "recipes.train", "hydra/launcher=slurm", "trainer=ddp",
         "trainer.num_nodes=2", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30",
         "--cfg", "all", "--resolve"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=True,
    )
    config = yaml.safe_load(done.stdout)
    launcher = config["hydra"]["launcher"]
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (launcher["partition"], launcher["nodes"], launcher["timeout_min"]) == ("gpu", 2, 30)
    assert launcher["gpus_per_node"] == launcher["tasks_per_node"] == 2
    assert config["trainer"]["strategy"]["_target_"].endswith("DDPStrategy")


def test_a_sweep_on_the_local_submitit_launcher_runs_each_job_in_its_own_process(tmp_path):
    succeeded(run_sweep(tmp_path, "hydra/launcher=local", "loss.margin=0.05,0.1", *QUICK))
    rows = read_csv(tmp_path / CSV_FILE)
    assert [(r["loss.margin"], r["status"]) for r in rows] == [
        ("0.05", "completed"), ("0.1", "completed")]
    assert list((tmp_path / ".submitit").glob("*/*_log.out"))
