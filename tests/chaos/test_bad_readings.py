"""Bad readings of many kinds mixed into a stream: each recorded with its reason, the rest go on."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import asyncpg
import pytest

from sensor_predictor.training import activate_model
from tests.support.chaos import GOOD_ROWS, StreamWriter, check_invariant, served, wait_settled
from tests.support.chaos_fixtures import Workers
from tests.support.databases import Database
from tests.support.models import Models
from tests.support.readings import FEATURES, reading

pytestmark = [pytest.mark.asyncio, pytest.mark.chaos]

PREDICTED = "(predicted)"


def _with(**values: object) -> str:
    return json.dumps(reading(7, **values))


def _without(*names: str) -> str:
    return json.dumps({k: v for k, v in reading(8).items() if k not in names})


def _raw_number(sensor: str, literal: str) -> str:
    """A reading whose one value is a JSON number literal json.dumps would not write."""
    body = ", ".join(f'"{name}": 0.25' for name in FEATURES if name != sensor)
    return "{" + body + f', "{sensor}": {literal}' + "}"


# (kind, the "values" text as a writer sends it (None: SQL NULL), the expected outcome)
KINDS: list[tuple[str, str | None, str]] = [
    ("missing sensor", _without("Sensor 7"), "missing_sensor"),
    ("key in the wrong case", json.dumps(
        {("sensor 1" if k == "Sensor 1" else k): v for k, v in reading(9).items()}),
     "missing_sensor"),
    ("empty object", "{}", "missing_sensor"),
    ("null value", _with(**{"Sensor 3": None}), "null_value"),
    ("a word", _with(**{"Sensor 4": "broken"}), "not_a_number"),
    ("an empty string", _with(**{"Sensor 4": ""}), "not_a_number"),
    ("digits with underscores", _with(**{"Sensor 4": "1_000"}), "not_a_number"),
    ("boolean", _with(**{"Sensor 5": True}), "not_a_number"),
    ("nested object", _with(**{"Sensor 6": {"v": 1}}), "not_a_number"),
    ("nested array", _with(**{"Sensor 6": [1, 2]}), "not_a_number"),
    ("NaN as a string", _with(**{"Sensor 8": "NaN"}), "not_finite"),
    ("Infinity as a string", _with(**{"Sensor 9": "Infinity"}), "not_finite"),
    ("-inf as a string", _with(**{"Sensor 9": "-inf"}), "not_finite"),
    ("huge number", _with(**{"Sensor 10": 1e300}), "out_of_range"),
    ("beyond the sensor range", _with(**{"Sensor 10": -2e12}), "out_of_range"),
    ("a 30-digit integer", _raw_number("Sensor 11", "123456789012345678901234567890"),
     "out_of_range"),
    ("beyond float8 (1e400)", _raw_number("Sensor 1", "1e400"), "out_of_range"),
    ("values an array", "[1, 2, 3]", "not_an_object"),
    ("values a string", '"Sensor 1=0.5"', "not_an_object"),
    ("values a number", "42", "not_an_object"),
    ("values a boolean", "true", "not_an_object"),
    ("values JSON null", "null", "not_an_object"),
    ("values SQL NULL", None, "values_missing"),
    # Not bad at all: scored on the model's features only.
    ("extra keys", _with(extra="ignored", **{"Sensor 21": 5}), PREDICTED),
    ("a number as a string", _with(**{"Sensor 2": "0.5"}), PREDICTED),
]
BAD_EVERY = 5  # one reading in five is one of KINDS


def _row(n: int) -> str | None:
    if n % BAD_EVERY == BAD_EVERY - 1:
        return KINDS[(n // BAD_EVERY) % len(KINDS)][1]
    return GOOD_ROWS[n % len(GOOD_ROWS)]


def _expected(n: int) -> tuple[str, str]:
    if n % BAD_EVERY == BAD_EVERY - 1:
        kind, _, outcome = KINDS[(n // BAD_EVERY) % len(KINDS)]
        return kind, outcome
    return "good", PREDICTED


@pytest.mark.slow
async def test_bad_readings_mixed_into_a_stream_are_recorded_and_the_stream_goes_on(
        chaos_db: Database, chaos_conn: asyncpg.Connection, chaos_models: Models,
        workers: Workers, report: Any) -> None:
    conn = chaos_conn
    await activate_model(conn, *chaos_models.v1)
    worker = workers.start(PREDICTION_BATCH_SIZE="50")
    await asyncio.to_thread(worker.wait_ready)
    writer = StreamWriter(chaos_db.server, chaos_db.name, rows=25, pause=0.02, row_source=_row)
    async with writer:
        await asyncio.sleep(3.0)
        stats = await writer.stop()
    assert await wait_settled(conn, 30), worker.logs()[-3000:]
    outcome = await check_invariant(conn, served(chaos_models.v1),
                                    expected_readings=stats.committed)
    errors = {r["reading_id"]: (r["reason"], r["detail"]) for r in await conn.fetch(
        "SELECT reading_id, reason, detail FROM reading_errors")}
    predicted = {r[0] for r in await conn.fetch("SELECT reading_id FROM predictions")}
    per_kind: Counter[str] = Counter()
    wrong: list[tuple[str, str, Any]] = []
    for n, reading_id in enumerate(writer.ids):
        kind, want = _expected(n)
        per_kind[kind] += 1
        got = PREDICTED if reading_id in predicted else errors.get(reading_id, ("?", ""))[0]
        if got != want:
            wrong.append((kind, want, errors.get(reading_id)))
    assert not wrong, wrong[:10]
    kinds_seen = {k for k in per_kind if k != "good"}
    assert kinds_seen == {k for k, _, _ in KINDS}, kinds_seen
    # Every error carries a readable detail, the metrics count them by reason, and the last
    # readings of the stream (after the last bad one) were scored.
    assert all(detail for _, detail in errors.values())
    by_reason = Counter(reason for reason, _ in errors.values())
    for reason, count in by_reason.items():
        assert worker.metric("sensor_bad_readings_total", f'reason="{reason}"') == count
    assert max(writer.ids) in predicted or max(writer.ids) in errors
    assert sum(1 for e in worker.events() if e.get("event") == "bad_reading") == len(errors)
    assert not [e for e in worker.events() if e.get("event") == "batch_failed"]
    bad_kinds = len([k for k in KINDS if k[2] != PREDICTED])
    report(scenario="7. bad readings in a stream", runs=1, readings=outcome.tally.readings,
           lost=outcome.lost, duplicated=outcome.duplicated, recovery="n/a (no pause)",
           detail=(f"{bad_kinds} bad kinds + 2 odd-but-good kinds, {len(errors)} errors "
                   f"recorded by reason {dict(by_reason)}"))
