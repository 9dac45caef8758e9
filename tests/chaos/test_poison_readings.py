"""Hostile readings (issue 23, finding 1): nested thousands of levels deep, megabytes long,
5,000-digit numbers, junk keys, mixed with good readings in one slow-path batch. A real worker
scores them end to end: exactly one result per reading, no batch_failed loop, no takeovers."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensor_predictor.devtools.worker_process import WorkerProcess
from sensor_predictor.training import activate_model
from tests.support.chaos import (
    GOOD_ROWS,
    check_invariant,
    machine_id,
    served,
    wait_settled,
)
from tests.support.chaos_fixtures import Workers
from tests.support.databases import Database
from tests.support.models import Models
from tests.support.readings import FEATURES, INSERT_READINGS

pytestmark = [pytest.mark.chaos]

# Where a hostile value sits: in a feature the model reads (PostgreSQL cannot cast it: the
# batch takes the Python slow path) or under a key nobody reads.
_KEYS = st.sampled_from(["Sensor 3", "Sensor 17", "junk"])
# Text PostgreSQL's jsonb can hold: no surrogates, no \u0000 (the writer's INSERT itself is
# refused with those, before any reading exists to score).
_STORABLE = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
_JUNK_KEY = st.text(_STORABLE, max_size=12).filter(lambda k: k not in FEATURES)


def _body(key: str, literal: str, junk: dict[str, str]) -> str:
    """A good reading's JSON with `key` set to the raw JSON `literal` (json.dumps could not
    write a value 10,000 levels deep), plus junk keys."""
    good = json.loads(GOOD_ROWS[len(literal) % len(GOOD_ROWS)])
    good.pop(key, None)
    for k, v in junk.items():
        good[k] = v
    text = json.dumps(good)
    return text[:-1] + f", {json.dumps(key)}: {literal}" + "}"


@st.composite
def _hostile(draw: Any) -> tuple[str, str]:
    """(kind, the reading's JSON text)."""
    kind = draw(st.sampled_from(["deep", "long", "digits", "junk"]))
    key = draw(_KEYS)
    junk = draw(st.dictionaries(_JUNK_KEY, st.text(_STORABLE, max_size=8), max_size=3))
    if kind == "deep":
        depth = draw(st.integers(1_000, 10_000))
        literal = "[" * depth + "1" + "]" * depth
    elif kind == "long":
        literal = json.dumps("x" * draw(st.integers(1_500_000, 3_000_000)))
    elif kind == "digits":
        literal = "-" * draw(st.booleans()) + "9" * draw(st.integers(5_000, 6_000))
    else:
        literal = json.dumps(draw(st.text(_STORABLE, max_size=30)))
        key = "junk"
    return f"{kind}@{key}", _body(key, literal, junk)


async def _insert(db: Database, rows: list[str]) -> list[int]:
    conn = await db.connect()
    try:
        machine = await machine_id(conn, "poison")
        async with conn.transaction():  # one transaction: one claim, one slow-path batch
            return [r["id"] for r in await conn.fetch(INSERT_READINGS, rows, machine)]
    finally:
        await conn.close()


async def _outcome(db: Database, ids: list[int], within: float) -> dict[int, list[str]]:
    conn = await db.connect()
    try:
        await wait_settled(conn, within)
        results: dict[int, list[str]] = {i: [] for i in ids}
        for r in await conn.fetch(
                "SELECT reading_id, 'predicted' AS what FROM predictions"
                " WHERE reading_id = ANY($1) UNION ALL SELECT reading_id, reason"
                " FROM reading_errors WHERE reading_id = ANY($1)", ids):
            results[r["reading_id"]].append(r["what"])
        return results
    finally:
        await conn.close()


@pytest.mark.slow
def test_hostile_readings_each_get_one_result_and_the_batch_is_scored(
        chaos_db: Database, chaos_models: Models, workers: Workers) -> None:
    async def activate() -> None:
        conn = await chaos_db.connect()
        try:
            await activate_model(conn, *chaos_models.v1)
        finally:
            await conn.close()

    asyncio.run(activate())
    worker = workers.start(PREDICTION_BATCH_SIZE="50")
    worker.wait_ready()
    seen_kinds: set[str] = set()

    @settings(max_examples=4, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(_hostile(), min_size=1, max_size=3),
           st.integers(min_value=3, max_value=20))
    def one_batch(hostile: list[tuple[str, str]], good: int) -> None:
        rows = [GOOD_ROWS[i] for i in range(good)] + [text for _, text in hostile]
        ids = asyncio.run(_insert(chaos_db, rows))
        results = asyncio.run(_outcome(chaos_db, ids, within=30))
        _check(worker, ids[:good], list(zip(ids[good:], hostile, strict=True)), results)
        seen_kinds.update(kind for kind, _ in hostile)

    one_batch()

    async def invariant() -> None:
        conn = await chaos_db.connect()
        try:
            await check_invariant(conn, served(chaos_models.v1))
        finally:
            await conn.close()

    asyncio.run(invariant())
    assert not [e for e in worker.events() if e.get("event") == "batch_failed"], worker.tail()
    assert (worker.metric("sensor_claims_taken_over_total") or 0) == 0, worker.tail()
    assert (worker.metric("sensor_task_restarts_total", 'task="model"') or 0) == 0


# The reason each hostile value gets where the model reads it; under a key nobody reads, a
# reading is scored on its features (fast path), or refused as the slow path reads its whole
# JSON (a batch that another reading sent there).
_FEATURE_REASONS = {"deep": {"not_a_number", "too_deep", "too_large"},
                    "long": {"too_large", "not_a_number"},
                    "digits": {"out_of_range"}}
_ANYWHERE_REASONS = {"predicted", "too_deep", "too_large"}


def _check(worker: WorkerProcess, good_ids: list[int],
           hostile: list[tuple[int, tuple[str, str]]], results: dict[int, list[str]]) -> None:
    many = {i: r for i, r in results.items() if len(r) != 1}
    assert not many, (many, worker.tail())
    for i in good_ids:
        assert results[i] == ["predicted"], (i, results[i], worker.tail())
    for i, (kind, _) in hostile:
        what, where = kind.split("@")
        got = results[i][0]
        if what == "junk" or where == "junk":
            assert got in _ANYWHERE_REASONS, (kind, got)
        else:
            assert got in _FEATURE_REASONS[what], (kind, got)


@pytest.mark.slow
def test_a_claim_that_kills_its_workers_is_isolated(chaos_db: Database, chaos_models: Models,
                                                    workers: Workers) -> None:
    """The dead-letter rule: a claim whose workers died on it (taken over
    DEAD_LETTER_TAKEOVERS times) is scored in isolation; the reading too large to read gets an
    error row (its text never sent), the rest of the claim is scored."""
    async def setup() -> list[int]:
        conn = await chaos_db.connect()
        try:
            await activate_model(conn, *chaos_models.v1)
            machine = await machine_id(conn, "dead-letter")
            huge = _body("junk", json.dumps("y" * 1_200_000), {})
            async with conn.transaction():
                ids = [r["id"] for r in await conn.fetch(
                    INSERT_READINGS, [*GOOD_ROWS[:10], huge], machine)]
            # Handed out to a worker that died on it twice: a claim row with two takeovers,
            # whose session is gone (nobody holds its lock).
            await conn.execute(
                "INSERT INTO scoring_claims (reading_ids, worker, pid, takeovers)"
                " VALUES ($1, 'dead', 0, 1)", ids)
            # The cursor passes them (they are in the claim), as sp_claim would have.
            await conn.fetch("SELECT * FROM sp_claim('setup', 1000)")
            await conn.execute("SELECT pg_advisory_unlock_all()")
            await conn.execute("DELETE FROM scoring_claims WHERE worker = 'setup'")
            return ids
        finally:
            await conn.close()

    ids = asyncio.run(setup())
    worker = workers.start()
    worker.wait_ready()
    results = asyncio.run(_outcome(chaos_db, ids, within=20))
    assert [results[i] for i in ids[:10]] == [["predicted"]] * 10, worker.tail()
    assert results[ids[10]] == ["too_large"], worker.tail()
    isolated = [e for e in worker.events() if e.get("event") == "claim_isolated"]
    assert isolated and isolated[0]["cause"] == "taken_over", worker.tail()
    assert worker.metric("sensor_claims_isolated_total") == 1
