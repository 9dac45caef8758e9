"""Shadow scoring: the candidate model scores each batch the active model has just committed,
off the lanes' path, and writes its labels to shadow_predictions; every window of
DRIFT_DETECTION_WINDOW readings gives an agreement row (shadow_evaluations) and the gauges.

The active scoring never waits for it and never fails because of it: a lane hands over its
committed batch (`submit`, no I/O), a task of its own does the rest, FLUSH_SECONDS of batches
at a time in one statement (the shadow's labels are not latency-critical; a statement per
batch cost more worker CPU than the batch's own scoring). Whatever goes wrong here (the
candidate cannot load or predict, a write fails, the task falls behind) is logged and counted in
sensor_shadow_failures_total, and the active predictions go on untouched. A crash loses the
shadow labels of at most the last FLUSH_SECONDS. The arithmetic is shadow.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import asyncpg
import numpy as np
import numpy.typing as npt
import structlog

from sensor_predictor import db, features
from sensor_predictor.config import Settings
from sensor_predictor.metrics import Metrics
from sensor_predictor.model_types import LoadedModel
from sensor_predictor.scoring import BatchResult
from sensor_predictor.shadow import Evaluation, ShadowWindow, WindowSample, evaluate

log = structlog.get_logger("sensor_predictor.shadow")

# Batches waiting for the shadow task; beyond, a batch is not shadow-scored (counted as
# queue_full): the candidate must never slow the active scoring down or grow memory unbounded.
QUEUE_BATCHES = 256
# How long the shadow task gathers committed batches before it scores and writes them.
FLUSH_SECONDS = 0.2
# Windows evaluated on the event loop up to this many readings a flush; beyond, in a thread.
INLINE_EVALUATION_READINGS = 20_000
# A failure of the same kind is logged at most this often (each one is counted).
FAILURE_LOG_SECONDS = 10.0


class ShadowScorer:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._candidate: LoadedModel | None = None
        self._queue: asyncio.Queue[tuple[LoadedModel, BatchResult]] = asyncio.Queue(
            maxsize=QUEUE_BATCHES)
        self._window: ShadowWindow | None = None
        self._window_key: tuple[str, str] | None = None  # (candidate, active) versions
        self._logged_at: dict[str, float] = {}

    @property
    def candidate(self) -> LoadedModel | None:
        return self._candidate

    async def candidate_changed(self, candidate: LoadedModel | None) -> None:
        """Start (or stop) scoring with `candidate`; its windows start empty."""
        previous = self._candidate
        self._candidate = candidate
        self._window, self._window_key = None, None
        self._metrics.set_shadow_candidate(candidate)
        if candidate is None:
            if previous is not None:
                log.info("shadow_scoring_stopped", model_version=previous.version)
            return
        log.info("shadow_scoring_started", model_version=candidate.version,
                 run_id=candidate.run_id, window=self._settings.drift_detection_window,
                 reference="training" if candidate.reference else "none")

    def submit(self, result: BatchResult) -> None:
        """A batch the active model has committed; scored in the shadow later. No I/O."""
        candidate = self._candidate
        if candidate is None or not result.ids or result.matrix is None:
            return
        try:
            self._queue.put_nowait((candidate, result))
        except asyncio.QueueFull:
            self._failed("queue_full", f"{QUEUE_BATCHES} batches wait for the shadow scorer",
                         readings=len(result.ids))

    async def run(self, pool: asyncpg.Pool) -> None:
        """The shadow task: until cancelled."""
        while True:
            first = await self._queue.get()
            await asyncio.sleep(FLUSH_SECONDS)  # what arrives meanwhile goes in the same write
            items = [first]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            readings = sum(len(r.ids or ()) for _, r in items)
            try:
                current = [(c, r) for c, r in items if c is self._candidate]
                if current:  # not stopped or replaced meanwhile
                    await self._flush(pool, current)
            except asyncio.CancelledError:
                raise
            except asyncpg.DataError as exc:  # a feature only the candidate reads is bad
                self._failed("score_failed", f"{type(exc).__name__}: {exc}", readings=readings)
            except (asyncpg.PostgresError, *db.UNAVAILABLE) as exc:
                self._failed("write_failed", f"{type(exc).__name__}: {exc}", readings=readings)
            except Exception as exc:  # the candidate's own code, or a bug: never fatal
                self._failed("score_failed", f"{type(exc).__name__}: {exc}", readings=readings)
            finally:
                for _ in items:
                    self._queue.task_done()

    async def drain(self, within_seconds: float) -> None:
        """Wait until the queued batches are scored (tests, a graceful stop)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout=within_seconds)

    def load_failed(self, reason: str) -> None:
        """The candidate could not be loaded (the holder logged why): counted."""
        self._metrics.shadow_failures.inc({"reason": reason})

    async def _flush(self, pool: asyncpg.Pool,
                     items: list[tuple[LoadedModel, BatchResult]]) -> None:
        """Score the batches with the candidate, write their rows in one statement per active
        model version (almost always one), then evaluate the windows they complete."""
        candidate = items[0][0]
        # Two lanes commit their batches in either order: within a flush, windows follow the
        # readings' ids, so that a window is (almost always) a contiguous run of ids.
        items = sorted(items, key=lambda item: min(item[1].ids or (0,)))
        by_active: dict[str, list[tuple[list[int], npt.NDArray[np.int64],
                                        npt.NDArray[np.int64], npt.NDArray[np.int64]]]] = {}
        actives: dict[str, LoadedModel] = {}
        for _, result in items:
            ids, matrix, active_ids = await self._candidate_input(pool, candidate, result)
            if not ids:
                continue
            labels, _ = candidate.predict(matrix)
            by_active.setdefault(result.model.version, []).append(
                (ids, active_ids, candidate.stable(labels), labels))
            actives[result.model.version] = result.model
        for version, parts in by_active.items():
            ids = [i for part in parts for i in part[0]]
            active_ids, stable, labels = (np.concatenate([part[k] for part in parts])
                                          for k in (1, 2, 3))
            await pool.execute(db.queries()["write_shadow_predictions"], ids, candidate.version,
                               stable.tolist(), labels.tolist(), version, active_ids.tolist())
            self._metrics.shadow_predictions.add({}, len(ids))
            key = (candidate.version, version)
            if self._window is None or self._window_key != key:
                # A new candidate, or a new active model: a window compares two models only.
                self._window = ShadowWindow(max(2, self._settings.drift_detection_window))
                self._window_key = key
            samples = self._window.add(ids, active_ids, stable, labels)
            if samples:
                await self._evaluate(pool, candidate, actives[version], samples)

    async def _candidate_input(self, pool: asyncpg.Pool, candidate: LoadedModel,
                               result: BatchResult
                               ) -> tuple[list[int], features.Matrix, npt.NDArray[np.int64]]:
        """The batch's readings as the candidate reads them, with the active model's ids."""
        assert result.ids is not None and result.matrix is not None
        active_ids = np.asarray(result.cluster_ids, dtype=np.int64)
        names = result.model.feature_names
        if set(candidate.feature_names) <= set(names):
            # The usual case (a retrain on the same sensors): the columns already read.
            columns = [names.index(n) for n in candidate.feature_names]
            return list(result.ids), result.matrix[:, columns], active_ids
        # The candidate reads features the active model does not: read them.
        rows = await pool.fetch(candidate.read_query, list(result.ids),
                                list(candidate.feature_names))
        by_id = {int(i): int(c) for i, c in zip(result.ids, active_ids.tolist(), strict=True)}
        rows = [r for r in rows if r["id"] in by_id]
        matrix = features.to_matrix([r["features"] for r in rows],
                                    len(candidate.feature_names))
        ok = features.valid_rows(matrix)
        kept = [int(r["id"]) for r, good in zip(rows, ok.tolist(), strict=True) if good]
        return kept, matrix[ok], np.asarray([by_id[i] for i in kept], dtype=np.int64)

    async def _evaluate(self, pool: asyncpg.Pool, candidate: LoadedModel, active: LoadedModel,
                        samples: list[WindowSample]) -> None:
        def run() -> list[Evaluation]:
            return [evaluate(s, candidate.n_clusters, candidate.reference) for s in samples]

        # O(window) each: on the loop for the usual windows, in a thread for very large ones.
        large = sum(int(s.reading_ids.size) for s in samples) > INLINE_EVALUATION_READINGS
        evaluations = await asyncio.to_thread(run) if large else run()
        if candidate is not self._candidate:
            return
        self._metrics.set_shadow_evaluation(evaluations[-1])
        self._metrics.shadow_evaluations.add({}, len(evaluations) - 1)
        await pool.executemany(db.queries()["write_shadow_evaluation"], [
            (candidate.version, active.version, e.readings, e.adjusted_rand_index,
             e.same_id_share, e.candidate_drift_score, e.candidate_p_value, e.first_reading_id,
             e.last_reading_id) for e in evaluations])
        e = evaluations[-1]
        log.debug("shadow_windows_evaluated", candidate_version=candidate.version,
                  active_version=active.version, windows=len(evaluations),
                  adjusted_rand_index=round(e.adjusted_rand_index, 4),
                  same_id_share=round(e.same_id_share, 4),
                  candidate_drift_score=e.candidate_drift_score)

    def _failed(self, reason: str, message: str, **fields: object) -> None:
        self._metrics.shadow_failures.inc({"reason": reason})
        now = time.monotonic()
        if now - self._logged_at.get(reason, -FAILURE_LOG_SECONDS) >= FAILURE_LOG_SECONDS:
            self._logged_at[reason] = now
            candidate = self._candidate
            log.error("shadow_scoring_failed", reason=reason, error=message,
                      candidate_version=candidate.version if candidate else None,
                      note="the active model's scoring goes on; this batch has no shadow "
                           "labels", **fields)
