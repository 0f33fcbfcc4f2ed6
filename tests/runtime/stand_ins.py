"""Stand-in replicas for the ingress's runtime tests: tiny aiohttp servers on 127.0.0.1, on one background
event loop in the test process, each answering with its replica id."""
from __future__ import annotations

import asyncio
import collections
import threading

from aiohttp import web

from rayfleet.ports import free_port


class Replicas:
    """aiohttp servers standing in for replica actors, on one background loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.hits: collections.Counter[str] = collections.Counter()
        self.checks: collections.Counter[str] = collections.Counter()  # health checks (GET /-/ready) each got
        self.cancelled: collections.Counter[str] = collections.Counter()
        self.runners: dict[str, web.AppRunner] = {}
        self.ports: dict[str, int] = {}

    def _run(self, coro, timeout=10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, rid: str) -> dict:
        port = free_port()

        async def handle(request: web.Request) -> web.Response:
            self.hits[rid] += 1
            if request.query.get("drop") in (rid, "all"):  # as if killed mid-request: no answer at all
                request.transport.abort()
                return web.Response()
            sleep = float(request.query.get("sleep", 0))
            if sleep:
                try:
                    await asyncio.sleep(sleep)
                except asyncio.CancelledError:
                    self.cancelled[rid] += 1
                    raise
            return web.json_response({"replica": rid, "path": request.path,
                                      "xff": request.headers.getall("X-Forwarded-For", [])},
                                     status=int(request.query.get("status", 200)))

        async def ready(request: web.Request) -> web.Response:
            self.checks[rid] += 1
            return web.Response(text="ok")

        async def go():
            app = web.Application()
            app.router.add_get("/-/ready", ready)
            app.router.add_route("*", "/{tail:.*}", handle)
            runner = web.AppRunner(app, access_log=None, keepalive_timeout=75, handler_cancellation=True)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            return runner

        self.runners[rid] = self._run(go())
        self.ports[rid] = port
        return {"id": rid, "host": "127.0.0.1", "port": port}

    def stop(self, rid: str) -> None:
        """As if the replica died: its port refuses connections from now on."""
        self._run(self.runners.pop(rid).cleanup())

    def close(self) -> None:
        for runner in self.runners.values():
            self._run(runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
