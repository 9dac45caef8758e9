"""Where a reading's latency goes, at a steady rate: one worker (SENSOR_PREDICTOR_LATENCY_TRACE=1)
under the steady producer on the bench's durable cluster, with pg_stat_statements.

    uv run python -m bench.trace_latency [--rate 1000] [--seconds 20] [--worker-src DIR]

Per batch, from the worker's `latency_trace` lines (wall clock) and the readings' commit
timestamps (the same machine's clock): reading commit -> NOTIFY heard -> pass start -> claim
sent -> claim (+ read) answered -> result statement sent -> committed (answered) -> the
prediction's commit timestamp. Prints the percentiles of each step, the largest batches' full
breakdown, and the server's statements by total time. Writes trace.json beside it in --out.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench import load
from bench.run import Bench, parse_args, say, wait_drained

STEPS = [("notified", "commit -> NOTIFY heard"), ("pass_start", "heard -> pass start"),
         ("claim_sent", "pass start -> claim sent"), ("claim_back", "claim + read round trip"),
         ("write_sent", "predict + bookkeeping"), ("committed", "write + commit round trip")]


async def trace(args: argparse.Namespace) -> dict[str, Any]:
    bench_args = parse_args(["--only", "live", "--pool", "20000", "--out", args.out,
                             "--pg-setting", "shared_preload_libraries=pg_stat_statements",
                             "--pg-setting", "pg_stat_statements.track=all",
                             *(["--worker-src", args.worker_src] if args.worker_src else [])])
    b = Bench(bench_args)
    await b.setup()
    name = "trace"
    conn = await b.new_db(name)
    await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    w = b.worker(name, name, SENSOR_PREDICTOR_LATENCY_TRACE="1").start()
    try:
        await w.seconds_to_ready()
        assert b.steady_producer is not None
        await load.produce(b.dsn(name), b.steady_producer, 1000, 3)  # warm-up
        await wait_drained(conn)
        lo = await conn.fetchval("SELECT COALESCE(max(id), 0) FROM readings")
        await conn.execute("SELECT pg_stat_statements_reset()")
        log_from = w.log_path.stat().st_size
        prod = await load.produce(b.dsn(name), b.steady_producer, args.rate, args.seconds)
        await wait_drained(conn)
        say(f"produced {prod.rate:,.0f}/s")
        stmts = [dict(r) for r in await conn.fetch(
            "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 90) AS query, calls,"
            " round(total_exec_time::numeric, 1)::float8 AS total_ms,"
            " round(mean_exec_time::numeric, 3)::float8 AS mean_ms,"
            " round(max_exec_time::numeric, 2)::float8 AS max_ms, toplevel"
            "  FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 25")]
        commits = {int(r["id"]): (r["rc"], r["pc"]) for r in await conn.fetch(
            "SELECT r.id, extract(epoch FROM pg_xact_commit_timestamp(r.xmin))::float8 AS rc,"
            " extract(epoch FROM pg_xact_commit_timestamp(p.xmin))::float8 AS pc"
            "  FROM readings r JOIN predictions p ON p.reading_id = r.id WHERE r.id > $1", lo)}
    finally:
        await w.astop()
        await conn.close()
        from bench.cluster import stop_cluster

        if b.server is not None:
            await asyncio.to_thread(stop_cluster, b.server)
    text = await asyncio.to_thread(w.log_path.read_bytes)
    lines = [json.loads(x) for x in text[log_from:].splitlines() if b'"latency_trace"' in x]
    batches = []
    for t in lines:
        c = commits.get(int(t["first_id"]))
        if c is None or t["notified"] is None:
            continue
        row = {"first_id": t["first_id"], "rows": t["rows"], "reading_commit": c[0],
               **{k: t[k] for k, _ in STEPS}, "prediction_commit": c[1]}
        batches.append(row)
    steps: dict[str, list[float]] = {}
    keys = ["reading_commit"] + [k for k, _ in STEPS]
    for row in batches:
        for (a, b_), (_, label) in zip(itertools.pairwise(keys), STEPS, strict=True):
            steps.setdefault(label, []).append((row[b_] - row[a]) * 1000)
        steps.setdefault("total: reading commit -> prediction commit", []).append(
            (row["prediction_commit"] - row["reading_commit"]) * 1000)
        steps.setdefault("prediction commit ts -> answer seen", []).append(
            (row["committed"] - row["prediction_commit"]) * 1000)
    table = {k: {q: round(float(np.percentile(v, p)), 3)
                 for q, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))}
             for k, v in steps.items()}
    totals = sorted(batches, key=lambda r: r["prediction_commit"] - r["reading_commit"])
    worst = [{k: (round((v - r["reading_commit"]) * 1000, 2) if isinstance(v, float) else v)
              for k, v in r.items()} for r in totals[-8:]]
    return {"rate": args.rate, "batches": len(batches), "steps_ms": table,
            "worst_batches_ms_from_reading_commit": worst, "statements": stmts}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.trace_latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--worker-src", default=None)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / ".tmp" / "trace"))
    args = p.parse_args(argv)
    out = asyncio.run(trace(args))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "trace.json").write_text(json.dumps(out, indent=1))
    print(f"{out['batches']} batches at {out['rate']}/s; ms per step:")
    for k, v in out["steps_ms"].items():
        print(f"  {k:45s} p50 {v['p50']:8.3f}  p90 {v['p90']:8.3f}  p99 {v['p99']:8.3f}  "
              f"max {v['max']:8.3f}")
    print("worst batches (ms since the reading's commit):")
    for r in out["worst_batches_ms_from_reading_commit"]:
        print("  ", r)
    print("server statements by total time:")
    for s in out["statements"][:15]:
        print(f"  {s['total_ms']:9.1f} ms  {s['calls']:6d} x  mean {s['mean_ms']:7.3f}  "
              f"max {s['max_ms']:8.2f}  top={s['toplevel']}  {s['query']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
