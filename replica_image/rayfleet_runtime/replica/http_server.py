"""The plain handler contract's HTTP/1.1 server: an asyncio protocol on httptools (the parser uvicorn uses).

It does what a replica behind HAProxy needs and no more per request: headers parsed into the
handler's ``Request`` once it is admitted, the response written as one buffer (a stream as chunks,
with the transport's flow control), keep-alive by default and pipelined requests answered in order.

- Admission comes before the body is read: a body the replica buffers for a request still waiting
  pauses the connection past ``BODY_HIGH_WATER`` bytes, and a request refused with 503 (or 413) closes
  its connection unless its whole body had already arrived.
- ``maxRequestBodyBytes`` holds for ``Content-Length`` (413 before a byte is read) and for chunked
  bodies (counted as they arrive).
- A client that disconnects before its response is complete cancels the request's task, so an async
  handler sees ``CancelledError`` at its current ``await`` and a stream's generator is closed.
- Idle connections are closed after ``SERVER_KEEPALIVE_S`` by one sweep per server, not a timer per
  request.
"""
from __future__ import annotations

import asyncio
import collections
import http
import logging
import time
import urllib.parse
from email.utils import formatdate
from typing import Any

import httptools
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

from rayfleet_api.constants import REPLICA_READY_PATH
from rayfleet_runtime.replica.asgi import SERVER_KEEPALIVE_S
from rayfleet_runtime.replica.handler import HandlerRunner, PayloadTooLarge, Request, forwarded_client, log_access

logger = logging.getLogger("rayfleet.replica")

# Past this many body bytes buffered for a request not yet reading its body, the connection stops
# reading (the kernel's buffers, then the client, hold the rest).
BODY_HIGH_WATER = 256 * 1024
_SWEEP_S = 60.0
_EMPTY_QUERY: MultiDictProxy[str] = MultiDictProxy(MultiDict())
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in http.HTTPStatus}
_FORBIDDEN = frozenset(("content-length", "transfer-encoding", "connection", "date"))  # the server's own


class _Date:
    """The ``Date`` header, formatted once a second."""

    second, value = 0, b""

    @classmethod
    def header(cls) -> bytes:
        now = int(time.time())
        if now != cls.second:
            cls.second, cls.value = now, f"date: {formatdate(now, usegmt=True)}\r\n".encode()
        return cls.value


def _head(status: int, headers: dict[str, str], framing: bytes) -> bytes:
    """Status line and headers; ValueError for a header the handler made that HTTP can't carry."""
    lines = [_STATUS_LINES.get(status) or f"HTTP/1.1 {status} Unknown\r\n".encode(), _Date.header()]
    for name, value in headers.items():
        if name.lower() in _FORBIDDEN:
            continue
        line = f"{name}: {value}\r\n"
        if "\n" in line[:-2] or "\r" in line[:-2] or ":" in name:
            raise ValueError(f"header {name!r}: a newline or colon is not allowed in a header")
        lines.append(line.encode("latin-1"))
    lines.append(framing)
    return b"".join(lines)


class _Exchange:
    """One request on a connection: what the parser gave, its body as it arrives, how its answer went."""

    __slots__ = ("method", "url", "headers", "version", "keep_alive", "chunks", "size", "too_large",
                 "complete", "arrived", "reading", "expects_continue")

    def __init__(self, method: bytes, url: bytes, headers: list[tuple[bytes, bytes]], version: str, keep_alive: bool):
        self.method, self.url, self.headers = method.decode("ascii", "replace"), url, headers
        self.version, self.keep_alive = version, keep_alive
        self.chunks: list[bytes] = []
        self.size = 0
        self.too_large = False
        self.complete = False  # the whole body has arrived
        self.arrived: asyncio.Event | None = None  # set when it has, for a reader waiting on it
        self.reading = False  # the handler was admitted and reads its body
        self.expects_continue = False


class _Connection(asyncio.Protocol):
    def __init__(self, server: "PlainServer"):
        self.server = server
        self.runner = server.runner
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.remote: str | None = None
        self.parsing: _Exchange | None = None  # the request whose bytes are arriving
        self.pipeline: collections.deque[_Exchange] = collections.deque()
        self.task: asyncio.Task | None = None  # serving the current request
        self.closing = False
        self.last_active = time.monotonic()
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._write_paused = False
        self._drained: asyncio.Future | None = None
        self._read_paused = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else None  # a Unix socket's peer has no address
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the client left before its answer: its handler is cancelled
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The plain contract speaks no other protocol: the request is answered as it is, then the
            # connection closes (what follows its headers is not HTTP/1.1).
            self.closing = True
            if self.parsing is not None and not self.parsing.complete:
                self.on_message_complete()
        except httptools.HttpParserError as exc:
            self._refuse(f"400 Bad Request: {exc}")

    def eof_received(self) -> bool:
        return False  # a half-closed client is gone: close, cancelling what it asked

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._url, self._headers = b"", []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        ex = _Exchange(parser.get_method(), self._url, self._headers, parser.get_http_version(),
                       parser.should_keep_alive())
        self.parsing = ex
        if self.task is None:
            self._start(ex)
        else:
            self.pipeline.append(ex)  # answered in order, after the one in progress
            self._pause_reading()

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        ex.size += len(body)
        if ex.too_large:
            return
        if ex.size > self.server.max_body:  # counted, not kept: the client gets 413 now, not at the end
            ex.too_large, ex.chunks = True, []
            if ex.arrived is not None:
                ex.arrived.set()
            return
        ex.chunks.append(body)
        if not ex.reading and ex.size > BODY_HIGH_WATER:
            self._pause_reading()

    def on_message_complete(self) -> None:
        ex = self.parsing
        ex.complete = True
        if ex.arrived is not None:
            ex.arrived.set()

    # serving

    def _start(self, ex: _Exchange) -> None:
        self.task = self.server.loop.create_task(self._serve(ex))

    async def _serve(self, ex: _Exchange) -> None:
        started = time.perf_counter()
        status, path = 0, ex.url.decode("latin-1")
        try:
            try:
                parsed = httptools.parse_url(ex.url)
            except httptools.HttpParserInvalidURLError:
                status, ex.keep_alive = 400, False
                self._write_text(ex, 400, "400 Bad Request: invalid URL")
                return
            path = urllib.parse.unquote(parsed.path.decode("utf-8", "replace"))
            if path == REPLICA_READY_PATH:  # HAProxy's health check: answered, never logged
                draining = self.server.is_draining()
                self._write_text(ex, 503 if draining else 200, "draining" if draining else "ready")
                return
            status, headers, data = await self.runner.handle(lambda: self._read(ex, path, parsed.query))
            if not ex.complete or status == 413:
                ex.keep_alive = False  # the rest of that body is never read
            if isinstance(data, bytes):
                try:
                    head = _head(status, headers, self._framing(ex, len(data)))
                except (ValueError, UnicodeEncodeError) as exc:
                    status, (head, data) = 500, self._bad_headers(ex, exc)
                self._write(head if ex.method == "HEAD" else head + data)
            else:
                status = await self._stream(ex, status, headers, data)
        except asyncio.CancelledError:
            status = 499
            if not self.closing:
                raise  # not a client that left: the server is stopping
            asyncio.current_task().uncancel()  # ours, for a client that left: no one to answer
        except Exception:  # noqa: BLE001 - a bug of ours: the client still gets an answer, the log the traceback
            logger.exception("serving %s %s failed", ex.method, path)
            status, ex.keep_alive = 500, False
            self._write_text(ex, 500, "500 Internal Server Error")
        finally:
            if self.server.access_log and status:
                log_access(ex.method, path, status, started, forwarded_client(ex.headers) or self.remote)
            self._done(ex)

    def _write_text(self, ex: _Exchange, status: int, text: str) -> None:
        self._write(b"".join(self._text(ex, status, text)))

    def _text(self, ex: _Exchange, status: int, text: str) -> tuple[bytes, bytes]:
        """A text/plain answer of ours: its headers and its body."""
        body = (text + "\n").encode()
        return _head(status, {"content-type": "text/plain; charset=utf-8"}, self._framing(ex, len(body))), body

    async def _read(self, ex: _Exchange, path: str, query: bytes | None) -> Request:
        """The whole request, once admitted; PayloadTooLarge past the body limit."""
        ex.reading = True
        length = next((v for k, v in ex.headers if k.lower() == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.server.max_body:
            raise PayloadTooLarge.over(self.server.max_body)  # before a byte of it is read
        if not ex.complete and not ex.too_large:
            if any(k.lower() == b"expect" and v.lower() == b"100-continue" for k, v in ex.headers):
                self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
            ex.arrived = asyncio.Event()
            self._resume_reading()
            await ex.arrived.wait()
        if ex.too_large:
            raise PayloadTooLarge.over(self.server.max_body)
        headers = CIMultiDict((k.decode("latin-1"), v.decode("latin-1")) for k, v in ex.headers)
        query_dict = (MultiDictProxy(MultiDict(urllib.parse.parse_qsl(query.decode("latin-1"), keep_blank_values=True)))
                      if query else _EMPTY_QUERY)
        body = ex.chunks[0] if len(ex.chunks) == 1 else b"".join(ex.chunks)
        ex.chunks = []
        return Request(ex.method, path, query_dict, CIMultiDictProxy(headers), body, self.remote)

    async def _stream(self, ex: _Exchange, status: int, headers: dict[str, str], chunks: Any) -> int:
        """Each chunk as the handler yields it; the status it ends with (499: the client left first)."""
        chunked = ex.version != "1.0"
        if not chunked:
            ex.keep_alive = False  # HTTP/1.0: the end of the body is the end of the connection
        complete = False
        try:
            try:
                head = _head(status, headers, b"transfer-encoding: chunked\r\n\r\n" if chunked else self._framing(ex))
            except (ValueError, UnicodeEncodeError) as exc:
                self._write(b"".join(self._bad_headers(ex, exc)))
                return 500
            self._write(head)
            if ex.method != "HEAD":
                async for chunk in chunks:
                    if chunk:  # an empty chunk would end a chunked body
                        self._write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                        if self._write_paused:
                            await self._drain()
                    if self.closing:
                        raise asyncio.CancelledError
                if chunked:
                    self._write(b"0\r\n\r\n")
            complete = True
        finally:
            await chunks.aclose()  # releases the request's slot, whatever happened
        return status if complete else 499

    def _bad_headers(self, ex: _Exchange, exc: Exception) -> tuple[bytes, bytes]:
        """The 500 (headers and body) for a response whose headers HTTP can't carry."""
        self.runner.errors += 1
        self.runner.last_error = f"response headers: {exc}"[:500]
        logger.error("the handler's response headers can't be sent: %s", exc)
        ex.keep_alive = False
        return self._text(ex, 500, "500 Internal Server Error: the handler's response headers can't be sent")

    def _framing(self, ex: _Exchange, length: int | None = None) -> bytes:
        """Content-Length (none: the body ends with the connection) and the connection's fate."""
        keep = ex.keep_alive and not self.closing and length is not None
        parts = [] if length is None else [b"content-length: %d\r\n" % length]
        if not keep:
            parts.append(b"connection: close\r\n")
        elif ex.version == "1.0":
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def _done(self, ex: _Exchange) -> None:
        self.task = None
        self.last_active = time.monotonic()
        if self.transport is None or self.transport.is_closing():
            return
        if not ex.keep_alive or self.closing:
            self.transport.close()
            return
        if self.pipeline:
            self._start(self.pipeline.popleft())
        self._resume_reading()

    def _refuse(self, text: str) -> None:
        """Bytes that are not HTTP: answer 400 unless a request is being served, then close (nothing
        after them can be trusted; a request in flight is cancelled with the connection)."""
        self.closing = True
        if self.transport is None or self.transport.is_closing():
            return
        if self.task is None:
            body = (text + "\n").encode()
            self._write(_head(400, {"content-type": "text/plain; charset=utf-8"},
                              b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)) + body)
        self.transport.close()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def _drain(self) -> None:
        self._drained = asyncio.get_running_loop().create_future()
        if self._write_paused and not self.closing:
            await self._drained
        self._drained = None

    def _pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._read_paused and self.transport is not None and not self.transport.is_closing():
            self._read_paused = False
            self.transport.resume_reading()

    def close_if_idle(self, idle_before: float) -> None:
        if self.task is None and self.last_active < idle_before and self.transport is not None:
            self.transport.close()


class PlainServer:
    """Serves one ``HandlerRunner`` on a listening socket, on the running loop."""

    def __init__(self, runner: HandlerRunner, max_body: int, access_log: bool, is_draining):
        self.runner = runner
        self.max_body = max_body
        self.access_log = access_log
        self.is_draining = is_draining
        self.connections: set[_Connection] = set()
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task | None = None
        # asyncio.get_running_loop() makes a getpid() syscall each time: one a request was measurable
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self, sockets: list) -> None:
        """Serve on each bound socket (its TCP port and, for its own node's ingress, its local socket)."""
        loop = self.loop = asyncio.get_running_loop()
        for sock in sockets:
            self._servers.append(await loop.create_server(lambda: _Connection(self), sock=sock, backlog=1024))
        self._sweeper = loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_S)
            idle_before = time.monotonic() - SERVER_KEEPALIVE_S
            for conn in list(self.connections):
                conn.close_if_idle(idle_before)

    async def stop(self) -> None:
        """Stop listening and close every connection (a request still in flight is cancelled)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in self._servers:
            server.close()
        tasks = [c.task for c in self.connections if c.task is not None]
        for conn in list(self.connections):
            conn.closing = True
            if conn.transport is not None:
                conn.transport.close()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
