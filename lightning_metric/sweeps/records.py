"""One sweep job's record: what ran, how it ended, what it measured.

Every job of a multirun leaves, in its own folder, Hydra's ``.hydra/`` (its
overrides), the recipe's ``metrics.json`` and ``checkpoint.json``, and the
``job.json`` that :class:`~lightning_metric.sweeps.SweepCallback` writes when the
job ends (status, error, wall time). :func:`read_job` turns such a folder into a
:class:`JobRecord`, whatever state the job was left in.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

COMPLETED, FAILED, UNFINISHED = "completed", "failed", "unfinished"
JOB_FILE, METRICS_FILE, CHECKPOINT_FILE = "job.json", "metrics.json", "checkpoint.json"


@dataclass
class JobRecord:
    """A sweep job, read back from its folder.

    ``overrides`` maps each task override's key (``loss.margin``, ``loss``) to its
    value as typed on the command line; ``metrics`` holds ``metrics.json``'s
    ``stage/name`` values; ``status`` is ``completed``, ``failed`` (``error`` says
    why) or ``unfinished`` (the job never reported its end: still running, killed,
    or timed out).
    """

    number: int
    folder: Path
    overrides: dict[str, str]
    status: str
    error: str = ""
    seconds: float = math.nan
    checkpoint: str = ""
    metrics: dict[str, float] = field(default_factory=dict)

    def value(self, name: str) -> float:
        return self.metrics.get(name, math.nan)


def split_override(override: str) -> tuple[str, str]:
    """``"loss.margin=20"`` -> ``("loss.margin", "20")`` (``+``/``++``/``~`` prefixes kept)."""
    key, _, value = override.partition("=")
    return key, value


def write_json_atomically(path: Path, content: dict) -> None:
    """Write ``content`` to ``path`` through a temporary file, so that a reader (another
    job of the same sweep) never sees half a file."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as stream:
        json.dump(content, stream, indent=2)
        stream.write("\n")
    os.replace(temporary, path)


def write_job_file(folder: Path, number: int, overrides: list[str], status: str, error: str,
                   seconds: float) -> None:
    write_json_atomically(folder / JOB_FILE, {
        "number": number, "overrides": overrides, "status": status, "error": error,
        "seconds": seconds,
    })


def read_job(folder: Path) -> JobRecord:
    """The record of the job whose Hydra output folder is ``folder``.

    Raises:
        FileNotFoundError: ``folder`` has neither ``job.json`` nor ``.hydra/hydra.yaml``.
    """
    job_file = folder / JOB_FILE
    if job_file.is_file():
        job = json.loads(job_file.read_text())
    else:  # the job started (Hydra wrote its config) but never reported its end
        hydra = OmegaConf.load(folder / ".hydra" / "hydra.yaml").hydra
        job = {"number": int(hydra.job.num), "overrides": list(hydra.overrides.task),
               "status": UNFINISHED, "error": "", "seconds": math.nan}
    metrics_file, checkpoint_file = folder / METRICS_FILE, folder / CHECKPOINT_FILE
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    checkpoint = json.loads(checkpoint_file.read_text()) if checkpoint_file.is_file() else {}
    return JobRecord(
        number=int(job["number"]),
        folder=folder,
        overrides=dict(split_override(o) for o in job["overrides"]),
        status=job["status"],
        error=job["error"],
        seconds=float(job["seconds"]) if job["seconds"] is not None else math.nan,
        checkpoint=checkpoint.get("path") or "",
        metrics=metrics,
    )


def read_jobs(sweep_dir: Path) -> list[JobRecord]:
    """Every job folder under ``sweep_dir`` (found by its ``.hydra/hydra.yaml``), by number."""
    folders = {path.parent.parent for path in sweep_dir.rglob(".hydra/hydra.yaml")}
    return sorted((read_job(folder) for folder in folders), key=lambda job: job.number)
