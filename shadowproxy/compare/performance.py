"""The report's ``performance`` section: each model against the imported ground truth.

Labels (``shadowproxy.labels``) join the loaded ``Predictions`` by request id, element by
element for batches (a JSON array label). Only the rows labelled for both sides are
compared: a seeded sample of at most ``sample_max`` of them comes back to Python for the
metrics and paired tests of ``metrics.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Required, TypedDict, cast

import numpy as np

from shadowproxy.compare.metrics import classification_performance, regression_performance
from shadowproxy.compare.predictions import Predictions, Sides, positive_class
from shadowproxy.compare.snapshot import Snapshot

LABEL_SQL = ("CASE WHEN jsonb_typeof(l.label) = 'array' THEN l.label ->> (p.ord::int - 1) "
             "WHEN p.ord = 1 THEN l.label #>> '{}' END")
"""A prediction row ``p``'s label as text, from the joined label ``l`` (batches by position)."""


@dataclass(frozen=True)
class LabelCounts:
    """How many predictions have a label (per side and for both)."""

    n: int
    primary_labelled: int
    shadow_labelled: int
    both_labelled: int


class Coverage(TypedDict):
    predictions: int
    labelled_both: int
    coverage: float | None


class LabelSample(TypedDict):
    n: int
    of: int
    sampled: bool


class PerformanceSection(TypedDict, total=False):
    """The JSON ``performance`` section; without labelled rows only ``why`` follows."""

    n_labelled: Required[Sides]
    labels: Required[Coverage]
    why: str
    sample: LabelSample
    n_labelled_both: int
    primary: dict[str, Any]
    shadow: dict[str, Any]
    paired_test: dict[str, Any]
    confidence_intervals: dict[str, Any]
    shadow_better: bool
    positive_class: str | None


def is_number(text: Any) -> bool:
    """Whether a label's text is a finite number."""
    try:
        return text is not None and math.isfinite(float(text))
    except ValueError:
        return False


_CLASS_DIGITS = 4000
"""Whole numbers of at most this many digits are written out as one class; longer ones
(``1e999999``) stay as written rather than become a number of that many digits."""


def class_text(text: str | None) -> str:
    """Class labels compare as text; 1.0 and 1 name the same class.

    A whole number is read exactly (``Decimal``): read as a float, two classes past 2^53
    such as item ids 9007199254740992 and 9007199254740993 were one, and a wrong prediction
    of one for the other counted as right.
    """
    if text is None:
        return ""
    try:
        d = Decimal(text)
    except InvalidOperation:
        return text
    if d.is_finite() and d == d.to_integral_value() and d.adjusted() < _CLASS_DIGITS:
        return str(int(d))
    return text


_AS_BOOLEAN = {"0": "false", "1": "true", "false": "false", "true": "true"}
_AS_BIT = {"0": "0", "1": "1", "false": "0", "true": "1"}


def as_predicted(labels: list[str], predicted: set[str]) -> list[str]:
    """Labels (``class_text``) written as the models write their classes when the two are
    the same binary classes spelled apart: 0/1 or true/false labels, in any case (pandas
    writes booleans ``True`` and ``False``), for models that answer booleans or 0/1. A
    labels file of 0 and 1 is the common form of ground truth for a yes/no model; compared
    as text, no label matched a prediction, and accuracy, precision, recall and F1 were 0
    on both sides."""
    for spelling in (_AS_BOOLEAN, _AS_BIT):
        if predicted <= set(spelling.values()):
            mapped = [spelling.get(y) or spelling.get(y.lower()) for y in labels]
            if all(mapped):
                return cast(list[str], mapped)
    return labels


async def label_counts(db: Snapshot, preds: Predictions) -> LabelCounts:
    row = await db.fetchrow(f"""
        SELECT count(*) AS n,
               count(y) FILTER (WHERE p IS NOT NULL) AS primary_labelled,
               count(y) FILTER (WHERE s IS NOT NULL) AS shadow_labelled,
               count(y) FILTER (WHERE p IS NOT NULL AND s IS NOT NULL) AS both_labelled
        FROM (SELECT p.p, p.s, {LABEL_SQL} AS y FROM {preds.table} p
              LEFT JOIN shadowproxy.labels l ON l.request_id = p.request_id) x""")
    return LabelCounts(n=int(row["n"]), primary_labelled=int(row["primary_labelled"]),
                       shadow_labelled=int(row["shadow_labelled"]),
                       both_labelled=int(row["both_labelled"]))


async def build(db: Snapshot, preds: Predictions) -> PerformanceSection:
    """Metrics of both models on the rows labelled for both, and the paired comparison."""
    counts = await label_counts(db, preds)
    out = PerformanceSection(
        n_labelled=Sides(primary=counts.primary_labelled, shadow=counts.shadow_labelled),
        labels=Coverage(predictions=counts.n, labelled_both=counts.both_labelled,
                        coverage=counts.both_labelled / counts.n if counts.n else None))
    if not counts.both_labelled:
        out["why"] = ("no labelled predictions: load ground truth with "
                      "`shadowproxy labels import -c FILE LABELS.csv`")
        return out
    sample = db.sample_clause(counts.both_labelled, "id::text || ':' || ord")
    # In a fixed order: the bootstrap resamples rows by position, so rows in the order the
    # join gave them (the records' places on disk, the plan the labels table's size chose)
    # gave other intervals for the same seed and records.
    rows = await db.fetch(f"""
        SELECT y, pt, st, pn, sn, ps, ss FROM (
          SELECT {LABEL_SQL} AS y, p.* FROM {preds.table} p
          JOIN shadowproxy.labels l ON l.request_id = p.request_id) x
        WHERE y IS NOT NULL AND pt IS NOT NULL AND st IS NOT NULL AND {sample}
        ORDER BY id, ord""")
    out["sample"] = LabelSample(n=len(rows), of=counts.both_labelled,
                                sampled=len(rows) < counts.both_labelled)
    seed = db.scope.seed
    if preds.task == "regression":
        keep = [r for r in rows if r["pn"] is not None and r["sn"] is not None
                and is_number(r["y"])]
        if not keep:
            out["why"] = "the labels are not numbers, but the task is regression"
            return out
        y = np.array([float(r["y"]) for r in keep])
        p = np.array([r["pn"] for r in keep], dtype=np.float64)
        s = np.array([r["sn"] for r in keep], dtype=np.float64)
        out.update(cast(PerformanceSection, regression_performance(y, p, s, seed=seed)))
        return out
    p_t = np.array([class_text(r["pt"]) for r in rows])
    s_t = np.array([class_text(r["st"]) for r in rows])
    y_t = np.array(as_predicted([class_text(r["y"]) for r in rows], set(p_t) | set(s_t)))
    pc = positive_class(db.compare, set(y_t) | set(p_t) | set(s_t))
    # The classes here are compared as class_text writes them (1.0 and 1 are class "1"), so
    # the positive class is too: a configured "1.0" is class "1", not a class of its own
    # that no label or prediction holds (precision, recall and F1 0, no ROC-AUC).
    pc = class_text(pc) if pc is not None else None
    scored = bool(rows) and all(r["ps"] is not None and r["ss"] is not None for r in rows)
    ps = np.array([r["ps"] for r in rows], dtype=np.float64) if scored else None
    ss = np.array([r["ss"] for r in rows], dtype=np.float64) if scored else None
    out.update(cast(PerformanceSection,
                    classification_performance(y_t, p_t, s_t, pc, ps, ss, seed=seed)))
    out["positive_class"] = pc
    return out
