"""The trivial handler as ASGI apps: what serving ASGI costs over the plain contract, in both systems.

* ``app``: a FastAPI app, written as a FastAPI user would; every path answers ``ok``.
* ``bare``: the same answer from a bare ASGI 3 callable (no framework), so the benchmark separates the
  cost of the ASGI server path from the cost of FastAPI's routing, validation and serialization.

rayfleet serves them as they are (``handler: bench.asgi_app:app``); Ray Serve the FastAPI app through
``@serve.ingress(app)`` (``bench.serve_app``).
"""
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

app = FastAPI()


@app.get("/{rest:path}", response_class=PlainTextResponse)
async def trivial(rest: str) -> str:
    return "ok"


_START = {"type": "http.response.start", "status": 200,
          "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"2")]}
_BODY = {"type": "http.response.body", "body": b"ok"}


async def bare(scope, receive, send):
    """An ASGI 3 app answering ``ok`` to every HTTP request."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send(_START)
    await send(_BODY)
