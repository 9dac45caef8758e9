"""The exactly-once tally: how many readings have exactly one result, none, or more than one
(the named query `exactly_once_tally`). The demo, the tests and the bench end on it."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from sensor_predictor import db

__all__ = ["Tally", "tally"]


@dataclass(frozen=True)
class Tally:
    readings: int
    predicted: int  # readings with exactly one prediction and no error
    errors: int  # readings with exactly one error and no prediction
    missing: int  # readings with neither a prediction nor an error
    duplicated: int  # readings with more than one result
    prediction_rows: int
    error_rows: int

    @property
    def exactly_once(self) -> bool:
        return self.missing == 0 and self.duplicated == 0


async def tally(conn: asyncpg.Connection | asyncpg.Pool, above: int = 0) -> Tally:
    """The tally of the readings whose id is above `above` (all of them by default)."""
    row = await conn.fetchrow(db.queries()["exactly_once_tally"], above)
    return Tally(**{k: int(v) for k, v in dict(row).items()})
