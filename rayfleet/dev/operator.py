"""Run the rayfleet operator as a real background process (used by `rayfleet dev up` and the tests)."""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from rayfleet.ports import free_port
from rayfleet.procs import spawn, stop_process_group
from rayfleet_api.constants import CONTROL_KEY_ENV
from rayfleet_api.http_probe import http_ok


class OperatorProcess:
    """`python -m rayfleet_operator` against a kubeconfig, with its liveness endpoint on loopback. Its key
    (what the chart's Secret holds on a cluster) is made here and kept across `stop()`/`start()`."""

    def __init__(self, kubeconfig: Path, log: Path, namespaces: Sequence[str] = (), env: dict[str, str] | None = None):
        self.kubeconfig, self.log, self.namespaces = Path(kubeconfig), Path(log), list(namespaces)
        self.env = {CONTROL_KEY_ENV: secrets.token_hex(32), **(env or {})}
        self.liveness = f"http://127.0.0.1:{free_port()}/healthz"
        self.popen: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "OperatorProcess":
        scope = [arg for ns in self.namespaces for arg in ("-n", ns)] or ["-A"]
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), **self.env}
        self.popen = spawn([sys.executable, "-m", "rayfleet_operator", *scope, "--liveness", self.liveness], self.log, env=env)
        deadline = time.monotonic() + timeout
        while not self.alive():
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"operator did not become live (exit {self.popen.poll()}); log {self.log}:\n{self.log_tail()}")
            time.sleep(0.2)
        return self

    def alive(self) -> bool:
        return http_ok(self.liveness)

    def log_tail(self, lines: int = 40) -> str:
        return "".join(self.log.read_text(errors="replace").splitlines(True)[-lines:]) if self.log.exists() else ""

    def stop(self, grace: float = 15) -> None:
        """SIGTERM (kopf shuts down cleanly), then SIGKILL if it lingers."""
        if self.popen is None or self.popen.poll() is not None:
            return
        stop_process_group(self.popen, grace)

    def __enter__(self) -> "OperatorProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
