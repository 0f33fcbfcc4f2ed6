"""The rayfleet Kubernetes operator (kopf). It reconciles ServeDeployments and never imports Ray."""
