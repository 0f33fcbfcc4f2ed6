"""The handler code both systems run, byte for byte the same functions.

rayfleet calls them directly (``handler: bench.handlers:trivial``); Ray Serve runs them through the
thinnest deployment wrappers in ``bench.serve_app`` (async handlers from an ``async def __call__``,
sync ones from a plain ``def __call__``, exactly how a Serve user would write them).
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import time

SLEEP_S = 0.05      # the I/O-bound scenario's await
STREAM_CHUNKS = 5   # the streaming scenario's chunks ...
STREAM_GAP_S = 0.1  # ... and the wait before each one after the first
SEED_SLEEP_S = 1.0  # the seed burst's sleep
CPU_ROUNDS = 40_000  # ~20-30 ms of sha256 on one core; a real CPU-bound request, not a no-op


async def trivial(request) -> str:
    return "ok"


async def sleep50(request) -> str:
    await asyncio.sleep(SLEEP_S)
    return "ok"


def cpu(request) -> str:
    digest = b"rayfleet"
    for _ in range(CPU_ROUNDS):
        digest = hashlib.sha256(digest).digest()
    return digest.hex()[:16]


async def seed_async(request) -> str:
    await asyncio.sleep(SEED_SLEEP_S)
    return "ok"


def seed_sync(request) -> str:
    time.sleep(SEED_SLEEP_S)
    return "ok"


async def stream(request):
    """An async generator: the first chunk at once, then one every STREAM_GAP_S (a model streaming tokens)."""
    for i in range(STREAM_CHUNKS):
        if i:
            await asyncio.sleep(STREAM_GAP_S)
        yield f"chunk {i}\n"


HANDLERS = {"trivial": trivial, "sleep50": sleep50, "cpu": cpu, "seed_async": seed_async, "seed_sync": seed_sync,
            "stream": stream}


BLOCK_S = 3.0  # the fault benchmark's blocking request: holds its replica's event loop this long
POST_S = 0.2  # a recorded POST stays in flight this long, so a replica kill can land in the middle of it


class Faulty:
    """The fault benchmark's deployment (``bench.faults``): the trivial answer, plus paths that misbehave.

    * ``.../block``: ``time.sleep(BLOCK_S)`` inside ``async def``: blocks the replica's event loop, as a
      careless handler would;
    * ``POST .../post?id=X``: appends ``X`` to ``<record_dir>/<pid>.log`` *before* answering, so the
      benchmark can count how often each POST ran (a proxy that re-sends a POST runs it twice);
    * ``.../upload``: the body's length (the oversized-body scenario);
    * anything else: ``"ok"``, like ``trivial``.
    """

    def __init__(self, record_dir: str = ""):
        self.record_dir = record_dir

    async def __call__(self, request) -> str:
        path = request.path
        if path.endswith("/block"):
            time.sleep(BLOCK_S)  # noqa: ASYNC251 - blocking the loop is the point
            return "unblocked"
        if path.endswith("/post") and request.method == "POST":
            self._record(request.query.get("id", ""))
            await asyncio.sleep(POST_S)
            return "recorded"
        if path.endswith("/upload"):
            return str(len(request.body))
        return "ok"

    def _record(self, request_id: str) -> None:
        # O_APPEND writes of one short line are atomic, and one file per process needs no lock anyway.
        fd = os.open(os.path.join(self.record_dir, f"{os.getpid()}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            os.write(fd, f"{request_id}\n".encode())
        finally:
            os.close(fd)
