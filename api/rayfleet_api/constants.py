"""Names, ports and paths that more than one side of rayfleet must agree on."""
from __future__ import annotations

# The ServeDeployment API and KubeRay's RayCluster.
GROUP, VERSION, PLURAL, KIND = "rayfleet.io", "v1alpha1", "servedeployments", "ServeDeployment"
API_VERSION = f"{GROUP}/{VERSION}"
RAY_GROUP, RAY_VERSION, RAY_PLURAL = "ray.io", "v1", "rayclusters"

# Ports on every Ray head/worker: the controller's HTTP API (head only) and HAProxy (every node).
CONTROL_PORT, INGRESS_PORT = 8090, 8000
CONTROL_PORT_NAME, INGRESS_PORT_NAME = "rayfleet-ctl", "rayfleet-http"
# Prometheus metrics: one scrape endpoint per pod (every Ray node's ingress actor; the operator's own).
METRICS_PORT, METRICS_PORT_NAME, METRICS_PATH = 9500, "metrics", "/metrics"

# Ray namespace of the controller, the replica actors and the ingress actors; their actor names.
RAY_NAMESPACE = "rayfleet"
CONTROLLER_NAME = "rayfleet-controller"
REPLICA_PREFIX = "rayfleet-replica"

# Answered by the ingress itself on every Ray pod (200 once it routes a deployment, else 404): the
# pods' readiness probe, so that a pod joins the Service only once its HAProxy can route.
INGRESS_READY_PATH = "/-/ingress/ready"
# Answered by each replica's own server: HAProxy's health check of that replica.
REPLICA_READY_PATH = "/-/ready"

# The controller's credential reaches it (and `rayfleet-head-start`) in this environment variable,
# never on a command line; the operator's key, from which it derives each cluster's, in the other.
CONTROL_TOKEN_ENV = "RAYFLEET_CONTROL_TOKEN"
CONTROL_KEY_ENV = "RAYFLEET_CONTROL_KEY"

# The runtime's log level (default INFO) and a second place its lines go (on Ray pods the container's own
# stdout, /proc/1/fd/1, so that `kubectl logs` shows them): see rayfleet_runtime.log_setup.
LOG_LEVEL_ENV, LOG_FILE_ENV = "RAYFLEET_LOG_LEVEL", "RAYFLEET_LOG_FILE"
POD_STDOUT = "/proc/1/fd/1"
