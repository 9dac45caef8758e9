"""A throwaway PostgreSQL cluster for development, tests and benchmarks.

    server = start_cluster({"fsync": "off"})
    conn = await server.connect("postgres")
    ...
    stop_cluster(server)

`start_cluster` runs initdb and pg_ctl from the PostgreSQL found on PATH or under
/usr/lib/postgresql (as the `postgres` system user when run as root, since initdb refuses root),
on a free port of 127.0.0.1 with trust authentication. The settings are written into the
cluster's postgresql.conf, so `pg_ctl(server, "restart")` keeps them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

__all__ = ["PgServer", "free_port", "pg_bin", "pg_ctl", "start_cluster", "stop_cluster"]

# Always set; a caller's settings override them.
BASE_SETTINGS = {"listen_addresses": "127.0.0.1"}


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pg_bin(name: str) -> str:
    """Path of a PostgreSQL program (initdb, pg_ctl, ...): PATH first, then the newest
    /usr/lib/postgresql/*/bin (Debian's layout, not on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    raise RuntimeError(f"{name} not found: install PostgreSQL (its server binaries)")


@dataclass
class PgServer:
    host: str
    port: int
    user: str
    password: str = ""
    datadir: Path | None = None  # set for a cluster started by start_cluster

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
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _conf_value(value: str) -> str:
    """A postgresql.conf value, quoted (any setting's value may be)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def start_cluster(settings: dict[str, str] | None = None, *, port: int | None = None,
                  prefix: str = "sp-pg-") -> PgServer:
    """initdb + pg_ctl start of a private cluster in a new temporary directory.

    `settings` are server settings (name -> value, as in postgresql.conf), e.g.
    {"fsync": "off"} for a fast test cluster or {"track_commit_timestamp": "on"}.
    """
    datadir = Path(tempfile.mkdtemp(prefix=prefix))
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(datadir, "postgres", "postgres")
    # --no-sync only skips syncing initdb's own files; the server runs with its own settings.
    subprocess.run([*_run_as(), pg_bin("initdb"), "-D", str(datadir), "-U", "postgres",
                    "--auth=trust", "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
    server = PgServer("127.0.0.1", port or free_port(), "postgres", datadir=datadir)
    conf = {**BASE_SETTINGS, "port": str(server.port),
            "unix_socket_directories": str(datadir), **(settings or {})}
    with open(datadir / "postgresql.conf", "a", encoding="utf-8") as f:
        f.write("\n# set by sensor_predictor.devtools.postgres\n")
        f.writelines(f"{name} = {_conf_value(value)}\n" for name, value in conf.items())
    try:
        pg_ctl(server, "start")
    except BaseException:
        shutil.rmtree(datadir, ignore_errors=True)
        raise
    return server


def pg_ctl(server: PgServer, action: str, *args: str) -> None:
    """pg_ctl start / stop (fast) / restart / reload of a cluster from start_cluster; `args`
    go to pg_ctl as they are (e.g. "-m", "immediate")."""
    if server.datadir is None:
        raise ValueError("pg_ctl needs a cluster started by start_cluster (a datadir)")
    cmd = [*_run_as(), pg_bin("pg_ctl"), "-D", str(server.datadir), "-w", "-t", "60",
           "-l", str(server.datadir / "server.log")]
    if action in ("stop", "restart") and "-m" not in args:
        cmd += ["-m", "fast"]
    subprocess.run([*cmd, *args, action], check=True, capture_output=True)


def stop_cluster(server: PgServer, remove: bool = True) -> None:
    """Stop the cluster (fast shutdown) and, by default, delete its data directory."""
    if server.datadir is None:
        return
    with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
        pg_ctl(server, "stop")
    if remove:
        shutil.rmtree(server.datadir, ignore_errors=True)
