"""ASGI applications as handlers: a FastAPI or Starlette app (any ASGI 3 app) served as uvicorn serves it.

``handler: myapp.main:app`` (an app object), or a class whose instance is an ASGI app (constructed with
``handlerArgs``). The replica runs uvicorn's HTTP protocol (httptools) on its own event loop, on the
socket HAProxy connects to, with the app wrapped in :class:`AsgiRunner`, which applies the same rules
as to the plain contract: ``/-/ready``, admission (``maxConcurrency`` and a bounded queue, then 503 with
``Retry-After``) before the body is read, ``maxRequestBodyBytes`` (413), and the counters the controller
reads. A streaming response holds its slot until its last chunk, and a client that leaves before its
response is complete cancels the app's task (:class:`_Exchange`). ``root_path`` is the deployment's
``routePrefix``: the path reaches the app unchanged, and the app's routes and its OpenAPI docs work
under the prefix. Lifespan startup runs before the replica reports ready (a failure is a
``HandlerInitError``), shutdown when it stops. WebSocket sessions count as one request each for their
whole life; stopping the replica closes those still open (1012, service restart).
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import time
from typing import Any, Awaitable, Callable

from rayfleet_api.constants import REPLICA_READY_PATH
from rayfleet_api.desired import DesiredState
from rayfleet_runtime.replica.admission import Admission, replica_max_queued
from rayfleet_runtime.replica.handler import HandlerLoadError, PayloadTooLarge, forwarded_client, log_access

logger = logging.getLogger("rayfleet.replica")

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# HAProxy keeps idle connections to a replica for reuse (`http-reuse always`): a replica that closed
# them after uvicorn's default 5 s would race HAProxy's next request on them.
SERVER_KEEPALIVE_S = 3600
# A client that leaves is noticed within twice this after its request body is in. A watcher from the
# first moment is a task per request: a third of what serving a trivial request costs.
WATCH_AFTER_S = 0.05
# Stopping waits this long for open requests (a drain already waited its grace), then cancels them and
# still runs the app's lifespan shutdown.
SHUTDOWN_S = 5


def is_asgi_app(obj: Any) -> bool:
    """An ASGI 3 application: called as ``app(scope, receive, send)`` (the plain contract takes one argument)."""
    if inspect.isclass(obj) or not callable(obj):
        return False
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) == 3


async def _respond(send: Send, status: int, text: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = (text + "\n").encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), *headers]})
    await send({"type": "http.response.body", "body": body})


class _Exchange:
    """One HTTP request's ``receive``/``send`` as the app sees them: the body counted against the limit,
    the status noted, and the app's task cancelled when the client leaves before the response is done.

    ASGI tells a disconnect as the ``http.disconnect`` message that a ``receive()`` after the whole body
    returns; a watcher waits for it once the app has read the body (or from the start for a request
    without one, keeping the empty body message for the app), so no message meant for the app is taken
    from it. The watcher starts a little later (``_LateWatchers``): most requests are over by then and
    never cost a task, and it still sees a client that left before it started.
    """

    def __init__(self, receive: Receive, send: Send, max_body: int, watchers: "_LateWatchers"):
        self._receive, self._send = receive, send
        self._max_body = max_body
        self._watchers = watchers
        self._task = asyncio.current_task()
        self.received = 0  # body bytes
        self._kept: list[Message] = []
        self._complete = False  # the last byte of the response was handed to the server
        self._watch_asked = False
        self._watcher: asyncio.Task | None = None
        self.status = 0
        self.too_large = False
        self.disconnected = False  # the client left first, and the app's task was cancelled for it

    async def receive(self) -> Message:
        if self._kept:
            return self._kept.pop()
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self._max_body:  # a chunked body, counted as it arrives: the app sees the
                self.too_large = True             # client leave, and the client gets the 413
                return {"type": "http.disconnect"}
            if not message.get("more_body", False):
                self.watch_for_disconnect()
        return message

    async def send(self, message: Message) -> None:
        if self.too_large:
            return  # the app's answer to a body it never got whole
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self._complete = True  # before the server hears it: its own "response complete" is no disconnect
        await self._send(message)

    def watch_for_disconnect(self) -> None:
        if not self._watch_asked:
            self._watch_asked = True
            self._watchers.add(self)

    def start_watching(self) -> None:
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        message = await self._receive()
        if message["type"] == "http.request":  # a bodyless request's empty body: the app's, kept for it
            self._kept.append(message)
            message = await self._receive()
        if message["type"] == "http.disconnect" and not self._complete and self._task is not None:
            self.disconnected = True
            self._task.cancel()

    def close(self) -> None:
        self._watchers.discard(self)
        if self._watcher is not None:
            self._watcher.cancel()


class _LateWatchers:
    """Starts the disconnect watcher of each exchange still open ``WATCH_AFTER_S`` after it asked for
    one, from a single task that wakes every ``WATCH_AFTER_S`` while any is waiting (a timer per request
    costs nearly what the task would)."""

    def __init__(self) -> None:
        self._waiting: dict[_Exchange, float] = {}  # in the order they asked
        self._sweeper: asyncio.Task | None = None

    def add(self, exchange: _Exchange) -> None:
        loop = asyncio.get_running_loop()
        self._waiting[exchange] = loop.time()
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep())

    def discard(self, exchange: _Exchange) -> None:
        self._waiting.pop(exchange, None)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiting:
                await asyncio.sleep(WATCH_AFTER_S)
                due = loop.time() - WATCH_AFTER_S
                while self._waiting:
                    exchange, asked = next(iter(self._waiting.items()))
                    if asked > due:
                        break
                    del self._waiting[exchange]
                    exchange.start_watching()
        finally:
            self._sweeper = None

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()


class AsgiRunner(Admission):
    """The ASGI app behind rayfleet's admission rules and counters (``HandlerRunner``'s, for ASGI)."""

    def __init__(self, app: Any, desired: DesiredState, is_draining: Callable[[], bool]):
        super().__init__(desired.max_concurrency, replica_max_queued(desired))
        self.app = app
        self.root_path = "" if desired.route_prefix == "/" else desired.route_prefix
        self.max_body = desired.max_request_body_bytes
        self.is_draining = is_draining
        self._watchers = _LateWatchers()
        self.access_log = desired.access_log

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._session(scope, receive, send)
            return
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        if scope["path"] == REPLICA_READY_PATH:
            await _respond(send, 503 if self.is_draining() else 200, "draining" if self.is_draining() else "ready")
            return
        self.total_requests += 1
        if not await self.limiter.acquire():
            self.refused()
            await _respond(send, 503, "503 Service Unavailable: replica at maxConcurrency", [(b"retry-after", b"1")])
            return
        started = time.perf_counter()
        exchange = _Exchange(receive, send, self.max_body, self._watchers)
        app_scope = self._scope(scope)
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is None and not any(k == b"transfer-encoding" for k, _ in scope["headers"]):
            exchange.watch_for_disconnect()  # no body to read first
        try:
            if length is not None and length.isdigit() and int(length) > self.max_body:
                exchange.too_large = True  # refused before a byte of the body is read
            else:
                await self.app(app_scope, exchange.receive, exchange.send)
        except asyncio.CancelledError:
            self.cancelled += 1
            if not exchange.disconnected:
                raise
            asyncio.current_task().uncancel()  # ours, for a client that left: no one to answer
        except Exception as exc:
            if not exchange.too_large:
                self.last_error = f"{type(exc).__name__}: {exc}"[:500]
                self.exceptions += 1
                exchange.status = exchange.status or 500  # uvicorn answers 500 (and logs it) if nothing was sent
                raise
        finally:
            exchange.close()
            self.limiter.release()
            self.body_bytes += exchange.received
            if exchange.status >= 500:
                self.errors += 1
            status = 499 if exchange.disconnected else exchange.status or (413 if exchange.too_large else 500)
            self.answered(status, started)
            if self.access_log:
                log_access(scope["method"], scope["path"], status, started, (app_scope.get("client") or (None,))[0])
        if exchange.too_large and not exchange.status:
            await _respond(send, 413, f"413 Request Entity Too Large: {PayloadTooLarge.over(self.max_body)}",
                           [(b"connection", b"close")])

    def _scope(self, scope: Message) -> Message:
        """The app's scope: under the deployment's prefix; over the local socket, with no peer address, the
        client's from the ingress's X-Forwarded-For (uvicorn trusts it from 127.0.0.1, as over TCP there)."""
        if scope.get("client") is None:
            client = forwarded_client(scope["headers"])
            if client is not None:
                return {**scope, "root_path": self.root_path, "client": (client, 0)}
        return {**scope, "root_path": self.root_path}

    async def _session(self, scope: Message, receive: Receive, send: Send) -> None:
        """A WebSocket session: one request against ``maxConcurrency`` for its whole life."""
        self.total_requests += 1
        if not await self.limiter.acquire():
            self.refused()
            await send({"type": "websocket.close", "code": 1013})  # "try again later"; before accept: 403
            return
        started, status = time.perf_counter(), 101  # a session counts as its upgrade's status
        try:
            await self.app(self._scope(scope), receive, send)
        except asyncio.CancelledError:
            self.cancelled += 1
            status = 499
            raise
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"[:500]
            self.errors += 1
            self.exceptions += 1
            status = 500
            raise
        finally:
            self.limiter.release()
            self.answered(status, started)

    async def check_health(self) -> None:
        """The event loop answered: an ASGI app has no ``check_health()`` of its own to call."""

    def close(self) -> None:
        """Stop starting disconnect watchers (``AsgiServer.stop`` stops uvicorn and runs the lifespan shutdown)."""
        self._watchers.close()


class AsgiServer:
    """uvicorn's protocol on a socket of ours, on the running loop (no signal handlers, no loop of its own)."""

    def __init__(self, runner: AsgiRunner):
        import uvicorn  # the plain contract needs none of it

        self.config = uvicorn.Config(runner, lifespan="auto", http="httptools", ws="websockets-sansio",
                                     access_log=False, log_level="warning", timeout_keep_alive=SERVER_KEEPALIVE_S,
                                     timeout_graceful_shutdown=SHUTDOWN_S)
        self.config.load()
        self.server = uvicorn.Server(self.config)
        self.server.lifespan = self.config.lifespan_class(self.config)

    async def start(self, sockets: list[socket.socket]) -> None:
        """Run the app's lifespan startup, then serve on each socket; ``HandlerLoadError`` if the startup failed."""
        try:
            await self.server.startup(sockets=sockets)
        except SystemExit:  # uvicorn's answer to a failed lifespan startup
            raise HandlerLoadError("HandlerInitError", "the ASGI app's lifespan startup failed (its error is in the "
                                   "replica's log)", "") from None

    async def stop(self) -> None:
        """Stop serving, then run the app's lifespan shutdown."""
        await self.server.shutdown()
