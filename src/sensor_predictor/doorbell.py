"""The doorbell: writers notify only while a worker may be asleep (migrations/0013_doorbell.sql).

Why: PostgreSQL serialises the commits of notifying transactions (a database-wide lock held
through the WAL flush), so a NOTIFY in every writer transaction costs the writers their group
commit. The readings trigger notifies only when its writer cannot take the bell (class 21329,
key 2) SHARED for its transaction; a worker holds it EXCLUSIVE, at session level, while it
sleeps ("armed"), and releases it when it wakes ("disarmed": writers stop notifying while it
drains).

The race it closes: a writer that took the bell shared (and so did not notify) holds it until
its commit. A worker that is caught up asks for the bell; the grant waits for every such writer
to end; then the worker makes one more pass ("doorbell" wake-up), whose snapshot sees all their
readings, and only then sleeps, still armed. A queued exclusive request refuses new shared
tries, so from the request on, writers notify (and wake it) as before.

Several workers: the bell's holder also holds the standby lock (key 3), and the others wait for
that one, not for the bell: a queued request for the bell would make every writer notify while
the holder drains. Asleep, a standby is covered by the holder (the holder arms and looks again
after each of its passes); if the holder's session ends (killed, its connection lost), a
standby gets the standby lock, then the bell, looks once more, and sleeps armed. A pass that
lasts (more than HELP_SECONDS) notifies from the doorbell session, every HELP_SECONDS: the
standbys wake and drain along, as they did when every writer notified.

The bell lives on a session of its own: a session waiting for a lock is inside a statement, and
PostgreSQL delivers notifications only between transactions, so it cannot be the listen
connection; and a transaction pooler cannot keep a session lock, so in POSTGRES_POOL_MODE=
transaction it goes where the listen connection goes (POSTGRES_LISTEN_HOST/PORT). POLL_ONLY has
no doorbell: nobody arms, no writer notifies, the poll finds the readings.

The decisions (when to disarm, when a pass may let the worker sleep) are pure functions of
`BellState`, unit-tested; `Doorbell` does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from sensor_predictor import db
from sensor_predictor.config import Settings

log = structlog.get_logger("sensor_predictor.doorbell")

# Keep in step with migrations/0013_doorbell.sql (the trigger's WHEN clause).
BELL_CLASS = 21329
BELL_KEY = 2
STANDBY_KEY = 3
# Reconnecting the doorbell session: the first delay and the ceiling it doubles up to.
RECONNECT_BACKOFF = (0.1, 5.0)
# A pass still running after this long (a backlog, a stream faster than one worker) notifies
# once, and again as often while it runs: the writers do not notify while the bell's holder is
# awake, and the standbys asleep would not hear of the work otherwise.
HELP_SECONDS = 0.25


@dataclass
class BellState:
    """What the drain loop needs to know of the bell.

    want    the worker wants the bell (set when a pass ends; cleared when a pass starts while
            the bell is held and a pass has looked since the grant)
    held    this worker's session holds the bell now
    grant   how many times it was granted (which grant a pass started under)
    looked  a pass that started after the latest grant ended without error: every writer
            that did not notify before the grant has been looked at
    """

    want: bool = False
    held: bool = False
    grant: int = 0
    looked: bool = False


def pass_starts(state: BellState) -> int | None:
    """A drain pass starts. Returns the grant it starts under (None: not armed), and decides:
    armed and already looked since the grant, the bell is given up (want cleared) so that
    writers stop notifying while the worker drains; armed and not looked yet, this pass is the
    look that lets the worker sleep, so the bell is kept."""
    if not state.held:
        return None
    if state.looked:
        state.want = False
        return None
    return state.grant


def work_found(state: BellState) -> bool:
    """A claim of the running pass handed out readings: the worker is awake. If the bell is
    still held for this pass (the look after a grant), it is given up now: writers stop
    notifying while the worker drains, and the end of the pass asks for it again (a new grant,
    a new look). Returns whether that changed anything."""
    if state.held and state.want:
        state.want = False
        return True
    return False


def pass_ends(state: BellState, started_under: int | None, ok: bool) -> bool:
    """A drain pass ended (ok: without error). The worker wants the bell again (it is caught up
    or about to sleep); a pass that started under the current grant and succeeded is the look
    after the grant. Returns whether a look is still owed: the bell is held, the pass succeeded,
    but it started before the grant (the grant's wake-up came during the pass, and the drain
    loop may have served that wake-up inside the pass: the worker must not sleep on it)."""
    state.want = True
    if ok and started_under is not None and state.held and started_under == state.grant:
        state.looked = True
    return ok and state.held and not state.looked


class Doorbell:
    """The worker's doorbell session: arms when the drain loop wants the bell, disarms when it
    does not, reconnects when the session is lost (and wakes the worker, which then arms
    again). `on_granted(cause)` is called when the bell is granted (the worker must look once
    more) or the session was lost (the worker must look: no one may be armed)."""

    def __init__(self, settings: Settings, wake: Callable[[str], None]) -> None:
        self._settings = settings
        self._wake = wake
        self.state = BellState()
        self._changed = asyncio.Event()
        self._lost = asyncio.Event()
        self.connected = False
        self._help = False  # a pass lasts: notify, to wake the standbys
        self._helper: asyncio.Task[None] | None = None

    # -- the drain loop's calls (no I/O: the session's task acts on them) ---------------------

    def pass_starts(self) -> int | None:
        started = pass_starts(self.state)
        self._changed.set()
        if self._helper is None or self._helper.done():
            self._helper = asyncio.create_task(self._ask_for_help(), name="doorbell-help")
        return started

    def work_found(self) -> None:
        if work_found(self.state):
            self._changed.set()

    def pass_ends(self, started_under: int | None, ok: bool) -> None:
        if pass_ends(self.state, started_under, ok):
            self._wake("doorbell")  # the look after the grant is still owed
        if self._helper is not None:
            self._helper.cancel()
            self._helper = None
        self._help = False
        self._changed.set()

    async def _ask_for_help(self) -> None:
        """While the pass runs: every HELP_SECONDS, a notification (from the session's loop)."""
        while True:
            await asyncio.sleep(HELP_SECONDS)
            self._help = True
            self._changed.set()

    def path_lost(self) -> None:
        """The listen connection was lost and is back: the doorbell session went the same way
        and may be half-open (a lock request or release sent into a dead path never arrives,
        and nothing tells the client). Dropped and opened again; then the worker looks and
        arms anew."""
        self._lost.set()

    # -- the session --------------------------------------------------------------------------

    async def run(self) -> None:
        """The doorbell session, until cancelled (a supervised task of the worker)."""
        backoff = RECONNECT_BACKOFF[0]
        first = True
        while True:
            try:
                conn = await db.connect(self._settings, listen=True,
                                        application_name="sensor-predictor-doorbell")
            except Exception as exc:
                if first:
                    log.warning("doorbell_unavailable", error=f"{type(exc).__name__}: {exc}",
                                retry_in_s=backoff,
                                note="writers do not notify until a worker arms: new readings "
                                     "wait for a wake-up of another cause (the poll)")
                first = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RECONNECT_BACKOFF[1])
                continue
            backoff, first = RECONNECT_BACKOFF[0], True
            self._lost.clear()
            conn.add_termination_listener(lambda _c: self._lost.set())
            self.connected = True
            standby = False
            try:
                while True:
                    if self.state.want and not self.state.held:
                        if not standby:
                            # A standby waits here while another worker holds the bell.
                            await self._until_lost(conn.execute(
                                db.queries()["doorbell_lock"], BELL_CLASS, STANDBY_KEY))
                            standby = True
                        await self._until_lost(conn.execute(
                            db.queries()["doorbell_lock"], BELL_CLASS, BELL_KEY))
                        self.state.held, self.state.looked = True, False
                        self.state.grant += 1
                        self._wake("doorbell")
                        continue
                    if self.state.held and not self.state.want:
                        await self._until_lost(conn.execute(
                            db.queries()["doorbell_unlock"], BELL_CLASS, BELL_KEY))
                        self.state.held = False
                        continue
                    if self._help:
                        self._help = False
                        if not self.state.held:  # held: the writers notify already
                            await self._until_lost(conn.execute(db.queries()["doorbell_help"]))
                        continue
                    self._changed.clear()
                    await _first(self._changed.wait(), self._lost.wait())
                    if self._lost.is_set():
                        raise ConnectionError("the doorbell session was lost")
            except (asyncio.CancelledError, KeyboardInterrupt):
                conn.terminate()
                raise
            except Exception as exc:
                log.warning("doorbell_lost", error=f"{type(exc).__name__}: {exc}",
                            note="no bell held now: the worker looks, then arms again")
                conn.terminate()
            finally:
                self.connected = False
                self.state.held = False
                self.state.looked = False
            # Nobody may be armed now (writers do not notify): look, then arm again.
            self._wake("doorbell")
            await asyncio.sleep(backoff)

    async def _until_lost(self, statement: Awaitable[object]) -> None:
        """A statement on the doorbell session; ConnectionError when the session is lost
        first (a lock wait does not notice a dead server by itself before the keepalive)."""
        task = asyncio.ensure_future(statement)
        lost = asyncio.ensure_future(self._lost.wait())
        try:
            await asyncio.wait({task, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise ConnectionError("the doorbell session was lost")
        task.result()


async def _first(*waits: Awaitable[object]) -> None:
    """Until the first of the awaitables is done; the others are cancelled."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
