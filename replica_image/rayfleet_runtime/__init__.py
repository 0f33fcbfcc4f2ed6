"""rayfleet runtime: replica, controller and HAProxy ingress running inside Ray."""
from rayfleet_runtime.replica.handler import BadRequest, Request, Response

__all__ = ["BadRequest", "Request", "Response"]
