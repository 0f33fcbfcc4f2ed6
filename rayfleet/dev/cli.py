"""`rayfleet dev up|url|down`: a local Kubernetes environment on this machine (no kubelet, no Docker)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from rayfleet_api.constants import INGRESS_PORT_NAME
from rayfleet_api.spec import desired_state

from .toolchain import cache_dir, ensure_binaries, ensure_tools, kuberay_crds


def state_dir() -> Path:
    return Path(os.environ.get("RAYFLEET_DEV_DIR") or cache_dir() / "dev").expanduser()


def _running_pid(d: Path) -> int | None:
    try:
        pid = int((d / "daemon.pid").read_text())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None


def up(timeout: float) -> int:
    d = state_dir()
    if _running_pid(d) and (d / "ready").exists():
        print(f"rayfleet dev is already up (state in {d})", file=sys.stderr)
        _print_exports(d)
        return 0
    ensure_binaries(), ensure_tools(), kuberay_crds()  # a cold build shows its progress here
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "daemon.log", "ab") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "rayfleet.dev.environment", "--dir", str(d), "--code-dir", os.getcwd()],
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (d / "daemon.pid").write_text(str(daemon.pid))
    deadline = time.monotonic() + timeout
    while not (d / "ready").exists():
        if daemon.poll() is not None or time.monotonic() > deadline:
            tail = "".join((d / "daemon.log").read_text(errors="replace").splitlines(True)[-30:])
            print(f"rayfleet dev up failed (log {d / 'daemon.log'}):\n{tail}", file=sys.stderr)
            if daemon.poll() is None:
                down()
            return 1
        time.sleep(0.3)
    print(f"rayfleet dev is up: control plane, CRDs, operator and local RayCluster provider (state in {d})", file=sys.stderr)
    _print_exports(d)
    return 0


def _print_exports(d: Path) -> None:
    """Shell lines for `eval "$(rayfleet dev up)"`: the cluster, and kubectl/helm from the pinned wheel."""
    print(f"export KUBECONFIG={(d / 'ready').read_text()}")
    print(f'export PATH="{ensure_tools().kubectl.parent}:$PATH"')


def url(name: str, namespace: str) -> int:
    d = state_dir()
    if not (d / "ready").exists():
        print("rayfleet dev is not up: run `rayfleet dev up` first", file=sys.stderr)
        return 1
    kubectl = [str(ensure_tools().kubectl), f"--kubeconfig={(d / 'ready').read_text()}", "-n", namespace]

    def get(kind: str, obj: str) -> dict:
        proc = subprocess.run([*kubectl, "get", kind, obj, "-o", "json"], capture_output=True, text=True)
        if proc.returncode:
            raise LookupError(proc.stderr.strip())
        return json.loads(proc.stdout)

    try:
        sd = get("servedeployment", name)
        cluster = sd.get("status", {}).get("rayCluster") or name
        port = (get("raycluster", cluster).get("status") or {}).get("endpoints", {}).get(INGRESS_PORT_NAME)
    except LookupError as exc:
        print(exc, file=sys.stderr)
        return 1
    if not port:
        print(f"RayCluster {cluster} is not up yet; try again shortly (kubectl get sd {name} -n {namespace})", file=sys.stderr)
        return 1
    print(f"http://127.0.0.1:{port}{desired_state(sd['spec']).route_prefix}")
    return 0


def down(timeout: float = 180) -> int:
    d = state_dir()
    pid = _running_pid(d)
    if pid is None:
        print("rayfleet dev is not running", file=sys.stderr)
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _running_pid(d) == pid and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.3)
    if _running_pid(d) == pid:
        os.killpg(pid, signal.SIGKILL)
    for name in ("daemon.pid", "ready"):
        with contextlib.suppress(FileNotFoundError):
            (d / name).unlink()
    print("rayfleet dev is down", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rayfleet dev", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up_p = sub.add_parser("up", help="start the environment in the background; prints `export KUBECONFIG=...`")
    up_p.add_argument("--timeout", type=float, default=300)
    url_p = sub.add_parser("url", help="print a URL on this machine that reaches a ServeDeployment")
    url_p.add_argument("name")
    url_p.add_argument("-n", "--namespace", default="default")
    sub.add_parser("down", help="stop everything `up` started")
    args = parser.parse_args(argv)
    if args.command == "up":
        return up(args.timeout)
    if args.command == "url":
        return url(args.name, args.namespace)
    return down()
