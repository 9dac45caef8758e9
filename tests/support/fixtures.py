"""The fixtures of every tier: one PostgreSQL for the run, a migrated template cloned per test,
MLflow stores (sqlite in-process, and one real `mlflow server`), workers as subprocesses.
Registered by tests/conftest.py (pytest_plugins)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from sensor_predictor.devtools.mlflow_server import MlflowServer, mlflow_env, start_mlflow_server
from sensor_predictor.devtools.postgres import PgServer, find_or_start, stop_cluster
from sensor_predictor.devtools.worker_process import WorkerProcess
from tests.support.databases import Database, clone, create_template, drop
from tests.support.models import Models, log_models

# A throwaway cluster (no server at PGHOST or :5432) is tuned for tests, not for durability.
TEST_CLUSTER_SETTINGS = {"fsync": "off", "max_connections": "200",
                         "max_prepared_transactions": "10"}


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    server = find_or_start(TEST_CLUSTER_SETTINGS)
    yield server
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
    drop(db)


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
def models(pg_server: PgServer, mlflow_store: MlflowServer) -> Models:
    cwd = Path.cwd()
    os.chdir(mlflow_store.root)  # sqlite stores put default artifact roots under the cwd
    try:
        return log_models(pg_server, mlflow_store)
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One real `mlflow server` process for the run (as in compose.yaml), serving artifacts."""
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def served_models(pg_server: PgServer, mlflow_server: MlflowServer) -> Models:
    return log_models(pg_server, mlflow_server)


WorkerFactory = Callable[..., WorkerProcess]


@pytest.fixture
def worker_factory(database: Database, mlflow_store: MlflowServer, tmp_path: Path
                   ) -> Iterator[WorkerFactory]:
    """Workers against the test's database and the sqlite store; all stopped at the end."""
    started: list[WorkerProcess] = []

    def make(**env: str) -> WorkerProcess:
        base = {**database.env(), **mlflow_env(mlflow_store.uri),
                "INFERENCE_INTERVAL_SECONDS": "30", "HEARTBEAT_SECONDS": "1"}
        w = WorkerProcess({**base, **env}, tmp_path / f"worker-{len(started)}.log")
        started.append(w)
        return w

    yield make
    for w in started:
        w.stop()
