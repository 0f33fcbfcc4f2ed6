"""The processes of a system under test, read from /proc: their memory, and which of them are HAProxy."""
from __future__ import annotations

import os
from typing import Any

from rayfleet.procs import cmdline


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

