"""Fixtures: one PostgreSQL for the run, a migrated template cloned per test, MLflow stores."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from sensor_predictor.config import Settings, load_settings
from tests.support import (
    FEATURES,
    MlflowStore,
    PgServer,
    WorkerProcess,
    drop_database,
    find_or_start_postgres,
    mlflow_env,
    pg_ctl,
    start_mlflow_server,
    stop_process,
)

RUN_TAG = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    server = find_or_start_postgres()
    yield server
    if server.datadir is not None:
        pg_ctl(server, "stop")


@pytest.fixture(scope="session")
def template_db(pg_server: PgServer) -> Iterator[str]:
    """Migrated once; every test database is a copy of it (CREATE DATABASE ... TEMPLATE)."""
    from sensor_predictor.migrate import migrate

    name = f"sp_template_{RUN_TAG}"

    async def setup() -> None:
        admin = await pg_server.connect()
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        conn = await pg_server.connect(name)
        try:
            await migrate(conn)
        finally:
            await conn.close()

    asyncio.run(setup())
    yield name
    asyncio.run(drop_database(pg_server, name))


@dataclass
class Database:
    server: PgServer
    name: str

    def env(self) -> dict[str, str]:
        return self.server.env(self.name)

    async def connect(self) -> asyncpg.Connection:
        return await self.server.connect(self.name)


@pytest.fixture
def database(pg_server: PgServer, template_db: str) -> Iterator[Database]:
    name = f"sp_test_{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        admin = await pg_server.connect()
        try:
            await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
        finally:
            await admin.close()

    asyncio.run(create())
    yield Database(pg_server, name)
    asyncio.run(drop_database(pg_server, name))


@pytest_asyncio.fixture
async def conn(database: Database) -> AsyncIterator[asyncpg.Connection]:
    c = await database.connect()
    yield c
    await c.close()


# -- MLflow -------------------------------------------------------------------------------------


@dataclass
class Models:
    """Runs logged once per session: two good models and one whose features match nothing."""

    store: MlflowStore
    v1: tuple[str, int]  # (run_id, registered version)
    v2: tuple[str, int]
    wrong_features: tuple[str, int]


def _settings_for(env: dict[str, str]) -> Settings:
    return load_settings(env)


def _log_models(pg_server: PgServer, store: MlflowStore) -> Models:
    """Train through the product's own trainer (generated readings: the scratch DB is empty)."""
    from sensor_predictor.migrate import migrate
    from sensor_predictor.training import train
    from tests.model_factory import log_model_with_features

    scratch = f"sp_models_{RUN_TAG}"

    async def go() -> Models:
        admin = await pg_server.connect()
        await admin.execute(f'CREATE DATABASE "{scratch}"')
        await admin.close()
        c = await pg_server.connect(scratch)
        await migrate(c)
        await c.close()
        settings = _settings_for({**pg_server.env(scratch), **mlflow_env(store.uri)})
        try:
            # Generated readings (the scratch database is empty); 5,000 keep the fit quick.
            one = await train(settings, clusters=4, readings=5_000, activate=False, seed=1)
            two = await train(settings, clusters=3, readings=5_000, activate=False, seed=2)
        finally:
            await drop_database(pg_server, scratch)
        bad = await asyncio.to_thread(
            log_model_with_features, store.uri, [f"Temperature {i}" for i in range(1, 21)])
        return Models(store, (one.run_id, int(one.version)), (two.run_id, int(two.version)), bad)

    return asyncio.run(go())


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> MlflowStore:
    """A sqlite tracking store with its artifacts in a temp folder."""
    root = tmp_path_factory.mktemp("mlflow")
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowStore(f"sqlite:///{root}/mlflow.db", root)


@pytest.fixture(scope="session")
def models(pg_server: PgServer, mlflow_store: MlflowStore) -> Models:
    cwd = Path.cwd()
    os.chdir(mlflow_store.root)  # sqlite stores put default artifact roots under the cwd
    try:
        return _log_models(pg_server, mlflow_store)
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowStore]:
    """A real `mlflow server` process (as in compose.yaml), serving artifacts over HTTP."""
    store = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    yield store
    assert store.process is not None
    stop_process(store.process)


@pytest.fixture(scope="session")
def served_models(pg_server: PgServer, mlflow_server: MlflowStore) -> Models:
    return _log_models(pg_server, mlflow_server)


# -- the worker ---------------------------------------------------------------------------


async def activate(conn: asyncpg.Connection, run_id: str, version: int | None,
                   n_clusters: int | None = None) -> int:
    """What any client does to deploy a model: one SQL transaction."""
    async with conn.transaction():
        await conn.execute("UPDATE clusters SET is_active = false WHERE is_active")
        row_id: int = await conn.fetchval(
            "INSERT INTO clusters (mlflow_run_id, mlflow_model_version, is_active, n_clusters)"
            " VALUES ($1, $2, true, $3) RETURNING id", run_id, version, n_clusters)
    return row_id


WorkerFactory = Callable[..., WorkerProcess]


@pytest.fixture
def worker_factory(database: Database, mlflow_store: MlflowStore, tmp_path: Path
                   ) -> Iterator[WorkerFactory]:
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


async def insert_readings(conn: asyncpg.Connection, rows: list[dict[str, object] | str | None],
                          machine: str = "m-1") -> list[int]:
    """Plain multi-row INSERT, exactly as the old system's writers do it."""
    machine_id = await conn.fetchval(
        "INSERT INTO machines (machine_id) VALUES ($1) ON CONFLICT (machine_id)"
        " DO UPDATE SET last_seen = now() RETURNING id", machine)
    import json

    values = [v if isinstance(v, str) or v is None else json.dumps(v) for v in rows]
    ids: list[int] = [r["id"] for r in await conn.fetch(
        'INSERT INTO readings ("timestamp", "values", machine_id)'
        " SELECT now(), v::jsonb, $2 FROM unnest($1::text[]) AS v RETURNING id",
        values, machine_id)]
    return ids


def reading(seed: int = 0, **overrides: object) -> dict[str, object]:
    import random

    rnd = random.Random(seed)
    values: dict[str, object] = {name: round(rnd.uniform(-1, 1), 4) for name in FEATURES}
    values.update(overrides)
    return values
