"""What a test that starts `rayfleet run` checks it left behind: processes, told apart from a reused PID."""
from __future__ import annotations

import os

from rayfleet.procs import cmdline, stat_fields


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), or None if it is gone or a zombie."""
    fields = stat_fields(pid)
    return None if fields is None or fields[0] in ("Z", "X") else int(fields[19])


def processes_mentioning(text: str) -> dict[int, str]:
    """Live processes (not this one) whose command line holds ``text``: pid -> the start of that line."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and entry != str(os.getpid()):
            cmd = cmdline(int(entry))
            if text in cmd and start_time(int(entry)) is not None:
                out[int(entry)] = cmd[:160]
    return out
