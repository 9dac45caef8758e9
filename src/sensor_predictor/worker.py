"""The worker: wake-ups in, batches out, until SIGTERM; its lifecycle and its drain loop.

Longer than most modules (about 490 lines): the lifecycle, the drain loop and its lanes, and the
background tasks (listener, model and shadow candidate, poll, backlog) share the worker's state
and its shutdown; the pure parts (batch sizes, retry delays) are functions at the bottom,
unit-tested.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import os
import signal
import socket
import threading
import time
import uuid
import weakref
from dataclasses import replace
from typing import Any

import asyncpg
import structlog

from sensor_predictor import connect_errors, db, faults, model_fetch, widen_ids
from sensor_predictor.config import Settings
from sensor_predictor.connect_errors import Cause, ConnectFailed, ListenUnavailable
from sensor_predictor.doorbell import Doorbell
from sensor_predictor.drift_monitor import DriftMonitor
from sensor_predictor.listener import Listener
from sensor_predictor.metrics import Metrics, MetricsServer
from sensor_predictor.migrate import MigrationError, load_migrations, migrate
from sensor_predictor.model_cache import ModelCache
from sensor_predictor.model_holder import ModelHolder, configure_mlflow
from sensor_predictor.model_sources import SourcePolicy
from sensor_predictor.model_types import LoadedModel
from sensor_predictor.scoring import (
    PROGRESS,
    BatchResult,
    Claim,
    Ownership,
    claim_and_read,
    claim_next,
    find_orphans,
    release_lock,
    renew_leases,
    score_claim,
    take_orphan,
)
from sensor_predictor.shadow_scorer import ShadowScorer
from sensor_predictor.snapshot import WorkerSnapshot, take_snapshot

log = structlog.get_logger("sensor_predictor.worker")

BACKLOG_REFRESH_SECONDS = 5.0
# How often the orphan timer looks for claims whose owner is gone (a free advisory lock, an
# expired lease), in a quiet stream too: index probes over the claims it has not seen yet and
# those it saw alive. Every ORPHAN_FULL_LOOK_SECONDS it looks at every claim (a claim committed
# out of id order is found then).
ORPHAN_CHECK_SECONDS = 0.25
ORPHAN_FULL_LOOK_SECONDS = 10.0
# Behind (the last claim came back full), a lane doubles its claim up to this many times
# PREDICTION_BATCH_SIZE: a backlog drains in fewer, larger batches (each batch costs ~8 round
# trips whatever its size); caught up, it is back to PREDICTION_BATCH_SIZE.
DRAIN_BATCH_FACTOR = 10
# Of SHUTDOWN_GRACE_SECONDS, what is kept for closing the pool, flushing drift rows and the
# HTTP server once the lanes are done or cancelled (docs/faults.md).
CLEANUP_RESERVE_SECONDS = 2.0
# A claim taken over this many times (its worker died on it, again and again: a reading that
# kills the process) is scored in isolation at once (the dead-letter rule, docs/faults.md).
DEAD_LETTER_TAKEOVERS = 2
HEALTH_TICK_SECONDS = 1.0
# A pass starts with one lane; the others join when it is behind (a second claim in the pass
# found work), when a wake-up comes during the pass (its readings are claimed while the first
# lane writes and flushes), or when the first lane is still busy after this long (a slow batch
# never holds the rest of the stream). Caught up, a wake-up costs one claim, not one per lane.
LANE_JOIN_SECONDS = 0.05
# Retry delays (seconds): the first, and the ceiling they double up to.
CONNECT_BACKOFF = (0.2, 5.0)  # the database is not reachable at the start
CONFIG_BACKOFF = (0.2, 30.0)  # a configuration error: it heals only when someone fixes it
# Transaction mode: how long the listen connection gets to hear its own probe notification.
LISTEN_PROBE_CHANNEL = "sensor_listen_probe"
LISTEN_PROBE_SECONDS = 3.0
EXIT_CONFIG = 2
RETRY_BACKOFF = (0.1, 5.0)  # a pass failed (database gone, a batch failed)
# A debugging aid, not a setting: SENSOR_PREDICTOR_LATENCY_TRACE=1 logs one `latency_trace`
# line per batch with the wall-clock times of its wake-up, claim and write (docs/performance.md
# tells how to read them against the readings' commit timestamps). Off: one boolean test.
LATENCY_TRACE = os.environ.get("SENSOR_PREDICTOR_LATENCY_TRACE", "") not in ("", "0")


class Worker:
    def __init__(self, settings: Settings, metrics: Metrics | None = None, *,
                 fetch_in_thread: bool = False) -> None:
        """`fetch_in_thread`: models the cache does not hold are fetched in a thread of this
        process, not a child (ModelHolder.fetch_in_thread): for a host process that has
        imported MLflow and scikit-learn anyway, the demo's."""
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        cache = (None if settings.model_cache_dir == "off"
                 else ModelCache(settings.model_cache_dir, settings.mlflow_tracking_uri))
        # Models only from where the operator allows (MODEL_SOURCES_ALLOWED).
        sources = SourcePolicy(settings.mlflow_tracking_uri, settings.model_sources_allowed)
        self.holder = ModelHolder(settings.model_name, on_failure=self._model_failed,
                                  cache=cache, sources=sources)
        # The shadow candidate (model_candidates), aligned against the model served now.
        self.shadow = ShadowScorer(settings, self.metrics)
        self.candidate_holder = ModelHolder(
            settings.model_name, on_failure=self.shadow.load_failed, cache=cache,
            role="candidate", reference=self._active_version, sources=sources)
        self.drift = DriftMonitor(settings, self.metrics)
        # A fetch process kept ready once a model is served (model_fetch.Standby): a swap to a
        # model not cached then skips the child's start and its import of MLflow.
        self.standby = model_fetch.Standby(settings.mlflow_tracking_uri)
        self.holder.standby = self.candidate_holder.standby = self.standby
        self.holder.fetch_in_thread = self.candidate_holder.fetch_in_thread = fetch_in_thread
        self._standby_task: asyncio.Task[None] | None = None
        self.pool: asyncpg.Pool | None = None
        self.listener = Listener(settings, on_readings=self._notified_readings,
                                 on_model=self._notified_model, on_connected=self._listening,
                                 on_lost=self._listen_lost, on_deaf=self._listener_deaf)
        # Why the database cannot be used now, while the start-up connection is retried.
        self.db_problem: Cause | None = None
        self.metrics_server = MetricsServer(self.metrics, self.readiness)
        # Writers notify only while this worker may be asleep (doorbell.py); none in POLL_ONLY.
        self.doorbell = None if settings.poll_only else Doorbell(settings, self.wake)
        self._wake = asyncio.Event()
        self._behind = asyncio.Event()  # a lane of this pass found more than one claim's work
        self._model_event = asyncio.Event()
        self._stopping = asyncio.Event()
        # Set when the listen connection comes back: the database is reachable again.
        self._reconnected = asyncio.Event()
        # Every connection the pool opened (asyncpg has no public list of them), with the
        # time.monotonic() it was opened at; and when the listen connection was last lost.
        self._connections: weakref.WeakKeyDictionary[asyncpg.Connection, float] = (
            weakref.WeakKeyDictionary())
        self._lost_at = 0.0
        self._tasks: list[asyncio.Task[Any]] = []
        # Claims the orphan timer found takeable; the lanes take them over.
        self._orphans: set[int] = set()
        # Claims this worker is scoring (their leases are renewed in transaction mode), with
        # how many lanes score each: a lane that took back its own worker's claim (a lease
        # that lapsed) holds the same id as the lane that first had it.
        self._in_flight: collections.Counter[int] = collections.Counter()
        self.lease_seconds = (settings.claim_lease_seconds if settings.pool_mode == "transaction"
                              else None)
        # sensor_id_headroom_ratio last seen, by table (a warning when it crosses a threshold).
        self._headroom_seen: dict[str, float] = {}
        self.health = faults.TaskHealth()
        self._deadline: float | None = None  # time.monotonic() by which the process exits
        self._mismatch_since: float | None = None  # active model != served, since
        self._watchdog: threading.Timer | None = None
        self._arm_watchdog = False
        self.exit_code = 0
        # LATENCY_TRACE: notification arrivals not yet served, and the pass now running's
        # (first arrival, start).
        self._trace_wakes: list[float] = []
        self._trace_pass: tuple[float | None, float] = (None, 0.0)
        self.metrics.drift_threshold.set({}, settings.drift_threshold)
        self.metrics.drift_p_value_threshold.set({}, settings.drift_p_value)

    # -- signals from the outside ----------------------------------------------------------

    def stop(self) -> None:
        if not self._stopping.is_set():
            grace = self.settings.shutdown_grace_seconds
            log.info("shutdown_requested", grace_s=grace)
            self._deadline = time.monotonic() + grace
            if self._arm_watchdog:
                # The last resort, should the event loop itself be stuck: the process ends at
                # the deadline whatever it is doing (a claim not committed is taken over).
                self._watchdog = threading.Timer(grace, _deadline_exceeded, args=(grace,))
                self._watchdog.daemon = True
                self._watchdog.start()
            self._stopping.set()
            self._wake.set()
            self._update_ready()

    def wake(self, cause: str) -> None:
        # Counted as they arrive; the drain loop coalesces them into one pass.
        self.metrics.wakeups.inc({"cause": cause})
        self._wake.set()

    def _notified_readings(self) -> None:
        if LATENCY_TRACE:
            self._trace_wakes.append(time.time())
        self.wake("notification")

    def _notified_model(self) -> None:
        self._model_event.set()

    def _listening(self, first: bool) -> None:
        if not first:
            self.metrics.db_reconnects.inc({"connection": "listener"})
            # Whatever broke the listen connection (a restart, a dead network path) most likely
            # broke the pooled ones too. A half-open one answers nothing, not even a cancel or
            # a graceful close, and a batch on it would hold every wake-up for command_timeout:
            # drop them all at once (the pool opens new ones). A range claimed and not
            # committed stays claimed; the orphan hunt gives it out again, exactly once.
            # Only those older than the loss: one opened since is on the new path, and may be in
            # the middle of the first batch after the outage.
            for connection, opened_at in list(self._connections.items()):
                if opened_at < self._lost_at:
                    connection.terminate()
            if self.doorbell is not None:  # its session too: a bell asked for on a dead path
                self.doorbell.path_lost()  # is never granted, and writers would not notify
            self._reconnected.set()
        # Whatever was notified while nobody listened: look now, and re-check the model.
        self._model_event.set()
        self.wake("startup" if first else "reconnect")
        self._update_ready()

    def _listener_deaf(self, reason: str) -> None:
        self.metrics.listener_deaf.inc({})

    def _listen_lost(self) -> None:
        self._lost_at = time.monotonic()
        self._update_ready()

    def _active_version(self) -> str | None:
        model = self.holder.current
        return None if model is None else model.version

    def _model_failed(self, reason: str) -> None:
        self.metrics.model_load_failures.inc({"reason": reason})

    def _remaining(self) -> float:
        """Seconds left before the shutdown deadline (the whole grace before a stop)."""
        if self._deadline is None:
            return self.settings.shutdown_grace_seconds
        return max(0.0, self._deadline - time.monotonic())

    def model_mismatch_seconds(self) -> float:
        """How long the active model (the clusters row last read) has differed from the one
        served; 0 while they agree."""
        seen = self.holder.last_seen_row
        served = self.holder.current.row if self.holder.current is not None else None
        if seen == served:
            self._mismatch_since = None
            return 0.0
        if self._mismatch_since is None:
            self._mismatch_since = time.monotonic()
        return time.monotonic() - self._mismatch_since

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        model = self.holder.current
        listening = self.listener.listening or self.settings.poll_only
        mismatch = self.model_mismatch_seconds()
        seen = self.holder.last_seen_row
        down = self.health.report()
        detail: dict[str, Any] = {
            "listening": self.listener.listening,
            "pool": self.pool is not None,
            "model_version": model.version if model else None,
            "active_model_version": seen.model_version if seen else None,
            "model_mismatch_s": round(mismatch, 1),
            "tasks_down": down,
            "stopping": self._stopping.is_set(),
        }
        # Which part is missing, in words.
        missing: dict[str, str] = {}
        if self.pool is None or self.db_problem is not None:
            missing["database"] = (self.db_problem.line() if self.db_problem is not None
                                   else "not connected yet")
        if not listening:
            problem = self.listener.problem
            missing["listener"] = problem.line() if problem is not None else "not listening"
        if model is None:
            missing["model"] = "no model served yet"
        if missing:
            detail["missing"] = missing
        if self.settings.poll_only:
            detail["poll_only"] = True
        ready = (listening and self.pool is not None and model is not None
                 and self.db_problem is None and not self._stopping.is_set() and not down
                 and mismatch <= self.settings.model_mismatch_ready_seconds)
        return ready, detail

    def snapshot(self) -> WorkerSnapshot:
        """What it serves and has done so far, for an in-process watcher (the demo)."""
        model, candidate = self.holder.current, self.shadow.candidate
        return take_snapshot(self.metrics, ready=self.readiness()[0],
                             model_version=None if model is None else str(model.version),
                             metrics_port=self.metrics_server.port or None,
                             shadow_version=None if candidate is None else candidate.version)

    def _update_ready(self) -> None:
        self.metrics.model_mismatch.set({}, self.model_mismatch_seconds())
        self.metrics.ready.set({}, 1 if self.readiness()[0] else 0)

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self, *, handle_signals: bool = True) -> int:
        """Serve until stop() (SIGTERM / SIGINT by default); returns the exit code."""
        if handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
            self._arm_watchdog = True  # a process of its own: it may end itself at the deadline
        log.info("worker_starting", worker=self.name, **self.settings.describe())
        configure_mlflow(self.settings.mlflow_tracking_uri)
        try:
            try:
                await self.metrics_server.start(self.settings.metrics_host,
                                                self.settings.metrics_port)
            except OSError as exc:
                log.error("metrics_server_failed", host=self.settings.metrics_host,
                          port=self.settings.metrics_port, error=str(exc))
                return 1
            log.info("metrics_serving", host=self.settings.metrics_host,
                     port=self.metrics_server.port)
            try:
                if not await self._connect():
                    return self.exit_code
            except ListenUnavailable as exc:
                if exc.cause.kind == "migrations_pending":
                    log.error("cannot_start", cause=exc.cause.kind, error=exc.cause.line())
                else:
                    log.error("listen_connection_unusable", cause=exc.cause.kind,
                              error=exc.cause.line(),
                              note="POSTGRES_POOL_MODE=transaction: the worker does not run "
                                   "deaf; set POSTGRES_LISTEN_HOST/POSTGRES_LISTEN_PORT to the "
                                   "server or a session-mode pool, or POLL_ONLY=true to wake "
                                   "by polling only")
                return EXIT_CONFIG
            pool = self.pool
            assert pool is not None
            self._tasks = [
                self._supervised("model", self._watch_model),
                self._supervised("poll", self._poll),
                self._supervised("backlog", self._watch_backlog),
                self._supervised("shadow", lambda: self.shadow.run(pool)),
                self._supervised("drift-writer", lambda: self.drift.run_writer(pool)),
                self._supervised("health", self._health),
                self._supervised("orphans", self._watch_orphans),
            ]
            lease_seconds = self.lease_seconds
            if lease_seconds is not None:
                self._tasks.append(
                    self._supervised("leases", lambda: self._renew_leases(lease_seconds)))
            if self.settings.poll_only:
                log.warning("poll_only", interval_s=self.settings.inference_interval_seconds,
                            note="POLL_ONLY=true: no LISTEN; new readings wait for the next poll")
                self._listening(True)
            else:
                self._tasks.append(self._supervised("listener", self.listener.run))
            if self.doorbell is not None:
                self._tasks.append(self._supervised("doorbell", self.doorbell.run))
            await self._drain_until_stopped()
        finally:
            await self._shutdown()
            if self._watchdog is not None:
                self._watchdog.cancel()
        return self.exit_code

    def _supervised(self, name: str, run: Any) -> asyncio.Task[None]:
        return asyncio.create_task(
            faults.supervise(name, run, stopping=self._stopping, health=self.health,
                             on_restart=self._task_restarted), name=name)

    def _task_restarted(self, name: str) -> None:
        self.metrics.task_restarts.inc({"task": name})
        self._update_ready()

    async def _health(self) -> None:
        """The served-vs-active gauge and the ready gauge, every HEALTH_TICK_SECONDS."""
        while True:
            self._update_ready()
            await asyncio.sleep(HEALTH_TICK_SECONDS)

    async def _until_stopped(self, work: Any) -> tuple[bool, Any]:
        """(True, its result) when `work` (a coroutine) finishes first; (False, None) when a stop
        comes first: then it is cancelled (and a running statement with it)."""
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if task.done():
            return True, task.result()
        task.cancel()
        await asyncio.wait({task}, timeout=max(0.1, min(1.0, self._remaining() - 1)))
        return False, None

    async def _drain_until_stopped(self) -> None:
        """The drain loop, until a stop: lanes then finish the batch in hand, until the
        deadline less CLEANUP_RESERVE_SECONDS; those still busy are cancelled (their claims are
        left for a takeover)."""
        drain = asyncio.create_task(self._drain_forever(), name="drain")
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({drain, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not drain.done():
            budget = max(0.0, self._remaining() - CLEANUP_RESERVE_SECONDS)
            await asyncio.wait({drain}, timeout=budget)
        if not drain.done():
            log.warning("lanes_cancelled", note="the shutdown deadline came: claims not "
                        "committed are left for a takeover")
            drain.cancel()
            await asyncio.wait({drain}, timeout=0.5)
            return
        drain.result()

    async def _connect(self) -> bool:
        """Migrate (unless told not to) and open the pool, retrying while the database is down.

        An outage (server down or starting, network cut, no primary yet) is retried quietly; a
        configuration error (a refused login, an unknown database, a TLS failure, a pooler
        refusing a startup parameter) is named, with the variable to change, once per retry,
        with a backoff up to CONFIG_BACKOFF[1], and /ready says it. In transaction mode the
        listen connection must be usable first (ListenUnavailable: the worker does not start).
        """
        s = self.settings
        log.info("database_connection", pool_mode=s.pool_mode,
                 statement_cache=("off (transaction pooler)" if s.pool_mode == "transaction"
                                  else "on"),
                 hosts=[f"{h}:{p}" for h, p in s.endpoints],
                 listen=("off (POLL_ONLY=true)" if s.poll_only
                         else [f"{h}:{p}" for h, p in s.listen_endpoints]),
                 target_session_attrs=s.target_session_attrs,
                 connect_timeout_s=s.connect_timeout, **db.describe_tls(s))
        backoff = CONNECT_BACKOFF[0]
        while not self._stopping.is_set():
            try:
                if s.pool_mode == "transaction" and not s.poll_only:
                    await self._transaction_mode_start()
                elif s.pool_mode == "transaction" and s.migrate_on_start:
                    await self._check_migrated_through_pooler()
                elif s.migrate_on_start:
                    finished, _ = await self._until_stopped(self._migrate())
                    if not finished:
                        log.info("migration_interrupted", note="stopped; the next start "
                                 "resumes it (an invalid index is rebuilt)")
                        return False
                finished, pool = await self._until_stopped(db.create_pool(
                    s, size=s.prediction_concurrency + 3, init=self._track_connection))
                if not finished:
                    return False
                self.pool = pool
                self.db_problem = None
                return True
            except ListenUnavailable:
                raise
            except MigrationError as exc:
                log.error("migration_failed", error=str(exc), reason=exc.reason)
                self.exit_code = 1
                return False
            except db.UNAVAILABLE as exc:
                cause = connect_errors.classify(exc)
                self.db_problem = cause
                self._update_ready()
                if cause.transient:
                    log.warning("database_unavailable", cause=cause.kind, error=cause.message,
                                retry_in_s=backoff)
                else:
                    log.error("database_misconfigured", cause=cause.kind,
                              error=cause.message, change=cause.variable, retry_in_s=backoff)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=backoff)
                backoff = next_backoff(
                    backoff, CONNECT_BACKOFF if cause.transient else CONFIG_BACKOFF)
        return False

    async def _check_migrated_through_pooler(self) -> None:
        """Transaction mode without a listen connection (POLL_ONLY): the migration lock is a
        session lock, which a transaction pooler cannot keep. Skipped when every migration is
        applied already (the log says so); otherwise the worker does not start."""
        conn = await db.connect(self.settings, timeout=10, statement_cache_size=0)
        try:
            try:
                applied = {r["version"] for r in await conn.fetch(
                    db.queries()["migrations_applied"])}
            except asyncpg.UndefinedTableError:
                applied = set()
        finally:
            await conn.close()
        pending = [m.version for m in load_migrations() if m.version not in applied]
        if pending:
            raise ListenUnavailable(connect_errors.config(
                "migrations_pending",
                f"migrations {pending} are not applied, and a transaction pooler cannot hold "
                "the migration lock (POLL_ONLY=true: no listen connection to take it over)",
                "run `sensor-predictor migrate` against the server itself, or set "
                "POSTGRES_LISTEN_HOST"))
        log.info("migrations_skipped", reason="transaction mode, poll only: every migration "
                 "is applied already", version=max(applied, default=0))

    async def _transaction_mode_start(self) -> None:
        """Behind a transaction pooler: the listen connection (a session of its own) must hear a
        notification sent through the main connection, or the worker refuses to start; the
        migrations take their session lock over it (never over the pooler)."""
        s = self.settings
        try:
            listen = await db.connect(s, listen=True, timeout=10,
                                      application_name="sensor-predictor-listener")
        except ConnectFailed as exc:
            if exc.cause.transient:
                raise
            raise ListenUnavailable(exc.cause, exc.tried) from exc
        try:
            heard = asyncio.Event()
            await listen.add_listener(LISTEN_PROBE_CHANNEL, lambda *_a: heard.set())
            sender = await db.connect(s, timeout=10, statement_cache_size=0)
            try:
                await sender.fetchval(db.queries()["listen_probe_notify"],
                                      LISTEN_PROBE_CHANNEL, self.name)
            finally:
                await sender.close()
            try:
                await asyncio.wait_for(heard.wait(), timeout=LISTEN_PROBE_SECONDS)
            except TimeoutError:
                where = ", ".join(f"{h}:{p}" for h, p in s.listen_endpoints)
                raise ListenUnavailable(connect_errors.config(
                    "listen_deaf",
                    f"the listen connection ({where}) did not hear a notification sent through "
                    f"the main connection in {LISTEN_PROBE_SECONDS:g} s (is it the "
                    "transaction pooler itself?)",
                    "POSTGRES_LISTEN_HOST / POSTGRES_LISTEN_PORT")) from None
            log.info("listen_connection_verified", hosts=s.listen_endpoints,
                     encrypted=db.is_encrypted(listen))
            if s.migrate_on_start:
                log.info("migrations_over_listen_connection",
                         note="transaction mode: the migration lock is a session lock, taken "
                              "over the listen connection (a session of its own)")
                await migrate(listen)
        finally:
            await listen.close()

    async def _migrate(self) -> None:
        conn = await db.connect(self.settings, timeout=10)
        try:
            await migrate(conn, lock_wait_seconds=self.settings.migration_wait_seconds,
                          side_connection=lambda: db.connect(self.settings, timeout=10))
        finally:
            # Not a graceful close: after a cancelled statement it may wait for an answer.
            conn.terminate()

    async def _track_connection(self, connection: asyncpg.Connection) -> None:
        self._connections[connection] = time.monotonic()

    async def _shutdown(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # A task stuck on a half-open connection cannot even have its query cancelled (the
            # cancellation's answer never comes back): it must not hold the exit up.
            await asyncio.wait(self._tasks, timeout=min(1.0, max(0.1, self._remaining() - 1.5)))
        await self.drift.flush(within_seconds=min(5.0, max(0.1, self._remaining() - 1.2)))
        if self.pool is not None:
            try:
                await asyncio.wait_for(self.pool.close(),
                                       timeout=min(1.0, max(0.1, self._remaining() - 0.5)))
            except Exception:  # a connection that does not answer: drop them all
                self.pool.terminate()
            self.pool = None
        await self.metrics_server.stop()
        log.info("worker_stopped", worker=self.name)

    # -- background tasks -------------------------------------------------------------------

    async def _poll(self) -> None:
        """The fallback: every INFERENCE_INTERVAL_SECONDS, look for readings and a new model."""
        while True:
            await asyncio.sleep(self.settings.inference_interval_seconds)
            self._model_event.set()
            self.wake("poll")

    async def _watch_model(self) -> None:
        """Follow the active clusters row (and the shadow candidate). A check that fails, for
        whatever reason, is retried with backoff; meanwhile the task shows as down on /ready."""
        assert self.pool is not None
        backoff = faults.RESTART_BACKOFF[0]
        while True:
            retries = [h.retry_at for h in (self.holder, self.candidate_holder)
                       if h.retry_at is not None]
            timeout = max(0.0, min(retries) - time.monotonic()) if retries else None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._model_event.wait(), timeout=timeout)
            self._model_event.clear()
            try:
                if await self.holder.refresh(self.pool):
                    await self._model_changed(self.holder.current)
                # After the active model: a promoted candidate is no candidate any more.
                await self._refresh_candidate()
            except Exception as exc:
                kind = faults.classify(exc)
                (log.error if kind in (faults.CONFIGURATION, faults.BUG) else log.warning)(
                    "model_check_failed", error=faults.describe(exc), kind=kind,
                    retry_in_s=backoff)
                self.health.mark_down("model", faults.describe(exc))
                self._update_ready()
                if kind == faults.CONFIGURATION:
                    backoff = faults.RESTART_BACKOFF[1]
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, faults.RESTART_BACKOFF[1])
                self._model_event.set()
                continue
            backoff = faults.RESTART_BACKOFF[0]
            if "model" in self.health.down:
                self.health.mark_up("model")
                log.info("model_check_recovered")
            self._update_ready()  # the mismatch gauge follows what the check saw

    async def _refresh_candidate(self) -> None:
        """Follow model_candidates; whatever goes wrong there never stops the active model's
        watch (a schema without migration 0006 under --no-migrate, say): logged, counted."""
        assert self.pool is not None
        try:
            changed = await self.candidate_holder.refresh(self.pool)
        except asyncpg.PostgresError as exc:
            if isinstance(exc, db.UNAVAILABLE):
                raise  # the database went away: the model watch retries
            self.shadow.load_failed("load_failed")
            log.error("shadow_candidate_check_failed", error=f"{type(exc).__name__}: {exc}")
            return
        if changed:
            await self.shadow.candidate_changed(self.candidate_holder.current)

    async def _model_changed(self, model: LoadedModel | None) -> None:
        assert self.pool is not None
        self.metrics.set_model(model)
        self._update_ready()
        delay = self.settings.fetch_standby_delay_seconds
        if (model is not None and delay is not None and self._standby_task is None
                and not self._stopping.is_set()):
            # After the first model, never before: a start-up does not share the CPU with it.
            self._standby_task = self._supervised("fetch-standby",
                                                  lambda: self.standby.run(delay))
            self._tasks.append(self._standby_task)
        if model is not None:
            try:  # a candidate promoted: its shadow scoring ends, its rows stay
                await self.pool.execute(db.queries()["mark_candidate_promoted"], model.run_id)
            except Exception as exc:
                log.warning("candidate_not_marked_promoted", error=faults.describe(exc))
            # The swap has happened (the holder serves the new model): nothing here may undo
            # it or end the model watch. Drift tracking that cannot start is logged.
            try:
                await self.drift.start_model(model, self.pool)
            except Exception as exc:
                log.error("drift_start_failed", model_version=model.version,
                          error=faults.describe(exc), exc_info=exc)
            self.wake("model")
            # What start-up and the model built stays for the process's life: out of the
            # collector's way (a full collection walks every tracked object on the event loop:
            # 40 ms here for the worker alone; MLflow's and scikit-learn's imports, which made
            # it 170-190 ms, now live in the fetch process: model_fetch.py).
            gc.freeze()
        self._update_ready()

    async def _watch_backlog(self) -> None:
        """The backlog gauge, and the transactions still open that hold readings back."""
        assert self.pool is not None
        first_seen: dict[str, float] = {}
        while True:
            started = time.monotonic()
            try:
                backlog = await self.pool.fetchval(db.queries()["backlog"])
                self.metrics.backlog.set({}, int(backlog))
                rows = await self.pool.fetch(db.queries()["open_reading_transactions"])
                now = time.monotonic()
                # Where the server hides a transaction's start (another role's session), its
                # age is at least how long this worker has seen it open.
                first_seen = {r["vxid"]: first_seen.get(r["vxid"], now) for r in rows}
                ages = [max(r["age_seconds"] or 0.0, now - first_seen[r["vxid"]]) for r in rows]
                self.metrics.open_reading_transactions.set({}, len(rows))
                self.metrics.open_reading_transaction_age.set({}, max(ages, default=0.0))
                await self._id_headroom()
                self.health.mark_up("backlog")
            except Exception as exc:
                kind = faults.classify(exc)
                if kind != faults.UNAVAILABLE:  # the listener reports a database gone
                    log.warning("backlog_check_failed", error=faults.describe(exc), kind=kind)
                if kind in (faults.CONFIGURATION, faults.BUG):
                    self.health.mark_down("backlog", faults.describe(exc))
            # A big backlog (an adopted database) takes a while to count: never more than a
            # tenth of this task's time.
            took = time.monotonic() - started
            await asyncio.sleep(max(BACKLOG_REFRESH_SECONDS, 10 * took))

    async def _id_headroom(self) -> None:
        """sensor_id_headroom_ratio (a sequence read and one index probe), and a warning when
        a table's headroom falls below a half, then below a tenth."""
        assert self.pool is not None
        for row in await self.pool.fetch(db.queries()["id_headroom"]):
            table = row["tbl"]
            ratio = widen_ids.headroom(row["id_max"], row["id_used"])
            self.metrics.id_headroom.set({"table": table}, ratio)
            threshold = widen_ids.crossed(self._headroom_seen.get(table), ratio)
            self._headroom_seen[table] = ratio
            if threshold is not None:
                log.warning("id_headroom_low", table=table, headroom_ratio=round(ratio, 4),
                            below=threshold, highest_id=int(row["id_used"]),
                            id_max=int(row["id_max"]),
                            action="run `sensor-predictor widen-ids` (online) before the ids "
                                   "run out: then every writer fails")

    # -- the drain loop ---------------------------------------------------------------------

    async def _drain_forever(self) -> None:
        backoff = RETRY_BACKOFF[0]
        while not self._stopping.is_set():
            await self._wake.wait()
            if self._stopping.is_set():
                break
            self._wake.clear()
            self._reconnected.clear()
            if LATENCY_TRACE:
                first = self._trace_wakes[0] if self._trace_wakes else None
                self._trace_pass, self._trace_wakes = (first, time.time()), []
            bell = self.doorbell.pass_starts() if self.doorbell is not None else None  # doorbell
            outcomes = await self._run_lanes()
            failure = next((o for o in outcomes if isinstance(o, BaseException)), None)
            if self.doorbell is not None:  # doorbell: arm again (or keep it: this pass looked)
                self.doorbell.pass_ends(bell, ok=failure is None)
            if failure is None:
                backoff = RETRY_BACKOFF[0]
                if self.db_problem is not None or "drain" in self.health.down:
                    self.db_problem = None
                    self.health.mark_up("drain")
                    self._update_ready()
                continue
            cause = (connect_errors.classify(failure)
                     if isinstance(failure, (*db.UNAVAILABLE, asyncpg.PostgresError)) else None)
            if cause is not None and not cause.transient:
                # A new pooled connection refused (a password rotated, a pooler reconfigured):
                # named, on /ready too, and retried with a longer backoff.
                self.db_problem = cause
                self._update_ready()
                log.error("database_misconfigured", cause=cause.kind, error=cause.message,
                          change=cause.variable, retry_in_s=backoff)
                await _wait_any(self._stopping, timeout=backoff)
                backoff = next_backoff(backoff, CONFIG_BACKOFF)
                self.wake("retry")
                continue
            kind = faults.classify(failure)
            if kind != faults.BUG:  # the database refuses the work: /ready says so
                self.health.mark_down("drain", faults.describe(failure))
                self._update_ready()
            if kind == faults.UNAVAILABLE:
                self.metrics.db_reconnects.inc({"connection": "pool"})
                log.warning("database_unavailable", error=str(failure) or type(failure).__name__,
                            retry_in_s=backoff)
            elif kind == faults.TRANSIENT:
                log.warning("database_busy", error=faults.describe(failure), retry_in_s=backoff)
            else:
                # Not the database's state: one claim's own trouble (its readings were already
                # scored in isolation, see _score). The others' work must not wait for it: the
                # next pass starts at once, and the failed claim is taken over by it.
                log.error("batch_failed", error=faults.describe(failure), kind=kind,
                          exc_info=failure)
                await _wait_any(self._stopping, timeout=RETRY_BACKOFF[0])
                self.wake("retry")
                continue
            # Back off, but not past the moment the listener is connected again.
            await _wait_any(self._stopping, self._reconnected, timeout=backoff)
            backoff = retry_backoff(backoff, reconnected=self._reconnected.is_set())
            self.wake("retry")

    async def _run_lanes(self) -> list[Any]:
        """One pass: the first lane at once, the others when they can help (LANE_JOIN_SECONDS);
        their outcomes (an exception for a lane that failed)."""
        self._behind.clear()
        tasks = [asyncio.ensure_future(self._lane())]
        try:
            if self.settings.prediction_concurrency > 1:
                behind = asyncio.ensure_future(self._behind.wait())
                woken = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait({tasks[0], behind, woken}, timeout=LANE_JOIN_SECONDS,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    behind.cancel()
                    woken.cancel()
                if not tasks[0].done():
                    if self._wake.is_set() and not self._stopping.is_set():
                        # Served by the lanes starting now: each claims after this wake-up.
                        self._wake.clear()
                    tasks += [asyncio.ensure_future(self._lane())
                              for _ in range(self.settings.prediction_concurrency - 1)]
            return list(await asyncio.gather(*tasks, return_exceptions=True))
        finally:
            for task in tasks:  # cancelled (a shutdown): the lanes with it
                task.cancel()

    async def _lane(self) -> None:
        """Claim and score batches until none is left (or shutdown); one of several in parallel."""
        assert self.pool is not None
        size = self.settings.prediction_batch_size
        scored = 0
        own = Ownership(self.lease_seconds, None, self._reanchored)
        # One connection for the whole pass: a release per batch costs a reset round trip. In
        # session mode a claim's advisory lock belongs to this session; the next claim call
        # releases it (own.release), or the end of the pass does.
        async with self.pool.acquire() as conn:
            try:
                while not self._stopping.is_set():
                    model = self.holder.current
                    if model is None:
                        return  # no model yet: readings wait, nothing is claimed
                    claim: Claim | None = None
                    # Orphans the timer found are taken once new work is handed out, so that a
                    # wake-up's readings never wait for them.
                    if scored and self._orphans:
                        claim, own = await self._take_orphan(conn, own)
                    claim_sent = time.time() if LATENCY_TRACE else 0.0
                    if claim is None:
                        # Caught up, the read comes with the claim (one round trip less, for
                        # latency); behind, it comes after the claim's commit, so that the
                        # cursor row is not locked while a large batch is read and other lanes
                        # can claim.
                        handed = (await claim_and_read(conn, self.name, size, model, own)
                                  if size <= 2 * self.settings.prediction_batch_size
                                  else await claim_next(conn, self.name, size, own))
                        own = replace(own, release=None)
                        if (scored and handed is not None) or handed is PROGRESS:
                            self._behind.set()  # more than one claim's work: the others join
                        if handed is PROGRESS:  # only already-scored rows: behind
                            size = next_batch_size(size, size,
                                                   self.settings.prediction_batch_size)
                            continue
                        if handed is None:
                            if not self._orphans:
                                return
                            claim, own = await self._take_orphan(conn, own)
                            if claim is None:
                                return
                        else:
                            assert isinstance(handed, Claim)
                            claim = handed
                            if self.doorbell is not None:  # doorbell: awake, not a mere look
                                self.doorbell.work_found()
                    claim_back = time.time() if LATENCY_TRACE else 0.0
                    self._in_flight[claim.claim_id] += 1
                    try:
                        result = await self._score(conn, claim, model)
                    finally:
                        self._in_flight[claim.claim_id] -= 1
                        if self._in_flight[claim.claim_id] <= 0:
                            del self._in_flight[claim.claim_id]
                    if claim.locked:
                        own = replace(own, release=claim.claim_id)
                    scored += 1
                    if result is None:
                        self._late(claim)
                        continue
                    if LATENCY_TRACE:
                        self._trace(claim, result, claim_sent, claim_back)
                    self._record(result)
                    size = next_batch_size(size, size if claim.full else result.size,
                                           self.settings.prediction_batch_size)
                    if (scored == 1 and not claim.full and claim.previous_worker is None
                            and not self._orphans):
                        # A caught-up wake-up: this pass's first claim handed out the cursor's
                        # whole interval. A claim now would find nothing, at a claim's cost to
                        # the server: the doorbell's look after its grant (doorbell.py) is the
                        # one that makes sure, off this reading's path. Behind (several claims
                        # in this pass), the lane goes on until a claim finds nothing: a pass
                        # ending at every interval would ask for the bell, and writers notify
                        # while the request waits and during the look.
                        return
            finally:
                if own.release is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await release_lock(conn, own.release)

    async def _score(self, conn: asyncpg.Connection, claim: Claim, model: LoadedModel
                     ) -> BatchResult | None:
        """score_claim, under the dead-letter rule (docs/faults.md): a claim that fails for
        anything but the database's state, or that was taken over DEAD_LETTER_TAKEOVERS times
        (its workers died on it), is scored in isolation: whatever breaks is one reading's error
        row, and the rest of the claim is scored."""
        # A claim taken over carries its takeovers count (the token its results must quote).
        isolated = claim.previous_worker is not None and claim.token >= DEAD_LETTER_TAKEOVERS
        if not isolated:
            try:
                return await score_claim(conn, claim, model)
            except Exception as exc:
                if faults.is_database_fault(exc):
                    raise
                log.warning("claim_isolated", claim=claim.claim_id,
                            readings=len(claim.reading_ids), error=faults.describe(exc),
                            cause="failed")
        else:
            log.warning("claim_isolated", claim=claim.claim_id, readings=len(claim.reading_ids),
                        cause="taken_over", min_takeovers=DEAD_LETTER_TAKEOVERS)
        self.metrics.claims_isolated.inc({})
        return await score_claim(conn, claim, model, isolated=True)

    async def _take_orphan(self, conn: asyncpg.Connection, own: Ownership
                           ) -> tuple[Claim | None, Ownership]:
        """One of the orphans the timer found, taken over by this lane (None: all gone)."""
        taken = await take_orphan(conn, self.name, self.settings.claim_orphan_seconds,
                                  sorted(self._orphans), own)
        own = replace(own, release=None)
        if taken is None:
            self._orphans.clear()  # taken by others, or written meanwhile
            return None, own
        claim, age = taken
        self._orphans.discard(claim.claim_id)
        self.metrics.claims_taken_over.inc({})
        log.warning("orphan_claim_recovered", claim=claim.claim_id,
                    readings=len(claim.reading_ids), previous_worker=claim.previous_worker,
                    claim_age_s=round(age, 3))
        return claim, own

    def _trace(self, claim: Claim, result: BatchResult, claim_sent: float,
               claim_back: float) -> None:
        """One batch's life in wall-clock seconds (LATENCY_TRACE): the first notification the
        pass served, the pass's start, the claim (with its read) sent and answered, the result
        statement sent and committed."""
        done = time.time()
        notified, pass_start = self._trace_pass
        log.info("latency_trace", first_id=min(claim.reading_ids), rows=result.size,
                 notified=notified, pass_start=pass_start, claim_sent=claim_sent,
                 claim_back=claim_back, write_sent=done - result.write_seconds, committed=done)

    def _late(self, claim: Claim) -> None:
        """The claim was taken over (or written) by another while we scored it: our results
        were not written."""
        self.metrics.claim_late_results.add({}, len(claim.reading_ids))
        log.warning("claim_results_discarded", claim=claim.claim_id,
                    readings=len(claim.reading_ids),
                    note="the claim was taken over while this worker scored it (its lease "
                         "expired, or its session looked gone): the new owner writes them")

    def _reanchored(self, reason: str) -> None:
        self.metrics.cursor_reanchors.inc({})
        log.error("cursor_reanchored", reason=reason,
                  note="the database moved (another cluster, or a transaction counter behind "
                       "the cursor): readings without a result are swept by id, then the "
                       "snapshot protocol resumes; nothing is skipped, nothing scored twice")

    async def _watch_orphans(self) -> None:
        """The orphan timer: every ORPHAN_CHECK_SECONDS, claims whose owner is gone are found
        and a pass is started to take them over, in a quiet stream too."""
        assert self.pool is not None
        after, known = 0, list[int]()
        full_at = 0.0
        while True:
            await asyncio.sleep(ORPHAN_CHECK_SECONDS)
            if self.holder.current is None:
                continue
            if self.doorbell is not None and not self.doorbell.connected:
                # No doorbell session (it cannot connect): this worker cannot arm, and writers
                # notify only while someone is armed. Look at this timer's pace, not the poll's.
                self.wake("doorbell")
            now = time.monotonic()
            if now >= full_at:
                after, known, full_at = 0, [], now + ORPHAN_FULL_LOOK_SECONDS
            try:
                found, mark = await find_orphans(self.pool, after, known,
                                                 self.settings.claim_orphan_seconds)
            except db.UNAVAILABLE:
                continue
            after, known, orphans = next_orphan_look(after, mark, found)
            if orphans:
                self._orphans |= orphans
                self.wake("orphan")

    async def _renew_leases(self, lease_seconds: float) -> None:
        """Transaction mode: the leases of the claims being scored, renewed three times a lease,
        however long a batch takes."""
        assert self.pool is not None
        while True:
            await asyncio.sleep(lease_seconds / 3)
            if self._in_flight:
                with contextlib.suppress(*db.UNAVAILABLE):
                    await renew_leases(self.pool, self.name, lease_seconds,
                                       sorted(self._in_flight))

    def _record(self, result: BatchResult) -> None:
        model = result.model
        m = self.metrics
        m.count_batch(result.cluster_ids)
        if result.conflicts:
            m.prediction_conflicts.add({}, result.conflicts)
            log.error("prediction_conflict", kept=result.conflicts, model_version=model.version,
                      note="results for these readings and this model version existed already "
                           "(is the old predictor still running?): kept, not written twice")
        m.latency.observe_many({}, result.latencies)
        m.batch_size.observe({}, result.size)
        m.batch_duration.observe({}, result.duration)
        if result.bad:
            m.count_bad(b.reason for b in result.bad)
            for bad in result.bad:
                log.warning("bad_reading", reading_id=bad.reading_id, reason=bad.reason,
                            detail=bad.detail)
        self.drift.observe(model, result.labels, result.matrix, result.distances)
        self.shadow.submit(result)
        log.debug("batch_scored", rows=result.size, bad=len(result.bad),
                  model_version=model.version, ms=round(result.duration * 1000, 2),
                  slow_path=result.slow_path)


def _deadline_exceeded(grace: float) -> None:
    """The watchdog's end of the process (a daemon thread): the event loop did not finish the
    shutdown within SHUTDOWN_GRACE_SECONDS."""
    log.error("shutdown_deadline_exceeded", grace_s=grace,
              note="exiting now; claims not committed are taken over by another worker")
    logging.shutdown()
    os._exit(1)


def next_batch_size(current: int, scored: int, base: int) -> int:
    """Adaptive claims: a lane whose last claim came back full is behind, and doubles its claim
    (up to DRAIN_BATCH_FACTOR x the configured size); one that is caught up is back to it."""
    if scored >= current:
        return min(current * 2, base * DRAIN_BATCH_FACTOR)
    return base


def next_orphan_look(after: int, mark: int, found: list[tuple[int, bool]]
                     ) -> tuple[int, list[int], set[int]]:
    """The orphan timer's state after a look: the next mark (never back), the claims to look at
    again by id (every one found, alive or takeable: an orphan until it is gone), and the
    orphans found."""
    orphans = {i for i, orphan in found if orphan}
    return max(after, mark), sorted(i for i, _ in found), orphans


def next_backoff(delay: float, bounds: tuple[float, float]) -> float:
    """The delay after `delay`: doubled, never above the ceiling (`bounds` = first, ceiling)."""
    return min(delay * 2, bounds[1])


def retry_backoff(delay: float, *, reconnected: bool) -> float:
    """The drain loop's next retry delay: back to the first once the listen connection is back
    (the database is reachable again), else doubled up to the ceiling."""
    return RETRY_BACKOFF[0] if reconnected else next_backoff(delay, RETRY_BACKOFF)


async def _wait_any(*events: asyncio.Event, timeout: float) -> None:  # noqa: ASYNC109
    """Until one of the events is set, or `timeout` seconds."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
