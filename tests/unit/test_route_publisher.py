"""Routing-table publication and the drain order of a graceful stop, with fake ingresses (no Ray cluster)."""
from __future__ import annotations

import asyncio

from rayfleet_api.desired import DesiredState
from rayfleet_api.states import ReplicaState
from rayfleet_runtime.routing import RoutingTable
from rayfleet_runtime.controller.metrics import ControllerMetrics
from rayfleet_runtime.controller.deployment_state import ControllerCore
from rayfleet_runtime.controller.records import DeploymentRecord, ReplicaRecord
from rayfleet_runtime.controller.planning import StopIntent
from rayfleet_runtime.controller.route_publisher import RoutePublisher


class FakeIngress:
    """A node's ingress: ``update(table)`` is sent at once and answers after ``delay`` with ``result``."""

    def __init__(self, delay: float = 0.0, result: dict | None = None):
        self.delay, self.result, self.tables = delay, result or {"applied": True}, []

    def update(self, table):
        async def apply():
            await asyncio.sleep(self.delay)
            self.tables.append(table)
            return self.result

        return asyncio.ensure_future(apply())


def publisher(table, ingress: FakeIngress, pushed=lambda outcome, seconds: None) -> RoutePublisher:
    async def ensure_ingress(node_id, port, bind_host):
        return ingress

    async def node_ids(head_only):
        return ["node-a"]

    return RoutePublisher(table, ensure_ingress, node_ids, pushed)


def test_wait_applied_only_after_the_ingress_applied_the_table():
    async def main():
        ingress = FakeIngress(delay=0.2)
        pub = publisher(lambda: {"deployments": {"d": 1}}, ingress)
        v = pub.changed()
        assert not await pub.wait_applied(v, 0.05)
        task = asyncio.ensure_future(pub.push())
        assert await pub.wait_applied(v, 2)
        assert ingress.tables == [{"deployments": {"d": 1}}]
        await task
        # Unchanged table: nothing pushed again, the new version counts as applied at once.
        v2 = pub.changed()
        await pub.push()
        assert await pub.wait_applied(v2, 0) and len(ingress.tables) == 1

    asyncio.run(main())


def test_a_table_the_ingress_kept_out_is_not_acknowledged_and_is_retried():
    async def main():
        ingress = FakeIngress(result={"applied": False, "error": "reload failed"})
        pub = publisher(lambda: {"deployments": {}}, ingress)
        v = pub.changed()
        await pub.push()
        assert not await pub.wait_applied(v, 0.05)
        ingress.result = {"applied": True}
        await pub.push()  # not recorded as pushed, so sent again
        assert len(ingress.tables) == 2 and await pub.wait_applied(v, 0)

    asyncio.run(main())


def test_each_push_that_sends_a_table_is_counted_by_outcome_with_its_duration():
    async def main():
        metrics = ControllerMetrics(lambda: {})
        ingress, table = FakeIngress(delay=0.1), [RoutingTable()]
        pub = publisher(lambda: table[0], ingress, metrics.route_pushed)
        pushes = metrics.registry.get_sample_value
        pub.changed()
        await pub.push()
        assert pushes("rayfleet_controller_route_pushes_total", {"outcome": "ok"}) == 1
        assert pushes("rayfleet_controller_route_push_duration_seconds_count") == 1
        assert pushes("rayfleet_controller_route_push_duration_seconds_sum") >= 0.1
        await pub.push()  # the same table: nothing sent, nothing counted
        assert pushes("rayfleet_controller_route_push_duration_seconds_count") == 1

        ingress.result = {"applied": False, "error": "reload failed"}
        table[0] = RoutingTable.from_wire({"deployments": {"d": {}}})
        await pub.push()
        assert pushes("rayfleet_controller_route_pushes_total", {"outcome": "error"}) == 1
        assert pushes("rayfleet_controller_route_pushes_total", {"outcome": "ok"}) == 1

    asyncio.run(main())


def test_graceful_stop_drains_only_after_the_proxies_dropped_the_replica():
    events: list[str] = []

    class FakeBackend:
        """The calls a graceful stop makes, and the fake ingress to publish to."""

        def __init__(self, ingress):
            self.ingress = ingress

        async def ensure_ingress(self, node_id, port, bind_host):
            return self.ingress

        async def node_ids(self, head_only):
            return ["node-a"]

        async def drain(self, actor, grace_s, timeout_s):
            events.append("drain")
            return {"pid": 1}

        def kill(self, actor):
            events.append("kill")

    async def main():
        ingress = FakeIngress(delay=0.3)
        core = ControllerCore(FakeBackend(ingress), drain_settle_s=0.0)
        table = core.routing_table
        core.routes = core.actions.routes = publisher(lambda: (events.append("unrouted"), table())[1], ingress)
        dep = DeploymentRecord("d", DesiredState(handler="m:h", replicas=0, version="v", graceful_shutdown_seconds=5))
        rec = dep.replicas["d-0"] = ReplicaRecord("d-0", "v", "actor-d-0", state=ReplicaState.READY,
                                                  info={"host": "127.0.0.1", "port": 1})
        core.deployments["d"] = dep
        core.actions.begin_stop(dep, rec, StopIntent("d-0", True, "scale-down"))
        assert rec.state == ReplicaState.DRAINING
        publish = asyncio.ensure_future(core.routes.run())
        await asyncio.wait_for(rec.task, 5)
        publish.cancel()
        assert rec.state == ReplicaState.STOPPED
        assert ingress.tables[-1].to_wire() == {"sharedHealth": True, "deployments": {"d": {
            "routePrefix": "/", "maxConcurrency": 100, "requestTimeoutSeconds": 60, "maxRequestBodyBytes": 16 * 2**20,
            "queueTimeoutSeconds": 2.0, "maxQueued": None, "replicas": []}}}
        assert events == ["unrouted", "drain", "kill"]

    asyncio.run(main())


def test_a_failing_ingress_is_retried_with_backoff_not_in_a_loop():
    async def main():
        attempts = []

        class DyingIngress:  # created fine, then every update fails: its actor dies (say, its port is taken)
            def update(self, table):
                attempts.append(asyncio.get_running_loop().time())
                future = asyncio.get_running_loop().create_future()
                future.set_exception(RuntimeError("The actor died because of an error raised in its creation task"))
                return future

        async def ensure_ingress(node_id, port, bind_host):
            return DyingIngress()

        async def node_ids(head_only):
            return ["node-a"]

        pub = RoutePublisher(lambda: {"deployments": {}}, ensure_ingress, node_ids, lambda outcome, seconds: None)
        runner = asyncio.ensure_future(pub.run())
        v = pub.changed()
        assert not await pub.wait_applied(v, 2.0)  # never applied: it keeps failing
        runner.cancel()
        # 0.5 s, 1 s, ... between attempts: a handful in 2 s, not thousands.
        assert 2 <= len(attempts) <= 4, attempts
        gaps = [b - a for a, b in zip(attempts, attempts[1:])]
        assert all(later > earlier for earlier, later in zip(gaps, gaps[1:])), gaps

    asyncio.run(main())


def test_requests_waiting_in_the_ingresses_are_summed_per_deployment_and_a_slow_one_keeps_its_last_answer():
    class CountingIngress:
        """A node's ingress whose stats() answers ``stats`` after ``delay``; counts the calls."""

        def __init__(self, stats, delay=0.0):
            self.stats_answer, self.delay, self.calls = stats, delay, 0

        def update(self, table):
            return asyncio.ensure_future(asyncio.sleep(0, {"applied": True}))

        def stats(self):
            self.calls += 1

            async def answer():
                await asyncio.sleep(self.delay)
                return self.stats_answer

            return asyncio.ensure_future(answer())

    async def main():
        nodes = {"node-a": CountingIngress({"deployments": {"d": {"queue": 2}, "e": {"queue": 0}}, "held": {"d": 1}}),
                 # an ingress that reports no held requests at all (no "held" key)
                 "node-b": CountingIngress({"deployments": {"d": {"queue": 3}}})}

        async def ensure_ingress(node_id, port, bind_host):
            return nodes[node_id]

        async def node_ids(head_only):
            return list(nodes)

        pub = RoutePublisher(lambda: {"deployments": {}}, ensure_ingress, node_ids, lambda outcome, seconds: None)
        assert await pub.waiting_requests(0.5) == {}  # no ingress pushed to yet: none asked
        pub.changed()
        await pub.push()
        assert await pub.waiting_requests(0.5) == {"d": 6, "e": 0}

        slow = nodes["node-b"]
        slow.stats_answer, slow.delay = {"deployments": {"d": {"queue": 10}}}, 0.3
        assert await pub.waiting_requests(0.05) == {"d": 6, "e": 0}  # its previous answer, for now
        assert await pub.waiting_requests(0.05) == {"d": 6, "e": 0}
        assert slow.calls == 2  # the call in flight is awaited again, not sent twice
        assert await pub.waiting_requests(0.5) == {"d": 13, "e": 0}

    asyncio.run(main())
