"""Echo: a class handler that answers with what it received, plus which replica process served it."""
import os

from rayfleet_runtime import Response


class Echo:
    def __init__(self, greeting: str = "hello"):
        self.greeting = greeting
        self.pid = os.getpid()

    async def __call__(self, request):
        if request.path.endswith("/fail"):
            raise RuntimeError("asked to fail")
        if request.path.endswith("/status"):
            return Response({"status": int(request.query.get("code", "200"))}, status=int(request.query.get("code", "200")))
        return {
            "greeting": self.greeting,
            "pid": self.pid,
            "method": request.method,
            "path": request.path,
            "query": dict(request.query),
            "body": request.text(),
        }

    def check_health(self):
        return True
