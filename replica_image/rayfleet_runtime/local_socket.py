"""A replica's node-local socket: the abstract Unix socket its own node's ingress reaches it by.

Every request crosses two hops (client -> HAProxy -> replica), and on loopback TCP the second one costs
HAProxy and the replica a TCP stack each way; over a Unix socket both spend about 3 us less a request
(bench/README.md). Replicas on other nodes are still reached over TCP (``Server.addr``).

Abstract (Linux): no file to create, clean up or share between containers, and gone with the process.
Its namespace is the network namespace, i.e. the pod on Kubernetes, the host under ``rayfleet run``: only
that node's ingress (and whatever else runs in the pod) can connect, as with the replica's TCP port.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import sys

logger = logging.getLogger("rayfleet.replica")

# What a routing table may carry as a name: it goes into haproxy.cfg and runtime commands verbatim
NAME_OK = re.compile(r"[A-Za-z0-9_./-]{1,100}")
# HAProxy 2.8's abns@ address is the whole sun_path, the name padded with NULs (3.1's abnsz@ is not), so
# the replica binds the padded form to be found.
_SUN_PATH = 108


def local_name(port: int) -> str:
    """Unique within the network namespace: the TCP port is this process's while it lives."""
    return f"rayfleet/{os.getpid()}/{int(port)}"


def bind_local(name: str) -> socket.socket | None:
    """The abstract socket named ``name``, bound (not listening); None where there is none (not Linux, or
    refused): then its node's ingress reaches the replica over TCP like any other."""
    if not sys.platform.startswith("linux"):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(address(name))
    except OSError as exc:
        sock.close()
        logger.warning("no local socket %s (%s): this replica is reached over TCP only", name, exc)
        return None
    return sock


def address(name: str) -> bytes:
    """The socket address of ``name``, as HAProxy's ``abns@`` connects to it."""
    return b"\0" + name.encode().ljust(_SUN_PATH - 1, b"\0")


def haproxy_address(name: str) -> str:
    return f"abns@{name}"
