"""Shared health checks through real HAProxies: two ingresses (the plain class, no Ray) stand for two nodes'
and a few lines stand for the controller. Each ingress checks only its own node's replicas; one that its own
node finds down leaves the other node's rotation through the next table; one on a node lost whole is found
by the other's own traffic; and no request fails meanwhile."""
from __future__ import annotations

import asyncio
import shutil
import tempfile

import httpx
import pytest

from rayfleet.ports import free_port
from rayfleet.waiting import eventually_async
from rayfleet_runtime.ingress.actor import Ingress
from rayfleet_runtime.ingress.haproxy_bin import HAProxyNotFound, find_haproxy
from rayfleet_runtime.ingress.haproxy_process import cli
from rayfleet_runtime.ingress.show_stat import parse_show_stat, stats_by_deployment
from rayfleet_runtime.routing import RoutingTable
from tests.runtime.stand_ins import Replicas

try:
    find_haproxy()
except HAProxyNotFound:  # pragma: no cover
    pytest.skip("no HAProxy binary", allow_module_level=True)

NODES = ("n1", "n2")


class Controller:
    """What the controller does with findings: the union of the nodes' reports marks the next table."""

    def __init__(self, replicas: list[dict]):
        self.replicas = replicas
        self.down: dict[str, frozenset[str]] = {}
        self.ingresses: dict[str, Ingress] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    def table(self) -> RoutingTable:
        down = frozenset().union(*self.down.values())
        return RoutingTable.from_wire({"sharedHealth": True, "deployments": {"d": {"routePrefix": "/d", "replicas": [
            {**rep, "up": rep["id"] not in down} for rep in self.replicas]}}})

    def reporter(self, node: str):
        def report(down: list[str]) -> None:  # called from the ingress's thread
            if self.down.get(node, frozenset()) != frozenset(down):
                self.down[node] = frozenset(down)
                asyncio.run_coroutine_threadsafe(self.push(), self.loop)
        return report

    async def push(self) -> None:
        table = self.table()
        for ingress in self.ingresses.values():
            assert (await ingress.update(table))["error"] is None


def status(ingress: Ingress, replica: str) -> str:
    """The replica's status in the ingress's HAProxy (a blocking runtime API call: short)."""
    deployments, _, _ = stats_by_deployment(parse_show_stat(cli(ingress.runtime_socket, "show stat")),
                                            ingress._table.names())
    return deployments["d"]["servers"][replica]["status"]


def test_each_ingress_checks_its_own_replicas_and_learns_the_others_from_the_table():
    stand_ins = Replicas()
    a, b, c = (stand_ins.start(rid) for rid in ("d-a", "d-b", "d-c"))
    controller = Controller([{**a, "nodeId": "n1"}, {**b, "nodeId": "n2"}, {**c, "nodeId": "n2"}])
    workdirs = {node: tempfile.mkdtemp(prefix=f"rfh-{node}-") for node in NODES}  # short: Unix socket paths

    async def main():
        controller.loop = asyncio.get_running_loop()
        for node in NODES:
            controller.ingresses[node] = Ingress(port=free_port(), bind_host="127.0.0.1", workdir=workdirs[node],
                                                 nbthread=1, node_id=node, report_down=controller.reporter(node))
            await controller.ingresses[node].ready()
        await controller.push()
        n1 = controller.ingresses["n1"]
        reloads = n1._reloads

        # Every replica is checked by one HAProxy, its own node's: n1 checking n2's too would make d-b's and
        # d-c's counts run twice as fast as d-a's.
        await eventually_async(lambda: min(stand_ins.checks[r] for r in ("d-a", "d-b", "d-c")) >= 6, 20,
                               what="6 health checks of each replica")
        assert max(stand_ins.checks.values()) - min(stand_ins.checks.values()) <= 2, stand_ins.checks

        failures, answers = [], 0
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{n1.port}", timeout=10) as client:
            async def load():
                nonlocal answers
                while True:
                    r = await client.get("/d/x")
                    answers += 1
                    if r.status_code != 200:
                        failures.append(r.status_code)

            traffic = asyncio.create_task(load())
            stand_ins.stop("d-b")  # d-b dies; n2 finds it, n1 learns it from the table
            try:
                await eventually_async(lambda: controller.down.get("n2") == {"d-b"}, 15, what="n2 to find d-b down")

                await eventually_async(lambda: status(n1, "d-b") == "MAINT", 5, what="n1 to take d-b out of rotation")
                assert status(n1, "d-c") == "UP"
                before = answers
                await eventually_async(lambda: answers >= before + 50, what="50 more answers")
                # n2 is lost whole, its ingress with it: nobody tells n1 that d-c is gone, and n1's own traffic
                # (3 failed connects in a row, each re-sent to another replica) marks it down.
                await controller.ingresses.pop("n2").stop(grace_s=0)
                stand_ins.stop("d-c")
                await eventually_async(lambda: status(n1, "d-c").startswith("DOWN"), 10, what="n1 to find d-c down")
                before = answers
                await eventually_async(lambda: answers >= before + 50, what="50 more answers")
            finally:
                traffic.cancel()
        assert failures == [] and n1._reloads == reloads, (failures, n1._reloads)

    try:
        asyncio.run(main())
    finally:
        for node, ingress in controller.ingresses.items():
            asyncio.run(ingress.stop(grace_s=1))
        for workdir in workdirs.values():
            shutil.rmtree(workdir, ignore_errors=True)
        stand_ins.close()
