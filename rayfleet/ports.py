"""Free TCP ports on this machine, for the local stand-ins and tests (everything binds loopback)."""
from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just handed out; the caller binds it soon (a small race is accepted)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
