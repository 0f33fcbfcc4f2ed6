"""The desired KubeRay RayCluster for a ServeDeployment, and whether an existing one needs updating.

Pure functions in the spirit of KubeRay's controllers/ray/common: build the object from the spec,
decide with a (bool, reason) pair, and let the caller do the I/O.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from rayfleet_api.constants import (CONTROL_PORT_NAME, CONTROL_TOKEN_ENV, INGRESS_PORT_NAME, INGRESS_READY_PATH,
                                    LOG_FILE_ENV, METRICS_PORT, METRICS_PORT_NAME, POD_STDOUT, RAY_GROUP, RAY_VERSION)
from rayfleet_api.errors import SpecError
from rayfleet_api.quantity import parse_quantity

from .config import OperatorConfig
from .naming import (ANNOTATION_SPEC_HASH, CONTROL_TOKEN_KEY, LABEL_RAY_CLUSTER, LABEL_RAY_NODE_TYPE, RAY_AUTH_TOKEN_KEY,
                     auth_secret_name, labels, owner_reference)
from .serve_spec import ClusterSpec, ServeSpec

GPU_RESOURCE = "nvidia.com/gpu"
HEAD_CONTAINER, WORKER_CONTAINER = "ray-head", "ray-worker"
PRESTOP_MIN_S = 5  # a terminating pod leaves the Service's endpoints: the proxies learn it within this
# Past the drain, a terminating pod's replicas get gracefulShutdownSeconds for what is in flight, after the
# proxies' keep-alive settle (6 s), and the hook its own minimum: the grace period covers all of it.
TERMINATION_MARGIN_S = 15
RAY_UID, RAY_GID = 1000, 100  # user `ray`, group `users` in rayproject/ray (and the e2e stand-in)


@dataclass(frozen=True)
class WorkerPlan:
    pods: int  # worker pods to ask for
    min_pods: int
    max_pods: int
    cpus_per_worker: int
    capped: bool  # the replicas need more worker pods than max_pods allows


def _resource(resources: dict[str, Any], name: str) -> Any:
    return (resources.get("limits") or {}).get(name, (resources.get("requests") or {}).get(name))


def worker_resources(cluster: ClusterSpec, config: OperatorConfig) -> dict[str, Any]:
    return cluster.workers.resources or config.worker_resources


def plan_workers(spec: ServeSpec, config: OperatorConfig, replicas: int | None = None) -> WorkerPlan:
    """Size the worker group so the reserved CPUs of ``replicas`` replicas fit, within min..max pods.
    ``replicas``: the count the controller runs towards (the autoscaler's); default spec.replicas."""
    workers = spec.cluster.workers
    cpu = _resource(worker_resources(spec.cluster, config), "cpu")
    cpus_per_worker = max(1, math.floor(parse_quantity(cpu, "spec.rayCluster.workers.resources.cpu"))) if cpu else 1
    if replicas is None:
        replicas = spec.desired.replicas
    per_replica = spec.desired.ray_actor_options.num_cpus
    # Replicas are packed by whole replicas per worker, as Ray's scheduler does, over at least `spread`
    # pods (never more pods than replicas) so that no one pod's loss takes them all.
    per_worker = math.floor(cpus_per_worker / per_replica + 1e-9) if per_replica else replicas or 1
    packed = math.ceil(replicas / per_worker) if replicas and per_worker else 0
    needed = max(packed, min(workers.spread_pods, replicas))
    return WorkerPlan(max(workers.min_pods, min(needed, workers.max_pods)), workers.min_pods, workers.max_pods,
                      cpus_per_worker, packed > workers.max_pods)


def requested_worker_pods(cluster: dict[str, Any] | None) -> tuple[int, list[str]] | None:
    """The worker pods a RayCluster asks for now, and those it names for deletion (None: no cluster)."""
    if cluster is None:
        return None
    group = ((cluster.get("spec") or {}).get("workerGroupSpecs") or [{}])[0]
    return group.get("replicas", 0), list((group.get("scaleStrategy") or {}).get("workersToDelete") or [])


def shrink_workers(current: int, wanted: int, worker_pods: list[dict[str, Any]], replica_ips: set[str | None],
                   named: list[str] = ()) -> tuple[int, list[str]]:
    """The worker count to ask for, and the pods to delete, given the plan's count.

    With autoscaling off, KubeRay deletes arbitrary worker pods when the count drops below the pods
    running, serving replicas or not. So the count drops freely only by workers that don't run (not yet
    created, or terminating), and beyond that only by pods that host no replica (the controller drains
    replicas first), named in the group's scaleStrategy.workersToDelete. Names stay listed until their
    pod is gone, as KubeRay may act on them a reconcile later. A replica not yet placed (no node IP)
    could land on any pod: then no pod counts as idle.
    """
    live = [p for p in worker_pods if not p["metadata"].get("deletionTimestamp")]
    still_named = [name for name in named if name in {p["metadata"]["name"] for p in live}]
    if wanted >= current:
        return wanted, still_named
    free = min(current - wanted, max(0, current - len(live) + len(still_named)))
    idle = [] if None in replica_ips else sorted(
        p["metadata"]["name"] for p in live
        if p["metadata"]["name"] not in still_named and (p.get("status") or {}).get("podIP") not in replica_ips)
    going = idle[:current - wanted - free]
    return current - free - len(going), still_named + going


def spec_problems(spec: ServeSpec, config: OperatorConfig) -> list[str]:
    """What the schema can't catch: replicas that could never be scheduled on the workers described."""
    if spec.cluster.existing:
        return []  # the referenced cluster's shape is not ours to judge
    problems = []
    options = spec.desired.ray_actor_options
    resources = worker_resources(spec.cluster, config)
    try:
        plan = plan_workers(spec, config)
        if options.num_cpus > plan.cpus_per_worker:
            problems.append(f"rayActorOptions.numCpus={options.num_cpus} exceeds the {plan.cpus_per_worker} CPU(s) of a worker "
                            "(rayCluster.workers.resources.limits.cpu); no replica could be scheduled")
        gpus = _resource(resources, GPU_RESOURCE)
        if options.num_gpus > (parse_quantity(gpus, "spec.rayCluster.workers.resources.nvidia.com/gpu") if gpus else 0):
            problems.append(f"rayActorOptions.numGpus={options.num_gpus} but a worker offers "
                            f"{gpus or 0} {GPU_RESOURCE} (rayCluster.workers.resources.limits)")
        worker_memory = _resource(resources, "memory")
        if options.memory is not None and worker_memory and (
                options.memory > parse_quantity(worker_memory, "spec.rayCluster.workers.resources.memory")):
            problems.append(f"rayActorOptions.memory={options.memory} bytes exceeds a worker's memory {worker_memory}")
    except SpecError as exc:
        problems.append(str(exc))
    return problems


def _container(name: str, image: str, resources: dict[str, Any], ports: list[dict[str, Any]], env: list[dict[str, str]],
               ingress_port: int, drain_timeout_s: int) -> dict[str, Any]:
    # KubeRay's own readiness check (what it injects when a container declares none: the raylet, and on
    # the head the GCS) plus our ingress: a pod joins the Service only once its HAProxy routes, so it
    # never takes requests it would refuse, or answer 404 for want of routes; a new head too (the operator
    # talks to the controller by the head's pod IP, ready or not). KubeRay still injects its liveness probe.
    checks = ["wget --tries 1 -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz | grep success"]
    if name == HEAD_CONTAINER:
        checks.append("wget --tries 1 -T 2 -q -O- http://localhost:8265/api/gcs_healthz | grep success")
    checks.append(f"wget --tries 1 -T 2 -q -O /dev/null http://localhost:{ingress_port}{INGRESS_READY_PATH}")
    return {
        "name": name, "image": image, "resources": copy.deepcopy(resources), "ports": ports, "env": env,
        "readinessProbe": {"exec": {"command": ["bash", "-c", " && ".join(checks)]},
                           "initialDelaySeconds": 10, "periodSeconds": 5, "timeoutSeconds": 5, "failureThreshold": 10},
        # Deleted, evicted or drained, the pod first gives its replicas away (node_drain: new ones serve
        # elsewhere before these drain) while it leaves the Service's endpoints; its HAProxy keeps serving
        # what is in flight (and what proxies have not yet stopped sending) meanwhile.
        "lifecycle": {"preStop": {"exec": {"command": [
            "rayfleet-node-drain", "--timeout", str(drain_timeout_s), "--min-seconds", str(PRESTOP_MIN_S)]}}},
        # The `restricted` Pod Security Standard; KubeRay copies this to the init containers it adds.
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }


def _pod_spec(container: dict[str, Any], grace_s: int, spread_among: dict[str, str]) -> dict[str, Any]:
    return {
        "containers": [container],
        # Pods matching `spread_among` on as many Kubernetes nodes as there are (a preference, never a
        # reason to stay Pending): the controller spreads replicas over pods, so this is what keeps a lost
        # node from taking every replica with it.
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                       "whenUnsatisfiable": "ScheduleAnyway",
                                       "labelSelector": {"matchLabels": spread_among}}],
        "terminationGracePeriodSeconds": grace_s,  # the preStop drain, then the replicas' own grace
        # Ray's user in the replica image (rayproject/ray's): numeric, so the kubelet can check runAsNonRoot.
        "securityContext": {"runAsNonRoot": True, "runAsUser": RAY_UID, "runAsGroup": RAY_GID, "fsGroup": RAY_GID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "automountServiceAccountToken": False,  # nothing in a Ray pod talks to the Kubernetes API
    }


def build_raycluster(body: dict[str, Any], spec: ServeSpec, config: OperatorConfig,
                     workers: tuple[int, list[str]] | None = None) -> dict[str, Any]:
    """The RayCluster rayfleet owns for this ServeDeployment (not called for rayCluster.existing).

    `workers`: the worker count and the pods to delete, from shrink_workers; default: the plan's count.
    """
    meta, cluster = body["metadata"], spec.cluster
    image = spec.image or config.replica_image
    drain_s = cluster.drain_timeout_seconds
    grace_s = drain_s + math.ceil(spec.desired.graceful_shutdown_seconds) + TERMINATION_MARGIN_S
    plan = plan_workers(spec, config)
    worker_count, workers_to_delete = workers or (plan.pods, [])
    pod_labels = labels(meta["name"])
    http_port = {"containerPort": config.ingress_port, "name": INGRESS_PORT_NAME, "protocol": "TCP"}
    # Every Ray pod's scrape endpoint (its node's ingress actor serves it): declared, so that a PodMonitor
    # or Prometheus's kubernetes_sd finds it by name.
    metrics_port = {"containerPort": METRICS_PORT, "name": METRICS_PORT_NAME, "protocol": "TCP"}
    env = [{"name": "RAYFLEET_CONTROL_PORT", "value": str(config.control_port)},
           {"name": "RAYFLEET_INGRESS_PORT", "value": str(config.ingress_port)},
           # The actors' log lines (lifecycle events, errors, access logs) also go to the container's own
           # stdout, so `kubectl logs` shows them; Ray writes actor output only to files in the pod.
           {"name": LOG_FILE_ENV, "value": POD_STDOUT},
           # Ray's token auth: without a token, `ray start` leaves it off and any pod that reaches the
           # cluster can run code in it. KubeRay copies this env into the workers' init container too.
           {"name": "RAY_AUTH_MODE", "value": "token"},
           {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {
               "name": auth_secret_name(body), "key": RAY_AUTH_TOKEN_KEY}}}]
    head = _container(HEAD_CONTAINER, image, cluster.head_resources or config.head_resources, [
        {"containerPort": 6379, "name": "gcs-server", "protocol": "TCP"},
        {"containerPort": 8265, "name": "dashboard", "protocol": "TCP"},
        {"containerPort": 10001, "name": "client", "protocol": "TCP"},
        {"containerPort": config.control_port, "name": CONTROL_PORT_NAME, "protocol": "TCP"},
        http_port,
        metrics_port,
    ], env + [{"name": CONTROL_TOKEN_ENV, "valueFrom": {"secretKeyRef": {  # the controller's API credential
        "name": auth_secret_name(body), "key": CONTROL_TOKEN_KEY}}}], config.ingress_port, drain_s)
    # The replica image starts the rayfleet controller once Ray is up on the head (see replica_image/).
    head["lifecycle"]["postStart"] = {"exec": {"command": ["/bin/sh", "-c", "rayfleet-head-start"]}}
    worker = _container(WORKER_CONTAINER, image, worker_resources(cluster, config), [http_port, metrics_port], env,
                        config.ingress_port, drain_s)
    spec_out = {
        "rayVersion": cluster.ray_version,
        "enableInTreeAutoscaling": False,
        "headGroupSpec": {
            "serviceType": "ClusterIP",
            # num-cpus 0 keeps replicas off the head: it hosts the controller and an ingress only.
            # The dashboard (and its Jobs API, which runs code) listens inside the pod only: KubeRay's probes
            # reach it there, and so does `kubectl port-forward`.
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "127.0.0.1"},
            "template": {"metadata": {"labels": dict(pod_labels)},
                         "spec": _pod_spec(head, grace_s, {LABEL_RAY_CLUSTER: meta["name"]})},
        },
        "workerGroupSpecs": [{
            "groupName": "replicas",
            "replicas": worker_count,
            "minReplicas": plan.min_pods,
            # A lowered maxReplicas can't take down pods that still serve: they go once drained.
            "maxReplicas": max(plan.max_pods, worker_count),
            **({"scaleStrategy": {"workersToDelete": workers_to_delete}} if workers_to_delete else {}),
            "rayStartParams": {"num-cpus": str(plan.cpus_per_worker)},
            # The workers among themselves: spread over the cluster's pods, both workers could share a
            # node (the head alone on the other is as even), and with them every replica.
            "template": {"metadata": {"labels": dict(pod_labels)},
                         "spec": _pod_spec(worker, grace_s, {LABEL_RAY_CLUSTER: meta["name"], LABEL_RAY_NODE_TYPE: "worker"})},
        }],
    }
    fault_tolerance = gcs_fault_tolerance(cluster, config)
    if fault_tolerance:
        spec_out["gcsFaultToleranceOptions"] = fault_tolerance
    return {
        "apiVersion": f"{RAY_GROUP}/{RAY_VERSION}",
        "kind": "RayCluster",
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "labels": dict(pod_labels),
            "annotations": {ANNOTATION_SPEC_HASH: object_hash(spec_out)},
            "ownerReferences": [owner_reference(body)],
        },
        "spec": spec_out,
    }


NO_FAULT_TOLERANCE = ("the RayCluster has no GCS fault tolerance (spec.rayCluster.gcsFaultTolerance, or the chart's "
                      "rayCluster.gcsFaultTolerance, names a Redis): losing its head pod restarts every replica")


def gcs_fault_tolerance(cluster: ClusterSpec, config: OperatorConfig) -> dict[str, Any] | None:
    """KubeRay's gcsFaultToleranceOptions from spec.rayCluster.gcsFaultTolerance, else the chart's default
    (None: no Redis, and a head loss costs every replica)."""
    wanted = cluster.gcs_fault_tolerance or config.gcs_fault_tolerance
    if not wanted:
        return None
    options: dict[str, Any] = {"redisAddress": wanted["redisAddress"]}
    secret = wanted.get("redisPasswordSecret")
    if secret:
        options["redisPassword"] = {"valueFrom": {"secretKeyRef": {"name": secret["name"], "key": secret["key"]}}}
    return options


def build_auth_secret(body: dict[str, Any], ray_token: str, control_token: str) -> dict[str, Any]:
    """The Secret with the tokens of the RayCluster rayfleet owns: Ray's own and the controller's
    (credentials.py derives both)."""
    meta = body["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": auth_secret_name(body), "namespace": meta["namespace"],
                     "labels": labels(meta["name"]), "ownerReferences": [owner_reference(body)]},
        "stringData": {RAY_AUTH_TOKEN_KEY: ray_token, CONTROL_TOKEN_KEY: control_token},
    }


def object_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def should_update_cluster(existing: dict[str, Any] | None, desired: dict[str, Any]) -> tuple[bool, str]:
    """Whether to write `desired` over `existing`, and why (the reason lands in a condition message)."""
    if existing is None:
        return True, "RayCluster does not exist"
    conflict = ownership_conflict(existing, desired["metadata"]["ownerReferences"][0]["uid"])
    if conflict:
        return False, conflict
    have = (existing["metadata"].get("annotations") or {}).get(ANNOTATION_SPEC_HASH)
    want = desired["metadata"]["annotations"][ANNOTATION_SPEC_HASH]
    if have != want:
        return True, f"RayCluster spec hash changed from {have} to {want}"
    return False, "RayCluster is up to date"


def ownership_conflict(existing: dict[str, Any] | None, uid: str) -> str | None:
    """Why an existing RayCluster of our name isn't ours to manage (None: it is, or there is none)."""
    if existing is not None and not owned_by(existing, uid):
        return f"RayCluster {existing['metadata']['name']} exists and is not owned by this ServeDeployment"
    return None


def owned_by(obj: dict[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])


def head_pod_ip(cluster: dict[str, Any] | None) -> str | None:
    """The head pod's address as KubeRay reports it, ready or not (a new head is ready only once it routes,
    which needs the operator to have reached its controller)."""
    return (((cluster or {}).get("status") or {}).get("head") or {}).get("podIP")


def readiness(cluster: dict[str, Any] | None) -> tuple[bool, str]:
    """Whether the head is up (the controller lives there), and KubeRay's word for the state."""
    if cluster is None:
        return False, "missing"
    status = cluster.get("status") or {}
    head_ready = any(c.get("type") == "HeadPodReady" and c.get("status") == "True" for c in status.get("conditions") or [])
    state = status.get("state") or "pending"
    return head_ready or state == "ready", state


def controller_url(cluster: dict[str, Any], config: OperatorConfig) -> str | None:
    """The controller's API on the head pod, from the RayCluster status KubeRay (or the local provider) wrote."""
    status = cluster.get("status") or {}
    head = status.get("head") or {}
    host = head.get("podIP") or head.get("serviceIP")
    port = (status.get("endpoints") or {}).get(CONTROL_PORT_NAME, config.control_port)
    return f"http://{host}:{port}" if host else None
