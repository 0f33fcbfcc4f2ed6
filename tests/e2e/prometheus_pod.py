"""bench.prometheus.Prometheus, run as a pod of the e2e cluster: pod IPs (and the NetworkPolicies that
admit every pod to the metrics ports) are reachable from pods only. This host queries it through a
NodePort, like the ServeDeployments."""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from bench.prometheus import Prometheus
from rayfleet.waiting import eventually

NAMESPACE = "monitoring-e2e"
IMAGE = "rayfleet-e2e/prometheus:e2e"
PORT = 9090


class PrometheusPod(Prometheus):
    def __init__(self, cluster, targets: Mapping[str, Sequence[str]]):
        super().__init__(cluster.kind.workdir / "prometheus", targets)
        self.cluster = cluster

    def manifests(self) -> list[dict[str, Any]]:
        labels = {"app": "prometheus"}
        args = ["--config.file=/etc/prometheus-e2e/prometheus.yml", "--storage.tsdb.path=/tmp/data",
                f"--web.listen-address=:{PORT}", "--storage.tsdb.retention.time=1d", "--log.level=warn"]
        return [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "prometheus", "namespace": NAMESPACE},
             "data": {"prometheus.yml": json.dumps(self.config())}},
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "prometheus", "namespace": NAMESPACE, "labels": labels},
             "spec": {"containers": [{
                 "name": "prometheus", "image": IMAGE, "imagePullPolicy": "Never", "args": args,
                 "ports": [{"containerPort": PORT}],
                 "volumeMounts": [{"name": "config", "mountPath": "/etc/prometheus-e2e"},
                                  {"name": "data", "mountPath": "/tmp"}]}],
                 "volumes": [{"name": "config", "configMap": {"name": "prometheus"}}, {"name": "data", "emptyDir": {}}]}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "prometheus", "namespace": NAMESPACE},
             "spec": {"type": "NodePort", "selector": labels, "ports": [{"port": PORT}]}},
        ]

    def start(self, timeout: float = 180) -> "PrometheusPod":
        for manifest in self.manifests():
            self.cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
        svc = self.cluster.get("service", "prometheus", "-n", NAMESPACE)
        self.url = f"http://{self.cluster.entry_ip}:{svc['spec']['ports'][0]['nodePort']}"
        eventually(self.answers_ready, timeout, 1, what=f"prometheus ready at {self.url}", diagnostics=self.log_tail)
        return self

    def stop(self) -> None:
        self.cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)

    def log_tail(self, chars: int = 3000) -> str:
        return self.cluster.kubectl("logs", "-n", NAMESPACE, "prometheus", check=False).stdout[-chars:]
