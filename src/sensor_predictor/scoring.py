"""One batch, start to end: claim a range, read its features, predict, write, commit."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import asyncpg
import numpy as np
import numpy.typing as npt

from sensor_predictor import db, features
from sensor_predictor.features import BadReading
from sensor_predictor.model_types import LoadedModel


@dataclass(frozen=True)
class Claim:
    """Readings handed out to this session (sp_claim), or taken over from a dead one."""

    claim_id: int
    reading_ids: list[int]
    previous_worker: str | None = None  # set when taken over
    # Rows of the model's read query, when they came with the claim (sp_claim_read).
    rows: list[asyncpg.Record] | None = field(default=None, repr=False, compare=False)
    # The read query could not cast a value: go straight to reading the JSON.
    needs_raw: bool = False
    # The claim took a whole batch from its interval: more is likely waiting.
    full: bool = False

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> Claim:
        previous = r.get("previous_worker")
        return cls(r["claim_id"], list(r["reading_ids"]), previous, full=bool(r.get("full")))


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

    @property
    def cluster_ids(self) -> npt.NDArray[np.int64]:
        return self.labels if self.stable is None else self.stable

    @property
    def size(self) -> int:
        return int(self.labels.size) + len(self.bad)


class Progress:
    """sp_claim moved on without handing out work (adopted rows the old predictor scored)."""


PROGRESS = Progress()  # the one instance: `handed is PROGRESS`


async def claim_next(conn: asyncpg.Connection, worker: str, batch_size: int
                     ) -> Claim | Progress | None:
    """The next claim; PROGRESS when the cursor moved but nothing is to be scored; None when
    nothing new is there."""
    record = await conn.fetchrow(db.queries()["claim"], worker, batch_size)
    if record is None:
        return None
    if record["claim_id"] is None:
        return PROGRESS
    return Claim.from_record(record)


async def claim_and_read(conn: asyncpg.Connection, worker: str, batch_size: int,
                         model: LoadedModel) -> Claim | Progress | None:
    """claim_next, with the claim's features read in the same round trip."""
    try:
        rows = await conn.fetch(db.queries()["claim_read"], worker, batch_size, model.read_query)
    except asyncpg.DataError:
        # A value PostgreSQL cannot cast: the statement failed, and with it the claim. Claim
        # the same readings again, and read their JSON.
        handed = await claim_next(conn, worker, batch_size)
        return replace(handed, needs_raw=True) if isinstance(handed, Claim) else handed
    if not rows:
        return None
    if rows[0]["claim_id"] is None:
        return PROGRESS
    return Claim(rows[0]["claim_id"], [r["id"] for r in rows], rows=rows,
                 full=bool(rows[0]["full"]))


async def take_orphan(conn: asyncpg.Connection, worker: str, fallback_seconds: float
                      ) -> tuple[Claim, float] | None:
    """A claim whose owner's session is gone, now ours; with how old it was (seconds)."""
    record = await conn.fetchrow(db.queries()["take_orphan"], worker, fallback_seconds)
    if record is None:
        return None
    return Claim.from_record(record), float(record["age_seconds"])


async def _read(conn: asyncpg.Connection, claim: Claim, model: LoadedModel
                ) -> tuple[list[int], features.Matrix, list[BadReading], list[float], bool]:
    """Ids to predict, their features and ages (seconds since insert), bad readings, slow path."""
    names = model.feature_names
    try:
        if claim.needs_raw:
            raise asyncpg.DataError("a value could not be cast (found by the claim's read)")
        rows = (claim.rows if claim.rows is not None
                else await conn.fetch(model.read_query, claim.reading_ids))
    except asyncpg.DataError:
        # A value PostgreSQL cannot cast (a word, a boolean, beyond float8): read this range's
        # JSON and check each reading in Python. Rare, and only this batch pays for it.
        raw_rows = await conn.fetch(db.queries()["read_range_raw"], claim.reading_ids)
        ages_by_id = {r["id"]: r["age_seconds"] for r in raw_rows}
        ids, matrix, bad = features.parse_raw([(r["id"], r["raw"]) for r in raw_rows], names)
        return ids, matrix, bad, [ages_by_id[i] for i in ids], True
    all_ids = [r["id"] for r in rows]
    matrix = features.to_matrix([r["features"] for r in rows], len(names))
    ages = [r["age_seconds"] for r in rows]
    ok = features.valid_rows(matrix)
    if ok.all():
        return all_ids, matrix, [], ages, False
    bad_ids = [i for i, good in zip(all_ids, ok.tolist(), strict=True) if not good]
    raw = {r["id"]: r["raw"] for r in await conn.fetch(db.queries()["read_raw_values"], bad_ids)}
    bad = []
    for reading_id in bad_ids:
        problem = features.classify(reading_id, raw.get(reading_id), names)
        bad.append(problem or BadReading(
            reading_id, features.NOT_A_NUMBER, "a feature value could not be read as a number"))
    good_idx = np.flatnonzero(ok).tolist()
    return ([all_ids[i] for i in good_idx], matrix[good_idx], bad, [ages[i] for i in good_idx],
            False)


async def score_claim(conn: asyncpg.Connection, claim: Claim, model: LoadedModel
                      ) -> BatchResult | None:
    """Score a claim with `model`; None when another worker scored it meanwhile."""
    started = time.perf_counter()
    ids, matrix, bad, ages, slow = await _read(conn, claim, model)
    labels, confidence, distances = model.predict_with_distance(matrix)
    stable = model.stable(labels)
    conf_list: list[float | None] = (confidence.tolist() if confidence is not None
                                     else [None] * len(ids))
    args = (claim.claim_id, ids, stable.tolist(), conf_list, model.version, model.run_id,
            model.model_name, [b.reading_id for b in bad], [b.reason for b in bad],
            [b.detail for b in bad], labels.tolist())
    # The claim row is deleted by the statement that writes the results, so the claim is
    # scored exactly once: a crash before the commit leaves the claim for someone to redo,
    # and a worker that finds it already gone writes nothing.
    conflicts = 0
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
                       stable=stable, ids=ids, matrix=matrix, distances=distances)
