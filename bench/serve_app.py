"""Ray Serve deployments wrapping ``bench.handlers`` (imported only in the Serve runs)."""
from __future__ import annotations

from types import SimpleNamespace

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


class _StreamWrap:
    def __init__(self, name: str):
        self.fn = handlers.HANDLERS[name]

    async def __call__(self, request):
        from starlette.responses import StreamingResponse  # how a Serve deployment streams (Serve's docs)

        return StreamingResponse(self.fn(request), media_type="text/plain")


class _FaultyWrap:
    def __init__(self, record_dir: str):
        self.handler = handlers.Faulty(record_dir)

    async def __call__(self, request):
        # hand it the shape rayfleet's Request has: full path, query mapping, the whole body already read
        return await self.handler(SimpleNamespace(method=request.method, path=request.url.path,
                                                  query=request.query_params, body=await request.body()))


AsyncHandler = serve.deployment(_AsyncWrap, name="AsyncHandler")
SyncHandler = serve.deployment(_SyncWrap, name="SyncHandler")
StreamHandler = serve.deployment(_StreamWrap, name="StreamHandler")
FaultyHandler = serve.deployment(_FaultyWrap, name="FaultyHandler")


def _asgi_deployment():
    from bench import asgi_app

    @serve.deployment(name="AsgiHandler")
    @serve.ingress(asgi_app.app)
    class AsgiHandler:
        def __init__(self, name: str):  # bound as the other wrappers are; the app needs nothing
            pass

    return AsgiHandler


def app(name: str, replicas: int, max_ongoing_requests: int | None):
    base = (_asgi_deployment() if name == "asgi" else SyncHandler if name in ("cpu", "seed_sync")
            else StreamHandler if name == "stream" else AsyncHandler)
    opts = {"num_replicas": replicas, "ray_actor_options": {"num_cpus": 1},
            # only so deleting an app between scenarios takes ~1 s, not ~30 s; no effect under load
            "graceful_shutdown_timeout_s": 1, "graceful_shutdown_wait_loop_s": 0.2}
    if max_ongoing_requests is not None:
        opts["max_ongoing_requests"] = max_ongoing_requests
    return base.options(**opts).bind(name)


def faulty_app(replicas: int, max_ongoing_requests: int | None, num_cpus: float, version: str, record_dir: str):
    """``bench.handlers.Faulty``; ``version`` reaches the replicas as $BENCH_VERSION, so changing it is a rollout."""
    opts = {"num_replicas": replicas,
            "ray_actor_options": {"num_cpus": num_cpus, "runtime_env": {"env_vars": {"BENCH_VERSION": version}}},
            "graceful_shutdown_timeout_s": 1, "graceful_shutdown_wait_loop_s": 0.2}
    if max_ongoing_requests is not None:
        opts["max_ongoing_requests"] = max_ongoing_requests
    return FaultyHandler.options(**opts).bind(record_dir)
