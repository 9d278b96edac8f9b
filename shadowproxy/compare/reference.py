"""The reference sample of each feature: a training-data file, or an earlier window.

Both sources are reduced to the same ``FeatureData``: counts, basic statistics, category
counts and a numeric sample (at most ``sample_max`` values) for the plots; a file's
``FeatureData`` also keeps the whole column (``values``), which the drift tests take row by
row (``column``), so that shares and the missing share are the file's own. A file's columns
are named like the features; a CSV file is read with the csv module (column types inferred
as pyarrow infers them), a Parquet file with pyarrow (from the ``report`` extra).
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shadowproxy.compare.config import FeatureConfig
from shadowproxy.compare.extras import is_parquet
from shadowproxy.errors import UsageError


@dataclass
class FeatureData:
    """One feature's values in one sample (the current window, or the reference)."""

    n_rows: int
    n_missing: int
    n_numeric: int
    n_unique: int
    stats: dict[str, Any]
    n_zero: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    sample: np.ndarray = field(default_factory=lambda: np.zeros(0))
    histogram: list[int] | None = None
    values: list[Any] | None = None

    @property
    def n_present(self) -> int:
        return self.n_rows - self.n_missing


def from_summary(row: Mapping[str, Any]) -> FeatureData:
    """FeatureData from a feature's summary row (the sample and counts come later)."""
    def f(key: str) -> float | None:
        return None if row[key] is None else float(row[key])

    return FeatureData(
        n_rows=int(row["n_rows"]), n_missing=int(row["n_missing"]),
        n_numeric=int(row["n_numeric"]), n_unique=int(row["n_unique"]),
        n_zero=int(row["n_zero"]),
        stats={"mean": f("mean"), "median": f("median"), "sd": f("sd"), "min": f("min"),
               "max": f("max")})


def category_text(value: Any) -> str:
    """A value's text as a category: booleans as JSON writes them, whole numbers without a
    fractional part (a float column's ``1.0`` is the category a client's ``1`` is; the live
    side's text comes from ``extract.category_sql``, which writes them alike)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _missing(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, float) and np.isnan(value))


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def column(values: list[Any], numeric: bool) -> np.ndarray:
    """A file's column, one entry per row, as the drift tests take it: a float (NaN where
    the value is missing or not a number), or the value's text (None where missing)."""
    if numeric:
        return np.array([float(v) if _number(v) else np.nan for v in values], dtype=np.float64)
    return np.array([None if _missing(v) else category_text(v) for v in values], dtype=object)


def _parquet_columns(path: Path) -> dict[str, list[Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise UsageError(f"--reference {path}: cannot read it: {exc}") from exc
    return {name: table.column(name).to_pylist() for name in table.column_names}


# Cells read as missing in a column of numbers or booleans (pyarrow's defaults); in a column of
# text only the empty cell is missing.
_NULLS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan",
                    "1.#IND", "1.#QNAN", "N/A", "NA", "NULL", "NaN", "n/a", "nan", "null"})
_BOOLS = {"true": True, "True": True, "TRUE": True, "false": False, "False": False,
          "FALSE": False}


def _parses(cells: list[str], kind: type) -> bool:
    try:
        for cell in cells:
            kind(cell)
    except ValueError:
        return False
    return True


def _typed(cells: list[str]) -> list[Any]:
    """A CSV column as values of one type, inferred over its cells as pyarrow does: whole
    numbers, else numbers, else booleans, else text."""
    given = [c for c in cells if c not in _NULLS]
    if not given:
        return [None] * len(cells)
    for kind in (int, float):
        if _parses(given, kind):
            return [None if c in _NULLS else kind(c) for c in cells]
    if all(c in _BOOLS for c in given):
        return [None if c in _NULLS else _BOOLS[c] for c in cells]
    return list(cells)


def _csv_columns(path: Path, wanted: list[str]) -> dict[str, list[Any]]:
    """The ``wanted`` columns of a CSV file (gzip-compressed if it ends in .gz), typed."""
    try:
        with (gzip.open(path, "rt", newline="", encoding="utf-8-sig")
              if path.suffix.lower() == ".gz"
              else path.open(newline="", encoding="utf-8-sig")) as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise UsageError(f"--reference {path}: cannot read it: the file is empty; "
                                 "expected a header row naming the columns")
            index = {name: i for i, name in enumerate(header)}
            keep = [(name, index[name]) for name in wanted if name in index]
            cells: dict[str, list[str]] = {name: [] for name, _ in keep}
            for row in reader:
                if len(row) != len(header):
                    if not row:
                        continue
                    raise UsageError(
                        f"--reference {path}: cannot read it: line {reader.line_num} has "
                        f"{len(row)} cells, the header {len(header)}")
                for name, i in keep:
                    cells[name].append(row[i])
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"--reference {path}: cannot read it: {exc}") from exc
    columns: dict[str, list[Any]] = {name: [] for name in header}
    columns.update({name: _typed(values) for name, values in cells.items()})
    return columns


def read_reference(path: Path, features: dict[str, FeatureConfig], *, sample_max: int,
                   seed: int) -> dict[str, FeatureData]:
    """Each feature's column of a CSV or Parquet file; UsageError names what is wrong.

    CSV files (``.csv``, ``.csv.gz``) are read with the csv module; Parquet needs pyarrow.
    """
    name = path.name.lower()
    if is_parquet(path):
        columns = _parquet_columns(path)
    elif name.endswith(".csv") or name.endswith(".csv.gz"):
        columns = _csv_columns(path, list(features))
    else:
        raise UsageError(f"--reference {path}: expected a .csv, .csv.gz or .parquet file")
    missing = [name for name in features if name not in columns]
    if missing:
        raise UsageError(
            f"--reference {path}: no column for the features {missing}; the file has the "
            f"columns {list(columns)[:30]}; name the columns like the features in "
            "compare.features")
    rng = np.random.default_rng(seed)
    out = {}
    for name in features:
        values = columns[name]
        present = [v for v in values if not _missing(v)]
        numeric = np.array([float(v) for v in present if _number(v)], dtype=np.float64)
        counts: dict[str, int] = {}
        for v in present:
            key = category_text(v)
            counts[key] = counts.get(key, 0) + 1
        sample = numeric if numeric.size <= sample_max else rng.choice(
            numeric, sample_max, replace=False)
        out[name] = FeatureData(
            n_rows=len(values), n_missing=len(values) - len(present), n_numeric=int(numeric.size),
            n_unique=len(counts), n_zero=int(np.sum(numeric == 0)),
            stats=_numeric_stats(numeric), counts=counts, sample=sample, values=values)
    return out


def _numeric_stats(x: np.ndarray) -> dict[str, Any]:
    if x.size == 0:
        return {"mean": None, "median": None, "sd": None, "min": None, "max": None}
    return {"mean": float(np.mean(x)), "median": float(np.median(x)),
            "sd": float(np.std(x, ddof=1)) if x.size > 1 else None,
            "min": float(np.min(x)), "max": float(np.max(x))}
