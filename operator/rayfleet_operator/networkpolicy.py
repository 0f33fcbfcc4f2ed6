"""The NetworkPolicy of a RayCluster rayfleet owns: which of its pods' ports answer whom.

The HTTP port (the ingress) admits the spec's ``httpFrom`` peers, by default the pods of the
ServeDeployment's namespace and of the namespaces the operator was given (``http_namespaces``: where an
ingress controller runs). The controller's port admits the operator's pods alone. The metrics port
admits every pod of the Kubernetes cluster: where Prometheus runs is not ours to know, and the endpoint
only reads counters (no request data, no credentials, nothing it can change). Every other port (Ray's
GCS, raylets, object store, dashboard, the replicas' own servers) admits the cluster's own pods.
Egress is left alone. Tokens guard the controller and Ray as well; this keeps everyone else from even
trying.
"""
from __future__ import annotations

from typing import Any

from rayfleet_api.constants import CONTROL_PORT_NAME, INGRESS_PORT_NAME, METRICS_PORT_NAME

from .config import OperatorConfig
from .naming import LABEL_RAY_CLUSTER, labels, owner_reference
from .serve_spec import ServeSpec

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set on every namespace by the API server


def http_peers(spec: ServeSpec, config: OperatorConfig) -> list[dict[str, Any]]:
    """Who may send requests: the spec's ``httpFrom``, or this namespace plus ``config.http_namespaces``."""
    if spec.http_from:
        return spec.http_from
    peers: list[dict[str, Any]] = [{"podSelector": {}}]
    if config.http_namespaces:
        peers.append({"namespaceSelector": {"matchExpressions": [
            {"key": NAMESPACE_NAME_LABEL, "operator": "In", "values": list(config.http_namespaces)}]}})
    return peers


def build_network_policy(body: dict[str, Any], spec: ServeSpec, config: OperatorConfig) -> dict[str, Any]:
    meta = body["metadata"]
    name = spec.cluster.name(meta["name"])
    own_pods = {"podSelector": {"matchLabels": {LABEL_RAY_CLUSTER: name}}}
    ingress = [{"from": http_peers(spec, config), "ports": [{"protocol": "TCP", "port": INGRESS_PORT_NAME}]}]
    if config.operator_namespace:  # unknown (an operator outside the cluster): nobody, rather than everybody
        ingress.append({"from": [{"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: config.operator_namespace}},
                                  "podSelector": {"matchLabels": dict(config.operator_pod_labels)}}],
                        "ports": [{"protocol": "TCP", "port": CONTROL_PORT_NAME}]})
    # Every pod in every namespace (not the world: an empty `from` would admit the nodes and beyond).
    ingress.append({"from": [{"namespaceSelector": {}}], "ports": [{"protocol": "TCP", "port": METRICS_PORT_NAME}]})
    ingress.append({"from": [own_pods]})  # no `ports`: every port, to the cluster's own pods only
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": meta["namespace"], "labels": labels(meta["name"]),
                     "ownerReferences": [owner_reference(body)]},
        "spec": {"podSelector": own_pods["podSelector"], "policyTypes": ["Ingress"], "ingress": ingress},
    }


def policy_needs_update(existing: dict[str, Any], desired: dict[str, Any]) -> bool:
    return existing.get("spec") != desired["spec"]
