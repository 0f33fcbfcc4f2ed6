"""Operator settings, read once from the environment (the Helm chart sets them)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from rayfleet_api.constants import CONTROL_KEY_ENV, CONTROL_PORT, INGRESS_PORT, METRICS_PORT

DEFAULT_REPLICA_IMAGE = "ghcr.io/rayfleet/replica:0.1.0"


def _resources(prefix: str, cpu: str, memory: str) -> dict[str, Any]:
    # CPU is requested, not limited: CFS throttling stalls the raylet past the GCS's health checks (the
    # node is declared dead and its replicas with it) and stretches request latency; Ray packs replicas
    # by the num-cpus it is given. Memory is limited at what is requested.
    cpu = os.environ.get(f"{prefix}_CPU", cpu)
    memory = os.environ.get(f"{prefix}_MEMORY", memory)
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}}


def _items(value: str | None) -> list[str]:
    """"a, b,c" -> ["a", "b", "c"]."""
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def _port(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    if not value.isdigit() or int(value) > 65535:
        raise SystemExit(f"rayfleet operator: ${name} must be a TCP port (0-65535), not {value!r}")
    return int(value)


@dataclass(frozen=True)
class OperatorConfig:
    replica_image: str = DEFAULT_REPLICA_IMAGE
    control_port: int = CONTROL_PORT  # the rayfleet controller's HTTP API on the head pod
    ingress_port: int = INGRESS_PORT  # HAProxy on every Ray pod; the Service targets it
    metrics_port: int = METRICS_PORT  # the operator's own Prometheus endpoint (metrics.py); 0: none
    resync_seconds: float = 10.0  # level-based re-reconcile period
    # The same for autoscaled deployments (never slower than resync_seconds): the autoscaler moves the count
    # between reconciles, and the workers (and the status) follow it only at a reconcile.
    autoscaled_resync_seconds: float = 2.0
    control_key: str = ""  # derives each RayCluster's controller token (credentials.py); required in from_env
    network_policy: bool = True  # a NetworkPolicy per RayCluster (networkpolicy.py)
    operator_namespace: str = ""  # where the operator's pods run: the only ones its policies let drive a controller
    operator_pod_labels: dict[str, str] = field(default_factory=dict)
    http_namespaces: tuple[str, ...] = ()  # may reach every ServeDeployment's HTTP port (an ingress controller's)
    head_resources: dict[str, Any] = field(default_factory=lambda: _resources("RAYFLEET_HEAD", "1", "2Gi"))
    worker_resources: dict[str, Any] = field(default_factory=lambda: _resources("RAYFLEET_WORKER", "1", "2Gi"))

    @classmethod
    def from_env(cls) -> "OperatorConfig":
        env = os.environ
        if len(env.get(CONTROL_KEY_ENV, "")) < 32:
            raise SystemExit(f"rayfleet operator: ${CONTROL_KEY_ENV} must hold a random key of at least 32 characters "
                             "(the Helm chart makes one): it derives the credential of every RayCluster's controller")
        return cls(
            control_key=env[CONTROL_KEY_ENV],
            network_policy=env.get("RAYFLEET_NETWORK_POLICY", "true").lower() == "true",
            operator_namespace=env.get("RAYFLEET_OPERATOR_NAMESPACE", ""),
            operator_pod_labels=dict(item.split("=", 1) for item in _items(env.get("RAYFLEET_OPERATOR_POD_LABELS"))),
            http_namespaces=tuple(_items(env.get("RAYFLEET_HTTP_NAMESPACES"))),
            replica_image=env.get("RAYFLEET_REPLICA_IMAGE", DEFAULT_REPLICA_IMAGE),
            control_port=int(env.get("RAYFLEET_CONTROL_PORT", CONTROL_PORT)),
            ingress_port=int(env.get("RAYFLEET_INGRESS_PORT", INGRESS_PORT)),
            resync_seconds=float(env.get("RAYFLEET_RESYNC_SECONDS", cls.resync_seconds)),
            autoscaled_resync_seconds=float(env.get("RAYFLEET_AUTOSCALED_RESYNC_SECONDS",
                                                    cls.autoscaled_resync_seconds)),
            metrics_port=_port("RAYFLEET_METRICS_PORT", METRICS_PORT),
        )
