"""Fixtures of the tiers that own their PostgreSQL (tests/chaos, tests/security): one throwaway
cluster for the run, never the shared server on :5432, which they stop, restart and cut; a
migrated template cloned per test; LOGIN roles that give a password (scram); the run's
`mlflow server`, which they may stop; its models; workers; and the chaos report printed at
the end of the run.
Registered by tests/conftest.py (pytest_plugins), so both tiers share one cluster and server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from sensor_predictor.devtools.mlflow_server import MlflowServer, mlflow_env
from sensor_predictor.devtools.postgres import (
    PgServer,
    pg_ctl,
    port_answers,
    start_cluster,
    stop_cluster,
)
from sensor_predictor.devtools.worker_process import WorkerProcess
from tests.support.chaos import REPORT
from tests.support.databases import Database, clone, create_template, drop
from tests.support.fixtures import TEST_CLUSTER_SETTINGS, model_cache_env, stop_workers
from tests.support.models import Models

WORKER_ROLE = "sensor_predictor_worker"


# -- PostgreSQL ----------------------------------------------------------------------------------


def ensure_running(server: PgServer) -> None:
    """Bring the cluster back if a scenario left it stopped (a failed restart test)."""
    if not port_answers(server.host, server.port):
        pg_ctl(server, "start")


@pytest.fixture(scope="session")
def chaos_pg() -> Iterator[PgServer]:
    """One private cluster for the chaos and security tiers."""
    server = start_cluster(TEST_CLUSTER_SETTINGS, prefix="sp-chaos-pg-")
    assert server.datadir is not None and server.port != 5432
    # Members of the worker role log in with a password (scram); everyone else stays on trust.
    hba = server.datadir / "pg_hba.conf"
    hba.write_text(f"host all +{WORKER_ROLE} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    try:
        pg_ctl(server, "reload")
        yield server
    finally:
        stop_cluster(server)


@pytest.fixture(scope="session")
def chaos_template(chaos_pg: PgServer) -> str:
    return create_template(chaos_pg, "chaos_template")


@pytest.fixture
def chaos_db(chaos_pg: PgServer, chaos_template: str) -> Iterator[Database]:
    ensure_running(chaos_pg)
    db = clone(chaos_pg, chaos_template, prefix="chaos_")
    yield db
    ensure_running(chaos_pg)
    drop(db)


@pytest_asyncio.fixture
async def chaos_conn(chaos_db: Database) -> AsyncIterator[asyncpg.Connection]:
    c = await chaos_db.connect()
    yield c
    if not c.is_closed():
        with contextlib.suppress(Exception):
            await asyncio.wait_for(c.close(), 2)
    c.terminate()


@dataclass
class LoginRole:
    name: str
    password: str
    password_file: Path


@pytest_asyncio.fixture
async def login_role(chaos_db: Database, tmp_path: Path) -> AsyncIterator[LoginRole]:
    """A LOGIN role with a password (scram: see chaos_pg's pg_hba line), member of the worker
    role. Roles are cluster-wide: dropped at the end."""
    name = f"sp_login_{uuid.uuid4().hex[:8]}"
    password = f"Pw-{uuid.uuid4().hex}-p@ss/w%rd"
    admin = await chaos_db.connect()
    try:
        await admin.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
        await admin.execute(f"GRANT {WORKER_ROLE} TO {name}")
    finally:
        await admin.close()
    secret = tmp_path / "postgres_password"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    yield LoginRole(name, password, secret)
    admin = await chaos_db.server.connect()
    try:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", name)
        await admin.execute(f"DROP ROLE IF EXISTS {name}")
    finally:
        await admin.close()


# -- MLflow --------------------------------------------------------------------------------------


@pytest.fixture
def chaos_mlflow(mlflow_server: MlflowServer) -> Iterator[MlflowServer]:
    """The run's real `mlflow server`, which a scenario may stop and start again (same port,
    same store); started again after the test if it left it stopped."""
    yield mlflow_server
    if not mlflow_server.running:
        mlflow_server.start()


@pytest.fixture(scope="session")
def chaos_models(served_models: Models) -> Models:
    """The session's models in the run's `mlflow server`, trained by the product's trainer:
    v1 (4 clusters), v2 (3 clusters), and a model whose features no reading carries (v1 and
    v2 already in the run's model cache)."""
    return served_models


# -- workers -------------------------------------------------------------------------------------


@dataclass
class Workers:
    """Starts `sensor-predictor run` subprocesses against the test's database; stops them all."""

    database: Database
    mlflow: MlflowServer
    tmp: Path
    base: dict[str, str] = field(default_factory=dict)
    started: list[WorkerProcess] = field(default_factory=list)

    def make(self, **env: str) -> WorkerProcess:
        merged = {**self.database.env(), **mlflow_env(self.mlflow.uri),
                  "INFERENCE_INTERVAL_SECONDS": "30", "HEARTBEAT_SECONDS": "1",
                  **self.base, **env}
        if os.environ.get("CHAOS_WORKER_PYTHONPATH"):
            # Run the workers from another source tree (a patched copy of src/) without
            # touching this one: CHAOS_WORKER_PYTHONPATH=/path/to/other/src
            merged["PYTHONPATH"] = os.environ["CHAOS_WORKER_PYTHONPATH"]
        w = WorkerProcess(merged, self.tmp / f"worker-{len(self.started)}.log")
        self.started.append(w)
        return w

    def start(self, *args: str, **env: str) -> WorkerProcess:
        return self.make(**env).start(*args)

    def stop_all(self) -> None:
        with contextlib.suppress(Exception):
            stop_workers(self.started)


@pytest.fixture
def workers(chaos_db: Database, chaos_mlflow: MlflowServer, tmp_path: Path,
            request: pytest.FixtureRequest, shared_model_cache: Path) -> Iterator[Workers]:
    """The run's model cache, as worker_factory's (own_model_cache: the test's own)."""
    w = Workers(chaos_db, chaos_mlflow, tmp_path,
                base=model_cache_env(request, shared_model_cache))
    yield w
    w.stop_all()


# -- the report ----------------------------------------------------------------------------------


@pytest.fixture
def report() -> Callable[..., dict[str, Any]]:
    """Add one row to the chaos report printed at the end of the run (returned, to update)."""
    def add(**row: Any) -> dict[str, Any]:
        REPORT.append(row)
        return row
    return add


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not REPORT:
        return
    tr = terminalreporter
    tr.section("chaos report")
    keys = ["scenario", "runs", "readings", "lost", "duplicated", "recovery"]
    rows = [[str(r.get(k, "")) for k in keys] for r in REPORT]
    widths = [max(len(k), *(len(r[i]) for r in rows)) for i, k in enumerate(keys)]
    tr.write_line(" | ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)))
    tr.write_line("-+-".join("-" * w for w in widths))
    for r in rows:
        tr.write_line(" | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    for r in REPORT:
        if r.get("detail"):
            tr.write_line(f"  {r['scenario']}: {r['detail']}")
    path = os.environ.get("CHAOS_REPORT")
    if path:
        Path(path).write_text(json.dumps(REPORT, indent=2, default=str))
        tr.write_line(f"chaos report written to {path}")
