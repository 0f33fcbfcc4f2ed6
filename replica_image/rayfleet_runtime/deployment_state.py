"""The controller's state machine: every deployment's replicas, kept as desired (like Ray Serve's deployment_state.py).

``ControllerCore`` runs on the controller actor's event loop and does everything but serve HTTP and host
the actor (``controller.py``). A reconcile tick every ``TICK_S``

1. probes every replica (``info()`` every couple of seconds, ``health()`` every
   ``healthCheck.periodSeconds``; a dead actor is noticed by the next probe),
2. asks ``planning.plan()`` what to start and stop, and executes it: starts are named detached
   ``Replica`` actors (SPREAD across nodes, resources from ``rayActorOptions``); graceful stops mark the
   replica DRAINING, publish the routing table without it, wait until every proxy applied it, call
   ``drain(grace)`` and finally kill it,
3. has the ``RoutePublisher`` push the routing table of READY replicas to the ingress proxies.

A deployment with ``autoscaling`` runs the count its ``Autoscaler`` (``autoscaler.py``) chose: a second
loop samples each such deployment every ``SAMPLE_INTERVAL_S`` (its serving replicas' ``info()`` in
parallel, and the requests waiting in the ingresses) and feeds the sample to the autoscaler; a change of
the count is logged, counted and checkpointed, and planned at once.

Every Ray call goes through the injected backend (``ray_calls.RayBackend``; a fake in unit tests).
State lives where a restarted controller finds it again: desired state (plus restart counters) is
checkpointed in Ray's GCS KV, replicas are found by their actor names. Every error in the loop is logged
and the loop goes on. Handler import/init failures are reported in the observed state and retried with
exponential back-off instead of hot-looping. Each transition of a replica or a rollout is logged once
(``lifecycle_log``) and counted where it happens (``controller_metrics``).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from rayfleet_api.constants import INGRESS_PORT
from rayfleet_api.desired import DesiredState
from rayfleet_api.errors import SpecError
from rayfleet_api.states import DeploymentStatus, ReplicaState

from rayfleet_runtime import placement, planning
from rayfleet_runtime.autoscaler import SAMPLE_INTERVAL_S, SAMPLE_WAIT_S, Autoscaler, follow_spec, replica_load
from rayfleet_runtime.autoscaling import LoadSample
from rayfleet_runtime.controller_metrics import ControllerMetrics
from rayfleet_runtime.haproxy_config import KEEPALIVE_TIMEOUT_S
from rayfleet_runtime.lifecycle_log import lifecycle
from rayfleet_runtime.planning import ReplicaView
from rayfleet_runtime.ray_calls import (RayBackend, ReplicaCallError, ReplicaDied, ReplicaTimeout, ReplicaUnavailable,
                                        RuntimeEnvFailed)
from rayfleet_runtime.route_publisher import RoutePublisher

TICK_S = 0.25
PROBE_INTERVAL_S = 2.0
RECOVER_PROBE_TIMEOUT_S = 10.0
SLOW_START_S = 60.0  # a replica still starting after this says so in its lastError
PLACEMENT_GRACE_S = 2.0  # a replica Ray hasn't placed after this is reported as waiting for resources

logger = logging.getLogger("rayfleet.controller")

_SERVING = (ReplicaState.READY, ReplicaState.UNHEALTHY)  # started and not being stopped: these are probed


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
    desired: DesiredState
    deleting: bool = False
    restarts: int = 0
    next_index: int = 0
    error: dict[str, str] | None = None
    start_failures: int = 0
    next_start_at: float = 0.0
    rolling_out: bool = False  # a new version was put and not every replica runs it yet
    replicas: dict[str, ReplicaRecord] = field(default_factory=dict)
    autoscaler: Autoscaler | None = None  # set while desired.autoscaling is
    moving: str | None = None  # the replica being moved to spread the deployment again (placement.to_rebalance)

    @property
    def target(self) -> int:
        """The replica count to run: the autoscaler's when autoscaling is on, else spec.replicas."""
        return self.desired.replicas if self.autoscaler is None else self.autoscaler.target

    def checkpoint(self) -> bytes:
        scaling = {} if self.autoscaler is None else {"autoscaler": self.autoscaler.checkpoint()}
        return json.dumps({"desired": self.desired.to_json(), "deleting": self.deleting, "restarts": self.restarts,
                           "nextIndex": self.next_index, **scaling}).encode()


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


class ControllerCore:
    """Everything the controller does, on one event loop; the ``Controller`` actor (controller.py) hosts it."""

    def __init__(self, backend: RayBackend, ingress_port: int = INGRESS_PORT, ingress_nodes: str = "all",
                 bind_host: str = "0.0.0.0", drain_settle_s: float = KEEPALIVE_TIMEOUT_S + 1.0):
        self.backend = backend
        self.ingress_port = ingress_port
        self.ingress_nodes = ingress_nodes
        self.bind_host = bind_host
        self.drain_settle_s = drain_settle_s
        self.deployments: dict[str, DeploymentRecord] = {}
        self.metrics = ControllerMetrics(self.replica_states, self.scaling)
        self.routes = RoutePublisher(self.routing_table, backend.ensure_ingress, backend.node_ids,
                                     self.metrics.route_pushed, ingress_port, ingress_nodes, bind_host)
        self._tasks: list[asyncio.Task] = []
        self.nodes: list[placement.NodeView] = []  # the alive Ray nodes, refreshed every PROBE_INTERVAL_S
        self._nodes_task: asyncio.Task | None = None
        self._next_nodes_at = 0.0
        self.draining: dict[str, float] = {}  # node id -> when its drain gives up (time.time()); see drain_node

    # ---------- nodes: spread and drain ----------
    def drain_node(self, node_id: str, timeout_s: float) -> int:
        """The node's pod is terminating: move its replicas elsewhere (new ones first, the old drained once
        those serve) and place nothing new there. Returns how many replicas still run there; the caller
        (the node's preStop hook, through its ingress) asks again until none do."""
        if node_id not in self.draining:
            logger.info("node %s is draining: moving its replicas", node_id)
            lifecycle("node_draining", node=node_id, timeout_s=timeout_s)
        self.draining[node_id] = max(self.draining.get(node_id, 0.0), time.time() + timeout_s)
        return sum(1 for dep in self.deployments.values() for r in dep.replicas.values()
                   if r.node == node_id and r.state != ReplicaState.STOPPED)

    async def _refresh_nodes(self) -> None:
        try:
            nodes = await self.backend.nodes()
        except Exception:  # noqa: BLE001 - the GCS is busy or restarting: keep the last view
            logger.debug("listing nodes failed", exc_info=True)
            return
        alive, now = {n.id for n in nodes}, time.time()
        self.draining = {node: until for node, until in self.draining.items() if node in alive and until > now}
        self.nodes = nodes

    def _node_views(self) -> list[placement.NodeView]:
        """The nodes as placement sees them: draining ones, and those where a replica stopped answering."""
        suspect = {r.node for dep in self.deployments.values() for r in dep.replicas.values()
                   if r.state == ReplicaState.UNHEALTHY}
        return [dataclasses.replace(n, draining=n.id in self.draining, suspect=n.id in suspect) for n in self.nodes]

    def _placed(self) -> list[placement.Placed]:
        return [placement.Placed(r.node, dep.name, needs(dep.desired)) for dep in self.deployments.values()
                for r in dep.replicas.values() if r.node and r.state != ReplicaState.STOPPED]

    def _evictions(self, dep: DeploymentRecord) -> dict[str, str]:
        """The replicas of ``dep`` to move, and why: those on draining nodes, else one the spread asks for."""
        out = {r.id: "node-drain" for r in dep.replicas.values() if r.node in self.draining}
        if dep.moving is not None and dep.moving not in out:
            rec = dep.replicas.get(dep.moving)
            if rec is None or rec.state != ReplicaState.READY:
                dep.moving = None  # moved (or gone some other way)
            else:
                out[dep.moving] = "rebalance"
        if out or dep.deleting or dep.rolling_out:
            return out
        live = sorted((r for r in dep.replicas.values() if r.state != ReplicaState.STOPPED), key=lambda r: r.created_at)
        if len(live) != dep.target or any(r.state != ReplicaState.READY or not r.node for r in live):
            return out  # only a settled deployment is rebalanced: one move at a time
        moving = placement.to_rebalance(self._node_views(), self._placed(), needs(dep.desired),
                                        [(r.id, r.node) for r in live])
        if moving is not None:
            dep.moving = moving
            out[moving] = "rebalance"
            lifecycle("replica_rebalancing", deployment=dep.name, replica=moving, node=dep.replicas[moving].node)
        return out

    # ---------- persistence and re-discovery ----------
    def _save(self, dep: DeploymentRecord) -> None:
        try:
            self.backend.write_checkpoint(dep.name, dep.checkpoint())
        except Exception:  # noqa: BLE001
            logger.exception("checkpoint of %s failed", dep.name)

    def _forget(self, name: str) -> None:
        try:
            self.backend.delete_checkpoint(name)
        except Exception:  # noqa: BLE001
            logger.exception("removing checkpoint of %s failed", name)

    async def recover(self) -> None:
        """Load checkpointed deployments and adopt their live replica actors (after a controller restart)."""
        unreadable: set[str] = set()
        for name in self.backend.checkpoint_names():
            try:
                raw = self.backend.read_checkpoint(name)
                if not raw:
                    continue
                data = json.loads(raw)
                desired, saved = DesiredState.from_json(data["desired"]), data.get("autoscaler")
                self.deployments[name] = DeploymentRecord(
                    name, desired, deleting=data.get("deleting", False), restarts=data.get("restarts", 0),
                    next_index=data.get("nextIndex", 0),
                    autoscaler=Autoscaler.resumed(desired.autoscaling, saved) if desired.autoscaling and saved
                    else None)
            except Exception:  # noqa: BLE001 - one bad checkpoint must not keep the controller from starting
                logger.exception("cannot read the checkpoint of deployment %s; leaving its replicas alone", name)
                unreadable.add(name)
        adopt = []
        for dep_name, rid in self.backend.replica_names():
            if dep_name in unreadable:
                continue
            actor = self.backend.get_replica(dep_name, rid)
            if actor is not None:
                adopt.append(((dep_name, rid), actor))

        async def ask(actor: Any) -> Any:
            try:
                return await self.backend.info(actor, RECOVER_PROBE_TIMEOUT_S)
            except ReplicaCallError as exc:
                return exc

        # All at once: one after the other, N silent replicas would keep the HTTP API down N x 10 s.
        infos = await asyncio.gather(*(ask(actor) for _, actor in adopt))
        for ((dep_name, rid), actor), info in zip(adopt, infos):
            dep = self.deployments.get(dep_name)
            slow = isinstance(info, ReplicaTimeout)
            if dep is None or (isinstance(info, BaseException) and not slow):
                logger.warning("replica %s/%s is not ours or gone (%s); killing it", dep_name, rid, info)
                self.backend.kill(actor)
                continue
            if slow:
                # Alive but busy (its process answered no probe in time): adopt it unrouted, taken for
                # the current version until it answers; its health checks decide, as for any replica.
                rec = ReplicaRecord(rid, dep.desired.version, actor, state=ReplicaState.UNHEALTHY, health_failures=1,
                                    last_error=f"no answer within {RECOVER_PROBE_TIMEOUT_S:g}s after a controller restart",
                                    failure="unhealthy")
                logger.warning("replica %s/%s did not answer yet; adopted, unrouted until healthy", dep_name, rid)
            else:
                rec = ReplicaRecord(rid, info.get("version") or "", actor, info=info)
                rec.state = (ReplicaState.FAILED if info.get("error")
                             else ReplicaState.DRAINING if info.get("draining") else ReplicaState.READY)
                rec.failure = "start_failed" if info.get("error") else None
                rec.created_at = info.get("startedAt", time.time())
            dep.replicas[rid] = rec
            try:
                dep.next_index = max(dep.next_index, int(rid.rsplit("-", 1)[1]) + 1)
            except (IndexError, ValueError):
                pass
            if rec.state == ReplicaState.DRAINING:
                self._begin_stop(dep, rec, planning.StopIntent(rid, True, "scale-down"))
            elif rec.state in _SERVING:
                self._watch(dep, rec)
        for dep in self.deployments.values():
            if dep.desired.autoscaling is not None and dep.autoscaler is None:  # checkpointed before it had a count
                running = sum(r.state in _SERVING for r in dep.replicas.values())
                dep.autoscaler = Autoscaler(dep.desired.autoscaling, dep.desired.autoscaling.clamp(running))
        logger.info("recovered %d deployments, adopted %d replicas", len(self.deployments),
                    sum(len(d.replicas) for d in self.deployments.values()))
        self.routes.changed()

    # ---------- API ----------
    def put_deployment(self, name: str, desired: DesiredState) -> None:
        prefix = desired.route_prefix
        for other in self.deployments.values():
            if other.name != name and not other.deleting and other.desired.route_prefix == prefix:
                raise SpecError("routePrefix", f"{prefix} is already used by deployment {other.name!r}")
        dep = self.deployments.get(name)
        if dep is None:
            dep = self.deployments[name] = DeploymentRecord(name, desired)
        else:
            if dep.desired.version != desired.version:
                dep.error, dep.start_failures, dep.next_start_at = None, 0, 0.0  # new code: retry at once
                dep.rolling_out = True
                self.metrics.rollout_started(name)
                lifecycle("rollout_started", deployment=name, version=desired.version, previous=dep.desired.version)
            dep.desired, dep.deleting = desired, False
        dep.autoscaler = follow_spec(dep.autoscaler, desired.autoscaling, desired.replicas)
        self._save(dep)
        self.routes.changed()

    def get_deployment(self, name: str) -> dict[str, Any] | None:
        dep = self.deployments.get(name)
        return None if dep is None else self.observed(dep)

    def list_deployments(self) -> list[dict[str, Any]]:
        return [self.observed(d) for d in sorted(self.deployments.values(), key=lambda d: d.name)]

    def delete_deployment(self, name: str) -> bool:
        dep = self.deployments.get(name)
        if dep is None:
            return False
        dep.deleting = True
        self._save(dep)
        self.routes.changed()
        return True

    def replica_states(self) -> dict[str, list[ReplicaState]]:
        """Each deployment's replica states, as the replicas-by-state gauge reads them when scraped."""
        return {d.name: [r.state for r in d.replicas.values()] for d in self.deployments.values()}

    def scaling(self) -> dict[str, tuple[int, float | None]]:
        """Each deployment's replica count to run and its autoscaler's latest load, as the gauges read them."""
        return {d.name: (d.target, None if d.autoscaler is None else d.autoscaler.load)
                for d in self.deployments.values()}

    def observed(self, dep: DeploymentRecord) -> dict[str, Any]:
        version = dep.desired.version
        reps = sorted(dep.replicas.values(), key=lambda r: r.created_at)
        views = [r.view() for r in reps]
        return {
            "name": dep.name,
            "version": version,
            "targetReplicas": 0 if dep.deleting else dep.target,
            "desiredReplicas": dep.target,
            "readyReplicas": sum(1 for r in reps if r.state == ReplicaState.READY),
            "updatedReplicas": sum(1 for r in reps if r.version == version
                                   and r.state in (ReplicaState.STARTING, *_SERVING)),
            "inFlight": sum(r.info.get("inFlight", 0) for r in reps if r.state in (*_SERVING, ReplicaState.DRAINING)),
            "restarts": dep.restarts,
            "status": planning.deployment_status(dep.target, version, views, deleting=dep.deleting,
                                                 error=dep.error is not None),
            "error": None if dep.error is None else {"reason": dep.error["reason"], "message": dep.error["message"],
                                                     "traceback": (dep.error.get("traceback") or "")[-2000:]},
            "routePrefix": dep.desired.route_prefix,
            "replicas": [r.observed() for r in reps],
            **({} if dep.autoscaler is None else {"autoscaling": dep.autoscaler.observed()}),
        }

    # ---------- reconcile ----------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks += [loop.create_task(self.routes.run()), loop.create_task(self._autoscale())]
        while True:
            try:
                self.reconcile_once()
            except Exception:  # noqa: BLE001
                logger.exception("reconcile failed; continuing")
            await asyncio.sleep(TICK_S)

    def reconcile_once(self) -> None:
        now = time.time()
        if now >= self._next_nodes_at and (self._nodes_task is None or self._nodes_task.done()):
            self._next_nodes_at = now + PROBE_INTERVAL_S
            self._nodes_task = asyncio.get_running_loop().create_task(self._refresh_nodes())
        for dep in list(self.deployments.values()):
            try:
                self._reconcile(dep, now)
            except Exception:  # noqa: BLE001
                logger.exception("reconciling %s failed; continuing", dep.name)

    def _reconcile(self, dep: DeploymentRecord, now: float) -> None:
        # Drop replicas whose stop finished.
        for rid in [rid for rid, r in dep.replicas.items()
                    if r.state == ReplicaState.STOPPED and (r.task is None or r.task.done())]:
            del dep.replicas[rid]
        if dep.deleting and not dep.replicas:
            del self.deployments[dep.name]
            self._forget(dep.name)
            self.metrics.forget(dep.name)
            self.routes.changed()
            logger.info("deployment %s deleted", dep.name)
            return
        hc = dep.desired.health_check
        # Probe serving replicas.
        for rec in dep.replicas.values():
            if rec.state in _SERVING and (rec.task is None or rec.task.done()) and now >= rec.next_probe_at:
                health = now >= rec.next_health_at
                if health:
                    rec.next_health_at = now + hc.period_seconds
                rec.next_probe_at = now + min(PROBE_INTERVAL_S, hc.period_seconds)
                rec.task = asyncio.get_running_loop().create_task(self._probe(dep, rec, health, hc.timeout_seconds))
        # Is what is starting waiting for room? (It then says so at once, and a rollout makes room.)
        for rec in dep.replicas.values():
            if (rec.state == ReplicaState.STARTING and rec.actor is not None and now >= rec.next_placement_at
                    and now - rec.created_at >= PLACEMENT_GRACE_S
                    and (rec.placement_task is None or rec.placement_task.done())):
                rec.next_placement_at = now + PROBE_INTERVAL_S
                rec.placement_task = asyncio.get_running_loop().create_task(self._check_placement(dep, rec))
        evict = self._evictions(dep)
        views = [r.view(evict.get(r.id)) for r in dep.replicas.values()]
        if dep.rolling_out and planning.deployment_status(dep.target, dep.desired.version, views,
                                                          deleting=dep.deleting) == DeploymentStatus.RUNNING:
            dep.rolling_out = False
            lifecycle("rollout_finished", deployment=dep.name, version=dep.desired.version)
        # Decide and act.
        p = planning.plan(dep.target, dep.desired.version, views, failure_threshold=hc.failure_threshold,
                          deleting=dep.deleting, can_start=now >= dep.next_start_at)
        if not p:
            return
        for stop in p.stop:
            rec = dep.replicas.get(stop.replica_id)
            if rec is not None:
                self._begin_stop(dep, rec, stop)
        started = [start for start in p.start if self._start_replica(dep, start)]
        dep.restarts += sum(1 for s in started if s.replaces is not None)
        if started:  # checkpoint the restart count and next_index (replica names stay unique after a restart)
            self._save(dep)
        self.routes.changed()

    # ---------- autoscaling ----------
    async def _autoscale(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.autoscale_once()
            except Exception:  # noqa: BLE001
                logger.exception("autoscaling failed; continuing")
            await asyncio.sleep(max(0.0, SAMPLE_INTERVAL_S - (time.monotonic() - started)))

    async def autoscale_once(self) -> None:
        """Sample every autoscaled deployment once and act on its autoscaler's decision."""
        scaled = [d for d in self.deployments.values() if d.autoscaler is not None and not d.deleting]
        if not scaled:
            return
        waiting = asyncio.ensure_future(self.routes.waiting_requests(SAMPLE_WAIT_S))
        asks = [self._ask_load(dep, rec) for dep in scaled for rec in dep.replicas.values() if rec.state in _SERVING]
        if asks:
            await asyncio.wait(asks, timeout=SAMPLE_WAIT_S)
        in_ingress = await waiting
        now, wall = time.monotonic(), time.time()
        for dep in scaled:
            if dep.autoscaler is None or dep.deleting or self.deployments.get(dep.name) is not dep:
                continue  # changed while the answers came
            # Serving and starting replicas; not the draining ones: their requests are leaving.
            sample = LoadSample(tuple(replica_load(r.info, ready=r.state != ReplicaState.STARTING)
                                      for r in dep.replicas.values()
                                      if r.state in (ReplicaState.STARTING, *_SERVING)),
                                ingress_queued=in_ingress.get(dep.name, 0))
            before = dep.autoscaler.replicas
            decision = dep.autoscaler.observe(sample, now, wall)
            if decision.replicas != before:
                self._scaled(dep, before, decision.replicas, decision.reason)

    def _ask_load(self, dep: DeploymentRecord, rec: ReplicaRecord) -> asyncio.Task:
        """The replica's info() call that refreshes its load; one at a time, so a slow replica piles up none."""
        if rec.load_task is None or rec.load_task.done():
            rec.load_task = asyncio.get_running_loop().create_task(self._read_load(dep, rec))
        return rec.load_task

    async def _read_load(self, dep: DeploymentRecord, rec: ReplicaRecord) -> None:
        try:
            info = await self.backend.info(rec.actor, dep.desired.health_check.timeout_seconds + 1.0)
        except ReplicaCallError:
            return  # it keeps its last load; the probes and the watch judge the replica
        if rec.state in _SERVING:
            rec.info = info

    def _scaled(self, dep: DeploymentRecord, replicas_from: int, replicas_to: int, reason: str) -> None:
        lifecycle("scaled", deployment=dep.name, replicas_from=replicas_from, replicas_to=replicas_to, reason=reason)
        self.metrics.scaled(dep.name, replicas_from, replicas_to)
        self._save(dep)
        try:  # now, not at the next tick: a request held at zero replicas waits for this
            self._reconcile(dep, time.time())
        except Exception:  # noqa: BLE001
            logger.exception("reconciling %s failed; continuing", dep.name)

    def _held_resources(self) -> dict[str, tuple[int, float]]:
        """Per deployment: its replicas known to run (they have answered with a pid), and their CPUs."""
        held = {}
        for dep in self.deployments.values():
            placed = [r for r in dep.replicas.values() if r.info.get("pid")
                      and r.state in (ReplicaState.STARTING, *_SERVING, ReplicaState.DRAINING)]
            held[dep.name] = (len(placed), len(placed) * dep.desired.ray_actor_options.num_cpus)
        return held

    async def _check_placement(self, dep: DeploymentRecord, rec: ReplicaRecord) -> None:
        try:
            if await self.backend.placed(rec.actor):
                rec.unschedulable = None
                return
            available, total = await self.backend.free_resources()
        except Exception as exc:  # noqa: BLE001 - the GCS is busy: ask again next time
            logger.debug("placement of %s unknown: %s", rec.id, exc)
            return
        if rec.state != ReplicaState.STARTING or fits(dep.desired, available):
            return
        note = unschedulable_reason(dep.desired, available, total, self._held_resources())
        if rec.unschedulable is None:
            self.metrics.waiting_for_resources(dep.name)
            lifecycle("replica_unschedulable", deployment=dep.name, replica=rec.id, version=rec.version, reason=note)
        rec.unschedulable = note  # kept current in the observed state; logged once per replica

    def _start_replica(self, dep: DeploymentRecord, intent: planning.StartIntent) -> bool:
        """Start one replica on the node placement picks; False if it must wait for room (a node is draining
        and no other has room: left to Ray, the replica could land on the pod that is going)."""
        desired = dep.desired
        node = placement.choose_node(self._node_views(), self._placed(), dep.name, needs(desired))
        if node is None and self.draining:
            return False
        rid = f"{dep.name}-{dep.next_index}"
        dep.next_index += 1
        if intent.replaces is not None:
            reason = dep.replicas[intent.replaces].failure or "failed"  # stopped just now, still listed
            self.metrics.restarted(dep.name, reason)
            lifecycle("replica_replaced", deployment=dep.name, replica=intent.replaces, replacement=rid, reason=reason)
        rec = ReplicaRecord(rid, desired.version, None, restarts=intent.restarts, sent_to=node)
        dep.replicas[rid] = rec
        try:
            rec.actor = self.backend.create_replica(dep.name, rid, desired, self.bind_host, node)
        except ReplicaCallError as exc:  # e.g. invalid runtime_env or name clash
            self._start_failed(dep, rec, {"reason": "ReplicaCreateError", "message": f"{exc.ray_error}: {exc}"})
            return True
        lifecycle("replica_started", deployment=dep.name, replica=rid, version=rec.version, restarts=rec.restarts,
                  node=node)
        rec.task = asyncio.get_running_loop().create_task(self._await_start(dep, rec))
        return True

    async def _await_start(self, dep: DeploymentRecord, rec: ReplicaRecord) -> None:
        try:
            info = await self.backend.info(rec.actor)
        except ReplicaCallError as exc:  # actor died during __init__, runtime_env failed, ...
            if rec.state != ReplicaState.STARTING:  # we stopped it ourselves (scale-down or delete while starting)
                return
            reason = "RuntimeEnvSetupError" if isinstance(exc, RuntimeEnvFailed) else "ReplicaStartError"
            self._start_failed(dep, rec, {"reason": reason, "message": f"{exc.ray_error}: {str(exc)[:2000]}"})
            return
        rec.info = info
        if rec.state != ReplicaState.STARTING:  # stopped meanwhile
            return
        if info.get("error"):
            self._start_failed(dep, rec, info["error"])
            return
        rec.state = ReplicaState.READY
        rec.next_health_at = time.time() + dep.desired.health_check.period_seconds
        rec.next_probe_at = time.time() + PROBE_INTERVAL_S
        if rec.version == dep.desired.version:
            dep.error, dep.start_failures, dep.next_start_at = None, 0, 0.0
        self._ready(dep, rec)
        self._watch(dep, rec)
        self.routes.changed()

    def _watch(self, dep: DeploymentRecord, rec: ReplicaRecord) -> None:
        """Replace a replica whose process dies as soon as Ray knows (a pending call fails), not at the next
        probe: with the start of a new process that makes ~2 s from kill -9 to a new replica serving."""
        async def watch() -> None:
            while rec.state in _SERVING:
                try:
                    await self.backend.watch(rec.actor)
                except ReplicaDied as exc:
                    self._died(dep, rec, exc)
                    return
                except ReplicaCallError as exc:  # unreachable for now (the probes judge it): watch again
                    logger.debug("watch of %s interrupted: %s", rec.id, exc.ray_error)
                    await asyncio.sleep(PROBE_INTERVAL_S)
        rec.watch_task = asyncio.get_running_loop().create_task(watch())

    @staticmethod
    def _ready(dep: DeploymentRecord, rec: ReplicaRecord) -> None:
        rec.failure, rec.unschedulable = None, None
        lifecycle("replica_ready", deployment=dep.name, replica=rec.id, version=rec.version,
                  node=rec.info.get("nodeIp"), port=rec.info.get("port"), pid=rec.info.get("pid"))

    def _died(self, dep: DeploymentRecord, rec: ReplicaRecord, exc: ReplicaDied) -> None:
        if rec.state in _SERVING:
            rec.state, rec.last_error, rec.failure = ReplicaState.FAILED, "replica process died", "died"
            lifecycle("replica_failed", deployment=dep.name, replica=rec.id, version=rec.version, reason="died",
                      message=str(exc)[:300])
            self.routes.changed()

    def _start_failed(self, dep: DeploymentRecord, rec: ReplicaRecord, error: dict[str, str]) -> None:
        if rec.state != ReplicaState.STARTING:
            return
        lifecycle("replica_failed", deployment=dep.name, replica=rec.id, version=rec.version,
                  reason=error.get("reason"), message=error.get("message"))
        rec.state, rec.failure = ReplicaState.FAILED, "start_failed"
        rec.last_error = f"{error.get('reason')}: {error.get('message')}"
        if rec.actor is not None:
            self.backend.kill(rec.actor)
        if rec.version == dep.desired.version:
            dep.error = {k: error[k] for k in ("reason", "message", "traceback") if k in error}
            dep.start_failures += 1
            dep.next_start_at = time.time() + planning.backoff_seconds(dep.start_failures)

    async def _probe(self, dep: DeploymentRecord, rec: ReplicaRecord, health: bool, timeout_s: float) -> None:
        try:
            if health:
                result = await self.backend.health(rec.actor, timeout_s, timeout_s + 1.0)
            else:
                result = await self.backend.info(rec.actor, timeout_s + 1.0)
        except ReplicaUnavailable as exc:
            result = {"healthy": False, "message": f"actor unavailable: {exc}"[:300]}
        except ReplicaDied as exc:
            self._died(dep, rec, exc)
            return
        except ReplicaTimeout:
            result = {"healthy": False, "message": f"no answer within {timeout_s}s"}
        except ReplicaCallError as exc:
            result = {"healthy": False, "message": f"{exc.ray_error}: {exc}"[:300]}
        if "pid" in result:
            rec.info = {k: v for k, v in result.items() if k not in ("healthy", "message")}
            rec.version = result.get("version") or rec.version  # the replica knows (an adopted one may not)
        if rec.state not in _SERVING or (not health and "healthy" not in result):
            return
        before = rec.state
        rec.state, rec.health_failures = planning.next_health_state(rec.state, rec.health_failures, result["healthy"])
        if not result["healthy"]:
            rec.last_error = result.get("message")
            self.metrics.health_check_failed(dep.name)
            logger.debug("replica %s health check failed (%d): %s", rec.id, rec.health_failures, rec.last_error)
        if rec.state == before:
            return
        if rec.state == ReplicaState.UNHEALTHY:
            rec.failure = "unhealthy"
            lifecycle("replica_unhealthy", deployment=dep.name, replica=rec.id, version=rec.version,
                      message=rec.last_error)
        else:
            self._ready(dep, rec)
        self.routes.changed()

    def _begin_stop(self, dep: DeploymentRecord, rec: ReplicaRecord, stop: planning.StopIntent) -> None:
        """Take the replica out of routing now; drain and kill it in the background."""
        grace = dep.desired.graceful_shutdown_seconds
        graceful = stop.graceful and rec.actor is not None and grace > 0  # 0: stop at once, as asked
        rec.state = ReplicaState.DRAINING if graceful else ReplicaState.STOPPED
        unrouted = self.routes.changed()  # routes version without this replica
        if stop.reason in ("node-drain", "rebalance"):
            self.metrics.moved(dep.name, stop.reason)
        if graceful:
            lifecycle("replica_draining", deployment=dep.name, replica=rec.id, version=rec.version, reason=stop.reason,
                      grace_s=grace)
        rec.task = asyncio.get_running_loop().create_task(self._stop(dep, rec, stop.reason, graceful, grace, unrouted))

    async def _stop(self, dep: DeploymentRecord, rec: ReplicaRecord, reason: str, graceful: bool, grace: float,
                    unrouted: int) -> None:
        try:
            if graceful:
                started = time.monotonic()
                # Unroute *before* draining: wait until every HAProxy has reloaded with a table without
                # this replica (a fixed sleep is not enough: `haproxy -c`, a reload in progress or a
                # recreated ingress can take longer, and drain() returning while a proxy still sends
                # requests means they hit a killed process). Bounded by the grace period.
                if not await self.routes.wait_applied(unrouted, grace):
                    logger.warning("replica %s: proxies did not apply the routing table without it within %.0fs;"
                                   " draining anyway", rec.id, grace)
                # Old HAProxy workers still route idle keep-alive connections by the old table until
                # they time out (KEEPALIVE_TIMEOUT_S): keep serving until then, so their next request
                # finds this replica up (a drained one fails its health check, a killed one refuses).
                # That is part of leaving the routes, so the grace period for in-flight requests
                # starts after it.
                await asyncio.sleep(self.drain_settle_s)
                left = max(0.0, grace - (time.monotonic() - started - self.drain_settle_s))
                try:
                    rec.info = await self.backend.drain(rec.actor, left, left + 5)
                except ReplicaCallError as exc:  # already dead, or too slow: kill anyway
                    logger.info("drain of %s ended: %s", rec.id, exc.ray_error)
        finally:
            if rec.actor is not None:
                self.backend.kill(rec.actor)
            rec.state = ReplicaState.STOPPED
            lifecycle("replica_stopped", deployment=dep.name, replica=rec.id, version=rec.version, reason=reason,
                      drained=graceful)

    # ---------- routing ----------
    def routing_table(self) -> dict[str, Any]:
        table: dict[str, Any] = {}
        for dep in self.deployments.values():
            if dep.deleting:
                continue
            d = dep.desired
            ready = [r for r in sorted(dep.replicas.values(), key=lambda r: r.id)
                     if r.state == ReplicaState.READY and r.info.get("port")]
            # With no replica the ingress holds a request (it starts one) instead of refusing it.
            from_zero = {"scaleFromZero": True} if d.autoscaling and d.autoscaling.min_replicas == 0 else {}
            # Autoscaled, the ingress queues what maxReplicas could run, up to the request timeout: the
            # queue is the load that brings more replicas, and they are coming (not a 503 at once).
            queue = ({"maxQueued": d.max_concurrency * d.autoscaling.max_replicas,
                      "queueTimeoutSeconds": d.request_timeout_seconds} if d.autoscaling else {})
            table[dep.name] = {"routePrefix": d.route_prefix, "maxConcurrency": d.max_concurrency,
                               "requestTimeoutSeconds": d.request_timeout_seconds,
                               "maxRequestBodyBytes": d.max_request_body_bytes, **from_zero, **queue,
                               "replicas": [{"id": r.id, "host": r.info["host"], "port": r.info["port"],
                                            "nodeId": r.info.get("nodeId")} for r in ready]}
        return {"deployments": table}

