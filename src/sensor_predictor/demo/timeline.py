"""The demo's timeline: set-up, the stream (an hourly retrain swapped in, drift, a model
retrained on the drift scored in the shadow, then promoted mid-stream), and the wind-down that
always runs (summary, servers stopped). See the package docstring.

Longer than our ~400 lines on purpose: it is one state machine (class Demo). A signal may
arrive at any step, and the wind-down must stop whatever has started by then, in order; the
steps share that state, and split across modules each would need all of it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import asyncpg

from sensor_predictor import db
from sensor_predictor.config import Settings
from sensor_predictor.demo import summary
from sensor_predictor.demo.console import Console
from sensor_predictor.demo.postgres import (
    DemoError,
    Postgres,
    create_demo_database,
    describe,
    from_environment,
    import_pgserver,
    named_by_environment,
    start_binaries,
    start_embedded,
)
from sensor_predictor.demo.status import STATUS_HEADER, Sample, status_line
from sensor_predictor.devtools.postgres import find_bindir

T = TypeVar("T")

Mode = Literal["auto", "env", "binaries", "embedded"]
MODES: tuple[Mode, ...] = ("auto", "env", "binaries", "embedded")
DEMO_POSTGRES_ENV = "DEMO_POSTGRES"  # forces one of MODES

CLUSTERS = 4
MACHINES = 10
INITIAL_TRAINING_READINGS = 10_000
HOURLY_AT = 0.2  # share of the duration: the old trainer's hourly retrain, activated at once
DRIFT_AT = 0.4
RETRAIN_AT = 0.55  # retrained and marked as the shadow candidate
PROMOTE_AT = 0.8  # promoted (activated), once its agreement has been measured
RETRAIN_MIN_READINGS = 100  # fewer drifted readings than this: train() falls back to generated
RETRAIN_GRACE_SECONDS = 60.0  # the stream runs on past D until the retrained model is served
WORKER_READY_TIMEOUT = 120.0
DRAIN_TIMEOUT = 60.0
DRAIN_TIMEOUT_INTERRUPTED = 5.0
STATUS_SECONDS = 1.0
EXIT_OK, EXIT_FAILED = 0, 1


class Interrupted(Exception):
    """SIGINT / SIGTERM arrived during set-up."""


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# -- the demo -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    duration: float
    rate: float
    workdir: Path
    mode: Mode

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str]) -> Options:
        raw = getattr(args, "postgres", None) or environ.get(DEMO_POSTGRES_ENV) or "auto"
        mode = raw.strip().lower()
        if mode not in MODES:
            raise DemoError(f"{DEMO_POSTGRES_ENV}={raw!r}: must be one of {', '.join(MODES)}")
        return cls(float(args.duration), float(args.rate), Path(args.workdir).resolve(),
                   mode)


class _Simulation:
    """One run_simulation task with its own stop event."""

    def __init__(self, settings: Settings, rate: float, drift: bool, seed: int) -> None:
        from sensor_predictor.simulator import run_simulation

        self.drift = drift
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(
            run_simulation(settings, machines=MACHINES, rate=rate, drift=drift, seed=seed,
                           stop=self.stop),
            name=f"simulator-{'drift' if drift else 'steady'}")

    async def finish(self) -> int:
        self.stop.set()
        return await self.task


def _prepare_mlflow(uri: str, store: Path, artifacts: Path) -> tuple[str, bool]:
    """Blocking: a fresh store (a previous run's models would otherwise carry over, and this
    run's first model would be "v3"), and the experiment training.py logs to with its
    artifacts under the work folder (a sqlite store would otherwise put them in ./mlruns of
    whatever the current folder is). Returns the artifact location and whether a previous
    run's store was replaced."""
    replaced = store.exists() or artifacts.exists()
    with contextlib.suppress(FileNotFoundError):
        store.unlink()
    shutil.rmtree(artifacts, ignore_errors=True)

    from sensor_predictor.model_holder import configure_mlflow
    from sensor_predictor.training import EXPERIMENT_NAME

    configure_mlflow(uri)
    import mlflow

    artifacts.mkdir(parents=True, exist_ok=True)
    mlflow.create_experiment(EXPERIMENT_NAME, artifact_location=artifacts.as_uri())
    return artifacts.as_uri(), replaced


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _task_error(task: asyncio.Task[Any]) -> str:
    if task.cancelled():
        return "cancelled"
    exc = task.exception()
    return describe(exc) if exc is not None else f"returned {task.result()!r}"


class Demo:
    """Set-up, the stream, and the wind-down that always runs (summary, servers stopped)."""

    def __init__(self, opts: Options, base: Settings, console: Console) -> None:
        self.opts = opts
        self.base = base
        self.console = console
        self.stop = asyncio.Event()  # SIGINT / SIGTERM: stop what runs, summarise, clean up
        self.hurry = asyncio.Event()  # a second signal: skip the drain
        self.signal: int | None = None
        self.failure: str | None = None
        self.pg: Postgres | None = None
        self.settings = base
        self.pool: asyncpg.Pool | None = None
        self.worker: Any = None  # sensor_predictor.worker.Worker, imported lazily
        self.worker_task: asyncio.Task[int] | None = None
        self.sim: _Simulation | None = None
        self.hourly_task: asyncio.Task[None] | None = None
        self.hourly_version: str | None = None
        self.retrain_task: asyncio.Task[None] | None = None
        self.retrained_version: str | None = None
        self.retrained: Any = None  # training.TrainResult of the candidate
        self.promote_task: asyncio.Task[None] | None = None
        self._shadow_seen: str | None = None
        self._shadow_windows_seen = 0
        self.baseline_reading = 0
        self.baseline_drift = 0
        self.drift_from_id: int | None = None
        self.t0: float | None = None
        self.stream_seconds = 0.0
        self.served: list[str] = []
        self.metrics_url: str | None = None
        self.mlflow_ready: asyncio.Task[tuple[str, bool]] | None = None
        self.mlflow_uri = f"sqlite:///{opts.workdir / 'mlflow.db'}"
        self._drift_events_seen = 0
        self._drift_open = False

    # -- plumbing -------------------------------------------------------------------------

    def event(self, text: str) -> None:
        prefix = f"[{self._elapsed():6.1f}s] " if self.t0 is not None else ""
        self.console.line(prefix + text)

    def _elapsed(self) -> float:
        return 0.0 if self.t0 is None else time.monotonic() - self.t0

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal = signum
            self.console.keep_status()
            self.console.line(f"{name}: stopping (again to skip the drain)")
            self.stop.set()
        elif not self.hurry.is_set():
            self.console.line(f"{name} again: skipping the drain")
            self.hurry.set()

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Interrupted

    async def _sleep(self, seconds: float, event: asyncio.Event | None = None) -> None:
        """Sleep, or less when `event` (the stop event by default) is set."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for((event or self.stop).wait(), max(0.0, seconds))

    async def _step(self, aw: Awaitable[T]) -> T:
        """Await a set-up step, abandoning it when a signal arrives."""
        self._check_stop()
        task: asyncio.Future[T] = asyncio.ensure_future(aw)
        stopper: asyncio.Future[Any] = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise Interrupted

    # -- the whole run --------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        ok = False
        try:
            try:
                await self._setup()
                await self._stream()
            except Interrupted:
                pass
            except DemoError as exc:
                self.failure = str(exc)
            finally:
                ok = await self._finish()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        if self.signal is not None:
            return 128 + self.signal
        return EXIT_OK if ok and self.failure is None else EXIT_FAILED

    async def _setup(self) -> None:
        o, c = self.opts, self.console
        c.line(f"sensor-predictor demo: {o.duration:g} s of readings at {o.rate:g}/s; "
               f"work folder {o.workdir}")
        if o.mode == "env" and not named_by_environment(os.environ):
            raise DemoError(f"{DEMO_POSTGRES_ENV}=env, but no POSTGRES_* variable is set")
        # Importing MLflow and creating its store take seconds: meanwhile, start PostgreSQL.
        self.mlflow_ready = asyncio.create_task(asyncio.to_thread(
            _prepare_mlflow, self.mlflow_uri, o.workdir / "mlflow.db", o.workdir / "artifacts"),
            name="mlflow")
        pg = await self._postgres()
        c.line(f"PostgreSQL: {pg.description}")
        self._check_stop()
        port = self.base.metrics_port if _port_is_free(self.base.metrics_port) else 0
        self.settings = dataclasses.replace(
            pg.apply(self.base), mlflow_tracking_uri=self.mlflow_uri,
            metrics_host="127.0.0.1", metrics_port=port, migrate_on_start=False)

        applied = await self._step(self._migrate())
        self.pool = await self._step(db.create_pool(self.settings, size=3))
        c.line(f"migrated ({len(applied)} migration(s) applied)")

        artifacts, replaced = await self._step(self.mlflow_ready)
        c.line(f"MLflow: a fresh store {self.mlflow_uri}, artifacts in {artifacts}"
               + (" (the previous run's store was replaced)" if replaced else ""))

        from sensor_predictor.training import train

        c.line(f"training the first model ({CLUSTERS} clusters) ...")
        result = await self._step(train(
            self.settings, clusters=CLUSTERS, readings=INITIAL_TRAINING_READINGS,
            activate=True, seed=0))
        c.line(f"model v{result.version} trained on {result.n_readings} {result.source} "
               f"readings (silhouette {result.silhouette:.3f}) and activated")
        await self._start_worker()

    async def _postgres(self) -> Postgres:
        mode, c = self.opts.mode, self.console
        named = named_by_environment(os.environ)
        if mode in ("auto", "env"):
            if named:
                # Not a _step: abandoned half-way, it could leave a scratch database behind.
                pg, why = await from_environment(self.base)
                if pg is not None:
                    self.pg = pg
                    return pg
                if mode == "env":
                    raise DemoError(f"{DEMO_POSTGRES_ENV}=env: {why}")
                c.line(f"PostgreSQL named by {', '.join(named)}: {why}; using a throwaway "
                       "server instead")
            elif mode == "env":
                raise DemoError(f"{DEMO_POSTGRES_ENV}=env, but no POSTGRES_* variable is set")
        if mode in ("auto", "binaries"):
            bindir = find_bindir()
            if bindir is not None:
                try:
                    return await self._throwaway(start_binaries(self.opts.workdir, bindir))
                except DemoError as exc:
                    if mode == "binaries":
                        raise
                    c.line(f"PostgreSQL binaries in {bindir} unusable ({exc}); trying the "
                           "embedded server")
            elif mode == "binaries":
                raise DemoError("no PostgreSQL binaries (initdb, pg_ctl, postgres) on PATH or "
                                "in /usr/lib/postgresql/*/bin")
        try:
            import_pgserver()
        except ImportError:
            raise DemoError(
                "no PostgreSQL to use: set POSTGRES_* to a server, install PostgreSQL, or "
                "install the embedded one (from a clone: uv sync --extra embedded, then "
                "--postgres embedded)") from None
        c.line("starting the embedded PostgreSQL (pgserver) ...")
        return await self._throwaway(start_embedded(self.opts.workdir))

    async def _throwaway(self, starting: Awaitable[Postgres]) -> Postgres:
        # Never abandoned half-way (not a _step): a server started behind our back would be
        # left running. A signal meanwhile takes effect once it is up.
        pg = await starting
        self.pg = pg
        await create_demo_database(pg)
        return pg

    async def _migrate(self) -> list[int]:
        from sensor_predictor.migrate import migrate

        conn = await db.connect(self.settings, timeout=30)
        try:
            applied = await migrate(conn)
            q = db.queries()
            self.baseline_reading = int(await conn.fetchval(q["last_reading_id"]))
            self.baseline_drift = int(await conn.fetchval(q["last_drift_id"]))
        finally:
            await conn.close()
        return applied

    async def _start_worker(self) -> None:
        from sensor_predictor.worker import Worker

        # This process trained the models: MLflow and scikit-learn are imported already, so
        # a swap fetches in a thread instead of a child importing them again (seconds a swap).
        self.worker = Worker(self.settings, fetch_in_thread=True)
        self.worker_task = asyncio.create_task(self.worker.run(handle_signals=False),
                                               name="worker")
        deadline = time.monotonic() + WORKER_READY_TIMEOUT
        while not self.worker.readiness()[0]:
            if self.worker_task.done():
                raise DemoError(f"the worker stopped while starting: "
                                f"{_task_error(self.worker_task)} (see {self._log_path()})")
            self._check_stop()
            if time.monotonic() > deadline:
                raise DemoError(f"the worker serves no model after {WORKER_READY_TIMEOUT:g} s: "
                                f"{self.worker.readiness()[1]} (see {self._log_path()})")
            await self._sleep(0.05)
        version = self._serving()
        self.metrics_url = f"http://127.0.0.1:{self.worker.snapshot().metrics_port}"
        self.console.line(f"worker serving model v{version}; metrics at {self.metrics_url}"
                          f"/metrics, readiness at {self.metrics_url}/ready")

    def _log_path(self) -> Path:
        return self.opts.workdir / "demo.log"

    def _serving(self) -> str | None:
        version = self.worker.snapshot().model_version if self.worker is not None else None
        if version is not None and (not self.served or self.served[-1] != version):
            self.served.append(version)
        return version

    # -- the stream -----------------------------------------------------------------------

    async def _stream(self) -> None:
        o = self.opts
        d = o.duration
        self.t0 = time.monotonic()
        self.sim = _Simulation(self.settings, o.rate, drift=False, seed=1)
        self.event(f"stream started: {MACHINES} machines, {o.rate:g} readings/s; an hourly "
                   f"retrain at {HOURLY_AT * d:.0f} s, drift at "
                   f"{DRIFT_AT * d:.0f} s, a retrained model in the shadow at "
                   f"{RETRAIN_AT * d:.0f} s, promoted at {PROMOTE_AT * d:.0f} s, end at {d:g} s "
                   "(Ctrl-C stops)")
        self.console.line(STATUS_HEADER)
        plain_every = max(1.0, min(5.0, d / 10))
        shown = last = await self._sample()
        waiting_said = False
        while not self.stop.is_set():
            await self._sleep(STATUS_SECONDS - (time.monotonic() - last.at))
            if self.stop.is_set():
                break
            self._check_tasks()
            now = self._elapsed()
            if self.hourly_task is None and now >= HOURLY_AT * d:
                self.hourly_task = asyncio.create_task(self._hourly_retrain(), name="hourly")
            if self.drift_from_id is None and now >= DRIFT_AT * d:
                await self._start_drift()
            if self.retrain_task is None and now >= RETRAIN_AT * d:
                self.retrain_task = asyncio.create_task(self._retrain(), name="retrain")
            last = await self._sample()
            self._notice_changes()
            if self.promote_task is None and now >= PROMOTE_AT * d and self._promotable():
                self.promote_task = asyncio.create_task(self._promote(), name="promote")
            if self.console.tty or last.at - shown.at >= plain_every - 0.05:
                self.console.status(status_line(self._elapsed(), shown, last,
                                                self.served[-1] if self.served else None))
                shown = last
            if now >= d:
                pending = self._retrain_pending()
                if pending and now < d + RETRAIN_GRACE_SECONDS:
                    if not waiting_said:
                        self.event(f"time is up, but {pending}: the stream runs on")
                        waiting_said = True
                    continue
                if pending:
                    self.event(f"gave up waiting: {pending}")
                break
        self.stream_seconds = self._elapsed()
        self.console.keep_status()

    def _check_tasks(self) -> None:
        if self.worker_task is not None and self.worker_task.done():
            raise DemoError(f"the worker stopped: {_task_error(self.worker_task)} "
                            f"(see {self._log_path()})")
        if self.sim is not None and self.sim.task.done():
            raise DemoError(f"the simulator stopped: {_task_error(self.sim.task)}")
        if self.retrain_task is not None and self.retrain_task.done() \
                and not self.retrain_task.cancelled() and self.retrain_task.exception():
            raise DemoError(f"retraining failed: {_task_error(self.retrain_task)}")
        if self.hourly_task is not None and self.hourly_task.done() \
                and not self.hourly_task.cancelled() and self.hourly_task.exception():
            raise DemoError(f"the hourly retrain failed: {_task_error(self.hourly_task)}")
        if self.promote_task is not None and self.promote_task.done() \
                and not self.promote_task.cancelled() and self.promote_task.exception():
            raise DemoError(f"the promotion failed: {_task_error(self.promote_task)}")

    def _retrain_pending(self) -> str | None:
        if self.hourly_task is None or not self.hourly_task.done():
            return "the hourly retrain is not done yet"
        if self.hourly_version is not None and self.hourly_version not in self.served:
            return f"the worker does not serve the hourly retrain v{self.hourly_version} yet"
        if self.retrain_task is None:
            return "the retrained model has not been trained yet"
        if not self.retrain_task.done():
            return "the retrained model is still training"
        if self.promote_task is None:
            return (f"candidate v{self.retrained_version} has no agreement window measured "
                    "yet")
        if self.retrained_version is not None and self.retrained_version not in self.served:
            return f"the worker does not serve model v{self.retrained_version} yet"
        return None

    def _promotable(self) -> bool:
        """The candidate is marked, and the worker has measured at least one agreement window
        of it."""
        if self.retrained is None or self.worker is None:
            return False
        snap = self.worker.snapshot()
        return bool(snap.shadow_version == self.retrained_version and snap.shadow_evaluations > 0)

    async def _promote(self) -> None:
        from sensor_predictor.training import activate_model

        assert self.pool is not None and self.retrained is not None
        r = self.retrained
        snap = self.worker.snapshot()
        self.event(f"promoting candidate v{r.version} after {snap.shadow_predictions} readings "
                   f"in the shadow (last window: adjusted Rand index "
                   f"{_fmt(snap.shadow_ari)}, same stable id {_fmt(snap.shadow_same_id)}): "
                   "an ordinary activation")
        async with self.pool.acquire() as conn:
            await activate_model(conn, r.run_id, r.version, r.n_clusters, r.silhouette,
                                 r.profiles)

    async def _start_drift(self) -> None:
        assert self.pool is not None
        if self.sim is not None:
            await self.sim.finish()
            self.sim = None
        self.drift_from_id = int(await self.pool.fetchval(db.queries()["last_reading_id"]))
        self.sim = _Simulation(self.settings, self.opts.rate, drift=True, seed=2)
        self.event("the stream drifts: sensors 4-8 run hotter, failures come five times as often")

    async def _hourly_retrain(self) -> None:
        """What the old trainer does every hour: fit on the latest readings (the same stream)
        and activate at once. Its clusters keep their stable ids."""
        from sensor_predictor.training import train

        assert self.pool is not None
        n = int(await self.pool.fetchval(db.queries()["readings_after"], self.baseline_reading))
        self.event(f"the hourly retrain: fitting on the latest {n} readings ...")
        result = await train(self.settings, clusters=CLUSTERS, readings=max(n, 1),
                             min_readings=RETRAIN_MIN_READINGS, activate=True, seed=7)
        self.hourly_version = str(result.version)
        self.event(f"model v{result.version} trained on {result.n_readings} {result.source} "
                   f"readings and activated mid-stream: KMeans numbers its clusters anew, the "
                   "stable ids carry on (predictions by cluster id stay continuous)")

    async def _retrain(self) -> None:
        from sensor_predictor.training import train

        assert self.pool is not None and self.drift_from_id is not None
        n = int(await self.pool.fetchval(db.queries()["readings_after"], self.drift_from_id))
        if n >= RETRAIN_MIN_READINGS:
            self.event(f"retraining on the {n} drifted readings so far ...")
            readings, min_readings = n, RETRAIN_MIN_READINGS
        else:
            self.event(f"only {n} drifted readings: retraining on generated ones (the drift "
                       "will stay) ...")
            readings, min_readings = 5_000, 5_001  # more than asked for: generated readings
        from sensor_predictor.training import mark_candidate

        result = await train(self.settings, clusters=CLUSTERS, readings=readings,
                             min_readings=min_readings, activate=False, seed=1)
        async with self.pool.acquire() as conn:
            await mark_candidate(conn, result.run_id, result.version)
        self.retrained_version = str(result.version)
        self.retrained = result
        self.event(f"model v{result.version} trained on {result.n_readings} {result.source} "
                   f"readings (silhouette {result.silhouette:.3f}) and marked as the shadow "
                   "candidate (a row in model_candidates): scored beside the active model, "
                   "to be promoted mid-stream")

    async def _sample(self) -> Sample:
        assert self.pool is not None
        q = db.queries()
        max_id = int(await self.pool.fetchval(q["last_reading_id"]))
        backlog: int | None
        try:
            backlog = int(await self.pool.fetchval(q["backlog"]))
        except db.UNAVAILABLE:
            backlog = None
        return Sample(time.monotonic(), max_id, self.worker.snapshot(), backlog)

    def _notice_changes(self) -> None:
        snap = self.worker.snapshot()
        before = self.served[-1] if self.served else None
        version = self._serving()
        if version is not None and version != before:
            self.event(f"the worker now serves model v{version} (hot swap; the drift window "
                       "starts over)")
            self._drift_open = False
        if snap.drift_events > self._drift_events_seen:
            self._drift_events_seen = snap.drift_events
            self.event(f"drift detected on model v{version}: score "
                       f"{snap.drift_score or 0.0:.3f} > threshold "
                       f"{self.settings.drift_threshold:g} (a row in table drift)")
        elif snap.drift_detected and not self._drift_open:
            self.event(f"drift excursion of model v{version} still open")
        if self._drift_open and not snap.drift_detected:
            self.event(f"drift on model v{version} is over")
        self._drift_open = snap.drift_detected
        if snap.shadow_version is not None and snap.shadow_version != self._shadow_seen:
            self.event(f"the worker scores candidate v{snap.shadow_version} in the shadow, "
                       f"beside v{version} (table shadow_predictions)")
            self._shadow_windows_seen = 0
        elif snap.shadow_version is None and self._shadow_seen is not None:
            self.event(f"shadow scoring of v{self._shadow_seen} stopped (promoted); its rows "
                       "stay")
        self._shadow_seen = snap.shadow_version
        if snap.shadow_version is not None and snap.shadow_evaluations \
                and not self._shadow_windows_seen:
            self.event(f"candidate v{snap.shadow_version}, first agreement window: adjusted "
                       f"Rand index {_fmt(snap.shadow_ari)}, same stable id "
                       f"{_fmt(snap.shadow_same_id)}; its drift against its own training "
                       f"{_fmt(snap.shadow_drift_score)}, the active model's "
                       f"{_fmt(snap.drift_score)} (a row in shadow_evaluations)")
        self._shadow_windows_seen = snap.shadow_evaluations

    # -- the end --------------------------------------------------------------------------

    async def _finish(self) -> bool:
        """Stop everything, summarise, let go of PostgreSQL; True when the check holds."""
        self.console.keep_status()
        ok = False
        try:
            try:
                await self._wind_down()
            except Exception as exc:
                self.failure = self.failure or f"stopping failed: {describe(exc)}"
            if self.failure is not None:
                self.console.line(f"demo failed: {self.failure}")
            try:
                ok = await self._summary()
            except Exception as exc:
                self.console.line(f"no summary: {describe(exc)}")
        finally:
            if self.pool is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.pool.close(), timeout=10)
                self.pool = None
            await self._release_postgres()
        return ok

    async def _wind_down(self) -> None:
        if self.t0 is not None and not self.stream_seconds:
            self.stream_seconds = self._elapsed()
        if self.sim is not None:
            try:
                await self.sim.finish()
            except Exception as exc:
                self.failure = self.failure or f"the simulator failed: {describe(exc)}"
            self.sim = None
        for task in (self.mlflow_ready, self.hourly_task, self.retrain_task,
                     self.promote_task):
            if task is not None and not task.done():
                task.cancel()  # its thread, if any, runs to its end (asyncio.run waits)
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.worker_task is not None and not self.worker_task.done():
            if self.pool is not None and self.failure is None:
                timeout = 0.0 if self.hurry.is_set() else (
                    DRAIN_TIMEOUT_INTERRUPTED if self.signal is not None else DRAIN_TIMEOUT)
                await self._drain(timeout)
            self.worker.stop()
            try:
                await asyncio.wait_for(self.worker_task, timeout=30)
            except Exception as exc:
                self.failure = self.failure or f"the worker did not stop cleanly: " \
                                               f"{describe(exc)}"
        if self.worker is not None:
            self._serving()

    async def _drain(self, seconds: float) -> bool:
        assert self.pool is not None
        deadline = time.monotonic() + seconds
        said = False
        while True:
            try:
                backlog = int(await self.pool.fetchval(db.queries()["backlog"]))
            except db.UNAVAILABLE:
                return False
            if backlog == 0:
                return True
            if time.monotonic() >= deadline or self.hurry.is_set():
                self.event(f"stopping the worker with {backlog} reading(s) not scored yet")
                return False
            if not said:
                self.event(f"draining the backlog ({backlog} reading(s)) ...")
                said = True
            await self._sleep(0.1, self.hurry)

    async def _summary(self) -> bool:
        c = self.console
        if self.t0 is None and self.signal is None:
            return False  # failed during set-up: the failure says it all
        c.line()
        c.line("summary" + (" (interrupted)" if self.signal is not None else ""))
        if self.pool is None or self.t0 is None:
            c.line("  stopped during set-up: no readings were written")
            return self.signal is not None
        buckets = self.worker.snapshot().latency_buckets if self.worker is not None else []
        facts = await summary.gather(self.pool, self.baseline_reading, self.baseline_drift,
                                     buckets)
        lines, ok = summary.render(
            facts, stream_seconds=self.stream_seconds, target_rate=self.opts.rate,
            served=self.served, interrupted=self.signal is not None,
            extra=[("MLflow", f"{self.mlflow_uri} (kept; a new run starts a fresh one)"),
                   ("logs", f"{self._log_path()}")])
        for line in lines:
            c.line(line)
        return ok

    async def _release_postgres(self) -> None:
        pg, self.pg = self.pg, None
        if pg is None or pg.close is None:
            return
        try:
            await pg.close()
        except Exception as exc:
            self.console.line(f"could not release PostgreSQL: {describe(exc)}")
            self.failure = self.failure or "PostgreSQL could not be released"
            return
        if pg.kind == "env":
            self.console.line(f"dropped the scratch database {pg.database!r}")
        else:
            self.console.line(f"stopped and deleted the throwaway PostgreSQL; its log: "
                              f"{self.opts.workdir / 'postgres.log'}")
