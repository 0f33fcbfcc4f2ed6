"""A real single-node Kubernetes cluster on this host, the way Kubernetes' hack/local-up-cluster.sh
makes one: our control plane (rayfleet.dev.controlplane) plus kube-scheduler, a kubelet, kube-proxy
(iptables mode), containerd with runc from Debian, the CNI bridge plugin, and CoreDNS in the cluster.

Why not kind: kind always starts its node containers with `docker run --privileged`, which this VM
refuses (its capability bounding set lacks CAP_SYS_RESOURCE), and kind has no option to start them
otherwise. Everything here runs as root on the host instead, so it refuses a host that already runs a
kubelet, holds a lock so that two runs never share the host, and keeps its pods under a cgroup of its
own (CGROUP_ROOT).

Networking stays on this machine: the node's address is the gateway of a bridge we create
(NODE_IP on BRIDGE), pods get addresses on it, Services come from the control plane's 10.0.0.0/24, and
the host reaches ClusterIPs through kube-proxy's rules.

Images are imported from Docker into containerd once per Docker image ID; containerd's content store
lives in STATE_ROOT (kept between runs, so a warm run imports nothing). Everything else is torn down by
stop(), and a run starts by clearing what an interrupted one left.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import IO

import yaml

from rayfleet.dev.controlplane import ControlPlane, Processes, kubernetes_binaries
from rayfleet.ports import free_port
from rayfleet.procs import cmdline

from .images import image_id

NODE_NAME = "rayfleet-e2e-node"
BRIDGE = "rfe2e0"
NODE_IP = "10.244.0.1"
POD_SUBNET = "10.244.0.0/24"
SERVICE_SUBNET = "10.0.0.0/24"  # the control plane's --service-cluster-ip-range
DNS_IP = "10.0.0.10"
CLUSTER_DOMAIN = "cluster.local"
STATE_ROOT = Path(os.environ.get("RAYFLEET_E2E_STATE", "/var/lib/rayfleet-e2e"))  # containerd's images, the kubelet's dir
RUN_ROOT = Path("/run/rayfleet-e2e")  # containerd's socket and state
CNI_BIN_DIR = "/usr/lib/cni"  # Debian's containernetworking-plugins
CNI_NETWORK = "rayfleet-e2e"
CNI_CACHE = Path("/var/lib/cni/results")  # libcni's cache of each sandbox's result (containerd's default)
CGROUP_ROOT = "rayfleet-e2e"  # the kubelet's cgroupRoot: our pods, and nobody else's, live below it
HERE = Path(__file__).resolve().parent


def missing_host_prerequisites() -> list[str]:
    """What this host lacks to run the node (empty when it can)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (the kubelet, containerd and kube-proxy manage cgroups, mounts and iptables)")
    for tool, package in (("docker", "docker.io"), ("containerd", "containerd"), ("runc", "runc"), ("ctr", "containerd"),
                          ("iptables", "iptables"), ("conntrack", "conntrack"), ("debootstrap", "debootstrap"),
                          ("ip", "iproute2")):
        if not shutil.which(tool):
            missing.append(f"{tool} (apt-get install {package})")
    if not Path(CNI_BIN_DIR, "bridge").exists():
        missing.append(f"the CNI plugins in {CNI_BIN_DIR} (apt-get install containernetworking-plugins)")
    if any(cmdline(pid).split(" ", 1)[0].endswith("/kubelet") and str(STATE_ROOT) not in cmdline(pid) for pid in _pids()):
        missing.append("a host without a kubelet of its own (this one runs one; the e2e node's iptables and "
                       "network namespaces would disturb its pods)")
    return missing


def run(*cmd: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


class NodeCluster:
    """Start with start(), stop with stop(); `kubeconfig` is the admin's."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir).resolve()
        self.control_plane = ControlPlane(
            self.workdir / "controlplane", address=NODE_IP,
            users=[(f"system:node:{NODE_NAME}", "system:nodes"), ("system:kube-scheduler", "system:kube-scheduler"),
                   ("system:kube-proxy", "system:node-proxier")])
        self.kubeconfig = self.control_plane.kubeconfig
        self.containerd_socket = RUN_ROOT / "containerd.sock"
        self.procs = Processes(self.workdir, "e2e node")
        self.kubectl = self.control_plane.kubectl
        self._lock: IO | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(self, images: list[str], pause_image: str, coredns_image: str) -> "NodeCluster":
        bins = kubernetes_binaries("kube-scheduler", "kubelet", "kube-proxy")
        STATE_ROOT.mkdir(parents=True, exist_ok=True)
        self._lock = open(STATE_ROOT / "node.lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another e2e node runs on this host (lock {STATE_ROOT / 'node.lock'})") from None
        self.cleanup_leftovers()
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._host_network()
            self.control_plane.start()
            cp = self.control_plane
            self.procs.spawn("kube-scheduler", [str(bins["kube-scheduler"]),
                                                f"--kubeconfig={cp.kubeconfig_for('system:kube-scheduler')}",
                                                "--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=0"])
            self._start_containerd(pause_image)
            self.import_images(images)
            self.procs.spawn("kubelet", [str(bins["kubelet"]), f"--config={self._kubelet_config()}",
                                         f"--kubeconfig={cp.kubeconfig_for(f'system:node:{NODE_NAME}')}",
                                         f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_IP}",
                                         f"--root-dir={STATE_ROOT / 'kubelet'}",
                                         f"--cert-dir={STATE_ROOT / 'kubelet' / 'pki'}", "--v=1"])
            self.procs.spawn("kube-proxy", [str(bins["kube-proxy"]), f"--config={self._kube_proxy_config()}",
                                            f"--hostname-override={NODE_NAME}"])
            self.procs.wait("node Ready", self._node_ready, 180)
            self._install_coredns(coredns_image)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every container and process, and remove what they set up on the host."""
        try:
            self.procs.stop("kube-proxy", "kubelet")  # before the containers, or the kubelet restarts them
            if self.containerd_socket.exists():
                self._kill_containers()
        finally:
            self.procs.stop()
            self.control_plane.stop()
            self.cleanup_leftovers()
            if self._lock:
                self._lock.close()  # releases the flock

    def cleanup_leftovers(self) -> None:
        """Undo a node's footprint: container shims, mounts, network namespaces, iptables, bridge, cgroups."""
        # Shims outlive containerd by design; ours are the ones pointing at our socket.
        for pid in [pid for pid in _pids() if f" {self.containerd_socket} " in f" {cmdline(pid)} "]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in _pids_in_cgroup(CGROUP_ROOT):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for root in (STATE_ROOT / "kubelet", RUN_ROOT):
            for mount in sorted(_mounts_under(root), key=len, reverse=True):
                run("umount", "-l", mount, check=False)
        for netns in Path("/run/netns").glob("cni-*"):
            run("ip", "netns", "delete", netns.name, check=False)
        _delete_iptables_chains("KUBE-", "CNI-")
        # containerd keeps a killed run's pod sandboxes in its store, and the kubelet tears them down a few
        # minutes into the next run: with the CNI results cached for them, that teardown removes the
        # firewall rules of their IPs, which host-local has since given to this run's pods (pod-to-pod
        # traffic then stops). Without a cached result the teardown leaves the rules alone.
        for cached in CNI_CACHE.glob(f"{CNI_NETWORK}-*"):
            cached.unlink(missing_ok=True)
        run("ip", "link", "delete", BRIDGE, check=False)
        _remove_cgroups(CGROUP_ROOT)
        shutil.rmtree(STATE_ROOT / "kubelet", ignore_errors=True)
        shutil.rmtree(RUN_ROOT, ignore_errors=True)

    # -- pieces ------------------------------------------------------------

    def _host_network(self) -> None:
        for controller in Path("/sys/fs/cgroup").iterdir():  # the kubelet wants its cgroupRoot to exist
            if (controller / "cgroup.procs").exists():
                (controller / CGROUP_ROOT).mkdir(exist_ok=True)
        # Pods route through the host, and bridged traffic must pass iptables for Service NAT.
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
        Path("/proc/sys/net/bridge/bridge-nf-call-iptables").write_text("1")
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        run("ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")
        cni = self.workdir / "cni"
        cni.mkdir(parents=True, exist_ok=True)
        (cni / "10-rayfleet-e2e.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": CNI_NETWORK,
            "plugins": [
                {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": True, "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET, "gateway": NODE_IP}]],
                          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(RUN_ROOT / "ipam")}},
                # Docker sets the FORWARD policy to DROP; this admits the pods' traffic.
                {"type": "firewall", "backend": "iptables"},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }, indent=1))

    def _start_containerd(self, pause_image: str) -> None:
        RUN_ROOT.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "containerd.toml"
        config.write_text(f"""version = 2
root = "{STATE_ROOT / 'containerd'}"
state = "{RUN_ROOT / 'containerd'}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{self.containerd_socket}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{_normalized(pause_image)}"
  # The kubelet asks for negative OOM scores (e.g. -998 for sandboxes), which needs CAP_SYS_RESOURCE;
  # this VM lacks it and runc fails. Cap them at containerd's own score instead.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{self.workdir / 'cni'}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
""")
        # Containers inherit containerd's open-file limit. KubeRay's `ulimit -n 65536` fails where the
        # hard limit is lower and can't be raised (this VM: 20000, no CAP_SYS_RESOURCE); Ray runs anyway.
        self.procs.spawn("containerd", ["containerd", f"--config={config}"])
        self.procs.wait("containerd", lambda: self.ctr("version", check=False).returncode == 0, 60)

    def ctr(self, *args: str, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
        return run("ctr", f"--address={self.containerd_socket}", "--namespace=k8s.io", *args,
                   check=check, timeout=timeout, **kw)

    def import_images(self, refs: list[str]) -> None:
        """Copy Docker images into containerd, skipping those already there at the same image ID."""
        have = {}
        for line in self.ctr("images", "ls").stdout.splitlines()[1:]:
            fields = line.split()
            labels = dict(kv.split("=", 1) for kv in fields[-1].split(",") if "=" in kv)
            have[fields[0]] = labels.get("rayfleet.io/docker-id")
        for ref in refs:
            docker_id = image_id(ref)
            name = _normalized(ref)
            if have.get(name) == docker_id:
                continue
            print(f"[e2e] importing {ref} into containerd", flush=True)
            save = subprocess.Popen(["docker", "save", ref], stdout=subprocess.PIPE)
            self.ctr("images", "import", "-", stdin=save.stdout, timeout=1800)
            if save.wait() != 0:
                raise RuntimeError(f"docker save {ref} failed")
            self.ctr("images", "label", name, f"rayfleet.io/docker-id={docker_id}")

    def _kubelet_config(self) -> Path:
        path = self.workdir / "kubelet.yaml"
        path.write_text(yaml.safe_dump({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{CGROUP_ROOT}",
            "failCgroupV1": False,  # this host is cgroup v1; kubelet >= 1.35 refuses it otherwise
            "failSwapOn": False,
            "address": NODE_IP, "readOnlyPort": 0, "healthzBindAddress": "127.0.0.1", "healthzPort": 0,
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(self.control_plane.ca_file)}},
            "authorization": {"mode": "Webhook"},
            "clusterDNS": [DNS_IP], "clusterDomain": CLUSTER_DOMAIN,
            "resolvConf": str(self._resolv_conf()),
            "podCIDR": POD_SUBNET,
            # A shared CI machine: don't evict on a fuller disk, and don't garbage-collect our images.
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            "imageGCHighThresholdPercent": 100,
            "serializeImagePulls": False,
            "staticPodPath": "",
        }))
        return path

    def _resolv_conf(self) -> Path:
        # Pods resolve cluster names through CoreDNS only: this machine has no outside DNS to offer.
        path = self.workdir / "resolv.conf"
        path.write_text("")
        return path

    def _kube_proxy_config(self) -> Path:
        path = self.workdir / "kube-proxy.yaml"
        path.write_text(yaml.safe_dump({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "mode": "iptables", "clusterCIDR": POD_SUBNET,
            "clientConnection": {"kubeconfig": str(self.control_plane.kubeconfig_for("system:kube-proxy"))},
            "bindAddress": "127.0.0.1", "healthzBindAddress": f"127.0.0.1:{free_port()}",
            "metricsBindAddress": f"127.0.0.1:{free_port()}",
            # Leave the host's conntrack sysctls as they are.
            "conntrack": {"maxPerCore": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        }))
        return path

    def _install_coredns(self, image: str) -> None:
        manifest = (HERE / "manifests" / "coredns.yaml").read_text()
        manifest = manifest.replace("COREDNS_IMAGE", image).replace("DNS_IP", DNS_IP)
        self.kubectl("apply", "-f", "-", input=manifest)
        self.kubectl("rollout", "status", "-n", "kube-system", "deployment/coredns", "--timeout=180s", timeout=200)

    def _kill_containers(self) -> None:
        tasks = self.ctr("tasks", "ls", "-q", check=False).stdout.split()
        for task in tasks:
            self.ctr("tasks", "kill", "--signal=SIGKILL", task, check=False)
        deadline = time.monotonic() + 30
        while tasks and time.monotonic() < deadline:
            for task in tasks:
                self.ctr("tasks", "delete", task, check=False)
            tasks = self.ctr("tasks", "ls", "-q", check=False).stdout.split()
        for container in self.ctr("containers", "ls", "-q", check=False).stdout.split():
            self.ctr("containers", "delete", container, check=False)

    # -- helpers -----------------------------------------------------------

    def _node_ready(self) -> bool:
        proc = self.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
        if proc.returncode != 0:
            return False
        conditions = json.loads(proc.stdout)["status"].get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _normalized(ref: str) -> str:
    """How containerd and the kubelet name a Docker short reference."""
    name = ref if "/" in ref else f"library/{ref}"
    first = name.split("/", 1)[0]
    return name if ("." in first or ":" in first or first == "localhost") else f"docker.io/{name}"


def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _pids_in_cgroup(name: str) -> list[int]:
    root = Path("/sys/fs/cgroup/pids") / name
    return [int(p) for f in root.rglob("cgroup.procs") for p in f.read_text().split()] if root.exists() else []


def _remove_cgroups(name: str) -> None:
    for controller in Path("/sys/fs/cgroup").iterdir():
        root = controller / name
        if root.is_dir():
            for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    d.rmdir()
            with contextlib.suppress(OSError):
                root.rmdir()


def _mounts_under(root: Path) -> list[str]:
    """Mount points at or below `root` (the kubelet bind-mounts its root dir onto itself)."""
    points = [line.split()[4].replace("\\040", " ") for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [p for p in points if p == str(root) or p.startswith(f"{root}/")]


def _delete_iptables_chains(*prefixes: str) -> None:
    """Remove chains (and the rules jumping to them) that the kubelet, kube-proxy and the CNI plugins
    leave in the host's tables."""
    for binary in ("iptables", "ip6tables"):
        for table in ("mangle", "nat", "filter"):
            rules = run(f"{binary}-save", "-t", table, check=False).stdout.splitlines()
            chains = {line[1:].split()[0] for line in rules if line.startswith(":") and line[1:].startswith(prefixes)}
            for line in rules:
                words = shlex.split(line)
                if words[:1] == ["-A"] and any(w == "-j" and target in chains for w, target in zip(words, words[1:])):
                    run(binary, "-t", table, "-D", *words[1:], check=False)
            for op in ("-F", "-X"):  # flush all first: chains may jump to each other
                for chain in chains:
                    run(binary, "-t", table, op, chain, check=False)
