"""The demo's live status line: rates, latency and drift over the last interval (pure)."""

from __future__ import annotations

from dataclasses import dataclass

from sensor_predictor.demo.console import format_ms
from sensor_predictor.devtools.prometheus_text import bucket_delta, histogram_quantile
from sensor_predictor.snapshot import WorkerSnapshot

STATUS_HEADER = (f"{'time':>7} {'written/s':>9} {'scored/s':>9} {'p50 ms':>7} {'p99 ms':>7}"
                 f"  {'drift':<11} {'model':<6} {'backlog':>7}")


@dataclass(frozen=True)
class Sample:
    """One look at the stream: time.monotonic(), the highest reading id, the worker's snapshot
    and the backlog (None when it could not be counted)."""

    at: float
    max_id: int
    worker: WorkerSnapshot
    backlog: int | None

    @property
    def scored(self) -> int:
        return self.worker.predictions + self.worker.bad_readings


def status_line(elapsed: float, before: Sample, now: Sample, model: str | None) -> str:
    """One row under STATUS_HEADER: rates and latency over the interval since `before`."""
    dt = max(now.at - before.at, 1e-9)
    delta = bucket_delta(now.worker.latency_buckets, before.worker.latency_buckets)
    score = now.worker.drift_score
    drift = "filling" if score is None else f"{score:.3f}"
    if now.worker.drift_detected:
        drift += " DRIFT"
    version = f"v{model}" if model else "-"
    backlog = "-" if now.backlog is None else str(now.backlog)
    return (f"{elapsed:6.1f}s {(now.max_id - before.max_id) / dt:9.0f} "
            f"{(now.scored - before.scored) / dt:9.0f} "
            f"{format_ms(histogram_quantile(0.5, delta)):>7} "
            f"{format_ms(histogram_quantile(0.99, delta)):>7}  {drift:<11} {version:<6} "
            f"{backlog:>7}")
