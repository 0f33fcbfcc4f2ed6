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
    # spec.rayCluster.gcsFaultTolerance for the RayClusters that set none (the chart's value; None: no Redis).
    gcs_fault_tolerance: dict[str, Any] | None = None
    # The PodDisruptionBudget of each RayCluster the operator makes: voluntary evictions take at most this
    # many of its pods at a time (None: no budget).
    pdb_max_unavailable: int | str | None = 1

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
            gcs_fault_tolerance=_gcs_fault_tolerance(env.get("RAYFLEET_GCS_REDIS_ADDRESS", ""),
                                                     env.get("RAYFLEET_GCS_REDIS_PASSWORD_SECRET", "")),
            pdb_max_unavailable=_max_unavailable(env.get("RAYFLEET_PDB_MAX_UNAVAILABLE", "1")),
        )


def _gcs_fault_tolerance(address: str, secret: str) -> dict[str, Any] | None:
    """The chart's rayCluster.gcsFaultTolerance: a Redis address and "secret-name/key" of its password."""
    if not address:
        if secret:
            raise SystemExit("rayfleet operator: $RAYFLEET_GCS_REDIS_PASSWORD_SECRET needs $RAYFLEET_GCS_REDIS_ADDRESS")
        return None
    options: dict[str, Any] = {"redisAddress": address}
    if secret:
        name, _, key = secret.partition("/")
        if not name or not key:
            raise SystemExit(f"rayfleet operator: $RAYFLEET_GCS_REDIS_PASSWORD_SECRET must be NAME/KEY, not {secret!r}")
        options["redisPasswordSecret"] = {"name": name, "key": key}
    return options


def _max_unavailable(value: str) -> int | str | None:
    """"" (no budget), a count ("1") or a percentage ("25%"), as a PodDisruptionBudget takes it."""
    value = value.strip()
    if not value:
        return None
    if value.isdigit() and int(value) > 0:
        return int(value)
    if value.endswith("%") and value[:-1].isdigit() and 0 < int(value[:-1]) <= 100:
        return value
    raise SystemExit(f"rayfleet operator: $RAYFLEET_PDB_MAX_UNAVAILABLE must be a count > 0 or a percentage, not {value!r}")
