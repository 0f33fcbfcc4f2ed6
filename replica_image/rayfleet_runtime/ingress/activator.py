"""The activator: requests for a deployment scaled to zero wait here until a replica is ready.

Knative's activator, inside the node's ingress. HAProxy sends every request of a ``scaleFromZero``
deployment that has no replica to this server, on a Unix socket, naming the deployment's backend in
``X-Rayfleet-Backend`` (``haproxy_config``). A request here is *held*:

- until the ingress hands over a routing table with a replica for its deployment and one of those
  replicas has a free slot: the activator sends a replica at most ``maxConcurrency`` requests at a time,
  as HAProxy's ``maxconn`` would, so a burst held at zero is not refused by the first replica;
- then sent to that replica (any method; headers as received minus hop-by-hop ones; the body streamed
  from the client), and the response streamed back chunk by chunk;
- answered 504 if no replica took it within the deployment's ``requestTimeoutSeconds`` from its arrival
  (its response headers included), 503 + Retry-After at once when ``MAX_HELD_PER_DEPLOYMENT`` are
  already held, and forgotten when its client leaves (HAProxy's ``abortonclose`` closes our connection,
  which cancels its handler).

Held requests are load: ``held()`` is what the controller's autoscaler reads (via ``Ingress.stats()``),
and a deployment at zero replicas with any held scales up at once. Once HAProxy reloads with the new
replicas, new connections go to them directly; the held requests (and the next request on a keep-alive
connection of the old HAProxy worker, which routes by the old table) still pass here.

The body is not read while held: it waits in the socket, so a held request costs a connection and at most
twice ``BODY_READ_AHEAD_BYTES`` of its body. Its limit is the direct path's: HAProxy refuses a ``Content-Length`` over ``maxRequestBodyBytes``
before it reaches us, the replica a longer chunked body.

WebSocket (any ``Upgrade``) requests are held too, for they are load, but once a replica is ready they get
503 + Retry-After instead of a tunnel: the client's retry reaches the replica through HAProxy directly.

The server runs on a thread and event loop of its own: it listens before HAProxy starts (a table restored
after an actor restart may route here at once), and no held or streaming request delays the ingress
actor's calls.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import random
import threading
from dataclasses import dataclass, field
from typing import Any, Coroutine

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from rayfleet_runtime.ingress.haproxy_config import ACTIVATOR_BACKEND_HEADER, CONNECT_TIMEOUT_MS, RETRY_AFTER_S
from rayfleet_runtime.routing import Backend, RoutingTable, Server

logger = logging.getLogger("rayfleet.ingress")

MAX_HELD_PER_DEPLOYMENT = 1000  # held at once; past it, 503 + Retry-After (each held one is an open connection)
# HAProxy's buffer (tune.bufsize): the longest request line or header it passes on, which aiohttp's parser
# (8190 by default) must take too
MAX_HEADER_BYTES = 16384
# What aiohttp reads ahead of a body nobody reads yet (it pauses the socket at twice this): bounds the memory
# of held requests with bodies (aiohttp's default, 256 KiB, would be 512 MiB at MAX_HELD_PER_DEPLOYMENT)
BODY_READ_AHEAD_BYTES = 65536
CALL_TIMEOUT_S = 10.0  # start(), apply(), stop(): each a few loop turns on the activator's thread
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
                        "te", "trailer", "transfer-encoding", "upgrade"})

# Outcomes, the label of rayfleet_ingress_activator_requests_total
FORWARDED = "forwarded"  # sent to a replica, its response streamed back
TIMEOUT = "timeout"  # 504: no replica took it, or answered it, within requestTimeoutSeconds
OVERFLOW = "overflow"  # 503 at once: MAX_HELD_PER_DEPLOYMENT already held
CLIENT_LEFT = "client_left"  # the client disconnected before its response began
UNAVAILABLE = "unavailable"  # 503: the deployment left the table or scaleFromZero, or its replica was unreachable
UPGRADE = "upgrade"  # a WebSocket's upgrade: 503 + Retry-After once a replica was ready


def end_to_end(headers: CIMultiDictProxy[str], *drop: str) -> CIMultiDict[str]:
    """``headers`` without the hop-by-hop ones (those the ``Connection`` header names too) and ``drop``."""
    named = {token.strip().lower() for value in headers.getall(hdrs.CONNECTION, ()) for token in value.split(",")}
    skip = HOP_BY_HOP | named | {name.lower() for name in drop}
    return CIMultiDict((name, value) for name, value in headers.items() if name.lower() not in skip)


@dataclass
class _Deployment:
    """One deployment's requests here: those held for a replica slot (oldest first), and those sent on."""

    backend: Backend | None  # its place in the latest table; None once it left it
    waiting: collections.deque[asyncio.Future[Server | None]] = field(default_factory=collections.deque)
    sent: collections.Counter[str] = field(default_factory=collections.Counter)  # replica addr -> in flight

    def free_replica(self) -> Server | None:
        """The replica with the fewest requests from here, if that is below its maxConcurrency."""
        if self.backend is None or not self.backend.servers:
            return None
        server = min(self.backend.servers, key=lambda s: (self.sent[s.addr], random.random()))
        return server if self.sent[server.addr] < self.backend.max_concurrency else None

    @property
    def unroutable(self) -> bool:
        """No replica and none to wait for: held requests get the 503 HAProxy now answers new ones."""
        return self.backend is None or not (self.backend.servers or self.backend.scale_from_zero)


class Activator:
    """The activator's server (see the module docstring). ``start``, ``apply``, ``stop``, ``held`` and
    ``outcomes`` may be called from any thread; everything else runs on the activator's own."""

    def __init__(self, socket_path: str):
        self.socket_path = socket_path
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rayfleet-activator", daemon=True)
        self._runner: web.ServerRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._backends: dict[str, Backend] = {}  # HAProxy backend name (the header) -> its deployment's plan
        self._deployments: dict[str, _Deployment] = {}
        # Read from other threads: replaced whole, or counted up by this thread only; read as one C-level copy.
        self._held: dict[str, int] = {}
        self._outcomes: collections.Counter[tuple[str, str]] = collections.Counter()

    # ---- any thread

    def start(self, table: RoutingTable) -> None:
        """Listen (returns once it does), serving ``table`` until the next ``apply``."""
        self._thread.start()
        self._call(self._listen(table))

    async def apply(self, table: RoutingTable) -> None:
        """Serve ``table`` from now on: the limits of arriving requests, the replicas of held ones."""
        await asyncio.wait_for(asyncio.wrap_future(self._submit(self._apply(table))), CALL_TIMEOUT_S)

    def stop(self) -> None:
        """Stop serving; requests still here are cut off (stop HAProxy first: it waits for them)."""
        try:
            self._call(self._close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CALL_TIMEOUT_S)
            if not self._thread.is_alive():
                self._loop.close()

    def held(self) -> dict[str, int]:
        """Requests held per deployment: every ``scaleFromZero`` one (0 included), and any other holding some."""
        return dict(self._held)

    def outcomes(self) -> dict[tuple[str, str], int]:
        """Requests finished so far, per (deployment, outcome); monotonic."""
        return dict(self._outcomes)

    def _submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self._submit(coro).result(CALL_TIMEOUT_S)

    # ---- the activator's thread

    async def _listen(self, table: RoutingTable) -> None:
        await self._apply(table)
        # No pool limit (each held request is bounded by its replica's slots); bodies and their encodings as
        # sent: no decompression, and none of aiohttp's default headers (Accept-Encoding would change the answer).
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
            skip_auto_headers=(hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.USER_AGENT, hdrs.CONTENT_TYPE))
        server = web.Server(self._handle, access_log=None, handler_cancellation=True,
                            max_line_size=MAX_HEADER_BYTES, max_field_size=MAX_HEADER_BYTES,
                            read_bufsize=BODY_READ_AHEAD_BYTES)
        # stop() cuts off what is still here at once (0 would mean: wait for every handler to finish)
        self._runner = web.ServerRunner(server, access_log=None, shutdown_timeout=0.01)
        await self._runner.setup()
        await web.UnixSite(self._runner, self.socket_path).start()

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _apply(self, table: RoutingTable) -> None:
        self._backends = {be.name: be for be in table.backends}
        by_deployment = {be.deployment: be for be in table.backends}
        for name, deployment in list(self._deployments.items()):
            deployment.backend = by_deployment.get(name)
            self._dispatch(deployment)
            if deployment.backend is None and not deployment.sent:
                del self._deployments[name]
        self._count()

    def _count(self) -> None:
        held = {be.deployment: 0 for be in self._backends.values() if be.scale_from_zero}
        held.update((name, len(d.waiting)) for name, d in self._deployments.items() if d.waiting)
        self._held = held

    def _dispatch(self, deployment: _Deployment) -> None:
        """Hand free replica slots to held requests, oldest first (or, with nothing to wait for, None)."""
        while deployment.waiting:
            server = None if deployment.unroutable else deployment.free_replica()
            if server is None and not deployment.unroutable:
                break
            waiter = deployment.waiting.popleft()
            if waiter.done():  # timed out, its handler not yet told
                continue
            if server is not None:
                deployment.sent[server.addr] += 1
            waiter.set_result(server)
        self._count()

    def _release(self, deployment: _Deployment, server: Server) -> None:
        deployment.sent[server.addr] -= 1
        if deployment.sent[server.addr] <= 0:
            del deployment.sent[server.addr]
        self._dispatch(deployment)

    async def _wait_for_replica(self, deployment: _Deployment, deadline: float) -> Server | None:
        """A replica with a slot taken for this request (release it), or None if none will come;
        TimeoutError at ``deadline``."""
        waiter: asyncio.Future[Server | None] = self._loop.create_future()
        deployment.waiting.append(waiter)
        self._dispatch(deployment)
        try:
            return await asyncio.wait_for(waiter, max(0.0, deadline - self._loop.time()))
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                self._release(deployment, waiter.result())  # handed a slot just as it gave up
            elif waiter in deployment.waiting:
                deployment.waiting.remove(waiter)
                self._count()
            raise

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        arrived = self._loop.time()
        backend = self._backends.get(request.headers.get(ACTIVATOR_BACKEND_HEADER, ""))
        if backend is None:  # only HAProxy sends here, naming a backend of a table we were given
            logger.warning("activator: a request for an unknown backend %r",
                           request.headers.get(ACTIVATOR_BACKEND_HEADER))
            return _answer(503, "no ready replicas", None)
        name = backend.deployment
        deployment = self._deployments.setdefault(name, _Deployment(backend))
        if len(deployment.waiting) >= MAX_HELD_PER_DEPLOYMENT:
            return self._answer(name, OVERFLOW, 503, "overloaded")
        deadline = arrived + backend.request_timeout_s
        try:
            server = await self._wait_for_replica(deployment, deadline)
        except asyncio.TimeoutError:
            return self._answer(name, TIMEOUT, 504, "no replica became ready in time")
        except asyncio.CancelledError:
            self._outcomes[name, CLIENT_LEFT] += 1
            raise
        if server is None:
            return self._answer(name, UNAVAILABLE, 503, "no ready replicas")
        try:
            if hdrs.UPGRADE in request.headers:
                return self._answer(name, UPGRADE, 503, "replica ready: retry the upgrade")
            return await self._forward(request, name, server, deadline, backend.request_timeout_s)
        finally:
            self._release(deployment, server)

    async def _forward(self, request: web.BaseRequest, name: str, server: Server, deadline: float,
                       read_timeout_s: float) -> web.StreamResponse:
        """Send ``request`` to ``server``; its response headers must come by ``deadline``, each chunk after
        within ``read_timeout_s`` (HAProxy's ``timeout server`` on the direct path)."""
        timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_MS / 1000, sock_read=read_timeout_s)
        try:
            upstream = await asyncio.wait_for(self._session.request(
                request.method, URL(f"http://{server.addr}{request.raw_path}", encoded=True),
                headers=end_to_end(request.headers, ACTIVATOR_BACKEND_HEADER, hdrs.EXPECT),
                data=request.content if request.body_exists else None,
                allow_redirects=False, timeout=timeout), max(0.0, deadline - self._loop.time()))
        except aiohttp.ClientError as exc:  # first: a connect timeout is a ClientError and a TimeoutError
            logger.warning("activator: replica %s of %s unreachable: %r", server.replica_id, name, exc)
            return self._answer(name, UNAVAILABLE, 503, "no ready replicas")
        except asyncio.TimeoutError:
            return self._answer(name, TIMEOUT, 504, "upstream request timed out")
        except asyncio.CancelledError:
            self._outcomes[name, CLIENT_LEFT] += 1
            raise
        self._outcomes[name, FORWARDED] += 1
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                      headers=end_to_end(upstream.headers))
        complete = False
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            complete = True
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            # Cut the client's response too (no last chunk), so it can't take a part for the whole.
            logger.warning("activator: a response of %s from %s was cut off: %r", name, server.replica_id, exc)
            if request.transport is not None:
                request.transport.abort()
        finally:
            if complete:
                upstream.release()
            else:
                upstream.close()  # the replica's connection too: a handler nobody reads from is cancelled
        return response

    def _answer(self, deployment: str, outcome: str, status: int, error: str) -> web.Response:
        self._outcomes[deployment, outcome] += 1
        return _answer(status, error, deployment)


def _answer(status: int, error: str, deployment: str | None) -> web.Response:
    """An error of ours, as HAProxy's own: a JSON body, and Retry-After on a 503."""
    headers = {hdrs.RETRY_AFTER: str(RETRY_AFTER_S)} if status == 503 else None
    return web.json_response({"error": error, "deployment": deployment}, status=status, headers=headers)
