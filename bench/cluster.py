"""A throwaway PostgreSQL cluster for the bench: durable, unlike a test cluster.

Tests may turn fsync off (fine for tests, flattering for a benchmark). Here fsync,
synchronous_commit and full_page_writes stay on, as in production, and track_commit_timestamp
is on so that per-reading latency can be read from the database exactly:
pg_xact_commit_timestamp(xmin) of a reading and of its prediction. The cluster itself comes from
the package's public devtools (sensor_predictor.devtools.postgres), never from tests.
"""

from __future__ import annotations

from sensor_predictor.devtools import postgres
from sensor_predictor.devtools.postgres import PgServer

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


def start_cluster(extra: dict[str, str] | None = None) -> PgServer:
    """initdb + pg_ctl start on a free port, trust auth, durable settings (plus `extra`)."""
    return postgres.start_cluster({**SERVER_SETTINGS, **(extra or {})}, prefix="sp-bench-pg-")


def stop_cluster(server: PgServer) -> None:
    postgres.stop_cluster(server)
