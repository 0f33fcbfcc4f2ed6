"""What the controller knows of each deployment and replica (``DeploymentRecord``, ``ReplicaRecord``), and
what one replica needs of a node: the records ``deployment_state.ControllerCore`` keeps and checkpoints."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from rayfleet_api.desired import DesiredState
from rayfleet_api.states import DeploymentStatus, ReplicaState
from rayfleet_runtime.controller import planning
from rayfleet_runtime.controller.autoscaler import Autoscaler
from rayfleet_runtime.controller.planning import ReplicaView
from rayfleet_runtime.controller.rollouts import PROGRESSING, Progress, Revisions

SLOW_START_S = 60.0  # a replica still starting after this says so in its lastError
SERVING = (ReplicaState.READY, ReplicaState.UNHEALTHY)  # started and not being stopped: these are probed


@dataclass
class ReplicaRecord:
    id: str
    version: str
    actor: Any  # the backend's handle; None until created
    state: ReplicaState = ReplicaState.STARTING
    restarts: int = 0
    health_failures: int = 0
    created_at: float = field(default_factory=time.time)
    info: dict[str, Any] = field(default_factory=dict)
    last_error: str | None = None
    next_probe_at: float = 0.0
    next_health_at: float = 0.0
    task: asyncio.Task | None = None  # start / probe / stop in progress
    unschedulable: str | None = None  # STARTING and not placed by Ray: what it needs, what is free
    next_placement_at: float = 0.0
    placement_task: asyncio.Task | None = None
    watch_task: asyncio.Task | None = None  # learns of the process's death the moment Ray does
    failure: str | None = None  # why FAILED/UNHEALTHY (died | start_failed | unhealthy): a replacement's reason
    load_task: asyncio.Task | None = None  # the autoscaler's info() call in flight
    sent_to: str | None = None  # the node the controller placed it on (until it tells its own)

    @property
    def node(self) -> str | None:
        return self.info.get("nodeId") or self.sent_to

    def view(self, evict: str | None = None) -> ReplicaView:
        return ReplicaView(self.id, self.version, self.state, self.health_failures, self.restarts, self.created_at,
                           unplaced=self.unschedulable is not None, node=self.node, evict=evict)

    def observed(self, now: float | None = None) -> dict[str, Any]:
        i = self.info
        return {"id": self.id, "state": self.state, "version": self.version, "pid": i.get("pid"),
                "nodeId": i.get("nodeId"), "nodeIp": i.get("nodeIp"), "host": i.get("host"), "port": i.get("port"),
                "inFlight": i.get("inFlight", 0), "totalRequests": i.get("totalRequests", 0),
                "errors": i.get("errors", 0), "restarts": self.restarts, "unschedulable": self.unschedulable,
                "lastError": self.last_error or i.get("lastError") or self.unschedulable
                or self._slow_start(now or time.time())}

    def _slow_start(self, now: float) -> str | None:
        """A start that takes long is not an error yet, but users should see why nothing is ready:
        Ray may have no node with the resources asked for, or the handler's constructor is slow or stuck."""
        waited = now - self.created_at
        if self.state != ReplicaState.STARTING or waited < SLOW_START_S:
            return None
        return (f"still starting after {waited:.0f} s: waiting for a Ray node with the resources in "
                "rayActorOptions, or for the handler's constructor")


@dataclass
class DeploymentRecord:
    name: str
    desired: DesiredState  # as the spec says now
    deleting: bool = False
    restarts: int = 0
    next_index: int = 0
    error: dict[str, str] | None = None  # the last start failure of a version being started ("version": which)
    start_failures: int = 0
    next_start_at: float = 0.0
    replicas: dict[str, ReplicaRecord] = field(default_factory=dict)
    autoscaler: Autoscaler | None = None  # set while desired.autoscaling is
    moving: str | None = None  # the replica being moved to spread the deployment again (placement.to_rebalance)
    revisions: Revisions | None = None  # None: one revision, of ``desired`` (filled in at once)

    def __post_init__(self) -> None:
        if self.revisions is None:
            self.revisions = Revisions(self.desired)

    @property
    def target(self) -> int:
        """The replica count to run: the autoscaler's when autoscaling is on, else spec.replicas."""
        return self.desired.replicas if self.autoscaler is None else self.autoscaler.target

    def goal(self) -> DesiredState:
        """What the main set of replicas runs: the serving revision, or the one rolling out (``rollouts``)."""
        return self.revisions.goal(self.desired)

    def canary(self) -> tuple[DesiredState, int, int] | None:
        """(desired state, replica count, weight) of the canary while one runs."""
        return self.revisions.canary(self.desired, self.target)

    def starting_versions(self) -> set[str]:
        """The versions new replicas are started with now (a start failure of another is no rollout's)."""
        canary = self.canary()
        return {self.goal().version, *([canary[0].version] if canary else [])}

    def desired_for(self, version: str) -> DesiredState:
        """The desired state a new replica of ``version`` runs."""
        canary = self.canary()
        return canary[0] if canary and canary[0].version == version else self.goal()

    def progress(self, views: list[ReplicaView]) -> Progress:
        """What the rollout in progress has to go by: its revision's replicas (with no rollout in progress,
        whether the serving revision runs settled)."""
        rollout = self.revisions.rollout
        if rollout is None or rollout.state != PROGRESSING:
            return Progress(0, 0, planning.deployment_status(self.target, self.goal().version, views)
                            == DeploymentStatus.RUNNING, None, 0, {})
        version, canary = self.revisions.get(rollout.revision).version, self.canary()
        mine = [r for r in self.replicas.values() if r.version == version]
        error = self.error if self.error is not None and self.error.get("version") == version else None
        serving = self.revisions.serving_revision.version
        return Progress(
            ready=sum(r.state == ReplicaState.READY for r in mine), needed=canary[1] if canary else self.target,
            settled=planning.deployment_status(self.target, version, views) == DeploymentStatus.RUNNING,
            start_error=error, start_failures=self.start_failures if error else 0,
            counters={r.id: (r.info.get("errors", 0), r.info.get("totalRequests", 0)) for r in mine},
            serving_ready=sum(r.state == ReplicaState.READY and r.version == serving for r in self.replicas.values()))

    def checkpoint(self) -> bytes:
        scaling = {} if self.autoscaler is None else {"autoscaler": self.autoscaler.checkpoint()}
        return json.dumps({"desired": self.desired.to_json(), "deleting": self.deleting, "restarts": self.restarts,
                           "nextIndex": self.next_index, "revisions": self.revisions.checkpoint(), **scaling}).encode()


def needs(desired: DesiredState) -> dict[str, float]:
    options = desired.ray_actor_options
    return {"CPU": options.num_cpus, "GPU": options.num_gpus, "memory": options.memory or 0}


def fits(desired: DesiredState, available: dict[str, float]) -> bool:
    """Whether the free resources (the cluster's) cover one replica: if so, an unplaced replica is a worker
    process slow to start (a busy machine), not one waiting for resources."""
    return all(available.get(resource, 0) >= amount for resource, amount in needs(desired).items() if amount)


def unschedulable_reason(desired: DesiredState, available: dict[str, float], total: dict[str, float],
                         held: dict[str, tuple[int, float]] | None = None) -> str:
    """Why Ray can't place a replica, like Ray Serve's scheduling warning: what it needs, what is free,
    and which deployments' replicas hold the CPUs (``held``: deployment -> (replicas, CPUs))."""
    parts = []
    for resource, amount in needs(desired).items():
        if amount:
            unit = 2**30 if resource == "memory" else 1
            parts.append(f"{resource} {amount / unit:g}{' GiB' if unit > 1 else ''} "
                         f"({available.get(resource, 0) / unit:g} of {total.get(resource, 0) / unit:g} free)")
    holders = "; ".join(f"{name} {n} replica(s), CPU {cpus:g}" for name, (n, cpus) in sorted((held or {}).items())
                        if n)
    return (f"waiting for resources: needs {', '.join(parts) or 'nothing'} on one node"
            f"{f'; held by {holders}' if holders else ''}; add nodes or lower rayActorOptions")
