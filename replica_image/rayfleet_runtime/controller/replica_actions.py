"""What the controller does to one replica, each a background task on its event loop: start it, watch for
its death, probe its health, stop it (unrouted first, then drained, then killed).

``ControllerCore`` (``deployment_state``) decides which replica to start or stop; ``ReplicaActions`` carries
that out through the injected backend (``ray_calls.RayBackend``; a fake in unit tests) and records what
it observed in the ``ReplicaRecord``, announcing every change of what may be routed to the ``RoutePublisher``.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from rayfleet_api.desired import DesiredState
from rayfleet_api.states import ReplicaState
from rayfleet_runtime.controller import planning
from rayfleet_runtime.controller.metrics import ControllerMetrics
from rayfleet_runtime.controller.ray_calls import (RayBackend, ReplicaCallError, ReplicaDied, ReplicaTimeout,
                                                   ReplicaUnavailable, RuntimeEnvFailed)
from rayfleet_runtime.controller.records import SERVING, DeploymentRecord, ReplicaRecord, fits, unschedulable_reason
from rayfleet_runtime.controller.route_publisher import RoutePublisher
from rayfleet_runtime.lifecycle_log import lifecycle

PROBE_INTERVAL_S = 2.0

logger = logging.getLogger("rayfleet.controller")


class ReplicaActions:
    """Starts, watches, probes and stops replicas; ``held_resources`` says which deployments hold the CPUs
    (for the reason a replica waits for room)."""

    def __init__(self, backend: RayBackend, routes: RoutePublisher, metrics: ControllerMetrics, bind_host: str,
                 drain_settle_s: float, held_resources: Callable[[], dict[str, tuple[int, float]]]):
        self.backend = backend
        self.routes = routes
        self.metrics = metrics
        self.bind_host = bind_host
        self.drain_settle_s = drain_settle_s
        self._held_resources = held_resources

    def start(self, dep: DeploymentRecord, intent: planning.StartIntent, node: str | None,
              desired: DesiredState) -> None:
        """Create a replica of ``desired`` (on ``node``; None: where Ray likes); await its start in the background."""
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
            return
        lifecycle("replica_started", deployment=dep.name, replica=rid, version=rec.version, restarts=rec.restarts,
                  node=node)
        rec.task = asyncio.get_running_loop().create_task(self._await_start(dep, rec))

    async def check_placement(self, dep: DeploymentRecord, rec: ReplicaRecord) -> None:
        try:
            if await self.backend.placed(rec.actor):
                rec.unschedulable = None
                return
            available, total = await self.backend.free_resources()
        except Exception as exc:  # noqa: BLE001 - the GCS is busy: ask again next time
            logger.debug("placement of %s unknown: %s", rec.id, exc)
            return
        if rec.state != ReplicaState.STARTING or fits(dep.desired_for(rec.version), available):
            return
        note = unschedulable_reason(dep.desired_for(rec.version), available, total, self._held_resources())
        if rec.unschedulable is None:
            self.metrics.waiting_for_resources(dep.name)
            lifecycle("replica_unschedulable", deployment=dep.name, replica=rec.id, version=rec.version, reason=note)
        rec.unschedulable = note  # kept current in the observed state; logged once per replica

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
        if rec.version in dep.starting_versions():
            dep.error, dep.start_failures, dep.next_start_at = None, 0, 0.0
        self._ready(dep, rec)
        self.watch(dep, rec)
        self.routes.changed()

    def watch(self, dep: DeploymentRecord, rec: ReplicaRecord) -> None:
        """Replace a replica whose process dies as soon as Ray knows (a pending call fails), not at the next
        probe: with the start of a new process that makes ~2 s from kill -9 to a new replica serving."""
        async def watch() -> None:
            while rec.state in SERVING:
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
        if rec.state in SERVING:
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
        if rec.version in dep.starting_versions():
            dep.error = {**{k: error[k] for k in ("reason", "message", "traceback") if k in error}, "version": rec.version}
            dep.start_failures += 1
            dep.next_start_at = time.time() + planning.backoff_seconds(dep.start_failures)

    async def probe(self, dep: DeploymentRecord, rec: ReplicaRecord, health: bool, timeout_s: float) -> None:
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
        if rec.state not in SERVING or (not health and "healthy" not in result):
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

    def begin_stop(self, dep: DeploymentRecord, rec: ReplicaRecord, stop: planning.StopIntent) -> None:
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
