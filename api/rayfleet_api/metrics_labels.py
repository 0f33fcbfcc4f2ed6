"""Labels every rayfleet metric shares, so the same PromQL works for `rayfleet run` and Kubernetes."""
from __future__ import annotations

# `rayfleet run` deploys a manifest as "<name>", as kubectl would apply it into this namespace.
DEFAULT_NAMESPACE = "default"


def split_deployment(name: str) -> tuple[str, str]:
    """(namespace, deployment) of a controller deployment name: the operator names them "<namespace>.<name>"."""
    namespace, sep, deployment = name.rpartition(".")
    return (namespace, deployment) if sep else (DEFAULT_NAMESPACE, name)
