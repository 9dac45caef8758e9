"""The database edge: named queries from sql/queries.sql and connections."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from functools import cache
from importlib import resources
from typing import Any

import asyncpg

from sensor_predictor.config import Settings

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


async def connect(settings: Settings, **kwargs: Any) -> asyncpg.Connection:
    return await asyncpg.connect(**settings.connect_kwargs(), **kwargs)


async def create_pool(settings: Settings, size: int,
                      init: Callable[[asyncpg.Connection], Awaitable[None]] | None = None
                      ) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        **settings.connect_kwargs(), min_size=1, max_size=size, init=init,
        # A server that went away must not hang a batch forever.
        command_timeout=30,
        # Short statements over ~100-1000 rows only. The planner estimates a (txid, id) row
        # comparison from txid alone (a whole COPY shares one txid) and so expects thousands of
        # rows: it then launches parallel workers (~10-30 ms to start, per batch) or JIT-compiles
        # the 20 feature casts (~30 ms). Neither pays off for a batch.
        server_settings={"application_name": "sensor-predictor", "jit": "off",
                         "max_parallel_workers_per_gather": "0",
                         # A worker that vanished without closing its socket (a host gone, a
                         # network path cut) is noticed by the server in ~25 s: its session
                         # ends, and with it the locks on its claims.
                         "tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5",
                         "tcp_keepalives_count": "3"},
    )
