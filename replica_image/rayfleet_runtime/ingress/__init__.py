"""The ingress process, one per node: an actor that runs HAProxy (the request path), its activator for
deployments scaled to zero, and the node's metrics endpoint (``actor`` hosts them)."""
