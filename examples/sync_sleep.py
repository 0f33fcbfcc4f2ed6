"""A blocking handler: `time.sleep` holds its worker thread, so one replica serves one request at a time."""
import os
import time


def handler(request):
    seconds = float(request.query.get("seconds", "1"))
    time.sleep(seconds)  # blocking: concurrent requests queue up behind it (syncThreads: 1)
    return {"pid": os.getpid(), "slept": seconds}
