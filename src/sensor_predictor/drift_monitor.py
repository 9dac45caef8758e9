"""Feeds the pure drift tracker and turns its transitions into drift rows and gauges."""

from __future__ import annotations

import asyncio
import json
import sys
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
from sensor_predictor.feature_drift import (
    ExcursionState,
    FeatureDriftTracker,
    FeatureRank,
    Kind,
    OutlierTracker,
)
from sensor_predictor.metrics import Metrics
from sensor_predictor.model_types import LoadedModel

log = structlog.get_logger("sensor_predictor.drift")

# An open excursion's peak is written at most this often (the row is the record, not a log).
PEAK_WRITE_SECONDS = 1.0
# The per-feature gauges are set at most this often (and whenever a feature drifts).
GAUGE_SECONDS = 0.25


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
    opened_by: Kind | None = None
    """The rule that opened the excursion: the drift row's kind."""
    top_features: tuple[FeatureRank, ...] | None = None
    outlier_share: float | None = None
    peak: float | None = None
    """The excursion's peak JS score so far (any rule may hold it open)."""


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
        self._features: FeatureDriftTracker | None = None
        self._outliers: OutlierTracker | None = None
        self._excursion = ExcursionState()
        self._peak: float | None = None
        self._last_gauges = 0.0
        self._scipy_wanted = False
        self._scipy_import: asyncio.Future[None] | None = None

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
        self.track(model, resumed=open_row is not None)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_forever(pool), name="drift-writer")
        log.info("drift_tracking_started", model_version=model.version,
                 reference="training" if model.reference else "first full window",
                 window=self._settings.drift_detection_window,
                 resumed_excursion=open_row is not None,
                 feature_reference=None if model.feature_reference is None
                 else model.feature_reference.source,
                 features=0 if self._features is None else len(self._features.names),
                 outliers="tracked" if self._outliers is not None else
                 "not tracked: the model carries no training distances")
        # The p-value's scipy.special (~0.2-0.5 s to import) is imported off the event loop once
        # the first batch is observed (observe), not here: here it held the first pass of a
        # restarted worker back (a thread importing holds the interpreter's lock too).
        self._scipy_wanted = "scipy.special" not in sys.modules

    def _import_scipy_in_background(self) -> None:
        """After the first batch is committed and observed: a window that filled with it has
        imported scipy.special inline already (then this is a no-op thread)."""
        self._scipy_wanted = False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop (the bench's direct use): imported when first needed
        self._scipy_import = loop.run_in_executor(None, _import_scipy_special)

    def track(self, model: LoadedModel, resumed: bool = False) -> None:
        """Fresh trackers for `model` (no I/O: start_model, and the bench)."""
        self._tracker = DriftTracker(
            n_clusters=model.n_clusters,
            window=self._settings.drift_detection_window,
            threshold=self._settings.drift_threshold,
            exit_threshold=self._settings.drift_exit_level,
            reference=model.reference,
            in_excursion=resumed,
            p_value=self._settings.drift_p_value,
        )
        ref = model.feature_reference
        window = self._settings.drift_detection_window
        exit_ratio = self._settings.drift_exit_level / max(self._settings.drift_threshold, 1e-12)
        self._features = (FeatureDriftTracker(ref, window, self._settings.feature_drift_threshold,
                                              exit_ratio=min(exit_ratio, 1.0))
                          if ref is not None and self._settings.feature_drift_threshold > 0
                          else None)
        self._outliers = (OutlierTracker(ref.distance_p99, window,
                                         self._settings.outlier_share_threshold,
                                         exit_ratio=min(exit_ratio, 1.0),
                                         inflation=ref.outlier_inflation_at(window))
                          if ref is not None and ref.distance_p99 is not None
                          and self._settings.outlier_share_threshold < 1 else None)
        self._excursion = ExcursionState(in_excursion=resumed)
        self._peak = None
        self._metrics.reset_features(ref.names if self._features is not None and ref else ())
        self._metrics.outlier_share.set({}, float("nan"))
        self._metrics.outlier_p_value.set({}, float("nan"))
        self._version = model.version
        self._cluster_ids = (None if model.stable_ids is None
                             else tuple(int(i) for i in model.stable_ids.tolist()))
        self._metrics.drift_detected.set({}, 1 if resumed else 0)
        self._metrics.drift_score.set({}, float("nan"))
        self._metrics.drift_p_value.set({}, float("nan"))
        self._metrics.drift_window_fill.set({}, 0)

    def observe(self, model: LoadedModel, labels: npt.NDArray[np.int64],
                matrix: npt.NDArray[np.float64] | None = None,
                distances: npt.NDArray[np.float64] | None = None) -> None:
        """Add one batch's cluster ids, feature rows and nearest-centre distances (only the
        tracked model's: a batch of the previous model finishing just after a swap would mix
        two numberings)."""
        tracker = self._tracker
        if tracker is None or model.version != self._version or labels.size == 0:
            return
        update = tracker.update(labels)
        if self._scipy_wanted:
            self._import_scipy_in_background()
        m = self._metrics
        m.drift_window_fill.set({}, update.window_fill / tracker.window)
        m.drift_score.set({}, float("nan") if update.score is None else float(update.score))
        m.drift_p_value.set({}, float("nan") if update.p_value is None
                            else float(update.p_value))
        fired: dict[Kind, bool] = {}
        holding: dict[Kind, bool] = {}
        ranked: tuple[FeatureRank, ...] | None = None
        share: float | None = None
        features = self._features
        if features is not None and matrix is not None and matrix.shape[0] == labels.size:
            state = features.update(matrix)
            if state is not None:
                now = time.monotonic()
                # 40 labelled series cost ~40 us to set: at most every GAUGE_SECONDS (a
                # scrape is seconds apart), and at once when the event opens (below).
                if now - self._last_gauges >= GAUGE_SECONDS or state.drifting:
                    self._last_gauges = now
                    m.set_features(features.names, state.scores, state.p_values)
                fired["feature"], holding["feature"] = state.drifting, state.holding
                ranked = state.ranked
        outliers = self._outliers
        if outliers is not None and distances is not None and distances.size == labels.size:
            o = outliers.update(distances)
            if o is not None:
                m.outlier_share.set({}, o.share)
                m.outlier_p_value.set({}, o.p_value)
                fired["outlier"], holding["outlier"] = o.drifting, o.holding
                share = o.share
        if not tracker.window_full or update.score is None:
            return
        s = self._settings
        fired["cluster"] = update.score > s.drift_threshold and (
            s.drift_p_value >= 1.0 or (update.p_value is not None
                                       and update.p_value < s.drift_p_value))
        holding["cluster"] = update.score >= s.drift_exit_level
        event, kind = self._excursion.step(fired, holding)
        if event is not None:
            self._peak = (update.score if self._peak is None or event == "started"
                          else max(self._peak, update.score))
        top = ranked[0] if ranked else None
        if event == "started":
            m.drift_detected.set({}, 1)
            m.drift_events.inc({})
            log.warning("drift_detected", model_version=model.version, kind=kind,
                        score=update.score, threshold=s.drift_threshold,
                        p_value=update.p_value, p_value_threshold=s.drift_p_value,
                        top_feature=None if top is None else top.feature,
                        top_feature_effect=None if top is None else round(top.effect, 3),
                        outlier_share=share)
            self._writes.put_nowait(_Write("started", model.version, update, self._cluster_ids,
                                           kind, ranked, share, self._peak))
            self._last_peak_write = time.monotonic()
        elif event == "ongoing":
            now = time.monotonic()
            if now - self._last_peak_write >= PEAK_WRITE_SECONDS:
                self._last_peak_write = now
                self._writes.put_nowait(_Write("peak", model.version, update,
                                               self._cluster_ids, kind, ranked, share,
                                               self._peak))
        elif event == "ended":
            m.drift_detected.set({}, 0)
            log.info("drift_ended", model_version=model.version, kind=kind,
                     score=update.score, peak=self._peak)
            self._writes.put_nowait(_Write("ended", model.version, update, self._cluster_ids,
                                           kind, ranked, share, self._peak))
            self._peak = None

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
        top = (None if item.top_features is None
               else json.dumps([r.to_json() for r in item.top_features]))
        if item.kind == "started":
            reference: Any = (distribution_to_json(u.reference, item.cluster_ids)
                              if u.reference else {})
            inserted = await pool.fetchval(
                q["open_drift_row"], float(u.score or 0.0), json.dumps(reference), current,
                item.model_version, item.opened_by, top, item.outlier_share)
            if inserted is None:
                log.info("drift_row_exists", model_version=item.model_version,
                         note="another replica opened this excursion")
        elif item.kind == "peak":
            await pool.execute(q["update_drift_peak"], item.model_version, item.peak, current,
                               top)
        else:
            await pool.execute(q["close_drift_row"], item.model_version, item.peak)
