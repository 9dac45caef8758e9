"""TLS: a TLS-only PostgreSQL (hostssl only, client certificates required) with its own CA.
verify-full works for every connection the project opens (migrate, simulate, the worker's pool
and listener), every session of ours is encrypted, a server certificate rotated under a running
worker loses nothing, and each misconfiguration fails fast, named."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio

from sensor_predictor import db
from sensor_predictor.config import load_settings
from sensor_predictor.training import activate_model
from tests.support.chaos import check_invariant, served, wait_settled
from tests.support.chaos_fixtures import Workers
from tests.support.models import Models
from tests.support.readings import insert_readings, reading
from tests.support.tls import TlsServer, start_tls_server
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.asyncio]


@pytest.fixture(scope="module")
def tls() -> Iterator[TlsServer]:
    server = start_tls_server()
    yield server
    server.stop()


@pytest_asyncio.fixture
async def tls_db(tls: TlsServer) -> AsyncIterator[str]:
    """An empty database on the TLS server (migrated by the test, over TLS)."""
    name = f"sp_tls_{uuid.uuid4().hex[:10]}"
    admin = await db.connect(load_settings(tls.env("postgres")))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield name
    admin = await db.connect(load_settings(tls.env("postgres")))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`sensor-predictor ARGS` with only `env`'s database settings (none inherited)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "PG"))}
    return subprocess.run([sys.executable, "-m", "sensor_predictor.cli", *args],
                          env={**base, **env}, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(600)
async def test_verify_full_everywhere_and_a_rotated_certificate_loses_nothing(
        tls: TlsServer, tls_db: str, chaos_models: Models, workers: Workers,
        report: Any) -> None:
    env = tls.env(tls_db)
    for args in (["migrate"], ["simulate", "--count", "300", "--machines", "3", "--rate",
                               "3000", "--seed", "1"]):
        done = await asyncio.to_thread(cli, env, *args)
        assert done.returncode == 0, (args, done.stderr[-2000:])
    conn = await db.connect(load_settings(env), application_name="sp-test")
    try:
        await activate_model(conn, *chaos_models.v1)
        worker = workers.start(**env, PGSSLMODE="disable")  # POSTGRES_* win over PG*
        await worker.until_ready(within=120)
        assert await wait_settled(conn, timeout=60)
        # Every session of ours (the pool, the listener) is encrypted, seen by the server.
        rows = await conn.fetch(
            "SELECT a.pid, a.application_name, s.ssl, s.version FROM pg_stat_activity a "
            "JOIN pg_stat_ssl s USING (pid) WHERE a.datname = $1", tls_db)
        ours = [r for r in rows if r["application_name"].startswith("sensor-predictor")]
        names = {r["application_name"] for r in ours}
        assert {"sensor-predictor", "sensor-predictor-listener"} <= names, rows
        assert all(r["ssl"] for r in rows), rows
        start = next(e for e in worker.events() if e.get("event") == "database_connection")
        assert (start["sslmode"], start["server_certificate_verified"],
                start["hostname_verified"]) == ("verify-full", True, True), start
        assert "client-key-passphrase" not in worker.logs()

        # Rotation: a new server certificate, a reload, every session cut; the stream goes on.
        old_pids = {r["pid"] for r in ours}
        tls.rotate_server_certificate()
        cut_at = time.monotonic()
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE datname = $1 AND application_name LIKE 'sensor-predictor%'",
                           tls_db)
        await insert_readings(conn, [reading(i) for i in range(200)])
        assert await wait_settled(conn, timeout=60), worker.tail()
        recovered = time.monotonic() - cut_at
        outcome = await check_invariant(conn, served(chaos_models.v1), expected_readings=500)
        rows = await conn.fetch(
            "SELECT a.pid, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
            "WHERE a.datname = $1 AND a.application_name LIKE 'sensor-predictor%'", tls_db)
        assert rows and all(r["ssl"] for r in rows) and not old_pids & {r["pid"] for r in rows}
    finally:
        await conn.close()
    report(scenario="TLS verify-full, certificate rotated", runs=1, readings=500, lost=0,
           duplicated=outcome.duplicated, recovery=f"{recovered:.1f} s",
           detail=f"{len(ours)} sessions of ours, all TLS ({ours[0]['version']})")


@pytest.mark.timeout(300)
async def test_each_tls_misconfiguration_fails_fast_named(
        tls: TlsServer, tls_db: str, workers: Workers) -> None:
    """migrate exits 2 within 10 s with one line naming the cause; `run` does not call it an
    outage: it names it, keeps retrying with backoff, and /ready says it."""
    missing = "/nonexistent/sp-ca.crt"
    cases = {
        "hostname mismatch": ({"POSTGRES_HOST": "127.0.0.1"}, "does not match the host name"),
        "root certificate missing": ({"POSTGRES_SSLROOTCERT": missing}, missing),
        "another CA": ({"POSTGRES_SSLROOTCERT": str(tls.other_ca)},
                       "does not verify against the root certificate"),
        "TLS required": ({"POSTGRES_SSLMODE": "disable"}, "requires TLS"),
        "no client certificate": ({"POSTGRES_SSLCERT": "", "POSTGRES_SSLKEY": ""},
                                  "client certificate"),
    }

    def one(extra: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
        env = {k: v for k, v in {**tls.env(tls_db), **extra}.items() if v}
        started = time.monotonic()
        return cli(env, "migrate"), time.monotonic() - started

    results = await asyncio.gather(*(asyncio.to_thread(one, extra)
                                     for extra, _ in cases.values()))
    for (name, (_, words)), (done, seconds) in zip(cases.items(), results, strict=True):
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, (name, done.stderr[-1500:])
        assert words in lines[-1] and "change POSTGRES_" in lines[-1], (name, lines[-1])
        assert seconds < 10, (name, seconds)

    worker = workers.start(**tls.env(tls_db, POSTGRES_SSLROOTCERT=str(tls.other_ca)))
    state = await wait_for(lambda: _missing_database(worker), timeout=30, interval=0.2)
    assert state and "does not verify against the root certificate" in state, worker.tail()
    assert "POSTGRES_SSLROOTCERT" in state
    events = [e for e in worker.events() if e.get("event") in ("database_misconfigured",
                                                                "database_unavailable")]
    assert events and all(e["event"] == "database_misconfigured" for e in events), events
    assert worker.proc is not None and worker.proc.poll() is None  # still trying


async def _missing_database(worker: Any) -> str | None:
    state = await asyncio.to_thread(worker.ready)
    said = None if not state else state.get("missing", {}).get("database")
    # Until its first attempt fails, /ready says only that it is not connected yet.
    return None if said == "not connected yet" else said
