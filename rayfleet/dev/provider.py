"""The local RayCluster provider: a stand-in for KubeRay plus kubelet on a machine with neither.

It watches `ray.io/v1` RayClusters in a real API server and brings each up as real local Ray
processes: a head (`ray start --head --block`), one `ray start --address ... --block` per worker
replica of each worker group, and on the head what the replica image's head runs (the rayfleet
controller). It writes RayCluster status the way KubeRay does (`state`, `HeadPodReady`, `head.podIP`,
`endpoints`), except that ports are this machine's free ports instead of the pods' fixed ones.
Handler modules import from the directory and PYTHONPATH the provider was started with.
"""
from __future__ import annotations

import base64
import contextlib
import datetime
import logging
import os
import secrets
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from rayfleet.ports import free_port
from rayfleet.procs import spawn, stop_process_group
from rayfleet_api.constants import (CONTROL_PORT_NAME, CONTROL_TOKEN_ENV, INGRESS_PORT_NAME, METRICS_PORT_NAME, RAY_GROUP,
                                    RAY_PLURAL, RAY_VERSION)
from rayfleet_api.http_probe import http_ok

log = logging.getLogger("rayfleet.provider")
LOOPBACK = "127.0.0.1"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ray_bin() -> str:
    return shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray") or "ray"


def desired_workers(cluster: dict[str, Any]) -> dict[str, tuple[int, str]]:
    """Worker group name → (replicas, num-cpus) from a RayCluster spec."""
    return {g["groupName"]: (int(g.get("replicas", 0)), str((g.get("rayStartParams") or {}).get("num-cpus", "1")))
            for g in (cluster.get("spec") or {}).get("workerGroupSpecs") or []}


def head_env_ref(cluster: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The head container's env entry ``name`` (``value`` or ``valueFrom``), as a kubelet would read it."""
    containers = ((((cluster.get("spec") or {}).get("headGroupSpec") or {}).get("template") or {}).get("spec") or {}).get(
        "containers") or [{}]
    return next((e for e in containers[0].get("env") or [] if e.get("name") == name), None)


def kuberay_status(cluster: "LocalCluster", ready: bool, generation: int) -> dict[str, Any]:
    """The status KubeRay would write, with this machine's addresses and ports."""
    workers = sum(len(p) for p in cluster.workers.values())
    condition = {"type": "HeadPodReady", "status": "True" if ready else "False", "lastTransitionTime": _now(),
                 "reason": "HeadPodRunningAndReady" if ready else "HeadPodNotFound", "message": ""}
    return {
        "state": "ready" if ready else "",
        "observedGeneration": generation,
        "head": {"podIP": LOOPBACK, "serviceIP": LOOPBACK, "podName": f"{cluster.name}-head-local"},
        "endpoints": {"gcs-server": str(cluster.gcs_port), CONTROL_PORT_NAME: str(cluster.control_port),
                      INGRESS_PORT_NAME: str(cluster.ingress_port), METRICS_PORT_NAME: str(cluster.metrics_port)},
        "desiredWorkerReplicas": sum(n for n, _ in cluster.want.values()),
        "availableWorkerReplicas": workers, "readyWorkerReplicas": workers,
        "conditions": [condition],
    }


@dataclass
class LocalCluster:
    """One RayCluster as local processes."""
    namespace: str
    name: str
    uid: str
    logdir: Path
    gcs_port: int = field(default_factory=free_port)
    control_port: int = field(default_factory=free_port)
    ingress_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    head: subprocess.Popen | None = None
    workers: dict[str, list[subprocess.Popen]] = field(default_factory=dict)
    want: dict[str, tuple[int, str]] = field(default_factory=dict)
    controller_up: bool = False
    # Each cluster has its own token: Ray 2.60 enables token auth, and the shared default
    # (~/.ray/auth_token) would let clusters started from different environments disagree.
    token: str = field(default_factory=lambda: secrets.token_hex(32))

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.gcs_port}"

    def env(self, base: dict[str, str]) -> dict[str, str]:
        return {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def _spawn(self, tag: str, args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
        return spawn(args, self.logdir / f"{tag}.log", env=self.env(env), cwd=cwd)

    def start_head(self, env: dict[str, str], cwd: Path) -> None:
        self.head = self._spawn("head", [_ray_bin(), "start", "--head", "--block", f"--port={self.gcs_port}",
                                         f"--node-ip-address={LOOPBACK}", "--num-cpus=0", "--include-dashboard=false",
                                         "--disable-usage-stats"], env, cwd)

    def start_controller(self, env: dict[str, str], cwd: Path, token: str) -> bool:
        """What the replica image's head start runs: ensure the controller (idempotent), its token in the env."""
        proc = subprocess.run([sys.executable, "-m", "rayfleet_runtime.controller", f"--address={self.address}",
                               f"--control-port={self.control_port}", f"--ingress-port={self.ingress_port}",
                               f"--metrics-port={self.metrics_port}",
                               "--ingress-nodes=head", f"--bind-host={LOOPBACK}", "--timeout=90"],
                              env={**self.env(env), CONTROL_TOKEN_ENV: token}, cwd=cwd, capture_output=True, text=True, timeout=150)
        (self.logdir / "controller-start.log").write_text(proc.stdout + proc.stderr)
        return proc.returncode == 0

    def controller_healthy(self) -> bool:
        return http_ok(f"http://{LOOPBACK}:{self.control_port}/healthz")

    def scale_workers(self, env: dict[str, str], cwd: Path) -> None:
        for group, (replicas, cpus) in self.want.items():
            procs = [p for p in self.workers.get(group, []) if p.poll() is None]
            while len(procs) < replicas:
                procs.append(self._spawn(f"worker-{group}-{len(procs)}",
                                         [_ray_bin(), "start", "--block", f"--address={self.address}",
                                          f"--node-ip-address={LOOPBACK}", f"--num-cpus={cpus}", "--disable-usage-stats"], env, cwd))
            while len(procs) > replicas:
                stop_process_group(procs.pop())  # like KubeRay deleting a worker pod
            self.workers[group] = procs
        for group in set(self.workers) - set(self.want):
            for proc in self.workers.pop(group):
                stop_process_group(proc)

    def stop(self) -> None:
        for procs in self.workers.values():
            for proc in procs:
                stop_process_group(proc)
        self.workers.clear()
        if self.head is not None:
            stop_process_group(self.head)


class LocalProvider:
    """Reconciles every RayCluster in the API server to local Ray processes, in a background thread."""

    def __init__(self, kubeconfig: Path, workdir: Path, code_dir: Path | None = None, resync_seconds: float = 2.0):
        self.workdir = Path(workdir)
        self.code_dir = Path(code_dir or os.getcwd()).resolve()
        self.resync_seconds = resync_seconds
        client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        self.api, self.core = kubernetes.client.CustomObjectsApi(client), kubernetes.client.CoreV1Api(client)
        self.clusters: dict[tuple[str, str], LocalCluster] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        path = os.pathsep.join(p for p in (str(self.code_dir), os.environ.get("PYTHONPATH", "")) if p)
        self.env = {**os.environ, "PYTHONPATH": path, "RAY_USAGE_STATS_ENABLED": "0"}

    def start(self) -> "LocalProvider":
        self._thread = threading.Thread(target=self._run, name="rayfleet-provider", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(120)
        for cluster in list(self.clusters.values()):
            cluster.stop()
        self.clusters.clear()

    def _run(self) -> None:
        # Level-based: list everything each period rather than trusting a watch stream.
        while not self._stopping.is_set():
            try:
                self.reconcile_all()
            except Exception:  # noqa: BLE001 - the provider must outlive any one bad pass
                log.exception("provider pass failed")
            self._stopping.wait(self.resync_seconds)

    def reconcile_all(self) -> None:
        items = self.api.list_cluster_custom_object(RAY_GROUP, RAY_VERSION, RAY_PLURAL)["items"]
        seen = set()
        for obj in items:
            meta = obj["metadata"]
            key = (meta["namespace"], meta["name"])
            if meta.get("deletionTimestamp"):
                continue
            seen.add(key)
            self._reconcile(obj)
        for key in set(self.clusters) - seen:
            log.info("RayCluster %s/%s is gone: stopping its processes", *key)
            self.clusters.pop(key).stop()

    def _control_token(self, obj: dict[str, Any]) -> str | None:
        """The controller's token from the head's env, its Secret read as a kubelet would; None while the
        Secret is missing (a kubelet would hold the head container back, CreateContainerConfigError)."""
        entry = head_env_ref(obj, CONTROL_TOKEN_ENV) or {}
        if "value" in entry:
            return entry["value"]
        ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
        if not ref:
            log.warning("RayCluster %s/%s: the head has no $%s: its controller can't start",
                        obj["metadata"]["namespace"], obj["metadata"]["name"], CONTROL_TOKEN_ENV)
            return None
        try:
            secret = self.core.read_namespaced_secret(ref["name"], obj["metadata"]["namespace"])
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        value = (secret.data or {}).get(ref["key"])
        return base64.b64decode(value).decode() if value else None

    def _reconcile(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        cluster = self.clusters.get(key)
        if cluster is not None and cluster.uid != meta["uid"]:  # deleted and re-created under the same name
            self.clusters.pop(key).stop()
            cluster = None
        if cluster is None:
            logdir = self.workdir / "clusters" / f"{meta['namespace']}.{meta['name']}"
            logdir.mkdir(parents=True, exist_ok=True)
            cluster = self.clusters[key] = LocalCluster(meta["namespace"], meta["name"], meta["uid"], logdir)
            log.info("starting RayCluster %s/%s (gcs %s)", *key, cluster.gcs_port)
            cluster.start_head(self.env, self.code_dir)
        if cluster.head is not None and cluster.head.poll() is not None:
            log.warning("head of %s/%s exited; restarting it", *key)  # like a kubelet restarting the head pod
            cluster.stop()
            cluster.controller_up = False
            cluster.start_head(self.env, self.code_dir)
        cluster.want = desired_workers(obj)
        if not cluster.controller_up or not cluster.controller_healthy():
            token = self._control_token(obj)
            cluster.controller_up = token is not None and cluster.start_controller(self.env, self.code_dir, token)
        if cluster.controller_up:
            cluster.scale_workers(self.env, self.code_dir)
        status = kuberay_status(cluster, cluster.controller_up, meta.get("generation", 0))
        old = obj.get("status") or {}
        if {k: v for k, v in old.items() if k != "conditions"} != {k: v for k, v in status.items() if k != "conditions"} \
                or [c.get("status") for c in old.get("conditions") or []] != [c["status"] for c in status["conditions"]]:
            with contextlib.suppress(ApiException):
                self.api.patch_namespaced_custom_object_status(RAY_GROUP, RAY_VERSION, meta["namespace"], RAY_PLURAL, meta["name"], {"status": status})
