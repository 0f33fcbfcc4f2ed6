"""The controller's reconcile loop (``ControllerCore``) against a fake Ray backend: no Ray cluster.

Each test drives ``reconcile_once()`` itself and waits on conditions (``settle``), never on a bare sleep.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from types import SimpleNamespace
from typing import Any

import pytest
import ray.exceptions

from rayfleet_api.desired import DesiredState, HealthCheck
from rayfleet_api.states import DeploymentStatus, ReplicaState
from rayfleet_runtime import deployment_state
from rayfleet_runtime.deployment_state import ControllerCore, DeploymentRecord
from rayfleet_runtime.ray_calls import (RayBackend, ReplicaCallError, ReplicaDied, ReplicaTimeout, ReplicaUnavailable,
                                        RuntimeEnvFailed)


class FakeReplica:
    """A replica actor. Its constructor finishes when ``up`` is set; a killed or ``dead`` one answers nothing."""

    def __init__(self, deployment: str, replica_id: str, version: str, port: int, error: dict | None = None):
        self.deployment, self.id, self.version, self.port, self.error = deployment, replica_id, version, port, error
        self.up = asyncio.Event()
        self.start_error: ReplicaCallError | None = None  # raised by info() instead of an answer
        self.dead = self.killed = self.draining = False
        self.silent = False  # info() times out
        self.placed = False  # Ray found it a node (FakeBackend._place)
        self.started_at = time.time()

    def info(self) -> dict[str, Any]:
        return {"deployment": self.deployment, "id": self.id, "version": self.version, "host": "127.0.0.1",
                "port": self.port, "pid": self.port, "nodeId": "node-a", "nodeIp": "127.0.0.1", "inFlight": 0,
                "totalRequests": 0, "errors": 0, "lastError": None, "draining": self.draining,
                "startedAt": self.started_at, "error": self.error}


class FakeIngress:
    """The one node's ingress: applies a table after a moment and records it (as replica ids per deployment)."""

    def __init__(self, events: list[tuple]):
        self.events = events

    def update(self, table: dict[str, Any]):
        async def apply():
            await asyncio.sleep(0.02)  # a proxy reload takes a while: a drain must wait for it
            self.events.append(("routes", {name: [r["id"] for r in d["replicas"]]
                                           for name, d in table["deployments"].items()}))
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
        self._ingress = FakeIngress(self.events)

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
    def create_replica(self, deployment: str, replica_id: str, desired: DesiredState, bind_host: str) -> FakeReplica:
        rep = FakeReplica(deployment, replica_id, desired.version, 10_000 + len(self.replicas), self.handler_error)
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
        return {"healthy": True, "message": None, **await self.info(rep, timeout_s)}

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

    async def node_ids(self, head_only: bool = False) -> list[str]:
        return ["node-a"]

    async def ensure_ingress(self, node_id: str, port: int, bind_host: str) -> FakeIngress:
        return self._ingress


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


def test_a_handler_that_fails_to_load_is_reported_and_retried_with_backoff():
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


def test_a_replica_no_node_can_hold_says_so_and_costs_at_most_one_ready_replica(monkeypatch):
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
        assert "d" not in backend.checkpoints and core.routing_table() == {"deployments": {}}
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
        core.drain_settle_s = 0.5
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
