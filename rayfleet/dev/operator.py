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
from rayfleet_api.constants import CONTROL_KEY_ENV, METRICS_PATH
from rayfleet_api.http_probe import http_ok

# The operator's Prometheus port (operator config; default 9500, 0: none). Here it shares the host's network
# with the local Ray nodes, whose ingress serves their metrics on 9500: so it gets a free port of its own.
METRICS_PORT_ENV = "RAYFLEET_METRICS_PORT"


class OperatorProcess:
    """`python -m rayfleet_operator` against a kubeconfig, with its liveness endpoint on loopback. Its key
    (what the chart's Secret holds on a cluster) is made here and kept across `stop()`/`start()`, and so is its
    metrics port: ``$RAYFLEET_METRICS_PORT`` from ``env`` or this environment if set there, else a free port.
    ``metrics_url`` is where it serves them (None with port 0: none)."""

    def __init__(self, kubeconfig: Path, log: Path, namespaces: Sequence[str] = (), env: dict[str, str] | None = None):
        self.kubeconfig, self.log, self.namespaces = Path(kubeconfig), Path(log), list(namespaces)
        metrics_port = (env or {}).get(METRICS_PORT_ENV) or os.environ.get(METRICS_PORT_ENV) or str(free_port())
        self.env = {CONTROL_KEY_ENV: secrets.token_hex(32), METRICS_PORT_ENV: metrics_port, **(env or {})}
        self.liveness = f"http://127.0.0.1:{free_port()}/healthz"
        self.metrics_port = int(metrics_port) if metrics_port.isdigit() else None  # the operator refuses a bad one
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}{METRICS_PATH}" if self.metrics_port else None
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
