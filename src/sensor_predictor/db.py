"""The database edge: named queries from sql/queries.sql and connections."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg

from sensor_predictor import connect_errors
from sensor_predictor.config import Settings
from sensor_predictor.connect_errors import Cause, ConnectFailed

_NAME = re.compile(r"^-- name: ([a-z_]+)\s*$", re.MULTILINE)

# Errors that mean "the database is not reachable right now": back off and try again.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError, asyncpg.AdminShutdownError,
    # asyncpg's answer to a query started on a connection whose server has just said FATAL
    # (backend terminated, server shutting down) while its socket is not closed yet:
    # "cannot switch to state 11; another operation (2) is in progress".
    asyncpg.InternalClientError,
)

@cache
def queries() -> dict[str, str]:
    """Every named query of sql/queries.sql, by name."""
    text = (resources.files("sensor_predictor") / "sql" / "queries.sql").read_text("utf-8")
    parts = _NAME.split(text)
    named: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [ln for ln in body.strip().splitlines() if not ln.lstrip().startswith("--")]
        named[name] = "\n".join(lines).strip().rstrip(";")
    return named


def sql_literal(text: str) -> str:
    """A PostgreSQL string literal (standard_conforming_strings is on since PostgreSQL 9.1).
    For the simulator's own values only: never for names that come from a model."""
    if "\x00" in text:
        raise ValueError("a feature name cannot contain a NUL character")
    return "'" + text.replace("'", "''") + "'"


# Feature names picked out of the $2 array once per statement (as columns of a one-row
# subquery); beyond this many, per row (a row has at most 1,664 columns).
KEYS_AS_COLUMNS = 1600


def read_range_query(feature_names: Sequence[str], *, keys_once: bool = True) -> str:
    """The batch read for one model: its features, in its order, extracted by PostgreSQL.

    The statement takes the reading ids as $1 and the feature names as $2 (a text[]): the text
    depends only on how many features there are, never on their names, so no name can change
    what it means (whatever standard_conforming_strings says). keys_once: the names are picked
    out of the array once per statement (cheaper per row, ~35 us more to plan); else per row
    (cheaper for the few rows of a caught-up claim, whose read is planned every time)."""
    q = queries()
    n = len(feature_names)
    columns = min(n, KEYS_AS_COLUMNS) if keys_once else 0
    keys = ", ".join(q["feature_key"].replace("{i}", str(i)) for i in range(1, columns + 1))
    features = ", ".join(
        q["feature_expression"].replace(
            "{key}", f"k.k{i}" if i <= columns else f"($2::text[])[{i}]")
        for i in range(1, n + 1))
    return q["read_range"].replace("{features}", features).replace("{keys}", keys or "1 AS k0")


def _tls_file_problem(settings: Settings) -> Cause | None:
    """A TLS file named in the settings that is not there: said before any network round trip,
    with its path (asyncpg would report a bare FileNotFoundError, an outage to retry)."""
    if settings.sslmode in ("disable", "allow", "prefer"):
        return None
    for variable, path in (("POSTGRES_SSLROOTCERT", settings.sslrootcert),
                           ("POSTGRES_SSLCERT", settings.sslcert),
                           ("POSTGRES_SSLKEY", settings.sslkey)):
        if path and not os.access(path, os.R_OK):
            what = "root certificate" if variable == "POSTGRES_SSLROOTCERT" else "file"
            return connect_errors.config(
                "tls_root_cert_missing" if variable == "POSTGRES_SSLROOTCERT"
                else "tls_client_file_missing",
                f"the {what} {path} does not exist or cannot be read", variable)
    if settings.verifies_server and not settings.sslrootcert:
        default = Path("~/.postgresql/root.crt").expanduser()
        if not os.access(default, os.R_OK):
            return connect_errors.config(
                "tls_root_cert_missing",
                f"POSTGRES_SSLMODE={settings.sslmode} verifies the server's certificate, and no "
                f"root certificate is given (the default {default} does not exist)",
                "POSTGRES_SSLROOTCERT")
    return None


def describe_tls(settings: Settings) -> dict[str, Any]:
    """What the start-up log says about TLS (never the key's password)."""
    return {
        "sslmode": settings.sslmode,
        "server_certificate_verified": settings.verifies_server,
        "hostname_verified": settings.sslmode == "verify-full",
        "sslrootcert": settings.sslrootcert,
        "client_certificate": settings.sslcert is not None,
    }


def is_encrypted(conn: asyncpg.Connection) -> bool:
    """Whether this connection's socket is TLS (as seen from our side)."""
    transport = getattr(conn, "_transport", None)
    return transport is not None and transport.get_extra_info("ssl_object") is not None


async def connect(settings: Settings, *, listen: bool = False, timeout: float | None = None,  # noqa: ASYNC109
                  application_name: str = "sensor-predictor", **kwargs: Any
                  ) -> asyncpg.Connection:
    """A connection to the first host of POSTGRES_HOST that answers and passes
    POSTGRES_TARGET_SESSION_ATTRS (the LISTEN hosts when `listen`), each host bounded by
    POSTGRES_CONNECT_TIMEOUT (or `timeout`, if shorter).

    No startup parameter but application_name: a pooler refuses the others. Raises
    ConnectFailed, whose `cause` says whether it is an outage or a setting to change.
    """
    problem = _tls_file_problem(settings)
    if problem is not None:
        raise ConnectFailed(problem)
    per_host = settings.connect_timeout if timeout is None else min(timeout,
                                                                    settings.connect_timeout)
    base = settings.connect_kwargs()
    del base["host"], base["port"]
    server_settings = {"application_name": application_name,
                       **kwargs.pop("server_settings", {})}
    endpoints = settings.listen_endpoints if listen else settings.endpoints
    causes: list[Cause] = []
    tried: list[str] = []
    for host, port in endpoints:
        where = f"{host}:{port}"
        tried.append(where)
        try:
            conn = await asyncpg.connect(host=host, port=port, timeout=per_host,
                                         server_settings=server_settings, **base, **kwargs)
            _keepalive(conn)
            return conn
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as exc:
            causes.append(connect_errors.classify(exc, where))
    raise ConnectFailed(connect_errors.pick(causes), tried)


# Client-side TCP keepalives: a server (or pooler) that vanished without closing the socket is
# noticed in ~25 s even on an idle connection. (The server's own tcp_keepalives_* settings, for
# the server to notice a vanished worker, are its configuration: see docs/production-postgres.md.)
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 10, 5, 3


def _keepalive(conn: asyncpg.Connection) -> None:
    transport = getattr(conn, "_transport", None)
    sock = None if transport is None else transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


async def create_pool(settings: Settings, size: int,
                      init: Callable[[asyncpg.Connection], Awaitable[None]] | None = None
                      ) -> asyncpg.Pool:
    """The worker's pool. Through a transaction-mode pooler (POSTGRES_POOL_MODE=transaction)
    nothing may live in the session: no prepared statements (statement_cache_size=0) and no
    reset on release (asyncpg's would run UNLISTEN, RESET ALL and pg_advisory_unlock_all on
    whichever server session the pooler hands it, another client's)."""
    transaction = settings.pool_mode == "transaction"

    async def open_connection(*_args: Any, **kwargs: Any) -> asyncpg.Connection:
        kwargs.pop("loop", None)
        return await connect(settings, **kwargs)

    return await asyncpg.create_pool(
        min_size=1, max_size=size, init=init, connect=open_connection,
        reset=_no_reset if transaction else None,
        statement_cache_size=0 if transaction else 100,
        # A server that went away must not hang a batch forever.
        command_timeout=30,
    )


async def _no_reset(_conn: asyncpg.Connection) -> None:
    """Transaction mode: the server session is not ours to reset."""
