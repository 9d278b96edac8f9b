"""The data set behind the example model services: scikit-learn's bundled diabetes data.

442 patients, ten baseline measurements, and a number for how far the disease progressed one
year later. It ships inside scikit-learn (no download), so the demo runs offline. Values are
the raw, unscaled ones (age in years, BMI, blood pressure, serum levels), as a user's own
service would receive them, and the serum columns carry readable names instead of s1..s6.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

# The data set's columns, in order, renamed from age, sex, bmi, bp, s1..s6 (see its DESCR).
FEATURES: tuple[str, ...] = ("age", "sex", "bmi", "bp", "tc", "ldl", "hdl", "tch", "ltg", "glu")

# Patients held out of training: the traffic generator sends these, as live traffic would be
# new patients. The boosted model fits its training rows more closely than the linear one,
# and on these it does worse: the kind of surprise a shadow deployment exists to catch.
TEST_FRACTION = 0.25
SPLIT_SEED = 7


@dataclass(frozen=True)
class Dataset:
    """Feature rows and targets, split once with a fixed seed."""

    x_train: NDArray[np.float64]
    y_train: NDArray[np.float64]
    x_test: NDArray[np.float64]
    y_test: NDArray[np.float64]


def load() -> Dataset:
    """The diabetes data, with a fixed train split (the same in every process)."""
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes(scaled=False)
    x = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.float64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    cut = int(len(x) * TEST_FRACTION)
    test, train = order[:cut], order[cut:]
    return Dataset(x_train=x[train], y_train=y[train], x_test=x[test], y_test=y[test])


def row_to_features(row: NDArray[np.float64]) -> dict[str, int | float]:
    """One data set row as the JSON object the model services expect.

    Whole numbers (age, sex, most blood pressures) go out as JSON integers, as a client would
    send them, so that ``sex`` reads as the category 1 or 2 rather than 1.0 or 2.0.
    """
    return {name: int(value) if float(value).is_integer() else float(value)
            for name, value in zip(FEATURES, row, strict=True)}


def write_training_csv(path: str) -> int:
    """Write the training split as CSV, one column per feature; return the row count.

    ``shadowproxy report --reference FILE`` compares live inputs with this file, so drift
    between what the models learned from and what they are asked about shows in the report.
    """
    import csv

    data = load()
    with open(path, "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(FEATURES)
        for row in data.x_train:
            writer.writerow(row_to_features(row).values())
    return len(data.x_train)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m examples.dataset",
        description="Write the example models' training data as CSV.")
    parser.add_argument("--training-csv", required=True, metavar="FILE")
    args = parser.parse_args(argv)
    rows = write_training_csv(args.training_csv)
    print(f"wrote {rows} training rows to {args.training_csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
