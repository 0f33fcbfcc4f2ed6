"""GETs that count what failed: one request (``http_get``) and a loop of them on a thread (``Traffic``),
for the tests that break something under traffic (the e2e suite through a Service, the runtime suite
through an ingress)."""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request


def http_get(url: str, timeout: float = 30, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, {"error": exc.read().decode(errors="replace")}
    except OSError as exc:  # refused, reset, timed out: the client saw no HTTP answer
        return 0, {"error": repr(exc)}



class Traffic:
    """GETs in a loop on a background thread (a new connection each), counting what failed."""

    def __init__(self, url: str):
        self.url, self.answers, self.failures = url, 0, []
        self.sent_failed: list[float] = []  # time.monotonic() at which each failed request was sent
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and self.answers + len(self.failures) < 100_000:
            sent = time.monotonic()
            code, body = http_get(self.url, timeout=30)
            if code == 200:
                self.answers += 1
                self.last = body
            else:
                self.failures.append((code, body))
                self.sent_failed.append(sent)
            time.sleep(0.02)

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)
