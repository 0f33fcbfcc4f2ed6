"""A real, local Kubernetes control plane (etcd + kube-apiserver +
kube-controller-manager) for integration tests and `rayfleet dev`.

No kubelet, scheduler or container runtime: objects are stored, validated,
admitted and garbage-collected exactly as in a real cluster, but pods never
run (the e2e suite runs kind for that). Its binaries, kubectl/helm and KubeRay's
CRDs come from the cache (`toolchain.py`), its certificates from `pki.py`; this
module starts and stops the processes.

    with ControlPlane(Path("/tmp/cp")) as cp:
        cp.install_crds(kuberay_crds())
        cp.kubectl("get", "ns")          # or KUBECONFIG=cp.kubeconfig
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import secrets
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml

from rayfleet.ports import free_port
from rayfleet.procs import spawn, stop_process_group

from .pki import write_pki
from .toolchain import Binaries, ensure_binaries, ensure_tools, kuberay_crds


def _die_with_parent() -> None:
    # Linux: SIGKILL the child if the Python process dies without running stop()
    # (e.g. it is SIGKILLed itself), so no etcd/apiserver is ever orphaned.
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


# --------------------------------------------------------------------------
# Processes


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log: Path


class Processes:
    """Long-running children, each in its own process group with its log in `logdir`, killed with
    the Python process that started them (PR_SET_PDEATHSIG: start them from a long-lived thread)."""

    def __init__(self, logdir: Path, what: str):
        self.logdir, self.what = logdir, what
        self._procs: list[_Proc] = []

    def spawn(self, name: str, args: list[str]) -> None:
        log = self.logdir / f"{name}.log"
        self._procs.append(_Proc(name, spawn(args, log, preexec_fn=_die_with_parent), log))

    def wait(self, what: str, ready, timeout: float) -> None:
        """Until `ready()`; fails at once, with its log's tail, if one of the processes exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self._procs:
                if p.popen.poll() is not None:
                    raise RuntimeError(f"{p.name} exited with {p.popen.returncode} (log {p.log}):\n{self.tail(p)}")
            if ready():
                return
            time.sleep(0.25)
        raise TimeoutError(f"{self.what}: {what} not ready after {timeout}s (logs in {self.logdir})")

    def stop(self, *names: str, grace: float = 10.0) -> None:
        """SIGTERM each process group (the named ones, else all; last started first), then SIGKILL."""
        for p in [p for p in reversed(self._procs) if not names or p.name in names]:
            stop_process_group(p.popen, grace)
            self._procs.remove(p)

    @staticmethod
    def tail(p: _Proc, lines: int = 30) -> str:
        return "".join(p.log.read_text(errors="replace").splitlines(True)[-lines:])

    def logs_tail(self, lines: int = 25) -> str:
        return "\n".join(f"--- {p.name} ({p.log})\n{self.tail(p, lines)}" for p in self._procs if p.log.exists())


# --------------------------------------------------------------------------
# Control plane


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager on free ports.

    Everything (data, certs, logs, kubeconfig) lives in `workdir`. Attributes
    after start(): `server` (https URL), `token` (admin, group system:masters),
    `kubeconfig` (path), `ca_file` (path).

    The API server listens on 127.0.0.1 and nothing can run pods.

    Children get PR_SET_PDEATHSIG, which fires when the *thread* that called
    start() exits: call start() from a long-lived thread (e.g. the main one).
    """

    def __init__(self, workdir: Path, *, binaries: Binaries | None = None,
                 extra_apiserver_args: Sequence[str] = (), start_timeout: float = 90.0):
        self.workdir = Path(workdir).resolve()
        self.binaries = binaries
        self.extra_apiserver_args = list(extra_apiserver_args)
        self.start_timeout = start_timeout
        self.kubeconfig = self.workdir / "kubeconfig"
        self.ca_file = self.workdir / "pki" / "ca.crt"
        self.token = ""
        self.server = ""
        self.procs = Processes(self.workdir, "control plane")

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> "ControlPlane":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "ControlPlane":
        bins = self.binaries or ensure_binaries()
        wd, pki = self.workdir, self.workdir / "pki"
        wd.mkdir(parents=True, exist_ok=True)
        write_pki(pki)
        self.token = secrets.token_hex(24)
        (wd / "tokens.csv").write_text(f'{self.token},admin,admin,"system:masters"\n')
        try:
            etcd_port, peer_port, api_port, kcm_port = (free_port() for _ in range(4))
            etcd_url, peer_url = f"http://127.0.0.1:{etcd_port}", f"http://127.0.0.1:{peer_port}"
            self.procs.spawn("etcd", [
                str(bins.etcd), "--name=default", f"--data-dir={wd / 'etcd'}",
                f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                "--unsafe-no-fsync=true",  # throwaway data: fsync only slows tests down
            ])
            self.server = f"https://127.0.0.1:{api_port}"
            self.procs.spawn("kube-apiserver", [
                str(bins.kube_apiserver),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={api_port}",
                f"--cert-dir={wd / 'apiserver-certs'}",
                f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--token-auth-file={wd / 'tokens.csv'}",
                # The `kubernetes` Endpoints would point at 127.0.0.1, which Endpoints
                # validation rejects (loopback): skip reconciling it instead of log spam.
                "--endpoint-reconciler-type=none", "--authorization-mode=RBAC",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--allow-privileged=true",
                *self.extra_apiserver_args,
            ])
            self.procs.wait("kube-apiserver /readyz", lambda: self._get("/readyz") == 200, self.start_timeout)
            self._write_kubeconfig()
            self.procs.spawn("kube-controller-manager", [
                str(bins.kube_controller_manager),
                f"--kubeconfig={self.kubeconfig}",
                "--leader-elect=false", "--controllers=*",
                "--bind-address=127.0.0.1", f"--secure-port={kcm_port}",
                f"--cert-dir={wd / 'kcm-certs'}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}", f"--cluster-signing-key-file={pki / 'ca.key'}",
                "--service-cluster-ip-range=10.0.0.0/24",
            ])
            insecure = ssl.create_default_context()  # kcm serves a throwaway self-signed cert
            insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
            self.procs.wait("kube-controller-manager /healthz",
                            lambda: self._get("/healthz", f"https://127.0.0.1:{kcm_port}", insecure) == 200,
                            self.start_timeout)
            self.procs.wait("namespace default", lambda: self._get("/api/v1/namespaces/default") == 200,
                            self.start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM each process group (dependents first), then SIGKILL."""
        self.procs.stop(grace=grace)

    # -- helpers -----------------------------------------------------------

    def _get(self, path: str, base: str | None = None, ctx: ssl.SSLContext | None = None) -> int:
        req = urllib.request.Request((base or self.server) + path,
                                     headers={"Authorization": f"Bearer {self.token}"})
        ctx = ctx or ssl.create_default_context(cafile=str(self.ca_file))
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (OSError, ssl.SSLError):
            return 0

    def _write_kubeconfig(self) -> None:
        self._kubeconfig(self.kubeconfig, "admin", self.token)

    def _kubeconfig(self, path: Path, user: str, token: str) -> None:
        ca = base64.b64encode(self.ca_file.read_bytes()).decode()
        cfg = {
            "apiVersion": "v1", "kind": "Config", "current-context": "rayfleet-dev",
            "clusters": [{"name": "rayfleet-dev",
                          "cluster": {"server": self.server, "certificate-authority-data": ca}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "rayfleet-dev", "context": {"cluster": "rayfleet-dev", "user": user}}],
        }
        path.write_text(yaml.safe_dump(cfg))
        path.chmod(0o600)

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess:
        """Run kubectl against this control plane (stdin from `input`); returns the CompletedProcess (text)."""
        cmd = [str(ensure_tools().kubectl), f"--kubeconfig={self.kubeconfig}", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[1:])} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def install_crds(self, paths: Sequence[Path], timeout: float = 60) -> None:
        """Apply CRDs and wait until each is Established (i.e. served)."""
        if not paths:
            return
        names = [d["metadata"]["name"] for path in paths for d in yaml.safe_load_all(Path(path).read_text())
                 if d and d.get("kind") == "CustomResourceDefinition"]
        # Server-side apply: KubeRay's CRDs exceed the 256 KiB last-applied annotation.
        self.kubectl("apply", "--server-side", "--force-conflicts", *(f"--filename={p}" for p in paths))
        self.kubectl("wait", "--for=condition=Established", f"--timeout={timeout}s",
                     *(f"crd/{n}" for n in names), timeout=timeout + 30)


# --------------------------------------------------------------------------
# CLI: python -m rayfleet.dev.controlplane {build,up}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rayfleet.dev.controlplane")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build/download binaries, kubectl/helm and CRDs into the cache")
    up = sub.add_parser("up", help="start a control plane and wait for Ctrl-C")
    up.add_argument("--dir", type=Path, required=True, help="work directory (data, certs, logs, kubeconfig)")
    up.add_argument("--no-kuberay", action="store_true", help="skip installing the KubeRay CRDs")
    args = parser.parse_args(argv)

    if args.cmd == "build":
        for item in (ensure_binaries(), ensure_tools(), kuberay_crds()):
            print(item)
        return 0
    ensure_tools()
    crds = [] if args.no_kuberay else kuberay_crds()
    def on_sigterm(*_):  # unwind through `with` so everything is torn down
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    with ControlPlane(args.dir) as cp:
        cp.install_crds(crds)
        print(f"export KUBECONFIG={cp.kubeconfig}\n# server {cp.server}; logs in {cp.workdir}; Ctrl-C stops",
              flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
