"""An unmodified FastAPI app as a rayfleet handler (``handler: examples.fastapi_app:app``).

Path parameters, a Pydantic body, a lifespan hook, streaming responses and a WebSocket route, written as
for uvicorn.
Under ``routePrefix: /api`` its routes answer at /api/items/1 and its docs at /api/docs.
"""
import asyncio
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

resources: dict[str, str] = {}


@asynccontextmanager
async def lifespan(app: FastAPI):
    resources["model"] = "loaded"  # e.g. load a model once per replica, before it takes traffic
    yield
    resources.clear()


app = FastAPI(lifespan=lifespan)


class Order(BaseModel):
    item: str
    quantity: int


@app.get("/items/{item_id}")
async def read_item(item_id: int, q: str | None = None):
    return {"item_id": item_id, "q": q, "model": resources.get("model"), "pid": os.getpid()}


@app.post("/orders")
async def create_order(order: Order):
    return {"item": order.item, "quantity": order.quantity, "total": order.quantity * 3}


@app.get("/stream")
async def stream(n: int = 3, interval: float = 0.5):
    async def chunks():
        for i in range(n):
            yield f"chunk {i}\n"  # reaches the client now, not when the last one is produced
            await asyncio.sleep(interval)
    return StreamingResponse(chunks(), media_type="text/plain")


@app.get("/events")
async def events(n: int = 3):
    async def sse():
        for i in range(n):
            yield f"data: {i}\n\n"
            await asyncio.sleep(0.1)
    return StreamingResponse(sse(), media_type="text/event-stream")


@app.websocket("/echo")
async def echo(websocket: WebSocket):
    await websocket.accept()
    try:
        while True:
            await websocket.send_text(f"echo: {await websocket.receive_text()}")
    except WebSocketDisconnect:
        pass
