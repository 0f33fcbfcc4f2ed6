"""Starting and stopping local processes (Linux /proc): everything a command started, it stops."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path
from typing import Any, Callable


def cmdline(pid: int) -> str:
    """The process's command line, space-separated; "" once it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command's name (state, ppid, ...: field 3 of proc(5) is index 0), or None
    once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().decode(errors="replace").rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> set[int]:
    """All live descendant PIDs of ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        fields = stat_fields(int(entry)) if entry.isdigit() else None
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def stop_process_group(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM the child's process group, give it `grace` seconds, then SIGKILL whatever of it lingers.

    The children are started with `start_new_session=True`, so the group holds everything they started.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def spawn(args: list[str], log: Path, *, env: dict[str, str] | None = None, cwd: Path | None = None,
          preexec_fn: Callable[[], Any] | None = None) -> subprocess.Popen:
    """A child in a process group of its own (``stop_process_group`` stops all it started), output appended to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(args, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=preexec_fn)


class Leftovers:
    """Every process seen below this one, killed at the end if it outlived the orderly shutdown.

    ``ray.shutdown()`` stops Ray's own processes but not what its actors started (the ingress's HAProxy is
    reparented when its actor dies), so callers ``note()`` their descendants while they run and ``kill()``
    after shutting down. A PID counts as the same process only while its command line is unchanged.
    """

    def __init__(self) -> None:
        self._seen: dict[int, str] = {}

    def note(self) -> None:
        for pid in descendants(os.getpid()):
            self._seen.setdefault(pid, cmdline(pid))

    def kill(self) -> None:
        for pid, command in self._seen.items():
            if command and cmdline(pid) == command:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
