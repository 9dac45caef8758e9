"""Readings in the real shape, written the ways writers write: binary COPY of a waiting backlog,
and a paced producer of plain multi-row INSERT ... VALUES statements (the old system's writers'
SQL) or text COPY, over one or several connections."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
import numpy as np

from sensor_predictor.simulator import FEATURE_NAMES, generate_feature_matrix

# The simulator's own JSON shape: {"Sensor 1": 0.123456, ..., "Sensor 20": -0.4} (json.dumps
# of a dict in feature order, rounded to 6 decimals).
_TEMPLATE = "{" + ", ".join(f'"{name}": %r' for name in FEATURE_NAMES) + "}"


def reading_values(n: int, seed: int = 0) -> list[str]:
    """n distinct `values` documents from the simulator's stream."""
    matrix = np.round(generate_feature_matrix(n, machines=10, seed=seed), 6)
    return [_TEMPLATE % tuple(row) for row in matrix.tolist()]


async def machine_ids(conn: asyncpg.Connection, n: int = 10) -> list[int]:
    rows = await conn.fetch(
        "INSERT INTO machines (machine_id) SELECT 'bench-' || g FROM generate_series(1, $1) g"
        " ON CONFLICT (machine_id) DO UPDATE SET last_seen = now() RETURNING id", n)
    return [int(r["id"]) for r in rows]


@dataclass
class CopyResult:
    rows: int
    seconds: float
    batch: int

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


async def copy_readings(conn: asyncpg.Connection, n: int, pool: list[str], machines: list[int],
                        batch: int = 10_000) -> CopyResult:
    """n readings by binary COPY (copy_records_to_table), one transaction per `batch` rows.

    Records are built before the clock starts: what is timed is the database's ingest.
    """
    stamp = datetime.now(UTC)
    records = [(stamp, v, machines[i % len(machines)]) for i, v in enumerate(pool)]
    chunks = []
    for start in range(0, n, batch):
        lo = start % len(records)
        size = min(batch, n - start)
        chunk = records[lo:lo + size]
        if len(chunk) < size:
            chunk += records[: size - len(chunk)]
        chunks.append(chunk)
    t0 = time.perf_counter()
    for chunk in chunks:
        await conn.copy_records_to_table("readings", records=chunk,
                                         columns=("timestamp", "values", "machine_id"))
    return CopyResult(n, time.perf_counter() - t0, batch)


def insert_statements(pool: list[str], machines: list[int], rows: int = 100,
                      count: int = 200) -> list[str]:
    """`count` distinct plain multi-row INSERTs of `rows` readings each, literal JSON, as the
    old system's writers send them."""
    out = []
    for s in range(count):
        values = []
        for j in range(rows):
            k = (s * rows + j) % len(pool)
            doc = pool[k].replace("'", "''")
            values.append(f"(now(), '{doc}', {machines[k % len(machines)]})")
        out.append('INSERT INTO readings ("timestamp", "values", machine_id) VALUES '
                   + ", ".join(values))
    return out


def copy_payloads(pool: list[str], machines: list[int], rows: int = 500,
                  count: int = 80) -> list[bytes]:
    """`count` distinct text-format COPY payloads of `rows` readings each ("values" and
    machine_id; "timestamp" takes its default, now(), like the INSERTs' now())."""
    out = []
    for s in range(count):
        lines = []
        for j in range(rows):
            k = (s * rows + j) % len(pool)
            # text format: backslash is the only escape a JSON document of ours could need
            doc = pool[k].replace("\\", "\\\\")
            lines.append(f"{doc}\t{machines[k % len(machines)]}\n")
        out.append("".join(lines).encode())
    return out


@dataclass(frozen=True)
class Shape:
    """How a producer writes: `kind` "insert" (plain multi-row INSERT ... VALUES, literal JSON,
    the old system's writers' shape) or "copy" (COPY FROM STDIN, text format), `rows` readings
    per statement, over `connections` sessions. Written "insert:100x1", "copy:500x4"."""

    kind: str
    rows: int
    connections: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        kind, _, rest = text.partition(":")
        rows, _, conns = rest.partition("x")
        if kind not in ("insert", "copy") or not rows.isdigit() or not conns.isdigit():
            raise ValueError(f"producer shape {text!r}: want insert:ROWSxCONNS or copy:ROWSxCONNS")
        return cls(kind, int(rows), int(conns))

    def __str__(self) -> str:
        return f"{self.kind}:{self.rows}x{self.connections}"


@dataclass
class Producer:
    """A shape with its statements built in advance: what is timed is the database's ingest and
    the bench's sending, not the building of SQL text."""

    shape: Shape
    items: list[str] | list[bytes]

    @classmethod
    def build(cls, shape: Shape, pool: list[str], machines: list[int],
              rows_built: int = 40_000) -> Producer:
        count = max(8, rows_built // shape.rows)
        if shape.kind == "insert":
            return cls(shape, insert_statements(pool, machines, shape.rows, count))
        return cls(shape, copy_payloads(pool, machines, shape.rows, count))

    async def send(self, conn: asyncpg.Connection, i: int) -> None:
        item = self.items[i % len(self.items)]
        if isinstance(item, str):
            await conn.execute(item)
        else:
            # a memoryview: asyncpg would take bytes for a file name
            await conn.copy_to_table("readings", source=memoryview(item),
                                     columns=("values", "machine_id"), format="text")


@dataclass
class ProduceResult:
    target_rate: float
    seconds: float
    rows: int
    statements: int
    connections: int
    shape: str = ""
    # readings written per whole second since the start (for the plot)
    per_second: list[int] = field(default_factory=list)
    max_behind_s: float = 0.0  # how far the producer fell behind its schedule

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    @property
    def reached_target(self) -> bool:
        return self.rate >= 0.95 * self.target_rate


async def produce(dsn: dict[str, object], producer: Producer, rate: float, seconds: float,
                  connections: int | None = None,
                  stop: asyncio.Event | None = None) -> ProduceResult:
    """Paced producer: statement i is due at t0 + i * rows / rate, on whichever connection is
    free; behind schedule, statements go out back to back (the rate is then what the machine
    allows, and max_behind_s says so). `rate=math.inf` writes flat out (a ceiling).
    `connections` overrides the shape's."""
    n_conns = connections or producer.shape.connections
    rows = producer.shape.rows
    conns = [await asyncpg.connect(**dsn) for _ in range(n_conns)]  # type: ignore[arg-type]
    interval = rows / rate
    total = math.inf if math.isinf(rate) else math.floor(seconds * rate / rows)
    next_index = 0
    done_at: list[float] = []
    behind = 0.0
    t0 = time.monotonic() + 0.05

    async def lane(conn: asyncpg.Connection) -> None:
        nonlocal next_index, behind
        while next_index < total and not (stop is not None and stop.is_set()):
            if time.monotonic() - t0 >= seconds:
                break  # behind schedule at the end: the step lasts `seconds`, not longer
            i = next_index
            next_index += 1
            due = t0 + i * interval
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
            elif interval:
                behind = max(behind, now - due)
            await producer.send(conn, i)
            done_at.append(time.monotonic() - t0)

    try:
        await asyncio.gather(*(lane(c) for c in conns))
        # On schedule, the last statement went out one interval before the end: the run still
        # lasts `seconds`, or the rate would read high (by a whole statement at low rates).
        left = t0 + seconds - time.monotonic()
        if left > 0 and not math.isinf(rate) and not (stop is not None and stop.is_set()):
            await asyncio.sleep(left)
    finally:
        for c in conns:
            await c.close()
    elapsed = max(time.monotonic() - t0, 1e-9)
    per_second = [0] * (int(elapsed) + 1)
    for t in done_at:
        per_second[min(int(max(t, 0)), len(per_second) - 1)] += rows
    return ProduceResult(rate, elapsed, len(done_at) * rows, len(done_at), n_conns,
                         str(producer.shape), per_second, behind)
