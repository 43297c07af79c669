"""A sweep's table: one row per job, as ``sweep_summary.csv`` and ``sweep_summary.md``.

Columns: ``job``, ``status``, every override (one column each, as typed), the
monitored validation metric at its best (the checkpoint that was tested) and at
the last epoch, every ``test/`` metric, ``seconds`` (wall time of the job),
``checkpoint`` (the tested one, relative to the job folder) and ``error``. A
failed or unfinished job keeps its row, with what it has.
"""

from __future__ import annotations

import csv
import io
import math
import shlex
from dataclasses import dataclass
from pathlib import Path

from .records import COMPLETED, JobRecord

CSV_FILE, MARKDOWN_FILE = "sweep_summary.csv", "sweep_summary.md"
# A config group that only configures the sweep (Optuna's search space): leave it out of
# the command that repeats one job.
SEARCH_GROUP = "hparams_search"


@dataclass(frozen=True)
class Objective:
    """The monitored metric (``val/mean_average_precision_at_r``) and its direction."""

    monitor: str
    mode: str = "max"

    def __post_init__(self):
        if self.mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {self.mode!r}")

    @property
    def best_column(self) -> str:
        return f"best {self.monitor}"

    @property
    def last_column(self) -> str:
        return f"last {self.monitor}"

    def best_value(self, job: JobRecord) -> float:
        """The best value of the monitored metric (its last value when no best was kept)."""
        best = job.value(f"best/{self.monitor}")
        return job.value(self.monitor) if math.isnan(best) else best

    def ranked(self, jobs: list[JobRecord]) -> list[JobRecord]:
        """Best first; jobs without a value (failed, unfinished) last, by number."""
        scored = [j for j in jobs if j.status == COMPLETED and not math.isnan(self.best_value(j))]
        sign = -1 if self.mode == "max" else 1
        scored.sort(key=lambda j: (sign * self.best_value(j), j.number))
        rest = sorted((j for j in jobs if j not in scored), key=lambda j: j.number)
        return scored + rest


def override_keys(jobs: list[JobRecord]) -> list[str]:
    """Every override key of the sweep, in the order the jobs first give them."""
    keys: dict[str, None] = {}
    for job in jobs:
        keys.update(dict.fromkeys(job.overrides))
    return list(keys)


def test_metric_names(jobs: list[JobRecord]) -> list[str]:
    return sorted({name for job in jobs for name in job.metrics if name.startswith("test/")})


def table(jobs: list[JobRecord], objective: Objective) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)`` of the summary, rows in job order, every cell a string."""
    keys, tests = override_keys(jobs), test_metric_names(jobs)
    header = ["job", "status", *keys, objective.best_column, objective.last_column, *tests,
              "seconds", "checkpoint", "error"]
    rows = []
    for job in jobs:
        values = [objective.best_value(job), job.value(objective.monitor),
                  *(job.value(name) for name in tests)]
        rows.append([
            str(job.number), job.status, *(job.overrides.get(key, "") for key in keys),
            *(_number(v) for v in values), _number(job.seconds, digits=1), job.checkpoint,
            job.error,
        ])
    return header, rows


def _number(value: float, digits: int = 4) -> str:
    return "" if math.isnan(value) else f"{value:.{digits}f}"


def to_csv(header: list[str], rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerows([header, *rows])
    return buffer.getvalue()


def to_markdown(header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        escaped = (cell.replace("|", "\\|").replace("\n", " ") for cell in cells)
        return "| " + " | ".join(escaped) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)]) + "\n"


def write_summary(sweep_dir: Path, jobs: list[JobRecord], objective: Objective) -> None:
    """``sweep_summary.csv`` (job order) and ``sweep_summary.md`` (best first) in ``sweep_dir``."""
    header, rows = table(jobs, objective)
    (sweep_dir / CSV_FILE).write_text(to_csv(header, rows))
    _, ranked_rows = table(objective.ranked(jobs), objective)
    title = f"# Sweep summary: {len(jobs)} jobs, best {objective.monitor} first\n\n"
    (sweep_dir / MARKDOWN_FILE).write_text(title + to_markdown(header, ranked_rows))


def best_command(jobs: list[JobRecord], objective: Objective, command: str) -> str | None:
    """The command line that repeats the best job (None when no job has a value)."""
    ranked = objective.ranked(jobs)
    if not ranked or ranked[0].status != COMPLETED or math.isnan(objective.best_value(ranked[0])):
        return None
    overrides = [f"{key}={value}" for key, value in ranked[0].overrides.items()
                 if key.lstrip("+~") != SEARCH_GROUP]
    return " ".join([command, *map(shlex.quote, overrides)])
