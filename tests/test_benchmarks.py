"""Smoke tests: the benchmarks run both sides (recipe and plain loop) and print their tables;
the memory measure they share."""

import os
import subprocess
import sys

import torch
from conftest import REPO, SHARED_DATA

from benchmarks import self_supervised
from benchmarks._measure import measure


def test_train_quality_runs_both_sides_and_prints_the_table():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_quality", "--datasets", "digits",
         "--losses", "arcface", "--epochs-digits", "1", "--subset", "400", "--seeds", "0"],
        cwd=REPO, env={**os.environ, "LIGHTNING_METRIC_DATA": str(SHARED_DATA)},
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("digits arcface seed=0 recipe: P@1") for line in lines)
    assert any(line.startswith("digits arcface seed=0 plain:  P@1") for line in lines)
    row = next(line for line in lines if line.startswith("| digits | arcface | 1 | 0 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert len(cells) == 11
    assert all(float(cell) > 0 for cell in cells[4:]), row  # no NaN: every metric was found
    assert any("recipe at least as good as plain?" in line for line in lines)


def test_data_throughput_runs_both_sides_and_prints_the_table():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.data_throughput", "--images", "60", "--epochs", "1",
         "--repeats", "1", "--workers", "0", "--image-size", "32"],
        cwd=REPO, env={**os.environ, "LIGHTNING_METRIC_DATA": str(SHARED_DATA)},
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("  run 1 (recipe first): recipe ") for line in lines), done.stdout
    row = next(line for line in lines if line.startswith("| 60 | 32 | jpg | 0 | 1 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert len(cells) == 10
    assert all(float(cell) > 0 for cell in cells[-3:]), row


def test_self_supervised_benchmark_tests_each_encoder_before_and_after_training(monkeypatch,
                                                                              capsys):
    # in this process: the benchmark builds its runs in-process anyway, and a new one
    # would pay the imports again (it reads the data where conftest does)
    assert self_supervised.DATA == SHARED_DATA
    monkeypatch.setattr(sys, "argv", ["self_supervised", "--encoders", "test_resnet",
                                      "--steps", "3", "--subset", "768"])
    self_supervised.main()
    lines = capsys.readouterr().out.splitlines()
    pixels = next(line for line in lines if line.startswith("| raw pixels |"))
    assert 0.5 < float(pixels.strip("|").split("|")[3]) < 1, pixels
    row = next(line for line in lines if line.startswith("| test_resnet | 0 | 3 |"))
    cells = [float(cell) for cell in row.strip("|").split("|")[3:7]]
    assert all(0 < cell <= 1 for cell in cells), row
    assert cells[0] != cells[1], row  # the three steps changed the encoder


def test_losses_benchmark_runs_a_miner_on_both_sides():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.losses", "--losses", "HDCMiner", "--batch-sizes", "32"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith("| HDCMiner | 32 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert len(cells) == 9, row
    assert all(float(cell) >= 0 for cell in cells[3:]), row  # both sides measured


def test_memory_measure_counts_what_each_call_holds_not_what_the_first_call_keeps():
    """The first call keeps a 48 MB cache (a one-time cost); every call holds 64 MB at its
    peak. The measure is taken after a warm-up call with the peak reset: 64 MB, not 112."""
    cache = []

    def step():
        if not cache:
            cache.append(torch.ones(48 * 2**20 // 4))
        torch.ones(64 * 2**20 // 4).sum()

    _, peak_mb = measure(step, "cpu", min_runs=2, budget_s=0)
    assert 60 < peak_mb < 80, peak_mb
