"""rayfleet runtime: replica, controller and HAProxy ingress running inside Ray."""
from rayfleet_runtime.handler import Request, Response

__all__ = ["Request", "Response"]
