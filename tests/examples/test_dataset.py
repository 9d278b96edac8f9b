"""The example data set: a fixed split, and the training rows as a reference CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from examples.dataset import FEATURES, load, row_to_features, write_training_csv


def test_split_is_fixed_and_disjoint() -> None:
    """Every process sees the same split; no held-out patient is a training row."""
    a, b = load(), load()
    assert np.array_equal(a.x_test, b.x_test)
    assert len(a.x_train) + len(a.x_test) == 442
    train_rows = {tuple(r) for r in a.x_train}
    assert not any(tuple(r) in train_rows for r in a.x_test)


def test_whole_numbers_are_json_integers() -> None:
    """Integral values (age, sex) become ints, fractional ones stay floats."""
    features = row_to_features(np.array([59.0, 2.0, 32.1, 101.0, 157, 93.2, 38, 4, 4.8598, 87]))
    assert list(features) == list(FEATURES)
    assert features["sex"] == 2 and isinstance(features["sex"], int)
    assert features["bmi"] == 32.1 and isinstance(features["bmi"], float)


def test_training_csv_has_one_column_per_feature(tmp_path: Path) -> None:
    """The reference CSV is the training split, with the feature names as header."""
    path = tmp_path / "training.csv"
    rows = write_training_csv(str(path))
    with path.open() as f:
        table = list(csv.reader(f))
    assert table[0] == list(FEATURES)
    assert rows == len(table) - 1 == len(load().x_train)
    assert [float(v) for v in table[1]] == list(load().x_train[0])
