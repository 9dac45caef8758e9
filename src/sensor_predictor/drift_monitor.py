"""Feeds the pure drift tracker and turns its transitions into drift rows and gauges."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
import numpy as np
import numpy.typing as npt
import structlog

from sensor_predictor import db
from sensor_predictor.config import Settings
from sensor_predictor.drift import DriftTracker, DriftUpdate, distribution_to_json
from sensor_predictor.metrics import Metrics
from sensor_predictor.model_types import LoadedModel

log = structlog.get_logger("sensor_predictor.drift")

# An open excursion's peak is written at most this often (the row is the record, not a log).
PEAK_WRITE_SECONDS = 1.0


def _import_scipy_special() -> None:
    import scipy.special  # noqa: F401


@dataclass(frozen=True)
class _Write:
    kind: str  # started | peak | ended
    model_version: str
    update: DriftUpdate
    # label -> stable cluster id: a drift row's distributions speak in the ids the predictions
    # and the dashboard use (None: the labels, unaligned)
    cluster_ids: tuple[int, ...] | None = None


class DriftMonitor:
    """One tracker per served model (a swap starts a fresh window and reference)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._tracker: DriftTracker | None = None
        self._version: str | None = None
        self._cluster_ids: tuple[int, ...] | None = None
        self._writes: asyncio.Queue[_Write] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._last_peak_write = 0.0

    async def start_model(self, model: LoadedModel, pool: asyncpg.Pool) -> None:
        # A restart in the middle of an excursion resumes it instead of reporting it again.
        try:
            open_row = await pool.fetchval(db.queries()["open_drift_excursion"], model.version)
        except (*db.UNAVAILABLE, asyncpg.PostgresError) as exc:
            # Tracking starts regardless; the unique index still keeps the excursion one row.
            log.warning("drift_resume_unknown", error=str(exc) or type(exc).__name__)
            open_row = None
        # The previous model's excursion, if one is open, ends with that model.
        try:
            await pool.execute(db.queries()["close_other_drift_rows"], model.version)
        except (*db.UNAVAILABLE, asyncpg.PostgresError) as exc:
            log.warning("drift_rows_not_closed", error=str(exc) or type(exc).__name__)
        self._tracker = DriftTracker(
            n_clusters=model.n_clusters,
            window=self._settings.drift_detection_window,
            threshold=self._settings.drift_threshold,
            exit_threshold=self._settings.drift_exit_level,
            reference=model.reference,
            in_excursion=open_row is not None,
            p_value=self._settings.drift_p_value,
        )
        self._version = model.version
        self._cluster_ids = (None if model.stable_ids is None
                             else tuple(int(i) for i in model.stable_ids.tolist()))
        self._metrics.drift_detected.set({}, 1 if open_row is not None else 0)
        self._metrics.drift_score.set({}, float("nan"))
        self._metrics.drift_p_value.set({}, float("nan"))
        self._metrics.drift_window_fill.set({}, 0)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_forever(pool), name="drift-writer")
        log.info("drift_tracking_started", model_version=model.version,
                 reference="training" if model.reference else "first full window",
                 window=self._settings.drift_detection_window,
                 resumed_excursion=open_row is not None)
        # The p-value's scipy.special, imported off the event loop (~0.5 s cold), once the
        # gauges above show the resumed state.
        await asyncio.to_thread(_import_scipy_special)

    def observe(self, model: LoadedModel, labels: npt.NDArray[np.int64]) -> None:
        """Add one batch's cluster ids (only the tracked model's: a batch of the previous model
        finishing just after a swap would mix two numberings)."""
        tracker = self._tracker
        if tracker is None or model.version != self._version or labels.size == 0:
            return
        update = tracker.update(labels)
        m = self._metrics
        m.drift_window_fill.set({}, update.window_fill / tracker.window)
        m.drift_score.set({}, float("nan") if update.score is None else float(update.score))
        m.drift_p_value.set({}, float("nan") if update.p_value is None
                            else float(update.p_value))
        if update.event == "started":
            m.drift_detected.set({}, 1)
            m.drift_events.inc({})
            log.warning("drift_detected", model_version=model.version, score=update.score,
                        threshold=self._settings.drift_threshold, p_value=update.p_value,
                        p_value_threshold=self._settings.drift_p_value)
            self._writes.put_nowait(_Write("started", model.version, update,
                                        self._cluster_ids))
            self._last_peak_write = time.monotonic()
        elif update.event == "ongoing":
            now = time.monotonic()
            if now - self._last_peak_write >= PEAK_WRITE_SECONDS:
                self._last_peak_write = now
                self._writes.put_nowait(_Write("peak", model.version, update,
                                        self._cluster_ids))
        elif update.event == "ended":
            m.drift_detected.set({}, 0)
            log.info("drift_ended", model_version=model.version, score=update.score,
                     peak=update.peak)
            self._writes.put_nowait(_Write("ended", model.version, update,
                                        self._cluster_ids))

    async def flush(self, within_seconds: float = 5.0) -> None:
        """Wait until the queued drift rows are written (at shutdown)."""
        if self._writer is not None and not self._writer.done():
            try:
                await asyncio.wait_for(self._writes.join(), timeout=within_seconds)
            except TimeoutError:
                log.warning("drift_rows_unwritten", pending=self._writes.qsize())
            self._writer.cancel()

    async def run_writer(self, pool: asyncpg.Pool) -> None:
        """The drift rows' writer, run (and supervised) by the worker: start_model then starts
        none of its own."""
        self._writer = asyncio.current_task()
        await self._write_forever(pool)

    async def _write_forever(self, pool: asyncpg.Pool) -> None:
        q = db.queries()
        while True:
            item = await self._writes.get()
            u = item.update
            try:
                for attempt in range(5):
                    try:
                        await self._write(pool, q, item, u)
                        break
                    except db.UNAVAILABLE as exc:
                        log.warning("drift_write_retry", error=str(exc), attempt=attempt + 1)
                        await asyncio.sleep(0.5 * 2 ** attempt)
                else:
                    log.error("drift_write_failed", kind=item.kind,
                              model_version=item.model_version)
            except Exception as exc:  # one row lost (at-most-once), never the writer
                log.error("drift_write_failed", kind=item.kind, error=str(exc))
            finally:
                self._writes.task_done()

    @staticmethod
    async def _write(pool: asyncpg.Pool, q: dict[str, str], item: _Write, u: DriftUpdate
                     ) -> None:
        current = json.dumps(distribution_to_json(u.current, item.cluster_ids))
        if item.kind == "started":
            reference: Any = (distribution_to_json(u.reference, item.cluster_ids)
                              if u.reference else {})
            inserted = await pool.fetchval(
                q["open_drift_row"], float(u.score or 0.0), json.dumps(reference), current,
                item.model_version)
            if inserted is None:
                log.info("drift_row_exists", model_version=item.model_version,
                         note="another replica opened this excursion")
        elif item.kind == "peak":
            await pool.execute(q["update_drift_peak"], item.model_version, u.peak, current)
        else:
            await pool.execute(q["close_drift_row"], item.model_version, u.peak)
