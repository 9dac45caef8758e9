"""A primary with a streaming standby (pg_basebackup -R), the primary crashed (pg_ctl stop -m
immediate) under a steady writer and the standby promoted: the worker, given both hosts, finds
the new primary; then the old primary comes back as a standby, first in the host list, and no
claim runs on it."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from sensor_predictor.devtools.mlflow_server import MlflowServer, mlflow_env
from sensor_predictor.devtools.postgres import (
    SERVER_ACCOUNT,
    PgServer,
    _run_as,
    create_database,
    pg_ctl,
    start_cluster,
    stop_cluster,
)
from sensor_predictor.devtools.worker_process import WorkerProcess
from sensor_predictor.migrate import migrate
from sensor_predictor.training import activate_model
from tests.support.chaos import StreamWriter, check_invariant, served, unscored
from tests.support.models import Models

pytestmark = [pytest.mark.asyncio]

REPLICATION = {"fsync": "off", "wal_level": "replica", "hot_standby": "on",
               "max_wal_senders": "5", "wal_keep_size": "256MB", "max_connections": "100"}
DB = "sp_failover"
PROMOTION_TO_FIRST_PREDICTION = 15.0
# From the crash to the promotion (an HA manager's detection time): long enough for the
# worker's retries to back off, and for its log rate to be measured.
OUTAGE_SECONDS = 8.0


class HostList:
    """What StreamWriter connects with: both hosts, the first read-write one (as libpq does)."""

    def __init__(self, *servers: PgServer) -> None:
        self.servers = servers

    def kwargs(self, database: str) -> dict[str, Any]:
        return {"host": [s.host for s in self.servers], "port": [s.port for s in self.servers],
                "user": "postgres", "database": database, "target_session_attrs": "read-write"}


def basebackup(source: PgServer, port: int, datadir: Path | None = None) -> PgServer:
    """A streaming standby of `source` (pg_basebackup -R), started on `port`."""
    assert source.bindir is not None
    if datadir is None:
        datadir = Path(tempfile.mkdtemp(prefix="sp-standby-"))
    else:
        shutil.rmtree(datadir, ignore_errors=True)
        datadir.mkdir(parents=True, mode=0o700)
        datadir.chmod(0o700)  # the server refuses a data directory others may read
    run_as = _run_as()
    if run_as:
        shutil.chown(datadir, SERVER_ACCOUNT, SERVER_ACCOUNT)
    done = subprocess.run(
        [*run_as, str(source.bindir / "pg_basebackup"), "-h", source.host,
         "-p", str(source.port), "-U", "postgres", "-D", str(datadir), "-R", "-X", "stream",
         "-c", "fast"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(datadir / "postgresql.conf", "a", encoding="utf-8") as f:
        f.write(f"port = {port}\nunix_socket_directories = '{datadir}'\n")
    if run_as:
        subprocess.run(["chown", "-R", f"{SERVER_ACCOUNT}:{SERVER_ACCOUNT}", str(datadir)],
                       check=True)
    standby = PgServer(source.host, port, "postgres", datadir=datadir, bindir=source.bindir)
    pg_ctl(standby, "start")
    return standby


async def _connect(server: PgServer) -> asyncpg.Connection:
    return await asyncpg.connect(**server.kwargs(DB), timeout=5)


async def _in_recovery(server: PgServer) -> bool:
    conn = await _connect(server)
    try:
        return bool(await conn.fetchval("SELECT pg_is_in_recovery()"))
    finally:
        await conn.close()


def _log_times(worker: WorkerProcess) -> list[tuple[float, dict[str, Any]]]:
    out = []
    for e in worker.events():
        ts = e.get("timestamp")
        if isinstance(ts, str):
            out.append((dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp(), e))
    return out


@pytest.mark.timeout(360)
async def test_failover_to_a_promoted_standby_and_the_old_primary_back_as_a_standby(
        served_models: Models, mlflow_server: MlflowServer, tmp_path: Path,
        shared_model_cache: Path) -> None:
    primary = start_cluster(REPLICATION, prefix="sp-primary-")
    standby: PgServer | None = None
    worker: WorkerProcess | None = None
    try:
        await create_database(primary, DB)
        conn = await _connect(primary)
        await migrate(conn)
        await activate_model(conn, *served_models.v1)
        await conn.close()
        standby = await asyncio.to_thread(basebackup, primary, _free_port())
        assert await _in_recovery(standby)

        env = {"POSTGRES_HOST": "127.0.0.1,127.0.0.1",
               "POSTGRES_PORT": f"{primary.port},{standby.port}",
               "POSTGRES_USER": "postgres", "POSTGRES_PASSWORD": "", "POSTGRES_DB": DB,
               "POSTGRES_CONNECT_TIMEOUT": "2",
               **mlflow_env(mlflow_server.uri), "MODEL_CACHE_DIR": str(shared_model_cache),
               "LOG_FORMAT": "json", "HEARTBEAT_SECONDS": "1",
               # The fallback poll is 5 minutes away: only a reconnect and NOTIFY explain a
               # quick first prediction on the new primary.
               "INFERENCE_INTERVAL_SECONDS": "300"}
        worker = WorkerProcess(env, tmp_path / "worker.log").start()
        await worker.until_ready()
        hosts = HostList(primary, standby)
        writer = StreamWriter(hosts, DB, rows=10, pause=0.02,  # type: ignore[arg-type]
                              tolerate_outage=True).start()
        await asyncio.sleep(3.0)

        # The crash, mid-stream, then the promotion.
        crashed_wall = time.time()
        await asyncio.to_thread(pg_ctl, primary, "stop", "-m", "immediate")
        await asyncio.sleep(OUTAGE_SECONDS)
        await asyncio.to_thread(pg_ctl, standby, "promote")
        promoted = time.monotonic()
        new = await _connect(standby)
        first_new = None
        while first_new is None:
            assert time.monotonic() - promoted < 30, writer.stats
            first_new = writer.stats.first_commit_after(promoted)
            await asyncio.sleep(0.01)
        while not await new.fetchval(
                "SELECT EXISTS (SELECT 1 FROM predictions WHERE reading_id >= $1)",
                first_new[1]):
            assert time.monotonic() - promoted < 60, worker.logs()[-4000:]
            await asyncio.sleep(0.02)
        first_prediction_s = time.monotonic() - promoted
        back_wall = time.time()
        mark = writer.stats.max_id
        while await unscored(new, up_to=mark) > 0:
            assert time.monotonic() - promoted < 90, (await unscored(new), worker.logs()[-4000:])
            await asyncio.sleep(0.05)
        drained_s = time.monotonic() - promoted

        # Notifications arrive again: the listener is back (on the new primary).
        listening = [e for t, e in _log_times(worker)
                     if e.get("event") == "listening" and t >= crashed_wall]
        assert listening, worker.logs()[-4000:]
        # Log lines during the outage: about one per second per process at most.
        outage_lines = [e for t, e in _log_times(worker) if crashed_wall <= t <= back_wall]
        outage_s = back_wall - crashed_wall
        assert len(outage_lines) <= 2 * outage_s + 5, (len(outage_lines), outage_s,
                                                      worker.logs()[-4000:])

        # The old primary comes back as a standby of the new one, first in the host list.
        assert primary.datadir is not None
        old_port = primary.port
        await asyncio.to_thread(stop_cluster, primary, False)
        primary = await asyncio.to_thread(basebackup, standby, old_port, primary.datadir)
        assert await _in_recovery(primary)
        # Cut every session of the worker on the new primary: it reconnects through the list,
        # old primary first.
        await new.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                          " WHERE application_name LIKE 'sensor-predictor%'")
        cut = time.monotonic()
        await asyncio.sleep(3.0)
        mark2 = writer.stats.max_id
        while await unscored(new, up_to=mark2) > 0:
            assert time.monotonic() - cut < 60, worker.logs()[-4000:]
            await asyncio.sleep(0.05)
        stats = await writer.stop()
        await asyncio.sleep(1.0)
        while await unscored(new) > 0 or await new.fetchval("SELECT count(*) FROM scoring_claims"):
            assert time.monotonic() - cut < 90, worker.logs()[-4000:]
            await asyncio.sleep(0.1)
        old = await _connect(primary)
        try:
            ours_on_old = await old.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name LIKE 'sensor-predictor%'")
        finally:
            await old.close()
        assert ours_on_old == 0
        assert "read-only transaction" not in worker.logs()
        outcome = await check_invariant(new, served(served_models.v1))
        reconnects = worker.metric("sensor_db_reconnects_total", 'connection="listener"')
        await new.close()
    finally:
        if worker is not None:
            worker.stop()
        for s in (primary, standby):
            if s is not None:
                stop_cluster(s)
    print(f"FAILOVER promotion->first prediction {first_prediction_s:.2f} s, "
          f"promotion->backlog drained {drained_s:.2f} s, outage log lines "
          f"{len(outage_lines)} over {outage_s:.1f} s, writer committed {stats.committed} "
          f"({stats.ambiguous} rows cut by the crash), readings {outcome.tally.readings}, "
          f"listener reconnects {reconnects}")
    assert first_prediction_s <= PROMOTION_TO_FIRST_PREDICTION, first_prediction_s


def _free_port() -> int:
    from sensor_predictor.devtools.postgres import free_port

    return free_port()
