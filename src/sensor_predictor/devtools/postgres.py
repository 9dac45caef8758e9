"""A throwaway PostgreSQL cluster for development, tests, benchmarks and the demo.

    server = start_cluster({"fsync": "off"})
    conn = await server.connect("postgres")
    ...
    stop_cluster(server)

`start_cluster` runs initdb and pg_ctl from the PostgreSQL found on PATH or under
/usr/lib/postgresql (as the `postgres` system user when run as root, since initdb refuses root),
on a free port of 127.0.0.1 with trust authentication. The settings are written into the
cluster's postgresql.conf, so `pg_ctl(server, "restart")` keeps them. `find_or_start` is what
the tests use: the server PGHOST names, else 127.0.0.1:5432 when it lets us in, else a cluster.

The tools run in their own session (a Ctrl-C at a terminal is the caller's to handle) with their
output in a temporary file: a pipe would be inherited by the postmaster and never close.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

__all__ = ["ClusterError", "PgServer", "alive", "create_database", "drop_database",
           "find_bindir", "find_or_start", "free_port", "pg_bin", "pg_ctl", "port_answers",
           "postmaster_pid", "start_cluster", "stop_cluster", "wait_gone"]

# Always set; a caller's settings override them.
BASE_SETTINGS = {"listen_addresses": "127.0.0.1"}
SERVER_ACCOUNT = "postgres"  # the account the server runs as when we are root


class ClusterError(RuntimeError):
    """initdb or pg_ctl failed; the message carries the tool's last words."""


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _version_key(folder: Path) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", folder.parent.name)) or (0,)


def find_bindir() -> Path | None:
    """A folder with initdb, pg_ctl and postgres: from PATH, else the newest
    /usr/lib/postgresql/*/bin (Debian's layout, not on PATH)."""
    candidates: list[Path] = []
    found = shutil.which("pg_ctl")
    if found:
        candidates += [Path(found).resolve().parent, Path(found).parent]
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key,
                         reverse=True)
    for folder in candidates:
        if all(os.access(folder / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def pg_bin(name: str) -> str:
    """Path of a PostgreSQL program (initdb, pg_ctl, postgres, ...)."""
    bindir = find_bindir()
    if bindir is None:
        raise ClusterError(f"{name} not found: install PostgreSQL (its server binaries)")
    return str(bindir / name)


@dataclass
class PgServer:
    host: str
    port: int
    user: str
    password: str = ""
    datadir: Path | None = None  # set for a cluster started by start_cluster
    bindir: Path | None = None

    def kwargs(self, database: str = "postgres") -> dict[str, Any]:
        """asyncpg.connect keyword arguments."""
        return {"host": self.host, "port": self.port, "user": self.user,
                "password": self.password or None, "database": database}

    def env(self, database: str = "postgres") -> dict[str, str]:
        """The worker's POSTGRES_* environment for `database`."""
        return {"POSTGRES_HOST": self.host, "POSTGRES_PORT": str(self.port),
                "POSTGRES_USER": self.user, "POSTGRES_PASSWORD": self.password,
                "POSTGRES_DB": database}

    async def connect(self, database: str = "postgres", **kwargs: Any) -> asyncpg.Connection:
        return await asyncpg.connect(**self.kwargs(database), **kwargs)


def _run_as() -> list[str]:
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SERVER_ACCOUNT)
    except KeyError:
        raise ClusterError(f"running as root and there is no {SERVER_ACCOUNT!r} account to run "
                           "the PostgreSQL binaries as (initdb refuses root)") from None
    return [shutil.which("runuser") or "/usr/sbin/runuser", "-u", SERVER_ACCOUNT, "--"]


def _run(cmd: Sequence[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.run(list(cmd), stdin=subprocess.DEVNULL, stdout=out,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True,
                              timeout=timeout, check=False)
        out.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), "")


def _conf_value(value: str) -> str:
    """A postgresql.conf value, quoted (any setting's value may be)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def postmaster_pid(datadir: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((datadir / "postmaster.pid").read_text().splitlines()[0])
    return None


def alive(pid: int | None) -> bool:
    """The process runs (a zombie, our own child nobody reaped, does not)."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] != "Z"
    return True


def wait_gone(pid: int | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _clear_stale(datadir: Path, bindir: Path) -> None:
    """A data folder left by a run that was killed: stop its server, delete it."""
    if not datadir.exists():
        return
    if any(datadir.iterdir()) and not (datadir / "PG_VERSION").exists():
        raise ClusterError(f"{datadir} exists and is not a PostgreSQL data folder")
    pid = postmaster_pid(datadir)
    if alive(pid):
        _run([*_run_as(), str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "immediate", "-w",
              "stop"], timeout=30)
        wait_gone(pid, 10)
    shutil.rmtree(datadir, ignore_errors=True)


def start_cluster(settings: dict[str, str] | None = None, *, port: int | None = None,
                  prefix: str = "sp-pg-", datadir: Path | None = None,
                  bindir: Path | None = None) -> PgServer:
    """initdb + pg_ctl start of a private cluster, in `datadir` (cleared first when a killed
    run left one) or a new temporary directory.

    `settings` are server settings (name -> value, as in postgresql.conf), e.g.
    {"fsync": "off"} for a fast test cluster or {"track_commit_timestamp": "on"}. Without a
    `port`, a free one is picked (and another one when it is taken before the server binds it).
    """
    bindir = bindir or find_bindir()
    if bindir is None:
        raise ClusterError("no PostgreSQL binaries (initdb, pg_ctl, postgres) on PATH or in "
                           "/usr/lib/postgresql/*/bin")
    run_as = _run_as()
    if datadir is None:
        datadir = Path(tempfile.mkdtemp(prefix=prefix))
    else:
        _clear_stale(datadir, bindir)
        datadir.mkdir(parents=True, exist_ok=True)
    if run_as:
        shutil.chown(datadir, SERVER_ACCOUNT, SERVER_ACCOUNT)
    # --no-sync only skips syncing initdb's own files; the server runs with its own settings.
    # --no-locale: the C locale exists everywhere (a missing LANG locale fails initdb).
    done = _run([*run_as, str(bindir / "initdb"), "-D", str(datadir), "-U", "postgres",
                 "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync"])
    if done.returncode != 0:
        shutil.rmtree(datadir, ignore_errors=True)
        raise ClusterError(f"initdb failed: {done.stdout.strip()[-800:]}")
    server = PgServer("127.0.0.1", 0, "postgres", datadir=datadir, bindir=bindir)
    conf = {**BASE_SETTINGS, "unix_socket_directories": str(datadir), **(settings or {})}
    with open(datadir / "postgresql.conf", "a", encoding="utf-8") as f:
        f.write("\n# set by sensor_predictor.devtools.postgres\n")
        f.writelines(f"{name} = {_conf_value(value)}\n" for name, value in conf.items())
    try:
        for _ in range(3):  # a free port can be taken between the probe and the start
            server.port = port or free_port()
            with open(datadir / "postgresql.conf", "a", encoding="utf-8") as f:
                f.write(f"port = {server.port}\n")  # the last line wins
            try:
                pg_ctl(server, "start")
                return server
            except ClusterError as exc:
                if port is not None or "already in use" not in str(exc):
                    raise
        raise ClusterError("no free port for PostgreSQL after 3 tries")
    except BaseException:
        stop_cluster(server)
        raise


def pg_ctl(server: PgServer, action: str, *args: str) -> None:
    """pg_ctl start / stop (fast) / restart / reload of a cluster from start_cluster; `args`
    go to pg_ctl as they are (e.g. "-m", "immediate": a crash, WAL buffers lost)."""
    if server.datadir is None:
        raise ValueError("pg_ctl needs a cluster started by start_cluster (a datadir)")
    log = server.datadir / "server.log"
    cmd = [*_run_as(), str((server.bindir or Path(pg_bin("pg_ctl")).parent) / "pg_ctl"),
           "-D", str(server.datadir), "-w", "-t", "60", "-l", str(log)]
    if action in ("stop", "restart") and "-m" not in args:
        cmd += ["-m", "fast"]
    done = _run([*cmd, *args, action])
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
        raise ClusterError(f"pg_ctl {action} failed: {done.stdout.strip()}\n{tail.strip()}")


def stop_cluster(server: PgServer, remove: bool = True) -> None:
    """Stop the cluster (fast, then immediate, then SIGKILL: it never stays running) and, by
    default, delete its data directory."""
    if server.datadir is None:
        return
    pid = postmaster_pid(server.datadir)
    if alive(pid):
        for mode in ("fast", "immediate"):
            with contextlib.suppress(ClusterError, subprocess.TimeoutExpired):
                pg_ctl(server, "stop", "-m", mode)
            if wait_gone(pid, 5):
                break
        if alive(pid) and pid is not None:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            wait_gone(pid, 5)
    if remove:
        shutil.rmtree(server.datadir, ignore_errors=True)


def find_or_start(settings: dict[str, str] | None = None) -> PgServer:
    """PGHOST/PGPORT/PGUSER/PGPASSWORD when PGHOST is set; else 127.0.0.1:5432 when we can log
    in as postgres; else a cluster of our own (`settings` apply to that one only)."""
    if os.environ.get("PGHOST"):
        return PgServer(os.environ["PGHOST"], int(os.environ.get("PGPORT", "5432")),
                        os.environ.get("PGUSER", "postgres"), os.environ.get("PGPASSWORD", ""))
    local = PgServer("127.0.0.1", 5432, "postgres")
    if port_answers(local.host, local.port) and asyncio.run(_can_log_in(local)):
        return local
    return start_cluster(settings)


async def _can_log_in(server: PgServer) -> bool:
    try:
        conn = await asyncio.wait_for(server.connect(), timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await conn.close()
    return True


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def create_database(server: PgServer, name: str, template: str | None = None) -> None:
    """CREATE DATABASE name [TEMPLATE template] (a clone of a migrated template is fast)."""
    conn = await server.connect()
    try:
        suffix = f" TEMPLATE {_ident(template)}" if template else ""
        await conn.execute(f"CREATE DATABASE {_ident(name)}{suffix}")
    finally:
        await conn.close()


async def drop_database(server: PgServer, name: str) -> None:
    """DROP DATABASE IF EXISTS, its sessions ended first (WITH (FORCE), PostgreSQL 13+)."""
    conn = await server.connect()
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {_ident(name)} WITH (FORCE)")
    finally:
        await conn.close()
