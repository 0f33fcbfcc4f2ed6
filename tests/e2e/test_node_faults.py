"""Faults at the level of nodes, on the kind cluster's two workers, under continuous GETs through the
Service (the NodePort twin on the control-plane node), every failed request counted.

- `docker stop` of the worker node that hosts a replica but not the head: the node is gone without a
  word. Until Kubernetes marks it NotReady (the node controller's grace period) and takes its pods out
  of the Service's endpoints, kube-proxy still sends some connections there, and those fail; from then
  on none does, while the deployment's other replica serves. `docker start` brings the node back and
  the deployment to full strength.
- `kubectl drain` of that node: the eviction goes through the PodDisruptionBudget and the pod's preStop
  drain, so it fails no GET, as a pod eviction doesn't.

The counts are printed as `[e2e] fault ...` lines (bench/README.md).
"""
from __future__ import annotations

import time

import pytest

from tests.waiting import eventually

from .conftest import NAMESPACE
from .helpers import Traffic, apply, example, full_strength, report_fault, run_docker

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]

NAME = "hardy"


@pytest.fixture(scope="module")
def hardy(cluster):
    sd = example("echo")
    sd["metadata"]["name"] = NAME
    sd["spec"]["routePrefix"] = "/hardy"
    apply(cluster, sd)
    cluster.wait_ready(NAME, 2)
    yield sd
    cluster.kubectl("delete", "sd", NAME, "-n", NAMESPACE, "--timeout=300s", check=False, timeout=330)


def url(cluster) -> str:
    return f"{cluster.service_url(NAME)}/hardy/traffic"


def spread_node(cluster) -> str:
    """The worker node that hosts a replica's pod and not the head, once the replicas are on both worker
    nodes: the operator spreads the worker pods over Kubernetes nodes, the controller the replicas over
    the pods (a replica started while one pod was not ready yet moves once it is)."""
    return eventually(lambda: _spread_node(cluster), timeout=600, interval=5, what="replicas on both worker nodes",
                      diagnostics=lambda: cluster.diagnostics(NAME))


def _spread_node(cluster) -> str | None:
    sd = cluster.wait_ready(NAME, 2)
    pods = {p["status"].get("podIP"): p for p in cluster.pods(NAME)}
    head_node = next(p["spec"]["nodeName"] for p in pods.values() if p["metadata"]["labels"]["ray.io/node-type"] == "head")
    nodes = {pods[r["node"]]["spec"]["nodeName"] for r in sd["status"]["replicaStatuses"] if r["node"] in pods}
    if len(nodes) != 2 or head_node not in nodes:  # one replica on each worker node: a lost node leaves one serving
        return None
    (node,) = nodes - {head_node}
    return node


def more_traffic(traffic: Traffic, n: int = 20) -> None:
    answered = traffic.answers
    eventually(lambda: traffic.answers >= answered + n, timeout=120, what=f"{n} more answers")


def test_a_stopped_worker_node_fails_requests_only_until_kubernetes_notices(cluster, hardy):
    node = spread_node(cluster)
    lost_pods = {p["metadata"]["name"] for p in cluster.pods(NAME) if p["spec"]["nodeName"] == node}
    try:
        with Traffic(url(cluster)) as traffic:
            more_traffic(traffic)
            started = time.monotonic()
            run_docker("stop", node)

            def out_of_endpoints():  # the node controller marks the pods not ready; the endpoints drop them
                ready = {a.get("targetRef", {}).get("name")
                         for s in (cluster.get("endpointslices", "-n", NAMESPACE, "-l",
                                               f"kubernetes.io/service-name={NAME}") or {}).get("items", [])
                         for a in s.get("endpoints") or [] if (a.get("conditions") or {}).get("ready")}
                return not (ready & lost_pods)
            eventually(out_of_endpoints, timeout=300, interval=1, what=f"the pods of {node} out of the endpoints")
            noticed = time.monotonic()
            more_traffic(traffic, 100)  # the other replica serves everything meanwhile
            during = len(traffic.failures)
            run_docker("start", node)
            cluster.kubectl("wait", "--for=condition=Ready", f"node/{node}", "--timeout=300s", timeout=330)
            seconds = full_strength(cluster, NAME, started)
            more_traffic(traffic)
    finally:
        run_docker("start", node, check=False)
    report_fault("worker node stopped", traffic, seconds,
                 f"its pods left the endpoints after {noticed - started:.1f} s, {during} failed until then")
    # A request sent before may fail long after (its connect to the lost node times out at 30 s); one sent
    # once kube-proxy has applied the new endpoints (a second or two) may not.
    late = [t - noticed for t in traffic.sent_failed if t > noticed + 2]
    assert not late, (late, traffic.failures[-5:])
    assert traffic.answers > 120


def test_draining_a_worker_node_fails_no_request(cluster, hardy):
    node = spread_node(cluster)  # the stopped node's pods came back with it
    try:
        with Traffic(url(cluster)) as traffic:
            more_traffic(traffic)
            started = time.monotonic()
            cluster.kubectl("drain", node, "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=600s",
                            timeout=630)
            seconds = full_strength(cluster, NAME, started, off_node=node)
            more_traffic(traffic)
    finally:
        cluster.kubectl("uncordon", node)
    report_fault("worker node drained", traffic, seconds)
    assert not traffic.failures, traffic.failures[:5]
