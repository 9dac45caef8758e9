"""Shadow scoring, as an operator uses it: mark a candidate with plain SQL, watch its agreement
with the active model, promote it with an ordinary activation. The active predictions and their
exactly-once guarantee stay untouched throughout, even when the shadow fails."""

from __future__ import annotations

import math
import os
from pathlib import Path

import asyncpg
import pytest
from sklearn.metrics import adjusted_rand_score

from sensor_predictor.devtools.mlflow_server import MlflowServer
from sensor_predictor.devtools.postgres import PgServer
from sensor_predictor.devtools.prometheus_text import value as series_value
from sensor_predictor.devtools.tally import tally
from sensor_predictor.devtools.worker_process import WorkerProcess
from sensor_predictor.simulator import Simulator
from sensor_predictor.training import activate_model
from tests.support.fixtures import WorkerFactory
from tests.support.models import Models, log_retrain
from tests.support.readings import insert_readings
from tests.support.waiting import wait_until

pytestmark = pytest.mark.asyncio

WINDOW = 100


@pytest.fixture(scope="module")
def retrain(pg_server: PgServer, mlflow_store: MlflowServer, models: Models) -> tuple[str, int]:
    cwd = Path.cwd()
    os.chdir(mlflow_store.root)
    try:
        return log_retrain(pg_server, mlflow_store, seed=3)
    finally:
        os.chdir(cwd)


async def _mark_candidate(conn: asyncpg.Connection, run_id: str, version: int | None) -> None:
    """What the README tells an operator to run."""
    await conn.execute("INSERT INTO model_candidates (mlflow_run_id, mlflow_model_version)"
                       " VALUES ($1, $2)", run_id, version)


async def _feed(conn: asyncpg.Connection, sim: Simulator, n: int) -> list[int]:
    ids: list[int] = []
    for _ in range(0, n, 50):
        ids += await insert_readings(conn, [r.values for r in sim.next_batch(50)])
    return ids


async def _shadowing(worker: WorkerProcess, version: int) -> bool:
    sample = await worker.ascrape()
    return any(k.startswith("sensor_shadow_candidate_info{") and f'model_version="{version}"' in k
               for k in sample)


async def test_a_candidate_is_scored_in_the_shadow_with_its_agreement_then_promoted(
        conn: asyncpg.Connection, models: Models, retrain: tuple[str, int],
        worker_factory: WorkerFactory) -> None:
    active_run, active_version = models.v1
    cand_run, cand_version = retrain
    await activate_model(conn, active_run, active_version)
    worker = worker_factory(DRIFT_DETECTION_WINDOW=str(WINDOW)).start()
    await worker.until_ready()
    await _mark_candidate(conn, cand_run, cand_version)
    await wait_until(lambda: _shadowing(worker, cand_version), "the candidate is shadowed", 60)

    sim = Simulator(machines=10, seed=31)
    ids = await _feed(conn, sim, 1000)

    async def shadowed() -> bool:
        n = await conn.fetchval("SELECT count(*) FROM shadow_predictions WHERE model_version = $1",
                                str(cand_version))
        return int(n) == len(ids) and (await tally(conn)).missing == 0

    await wait_until(shadowed, "every reading scored by both models", 30)
    # The active model's predictions: exactly once, all by the active model, none by the
    # candidate.
    t = await tally(conn)
    assert t.exactly_once and t.predicted == len(ids)
    versions = {r[0] for r in await conn.fetch("SELECT DISTINCT model_version FROM predictions")}
    assert versions == {str(active_version)}
    # The shadow rows sit beside them: for each reading, the active model's id as written.
    mismatched = await conn.fetchval(
        "SELECT count(*) FROM shadow_predictions s JOIN predictions p USING (reading_id)"
        " WHERE s.model_version = $1 AND (p.cluster_id <> s.active_cluster_id"
        "   OR p.model_version <> s.active_model_version)", str(cand_version))
    assert mismatched == 0

    # One evaluation row per window of 100, each covering its own readings; a retrain on the
    # same kind of data groups them as the active model does, in the same stable ids.
    async def evaluated() -> list[asyncpg.Record]:
        rows = await conn.fetch("SELECT * FROM shadow_evaluations WHERE candidate_version = $1"
                                " ORDER BY id", str(cand_version))
        return rows if len(rows) == len(ids) // WINDOW else []

    rows = await wait_until(evaluated, "ten evaluation windows", 20)
    assert all(r["readings"] == WINDOW and r["active_model_version"] == str(active_version)
               for r in rows)
    for r in rows:
        assert r["adjusted_rand_index"] > 0.9 and r["same_id_share"] > 0.95, dict(r)
        assert r["candidate_drift_score"] is not None and r["candidate_drift_score"] < 0.1
        assert 0.0 <= r["candidate_p_value"] <= 1.0
    # The figure is scikit-learn's adjusted Rand index of the window's rows, as a user would
    # recompute it from the table. A window is readings in scoring order, and two lanes may
    # commit out of id order: where a window's id range holds exactly its own readings, the
    # rows in that range are the window.
    checked = 0
    for row in rows:
        window = await conn.fetch(
            "SELECT active_cluster_id, cluster_id FROM shadow_predictions"
            " WHERE model_version = $1 AND reading_id BETWEEN $2 AND $3", str(cand_version),
            row["first_reading_id"], row["last_reading_id"])
        assert len(window) >= WINDOW
        if len(window) == WINDOW:
            expected = adjusted_rand_score([w[0] for w in window], [w[1] for w in window])
            assert math.isclose(row["adjusted_rand_index"], expected, abs_tol=1e-12)
            checked += 1
    assert checked >= len(rows) // 2, f"only {checked} of {len(rows)} windows contiguous"

    sample = await worker.ascrape()
    assert series_value(sample, "sensor_shadow_predictions_total") == len(ids)
    assert series_value(sample, "sensor_shadow_evaluations_total") == len(rows)
    gauges = {name: series_value(sample, f"sensor_shadow_{name}")
              for name in ("agreement_ari", "same_id_ratio", "drift_score")}
    assert gauges["agreement_ari"] == pytest.approx(rows[-1]["adjusted_rand_index"])
    assert gauges["same_id_ratio"] == pytest.approx(rows[-1]["same_id_share"])
    assert gauges["drift_score"] is not None and gauges["drift_score"] < 0.1
    assert sum(v for k, v in sample.items() if k.startswith("sensor_shadow_failures_total")) == 0

    # Promotion is an ordinary activation: the candidate serves, its shadow scoring stops, its
    # history stays.
    await activate_model(conn, cand_run, cand_version)

    async def promoted() -> bool:
        s = await worker.ascrape()
        return series_value(s, "sensor_model_version") == float(cand_version) and not any(
            k.startswith("sensor_shadow_candidate_info{") for k in s)

    await wait_until(promoted, "the candidate promoted and no longer shadowed", 30)
    assert await conn.fetchval("SELECT promoted_at IS NOT NULL FROM model_candidates"
                               " WHERE mlflow_run_id = $1", cand_run)
    later = await _feed(conn, sim, 300)

    async def scored_later() -> bool:
        return (await tally(conn)).missing == 0

    await wait_until(scored_later, "the readings after the promotion scored", 30)
    assert {r[0] for r in await conn.fetch(
        "SELECT DISTINCT model_version FROM predictions WHERE reading_id = ANY($1::bigint[])",
        later)} == {str(cand_version)}
    assert await conn.fetchval("SELECT count(*) FROM shadow_predictions") == len(ids)
    assert (await tally(conn)).exactly_once
    # A rollback to the old model does not shadow the promoted one again.
    await conn.execute("UPDATE clusters SET is_active = (mlflow_run_id = $1)", active_run)
    await wait_until(lambda: _served_version(worker, active_version), "the rollback served", 30)
    assert not await _shadowing(worker, cand_version)


async def _served_version(worker: WorkerProcess, version: int) -> bool:
    return series_value(await worker.ascrape(), "sensor_model_version") == float(version)


async def test_a_candidate_that_cannot_load_is_logged_and_counted_and_scoring_goes_on(
        conn: asyncpg.Connection, models: Models, worker_factory: WorkerFactory) -> None:
    await activate_model(conn, *models.v1)
    worker = worker_factory().start()
    await worker.until_ready()
    await _mark_candidate(conn, "0" * 32, 99)  # a run MLflow does not have

    async def counted() -> float:
        s = await worker.ascrape()
        return sum(v for k, v in s.items() if k.startswith("sensor_shadow_failures_total"))

    await wait_until(counted, "the failed candidate load counted", 60)
    ids = await _feed(conn, Simulator(machines=5, seed=32), 300)

    async def scored() -> bool:
        return (await tally(conn)).missing == 0

    await wait_until(scored, "the readings scored by the active model", 30)
    assert (await tally(conn)).predicted == len(ids)
    assert await conn.fetchval("SELECT count(*) FROM shadow_predictions") == 0
    events = [e for e in worker.events() if e.get("event") == "shadow_candidate_load_failed"]
    assert events and events[0]["run_id"] == "0" * 32
    assert series_value(await worker.ascrape(), "sensor_ready") == 1
    # The operator withdraws it and marks a good one, then withdraws that one too: shadow
    # scoring follows each plain SQL statement.
    await conn.execute("UPDATE model_candidates SET withdrawn_at = now()"
                       " WHERE withdrawn_at IS NULL")
    await _mark_candidate(conn, *models.v2)
    await wait_until(lambda: _shadowing(worker, models.v2[1]), "the good candidate shadowed", 60)
    await conn.execute("UPDATE model_candidates SET withdrawn_at = now()"
                       " WHERE withdrawn_at IS NULL")

    async def not_shadowing() -> bool:
        return not any(k.startswith("sensor_shadow_candidate_info{")
                       for k in await worker.ascrape())

    await wait_until(not_shadowing, "shadow scoring stopped by the withdrawal", 30)


async def test_a_shadow_write_that_fails_is_counted_and_the_active_predictions_go_on(
        conn: asyncpg.Connection, models: Models, worker_factory: WorkerFactory) -> None:
    """The shadow table gone mid-stream (an operator's mistake): every reading is still
    predicted exactly once by the active model."""
    await activate_model(conn, *models.v1)
    worker = worker_factory().start()
    await worker.until_ready()
    await _mark_candidate(conn, *models.v2)
    await wait_until(lambda: _shadowing(worker, models.v2[1]), "the candidate is shadowed", 60)
    sim = Simulator(machines=5, seed=33)
    await _feed(conn, sim, 200)
    await conn.execute("ALTER TABLE shadow_predictions RENAME TO shadow_predictions_away")
    ids = await _feed(conn, sim, 400)

    async def failed_and_scored() -> bool:
        failures = (await worker.ascrape()).get(
            'sensor_shadow_failures_total{reason="write_failed"}', 0)
        return bool(failures) and (await tally(conn)).missing == 0

    await wait_until(failed_and_scored, "write failures counted, readings scored", 30)
    t = await tally(conn)
    assert t.exactly_once and t.predicted == len(ids) + 200
    assert any(e.get("event") == "shadow_scoring_failed" and e.get("reason") == "write_failed"
               for e in worker.events())
