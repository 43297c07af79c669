"""The Hydra callback that makes a multirun readable (enabled in ``conf/train.yaml``).

- ``on_multirun_start``: :func:`~lightning_metric.sweeps.checks.check_sweep`, so a bad
  key or value stops the sweep before its first job trains;
- ``on_job_end``: the job's ``job.json`` (status, error, wall time) in its folder and,
  in a multirun, the sweep's summary and picture brought up to date, so that they
  exist even when the sweep itself ends on an error;
- ``on_multirun_end``: the summary, the picture, Optuna's history and importance
  plots (for Optuna searches), and the ranking with the command that repeats the
  best job, printed.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from .checks import SweepConfigError, check_sweep
from .plots import HEATMAP_FILE, plot_optuna, plot_sweep, swept_parameters
from .records import COMPLETED, FAILED, JobRecord, read_jobs, write_job_file
from .summary import MARKDOWN_FILE, Objective, best_command, write_summary


class SweepCallback(Callback):
    """Summarise every multirun: ``sweep_summary.csv``/``.md``, ``sweep_heatmap.png``.

    Args:
        monitor: the metric the sweep is about (the recipe's ``optimized_metric``).
        mode: ``max`` or ``min``: which way is better.
        command: the command the printed best job's overrides are appended to.
        check: compose and build every job before the first one trains.
    """

    def __init__(self, monitor: str, mode: str = "max", command: str = "python -m recipes.train",
                 check: bool = True):
        self.objective = Objective(monitor, mode)
        self.command = command
        self.check = check
        self._started = math.nan

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.check:
            try:
                check_sweep(config)
            except SweepConfigError as error:
                # Hydra turns a callback's exceptions into warnings; a sweep that cannot
                # run must stop here, before its first job.
                raise SystemExit(str(error)) from None

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._started = time.perf_counter()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if rank_zero_only.rank != 0:  # a DDP job's other processes (Lightning's, Slurm's tasks)
            return
        try:
            job_return.return_value  # noqa: B018 - raises the job's exception when it failed
            status, error = COMPLETED, ""
        except Exception as failure:  # noqa: BLE001 - every failure is recorded, not raised
            status, error = FAILED, f"{type(failure).__name__}: {failure}"
        output_dir = Path(config.hydra.runtime.output_dir)
        number = OmegaConf.select(config, "hydra.job.num", default=None)  # missing: a single run
        write_job_file(output_dir, int(number or 0), list(config.hydra.overrides.task),
                       status, error, time.perf_counter() - self._started)
        if config.hydra.mode == RunMode.MULTIRUN:
            sweep_dir = _sweep_dir(output_dir, str(config.hydra.sweep.subdir))
            self.write_report(sweep_dir, read_jobs(sweep_dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = read_jobs(sweep_dir)
        drawn = self.write_report(sweep_dir, jobs)
        if _is_optuna(config):
            plot_optuna(jobs, self.objective, sweep_dir)
        print(self.ranking(sweep_dir, jobs, drawn))

    def write_report(self, sweep_dir: Path, jobs: list[JobRecord]) -> str | None:
        """The summary tables and the picture; returns which picture (None: none)."""
        write_summary(sweep_dir, jobs, self.objective)
        return plot_sweep(jobs, self.objective, sweep_dir / HEATMAP_FILE)

    def ranking(self, sweep_dir: Path, jobs: list[JobRecord], drawn: str | None) -> str:
        """What the end of a multirun prints: the jobs best first and the best one's command."""
        swept = swept_parameters(jobs)
        without = sum(job.status != COMPLETED for job in jobs)
        lines = [f"Sweep of {len(jobs)} jobs ({without} without a value): "
                 f"{sweep_dir / MARKDOWN_FILE}"
                 + (f", {drawn} in {sweep_dir / HEATMAP_FILE}" if drawn
                    else f" (no picture for {len(swept)} swept parameters)")]
        for job in self.objective.ranked(jobs):
            value = self.objective.best_value(job)
            shown = " ".join(f"{key}={job.overrides.get(key, '')}" for key in swept)
            result = f"{value:.4f}" if job.status == COMPLETED else job.status
            lines.append(f"  job {job.number:>3}  {result:>10}  {shown}")
        command = best_command(jobs, self.objective, self.command)
        if command:
            best = self.objective.ranked(jobs)[0]
            lines.append(f"Best: job {best.number} ({self.objective.best_column} = "
                         f"{self.objective.best_value(best):.4f}); repeat it with:\n  {command}")
        return "\n".join(lines)


def _sweep_dir(output_dir: Path, subdir: str) -> Path:
    """The multirun folder above a job's ``output_dir`` (``hydra.sweep.subdir`` deep)."""
    return output_dir.parents[len(Path(subdir).parts) - 1]


def _is_optuna(config: DictConfig) -> bool:
    return "optuna" in str(OmegaConf.select(config, "hydra.sweeper._target_", default="")).lower()
