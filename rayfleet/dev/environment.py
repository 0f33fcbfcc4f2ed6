"""The whole local Kubernetes environment in one process: control plane, CRDs, operator, provider.

`rayfleet dev up` runs this as a background daemon (`python -m rayfleet.dev.environment`); the
integration tests use `DevEnvironment` directly. Stopping tears down in reverse order, so no Ray
node, operator or API server process outlives it.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Sequence

from rayfleet.manifest import CRD_FILE

from .controlplane import ControlPlane
from .toolchain import kuberay_crds
from .operator import OperatorProcess
from .provider import LocalProvider


class DevEnvironment:
    def __init__(self, workdir: Path, code_dir: Path | None = None, operator_env: dict[str, str] | None = None):
        self.workdir = Path(workdir).resolve()
        self.code_dir = Path(code_dir or os.getcwd()).resolve()
        self.control_plane = ControlPlane(self.workdir / "controlplane")
        self.operator: OperatorProcess | None = None
        self.provider: LocalProvider | None = None
        self.operator_env = {"RAYFLEET_RESYNC_SECONDS": "3", **(operator_env or {})}

    @property
    def kubeconfig(self) -> Path:
        return self.control_plane.kubeconfig

    def start(self) -> "DevEnvironment":
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.control_plane.start()
            self.control_plane.install_crds([*kuberay_crds(), CRD_FILE])
            self.operator = OperatorProcess(self.kubeconfig, self.workdir / "operator.log", env=self.operator_env).start()
            self.provider = LocalProvider(self.kubeconfig, self.workdir / "provider", self.code_dir).start()
        except BaseException:
            self.stop()
            raise
        return self

    def restart_operator(self) -> None:
        assert self.operator is not None
        self.operator.stop()
        self.operator.start()

    def stop(self) -> None:
        if self.provider is not None:
            self.provider.stop()
        if self.operator is not None:
            self.operator.stop()
        self.control_plane.stop()

    def __enter__(self) -> "DevEnvironment":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rayfleet.dev.environment")
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--code-dir", type=Path, default=Path.cwd())
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with DevEnvironment(args.dir, args.code_dir) as env:
        (args.dir / "ready").write_text(str(env.kubeconfig))
        logging.info("rayfleet dev environment is up: KUBECONFIG=%s", env.kubeconfig)
        stop.wait()
    with contextlib.suppress(FileNotFoundError):
        (args.dir / "ready").unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
