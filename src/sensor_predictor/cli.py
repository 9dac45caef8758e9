"""The `sensor-predictor` command: migrate, run, train, simulate, rescore, reset-cursor, clusters,
demo."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from collections.abc import Sequence

import structlog

from sensor_predictor.config import ConfigError, Settings, load_settings
from sensor_predictor.connect_errors import ConnectFailed
from sensor_predictor.logging_setup import configure_logging

log = structlog.get_logger("sensor_predictor.cli")

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sensor-predictor",
        description="Scores every sensor reading written to PostgreSQL with the active MLflow "
                    "model, exactly once. Settings come from the environment (see README).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("migrate", help="apply pending database migrations and exit")

    run = sub.add_parser("run", help="run the worker until SIGTERM / SIGINT")
    run.add_argument("--no-migrate", action="store_true",
                     help="do not apply migrations at start (MIGRATE_ON_START=false does the same)")

    train = sub.add_parser("train", help="fit StandardScaler + KMeans, log it to MLflow")
    train.add_argument("--clusters", type=_positive_int, default=4, help="KMeans clusters (4)")
    train.add_argument("--readings", type=_positive_int, default=50_000,
                       help="train on at most this many of the latest readings (50000)")
    train.add_argument("--min-readings", type=_positive_int, default=1_000,
                       help="below this many usable readings, train on generated ones (1000)")
    train.add_argument("--seed", type=int, default=0,
                       help="seed of the simulated readings and of KMeans (0)")
    train.add_argument("--activate", action="store_true",
                       help="make it the active model (a clusters row) once logged")
    train.add_argument("--candidate", action="store_true",
                       help="make it the shadow candidate (a model_candidates row): scored "
                            "beside the active model until promoted with --activate")

    sim = sub.add_parser("simulate", help="write simulated readings like the old simulator")
    sim.add_argument("--machines", type=_positive_int, default=10,
                     help="machines the readings come from (10)")
    sim.add_argument("--rate", type=_positive_float, default=20.0, help="readings per second")
    sim.add_argument("--duration", type=_positive_float, default=None, help="seconds (forever)")
    sim.add_argument("--count", type=_positive_int, default=None, help="readings, then stop")
    sim.add_argument("--drift", action="store_true", help="shift the distribution")
    sim.add_argument("--seed", type=int, default=None,
                     help="seed of the readings (none: different every run)")
    sim.add_argument("--rows-per-statement", type=_positive_int, default=100,
                     help="readings per INSERT statement (100)")

    rescore = sub.add_parser(
        "rescore", help="score past readings with a chosen model (explicit; a swap never does)")
    rescore.add_argument("--run-id", required=True, help="MLflow run holding the model")
    rescore.add_argument("--version", type=int, default=None,
                         help="its registered version (the model_version written); "
                              "without it, run-<run id>")
    rescore.add_argument("--from-id", type=int, default=0, help="readings with id above this")
    rescore.add_argument("--to-id", type=int, default=None, help="up to this id (all)")
    rescore.add_argument("--batch-size", type=_positive_int, default=1000,
                         help="readings per transaction (1000)")

    sub.add_parser("reset-cursor",
                   help="re-anchor the scoring cursor (after moving the database by hand): "
                        "readings with no result are swept once, then scoring goes on")

    widen = sub.add_parser(
        "widen-ids", help="widen an adopted database's integer ids (readings, predictions) to "
                          "bigint online, writers keep writing; resumable: run it again")
    widen.add_argument("--batch-size", type=_positive_int, default=20_000,
                       help="rows per backfill UPDATE (20000)")
    widen.add_argument("--lock-timeout-ms", type=_positive_int, default=200,
                       help="longest wait for a table lock before retrying (200); writers "
                            "queue behind the waiting statement")

    sub.add_parser("clusters", help="show each model version's label -> stable cluster id "
                                    "mapping (aligned at its first use)")

    demo = sub.add_parser("demo", help="everything at once on a local or throwaway PostgreSQL")
    demo.add_argument("--duration", type=_positive_float, default=60.0, help="seconds (60)")
    demo.add_argument("--rate", type=_positive_float, default=500.0, help="readings/s (500)")
    demo.add_argument("--workdir", default=".demo", help="MLflow store and logs (.demo)")
    demo.add_argument("--postgres", choices=("auto", "env", "binaries", "embedded"),
                      default=None,
                      help="the server POSTGRES_* names (env), a throwaway cluster from the "
                           "PostgreSQL binaries, or the embedded pgserver; auto (default) tries "
                           "them in that order. DEMO_POSTGRES does the same")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


async def _migrate(settings: Settings) -> int:
    import asyncpg
    import structlog

    from sensor_predictor import db
    from sensor_predictor.migrate import MigrationError, migrate

    conn = await db.connect(settings, timeout=30)
    try:
        applied = await migrate(conn)
    except (MigrationError, asyncpg.PostgresError) as exc:
        structlog.get_logger("sensor_predictor.migrate").error(
            "migrate_failed", error=f"{type(exc).__name__}: {exc}",
            hint=getattr(exc, "hint", None))
        return 1
    finally:
        await conn.close()
    print(f"applied={len(applied)}")
    return 0


async def _run(settings: Settings) -> int:
    from sensor_predictor.worker import Worker

    return await Worker(settings).run()


async def _train(settings: Settings, args: argparse.Namespace) -> int:
    from sensor_predictor import db
    from sensor_predictor.training import mark_candidate, train

    if args.activate and args.candidate:
        print("sensor-predictor: --activate and --candidate exclude each other (a candidate is "
              "scored beside the active model; activating it is its promotion)", file=sys.stderr)
        return 2
    result = await train(settings, clusters=args.clusters, readings=args.readings,
                         min_readings=args.min_readings, activate=args.activate, seed=args.seed)
    if args.candidate:
        conn = await db.connect(settings)
        try:
            await mark_candidate(conn, result.run_id, result.version)
        finally:
            await conn.close()
    print(f"run_id={result.run_id} version={result.version}", flush=True)
    return 0


async def _rescore(settings: Settings, args: argparse.Namespace) -> int:
    from sensor_predictor.model_types import ModelLoadError
    from sensor_predictor.rescore import rescore

    try:
        result = await rescore(settings, run_id=args.run_id, version=args.version,
                               from_id=args.from_id, to_id=args.to_id,
                               batch_size=args.batch_size)
    except ModelLoadError as exc:
        print(f"sensor-predictor: {exc}", file=sys.stderr)
        return 1
    print(f"model_version={result.model_version} readings={result.readings} "
          f"predicted={result.predicted} errors={result.errors} last_id={result.last_id}",
          flush=True)
    return 0


async def _reset_cursor(settings: Settings) -> int:
    from sensor_predictor import db

    conn = await db.connect(settings, timeout=30)
    try:
        top = await conn.fetchval(db.queries()["reset_cursor"])
    finally:
        await conn.close()
    log.warning("cursor_reset", swept_up_to_id=top,
                note="readings up to this id without a prediction or an error are handed out "
                     "by the next claims, then the snapshot protocol resumes")
    print(f"swept_up_to_id={top}", flush=True)
    return 0


async def _widen_ids(settings: Settings, args: argparse.Namespace) -> int:
    from sensor_predictor import db
    from sensor_predictor.widen_ids import widen_ids

    conn = await db.connect(settings, timeout=30)
    try:
        report = await widen_ids(conn, batch_size=args.batch_size,
                                 lock_timeout_ms=args.lock_timeout_ms)
    finally:
        await conn.close()
    print(f"widened={','.join(report.widened) or 'none'} seconds={report.seconds:.1f} "
          f"longest_lock_s={report.longest_lock_seconds:.3f}", flush=True)
    return 0


async def _clusters(settings: Settings) -> int:
    from sensor_predictor import cluster_registry, db

    conn = await db.connect(settings, timeout=30)
    try:
        found = await cluster_registry.mappings(conn)
    finally:
        await conn.close()
    if not found:
        print("no model aligned yet (a model is aligned the first time it is used)")
        return 0
    for m in found:
        against = m.aligned_against or "nothing (the first model: its labels are the ids)"
        served = f", last served {m.served_at:%Y-%m-%d %H:%M:%S}" if m.served_at else ""
        print(f"model_version={m.model_version} run_id={m.run_id} aligned against "
              f"{against}{served}")
        for label, stable, distance in m.rows:
            how = "new id" if distance is None else f"matched at distance {distance:.4g}"
            print(f"  label {label} -> cluster_id {stable}  ({how})")
    return 0


async def _simulate(settings: Settings, args: argparse.Namespace) -> int:
    from sensor_predictor.simulator.writer import run_simulation

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    written = await run_simulation(
        settings, machines=args.machines, rate=args.rate, duration=args.duration,
        count=args.count, drift=args.drift, rows_per_statement=args.rows_per_statement,
        seed=args.seed, stop=stop)
    print(f"written={written}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"sensor-predictor: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log_level, settings.log_format,
                      secrets=settings.secret_values())
    if args.command == "run" and args.no_migrate:
        settings = dataclasses.replace(settings, migrate_on_start=False)
    if args.command not in ("run", "demo"):
        from sensor_predictor import db

        log.debug("database_connection", hosts=[f"{h}:{p}" for h, p in settings.endpoints],
                  target_session_attrs=settings.target_session_attrs,
                  **db.describe_tls(settings))
    try:
        if args.command == "migrate":
            return asyncio.run(_migrate(settings))
        if args.command == "run":
            return asyncio.run(_run(settings))
        if args.command == "train":
            return asyncio.run(_train(settings, args))
        if args.command == "simulate":
            return asyncio.run(_simulate(settings, args))
        if args.command == "rescore":
            return asyncio.run(_rescore(settings, args))
        if args.command == "reset-cursor":
            return asyncio.run(_reset_cursor(settings))
        if args.command == "clusters":
            return asyncio.run(_clusters(settings))
        if args.command == "widen-ids":
            return asyncio.run(_widen_ids(settings, args))
        if args.command == "demo":
            from sensor_predictor.demo import run_demo

            return run_demo(args)
    except KeyboardInterrupt:
        return 130
    except ConnectFailed as exc:
        # One line: the cause and the variable to change. An outage exits 1, a configuration
        # error 2 (EXIT_CONFIG), like an invalid setting.
        print(f"sensor-predictor: {args.command}: {exc.cause.line()}", file=sys.stderr)
        return 1 if exc.cause.transient else EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
