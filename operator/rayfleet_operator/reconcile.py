"""One level-based reconcile of a ServeDeployment: observe, decide (pure), apply, report.

Returns the status patch and the notable transitions; the kopf handlers only write them out.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from rayfleet_api.controller_client import ControllerClient, ControllerRejected, ControllerUnreachable
from rayfleet_api.states import DeploymentStatus

from . import disruption, networkpolicy, raycluster, service
from .credentials import control_token, ray_token
from .config import OperatorConfig
from .kube import Kube
from .metrics import METRICS
from .naming import LABEL_RAY_CLUSTER, LABEL_RAY_NODE_TYPE, deployment_key
from .serve_spec import ClusterSpec, ServeSpec
from .status import Observation, compute_status, desired_replicas, status_patch, timestamp, transition_events

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    status: dict[str, Any]  # only the changed fields
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    retry: str | None = None  # a transient failure worth retrying sooner, with backoff


def _now() -> str:
    return timestamp(time.time())


async def _ensure_cluster(body: dict[str, Any], config: OperatorConfig, kube: Kube, obs: Observation,
                          existing: dict[str, Any] | None, events: list) -> dict[str, Any]:
    """Create or replace the RayCluster this ServeDeployment owns."""
    desired = raycluster.build_raycluster(body, obs.spec, config, await _workers(body, config, kube, obs, existing))
    update, reason = raycluster.should_update_cluster(existing, desired)
    # The pods read their tokens from this Secret: made before the first RayCluster that needs it, and
    # made again (with the same, derived tokens) if someone deleted it. Create-only: no right to read it.
    namespace = body["metadata"]["namespace"]
    await kube.create_secret_unless_present(raycluster.build_auth_secret(
        body, ray_token(config.control_key, namespace, obs.cluster_name),
        control_token(config.control_key, namespace, obs.cluster_name)))
    if update and existing is None:
        existing = await kube.create_raycluster(desired)
        events.append(("Normal", "RayClusterCreated", f"created RayCluster {obs.cluster_name}"))
        if "gcsFaultToleranceOptions" not in desired["spec"]:
            events.append(("Warning", "NoHeadFaultTolerance", raycluster.NO_FAULT_TOLERANCE))
    elif update:
        existing = await kube.replace_raycluster(desired, existing["metadata"]["resourceVersion"])
        events.append(("Normal", "RayClusterUpdated", f"updated RayCluster {obs.cluster_name}: {reason}"))
    return existing


async def _workers(body: dict[str, Any], config: OperatorConfig, kube: Kube, obs: Observation,
                   existing: dict[str, Any] | None) -> tuple[int, list[str]]:
    """The worker count (and pods to delete): the plan's, except that only idle pods ever go. The plan
    makes room for the replicas the controller runs towards: with autoscaling, the autoscaler's count."""
    replicas = desired_replicas(obs.spec.desired, obs.controller, body.get("status"))
    wanted = raycluster.plan_workers(obs.spec, config, replicas).pods
    now = raycluster.requested_worker_pods(existing)
    if now is None:
        return wanted, []
    current, named = now
    if wanted >= current and not named:
        return wanted, []
    if obs.controller is None:  # where the replicas run is unknown: keep every worker for now
        return current, named
    pods = await kube.list_pods(body["metadata"]["namespace"],
                                f"{LABEL_RAY_CLUSTER}={obs.cluster_name},{LABEL_RAY_NODE_TYPE}=worker")
    serving = {r.get("nodeIp") for r in obs.controller.get("replicas") or []}
    return raycluster.shrink_workers(current, wanted, pods, serving, named)


def _serving_pods(pods: list[dict[str, Any]]) -> int | None:
    """How many of the cluster's pods are in its Service's endpoints: Ready (their HAProxy routes) and not
    terminating. None when there are no Pod objects at all (the local provider's clusters)."""
    if not pods:
        return None
    return sum(1 for p in pods if not p["metadata"].get("deletionTimestamp") and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in (p.get("status") or {}).get("conditions") or []))


async def _ensure(desired: dict[str, Any], get, create, replace, needs_update) -> None:
    """Create ``desired``, or replace the existing object (at its resourceVersion) when it differs."""
    existing = await get(desired["metadata"]["namespace"], desired["metadata"]["name"])
    if existing is None:
        await create(desired)
    elif needs_update(existing, desired):
        await replace(desired, existing["metadata"]["resourceVersion"])


async def _ensure_network_policy(body: dict[str, Any], spec: ServeSpec, config: OperatorConfig, kube: Kube) -> None:
    await _ensure(networkpolicy.build_network_policy(body, spec, config), kube.get_network_policy,
                  kube.create_network_policy, kube.replace_network_policy, networkpolicy.policy_needs_update)


async def _ensure_pdb(body: dict[str, Any], config: OperatorConfig, kube: Kube, cluster: dict[str, Any]) -> None:
    workers, _ = raycluster.requested_worker_pods(cluster)
    await _ensure(disruption.build_pdb(body, config.pdb_max_unavailable, 1 + workers), kube.get_pdb,
                  kube.create_pdb, kube.replace_pdb, disruption.pdb_needs_update)


async def _ensure_service(body: dict[str, Any], spec: ServeSpec, config: OperatorConfig, kube: Kube) -> None:
    desired = service.build_service(body, spec, config)
    existing = await kube.get_service(body["metadata"]["namespace"], body["metadata"]["name"])
    if existing is None:
        await kube.create_service(desired)
    elif service.service_needs_update(existing, desired):
        await kube.patch_service(desired)


def _client(namespace: str, cluster: str, url: str, config: OperatorConfig) -> ControllerClient:
    return ControllerClient(url, control_token(config.control_key, namespace, cluster))


async def _controller_call(call, *args) -> Any:
    """One controller call. The client blocks: in a thread, so kopf's event loop never waits on a slow
    controller. Failures are counted."""
    try:
        return await asyncio.to_thread(call, *args)
    except (ControllerRejected, ControllerUnreachable) as exc:
        METRICS.api_error("controller", type(exc).__name__)
        raise


async def _observe_controller(body: dict[str, Any], cluster: dict[str, Any], config: OperatorConfig,
                              obs: Observation) -> None:
    url = raycluster.controller_url(cluster, config)
    if url is None:
        obs.controller_error = "the RayCluster reports no head pod address yet"
    else:
        key, control = deployment_key(body), _client(body["metadata"]["namespace"], obs.cluster_name, url, config)
        try:
            await _controller_call(control.put_deployment, key, obs.spec.desired)
            obs.controller = await _controller_call(control.get_deployment, key)
        except ControllerRejected as exc:
            obs.problems.append(f"the controller rejected the spec: {exc}")
        except ControllerUnreachable as exc:
            obs.controller_error = f"rayfleet controller at {url}: {exc}"
    METRICS.controller_reachable(body["metadata"]["namespace"], body["metadata"]["name"], obs.controller_error is None)


async def reconcile(body: dict[str, Any], config: OperatorConfig, kube: Kube) -> Outcome:
    meta, spec = body["metadata"], ServeSpec.from_spec(body["spec"])
    name = spec.cluster.name(meta["name"])
    obs = Observation(generation=meta.get("generation", 0), spec=spec, cluster_name=name,
                      selector=f"{LABEL_RAY_CLUSTER}={name}", endpoint=service.endpoint(body, spec, config),
                      problems=raycluster.spec_problems(spec, config))
    events: list[tuple[str, str, str]] = []
    if not obs.problems:
        existing = await kube.get_raycluster(meta["namespace"], name)
        shared = spec.cluster.existing is not None
        obs.cluster_conflict = None if shared else raycluster.ownership_conflict(existing, meta["uid"])
        if not obs.cluster_conflict:
            # The controller hears of a change first: on scale-down it drains replicas, and only then
            # can the workers they ran on go (see _workers). A head that is up but not ready yet (it is
            # ready once it routes, which takes the deployment sent here) is reached by its pod IP.
            if raycluster.readiness(existing)[0] or raycluster.head_pod_ip(existing):
                await _observe_controller(body, existing, config, obs)
            cluster = existing if shared else await _ensure_cluster(body, config, kube, obs, existing, events)
            if not shared and config.network_policy:
                await _ensure_network_policy(body, spec, config, kube)
            if not shared and config.pdb_max_unavailable is not None:
                await _ensure_pdb(body, config, kube, cluster)
            ready, obs.cluster_state = raycluster.readiness(cluster)
            obs.cluster_ready = ready or obs.controller is not None
            obs.head_fault_tolerant = bool(((cluster or {}).get("spec") or {}).get("gcsFaultToleranceOptions"))
            if obs.controller is not None:
                obs.serving_pods = _serving_pods(await kube.list_pods(meta["namespace"], obs.selector))
        await _ensure_service(body, spec, config, kube)

    old_status = body.get("status") or {}
    new_status = compute_status(obs, old_status, _now())
    events.extend(transition_events(old_status, new_status))
    return Outcome(status_patch(old_status, new_status), events, retry=obs.controller_error)


async def finalize(body: dict[str, Any], config: OperatorConfig, kube: Kube) -> bool:
    """Ask the controller to drain and remove this deployment's replicas; True once they are gone.

    A missing or unready RayCluster has no replicas to drain, so deletion is never blocked by it.
    """
    meta, cluster_spec = body["metadata"], ClusterSpec.from_spec((body.get("spec") or {}).get("rayCluster") or {})
    namespace, name = meta["namespace"], cluster_spec.name(meta["name"])
    cluster = await kube.get_raycluster(namespace, name)
    ready, _ = raycluster.readiness(cluster)
    url = raycluster.controller_url(cluster, config) if ready else None
    if url is None:
        return True
    key, control = deployment_key(body), _client(namespace, name, url, config)
    observed = await _controller_call(control.get_deployment, key)
    if observed is None:
        return True
    if observed.get("status") != DeploymentStatus.DELETING:
        await _controller_call(control.delete_deployment, key)
    return False
