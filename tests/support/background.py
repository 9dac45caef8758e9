"""A scenario that runs beside the tests after it: in a thread with its own event loop, started
by a fixture, its outcome (what it returned, or what it raised) taken by its own test.

For a scenario that mostly waits (a transaction held open for a minute while a light stream is
scored) and does not disturb the tests beside it: they run in its minute instead of after it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Background(Generic[T]):
    def __init__(self, name: str, scenario: Callable[[], Coroutine[Any, Any, T]]) -> None:
        self._future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                self._future.set_result(asyncio.run(scenario()))
            except BaseException as exc:  # handed to the test that takes the outcome
                self._future.set_exception(exc)

        # A daemon: a run cut short (-x, Ctrl-C) does not wait for the scenario at exit.
        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()

    def result(self, timeout: float) -> T:
        """What the scenario returned, once it ends (its exception raised here, in the test)."""
        return self._future.result(timeout)

    def done(self) -> bool:
        return self._future.done()

    def join(self, timeout: float = 30) -> None:
        self._thread.join(timeout)
