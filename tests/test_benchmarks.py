"""Smoke test: `python -m benchmarks.train_quality` runs the recipe and the plain loop."""

import os
import subprocess
import sys

from conftest import REPO, SHARED_DATA


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
