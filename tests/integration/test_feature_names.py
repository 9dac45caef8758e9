"""Feature names reach PostgreSQL as a text[] parameter, never as SQL text: hostile names read
back as plain keys with standard_conforming_strings on and off; and values too large or too
deeply nested for Python come back flagged from the slow path's read, never as text."""

from __future__ import annotations

import json

import asyncpg
import pytest

from sensor_predictor import db
from sensor_predictor.scoring import MAX_VALUES_BYTES
from tests.support.databases import Database
from tests.support.readings import insert_readings

pytestmark = pytest.mark.asyncio

HOSTILE = ["'", "''", "\\", "\\'", "' || (SELECT current_user) || '", "$1", "$2::text", "--",
           "/*", "a'); DROP TABLE readings; --", "E'\\x27'", "Sensor 1", "ü€ 😀 \u200b",
           "$$", "$q$", "\"", "%s", "{}", "[1]", "\n\t"]


async def _claim_read(conn: asyncpg.Connection, names: list[str]) -> list[asyncpg.Record]:
    return await conn.fetch(db.queries()["claim_read"], "t", 100, db.read_range_query(names),
                            names, None, None)


@pytest.mark.parametrize("conforming", ["on", "off"])
async def test_hostile_feature_names_are_plain_keys(
        database: Database, conn: asyncpg.Connection, conforming: str) -> None:
    await conn.execute(f'ALTER DATABASE "{database.name}" SET standard_conforming_strings = '
                       f"{conforming}")
    await conn.execute(f"SET standard_conforming_strings = {conforming}")
    values = {name: i + 0.5 for i, name in enumerate(HOSTILE)}
    ids = await insert_readings(conn, [values, values])
    names = list(reversed(HOSTILE))
    rows = await _claim_read(conn, names)
    assert [r["id"] for r in rows] == ids
    expected = [values[n] for n in names]
    assert all(list(r["features"]) == expected for r in rows)
    assert "'" not in db.read_range_query(names)  # nothing of a name in the text
    # The direct read (a claim taken over, a large batch) takes them the same way, with the
    # names picked once per statement or per row.
    for keys_once in (True, False):
        query = db.read_range_query(names, keys_once=keys_once)
        assert "'" not in query and "Sensor" not in query
        direct = await conn.fetch(query, ids, names)
        assert [list(r["features"]) for r in direct] == [expected, expected]
    assert await conn.fetchval("SELECT count(*) FROM readings") == 2


# More names than a row has columns (1,664): the first db.KEYS_AS_COLUMNS are picked once per
# statement, the rest per row. Not 10,000 as before: PostgreSQL's cost for one such statement
# grows with the square of the names (10,000: 18 s for the claim's read and 10 s for the direct
# one here; 2,500: 1.3 s and 0.7 s), and 2,000 take both shapes past the column limit.
MANY_NAMES = 2_000


async def test_more_names_than_a_row_has_columns(conn: asyncpg.Connection) -> None:
    assert MANY_NAMES > 1_664 > db.KEYS_AS_COLUMNS
    names = [f"k{i}'\\" for i in range(MANY_NAMES)]
    values = {n: float(i) for i, n in enumerate(names)}
    ids = await insert_readings(conn, [values])
    rows = await _claim_read(conn, names)
    assert [r["id"] for r in rows] == ids
    assert list(rows[0]["features"]) == [float(i) for i in range(MANY_NAMES)]
    direct = await conn.fetch(db.read_range_query(names, keys_once=False), ids, names)
    assert list(direct[0]["features"]) == [float(i) for i in range(MANY_NAMES)]
    once = await conn.fetch(db.read_range_query(names, keys_once=True), ids, names)
    assert list(once[0]["features"]) == [float(i) for i in range(MANY_NAMES)]


async def test_too_large_and_too_deep_values_come_back_flagged(conn: asyncpg.Connection
                                                               ) -> None:
    deep = "[" * 1500 + "1" + "]" * 1500
    good = {"a": 1.0}
    ids = await insert_readings(conn, [
        json.dumps(good),
        '{"a": ' + deep + "}",  # the feature itself
        '{"a": 2, "junk": ' + deep + "}",  # elsewhere in the reading
        json.dumps({"a": 3, "big": "x" * (MAX_VALUES_BYTES + 10)}),
        json.dumps({"a": "y" * (3 * MAX_VALUES_BYTES)}),
        '{"a": ' + "[" * 63 + "1" + "]" * 63 + "}",  # 64 levels: still parsed
    ])
    rows = await conn.fetch(db.queries()["read_range_raw"], ids, MAX_VALUES_BYTES)
    flags = {r["id"]: r["flag"] for r in rows}
    assert [flags[i] for i in ids] == [None, "unparseable", "unparseable", "too_large",
                                       "too_large", None]
    assert all(r["raw"] is None for r in rows if r["flag"] is not None)
    raw = await conn.fetch(db.queries()["read_raw_values"], ids, MAX_VALUES_BYTES)
    assert {r["id"]: r["flag"] for r in raw} == flags
