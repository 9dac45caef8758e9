"""Prometheus metrics (aioprometheus) and the HTTP server for /metrics and /ready."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from aioprometheus import histogram
from aioprometheus.collectors import Counter, Gauge, Histogram, Registry
from aioprometheus.renderer import render

from sensor_predictor.features import REASONS as BAD_READING_REASONS

WAKEUP_CAUSES = ("startup", "notification", "poll", "reconnect", "model", "retry")
MODEL_LOAD_FAILURE_REASONS = ("mlflow_unreachable", "not_found", "load_failed", "no_feature_names",
                              "feature_mismatch", "probe_failed")
SUPERVISED_TASKS = ("listener", "model", "poll", "backlog", "shadow", "drift-writer", "health")
SHADOW_FAILURE_REASONS = (*MODEL_LOAD_FAILURE_REASONS, "score_failed", "write_failed",
                          "queue_full")

# Per-reading latency, insert to prediction commit: 1 ms .. 60 s.
LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
BATCH_DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                          2.5, 5.0)


class BulkHistogram(Histogram):
    """A histogram that takes a whole batch of observations in one call.

    One `observe` costs about 1.5 us; at tens of thousands of readings a second that is a
    noticeable share of a core, so a batch is bucketed with numpy and added at once.
    """

    def observe_many(self, labels: Mapping[str, str], values: npt.NDArray[np.float64]) -> None:
        if values.size == 0:
            return
        key = dict(labels)
        try:
            h = cast(histogram.Histogram, self.get_value(key))
        except KeyError:
            h = histogram.Histogram(*self.upper_bounds)
            self.set_value(key, h)
        ordered = np.sort(values)
        bounds = np.fromiter(h.buckets.keys(), dtype=np.float64)
        cumulative = np.searchsorted(ordered, bounds, side="right")
        for bound, count in zip(h.buckets.keys(), cumulative.tolist(), strict=True):
            h.buckets[bound] += count
        h.observations += int(values.size)
        h.sum += float(values.sum())


class Metrics:
    """Every metric the service exports, in one registry (a fresh one per instance)."""

    def __init__(self) -> None:
        self.registry = Registry()
        r = self.registry
        self.predictions = Counter("sensor_predictions_total", "Predictions written.", registry=r)
        # The old dashboard reads this exact name; aioprometheus adds no _total of its own.
        self.predictions_by_cluster = Counter(
            "sensor_predictions_by_cluster_total",
            "Predictions written, by stable cluster id (the same across retrains).", registry=r)
        self.drift_score = Gauge(
            "sensor_drift_score",
            "Jensen-Shannon divergence (base 2, 0-1) of the window against the reference; "
            "NaN until the window is full.", registry=r)
        self.drift_p_value = Gauge(
            "sensor_drift_p_value",
            "G-test p-value of the window's cluster counts under the reference (how surprising "
            "the window is for its size); NaN until the window is full.", registry=r)
        self.drift_p_value_threshold = Gauge(
            "sensor_drift_p_value_threshold",
            "DRIFT_P_VALUE: a drift event opens only below it (1 = rule off).", registry=r)
        self.drift_detected = Gauge(
            "sensor_drift_detected", "1 while a drift excursion is open, else 0.", registry=r)
        self.drift_window_fill = Gauge(
            "sensor_drift_window_fill_ratio", "Share of the drift window filled (1 = full).",
            registry=r)
        self.drift_threshold = Gauge(
            "sensor_drift_threshold", "The configured drift threshold.", registry=r)
        self.drift_events = Counter(
            "sensor_drift_events_total", "Drift excursions opened by this worker.", registry=r)
        self.latency = BulkHistogram(
            "sensor_prediction_latency_seconds",
            "Per reading: from its insert to the commit of its prediction.",
            registry=r, buckets=LATENCY_BUCKETS)
        self.model_info = Gauge(
            "sensor_model_info", "The model being served (value 1).", registry=r)
        self.model_version = Gauge(
            "sensor_model_version", "Registered version of the model being served.", registry=r)
        self.model_load_failures = Counter(
            "sensor_model_load_failures_total", "Failed model loads, by reason.", registry=r)
        self.model_swaps = Counter(
            "sensor_model_swaps_total", "Models swapped in (the first load included).",
            registry=r)
        self.bad_readings = Counter(
            "sensor_bad_readings_total", "Readings that could not be scored, by reason.",
            registry=r)
        self.backlog = Gauge(
            "sensor_backlog_readings", "Committed readings not scored yet.", registry=r)
        self.open_reading_transactions = Gauge(
            "sensor_open_reading_transactions",
            "Transactions still open that have written readings: those readings are scored "
            "once they commit (nobody can count them before).", registry=r)
        self.open_reading_transaction_age = Gauge(
            "sensor_open_reading_transaction_age_seconds",
            "Age of the oldest of those transactions (0 when there is none).", registry=r)
        self.claims_taken_over = Counter(
            "sensor_claims_taken_over_total",
            "Claims taken over from a worker whose database session ended.", registry=r)
        self.prediction_conflicts = Counter(
            "sensor_prediction_conflicts_total",
            "Results found already written by something else (kept, not written twice).",
            registry=r)
        self.wakeups = Counter(
            "sensor_wakeups_total", "Drain passes started, by cause.", registry=r)
        self.batch_size = BulkHistogram(
            "sensor_batch_size", "Readings per batch.", registry=r, buckets=BATCH_SIZE_BUCKETS)
        self.batch_duration = BulkHistogram(
            "sensor_batch_duration_seconds", "Claim to commit of one batch.", registry=r,
            buckets=BATCH_DURATION_BUCKETS)
        self.db_reconnects = Counter(
            "sensor_db_reconnects_total", "Database connections lost and re-established.",
            registry=r)
        # Shadow scoring (shadow_scorer.py): a candidate model beside the active one.
        self.shadow_candidate_info = Gauge(
            "sensor_shadow_candidate_info",
            "The candidate model scored in the shadow (value 1); absent when there is none.",
            registry=r)
        self.shadow_predictions = Counter(
            "sensor_shadow_predictions_total", "Readings the shadow candidate scored.",
            registry=r)
        self.shadow_evaluations = Counter(
            "sensor_shadow_evaluations_total",
            "Agreement windows evaluated (one shadow_evaluations row each).", registry=r)
        self.shadow_ari = Gauge(
            "sensor_shadow_agreement_ari",
            "Adjusted Rand index of the candidate's and the active model's clusters over the "
            "last DRIFT_DETECTION_WINDOW readings (1 = the same grouping); NaN before the "
            "first window.", registry=r)
        self.shadow_same_id = Gauge(
            "sensor_shadow_same_id_ratio",
            "Share of the last window's readings given the same stable cluster id by both "
            "models; NaN before the first window.", registry=r)
        self.shadow_drift_score = Gauge(
            "sensor_shadow_drift_score",
            "The candidate's JS divergence against its own training proportions over the last "
            "window; NaN before it, or without training proportions.", registry=r)
        self.shadow_drift_p_value = Gauge(
            "sensor_shadow_drift_p_value",
            "G-test p-value of the candidate's last window under its training proportions.",
            registry=r)
        self.shadow_failures = Counter(
            "sensor_shadow_failures_total",
            "Shadow scoring failures, by reason (a candidate that fails to load, a batch not "
            "scored or not written): the active scoring goes on.", registry=r)
        # Faults (docs/faults.md).
        self.task_restarts = Counter(
            "sensor_task_restarts_total",
            "Background tasks that ended unexpectedly and were started again, by task.",
            registry=r)
        self.model_mismatch = Gauge(
            "sensor_model_mismatch_seconds",
            "How long the active model (the clusters row) has differed from the model served "
            "(0 while they agree).", registry=r)
        self.claims_isolated = Counter(
            "sensor_claims_isolated_total",
            "Claims scored in isolation under the dead-letter rule (a claim that failed, or "
            "was taken over too often): each reading checked alone.", registry=r)
        self.ready = Gauge(
            "sensor_ready", "1 while connected, listening and serving a model.", registry=r)
        self.ready.set({}, 0)
        self.drift_detected.set({}, 0)
        self.drift_score.set({}, math.nan)
        self.drift_p_value.set({}, math.nan)
        self.drift_window_fill.set({}, 0)
        self.backlog.set({}, 0)
        self.open_reading_transactions.set({}, 0)
        self.open_reading_transaction_age.set({}, 0)
        # Every known series starts at 0, so rate() and increase() see the first event too.
        for counter in (self.predictions, self.model_swaps, self.drift_events,
                        self.claims_taken_over, self.prediction_conflicts,
                        self.shadow_predictions, self.shadow_evaluations):
            counter.set({}, 0)
        for reason in SHADOW_FAILURE_REASONS:
            self.shadow_failures.set({"reason": reason}, 0)
        self.set_shadow_candidate(None)
        for reason in BAD_READING_REASONS:
            self.bad_readings.set({"reason": reason}, 0)
        for reason in MODEL_LOAD_FAILURE_REASONS:
            self.model_load_failures.set({"reason": reason}, 0)
        for cause in WAKEUP_CAUSES:
            self.wakeups.set({"cause": cause}, 0)
        for task in SUPERVISED_TASKS:
            self.task_restarts.set({"task": task}, 0)
        self.model_mismatch.set({}, 0)
        self.claims_isolated.set({}, 0)
        for connection in ("listener", "pool"):
            self.db_reconnects.set({"connection": connection}, 0)

    def exported_names(self) -> set[str]:
        """Every series name a scrape can show (histograms as _bucket, _sum and _count)."""
        names: set[str] = set()
        for collector in self.registry.get_all():
            if isinstance(collector, Histogram):
                names.update(f"{collector.name}{s}" for s in ("_bucket", "_sum", "_count"))
            else:
                names.add(collector.name)
        return names

    # Helpers that keep numpy scalars away from aioprometheus (it rejects them): the one place
    # where values cross that edge.
    def count_batch(self, cluster_ids: npt.NDArray[np.int64]) -> None:
        """Count a batch's predictions, by the cluster id written (the stable id)."""
        if cluster_ids.size == 0:
            return
        self.predictions.add({}, int(cluster_ids.size))
        for cluster, count in enumerate(np.bincount(cluster_ids).tolist()):
            if count:
                self.predictions_by_cluster.add({"cluster_id": str(cluster)}, int(count))

    def count_bad(self, reasons: Iterable[str]) -> None:
        for reason in reasons:
            self.bad_readings.inc({"reason": reason})

    def set_model(self, model: Any) -> None:
        """Show the served model (a LoadedModel), or none."""
        self.model_info.values.clear()  # only the served model's labels stay on the scrape
        if model is None:
            self.model_version.set({}, math.nan)
            return
        self.model_swaps.inc({})
        self.model_info.set({"model_version": model.version, "run_id": model.run_id,
                             "model_name": model.model_name}, 1)
        version = model.row.registered_version
        self.model_version.set({}, math.nan if version is None else float(version))

    def set_shadow_candidate(self, model: Any) -> None:
        """Show the shadow candidate (a LoadedModel), or none; its figures start over."""
        self.shadow_candidate_info.values.clear()
        if model is not None:
            self.shadow_candidate_info.set({"model_version": model.version,
                                            "run_id": model.run_id}, 1)
        for gauge in (self.shadow_ari, self.shadow_same_id, self.shadow_drift_score,
                      self.shadow_drift_p_value):
            gauge.set({}, math.nan)

    def set_shadow_evaluation(self, evaluation: Any) -> None:
        """One agreement window's figures (a shadow.Evaluation)."""
        e = evaluation
        self.shadow_evaluations.inc({})
        self.shadow_ari.set({}, float(e.adjusted_rand_index))
        self.shadow_same_id.set({}, float(e.same_id_share))
        self.shadow_drift_score.set({}, math.nan if e.candidate_drift_score is None
                                    else float(e.candidate_drift_score))
        self.shadow_drift_p_value.set({}, math.nan if e.candidate_p_value is None
                                      else float(e.candidate_p_value))


ReadyCheck = Callable[[], tuple[bool, dict[str, Any]]]


class MetricsServer:
    """Serves /metrics (Prometheus text) and /ready (200 or 503 with the reasons) over HTTP.

    A small HTTP/1.1 responder on asyncio's own server, for two GET endpoints: a web framework
    (aiohttp) cost a third of the worker's import time, which is most of a restart.
    """

    def __init__(self, metrics: Metrics, ready_check: ReadyCheck) -> None:
        self._metrics = metrics
        self._ready_check = ready_check
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self.port: int | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._clients):
                task.cancel()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), timeout=1.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            while True:  # keep-alive: a scraper may ask again on the same connection
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"),
                                                  timeout=HTTP_IDLE_SECONDS)
                except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                        ConnectionError):
                    return
                request = parse_request_head(head)
                if request is None:
                    writer.write(http_response(400, b"bad request\n", "text/plain", close=True))
                    await writer.drain()
                    return
                method, path, headers = request
                close = headers.get("connection", "").lower() == "close"
                status, body, content_type = self._route(method, path, headers)
                writer.write(http_response(status, b"" if method == "HEAD" else body,
                                           content_type, close=close,
                                           length=len(body)))
                await writer.drain()
                if close:
                    return
        except ConnectionError:
            return
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _route(self, method: str, path: str, headers: Mapping[str, str]
               ) -> tuple[int, bytes, str]:
        if method not in ("GET", "HEAD"):
            return 405, b"method not allowed\n", "text/plain"
        if path == "/metrics":
            accept = [headers["accept"]] if "accept" in headers else []
            content, out_headers = render(self._metrics.registry, accept)
            return 200, content, out_headers.get("Content-Type", "text/plain")
        if path in ("/ready", "/"):
            ready, detail = self._ready_check()
            body = json.dumps({"ready": ready, **detail}).encode()
            return (200 if ready else 503), body, "application/json"
        return 404, b"not found\n", "text/plain"


HTTP_IDLE_SECONDS = 30.0
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}


def parse_request_head(head: bytes) -> tuple[str, str, dict[str, str]] | None:
    """(method, path without query, lower-cased headers) of an HTTP/1.x request head."""
    try:
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
    except (UnicodeDecodeError, ValueError):
        return None
    if not version.startswith("HTTP/1."):
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return method, target.split("?", 1)[0], headers


def http_response(status: int, body: bytes, content_type: str, *, close: bool,
                  length: int | None = None) -> bytes:
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n"
            f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n")
    return head.encode("latin-1") + body
