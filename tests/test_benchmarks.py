"""Smoke tests: the benchmarks run both sides (recipe and plain loop) and print their tables;
the memory measure they share."""

import gc
import os
import subprocess
import sys

import torch
from conftest import REPO, SHARED_DATA

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


def test_memory_measure_is_not_lowered_by_garbage_collected_during_it():
    """100 MB of earlier garbage in a reference cycle, collected by the second call (as a
    collection Python starts on its own would): the step still reads its 64 MB."""

    class Cycle:
        pass

    garbage = Cycle()
    garbage.itself, garbage.data = garbage, torch.ones(100 * 2**20 // 4)
    del garbage
    calls = []

    def step():
        calls.append(1)
        if len(calls) == 2:
            gc.collect()
        torch.ones(64 * 2**20 // 4).sum()

    gc.disable()  # the garbage waits for the step's own collection
    try:
        _, peak_mb = measure(step, "cpu", min_runs=2, budget_s=0)
    finally:
        gc.enable()
    assert 60 < peak_mb < 80, peak_mb
