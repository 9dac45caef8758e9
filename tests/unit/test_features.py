"""Bad readings get a reason a person can act on; good ones give features in the model's order."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sensor_predictor import features

NAMES = ["Sensor 1", "Sensor 2", "Sensor 3"]


def _raw(**values: object) -> str:
    return json.dumps(values)


@pytest.mark.parametrize(
    ("raw", "reason", "in_detail"),
    [
        (None, features.VALUES_MISSING, "NULL"),
        ("[1, 2, 3]", features.NOT_AN_OBJECT, "array"),
        ('"text"', features.NOT_AN_OBJECT, "string"),
        ("42", features.NOT_AN_OBJECT, "number"),
        ("{}", features.MISSING_SENSOR, "Sensor 1, Sensor 2, Sensor 3"),
        (_raw(**{"Sensor 1": 1, "Sensor 3": 2}), features.MISSING_SENSOR, "Sensor 2"),
        (_raw(**{"Sensor 1": 1, "Sensor 2": None, "Sensor 3": 2}), features.NULL_VALUE,
         "Sensor 2"),
        (_raw(**{"Sensor 1": 1, "Sensor 2": "broken", "Sensor 3": 2}), features.NOT_A_NUMBER,
         '"broken"'),
        (_raw(**{"Sensor 1": True, "Sensor 2": 1, "Sensor 3": 2}), features.NOT_A_NUMBER,
         "boolean"),
        (_raw(**{"Sensor 1": [1], "Sensor 2": 1, "Sensor 3": 2}), features.NOT_A_NUMBER, "array"),
        (_raw(**{"Sensor 1": "NaN", "Sensor 2": 1, "Sensor 3": 2}), features.NOT_FINITE, "NaN"),
        (_raw(**{"Sensor 1": 1, "Sensor 2": "-Infinity", "Sensor 3": 2}), features.NOT_FINITE,
         "Infinity"),
        (_raw(**{"Sensor 1": 1, "Sensor 2": 2, "Sensor 3": 1e300}), features.OUT_OF_RANGE,
         "Sensor 3"),
        ('{"Sensor 1": 1e400, "Sensor 2": 1, "Sensor 3": 1}', features.OUT_OF_RANGE, "Sensor 1"),
        ('{"Sensor 1": 1' + "0" * 400 + ', "Sensor 2": 1, "Sensor 3": 1}', features.OUT_OF_RANGE,
         "Sensor 1"),
    ],
)
def test_each_kind_of_bad_reading_has_its_reason(raw: str | None, reason: str,
                                                 in_detail: str) -> None:
    bad = features.classify(7, raw, NAMES)
    assert bad is not None
    assert (bad.reading_id, bad.reason) == (7, reason)
    assert in_detail in bad.detail


def test_extra_keys_and_numeric_strings_are_fine() -> None:
    raw = _raw(**{"Sensor 3": 3, "Sensor 1": "1.5", "Sensor 2": 2, "Voltage": "n/a"})
    assert features.classify(1, raw, NAMES) is None
    ids, matrix, bad = features.parse_raw([(1, raw)], NAMES)
    assert ids == [1] and bad == []
    # The model's order, whatever order the keys came in.
    np.testing.assert_array_equal(matrix, [[1.5, 2.0, 3.0]])


def test_parse_raw_splits_good_from_bad() -> None:
    rows = [(1, _raw(**{"Sensor 1": 1, "Sensor 2": 2, "Sensor 3": 3})), (2, "[]"),
            (3, _raw(**{"Sensor 1": 4, "Sensor 2": 5, "Sensor 3": 6}))]
    ids, matrix, bad = features.parse_raw(rows, NAMES)
    assert ids == [1, 3]
    assert matrix.shape == (2, 3)
    assert [(b.reading_id, b.reason) for b in bad] == [(2, features.NOT_AN_OBJECT)]


def test_parse_raw_of_only_bad_rows_gives_an_empty_matrix_of_the_right_width() -> None:
    ids, matrix, bad = features.parse_raw([(1, None)], NAMES)
    assert ids == [] and matrix.shape == (0, 3) and len(bad) == 1


def test_valid_rows_rejects_gaps_infinities_and_huge_values() -> None:
    matrix = features.to_matrix(
        [[1.0, 2.0, 3.0], [1.0, None, 3.0], None, [np.inf, 0, 0], [1e13, 0, 0], [-1e12, 0, 0]], 3)
    assert features.valid_rows(matrix).tolist() == [True, False, False, False, False, True]
