"""Measure a worker's start: process start to its first prediction committed, cold vs warm cache.

    uv run python -m sensor_predictor.devtools.restart_time [--runs 5]

Uses the PostgreSQL of the POSTGRES_* variables (default 127.0.0.1:5432, user postgres) for a
throwaway database, and a throwaway sqlite MLflow store. A model is trained and activated; then,
`runs` times each and interleaved, readings are written, `sensor-predictor run` is started with
an empty model cache (cold: MLflow and scikit-learn are imported) or with the cache the first
cold start filled (warm), and the time from just before the process is spawned to the
`prediction_time` of the first prediction of those readings is taken (one host, one clock). The
worker is stopped with SIGTERM once every reading is scored. Prints medians and every figure as
JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from sensor_predictor.config import load_settings
from sensor_predictor.model_contract import FEATURE_NAMES


async def _measure(runs: int, readings: int, keep: bool = False) -> dict[str, Any]:
    env = {"POSTGRES_HOST": "127.0.0.1", "POSTGRES_PORT": "5432", "POSTGRES_USER": "postgres",
           "POSTGRES_PASSWORD": "", **{k: v for k, v in os.environ.items()
                                        if k.startswith("POSTGRES_")}}
    name = f"sp_restart_{uuid.uuid4().hex[:8]}"
    env["POSTGRES_DB"] = "postgres"
    admin = await asyncpg.connect(**load_settings(env).connect_kwargs())
    await admin.execute(f'CREATE DATABASE "{name}"')
    env["POSTGRES_DB"] = name
    work = Path(tempfile.mkdtemp(prefix="sp-restart-"))
    env.update({"MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db", "LOG_FORMAT": "json",
                "METRICS_PORT": "0", "METRICS_HOST": "127.0.0.1",
                "INFERENCE_INTERVAL_SECONDS": "30"})
    try:
        settings = load_settings(env)
        from sensor_predictor import db
        from sensor_predictor.migrate import migrate
        from sensor_predictor.training import train

        conn = await db.connect(settings)
        await migrate(conn)
        cwd = Path.cwd()
        os.chdir(work)
        try:
            await train(settings, clusters=4, readings=2_000, activate=True, seed=0)
        finally:
            os.chdir(cwd)
        machine = await conn.fetchval(
            "INSERT INTO machines (machine_id) VALUES ('restart') RETURNING id")
        warm_cache = work / "warm-cache"
        figures: dict[str, list[float]] = {"cold": [], "warm": []}
        for i in range(runs * 2 + 1):
            kind = "cold" if i % 2 == 0 else "warm"
            cache = work / f"cold-{i}" if kind == "cold" else warm_cache
            mark = await conn.fetchval(db.queries()["last_reading_id"])
            values = [json.dumps({n: (j % 7) / 10 for n in FEATURE_NAMES})
                      for j in range(readings)]
            await conn.execute(
                'INSERT INTO readings ("timestamp", "values", machine_id)'
                " SELECT now(), v::jsonb, $2 FROM unnest($1::text[]) AS v", values, machine)
            log = open(work / f"worker-{i}.log", "wb")  # noqa: SIM115, ASYNC230 - closed below
            started = time.time()
            proc = subprocess.Popen(  # noqa: ASYNC220 - the spawn itself is what is timed
                [sys.executable, "-m", "sensor_predictor.cli", "run"],
                env={**os.environ, **env, "MODEL_CACHE_DIR": str(cache)}, stdout=log,
                stderr=subprocess.STDOUT)
            try:
                first = None
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    row = await conn.fetchrow(
                        "SELECT extract(epoch FROM min(prediction_time)) AS first,"
                        " count(*) AS n FROM predictions WHERE reading_id > $1", mark)
                    if row["first"] is not None and first is None:
                        first = float(row["first"])
                    if row["n"] >= readings:
                        break
                    await asyncio.sleep(0.02)
                if first is None:
                    raise RuntimeError(f"no prediction; see {log.name}")
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
                log.close()
            if i == 0:
                shutil.copytree(cache, warm_cache)  # the first cold start fills the warm one
                continue  # and counts as the warm-up of the machine's file cache
            figures[kind].append(round(first - started, 3))
        await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        if keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return {"start_to_first_prediction_s": figures,
            "median_s": {k: statistics.median(v) for k, v in figures.items()},
            "runs": runs, "readings_waiting": readings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="starts of each kind (5)")
    parser.add_argument("--readings", type=int, default=1_000,
                        help="readings waiting at each start (1000)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(_measure(args.runs, args.readings, args.keep))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
