"""Chaos fixtures: a throwaway PostgreSQL cluster the suite owns (and stops, restarts, breaks),
a migrated template cloned per test, an `mlflow server` the suite can stop, and its models."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from tests.chaos._support import REPORT
from tests.conftest import Database, Models, _log_models
from tests.support import (
    MlflowStore,
    PgServer,
    WorkerProcess,
    drop_database,
    free_port,
    mlflow_env,
    pg_ctl,
    port_answers,
    start_throwaway_cluster,
    stop_process,
)

WORKER_ROLE = "sensor_predictor_worker"


# -- PostgreSQL ----------------------------------------------------------------------------------


def ensure_running(server: PgServer) -> None:
    """Bring the cluster back if a scenario left it stopped (a failed restart test)."""
    if not port_answers(server.host, server.port):
        pg_ctl(server, "start")


@pytest.fixture(scope="session")
def chaos_pg() -> Iterator[PgServer]:
    """One private cluster for the whole chaos suite: never the shared server on :5432."""
    server = start_throwaway_cluster()
    assert server.datadir is not None and server.port != 5432
    # Members of the worker role log in with a password (scram); everyone else stays on trust.
    hba = server.datadir / "pg_hba.conf"
    hba.write_text(f"host all +{WORKER_ROLE} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())

    async def reload() -> None:
        conn = await server.connect()
        try:
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()

    asyncio.run(reload())
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            pg_ctl(server, "stop")
        shutil.rmtree(server.datadir, ignore_errors=True)


@pytest.fixture(scope="session")
def chaos_template(chaos_pg: PgServer) -> str:
    from sensor_predictor.migrate import migrate

    name = "chaos_template"

    async def setup() -> None:
        admin = await chaos_pg.connect()
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        conn = await chaos_pg.connect(name)
        try:
            await migrate(conn)
        finally:
            await conn.close()

    asyncio.run(setup())
    return name


@pytest.fixture
def chaos_db(chaos_pg: PgServer, chaos_template: str) -> Iterator[Database]:
    name = f"chaos_{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        admin = await chaos_pg.connect()
        try:
            await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{chaos_template}"')
        finally:
            await admin.close()

    ensure_running(chaos_pg)
    asyncio.run(create())
    yield Database(chaos_pg, name)
    ensure_running(chaos_pg)
    asyncio.run(drop_database(chaos_pg, name))


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


@dataclass
class ChaosMlflow:
    """A real `mlflow server` the suite may stop and start again (same port, same store)."""

    store: MlflowStore

    @property
    def uri(self) -> str:
        return self.store.uri

    @property
    def running(self) -> bool:
        return self.store.process is not None and self.store.process.poll() is None

    def stop(self) -> None:
        if self.store.process is not None:
            stop_process(self.store.process)

    def start(self) -> float:
        """Start it again; returns the seconds it took to answer /health."""
        started = time.monotonic()
        port = int(self.store.uri.rsplit(":", 1)[1])
        self.store = start_server(self.store.root, port=port)
        return time.monotonic() - started


def start_server(root: Path, port: int | None = None, timeout: float = 180) -> MlflowStore:
    """Like tests/support.start_mlflow_server, with a longer wait for /health (on a loaded
    2-core machine a start took more than 60 s) and one log appended to across restarts."""
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(root / "server.log", "ab") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server",
             "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
             "--serve-artifacts", "--artifacts-destination", str(root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    store = MlflowStore(f"http://127.0.0.1:{port}", root, proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{store.uri}/health", timeout=1) as r:
                if r.status == 200:
                    return store
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    stop_process(proc)
    raise RuntimeError(f"mlflow server did not become healthy in {timeout} s")


@pytest.fixture(scope="session")
def chaos_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosMlflow]:
    mlflow = ChaosMlflow(start_server(tmp_path_factory.mktemp("chaos-mlflow")))
    yield mlflow
    mlflow.stop()


@pytest.fixture(scope="session")
def chaos_models(chaos_pg: PgServer, chaos_template: str, chaos_mlflow: ChaosMlflow) -> Models:
    """Trained by the product's trainer against a scratch database of the chaos cluster and
    registered in the chaos MLflow server: v1 (4 clusters), v2 (3 clusters), and a model whose
    features no reading carries."""
    return _log_models(chaos_pg, chaos_mlflow.store)


def served(*models: tuple[str, int]) -> dict[str, str]:
    """model_version -> run_id of the given (run_id, version) models, as predictions record
    them: check_invariant's `served`."""
    return {str(version): run_id for run_id, version in models}


# -- workers -------------------------------------------------------------------------------------


@dataclass
class Workers:
    """Starts `sensor-predictor run` subprocesses against the test's database; stops them all."""

    database: Database
    mlflow: ChaosMlflow
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
        for w in self.started:
            with contextlib.suppress(Exception):
                w.stop()


@pytest.fixture
def workers(chaos_db: Database, chaos_mlflow: ChaosMlflow, tmp_path: Path) -> Iterator[Workers]:
    w = Workers(chaos_db, chaos_mlflow, tmp_path)
    yield w
    w.stop_all()


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
