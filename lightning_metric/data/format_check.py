"""Checks of data on disk before training: every problem, named by file, line and column.

A manifest is a CSV, TSV, JSON Lines or Parquet table with a ``label`` column and exactly one of
``path`` (an image file, relative to the manifest's folder or ``root``) or ``text``;
optional columns: ``split`` (train/val/test), ``is_query`` / ``is_gallery`` (1/0/true/
false), ``category``, ``bbox_x1, bbox_y1, bbox_x2, bbox_y2`` (a crop in pixels). Other
columns are ignored.

:func:`check_manifest` runs alone (``lightning_metric.data.check_manifest("m.csv")``)
and returns the problems; the DataModules run the same checks in ``setup`` and raise
one ``ValueError`` listing all of them. Lines are the lines of the file as an editor
shows them (a CSV/TSV header is line 1; a JSON Lines file has no header, its first object
is line 1); a Parquet file has rows (the first item is row 1).

Example::

    >>> for problem in check_manifest("shop/manifest.csv"):
    ...     print(problem)   # shop/manifest.csv, line 7, column 'path': image file not found: ...
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

SPLITS = ("train", "val", "test")
ITEM_COLUMNS = ("path", "text")
FLAG_COLUMNS = ("is_query", "is_gallery")
BOX_COLUMNS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")
TRUE, FALSE = ("1", "true", "1.0"), ("0", "false", "0.0")
SEPARATORS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
PARQUET = (".parquet", ".pq")
JSON_LINES = (".jsonl", ".ndjson")
TABLE_TYPES = ".csv, .tsv, .jsonl or .parquet"
"""The file types :func:`read_table` reads, as error messages list them."""
SHOWN = 100
"""At most this many problems are listed in an error message (all are counted)."""


@dataclass(frozen=True)
class FormatProblem:
    """One problem of a data file.

    Attributes:
        file: the manifest, or the image file.
        line: 1-based line of a CSV/TSV file (header = 1) or a JSON Lines file, or row of a
            Parquet file; None for a problem of the whole file.
        column: the column at fault, or None.
        message: what is wrong, with the value found.
        unit: ``line`` (CSV/TSV/JSON Lines) or ``row`` (Parquet).
    """

    file: str
    line: int | None
    column: str | None
    message: str
    unit: str = "line"

    def __str__(self) -> str:
        where = [self.file]
        if self.line is not None:
            where.append(f"{self.unit} {self.line}")
        if self.column is not None:
            where.append(f"column {self.column!r}")
        return f"{', '.join(where)}: {self.message}"


def raise_problems(problems: Sequence[FormatProblem], what: str) -> None:
    """Raise one ``ValueError`` listing ``problems`` (the first :data:`SHOWN`); no-op if none.

    Raises:
        ValueError: there is at least one problem.
    """
    if not problems:
        return
    lines = [f"  {problem}" for problem in problems[:SHOWN]]
    if len(problems) > SHOWN:
        lines.append(f"  ... and {len(problems) - SHOWN} more")
    raise ValueError(f"{len(problems)} problems in {what}:\n" + "\n".join(lines))


@dataclass
class Manifest:
    """A manifest read and checked row by row (``N`` items); None where a value is bad.

    ``labels`` are label keys (strings; integers written without a decimal point), ``split``
    holds indices into :data:`SPLITS`; optional columns are None when the file lacks them.
    """

    file: Path
    root: Path
    unit: str
    lines: list[int]
    columns: list[str]
    kind: str | None = None
    readable: bool = False
    """The columns are right: the rows could be read."""
    labels: list[str | None] = field(default_factory=list)
    paths: list[Path | None] | None = None
    texts: list[str | None] | None = None
    split: list[int | None] | None = None
    is_query: list[bool | None] | None = None
    is_gallery: list[bool | None] | None = None
    categories: list[str | None] | None = None
    boxes: list[tuple[float, float, float, float] | None] | None = None
    problems: list[FormatProblem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.lines)

    def problem(self, row: int | None, column: str | None, message: str) -> None:
        """Record a problem of row ``row`` (0-based item index; None: the header)."""
        line = self.lines[row] if row is not None else header_line(self.file, self.unit)
        self.problems.append(FormatProblem(str(self.file), line, column, message, self.unit))

    @property
    def blocking(self) -> bool:
        """True when the columns, a label or a split value are broken: no split can be built."""
        return (not self.readable or not self.labels or None in self.labels
                or (self.split is not None and None in self.split))


def read_table(path: Path, setting: str = "data") -> tuple[pd.DataFrame, list[int], str]:
    """A table's cells (CSV/TSV as strings), each item's line (or row) and the unit.

    A JSON Lines file (``.jsonl``, ``.ndjson``) holds one JSON object a line (blank lines
    are skipped); its keys are the columns (a key missing from a line is an empty cell) and
    its values strings, numbers, booleans or null. ``setting`` is the config group that
    messages name (``data.path=...``).

    Raises:
        ValueError: the file name ends in none of .csv, .tsv, .tab, .jsonl, .ndjson,
            .parquet, .pq; a CSV/TSV file pandas cannot parse (its message names the line),
            or an empty one; JSON Lines that are not JSON objects of plain values (every
            such line listed by number).
    """
    suffix = path.suffix.lower()
    if suffix in PARQUET:
        table = pd.read_parquet(path)
        return table, list(range(1, len(table) + 1)), "row"
    if suffix in JSON_LINES:
        return _read_json_lines(path, setting)
    if suffix not in SEPARATORS:
        raise ValueError(f"{setting}.path={str(path)!r}: a table must be a {TABLE_TYPES} file")
    sep = SEPARATORS[suffix]
    try:
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False,
                            skip_blank_lines=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ValueError(f"{setting}.path={str(path)!r} cannot be read as a {suffix[1:].upper()} "
                         f"table: {error}") from error
    lines = _record_lines(path, sep)
    if len(lines) != len(table):  # a layout the csv module reads otherwise: count rows
        lines = list(range(2, len(table) + 2))
    return table, lines, "line"


def header_line(path: str | os.PathLike, unit: str) -> int | None:
    """The line a problem of the whole table's columns points at: 1 (the header) for CSV/TSV,
    None for JSON Lines (no header) and Parquet (rows)."""
    if unit != "line" or Path(path).suffix.lower() in JSON_LINES:
        return None
    return 1


def _read_json_lines(path: Path, setting: str) -> tuple[pd.DataFrame, list[int], str]:
    records, lines, problems = [], [], []
    try:
        with open(path, encoding="utf-8-sig") as stream:
            text_lines = list(stream)
    except UnicodeDecodeError as error:
        raise ValueError(f"{setting}.path={str(path)!r} cannot be read as JSON Lines (UTF-8): "
                         f"{error}") from error
    for number, text in enumerate(text_lines, start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            problems.append(FormatProblem(str(path), number, None, f"not valid JSON: "
                                          f"{error.msg} (character {error.colno})"))
            continue
        if not isinstance(record, dict):
            problems.append(FormatProblem(str(path), number, None, "a line must hold one JSON "
                                          f"object {{\"column\": value, ...}}, got "
                                          f"{type(record).__name__}"))
            continue
        nested = [key for key, value in record.items() if isinstance(value, dict | list)]
        for key in nested:
            problems.append(FormatProblem(str(path), number, key, "a value must be a string, "
                                          f"number, boolean or null, got "
                                          f"{type(record[key]).__name__}"))
        if not nested:
            records.append(record)
            lines.append(number)
    raise_problems(problems, f"{setting}.path={str(path)!r} (JSON Lines: one object a line)")
    columns = list(dict.fromkeys(str(key) for record in records for key in record))
    table = pd.DataFrame(records, columns=columns, dtype=object)
    return table, lines, "line"


def _record_lines(path: Path, sep: str) -> list[int]:
    """The first line of every non-blank data record (quoted fields may span lines)."""
    lines, previous_end = [], 0
    with open(path, newline="", encoding="utf-8-sig") as stream:
        reader = csv.reader(stream, delimiter=sep)
        for number, record in enumerate(reader):
            start, previous_end = previous_end + 1, reader.line_num
            if number and record and any(cell.strip() for cell in record):
                lines.append(start)
    return lines


def parse_manifest(path: str | os.PathLike, root: str | os.PathLike | None = None,
                   check_files: bool = True, num_threads: int | None = None,
                   require_label: bool = True) -> Manifest:
    """Read a manifest and check every cell (and, with ``check_files``, every image file).

    Args:
        path: the .csv, .tsv, .jsonl or .parquet file.
        root: folder the ``path`` column is relative to (default: the manifest's folder).
        check_files: open every image (its header: size and ``PIL`` verify) for missing or
            unreadable files and crop boxes outside the image.
        num_threads: threads reading image headers (default: up to 8).
        require_label: a missing ``label`` column or an empty label is a problem (training,
            evaluation). False (embedding new items): the column may be absent and cells
            empty; ``labels`` then holds None for every unlabelled item.

    Returns:
        The parsed manifest, its problems in ``.problems`` (pair checks excluded: see
        :func:`check_manifest`).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file type is not a manifest's.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.path={str(path)!r} is not a file")
    table, lines, unit = read_table(path)
    manifest = Manifest(path, Path(root) if root is not None else path.parent, unit, lines,
                        [str(c) for c in table.columns])
    manifest.readable = _check_columns(manifest, require_label)
    if not manifest.readable:
        return manifest
    if not len(table):
        manifest.problem(None, None, "the manifest has no items")
    cells = {name: [cell(v) for v in table[name].tolist()] for name in manifest.columns}
    if require_label:
        manifest.labels = _required(manifest, cells["label"], "label", "empty label")
    else:
        manifest.labels = cells.get("label", [None] * len(lines))
    if manifest.kind == "text":
        manifest.texts = _required(manifest, cells["text"], "text", "empty text")
    else:
        manifest.paths = _paths(manifest, cells["path"])
    if "split" in cells:
        manifest.split = _parsed(manifest, cells["split"], "split", _split_code)
    if any(name in cells for name in FLAG_COLUMNS):
        manifest.is_query, manifest.is_gallery = (
            _parsed(manifest, cells[name], name, _flag) if name in cells else [True] * len(lines)
            for name in FLAG_COLUMNS)
    if "category" in cells:
        manifest.categories = _required(manifest, cells["category"], "category",
                                        "empty category")
    if manifest.kind == "image" and BOX_COLUMNS[0] in cells:
        manifest.boxes = _boxes(manifest, [cells[name] for name in BOX_COLUMNS])
    if manifest.kind == "image" and check_files:
        _check_images(manifest, num_threads)
    manifest.problems.sort(key=line_order)
    return manifest


def _check_columns(manifest: Manifest, require_label: bool = True) -> bool:
    """Header problems; False when rows cannot be read (no label (if required), path or text
    column)."""
    found = ", ".join(manifest.columns) or "none"
    has_label = "label" in manifest.columns or not require_label
    if not has_label:
        manifest.problem(None, "label", f"missing required column 'label' (columns found: {found})")
    items = [name for name in ITEM_COLUMNS if name in manifest.columns]
    if len(items) == 2:
        manifest.problem(None, "path", "both a 'path' and a 'text' column: keep one ('path' for "
                         "image files, 'text' for texts)")
    elif not items:
        manifest.problem(None, "path", "missing required column: 'path' (image files) or 'text' "
                         f"(texts) (columns found: {found})")
    else:
        manifest.kind = "image" if items == ["path"] else "text"
    boxes = [name for name in BOX_COLUMNS if name in manifest.columns]
    if boxes and len(boxes) < len(BOX_COLUMNS):
        missing = [name for name in BOX_COLUMNS if name not in boxes]
        manifest.problem(None, missing[0], f"crop boxes need all of {list(BOX_COLUMNS)}; "
                         f"missing {missing}")
    return has_label and manifest.kind is not None and (
        not boxes or len(boxes) == len(BOX_COLUMNS))


def cell(value: Any) -> str | None:
    """A manifest cell as a stripped string (integral floats without ``.0``); None: empty, NaN."""
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return str(int(value))
    text = str(value).strip()
    return text or None


def _required(manifest: Manifest, cells: list[str | None], column: str,
              message: str) -> list[str | None]:
    for row, value in enumerate(cells):
        if value is None:
            manifest.problem(row, column, message)
    return cells


def _parsed(manifest: Manifest, cells: list[str | None], column: str,
            parse: Callable[[str | None], Any]) -> list[Any]:
    values = []
    for row, value in enumerate(cells):
        try:
            values.append(parse(value))
        except ValueError as error:
            manifest.problem(row, column, str(error))
            values.append(None)
    return values


def _split_code(value: str | None) -> int:
    if value is None or value.lower() not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {value!r}")
    return SPLITS.index(value.lower())


def _flag(value: str | None) -> bool:
    lowered = (value or "").lower()
    if lowered in TRUE or lowered in FALSE:
        return lowered in TRUE
    raise ValueError(f"must be one of 1/0/true/false, got {value!r}")


def _paths(manifest: Manifest, cells: list[str | None]) -> list[Path | None]:
    values = _required(manifest, cells, "path", "empty path")
    return [None if value is None else manifest.root / value for value in values]


def _boxes(manifest: Manifest, columns: list[list[str | None]]):
    boxes = []
    for row, values in enumerate(zip(*columns, strict=True)):
        boxes.append(_box(manifest, row, values))
    return boxes


def _box(manifest: Manifest, row: int, values: tuple[str | None, ...]):
    if all(value is None for value in values):
        return None
    numbers = []
    for name, value in zip(BOX_COLUMNS, values, strict=True):
        try:
            number = float(value) if value is not None else math.nan
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            manifest.problem(row, name, f"crop box value must be a number (all four or none), "
                             f"got {value!r}")
            return None
        numbers.append(number)
    x1, y1, x2, y2 = numbers
    for low, high, names in ((x1, x2, BOX_COLUMNS[::2]), (y1, y2, BOX_COLUMNS[1::2])):
        if round(high) <= round(low):
            manifest.problem(row, names[1], f"{names[1]} ({high:g}) must be greater than "
                             f"{names[0]} ({low:g}): the crop is empty")
            return None
    return x1, y1, x2, y2


def image_header(path: Path) -> tuple[int, int] | str:
    """``(width, height)`` of a readable image, or what is wrong with the file."""
    if not path.is_file():
        return f"image file not found: {path}"
    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()
    except Exception as error:  # PIL raises many kinds for broken files
        return f"image file unreadable: {path} ({type(error).__name__}: {error})"
    return size


def image_headers(paths: Sequence[Path], num_threads: int | None = None) -> list:
    """:func:`image_header` of every path, read by a few threads."""
    threads = num_threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(image_header, paths, chunksize=64))


def _check_images(manifest: Manifest, num_threads: int | None) -> None:
    rows = [row for row, path in enumerate(manifest.paths) if path is not None]
    headers = image_headers([manifest.paths[row] for row in rows], num_threads)
    for row, header in zip(rows, headers, strict=True):
        if isinstance(header, str):
            manifest.problem(row, "path", header)
        elif manifest.boxes is not None and manifest.boxes[row] is not None:
            _check_box_inside(manifest, row, manifest.boxes[row], header)


def _check_box_inside(manifest: Manifest, row: int, box: tuple[float, ...],
                      size: tuple[int, int]) -> None:
    width, height = size
    limits = (width, height, width, height)
    for name, value, limit in zip(BOX_COLUMNS, box, limits, strict=True):
        if not 0 <= round(value) <= limit:
            manifest.problem(row, name, f"{name}={value:g} is outside the image "
                             f"({width} x {height} pixels)")
            return


def pair_problems(make: Callable[[int, str], FormatProblem], labels: Sequence[Any],
                  rows_by_split: dict[str, Sequence[int]], needs_pairs: dict[str, str]
                  ) -> list[FormatProblem]:
    """A problem for every label with a single item in a split that needs pairs.

    Args:
        make: ``(row, message) -> FormatProblem`` naming that row's file and line.
        labels: label of every row (as shown to the user).
        rows_by_split: the rows of each split.
        needs_pairs: split -> why it needs two items a label.
    """
    problems = []
    for split, why in needs_pairs.items():
        rows = rows_by_split.get(split, ())
        counts = Counter(labels[row] for row in rows)
        for row in rows:
            if counts[labels[row]] == 1:
                problems.append(make(row, f"label {labels[row]!r} has a single item in the "
                                     f"{split} split, which needs two or more ({why})"))
    return problems


def query_problems(make: Callable[[int, str], FormatProblem], labels: Sequence[Any],
                   rows: Sequence[int], is_query: Sequence[bool], is_gallery: Sequence[bool],
                   split: str) -> list[FormatProblem]:
    """A problem for every query of ``rows`` without another gallery item of its label."""
    gallery = Counter(labels[row] for row in rows if is_gallery[row])
    return [
        make(row, f"query of label {labels[row]!r} has no gallery item of its label in the "
                  f"{split} split")
        for row in rows
        if is_query[row] and gallery[labels[row]] - bool(is_gallery[row]) < 1
    ]


def check_manifest(path: str | os.PathLike, root: str | os.PathLike | None = None, *,
                   sampler: str = "class", m_per_class: int = 2, check_files: bool = True,
                   num_threads: int | None = None) -> list[FormatProblem]:
    """Every problem of a manifest, as the DataModule would find it before training.

    Checks columns, every cell (labels, texts, image paths and files, splits, query/gallery
    flags, categories, crop boxes) and pairs: a label with one item in a split that needs
    two (a self-retrieval val/test split; train under ``sampler="class"`` with
    ``m_per_class >= 2``), a query without a gallery item of its label. Without a
    ``split`` column the whole file is checked as one split.

    Args:
        path: the .csv, .tsv or .parquet manifest.
        root: folder the ``path`` column is relative to (default: the manifest's folder).
        sampler, m_per_class: the training batches' settings (``data.sampler`` ...).
        check_files: open every image file's header.
        num_threads: threads reading image headers.

    Returns:
        The problems, in file order; empty when the manifest is fine.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file name is not a manifest's (.csv, .tsv, .parquet).
    """
    manifest = parse_manifest(path, root, check_files=check_files, num_threads=num_threads)
    if not manifest.readable or not manifest.labels:
        return manifest.problems
    usable = [row for row in range(len(manifest)) if manifest.labels[row] is not None]
    if manifest.split is None:
        rows_by_split = {"all": usable}
    else:
        rows_by_split = {name: [row for row in usable if manifest.split[row] == code]
                         for code, name in enumerate(SPLITS)}
    problems = manifest.problems + split_problems(manifest, rows_by_split, sampler, m_per_class)
    return sorted(problems, key=line_order)


def line_order(problem: FormatProblem) -> int:
    """Sort key: problems of the whole file first, then by line."""
    return -1 if problem.line is None else problem.line


def split_problems(manifest: Manifest, rows_by_split: dict[str, Sequence[int]], sampler: str,
                   m_per_class: int, origin: dict[str, str] | None = None
                   ) -> list[FormatProblem]:
    """Pair and query problems of the manifest's rows in the given splits (``origin``: how a
    split was made, where the manifest did not give it, added to the messages)."""
    def make(row: int, message: str) -> FormatProblem:
        column = "is_query" if message.startswith("query") else "label"
        return FormatProblem(str(manifest.file), manifest.lines[row], column, message,
                             manifest.unit)

    roles = manifest.is_query is not None
    needs = {}
    if sampler == "class" and m_per_class >= 2:
        for split in ("train", "all"):
            needs[split] = f"class-balanced batches with data.m_per_class={m_per_class}"
    if not roles:
        for split in ("val", "test", "all"):
            needs.setdefault(split, "; ".join(["every item is a query retrieving among the "
                                               "others", *([origin[split]] if split in
                                                           (origin or {}) else [])]))
    problems = pair_problems(make, manifest.labels, rows_by_split, needs)
    if roles:
        for split in ("val", "test", "all"):
            if split in rows_by_split:
                usable = [row for row in rows_by_split[split]
                          if manifest.is_query[row] is not None
                          and manifest.is_gallery[row] is not None]
                problems += query_problems(make, manifest.labels, usable, manifest.is_query,
                                           manifest.is_gallery, split)
    return problems
