"""Run the rayfleet operator as a real background process (used by `rayfleet dev up` and the tests)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Sequence

from rayfleet.ports import free_port
from rayfleet.procs import stop_process_group


class OperatorProcess:
    """`python -m rayfleet_operator` against a kubeconfig, with its liveness endpoint on loopback."""

    def __init__(self, kubeconfig: Path, log: Path, namespaces: Sequence[str] = (), env: dict[str, str] | None = None):
        self.kubeconfig, self.log, self.namespaces = Path(kubeconfig), Path(log), list(namespaces)
        self.env = env or {}
        self.liveness = f"http://127.0.0.1:{free_port()}/healthz"
        self.popen: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "OperatorProcess":
        scope = [arg for ns in self.namespaces for arg in ("-n", ns)] or ["-A"]
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), **self.env}
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen([sys.executable, "-m", "rayfleet_operator", *scope, "--liveness", self.liveness],
                                          env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.alive():
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"operator did not become live (exit {self.popen.poll()}); log {self.log}:\n{self.log_tail()}")
            time.sleep(0.2)
        return self

    def alive(self) -> bool:
        try:
            with urllib.request.urlopen(self.liveness, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

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
