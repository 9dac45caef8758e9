"""The design we replace, rebuilt faithfully enough to time it (see the seed's
what-the-old-service-got-wrong.md, item 1): every INFERENCE_INTERVAL_SECONDS, SELECT up to 100
readings that have no prediction yet, decode their JSON in Python, predict the batch, then one
INSERT per prediction, committed together at the end of the cycle (an ORM session's add() +
commit()).

Kind to the old design where the seed does not say: the same fast driver (asyncpg) and the batch
predicted at once, features taken by name (its feature-order bug costs nothing anyway).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import numpy as np

SELECT_UNPREDICTED = """
SELECT r.id, r."values"
  FROM readings r
  LEFT JOIN predictions p ON p.reading_id = r.id
 WHERE p.id IS NULL
 ORDER BY r.id
 LIMIT $1
"""

INSERT_ONE = """
INSERT INTO predictions (reading_id, cluster_id, confidence_score, model_version, mlflow_run_id,
                         model_name)
VALUES ($1, $2, $3, $4, $5, 'sensor_failure_clustering')
"""


@dataclass
class Cycle:
    rows: int
    select_s: float
    predict_s: float
    insert_s: float

    @property
    def work_s(self) -> float:
        return self.select_s + self.predict_s + self.insert_s


@dataclass
class OldDesignResult:
    interval_s: float
    batch: int
    seconds: float
    cycles: list[Cycle] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(c.rows for c in self.cycles)

    def summary(self, design_interval_s: float) -> dict[str, Any]:
        work = [c.work_s for c in self.cycles if c.rows]
        med = statistics.median(work) if work else float("nan")
        return {
            "measured_interval_s": self.interval_s,
            "batch": self.batch,
            "seconds": round(self.seconds, 2),
            "cycles": len(self.cycles),
            "rows": self.rows,
            "cycle_work_median_ms": round(med * 1000, 2),
            "cycle_work_p95_ms": round(float(np.percentile(work, 95)) * 1000, 2) if work else None,
            "cycle_select_median_ms": round(
                statistics.median(c.select_s for c in self.cycles) * 1000, 2),
            "cycle_predict_median_ms": round(
                statistics.median(c.predict_s for c in self.cycles) * 1000, 2),
            "cycle_insert_commit_median_ms": round(
                statistics.median(c.insert_s for c in self.cycles) * 1000, 2),
            # What it did here, back to back (interval 0): its capacity.
            "capacity_interval_0_per_s": round(self.rows / self.seconds, 1),
            # What the real design does: batch per (interval + work).
            "design_throughput_per_s": round(self.batch / (design_interval_s + med), 3),
            "design_interval_s": design_interval_s,
            # Added delay of the poll alone: uniform over the interval, plus the cycle's work.
            "design_latency_p50_s": round(design_interval_s * 0.5 + med, 2),
            "design_latency_p99_s": round(design_interval_s * 0.99 + med, 2),
        }


async def run_old_design(conn: asyncpg.Connection, pipeline: Any, feature_names: list[str],
                         model_version: str, run_id: str, seconds: float,
                         interval_s: float = 0.0, batch: int = 100) -> OldDesignResult:
    """Poll cycles for `seconds` (interval_s between cycles; 0 measures its capacity)."""
    result = OldDesignResult(interval_s, batch, 0.0)
    t_start = time.perf_counter()
    while time.perf_counter() - t_start < seconds:
        t0 = time.perf_counter()
        rows = await conn.fetch(SELECT_UNPREDICTED, batch)
        t1 = time.perf_counter()
        if rows:
            docs = [json.loads(r["values"]) for r in rows]
            matrix = np.array([[float(d[name]) for name in feature_names] for d in docs])
            labels = pipeline.predict(matrix)
            distances = pipeline.transform(matrix)
            two = np.partition(distances, 1, axis=1)[:, :2]
            confidence = 1.0 - two[:, 0] / two[:, 1]
        t2 = time.perf_counter()
        if rows:
            async with conn.transaction():
                for r, label, conf in zip(rows, labels.tolist(), confidence.tolist(),
                                          strict=True):
                    await conn.execute(INSERT_ONE, r["id"], int(label), float(conf),
                                       model_version, run_id)
        t3 = time.perf_counter()
        result.cycles.append(Cycle(len(rows), t1 - t0, t2 - t1, t3 - t2))
        if not rows:
            break
        if interval_s:
            time.sleep(interval_s)  # noqa: ASYNC251 - the old service's blocking sleep, kept
    result.seconds = time.perf_counter() - t_start
    return result
