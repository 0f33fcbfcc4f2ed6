"""The handler contract: how a replica loads user code, calls it and turns results into HTTP (admission: ``admission``).

Handler contract
================

``handler`` is ``"module:attr"`` (e.g. ``"examples.echo:Echo"``). The module is imported in the
replica process: locally from the working directory / ``PYTHONPATH`` (``rayfleet run`` passes both to
Ray workers), on Kubernetes from the replica image or the deployment's ``runtimeEnv``.

* If ``attr`` is a **class**, it is instantiated once per replica with ``handlerArgs`` as keyword
  arguments, and the instance's ``__call__(request)`` serves every request.
* If ``attr`` is a **function** (or any other callable), it is called directly as ``attr(request)``;
  ``handlerArgs`` must then be empty.
* ``async def`` handlers run concurrently on the replica's event loop, at most ``maxConcurrency`` at a
  time. Never block the loop in them (use ``await asyncio.sleep``, async clients, or
  ``await asyncio.to_thread(...)`` for blocking work).
* Plain ``def`` handlers run in a worker thread so the event loop keeps answering readiness checks and
  503s; by default (``syncThreads: 1``) one request at a time. ``syncThreads > 1`` opts into a thread
  pool of that size (only useful if the handler releases the GIL: I/O, numpy, ...).
* Past ``maxConcurrency`` running requests (a sync handler: ``syncThreads``) plus a small bounded wait
  queue, the replica answers ``503`` with ``Retry-After: 1`` immediately instead of queueing without
  bound. A request is admitted before its body is read; a body over ``maxRequestBodyBytes`` gets ``413``.
* A client that disconnects cancels its request: ``asyncio.CancelledError`` is raised in an async
  handler at its current ``await``; a sync handler's thread runs to the end (threads can't be stopped).

The ``Request`` passed to the handler has:

* ``method`` (``"GET"``...), ``path`` (the full URL path; the deployment's ``routePrefix`` is *not*
  stripped), ``query`` (a read-only multidict: ``request.query["q"]``, ``request.query.getall("q")``),
  ``headers`` (case-insensitive multidict);
* ``body``: the complete request body as ``bytes`` (an attribute, already read; not a coroutine);
* ``text()`` (body decoded as UTF-8) and ``json()`` (body parsed as JSON).

The handler returns one of:

* ``str`` -> ``200 text/plain; charset=utf-8``;
* ``bytes`` / ``bytearray`` / ``memoryview`` -> ``200 application/octet-stream``;
* ``rayfleet_runtime.Response(body, status=200, headers=None, content_type=None)`` for full control
  (``body`` may be str, bytes or any JSON-able value);
* anything else JSON-serialisable (dict, list, int, ``None``...) -> ``200 application/json``; a value
  JSON can't carry (a set, an object, a NaN or infinite float) is a handler error: ``500``;
* an async generator (also as ``Response(agen, ...)``) -> a stream: each ``str``/``bytes`` chunk is sent
  as it is yielded, and the request holds its ``maxConcurrency`` slot until the last one.

An ASGI application instead of a handler is served by uvicorn's protocol: see ``asgi.py``.

A class handler may define ``check_health()`` (sync or async). The controller calls it every
``healthCheck.periodSeconds``; raising, returning ``False``, or taking longer than
``healthCheck.timeoutSeconds`` counts as a failure, and ``failureThreshold`` consecutive failures get the
replica replaced.

``request.json()`` on a body that is not JSON (``NaN`` and ``Infinity`` are not), or ``request.text()`` on
one that is not UTF-8, raises ``BadRequest`` (a ``ValueError``): unless the handler catches it, the client
gets ``400`` naming the problem, and it counts as the client's error, not the handler's (no ``lastError``
in the status).

If the handler raises anything else, the client gets ``500`` with a one-line body naming the exception type (no
traceback unless the replica's environment sets ``RAYFLEET_DEBUG_TRACEBACKS=1``); the traceback goes to
the replica's log, and the replica keeps serving. Import failures are reported as
``HandlerImportError`` and constructor failures as ``HandlerInitError`` in the deployment's observed
state, with the module name in the message.

The path ``/-/ready`` is reserved: it answers 200 while the replica serves and 503 while it drains.
Nothing received from the network is ever unpickled: requests reach the handler as plain bytes.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import inspect
import json
import logging
import os
import time
import traceback
from typing import Any, Awaitable, Callable, Mapping

from rayfleet_api.desired import DesiredState, parse_json
from rayfleet_runtime.lifecycle_log import logfmt
from rayfleet_runtime.replica.admission import Admission, default_max_queued

logger = logging.getLogger("rayfleet.replica")
access_logger = logging.getLogger("rayfleet.access")


def log_access(method: str, path: str, status: int, started: float, client: str | None) -> None:
    """One access-log line (``accessLog: true``): what was asked, how it ended, how long the replica took."""
    access_logger.info(logfmt(method=method, path=path, status=status,
                              ms=round((time.perf_counter() - started) * 1000, 2), client=client))


def forwarded_client(headers: Any) -> str | None:
    """The client's address as the ingress forwarded it, from ``(name, value)`` byte pairs: the last
    X-Forwarded-For entry (HAProxy drops one the client sent and appends the address it saw)."""
    value = None
    for name, v in headers:
        if name.lower() == b"x-forwarded-for":
            value = v
    client = value.rpartition(b",")[2].strip().decode("latin-1") if value else ""
    return client or None


class Request:
    """What a handler receives: method, full path, query, headers and the whole body as bytes.

    ``remote`` is the address the connection came from: the ingress's over TCP, None over the replica's
    local socket (its own node's ingress); the client's own is the last ``X-Forwarded-For`` entry."""

    __slots__ = ("method", "path", "query", "headers", "body", "remote")

    def __init__(self, method: str, path: str, query: Mapping[str, str] | None = None,
                 headers: Mapping[str, str] | None = None, body: bytes = b"", remote: str | None = None):
        self.method = method
        self.path = path
        self.query = query if query is not None else {}
        self.headers = headers if headers is not None else {}
        self.body = body
        self.remote = remote

    def text(self, encoding: str = "utf-8") -> str:
        """The body decoded; ``BadRequest`` if it is not in ``encoding`` (the client's fault, not a 500)."""
        try:
            return self.body.decode(encoding)
        except UnicodeDecodeError as exc:
            raise BadRequest(f"request body is not {encoding}: {exc}") from None

    def json(self) -> Any:
        """The body as JSON (None if empty); ``BadRequest`` if it is not JSON (NaN and Infinity aren't)."""
        try:
            return parse_json(self.body) if self.body else None
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN, 1e400, too deeply nested
            raise BadRequest(f"request body is not valid JSON: {exc}") from None

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.path} ({len(self.body)} bytes)>"


class BadRequest(ValueError):
    """The request can't be read as the handler asked: the client gets 400 with this message."""


class PayloadTooLarge(BadRequest):
    """The body is over the deployment's ``maxRequestBodyBytes``: the client gets 413."""

    @classmethod
    def over(cls, limit: int) -> "PayloadTooLarge":
        return cls(f"the body is over {limit} bytes (maxRequestBodyBytes)")


class Response:
    """Explicit response: ``Response(body, status=200, headers=None, content_type=None)``."""

    __slots__ = ("body", "status", "headers", "content_type")

    def __init__(self, body: Any = b"", status: int = 200, headers: Mapping[str, str] | None = None,
                 content_type: str | None = None):
        self.body = body
        self.status = int(status)
        self.headers = dict(headers or {})
        self.content_type = content_type


class HandlerLoadError(Exception):
    """The handler could not be imported (HandlerImportError) or constructed (HandlerInitError)."""

    def __init__(self, reason: str, message: str, tb: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.traceback = tb

    def as_dict(self) -> dict[str, str]:
        return {"reason": self.reason, "message": self.message, "traceback": self.traceback}


def load_handler(spec: str, handler_args: Mapping[str, Any] | None = None) -> Callable[[Request], Any]:
    """Import ``module:attr`` and return the callable that serves requests (instance or function)."""
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise HandlerLoadError("HandlerImportError", f"{spec}: ValueError: handler must look like 'module:attr'", "")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr_path.split("."):
            obj = getattr(obj, part)
    except BaseException as exc:  # noqa: BLE001 - SyntaxError, SystemExit in module code... all reported
        if isinstance(exc, (KeyboardInterrupt, asyncio.CancelledError)):
            raise
        raise HandlerLoadError("HandlerImportError", f"{module_name}: {type(exc).__name__}: {exc}",
                               traceback.format_exc()) from exc
    args = dict(handler_args or {})
    if inspect.isclass(obj):
        try:
            return obj(**args)
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, (KeyboardInterrupt, asyncio.CancelledError)):
                raise
            raise _init_error(module_name, exc) from exc
    if not callable(obj):
        raise HandlerLoadError("HandlerImportError", f"{module_name}: TypeError: {attr_path} is not callable", "")
    if args:
        raise HandlerLoadError("HandlerInitError",
                               f"{module_name}: TypeError: handlerArgs given but {attr_path} is a function, not a class", "")
    return obj


def _init_error(module_name: str, exc: BaseException) -> HandlerLoadError:
    return HandlerLoadError("HandlerInitError", f"{module_name}: {type(exc).__name__}: {exc}", traceback.format_exc())


def is_async_callable(fn: Any) -> bool:
    """``async def`` (a coroutine or an async generator: a stream), as a function or as ``__call__``."""
    def is_async(f: Any) -> bool:
        return inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f)
    call = getattr(fn, "__call__", None)
    return is_async(fn) or (call is not None and is_async(call))


# (status, headers, body): bytes, or for a stream an async iterator of bytes chunks
HTTPResult = tuple[int, dict[str, str], Any]


def to_http(result: Any) -> HTTPResult:
    """Turn whatever a handler returned into status, headers and body bytes."""
    if isinstance(result, Response):
        headers = dict(result.headers)
        status, body, ctype = result.status, result.body, result.content_type
    else:
        headers, status, body, ctype = {}, 200, result, None
    if isinstance(body, str):
        data, default_ctype = body.encode(), "text/plain; charset=utf-8"
    elif inspect.isasyncgen(body):  # streamed: each chunk goes out as it is yielded
        data, default_ctype = body, "text/plain; charset=utf-8"
    elif isinstance(body, (bytes, bytearray, memoryview)):
        data, default_ctype = bytes(body), "application/octet-stream"
    else:
        # allow_nan=False: a NaN would go out as application/json that no strict reader parses (-> 500)
        data, default_ctype = json.dumps(body, allow_nan=False).encode(), "application/json"
    if not any(k.lower() == "content-type" for k in headers):
        headers["Content-Type"] = ctype or default_ctype
    return status, headers, data


def error_result(status: int, message: str, extra_headers: Mapping[str, str] | None = None) -> HTTPResult:
    headers = {"Content-Type": "text/plain; charset=utf-8", **(extra_headers or {})}
    return status, headers, (message + "\n").encode()


OVERLOADED: HTTPResult = error_result(503, "503 Service Unavailable: replica at maxConcurrency", {"Retry-After": "1"})


class Stream:
    """A handler's async generator as bytes chunks. It holds the request's slot until ``aclose()``, which
    whoever sends it must call, however the sending ends."""

    def __init__(self, runner: Admission, chunks: Any, status: int, started: float):
        self._runner = runner
        self._chunks = chunks
        self._status, self._started = status, started
        self._done = self._closed = False

    def __aiter__(self) -> "Stream":
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._chunks.__anext__()
            if isinstance(chunk, str):
                return chunk.encode()
            if isinstance(chunk, (bytes, bytearray, memoryview)):
                return bytes(chunk)
            raise TypeError(f"a stream yields str or bytes, not {type(chunk).__name__}")
        except StopAsyncIteration:
            self._done = True
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the status went out already: the client sees the stream cut short
            self._done = True
            self._runner.last_error = f"{type(exc).__name__}: {exc}"[:500]
            self._runner.errors += 1
            self._runner.exceptions += 1
            logger.error("a streamed response failed:\n%s", traceback.format_exc())
            raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._done:
            self._runner.cancelled += 1  # the client went away mid-stream
        try:
            await self._chunks.aclose()  # the handler's own finally blocks run
        finally:
            self._runner.limiter.release()
            self._runner.answered(self._status if self._done else 499, self._started)


class HandlerRunner(Admission):
    """Runs one loaded handler under the replica's concurrency rules and keeps request counters."""

    def __init__(self, handler: Callable[[Request], Any], max_concurrency: int = DesiredState.max_concurrency, sync_threads: int = 1,
                 max_queued: int | None = None, debug_tracebacks: bool | None = None):
        self.handler = handler
        self.is_async = is_async_callable(handler)
        self.sync_threads = max(1, int(sync_threads))
        # A sync handler runs no more requests than it has threads: the rest wait in the limiter's
        # bounded queue (and past it get a fast 503), never in an executor's unbounded one.
        running = max_concurrency if self.is_async else min(max_concurrency, self.sync_threads)
        super().__init__(running, default_max_queued(max_concurrency) if max_queued is None else max_queued)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        # Sync check_health() gets a thread of its own: the loop's default executor is shared with the
        # user's `await asyncio.to_thread(...)` calls, and under load a health check queued behind them
        # would time out and get a busy but healthy replica killed.
        self._health_pool: concurrent.futures.ThreadPoolExecutor | None = None
        if not self.is_async:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.sync_threads, thread_name_prefix="rayfleet-handler")
        if debug_tracebacks is None:
            debug_tracebacks = os.environ.get("RAYFLEET_DEBUG_TRACEBACKS", "") in ("1", "true", "yes")
        self.debug_tracebacks = debug_tracebacks

    async def handle(self, request: Request | Callable[[], Awaitable[Request]]) -> HTTPResult:
        """Admit, call, convert. Never raises for handler faults (returns 500/503 instead).

        ``request`` may be a coroutine function that reads it: it is called only once the request is
        admitted, so a replica at its limit refuses a request without reading its body.
        """
        self.total_requests += 1
        if not await self.limiter.acquire():
            self.refused()
            return OVERLOADED
        started = time.perf_counter()
        streaming = False
        try:
            out = await self._serve(request)
            if inspect.isasyncgen(out[2]):  # a stream holds its slot until its last chunk
                out, streaming = (out[0], out[1], Stream(self, out[2], out[0], started)), True
        except asyncio.CancelledError:
            self.cancelled += 1  # the client went away: its handler is cancelled with it
            self.answered(499, started)
            raise
        finally:
            if not streaming:
                self.limiter.release()
        if out[0] >= 500:
            self.errors += 1
        if not streaming:
            self.answered(out[0], started)
        return out

    async def _serve(self, request: Request | Callable[[], Awaitable[Request]]) -> HTTPResult:
        if not isinstance(request, Request):
            try:
                request = await request()  # a broken connection propagates: no one is left to answer
            except PayloadTooLarge as exc:
                return error_result(413, f"413 Request Entity Too Large: {exc}")
        self.body_bytes += len(request.body)
        try:
            return to_http(await self._call(request))
        except BadRequest as exc:
            return error_result(400, f"400 Bad Request: {exc}")
        except Exception as exc:  # noqa: BLE001 - user code may raise anything
            self.last_error = f"{type(exc).__name__}: {exc}"[:500]
            self.exceptions += 1
            tb = traceback.format_exc()
            logger.error("handler raised on %s %s:\n%s", request.method, request.path, tb)
            msg = f"500 Internal Server Error: handler raised {type(exc).__name__}"
            return error_result(500, msg + ("\n" + tb if self.debug_tracebacks else ""))

    async def _call(self, request: Request) -> Any:
        if self.is_async:
            result = self.handler(request)
        else:
            assert self._pool is not None
            job = self._pool.submit(self.handler, request)
            try:
                result = await asyncio.wrap_future(job)
            except asyncio.CancelledError:
                if not job.cancel():  # already running: a thread can't be stopped, so it keeps its slot
                    with contextlib.suppress(BaseException):  # until it returns (syncThreads stays a bound;
                        await asyncio.wrap_future(job)         # only a second cancellation, at shutdown, ends it)
                raise
        if inspect.isawaitable(result):
            result = await result
        return result

    async def check_health(self) -> None:
        """Run the handler's optional ``check_health()``; raise if it fails or returns False."""
        check = getattr(self.handler, "check_health", None)
        if check is None:
            return
        if inspect.iscoroutinefunction(check):
            result = await check()
        else:
            if self._health_pool is None:
                self._health_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rayfleet-health")
            # never queued behind busy sync handlers or the user's own to_thread() work
            result = await asyncio.get_running_loop().run_in_executor(self._health_pool, check)
            if inspect.isawaitable(result):
                result = await result
        if result is False:
            raise RuntimeError("check_health() returned False")

    def close(self) -> None:
        for pool in (self._pool, self._health_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
