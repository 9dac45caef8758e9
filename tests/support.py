"""Test support: a real PostgreSQL (found or started), real MLflow stores, worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
FEATURES = [f"Sensor {i}" for i in range(1, 21)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class PgServer:
    host: str
    port: int
    user: str
    password: str = ""
    datadir: Path | None = None  # set when the suite started this server itself

    def kwargs(self, database: str) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "user": self.user,
                "password": self.password or None, "database": database}

    def env(self, database: str) -> dict[str, str]:
        return {"POSTGRES_HOST": self.host, "POSTGRES_PORT": str(self.port),
                "POSTGRES_USER": self.user, "POSTGRES_PASSWORD": self.password,
                "POSTGRES_DB": database}

    async def connect(self, database: str = "postgres") -> asyncpg.Connection:
        return await asyncpg.connect(**self.kwargs(database))


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    raise RuntimeError(f"{name} not found: install PostgreSQL or point PGHOST at a server")


def start_throwaway_cluster(port: int | None = None) -> PgServer:
    """initdb + pg_ctl start of a private cluster (trust auth) on a free port."""
    datadir = Path(tempfile.mkdtemp(prefix="sp-pg-"))
    port = port or free_port()
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(datadir, "postgres", "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*run_as, _pg_bin("initdb"), "-D", str(datadir), "-U", "postgres",
                    "--auth=trust", "-E", "UTF8", "--no-sync"], check=True,
                   capture_output=True)
    server = PgServer("127.0.0.1", port, "postgres", datadir=datadir)
    pg_ctl(server, "start")
    return server


def pg_ctl(server: PgServer, action: str) -> None:
    assert server.datadir is not None
    run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    opts = (f"-p {server.port} -k {server.datadir} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c max_connections=200 -c max_prepared_transactions=10")
    args = [*run_as, _pg_bin("pg_ctl"), "-D", str(server.datadir), "-w", "-t", "60",
            "-l", str(server.datadir / "server.log")]
    if action == "start":
        args += ["-o", opts, "start"]
    elif action == "stop":
        args += ["-m", "fast", "stop"]
    elif action == "crash":  # every server process quits at once: no checkpoint, WAL buffers lost
        args += ["-m", "immediate", "stop"]
    else:
        args += [action]
    subprocess.run(args, check=True, capture_output=True)


def find_or_start_postgres() -> PgServer:
    """PGHOST/PGPORT when set; else 127.0.0.1:5432 when we can log in; else a throwaway cluster."""
    if os.environ.get("PGHOST"):
        return PgServer(os.environ["PGHOST"], int(os.environ.get("PGPORT", "5432")),
                        os.environ.get("PGUSER", "postgres"), os.environ.get("PGPASSWORD", ""))
    local = PgServer("127.0.0.1", 5432, "postgres")
    if port_answers(local.host, local.port) and asyncio.run(_can_log_in(local)):
        return local
    return start_throwaway_cluster()


async def _can_log_in(server: PgServer) -> bool:
    try:
        conn = await asyncio.wait_for(server.connect(), timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await conn.close()
    return True


async def drop_database(server: PgServer, name: str) -> None:
    conn = await server.connect()
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


# -- MLflow ---------------------------------------------------------------------------------


@dataclass
class MlflowStore:
    uri: str
    root: Path
    process: subprocess.Popen[bytes] | None = None


def mlflow_env(uri: str) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def start_mlflow_server(root: Path, port: int | None = None) -> MlflowStore:
    """A real `mlflow server` process serving artifacts, like the compose service."""
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(root / "server.log", "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server",
             "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
             "--serve-artifacts", "--artifacts-destination", str(root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    store = MlflowStore(f"http://127.0.0.1:{port}", root, proc)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{store.uri}/health", timeout=1) as r:
                if r.status == 200:
                    return store
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    stop_process(proc)
    raise RuntimeError("mlflow server did not become healthy in 60 s")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10) -> int | None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return proc.returncode


# -- the worker as a process ------------------------------------------------------------------


@dataclass
class WorkerProcess:
    """`sensor-predictor run` as a real subprocess, its JSON logs in a file."""

    env: dict[str, str]
    log_path: Path
    metrics_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> WorkerProcess:
        env = {**os.environ, **self.env, "METRICS_PORT": str(self.metrics_port),
               "METRICS_HOST": "127.0.0.1", "LOG_FORMAT": "json"}
        env.setdefault("LOG_LEVEL", "info")
        # Each test's own model cache (workers of one test share it), never the user's home.
        env.setdefault("MODEL_CACHE_DIR", str(self.log_path.parent / "model-cache"))
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sensor_predictor.cli", "run", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.metrics_port}{path}"

    def get(self, path: str, timeout: float = 2) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url(path), timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def ready(self) -> dict[str, Any] | None:
        try:
            status, body = self.get("/ready", timeout=1)
        except (urllib.error.URLError, OSError):
            return None
        return json.loads(body) if status in (200, 503) else None

    def _state_if(self, key: str) -> dict[str, Any] | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.logs()}")
        state = self.ready()
        return state if state and state.get(key) else None

    def wait_ready(self, timeout: float = 90, key: str = "ready") -> dict[str, Any]:
        """Block until /ready reports `key` true ("ready", or "listening" with no model yet)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if state := self._state_if(key):
                return state
            time.sleep(0.1)
        raise AssertionError(f"worker not {key} after {timeout} s:\n{self.logs()[-4000:]}")

    async def until_ready(self, within: float = 90, key: str = "ready") -> dict[str, Any]:
        """wait_ready for async tests: the event loop (writers, listeners) keeps running."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if state := await asyncio.to_thread(self._state_if, key):
                return state
            await asyncio.sleep(0.1)
        raise AssertionError(f"worker not {key} after {within} s:\n{self.logs()[-4000:]}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 15) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.wait(5)
        self._log.close()
        return self.proc.returncode

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.logs().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def metric(self, name: str, labels: str = "") -> float | None:
        """One sample from a live scrape (exact series name and label text, e.g. 'reason="x"')."""
        status, body = self.get("/metrics")
        assert status == 200
        key = f"{name}{{{labels}}}" if labels else name
        for line in body.splitlines():
            if line.startswith("#"):
                continue
            series, _, value = line.rpartition(" ")
            if series == key or (not labels and series == f"{name}{{}}"):
                return float(value)
        return None


async def wait_for(
    predicate: Any,
    timeout: float,  # noqa: ASYNC109 - a polling deadline, not a cancellation scope
    interval: float = 0.05,
) -> Any:
    """Poll an async predicate until it returns something truthy; the last value otherwise."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(interval)
    return value


@dataclass(frozen=True)
class Tally:
    readings: int
    predicted: int
    errors: int
    missing: int  # readings with neither a prediction nor an error
    duplicated: int  # readings with more than one result

    @property
    def exactly_once(self) -> bool:
        return self.missing == 0 and self.duplicated == 0


async def tally(conn: asyncpg.Connection) -> Tally:
    """The invariant every scenario ends on: each reading has exactly one result."""
    row = await conn.fetchrow("""
        WITH per_reading AS (
            SELECT r.id,
                   (SELECT count(*) FROM predictions p WHERE p.reading_id = r.id) AS n_pred,
                   (SELECT count(*) FROM reading_errors e WHERE e.reading_id = r.id) AS n_err
              FROM readings r)
        SELECT count(*) AS readings,
               count(*) FILTER (WHERE n_pred = 1 AND n_err = 0) AS predicted,
               count(*) FILTER (WHERE n_err = 1 AND n_pred = 0) AS errors,
               count(*) FILTER (WHERE n_pred + n_err = 0) AS missing,
               count(*) FILTER (WHERE n_pred + n_err > 1) AS duplicated
          FROM per_reading""")
    return Tally(**dict(row))
