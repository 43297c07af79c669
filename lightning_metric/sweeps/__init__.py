"""Readable sweeps: a summary table, a picture and early checks for every Hydra multirun.

``SweepCallback`` is the Hydra callback ``conf/train.yaml`` enables; the modules
below it can be used alone (``read_jobs`` + ``write_summary`` on any finished
multirun folder).
"""

from .callback import SweepCallback
from .checks import SweepConfigError, check_sweep
from .plots import plot_optuna, plot_sweep
from .records import JobRecord, read_jobs
from .summary import Objective, best_command, write_summary

__all__ = [
    "JobRecord",
    "Objective",
    "SweepCallback",
    "SweepConfigError",
    "best_command",
    "check_sweep",
    "plot_optuna",
    "plot_sweep",
    "read_jobs",
    "write_summary",
]
