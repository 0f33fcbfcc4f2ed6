"""Each RayCluster's tokens, derived from the operator's key: the operator never reads a Secret.

Whoever can call a controller's API, or Ray's, runs code in the cluster, so each RayCluster gets tokens
of its own: HMAC-SHA256(operator key, "<purpose>/<namespace>/<cluster>"). The operator writes them into
the cluster's Secret (RBAC: secrets create, never get) and computes the controller's again whenever it
calls it; every ServeDeployment sharing the cluster (`rayCluster.existing`) computes the same one, and
a Secret deleted by hand comes back with the very tokens the running pods hold. A new operator key (a
reinstalled chart) means new tokens: delete the RayClusters, the operator makes them again.
"""
from __future__ import annotations

import hashlib
import hmac


def _token(key: str, purpose: str, namespace: str, cluster: str) -> str:
    return hmac.new(key.encode(), f"{purpose}/{namespace}/{cluster}".encode(), hashlib.sha256).hexdigest()


def control_token(key: str, namespace: str, cluster: str) -> str:
    """The rayfleet controller's API token (``Authorization: Bearer``)."""
    return _token(key, "control", namespace, cluster)


def ray_token(key: str, namespace: str, cluster: str) -> str:
    """Ray's own token auth (``RAY_AUTH_TOKEN``) for the cluster's processes."""
    return _token(key, "ray", namespace, cluster)
