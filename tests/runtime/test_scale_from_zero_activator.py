"""Scale from zero through a real HAProxy: the ingress (its plain class, no Ray, no controller) holds the
requests of a deployment with no replica in its activator until a table gives it one, a real replica
server (no Ray either) then answers them; the table pushes stand in for the controller."""
from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import textwrap

import httpx
import pytest

from rayfleet.ports import free_port
from rayfleet.waiting import eventually_async
from rayfleet_api.desired import DesiredState
from rayfleet_runtime.routing import RoutingTable  # noqa: E402
from rayfleet_runtime.ingress.haproxy_bin import HAProxyNotFound, find_haproxy
from rayfleet_runtime.ingress.haproxy_config import ACTIVATOR_SERVER
from rayfleet_runtime.ingress.actor import Ingress
from rayfleet_runtime.replica.actor import ReplicaServer

try:
    find_haproxy()
except HAProxyNotFound:  # pragma: no cover
    pytest.skip("no HAProxy binary", allow_module_level=True)

HANDLER = '''
import asyncio

GO = asyncio.Event()


async def chunks():
    yield "first\\n"
    await GO.wait()  # the test sets it once the first chunk has reached the client
    yield "second\\n"


async def handler(request):
    if request.path == "/cold/stream":
        return chunks()
    return {"path": request.path, "body": request.text(), "xff": request.headers.getall("X-Forwarded-For", []),
            "backend_header": request.headers.get("X-Rayfleet-Backend")}
'''
MODULE = "rf_test_cold_handler"


@pytest.fixture(scope="module")
def handler_module(tmp_path_factory):
    path = tmp_path_factory.mktemp("handler")
    (path / f"{MODULE}.py").write_text(textwrap.dedent(HANDLER))
    sys.path.insert(0, str(path))
    yield MODULE
    sys.path.remove(str(path))
    sys.modules.pop(MODULE, None)


@pytest.fixture(scope="module")
def ingress():
    workdir = tempfile.mkdtemp(prefix="rfi-")  # short: Unix socket paths
    ing = Ingress(port=free_port(), bind_host="127.0.0.1", workdir=workdir, nbthread=1)
    asyncio.run(ing.ready())
    yield ing
    asyncio.run(ing.stop(grace_s=1))
    shutil.rmtree(workdir, ignore_errors=True)


def cold(replicas=(), **fields):
    return {"deployments": {"cold": {"routePrefix": "/cold", "scaleFromZero": True, "requestTimeoutSeconds": 30,
                                     "replicas": list(replicas), **fields}}}


async def push(ing: Ingress, table) -> dict:
    result = await ing.update(RoutingTable.from_wire(table))
    assert result["error"] is None, result
    return result


async def held(ing: Ingress, count: int) -> None:
    await eventually_async(lambda: ing._activator.held() == {"cold": count}, what=f"{count} held")


def run(ingress, handler_module, test):
    """``test(client, start_replica)`` against the ingress, with a cold deployment pushed first."""
    async def main():
        servers = []

        async def start_replica() -> dict:
            server = ReplicaServer(DesiredState(handler=f"{handler_module}:handler", version="v"))
            await server.start("127.0.0.1")
            servers.append(server)
            return {"id": f"cold-{len(servers)}", "host": server.host, "port": server.port}

        await push(ingress, cold())
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ingress.port}", timeout=60) as client:
                await test(client, start_replica)
        finally:
            await push(ingress, {"deployments": {}})
            for server in servers:
                await server.stop()

    asyncio.run(main())


def test_the_first_request_is_held_until_a_replica_is_ready_then_served(ingress, handler_module):
    async def test(client, start_replica):
        before = ingress._activator.outcomes().get(("cold", "forwarded"), 0)
        request = asyncio.create_task(client.post("/cold/first", content=b"hello"))
        await held(ingress, 1)
        assert (await ingress.stats())["held"] == {"cold": 1}  # what the controller reads
        assert not request.done()
        await push(ingress, cold([await start_replica()]))
        response = await request
        assert response.status_code == 200, response.text
        assert response.json() == {"path": "/cold/first", "body": "hello", "xff": ["127.0.0.1"],
                                   "backend_header": None}
        # HAProxy now routes to the replica itself, on a new connection as on the first's: the activator sees
        # no more.
        async with httpx.AsyncClient(base_url=client.base_url) as fresh:
            assert (await fresh.get("/cold/second")).status_code == 200
        assert (await client.get("/cold/third")).json()["backend_header"] is None
        assert ingress._activator.outcomes()[("cold", "forwarded")] == before + 1
        stats = await ingress.stats()
        assert stats["held"] == {"cold": 0}
        assert set(stats["deployments"]["cold"]["servers"]) == {"cold-1"}  # the activator is no replica
        families = {family.name: family for family in ingress._own_metrics()}
        assert [(s.labels, s.value) for s in families["rayfleet_ingress_activator_held"].samples] == [
            ({"namespace": "default", "deployment": "cold"}, 0)]
        forwarded = [s for s in families["rayfleet_ingress_activator_requests"].samples
                     if s.labels == {"namespace": "default", "deployment": "cold", "outcome": "forwarded"}]
        assert [s.value for s in forwarded] == [before + 1]

    run(ingress, handler_module, test)


def test_a_held_stream_streams(ingress, handler_module):
    async def test(client, start_replica):
        async with client.stream("GET", "/cold/stream") as response:
            await held(ingress, 0)  # the headers are in: the replica answered
            assert response.status_code == 200
            chunks = response.aiter_bytes()
            assert await anext(chunks) == b"first\n"
            sys.modules[handler_module].GO.set()
            assert b"".join([chunk async for chunk in chunks]) == b"second\n"

    async def with_replica_after_hold(client, start_replica):
        stream = asyncio.create_task(test(client, start_replica))
        await held(ingress, 1)
        await push(ingress, cold([await start_replica()]))
        await stream

    run(ingress, handler_module, with_replica_after_hold)


def test_a_client_that_leaves_while_held_is_dropped(ingress, handler_module):
    async def test(client, start_replica):
        left = ingress._activator.outcomes().get(("cold", "client_left"), 0)
        request = asyncio.create_task(client.get("/cold/leaving"))
        await held(ingress, 1)
        request.cancel()  # HAProxy (abortonclose) closes its connection to the activator
        await eventually_async(lambda: ingress._activator.outcomes().get(("cold", "client_left"), 0) == left + 1,
                               what="the activator to drop the request")
        await held(ingress, 0)

    run(ingress, handler_module, test)


def test_a_held_request_gets_the_activators_504_after_the_request_timeout(ingress, handler_module):
    async def test(client, start_replica):
        await push(ingress, cold(requestTimeoutSeconds=0.5))
        response = await client.get("/cold/late")
        assert response.status_code == 504
        assert response.json() == {"error": "no replica became ready in time", "deployment": "cold"}

    run(ingress, handler_module, test)


def test_without_scale_from_zero_no_replica_is_503_at_once(ingress, handler_module):
    async def test(client, start_replica):
        await push(ingress, cold(scaleFromZero=False))
        response = await client.get("/cold/x")
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert response.json() == {"error": "no ready replicas", "deployment": "cold"}
        assert (await ingress.stats())["held"] == {}

    run(ingress, handler_module, test)


def test_scaling_to_and_from_zero_reloads_no_haproxy(ingress, handler_module):
    async def test(client, start_replica):
        assert f"server {ACTIVATOR_SERVER} unix@{ingress.activator_socket}" in ingress._config
        reloads = ingress._reloads
        replica = await start_replica()
        assert (await push(ingress, cold([replica])))["via"] == "runtime"
        assert (await client.get("/cold/direct")).json()["backend_header"] is None  # not through the activator
        assert (await push(ingress, cold()))["via"] == "runtime"  # back at zero: held again, on the same connection
        request = asyncio.create_task(client.get("/cold/held"))
        await held(ingress, 1)
        assert (await push(ingress, cold([replica])))["via"] == "runtime"
        assert (await request).status_code == 200
        assert ingress._reloads == reloads

    run(ingress, handler_module, test)
