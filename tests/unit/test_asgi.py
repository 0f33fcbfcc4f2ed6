"""ASGI apps as handlers, served by the replica's own server (no Ray): the FastAPI example as written."""
from __future__ import annotations

import asyncio
import sys
import time

import httpx
import pytest

pytest.importorskip("fastapi")

from rayfleet.waiting import eventually_async  # noqa: E402
from rayfleet_api.desired import DesiredState  # noqa: E402
from rayfleet_runtime.replica.asgi import is_asgi_app  # noqa: E402
from rayfleet_runtime.replica.actor import ReplicaServer  # noqa: E402


def serve(test, **fields):
    async def main():
        server = ReplicaServer(DesiredState(handler="examples.fastapi_app:app", version="v", route_prefix="/api",
                                            **fields))
        await server.start("127.0.0.1")
        assert server.error is None, server.error
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:
                await test(client, server)
        finally:
            await server.stop()

    asyncio.run(main())


def test_asgi_apps_are_told_from_plain_handlers():
    from fastapi import FastAPI

    async def plain(request):
        return "ok"

    async def raw_asgi(scope, receive, send):
        pass

    assert is_asgi_app(FastAPI()) and is_asgi_app(raw_asgi)
    assert not is_asgi_app(plain) and not is_asgi_app(FastAPI) and not is_asgi_app("x")


def test_a_fastapi_app_serves_as_written_under_its_route_prefix():
    async def test(client, server):
        module = sys.modules["examples.fastapi_app"]
        assert module.resources == {"model": "loaded"}  # lifespan startup ran before it served
        r = await client.get("/api/items/7", params={"q": "x"})
        assert r.json()["item_id"] == 7 and r.json()["q"] == "x" and r.json()["model"] == "loaded"
        assert (await client.post("/api/orders", json={"item": "tea", "quantity": 2})).json()["total"] == 6
        assert (await client.post("/api/orders", json={"item": "tea"})).status_code == 422  # Pydantic's
        assert (await client.get("/api/openapi.json")).json()["paths"].keys() >= {"/items/{item_id}", "/orders"}
        assert (await client.get("/api/docs")).status_code == 200
        assert (await client.get("/-/ready")).text == "ready\n"
        assert server.stats()["totalRequests"] == 5 and server.stats()["errors"] == 0

    serve(test)
    assert sys.modules["examples.fastapi_app"].resources == {}  # lifespan shutdown ran on stop


def test_a_stream_reaches_the_client_chunk_by_chunk_and_holds_its_slot():
    async def test(client, server):
        t0, arrivals = time.monotonic(), []
        async with client.stream("GET", "/api/stream", params={"n": 3, "interval": 0.4}) as r:
            async for chunk in r.aiter_text():
                arrivals.append((time.monotonic() - t0, chunk))
                if len(arrivals) == 1:
                    assert server.stats()["inFlight"] == 1  # a stream is one request for its whole life
        assert "".join(c for _, c in arrivals) == "chunk 0\nchunk 1\nchunk 2\n"
        assert arrivals[0][0] < 0.4 <= arrivals[-1][0]  # the first chunk before the last was produced
        assert server.stats()["inFlight"] == 0
        events = (await client.get("/api/events")).text
        assert events == "data: 0\n\ndata: 1\n\ndata: 2\n\n"

    serve(test)


def test_admission_and_body_limit_apply_to_asgi_apps():
    async def test(client, server):
        r = await client.post("/api/orders", content=b"x" * 101)
        assert r.status_code == 413 and "maxRequestBodyBytes" in r.text

        async def chunked():
            for _ in range(3):
                yield b"x" * 60

        assert (await client.post("/api/orders", content=chunked())).status_code == 413
        slow = [asyncio.ensure_future(client.get("/api/stream", params={"n": 2, "interval": 0.5})) for _ in range(2)]
        await eventually_async(lambda: (server.stats()["inFlight"], server.stats()["queued"]) == (1, 1),
                               what="one stream running, one queued")
        busy = await client.get("/api/items/1")  # one running, one waiting (maxConcurrency 1): refused at once
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert [r.status_code for r in await asyncio.gather(*slow)] == [200, 200]
        assert server.stats()["rejected"] == 1

    serve(test, max_concurrency=1, max_request_body_bytes=100)


def test_a_websocket_session_round_trips_and_counts_as_one_request():
    from websockets.asyncio.client import connect

    async def test(client, server):
        url = client.base_url.copy_with(scheme="ws", path="/api/echo")
        async with connect(str(url)) as ws:
            await ws.send("hi")
            assert await ws.recv() == "echo: hi"
            assert server.stats()["inFlight"] == 1  # the open session holds its slot
            await ws.send("again")
            assert await ws.recv() == "echo: again"
        await eventually_async(lambda: server.stats()["inFlight"] == 0, what="the closed session's slot freed")

    serve(test)


def test_stopping_the_replica_closes_open_websockets_cleanly():
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    async def main():
        server = ReplicaServer(DesiredState(handler="examples.fastapi_app:app", version="v", route_prefix="/api"))
        await server.start("127.0.0.1")
        async with connect(f"ws://127.0.0.1:{server.port}/api/echo") as ws:
            await ws.send("hi")
            assert await ws.recv() == "echo: hi"
            stopping = asyncio.ensure_future(server.stop())
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd.code == 1012  # service restart: a client knows to reconnect
            await asyncio.wait_for(stopping, 10)

    asyncio.run(main())


def test_a_failing_lifespan_startup_is_a_handler_init_error(tmp_path, monkeypatch):
    (tmp_path / "rf_bad_lifespan.py").write_text(
        "from contextlib import asynccontextmanager\nfrom fastapi import FastAPI\n\n"
        "@asynccontextmanager\nasync def lifespan(app):\n    raise RuntimeError('no model')\n    yield\n\n"
        "app = FastAPI(lifespan=lifespan)\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    async def main():
        server = ReplicaServer(DesiredState(handler="rf_bad_lifespan:app", version="v"))
        await server.start("127.0.0.1")  # reported, not raised: the actor stays up to say why
        assert server.error["reason"] == "HandlerInitError" and "lifespan" in server.error["message"]
        assert server.port is None
        await server.stop()

    asyncio.run(main())


DISCONNECT_APP = """
import asyncio
from fastapi import FastAPI, Request

app = FastAPI()
EVENTS = []


@app.api_route("/work", methods=["GET", "POST"])
async def work(request: Request):
    body = await request.body()  # a GET's empty body too: the watcher must leave it to the app
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        EVENTS.append(("cancelled", request.method, len(body)))
        raise
    return {"bytes": len(body)}


@app.get("/quick")
async def quick(request: Request):
    return {"body": (await request.body()).decode()}
"""


def test_a_client_that_leaves_cancels_the_apps_endpoint(tmp_path, monkeypatch):
    (tmp_path / "rf_disconnect_app.py").write_text(DISCONNECT_APP)
    monkeypatch.syspath_prepend(str(tmp_path))

    async def main():
        server = ReplicaServer(DesiredState(handler="rf_disconnect_app:app", version="v"))
        await server.start("127.0.0.1")
        events = sys.modules["rf_disconnect_app"].EVENTS
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:
                assert (await client.get("/quick")).json() == {"body": ""}  # answered, not cancelled
            for request in (b"GET /work HTTP/1.1\r\nHost: x\r\n\r\n",
                            b"POST /work HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(request)
                await eventually_async(lambda: server.stats()["inFlight"] == 1, what="the request to start")
                writer.close()
                await eventually_async(lambda: server.stats()["inFlight"] == 0, what="the endpoint to be cancelled")
            assert events == [("cancelled", "GET", 0), ("cancelled", "POST", 3)]
            assert server.stats()["cancelled"] == 2 and server.stats()["errors"] == 0
        finally:
            await server.stop()
            sys.modules.pop("rf_disconnect_app", None)

    asyncio.run(main())


def test_an_asgi_apps_requests_are_counted_by_status_and_access_logged(caplog):
    async def test(client, server):
        assert (await client.post("/api/orders", json={"item": "tea", "quantity": 2})).status_code == 200
        assert (await client.post("/api/orders", json={"item": "tea"})).status_code == 422
        assert (await client.get("/api/nowhere")).status_code == 404
        codes = dict(server.runner.codes)
        assert codes == {200: 1, 422: 1, 404: 1}
        assert server.runner.body_bytes == len(b'{"item":"tea","quantity":2}') + len(b'{"item":"tea"}')

    with caplog.at_level("INFO", logger="rayfleet.access"):
        serve(test, access_log=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "rayfleet.access"]
    assert [line.split(" ms=")[0] for line in lines] == [
        "method=POST path=/api/orders status=200", "method=POST path=/api/orders status=422",
        "method=GET path=/api/nowhere status=404"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract Unix sockets are Linux's")
def test_over_the_local_socket_an_app_sees_the_client_the_ingress_forwarded(tmp_path, monkeypatch):
    import socket

    from rayfleet_runtime import local_socket

    (tmp_path / "rf_client_app.py").write_text(
        "async def app(scope, receive, send):\n"
        "    if scope['type'] != 'http':\n"
        "        return\n"
        "    body = repr(scope['client']).encode()\n"
        "    await send({'type': 'http.response.start', 'status': 200,\n"
        "                'headers': [(b'content-length', str(len(body)).encode())]})\n"
        "    await send({'type': 'http.response.body', 'body': body})\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def over_local(name):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(local_socket.address(name))
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.7\r\nConnection: close\r\n\r\n")
            out = b""
            while chunk := sock.recv(65536):
                out += chunk
            return out

    async def main():
        server = ReplicaServer(DesiredState(handler="rf_client_app:app", version="v"))
        await server.start("127.0.0.1")
        try:
            out = await asyncio.to_thread(over_local, server.local_socket)
            assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"('203.0.113.7', 0)"), out
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:
                assert (await client.get("/")).text.startswith("('127.0.0.1', ")  # over TCP: the peer, as before
        finally:
            await server.stop()
            sys.modules.pop("rf_client_app", None)

    asyncio.run(main())
