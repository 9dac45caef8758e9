"""Training against a real PostgreSQL and a real MLflow sqlite store; the simulator's writer."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pytest

from sensor_predictor import db
from sensor_predictor.config import Settings, load_settings
from sensor_predictor.model_holder import load_and_verify
from sensor_predictor.model_types import ActiveRow
from sensor_predictor.simulator import FEATURE_NAMES, run_simulation
from sensor_predictor.training import (
    EXPERIMENT_NAME,
    PRODUCTION_ALIAS,
    activate_model,
    train,
)
from tests.support.databases import Database
from tests.support.readings import insert_readings, reading

pytestmark = pytest.mark.asyncio

MODEL_NAME = "sensor_failure_clustering"


@pytest.fixture
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh sqlite tracking store; its default artifact root (./mlruns) lands in tmp_path."""
    monkeypatch.chdir(tmp_path)
    return f"sqlite:///{tmp_path}/mlflow.db"


@pytest.fixture
def settings(database: Database, mlflow_uri: str) -> Settings:
    return load_settings({**database.env(), "MLFLOW_TRACKING_URI": mlflow_uri})


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


async def _simulate(database: Database, count: int) -> int:
    return await run_simulation(database.connect, machines=10, rate=1e6, count=count, seed=11)


def _requirement_files(root: Path) -> dict[Path, str]:
    return {p: p.read_text() for p in root.rglob("requirements.txt")}


# ---------------------------------------------------------------------------------- training


async def test_train_on_generated_readings_logs_what_the_worker_loads(
    settings: Settings, database: Database, mlflow_uri: str, tmp_path: Path,
) -> None:
    result = await train(settings, clusters=4, readings=3_000, activate=False, seed=3)

    assert result.source == "generated"  # the database holds no readings
    assert result.n_readings == 3_000
    assert result.version >= 1
    assert len(result.proportions) == 4
    assert sum(result.proportions) == pytest.approx(1.0)
    assert -1.0 <= result.silhouette <= 1.0
    assert not result.activated

    model = await asyncio.to_thread(
        load_and_verify, ActiveRow(1, result.run_id, result.version, 4), MODEL_NAME)
    assert model.feature_names == FEATURE_NAMES
    assert model.n_clusters == 4
    assert model.reference is not None
    assert sum(model.reference) == pytest.approx(1.0)
    assert model.reference == pytest.approx(result.proportions)
    labels, confidence = model.predict(np.zeros((3, 20)))
    assert labels.shape == (3,)
    assert confidence is not None

    client = _client(mlflow_uri)
    run = client.get_run(result.run_id)
    assert run.data.params == {"n_clusters": "4", "n_readings": "3000", "source": "generated",
                               "seed": "3"}
    assert run.data.metrics["silhouette_score"] == pytest.approx(result.silhouette)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == EXPERIMENT_NAME
    alias = client.get_model_version_by_alias(MODEL_NAME, PRODUCTION_ALIAS)
    assert int(alias.version) == result.version
    assert alias.run_id == result.run_id

    # Artifacts stayed inside the test's folder, with exactly the pinned requirements.
    requirements = _requirement_files(tmp_path)
    assert requirements
    assert all(tmp_path in p.parents for p in requirements)
    text = next(iter(requirements.values()))
    lines = {ln.strip() for ln in text.splitlines() if ln.strip()}
    assert {ln.split("==")[0] for ln in lines if not ln.startswith("mlflow")} == {
        "scikit-learn", "numpy"}

    conn = await database.connect()
    try:
        assert await conn.fetchval("SELECT count(*) FROM clusters") == 0
        assert await conn.fetchval("SELECT count(*) FROM versions") == 0
    finally:
        await conn.close()


async def test_train_from_simulated_readings_in_the_database(
    settings: Settings, database: Database,
) -> None:
    assert await _simulate(database, 2_500) == 2_500
    conn = await database.connect()
    try:
        # Readings the worker would refuse are not trained on.
        await insert_readings(conn, [
            reading(1, **{"Sensor 3": None}), reading(2, **{"Sensor 4": "hot"}),
            {k: v for k, v in reading(3).items() if k != "Sensor 5"}, None, "[1, 2]",
        ])
        means = await conn.fetchrow(
            "SELECT " + ", ".join(
                f"avg((\"values\"->>{db.sql_literal(n)})::float8) AS s{i}"
                for i, n in enumerate(FEATURE_NAMES))
            + " FROM readings r JOIN machines m ON m.id = r.machine_id"
              " WHERE m.machine_id LIKE 'sim-%'")
    finally:
        await conn.close()

    result = await train(settings, clusters=4, readings=10_000, min_readings=1_000,
                         activate=False)
    assert result.source == "database"
    assert result.n_readings == 2_500
    # Four machine profiles, ten machines: 3, 3, 2 and 2 machines per cluster.
    assert sorted(result.proportions) == pytest.approx([0.2, 0.2, 0.3, 0.3], abs=0.01)

    model = await asyncio.to_thread(
        load_and_verify, ActiveRow(1, result.run_id, result.version, None), MODEL_NAME)
    # Served from the run's JSON artifact (no pickle), and it is the Pipeline's own numbers:
    # the scaler's column means are the sensors' means by name, no column got permuted.
    assert not model.unpickled and model.pipeline is None
    assert model.kernel is not None
    expected = np.array([means[f"s{i}"] for i in range(20)])
    np.testing.assert_allclose(model.kernel.mean, expected, atol=1e-6)


async def test_train_falls_back_below_min_readings(
    settings: Settings, database: Database,
) -> None:
    await _simulate(database, 200)
    result = await train(settings, clusters=3, readings=2_000, min_readings=500,
                         activate=False, seed=1)
    assert result.source == "generated"
    assert result.n_readings == 2_000


async def test_activate_leaves_one_active_row_and_a_version_notice(
    settings: Settings, database: Database, mlflow_uri: str,
) -> None:
    first = await train(settings, clusters=4, readings=2_000, activate=True, seed=1)
    second = await train(settings, clusters=3, readings=2_000, activate=True, seed=2)
    assert first.activated
    assert second.activated
    assert second.version == first.version + 1

    conn = await database.connect()
    try:
        active = await conn.fetch("SELECT * FROM clusters WHERE is_active")
        assert len(active) == 1
        row = active[0]
        assert row["mlflow_run_id"] == second.run_id
        assert row["mlflow_model_version"] == second.version
        assert row["n_clusters"] == 3
        assert row["silhouette_score"] == pytest.approx(second.silhouette)
        profiles = json.loads(row["cluster_profiles"])
        assert set(profiles) == {"0", "1", "2"}
        assert all(set(p) == set(FEATURE_NAMES) for p in profiles.values())
        assert await conn.fetchval("SELECT count(*) FROM clusters") == 2
        versions = await conn.fetch("SELECT version, run_id, is_processed FROM versions"
                                    " ORDER BY id")
        assert [(v["version"], v["run_id"]) for v in versions] == [
            (str(first.version), first.run_id), (str(second.version), second.run_id)]
        assert not any(v["is_processed"] for v in versions)
        # What the worker reads to choose its model.
        served = await conn.fetchrow(db.queries()["active_model"])
        assert served["mlflow_run_id"] == second.run_id

        # Rolling back to the first run reactivates its row.
        row_id = await activate_model(conn, first.run_id, first.version, 4, first.silhouette,
                                      first.profiles)
        active = await conn.fetch("SELECT id, mlflow_run_id FROM clusters WHERE is_active")
        assert [(r["id"], r["mlflow_run_id"]) for r in active] == [(row_id, first.run_id)]
        assert await conn.fetchval("SELECT count(*) FROM clusters") == 2
        assert await conn.fetchval("SELECT count(*) FROM versions") == 3
    finally:
        await conn.close()

    alias = _client(mlflow_uri).get_model_version_by_alias(MODEL_NAME, PRODUCTION_ALIAS)
    assert int(alias.version) == second.version


async def test_concurrent_activations_leave_one_active_row(database: Database) -> None:
    conns = [await database.connect() for _ in range(4)]
    try:
        await asyncio.gather(*(
            activate_model(c, f"run{i:030d}", i, 4, 0.5, None) for i, c in enumerate(conns)))
        assert await conns[0].fetchval("SELECT count(*) FROM clusters WHERE is_active") == 1
    finally:
        for c in conns:
            await c.close()


# ------------------------------------------------------------------- the simulator's writer


async def test_run_simulation_writes_machines_readings_and_failures(
    database: Database,
) -> None:
    written = await run_simulation(database.connect, machines=10, rate=1e6, count=20_000,
                                   seed=5, rows_per_statement=500)
    assert written == 20_000
    conn = await database.connect()
    try:
        machines = await conn.fetch("SELECT id, machine_id FROM machines ORDER BY machine_id")
        assert [m["machine_id"] for m in machines] == [f"sim-{i:03d}" for i in range(1, 11)]
        counts = await conn.fetch("SELECT machine_id, count(*) AS n FROM readings"
                                  " GROUP BY machine_id")
        assert {r["n"] for r in counts} == {2_000}
        raw = await conn.fetch('SELECT "values"::text AS v FROM readings LIMIT 50')
        for r in raw:
            values = json.loads(r["v"])
            assert set(values) == set(FEATURE_NAMES)
            assert all(isinstance(x, float) for x in values.values())
        # Every episode has a closed failures row on the right machine, and its readings.
        failures = await conn.fetch("SELECT * FROM failures")
        assert len(failures) > 10
        assert not any(f["is_active"] for f in failures)
        assert all(f["end_time"] is not None and f["end_time"] >= f["start_time"]
                   for f in failures)
        mismatched = await conn.fetchval(
            "SELECT count(*) FROM readings r JOIN failures f ON f.id = r.failure_id"
            " WHERE f.machine_id <> r.machine_id OR r.\"timestamp\" < f.start_time"
            " OR r.\"timestamp\" >= f.end_time")
        assert mismatched == 0
        per_failure = await conn.fetch(
            "SELECT f.id, count(r.id) AS n FROM failures f"
            " LEFT JOIN readings r ON r.failure_id = f.id GROUP BY f.id")
        assert all(1 <= r["n"] <= 30 for r in per_failure)
        share = await conn.fetchval(
            "SELECT avg((failure_id IS NOT NULL)::int) FROM readings")
        assert 0.01 < share < 0.08
        # A second run on the same machines reuses their rows.
        await run_simulation(database.connect, machines=3, rate=1e6, count=30, seed=6)
        assert await conn.fetchval("SELECT count(*) FROM machines") == 10
    finally:
        await conn.close()


async def test_run_simulation_keeps_its_rate_and_stops_on_time(
    database: Database,
) -> None:
    started = time.monotonic()
    written = await run_simulation(database.connect, machines=4, rate=400, duration=1.0,
                                   seed=1)
    elapsed = time.monotonic() - started
    assert written == 400
    assert 0.9 < elapsed < 2.0
    conn = await database.connect()
    try:
        statements = await conn.fetchval("SELECT count(DISTINCT txid) FROM readings")
        # Batched (at most one statement per 20 ms tick), not one statement per reading.
        assert 10 <= statements <= 120
        stamps = [r["timestamp"] for r in await conn.fetch(
            'SELECT "timestamp" FROM readings ORDER BY id')]
        assert stamps == sorted(stamps)
        assert (stamps[-1] - stamps[0]).total_seconds() == pytest.approx(399 / 400, abs=1e-3)
    finally:
        await conn.close()


async def test_run_simulation_stops_when_told(database: Database) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(run_simulation(
        database.connect, machines=2, rate=50, seed=1, stop=stop, record_failures=False))
    await asyncio.sleep(0.5)
    stop.set()
    written = await asyncio.wait_for(task, 2)
    assert 10 <= written <= 40
    conn: asyncpg.Connection = await database.connect()
    try:
        assert await conn.fetchval("SELECT count(*) FROM readings") == written
        assert await conn.fetchval("SELECT count(*) FROM failures") == 0
    finally:
        await conn.close()


async def test_run_simulation_through_settings(database: Database) -> None:
    settings = load_settings(database.env())
    assert await run_simulation(settings, machines=2, rate=1e6, count=7, seed=0) == 7
