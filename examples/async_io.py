"""An I/O-bound async handler: concurrent requests overlap their waits on one replica."""
import asyncio
import os
import time


async def handler(request):
    seconds = float(request.query.get("seconds", "1"))
    started = time.monotonic()
    await asyncio.sleep(seconds)  # stands in for awaiting a database, an HTTP API, ...
    return {"pid": os.getpid(), "slept": round(time.monotonic() - started, 3)}
