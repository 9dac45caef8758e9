"""What a failure means (faults.classify), the supervisor's restarts, hostile readings' reasons,
and a daemon-thread call that never holds an exit up."""

from __future__ import annotations

import asyncio
import json
import threading

import asyncpg
import pytest

from sensor_predictor import faults, features


@pytest.mark.parametrize(("exc", "kind"), [
    (asyncpg.QueryCanceledError("canceling statement due to user request"), faults.TRANSIENT),
    (asyncpg.TooManyConnectionsError("too many connections"), faults.TRANSIENT),
    (asyncpg.ReadOnlySQLTransactionError("read-only transaction"), faults.TRANSIENT),
    (asyncpg.IdleInTransactionSessionTimeoutError("timeout"), faults.TRANSIENT),
    (asyncpg.SerializationError("could not serialize"), faults.TRANSIENT),
    (asyncpg.DeadlockDetectedError("deadlock"), faults.TRANSIENT),
    (asyncpg.InsufficientPrivilegeError("permission denied"), faults.CONFIGURATION),
    (asyncpg.UndefinedTableError("relation does not exist"), faults.CONFIGURATION),
    (asyncpg.UndefinedFunctionError("function does not exist"), faults.CONFIGURATION),
    (ConnectionResetError(), faults.UNAVAILABLE),
    (asyncpg.AdminShutdownError("terminating connection"), faults.UNAVAILABLE),
    (RecursionError(), faults.BUG),
    (asyncpg.DataError("invalid input"), faults.BUG),
])
def test_errors_are_classified_by_what_they_mean(exc: BaseException, kind: str) -> None:
    assert faults.classify(exc) == kind


@pytest.mark.asyncio
async def test_a_task_that_fails_is_logged_counted_shown_down_and_restarted() -> None:
    runs: list[int] = []
    restarts: list[str] = []
    health = faults.TaskHealth()
    stopping = asyncio.Event()
    seen_down: list[dict[str, object]] = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise asyncpg.QueryCanceledError("canceling statement due to user request")
        if len(runs) == 2:
            return  # an unexpected end, too
        stopping.set()

    def restarted(name: str) -> None:
        restarts.append(name)
        seen_down.append(health.report())

    await asyncio.wait_for(faults.supervise("model", flaky, stopping=stopping, health=health,
                                            on_restart=restarted), timeout=5)
    assert len(runs) == 3
    assert restarts == ["model", "model"]
    assert "QueryCanceledError" in str(seen_down[0]["model"])  # down, with its error
    assert health.report() == {}  # up again


@pytest.mark.parametrize(("raw", "reason"), [
    ('{"a": ' + "[" * 5000 + "]" * 5000 + ', "b": 1}', features.TOO_DEEP),
    ('{"junk": ' + "[" * 5000 + "]" * 5000 + ', "a": 1, "b": 1}', features.TOO_DEEP),
    ('{"a": "' + "x" * (features.MAX_READING_CHARS + 1) + '", "b": 1}', features.TOO_LARGE),
    ('{"a": ' + "9" * 5000 + ', "b": 1}', features.OUT_OF_RANGE),
    ('{"a": -' + "9" * 5000 + ', "b": 1}', features.OUT_OF_RANGE),
    ('{"junk": ' + "9" * 5000 + ', "a": 1, "b": 2}', None),
    ('{"\\ud83d\\ude00": 1, "a": 1, "b": 2}', None),
    ('{"a": "' + "x" * 100_000 + '", "b": 1}', features.NOT_A_NUMBER),
])
def test_hostile_readings_get_a_stable_reason_and_never_raise(raw: str, reason: str | None
                                                              ) -> None:
    bad = features.classify(7, raw, ["a", "b"])
    assert (bad.reason if bad else None) == reason
    if bad is not None:
        assert len(bad.detail) < 200
    ids, matrix, errors = features.parse_raw([(1, json.dumps({"a": 1, "b": 2})), (2, raw)],
                                             ["a", "b"])
    assert ids[0] == 1 and matrix.shape[1] == 2
    assert [e.reason for e in errors] == ([reason] if reason else [])


@pytest.mark.asyncio
async def test_a_daemon_thread_call_returns_and_a_hung_one_is_a_daemon() -> None:
    assert await faults.in_daemon_thread(sum, [1, 2, 3]) == 6
    with pytest.raises(ZeroDivisionError):
        await faults.in_daemon_thread(lambda: 1 / 0)
    release = threading.Event()
    hung = asyncio.ensure_future(faults.in_daemon_thread(release.wait))
    await asyncio.sleep(0.05)
    assert all(t.daemon for t in threading.enumerate() if t.name.startswith("daemon-"))
    hung.cancel()
    release.set()
