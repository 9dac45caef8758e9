"""Prometheus metrics (aioprometheus) and the HTTP server for /metrics and /ready."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import math
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from aioprometheus import histogram
from aioprometheus.collectors import Counter, Gauge, Histogram, Registry
from aioprometheus.renderer import render

from sensor_predictor.features import REASONS as BAD_READING_REASONS
from sensor_predictor.model_types import LOAD_FAILURE_REASONS as MODEL_LOAD_FAILURE_REASONS

WAKEUP_CAUSES = ("startup", "notification", "poll", "reconnect", "model", "retry", "orphan",
                 "doorbell")
SUPERVISED_TASKS = ("listener", "model", "poll", "backlog", "shadow", "drift-writer", "health",
                    "orphans", "leases", "doorbell")
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
        self.feature_drift_score = Gauge(
            "sensor_feature_drift_score",
            "Per feature: |window mean - training mean| / training standard deviation (docs/"
            "drift.md); absent for a model without a feature reference, NaN until the window "
            "is full.", registry=r)
        self.feature_drift_p_value = Gauge(
            "sensor_feature_drift_p_value",
            "Per feature: two-sided p-value of the window mean under the training mean and "
            "deviation (z-test); NaN until the window is full.", registry=r)
        self.outlier_share = Gauge(
            "sensor_outlier_share",
            "Share of the window farther from its nearest centre than the training data's 99th "
            "percentile; NaN until the window is full or when the model carries no distances.",
            registry=r)
        self.outlier_p_value = Gauge(
            "sensor_outlier_p_value",
            "Binomial upper-tail p-value of the window's outlier count under the training 1 %; "
            "NaN like sensor_outlier_share.", registry=r)
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
        self.id_headroom = Gauge(
            "sensor_id_headroom_ratio",
            "Share of the id type still free, by table (readings, predictions): 1 - highest id "
            "used / the type's maximum (integer on a database adopted from the old system: "
            "`sensor-predictor widen-ids` makes it bigint).", registry=r)
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
        self.claim_late_results = Counter(
            "sensor_claim_late_results_total",
            "Results discarded because their claim was taken over while this worker scored it "
            "(its lease expired, or its session looked gone): the new owner writes them.",
            registry=r)
        self.cursor_reanchors = Counter(
            "sensor_cursor_reanchors_total",
            "Re-anchors of the scoring cursor: the database moved (another cluster, or a "
            "transaction counter behind the cursor), readings without a result swept.",
            registry=r)
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
        self.listener_deaf = Counter(
            "sensor_listener_deaf_total",
            "Times the listen connection answered its heartbeat but did not listen (no "
            "channels, or another server session: a transaction pooler); each one reconnected.",
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
        self.outlier_share.set({}, math.nan)
        self.outlier_p_value.set({}, math.nan)
        self.backlog.set({}, 0)
        self.open_reading_transactions.set({}, 0)
        self.open_reading_transaction_age.set({}, 0)
        # Every known series starts at 0, so rate() and increase() see the first event too.
        for counter in (self.predictions, self.model_swaps, self.drift_events,
                        self.claims_taken_over, self.prediction_conflicts,
                        self.claim_late_results, self.cursor_reanchors,
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

    def reset_features(self, names: Any) -> None:
        """The per-feature series of a newly served model's features (NaN until its window is
        full); the previous model's series go."""
        for gauge in (self.feature_drift_score, self.feature_drift_p_value):
            gauge.values.clear()
            for name in names:
                gauge.set({"feature": name}, math.nan)

    def set_features(self, names: Any, scores: Any, p_values: Any) -> None:
        for name, score, p in zip(names, scores, p_values, strict=True):
            self.feature_drift_score.set({"feature": name}, float(score))
            self.feature_drift_p_value.set({"feature": name}, float(p))

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


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    # monotonic time since which it has been waiting on its peer (a request head to arrive, or
    # an answer to be read); None while we work on its request.
    waiting_since: float | None
    writer: asyncio.StreamWriter | None = None

    def drop(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()
        else:
            self.sock.close()


class MetricsServer:
    """Serves /metrics (Prometheus text) and /ready (200 or 503 with the reasons) over HTTP.

    A small HTTP/1.1 responder on asyncio, for two GET endpoints: a web framework (aiohttp) cost
    a third of the worker's import time, which is most of a restart.

    Its port is often reachable by anyone (0.0.0.0), so what a client can hold is bounded: at
    most HTTP_MAX_CLIENTS connections (the excess is refused at once, unless it can take the
    place of a client that has kept it waiting for HTTP_EVICT_AFTER_SECONDS: a scraper gets
    through a flood of idle connections), a request head of at most HTTP_MAX_HEAD_BYTES, every
    write done within HTTP_WRITE_SECONDS (a client that never reads its answers is dropped),
    and HTTP_IDLE_SECONDS to send a request head. It accepts connections itself, one at a
    time, so that a refused one is closed before the next is accepted: asyncio's own server
    accepts up to its backlog per wake-up and hands each over a few loop turns later, so a burst
    holds hundreds of descriptors, past any cap, before the first is refused.
    """

    def __init__(self, metrics: Metrics, ready_check: ReadyCheck, *,
                 max_clients: int | None = None) -> None:
        self._metrics = metrics
        self._ready_check = ready_check
        self._listeners: list[socket.socket] = []
        self._clients: set[_Client] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._paused: asyncio.TimerHandle | None = None
        self._max_clients = HTTP_MAX_CLIENTS if max_clients is None else max_clients
        self.port: int | None = None
        self.refused = 0  # connections turned away at the cap
        self.evicted = 0  # connections dropped to make room for a new one

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        families = {info[0] for info in infos}
        bound = port  # with port 0, every address gets the port the first one was given
        try:
            for family, type_, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, type_, proto)
                self._listeners.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and len(families) > 1:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((address[0], bound, *address[2:]))
                sock.listen(HTTP_LISTEN_BACKLOG)
                sock.setblocking(False)
                bound = int(sock.getsockname()[1])
            self.port = bound
        except OSError:
            self._close_listeners()
            raise
        self._resume()

    def _resume(self) -> None:
        self._paused = None
        loop = asyncio.get_running_loop()
        for sock in self._listeners:
            loop.add_reader(sock, self._accept, sock)

    def _close_listeners(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self._listeners:
            loop.remove_reader(sock)
            sock.close()
        self._listeners.clear()

    async def stop(self) -> None:
        if self._paused is not None:
            self._paused.cancel()
        self._close_listeners()
        for client in list(self._clients):
            client.drop()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)

    @property
    def clients(self) -> int:
        """Connections held now."""
        return len(self._clients)

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(HTTP_ACCEPTS_PER_WAKEUP):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors (not ours: we hold at most the cap): try again later.
                    loop = asyncio.get_running_loop()
                    for sock in self._listeners:
                        loop.remove_reader(sock)
                    self._paused = loop.call_later(1.0, self._resume)
                return  # ECONNABORTED and the like: the peer gave up
            client = self._admit(conn)
            if client is None:
                with contextlib.suppress(OSError):  # non-blocking, best effort
                    conn.setblocking(False)
                    conn.send(_REFUSAL)
                conn.close()
                continue
            task = asyncio.get_running_loop().create_task(self._serve(client))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _admit(self, conn: socket.socket) -> _Client | None:
        """A new connection, in place of the stalest waiting one at the cap; None: refused."""
        if len(self._clients) >= self._max_clients:
            now = time.monotonic()
            stale = [c for c in self._clients
                     if c.waiting_since is not None and c.writer is not None
                     and now - c.waiting_since >= HTTP_EVICT_AFTER_SECONDS]
            if not stale:
                self.refused += 1
                return None
            victim = min(stale, key=lambda c: c.waiting_since or 0.0)
            self._clients.discard(victim)
            victim.drop()
            self.evicted += 1
        client = _Client(conn, time.monotonic())
        self._clients.add(client)
        return client

    async def _write(self, client: _Client, data: bytes) -> None:
        """Write, and wait until the transport has taken it, at most HTTP_WRITE_SECONDS."""
        assert client.writer is not None
        client.writer.write(data)
        client.waiting_since = time.monotonic()
        await asyncio.wait_for(client.writer.drain(), timeout=HTTP_WRITE_SECONDS)

    async def _serve(self, client: _Client) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=client.sock,
                                                           limit=HTTP_MAX_HEAD_BYTES)
        except BaseException as exc:
            self._clients.discard(client)
            client.sock.close()
            if isinstance(exc, OSError):
                return
            raise
        client.writer = writer
        if client not in self._clients:  # evicted meanwhile
            writer.transport.abort()
            return
        try:
            while True:  # keep-alive: a scraper may ask again on the same connection
                client.waiting_since = time.monotonic()
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"),
                                                  timeout=HTTP_IDLE_SECONDS)
                except asyncio.LimitOverrunError:
                    await self._write(client, http_response(
                        431, b"request head too large\n", "text/plain", close=True))
                    return
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    return
                client.waiting_since = None
                request = parse_request_head(head)
                if request is None:
                    await self._write(client, http_response(400, b"bad request\n", "text/plain",
                                                            close=True))
                    return
                method, path, headers = request
                # A body is never read: answer, then close rather than parse it as a request.
                close = (headers.get("connection", "").lower() == "close"
                         or headers.get("content-length", "0") != "0"
                         or "transfer-encoding" in headers)
                status, body, content_type = self._route(method, path, headers)
                await self._write(client, http_response(
                    status, b"" if method == "HEAD" else body, content_type, close=close,
                    length=len(body)))
                if close:
                    return
                await asyncio.sleep(0)  # pipelined requests of one client do not hog the loop
        except (TimeoutError, ConnectionError):
            return  # a write not taken in time, or the peer gone
        finally:
            self._clients.discard(client)
            transport = writer.transport
            if transport.get_write_buffer_size() > 0:
                transport.abort()  # close() would wait for a peer that does not read
            else:
                writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), timeout=1.0)

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


# Time to send a request head, on a new connection or between requests of a kept-alive one.
HTTP_IDLE_SECONDS = 30.0
# Connections served at once: Prometheus (an HA pair), the container's health check and a
# few people need far fewer.
HTTP_MAX_CLIENTS = 64
# At the cap, a new connection may replace one that has waited on its peer this long.
HTTP_EVICT_AFTER_SECONDS = 1.0
# Time for the transport to take an answer (a /metrics body is tens of kilobytes).
HTTP_WRITE_SECONDS = 10.0
# A request head larger than this is refused (431); a scraper's is a few hundred bytes.
HTTP_MAX_HEAD_BYTES = 8192
# Connections the kernel queues for us, and how many we take per wake-up before the loop
# runs other work.
HTTP_LISTEN_BACKLOG = 128
HTTP_ACCEPTS_PER_WAKEUP = 32
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}


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


_REFUSAL = http_response(503, b"too many clients\n", "text/plain", close=True)
