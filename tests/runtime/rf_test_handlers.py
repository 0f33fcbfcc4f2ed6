"""Handlers only the runtime tests use (on the Ray workers' PYTHONPATH via conftest)."""
import asyncio
import os
import time


async def async_sleep(request):
    await asyncio.sleep(float(request.query.get("s", "1")))
    return {"pid": os.getpid()}


def sync_sleep(request):
    time.sleep(float(request.query.get("s", "1")))
    return {"pid": os.getpid()}


class Flaky:
    """Raises on /boom, answers otherwise."""

    async def __call__(self, request):
        if request.path.endswith("/boom"):
            raise ValueError("kaboom")
        return {"pid": os.getpid()}


class BrokenInit:
    """Fails in its constructor: a version that can't start (HandlerInitError)."""

    def __init__(self, greeting: str = ""):
        raise RuntimeError("this version cannot start")


class Failing:
    """Answers every request with a 500: a version that starts and then fails its clients."""

    async def __call__(self, request):
        raise RuntimeError("this version fails every request")


async def peer(request):
    """Who connected (``request.remote``) and who the ingress says the client is."""
    return {"pid": os.getpid(), "remote": request.remote, "xff": request.headers.get("X-Forwarded-For")}
