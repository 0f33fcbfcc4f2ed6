"""The handler code both systems run, byte for byte the same functions.

rayfleet calls them directly (``handler: bench.handlers:trivial``); Ray Serve runs them through the
thinnest deployment wrappers in ``bench.serve_app`` (async handlers from an ``async def __call__``,
sync ones from a plain ``def __call__``, exactly how a Serve user would write them).
"""
from __future__ import annotations

import asyncio
import hashlib
import time

SLEEP_S = 0.05      # the I/O-bound scenario's await
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


HANDLERS = {"trivial": trivial, "sleep50": sleep50, "cpu": cpu, "seed_async": seed_async, "seed_sync": seed_sync}
