"""The worker: wake-ups in, batches out, until SIGTERM; its lifecycle and its drain loop.

Longer than most modules (about 490 lines): the lifecycle, the drain loop and its lanes, and the
background tasks (listener, model and shadow candidate, poll, backlog) share the worker's state
and its shutdown; the pure parts (batch sizes, retry delays) are functions at the bottom,
unit-tested.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time
import uuid
import weakref
from typing import Any

import asyncpg
import structlog

from sensor_predictor import db
from sensor_predictor.config import Settings
from sensor_predictor.drift_monitor import DriftMonitor
from sensor_predictor.listener import Listener
from sensor_predictor.metrics import Metrics, MetricsServer
from sensor_predictor.migrate import migrate
from sensor_predictor.model_cache import ModelCache
from sensor_predictor.model_holder import ModelHolder, configure_mlflow
from sensor_predictor.model_types import LoadedModel
from sensor_predictor.scoring import (
    PROGRESS,
    BatchResult,
    Claim,
    claim_and_read,
    claim_next,
    score_claim,
    take_orphan,
)
from sensor_predictor.shadow_scorer import ShadowScorer
from sensor_predictor.snapshot import WorkerSnapshot, take_snapshot

log = structlog.get_logger("sensor_predictor.worker")

BACKLOG_REFRESH_SECONDS = 5.0
# 30 s after the first model is served, MLflow and scikit-learn are imported in the background
# (a restart from the model cache needs neither; a later swap to an uncached model does).
WARM_UP_DELAY_SECONDS = 30.0
# How often a lane looks for claims whose worker's session has ended (a free advisory lock; one
# cheap scan of the few claims in flight). A lane also looks when it starts.
ORPHAN_CHECK_SECONDS = 0.25
# Behind (the last claim came back full), a lane doubles its claim up to this many times
# PREDICTION_BATCH_SIZE: a backlog drains in fewer, larger batches (each batch costs ~8 round
# trips whatever its size); caught up, it is back to PREDICTION_BATCH_SIZE.
DRAIN_BATCH_FACTOR = 10
SHUTDOWN_GRACE_SECONDS = 10.0
# Retry delays (seconds): the first, and the ceiling they double up to.
CONNECT_BACKOFF = (0.2, 5.0)  # the database is not reachable at the start
RETRY_BACKOFF = (0.1, 5.0)  # a pass failed (database gone, a batch failed)


class Worker:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        cache = (None if settings.model_cache_dir == "off"
                 else ModelCache(settings.model_cache_dir, settings.mlflow_tracking_uri))
        self.holder = ModelHolder(settings.model_name, on_failure=self._model_failed,
                                  cache=cache)
        # The shadow candidate (model_candidates), aligned against the model served now.
        self.shadow = ShadowScorer(settings, self.metrics)
        self.candidate_holder = ModelHolder(
            settings.model_name, on_failure=self.shadow.load_failed, cache=cache,
            role="candidate", reference=self._active_version)
        self.drift = DriftMonitor(settings, self.metrics)
        self.pool: asyncpg.Pool | None = None
        self.listener = Listener(settings, on_readings=self._notified_readings,
                                 on_model=self._notified_model, on_connected=self._listening,
                                 on_lost=self._listen_lost)
        self.metrics_server = MetricsServer(self.metrics, self.readiness)
        self._wake = asyncio.Event()
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
        self._next_orphan_check = 0.0  # time.monotonic(); 0: look at the first chance
        self._warm_up: asyncio.Task[None] | None = None
        self.metrics.drift_threshold.set({}, settings.drift_threshold)
        self.metrics.drift_p_value_threshold.set({}, settings.drift_p_value)

    # -- signals from the outside ----------------------------------------------------------

    def stop(self) -> None:
        if not self._stopping.is_set():
            log.info("shutdown_requested")
            self._stopping.set()
            self._wake.set()
            self._update_ready()

    def wake(self, cause: str) -> None:
        # Counted as they arrive; the drain loop coalesces them into one pass.
        self.metrics.wakeups.inc({"cause": cause})
        self._wake.set()

    def _notified_readings(self) -> None:
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
            self._reconnected.set()
        # Whatever was notified while nobody listened: look now, and re-check the model.
        self._model_event.set()
        self.wake("startup" if first else "reconnect")
        self._update_ready()

    def _listen_lost(self) -> None:
        self._lost_at = time.monotonic()
        self._update_ready()

    def _active_version(self) -> str | None:
        model = self.holder.current
        return None if model is None else model.version

    def _model_failed(self, reason: str) -> None:
        self.metrics.model_load_failures.inc({"reason": reason})

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        model = self.holder.current
        detail = {
            "listening": self.listener.listening,
            "pool": self.pool is not None,
            "model_version": model.version if model else None,
            "stopping": self._stopping.is_set(),
        }
        ready = (self.listener.listening and self.pool is not None and model is not None
                 and not self._stopping.is_set())
        return ready, detail

    def snapshot(self) -> WorkerSnapshot:
        """What it serves and has done so far, for an in-process watcher (the demo)."""
        model, candidate = self.holder.current, self.shadow.candidate
        return take_snapshot(self.metrics, ready=self.readiness()[0],
                             model_version=None if model is None else str(model.version),
                             metrics_port=self.metrics_server.port or None,
                             shadow_version=None if candidate is None else candidate.version)

    def _update_ready(self) -> None:
        self.metrics.ready.set({}, 1 if self.readiness()[0] else 0)

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self, *, handle_signals: bool = True) -> int:
        """Serve until stop() (SIGTERM / SIGINT by default); returns the exit code."""
        if handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
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
            if not await self._connect():
                return 0
            self._tasks = [
                asyncio.create_task(self.listener.run(), name="listener"),
                asyncio.create_task(self._watch_model(), name="model"),
                asyncio.create_task(self._poll(), name="poll"),
                asyncio.create_task(self._watch_backlog(), name="backlog"),
                asyncio.create_task(self.shadow.run(self.pool), name="shadow"),
            ]
            await self._drain_forever()
        finally:
            await self._shutdown()
        return 0

    async def _connect(self) -> bool:
        """Migrate (unless told not to) and open the pool, retrying while the database is down."""
        backoff = CONNECT_BACKOFF[0]
        while not self._stopping.is_set():
            try:
                if self.settings.migrate_on_start:
                    conn = await db.connect(self.settings, timeout=10)
                    try:
                        await migrate(conn)
                    finally:
                        await conn.close()
                self.pool = await db.create_pool(
                    self.settings, size=self.settings.prediction_concurrency + 3,
                    init=self._track_connection)
                return True
            except db.UNAVAILABLE as exc:
                log.warning("database_unavailable", error=str(exc) or type(exc).__name__,
                            retry_in_s=backoff)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=backoff)
                backoff = next_backoff(backoff, CONNECT_BACKOFF)
        return False

    async def _track_connection(self, connection: asyncpg.Connection) -> None:
        self._connections[connection] = time.monotonic()

    async def _shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # A task stuck on a half-open connection cannot even have its query cancelled (the
            # cancellation's answer never comes back): it must not hold the exit up.
            await asyncio.wait(self._tasks, timeout=1.0)
        await self.drift.flush()
        if self.pool is not None:
            try:
                await asyncio.wait_for(self.pool.close(), timeout=1.0)
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
        assert self.pool is not None
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
            except db.UNAVAILABLE as exc:
                log.warning("model_check_failed", error=str(exc) or type(exc).__name__)
                await asyncio.sleep(0.5)
                self._model_event.set()

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
        if model is not None:
            try:  # a candidate promoted: its shadow scoring ends, its rows stay
                await self.pool.execute(db.queries()["mark_candidate_promoted"], model.run_id)
            except asyncpg.PostgresError as exc:
                log.warning("candidate_not_marked_promoted", error=str(exc))
            await self.drift.start_model(model, self.pool)
            self.wake("model")
            if self._warm_up is None:
                self._warm_up = asyncio.create_task(self._warm_up_imports(), name="warm-up")
                self._tasks.append(self._warm_up)
        self._update_ready()

    async def _warm_up_imports(self) -> None:
        """A worker that started from its model cache has not imported MLflow and scikit-learn;
        the first swap to a model not cached yet would pay for that (seconds). Once scoring has
        started, import them in the background, so that swaps stay fast. A daemon thread: a
        shutdown never waits for it."""
        await asyncio.sleep(WARM_UP_DELAY_SECONDS)
        threading.Thread(target=_import_model_libraries, name="warm-up", daemon=True).start()

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
            except db.UNAVAILABLE:
                pass
            # A big backlog (an adopted database) takes a while to count: never more than a
            # tenth of this task's time.
            took = time.monotonic() - started
            await asyncio.sleep(max(BACKLOG_REFRESH_SECONDS, 10 * took))

    # -- the drain loop ---------------------------------------------------------------------

    async def _drain_forever(self) -> None:
        backoff = RETRY_BACKOFF[0]
        while not self._stopping.is_set():
            await self._wake.wait()
            if self._stopping.is_set():
                break
            self._wake.clear()
            self._reconnected.clear()
            lanes = [self._lane() for _ in range(self.settings.prediction_concurrency)]
            outcomes = await asyncio.gather(*lanes, return_exceptions=True)
            failure = next((o for o in outcomes if isinstance(o, BaseException)), None)
            if failure is None:
                backoff = RETRY_BACKOFF[0]
                continue
            if isinstance(failure, db.UNAVAILABLE):
                self.metrics.db_reconnects.inc({"connection": "pool"})
                log.warning("database_unavailable", error=str(failure) or type(failure).__name__,
                            retry_in_s=backoff)
            else:
                log.error("batch_failed", error=f"{type(failure).__name__}: {failure}",
                          retry_in_s=backoff, exc_info=failure)
            # Back off, but not past the moment the listener is connected again.
            await _wait_any(self._stopping, self._reconnected, timeout=backoff)
            backoff = retry_backoff(backoff, reconnected=self._reconnected.is_set())
            self.wake("retry")

    async def _lane(self) -> None:
        """Claim and score batches until none is left (or shutdown); one of several in parallel."""
        assert self.pool is not None
        size = self.settings.prediction_batch_size
        scored = 0
        # One connection for the whole pass: a release per batch costs a reset round trip. The
        # claim's advisory lock belongs to this session; the next claim releases it.
        async with self.pool.acquire() as conn:
            while not self._stopping.is_set():
                model = self.holder.current
                if model is None:
                    return  # no model yet: readings wait, nothing is claimed
                claim: Claim | None = None
                # Orphans are looked for once new work is handed out, so that a wake-up's
                # readings never wait for the look (and during a long pass, when it is due).
                if scored and self._orphan_check_due():
                    claim = await self._take_orphan(conn)
                if claim is None:
                    # Caught up, the read comes with the claim (one round trip less, for
                    # latency); behind, it comes after the claim's commit, so that the cursor
                    # row is not locked while a large batch is read and other lanes can claim.
                    handed = (await claim_and_read(conn, self.name, size, model)
                              if size <= self.settings.prediction_batch_size
                              else await claim_next(conn, self.name, size))
                    if handed is PROGRESS:  # only already-scored adopted rows: behind
                        size = next_batch_size(size, size, self.settings.prediction_batch_size)
                        continue
                    if handed is None:
                        if not self._orphan_check_due():
                            return
                        claim = await self._take_orphan(conn)
                        if claim is None:
                            return
                    else:
                        assert isinstance(handed, Claim)
                        claim = handed
                result = await score_claim(conn, claim, model)
                scored += 1
                if result is not None:
                    self._record(result)
                    size = next_batch_size(size, size if claim.full else result.size,
                                           self.settings.prediction_batch_size)

    def _orphan_check_due(self) -> bool:
        """At most one look for orphaned claims every ORPHAN_CHECK_SECONDS, across lanes."""
        now = time.monotonic()
        if now < self._next_orphan_check:
            return False
        self._next_orphan_check = now + ORPHAN_CHECK_SECONDS
        return True

    async def _take_orphan(self, conn: asyncpg.Connection) -> Claim | None:
        taken = await take_orphan(conn, self.name, self.settings.claim_orphan_seconds)
        if taken is None:
            return None
        claim, age = taken
        self._next_orphan_check = 0.0  # there may be more
        self.metrics.claims_taken_over.inc({})
        log.warning("orphan_claim_recovered", claim=claim.claim_id,
                    readings=len(claim.reading_ids), previous_worker=claim.previous_worker,
                    claim_age_s=round(age, 3))
        return claim

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


def _import_model_libraries() -> None:
    started = time.perf_counter()
    try:
        import mlflow.sklearn  # noqa: F401
        import sklearn.cluster
        import sklearn.preprocessing  # noqa: F401
    except Exception as exc:  # nothing depends on it: a later fetch imports them anyway
        log.warning("warm_up_failed", error=f"{type(exc).__name__}: {exc}")
        return
    log.info("warm_up_done", ms=round((time.perf_counter() - started) * 1000))


def next_batch_size(current: int, scored: int, base: int) -> int:
    """Adaptive claims: a lane whose last claim came back full is behind, and doubles its claim
    (up to DRAIN_BATCH_FACTOR x the configured size); one that is caught up is back to it."""
    if scored >= current:
        return min(current * 2, base * DRAIN_BATCH_FACTOR)
    return base


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
