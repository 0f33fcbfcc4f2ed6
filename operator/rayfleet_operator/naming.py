"""Names, labels and annotations shared by everything the operator builds."""
from __future__ import annotations

from typing import Any

GROUP, VERSION, PLURAL = "rayfleet.io", "v1alpha1", "servedeployments"
RAY_GROUP, RAY_VERSION, RAY_PLURAL = "ray.io", "v1", "rayclusters"

LABEL_DEPLOYMENT = "rayfleet.io/serve-deployment"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_RAY_CLUSTER = "ray.io/cluster"  # KubeRay puts it on every pod of a RayCluster
LABEL_RAY_NODE_TYPE = "ray.io/node-type"  # and this one: head or worker
ANNOTATION_SPEC_HASH = "rayfleet.io/spec-hash"

CONTROL_PORT_NAME = "rayfleet-ctl"
INGRESS_PORT_NAME = "rayfleet-http"
RAY_AUTH_TOKEN_KEY = "token"  # the key of the token in the RayCluster's auth Secret


def labels(sd_name: str) -> dict[str, str]:
    return {LABEL_MANAGED_BY: "rayfleet", LABEL_DEPLOYMENT: sd_name}


def owner_reference(body: dict[str, Any]) -> dict[str, Any]:
    """Makes the ServeDeployment the controlling owner, so deleting it garbage-collects the object."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ServeDeployment",
        "name": body["metadata"]["name"],
        "uid": body["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def cluster_name(body: dict[str, Any]) -> str:
    """The RayCluster hosting this deployment: the referenced one, or one named after it."""
    existing = ((body.get("spec") or {}).get("rayCluster") or {}).get("existing")
    return existing["name"] if existing else body["metadata"]["name"]


def auth_secret_name(body: dict[str, Any]) -> str:
    """The Secret holding the Ray auth token of the RayCluster this ServeDeployment owns. The uid keeps a
    re-created ServeDeployment off its predecessor's Secret while the garbage collector removes it."""
    return f"{body['metadata']['name']}-ray-auth-{body['metadata']['uid'][:8]}"


def deployment_key(body: dict[str, Any]) -> str:
    """The deployment's name in the controller: unique even when RayClusters are shared."""
    return f"{body['metadata']['namespace']}.{body['metadata']['name']}"
