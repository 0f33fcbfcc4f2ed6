"""The one "is it up?" check: an HTTP GET that answers 200, polled until a deadline."""
from __future__ import annotations

import time
import urllib.request


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    """True if ``url`` answers 200 right now."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - our own endpoints
            return response.status == 200
    except OSError:  # refused, reset, timed out, or an HTTP error status
        return False


def wait_http(url: str, timeout_s: float = 60.0, streak: int = 1) -> None:
    """Return once ``url`` answered 200 ``streak`` times in a row; TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    ok = 0
    while True:
        ok = ok + 1 if http_ok(url) else 0
        if ok >= streak:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer 200 within {timeout_s:g}s")
        time.sleep(0.2)
