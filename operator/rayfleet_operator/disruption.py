"""The PodDisruptionBudget of a RayCluster rayfleet owns: voluntary evictions (`kubectl drain`, a node
upgrade, the cluster autoscaler) take at most ``maxUnavailable`` of its pods at a time.

The budget says it as ``minAvailable``: the cluster's pods (its head and the workers it asks for) less
``maxUnavailable``. A ``maxUnavailable`` budget needs the pods' controller to have a scale subresource,
which KubeRay's RayCluster lacks (the disruption controller would then allow no eviction at all), so the
operator does that arithmetic and keeps it current as the workers change. An evicted pod counts as
unavailable until it is gone, and it goes only once its preStop hook has moved its replicas to other
pods (node_drain); its replacement must be ready before the next eviction. Deleting a pod by hand is not
an eviction: the budget doesn't hold it back, the drain still does.
"""
from __future__ import annotations

import math
from typing import Any

from .naming import LABEL_RAY_CLUSTER, labels, owner_reference


def min_available(pods: int, max_unavailable: int | str) -> int:
    """``pods`` less ``max_unavailable`` (a count, or a percentage of them rounded up, as Kubernetes does)."""
    if isinstance(max_unavailable, str):
        max_unavailable = math.ceil(pods * int(max_unavailable.rstrip("%")) / 100)
    return max(0, pods - max_unavailable)


def build_pdb(body: dict[str, Any], max_unavailable: int | str, pods: int) -> dict[str, Any]:
    """The budget of the RayCluster rayfleet owns (named after the ServeDeployment, as build_raycluster
    names it) of ``pods`` pods (its head and the workers it asks for)."""
    meta = body["metadata"]
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "labels": labels(meta["name"]),
                     "ownerReferences": [owner_reference(body)]},
        "spec": {"minAvailable": min_available(pods, max_unavailable),
                 "selector": {"matchLabels": {LABEL_RAY_CLUSTER: meta["name"]}}},
    }


def pdb_needs_update(existing: dict[str, Any], desired: dict[str, Any]) -> bool:
    have = existing.get("spec") or {}
    return any(have.get(k) != v for k, v in desired["spec"].items())
