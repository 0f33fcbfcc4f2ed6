"""The controller process: one detached actor on the head node that keeps every deployment's replicas as
desired and publishes the routing table (``actor`` hosts it, ``deployment_state`` decides)."""
