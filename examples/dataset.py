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

# Rows held out of training, so that traffic also carries inputs the models have not seen.
TEST_FRACTION = 0.25
SPLIT_SEED = 7


@dataclass(frozen=True)
class Dataset:
    """Feature rows and targets, split once with a fixed seed."""

    x_train: NDArray[np.float64]
    y_train: NDArray[np.float64]
    x_all: NDArray[np.float64]
    y_all: NDArray[np.float64]


def load() -> Dataset:
    """The diabetes data, with a fixed train split (the same in every process)."""
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes(scaled=False)
    x = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.float64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    train = order[int(len(x) * TEST_FRACTION):]
    return Dataset(x_train=x[train], y_train=y[train], x_all=x, y_all=y)


def row_to_features(row: NDArray[np.float64]) -> dict[str, int | float]:
    """One data set row as the JSON object the model services expect.

    Whole numbers (age, sex, most blood pressures) go out as JSON integers, as a client would
    send them, so that ``sex`` reads as the category 1 or 2 rather than 1.0 or 2.0.
    """
    return {name: int(value) if float(value).is_integer() else float(value)
            for name, value in zip(FEATURES, row, strict=True)}
