"""A ServeDeployment's spec, read once into typed values that the reconcile passes around.

``ServeSpec.desired`` is what the controller runs (rayfleet_api's DesiredState, with its defaults);
the rest is what only the operator reads: the RayCluster it builds (``spec.rayCluster``), the pods'
image and who may send requests. The defaults below are the CRD's for those fields (a unit test holds
them together): the API server writes them in only where the enclosing object is present.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rayfleet_api.desired import DesiredState
from rayfleet_api.spec import desired_state


@dataclass(frozen=True)
class WorkerGroup:
    """spec.rayCluster.workers. The CRD's minReplicas/maxReplicas count worker pods, not replicas."""

    min_pods: int = 1
    max_pods: int = 10
    spread_pods: int = 2  # the fewest pods two or more replicas are spread over
    resources: dict[str, Any] | None = None  # None: the chart's (OperatorConfig.worker_resources)

    @classmethod
    def from_spec(cls, workers: dict[str, Any]) -> "WorkerGroup":
        return cls(**_present(workers, min_pods="minReplicas", max_pods="maxReplicas", spread_pods="spreadPods",
                              resources="resources"))


@dataclass(frozen=True)
class ClusterSpec:
    """spec.rayCluster: the RayCluster rayfleet owns, or the name of an existing one to use."""

    existing: str | None = None  # a RayCluster in the same namespace; then nothing else here applies
    ray_version: str = "2.60.0"
    head_resources: dict[str, Any] | None = None  # None: the chart's (OperatorConfig.head_resources)
    workers: WorkerGroup = field(default_factory=WorkerGroup)
    drain_timeout_seconds: int = 120  # a terminating pod's wait for its replicas to move
    gcs_fault_tolerance: dict[str, Any] | None = None  # {redisAddress, redisPasswordSecret}; None: the chart's

    @classmethod
    def from_spec(cls, cluster: dict[str, Any]) -> "ClusterSpec":
        existing = cluster.get("existing")
        return cls(existing=existing["name"] if existing else None,
                   head_resources=(cluster.get("head") or {}).get("resources") or None,
                   workers=WorkerGroup.from_spec(cluster.get("workers") or {}),
                   **_present(cluster, ray_version="rayVersion", drain_timeout_seconds="drainTimeoutSeconds",
                              gcs_fault_tolerance="gcsFaultTolerance"))

    def name(self, deployment: str) -> str:
        """The RayCluster hosting ``deployment``'s replicas: the existing one, or the one named after it."""
        return self.existing or deployment


@dataclass(frozen=True)
class ServeSpec:
    desired: DesiredState
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    image: str | None = None  # None: the chart's replica image
    http_from: list[dict[str, Any]] | None = None  # NetworkPolicy peers; None: networkpolicy's default

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "ServeSpec":
        return cls(desired=desired_state(spec), cluster=ClusterSpec.from_spec(spec.get("rayCluster") or {}),
                   image=spec.get("image") or None, http_from=spec.get("httpFrom") or None)


def _present(obj: dict[str, Any], **keys: str) -> dict[str, Any]:
    """{attribute: obj[key]} for the keys set (not null): absent ones take the dataclass's defaults."""
    return {attr: obj[key] for attr, key in keys.items() if obj.get(key) is not None}
