"""Memory at rest (issue 22): a real worker's RSS from start to steady state, and what a swap to
a model it has not cached costs.

    uv run python -m bench.memory                      # this checkout's worker
    uv run python -m bench.memory --before f922fe7     # ... and the worker of that commit,
                                                       #     alternated in the same run

Per variant, on a throwaway durable cluster and a real MLflow store (sqlite, two models trained
by the product's trainer, as bench/run.py does), each on a fresh database with model A active:

1. **cold**: a worker with an empty model cache (A is fetched from MLflow): RSS when ready;
   stopped.
2. **restart**: a worker whose cache holds A (a restart, the usual case): RSS when ready; RSS
   after `--settle` seconds (past the old worker's 30 s warm-up import of MLflow and
   scikit-learn: the steady state); while it drains `--readings` readings COPYed at once, the
   RSS each 0.1 s and VmHWM (the peak since its start); then model B (never cached) is
   activated under a trickle of readings: commit of the clusters row -> commit of the first
   prediction of B, and the worker's own load_ms; last, RSS `--settle-after-swap` s later.
   Which of MLflow, scikit-learn, pandas and scipy the worker process has mapped, from
   /proc/<pid>/maps, after each step.

Writes bench/results/memory.json (or --out). The load average is recorded per step: the machine
is shared, figures taken under load say so.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/memory.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncpg

from bench import load
from bench.cluster import start_cluster, stop_cluster
from sensor_predictor.config import load_settings
from sensor_predictor.devtools.postgres import PgServer
from sensor_predictor.devtools.worker_process import WorkerProcess
from sensor_predictor.migrate import migrate
from sensor_predictor.training import activate_model, train

ROOT = Path(__file__).resolve().parents[1]
TMP = ROOT / "bench" / ".tmp"
MB = 2**20
# Shared-object folders whose presence in /proc/<pid>/maps says a library was imported.
LIBRARIES = {"sklearn": "/sklearn/", "pandas": "/pandas/", "scipy.optimize": "/scipy/optimize/",
             "scipy.special": "/scipy/special/", "pyarrow": "/pyarrow/"}
TEMPLATE = "memory_template"


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def children_rss_mb(pid: int) -> float:
    """The RSS of the worker's child processes (its standby fetch process, or a fetch child)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return round(total / MB, 1)


def rss(w: WorkerProcess) -> dict[str, Any]:
    st = w.proc_status()
    maps = Path(f"/proc/{w.pid}/maps").read_text()
    children = children_rss_mb(w.pid)
    return {"rss_mb": round(st["VmRSS"] / MB, 1), "hwm_mb": round(st["VmHWM"] / MB, 1),
            "children_rss_mb": children, "with_children_mb": round(st["VmRSS"] / MB + children, 1),
            "standby_ready": any(e.get("event") == "fetch_standby_ready" for e in w.events()),
            "libraries": sorted(k for k, v in LIBRARIES.items() if v in maps),
            "load": load_avg()}


class MemoryBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        self.work = TMP / f"memory-{stamp}"
        self.work.mkdir(parents=True, exist_ok=True)
        self.mlflow_uri = f"sqlite:///{self.work}/mlflow.db"
        self.server: PgServer | None = None
        self.models: list[tuple[str, int, int]] = []
        self.pool: list[str] = []
        self.machines: list[int] = []

    async def setup(self) -> None:
        self.server = await asyncio.to_thread(start_cluster, None)
        admin = await self.server.connect()
        await admin.execute(f'CREATE DATABASE "{TEMPLATE}"')
        await admin.close()
        conn = await self.server.connect(TEMPLATE)
        await migrate(conn)
        self.machines = await load.machine_ids(conn)
        await conn.close()
        self.pool = await asyncio.to_thread(load.reading_values, 20_000)
        settings = load_settings({**self.server.env(TEMPLATE),
                                  "MLFLOW_TRACKING_URI": self.mlflow_uri})
        cwd = Path.cwd()
        os.chdir(self.work)  # an sqlite store puts its default artifact root under the cwd
        try:
            for clusters, seed in ((4, 1), (3, 2)):
                r = await train(settings, clusters=clusters, activate=False, seed=seed,
                                readings=20_000)
                self.models.append((r.run_id, int(r.version), clusters))
        finally:
            os.chdir(cwd)
        say(f"models trained: {[m[1] for m in self.models]}")

    async def database(self, name: str) -> asyncpg.Connection:
        assert self.server is not None
        admin = await self.server.connect()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"')
        await admin.close()
        conn = await asyncpg.connect(**self.server.kwargs(name))
        await activate_model(conn, *self.models[0])
        return conn

    def worker(self, name: str, tag: str, src: str | None, cache: Path) -> WorkerProcess:
        assert self.server is not None
        env = {**self.server.env(name), "MLFLOW_TRACKING_URI": self.mlflow_uri,
               "INFERENCE_INTERVAL_SECONDS": "30", "LOG_LEVEL": "info",
               "MODEL_CACHE_DIR": str(cache)}
        if src:
            env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [os.environ.get(
                "PYTHONPATH")])])
        return WorkerProcess(env, self.work / f"worker-{tag}.log", cwd=self.work)

    async def variant(self, label: str, src: str | None, round_no: int) -> dict[str, Any]:
        name = f"mem_{label}_{round_no}"
        conn = await self.database(name)
        cache = self.work / f"cache-{label}-{round_no}"
        out: dict[str, Any] = {"variant": label, "round": round_no}
        started: list[WorkerProcess] = []
        try:
            cold = self.worker(name, f"{name}-cold", src, cache).start()
            started.append(cold)
            await cold.until_ready(180)
            out["cold_ready_s"] = round(cold.ready_after or 0, 2)
            out["cold_after_first_model"] = rss(cold)
            await cold.astop()

            w = self.worker(name, f"{name}-restart", src, cache).start()
            started.append(w)
            await w.until_ready(120)
            out["restart_ready_s"] = round(w.ready_after or 0, 2)
            out["after_start"] = rss(w)
            say(f"{label}: ready from cache, RSS {out['after_start']['rss_mb']} MB; settling "
                f"{self.args.settle:g} s")
            await asyncio.sleep(self.args.settle)
            # The old worker's warm-up import may take longer than its 30 s delay on a busy
            # machine: its steady state is after it (up to 3 minutes more).
            worker_py = Path(src or ".", "sensor_predictor", "worker.py")
            warm_up = src is not None and "WARM_UP_DELAY_SECONDS" in await asyncio.to_thread(
                worker_py.read_text)
            for _ in range(360 if warm_up else 0):
                if any(e.get("event") == "warm_up_done" for e in w.events()):
                    break
                await asyncio.sleep(0.5)
            out["warm_up_done"] = next((e.get("ms") for e in w.events()
                                        if e.get("event") == "warm_up_done"), None)
            out["steady"] = rss(w)
            out["drain"] = await self.drain(conn, w)
            out["steady_after_drain"] = rss(w)
            # This checkout's worker keeps a standby fetch process (model_fetch.Standby) from
            # FETCH_STANDBY_DELAY_SECONDS after its first model: the swap is timed with it ready.
            for _ in range(240 if src is None else 0):
                if any(e.get("event") == "fetch_standby_ready" for e in w.events()):
                    break
                await asyncio.sleep(0.5)
            out["standby_ready_before_swap"] = rss(w)["standby_ready"]
            out["swap"] = await self.swap(conn, w, name)
            await asyncio.sleep(self.args.settle_after_swap)
            out["after_swap"] = rss(w)
            await w.astop()
        finally:
            for worker in started:  # a failed step leaves none running
                if worker.proc is not None and worker.proc.poll() is None:
                    await worker.astop()
            await conn.close()
            assert self.server is not None
            admin = await self.server.connect()
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()
        say(f"{label}: steady {out['steady']['rss_mb']} MB, drain peak "
            f"{out['drain']['hwm_mb']} MB, after swap {out['after_swap']['rss_mb']} MB, swap "
            f"{out['swap']['to_first_prediction_s']} s")
        return out

    async def drain(self, conn: asyncpg.Connection, w: WorkerProcess) -> dict[str, Any]:
        n = self.args.readings
        await load.copy_readings(conn, n, self.pool, self.machines)
        t0 = time.monotonic()
        peak = 0
        samples = []
        while time.monotonic() - t0 < 300:
            st = w.proc_status()
            peak = max(peak, st["VmRSS"])
            samples.append(st["VmRSS"])
            done = await conn.fetchval("SELECT count(*) FROM predictions")
            if done >= n:
                break
            await asyncio.sleep(0.1)
        return {"readings": n, "seconds": round(time.monotonic() - t0, 2),
                "peak_rss_mb": round(peak / MB, 1),
                "median_rss_mb": round(statistics.median(samples) / MB, 1),
                "hwm_mb": round(w.proc_status()["VmHWM"] / MB, 1), "load": load_avg()}

    async def swap(self, conn: asyncpg.Connection, w: WorkerProcess, name: str
                   ) -> dict[str, Any]:
        """B activated under a trickle of readings (50/s): commit -> first B prediction."""
        run_id, version, clusters = self.models[1]
        stop = asyncio.Event()

        async def trickle() -> None:
            i = 0
            while not stop.is_set():
                await conn.execute(
                    'INSERT INTO readings ("timestamp", "values", machine_id)'
                    " VALUES (now(), $1::jsonb, $2)", self.pool[i % len(self.pool)],
                    self.machines[0])
                i += 1
                await asyncio.sleep(0.02)

        assert self.server is not None
        side = await asyncpg.connect(**self.server.kwargs(name))
        task = asyncio.create_task(trickle())
        try:
            await asyncio.sleep(0.5)
            seq = await side.fetchval("SELECT coalesce(max(id), 0) FROM predictions")
            row_id = await activate_model(side, run_id, version, clusters)
            committed = await side.fetchval(
                "SELECT pg_xact_commit_timestamp(xmin) FROM clusters WHERE id = $1", row_id)
            first = None
            deadline = time.monotonic() + 120
            while first is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                first = await side.fetchval(
                    "SELECT min(pg_xact_commit_timestamp(xmin)) FROM predictions"
                    " WHERE id > $1 AND model_version = $2", seq, str(version))
        finally:
            stop.set()
            await task
            await side.close()
        swapped = next((e for e in w.events() if e.get("event") == "model_swapped"
                        and e.get("clusters_row") == row_id), {})
        return {"to_first_prediction_s": round((first - committed).total_seconds(), 3)
                if first else None,
                "load_ms": swapped.get("load_ms"), "source": swapped.get("source"),
                "load": load_avg()}


def fetch_cost(uri: str, run_id: str, version: int, rounds: int = 3) -> dict[str, Any]:
    """The fetch alone, alternated: in this process, which has imported MLflow (what the old
    worker's warm path cost), against a fetch process (model_fetch.py: start, import, fetch)."""
    from sensor_predictor.model_fetch import fetch
    from sensor_predictor.model_holder import load_and_verify
    from sensor_predictor.model_sources import SourcePolicy
    from sensor_predictor.model_types import ActiveRow

    row, policy = ActiveRow(0, run_id, version, None), SourcePolicy(uri)
    load_and_verify(row, "m", None, policy)  # MLflow's store opened once, as in a warm worker
    warm, child = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        load_and_verify(row, "m", None, policy)
        warm.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        asyncio.run(fetch(row, "m", None, policy))
        child.append(time.perf_counter() - t0)
    return {"in_process_warm_s": [round(x, 3) for x in warm],
            "fetch_process_s": [round(x, 3) for x in child],
            "median_in_process_warm_s": round(statistics.median(warm), 3),
            "median_fetch_process_s": round(statistics.median(child), 3), "load": load_avg()}


def before_source(rev: str) -> str:
    """`rev`'s src/ (and the migrations/ beside it, which the worker applies) extracted under
    bench/.tmp (the worker run through PYTHONPATH)."""
    dest = TMP / f"memory-src-{rev}"
    if not (dest / "migrations").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", rev, "src", "migrations"], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return str(dest / "src")


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label in sorted({r["variant"] for r in runs}):
        mine = [r for r in runs if r["variant"] == label]

        def med(*path: str, rows: list[dict[str, Any]] = mine) -> float | None:
            values = []
            for r in rows:
                v: Any = r
                for p in path:
                    v = v.get(p) if isinstance(v, dict) else None
                if isinstance(v, (int, float)):
                    values.append(float(v))
            return round(statistics.median(values), 3) if values else None

        out[label] = {
            "rounds": len(mine),
            "cold_after_first_model_rss_mb": med("cold_after_first_model", "rss_mb"),
            "restart_after_start_rss_mb": med("after_start", "rss_mb"),
            "steady_rss_mb": med("steady", "rss_mb"),
            "steady_children_rss_mb": med("steady", "children_rss_mb"),
            "steady_with_children_mb": med("steady", "with_children_mb"),
            "drain_peak_hwm_mb": med("drain", "hwm_mb"),
            "after_swap_rss_mb": med("after_swap", "rss_mb"),
            "swap_uncached_to_first_prediction_s": med("swap", "to_first_prediction_s"),
            "swap_uncached_load_ms": med("swap", "load_ms"),
            "steady_libraries": mine[-1]["steady"]["libraries"],
            "after_swap_libraries": mine[-1]["after_swap"]["libraries"],
        }
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    bench = MemoryBench(args)
    variants: list[tuple[str, str | None]] = [("this", None)]
    if args.before:
        variants.insert(0, ("before", before_source(args.before)))
    await bench.setup()
    runs = []
    try:
        cwd = Path.cwd()
        os.chdir(bench.work)
        try:
            cost = await asyncio.to_thread(fetch_cost, bench.mlflow_uri, *bench.models[1][:2])
        finally:
            os.chdir(cwd)
        say(f"fetch alone: in a warm process {cost['median_in_process_warm_s']} s, by a fetch "
            f"process {cost['median_fetch_process_s']} s (medians)")
        for i in range(args.rounds):
            order = variants if i % 2 == 0 else variants[::-1]  # alternated
            for label, src in order:
                runs.append(await bench.variant(label, src, i))
    finally:
        assert bench.server is not None
        await asyncio.to_thread(stop_cluster, bench.server)
    return {"when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "before": args.before, "readings": args.readings, "settle_s": args.settle,
            "cpus": os.cpu_count(), "fetch_cost": cost, "summary": summary(runs),
            "runs": runs}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", metavar="REV", help="also run the worker of this git revision")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--readings", type=int, default=200_000)
    p.add_argument("--settle", type=float, default=40.0,
                   help="seconds after a ready restart before the steady sample (the old "
                        "warm-up ran 30 s after the first model)")
    p.add_argument("--settle-after-swap", type=float, default=5.0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(main_async(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    say(f"wrote {out}")
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
