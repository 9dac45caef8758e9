"""One batch, start to end: claim a range, read its features, predict, write, commit."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cache

import asyncpg
import numpy as np
import numpy.typing as npt

from sensor_predictor import db, features
from sensor_predictor.features import BadReading
from sensor_predictor.model_types import LoadedModel

# The slow path's caps, applied by PostgreSQL before Python parses anything: a reading's values
# larger than this (bytes), or nested deeper than 64 levels (queries.sql: read_range_raw), is
# not parsed but recorded as too_large / unparseable.
MAX_VALUES_BYTES = 1 << 20


@dataclass(frozen=True)
class Claim:
    """Readings handed out to this worker (sp_claim), or taken over from one that is gone."""

    claim_id: int
    reading_ids: list[int]
    previous_worker: str | None = None  # set when taken over
    # Rows of the model's read query, when they came with the claim (sp_claim_read).
    rows: list[asyncpg.Record] | None = field(default=None, repr=False, compare=False)
    # The read query could not cast a value: go straight to reading the JSON.
    needs_raw: bool = False
    # The claim took a whole batch from its interval: more is likely waiting.
    full: bool = False
    # The claim's takeovers when it was handed to us: the result statement must quote it.
    token: int = 0
    # This session holds the claim's advisory lock (release it once the claim is done).
    locked: bool = False


@dataclass(frozen=True)
class Ownership:
    """How this worker owns its claims: lease_seconds None is a session advisory lock (a session
    of its own: a direct connection, a session pooler), else a lease it renews."""

    lease_seconds: float | None = None
    # The claim whose lock this session holds and is done with: released by the next claim call.
    release: int | None = None
    # Called with the reason when a claim call re-anchored the cursor (a moved database).
    on_reanchor: Callable[[str], None] | None = None

    def reanchored(self, reason: str | None) -> None:
        if reason is not None and self.on_reanchor is not None:
            self.on_reanchor(reason)


@dataclass(frozen=True)
class BatchResult:
    model: LoadedModel
    labels: npt.NDArray[np.int64]
    """The model's own labels."""
    bad: list[BadReading]
    latencies: npt.NDArray[np.float64]  # seconds, insert to commit, one per prediction
    duration: float  # seconds, read to commit
    slow_path: bool
    conflicts: int = 0  # results already there, kept (see score_claim)
    stable: npt.NDArray[np.int64] | None = None
    """The stable cluster ids written (None: the labels, unaligned)."""
    ids: list[int] | None = None
    """The reading ids predicted, in the order of labels."""
    matrix: features.Matrix | None = None
    """Their features (what a shadow candidate reading the same features scores)."""
    distances: npt.NDArray[np.float64] | None = None
    """Each prediction's distance to its nearest centre (the outlier share's input)."""
    write_seconds: float = 0.0
    """Of duration, the result statement (write, claim deleted, commit and its flush)."""

    @property
    def cluster_ids(self) -> npt.NDArray[np.int64]:
        return self.labels if self.stable is None else self.stable

    @property
    def size(self) -> int:
        return int(self.labels.size) + len(self.bad)


class Progress:
    """sp_claim moved on without handing out work (adopted rows the old predictor scored)."""


PROGRESS = Progress()  # the one instance: `handed is PROGRESS`


async def claim_next(conn: asyncpg.Connection, worker: str, batch_size: int,
                     own: Ownership = Ownership()) -> Claim | Progress | None:
    """The next claim; PROGRESS when the cursor moved but nothing is to be scored; None when
    nothing new is there."""
    record = await conn.fetchrow(db.queries()["claim"], worker, batch_size, own.lease_seconds,
                                 own.release)
    if record is None:
        return None
    own.reanchored(record["reanchored"])
    if record["claim_id"] is None:
        return PROGRESS
    return Claim(record["claim_id"], list(record["reading_ids"]), full=bool(record["full"]),
                 locked=own.lease_seconds is None)


async def claim_and_read(conn: asyncpg.Connection, worker: str, batch_size: int,
                         model: LoadedModel, own: Ownership = Ownership()
                         ) -> Claim | Progress | None:
    """claim_next, with the claim's features read in the same round trip."""
    try:
        rows = await conn.fetch(db.queries()["claim_read"], worker, batch_size,
                                _claim_read_query(model.feature_names),
                                list(model.feature_names), own.lease_seconds, own.release)
    except asyncpg.DataError:
        # A value PostgreSQL cannot cast: the statement failed, and with it the claim (its
        # lock was never taken; the released one stays released). Claim the same readings
        # again, and read their JSON.
        handed = await claim_next(conn, worker, batch_size, replace(own, release=None))
        return replace(handed, needs_raw=True) if isinstance(handed, Claim) else handed
    if not rows:
        return None
    own.reanchored(rows[0]["reanchored"])
    if rows[0]["claim_id"] is None:
        return PROGRESS
    return Claim(rows[0]["claim_id"], [r["id"] for r in rows], rows=rows,
                 full=bool(rows[0]["full"]), locked=own.lease_seconds is None)


@cache
def _claim_read_query(feature_names: tuple[str, ...]) -> str:
    """The read that comes with a claim: planned at every claim (dynamic SQL) and over the few
    rows of a caught-up stream, so the names are picked per row (db.read_range_query)."""
    return db.read_range_query(feature_names, keys_once=False)


async def take_orphan(conn: asyncpg.Connection, worker: str, fallback_seconds: float,
                      candidates: list[int], own: Ownership = Ownership()
                      ) -> tuple[Claim, float] | None:
    """One of `candidates` (claims the orphan timer found takeable), now ours; with how old it
    was (seconds)."""
    record = await conn.fetchrow(db.queries()["take_orphan"], worker, fallback_seconds,
                                 own.lease_seconds, own.release, candidates)
    if record is None:
        return None
    claim = Claim(record["claim_id"], list(record["reading_ids"]), record["previous_worker"],
                  token=int(record["token"]), locked=bool(record["locked"]))
    return claim, float(record["age_seconds"])


async def find_orphans(conn: asyncpg.Connection | asyncpg.Pool, after_id: int, known: list[int],
                       fallback_seconds: float) -> tuple[list[tuple[int, bool]], int]:
    """Claims above after_id and those in known: (id, may be taken over now); and the next
    look's after_id."""
    rows = await conn.fetch(db.queries()["find_orphans"], after_id, known, fallback_seconds)
    marks = [r["mark"] for r in rows if r["id"] is None]
    mark = int(marks[0]) if marks and marks[0] is not None else after_id
    return [(int(r["id"]), bool(r["orphan"])) for r in rows if r["id"] is not None], mark


async def renew_leases(conn: asyncpg.Connection | asyncpg.Pool, worker: str,
                       lease_seconds: float, claim_ids: list[int]) -> None:
    await conn.execute(db.queries()["renew_leases"], worker, lease_seconds, claim_ids)


async def release_lock(conn: asyncpg.Connection, claim_id: int) -> None:
    """Release a finished claim's session lock (when no next claim call did)."""
    await conn.fetchval(db.queries()["claim_unlock"], claim_id)


async def _read(conn: asyncpg.Connection, claim: Claim, model: LoadedModel
                ) -> tuple[list[int], features.Matrix, list[BadReading], list[float], bool]:
    """Ids to predict, their features and ages (seconds since insert), bad readings, slow path."""
    names = model.feature_names
    try:
        if claim.needs_raw:
            raise asyncpg.DataError("a value could not be cast (found by the claim's read)")
        rows = (claim.rows if claim.rows is not None
                else await conn.fetch(model.read_query, claim.reading_ids,
                                      list(model.feature_names)))
    except asyncpg.DataError:
        # A value PostgreSQL cannot cast (a word, a boolean, beyond float8): read this range's
        # JSON and check each reading in Python. Rare, and only this batch pays for it.
        raw_rows = await conn.fetch(db.queries()["read_range_raw"], claim.reading_ids,
                                    MAX_VALUES_BYTES)
        ages_by_id = {r["id"]: r["age_seconds"] for r in raw_rows}
        flagged = [_flagged(r["id"], r["flag"]) for r in raw_rows if r["flag"] is not None]
        ids, matrix, bad = features.parse_raw(
            [(r["id"], r["raw"]) for r in raw_rows if r["flag"] is None], names)
        return ids, matrix, flagged + bad, [ages_by_id[i] for i in ids], True
    all_ids = [r["id"] for r in rows]
    matrix = features.to_matrix([r["features"] for r in rows], len(names))
    ages = [r["age_seconds"] for r in rows]
    ok = features.valid_rows(matrix)
    if ok.all():
        return all_ids, matrix, [], ages, False
    bad_ids = [i for i, good in zip(all_ids, ok.tolist(), strict=True) if not good]
    raw_rows = await conn.fetch(db.queries()["read_raw_values"], bad_ids, MAX_VALUES_BYTES)
    raw = {r["id"]: r["raw"] for r in raw_rows}
    flags = {r["id"]: r["flag"] for r in raw_rows if r["flag"] is not None}
    bad = []
    for reading_id in bad_ids:
        problem = (_flagged(reading_id, flags[reading_id]) if reading_id in flags
                   else features.classify(reading_id, raw.get(reading_id), names))
        bad.append(problem or BadReading(
            reading_id, features.NOT_A_NUMBER, "a feature value could not be read as a number"))
    good_idx = np.flatnonzero(ok).tolist()
    return ([all_ids[i] for i in good_idx], matrix[good_idx], bad, [ages[i] for i in good_idx],
            False)


def _flagged(reading_id: int, flag: str) -> BadReading:
    """A reading PostgreSQL flagged before Python parsed it (read_range_raw's caps)."""
    if flag == features.TOO_LARGE:
        return BadReading(reading_id, features.TOO_LARGE,
                          f"values is larger than {MAX_VALUES_BYTES} bytes: not parsed")
    return BadReading(reading_id, features.TOO_DEEP,
                      "values is nested deeper than 64 levels: not parsed")


async def _read_isolated(
    conn: asyncpg.Connection, claim: Claim, model: LoadedModel
) -> tuple[list[int], features.Matrix, list[BadReading], list[float], bool]:
    """_read for a claim under the dead-letter rule: every reading's JSON, its size checked by
    PostgreSQL before it is sent, each reading checked alone (features.parse_raw never raises)."""
    limit = features.MAX_READING_CHARS
    rows = await conn.fetch(db.queries()["read_range_guarded"], claim.reading_ids, limit)
    raw_rows: list[tuple[int, str | None]] = []
    oversized: list[BadReading] = []
    for r in rows:
        if r["raw"] is None and not r["missing"]:
            oversized.append(BadReading(
                r["id"], features.TOO_LARGE,
                f"values is {r['chars']:,} characters of JSON, beyond {limit:,}"))
        else:
            raw_rows.append((r["id"], r["raw"]))
    ids, matrix, bad = features.parse_raw(raw_rows, model.feature_names)
    ages_by_id = {r["id"]: r["age_seconds"] for r in rows}
    return ids, matrix, oversized + bad, [ages_by_id[i] for i in ids], True


def _predict_each(model: LoadedModel, ids: list[int], matrix: features.Matrix,
                  ages: list[float]
                  ) -> tuple[list[int], features.Matrix, list[float], list[BadReading]]:
    """The rows the model can score, one at a time: a row whose prediction raises becomes an
    error row (the model, not the reading, may be at fault: the detail says what was raised)."""
    keep: list[int] = []
    bad: list[BadReading] = []
    for i, reading_id in enumerate(ids):
        try:
            model.predict(matrix[i:i + 1])
        except Exception as exc:
            bad.append(BadReading(reading_id, features.UNPARSEABLE,
                                  f"the model could not score it: {type(exc).__name__}"))
        else:
            keep.append(i)
    return [ids[i] for i in keep], matrix[keep], [ages[i] for i in keep], bad


async def score_claim(conn: asyncpg.Connection, claim: Claim, model: LoadedModel, *,
                      isolated: bool = False) -> BatchResult | None:
    """Score a claim with `model`; None when its results came late: another worker took the
    claim over (or wrote it) meanwhile, and nothing was written.

    `isolated`: the dead-letter path (docs/faults.md), for a claim that failed or was taken
    over too often: sizes checked in SQL, each reading parsed alone, and a prediction that
    raises retried row by row, so that whatever breaks is one reading's error row."""
    started = time.perf_counter()
    if isolated:
        ids, matrix, bad, ages, slow = await _read_isolated(conn, claim, model)
        try:
            labels, confidence, distances = model.predict_with_distance(matrix)
        except Exception:
            ids, matrix, ages, unscorable = _predict_each(model, ids, matrix, ages)
            bad = bad + unscorable
            labels, confidence, distances = model.predict_with_distance(matrix)
    else:
        ids, matrix, bad, ages, slow = await _read(conn, claim, model)
        labels, confidence, distances = model.predict_with_distance(matrix)
    stable = model.stable(labels)
    conf_list: list[float | None] = (confidence.tolist() if confidence is not None
                                     else [None] * len(ids))
    args = (claim.claim_id, ids, stable.tolist(), conf_list, model.version, model.run_id,
            model.model_name, [b.reading_id for b in bad], [b.reason for b in bad],
            [b.detail for b in bad], labels.tolist(), claim.token)
    # The claim row is deleted by the statement that writes the results, so the claim is
    # scored exactly once: a crash before the commit leaves the claim for someone to redo,
    # and a worker that finds it already gone writes nothing.
    conflicts = 0
    writing = time.perf_counter()
    try:
        taken = await conn.fetchval(db.queries()["write_claim"], *args)
    except asyncpg.UniqueViolationError:
        # A result for one of these readings with this model version exists already: written
        # by something else than the claim protocol (the old predictor still running, a manual
        # insert). Keep it, write the rest, and say so.
        row = await conn.fetchrow(db.queries()["write_claim_tolerant"], *args)
        taken = row["taken"]
        conflicts = len(ids) + len(bad) - int(row["written"]) if taken else 0
    if not taken:
        return None
    committed = time.perf_counter()
    latencies = np.asarray(ages, dtype=np.float64) + (committed - started)
    return BatchResult(model=model, labels=labels, bad=bad, latencies=latencies,
                       duration=committed - started, slow_path=slow, conflicts=conflicts,
                       stable=stable, ids=ids, matrix=matrix, distances=distances,
                       write_seconds=committed - writing)
