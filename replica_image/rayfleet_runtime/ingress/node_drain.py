"""A terminating pod gives its replicas away before it goes: the node end and the preStop end.

Kubernetes runs a container's ``preStop`` hook before it sends SIGTERM, and waits for it (within
``terminationGracePeriodSeconds``) whether the pod was deleted, evicted or drained. Every Ray pod's
hook is ``rayfleet-node-drain``: it asks its node's ingress actor, over a Unix socket in the container
(nothing outside the pod can reach it), to drain the node. The ingress tells the controller, which
starts replacements on other nodes, routes to them and drains the replicas here; the hook returns
once none is left (or its timeout is up), and no sooner than ``--min-seconds`` after it started, so
that the proxies sending to this pod (kube-proxy, every HAProxy) have stopped before it stops.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import socketserver
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Callable
from urllib.parse import parse_qs, urlparse

from rayfleet_api.constants import INGRESS_PORT

logger = logging.getLogger("rayfleet.ingress")

POLL_S = 1.0
DEFAULT_TIMEOUT_S = 120.0
ENDPOINTS_SETTLE_S = 5.0  # a terminating pod leaves the Service's endpoints; the proxies learn it within this


SOCKET_NAME = "drain.sock"


def ingress_workdir(ingress_port: int) -> str:
    """The working directory of the ingress serving ``ingress_port`` (its HAProxy's sockets and config, and
    the drain socket): the hook finds the socket there without asking anyone. Unix socket paths must stay
    short (108 bytes), hence under /tmp."""
    return os.path.join(tempfile.gettempdir(), f"rayfleet-ingress-{ingress_port}")


def socket_path(ingress_port: int) -> str:
    """Where the ingress of the node serving ``ingress_port`` listens for drain requests."""
    return os.path.join(ingress_workdir(ingress_port), SOCKET_NAME)


def drain(ask: Callable[[float], int], timeout_s: float, poll_s: float = POLL_S,
          clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> dict:
    """Ask the controller (``ask(seconds left)``: replicas still on this node) until none is left or the time
    is up. A controller that can't be reached (its head pod restarting) is asked again: the replicas here
    still serve, and may yet be moved."""
    deadline, remaining, error = clock() + timeout_s, None, None
    while True:
        try:
            remaining, error = ask(max(0.0, deadline - clock())), None
        except Exception as exc:  # noqa: BLE001 - unreachable for now
            error = f"{type(exc).__name__}: {exc}"[:300]
        if remaining == 0 or clock() >= deadline:
            return {"remaining": remaining, "drained": remaining == 0, "error": error}
        sleep(min(poll_s, max(0.0, deadline - clock())))


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def serve(path: str, ask: Callable[[float], int]) -> _Server:
    """``POST /drain?timeout=SECONDS`` on the Unix socket ``path``, in a thread of its own (the wait must not
    hold the ingress actor's event loop). Returns the server (``shutdown()`` stops it)."""
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            url = urlparse(self.path)
            if url.path != "/drain":
                return self._answer(404, {"error": f"no {url.path}"})
            try:
                timeout_s = float(parse_qs(url.query).get("timeout", [DEFAULT_TIMEOUT_S])[0])
            except ValueError:
                return self._answer(400, {"error": "timeout must be a number of seconds"})
            logger.info("this node is draining (%.0f s at most)", timeout_s)
            result = drain(ask, timeout_s)
            logger.info("node drain ended: %s", result)
            self._answer(200, result)

        def _answer(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def address_string(self) -> str:  # a Unix socket's peer has no host
            return "local"

        def log_message(self, *_args) -> None:
            pass

    if os.path.exists(path):
        os.unlink(path)
    server = _Server(path, Handler)
    os.chmod(path, 0o600)
    threading.Thread(target=server.serve_forever, name="node-drain", daemon=True).start()
    return server


def request(path: str, timeout_s: float) -> dict:
    """The client end: one POST on the Unix socket, waiting as long as the drain may take."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s + 10)
        sock.connect(path)
        sock.sendall(f"POST /drain?timeout={timeout_s:g} HTTP/1.0\r\nContent-Length: 0\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return {"status": status, **json.loads(body or b"{}")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rayfleet-node-drain", description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="seconds to wait for this node's replicas to move (default %(default)s)")
    parser.add_argument("--min-seconds", type=float, default=ENDPOINTS_SETTLE_S,
                        help="return no sooner than this (default %(default)s: the endpoints' propagation)")
    parser.add_argument("--ingress-port", type=int, default=int(os.environ.get("RAYFLEET_INGRESS_PORT", INGRESS_PORT)))
    args = parser.parse_args(argv)
    started = time.monotonic()
    path = socket_path(args.ingress_port)
    try:
        print(json.dumps(request(path, args.timeout)), flush=True)
    except OSError as exc:  # no ingress on this node (yet): nothing routes to replicas here
        print(json.dumps({"error": f"no drain at {path}: {exc}"}), flush=True)
    time.sleep(max(0.0, args.min_seconds - (time.monotonic() - started)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
