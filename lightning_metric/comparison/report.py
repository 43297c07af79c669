"""A comparison's results: each run in ``results.csv``, mean +- std over seeds in ``results.md``."""

from __future__ import annotations

import csv
import statistics
from collections.abc import Sequence
from pathlib import Path

from ..sweeps.summary import Objective
from .runner import CellResult

TEST_METRICS = {
    "P@1": "test/precision_at_1",
    "R-precision": "test/r_precision",
    "MAP@R": "test/mean_average_precision_at_r",
}
"""The table's test columns: heading -> metrics.json key."""

CSV_COLUMNS = ("setup", "loss", "seed", "chosen", *TEST_METRICS.values(), "validation",
               "seconds", "folder")


def run_rows(results: Sequence[CellResult], metric: str) -> list[dict[str, object]]:
    """One row per run (``CSV_COLUMNS``); ``validation`` is the best ``metric`` of the run."""
    rows = []
    for result in results:
        for job in result.runs:
            rows.append({
                "setup": result.cell.setup, "loss": result.cell.loss,
                "seed": job.overrides.get("seed", ""), "chosen": " ".join(result.chosen),
                **{key: job.value(key) for key in TEST_METRICS.values()},
                "validation": Objective(metric).best_value(job),
                "seconds": job.seconds, "folder": str(job.folder),
            })
    return rows


def write_csv(rows: list[dict[str, object]], path: Path) -> None:
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def mean_and_std(values: Sequence[float], digits: int = 4) -> str:
    """``0.8123 ± 0.0042`` (sample standard deviation over seeds); one value alone."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown_table(results: Sequence[CellResult], setup: str, metric: str) -> str:
    """The ``setup``'s table: one row a loss, test metrics and time as mean ± std."""
    heading = ["loss", "chosen on validation", *TEST_METRICS, f"validation {_short(metric)}",
               "seconds a run", "seeds"]
    lines = ["| " + " | ".join(heading) + " |", "|" + "---|" * len(heading)]
    for result in results:
        if result.cell.setup != setup:
            continue
        runs = result.runs
        cells = [result.cell.loss, " ".join(f"`{c}`" for c in result.chosen) or "defaults"]
        cells += [mean_and_std([job.value(key) for job in runs]) for key in TEST_METRICS.values()]
        cells.append(mean_and_std([Objective(metric).best_value(job) for job in runs]))
        cells.append(mean_and_std([job.seconds for job in runs], digits=0))
        cells.append(str(len(runs)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(results: Sequence[CellResult], setups: Sequence[str], metric: str,
                   header: str, path: Path) -> str:
    """``results.md``: ``header``, then one table a setup with results; returns the text."""
    parts = [header]
    done = {result.cell.setup for result in results}
    for setup in setups:
        if setup in done:
            parts += [f"## {setup}", markdown_table(results, setup, metric)]
    text = "\n\n".join(parts) + "\n"
    path.write_text(text)
    return text


def _short(metric: str) -> str:
    """``val/mean_average_precision_at_r`` -> ``MAP@R`` (the heading of its test column)."""
    name = metric.split("/")[-1]
    headings = {key.split("/")[-1]: heading for heading, key in TEST_METRICS.items()}
    return headings.get(name, name)
