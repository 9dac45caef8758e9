"""The doorbell's decisions (src/sensor_predictor/doorbell.py): when the drain loop gives the
bell up, and which pass is the look after a grant that lets the worker sleep."""

from __future__ import annotations

from sensor_predictor.doorbell import BellState, pass_ends, pass_starts, work_found


def _granted(state: BellState) -> None:
    """What the doorbell session does when the lock is granted."""
    state.held, state.looked = True, False
    state.grant += 1


def test_a_pass_ending_wants_the_bell() -> None:
    state = BellState()
    assert pass_starts(state) is None
    pass_ends(state, None, ok=True)
    assert state.want and not state.looked


def test_the_pass_after_the_grant_is_the_look_and_the_next_wake_disarms() -> None:
    state = BellState(want=True)
    _granted(state)
    under = pass_starts(state)
    assert under == state.grant and state.want  # the look keeps the bell
    pass_ends(state, under, ok=True)
    assert state.looked  # asleep now, armed
    assert pass_starts(state) is None and not state.want  # woken: given up while it drains
    pass_ends(state, None, ok=True)
    assert state.want


def test_a_grant_during_a_pass_needs_one_more_pass() -> None:
    state = BellState(want=True)
    under = pass_starts(state)  # the request still queued
    _granted(state)  # granted while the pass runs: its snapshot may predate a writer's commit
    assert pass_ends(state, under, ok=True)  # a look is owed: the worker wakes itself
    assert not state.looked
    assert pass_starts(state) == state.grant
    assert not pass_ends(state, state.grant, ok=True) and state.looked


def test_a_failed_pass_is_no_look() -> None:
    state = BellState(want=True)
    _granted(state)
    under = pass_starts(state)
    assert not pass_ends(state, under, ok=False)  # the retry's backoff wakes it, not this
    assert not state.looked and state.want
    assert pass_starts(state) == state.grant  # the retry is the look


def test_a_pass_under_an_older_grant_is_no_look() -> None:
    state = BellState(want=True)
    _granted(state)
    under = pass_starts(state)
    state.held = False  # the session lost meanwhile, and the bell granted again
    _granted(state)
    pass_ends(state, under, ok=True)
    assert not state.looked


def test_a_look_that_finds_work_gives_the_bell_up_and_a_new_look_follows() -> None:
    state = BellState(want=True)
    _granted(state)
    under = pass_starts(state)
    assert under == state.grant and state.want  # the look: the bell is kept
    assert work_found(state) and not state.want  # it found readings: awake, given up
    state.held = False  # the session releases it
    pass_ends(state, under, ok=True)
    assert state.want and not state.looked  # asked for again; the next grant needs a look
    assert not work_found(state)  # not held: nothing to give up
