"""What our wake-up mechanism costs the users' writers (issue 22, "Writers keep their speed").

    uv run python -m bench.writers [--rounds 3] [--seconds 4] [--variants a,b,...]

pgbench, 8 clients (and 1), each transaction one single-row INSERT into readings in the real
shape (values jsonb with 20 keys "Sensor 1".."Sensor 20", a machine_id), on a throwaway
durable cluster (fsync, synchronous_commit on: bench/cluster.py) migrated with our migrations.
Variants, alternated within each round, medians over the rounds:

    none              no readings_notify trigger at all (the reference)
    always            the trigger of migration 0001: every writer transaction notifies
    doorbell          the trigger of migration 0013, no worker (nobody arms: no one notifies)
    doorbell_armed    0013, a session holding the bell the whole time (a worker asleep
                      throughout: every writer notifies; the worst case)
    always_worker     0001's trigger, a worker scoring what the writers insert (busy)
    doorbell_worker   0013, a worker scoring what the writers insert (busy)
    poll_worker       no trigger, a POLL_ONLY worker polling every 0.05 s: the same scoring
                      work on the same 2 cores, no wake-up mechanism (the reference for the
                      two above)
    none_bursts       no trigger, no worker; the writers in bursts (pgbench -T 1) with 0.3 s
                      pauses
    poll_bursts       no trigger, a POLL_ONLY worker (0.05 s), the writers in bursts: the
                      reference for the two below (the same scoring work on the same cores)
    doorbell_bursts   0013, a worker, the writers in bursts: the worker drains, arms and sleeps
                      between them (tps within the bursts)
    always_bursts     the same with 0001's trigger

For each: tps, the ratio to its reference ("none", or "poll_worker" for the worker variants),
and how many notifications a LISTEN session heard per writer transaction. Writes
bench/results/writers.json (`--out` to change). Each worker variant runs in a fresh database
cloned from a migrated template with a model active, so no backlog carries over.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench.cluster import start_cluster, stop_cluster
from sensor_predictor.config import load_settings
from sensor_predictor.devtools.postgres import PgServer, pg_bin
from sensor_predictor.devtools.worker_process import WorkerProcess
from sensor_predictor.migrate import migrate

VARIANTS = ("none", "always", "doorbell", "doorbell_armed", "poll_worker", "always_worker",
            "doorbell_worker", "none_bursts", "poll_bursts", "always_bursts", "doorbell_bursts")
REFERENCE = {"always": "none", "doorbell": "none", "doorbell_armed": "none",
             "always_worker": "poll_worker", "doorbell_worker": "poll_worker",
             "always_bursts": "poll_bursts", "doorbell_bursts": "poll_bursts",
             "poll_bursts": "none_bursts"}
BELL = (21329, 2)  # migrations/0013_doorbell.sql
ALWAYS = ("CREATE TRIGGER readings_notify AFTER INSERT ON readings FOR EACH STATEMENT"
          " EXECUTE FUNCTION sp_notify_readings()")
DOORBELL = ("CREATE TRIGGER readings_notify AFTER INSERT ON readings FOR EACH STATEMENT"
            f" WHEN (NOT pg_try_advisory_xact_lock_shared({BELL[0]}, {BELL[1]}))"
            " EXECUTE FUNCTION sp_notify_readings()")
TRIGGERS = {"none": None, "always": ALWAYS, "doorbell": DOORBELL}
VALUES = json.dumps({f"Sensor {i}": round(10 + i * 1.37, 3) for i in range(1, 21)})
MACHINES = 10
BURST_SECONDS, PAUSE_SECONDS = 1, 0.3
TEMPLATE = "writers_template"


def trigger_of(variant: str) -> str | None:
    if variant.startswith("doorbell"):
        return DOORBELL
    if variant.startswith("always"):
        return ALWAYS
    return None


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class WriterBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.server: PgServer | None = None
        self.work = Path(tempfile.mkdtemp(prefix="sp-bench-writers-"))
        self.mlflow_uri = f"sqlite:///{self.work}/mlflow.db"
        self.script = self.work / "insert.sql"
        # One single-row INSERT per transaction (pgbench's autocommit), the old consumer's shape.
        self.script.write_text(
            f"\\set m random(1, {MACHINES})\n"
            f"INSERT INTO readings (\"values\", machine_id) VALUES ('{VALUES}'::jsonb, :m);\n")
        self.seq = 0

    async def setup(self) -> None:
        self.server = await asyncio.to_thread(start_cluster, {"max_connections": "100"})
        admin = await self.server.connect()
        await admin.execute(f'CREATE DATABASE "{TEMPLATE}"')
        self.version = await admin.fetchval("SHOW server_version")
        await admin.close()
        conn = await self.server.connect(TEMPLATE)
        await migrate(conn)
        await conn.executemany("INSERT INTO machines (machine_id) VALUES ($1)",
                               [(f"bench-writer-{i}",) for i in range(MACHINES)])
        await conn.close()
        if any(v.endswith(("_worker", "_bursts")) for v in self.args.variants):
            await self._train()
        say(f"PostgreSQL {self.version} on port {self.server.port}, fsync on; work {self.work}")

    async def _train(self) -> None:
        from sensor_predictor.training import train

        assert self.server is not None
        settings = load_settings({**self.server.env(TEMPLATE),
                                  "MLFLOW_TRACKING_URI": self.mlflow_uri})
        cwd = Path.cwd()
        os.chdir(self.work)  # an sqlite store puts its default artifact root under the cwd
        try:
            await train(settings, clusters=4, activate=True, seed=1, readings=5_000)
        finally:
            os.chdir(cwd)
        # Training wrote readings: a clone must start with none waiting.
        conn = await self.server.connect(TEMPLATE)
        await conn.execute("TRUNCATE readings CASCADE")
        await conn.close()

    async def fresh_db(self, variant: str) -> str:
        assert self.server is not None
        self.seq += 1
        name = f"w_{variant}_{self.seq}"
        admin = await self.server.connect()
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"')
        await admin.close()
        conn = await self.server.connect(name)
        await conn.execute("DROP TRIGGER IF EXISTS readings_notify ON readings")
        trigger = trigger_of(variant)
        if trigger is not None:
            await conn.execute(trigger)
        await conn.close()
        return name

    async def drop_db(self, name: str) -> None:
        assert self.server is not None
        admin = await self.server.connect()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()

    def pgbench(self, database: str, clients: int, seconds: float) -> tuple[float, int]:
        """(tps, transactions) of one pgbench run."""
        assert self.server is not None
        out = subprocess.run(
            [pg_bin("pgbench"), "-n", "-c", str(clients), "-j", str(min(clients, 4)),
             "-T", str(max(1, round(seconds))),
             "-f", str(self.script), "-h", self.server.host, "-p", str(self.server.port),
             "-U", self.server.user, database],
            capture_output=True, text=True, check=True)
        tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out.stdout)
        done = re.search(r"number of transactions actually processed: (\d+)", out.stdout)
        if tps is None or done is None:
            raise RuntimeError(f"pgbench said: {out.stdout}\n{out.stderr}")
        return float(tps[1]), int(done[1])

    async def bursts(self, database: str, clients: int, seconds: float) -> tuple[float, int]:
        """Writers in bursts (pgbench -T 1 each, paused between): median tps, transactions."""
        tps, done = [], 0
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            t, n = await asyncio.to_thread(self.pgbench, database, clients, BURST_SECONDS)
            tps.append(t)
            done += n
            await asyncio.sleep(PAUSE_SECONDS)
        return statistics.median(tps), done

    def worker(self, database: str, **env: str) -> WorkerProcess:
        assert self.server is not None
        base = {**self.server.env(database), "MLFLOW_TRACKING_URI": self.mlflow_uri,
                "INFERENCE_INTERVAL_SECONDS": "30", "LOG_LEVEL": "info"}
        return WorkerProcess({**base, **env}, self.work / f"worker-{database}.log",
                             cwd=self.work)

    async def measure(self, variant: str, clients: int) -> dict[str, Any]:
        assert self.server is not None
        name = await self.fresh_db(variant)
        worker: WorkerProcess | None = None
        holder: asyncpg.Connection | None = None
        heard: list[float] = []
        listener = await self.server.connect(name)
        await listener.add_listener("sensor_readings", lambda *_: heard.append(time.time()))
        try:
            if variant == "doorbell_armed":
                holder = await self.server.connect(name)
                await holder.execute("SELECT pg_advisory_lock($1, $2)", *BELL)
            if variant in ("poll_worker", "poll_bursts"):
                worker = self.worker(name, POLL_ONLY="true", INFERENCE_INTERVAL_SECONDS="0.05")
            elif variant.endswith("_worker") or variant in ("always_bursts", "doorbell_bursts"):
                worker = self.worker(name)
            if worker is not None:
                worker.start()
                await worker.until_ready(within=60)
                await asyncio.sleep(0.5)  # its start-up pass done: it sleeps (armed)
            load0 = load_average()
            if variant.endswith("_bursts"):
                tps, done = await self.bursts(name, clients, self.args.seconds)
            else:
                tps, done = await asyncio.to_thread(self.pgbench, name, clients,
                                                    self.args.seconds)
            await asyncio.sleep(0.2)  # the last notifications arrive
            result: dict[str, Any] = {"tps": round(tps, 1), "transactions": done,
                                      "notifications": len(heard),
                                      "notify_share": round(len(heard) / max(done, 1), 4),
                                      "load": load0}
            if worker is not None:
                conn = await self.server.connect(name)
                try:
                    left = None
                    for _ in range(200):
                        left = await conn.fetchval(
                            "SELECT count(*) FROM readings r WHERE NOT EXISTS (SELECT 1 FROM"
                            " predictions p WHERE p.reading_id = r.id)")
                        if left == 0:
                            break
                        await asyncio.sleep(0.1)
                    result["unscored_after_10s"] = left
                finally:
                    await conn.close()
            return result
        finally:
            if worker is not None:
                await worker.astop()
            if holder is not None:
                await holder.close()
            await listener.close()
            await self.drop_db(name)

    async def run(self) -> dict[str, Any]:
        await self.setup()
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
        try:
            for r in range(self.args.rounds):
                order = list(self.args.variants)
                if r % 2:
                    order.reverse()  # alternated: no variant always runs first or last
                for clients in self.args.clients:
                    for variant in order:
                        m = await self.measure(variant, clients)
                        runs.setdefault(f"c{clients}", {}).setdefault(variant, []).append(m)
                        say(f"round {r + 1} clients {clients} {variant}: {m}")
        finally:
            assert self.server is not None
            await asyncio.to_thread(stop_cluster, self.server)
        return summarize(runs, self.args, self.version)


def summarize(runs: dict[str, dict[str, list[dict[str, Any]]]], args: argparse.Namespace,
              version: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "postgres": version, "rounds": args.rounds, "seconds": args.seconds,
        "cpus": os.cpu_count(), "load_at_end": load_average(), "clients": {}}
    for key, variants in runs.items():
        medians = {v: statistics.median(m["tps"] for m in ms) for v, ms in variants.items()}
        table: dict[str, Any] = {}
        for v, ms in variants.items():
            ref = REFERENCE.get(v)
            row: dict[str, Any] = {
                "tps_median": round(medians[v], 1), "tps": [m["tps"] for m in ms],
                "notify_share_median": statistics.median(m["notify_share"] for m in ms),
                "load": [m["load"] for m in ms]}
            if ref is not None and ref in medians:
                row["reference"] = ref
                row["ratio"] = round(medians[v] / medians[ref], 3)
            unscored = [m["unscored_after_10s"] for m in ms if "unscored_after_10s" in m]
            if unscored:
                row["unscored_after_drain"] = unscored
            table[v] = row
        out["clients"][key] = table
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--clients", default="8,1")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "writers.json"))
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    args.clients = [int(c) for c in args.clients.split(",")]
    result = asyncio.run(WriterBench(args).run())
    text = json.dumps(result, indent=2)
    print(text)
    if args.out != "-":
        with contextlib.suppress(FileExistsError):
            Path(args.out).parent.mkdir(parents=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
