"""Running a comparison's cells: the multiruns, the setting chosen on validation, the runs kept.

Every multirun's folder gets a ``done.json`` when it ends well, so a comparison run again
into the same ``output_dir`` skips what is done and goes on where it stopped.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..sweeps.records import COMPLETED, JobRecord, read_jobs, split_override
from ..sweeps.summary import Objective
from .plan import Cell, ComparisonPlan

DONE_FILE = "done.json"


@dataclass(frozen=True)
class CellResult:
    """A cell's runs: one a seed, the first the search's winner; ``chosen`` its settings."""

    cell: Cell
    chosen: tuple[str, ...]
    runs: tuple[JobRecord, ...]


def run_cell(plan: ComparisonPlan, cell: Cell, output_dir: Path, export: bool = False,
             log=print) -> CellResult:
    """The cell's search, the setting that won on validation, then the other seeds.

    Raises:
        RuntimeError: a multirun failed (naming its command and the end of its output),
            or no candidate has a value of ``plan.optimized_metric``.
    """
    folder = cell.folder(output_dir)
    search_dir = folder / "search"
    run_multirun(plan.search_command(cell, search_dir, export), search_dir, log)
    search_jobs = read_jobs(search_dir)
    winner = best_job(search_jobs, plan.optimized_metric, cell)
    chosen = tuple(f"{key}={winner.overrides[key]}" for key in candidate_keys(plan, cell))
    log(f"{cell.name}: chose {' '.join(chosen) or 'the defaults'} on validation "
        f"({plan.optimized_metric} = {Objective(plan.optimized_metric).best_value(winner):.4f})")
    runs = [winner]
    if len(plan.seeds) > 1:
        seeds_dir = folder / "seeds"
        run_multirun(plan.seeds_command(cell, chosen, seeds_dir), seeds_dir, log)
        runs += [job for job in read_jobs(seeds_dir) if job.status == COMPLETED]
    return CellResult(cell, chosen, tuple(runs))


def run_multirun(command: list[str], sweep_dir: Path, log=print) -> None:
    """Run ``command`` (a ``recipes.train -m``) unless ``sweep_dir`` holds its ``done.json``;
    a ``sweep_dir`` without it (a multirun stopped half-way, or another command) is emptied
    first, so that no job of an earlier attempt is read as one of this one.

    Raises:
        RuntimeError: it exited with an error; the message names the command and ends
            with the last lines it printed.
    """
    done = sweep_dir / DONE_FILE
    printable = shlex.join(command)
    if done.is_file() and json.loads(done.read_text()).get("command") == command:
        log(f"done before, skipped: {printable}")
        return
    if sweep_dir.exists():  # a multirun stopped or changed since: its jobs start afresh
        log(f"removing the unfinished {sweep_dir}")
        shutil.rmtree(sweep_dir)
    log(f"running: {printable}")
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        tail = "\n".join((finished.stdout + finished.stderr).splitlines()[-25:])
        raise RuntimeError(f"this multirun failed (exit {finished.returncode}):\n{printable}\n"
                           f"...\n{tail}")
    done.write_text(json.dumps({"command": command}, indent=2) + "\n")


def best_job(jobs: list[JobRecord], metric: str, cell: Cell) -> JobRecord:
    """The completed job with the best validation ``metric`` (the first of a tie).

    Raises:
        RuntimeError: no job completed with a value of ``metric``.
    """
    ranked = Objective(metric).ranked(jobs)
    if not ranked or ranked[0].status != COMPLETED or math.isnan(
            Objective(metric).best_value(ranked[0])):
        raise RuntimeError(f"{cell.name}: no candidate completed with a value of {metric} "
                           f"(jobs: {[(job.number, job.status, job.error) for job in jobs]})")
    return ranked[0]


def candidate_keys(plan: ComparisonPlan, cell: Cell) -> list[str]:
    """The settings the cell's search varies (``loss.margin``, ...)."""
    return [split_override(sweep)[0] for sweep in plan.candidates.get(cell.loss, ())]
