"""The processes of a system under test, read from /proc: their memory, which of them is the proxy that holds
the client connections, and a kill -9 that waits until the victim is gone."""
from __future__ import annotations

import os
import signal
import time
from typing import Any

from rayfleet.procs import cmdline, stat_fields


def mem_kib(pid: int) -> dict[str, int] | None:
    """RSS and PSS (KiB) from /proc/PID/smaps_rollup."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss", "USS", "Private_Clean", "Private_Dirty"):
                    out[key] = int(rest.split()[0])
    except OSError:
        return None
    out["Uss"] = out.pop("Private_Clean", 0) + out.pop("Private_Dirty", 0)
    return out


def haproxy_procs(my_pids: set[int]) -> list[dict[str, Any]]:
    found = []
    for pid in sorted(my_pids):
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            continue
        if os.path.basename(exe).startswith("haproxy"):
            found.append({"pid": pid, "exe": exe, "cmdline": cmdline(pid)[:300]})
    return found


def gone(pid: int) -> bool:
    """The process has exited (a zombie counts: it no longer holds a socket)."""
    fields = stat_fields(pid)
    return fields is None or fields[0] == "Z"


def kill9(pid: int) -> None:
    """SIGKILL and wait until it is gone, so polling for recovery never sees the victim still answering."""
    os.kill(pid, signal.SIGKILL)
    while not gone(pid):
        time.sleep(0.01)


def proxy_pid(candidates: set[int]) -> tuple[int, str] | None:
    """The process that holds client connections: HAProxy's worker (master-worker mode: its parent is the
    master), or the only HAProxy (Serve runs one process, ``-db``), or else Serve's Python ProxyActor."""
    haproxies = {p["pid"] for p in haproxy_procs(candidates)}
    workers = [p for p in haproxies if _ppid(p) in haproxies]
    if workers:
        worker = max(workers)
        return worker, f"haproxy worker (master pid {_ppid(worker)})"
    if haproxies:
        return max(haproxies), "haproxy (single process)"
    proxies = [p for p in candidates if cmdline(p).startswith("ray::ProxyActor")]
    return (max(proxies), "Serve ProxyActor") if proxies else None


def _ppid(pid: int) -> int:
    fields = stat_fields(pid)
    return int(fields[1]) if fields else 0
