"""Which loss should I use? Losses trained side by side, chosen on validation, over seeds."""

from .figure import umap_figure
from .plan import Cell, ComparisonPlan
from .report import markdown_table, run_rows, write_csv, write_markdown
from .runner import CellResult, best_job, run_cell, run_multirun

__all__ = ["Cell", "CellResult", "ComparisonPlan", "best_job", "markdown_table", "run_cell",
           "run_multirun", "run_rows", "umap_figure", "write_csv", "write_markdown"]
