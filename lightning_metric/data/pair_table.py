"""Rows of paired fields read from a table (CSV, TSV, JSON Lines or Parquet), checked cell by cell.

One row is one training example: texts and image paths in named columns (the ``fields``
of :class:`~lightning_metric.data.PairDataModule`), optionally a numeric target, a
split and a group. :func:`read_pair_file` reads a file and records every problem by
file, line (as an editor shows it; a CSV/TSV header is line 1, a JSON Lines file's first
object is line 1; a Parquet file has rows) and column, as
:func:`~lightning_metric.data.check_manifest` does for manifests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .format_check import (
    SPLITS,
    FormatProblem,
    cell,
    header_line,
    image_headers,
    line_order,
    read_table,
)


@dataclass
class PairFile:
    """One file's rows (``N``), None where a cell is bad.

    Attributes:
        file: the table.
        columns: its columns.
        lines: the line (or row) of every row.
        unit: ``line`` (CSV/TSV/JSON Lines) or ``row`` (Parquet).
        values: per field (in ``fields`` order), every row's text or image path (absolute,
            as a string).
        target: every row's target as read (not yet scaled), or None without a target column.
        split: every row's split code (0 train, 1 val, 2 test), None without a split column.
        group: every row's group, None without a group column.
        problems: every problem found, in file order.
        bad_rows: the rows with a problem.
    """

    file: Path
    columns: list[str]
    lines: list[int]
    unit: str
    values: list[list[str | None]] = field(default_factory=list)
    target: list[float | None] | None = None
    split: list[int | None] | None = None
    group: list[str | None] | None = None
    problems: list[FormatProblem] = field(default_factory=list)
    bad_rows: set[int] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.lines)

    def problem(self, row: int | None, column: str | None, message: str) -> None:
        """Record a problem of row ``row`` (0-based; None: the whole file / its header)."""
        line = self.lines[row] if row is not None else header_line(self.file, self.unit)
        self.problems.append(FormatProblem(str(self.file), line, column, message, self.unit))
        if row is not None:
            self.bad_rows.add(row)


def read_pair_file(path: str | Path, fields: Mapping[str, str], *,
                   image_fields: Sequence[str] = (), target: str | None = None,
                   split: str | None = None, split_optional: bool = False,
                   group: str | None = None,
                   root: str | Path | None = None, check_files: bool = True,
                   num_threads: int | None = None, setting: str = "data",
                   field_settings: Mapping[str, str] | None = None) -> PairFile:
    """Read a table of paired fields and check every cell it needs.

    Args:
        path: the .csv, .tsv, .jsonl or .parquet file.
        fields: role -> column, in the batch's order.
        image_fields: the roles whose column holds image paths (the others hold texts).
        target: the target column, or None.
        split: the split column (train/val/test), or None.
        split_optional: a missing ``split`` column is no problem (the rows have no split).
        group: the group column (rows cut into one split together), or None.
        root: folder image paths are relative to (default: the file's folder).
        check_files: open every distinct image's header (missing, unreadable files).
        num_threads: threads reading image headers.
        setting: the config group messages name (``data``: ``data.path``,
            ``data.fields.query``, ``data.target`` ...).
        field_settings: role -> the setting its column comes from, as messages name it
            (default ``<setting>.fields.<role>``).

    Returns:
        The rows; a missing column leaves ``values`` empty and a problem naming the column,
        the setting and the columns found.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: not a .csv / .tsv / .jsonl / .parquet file, or one that cannot be parsed
            (JSON Lines: every bad line by number).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{setting}.path={str(path)!r} is not a file")
    table, lines, unit = read_table(path, setting)
    pairs = PairFile(path, [str(c) for c in table.columns], lines, unit)
    if not len(table) and not pairs.columns:  # an empty JSON Lines file
        pairs.problem(None, None, "the file has no rows")
        return pairs
    found = ", ".join(pairs.columns) or "none"
    if split_optional and split not in pairs.columns:
        split = None
    named = dict(field_settings or {})
    wanted = [(named.get(role, f"{setting}.fields.{role}"), column)
              for role, column in fields.items()]
    wanted += [(f"{setting}.{name}", column) for name, column in
               (("target", target), ("split", split), ("group", group)) if column is not None]
    missing = [(setting, column) for setting, column in wanted if column not in pairs.columns]
    for setting, column in missing:
        pairs.problem(None, column, f"missing column {column!r} ({setting}; columns found: "
                                    f"{found})")
    if missing:
        return pairs
    if not len(table):
        pairs.problem(None, None, "the file has no rows")
    base = Path(root) if root is not None else path.parent
    for role, column in fields.items():
        cells = [cell(value) for value in table[column].tolist()]
        image = role in image_fields
        for row, value in enumerate(cells):
            if value is None:
                pairs.problem(row, column, "empty image path" if image else "empty text")
        pairs.values.append([None if v is None else str(base / v) for v in cells] if image
                            else cells)
    if target is not None:
        pairs.target = [_number(pairs, row, target, cell(value))
                        for row, value in enumerate(table[target].tolist())]
    if split is not None:
        pairs.split = [_split(pairs, row, split, cell(value))
                       for row, value in enumerate(table[split].tolist())]
    if group is not None:
        pairs.group = [cell(value) for value in table[group].tolist()]
        for row, value in enumerate(pairs.group):
            if value is None:
                pairs.problem(row, group, "empty group")
    if check_files:
        for role, column in fields.items():
            if role in image_fields:
                _check_images(pairs, pairs.values[list(fields).index(role)], column, num_threads)
    pairs.problems.sort(key=line_order)
    return pairs


def _number(pairs: PairFile, row: int, column: str, value: str | None) -> float | None:
    try:
        number = float(value) if value is not None else math.nan
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        pairs.problem(row, column, f"target must be a number, got {value!r}")
        return None
    return number


def _split(pairs: PairFile, row: int, column: str, value: str | None) -> int | None:
    if value is None or value.lower() not in SPLITS:
        pairs.problem(row, column, f"split must be one of {list(SPLITS)}, got {value!r}")
        return None
    return SPLITS.index(value.lower())


def _check_images(pairs: PairFile, paths: list[str | None], column: str,
                  num_threads: int | None) -> None:
    distinct = sorted({p for p in paths if p is not None})
    headers = dict(zip(distinct, image_headers([Path(p) for p in distinct], num_threads),
                       strict=True))
    for row, value in enumerate(paths):
        if value is not None and isinstance(headers[value], str):
            pairs.problem(row, column, headers[value])


def check_targets(pairs: PairFile, column: str, low: float, high: float, setting: str) -> None:
    """A problem for every target outside ``[low, high]`` (``setting`` names where the
    range comes from, e.g. ``data.target_range=[0, 5]``)."""
    for row, value in enumerate(pairs.target or ()):
        if value is not None and not low <= value <= high:
            pairs.problem(row, column, f"target {value:g} is outside {setting}")
    pairs.problems.sort(key=line_order)
