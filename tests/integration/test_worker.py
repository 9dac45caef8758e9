"""The worker as a real process against a real PostgreSQL and a real MLflow store."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time

import asyncpg
import pytest

from sensor_predictor import db
from sensor_predictor.devtools.tally import tally
from sensor_predictor.devtools.worker_process import WorkerProcess
from sensor_predictor.training import activate_model
from tests.support import doorbell
from tests.support.databases import Database
from tests.support.fixtures import WorkerFactory
from tests.support.models import Models
from tests.support.readings import insert_readings, reading
from tests.support.waiting import wait_for

pytestmark = pytest.mark.asyncio


async def _predicted(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM predictions"))


async def _predicted_is(conn: asyncpg.Connection, n: int) -> bool:
    return await _predicted(conn) == n


async def _all_scored(conn: asyncpg.Connection) -> bool:
    t = await tally(conn)
    return t.readings > 0 and t.missing == 0


async def test_notification_scores_within_milliseconds(
        conn: asyncpg.Connection, models: Models, worker_factory: WorkerFactory) -> None:
    run_id, version = models.v1
    await activate_model(conn, run_id, version)
    worker = worker_factory(INFERENCE_INTERVAL_SECONDS="30").start()
    await worker.until_ready()
    # Asleep (it holds the doorbell): an insert notifies (a batch at a time until one does).
    ids: list[int] = []

    async def batch() -> None:
        started = time.monotonic()
        ids.extend(await insert_readings(conn, [reading(i) for i in range(10)]))
        assert await wait_for(lambda: _all_scored(conn), timeout=5, interval=0.005)
        elapsed = time.monotonic() - started
        # The poll is 30 s away: a notification (or the grant's look) explains this.
        assert elapsed < 2.0, elapsed

    await doorbell.until_a_notification(conn, worker, batch)

    rows = await conn.fetch(
        "SELECT reading_id, cluster_id, model_version, mlflow_run_id, model_name,"
        " confidence_score FROM predictions ORDER BY reading_id")
    assert [r["reading_id"] for r in rows] == ids
    assert {r["model_version"] for r in rows} == {str(version)}
    assert {r["mlflow_run_id"] for r in rows} == {run_id}
    assert {r["model_name"] for r in rows} == {"sensor_failure_clustering"}
    assert all(0 <= r["cluster_id"] < 4 for r in rows)
    assert all(0.0 <= r["confidence_score"] <= 1.0 for r in rows)
    assert worker.metric("sensor_predictions_total") == len(ids)


async def test_poll_catches_what_no_notification_announced(
        conn: asyncpg.Connection, models: Models, worker_factory: WorkerFactory) -> None:
    await activate_model(conn, *models.v1)
    worker = worker_factory(INFERENCE_INTERVAL_SECONDS="1").start()
    await worker.until_ready()
    # The passes its start asked for (startup, model) are behind it once a poll has come: one
    # of them, still pending, would score the readings below with no poll (a worker ready from
    # its model cache in 0.2 s is still busy finishing its start).
    assert await wait_for(lambda: _async(_wakeups(worker, "poll") >= 1), timeout=10)
    # A writer whose notification never arrives (here: the trigger is off).
    await conn.execute("ALTER TABLE readings DISABLE TRIGGER readings_notify")
    await insert_readings(conn, [reading(i) for i in range(5)])
    assert await wait_for(lambda: _all_scored(conn), timeout=5)
    assert _wakeups(worker, "poll") >= 1
    assert _wakeups(worker, "notification") == 0


def _wakeups(worker: WorkerProcess, cause: str) -> float:
    return worker.metric("sensor_wakeups_total", f'cause="{cause}"') or 0


async def test_readings_wait_for_a_model_then_score_on_activation(
        conn: asyncpg.Connection, models: Models, worker_factory: WorkerFactory) -> None:
    worker = worker_factory().start()
    state = await worker.until_ready(key="listening")
    assert state["ready"] is False and state["model_version"] is None
    await insert_readings(conn, [reading(i) for i in range(20)])
    await asyncio.sleep(1.0)
    assert await _predicted(conn) == 0

    await activate_model(conn, *models.v1)
    assert await wait_for(lambda: _all_scored(conn), timeout=20)
    await worker.until_ready(5)
    assert (await tally(conn)).exactly_once


async def test_out_of_order_commits_lose_nothing(
        database: Database, conn: asyncpg.Connection, models: Models,
        worker_factory: WorkerFactory) -> None:
    await activate_model(conn, *models.v1)
    worker = worker_factory().start()
    await worker.until_ready()
    machine = await conn.fetchval("INSERT INTO machines (machine_id) VALUES ('m') RETURNING id")
    insert = 'INSERT INTO readings ("values", machine_id) VALUES ($1::jsonb, $2) RETURNING id'
    a, b, c = [await database.connect() for _ in range(3)]
    try:
        # A takes its id first but commits after B, which takes a later id.
        ta, tc = a.transaction(), c.transaction()
        await ta.start()
        id_a = await a.fetchval(insert, json.dumps(reading(1)), machine)
        # C takes a sequence value before its transaction has an id (the gap that loses
        # readings under a plain "id > last seen" watermark) and writes the row much later.
        await tc.start()
        id_c = await c.fetchval("SELECT nextval('readings_id_seq')")
        id_b = await b.fetchval(insert, json.dumps(reading(2)), machine)
        assert id_a < id_c < id_b
        # B is scored while A, which started first and took the lower id, is still running:
        # nothing waits behind a transaction that has not committed.
        assert await wait_for(lambda: _predicted_is(conn, 1), timeout=5)
        assert await conn.fetchval(
            "SELECT reading_id FROM predictions") == id_b
        await ta.commit()
        assert await wait_for(lambda: _predicted_is(conn, 2), timeout=5)
        await asyncio.sleep(0.3)
        await c.execute(
            'INSERT INTO readings (id, "values", machine_id) VALUES ($1, $2::jsonb, $3)',
            id_c, json.dumps(reading(3)), machine)
        await tc.commit()
    finally:
        for x in (a, b, c):
            await x.close()
    assert await wait_for(lambda: _all_scored(conn), timeout=10)
    t = await tally(conn)
    assert (t.readings, t.predicted, t.duplicated) == (3, 3, 0)


async def _stream(database: Database, stop: asyncio.Event, rows_per_statement: int = 20,
                  pause: float = 0.005) -> int:
    """A writer inserting small multi-row statements until told to stop."""
    c = await database.connect()
    written = 0
    try:
        while not stop.is_set():
            await insert_readings(c, [reading(written + i) for i in range(rows_per_statement)])
            written += rows_per_statement
            await asyncio.sleep(pause)
    finally:
        await c.close()
    return written


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_sigkill_at_random_moments_loses_and_doubles_nothing(
        database: Database, conn: asyncpg.Connection, models: Models,
        worker_factory: WorkerFactory) -> None:
    await activate_model(conn, *models.v1)
    # CLAIM_ORPHAN_SECONDS stays at its default (60 s): a killed worker's claims are taken over
    # because its session ended, not because they are old.
    env = {"PREDICTION_BATCH_SIZE": "50"}
    stop = asyncio.Event()
    # About 400 readings/s: enough that every kill lands mid-stream, little enough to drain fast.
    writer = asyncio.create_task(_stream(database, stop, pause=0.05))
    rnd = random.Random(7)
    for _ in range(3):
        worker = worker_factory(**env).start()
        await worker.until_ready()
        await asyncio.sleep(rnd.uniform(0.2, 1.0))
        worker.signal(signal.SIGKILL)
        worker.wait()
    stop.set()
    written = await writer
    final = worker_factory(**env).start()
    await final.until_ready()
    if not await wait_for(lambda: _all_scored(conn), timeout=60):
        claims = await conn.fetch("SELECT * FROM scoring_claims")
        cursor = await conn.fetchrow("SELECT * FROM scoring_cursor")
        missing = await conn.fetch(
            "SELECT id, txid FROM readings r WHERE NOT EXISTS (SELECT 1 FROM predictions p"
            " WHERE p.reading_id = r.id) ORDER BY txid, id LIMIT 5")
        raise AssertionError(f"{await tally(conn)} claims={claims} cursor={cursor} "
                             f"missing={missing}\n{final.logs()[-3000:]}")
    t = await tally(conn)
    assert t.readings == written
    assert t.exactly_once, t
    assert await conn.fetchval("SELECT count(*) FROM scoring_claims") == 0


@pytest.mark.timeout(300)
async def test_two_workers_share_the_stream_without_doubles(
        conn: asyncpg.Connection, models: Models, worker_factory: WorkerFactory) -> None:
    await activate_model(conn, *models.v1)
    workers = [worker_factory(PREDICTION_BATCH_SIZE="100").start() for _ in range(2)]
    for w in workers:
        await w.until_ready()
    for chunk in range(10):
        await insert_readings(conn, [reading(chunk * 1000 + i) for i in range(1000)])
    assert await wait_for(lambda: _all_scored(conn), timeout=30)
    t = await tally(conn)
    assert (t.readings, t.predicted, t.duplicated) == (10_000, 10_000, 0)
    counts = [w.metric("sensor_predictions_total") or 0 for w in workers]
    assert sum(counts) == 10_000
    assert all(c > 0 for c in counts), counts


async def test_hot_swap_mid_stream_by_plain_sql(
        database: Database, conn: asyncpg.Connection, models: Models,
        worker_factory: WorkerFactory) -> None:
    await activate_model(conn, *models.v1)
    worker = worker_factory().start()
    await worker.until_ready()
    stop = asyncio.Event()
    writer = asyncio.create_task(_stream(database, stop))
    await asyncio.sleep(1.0)
    # Deploying a model is one row: any client can do it.
    await activate_model(conn, *models.v2)
    swapped_at = await conn.fetchval("SELECT clock_timestamp()")
    await asyncio.sleep(1.5)
    stop.set()
    written = await writer
    assert await wait_for(lambda: _all_scored(conn), timeout=15)
    t = await tally(conn)
    assert t.readings == written and t.exactly_once, t
    v1, v2 = str(models.v1[1]), str(models.v2[1])
    versions = dict(await conn.fetch(
        "SELECT model_version, count(*) FROM predictions GROUP BY 1"))
    assert set(versions) == {v1, v2} and versions[v1] > 0 and versions[v2] > 0
    # Readings written well after the swap are all scored by the new model.
    late_v1 = await conn.fetchval(
        "SELECT count(*) FROM predictions p JOIN readings r ON r.id = p.reading_id"
        " WHERE p.model_version = $1 AND r.inserted_at > $2::timestamptz + interval '1 second'",
        v1, swapped_at)
    assert late_v1 == 0
    # The new model has 3 clusters: its predictions use its numbering.
    assert await conn.fetchval(
        "SELECT max(cluster_id) FROM predictions WHERE model_version = $1", v2) <= 2
    assert worker.metric("sensor_model_version") == float(models.v2[1])
    assert any(e.get("event") == "model_swapped" and e.get("model_version") == v2
               for e in worker.events())


async def test_failed_swaps_keep_the_old_model_serving(
        conn: asyncpg.Connection, models: Models, worker_factory: WorkerFactory) -> None:
    await activate_model(conn, *models.v1)
    worker = worker_factory().start()
    await worker.until_ready()
    await insert_readings(conn, [reading(i) for i in range(10)])
    assert await wait_for(lambda: _all_scored(conn), timeout=5)

    # A model whose features no reading carries, then a run MLflow never heard of.
    await activate_model(conn, *models.wrong_features)
    assert await wait_for(lambda: _failures(worker, "feature_mismatch"), timeout=20)
    await activate_model(conn, "0" * 32, 999)
    assert await wait_for(lambda: _failures(worker, "not_found"), timeout=20)

    await insert_readings(conn, [reading(100 + i) for i in range(10)])
    assert await wait_for(lambda: _all_scored(conn), timeout=5)
    versions = {r[0] for r in await conn.fetch("SELECT DISTINCT model_version FROM predictions")}
    assert versions == {str(models.v1[1])}
    state = worker.ready()
    assert state is not None
    # Ready still (the mismatch is younger than MODEL_MISMATCH_READY_SECONDS), and it says
    # which model is active and for how long it has not been served (docs/faults.md).
    assert {k: state[k] for k in ("ready", "listening", "pool", "model_version", "stopping",
                                  "tasks_down", "active_model_version")} == {
        "ready": True, "listening": True, "pool": True, "model_version": str(models.v1[1]),
        "stopping": False, "tasks_down": {}, "active_model_version": "999"}
    assert state["model_mismatch_s"] > 0
    failures = [e for e in worker.events() if e.get("event") == "model_load_failed"]
    assert {e["reason"] for e in failures} >= {"feature_mismatch", "not_found"}
    assert all(e["serving"] == str(models.v1[1]) for e in failures)

    # A later good activation goes through.
    await activate_model(conn, *models.v2)
    assert await wait_for(
        lambda: _async(worker.metric("sensor_model_version") == float(models.v2[1])), timeout=20)


async def _async(value: object) -> object:
    return value


async def _failures(worker: object, reason: str) -> bool:
    value = worker.metric("sensor_model_load_failures_total", f'reason="{reason}"')  # type: ignore[attr-defined]
    return bool(value and value >= 1)


BAD_READINGS: list[tuple[str, object, str]] = [
    ("missing sensor", {k: v for k, v in reading(1).items() if k != "Sensor 7"},
     "missing_sensor"),
    ("empty object", {}, "missing_sensor"),
    ("null value", reading(2, **{"Sensor 3": None}), "null_value"),
    ("word", reading(3, **{"Sensor 4": "broken"}), "not_a_number"),
    ("boolean", reading(4, **{"Sensor 5": True}), "not_a_number"),
    ("nested object", reading(5, **{"Sensor 6": {"v": 1}}), "not_a_number"),
    ("NaN as text", reading(6, **{"Sensor 8": "NaN"}), "not_finite"),
    ("Infinity as text", reading(7, **{"Sensor 9": "-Infinity"}), "not_finite"),
    ("huge number", reading(8, **{"Sensor 10": 1e300}), "out_of_range"),
    ("beyond float8",
     "{" + ", ".join(f'"Sensor {i}": 0.5' for i in range(2, 21)) + ', "Sensor 1": 1e400}',
     "out_of_range"),
    ("values an array", "[1, 2, 3]", "not_an_object"),
    ("values a string", '"Sensor 1=0.5"', "not_an_object"),
    ("values a number", "42", "not_an_object"),
    ("values NULL", None, "values_missing"),
]


async def test_bad_readings_are_recorded_and_the_rest_scored(
        conn: asyncpg.Connection, models: Models, worker_factory: WorkerFactory) -> None:
    await activate_model(conn, *models.v1)
    worker = worker_factory().start()
    await worker.until_ready()
    good = [reading(100), reading(101, extra_key="ignored")]
    payload: list[object] = [good[0], *[b[1] for b in BAD_READINGS], good[1]]
    ids = await insert_readings(conn, payload)  # type: ignore[arg-type]
    assert await wait_for(lambda: _all_scored(conn), timeout=10)
    errors = {r["reading_id"]: r for r in await conn.fetch("SELECT * FROM reading_errors")}
    bad_ids = ids[1:-1]
    for (label, _value, reason), reading_id in zip(BAD_READINGS, bad_ids, strict=True):
        assert reading_id in errors, label
        assert errors[reading_id]["reason"] == reason, (label, errors[reading_id]["detail"])
        assert errors[reading_id]["model_version"] == str(models.v1[1])
    predicted = {r[0] for r in await conn.fetch("SELECT reading_id FROM predictions")}
    assert predicted == {ids[0], ids[-1]}
    t = await tally(conn)
    assert t.exactly_once and t.errors == len(BAD_READINGS)
    assert worker.metric("sensor_bad_readings_total", 'reason="not_an_object"') == 3
    logged = [e for e in worker.events() if e.get("event") == "bad_reading"]
    assert len(logged) == len(BAD_READINGS)
    # The worker is still healthy, and scores what comes next.
    await insert_readings(conn, [reading(200)])
    assert await wait_for(lambda: _all_scored(conn), timeout=5)


async def test_sigterm_commits_in_flight_work_and_exits_zero(
        database: Database, conn: asyncpg.Connection, models: Models,
        worker_factory: WorkerFactory) -> None:
    await activate_model(conn, *models.v1)
    worker = worker_factory(PREDICTION_BATCH_SIZE="500").start()
    await worker.until_ready()
    for chunk in range(20):
        await insert_readings(conn, [reading(chunk * 1000 + i) for i in range(1000)])
    # SIGTERM once scoring is under way and most of the 20,000 readings still wait: batches are
    # in flight, so "committed, not abandoned" is what the end state shows.
    assert await wait_for(lambda: _predicted(conn), timeout=10, interval=0.01), "nothing scored"
    waiting = int(await conn.fetchval(db.queries()["backlog"]))
    assert waiting > 0, "everything was scored before SIGTERM: nothing was in flight"
    worker.signal(signal.SIGTERM)
    started = time.monotonic()
    code = worker.wait(timeout=10)
    assert code == 0
    assert time.monotonic() - started < 5
    t = await tally(conn)
    assert t.duplicated == 0
    # Whatever it had claimed it committed: nothing is left half-done.
    assert await conn.fetchval("SELECT count(*) FROM scoring_claims") == 0
    events = [e.get("event") for e in worker.events()]
    assert "shutdown_requested" in events and "worker_stopped" in events
    assert t.predicted > 0, t


@pytest.mark.own_model_cache  # fetched over HTTP, not from a cache an earlier test filled
async def test_a_model_served_by_an_mlflow_server_over_http(
        database: Database, conn: asyncpg.Connection, served_models: Models,
        worker_factory: WorkerFactory) -> None:
    await activate_model(conn, *served_models.v1)
    worker = worker_factory(MLFLOW_TRACKING_URI=served_models.store.uri).start()
    await worker.until_ready()
    await insert_readings(conn, [reading(i) for i in range(10)])
    assert await wait_for(lambda: _all_scored(conn), timeout=5)
    assert await conn.fetchval(
        "SELECT count(*) FROM predictions WHERE mlflow_run_id = $1", served_models.v1[0]) == 10
    assert [e["source"] for e in worker.events() if e.get("event") == "model_swapped"] == [
        "mlflow"]
