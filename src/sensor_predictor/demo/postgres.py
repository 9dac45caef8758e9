"""Where the demo's PostgreSQL comes from: the server POSTGRES_* names (in a scratch database),
a throwaway cluster from the binaries (sensor_predictor.devtools.postgres), or the embedded
server (pgserver, the `embedded` extra)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import uuid
import warnings
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import asyncpg

from sensor_predictor import db
from sensor_predictor.config import Secret, Settings
from sensor_predictor.devtools.postgres import (
    ClusterError,
    PgServer,
    alive,
    postmaster_pid,
    start_cluster,
    stop_cluster,
    wait_gone,
)

ENV_CONNECT_TIMEOUT = 3.0
DEMO_DATABASE = "sensor_demo"
# A throwaway cluster for a minute of readings: speed over durability.
CLUSTER_SETTINGS = {"unix_socket_directories": "", "fsync": "off", "synchronous_commit": "off",
                    "full_page_writes": "off", "max_connections": "50"}
# As root, pgserver runs the server as a system account it creates, and leaves it.
PGSERVER_ACCOUNT = "pgserver"


class DemoError(Exception):
    """A failure to report in one line (no traceback): exit 1."""


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


def describe(exc: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def named_by_environment(environ: Mapping[str, str]) -> list[str]:
    return sorted(k for k in environ if k.startswith("POSTGRES_"))


def reachable_by_others(path: Path) -> bool:
    """Every existing folder on the way to `path` lets any account through (o+x)."""
    for folder in [path, *path.parents]:
        if folder.exists() and not folder.stat().st_mode & stat.S_IXOTH:
            return False
    return True


def throwaway_folder(workdir: Path, name: str) -> tuple[Path, Path | None]:
    """The data folder: in the work folder, unless root runs the demo and the server's account
    cannot get there (then a fresh folder under the temp dir, deleted at the end)."""
    if os.geteuid() != 0 or reachable_by_others(workdir):
        return workdir / name, None
    parent = Path(tempfile.mkdtemp(prefix=f"sensor-demo-{name}-"))
    parent.chmod(0o755)
    return parent / name, parent


async def start_binaries(workdir: Path, bindir: Path) -> Postgres:
    datadir, temp_parent = throwaway_folder(workdir, "postgres")
    server = PgServer("127.0.0.1", 0, "postgres", datadir=datadir, bindir=bindir)

    def stop() -> None:
        with contextlib.suppress(OSError):
            shutil.copyfile(datadir / "server.log", workdir / "postgres.log")
        stop_cluster(server)
        if temp_parent is not None:
            shutil.rmtree(temp_parent, ignore_errors=True)

    def start() -> PgServer:
        try:
            return start_cluster(CLUSTER_SETTINGS, datadir=datadir, bindir=bindir)
        except ClusterError as exc:
            raise DemoError(str(exc)) from None

    try:
        # Not cancellable half-way: a server started by a cancelled call would be left running.
        server = await asyncio.shield(asyncio.to_thread(start))
    except BaseException:
        await asyncio.to_thread(stop)
        raise
    version = (await asyncio.to_thread(
        subprocess.run, [str(bindir / "postgres"), "--version"], capture_output=True,
        text=True, timeout=10, check=False)).stdout.strip()

    async def close() -> None:
        await asyncio.to_thread(stop)

    return Postgres("binaries", f"throwaway cluster ({version}, {bindir}) in {datadir}",
                    "127.0.0.1", server.port, "postgres", Secret(""), "postgres", close=close)


def import_pgserver() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on import
        import pgserver
    return pgserver


def _kill(pid: int | None, sig: int) -> None:
    if alive(pid) and pid is not None:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


async def start_embedded(workdir: Path) -> Postgres:
    pgserver = import_pgserver()
    datadir, temp_parent = throwaway_folder(workdir, "pgserver")

    def start() -> Any:
        if datadir.exists() and (datadir / "PG_VERSION").exists():
            pid = postmaster_pid(datadir)  # left by a killed demo
            _kill(pid, signal.SIGTERM)
            wait_gone(pid, 10)
            shutil.rmtree(datadir, ignore_errors=True)
        return pgserver.get_server(datadir, cleanup_mode="delete")

    def stop(server: Any) -> None:
        pid = postmaster_pid(datadir)
        with contextlib.suppress(OSError):
            shutil.copyfile(datadir / "log", workdir / "postgres.log")
        with contextlib.suppress(Exception):  # pg_ctl stop, then the folder is deleted
            server.cleanup()
        if not wait_gone(pid, 10):
            _kill(pid, signal.SIGKILL)
            wait_gone(pid, 5)
        shutil.rmtree(datadir, ignore_errors=True)
        if temp_parent is not None:
            shutil.rmtree(temp_parent, ignore_errors=True)

    try:
        server = await asyncio.shield(asyncio.to_thread(start))
    except BaseException:
        _kill(postmaster_pid(datadir), signal.SIGTERM)
        if temp_parent is not None:
            shutil.rmtree(temp_parent, ignore_errors=True)
        raise
    info = server.get_postmaster_info()
    socket_dir = str(info.socket_dir)

    async def close() -> None:
        await asyncio.to_thread(stop, server)

    description = (f"throwaway embedded PostgreSQL (pgserver) in {datadir}, Unix socket in "
                   f"{socket_dir}")
    if os.geteuid() == 0:
        description += (f". As root, pgserver runs it as the system account "
                        f"{PGSERVER_ACCOUNT!r}, which it creates and leaves behind "
                        f"(`userdel {PGSERVER_ACCOUNT}` removes it)")
    return Postgres("embedded", description, socket_dir, int(info.port), "postgres",
                    Secret(""), "postgres", close=close)


async def create_demo_database(pg: Postgres) -> None:
    """A fresh `sensor_demo` database on a throwaway server (the demo's own)."""
    conn = await asyncpg.connect(host=pg.host, port=pg.port, user=pg.user,
                                 database="postgres", timeout=30)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{DEMO_DATABASE}"')
        await conn.execute(f'CREATE DATABASE "{DEMO_DATABASE}"')
    finally:
        await conn.close()
    pg.database = DEMO_DATABASE


async def from_environment(settings: Settings) -> tuple[Postgres | None, str]:
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
                          f"exist and 'postgres' cannot be opened: {describe(exc)}")
    except Exception as exc:
        return None, f"{where} does not answer: {describe(exc)}"
    scratch = f"sensor_demo_{uuid.uuid4().hex[:8]}"
    try:
        await admin.execute(f'CREATE DATABASE "{scratch}"')
    except asyncpg.PostgresError as exc:
        if admin_settings is not settings:
            return None, (f"{where} answers, but database {settings.postgres_db!r} does not "
                          f"exist and no database can be created: {describe(exc)}")
        return Postgres(
            "env", f"{where}, database {settings.postgres_db!r} as is (named by POSTGRES_*; no "
            f"scratch database: {describe(exc)}). The demo's readings, predictions and models "
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
