"""The floor our latency is quoted against: a minimal durable NOTIFY-driven consumer.

Per wake-up, one transaction on one connection: lock a cursor row, read the new readings'
features as float8[] (extracted by PostgreSQL, as the worker's read does), predict with numpy
(standardise, nearest of 4 centres: the cost of our kernel), COPY the predictions into the same
`predictions` table the worker writes, move the cursor, commit (fsync and synchronous commit
on). A dedicated LISTEN connection wakes it. Not exactly-once under concurrent writers (ids are
taken in id order, not by snapshot) and without claims, leases, takeovers, error rows, drift or
metrics: it is what one durable transaction per wake-up costs on this machine, nothing more.

Fair to both sides: it runs in its own database, cloned from the same migrated template as the
worker's (same tables, indexes, foreign keys and writer-side triggers), fed by the same paced
producer, as its own process (like the worker). The product's NOTIFY trigger is disabled there,
and the floor's own statement trigger notifies once per writer statement on its own channel:
the writer pays for exactly one notification, whatever our trigger does (see prepare()).

    python -m bench.floor '{"host": ..., "port": ..., "user": ..., "database": ...}'

prints "ready" once it listens, and runs until SIGTERM.
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import sys
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np

ROOT = Path(__file__).resolve().parents[1]  # the floor runs as `-m bench.floor` from here
CHANNEL = "bench_floor"
MODEL_VERSION = "floor"
FEATURES = [f"Sensor {i}" for i in range(1, 21)]

PREPARE_SQL = f"""
CREATE TABLE IF NOT EXISTS bench_floor_cursor (last_id bigint NOT NULL);
INSERT INTO bench_floor_cursor SELECT COALESCE(max(id), 0) FROM readings
 WHERE NOT EXISTS (SELECT 1 FROM bench_floor_cursor);
CREATE OR REPLACE FUNCTION bench_floor_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', '');
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS bench_floor_notify ON readings;
CREATE TRIGGER bench_floor_notify AFTER INSERT ON readings
    FOR EACH STATEMENT EXECUTE FUNCTION bench_floor_notify();
"""

# The product's own wake-up triggers on readings (whatever their names: found by what they call),
# disabled in the floor's database so that the writers notify once per statement, for the floor.
PRODUCT_NOTIFY_TRIGGERS = """
SELECT t.tgname FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
 WHERE t.tgrelid = 'readings'::regclass AND NOT t.tgisinternal
   AND t.tgname <> 'bench_floor_notify' AND p.prosrc ~* '(pg_notify|\\mnotify\\M)'
"""

READ_SQL = """
SELECT r.id, ARRAY(SELECT (r."values" ->> k)::float8 FROM unnest($2::text[]) k) AS features
  FROM readings r WHERE r.id > $1 ORDER BY r.id
"""


async def prepare(conn: asyncpg.Connection) -> list[str]:
    """The floor's cursor and trigger in this database; the product's notify triggers off.
    Returns the names of the triggers disabled."""
    await conn.execute(PREPARE_SQL)
    names = [r["tgname"] for r in await conn.fetch(PRODUCT_NOTIFY_TRIGGERS)]
    for name in names:
        await conn.execute(f'ALTER TABLE readings DISABLE TRIGGER "{name}"')
    return names


class Kernel:
    """StandardScaler + KMeans as numpy, the shape of the worker's (20 features, 4 centres)."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.mean = rng.normal(size=len(FEATURES))
        self.scale = rng.uniform(0.5, 2.0, size=len(FEATURES))
        self.centres = rng.normal(size=(4, len(FEATURES)))

    def predict(self, x: np.ndarray) -> np.ndarray:
        z = (x - self.mean) / self.scale
        d = ((z[:, None, :] - self.centres[None, :, :]) ** 2).sum(axis=2)
        return np.asarray(d.argmin(axis=1), dtype=np.int64)


async def consume_once(conn: asyncpg.Connection, kernel: Kernel) -> int:
    """One wake-up: one durable transaction. Returns the readings scored."""
    async with conn.transaction():
        last = await conn.fetchval("SELECT last_id FROM bench_floor_cursor FOR UPDATE")
        rows = await conn.fetch(READ_SQL, last, FEATURES)
        if not rows:
            return 0
        ids = [r["id"] for r in rows]
        labels = kernel.predict(np.asarray([r["features"] for r in rows], dtype=np.float64))
        buf = io.BytesIO("".join(f"{i}\t{c}\t{MODEL_VERSION}\n"
                                 for i, c in zip(ids, labels.tolist(), strict=True)).encode())
        await conn.copy_to_table("predictions", source=buf,
                                 columns=("reading_id", "cluster_id", "model_version"))
        await conn.execute("UPDATE bench_floor_cursor SET last_id = $1", ids[-1])
        return len(ids)


async def serve(dsn: dict[str, Any]) -> None:
    listen = await asyncpg.connect(**dsn)
    work = await asyncpg.connect(**dsn)
    kernel = Kernel()
    wake = asyncio.Event()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await listen.add_listener(CHANNEL, lambda *_: wake.set())
    print("ready", flush=True)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            waiting = asyncio.ensure_future(wake.wait())
            await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            if stop.is_set():
                break
            wake.clear()
            await consume_once(work, kernel)
    finally:
        stopping.cancel()
        await listen.close()
        await work.close()


class FloorProcess:
    """The floor consumer as a subprocess of the bench (as the worker is)."""

    def __init__(self, dsn: dict[str, Any]) -> None:
        self.dsn = dsn
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    async def start(self) -> FloorProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.floor", json.dumps(self.dsn),
            stdout=asyncio.subprocess.PIPE, cwd=ROOT)
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        if line.strip() != b"ready":
            raise RuntimeError(f"the floor consumer did not start: {line!r}")
        return self

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


def main() -> None:
    asyncio.run(serve(json.loads(sys.argv[1])))


if __name__ == "__main__":
    main()
