"""`sensor-predictor demo`: the whole system on one machine, in one process, for about a minute.

PostgreSQL, in this order (DEMO_POSTGRES=auto|env|binaries|embedded forces one):

* env: the server named by POSTGRES_* (any of them set) when it answers within a few seconds.
  The demo works in a scratch database it creates there (``sensor_demo_<hex>``) and drops at
  the end, so the database POSTGRES_DB names is left alone: the demo activates models that
  live only in its own MLflow store, which would break a real predictor serving that database.
  Without the right to create a database it falls back to POSTGRES_DB as is and says so.
  Nothing POSTGRES_* set: no server is guessed at (no localhost credentials are assumed).
* binaries: a throwaway cluster (initdb + pg_ctl, trust auth, 127.0.0.1 on a free port) from
  the PostgreSQL binaries on PATH or under /usr/lib/postgresql/*/bin. As root it runs as the
  ``postgres`` account (initdb refuses root).
* embedded: a throwaway cluster from pgserver (``pip install 'sensor-predictor[embedded]'``),
  for a machine with Python and no PostgreSQL at all. It listens on a Unix socket only. As root,
  pgserver itself creates a ``pgserver`` system account to run the server as.

A throwaway cluster lives in the work folder (as root, in a fresh folder under the temp dir
when the server account cannot reach the work folder); it is stopped and deleted at the end,
its log kept as <workdir>/postgres.log. MLflow is a sqlite store in the work folder, artifacts
next to it; it is kept, so `mlflow ui --backend-store-uri sqlite:///<workdir>/mlflow.db` shows
the runs afterwards.

Timeline for --duration D: migrate, train a model (4 clusters) and activate it, start the worker
in this process and, once it serves the model, the simulator; the stream starts. At 0.5 D the
simulator shifts the distribution (drift); at 0.7 D a model retrained on the drifted readings is
activated mid-stream and the worker swaps to it. At D the simulator stops, the worker drains
the backlog and stops, and a summary follows, ending with the exactly-once check.

Ctrl-C (SIGINT) or SIGTERM at any point: the simulator and the worker stop cleanly (a second
signal skips the short drain), the summary so far is printed, the throwaway server is stopped
and deleted. Exit codes: 0 done and every reading scored exactly once; 1 a failure (or the
check failed); 130 after SIGINT, 143 after SIGTERM (128 + the signal, as shells report).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, TextIO, TypeVar

import asyncpg

from sensor_predictor import db
from sensor_predictor.config import Secret, Settings, load_settings
from sensor_predictor.logging_setup import configure_logging

__all__ = ["DEMO_POSTGRES_ENV", "histogram_quantile", "run_demo"]

T = TypeVar("T")

DEMO_POSTGRES_ENV = "DEMO_POSTGRES"
Mode = Literal["auto", "env", "binaries", "embedded"]
MODES: tuple[Mode, ...] = ("auto", "env", "binaries", "embedded")

CLUSTERS = 4
MACHINES = 10
INITIAL_TRAINING_READINGS = 10_000
DRIFT_AT = 0.5  # share of the duration
RETRAIN_AT = 0.7
RETRAIN_MIN_READINGS = 100  # fewer drifted readings than this: train() falls back to generated
RETRAIN_GRACE_SECONDS = 60.0  # the stream runs on past D until the retrained model is served
ENV_CONNECT_TIMEOUT = 3.0
WORKER_READY_TIMEOUT = 120.0
DRAIN_TIMEOUT = 60.0
DRAIN_TIMEOUT_INTERRUPTED = 5.0
STATUS_SECONDS = 1.0
EXIT_OK, EXIT_FAILED = 0, 1
SCRATCH_DB = re.compile(r"^sensor_demo_[0-9a-f]{8}$")


class DemoError(Exception):
    """A failure to report in one line (no traceback): exit 1."""


class Interrupted(Exception):
    """SIGINT / SIGTERM arrived during set-up."""


# -- percentiles from a Prometheus histogram ------------------------------------------------


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile: `buckets` are (upper bound, cumulative count) pairs in
    increasing bound order, +Inf last. Linear interpolation inside the bucket holding the rank;
    a rank in the +Inf bucket gives the largest finite bound. None without observations."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank and count > below:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def _buckets(collector: Any) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of an unlabelled aioprometheus histogram."""
    try:
        data: Mapping[Any, Any] = collector.get({})
    except KeyError:  # nothing observed yet
        return []
    return sorted((float(k), float(v)) for k, v in data.items() if not isinstance(k, str))


def _bucket_delta(now: Sequence[tuple[float, float]], before: Sequence[tuple[float, float]]
                  ) -> list[tuple[float, float]]:
    earlier = dict(before)
    return [(bound, count - earlier.get(bound, 0.0)) for bound, count in now]


def _ms(seconds: float | None) -> str:
    """Milliseconds, to one decimal below 100 ms."""
    if seconds is None:
        return "-"
    ms = seconds * 1000
    return f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


# -- the terminal ---------------------------------------------------------------------------


class Console:
    """Event lines, and a status line redrawn in place on a terminal (plain lines otherwise)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self._status = ""

    def line(self, text: str = "") -> None:
        if self._status:
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        if self._status:
            self.stream.write(self._status)
        self.stream.flush()

    def status(self, text: str) -> None:
        if not self.tty:
            self.line(text)
            return
        width = max(20, shutil.get_terminal_size((100, 24)).columns - 1)
        self._status = text[:width]
        self.stream.write("\r\x1b[K" + self._status)
        self.stream.flush()

    def keep_status(self) -> None:
        """Leave the status line on screen as an ordinary line."""
        if self._status:
            self.stream.write("\n")
            self.stream.flush()
            self._status = ""


# -- logging out of the way -----------------------------------------------------------------


def _log_to_file(path: Path, level: str) -> IO[str]:
    """structlog (JSON lines), the stdlib loggers (MLflow, alembic, pgserver) and warnings go to
    `path`, so the terminal shows the progress only."""
    handle = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed by run_demo
    # The service's own logging set-up (secrets redacted), pointed at the file.
    configure_logging(level, "json", stream=handle)
    for name in ("mlflow", "alembic", "pgserver"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    logging.captureWarnings(True)
    return handle


def _quiet_mlflow() -> None:
    # Before MLflow is imported: it would otherwise put its own stderr handler on its loggers
    # and draw artifact progress bars over the status line.
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")


# -- PostgreSQL -----------------------------------------------------------------------------


@dataclass
class Postgres:
    """Where the demo's database lives, and how to let go of it at the end."""

    kind: Literal["env", "binaries", "embedded"]
    description: str
    host: str
    port: int
    user: str
    password: Secret
    database: str
    close: Callable[[], Awaitable[None]] | None = field(default=None, repr=False)

    def apply(self, settings: Settings) -> Settings:
        return dataclasses.replace(
            settings, postgres_host=self.host, postgres_port=self.port,
            postgres_user=self.user, postgres_password=self.password,
            postgres_db=self.database)


def _named_by_environment(environ: Mapping[str, str]) -> list[str]:
    return sorted(k for k in environ if k.startswith("POSTGRES_"))


def _pg_version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", path.parent.name)) or (0,)


def find_postgres_bindir() -> Path | None:
    """A folder with initdb, pg_ctl and postgres: from PATH, else /usr/lib/postgresql/*/bin."""
    candidates: list[Path] = []
    found = shutil.which("pg_ctl")
    if found:
        candidates += [Path(found).resolve().parent, Path(found).parent]
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_pg_version_key,
                         reverse=True)
    for folder in candidates:
        if all(os.access(folder / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def _reachable_by_others(path: Path) -> bool:
    """Every existing folder on the way to `path` lets any account through (o+x)."""
    for folder in [path, *path.parents]:
        if folder.exists() and not folder.stat().st_mode & stat.S_IXOTH:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _run(cmd: Sequence[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """A PostgreSQL tool, in its own session (a Ctrl-C at the terminal is ours to handle), its
    output in temp files (pipes would be inherited by the postmaster and never close)."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.run(list(cmd), stdin=subprocess.DEVNULL, stdout=out,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True,
                              timeout=timeout, check=False)
        out.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), "")


def _postmaster_pid(datadir: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((datadir / "postmaster.pid").read_text().splitlines()[0])
    return None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our own child that nobody reaped) is not running.
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] != "Z"
    return True


def _wait_gone(pid: int | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class PgCtlCluster:
    """A throwaway cluster: initdb, pg_ctl start / stop, delete (blocking calls)."""

    def __init__(self, bindir: Path, datadir: Path, log_copy: Path,
                 remove: Path | None = None) -> None:
        self.bindir = bindir
        self.datadir = datadir
        self.log_copy = log_copy
        self.remove = remove or datadir  # what to delete at the end
        self.port = 0
        self.pid: int | None = None
        self.account: str | None = None
        self.run_as: list[str] = []
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise DemoError("running as root and there is no 'postgres' account to run the "
                                "PostgreSQL binaries as") from None
            self.account = "postgres"
            runuser = shutil.which("runuser") or "/usr/sbin/runuser"
            self.run_as = [runuser, "-u", "postgres", "--"]

    def _tool(self, name: str, *args: str) -> list[str]:
        return [*self.run_as, str(self.bindir / name), *args]

    def _clear_stale(self) -> None:
        """A data folder left by a demo that was killed: stop its server, delete it."""
        if not self.datadir.exists():
            return
        if any(self.datadir.iterdir()) and not (self.datadir / "PG_VERSION").exists():
            raise DemoError(f"{self.datadir} exists and is not a PostgreSQL data folder; "
                            "remove it or pick another --workdir")
        pid = _postmaster_pid(self.datadir)
        if _alive(pid):
            _run(self._tool("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop"),
                 timeout=30)
            _wait_gone(pid, 10)
        shutil.rmtree(self.datadir, ignore_errors=True)

    def start(self) -> None:
        self._clear_stale()
        self.datadir.mkdir(parents=True, exist_ok=True)
        if self.account is not None:
            shutil.chown(self.datadir, self.account, self.account)
        done = _run(self._tool("initdb", "-D", str(self.datadir), "-U", "postgres",
                               "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync"))
        if done.returncode != 0:
            raise DemoError(f"initdb failed: {done.stdout.strip()[-800:]}")
        with open(self.datadir / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n# sensor-predictor demo: a throwaway cluster\n"
                       "listen_addresses = '127.0.0.1'\n"
                       "unix_socket_directories = ''\n"
                       "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                       "max_connections = 50\n")
        log = self.datadir / "server.log"
        for _ in range(3):  # a free port can be taken between the probe and the start
            self.port = _free_port()
            done = _run(self._tool("pg_ctl", "-D", str(self.datadir), "-l", str(log), "-w",
                                   "-t", "60", "-o", f"-p {self.port}", "start"))
            self.pid = _postmaster_pid(self.datadir)
            if done.returncode == 0:
                return
            tail = log.read_text(errors="replace")[-800:] if log.exists() else done.stdout
            if "already in use" not in tail:
                break
        raise DemoError(f"pg_ctl start failed: {tail.strip()}")

    def stop(self) -> None:
        pid = self.pid or _postmaster_pid(self.datadir)
        if _alive(pid):
            for mode in ("fast", "immediate"):
                _run(self._tool("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "-t", "30",
                                "stop"), timeout=60)
                if _wait_gone(pid, 5):
                    break
            if _alive(pid) and pid is not None:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, 5)
        with contextlib.suppress(OSError):
            shutil.copyfile(self.datadir / "server.log", self.log_copy)
        shutil.rmtree(self.remove, ignore_errors=True)


def _throwaway_folder(workdir: Path, name: str) -> tuple[Path, Path | None]:
    """The data folder: in the work folder, unless root runs the demo and the server's account
    cannot get there (then a fresh folder under the temp dir, deleted at the end)."""
    if os.geteuid() != 0 or _reachable_by_others(workdir):
        return workdir / name, None
    parent = Path(tempfile.mkdtemp(prefix=f"sensor-demo-{name}-"))
    parent.chmod(0o755)
    return parent / name, parent


async def _start_binaries(workdir: Path, bindir: Path) -> Postgres:
    datadir, temp_parent = _throwaway_folder(workdir, "postgres")
    cluster = PgCtlCluster(bindir, datadir, workdir / "postgres.log", temp_parent)
    try:
        # Not cancellable half-way: a server started by a cancelled call would be left running.
        await asyncio.shield(asyncio.to_thread(cluster.start))
    except BaseException:
        await asyncio.to_thread(cluster.stop)
        raise
    version = (await asyncio.to_thread(
        _run, [str(bindir / "postgres"), "--version"], 10)).stdout.strip()

    async def close() -> None:
        await asyncio.to_thread(cluster.stop)

    return Postgres("binaries", f"throwaway cluster ({version}, {bindir}) in {datadir}",
                    "127.0.0.1", cluster.port, "postgres", Secret(""), "postgres", close=close)


def _import_pgserver() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on import
        import pgserver
    return pgserver


async def _start_embedded(workdir: Path) -> Postgres:
    pgserver = _import_pgserver()
    datadir, temp_parent = _throwaway_folder(workdir, "pgserver")

    def start() -> Any:
        if datadir.exists() and (datadir / "PG_VERSION").exists():
            pid = _postmaster_pid(datadir)
            if _alive(pid) and pid is not None:  # left by a killed demo
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)
                _wait_gone(pid, 10)
            shutil.rmtree(datadir, ignore_errors=True)
        return pgserver.get_server(datadir, cleanup_mode="delete")

    def stop(server: Any) -> None:
        pid = _postmaster_pid(datadir)
        with contextlib.suppress(OSError):
            shutil.copyfile(datadir / "log", workdir / "postgres.log")
        with contextlib.suppress(Exception):  # pg_ctl stop, then the folder is deleted
            server.cleanup()
        if not _wait_gone(pid, 10) and pid is not None:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 5)
        shutil.rmtree(datadir, ignore_errors=True)
        if temp_parent is not None:
            shutil.rmtree(temp_parent, ignore_errors=True)

    try:
        server = await asyncio.shield(asyncio.to_thread(start))
    except BaseException:
        pid = _postmaster_pid(datadir)
        if _alive(pid) and pid is not None:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        if temp_parent is not None:
            shutil.rmtree(temp_parent, ignore_errors=True)
        raise
    info = server.get_postmaster_info()
    socket_dir = str(info.socket_dir)

    async def close() -> None:
        await asyncio.to_thread(stop, server)

    return Postgres("embedded", f"throwaway embedded PostgreSQL (pgserver) in {datadir}, "
                    f"Unix socket in {socket_dir}", socket_dir, int(info.port), "postgres",
                    Secret(""), "postgres", close=close)


async def _from_environment(settings: Settings) -> tuple[Postgres | None, str]:
    """The server POSTGRES_* names, with a scratch database of the demo's own on it; (None, why)
    when it does not answer."""
    where = f"{settings.postgres_host}:{settings.postgres_port}"
    admin_settings = settings
    try:
        admin = await db.connect(settings, timeout=ENV_CONNECT_TIMEOUT)
    except asyncpg.InvalidCatalogNameError:
        # The server answers; the named database does not exist. Manage from 'postgres'.
        admin_settings = dataclasses.replace(settings, postgres_db="postgres")
        try:
            admin = await db.connect(admin_settings, timeout=ENV_CONNECT_TIMEOUT)
        except Exception as exc:
            return None, (f"{where} answers, but database {settings.postgres_db!r} does not "
                          f"exist and 'postgres' cannot be opened: {_describe(exc)}")
    except Exception as exc:
        return None, f"{where} does not answer: {_describe(exc)}"
    scratch = f"sensor_demo_{uuid.uuid4().hex[:8]}"
    try:
        await admin.execute(f'CREATE DATABASE "{scratch}"')
    except asyncpg.PostgresError as exc:
        if admin_settings is not settings:
            return None, (f"{where} answers, but database {settings.postgres_db!r} does not "
                          f"exist and no database can be created: {_describe(exc)}")
        return Postgres(
            "env", f"{where}, database {settings.postgres_db!r} as is (named by POSTGRES_*; no "
            f"scratch database: {_describe(exc)}). The demo's readings, predictions and models "
            "are added to it", settings.postgres_host, settings.postgres_port,
            settings.postgres_user, settings.postgres_password, settings.postgres_db), ""
    finally:
        await admin.close()

    async def drop() -> None:
        conn = await db.connect(admin_settings, timeout=ENV_CONNECT_TIMEOUT)
        try:
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')
            except asyncpg.PostgresSyntaxError:  # PostgreSQL before 13
                await conn.execute(f'DROP DATABASE IF EXISTS "{scratch}"')
        finally:
            await conn.close()

    return Postgres(
        "env", f"{where} (named by POSTGRES_*), in a scratch database {scratch!r} dropped at "
        "the end", settings.postgres_host, settings.postgres_port, settings.postgres_user,
        settings.postgres_password, scratch, close=drop), ""


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# -- the demo -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    duration: float
    rate: float
    workdir: Path
    mode: Mode

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str]) -> Options:
        raw = getattr(args, "postgres", None) or environ.get(DEMO_POSTGRES_ENV) or "auto"
        mode = raw.strip().lower()
        if mode not in MODES:
            raise DemoError(f"{DEMO_POSTGRES_ENV}={raw!r}: must be one of {', '.join(MODES)}")
        return cls(float(args.duration), float(args.rate), Path(args.workdir).resolve(),
                   mode)


@dataclass(frozen=True)
class Sample:
    at: float
    max_id: int
    scored: float
    latency: list[tuple[float, float]]
    backlog: int | None


class _Simulation:
    """One run_simulation task with its own stop event."""

    def __init__(self, settings: Settings, rate: float, drift: bool, seed: int) -> None:
        from sensor_predictor.simulator import run_simulation

        self.drift = drift
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(
            run_simulation(settings, machines=MACHINES, rate=rate, drift=drift, seed=seed,
                           stop=self.stop),
            name=f"simulator-{'drift' if drift else 'steady'}")

    async def finish(self) -> int:
        self.stop.set()
        return await self.task


TALLY = """
WITH per_reading AS (
    SELECT r.id,
           (SELECT count(*) FROM predictions p WHERE p.reading_id = r.id) AS n_pred,
           (SELECT count(*) FROM reading_errors e WHERE e.reading_id = r.id) AS n_err
      FROM readings r
     WHERE r.id > $1)
SELECT count(*) AS readings,
       count(*) FILTER (WHERE n_pred = 1 AND n_err = 0) AS predicted,
       count(*) FILTER (WHERE n_err = 1 AND n_pred = 0) AS errors,
       count(*) FILTER (WHERE n_pred + n_err = 0) AS missing,
       count(*) FILTER (WHERE n_pred + n_err > 1) AS duplicated
  FROM per_reading
"""


def _prepare_mlflow(uri: str, artifacts: Path) -> str:
    """Blocking: the experiment training.py logs to, its artifacts under the work folder (a
    sqlite store would otherwise put them in ./mlruns of whatever the current folder is)."""
    from sensor_predictor.model_holder import configure_mlflow
    from sensor_predictor.training import EXPERIMENT_NAME

    configure_mlflow(uri)
    import mlflow

    experiment = mlflow.get_experiment_by_name(EXPERIMENT_NAME)
    if experiment is not None:
        return str(experiment.artifact_location)
    artifacts.mkdir(parents=True, exist_ok=True)
    mlflow.create_experiment(EXPERIMENT_NAME, artifact_location=artifacts.as_uri())
    return artifacts.as_uri()


def _task_error(task: asyncio.Task[Any]) -> str:
    if task.cancelled():
        return "cancelled"
    exc = task.exception()
    return _describe(exc) if exc is not None else f"returned {task.result()!r}"


class Demo:
    """Set-up, the stream, and the wind-down that always runs (summary, servers stopped)."""

    def __init__(self, opts: Options, base: Settings, console: Console) -> None:
        self.opts = opts
        self.base = base
        self.console = console
        self.stop = asyncio.Event()  # SIGINT / SIGTERM: stop what runs, summarise, clean up
        self.hurry = asyncio.Event()  # a second signal: skip the drain
        self.signal: int | None = None
        self.failure: str | None = None
        self.pg: Postgres | None = None
        self.settings = base
        self.pool: asyncpg.Pool | None = None
        self.worker: Any = None  # sensor_predictor.worker.Worker, imported lazily
        self.worker_task: asyncio.Task[int] | None = None
        self.sim: _Simulation | None = None
        self.retrain_task: asyncio.Task[None] | None = None
        self.retrained_version: str | None = None
        self.baseline_reading = 0
        self.baseline_drift = 0
        self.drift_from_id: int | None = None
        self.t0: float | None = None
        self.stream_seconds = 0.0
        self.served: list[str] = []
        self.metrics_url: str | None = None
        self.mlflow_ready: asyncio.Task[str] | None = None
        self.mlflow_uri = f"sqlite:///{opts.workdir / 'mlflow.db'}"
        self._drift_events_seen = 0.0
        self._drift_open = False

    # -- plumbing -------------------------------------------------------------------------

    def event(self, text: str) -> None:
        prefix = f"[{self._elapsed():6.1f}s] " if self.t0 is not None else ""
        self.console.line(prefix + text)

    def _elapsed(self) -> float:
        return 0.0 if self.t0 is None else time.monotonic() - self.t0

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal = signum
            self.console.keep_status()
            self.console.line(f"{name}: stopping (again to skip the drain)")
            self.stop.set()
        elif not self.hurry.is_set():
            self.console.line(f"{name} again: skipping the drain")
            self.hurry.set()

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Interrupted

    async def _sleep(self, seconds: float, event: asyncio.Event | None = None) -> None:
        """Sleep, or less when `event` (the stop event by default) is set."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for((event or self.stop).wait(), max(0.0, seconds))

    async def _step(self, aw: Awaitable[T]) -> T:
        """Await a set-up step, abandoning it when a signal arrives."""
        self._check_stop()
        task: asyncio.Future[T] = asyncio.ensure_future(aw)
        stopper: asyncio.Future[Any] = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise Interrupted

    # -- the whole run --------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        ok = False
        try:
            try:
                await self._setup()
                await self._stream()
            except Interrupted:
                pass
            except DemoError as exc:
                self.failure = str(exc)
            finally:
                ok = await self._finish()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        if self.signal is not None:
            return 128 + self.signal
        return EXIT_OK if ok and self.failure is None else EXIT_FAILED

    async def _setup(self) -> None:
        o, c = self.opts, self.console
        c.line(f"sensor-predictor demo: {o.duration:g} s of readings at {o.rate:g}/s; "
               f"work folder {o.workdir}")
        if o.mode == "env" and not _named_by_environment(os.environ):
            raise DemoError(f"{DEMO_POSTGRES_ENV}=env, but no POSTGRES_* variable is set")
        # Importing MLflow and creating its store take seconds: meanwhile, start PostgreSQL.
        self.mlflow_ready = asyncio.create_task(asyncio.to_thread(
            _prepare_mlflow, self.mlflow_uri, o.workdir / "artifacts"), name="mlflow")
        pg = await self._postgres()
        c.line(f"PostgreSQL: {pg.description}")
        self._check_stop()
        port = self.base.metrics_port if _port_is_free(self.base.metrics_port) else 0
        self.settings = dataclasses.replace(
            pg.apply(self.base), mlflow_tracking_uri=self.mlflow_uri,
            metrics_host="127.0.0.1", metrics_port=port, migrate_on_start=False)

        applied = await self._step(self._migrate())
        self.pool = await self._step(db.create_pool(self.settings, size=3))
        c.line(f"migrated ({len(applied)} migration(s) applied)")

        artifacts = await self._step(self.mlflow_ready)
        c.line(f"MLflow: {self.mlflow_uri}, artifacts in {artifacts}")

        from sensor_predictor.training import train

        c.line(f"training the first model ({CLUSTERS} clusters) ...")
        result = await self._step(train(
            self.settings, clusters=CLUSTERS, readings=INITIAL_TRAINING_READINGS,
            activate=True, seed=0))
        c.line(f"model v{result.version} trained on {result.n_readings} {result.source} "
               f"readings (silhouette {result.silhouette:.3f}) and activated")
        await self._start_worker()

    async def _postgres(self) -> Postgres:
        mode, c = self.opts.mode, self.console
        named = _named_by_environment(os.environ)
        if mode in ("auto", "env"):
            if named:
                # Not a _step: abandoned half-way, it could leave a scratch database behind.
                pg, why = await _from_environment(self.base)
                if pg is not None:
                    self.pg = pg
                    return pg
                if mode == "env":
                    raise DemoError(f"{DEMO_POSTGRES_ENV}=env: {why}")
                c.line(f"PostgreSQL named by {', '.join(named)}: {why}; using a throwaway "
                       "server instead")
            elif mode == "env":
                raise DemoError(f"{DEMO_POSTGRES_ENV}=env, but no POSTGRES_* variable is set")
        if mode in ("auto", "binaries"):
            bindir = find_postgres_bindir()
            if bindir is not None:
                try:
                    return await self._throwaway(_start_binaries(self.opts.workdir, bindir))
                except DemoError as exc:
                    if mode == "binaries":
                        raise
                    c.line(f"PostgreSQL binaries in {bindir} unusable ({exc}); trying the "
                           "embedded server")
            elif mode == "binaries":
                raise DemoError("no PostgreSQL binaries (initdb, pg_ctl, postgres) on PATH or "
                                "in /usr/lib/postgresql/*/bin")
        try:
            _import_pgserver()
        except ImportError:
            raise DemoError(
                "no PostgreSQL to use: set POSTGRES_* to a server, install PostgreSQL, or "
                "install the embedded one: pip install 'sensor-predictor[embedded]'") from None
        c.line("starting the embedded PostgreSQL (pgserver) ...")
        return await self._throwaway(_start_embedded(self.opts.workdir))

    async def _throwaway(self, starting: Awaitable[Postgres]) -> Postgres:
        # Never abandoned half-way (not a _step): a server started behind our back would be
        # left running. A signal meanwhile takes effect once it is up.
        pg = await starting
        self.pg = pg
        conn = await asyncpg.connect(host=pg.host, port=pg.port, user=pg.user,
                                     database="postgres", timeout=30)
        try:
            await conn.execute('DROP DATABASE IF EXISTS "sensor_demo"')
            await conn.execute('CREATE DATABASE "sensor_demo"')
        finally:
            await conn.close()
        pg.database = "sensor_demo"
        return pg

    async def _migrate(self) -> list[int]:
        from sensor_predictor.migrate import migrate

        conn = await db.connect(self.settings, timeout=30)
        try:
            applied = await migrate(conn)
            self.baseline_reading = int(
                await conn.fetchval("SELECT coalesce(max(id), 0) FROM readings"))
            self.baseline_drift = int(
                await conn.fetchval("SELECT coalesce(max(id), 0) FROM drift"))
        finally:
            await conn.close()
        return applied

    async def _start_worker(self) -> None:
        from sensor_predictor.worker import Worker

        self.worker = Worker(self.settings)
        self.worker_task = asyncio.create_task(self.worker.run(handle_signals=False),
                                               name="worker")
        deadline = time.monotonic() + WORKER_READY_TIMEOUT
        while not self.worker.readiness()[0]:
            if self.worker_task.done():
                raise DemoError(f"the worker stopped while starting: "
                                f"{_task_error(self.worker_task)} (see {self._log_path()})")
            self._check_stop()
            if time.monotonic() > deadline:
                raise DemoError(f"the worker serves no model after {WORKER_READY_TIMEOUT:g} s: "
                                f"{self.worker.readiness()[1]} (see {self._log_path()})")
            await self._sleep(0.05)
        version = self._serving()
        self.metrics_url = f"http://127.0.0.1:{self.worker.metrics_server.port}"
        self.console.line(f"worker serving model v{version}; metrics at {self.metrics_url}"
                          f"/metrics, readiness at {self.metrics_url}/ready")

    def _log_path(self) -> Path:
        return self.opts.workdir / "demo.log"

    def _serving(self) -> str | None:
        model = self.worker.holder.current if self.worker is not None else None
        version = None if model is None else str(model.version)
        if version is not None and (not self.served or self.served[-1] != version):
            self.served.append(version)
        return version

    # -- the stream -----------------------------------------------------------------------

    async def _stream(self) -> None:
        o = self.opts
        d = o.duration
        self.t0 = time.monotonic()
        self.sim = _Simulation(self.settings, o.rate, drift=False, seed=1)
        self.event(f"stream started: {MACHINES} machines, {o.rate:g} readings/s; drift at "
                   f"{DRIFT_AT * d:.0f} s, retrained model at {RETRAIN_AT * d:.0f} s, end at "
                   f"{d:g} s (Ctrl-C stops)")
        self.console.line(self.STATUS_HEADER)
        plain_every = max(1.0, min(5.0, d / 10))
        shown = last = await self._sample()
        waiting_said = False
        while not self.stop.is_set():
            await self._sleep(STATUS_SECONDS - (time.monotonic() - last.at))
            if self.stop.is_set():
                break
            self._check_tasks()
            now = self._elapsed()
            if self.drift_from_id is None and now >= DRIFT_AT * d:
                await self._start_drift()
            if self.retrain_task is None and now >= RETRAIN_AT * d:
                self.retrain_task = asyncio.create_task(self._retrain(), name="retrain")
            last = await self._sample()
            self._notice_changes()
            if self.console.tty or last.at - shown.at >= plain_every - 0.05:
                self.console.status(self._status_line(shown, last))
                shown = last
            if now >= d:
                pending = self._retrain_pending()
                if pending and now < d + RETRAIN_GRACE_SECONDS:
                    if not waiting_said:
                        self.event(f"time is up, but {pending}: the stream runs on")
                        waiting_said = True
                    continue
                if pending:
                    self.event(f"gave up waiting: {pending}")
                break
        self.stream_seconds = self._elapsed()
        self.console.keep_status()

    def _check_tasks(self) -> None:
        if self.worker_task is not None and self.worker_task.done():
            raise DemoError(f"the worker stopped: {_task_error(self.worker_task)} "
                            f"(see {self._log_path()})")
        if self.sim is not None and self.sim.task.done():
            raise DemoError(f"the simulator stopped: {_task_error(self.sim.task)}")
        if self.retrain_task is not None and self.retrain_task.done() \
                and not self.retrain_task.cancelled() and self.retrain_task.exception():
            raise DemoError(f"retraining failed: {_task_error(self.retrain_task)}")

    def _retrain_pending(self) -> str | None:
        if self.retrain_task is None:
            return "the retrained model has not been trained yet"
        if not self.retrain_task.done():
            return "the retrained model is still training"
        if self.retrained_version is not None and self.retrained_version not in self.served:
            return f"the worker does not serve model v{self.retrained_version} yet"
        return None

    async def _start_drift(self) -> None:
        assert self.pool is not None
        if self.sim is not None:
            await self.sim.finish()
            self.sim = None
        self.drift_from_id = int(
            await self.pool.fetchval("SELECT coalesce(max(id), 0) FROM readings"))
        self.sim = _Simulation(self.settings, self.opts.rate, drift=True, seed=2)
        self.event("the stream drifts: sensors 4-8 run hotter, failures come five times as often")

    async def _retrain(self) -> None:
        from sensor_predictor.training import train

        assert self.pool is not None and self.drift_from_id is not None
        n = int(await self.pool.fetchval("SELECT count(*) FROM readings WHERE id > $1",
                                         self.drift_from_id))
        if n >= RETRAIN_MIN_READINGS:
            self.event(f"retraining on the {n} drifted readings so far ...")
            readings, min_readings = n, RETRAIN_MIN_READINGS
        else:
            self.event(f"only {n} drifted readings: retraining on generated ones (the drift "
                       "will stay) ...")
            readings, min_readings = 5_000, 5_001  # more than asked for: generated readings
        result = await train(self.settings, clusters=CLUSTERS, readings=readings,
                             min_readings=min_readings, activate=True, seed=1)
        self.retrained_version = str(result.version)
        self.event(f"model v{result.version} trained on {result.n_readings} {result.source} "
                   f"readings (silhouette {result.silhouette:.3f}) and activated mid-stream")

    async def _sample(self) -> Sample:
        assert self.pool is not None
        m = self.worker.metrics
        scored = float(m.predictions.get({})) + sum(float(v) for _, v in m.bad_readings.get_all())
        max_id = int(await self.pool.fetchval("SELECT coalesce(max(id), 0) FROM readings"))
        backlog: int | None
        try:
            backlog = int(await self.pool.fetchval(db.queries()["backlog"]))
        except db.UNAVAILABLE:
            backlog = None
        return Sample(time.monotonic(), max_id, scored, _buckets(m.latency), backlog)

    def _notice_changes(self) -> None:
        m = self.worker.metrics
        before = self.served[-1] if self.served else None
        version = self._serving()
        if version is not None and version != before:
            self.event(f"the worker now serves model v{version} (hot swap; the drift window "
                       "starts over)")
            self._drift_open = False
        events = float(m.drift_events.get({}))
        detected = float(m.drift_detected.get({})) >= 1
        if events > self._drift_events_seen:
            self._drift_events_seen = events
            self.event(f"drift detected on model v{version}: score "
                       f"{float(m.drift_score.get({})):.3f} > threshold "
                       f"{self.settings.drift_threshold:g} (a row in table drift)")
        elif detected and not self._drift_open:
            self.event(f"drift excursion of model v{version} still open")
        if self._drift_open and not detected:
            self.event(f"drift on model v{version} is over")
        self._drift_open = detected

    STATUS_HEADER = (f"{'time':>7} {'written/s':>9} {'scored/s':>9} {'p50 ms':>7} {'p99 ms':>7}"
                     f"  {'drift':<11} {'model':<6} {'backlog':>7}")

    def _status_line(self, before: Sample, now: Sample) -> str:
        """One row under STATUS_HEADER: rates and latency over the interval since `before`."""
        m = self.worker.metrics
        dt = max(now.at - before.at, 1e-9)
        delta = _bucket_delta(now.latency, before.latency)
        score = float(m.drift_score.get({}))
        drift = "filling" if math.isnan(score) else f"{score:.3f}"
        if float(m.drift_detected.get({})) >= 1:
            drift += " DRIFT"
        version = f"v{self.served[-1]}" if self.served else "-"
        backlog = "-" if now.backlog is None else str(now.backlog)
        return (f"{self._elapsed():6.1f}s {(now.max_id - before.max_id) / dt:9.0f} "
                f"{(now.scored - before.scored) / dt:9.0f} "
                f"{_ms(histogram_quantile(0.5, delta)):>7} "
                f"{_ms(histogram_quantile(0.99, delta)):>7}  {drift:<11} {version:<6} "
                f"{backlog:>7}")

    # -- the end --------------------------------------------------------------------------

    async def _finish(self) -> bool:
        """Stop everything, summarise, let go of PostgreSQL; True when the check holds."""
        self.console.keep_status()
        ok = False
        try:
            try:
                await self._wind_down()
            except Exception as exc:
                self.failure = self.failure or f"stopping failed: {_describe(exc)}"
            if self.failure is not None:
                self.console.line(f"demo failed: {self.failure}")
            try:
                ok = await self._summary()
            except Exception as exc:
                self.console.line(f"no summary: {_describe(exc)}")
        finally:
            if self.pool is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.pool.close(), timeout=10)
                self.pool = None
            await self._release_postgres()
        return ok

    async def _wind_down(self) -> None:
        if self.t0 is not None and not self.stream_seconds:
            self.stream_seconds = self._elapsed()
        if self.sim is not None:
            try:
                await self.sim.finish()
            except Exception as exc:
                self.failure = self.failure or f"the simulator failed: {_describe(exc)}"
            self.sim = None
        for task in (self.mlflow_ready, self.retrain_task):
            if task is not None and not task.done():
                task.cancel()  # its thread, if any, runs to its end (asyncio.run waits)
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.worker_task is not None and not self.worker_task.done():
            if self.pool is not None and self.failure is None:
                timeout = 0.0 if self.hurry.is_set() else (
                    DRAIN_TIMEOUT_INTERRUPTED if self.signal is not None else DRAIN_TIMEOUT)
                await self._drain(timeout)
            self.worker.stop()
            try:
                await asyncio.wait_for(self.worker_task, timeout=30)
            except Exception as exc:
                self.failure = self.failure or f"the worker did not stop cleanly: " \
                                               f"{_describe(exc)}"
        if self.worker is not None:
            self._serving()

    async def _drain(self, seconds: float) -> bool:
        assert self.pool is not None
        deadline = time.monotonic() + seconds
        said = False
        while True:
            try:
                backlog = int(await self.pool.fetchval(db.queries()["backlog"]))
            except db.UNAVAILABLE:
                return False
            if backlog == 0:
                return True
            if time.monotonic() >= deadline or self.hurry.is_set():
                self.event(f"stopping the worker with {backlog} reading(s) not scored yet")
                return False
            if not said:
                self.event(f"draining the backlog ({backlog} reading(s)) ...")
                said = True
            await self._sleep(0.1, self.hurry)

    async def _summary(self) -> bool:
        c = self.console
        if self.t0 is None and self.signal is None:
            return False  # failed during set-up: the failure says it all
        c.line()
        c.line("summary" + (" (interrupted)" if self.signal is not None else ""))
        if self.pool is None or self.t0 is None:
            c.line("  stopped during set-up: no readings were written")
            return self.signal is not None
        tally = await self.pool.fetchrow(TALLY, self.baseline_reading)
        versions = await self.pool.fetch(
            "SELECT model_version, count(*) AS n FROM predictions WHERE reading_id > $1"
            " GROUP BY model_version ORDER BY min(id)", self.baseline_reading)
        bad = await self.pool.fetch(
            "SELECT reason, count(*) AS n FROM reading_errors WHERE reading_id > $1"
            " GROUP BY reason ORDER BY reason", self.baseline_reading)
        drift = await self.pool.fetch(
            "SELECT model_version, drift_score, peak_score, detection_time, ended_at"
            " FROM drift WHERE id > $1 ORDER BY id", self.baseline_drift)

        def row(label: str, text: str) -> None:
            c.line(f"  {label:<19}{text}")

        rate = tally["readings"] / self.stream_seconds if self.stream_seconds else 0.0
        row("stream", f"{self.stream_seconds:.1f} s, {rate:.0f} readings/s on average "
                      f"(target {self.opts.rate:g})")
        row("readings written", f"{tally['readings']}")
        predicted = sum(int(v["n"]) for v in versions)
        per_version = "   ".join(f"v{v['model_version']}: {v['n']}" for v in versions)
        row("predictions", f"{predicted}" + (f"   ({per_version})" if per_version else ""))
        n_bad = sum(int(b["n"]) for b in bad)
        reasons = ", ".join(f"{b['reason']}: {b['n']}" for b in bad)
        row("bad readings", f"{n_bad}" + (f"   ({reasons})" if reasons else ""))
        row("drift events", f"{len(drift)}")
        for d in drift:
            if d["ended_at"] is not None:
                state = f"ended {d['ended_at'].astimezone().strftime('%H:%M:%S')}"
            elif self.served and d["model_version"] != self.served[-1]:
                state = "open when the model was replaced"
            else:
                state = "open"
            peak = d["peak_score"] if d["peak_score"] is not None else d["drift_score"]
            row("", f"model v{d['model_version']}: score {d['drift_score']:.3f}, peak "
                    f"{peak:.3f}, at {d['detection_time'].astimezone().strftime('%H:%M:%S')}, "
                    f"{state}")
        if self.worker is not None:
            buckets = _buckets(self.worker.metrics.latency)
            n = int(buckets[-1][1]) if buckets else 0
            row("latency p50 / p99", f"{_ms(histogram_quantile(0.5, buckets))} ms / "
                                     f"{_ms(histogram_quantile(0.99, buckets))} ms   "
                                     f"(insert to prediction commit, {n} readings)")
        row("models served", " -> ".join(f"v{v}" for v in self.served) or "none")
        missing, duplicated = int(tally["missing"]), int(tally["duplicated"])
        if duplicated == 0 and missing == 0:
            ok = True
            verdict = (f"OK: each of the {tally['readings']} readings has exactly one "
                       "prediction or error")
        elif duplicated == 0 and self.signal is not None:
            ok = True
            verdict = (f"OK so far: no reading has two results; {missing} left unscored by "
                       "the interruption")
        else:
            ok = False
            verdict = (f"FAILED: {missing} reading(s) without a result, {duplicated} with more "
                       "than one")
        row("exactly-once", verdict)
        row("MLflow", f"{self.mlflow_uri} (kept)")
        row("logs", f"{self._log_path()}")
        return ok

    async def _release_postgres(self) -> None:
        pg, self.pg = self.pg, None
        if pg is None or pg.close is None:
            return
        try:
            await pg.close()
        except Exception as exc:
            self.console.line(f"could not release PostgreSQL: {_describe(exc)}")
            self.failure = self.failure or "PostgreSQL could not be released"
            return
        if pg.kind == "env":
            self.console.line(f"dropped the scratch database {pg.database!r}")
        else:
            self.console.line(f"stopped and deleted the throwaway PostgreSQL; its log: "
                              f"{self.opts.workdir / 'postgres.log'}")


def run_demo(args: argparse.Namespace) -> int:
    """`sensor-predictor demo`: see the module docstring. Returns the exit code."""
    try:
        opts = Options.from_args(args, os.environ)
    except DemoError as exc:
        print(f"sensor-predictor demo: {exc}", file=sys.stderr)
        return 2
    base = load_settings()  # already validated by the CLI
    opts.workdir.mkdir(parents=True, exist_ok=True)
    _quiet_mlflow()
    # Left open to the end of the process: atexit handlers (pgserver's) may still log.
    log = _log_to_file(opts.workdir / "demo.log", base.log_level)
    console = Console(sys.stdout)
    # MLflow prints some notices straight to sys.stderr ("Created version '2' of model").
    stderr, sys.stderr = sys.stderr, log
    try:
        return asyncio.run(Demo(opts, base, console).run())
    finally:
        sys.stderr = stderr
