"""One batch, start to end: claim a range, read its features, predict, write, commit."""

from __future__ import annotations

import time
from dataclasses import dataclass

import asyncpg
import numpy as np
import numpy.typing as npt

from sensor_predictor import db, features
from sensor_predictor.features import BadReading
from sensor_predictor.model_holder import LoadedModel


@dataclass(frozen=True)
class Claim:
    """A range of readings, (from_txid, from_id) exclusive to (to_txid, to_id) inclusive."""

    claim_id: int
    from_txid: int
    from_id: int
    to_txid: int
    to_id: int

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> Claim:
        return cls(r["claim_id"], r["from_txid"], r["from_id"], r["to_txid"], r["to_id"])

    @property
    def bounds(self) -> tuple[int, int, int, int]:
        return self.from_txid, self.from_id, self.to_txid, self.to_id


@dataclass(frozen=True)
class BatchResult:
    model: LoadedModel
    labels: npt.NDArray[np.int64]
    bad: list[BadReading]
    latencies: npt.NDArray[np.float64]  # seconds, insert to commit, one per prediction
    duration: float  # seconds, read to commit
    slow_path: bool

    @property
    def size(self) -> int:
        return int(self.labels.size) + len(self.bad)


async def claim_next(conn: asyncpg.Connection, worker: str, batch_size: int) -> Claim | None:
    record = await conn.fetchrow(db.queries()["claim_range"], worker, batch_size)
    return None if record is None else Claim.from_record(record)


async def find_orphan(conn: asyncpg.Connection, older_than_seconds: float) -> Claim | None:
    record = await conn.fetchrow(db.queries()["find_orphan_claim"], older_than_seconds)
    return None if record is None else Claim.from_record(record)


async def waiting_behind_horizon(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval(db.queries()["waiting_behind_horizon"]))


async def _read(conn: asyncpg.Connection, claim: Claim, model: LoadedModel
                ) -> tuple[list[int], features.Matrix, list[BadReading], list[float], bool]:
    """Ids to predict, their features and ages (seconds since insert), bad readings, slow path."""
    names = model.feature_names
    try:
        rows = await conn.fetch(model.read_query, *claim.bounds)
    except asyncpg.DataError:
        # A value PostgreSQL cannot cast (a word, a boolean, beyond float8): read this range's
        # JSON and check each reading in Python. Rare, and only this batch pays for it.
        raw_rows = await conn.fetch(db.queries()["read_range_raw"], *claim.bounds)
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
    """Score a claimed range with `model`; None when another worker scored it meanwhile."""
    started = time.perf_counter()
    ids, matrix, bad, ages, slow = await _read(conn, claim, model)
    labels, confidence = model.predict(matrix)
    conf_list: list[float | None] = (confidence.tolist() if confidence is not None
                                     else [None] * len(ids))
    version, run_id, name = model.version, model.run_id, model.model_name
    predictions = [
        (reading_id, cluster, conf, version, run_id, name)
        for reading_id, cluster, conf in zip(ids, labels.tolist(), conf_list, strict=True)
    ]
    errors = [(b.reading_id, b.reason, b.detail, version) for b in bad]
    # The claim row is deleted in the transaction that writes the results, so the range is
    # scored exactly once: a crash before the commit leaves the claim for someone to redo,
    # and a worker that finds it already gone writes nothing.
    async with conn.transaction():
        if await conn.fetchval(db.queries()["take_claim"], claim.claim_id) is None:
            return None
        await db.write_results(conn, predictions, errors)
    committed = time.perf_counter()
    latencies = np.asarray(ages, dtype=np.float64) + (committed - started)
    return BatchResult(model=model, labels=labels, bad=bad, latencies=latencies,
                       duration=committed - started, slow_path=slow)
