"""The Service that routes traffic to a ServeDeployment: every pod of its RayCluster runs an ingress."""
from __future__ import annotations

from typing import Any

from rayfleet_api.constants import INGRESS_PORT_NAME

from .config import OperatorConfig
from .naming import LABEL_RAY_CLUSTER, labels, owner_reference
from .serve_spec import ServeSpec


def build_service(body: dict[str, Any], spec: ServeSpec, config: OperatorConfig) -> dict[str, Any]:
    meta = body["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "labels": labels(meta["name"]),
                     "ownerReferences": [owner_reference(body)]},
        "spec": {
            "type": "ClusterIP",
            "selector": {LABEL_RAY_CLUSTER: spec.cluster.name(meta["name"])},
            "ports": [{"name": "http", "port": config.ingress_port, "targetPort": INGRESS_PORT_NAME, "protocol": "TCP"}],
        },
    }


def endpoint(body: dict[str, Any], spec: ServeSpec, config: OperatorConfig) -> str:
    meta = body["metadata"]
    return f"http://{meta['name']}.{meta['namespace']}.svc:{config.ingress_port}{spec.desired.route_prefix}"


def service_needs_update(existing: dict[str, Any], desired: dict[str, Any]) -> bool:
    have, want = existing.get("spec") or {}, desired["spec"]
    return have.get("selector") != want["selector"] or [
        {k: p.get(k) for k in ("name", "port", "targetPort")} for p in have.get("ports") or []
    ] != [{k: p[k] for k in ("name", "port", "targetPort")} for p in want["ports"]]
