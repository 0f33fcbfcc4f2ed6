"""The replica's own HTTP server (no Ray): HTTP/1.1 on the wire, body limits, admission before the body,
and a client's disconnect cancelling its handler."""
from __future__ import annotations

import asyncio
import socket
import sys
import textwrap
import time

import httpx
import pytest

from rayfleet.waiting import eventually_async
from rayfleet_api.desired import DesiredState
from rayfleet_runtime.replica.actor import ReplicaServer

HANDLER = '''
import asyncio

EVENTS = []
GATE = asyncio.Event()

async def chunks(n, interval):
    try:
        for i in range(n):
            yield f"chunk {i}\\n"
            await asyncio.sleep(interval)
    finally:
        EVENTS.append("stream closed")


async def handler(request):
    if request.path == "/echo":
        from rayfleet_runtime import Response
        return Response(request.body, headers={"x-query": ",".join(request.query.getall("q", [])),
                                               "x-agent": request.headers.get("USER-AGENT", "")})
    if request.path == "/inject":
        from rayfleet_runtime import Response
        return Response("x", headers={"x-bad": "a\\r\\nset-cookie: evil"})
    if request.path == "/gate":
        await GATE.wait()
    if request.path == "/stream":
        return chunks(int(request.query.get("n", "3")), float(request.query.get("interval", "0.3")))
    if request.path == "/slow":
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            EVENTS.append("cancelled")
            raise
    return {"bytes": len(request.body)}
'''


@pytest.fixture
def module(tmp_path, monkeypatch):
    (tmp_path / "rf_server_handler.py").write_text(textwrap.dedent(HANDLER))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "rf_server_handler"
    sys.modules.pop("rf_server_handler", None)


def serve(module: str, test, **fields):
    async def main():
        server = ReplicaServer(DesiredState(handler=f"{module}:handler", version="v", **fields))
        await server.start("127.0.0.1")
        try:
            await test(f"http://127.0.0.1:{server.port}", server)
        finally:
            await server.stop()

    asyncio.run(main())


def test_a_body_over_the_limit_is_413_before_it_is_read(module):
    async def test(url, server):
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            assert (await client.post("/", content=b"x" * 100)).json() == {"bytes": 100}
            r = await client.post("/", content=b"x" * 101)
            assert r.status_code == 413 and "maxRequestBodyBytes" in r.text
            assert r.headers["Connection"] == "close"  # the rest of the body is never read

            async def chunked():  # no Content-Length: counted as it arrives
                for _ in range(3):
                    yield b"x" * 60

            assert (await client.post("/", content=chunked())).status_code == 413
        # A chunked body is refused as soon as it passes the limit, not once the client has sent it all:
        # in the packet with the headers, or while the handler waits for the rest.
        chunked_over = await exchange(url, b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                           b"c8\r\n" + b"x" * 200 + b"\r\n")  # no last chunk: still sending
        assert chunked_over.startswith(b"HTTP/1.1 413") and b"connection: close" in chunked_over
        reader, writer = await asyncio.open_connection(*url.removeprefix("http://").split(":"))
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n32\r\n" + b"x" * 50 + b"\r\n")
        await eventually_async(lambda: server.stats()["inFlight"] == 1, what="the request admitted, its body awaited")
        writer.write(b"64\r\n" + b"x" * 100 + b"\r\n")
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 413")
        writer.close()
        # A client that announces a huge body gets its 413 without sending any of it.
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 5)
        assert status.startswith(b"HTTP/1.1 413"), status
        writer.close()
        assert server.stats()["errors"] == 0  # the client's fault, not the handler's

    serve(module, test, max_request_body_bytes=100)


def test_no_body_at_all_when_the_limit_is_zero(module):
    async def test(url, server):
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            assert (await client.get("/")).json() == {"bytes": 0}
            assert (await client.post("/", content=b"x")).status_code == 413

    serve(module, test, max_request_body_bytes=0)


def test_a_client_that_disconnects_cancels_its_handler(module):
    async def test(url, server):
        events = sys.modules[module].EVENTS
        host, port = url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await eventually_async(lambda: server.stats()["inFlight"] == 1, what="the request to start")
        sock.close()
        await eventually_async(lambda: events, what="the handler to be cancelled")
        assert events == ["cancelled"]
        assert server.stats()["cancelled"] == 1 and server.stats()["inFlight"] == 0

    serve(module, test)


def test_an_async_generator_streams_chunk_by_chunk_holding_its_slot(module):
    async def test(url, server):
        events = sys.modules[module].EVENTS
        t0, arrivals = time.monotonic(), []
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            async with client.stream("GET", "/stream", params={"n": 3, "interval": 0.4}) as r:
                assert r.headers["content-type"].startswith("text/plain")
                async for chunk in r.aiter_text():
                    arrivals.append((time.monotonic() - t0, chunk))
                    assert server.stats()["inFlight"] == 1  # one request for the stream's whole life
        assert "".join(c for _, c in arrivals) == "chunk 0\nchunk 1\nchunk 2\n"
        assert arrivals[0][0] < 0.4 <= arrivals[-1][0]  # the first chunk before the last was produced
        assert server.stats()["inFlight"] == 0 and events == ["stream closed"]
        # A client that leaves mid-stream: the generator is closed (its finally runs), the slot freed.
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /stream?n=100&interval=0.1 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 200")
        writer.close()
        await eventually_async(lambda: len(events) == 2 and server.stats()["inFlight"] == 0,
                               what="the stream to be closed and its slot freed")
        assert events == ["stream closed"] * 2
        assert server.stats()["cancelled"] == 1

    serve(module, test)


def test_requests_are_counted_by_status_with_their_handler_time_and_body_bytes(module):
    from rayfleet_runtime.replica.metrics import ReplicaMetrics

    async def test(url, server):
        metrics = ReplicaMetrics("team.web", "web-0", lambda: server.runner)
        metrics.attach(server.runner)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            for _ in range(3):
                assert (await client.post("/", content=b"abcd")).status_code == 200
            assert (await client.post("/", content=b"x" * 101)).status_code == 413
            async with client.stream("GET", "/stream", params={"n": 2, "interval": 0}) as r:
                assert await r.aread() == b"chunk 0\nchunk 1\n"
        await eventually_async(lambda: server.stats()["inFlight"] == 0, what="the stream's slot to be freed")
        samples = {(s.name, s.labels.get("code")): s.value for f in metrics.families() for s in f.samples}
        labels = {s.labels["replica"] for f in metrics.families() for s in f.samples}
        assert labels == {"web-0"}
        assert samples[("rayfleet_replica_requests_total", "200")] == 4  # 3 posts + the stream, at its end
        assert samples[("rayfleet_replica_requests_total", "413")] == 1
        assert samples[("rayfleet_replica_request_body_bytes_total", None)] == 12  # the 413's body is never read
        assert samples[("rayfleet_replica_request_duration_seconds_count", None)] == 5
        assert samples[("rayfleet_replica_in_flight", None)] == 0
        assert samples[("rayfleet_replica_rejected_total", None)] == 0

    serve(module, test, max_request_body_bytes=100)


@pytest.mark.parametrize("access_log", [True, False])
def test_one_access_log_line_per_request_when_the_deployment_asks(module, caplog, access_log):
    async def test(url, server):
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            assert (await client.get("/hello", params={"q": "1"})).status_code == 200
            async with client.stream("GET", "/stream", params={"n": 2, "interval": 0}) as r:
                await r.aread()
        await eventually_async(lambda: server.stats()["inFlight"] == 0, what="the stream to end")

    with caplog.at_level("INFO", logger="rayfleet.access"):
        serve(module, test, access_log=access_log)
    lines = [r.getMessage() for r in caplog.records if r.name == "rayfleet.access"]
    if not access_log:
        assert lines == []
        return
    assert len(lines) == 2, lines
    assert lines[0].startswith("method=GET path=/hello status=200 ms=") and lines[0].endswith("client=127.0.0.1")
    assert lines[1].startswith("method=GET path=/stream status=200 ms=")


async def exchange(url: str, raw: bytes, *, close: bool = True) -> bytes:
    """Send raw bytes, read until the server closes (or 2 s of silence): what came back."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(raw)
    await writer.drain()
    data = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 2):
            data += chunk
    except asyncio.TimeoutError:
        assert not close, ("the server kept the connection open", data)
    writer.close()
    return data


def test_keep_alive_pipelining_head_and_http_1_0_on_the_wire(module):
    async def test(url, server):
        # Two pipelined requests on one connection: both answered, in order, and the connection stays open.
        data = await exchange(url, b"POST /echo?q=a&q=b%20c HTTP/1.1\r\nHost: x\r\nUser-Agent: t\r\n"
                                   b"Content-Length: 3\r\n\r\nabc"
                                   b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n", close=False)
        first, _, second = data.partition(b"abcHTTP/1.1")
        assert first.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nx-query: a,b c\r\n" in first
        assert b"\r\nx-agent: t\r\n" in first and b"content-length: 3\r\n" in first and b"date: " in first
        assert second.startswith(b" 200 OK") and second.endswith(b"content-length: 0\r\n\r\n")
        # HEAD: the headers of a GET, no body.
        head = await exchange(url, b"HEAD /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n") and b"connection: close" in head
        # HTTP/1.0 closes unless it asks to keep the connection.
        assert b"connection: close" in await exchange(url, b"GET /echo HTTP/1.0\r\n\r\n")
        kept = await exchange(url, b"GET /echo HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", close=False)
        assert b"connection: keep-alive" in kept
        # A streamed answer to HTTP/1.0 is not chunked: it ends with the connection.
        streamed = await exchange(url, b"GET /stream?n=2&interval=0 HTTP/1.0\r\n\r\n")
        assert b"transfer-encoding" not in streamed and streamed.endswith(b"chunk 0\nchunk 1\n")

    serve(module, test)


def test_what_is_not_http_is_a_400_and_a_header_that_would_split_the_response_a_500(module):
    async def test(url, server):
        bad = await exchange(url, b"GARBAGE\r\n\r\n")
        assert bad.startswith(b"HTTP/1.1 400") and b"connection: close" in bad
        injected = await exchange(url, b"GET /inject HTTP/1.1\r\nHost: x\r\n\r\n")
        assert injected.startswith(b"HTTP/1.1 500") and b"set-cookie" not in injected.lower()
        assert server.stats()["errors"] == 1 and "newline" in server.stats()["lastError"]
        assert (await exchange(url, b"GET /-/ready HTTP/1.1\r\nHost: x\r\n\r\n", close=False)).endswith(b"ready\n")

    serve(module, test)


def test_a_refused_request_closes_its_connection_only_if_its_body_is_still_coming(module):
    async def test(url, server):
        events = sys.modules[module]
        host, port = url.removeprefix("http://").split(":")
        busy = await asyncio.open_connection(host, int(port))
        busy[1].write(b"GET /gate HTTP/1.1\r\nHost: x\r\n\r\n")  # holds the one slot
        await eventually_async(lambda: server.stats()["inFlight"] == 1, what="the slot taken")
        queued = await asyncio.open_connection(host, int(port))
        queued[1].write(b"GET /gate HTTP/1.1\r\nHost: x\r\n\r\n")  # waits in the queue of one
        await eventually_async(lambda: server.stats()["queued"] == 1, what="the queue full")
        # Past the queue: 503 at once; with its whole body sent, the connection stays open.
        whole = await exchange(url, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab", close=False)
        assert whole.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in whole.lower()
        assert b"connection: close" not in whole
        # A body still on its way is never read: 503, and the connection closes.
        partial = await exchange(url, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
        assert partial.startswith(b"HTTP/1.1 503") and b"connection: close" in partial
        assert server.stats()["rejected"] == 2
        events.GATE.set()
        for reader, writer in (busy, queued):
            assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 200")
            writer.close()

    serve(module, test, max_concurrency=1)


def test_a_client_that_expects_100_continue_gets_it_once_admitted(module):
    async def test(url, server):
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"body")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200") and await reader.readexactly(4) == b"body"
        writer.close()

    serve(module, test)


def _over_local_socket(name: str, raw: bytes, responses: int = 1) -> bytes:
    """``raw`` sent over the replica's local socket, as HAProxy's ``abns@`` connects; what came back."""
    from rayfleet_runtime import local_socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(local_socket.address(name))
        sock.sendall(raw)
        out = b""
        while out.count(b"HTTP/1.1 ") < responses or not out.endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            out += chunk
        return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract Unix sockets are Linux's")
def test_its_local_socket_serves_the_same_requests_as_its_port_until_it_stops(module):
    names = []

    async def test(url, server):
        assert server.local_socket == f"rayfleet/{__import__('os').getpid()}/{server.port}"
        assert server.stats()["localSocket"] == server.local_socket
        names.append(server.local_socket)
        request = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nX-Forwarded-For: 203.0.113.7\r\n\r\nabc"
        out = await asyncio.to_thread(_over_local_socket, server.local_socket, request * 2, 2)  # kept alive
        assert out.count(b"HTTP/1.1 200 OK\r\n") == 2 and out.endswith(b'{"bytes": 3}'), out
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            assert (await client.post("/", content=b"abcd")).json() == {"bytes": 4}

    serve(module, test)
    with pytest.raises(ConnectionRefusedError):
        _over_local_socket(names[0], b"GET / HTTP/1.1\r\n\r\n")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract Unix sockets are Linux's")
def test_a_local_socket_that_cannot_be_bound_leaves_the_replica_on_tcp_alone():
    from rayfleet_runtime import local_socket

    taken = local_socket.bind_local("rayfleet/test/taken")
    try:
        assert taken is not None and local_socket.bind_local("rayfleet/test/taken") is None
    finally:
        taken.close()
