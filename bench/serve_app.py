"""Ray Serve deployments wrapping ``bench.handlers`` (imported only in the Serve runs)."""
from __future__ import annotations

from ray import serve

from bench import handlers


class _AsyncWrap:
    def __init__(self, name: str):
        self.fn = handlers.HANDLERS[name]

    async def __call__(self, request):
        return await self.fn(request)


class _SyncWrap:
    def __init__(self, name: str):
        self.fn = handlers.HANDLERS[name]

    def __call__(self, request):
        return self.fn(request)


AsyncHandler = serve.deployment(_AsyncWrap, name="AsyncHandler")
SyncHandler = serve.deployment(_SyncWrap, name="SyncHandler")


def app(name: str, replicas: int, max_ongoing_requests: int | None):
    base = SyncHandler if name in ("cpu", "seed_sync") else AsyncHandler
    opts = {"num_replicas": replicas, "ray_actor_options": {"num_cpus": 1},
            # only so deleting an app between scenarios takes ~1 s, not ~30 s; no effect under load
            "graceful_shutdown_timeout_s": 1, "graceful_shutdown_wait_loop_s": 0.2}
    if max_ongoing_requests is not None:
        opts["max_ongoing_requests"] = max_ongoing_requests
    return base.options(**opts).bind(name)
