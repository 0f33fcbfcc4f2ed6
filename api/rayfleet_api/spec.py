"""What a ServeDeployment spec means to the controller: the spec (as the API server defaulted it) -> DesiredState.

``version`` hashes exactly the spec fields that need new replica processes when they change (like a
Deployment's pod-template hash); fields such as ``replicas`` or ``routePrefix`` are applied to running
replicas and stay out of it.
"""
from __future__ import annotations

import re
from typing import Any

from rayfleet_api.desired import ActorOptions, Autoscaling, DesiredState, HealthCheck, version_hash
from rayfleet_api.errors import SpecError

# Spec fields baked into a replica process: changing one rolls the replicas. Not `autoscaling`: it moves the
# replica count only.
VERSIONED_FIELDS = ("handler", "handlerArgs", "maxConcurrency", "syncThreads", "maxRequestBodyBytes", "accessLog",
                    "rayActorOptions", "runtimeEnv", "env", "image")

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")
_SUFFIX = {None: 1, "m": 0.001, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def parse_quantity(value: int | float | str, field: str) -> float:
    """A Kubernetes quantity ("512Mi", "1.5", "250m", 1024) as a plain number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = _QUANTITY.match(str(value))
    if not match:
        raise SpecError(field, f"{value!r} is not a quantity such as 512Mi, 2Gi or 1.5")
    return float(match.group(1)) * _SUFFIX[match.group(2)]


def spec_version(spec: dict[str, Any]) -> str:
    """Stable short hash of the spec fields that require new replica processes."""
    return version_hash({key: spec.get(key) for key in VERSIONED_FIELDS})


def desired_state(spec: dict[str, Any]) -> DesiredState:
    """The controller's desired state for a spec; absent fields take DesiredState's defaults."""
    options = spec.get("rayActorOptions") or {}
    memory = options.get("memory")
    present = {attr: spec[key] for attr, key in (
        ("replicas", "replicas"), ("max_concurrency", "maxConcurrency"), ("sync_threads", "syncThreads"),
        ("max_request_body_bytes", "maxRequestBodyBytes"),
        ("route_prefix", "routePrefix"), ("request_timeout_seconds", "requestTimeoutSeconds"),
        ("graceful_shutdown_seconds", "gracefulShutdownSeconds"), ("runtime_env", "runtimeEnv"),
        ("access_log", "accessLog"),
    ) if spec.get(key) is not None}
    health = spec.get("healthCheck") or {}
    return DesiredState(
        handler=spec["handler"],
        version=spec_version(spec),
        handler_args=spec.get("handlerArgs") or {},
        ray_actor_options=ActorOptions(
            num_cpus=options.get("numCpus", ActorOptions.num_cpus),
            num_gpus=options.get("numGpus", ActorOptions.num_gpus),
            memory=None if memory is None else int(parse_quantity(memory, "spec.rayActorOptions.memory"))),
        env={item["name"]: item.get("value", "") for item in spec.get("env") or []},
        health_check=HealthCheck(
            period_seconds=health.get("periodSeconds", HealthCheck.period_seconds),
            timeout_seconds=health.get("timeoutSeconds", HealthCheck.timeout_seconds),
            failure_threshold=health.get("failureThreshold", HealthCheck.failure_threshold)),
        autoscaling=_autoscaling(spec.get("autoscaling")),
        **present,
    )


def _autoscaling(spec: dict[str, Any] | None) -> Autoscaling | None:
    """spec.autoscaling (maxReplicas is required by the CRD) -> Autoscaling; None when it is not set."""
    if spec is None:
        return None
    present = {attr: spec[key] for attr, key in (
        ("min_replicas", "minReplicas"), ("target_in_flight", "targetInFlight"),
        ("upscale_delay_seconds", "upscaleDelaySeconds"), ("downscale_delay_seconds", "downscaleDelaySeconds"),
    ) if spec.get(key) is not None}
    return Autoscaling(max_replicas=spec["maxReplicas"], **present)
