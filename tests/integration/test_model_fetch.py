"""A model the cache does not hold is fetched by a child process (model_fetch.py): the worker
never imports MLflow, scikit-learn or pandas, and a fetch that crashes or hangs is a load failure
with a reason while the old model stays served. Real worker, real sqlite MLflow store, real
PostgreSQL; the failures through a real holder (what the worker runs) and real child processes."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict
from pathlib import Path
from urllib.parse import unquote, urlsplit

import asyncpg
import pytest
import pytest_asyncio

from sensor_predictor.devtools.mlflow_server import MlflowServer
from sensor_predictor.devtools.worker_process import WorkerProcess
from sensor_predictor.model_cache import ModelCache
from sensor_predictor.model_contract import LEGACY_SCALER_ARTIFACT
from sensor_predictor.model_holder import ModelHolder, entry_of
from sensor_predictor.model_sources import SourcePolicy
from sensor_predictor.training import activate_model
from tests.support.databases import Database
from tests.support.fixtures import WorkerFactory
from tests.support.models import Models
from tests.support.readings import insert_readings, reading
from tests.support.waiting import wait_for

pytestmark = pytest.mark.asyncio

# What the worker holds, serving and swapping with numpy alone: ~100 MB measured (bench/
# memory.py); MLflow's import alone adds 140 MB.
RSS_BOUND_MB = 200


class _Exits:
    """A pickle whose loading ends the process that loads it (a model's own code can)."""

    def __reduce__(self) -> tuple[object, tuple[int]]:
        return os._exit, (7,)


@pytest_asyncio.fixture
async def pool(database: Database) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(**database.server.kwargs(database.name), min_size=1,
                                  max_size=2)
    yield p
    await p.close()


def _libraries(worker: WorkerProcess) -> str:
    return Path(f"/proc/{worker.pid}/maps").read_text()


def _rss_mb(worker: WorkerProcess) -> float:
    return worker.proc_status()["VmRSS"] / 2**20


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
async def test_without_a_cache_the_worker_serves_a_fetched_model_on_numpy_alone(
        conn: asyncpg.Connection, models: Models, worker_factory: WorkerFactory) -> None:
    """MODEL_CACHE_DIR=off: the fetch process's file is the only hand-over. (Swaps to uncached
    models, with a cache: tests/integration/test_model_cache.py.)"""
    await activate_model(conn, *models.v2)
    worker = worker_factory(MODEL_CACHE_DIR="off").start()
    await worker.until_ready(within=120)
    ids = await insert_readings(conn, [reading(i) for i in range(20)])

    async def scored() -> bool:
        n = await conn.fetchval("SELECT count(*) FROM predictions WHERE reading_id = ANY($1)"
                                " AND model_version = $2", ids, str(models.v2[1]))
        return int(n) == len(ids)

    assert await wait_for(scored, timeout=10), worker.tail()
    swaps = [e for e in worker.events() if e.get("event") == "model_swapped"]
    assert [e["source"] for e in swaps] == ["mlflow"]
    assert not [e for e in worker.events() if e.get("event") == "model_cached"]
    maps = _libraries(worker)
    assert "/numpy/" in maps  # the check sees what the process imported
    for library in ("/pandas/", "/sklearn/", "/pyarrow/"):
        assert library not in maps, library
    assert _rss_mb(worker) < RSS_BOUND_MB, worker.proc_status()


def _log_exploding_legacy_run(store: MlflowServer) -> tuple[str, int]:
    """A run in the old trainer's layout whose scaler.pkl ends whoever unpickles it."""
    from mlflow import MlflowClient

    from sensor_predictor.devtools.legacy_trainer import log_legacy_model
    from sensor_predictor.simulator import generate_feature_matrix

    cwd = Path.cwd()
    os.chdir(store.root)  # sqlite stores put default artifact roots under the cwd
    try:
        run_id, version, _ = log_legacy_model(store.uri, generate_feature_matrix(600, seed=3),
                                              3, 0)
    finally:
        os.chdir(cwd)
    folder = Path(unquote(urlsplit(MlflowClient(store.uri).get_run(run_id).info.artifact_uri)
                          .path))
    (folder / LEGACY_SCALER_ARTIFACT).write_bytes(pickle.dumps(_Exits()))
    return run_id, version


@pytest.mark.slow  # an old-layout run logged, and a fetch process that imports scikit-learn
async def test_a_fetch_that_crashes_is_a_load_failure_and_the_old_model_stays(
        conn: asyncpg.Connection, pool: asyncpg.Pool, models: Models,
        shared_model_cache: Path) -> None:
    exploding = await asyncio.to_thread(_log_exploding_legacy_run, models.store)
    reasons: list[str] = []
    holder = ModelHolder("m", on_failure=reasons.append, sources=SourcePolicy(models.store.uri),
                         cache=ModelCache(shared_model_cache, models.store.uri))
    await activate_model(conn, *models.v1)
    assert await holder.refresh(pool)  # from the run's cache: no fetch process
    assert holder.current is not None and holder.current.source == "cache"
    await activate_model(conn, *exploding)
    assert not await holder.refresh(pool)  # in this process, it would have ended the tests
    assert reasons == ["load_failed"]
    assert holder.current is not None and holder.current.run_id == models.v1[0]
    assert holder.retry_at is not None  # retried with backoff, like any failed load


@pytest.fixture
def silent_mlflow() -> Iterator[str]:
    """An HTTP server that accepts connections and never answers (a hung MLflow)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def _fetch_children() -> list[int]:
    """This process's children running the fetch."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == os.getpid() and b"model_fetch_child" in cmdline:
            found.append(int(pid))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
async def test_a_fetch_that_hangs_is_killed_and_counted_unreachable(
        conn: asyncpg.Connection, pool: asyncpg.Pool, models: Models, silent_mlflow: str
        ) -> None:
    reasons: list[str] = []
    holder = ModelHolder("m", on_failure=reasons.append, sources=SourcePolicy(silent_mlflow),
                         fetch_timeout=2.0)
    await activate_model(conn, *models.v1)
    started = time.monotonic()
    assert not await holder.refresh(pool)
    assert time.monotonic() - started < 10
    assert reasons == ["mlflow_unreachable"]
    assert holder.current is None
    assert await wait_for(_no_children, timeout=5), _fetch_children()


async def _no_children() -> bool:
    return not _fetch_children()


async def test_a_holder_that_fetches_in_a_thread_serves_what_the_cache_holds(
        conn: asyncpg.Connection, pool: asyncpg.Pool, models: Models,
        shared_model_cache: Path) -> None:
    """The demo's worker fetches in a thread (its process trained the models, MLflow is
    imported): the model it serves from MLflow is, to the last array, the numpy form a fetch
    process hands back and the cache stores, and it is served the same way (numpy kernel)."""
    holder = ModelHolder("m", sources=SourcePolicy(models.store.uri))
    holder.fetch_in_thread = True
    await activate_model(conn, *models.v2)
    assert await holder.refresh(pool)
    served = holder.current
    assert served is not None and served.source == "mlflow" and served.kernel is not None
    cached = ModelCache(shared_model_cache, models.store.uri).load(*models.v2)
    assert cached is not None
    fetched = entry_of(served)
    assert fetched is not None
    assert json.dumps(asdict(fetched), sort_keys=True) == json.dumps(asdict(cached),
                                                                     sort_keys=True)
