"""Each RayCluster's controller token, derived from the operator's key: the operator never reads a Secret.

Whoever can call a controller's API runs code in its cluster, so each RayCluster gets its own token. It
is HMAC-SHA256(operator key, "namespace/cluster"): the operator writes it into the cluster's Secret once
(RBAC: secrets create, never get) and computes it again whenever it calls the controller, and every
ServeDeployment sharing the cluster (`rayCluster.existing`) computes the same one. A new operator key
(a reinstalled chart) means new tokens: delete the RayClusters, the operator makes them again.
"""
from __future__ import annotations

import hashlib
import hmac


def control_token(key: str, namespace: str, cluster: str) -> str:
    return hmac.new(key.encode(), f"{namespace}/{cluster}".encode(), hashlib.sha256).hexdigest()
