"""The trivial handler as a FastAPI app: what an ASGI app costs over the plain contract, in both systems.

rayfleet serves it as is (``handler: bench.asgi_app:app``); Ray Serve through ``@serve.ingress(app)``
(``bench.serve_app``). Every path answers ``ok``, as ``bench.handlers.trivial`` does.
"""
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

app = FastAPI()


@app.get("/{rest:path}", response_class=PlainTextResponse)
async def trivial(rest: str) -> str:
    return "ok"
