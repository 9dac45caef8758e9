"""The fixtures of every tier: one PostgreSQL for the run, a migrated template cloned per test,
MLflow stores (sqlite in-process, and one real `mlflow server`), workers as subprocesses with
a model cache shared by the run. Registered by tests/conftest.py (pytest_plugins)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from sensor_predictor.devtools.mlflow_server import (
    MlflowServer,
    launch_mlflow_server,
    mlflow_env,
)
from sensor_predictor.devtools.postgres import PgServer, find_or_start, stop_cluster
from sensor_predictor.devtools.worker_process import WorkerProcess
from tests.support.databases import DROPPER, Database, clone, create_template, drop
from tests.support.models import Models, log_models

# A throwaway cluster (no server at PGHOST or :5432) is tuned for tests, not for durability.
TEST_CLUSTER_SETTINGS = {"fsync": "off", "max_connections": "200",
                         "max_prepared_transactions": "10"}


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    server = find_or_start(TEST_CLUSTER_SETTINGS)
    yield server
    DROPPER.finish()
    stop_cluster(server)  # only a cluster we started (it has a datadir)


@pytest.fixture(scope="session")
def template_db(pg_server: PgServer) -> Iterator[str]:
    """Migrated once; every test database is a copy of it (CREATE DATABASE ... TEMPLATE)."""
    name = create_template(pg_server, f"sp_template_{os.getpid()}_{uuid.uuid4().hex[:6]}")
    yield name
    drop(Database(pg_server, name))


@pytest.fixture
def database(pg_server: PgServer, template_db: str) -> Iterator[Database]:
    db = clone(pg_server, template_db)
    yield db
    DROPPER.drop(db)


@pytest_asyncio.fixture
async def conn(database: Database) -> AsyncIterator[asyncpg.Connection]:
    c = await database.connect()
    yield c
    await c.close()


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> MlflowServer:
    """A sqlite tracking store with its artifacts in a temp folder (no server process)."""
    root = tmp_path_factory.mktemp("mlflow")
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowServer(f"sqlite:///{root}/mlflow.db", root)


@pytest.fixture(scope="session")
def models(pg_server: PgServer, template_db: str, mlflow_store: MlflowServer,
           shared_model_cache: Path) -> Models:
    cwd = Path.cwd()
    os.chdir(mlflow_store.root)  # sqlite stores put default artifact roots under the cwd
    try:
        logged = log_models(pg_server, mlflow_store)
    finally:
        os.chdir(cwd)
    fill_model_cache(pg_server, template_db, logged, shared_model_cache)
    return logged


@pytest.fixture(scope="session", autouse=True)
def _launched_mlflow_server(request: pytest.FixtureRequest,
                            tmp_path_factory: pytest.TempPathFactory
                            ) -> Iterator[MlflowServer | None]:
    """The run's `mlflow server`, launched before the run's first test when a selected test
    needs it: its start (5-10 s of importing MLflow) overlaps the tests before its first use."""
    if not any("mlflow_server" in getattr(item, "fixturenames", ())
               for item in request.session.items):
        yield None
        return
    server = launch_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(_launched_mlflow_server: MlflowServer | None,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One real `mlflow server` process for the run (as in compose.yaml), serving artifacts.
    The chaos tier stops it and starts it again (chaos_mlflow)."""
    server = _launched_mlflow_server or launch_mlflow_server(
        tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server.wait_healthy()
    finally:
        if server is not _launched_mlflow_server:
            server.stop()


@pytest.fixture(scope="session")
def served_models(pg_server: PgServer, template_db: str, mlflow_server: MlflowServer,
                  shared_model_cache: Path) -> Models:
    """The session's models in the `mlflow server` (the chaos tier's chaos_models too)."""
    logged = log_models(pg_server, mlflow_server)
    fill_model_cache(pg_server, template_db, logged, shared_model_cache)
    return logged


WorkerFactory = Callable[..., WorkerProcess]

# Workers a test is done with, still in their interpreter's exit: each is reaped by a thread of
# its own the moment it exits; the end of the run waits for any that has not.
_EXITING: list[WorkerProcess] = []


def stop_workers(workers: list[WorkerProcess]) -> None:
    """A test's teardown: SIGTERM to all at once, then wait until each has stopped its work
    (its results committed, its connections closed), not for the interpreter's exit after it
    (about a second once MLflow is imported); that one ends beside the next test, and is
    reaped as it ends (no <defunct> process piles up over a run)."""
    for w in workers:
        w.request_stop()
    for w in workers:
        w.wait_stopped()
        w.reap_in_background()
    _EXITING.extend(w for w in workers if w.proc is not None and w.proc.poll() is None)


@pytest.fixture(scope="session", autouse=True)
def _reap_workers() -> Iterator[None]:
    yield
    for w in _EXITING:
        w.stop()

# A test whose workers must fetch their models from MLflow (a fetch, an MLflow failure, the
# model cache itself) marks itself so: its workers get a cache of the test's own, empty at the
# start (beside their logs, WorkerProcess's default). Registered in tests/conftest.py.
OWN_MODEL_CACHE = "own_model_cache"


@pytest.fixture(scope="session")
def shared_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's MODEL_CACHE_DIR: a model one worker fetched from MLflow and verified is served
    to every later worker from here, as to a restarted worker in production (keyed by tracking
    URI, run and version; MLflow runs never change). A cold start imports MLflow and
    scikit-learn (4-6 s here, and about 1 s more to exit), a cached one takes 0.2 s."""
    return tmp_path_factory.mktemp("model-cache")


def fill_model_cache(server: PgServer, template: str, models: Models, cache: Path) -> None:
    """Fetch v1 and v2 of `models` once and store them in the run's cache, so that every test's
    worker serves them from it, whatever ran before (a swap to a model a worker must fetch
    first takes seconds more, a fetch process importing MLflow: timing no test should depend
    on). Fetched here, by the function a worker's fetch process runs (model_holder.
    load_and_verify: this process has imported MLflow anyway), and stored as a worker stores
    them (model_cache.py): no worker and no fetch process to start for it."""
    import mlflow

    from sensor_predictor.model_cache import ModelCache
    from sensor_predictor.model_holder import entry_of, load_and_verify
    from sensor_predictor.model_sources import SourcePolicy
    from sensor_predictor.model_types import ActiveRow

    store = ModelCache(cache, models.store.uri)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(models.store.uri)
    try:
        for run_id, version in (models.v1, models.v2):
            model = load_and_verify(ActiveRow(0, run_id, version, None), "fill", None,
                                    SourcePolicy(models.store.uri))
            entry = entry_of(model)
            assert entry is not None and store.store(entry), (run_id, version)
    finally:
        mlflow.set_tracking_uri(previous)


def model_cache_env(request: pytest.FixtureRequest, shared: Path) -> dict[str, str]:
    """MODEL_CACHE_DIR for the workers of `request`'s test: the run's cache, unless the test
    is marked own_model_cache (then nothing: WorkerProcess puts one beside the test's logs)."""
    if request.node.get_closest_marker(OWN_MODEL_CACHE):
        return {}
    return {"MODEL_CACHE_DIR": str(shared)}


@pytest.fixture
def worker_factory(database: Database, mlflow_store: MlflowServer, tmp_path: Path,
                   request: pytest.FixtureRequest, shared_model_cache: Path
                   ) -> Iterator[WorkerFactory]:
    """Workers against the test's database and the sqlite store; all stopped at the end."""
    started: list[WorkerProcess] = []
    cache = model_cache_env(request, shared_model_cache)

    def make(**env: str) -> WorkerProcess:
        base = {**database.env(), **mlflow_env(mlflow_store.uri), **cache,
                "INFERENCE_INTERVAL_SECONDS": "30", "HEARTBEAT_SECONDS": "1"}
        w = WorkerProcess({**base, **env}, tmp_path / f"worker-{len(started)}.log")
        started.append(w)
        return w

    yield make
    stop_workers(started)
