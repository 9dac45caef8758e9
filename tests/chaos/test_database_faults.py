"""The database says "not now" (issue 23, finding 2): a cancel storm, a statement_timeout, too many
connections, a read-only server. Each is followed by an activation: the worker swaps within a
bound, and /ready tells the truth throughout (down while the database refuses its work, ready
with the new model after). One worker, four faults in a row, on the worker's own login role so
that the test's sessions (and other tests) are never touched."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest

from sensor_predictor.devtools.worker_process import WorkerProcess
from sensor_predictor.training import activate_model
from tests.support.chaos import GOOD_ROWS, check_invariant, machine_id, served, wait_settled
from tests.support.chaos_fixtures import LoginRole, Workers
from tests.support.databases import Database
from tests.support.models import Models
from tests.support.readings import INSERT_READINGS

pytestmark = [pytest.mark.asyncio, pytest.mark.chaos]

FAULT_SECONDS = 2.0
SWAP_BOUND_SECONDS = 10.0

async def _terminate_worker_sessions(conn: asyncpg.Connection, role: str) -> None:
    """Role settings apply to new sessions: end the worker's, it opens new ones."""
    await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                       " WHERE usename = $1", role)


@contextlib.asynccontextmanager
async def _cancel_storm(db: Database, conn: asyncpg.Connection, role: str
                       ) -> AsyncIterator[None]:
    storm_conn = await db.connect()

    async def storm() -> None:
        while True:
            await storm_conn.execute("SELECT pg_cancel_backend(pid) FROM pg_stat_activity"
                               " WHERE usename = $1 AND state = 'active'", role)
            await asyncio.sleep(0.005)

    task = asyncio.create_task(storm())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await storm_conn.close()


@contextlib.asynccontextmanager
async def _role_setting(db: Database, conn: asyncpg.Connection, role: str, setting: str
                        ) -> AsyncIterator[None]:
    await conn.execute(f"ALTER ROLE {role} SET {setting}")
    await _terminate_worker_sessions(conn, role)
    try:
        yield
    finally:
        name = setting.split("=")[0].strip()
        await conn.execute(f"ALTER ROLE {role} RESET {name}")
        await _terminate_worker_sessions(conn, role)


@contextlib.asynccontextmanager
async def _too_many_connections(db: Database, conn: asyncpg.Connection, role: str
                                ) -> AsyncIterator[None]:
    await conn.execute(f"ALTER ROLE {role} CONNECTION LIMIT 0")
    await _terminate_worker_sessions(conn, role)
    try:
        yield
    finally:
        await conn.execute(f"ALTER ROLE {role} CONNECTION LIMIT -1")


FAULTS: list[tuple[str, Callable[[Database, asyncpg.Connection, str], Any]]] = [
    ("cancel storm", _cancel_storm),
    ("statement_timeout",
     lambda d, c, r: _role_setting(d, c, r, "statement_timeout = '1ms'")),
    ("too many connections", _too_many_connections),
    ("read-only server",
     lambda d, c, r: _role_setting(d, c, r, "default_transaction_read_only = on")),
]


async def _ready(worker: WorkerProcess) -> tuple[bool, dict[str, Any]]:
    state = await asyncio.to_thread(worker.ready)
    return (state is not None and bool(state.get("ready"))), (state or {})


@pytest.mark.slow
async def test_database_faults_then_an_activation_swap_within_a_bound_and_ready_tells_the_truth(
        chaos_db: Database, chaos_conn: asyncpg.Connection, chaos_models: Models,
        workers: Workers, login_role: LoginRole, report: Any) -> None:
    conn = chaos_conn
    await activate_model(conn, *chaos_models.v1)
    worker = workers.start("--no-migrate", POSTGRES_USER=login_role.name, POSTGRES_PASSWORD="",
                           POSTGRES_PASSWORD_FILE=str(login_role.password_file),
                           MODEL_MISMATCH_READY_SECONDS="3")
    await asyncio.to_thread(worker.wait_ready)
    machine = await machine_id(conn, "faults")
    models = [chaos_models.v2, chaos_models.v1, chaos_models.v2, chaos_models.v1]
    swaps: list[tuple[str, float]] = []
    for (name, fault), model in zip(FAULTS, models, strict=True):
        not_ready_during: list[dict[str, Any]] = []
        async with fault(chaos_db, conn, login_role.name):
            deadline = time.monotonic() + FAULT_SECONDS
            while time.monotonic() < deadline:
                # Readings keep coming: the worker's lanes meet the fault.
                await conn.fetch(INSERT_READINGS, GOOD_ROWS[:3], machine)
                ready, state = await _ready(worker)
                if not ready:
                    not_ready_during.append(state)
                await asyncio.sleep(0.2)
        if name != "cancel storm":  # a storm may miss a quiet worker; these cannot
            assert not_ready_during, f"{name}: /ready said ready throughout"
            assert any(s.get("tasks_down") or not s.get("listening")
                       for s in not_ready_during), (name, not_ready_during[-1:])
        started = time.monotonic()
        await activate_model(conn, *model)
        want = str(model[1])
        swapped = None
        while time.monotonic() - started < SWAP_BOUND_SECONDS:
            ready, state = await _ready(worker)
            # The truth: never ready while the served model is not the active one for longer
            # than MODEL_MISMATCH_READY_SECONDS.
            if ready and state.get("model_version") != want:
                assert state.get("model_mismatch_s", 0) <= 3, (name, state)
            if ready and state.get("model_version") == want and not state.get("tasks_down"):
                swapped = time.monotonic() - started
                break
            await asyncio.sleep(0.1)
        assert swapped is not None, (name, await _ready(worker), worker.tail(6000))
        swaps.append((name, swapped))
    assert await wait_settled(conn, 30), worker.tail(4000)
    await check_invariant(conn, served(chaos_models.v1, chaos_models.v2))
    failed = {e.get("task") for e in worker.events() if e.get("event") == "task_failed"}
    assert "model" not in failed, worker.tail(4000)
    report(scenario="23. database faults, then an activation", runs=1, readings="n/a",
           lost=0, duplicated=0, recovery=", ".join(f"{n}: swap {s:.1f} s" for n, s in swaps),
           detail="cancel storm, statement_timeout, too many connections, read-only server")


@pytest.mark.slow
async def test_an_active_model_that_cannot_be_served_shows_as_a_mismatch(
        chaos_conn: asyncpg.Connection, chaos_models: Models, workers: Workers) -> None:
    """A replica that cannot load the new model keeps scoring with the old one: the gauge says
    for how long, and /ready fails past MODEL_MISMATCH_READY_SECONDS."""
    conn = chaos_conn
    await activate_model(conn, *chaos_models.v1)
    worker = workers.start(MODEL_MISMATCH_READY_SECONDS="2")
    await asyncio.to_thread(worker.wait_ready)
    assert await _gauge_is_zero(worker)
    await activate_model(conn, *chaos_models.wrong_features)  # its features match no reading
    deadline = time.monotonic() + 10
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        ready, state = await _ready(worker)
        if not ready:
            break
        await asyncio.sleep(0.2)
    # /ready fails once the mismatch is past 2 s; it reports it rounded to 0.1 s.
    assert state.get("model_mismatch_s", 0) >= 2, state
    assert state["model_version"] == str(chaos_models.v1[1])
    assert state["active_model_version"] == str(chaos_models.wrong_features[1])
    assert (worker.metric("sensor_model_mismatch_seconds") or 0) >= 1
    await activate_model(conn, *chaos_models.v1)  # back to a model it can serve
    assert await asyncio.to_thread(worker.wait_ready, 10)
    assert await _gauge_is_zero(worker)


async def _gauge_is_zero(worker: WorkerProcess) -> bool:
    """The gauge follows every check and swap, and at least every second."""
    deadline = time.monotonic() + 2.5
    while worker.metric("sensor_model_mismatch_seconds") != 0:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True
