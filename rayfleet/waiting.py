"""How every suite and benchmark waits: poll a condition until it holds or a deadline passes, never a bare sleep."""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable


def eventually(check: Callable[[], Any], timeout: float = 30, interval: float = 0.5, what: str = "condition",
               diagnostics: Callable[[], str] | None = None,
               ignoring: tuple[type[BaseException], ...] = ()) -> Any:
    """Poll `check()` until it returns something truthy, and return that; else fail naming `what`,
    with `diagnostics()` (logs, object dumps) in the message.

    An exception of a type in `ignoring` (say, a server that is restarting) counts as "not yet";
    any other exception, an AssertionError included, ends the wait at once: a check can fail fast."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except ignoring as exc:
            value = exc
        else:
            if value:
                return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {value!r}\n"
                                 f"{diagnostics() if diagnostics else ''}")
        time.sleep(interval)


async def eventually_async(check: Callable[[], Any], timeout: float = 10, interval: float = 0.01,
                           what: str = "condition") -> Any:
    """``eventually`` for a test running on an event loop (the loop keeps serving while it waits)."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last: {value!r}")
        await asyncio.sleep(interval)
    return value
