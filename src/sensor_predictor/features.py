"""Feature matrices from readings, and the reason a reading cannot be scored. No I/O."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

# No sensor of ours reads beyond this; a larger value is a unit or encoding bug upstream, and
# scaled by a StandardScaler it would swamp every distance KMeans computes.
MAX_ABS_VALUE = 1e12

# Stable reason labels: they are metric label values and reading_errors.reason.
VALUES_MISSING = "values_missing"
NOT_AN_OBJECT = "not_an_object"
MISSING_SENSOR = "missing_sensor"
NULL_VALUE = "null_value"
NOT_A_NUMBER = "not_a_number"
NOT_FINITE = "not_finite"
OUT_OF_RANGE = "out_of_range"
# A reading that is hostile or broken beyond a wrong value (docs/faults.md): its JSON text is
# larger than MAX_READING_CHARS, nested deeper than Python's parser goes, or its check raised
# something unforeseen. Each is one error row; the rest of its batch is scored.
TOO_LARGE = "too_large"
TOO_DEEP = "too_deep"
UNPARSEABLE = "unparseable"
REASONS = (VALUES_MISSING, NOT_AN_OBJECT, MISSING_SENSOR, NULL_VALUE, NOT_A_NUMBER, NOT_FINITE,
           OUT_OF_RANGE, TOO_LARGE, TOO_DEEP, UNPARSEABLE)

# A reading of ours is ~1 KB of JSON; one beyond this is refused before it is parsed, so that a
# value of hundreds of MB (jsonb allows ~255 MB) never makes the worker build its objects.
MAX_READING_CHARS = 1_000_000
# An integer literal longer than this is beyond float8 anyway (and Python refuses to convert
# one longer than 4,300 digits): it reads as infinity, as PostgreSQL's cast says out of range.
_MAX_INT_DIGITS = 400

Matrix = npt.NDArray[np.float64]


@dataclass(frozen=True)
class BadReading:
    reading_id: int
    reason: str
    detail: str


def valid_rows(matrix: Matrix) -> npt.NDArray[np.bool_]:
    """Rows whose every feature is a finite number within MAX_ABS_VALUE (NaN marks a gap)."""
    with np.errstate(invalid="ignore"):
        ok: npt.NDArray[np.bool_] = np.all(np.abs(matrix) <= MAX_ABS_VALUE, axis=1)
    return ok


def to_matrix(arrays: Sequence[Sequence[float | None] | None], width: int) -> Matrix:
    """Feature arrays as PostgreSQL returned them (None for a missing value) to a float matrix."""
    matrix = np.full((len(arrays), width), np.nan, dtype=np.float64)
    for i, row in enumerate(arrays):
        if row is not None:
            # None becomes NaN, which valid_rows rejects.
            matrix[i] = np.asarray(row, dtype=np.float64)
    return matrix


def _number(value: Any) -> float | None:
    """The value as PostgreSQL's float8 cast of its text would read it, or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        try:
            return float(value)
        except OverflowError:  # an integer literal beyond float8
            return math.inf
    if isinstance(value, str) and "_" not in value:
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _parse_int(text: str) -> float | int:
    digits = len(text) - (text[0] in "+-")
    if digits > _MAX_INT_DIGITS:
        return -math.inf if text[0] == "-" else math.inf
    return int(text)


def decode(reading_id: int, raw: str | None) -> Any:
    """The reading's JSON, or the BadReading that says why there is none. Never raises."""
    if raw is None:
        return BadReading(reading_id, VALUES_MISSING, "values is NULL")
    try:
        if len(raw) > MAX_READING_CHARS:
            return BadReading(reading_id, TOO_LARGE,
                              f"values is {len(raw):,} characters of JSON, beyond "
                              f"{MAX_READING_CHARS:,}")
        return json.loads(raw, parse_int=_parse_int)
    except RecursionError:
        return BadReading(reading_id, TOO_DEEP, "values is nested too deep to be read")
    except MemoryError:
        return BadReading(reading_id, TOO_LARGE, "values is too large to be read")
    except ValueError:
        return BadReading(reading_id, NOT_AN_OBJECT, "values is not valid JSON")
    except Exception as exc:  # whatever else a hostile value does: one error row, never a loop
        return BadReading(reading_id, UNPARSEABLE, f"values cannot be read: {type(exc).__name__}")


def classify(reading_id: int, raw: str | None, feature_names: Sequence[str]) -> BadReading | None:
    """Why a reading's JSON cannot give the model's features, or None when it can."""
    checked = _check(reading_id, raw, feature_names)
    return checked if isinstance(checked, BadReading) else None


def _check(reading_id: int, raw: str | None, feature_names: Sequence[str]
           ) -> BadReading | list[float]:
    """The reading's features in `feature_names` order, or why it has none. Never raises."""
    values = decode(reading_id, raw)
    if isinstance(values, BadReading):
        return values
    try:
        return _features(reading_id, values, feature_names)
    except RecursionError:
        return BadReading(reading_id, TOO_DEEP, "values is nested too deep to be read")
    except MemoryError:
        return BadReading(reading_id, TOO_LARGE, "values is too large to be read")
    except Exception as exc:
        return BadReading(reading_id, UNPARSEABLE, f"values cannot be read: {type(exc).__name__}")


def _features(reading_id: int, values: Any, feature_names: Sequence[str]
              ) -> BadReading | list[float]:
    if not isinstance(values, dict):
        return BadReading(reading_id, NOT_AN_OBJECT,
                          f"values is a JSON {_json_type(values)}, not an object")
    missing = [name for name in feature_names if name not in values]
    if missing:
        return BadReading(reading_id, MISSING_SENSOR, _list_detail("missing", missing))
    nulls = [name for name in feature_names if values[name] is None]
    if nulls:
        return BadReading(reading_id, NULL_VALUE, _list_detail("null", nulls))
    numbers: list[float] = []
    for name in feature_names:
        value = values[name]
        number = _number(value)
        if number is None:
            return BadReading(reading_id, NOT_A_NUMBER,
                              f"{name} is a JSON {_json_type(value)}, not a number: "
                              f"{_short(value)}")
        if not math.isfinite(number) and isinstance(value, str):
            return BadReading(reading_id, NOT_FINITE, f"{name} is {_short(value)}")
        if not abs(number) <= MAX_ABS_VALUE:  # a literal beyond float8 arrives as inf
            return BadReading(reading_id, OUT_OF_RANGE,
                              f"{name}={_short(value)} is beyond +-{MAX_ABS_VALUE:g}")
        numbers.append(number)
    return numbers


def parse_raw(
    rows: Sequence[tuple[int, str | None]], feature_names: Sequence[str]
) -> tuple[list[int], Matrix, list[BadReading]]:
    """The slow path: features straight from each reading's JSON text."""
    good_ids: list[int] = []
    good_rows: list[list[float]] = []
    bad: list[BadReading] = []
    for reading_id, raw in rows:
        checked = _check(reading_id, raw, feature_names)
        if isinstance(checked, BadReading):
            bad.append(checked)
            continue
        good_ids.append(reading_id)
        good_rows.append(checked)
    matrix = np.asarray(good_rows, dtype=np.float64).reshape(len(good_rows), len(feature_names))
    return good_ids, matrix, bad


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    return "number"


def _short(value: Any, limit: int = 40) -> str:
    if isinstance(value, str) and len(value) > limit:
        value = value[:limit]  # a multi-MB string is never dumped whole
    try:
        text = json.dumps(value)
    except Exception:  # too deep, say: the detail is only a hint
        text = f"(a JSON {_json_type(value)})"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _list_detail(what: str, names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{what}: {shown}{more}"
