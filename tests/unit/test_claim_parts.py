"""The claim side's pure parts: the read query's text (names never in it) and the orphan
timer's state between looks."""

from __future__ import annotations

from sensor_predictor import db
from sensor_predictor.worker import next_orphan_look


def test_the_read_query_depends_on_the_number_of_names_only() -> None:
    a = db.read_range_query(["Sensor 1", "x'y"])
    b = db.read_range_query(["other", "names\\"])
    assert a == b and "Sensor" not in a and "'" not in a
    assert db.read_range_query(["a"], keys_once=False) != db.read_range_query(["a"])
    assert "k.k1" in db.read_range_query(["a"]) and "k.k1" not in db.read_range_query(
        ["a"], keys_once=False)


def test_beyond_the_column_limit_names_are_picked_per_row() -> None:
    query = db.read_range_query([f"n{i}" for i in range(db.KEYS_AS_COLUMNS + 2)])
    assert f"k.k{db.KEYS_AS_COLUMNS}" in query
    assert f"($2::text[])[{db.KEYS_AS_COLUMNS + 1}]" in query
    assert f"AS k{db.KEYS_AS_COLUMNS + 1}" not in query


def test_the_orphan_timer_keeps_what_it_saw_and_never_moves_its_mark_back() -> None:
    after, known, orphans = next_orphan_look(10, 15, [(3, False), (12, True), (14, False)])
    assert (after, known, orphans) == (15, [3, 12, 14], {12})
    # A mark behind the last one (a sequence restored lower) never moves the look back.
    after, known, orphans = next_orphan_look(after, 7, [])
    assert (after, known, orphans) == (15, [], set())
