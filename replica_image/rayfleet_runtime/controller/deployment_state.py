"""The controller's state machine: every deployment's replicas, kept as desired (like Ray Serve's deployment_state.py).

``ControllerCore`` runs on the controller actor's event loop and does everything but serve HTTP and host
the actor (``actor.py``). A reconcile tick every ``TICK_S``

1. has every replica probed (``info()`` every couple of seconds, ``health()`` every
   ``healthCheck.periodSeconds``; a dead actor is noticed by the next probe),
2. asks ``planning.plan()`` what to start and stop, and has ``replica_actions.ReplicaActions`` do it: starts
   are named detached ``Replica`` actors on the node ``placement`` picks (resources from
   ``rayActorOptions``); graceful stops mark the replica DRAINING, publish the routing table without it,
   wait until every proxy applied it, call ``drain(grace)`` and finally kill it,
3. has the ``RoutePublisher`` push the routing table (``routing.build_table``) of READY replicas to the
   ingress proxies.

A deployment with ``autoscaling`` runs the count its ``Autoscaler`` (``autoscaler.py``) chose: a second
loop samples each such deployment every ``SAMPLE_INTERVAL_S`` (its serving replicas' ``info()`` in
parallel, and the requests waiting in the ingresses) and feeds the sample to the autoscaler; a change of
the count is logged, counted and checkpointed, and planned at once.

Every Ray call goes through the injected backend (``ray_calls.RayBackend``; a fake in unit tests).
State lives where a restarted controller finds it again: desired state (plus restart counters) is
checkpointed in Ray's GCS KV, replicas are found by their actor names. Every error in the loop is logged
and the loop goes on. Handler import/init failures are reported in the observed state and retried with
exponential back-off instead of hot-looping. Each transition of a replica or a rollout is logged once
(``lifecycle_log``) and counted where it happens (``metrics``).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import Any

from rayfleet_api.constants import INGRESS_PORT
from rayfleet_api.desired import DesiredState
from rayfleet_api.errors import SpecError
from rayfleet_api.states import DeploymentStatus, ReplicaState
from rayfleet_runtime.controller import placement, planning
from rayfleet_runtime.controller.autoscaler import SAMPLE_INTERVAL_S, SAMPLE_WAIT_S, Autoscaler, follow_spec, replica_load
from rayfleet_runtime.controller.autoscaling import LoadSample
from rayfleet_runtime.controller.metrics import ControllerMetrics
from rayfleet_runtime.controller.ray_calls import RayBackend, ReplicaCallError, ReplicaTimeout
from rayfleet_runtime.controller.records import SERVING, DeploymentRecord, ReplicaRecord, needs
from rayfleet_runtime.controller.replica_actions import PROBE_INTERVAL_S, ReplicaActions
from rayfleet_runtime.controller.rollouts import Revisions
from rayfleet_runtime.controller.route_publisher import RoutePublisher
from rayfleet_runtime.lifecycle_log import lifecycle
from rayfleet_runtime.routing import (KEEPALIVE_TIMEOUT_S, CanaryRoute, ReplicaRow, Route, RoutingTable, build_table,
                                      prefix_taken)

TICK_S = 0.25
RECOVER_PROBE_TIMEOUT_S = 10.0
PLACEMENT_GRACE_S = 2.0  # a replica Ray hasn't placed after this is reported as waiting for resources

logger = logging.getLogger("rayfleet.controller")


class ControllerCore:
    """Everything the controller decides, on one event loop; the ``Controller`` actor (actor.py) hosts it."""

    def __init__(self, backend: RayBackend, ingress_port: int = INGRESS_PORT, ingress_nodes: str = "all",
                 bind_host: str = "0.0.0.0", drain_settle_s: float = KEEPALIVE_TIMEOUT_S + 1.0):
        self.backend = backend
        self.ingress_port = ingress_port
        self.ingress_nodes = ingress_nodes
        self.bind_host = bind_host
        self.deployments: dict[str, DeploymentRecord] = {}
        self.metrics = ControllerMetrics(self.replica_states, self.scaling)
        self.routes = RoutePublisher(self.routing_table, backend.ensure_ingress, backend.node_ids,
                                     self.metrics.route_pushed, ingress_port, ingress_nodes, bind_host)
        self.actions = ReplicaActions(backend, self.routes, self.metrics, bind_host, drain_settle_s,
                                      self._held_resources)
        self._tasks: list[asyncio.Task] = []
        self.nodes: list[placement.NodeView] = []  # the alive Ray nodes, refreshed every PROBE_INTERVAL_S
        self._nodes_task: asyncio.Task | None = None
        self._next_nodes_at = 0.0
        self.draining: dict[str, float] = {}  # node id -> when its drain gives up (time.time()); see drain_node
        # node id -> the replicas of that node its own ingress found down (replicas_down)
        self.down: dict[str, frozenset[str]] = {}

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

    def replicas_down(self, node_id: str, down: list[str]) -> None:
        """What the ingress of ``node_id`` finds of its own replicas (it alone checks them when every node runs
        an ingress): a change goes into the next table, and through it to every other ingress."""
        found = frozenset(down)
        if self.down.get(node_id, frozenset()) != found:
            self.down[node_id] = found
            self.routes.changed()

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
        out = []
        for dep in self.deployments.values():
            by_version: dict[str, dict[str, float]] = {}  # a deployment's replicas run one or two versions
            for r in dep.replicas.values():
                if r.node and r.state != ReplicaState.STOPPED:
                    if r.version not in by_version:
                        by_version[r.version] = needs(dep.desired_for(r.version))
                    out.append(placement.Placed(r.node, dep.name, by_version[r.version]))
        return out

    def _evictions(self, dep: DeploymentRecord) -> dict[str, str]:
        """The replicas of ``dep`` to move, and why: those on draining nodes, else one the spread asks for."""
        out = {r.id: "node-drain" for r in dep.replicas.values() if r.node in self.draining}
        if dep.moving is not None and dep.moving not in out:
            rec = dep.replicas.get(dep.moving)
            if rec is None or rec.state != ReplicaState.READY:
                dep.moving = None  # moved (or gone some other way)
            else:
                out[dep.moving] = "rebalance"
        if out or dep.deleting or dep.revisions.active is not None:
            return out
        live = sorted((r for r in dep.replicas.values() if r.state != ReplicaState.STOPPED), key=lambda r: r.created_at)
        if len(live) != dep.target or any(r.state != ReplicaState.READY or not r.node for r in live):
            return out  # only a settled deployment is rebalanced: one move at a time
        moving = placement.to_rebalance(self._node_views(), self._placed(), needs(dep.goal()),
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
                    revisions=Revisions.resumed(data["revisions"]) if "revisions" in data else None,
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
                rec = ReplicaRecord(rid, dep.goal().version, actor, state=ReplicaState.UNHEALTHY, health_failures=1,
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
                self.actions.begin_stop(dep, rec, planning.StopIntent(rid, True, "scale-down"))
            elif rec.state in SERVING:
                self.actions.watch(dep, rec)
        for dep in self.deployments.values():
            if dep.desired.autoscaling is not None and dep.autoscaler is None:  # checkpointed before it had a count
                running = sum(r.state in SERVING for r in dep.replicas.values())
                dep.autoscaler = Autoscaler(dep.desired.autoscaling, dep.desired.autoscaling.clamp(running))
        logger.info("recovered %d deployments, adopted %d replicas", len(self.deployments),
                    sum(len(d.replicas) for d in self.deployments.values()))
        self.routes.changed()

    # ---------- API ----------
    def put_deployment(self, name: str, desired: DesiredState) -> None:
        owners = {d.desired.route_prefix: d.name for d in self.deployments.values() if not d.deleting}
        taken = prefix_taken(name, desired.route_prefix, owners)
        if taken is not None:
            raise SpecError("routePrefix", f"{desired.route_prefix} is already used by deployment {taken!r}")
        dep = self.deployments.get(name)
        if dep is None:
            dep = self.deployments[name] = DeploymentRecord(name, desired)
        else:
            serving = dep.revisions.serving_revision
            change = dep.revisions.put(desired, time.time())
            if change is not None:
                dep.error, dep.start_failures, dep.next_start_at = None, 0, 0.0  # new code: retry at once
            if change == "started":
                self.metrics.rollout_started(name)
                lifecycle("rollout_started", deployment=name, version=desired.version, previous=serving.version,
                          revision=dep.revisions.rollout.revision)
            elif change == "reverted":
                lifecycle("rollout_reverted", deployment=name, revision=serving.number, version=desired.version)
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
        version, goal = dep.desired.version, dep.goal().version
        reps = sorted(dep.replicas.values(), key=lambda r: r.created_at)
        views = [r.view() for r in reps]
        failing = dep.error is not None and dep.error.get("version") in dep.starting_versions()
        status = (DeploymentStatus.UPDATING if dep.canary() and not dep.deleting else
                  planning.deployment_status(dep.target, goal, views, deleting=dep.deleting, error=failing))
        return {
            "name": dep.name,
            "version": version,
            "targetReplicas": 0 if dep.deleting else dep.target,
            "desiredReplicas": dep.target,
            "readyReplicas": sum(1 for r in reps if r.state == ReplicaState.READY),
            "updatedReplicas": sum(1 for r in reps if r.version == version
                                   and r.state in (ReplicaState.STARTING, *SERVING)),
            "inFlight": sum(r.info.get("inFlight", 0) for r in reps if r.state in (*SERVING, ReplicaState.DRAINING)),
            "restarts": dep.restarts,
            "status": status,
            "error": None if not failing else {"reason": dep.error["reason"], "message": dep.error["message"],
                                               "traceback": (dep.error.get("traceback") or "")[-2000:]},
            "routePrefix": dep.desired.route_prefix,
            "replicas": [r.observed() for r in reps],
            **({} if dep.autoscaler is None else {"autoscaling": dep.autoscaler.observed()}),
            **dep.revisions.observed(dep.desired),
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
            if rec.state in SERVING and (rec.task is None or rec.task.done()) and now >= rec.next_probe_at:
                health = now >= rec.next_health_at
                if health:
                    rec.next_health_at = now + hc.period_seconds
                rec.next_probe_at = now + min(PROBE_INTERVAL_S, hc.period_seconds)
                rec.task = asyncio.get_running_loop().create_task(self.actions.probe(dep, rec, health, hc.timeout_seconds))
        # Is what is starting waiting for room? (It then says so at once, and a rollout makes room.)
        for rec in dep.replicas.values():
            if (rec.state == ReplicaState.STARTING and rec.actor is not None and now >= rec.next_placement_at
                    and now - rec.created_at >= PLACEMENT_GRACE_S
                    and (rec.placement_task is None or rec.placement_task.done())):
                rec.next_placement_at = now + PROBE_INTERVAL_S
                rec.placement_task = asyncio.get_running_loop().create_task(self.actions.check_placement(dep, rec))
        evict = self._evictions(dep)
        views = [r.view(evict.get(r.id)) for r in dep.replicas.values()]
        if not dep.deleting:
            self._look_at_rollout(dep, views, now)
        # Decide and act: the main set towards the goal, and a canary's replicas beside it.
        goal, canary = dep.goal(), dep.canary()
        plans = [(planning.plan(dep.target, goal.version, [v for v in views if not canary or v.version != canary[0].version],
                                failure_threshold=hc.failure_threshold, deleting=dep.deleting,
                                can_start=now >= dep.next_start_at), goal)]
        if canary is not None:
            plans.append((planning.plan(canary[1], canary[0].version, [v for v in views if v.version == canary[0].version],
                                        failure_threshold=hc.failure_threshold, deleting=dep.deleting,
                                        can_start=now >= dep.next_start_at), canary[0]))
        if not any(p for p, _ in plans):
            return
        started = []
        for p, desired in plans:
            for stop in p.stop:
                rec = dep.replicas.get(stop.replica_id)
                if rec is not None:
                    self.actions.begin_stop(dep, rec, stop)
            started += [start for start in p.start if self._start_replica(dep, start, desired)]
        dep.restarts += sum(1 for s in started if s.replaces is not None)
        if started:  # checkpoint the restart count and next_index (replica names stay unique after a restart)
            self._save(dep)
        self.routes.changed()

    def _look_at_rollout(self, dep: DeploymentRecord, views: list[planning.ReplicaView], now: float) -> None:
        """Show the rollout in progress what its revision's replicas did; act on what it decides."""
        rollout = dep.revisions.rollout
        progress = dep.progress(views)
        change = dep.revisions.look(dep.desired, progress, now)
        if change is None:
            return
        version = dep.revisions.get(rollout.revision).version
        lifecycle(f"rollout_{change.event}", deployment=dep.name, revision=rollout.revision, version=version,
                  reason=rollout.reason, message=change.message)
        if change.event == "stopped":
            self.metrics.rollout_failed(dep.name, rollout.reason)
            if rollout.rolled_back_to is not None:  # the serving revision starts afresh, without the new one's back-off
                dep.error, dep.start_failures, dep.next_start_at = None, 0, 0.0
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
        asks = [self._ask_load(dep, rec) for dep in scaled for rec in dep.replicas.values() if rec.state in SERVING]
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
                                      if r.state in (ReplicaState.STARTING, *SERVING)),
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
        if rec.state in SERVING:
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
                      and r.state in (ReplicaState.STARTING, *SERVING, ReplicaState.DRAINING)]
            held[dep.name] = (len(placed), len(placed) * dep.goal().ray_actor_options.num_cpus)
        return held

    def _start_replica(self, dep: DeploymentRecord, intent: planning.StartIntent, desired: DesiredState) -> bool:
        """Start one replica of ``desired`` on the node placement picks; False if it must wait for room (a node
        is draining and no other has room: left to Ray, the replica could land on the pod that is going)."""
        node = placement.choose_node(self._node_views(), self._placed(), dep.name, needs(desired))
        if node is None and self.draining:
            return False
        self.actions.start(dep, intent, node, desired)
        return True

    # ---------- routing ----------
    def routing_table(self) -> RoutingTable:
        """The table of READY replicas the ingresses route by (built here, once per change; they only read it)."""
        return build_table((self._route(dep) for dep in self.deployments.values() if not dep.deleting),
                           shared_health=self.ingress_nodes == "all", down=frozenset().union(*self.down.values()))

    @staticmethod
    def _route(dep: DeploymentRecord) -> Route:
        """The deployment's READY replicas; while a canary runs, its own apart, with its weight."""
        canary = dep.canary()

        def ready(of_canary: bool) -> tuple[ReplicaRow, ...]:
            return tuple(ReplicaRow(r.id, r.info["host"], r.info["port"], r.info.get("nodeId"),
                                    r.info.get("localSocket"))
                         for r in dep.replicas.values()
                         if r.state == ReplicaState.READY and r.info.get("port")
                         and (canary is not None and r.version == canary[0].version) == of_canary)
        if canary is None:
            return Route(dep.name, dep.goal(), ready(False))
        return Route(dep.name, dep.goal(), ready(False), CanaryRoute(canary[0], ready(True), canary[2]))
