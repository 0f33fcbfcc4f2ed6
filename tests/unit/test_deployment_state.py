"""The controller's reconcile loop (``ControllerCore``) against a fake Ray backend: no Ray cluster.

Each test drives ``reconcile_once()`` itself and waits on conditions (``settle``), never on a bare sleep.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from types import SimpleNamespace
from typing import Any

import pytest
import ray.exceptions

from rayfleet_api.desired import ActorOptions, Autoscaling, DesiredState, HealthCheck
from rayfleet_api.metrics_labels import split_deployment
from rayfleet_api.states import DeploymentStatus, ReplicaState
from rayfleet_runtime.routing import RoutingTable
from rayfleet_runtime.controller import deployment_state
from rayfleet_runtime.controller.deployment_state import ControllerCore
from rayfleet_runtime.controller.records import DeploymentRecord
from rayfleet_runtime.controller.placement import NodeView
from rayfleet_runtime.controller.ray_calls import (RayBackend, ReplicaCallError, ReplicaDied, ReplicaTimeout, ReplicaUnavailable,
                                        RuntimeEnvFailed)


class FakeReplica:
    """A replica actor. Its constructor finishes when ``up`` is set; a killed or ``dead`` one answers nothing."""

    def __init__(self, deployment: str, replica_id: str, version: str, port: int, error: dict | None = None,
                 node: str = "node-a"):
        self.deployment, self.id, self.version, self.port, self.error = deployment, replica_id, version, port, error
        self.node = node
        self.up = asyncio.Event()
        self.start_error: ReplicaCallError | None = None  # raised by info() instead of an answer
        self.dead = self.killed = self.draining = False
        self.silent = False  # info() times out
        self.sick: str | None = None  # health() answers unhealthy, with this message
        self.placed = False  # Ray found it a node (FakeBackend._place)
        self.started_at = time.time()
        self.in_flight = self.queued = 0  # its load, as info() tells the autoscaler
        self.answered = self.answered_5xx = 0  # its responses so far, as info() counts them

    def info(self) -> dict[str, Any]:
        return {"deployment": self.deployment, "id": self.id, "version": self.version, "host": "127.0.0.1",
                "port": self.port, "pid": self.port, "nodeId": self.node, "nodeIp": "127.0.0.1",
                "inFlight": self.in_flight, "queued": self.queued,
                "totalRequests": self.answered, "errors": self.answered_5xx, "lastError": None, "draining": self.draining,
                "startedAt": self.started_at, "error": self.error}


class FakeIngress:
    """The one node's ingress: applies a table after a moment and records it (as replica ids per deployment),
    and the requests it waits with per deployment: HAProxy's queue, and those it holds (None: an ingress
    that reports no ``held`` at all)."""

    def __init__(self, events: list[tuple]):
        self.events = events
        self.tables: list[dict[str, Any]] = []
        self.queue: dict[str, int] = {}
        self.held: dict[str, int] | None = None

    def stats(self):
        async def read():
            stats = {"deployments": {name: {"backend": name, "queue": self.queue.get(name, 0), "servers": {}}
                                     for name in (be.deployment for be in self.tables[-1].backends)}} if self.tables else {}
            return stats if self.held is None else {**stats, "held": dict(self.held)}

        return asyncio.ensure_future(read())

    def update(self, table: RoutingTable):
        async def apply():
            await asyncio.sleep(0.02)  # a proxy reload takes a while: a drain must wait for it
            self.tables.append(table)
            self.events.append(("routes", {be.deployment: [s.replica_id for s in be.servers] for be in table.backends}))
            return {"applied": True}

        return asyncio.ensure_future(apply())


class FakeBackend:
    """``ray_calls.RayBackend``'s interface over in-memory replicas, checkpoints and one node; records events."""

    def __init__(self):
        self.events: list[tuple] = []  # ("create" | "drain" | "kill", replica id), ("routes", {dep: [ids]}), ...
        self.replicas: dict[str, FakeReplica] = {}  # every replica ever created or planted, by id
        self.checkpoints: dict[str, bytes] = {}
        self.auto_up = True  # replicas come up as soon as they are created
        self.handler_error: dict | None = None  # the handler of replicas created from now on fails to load
        self.created_at: dict[str, float] = {}
        self.slots: int | None = None  # replicas the cluster has room for (None: any number)
        self.ingress = FakeIngress(self.events)
        self.nodes_up = [NodeView("node-a", {"CPU": 1000.0})]  # what ray.nodes() lists as alive

    def _place(self) -> None:
        """Ray's scheduler: the oldest live replicas get the slots; a placed one comes up (if auto_up)."""
        live = [r for r in self.replicas.values() if not r.killed and not r.dead]
        for rep in live[: len(live) if self.slots is None else self.slots]:
            rep.placed = True
            if self.auto_up:
                rep.up.set()

    def plant(self, deployment: str, replica_id: str, version: str, **attrs: Any) -> FakeReplica:
        """A replica actor that exists already (e.g. before a controller restart)."""
        rep = FakeReplica(deployment, replica_id, version, 10_000 + len(self.replicas))
        rep.up.set()
        for key, value in attrs.items():
            setattr(rep, key, value)
        self.replicas[replica_id] = rep
        return rep

    def created(self) -> list[str]:
        return [rid for kind, rid in self.events if kind == "create"]

    def index(self, event: tuple) -> int:
        return self.events.index(event)

    # ---------- the backend interface ----------
    def create_replica(self, deployment: str, replica_id: str, desired: DesiredState, bind_host: str,
                       node_id: str | None = None) -> FakeReplica:
        rep = FakeReplica(deployment, replica_id, desired.version, 10_000 + len(self.replicas), self.handler_error,
                          node=node_id or self.nodes_up[0].id)
        self.replicas[replica_id] = rep
        self.created_at[replica_id] = time.time()
        self.events.append(("create", replica_id))
        self._place()
        return rep

    def _reachable(self, rep: FakeReplica) -> None:
        if rep.killed or rep.dead:
            raise ReplicaDied("The actor died unexpectedly before finishing this task.", "ActorDiedError")

    async def info(self, rep: FakeReplica, timeout_s: float | None = None) -> dict[str, Any]:
        self._reachable(rep)
        if rep.silent:
            raise ReplicaTimeout("", "TimeoutError")
        await rep.up.wait()
        if rep.start_error is not None:
            raise rep.start_error
        self._reachable(rep)
        return rep.info()

    async def health(self, rep: FakeReplica, check_timeout_s: float, timeout_s: float) -> dict[str, Any]:
        return {"healthy": rep.sick is None, "message": rep.sick, **await self.info(rep, timeout_s)}

    async def drain(self, rep: FakeReplica, grace_s: float, timeout_s: float) -> dict[str, Any]:
        self.events.append(("drain", rep.id))
        self._reachable(rep)
        rep.draining = True
        return rep.info()

    async def watch(self, rep: FakeReplica) -> None:
        while not (rep.killed or rep.dead):  # Ray fails the pending call when the process dies
            await asyncio.sleep(0.01)
        self._reachable(rep)

    def kill(self, rep: FakeReplica) -> None:
        rep.killed = True
        self.events.append(("kill", rep.id))
        self._place()

    async def placed(self, rep: FakeReplica) -> bool:
        return rep.placed

    async def free_resources(self) -> tuple[dict[str, float], dict[str, float]]:
        return {"CPU": 0.0}, {"CPU": float(self.slots or 0)}

    def replica_names(self) -> list[tuple[str, str]]:
        return [(r.deployment, r.id) for r in self.replicas.values() if not r.killed]

    def get_replica(self, deployment: str, replica_id: str) -> FakeReplica | None:
        rep = self.replicas.get(replica_id)
        return None if rep is None or rep.killed else rep

    def checkpoint_names(self) -> list[str]:
        return list(self.checkpoints)

    def read_checkpoint(self, name: str) -> bytes | None:
        return self.checkpoints.get(name)

    def write_checkpoint(self, name: str, data: bytes) -> None:
        self.checkpoints[name] = data

    def delete_checkpoint(self, name: str) -> None:
        self.checkpoints.pop(name, None)
        self.events.append(("forget", name))

    async def nodes(self) -> list[NodeView]:
        return list(self.nodes_up)

    async def node_ids(self, head_only: bool = False) -> list[str]:
        return ["node-a"]

    async def ensure_ingress(self, node_id: str, port: int, bind_host: str) -> FakeIngress:
        return self.ingress


def desired(replicas: int = 1, version: str = "v1", **kw: Any) -> DesiredState:
    return DesiredState(handler="m:h", replicas=replicas, version=version, route_prefix="/d",
                        graceful_shutdown_seconds=5, **kw)


async def settle(core: ControllerCore, check, what: str, timeout: float = 5.0) -> Any:
    """``eventually`` on the controller's own loop: reconcile and let its tasks run until ``check()`` holds."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; "
                                 f"observed: {core.list_deployments()}")
        core.reconcile_once()
        await asyncio.sleep(0.01)
    return value


async def sample(core: ControllerCore, check, what: str, timeout: float = 5.0) -> Any:
    """``settle`` with the autoscaler sampling too (as its own loop does, only faster)."""
    async def step():
        await core.autoscale_once()
        core.reconcile_once()
        await asyncio.sleep(0.01)

    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; "
                                 f"observed: {core.list_deployments()}")
        await step()
    return value


def autoscaled(replicas: int = 1, **scaling: Any) -> DesiredState:
    """A deployment whose count follows load: 2 requests per replica, up to 4 replicas, quick delays."""
    return desired(replicas, autoscaling=Autoscaling(**{"max_replicas": 4, "target_in_flight": 2,
                                                       "upscale_delay_seconds": 0.3,
                                                       "downscale_delay_seconds": 0.3, **scaling}))


def run(test, backend: FakeBackend | None = None) -> None:
    """Run ``test(core, backend)`` on a fresh loop with the routes publisher going (as ``ControllerCore.run``)."""
    async def main():
        fake = backend or FakeBackend()
        core = ControllerCore(fake, drain_settle_s=0.0)
        publisher = asyncio.ensure_future(core.routes.run())
        try:
            await test(core, fake)
        finally:
            publisher.cancel()

    asyncio.run(main())


def states(core: ControllerCore, name: str = "d") -> dict[str, str]:
    obs = core.get_deployment(name)
    return {} if obs is None else {r["id"]: r["state"] for r in obs["replicas"]}


def metric(core: ControllerCore, family: str, name: str = "d", **labels: str) -> float | None:
    """A sample of the controller's metrics for deployment ``name`` (None: no such series)."""
    namespace, deployment = split_deployment(name)
    return core.metrics.registry.get_sample_value(family, {"namespace": namespace, "deployment": deployment, **labels})


def lifecycle_lines(caplog: pytest.LogCaptureFixture, event: str, **fields: str) -> list[str]:
    """The controller's log lines of ``event`` that carry ``fields`` (as ``key=value``)."""
    lines = [r.getMessage() for r in caplog.records if r.name == "rayfleet.controller"]
    return [line for line in lines if line.startswith(f"event={event} ")
            and all(f" {k}={v} " in f"{line} " for k, v in fields.items())]


def test_scale_up_starts_replicas_that_become_ready_once_they_answer():
    async def test(core: ControllerCore, backend: FakeBackend):
        backend.auto_up = False
        core.put_deployment("d", desired(replicas=3))
        core.reconcile_once()
        assert backend.created() == ["d-0", "d-1", "d-2"]
        obs = core.get_deployment("d")
        assert obs["readyReplicas"] == 0 and obs["status"] == DeploymentStatus.UPDATING
        assert set(states(core).values()) == {ReplicaState.STARTING}
        core.reconcile_once()
        assert len(backend.created()) == 3  # starting replicas count toward the target

        for rep in backend.replicas.values():
            rep.up.set()
        await settle(core, lambda: core.get_deployment("d")["readyReplicas"] == 3, "3 ready replicas")
        obs = json.loads(json.dumps(core.get_deployment("d")))  # the observed state as the HTTP API sends it
        assert obs["status"] == "Running" and obs["updatedReplicas"] == 3 and obs["restarts"] == 0
        assert [(r["id"], r["state"], r["host"]) for r in obs["replicas"]] == [
            ("d-0", "READY", "127.0.0.1"), ("d-1", "READY", "127.0.0.1"), ("d-2", "READY", "127.0.0.1")]
        await settle(core, lambda: ("routes", {"d": ["d-0", "d-1", "d-2"]}) in backend.events, "all 3 routed")
        assert json.loads(backend.checkpoints["d"])["nextIndex"] == 3

    run(test)


def test_a_replica_that_died_is_replaced_at_once_not_at_its_next_probe(monkeypatch):
    monkeypatch.setattr(deployment_state, "PROBE_INTERVAL_S", 600.0)

    async def test(core: ControllerCore, backend: FakeBackend):
        core.put_deployment("d", desired(replicas=2, health_check=HealthCheck(period_seconds=600)))
        await settle(core, lambda: core.get_deployment("d")["readyReplicas"] == 2, "2 ready replicas")
        backend.replicas["d-0"].dead = True
        await settle(core, lambda: states(core) == {"d-1": "READY", "d-2": "READY"}, "d-0 replaced by d-2",
                     timeout=2.0)

    run(test)


def test_a_replica_that_died_is_replaced_and_its_restart_counted(monkeypatch):
    monkeypatch.setattr(deployment_state, "PROBE_INTERVAL_S", 0.0)  # probe on every reconcile

    async def test(core: ControllerCore, backend: FakeBackend):
        core.put_deployment("d", desired(replicas=2, health_check=HealthCheck(period_seconds=0.05)))
        await settle(core, lambda: core.get_deployment("d")["readyReplicas"] == 2, "2 ready replicas")
        backend.replicas["d-0"].dead = True
        await settle(core, lambda: states(core) == {"d-1": "READY", "d-2": "READY"}, "d-0 replaced by d-2")
        obs = core.get_deployment("d")
        assert obs["restarts"] == 1 and obs["status"] == DeploymentStatus.RUNNING
        assert {r["id"]: r["restarts"] for r in obs["replicas"]} == {"d-1": 0, "d-2": 1}
        assert ("kill", "d-0") in backend.events
        assert json.loads(backend.checkpoints["d"])["restarts"] == 1  # survives a controller restart

    run(test)


def test_a_handler_that_fails_to_load_is_reported_and_retried_with_backoff(caplog):
    caplog.set_level(logging.INFO, "rayfleet.controller")
    error = {"reason": "HandlerImportError", "message": "No module named 'm'", "traceback": "Traceback ..."}

    async def test(core: ControllerCore, backend: FakeBackend):
        backend.handler_error = error
        core.put_deployment("d", desired())
        await settle(core, lambda: core.get_deployment("d")["error"], "the load error reported")
        obs = core.get_deployment("d")
        assert obs["status"] == DeploymentStatus.FAILED and obs["error"] == error
        assert obs["replicas"][0]["state"] == ReplicaState.FAILED
        assert obs["replicas"][0]["lastError"] == "HandlerImportError: No module named 'm'"
        assert ("kill", "d-0") in backend.events

        retry_at = core.deployments["d"].next_start_at
        for _ in range(20):  # no hot loop: nothing starts again before the back-off is over
            core.reconcile_once()
            await asyncio.sleep(0)
        assert time.time() < retry_at and backend.created() == ["d-0"]
        await settle(core, lambda: len(backend.created()) == 2, "a retry after the back-off")
        assert backend.created_at["d-1"] >= retry_at
        await settle(core, lambda: core.deployments["d"].start_failures == 2, "the retry failed too")
        assert core.deployments["d"].next_start_at - time.time() > 1.0  # the back-off doubled
        assert metric(core, "rayfleet_controller_replica_restarts_total", reason="start_failed") == 1
        assert [len(lifecycle_lines(caplog, "replica_failed", replica=rid)) for rid in ("d-0", "d-1")] == [1, 1]
        assert lifecycle_lines(caplog, "replica_failed", replica="d-0") == [
            "event=replica_failed deployment=d replica=d-0 version=v1 reason=HandlerImportError "
            'message="No module named \'m\'"']

        backend.handler_error = None  # fixed code, new version: retried at once, the error clears
        core.put_deployment("d", desired(version="v2"))
        await settle(core, lambda: core.get_deployment("d")["status"] == DeploymentStatus.RUNNING, "v2 running")
        assert core.get_deployment("d")["error"] is None

    run(test)


def test_a_runtime_env_that_fails_is_reported_by_its_reason():
    async def test(core: ControllerCore, backend: FakeBackend):
        backend.auto_up = False
        core.put_deployment("d", desired())
        core.reconcile_once()
        rep = backend.replicas["d-0"]
        rep.start_error = RuntimeEnvFailed("pip install failed", "RuntimeEnvSetupError")
        rep.up.set()
        error = await settle(core, lambda: core.get_deployment("d")["error"], "the start error reported")
        assert error == {"reason": "RuntimeEnvSetupError", "message": "RuntimeEnvSetupError: pip install failed",
                         "traceback": ""}

    run(test)


def test_scale_down_drains_a_replica_only_after_the_proxies_dropped_it():
    async def test(core: ControllerCore, backend: FakeBackend):
        core.put_deployment("d", desired(replicas=3))
        await settle(core, lambda: ("routes", {"d": ["d-0", "d-1", "d-2"]}) in backend.events, "3 routed")
        core.put_deployment("d", desired(replicas=1))
        await settle(core, lambda: states(core) == {"d-0": "READY"}, "scaled down to d-0")
        unrouted = backend.index(("routes", {"d": ["d-0"]}))
        for rid in ("d-1", "d-2"):  # the newest go; gracefully: unrouted, then drained, then killed
            assert unrouted < backend.index(("drain", rid)) < backend.index(("kill", rid))
        assert not backend.replicas["d-0"].killed and ("drain", "d-0") not in backend.events

    run(test)


def test_a_rollout_without_room_for_a_surge_replaces_in_place_and_says_why(monkeypatch):
    monkeypatch.setattr(deployment_state, "PLACEMENT_GRACE_S", 0.0)
    monkeypatch.setattr(deployment_state, "PROBE_INTERVAL_S", 0.0)

    async def test(core: ControllerCore, backend: FakeBackend):
        backend.slots = 2  # room for exactly the two replicas: a surge replica can't be placed
        core.put_deployment("d", desired(replicas=2))
        await settle(core, lambda: core.get_deployment("d")["readyReplicas"] == 2, "2 ready replicas")
        lowest_ready, seen_note = [2], []

        def rolled() -> bool:
            obs = core.get_deployment("d")
            lowest_ready[0] = min(lowest_ready[0], obs["readyReplicas"])
            seen_note.extend(r["unschedulable"] for r in obs["replicas"] if r["unschedulable"])
            return obs["status"] == DeploymentStatus.RUNNING and obs["version"] == "v2" and len(obs["replicas"]) == 2

        core.put_deployment("d", desired(replicas=2, version="v2"))
        await settle(core, rolled, "the rollout to v2 to finish")
        assert sorted(states(core).values()) == [ReplicaState.READY, ReplicaState.READY]
        assert lowest_ready[0] == 1  # in place, one at a time: never fewer than target - 1 serving
        assert seen_note and seen_note[0].startswith("waiting for resources: needs CPU 1 (0 of 2 free) on one node; "
                                                     "held by d 2 replica(s), CPU 2;"), seen_note[:1]
        # Each old replica left the routes and drained before it was killed to make room.
        for old in ("d-0", "d-1"):
            assert backend.index(("drain", old)) < backend.index(("kill", old))

    run(test)


def test_a_replica_no_node_can_hold_says_so_and_costs_at_most_one_ready_replica(monkeypatch, caplog):
    caplog.set_level(logging.INFO, "rayfleet.controller")
    monkeypatch.setattr(deployment_state, "PLACEMENT_GRACE_S", 0.0)
    monkeypatch.setattr(deployment_state, "PROBE_INTERVAL_S", 0.0)

    async def test(core: ControllerCore, backend: FakeBackend):
        core.put_deployment("d", desired(replicas=2))
        await settle(core, lambda: core.get_deployment("d")["readyReplicas"] == 2, "2 ready replicas")
        backend.slots = 1  # e.g. the new version asks for more than any node has: nothing new fits
        for rep in backend.replicas.values():
            rep.placed = rep.id == "d-0"
        core.put_deployment("d", desired(replicas=2, version="v2"))
        await settle(core, lambda: any(r["unschedulable"] for r in core.get_deployment("d")["replicas"]),
                     "the new replica reported unschedulable")
        for _ in range(50):  # the controller keeps reconciling; it must not drain the rest
            core.reconcile_once()
            await asyncio.sleep(0.01)
        obs = core.get_deployment("d")
        assert obs["readyReplicas"] == 1 and obs["status"] == DeploymentStatus.UPDATING
        waiting = [r["id"] for r in obs["replicas"] if r["unschedulable"]]
        assert waiting and metric(core, "rayfleet_controller_scheduling_waits_total") == len(waiting)
        for rid in waiting:  # checked every PROBE_INTERVAL_S, logged once
            assert len(lifecycle_lines(caplog, "replica_unschedulable", replica=rid)) == 1

    run(test)


def test_delete_drains_every_replica_then_forgets_the_deployment():
    async def test(core: ControllerCore, backend: FakeBackend):
        core.put_deployment("d", desired(replicas=2))
        await settle(core, lambda: ("routes", {"d": ["d-0", "d-1"]}) in backend.events, "2 routed")
        assert core.delete_deployment("d")
        obs = core.get_deployment("d")
        assert obs["status"] == DeploymentStatus.DELETING and obs["targetReplicas"] == 0
        assert json.loads(backend.checkpoints["d"])["deleting"] is True  # a restarted controller goes on deleting
        await settle(core, lambda: core.get_deployment("d") is None, "d forgotten")
        assert "d" not in backend.checkpoints and core.routing_table().backends == ()
        unrouted = backend.index(("routes", {}))
        for rid in ("d-0", "d-1"):
            assert unrouted < backend.index(("drain", rid)) < backend.index(("kill", rid)) < backend.index(("forget", "d"))
        assert not core.delete_deployment("d")

    run(test)


def test_recover_adopts_live_replicas_from_the_checkpoints():
    backend = FakeBackend()
    record = DeploymentRecord("d", desired(replicas=2), restarts=4, next_index=2)
    backend.checkpoints["d"] = record.checkpoint()
    backend.checkpoints["broken"] = b"{not json"
    backend.plant("d", "d-0", "v1")
    backend.plant("d", "d-3", "v1", draining=True)  # a scale-down was under way
    backend.plant("d", "d-5", "v1", silent=True)  # alive but slow to answer
    backend.plant("gone", "gone-0", "v1")  # its deployment was deleted
    backend.plant("broken", "broken-0", "v1")  # unreadable checkpoint: left alone

    async def test(core: ControllerCore, backend: FakeBackend):
        await core.recover()
        dep = core.deployments["d"]
        assert set(core.deployments) == {"d"} and dep.restarts == 4
        assert {rid: r.state for rid, r in dep.replicas.items()} == {
            "d-0": ReplicaState.READY, "d-3": ReplicaState.DRAINING, "d-5": ReplicaState.UNHEALTHY}
        assert dep.next_index == 6  # new replica names never clash with adopted ones
        killed = {rid for kind, rid in backend.events if kind == "kill"}
        assert killed == {"gone-0"}  # the slow one is adopted (unrouted), not killed
        backend.replicas["d-5"].silent = False
        await settle(core, lambda: states(core) == {"d-0": "READY", "d-5": "READY"}, "d back to 2 ready")
        assert backend.created() == [] and ("drain", "d-3") in backend.events
        assert core.get_deployment("d")["restarts"] == 4
        assert not backend.replicas["broken-0"].killed and "broken" in backend.checkpoints

    run(test, backend)


@pytest.mark.parametrize("ray_error, ours", [
    (lambda: ray.exceptions.ActorDiedError(), ReplicaDied),
    (lambda: ray.exceptions.ActorUnavailableError("node unreachable", None), ReplicaUnavailable),
    (lambda: ray.exceptions.RuntimeEnvSetupError("pip install failed"), RuntimeEnvFailed),
    (lambda: ray.exceptions.GetTimeoutError("slow"), ReplicaTimeout),
    (lambda: asyncio.TimeoutError(), ReplicaTimeout),
    (lambda: ValueError("the method raised"), ReplicaCallError),
])
def test_the_ray_backend_translates_rays_errors_into_ours(ray_error, ours):
    """What the fake above raises is what ``RayBackend`` raises for Ray's errors."""
    raised = ray_error()

    async def call():
        raise raised

    async def main():
        with pytest.raises(ours) as caught:
            await RayBackend().info(SimpleNamespace(info=SimpleNamespace(remote=call)), 1.0)
        return caught.value

    ours = asyncio.run(main())
    assert ours.ray_error == type(raised).__name__ and str(ours) == str(raised) and ours.__cause__ is raised


def test_a_replica_leaving_the_routes_outlives_the_proxies_keepalive_whatever_its_grace():
    """Old HAProxy workers route idle keep-alive connections by the old table for a while: a replica
    with a short gracefulShutdownSeconds is drained only after that settle, and with 0 it stops at once."""
    async def test(core: ControllerCore, backend: FakeBackend):
        core.actions.drain_settle_s = 0.5
        core.put_deployment("d", dataclasses.replace(desired(replicas=2), graceful_shutdown_seconds=0.1))
        await settle(core, lambda: core.get_deployment("d")["readyReplicas"] == 2, "2 ready replicas")
        core.put_deployment("d", dataclasses.replace(desired(replicas=1), graceful_shutdown_seconds=0.1))
        await settle(core, lambda: ("routes", {"d": ["d-0"]}) in backend.events, "d-1 unrouted")
        unrouted = time.monotonic()
        await settle(core, lambda: ("drain", "d-1") in backend.events, "d-1 drained")
        assert time.monotonic() - unrouted >= 0.4
        core.put_deployment("d", dataclasses.replace(desired(replicas=0), graceful_shutdown_seconds=0))
        await settle(core, lambda: ("kill", "d-0") in backend.events, "d-0 stopped", timeout=0.4)
        assert ("drain", "d-0") not in backend.events

    run(test)


def test_metrics_count_replicas_by_state_restarts_and_rollouts_and_go_with_the_deployment(caplog):
    caplog.set_level(logging.INFO, "rayfleet.controller")
    replicas = "rayfleet_controller_replicas"

    async def test(core: ControllerCore, backend: FakeBackend):
        backend.auto_up = False
        core.put_deployment("team.d", desired(replicas=2))
        core.reconcile_once()
        assert metric(core, replicas, "team.d", state="STARTING") == 2  # labelled by the operator's namespace
        assert metric(core, replicas, "team.d", state="READY") == 0
        backend.auto_up = True
        for rep in backend.replicas.values():
            rep.up.set()
        await settle(core, lambda: metric(core, replicas, "team.d", state="READY") == 2, "2 ready replicas")

        backend.replicas["team.d-0"].dead = True
        await settle(core, lambda: states(core, "team.d") == {"team.d-1": "READY", "team.d-2": "READY"},
                     "team.d-0 replaced")
        assert metric(core, "rayfleet_controller_replica_restarts_total", "team.d", reason="died") == 1
        assert len(lifecycle_lines(caplog, "replica_failed", replica="team.d-0", reason="died")) == 1
        assert len(lifecycle_lines(caplog, "replica_replaced", replica="team.d-0", replacement="team.d-2",
                                   reason="died")) == 1

        core.put_deployment("team.d", desired(replicas=2, version="v2"))
        core.put_deployment("team.d", desired(replicas=2, version="v2"))  # the operator's resync: not a rollout
        await settle(core, lambda: core.get_deployment("team.d")["status"] == DeploymentStatus.RUNNING
                     and states(core, "team.d") == {"team.d-3": "READY", "team.d-4": "READY"}, "v2 rolled out")
        for _ in range(10):
            core.reconcile_once()
        assert metric(core, "rayfleet_controller_rollouts_total", "team.d") == 1
        assert len(lifecycle_lines(caplog, "rollout_started", deployment="team.d", version="v2", previous="v1")) == 1
        assert len(lifecycle_lines(caplog, "rollout_finished", deployment="team.d", version="v2")) == 1
        assert metric(core, replicas, "team.d", state="READY") == 2

        core.delete_deployment("team.d")
        await settle(core, lambda: core.get_deployment("team.d") is None, "team.d forgotten")
        rendered = [s for m in core.metrics.collect() for s in m.samples if s.labels.get("deployment") == "d"]
        assert rendered == []  # every series of a deleted deployment goes with it

    run(test)


def test_each_replica_transition_logs_one_line_however_many_reconciles_see_it(caplog, monkeypatch):
    monkeypatch.setattr(deployment_state, "PROBE_INTERVAL_S", 0.0)  # probe on every reconcile
    caplog.set_level(logging.INFO, "rayfleet.controller")

    async def test(core: ControllerCore, backend: FakeBackend):
        core.put_deployment("d", desired(replicas=1, health_check=HealthCheck(period_seconds=0.05,
                                                                              failure_threshold=3)))
        await settle(core, lambda: states(core) == {"d-0": "READY"}, "d-0 ready")
        for _ in range(20):
            core.reconcile_once()
            await asyncio.sleep(0.01)
        assert lifecycle_lines(caplog, "replica_started", replica="d-0") == [
            "event=replica_started deployment=d replica=d-0 version=v1 restarts=0"]
        port = backend.replicas["d-0"].port  # the fake's pid too
        assert lifecycle_lines(caplog, "replica_ready", replica="d-0") == [
            f"event=replica_ready deployment=d replica=d-0 version=v1 node=127.0.0.1 port={port} pid={port}"]

        backend.replicas["d-0"].sick = "database unreachable"
        await settle(core, lambda: states(core) == {"d-1": "READY"}, "the unhealthy d-0 replaced by d-1")
        assert lifecycle_lines(caplog, "replica_unhealthy", replica="d-0") == [
            'event=replica_unhealthy deployment=d replica=d-0 version=v1 message="database unreachable"']
        assert metric(core, "rayfleet_controller_health_check_failures_total") == 3  # failureThreshold
        assert metric(core, "rayfleet_controller_replica_restarts_total", reason="unhealthy") == 1
        replaced = lifecycle_lines(caplog, "replica_replaced", replica="d-0")
        assert replaced == ["event=replica_replaced deployment=d replica=d-0 replacement=d-1 reason=unhealthy"]
        assert [r.levelno for r in caplog.records if r.getMessage() in replaced] == [logging.WARNING]
        assert len(lifecycle_lines(caplog, "replica_stopped", replica="d-0", reason="unhealthy")) == 1

        core.put_deployment("d", desired(replicas=0))
        await settle(core, lambda: states(core) == {}, "d-1 stopped")
        assert lifecycle_lines(caplog, "replica_draining", replica="d-1") == [
            "event=replica_draining deployment=d replica=d-1 version=v1 reason=scale-down grace_s=5"]
        assert lifecycle_lines(caplog, "replica_stopped", replica="d-1") == [
            "event=replica_stopped deployment=d replica=d-1 version=v1 reason=scale-down drained=True"]

    run(test)


def test_load_above_the_target_adds_replicas_once_it_held_for_the_upscale_delay(caplog):
    caplog.set_level(logging.INFO, "rayfleet.controller")

    async def test(core: ControllerCore, backend: FakeBackend):
        core.put_deployment("d", autoscaled(replicas=1))
        await settle(core, lambda: ("routes", {"d": ["d-0"]}) in backend.events, "d-0 routed")
        backend.replicas["d-0"].in_flight, backend.ingress.queue = 3, {"d": 2}  # load 5: 3 replicas at 2 each
        loaded = time.monotonic()
        await sample(core, lambda: core.get_deployment("d")["desiredReplicas"] == 3, "scaled to 3")
        assert time.monotonic() - loaded >= 0.3  # not before the load held that long
        await settle(core, lambda: core.get_deployment("d")["readyReplicas"] == 3, "3 ready replicas")

        obs = json.loads(json.dumps(core.get_deployment("d")))  # as the HTTP API sends it
        assert obs["targetReplicas"] == 3 and obs["status"] == DeploymentStatus.RUNNING
        scaling = obs["autoscaling"]
        assert scaling["load"] == 5 and scaling["lastScaleTime"] <= time.time()
        assert scaling["lastScaleReason"] == "load 5 over 1 replica (target 2 each); at least 5 for 0.3s -> 3 replicas"
        assert lifecycle_lines(caplog, "scaled") == [
            'event=scaled deployment=d replicas_from=1 replicas_to=3 '
            'reason="load 5 over 1 replica (target 2 each); at least 5 for 0.3s -> 3 replicas"']
        assert metric(core, "rayfleet_controller_autoscaler_decisions_total", direction="up") == 1
        assert metric(core, "rayfleet_controller_desired_replicas") == 3
        assert metric(core, "rayfleet_controller_observed_load") == 5
        assert json.loads(backend.checkpoints["d"])["autoscaler"]["replicas"] == 3

    run(test)


def test_no_load_removes_replicas_after_the_downscale_delay_and_the_autoscaler_keeps_its_count():
    async def test(core: ControllerCore, backend: FakeBackend):
        core.put_deployment("d", autoscaled(replicas=3))
        await settle(core, lambda: core.get_deployment("d")["readyReplicas"] == 3, "3 ready replicas")
        idle = time.monotonic()
        await sample(core, lambda: states(core) == {"d-0": "READY"}, "scaled down to d-0")
        assert time.monotonic() - idle >= 0.3
        assert core.get_deployment("d")["autoscaling"]["lastScaleReason"] == (
            "load 0 over 3 replicas (target 2 each); at most 0 for 0.3s -> 1 replica")
        assert metric(core, "rayfleet_controller_autoscaler_decisions_total", direction="down") == 1
        for rid in ("d-1", "d-2"):  # drained like any scale-down
            assert backend.index(("drain", rid)) < backend.index(("kill", rid))

        core.put_deployment("d", autoscaled(replicas=3))  # the operator's resync, or kubectl scale: not the count
        for _ in range(5):
            await core.autoscale_once()
            core.reconcile_once()
        assert core.get_deployment("d")["desiredReplicas"] == 1 and len(backend.created()) == 3
        core.put_deployment("d", autoscaled(replicas=3, min_replicas=2))  # a new range: inside it at once
        assert core.get_deployment("d")["desiredReplicas"] == 2
        await sample(core, lambda: states(core) == {"d-0": "READY", "d-3": "READY"}, "2 replicas, the minimum")
        core.put_deployment("d", desired(replicas=3))  # autoscaling off: spec.replicas is the count again
        obs = await settle(core, lambda: core.get_deployment("d")["readyReplicas"] == 3 and core.get_deployment("d"),
                           "3 ready replicas")
        assert obs["desiredReplicas"] == 3 and "autoscaling" not in obs

    run(test)


def test_min_zero_stops_the_last_replica_and_routes_the_deployment_for_scale_from_zero():
    async def test(core: ControllerCore, backend: FakeBackend):
        core.put_deployment("d", autoscaled(replicas=1, min_replicas=0))
        await settle(core, lambda: core.get_deployment("d")["readyReplicas"] == 1, "1 ready replica")
        await sample(core, lambda: states(core) == {}, "no replica left")
        obs = core.get_deployment("d")
        assert (obs["desiredReplicas"], obs["status"]) == (0, DeploymentStatus.RUNNING)
        assert obs["autoscaling"]["lastScaleReason"] == "no load for 0.3s -> 0 replicas"
        route = core.routing_table().backend("d")
        assert route.scale_from_zero is True and route.servers == ()
        core.put_deployment("d", autoscaled(replicas=1, min_replicas=1))
        assert core.routing_table().backend("d").scale_from_zero is False

    run(test)


def test_requests_held_at_zero_replicas_start_them_at_once_whatever_the_upscale_delay():
    async def test(core: ControllerCore, backend: FakeBackend):
        core.put_deployment("d", autoscaled(replicas=0, min_replicas=0, upscale_delay_seconds=60))
        await sample(core, lambda: core.get_deployment("d")["autoscaling"]["load"] == 0, "a first sample")
        assert backend.created() == []
        backend.ingress.held = {"d": 3}  # the ingress holds 3 requests for d
        await sample(core, lambda: len(backend.created()) == 2, "2 replicas started", timeout=1.0)
        assert core.get_deployment("d")["autoscaling"]["lastScaleReason"] == (
            "3 requests held at 0 replicas -> 2 replicas at once")
        backend.ingress.held = {}
        await settle(core, lambda: core.get_deployment("d")["readyReplicas"] == 2, "2 ready replicas")

    run(test)


def test_a_restarted_controller_resumes_the_autoscalers_count_from_the_checkpoint():
    backend = FakeBackend()

    async def test(core: ControllerCore, backend: FakeBackend):
        core.put_deployment("d", autoscaled(replicas=1, upscale_delay_seconds=0))
        await settle(core, lambda: core.get_deployment("d")["readyReplicas"] == 1, "1 ready replica")
        backend.replicas["d-0"].in_flight = 6
        await sample(core, lambda: core.get_deployment("d")["readyReplicas"] == 3, "scaled up to 3")
        reason = core.get_deployment("d")["autoscaling"]["lastScaleReason"]

        restarted = ControllerCore(backend, drain_settle_s=0.0)  # the same cluster, a new controller
        await restarted.recover()
        backend.replicas["d-0"].in_flight = 5  # still load for 3, so the window starting over changes nothing
        for _ in range(5):
            await restarted.autoscale_once()
            restarted.reconcile_once()
            await asyncio.sleep(0.01)
        obs = restarted.get_deployment("d")
        assert (obs["desiredReplicas"], obs["readyReplicas"]) == (3, 3)
        assert obs["autoscaling"]["lastScaleReason"] == reason
        assert backend.created() == ["d-0", "d-1", "d-2"]  # nothing started or stopped again

    run(test, backend)


def test_without_a_checkpointed_count_a_restarted_controller_starts_from_the_replicas_it_adopts():
    backend = FakeBackend()
    backend.checkpoints["d"] = DeploymentRecord("d", autoscaled(replicas=1, min_replicas=1)).checkpoint()
    backend.checkpoints["e"] = DeploymentRecord("e", dataclasses.replace(
        autoscaled(replicas=1, min_replicas=3), route_prefix="/e")).checkpoint()
    for rid in ("d-0", "d-1"):
        backend.plant("d", rid, "v1")

    async def test(core: ControllerCore, backend: FakeBackend):
        await core.recover()
        assert core.get_deployment("d")["desiredReplicas"] == 2  # what runs, not spec.replicas
        assert core.get_deployment("e")["desiredReplicas"] == 3  # within minReplicas..maxReplicas

    run(test, backend)


def two_nodes(backend: FakeBackend, cpu: float = 1.0, *more: str) -> None:
    backend.nodes_up = [NodeView(node, {"CPU": cpu}) for node in ("node-a", "node-b", *more)]


def placed_on(backend: FakeBackend, core: ControllerCore) -> dict[str, str]:
    return {r["id"]: backend.replicas[r["id"]].node for r in core.get_deployment("d")["replicas"]
            if r["state"] != ReplicaState.STOPPED}


def half_cpu(replicas: int = 2) -> DesiredState:
    return desired(replicas, ray_actor_options=ActorOptions(num_cpus=0.5))


def test_replicas_are_spread_over_the_nodes_not_packed_on_one():
    async def test(core: ControllerCore, backend: FakeBackend):
        two_nodes(backend)
        await core._refresh_nodes()
        core.put_deployment("d", half_cpu(2))  # both would fit node-a
        await settle(core, lambda: core.get_deployment("d")["readyReplicas"] == 2, "2 ready replicas")
        assert sorted(placed_on(backend, core).values()) == ["node-a", "node-b"]

    run(test)


def test_a_draining_node_gives_its_replica_away_before_it_stops_serving():
    async def test(core: ControllerCore, backend: FakeBackend):
        two_nodes(backend)
        await core._refresh_nodes()
        core.put_deployment("d", half_cpu(2))
        await settle(core, lambda: core.get_deployment("d")["readyReplicas"] == 2, "2 ready replicas")
        leaving = next(rid for rid, node in placed_on(backend, core).items() if node == "node-a")
        assert core.drain_node("node-a", 60) == 1
        await settle(core, lambda: core.drain_node("node-a", 60) == 0, "node-a drained")
        assert set(placed_on(backend, core).values()) == {"node-b"}
        # the replacement was up and routed before the leaving replica was drained; routes never ran dry
        assert backend.index(("create", "d-2")) < backend.index(("drain", leaving))
        routed = [ids for kind, ids in backend.events if kind == "routes" and "d" in ids]
        assert all(ids["d"] for ids in routed[1:]), routed
        assert core.get_deployment("d")["restarts"] == 0  # a move is not a failure
        assert metric(core, "rayfleet_controller_replica_moves_total", reason="node-drain") == 1
        assert metric(core, "rayfleet_controller_replica_restarts_total", reason="died") is None

    run(test)


def test_with_no_room_elsewhere_the_move_waits_for_a_new_node_and_the_replica_keeps_serving():
    async def test(core: ControllerCore, backend: FakeBackend):
        two_nodes(backend, 0.5)  # one replica per node: no room for a replacement
        await core._refresh_nodes()
        core.put_deployment("d", half_cpu(2))
        await settle(core, lambda: core.get_deployment("d")["readyReplicas"] == 2, "2 ready replicas")
        core.drain_node("node-a", 60)
        for _ in range(20):
            core.reconcile_once()
            await asyncio.sleep(0.01)
        assert len(backend.created()) == 2 and core.get_deployment("d")["readyReplicas"] == 2  # nowhere to go yet
        backend.nodes_up.append(NodeView("node-c", {"CPU": 0.5}))  # the pod that replaces the terminating one
        await core._refresh_nodes()
        await settle(core, lambda: core.drain_node("node-a", 60) == 0, "node-a drained")
        assert sorted(placed_on(backend, core).values()) == ["node-b", "node-c"]

    run(test)


def test_a_deployment_crowded_on_one_node_is_spread_again_when_another_can_take_a_replica():
    async def test(core: ControllerCore, backend: FakeBackend):
        backend.nodes_up = [NodeView("node-b", {"CPU": 1.0})]
        await core._refresh_nodes()
        core.put_deployment("d", half_cpu(2))
        await settle(core, lambda: core.get_deployment("d")["readyReplicas"] == 2, "2 ready replicas")
        assert set(placed_on(backend, core).values()) == {"node-b"}
        backend.nodes_up.append(NodeView("node-c", {"CPU": 1.0}))
        await core._refresh_nodes()
        await settle(core, lambda: sorted(placed_on(backend, core).values()) == ["node-b", "node-c"]
                     and core.get_deployment("d")["readyReplicas"] == 2, "spread over node-b and node-c")
        assert backend.index(("create", "d-2")) < backend.index(("drain", "d-1"))  # surge first: the newest moved
        assert metric(core, "rayfleet_controller_replica_moves_total", reason="rebalance") == 1
        for _ in range(20):  # and it stays put
            core.reconcile_once()
            await asyncio.sleep(0.01)
        assert len(backend.created()) == 3

    run(test)


def test_a_replica_its_own_nodes_ingress_finds_down_is_marked_down_in_the_table_every_ingress_gets():
    async def test(core: ControllerCore, backend: FakeBackend):
        core.put_deployment("d", desired(2))
        await settle(core, lambda: core.get_deployment("d")["readyReplicas"] == 2, "2 ready replicas")
        assert core.routing_table().shared_health  # every node runs an ingress, which checks its own replicas
        version = core.routes._version
        core.replicas_down("n1", ["d-1"])
        assert core.routes._version == version + 1  # pushed at once
        assert {s.replica_id: s.up for s in core.routing_table().backend("d").servers} == {"d-0": True, "d-1": False}
        core.replicas_down("n1", ["d-1"])  # the same finding again (as every RESEND_S): no new table
        assert core.routes._version == version + 1
        core.replicas_down("n1", [])
        assert all(s.up for s in core.routing_table().backend("d").servers)

    run(test)
