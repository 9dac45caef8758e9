"""A restarted worker serves its last verified model from the local cache: no MLflow, no sklearn."""

from __future__ import annotations

import json
import time
from pathlib import Path

import asyncpg
import pytest

from sensor_predictor.devtools.worker_process import WorkerProcess
from sensor_predictor.training import activate_model
from tests.support.fixtures import WorkerFactory
from tests.support.models import Models
from tests.support.readings import insert_readings, reading
from tests.support.waiting import wait_for

# Each test starts from an empty cache of its own (tmp_path/model-cache), not the run's.
pytestmark = [pytest.mark.asyncio, pytest.mark.own_model_cache]


async def _scored(conn: asyncpg.Connection, ids: list[int]) -> bool:
    n = await conn.fetchval("SELECT count(*) FROM predictions WHERE reading_id = ANY($1)", ids)
    return int(n) == len(ids)


async def _clusters(conn: asyncpg.Connection, ids: list[int]) -> list[int]:
    return [r[0] for r in await conn.fetch(
        "SELECT cluster_id FROM predictions WHERE reading_id = ANY($1) ORDER BY reading_id", ids)]


def _mapped_libraries(worker: WorkerProcess) -> str:
    assert worker.proc is not None
    return Path(f"/proc/{worker.proc.pid}/maps").read_text()


def _events(worker: WorkerProcess, name: str) -> list[dict[str, object]]:
    return [e for e in worker.events() if e.get("event") == name]


async def _start_timed(worker: WorkerProcess) -> float:
    started = time.monotonic()
    worker.start()
    await worker.until_ready(within=120)
    return time.monotonic() - started


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
async def test_a_restart_serves_the_cached_model_without_importing_scikit_learn(
        conn: asyncpg.Connection, models: Models, worker_factory: WorkerFactory,
        tmp_path: Path) -> None:
    run_id, version = models.v1
    await activate_model(conn, run_id, version)
    values = [reading(i) for i in range(50)]

    cold = worker_factory()
    cold_s = await _start_timed(cold)
    first = await insert_readings(conn, values)
    assert await wait_for(lambda: _scored(conn, first), timeout=10)
    assert [e["source"] for e in _events(cold, "model_swapped")] == ["mlflow"]
    # The cold start fetched the model in a child process (model_fetch.py): the worker has
    # imported neither scikit-learn nor MLflow (whose import maps pandas' extensions). numpy's
    # own extension modules show that the check sees what a process imported.
    cold_maps = _mapped_libraries(cold)
    assert "/numpy/" in cold_maps and "/sklearn/" not in cold_maps
    assert "/pandas/" not in cold_maps
    assert cold.stop() == 0
    entries = list((tmp_path / "model-cache").glob("*.model.json"))
    assert len(entries) == 1

    warm = worker_factory()  # same test folder: same MODEL_CACHE_DIR
    warm_s = await _start_timed(warm)
    again = await insert_readings(conn, values)
    assert await wait_for(lambda: _scored(conn, again), timeout=10)
    assert [e["source"] for e in _events(warm, "model_swapped")] == ["cache"]
    assert len(_events(warm, "model_served_from_cache")) == 1
    maps = _mapped_libraries(warm)
    # No scikit-learn (seconds to import); of scipy only the special functions of the drift
    # p-value, imported off the event loop once the model is served.
    assert "/sklearn/" not in maps and "/scipy/optimize/" not in maps
    # The same model: the same readings get the same clusters, the same version.
    assert await _clusters(conn, again) == await _clusters(conn, first)
    versions = await conn.fetch("SELECT DISTINCT model_version, mlflow_run_id FROM predictions")
    assert [tuple(r) for r in versions] == [(str(version), run_id)]
    assert warm_s < cold_s, (warm_s, cold_s)


async def test_a_damaged_cache_entry_falls_back_to_mlflow_and_is_rewritten(
        conn: asyncpg.Connection, models: Models, worker_factory: WorkerFactory,
        tmp_path: Path) -> None:
    await activate_model(conn, *models.v2)
    first = worker_factory().start()
    await first.until_ready()
    assert first.stop() == 0
    [entry] = (tmp_path / "model-cache").glob("*.model.json")
    entry.write_text(entry.read_text()[:100])  # a torn write, a full disk

    second = worker_factory().start()
    await second.until_ready()
    ids = await insert_readings(conn, [reading(i) for i in range(10)])
    assert await wait_for(lambda: _scored(conn, ids), timeout=10)
    assert len(_events(second, "model_cache_unreadable")) == 1
    assert [e["source"] for e in _events(second, "model_swapped")] == ["mlflow"]
    assert json.loads(entry.read_text())["entry"]["run_id"] == models.v2[0]


async def test_a_model_the_cache_does_not_hold_is_fetched_and_then_cached(
        conn: asyncpg.Connection, models: Models, worker_factory: WorkerFactory,
        tmp_path: Path) -> None:
    await activate_model(conn, *models.v1)
    worker = worker_factory().start()
    await worker.until_ready()
    await activate_model(conn, *models.v2)
    assert await wait_for(lambda: _async(worker.ready()["model_version"]  # type: ignore[index]
                                         == str(models.v2[1])), timeout=30)
    # A rollback (the old row active again): served from the cache.
    await conn.execute("UPDATE clusters SET is_active = (mlflow_run_id = $1)", models.v1[0])
    assert await wait_for(lambda: _async(worker.ready()["model_version"]  # type: ignore[index]
                                         == str(models.v1[1])), timeout=30)
    assert [e["source"] for e in _events(worker, "model_swapped")] == [
        "mlflow", "mlflow", "cache"]
    assert len(list((tmp_path / "model-cache").glob("*.model.json"))) == 2
    # Both fetched by a fetch process (model_fetch.py): the worker never imported MLflow,
    # whose import maps pandas' extension modules, nor scikit-learn.
    maps = _mapped_libraries(worker)
    assert "/numpy/" in maps and "/pandas/" not in maps and "/sklearn/" not in maps


async def _async(value: object) -> object:
    return value
