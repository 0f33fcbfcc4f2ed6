"""What a ServeDeployment spec means to the runtime: pure functions shared by the operator and `rayfleet run`.

The controller's desired state is the spec's runtime fields plus a `version`: a hash of exactly the
fields that need new replica processes when they change (like a Deployment's pod-template hash).
Fields such as `replicas` or `routePrefix` are applied to running replicas and stay out of the hash.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any

# Answered by the ingress itself on every Ray pod (200 once it routes a deployment, else 404): the
# pods' readiness probe, so that a pod joins the Service only once its HAProxy can route.
INGRESS_READY_PATH = "/-/ingress/ready"

# Spec fields baked into a replica process: changing one rolls the replicas.
VERSIONED_FIELDS = ("handler", "handlerArgs", "maxConcurrency", "syncThreads", "rayActorOptions", "runtimeEnv", "env", "image")

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")
_SUFFIX = {None: 1, "m": 0.001, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


class SpecError(ValueError):
    """A spec value the runtime cannot honour; `field` names it (e.g. `spec.rayActorOptions.memory`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def parse_quantity(value: int | float | str, field: str) -> float:
    """A Kubernetes quantity ("512Mi", "1.5", "250m", 1024) as a plain number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = _QUANTITY.match(str(value))
    if not match:
        raise SpecError(field, f"{value!r} is not a quantity such as 512Mi, 2Gi or 1.5")
    return float(match.group(1)) * _SUFFIX[match.group(2)]


def spec_version(spec: dict[str, Any]) -> str:
    """Stable short hash of the fields that require new replica processes."""
    versioned = {key: spec.get(key) for key in VERSIONED_FIELDS}
    return hashlib.sha256(json.dumps(versioned, sort_keys=True).encode()).hexdigest()[:12]


def desired_state(spec: dict[str, Any]) -> dict[str, Any]:
    """The controller's desired state (PUT /v1/deployments/{name}) for a defaulted spec."""
    options = spec.get("rayActorOptions") or {}
    memory = options.get("memory")
    return {
        "handler": spec["handler"],
        "handlerArgs": spec.get("handlerArgs") or {},
        "replicas": spec.get("replicas", 1),
        "maxConcurrency": spec.get("maxConcurrency", 100),
        "syncThreads": spec.get("syncThreads", 1),
        "routePrefix": spec.get("routePrefix", "/"),
        "requestTimeoutSeconds": spec.get("requestTimeoutSeconds", 60),
        "gracefulShutdownSeconds": spec.get("gracefulShutdownSeconds", 30),
        "version": spec_version(spec),
        "rayActorOptions": {
            "numCpus": options.get("numCpus", 1),
            "numGpus": options.get("numGpus", 0),
            "memory": None if memory is None else int(parse_quantity(memory, "spec.rayActorOptions.memory")),
        },
        "runtimeEnv": spec.get("runtimeEnv"),
        "env": {item["name"]: item.get("value", "") for item in spec.get("env") or []},
        "healthCheck": {"periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3, **(spec.get("healthCheck") or {})},
    }
