"""`sensor-predictor demo`: the whole system on one machine, in one process, for about a minute.

One module per job: `postgres` (where the database comes from), `timeline` (set-up, the
stream, the wind-down), `status` (the live status line), `summary` (the closing summary, its
SQL named in sql/queries.sql), `console` (the terminal), `logs` (logging out of the way).

PostgreSQL, in this order (DEMO_POSTGRES=auto|env|binaries|embedded forces one):

* env: the server named by POSTGRES_* (any of them set) when it answers within a few seconds.
  The demo works in a scratch database it creates there (``sensor_demo_<hex>``) and drops at
  the end, so the database POSTGRES_DB names is left alone: the demo activates models that
  live only in its own MLflow store, which would break a real predictor serving that database.
  Without the right to create a database it falls back to POSTGRES_DB as is and says so.
  Nothing POSTGRES_* set: no server is guessed at (no localhost credentials are assumed).
* binaries: a throwaway cluster (initdb + pg_ctl, trust auth, 127.0.0.1 on a free port) from
  the PostgreSQL binaries on PATH or under /usr/lib/postgresql/*/bin. As root it runs as the
  ``postgres`` account (initdb refuses root).
* embedded: a throwaway cluster from pgserver (the ``embedded`` extra: ``uv sync --extra
  embedded`` in a clone), for a machine with Python and no PostgreSQL at all. It listens on a
  Unix socket only. As root, pgserver itself creates a ``pgserver`` system account to run the
  server as, and leaves it: the demo says so on screen (``userdel pgserver`` removes it).

A throwaway cluster lives in the work folder (as root, in a fresh folder under the temp dir
when the server account cannot reach the work folder); it is stopped and deleted at the end,
its log kept as <workdir>/postgres.log. MLflow is a sqlite store in the work folder, artifacts
next to it, fresh for every run (so the first model is v1 every time); it is kept after the run,
so `mlflow ui --backend-store-uri sqlite:///<workdir>/mlflow.db` shows the runs afterwards.

Timeline for --duration D: migrate, train a model (4 clusters) and activate it, start the worker
in this process and, once it serves the model, the simulator; the stream starts. At 0.2 D the
old trainer's hourly retrain: a model fitted on the latest readings is activated mid-stream, and
its clusters keep their stable ids. At 0.4 D the simulator shifts the distribution (drift); at
0.55 D a model retrained on the drifted readings is marked as the shadow candidate, and the
worker scores it beside the active model (agreement windows); at 0.8 D, once a window is
measured, it is promoted (an ordinary activation). At D the simulator stops, the worker drains
the backlog and stops, and a summary follows: predictions by stable cluster id per model, the
shadow candidate's agreement, ending with the exactly-once check.

Ctrl-C (SIGINT) or SIGTERM at any point: the simulator and the worker stop cleanly (a second
signal skips the short drain), the summary so far is printed, the throwaway server is stopped
and deleted. Exit codes: 0 done and every reading scored exactly once; 1 a failure (or the
check failed); 130 after SIGINT, 143 after SIGTERM (128 + the signal, as shells report).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

__all__ = ["run_demo"]


def run_demo(args: argparse.Namespace) -> int:
    """`sensor-predictor demo`: see the package docstring. Returns the exit code."""
    # Imported here: `sensor-predictor --help` need not import asyncpg, MLflow's set-up, ...
    from sensor_predictor.config import load_settings
    from sensor_predictor.demo.console import Console
    from sensor_predictor.demo.logs import log_to_file, quiet_mlflow
    from sensor_predictor.demo.postgres import DemoError
    from sensor_predictor.demo.timeline import Demo, Options

    try:
        opts = Options.from_args(args, os.environ)
    except DemoError as exc:
        print(f"sensor-predictor demo: {exc}", file=sys.stderr)
        return 2
    base = load_settings()  # already validated by the CLI
    opts.workdir.mkdir(parents=True, exist_ok=True)
    quiet_mlflow()
    # Left open to the end of the process: atexit handlers (pgserver's) may still log.
    log = log_to_file(opts.workdir / "demo.log", base.log_level)
    console = Console(sys.stdout)
    # MLflow prints some notices straight to sys.stderr ("Created version '2' of model").
    stderr, sys.stderr = sys.stderr, log
    try:
        return asyncio.run(Demo(opts, base, console).run())
    finally:
        sys.stderr = stderr
