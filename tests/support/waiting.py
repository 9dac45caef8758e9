"""Polling with a deadline: the only way a test waits for the worker (never a bare sleep)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any


async def wait_for(
    predicate: Callable[[], Awaitable[Any]],
    timeout: float,  # noqa: ASYNC109 - a polling deadline, not a cancellation scope
    interval: float = 0.05,
) -> Any:
    """Poll an async predicate until it returns something truthy; the last value otherwise."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(interval)
    return value


async def wait_until(
    predicate: Callable[[], Awaitable[Any]],
    what: str,
    timeout: float,  # noqa: ASYNC109 - a polling deadline, not a cancellation scope
    interval: float = 0.05,
) -> Any:
    """wait_for that fails the test, saying `what` did not happen, when the deadline passes."""
    value = await wait_for(predicate, timeout, interval)
    assert value, f"{what}: not within {timeout:g} s (last: {value!r})"
    return value
