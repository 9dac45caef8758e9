"""A restarted worker serves its last verified model from the local cache: no MLflow, no sklearn."""

from __future__ import annotations

import json
import signal
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


def _parent_and_state(pid: int) -> tuple[int, str] | None:
    """(parent pid, state) of a process, None once it is gone (a zombie counts as gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (None if fields[0] == "Z" else (int(fields[1]), fields[0]))


async def _standby_ready(worker: WorkerProcess, after: int = 0) -> int:
    """The pid of the next standby fetch process the worker says is ready."""
    async def ready() -> bool:
        return len(_events(worker, "fetch_standby_ready")) > after
    assert await wait_for(ready, timeout=90), worker.tail()
    return int(_events(worker, "fetch_standby_ready")[after]["pid"])  # type: ignore[call-overload]


async def _gone(pid: int) -> bool:
    return await wait_for(lambda: _async(_parent_and_state(pid) is None), timeout=10)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
async def test_a_standby_fetch_process_serves_a_swap_to_an_uncached_model_at_once(
        conn: asyncpg.Connection, models: Models, worker_factory: WorkerFactory) -> None:
    """The standby (model_fetch.Standby) has MLflow imported before it is asked: the swap waits
    for the fetch alone, not for a child's start (5-20 s). It is the worker's child, and a
    SIGKILLed worker leaves none behind (its stdin reaches end of file)."""
    await activate_model(conn, *models.v1)
    worker = worker_factory(FETCH_STANDBY_DELAY_SECONDS="0").start()
    await worker.until_ready()
    standby = await _standby_ready(worker)
    assert _parent_and_state(standby) is not None
    assert _parent_and_state(standby)[0] == worker.pid  # type: ignore[index]
    started = time.monotonic()
    await activate_model(conn, *models.v2)
    assert await wait_for(lambda: _async(worker.ready()["model_version"]  # type: ignore[index]
                                         == str(models.v2[1])), timeout=30), worker.tail()
    swap_s = time.monotonic() - started
    assert swap_s < 3.0, f"{swap_s:.1f} s: the standby was not used\n{worker.tail(6000)}"
    assert await _gone(standby)  # it served its one request and exited
    replacement = await _standby_ready(worker, after=1)  # and another one is kept ready
    assert replacement != standby
    worker.signal(signal.SIGKILL)
    worker.wait()
    assert await _gone(replacement), "a SIGKILLed worker left its standby behind"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
async def test_a_shutdown_kills_the_standby_fetch_process(
        conn: asyncpg.Connection, models: Models, worker_factory: WorkerFactory) -> None:
    await activate_model(conn, *models.v1)
    worker = worker_factory(FETCH_STANDBY_DELAY_SECONDS="0").start()
    await worker.until_ready()
    standby = await _standby_ready(worker)
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    assert await _gone(standby), "the worker's shutdown left its standby behind"
