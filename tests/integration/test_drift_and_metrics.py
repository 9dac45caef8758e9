"""Drift events as a user sees them (drift rows, gauges) and the metrics endpoint over HTTP."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess

import asyncpg
import numpy as np
import pytest

from sensor_predictor.devtools.tally import tally
from sensor_predictor.devtools.worker_process import WorkerProcess
from sensor_predictor.simulator import Simulator
from sensor_predictor.training import activate_model
from tests.support import doorbell
from tests.support.fixtures import WorkerFactory
from tests.support.models import Models
from tests.support.readings import insert_readings
from tests.support.waiting import wait_for

pytestmark = pytest.mark.asyncio

WINDOW = 100


async def _feed(conn: asyncpg.Connection, sim: Simulator, n: int, step: int = 10) -> None:
    """Insert n readings in statements of `step`, each scored before the next is written."""
    for _ in range(0, n, step):
        await insert_readings(conn, [r.values for r in sim.next_batch(step)])
        assert await wait_for(lambda: _scored(conn), timeout=10, interval=0.01)


async def _scored(conn: asyncpg.Connection) -> bool:
    return (await tally(conn)).missing == 0


async def _drift_rows(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return list(await conn.fetch("SELECT * FROM drift ORDER BY id"))


@pytest.mark.slow
async def test_a_shift_opens_exactly_one_drift_event_within_one_window_and_it_closes(
        conn: asyncpg.Connection, models: Models, worker_factory: WorkerFactory) -> None:
    run_id, version = models.v1
    await activate_model(conn, run_id, version)
    worker = worker_factory(DRIFT_DETECTION_WINDOW=str(WINDOW), DRIFT_THRESHOLD="0.1").start()
    await worker.until_ready()
    normal = Simulator(machines=10, seed=11)
    shifted = Simulator(machines=10, seed=12, drift=True)

    await _feed(conn, normal, 300)
    assert await _drift_rows(conn) == []
    assert worker.metric("sensor_drift_detected") == 0
    assert worker.metric("sensor_drift_window_fill_ratio") == 1.0
    assert worker.metric("sensor_drift_score") < 0.05  # type: ignore[operator]

    # The shift: count the shifted readings it takes until the event is on record.
    shifted_readings = 0
    while not await _drift_rows(conn):
        await _feed(conn, shifted, 10)
        shifted_readings += 10
        assert shifted_readings <= WINDOW, "no drift event within one window of the shift"
        await asyncio.sleep(0.05)  # drift rows are written just after the batch commits
    assert worker.metric("sensor_drift_detected") == 1
    # The shift moves the sensors' means before it moves enough cluster shares: the feature
    # rule may open the excursion first (docs/drift.md).
    (opened,) = await _drift_rows(conn)
    assert opened["kind"] in ("cluster", "feature")
    assert json.loads(opened["top_features"])[0]["feature"].startswith("Sensor ")

    await _feed(conn, shifted, 200)  # staying high: still one row, its peak kept up to date
    await _feed(conn, normal, 300)  # back to normal: the window empties of shifted readings
    assert await wait_for(
        lambda: _async(worker.metric("sensor_drift_detected") == 0), timeout=5)
    rows = await _drift_rows(conn)
    assert len(rows) == 1
    row = rows[0]
    assert row["model_version"] == str(version)
    assert row["ended_at"] is not None and row["ended_at"] > row["detection_time"]
    assert row["peak_score"] > 0.1 and row["peak_score"] >= row["drift_score"]
    reference = json.loads(row["reference_distribution"])
    current = json.loads(row["current_distribution"])
    assert set(reference) == set(current) == {"0", "1", "2", "3"}
    assert sum(reference.values()) == pytest.approx(1) and sum(current.values()) == pytest.approx(1)
    assert worker.metric("sensor_drift_events_total") == 1


@pytest.mark.slow
async def test_one_sensor_shifted_opens_an_event_that_names_it(
        conn: asyncpg.Connection, models: Models, worker_factory: WorkerFactory) -> None:
    """A shift of one sensor moves no reading to another cluster, so the cluster shares hold;
    the feature rule opens the event, and the row and the gauges name that sensor first."""
    await activate_model(conn, *models.v1)
    worker = worker_factory(DRIFT_DETECTION_WINDOW=str(WINDOW)).start()
    await worker.until_ready()
    normal = Simulator(machines=10, seed=21)
    await _feed(conn, normal, 200, step=20)
    assert await _drift_rows(conn) == []
    assert worker.metric("sensor_feature_drift_score", 'feature="Sensor 11"') < 0.5  # type: ignore[operator]
    assert worker.metric("sensor_outlier_share") <= 0.05  # type: ignore[operator]

    sample = [r.values["Sensor 11"] for r in Simulator(machines=10, seed=22).next_batch(5000)]
    shift = 3 * float(np.std(sample))  # 3 sigma: the stream's autocorrelation widens the test
    shifted_readings = 0
    while not await _drift_rows(conn):
        batch = [dict(r.values) for r in normal.next_batch(10)]
        for values in batch:
            values["Sensor 11"] += shift
        await insert_readings(conn, batch)
        assert await wait_for(lambda: _scored(conn), timeout=10, interval=0.01)
        shifted_readings += 10
        assert shifted_readings <= WINDOW, "no drift event within one window of the shift"
        await asyncio.sleep(0.05)
    (row,) = await _drift_rows(conn)
    assert row["kind"] == "feature"
    assert row["drift_score"] < 0.1  # the cluster shares held
    top = json.loads(row["top_features"])
    assert top[0]["feature"] == "Sensor 11" and top[0]["effect"] > 0.5
    assert [t["feature"] for t in top].count("Sensor 11") == 1 and len(top) == 5
    assert worker.metric("sensor_drift_detected") == 1
    scrape = await worker.ascrape()
    scores = {k: v for k, v in scrape.items() if k.startswith("sensor_feature_drift_score{")}
    assert len(scores) == 20
    assert max(scores, key=lambda k: scores[k]) == 'sensor_feature_drift_score{feature="Sensor 11"}'
    assert worker.metric("sensor_feature_drift_p_value",
                         'feature="Sensor 11"') < 5e-9  # type: ignore[operator]


async def _async(value: object) -> object:
    return value


async def test_a_restart_mid_excursion_does_not_report_it_twice(
        conn: asyncpg.Connection, models: Models, worker_factory: WorkerFactory) -> None:
    await activate_model(conn, *models.v1)
    worker = worker_factory(DRIFT_DETECTION_WINDOW=str(WINDOW)).start()
    await worker.until_ready()
    await _feed(conn, Simulator(10, seed=3, drift=True), 200, step=50)
    assert await wait_for(lambda: _drift_rows(conn), timeout=5)
    assert worker.stop() == 0  # its queued drift writes are flushed at shutdown
    (opened,) = await _drift_rows(conn)
    assert opened["ended_at"] is None

    again = worker_factory(DRIFT_DETECTION_WINDOW=str(WINDOW)).start()
    await again.until_ready()
    # Resumed from the open row. /ready turns true as the model is served, a moment before
    # the drift tracker has read that row: wait for the gauge rather than race it (seen once
    # on a loaded machine, a worker ready from its model cache in 0.25 s).
    assert await wait_for(
        lambda: _async(again.metric("sensor_drift_detected") == 1), timeout=5)
    await _feed(conn, Simulator(10, seed=4, drift=True), 200, step=50)
    # Its window has seen all 200 (its own count, kept as each batch is recorded): a second
    # report would have happened by now. Then stop it, so its drift writes are on record.
    assert await wait_for(
        lambda: _async(again.metric("sensor_predictions_total") == 200), timeout=5)
    events_total = again.metric("sensor_drift_events_total")
    assert again.stop() == 0
    assert events_total == 0
    events = again.events()
    started = [e for e in events if e.get("event") == "drift_tracking_started"]
    assert started and started[0]["resumed_excursion"] is True, started
    assert not [e for e in events if e.get("event") in ("drift_detected", "drift_row_exists")]
    # Still the one row, the same excursion: the restarted worker kept its peak up to date.
    (row,) = await _drift_rows(conn)
    assert row["id"] == opened["id"] and row["detection_time"] == opened["detection_time"]
    assert row["ended_at"] is None
    assert (row["peak_score"] or 0) >= (opened["peak_score"] or 0)


def _promtool_check(body: str) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: install Debian's prometheus package (.ci/run does)"
    proc = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                          text=True, timeout=30)
    # promtool exits 0 when the exposition parses; lint remarks (e.g. on counter names the old
    # dashboard fixed) come back as text.
    assert proc.returncode == 0, proc.stdout + proc.stderr


async def test_the_metrics_endpoint_over_http(
        conn: asyncpg.Connection, models: Models, worker_factory: WorkerFactory) -> None:
    await activate_model(conn, *models.v1)
    worker: WorkerProcess = worker_factory().start()
    await worker.until_ready()
    assert await wait_for(lambda: doorbell.armed(conn), timeout=10)  # asleep: inserts notify
    await insert_readings(conn, [r.values for r in Simulator(10, seed=5).next_batch(50)])
    await insert_readings(conn, [{"Sensor 1": "broken"}])
    assert await wait_for(lambda: _scored(conn), timeout=10)
    await asyncio.sleep(0.1)

    status, body = worker.get("/metrics")
    assert status == 200
    _promtool_check(body)
    assert worker.metric("sensor_predictions_total") == 50
    by_cluster = [line for line in body.splitlines()
                  if line.startswith("sensor_predictions_by_cluster_total{")]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in by_cluster) == 50
    assert all('cluster_id="' in line for line in by_cluster)
    assert worker.metric("sensor_bad_readings_total", 'reason="missing_sensor"') == 1
    assert worker.metric("sensor_prediction_latency_seconds_count") == 50
    assert worker.metric("sensor_prediction_latency_seconds_bucket", 'le="60.0"') == 50
    assert 'sensor_prediction_latency_seconds_bucket{le="0.001"}' in body
    assert worker.metric("sensor_model_version") == float(models.v1[1])
    assert f'run_id="{models.v1[0]}"' in body
    assert worker.metric("sensor_ready") == 1
    assert worker.metric("sensor_drift_threshold") == 0.1
    for name in ("sensor_backlog_readings", "sensor_batch_size_count",
                 "sensor_batch_duration_seconds_count"):
        assert worker.metric(name) is not None, name
    assert worker.metric("sensor_db_reconnects_total", 'connection="listener"') == 0
    # Wake-ups are counted by cause: a writer notifies while the worker holds the doorbell.
    async def one_reading() -> None:
        await insert_readings(conn, [r.values for r in Simulator(1, seed=9).next_batch(1)])
        assert await wait_for(lambda: _scored(conn), timeout=10)

    await doorbell.until_a_notification(conn, worker, one_reading)

    status, text = worker.get("/ready")
    assert status == 200 and '"ready": true' in text


async def test_readiness_is_503_without_a_model(worker_factory: WorkerFactory) -> None:
    worker = worker_factory().start()
    state = await worker.until_ready(key="listening")
    status, _ = worker.get("/ready")
    assert status == 503 and state["ready"] is False
    assert worker.metric("sensor_ready") == 0
    _promtool_check(worker.get("/metrics")[1])
