"""The activator with real sockets: requests sent to its Unix socket as HAProxy would (naming the backend),
stand-in replicas on TCP. The activator runs on its own thread; each test drives it from its own loop."""
from __future__ import annotations

import asyncio
import socket
import tempfile
import time

import httpx
import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from rayfleet_runtime.ingress import activator as activator_module
from rayfleet_runtime.ingress.activator import Activator, end_to_end
from rayfleet_runtime.ingress.haproxy_config import ACTIVATOR_BACKEND_HEADER
from rayfleet_runtime.routing import RoutingTable, backend_name
from rayfleet.waiting import eventually_async

HEADERS = {ACTIVATOR_BACKEND_HEADER: backend_name("echo")}


def table(replicas=(), **fields):
    return RoutingTable.from_wire({"deployments": {"echo": {
        "routePrefix": "/echo", "scaleFromZero": True, "maxConcurrency": 100, "replicas": list(replicas), **fields}}})


class Replica:
    """A stand-in replica: echoes what it got; streams on /echo/stream, waits on /echo/wait until ``go`` is set,
    dies mid-response on /echo/dies."""

    def __init__(self) -> None:
        self.hits = 0
        self.in_flight = self.max_in_flight = 0
        self.go = asyncio.Event()
        self.chunk_seen = asyncio.Event()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.hits += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if request.path == "/echo/wait":
                await self.go.wait()
            if request.path == "/echo/stream":
                response = web.StreamResponse(headers={"X-Stream": "1"})
                await response.prepare(request)
                await response.write(b"first\n")
                await self.chunk_seen.wait()  # the client must have the first chunk before the second exists
                await response.write(b"second\n")
                await response.write_eof()
                return response
            if request.path == "/echo/dies":  # killed mid-response
                response = web.StreamResponse()
                await response.prepare(request)
                await response.write(b"part\n")
                request.transport.abort()
                return response
            body = await request.read()
            response = web.json_response({"method": request.method, "path": request.raw_path, "body": body.decode(),
                                          "headers": list(request.headers.items())}, status=201)
            response.headers.add("Set-Cookie", "a=1")
            response.headers.add("Set-Cookie", "b=2")
            return response
        finally:
            self.in_flight -= 1

    async def __aenter__(self) -> dict:
        self.runner = web.ServerRunner(web.Server(self.handle), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        return {"id": "echo-0", "host": "127.0.0.1", "port": port}

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()


def run(test, initial=None):
    """Run ``test(activator, client)`` with an activator serving ``initial`` (default: echo, no replica)."""
    async def main():
        with tempfile.TemporaryDirectory(prefix="rfa-") as workdir:  # short: a Unix socket path
            activator = Activator(f"{workdir}/activator.sock")
            activator.start(initial or table())
            transport = httpx.AsyncHTTPTransport(uds=activator.socket_path)
            try:
                async with httpx.AsyncClient(transport=transport, base_url="http://ingress", timeout=10) as client:
                    await test(activator, client)
            finally:
                await asyncio.to_thread(activator.stop)

    asyncio.run(main())


async def held(activator, count):
    await eventually_async(lambda: activator.held() == {"echo": count}, what=f"{count} held")


def test_a_held_request_is_forwarded_once_a_table_gives_it_a_replica():
    async def test(activator, client):
        assert activator.held() == {"echo": 0}  # a scaleFromZero deployment is reported with none held
        request = asyncio.create_task(client.post(
            "/echo/x%2Fy?q=1", content=b"payload",
            headers={**HEADERS, "X-Custom": "kept", "Connection": "keep-alive, X-Hop", "X-Hop": "dropped"}))
        await held(activator, 1)
        assert not request.done()
        async with Replica() as replica:
            await activator.apply(table([replica]))
            response = await request
        assert response.status_code == 201
        echoed = response.json()
        assert (echoed["method"], echoed["path"], echoed["body"]) == ("POST", "/echo/x%2Fy?q=1", "payload")
        sent = CIMultiDict(echoed["headers"])
        assert sent["X-Custom"] == "kept" and sent["Host"] == "ingress"
        assert ACTIVATOR_BACKEND_HEADER not in sent and "X-Hop" not in sent
        assert sent["User-Agent"].startswith("python-httpx")  # the client's headers, not aiohttp's
        assert response.headers.get_list("Set-Cookie") == ["a=1", "b=2"]
        assert activator.held() == {"echo": 0}
        assert activator.outcomes() == {("echo", "forwarded"): 1}

    run(test)


def test_a_held_request_gets_504_after_the_request_timeout():
    async def test(activator, client):
        started = time.monotonic()
        response = await client.get("/echo/x", headers=HEADERS)
        assert response.status_code == 504
        assert time.monotonic() - started >= 0.3
        assert response.json() == {"error": "no replica became ready in time", "deployment": "echo"}
        assert activator.held() == {"echo": 0}
        assert activator.outcomes() == {("echo", "timeout"): 1}

    run(test, table(requestTimeoutSeconds=0.3))


def test_past_the_cap_503_at_once_and_the_held_ones_still_served(monkeypatch):
    monkeypatch.setattr(activator_module, "MAX_HELD_PER_DEPLOYMENT", 2)

    async def test(activator, client):
        first = [asyncio.create_task(client.get(f"/echo/{i}", headers=HEADERS)) for i in range(2)]
        await held(activator, 2)
        refused = await client.get("/echo/3", headers=HEADERS)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert refused.json() == {"error": "overloaded", "deployment": "echo"}
        async with Replica() as replica:
            await activator.apply(table([replica]))
            assert [r.status_code for r in await asyncio.gather(*first)] == [201, 201]
        assert activator.outcomes() == {("echo", "overflow"): 1, ("echo", "forwarded"): 2}

    run(test)


def test_a_client_that_leaves_is_no_longer_held():
    async def test(activator, client):
        request = asyncio.create_task(client.get("/echo/x", headers=HEADERS))
        await held(activator, 1)
        request.cancel()  # closes its connection
        await eventually_async(lambda: activator.outcomes() == {("echo", "client_left"): 1},
                               what="the client's leaving")
        assert activator.held() == {"echo": 0}
        replica = Replica()
        async with replica as address:
            await activator.apply(table([address]))
            assert (await client.get("/echo/y", headers=HEADERS)).status_code == 201
        assert replica.hits == 1  # the one that left was never sent

    run(test)


def test_a_stream_passes_chunk_by_chunk():
    async def test(activator, client):
        replica = Replica()
        async with replica as address:
            await activator.apply(table([address]))
            async with client.stream("GET", "/echo/stream", headers=HEADERS) as response:
                assert response.status_code == 200 and response.headers["X-Stream"] == "1"
                chunks = response.aiter_bytes()
                assert await anext(chunks) == b"first\n"  # before the replica has written the second
                replica.chunk_seen.set()
                assert b"".join([chunk async for chunk in chunks]) == b"second\n"

    run(test)


def test_a_response_the_replica_cuts_off_is_cut_off_for_the_client_too():
    async def test(activator, client):
        async with Replica() as replica:
            await activator.apply(table([replica]))
            async with client.stream("GET", "/echo/dies", headers=HEADERS) as response:
                assert response.status_code == 200
                with pytest.raises(httpx.RemoteProtocolError):  # not a clean end of the body
                    await response.aread()

    run(test)


def test_a_replica_gets_at_most_max_concurrency_from_the_activator():
    async def test(activator, client):
        requests = [asyncio.create_task(client.get("/echo/wait", headers=HEADERS)) for _ in range(3)]
        await held(activator, 3)
        replica = Replica()
        async with replica as address:
            await activator.apply(table([address], maxConcurrency=1))
            await eventually_async(lambda: replica.in_flight == 1 and activator.held() == {"echo": 2},
                                   what="one sent, two still held")
            replica.go.set()
            assert [r.status_code for r in await asyncio.gather(*requests)] == [201] * 3
        assert replica.max_in_flight == 1

    run(test)


def test_held_requests_get_503_when_their_deployment_stops_scaling_from_zero_or_leaves():
    async def test(activator, client):
        request = asyncio.create_task(client.get("/echo/x", headers=HEADERS))
        await held(activator, 1)
        await activator.apply(table(scaleFromZero=False))
        response = await request
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert response.json() == {"error": "no ready replicas", "deployment": "echo"}
        assert activator.held() == {}  # not scaling from zero, none held: not reported

        await activator.apply(table())
        request = asyncio.create_task(client.get("/echo/x", headers=HEADERS))
        await held(activator, 1)
        await activator.apply(RoutingTable())
        assert (await request).status_code == 503
        assert activator.outcomes() == {("echo", "unavailable"): 2}

    run(test)


def test_an_upgrade_is_held_then_told_to_retry():
    async def test(activator, client):
        upgrade = {**HEADERS, "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                   "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
        request = asyncio.create_task(client.get("/echo/ws", headers=upgrade))
        await held(activator, 1)  # load, to scale up from zero
        replica = Replica()
        async with replica as address:
            await activator.apply(table([address]))
            response = await request
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert replica.hits == 0
        assert activator.outcomes() == {("echo", "upgrade"): 1}

    run(test)


def test_an_unreachable_replica_is_503():
    async def test(activator, client):
        async with Replica() as gone:
            pass  # its port is closed now
        await activator.apply(table([gone]))
        response = await client.get("/echo/x", headers=HEADERS)
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert activator.outcomes() == {("echo", "unavailable"): 1}

    run(test)


def test_a_request_naming_no_backend_it_knows_is_503():
    async def test(activator, client):
        for headers in ({}, {ACTIVATOR_BACKEND_HEADER: "be_other"}):
            response = await client.get("/echo/x", headers=headers)
            assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert activator.outcomes() == {}

    run(test)


def test_end_to_end_drops_hop_by_hop_headers_and_those_connection_names():
    headers = CIMultiDictProxy(CIMultiDict([
        ("Connection", "close, X-Private"), ("X-Private", "1"), ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"), ("TE", "trailers"), ("X-Drop", "me"),
        ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("Content-Type", "text/plain")]))
    assert list(end_to_end(headers, "x-drop").items()) == [
        ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("Content-Type", "text/plain")]



def test_bodies_longer_than_the_read_ahead_are_streamed_to_the_replica_whole():
    async def test(activator, client):
        parts = [bytes([ord("a") + i]) * activator_module.BODY_READ_AHEAD_BYTES for i in range(4)]

        async def chunked():
            for part in parts:
                yield part

        request = asyncio.create_task(client.put("/echo/x", content=chunked(), headers=HEADERS))
        await held(activator, 1)
        async with Replica() as replica:
            await activator.apply(table([replica]))
            response = await request
            assert response.json()["body"] == b"".join(parts).decode()
            assert CIMultiDict(response.json()["headers"])["Transfer-Encoding"] == "chunked"
            response = await client.post("/echo/x", content=b"".join(parts), headers=HEADERS)
            assert response.json()["body"] == b"".join(parts).decode()

    run(test)


def test_a_stale_socket_is_replaced_and_stop_cuts_off_what_is_held():
    async def main():
        with tempfile.TemporaryDirectory(prefix="rfa-") as workdir:
            path = f"{workdir}/activator.sock"
            with socket.socket(socket.AF_UNIX) as stale:  # a previous ingress's, left behind
                stale.bind(path)
            activator = Activator(path)
            activator.start(table())
            transport = httpx.AsyncHTTPTransport(uds=path)
            async with httpx.AsyncClient(transport=transport, base_url="http://ingress", timeout=60) as client:
                request = asyncio.create_task(client.get("/echo/x", headers=HEADERS))
                await held(activator, 1)
                await asyncio.to_thread(activator.stop)  # fails after CALL_TIMEOUT_S if it waited for the request
                with pytest.raises(httpx.RemoteProtocolError):  # the connection closed with no answer
                    await request

    asyncio.run(main())
