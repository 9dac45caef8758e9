"""A throwaway PostgreSQL cluster for the bench: like tests/support's, but durable.

tests/support.start_throwaway_cluster turns fsync off (fine for tests, flattering for a
benchmark). Here fsync, synchronous_commit and full_page_writes stay on, as in production, and
track_commit_timestamp is on so that per-reading latency can be read from the database exactly:
pg_xact_commit_timestamp(xmin) of a reading and of its prediction.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support import PgServer, _pg_bin, free_port

SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "max_connections": "100",
    # Durable, like production (these are PostgreSQL's defaults; said out loud on purpose).
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    # For exact per-reading latency: commit time of every transaction (a few bytes per commit).
    "track_commit_timestamp": "on",
}


def _run_as() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def start_cluster(extra: dict[str, str] | None = None) -> PgServer:
    """initdb + pg_ctl start on a free port, trust auth, durable settings (plus `extra`)."""
    datadir = Path(tempfile.mkdtemp(prefix="sp-bench-pg-"))
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(datadir, "postgres", "postgres")
    # --no-sync only skips syncing initdb's own files; the server below runs with fsync on.
    subprocess.run([*_run_as(), _pg_bin("initdb"), "-D", str(datadir), "-U", "postgres",
                    "--auth=trust", "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
    port = free_port()
    opts = f"-p {port} -k {datadir} " + " ".join(
        f"-c {k}={v}" for k, v in {**SERVER_SETTINGS, **(extra or {})}.items())
    subprocess.run([*_run_as(), _pg_bin("pg_ctl"), "-D", str(datadir), "-w", "-t", "60",
                    "-l", str(datadir / "server.log"), "-o", opts, "start"],
                   check=True, capture_output=True)
    return PgServer("127.0.0.1", port, "postgres", datadir=datadir)


def stop_cluster(server: PgServer) -> None:
    assert server.datadir is not None
    subprocess.run([*_run_as(), _pg_bin("pg_ctl"), "-D", str(server.datadir), "-w", "-t", "60",
                    "-m", "fast", "stop"], check=False, capture_output=True)
    shutil.rmtree(server.datadir, ignore_errors=True)
