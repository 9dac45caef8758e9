"""The demo's closing summary: what the database says happened (named queries), rendered as
lines (pure), ending with the exactly-once verdict."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from sensor_predictor import db
from sensor_predictor.demo.console import format_ms
from sensor_predictor.devtools.prometheus_text import histogram_quantile
from sensor_predictor.devtools.tally import Tally, tally


@dataclass(frozen=True)
class DriftRow:
    model_version: str
    score: float
    peak: float | None
    detected_at: datetime
    ended_at: datetime | None


@dataclass(frozen=True)
class ShadowRow:
    candidate_version: str
    readings: int
    windows: int
    ari: float | None  # means over its windows
    same_id: float | None
    drift: float | None


@dataclass(frozen=True)
class Facts:
    """The demo's readings (id above the baseline) and what became of them."""

    tally: Tally
    per_version: list[tuple[str, int]]  # first served first
    bad_by_reason: list[tuple[str, int]]
    drift: list[DriftRow]
    latency_buckets: list[tuple[float, float]] = field(default_factory=list)
    # model version -> {stable cluster id: predictions}
    clusters: dict[str, dict[int, int]] = field(default_factory=dict)
    shadow: list[ShadowRow] = field(default_factory=list)


async def gather(pool: asyncpg.Pool, baseline_reading: int, baseline_drift: int,
                 latency_buckets: list[tuple[float, float]]) -> Facts:
    q = db.queries()
    versions = await pool.fetch(q["predictions_by_version"], baseline_reading)
    bad = await pool.fetch(q["errors_by_reason"], baseline_reading)
    drift = await pool.fetch(q["drift_rows_after"], baseline_drift)
    clusters: dict[str, dict[int, int]] = {}
    for r in await pool.fetch(q["cluster_ids_by_version"], baseline_reading):
        clusters.setdefault(str(r["model_version"]), {})[int(r["cluster_id"])] = int(r["n"])
    shadow = [ShadowRow(str(r["model_version"]), int(r["readings"]), int(r["windows"]),
                        _float(r["ari"]), _float(r["same_id"]), _float(r["drift"]))
              for r in await pool.fetch(q["shadow_by_candidate"], baseline_reading)]
    return Facts(
        await tally(pool, baseline_reading),
        [(str(r["model_version"]), int(r["n"])) for r in versions],
        [(str(r["reason"]), int(r["n"])) for r in bad],
        [DriftRow(str(r["model_version"]), float(r["drift_score"]),
                  None if r["peak_score"] is None else float(r["peak_score"]),
                  r["detection_time"], r["ended_at"]) for r in drift],
        latency_buckets, clusters, shadow)


def _float(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _clock(moment: datetime) -> str:
    return moment.astimezone().strftime("%H:%M:%S")


def verdict(t: Tally, interrupted: bool) -> tuple[bool, str]:
    """The exactly-once check: (ok, the line that says so)."""
    if t.duplicated == 0 and t.missing == 0:
        return True, (f"OK: each of the {t.readings} readings has exactly one prediction or "
                      "error")
    if t.duplicated == 0 and interrupted:
        return True, (f"OK so far: no reading has two results; {t.missing} left unscored by "
                      "the interruption")
    return False, (f"FAILED: {t.missing} reading(s) without a result, {t.duplicated} with more "
                   "than one")


def render(facts: Facts, *, stream_seconds: float, target_rate: float, served: Sequence[str],
           interrupted: bool, extra: Sequence[tuple[str, str]] = ()) -> tuple[list[str], bool]:
    """The summary's lines (label, then text) and whether the exactly-once check holds."""
    rows: list[tuple[str, str]] = []
    t = facts.tally
    rate = t.readings / stream_seconds if stream_seconds else 0.0
    rows.append(("stream", f"{stream_seconds:.1f} s, {rate:.0f} readings/s on average "
                           f"(target {target_rate:g})"))
    rows.append(("readings written", f"{t.readings}"))
    predicted = sum(n for _, n in facts.per_version)
    per_version = "   ".join(f"v{v}: {n}" for v, n in facts.per_version)
    rows.append(("predictions", f"{predicted}" + (f"   ({per_version})" if per_version else "")))
    for i, (version, _) in enumerate(facts.per_version):
        counts = facts.clusters.get(version, {})
        total = sum(counts.values()) or 1
        shares = "  ".join(f"{cid}: {n / total:.0%}" for cid, n in sorted(counts.items()))
        rows.append(("by cluster id" if i == 0 else "", f"v{version}  {shares}"))
    for sh in facts.shadow:
        rows.append(("shadow", f"candidate v{sh.candidate_version}: {sh.readings} readings "
                               f"scored beside the active model, {sh.windows} window(s): "
                               f"adjusted Rand index {_fmt(sh.ari)}, same stable id "
                               f"{_fmt(sh.same_id)}, its own drift {_fmt(sh.drift)} (means)"))
    n_bad = sum(n for _, n in facts.bad_by_reason)
    reasons = ", ".join(f"{r}: {n}" for r, n in facts.bad_by_reason)
    rows.append(("bad readings", f"{n_bad}" + (f"   ({reasons})" if reasons else "")))
    rows.append(("drift events", f"{len(facts.drift)}"))
    for d in facts.drift:
        if d.ended_at is not None:
            state = f"ended {_clock(d.ended_at)}"
        elif served and d.model_version != served[-1]:
            state = "open when the model was replaced"
        else:
            state = "open"
        peak = d.peak if d.peak is not None else d.score
        rows.append(("", f"model v{d.model_version}: score {d.score:.3f}, peak {peak:.3f}, at "
                         f"{_clock(d.detected_at)}, {state}"))
    b = facts.latency_buckets
    if b:
        rows.append(("latency p50 / p99", f"{format_ms(histogram_quantile(0.5, b))} ms / "
                                          f"{format_ms(histogram_quantile(0.99, b))} ms   "
                                          f"(insert to prediction commit, {int(b[-1][1])} "
                                          "readings)"))
    rows.append(("models served", " -> ".join(f"v{v}" for v in served) or "none"))
    ok, text = verdict(t, interrupted)
    rows.append(("exactly-once", text))
    rows.extend(extra)
    return [f"  {label:<19}{text}" for label, text in rows], ok


