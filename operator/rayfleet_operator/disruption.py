"""The PodDisruptionBudget of a RayCluster rayfleet owns: voluntary evictions (`kubectl drain`, a node
upgrade, the cluster autoscaler) take at most ``maxUnavailable`` of its pods at a time.

An evicted pod counts as unavailable until it is gone, and it goes only once its preStop hook has moved
its replicas to other pods (node_drain), so the next eviction waits for that. Deleting a pod by hand is
not an eviction: the budget doesn't hold it back, the drain still does.
"""
from __future__ import annotations

from typing import Any

from .naming import LABEL_RAY_CLUSTER, cluster_name, labels, owner_reference


def build_pdb(body: dict[str, Any], max_unavailable: int | str) -> dict[str, Any]:
    meta = body["metadata"]
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": cluster_name(body), "namespace": meta["namespace"], "labels": labels(meta["name"]),
                     "ownerReferences": [owner_reference(body)]},
        "spec": {"maxUnavailable": max_unavailable,
                 "selector": {"matchLabels": {LABEL_RAY_CLUSTER: cluster_name(body)}}},
    }


def pdb_needs_update(existing: dict[str, Any], desired: dict[str, Any]) -> bool:
    have = existing.get("spec") or {}
    return any(have.get(k) != v for k, v in desired["spec"].items())
