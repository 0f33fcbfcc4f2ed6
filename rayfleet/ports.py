"""Free TCP ports on this machine, for the local stand-ins and tests (everything binds loopback).

A port the kernel hands to ``bind(0)`` comes from its ephemeral range, which is where every Ray process
that starts between our choice and our bind takes its own ports: one did (a Ray agent answered 401 on
what was to be the ingress's port). So ports come from between Ray's worker ports (10002-19999 by
default) and the ephemeral range, which no ``bind(0)`` ever gets, and never twice from one process.
"""
from __future__ import annotations

import random
import socket

RAY_WORKER_PORTS_END = 19999
_handed_out: set[int] = set()


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now and that no ``bind(0)`` can take before the caller binds it."""
    low, high = RAY_WORKER_PORTS_END + 1, _ephemeral_start() - 1
    for _ in range(200 if low <= high else 0):
        port = random.randint(low, high)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:  # in use
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:  # an unusual port range: fall back to the kernel's choice
        s.bind((host, 0))
        return s.getsockname()[1]
