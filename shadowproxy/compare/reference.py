"""The reference sample of each feature: a training-data file, or an earlier window.

Both sources are reduced to the same ``FeatureData``: counts, basic statistics, category
counts and a numeric sample (at most ``sample_max`` values) for the tests. A file is read
with pyarrow (CSV or Parquet, chosen by suffix); its columns are named like the features.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shadowproxy.compare.config import FeatureConfig
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


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def read_reference(path: Path, features: dict[str, FeatureConfig], *, sample_max: int,
                   seed: int) -> dict[str, FeatureData]:
    """Each feature's column of a CSV or Parquet file; UsageError names what is wrong."""
    import pyarrow as pa

    suffix = "".join(path.suffixes[-2:]).lower()
    try:
        if suffix.endswith(".parquet") or suffix.endswith(".pq"):
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        elif suffix.endswith(".csv") or suffix.endswith(".csv.gz"):
            import pyarrow.csv as pcsv

            table = pcsv.read_csv(path)
        else:
            raise UsageError(f"--reference {path}: expected a .csv, .csv.gz or .parquet file")
    except (OSError, pa.ArrowInvalid) as exc:
        raise UsageError(f"--reference {path}: cannot read it: {exc}") from exc
    missing = [name for name in features if name not in table.column_names]
    if missing:
        raise UsageError(
            f"--reference {path}: no column for the features {missing}; the file has the "
            f"columns {table.column_names[:30]}; name the columns like the features in "
            "compare.features")
    rng = np.random.default_rng(seed)
    out = {}
    for name in features:
        values = table.column(name).to_pylist()
        present = [v for v in values if v is not None and v != "" and not (
            isinstance(v, float) and np.isnan(v))]
        numeric = np.array([float(v) for v in present
                            if isinstance(v, int | float) and not isinstance(v, bool)],
                           dtype=np.float64)
        counts: dict[str, int] = {}
        for v in present:
            key = _text(v)
            counts[key] = counts.get(key, 0) + 1
        sample = numeric if numeric.size <= sample_max else rng.choice(
            numeric, sample_max, replace=False)
        out[name] = FeatureData(
            n_rows=len(values), n_missing=len(values) - len(present), n_numeric=int(numeric.size),
            n_unique=len(counts), n_zero=int(np.sum(numeric == 0)),
            stats=_numeric_stats(numeric), counts=counts, sample=sample)
    return out


def _numeric_stats(x: np.ndarray) -> dict[str, Any]:
    if x.size == 0:
        return {"mean": None, "median": None, "sd": None, "min": None, "max": None}
    return {"mean": float(np.mean(x)), "median": float(np.median(x)),
            "sd": float(np.std(x, ddof=1)) if x.size > 1 else None,
            "min": float(np.min(x)), "max": float(np.max(x))}
