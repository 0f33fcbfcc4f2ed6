"""Admission on a replica: at most ``maxConcurrency`` requests run, a short queue waits (FIFO), the rest
get 503 at once; and the counters every runner of user code keeps (``handler.HandlerRunner`` for the plain
contract, ``asgi.AsgiRunner`` for ASGI apps) for the controller and the replica's metrics."""
from __future__ import annotations

import asyncio
import collections
import time
from typing import Callable

from rayfleet_api.desired import DesiredState


class Limiter:
    """Admission control: ``limit`` requests run, up to ``max_queued`` wait (FIFO), the rest are refused."""

    def __init__(self, limit: int, max_queued: int):
        self.limit = max(1, int(limit))
        self.max_queued = max(0, int(max_queued))
        self.in_flight = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> bool:
        """True once admitted (caller must ``release()``), False at once if full."""
        if self.in_flight < self.limit and not self._waiters:
            self.in_flight += 1
            return True
        if len(self._waiters) >= self.max_queued:
            return False
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut  # release() hands its slot over: in_flight already counts us
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed to us just as we were cancelled
            else:
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            raise
        return True

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.in_flight -= 1


def default_max_queued(max_concurrency: int) -> int:
    """A small wait queue: enough to absorb bursts, small enough that overload is answered with 503."""
    return max(1, min(int(max_concurrency), 16))


def replica_max_queued(desired: DesiredState) -> int:
    """The replica's wait queue. Autoscaled, it is as long as maxConcurrency, twice over: the ingress
    reloads at every scale step, and while the old HAProxy worker finishes its requests the new one sends
    up to maxConcurrency more, requests the ingress would have queued rather than refused."""
    queued = default_max_queued(desired.max_concurrency)
    return max(queued, 2 * desired.max_concurrency) if desired.autoscaling else queued


class Admission:
    """What every runner of user code keeps: the limiter that admits requests, and the counters the
    controller reads (``HandlerRunner`` for the plain contract, ``asgi.AsgiRunner`` for ASGI apps)."""

    def __init__(self, limit: int, max_queued: int):
        self.limiter = Limiter(limit, max_queued)
        self.total_requests = 0
        self.errors = 0  # 5xx answered, handler-caused or not
        self.rejected = 0  # 503 for overload
        self.cancelled = 0  # the client disconnected first
        self.exceptions = 0  # the handler (or app) raised
        self.body_bytes = 0  # request bodies read
        self.codes: collections.Counter[int] = collections.Counter()  # answers by status; 499: the client left first
        self.last_error: str | None = None
        # the replica's latency histogram (``metrics``), unless metrics are off
        self.observe: Callable[[float], None] | None = None

    def answered(self, status: int, started: float) -> None:
        """One admitted request is over: its status counted, its handler time observed."""
        self.codes[status] += 1
        if self.observe is not None:
            self.observe(time.perf_counter() - started)

    def refused(self) -> None:
        """One request turned away at ``maxConcurrency`` (503, its handler never ran)."""
        self.rejected += 1
        self.errors += 1
        self.codes[503] += 1

    @property
    def in_flight(self) -> int:
        return self.limiter.in_flight

    @property
    def queued(self) -> int:
        return self.limiter.queued
