"""Names, labels and annotations of the objects the operator builds (what the other layers share is in
``rayfleet_api.constants``)."""
from __future__ import annotations

from typing import Any

from rayfleet_api.constants import API_VERSION, KIND

LABEL_DEPLOYMENT = "rayfleet.io/serve-deployment"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
# Shared with the chart's operator pod: the chart's PodMonitor selects both by it.
LABEL_PART_OF, PART_OF = "app.kubernetes.io/part-of", "rayfleet"
LABEL_RAY_CLUSTER = "ray.io/cluster"  # KubeRay puts it on every pod of a RayCluster
LABEL_RAY_NODE_TYPE = "ray.io/node-type"  # and this one: head or worker
ANNOTATION_SPEC_HASH = "rayfleet.io/spec-hash"

RAY_AUTH_TOKEN_KEY = "ray-token"  # Ray's own token auth, in the RayCluster's auth Secret
CONTROL_TOKEN_KEY = "control-token"  # the rayfleet controller's API token, in the same Secret


def labels(sd_name: str) -> dict[str, str]:
    return {LABEL_MANAGED_BY: "rayfleet", LABEL_PART_OF: PART_OF, LABEL_DEPLOYMENT: sd_name}


def owner_reference(body: dict[str, Any]) -> dict[str, Any]:
    """Makes the ServeDeployment the controlling owner, so deleting it garbage-collects the object."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": body["metadata"]["name"],
        "uid": body["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def auth_secret_name(body: dict[str, Any]) -> str:
    """The Secret holding the tokens of the RayCluster this ServeDeployment owns. The uid keeps a
    re-created ServeDeployment off its predecessor's Secret while the garbage collector removes it."""
    return f"{body['metadata']['name']}-auth-{body['metadata']['uid'][:8]}"


def deployment_key(body: dict[str, Any]) -> str:
    """The deployment's name in the controller: unique even when RayClusters are shared."""
    return f"{body['metadata']['namespace']}.{body['metadata']['name']}"
