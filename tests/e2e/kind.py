"""The e2e suite's Kubernetes: a kind cluster of one control-plane and two worker nodes, built here with
no container registry.

- kind itself, crictl (kind reads images with it) and kube-router come from their pinned Go modules,
  built once into the cache like every other Go binary (rayfleet.dev.toolchain.go_build).
- The node image is kind's own base recipe (its module's images/base/files) on the Debian the suite
  bootstraps, with Debian's containerd, runc and CNI plugins, kubeadm/kubelet/kubectl from the pinned
  Kubernetes module, and the control plane's images (kube-apiserver, etcd, CoreDNS, ... each one of our
  static binaries) imported into its containerd, as `kind build node-image` would pull them.
- The pod network is kube-router (routes, and NetworkPolicy enforced; manifests/kube-router.yaml says
  why not kindnet). Our images go in with `kind load docker-image`.
- Where `docker run --privileged` is refused (this VM: no CAP_SYS_RESOURCE), kind runs with
  tests/e2e/kind/docker first on its PATH, which starts the nodes with the capabilities the VM allows
  instead. A laptop with Docker runs plain kind.

Nothing is changed on the host: the nodes are containers on kind's Docker network, which the host
reaches; `stop()` deletes the cluster, and `start()` first deletes one an interrupted run left.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

from rayfleet.dev.toolchain import ensure_tools, go_build, kubernetes_binaries, module_dir, module_versions
from rayfleet.waiting import eventually

from . import images as e2e_images

KIND_MODULE, KIND_VERSION = "sigs.k8s.io/kind", "v0.33.0"
CRI_TOOLS_MODULE, CRI_TOOLS_VERSION = "sigs.k8s.io/cri-tools", "v1.37.0"
KUBE_ROUTER_MODULE, KUBE_ROUTER_VERSION = "github.com/cloudnativelabs/kube-router/v2", "v2.1.0"
CLUSTER_NAME = "rayfleet-e2e"
WORKERS = 2
HERE = Path(__file__).resolve().parent
SHIM_DIR = HERE / "kind"
NODE_BINARIES = ("kubeadm", "kubelet", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy",
                 "etcd")


def run(*cmd: str, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _module_binaries(name: str, module: str, version: str, packages: dict[str, str]) -> dict[str, Path]:
    return go_build(f"{name}-{version}", packages, cwd=module_dir(module, version),
                    key=[f"{module}@{version}".encode()])


def kind_binary() -> Path:
    return _module_binaries("kind", KIND_MODULE, KIND_VERSION, {"kind": "."})["kind"]


def privileged_refused(image: str) -> bool:
    """Whether this Docker refuses `docker run --privileged` (then kind needs the shim)."""
    return run("docker", "run", "--rm", "--privileged", "--entrypoint", "true", image, check=False).returncode != 0


# -- images --------------------------------------------------------------------------------------------


def _component_image(ref: str, binary: Path, entrypoint: bool) -> str:
    """One static binary in /usr/local/bin of a scratch image, tagged with the name kubeadm asks for."""
    with tempfile.TemporaryDirectory(prefix="rayfleet-kind-") as tmp:
        shutil.copy2(binary, Path(tmp) / binary.name)
        (Path(tmp) / "Dockerfile").write_text(
            f"FROM scratch\nCOPY {binary.name} /usr/local/bin/{binary.name}\nENV PATH=/usr/local/bin\n"
            + (f'ENTRYPOINT ["/usr/local/bin/{binary.name}"]\n' if entrypoint else ""))
        return e2e_images.build(Path(tmp) / "Dockerfile", ref, Path(tmp))


def netfilter_image(tag: str, binary: Path) -> str:
    """A node agent on Debian's netfilter tools (images/netfilter.Dockerfile)."""
    with tempfile.TemporaryDirectory(prefix="rayfleet-kind-") as tmp:
        shutil.copy2(binary, Path(tmp) / binary.name)
        wrapper = module_dir(KUBE_ROUTER_MODULE, KUBE_ROUTER_VERSION) / "build/image-assets/iptables-wrapper-installer.sh"
        shutil.copyfile(wrapper, Path(tmp) / wrapper.name)
        shutil.copyfile(HERE / "images" / "netfilter.Dockerfile", Path(tmp) / "Dockerfile")
        return e2e_images.build(Path(tmp) / "Dockerfile", tag, Path(tmp), DEBIAN_IMAGE=e2e_images.debian_image(),
                                BINARY=binary.name)


def kube_router_image() -> str:
    binary = _module_binaries("kube-router", KUBE_ROUTER_MODULE, KUBE_ROUTER_VERSION,
                              {"kube-router": "./cmd/kube-router"})["kube-router"]
    return netfilter_image(f"rayfleet-e2e/kube-router:{KUBE_ROUTER_VERSION}", binary)


def control_plane_images(bins: dict[str, Path]) -> list[str]:
    """Every image kubeadm runs (kubeadm config images list), built from our binaries under its names."""
    k8s, _ = module_versions()
    refs = run(str(bins["kubeadm"]), "config", "images", "list", f"--kubernetes-version={k8s}").stdout.split()
    built = []
    for ref in refs:
        component = ref.rsplit("/", 1)[1].split(":")[0]
        if component == "kube-proxy":  # iptables in its image
            built.append(netfilter_image(ref, bins["kube-proxy"]))
        elif component == "coredns":
            built.append(_component_image(ref, e2e_images.e2e_go_binary("coredns"), entrypoint=True))
        elif component == "pause":
            built.append(_component_image(ref, e2e_images.e2e_go_binary("pause"), entrypoint=True))
        else:
            built.append(_component_image(ref, bins[component], entrypoint=False))
    return built


def node_image() -> str:
    """The kind node image (images/kind-node.Dockerfile) with the control plane's images in its containerd;
    tagged by everything it is made of, so an unchanged one is never rebuilt."""
    k8s, _ = module_versions()
    bins = kubernetes_binaries(*NODE_BINARIES)
    debian = e2e_images.debian_image()
    preload = control_plane_images(bins)
    pause = next(ref for ref in preload if "/pause:" in ref)
    crictl = _module_binaries("crictl", CRI_TOOLS_MODULE, CRI_TOOLS_VERSION, {"crictl": "./cmd/crictl"})["crictl"]
    kubectl = ensure_tools().kubectl
    dockerfile = HERE / "images" / "kind-node.Dockerfile"
    key = hashlib.sha256(json.dumps([KIND_VERSION, k8s, debian, str(bins["kubeadm"]), str(crictl), str(kubectl),
                                     [e2e_images.image_id(r) for r in preload]]).encode()
                         + dockerfile.read_bytes() + (SHIM_DIR / "node-init").read_bytes()).hexdigest()[:10]
    tag = f"rayfleet-e2e/kind-node:{k8s}-{key}"
    if e2e_images.image_id(tag):
        return tag
    with tempfile.TemporaryDirectory(prefix="rayfleet-kind-node-") as tmp:
        context = Path(tmp)
        shutil.copytree(module_dir(KIND_MODULE, KIND_VERSION) / "images/base/files", context / "files")
        (context / "bin").mkdir()
        for binary in (bins["kubeadm"], bins["kubelet"], kubectl, crictl):
            shutil.copyfile(binary, context / "bin" / binary.name)
        shutil.copyfile(SHIM_DIR / "node-init", context / "node-init")
        for path in context.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)  # copies of the read-only module cache
        shutil.copyfile(dockerfile, context / "Dockerfile")
        base = e2e_images.build(context / "Dockerfile", f"{tag}-base", context, DEBIAN_IMAGE=debian,
                                KUBERNETES_VERSION=k8s, PAUSE_IMAGE=pause)
    # Import the control plane's images into the node's containerd (not unpacked: a node unpacks what it
    # runs), then keep that containerd store as the image's last layer.
    container = run("docker", "run", "-d", "--entrypoint", "containerd", base).stdout.strip()
    try:
        eventually(lambda: run("docker", "exec", container, "ctr", "version", check=False).returncode == 0,
                   timeout=60, what="containerd in the node image's build container")
        for ref in preload:
            save = subprocess.Popen(["docker", "save", ref], stdout=subprocess.PIPE)
            run("docker", "exec", "-i", container, "ctr", "--namespace=k8s.io", "images", "import", "--no-unpack",
                "--digests", "-", stdin=save.stdout)
            if save.wait() != 0:
                raise RuntimeError(f"docker save {ref} failed")
        run("docker", "stop", container)
        run("docker", "commit",
            "--change", 'ENTRYPOINT ["/usr/local/bin/rayfleet-node-init", "/usr/local/bin/entrypoint", "/sbin/init"]',
            "--change", "CMD []", container, tag)
    finally:
        run("docker", "rm", "-f", container, check=False)
    run("docker", "rmi", base, check=False)
    return tag


# -- the cluster ---------------------------------------------------------------------------------------


class KindCluster:
    """start(images) brings the cluster up with `images` loaded on every node; stop() deletes it."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir).resolve()
        self.kubeconfig = self.workdir / "kubeconfig"
        self._kind = str(kind_binary())
        self._env = dict(os.environ)

    def kind(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        return run(self._kind, *args, check=check, timeout=timeout, env=self._env)

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120,
                input: str | None = None) -> subprocess.CompletedProcess:
        return run(str(ensure_tools().kubectl), f"--kubeconfig={self.kubeconfig}", *args, check=check,
                   timeout=timeout, input=input)

    def start(self, images: list[str]) -> "KindCluster":
        self.workdir.mkdir(parents=True, exist_ok=True)
        debian = e2e_images.debian_image()
        privileged = not privileged_refused(debian)
        if not privileged:
            print("[e2e] docker refuses --privileged here: kind starts its nodes through tests/e2e/kind/docker",
                  flush=True)
            self._env.update(PATH=f"{SHIM_DIR}{os.pathsep}{self._env['PATH']}",
                             RAYFLEET_REAL_DOCKER=shutil.which("docker") or "docker")
        image = node_image()
        router = kube_router_image()
        self.delete()  # what an interrupted run left
        config = self.workdir / "kind.yaml"
        config.write_text(yaml.safe_dump(cluster_config()))
        try:
            self.kind("create", "cluster", f"--name={CLUSTER_NAME}", f"--image={image}", f"--config={config}",
                      f"--kubeconfig={self.kubeconfig}", "--retain")
            self.kind("load", "docker-image", f"--name={CLUSTER_NAME}", router, *images, timeout=1800)
            manifest = (HERE / "manifests" / "kube-router.yaml").read_text().replace("KUBE_ROUTER_IMAGE", router)
            self.kubectl("apply", "-f", "-", input=manifest)
            self.kubectl("wait", "--for=condition=Ready", "nodes", "--all", "--timeout=300s", timeout=330)
            self.kubectl("rollout", "status", "-n", "kube-system", "deployment/coredns", "--timeout=300s", timeout=330)
        except BaseException:
            self.export_logs()
            self.delete()
            raise
        return self

    def stop(self) -> None:
        self.delete()

    def delete(self) -> None:
        self.kind("delete", "cluster", f"--name={CLUSTER_NAME}")

    def export_logs(self) -> Path:
        out = self.workdir / "logs"
        self.kind("export", "logs", f"--name={CLUSTER_NAME}", str(out), check=False, timeout=300)
        return out

    # -- what the tests read and break --

    def nodes(self, role: str | None = None) -> list[str]:
        names = self.kind("get", "nodes", f"--name={CLUSTER_NAME}").stdout.split()
        if role == "worker":
            return [n for n in names if "worker" in n]
        if role == "control-plane":
            return [n for n in names if n.endswith("control-plane")]
        return names

    def node_ip(self, node: str) -> str:
        return run("docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                   node).stdout.strip()

    def network_cidr(self) -> str:
        """The IPv4 subnet of kind's Docker network (the nodes, and the host as its gateway)."""
        configs = json.loads(run("docker", "network", "inspect", "kind", "-f", "{{json .IPAM.Config}}").stdout)
        return next(c["Subnet"] for c in configs if ":" not in c["Subnet"])


def cluster_config() -> dict:
    return {
        "kind": "Cluster", "apiVersion": "kind.x-k8s.io/v1alpha4",
        "networking": {"disableDefaultCNI": True},  # kube-router instead (manifests/kube-router.yaml)
        "nodes": [{"role": "control-plane"}] + [{"role": "worker"}] * WORKERS,
        # The kubelet asks for negative OOM scores (e.g. -998 for sandboxes); where the nodes lack
        # CAP_SYS_RESOURCE runc then fails. Cap them at containerd's own score instead.
        "containerdConfigPatches": ['[plugins."io.containerd.grpc.v1.cri"]\n  restrict_oom_score_adj = true\n'],
        "kubeadmConfigPatches": [yaml.safe_dump({
            "kind": "KubeletConfiguration",
            "failCgroupV1": False,  # hosts still on cgroup v1 (this one): kubelet >= 1.35 refuses them otherwise
            # A shared CI machine: don't evict on a fuller disk, and don't garbage-collect our images.
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            "imageGCHighThresholdPercent": 100,
        })],
    }
