"""Stable cluster ids across a retrain, as a user sees them: predictions, counters, rescore."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

from sensor_predictor.devtools.mlflow_server import MlflowServer as MlflowStore
from sensor_predictor.devtools.mlflow_server import mlflow_env
from sensor_predictor.devtools.postgres import PgServer
from sensor_predictor.devtools.tally import tally
from sensor_predictor.simulator import Simulator
from sensor_predictor.training import activate_model
from tests.support.databases import Database
from tests.support.fixtures import WorkerFactory
from tests.support.models import Models, log_retrain
from tests.support.readings import insert_readings
from tests.support.waiting import wait_for

RUN_TAG = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def retrain(pg_server: PgServer, mlflow_store: MlflowStore, models: Models) -> tuple[str, int]:
    cwd = Path.cwd()
    os.chdir(mlflow_store.root)  # a file store's relative artifact paths
    try:
        return log_retrain(pg_server, mlflow_store)
    finally:
        os.chdir(cwd)


def _cli(database: Database, store: MlflowStore, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **database.env(), **mlflow_env(store.uri), "LOG_LEVEL": "warning"}
    return subprocess.run([sys.executable, "-m", "sensor_predictor.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def _by_cluster(body: str) -> dict[str, float]:
    out = {}
    for line in body.splitlines():
        m = re.match(r'sensor_predictions_by_cluster_total\{cluster_id="(\d+)"\} (\S+)', line)
        if m:
            out[m[1]] = float(m[2])
    return out


async def _feed(conn: asyncpg.Connection, sim: Simulator, n: int) -> list[int]:
    ids: list[int] = []
    for _ in range(0, n, 100):
        ids += await insert_readings(conn, [r.values for r in sim.next_batch(100)])
    assert await wait_for(lambda: _all_scored(conn), timeout=20)
    return ids


async def _all_scored(conn: asyncpg.Connection) -> bool:
    return (await tally(conn)).missing == 0


async def test_a_retrain_swapped_in_mid_stream_keeps_every_cluster_id_and_counter(
        database: Database, conn: asyncpg.Connection, models: Models,
        retrain: tuple[str, int], worker_factory: WorkerFactory) -> None:
    old_run, old_version = models.v1
    new_run, new_version = retrain
    await activate_model(conn, old_run, old_version)
    worker = worker_factory().start()
    await worker.until_ready()
    sim = Simulator(machines=10, seed=21)
    before_ids = await _feed(conn, sim, 2000)
    before = _by_cluster(worker.get("/metrics")[1])
    assert set(before) == {"0", "1", "2", "3"} and sum(before.values()) == 2000

    await activate_model(conn, new_run, new_version)  # mid-stream: the worker keeps running
    assert await wait_for(lambda: _served(worker, new_version), timeout=30)
    after_ids = await _feed(conn, sim, 2000)
    after = _by_cluster(worker.get("/metrics")[1])

    # The by-cluster counters go on: the same four series, none new, each growing at the rate
    # it grew before the swap (the stream did not change, only the model).
    assert set(after) == {"0", "1", "2", "3"}
    for cid in before:
        share_before = before[cid] / 2000
        share_after = (after[cid] - before[cid]) / 2000
        assert abs(share_after - share_before) < 0.05, (cid, share_before, share_after)

    rows = await conn.fetch("SELECT reading_id, cluster_id, model_label, model_version"
                            " FROM predictions WHERE reading_id = ANY($1::bigint[])", after_ids)
    assert {r["model_version"] for r in rows} == {str(new_version)}
    # The retrain did renumber its clusters (else this test proves nothing) ...
    assert any(r["cluster_id"] != r["model_label"] for r in rows)
    assert (await tally(conn)).exactly_once and len(before_ids) == 2000
    # ... and each reading scored after the swap carries the id the old model gives it: the old
    # model re-scores the same readings (rescore, its own mapping), ids compared reading by
    # reading.
    done = _cli(database, models.store, "rescore", "--run-id", old_run, "--version",
                str(old_version), "--from-id", str(min(after_ids) - 1))
    assert done.returncode == 0, done.stderr
    old_ids = dict(await conn.fetch(
        "SELECT reading_id, cluster_id FROM predictions WHERE model_version = $1"
        " AND reading_id = ANY($2::bigint[])", str(old_version), after_ids))
    same = sum(1 for r in rows if old_ids[r["reading_id"]] == r["cluster_id"])
    assert same / len(rows) > 0.97, same / len(rows)
    raw_same = sum(1 for r in rows if old_ids[r["reading_id"]] == r["model_label"])
    assert raw_same / len(rows) < 0.9  # what the dashboard showed before stable ids

    shown = _cli(database, models.store, "clusters")
    assert shown.returncode == 0, shown.stderr
    assert f"model_version={new_version} run_id={new_run} aligned against {old_version}" \
        in shown.stdout
    assert shown.stdout.count("matched at distance") == 4  # the retrain's; the first: new ids
    stored = await conn.fetch("SELECT stable_id FROM cluster_ids WHERE model_version = $1",
                              str(new_version))
    assert sorted(r["stable_id"] for r in stored) == [0, 1, 2, 3]


async def _served(worker: object, version: int) -> bool:
    from sensor_predictor.devtools.worker_process import WorkerProcess

    assert isinstance(worker, WorkerProcess)
    return worker.metric("sensor_model_version") == float(version)


async def test_rescore_aligns_a_model_at_its_first_use_and_one_more_cluster_gets_one_new_id(
        database: Database, conn: asyncpg.Connection, models: Models) -> None:
    """3 clusters served, then a 4-cluster model used for the first time by rescore: aligned
    against the model served last, the three old ids survive and one new id appears."""
    from sensor_predictor import cluster_registry
    from sensor_predictor.model_holder import configure_mlflow, load_and_verify
    from sensor_predictor.model_types import ActiveRow

    configure_mlflow(models.store.uri)
    three = await asyncio.to_thread(load_and_verify, ActiveRow(0, *models.v2, None), "m")
    assert (await cluster_registry.ensure_aligned(conn, three)).tolist() == [0, 1, 2]
    await conn.execute("UPDATE cluster_models SET served_at = now()")  # as a worker does
    ids = await insert_readings(conn, [r.values for r in Simulator(10, seed=5).next_batch(300)])
    run_id, version = models.v1
    done = _cli(database, models.store, "rescore", "--run-id", run_id, "--version", str(version))
    assert done.returncode == 0, done.stderr
    mapping = dict(await conn.fetch("SELECT label, stable_id FROM cluster_ids"
                                    " WHERE model_version = $1", str(version)))
    assert sorted(mapping.values()) == [0, 1, 2, 3]
    new = await conn.fetch("SELECT stable_id, distance FROM cluster_ids"
                           " WHERE model_version = $1 AND distance IS NULL", str(version))
    assert [r["stable_id"] for r in new] == [3]
    assert await conn.fetchval("SELECT aligned_against FROM cluster_models"
                               " WHERE model_version = $1", str(version)) == str(models.v2[1])
    rows = await conn.fetch("SELECT cluster_id, model_label FROM predictions"
                            " WHERE model_version = $1", str(version))
    assert len(rows) == len(ids)
    assert all(mapping[r["model_label"]] == r["cluster_id"] for r in rows)
