"""Faults at the level of pods, where they happen: a real kubelet, KubeRay's operator, continuous GETs
through the Service, every failed request counted.

One ServeDeployment of two replicas, with the head's GCS state in a real Redis (Debian's redis-server,
in an image built like the others), loses in turn: a worker pod deleted (graceful), one evicted through
the Eviction API (its PodDisruptionBudget honoured), one force-deleted, and the head pod. The graceful
ones and the head fail no GET; the force deletion at most the requests in flight on the lost pod. Each
fault's failed requests and time to full strength are printed as `[e2e] fault ...` lines (what
bench/README.md's Kubernetes rows come from).
"""
from __future__ import annotations

import json
import time

import pytest

from rayfleet.waiting import eventually

from .conftest import NAMESPACE
from .helpers import Traffic, apply, example, full_strength, replica_pids, report_fault, workers

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]

REDIS_NAMESPACE = "redis-e2e"
REDIS_IMAGE = "rayfleet-e2e/redis:e2e"
REDIS_PASSWORD = "e2e-redis-password"
NAME = "sturdy"
# A sequential client has one request in flight at a time; a pod that vanishes can take that one, and
# one more that kube-proxy or an HAProxy sent it before learning it is gone.
FORCED_LOSS_BOUND = 2


def redis_manifests() -> list[dict]:
    labels = {"app": "redis"}
    return [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "redis-auth", "namespace": REDIS_NAMESPACE},
         "stringData": {"password": REDIS_PASSWORD}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "redis", "namespace": REDIS_NAMESPACE},
         "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
             "metadata": {"labels": labels},
             "spec": {"containers": [{
                 "name": "redis", "image": REDIS_IMAGE, "imagePullPolicy": "Never", "ports": [{"containerPort": 6379}],
                 "env": [{"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "redis-auth", "key": "password"}}}],
                 "readinessProbe": {"tcpSocket": {"port": 6379}, "periodSeconds": 2},
                 "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "redis", "namespace": REDIS_NAMESPACE},
         "spec": {"selector": labels, "ports": [{"port": 6379, "targetPort": 6379}]}},
    ]


@pytest.fixture(scope="module")
def sturdy(cluster):
    """Redis, the password Secret in the users' namespace, and the ServeDeployment that uses both."""
    cluster.kubectl("create", "namespace", REDIS_NAMESPACE)
    for manifest in redis_manifests():
        cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    cluster.kubectl("rollout", "status", "-n", REDIS_NAMESPACE, "deployment/redis", "--timeout=180s", timeout=200)
    cluster.kubectl("create", "secret", "generic", "redis-auth", "-n", NAMESPACE,
                    f"--from-literal=password={REDIS_PASSWORD}")
    sd = example("echo")
    sd["metadata"]["name"] = NAME
    sd["spec"]["routePrefix"] = "/sturdy"
    sd["spec"]["rayCluster"] = {"gcsFaultTolerance": {
        "redisAddress": f"redis.{REDIS_NAMESPACE}.svc:6379",
        "redisPasswordSecret": {"name": "redis-auth", "key": "password"}}}
    apply(cluster, sd)
    spread(cluster)
    return sd


def url(cluster) -> str:
    return f"{cluster.service_url(NAME)}/sturdy/traffic"


def pod_of(cluster, node_ip: str) -> dict:
    (pod,) = [p for p in cluster.pods(NAME) if p["status"].get("podIP") == node_ip
              and not p["metadata"].get("deletionTimestamp")]
    return pod


def spread(cluster) -> dict:
    """The deployment Ready with one replica on each worker pod. The controller places replicas on the Ray
    nodes there are: a worker pod that joins after them takes one by a rebalance, which may follow Ready."""
    full_strength(cluster, NAME, time.monotonic())
    return cluster.wait_ready(NAME, 2)


def a_replica_pod(cluster) -> tuple[dict, dict[str, int]]:
    sd = spread(cluster)
    return pod_of(cluster, sd["status"]["replicaStatuses"][0]["node"]), replica_pids(sd)


def test_replicas_are_spread_and_the_cluster_has_a_disruption_budget_and_redis(cluster, sturdy):
    sd = spread(cluster)
    assert len({r["node"] for r in sd["status"]["replicaStatuses"]}) == 2
    assert len(workers(cluster, NAME)) == 2  # the operator sized two worker pods for two replicas
    pdb = cluster.get("poddisruptionbudget", NAME, "-n", NAMESPACE)
    # the head and two workers: one of them may be evicted at a time
    assert pdb["spec"]["minAvailable"] == 2 and pdb["spec"]["selector"]["matchLabels"] == {"ray.io/cluster": NAME}
    eventually(lambda: (cluster.get("poddisruptionbudget", NAME, "-n", NAMESPACE).get("status") or {}).get(
        "disruptionsAllowed") == 1, timeout=60, what="the budget allowing one eviction")
    assert sd["status"]["headFaultTolerant"] is True
    rc = cluster.get("raycluster", NAME, "-n", NAMESPACE)
    assert rc["spec"]["gcsFaultToleranceOptions"]["redisAddress"] == f"redis.{REDIS_NAMESPACE}.svc:6379"


def test_deleting_a_worker_pod_moves_its_replica_first_and_fails_no_request(cluster, sturdy):
    pod, pids = a_replica_pod(cluster)
    with Traffic(url(cluster)) as traffic:
        eventually(lambda: traffic.answers >= 20, timeout=60, what="traffic before the fault")
        started = time.monotonic()
        cluster.kubectl("delete", "pod", pod["metadata"]["name"], "-n", NAMESPACE, "--wait=false")
        seconds = full_strength(cluster, NAME, started, gone_pod=pod["metadata"]["name"])
        answered = traffic.answers
        eventually(lambda: traffic.answers >= answered + 20, timeout=60, what="traffic after the fault")
    report_fault("worker pod deleted", traffic, seconds)
    assert not traffic.failures, traffic.failures[:5]
    after = replica_pids(cluster.sd(NAME))
    assert len(set(after) & set(pids)) == 1, (pids, after)  # the other replica served throughout


def test_an_eviction_honours_the_budget_and_fails_no_request(cluster, sturdy):
    pod, pids = a_replica_pod(cluster)
    other = next(p for p in workers(cluster, NAME) if p["metadata"]["name"] != pod["metadata"]["name"])

    def evict(name: str):
        eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": NAMESPACE}}
        return cluster.kubectl("create", "--raw", f"/api/v1/namespaces/{NAMESPACE}/pods/{name}/eviction", "-f", "-",
                               input=json.dumps(eviction), check=False)

    eventually(lambda: (cluster.get("poddisruptionbudget", NAME, "-n", NAMESPACE).get("status") or {}).get(
        "disruptionsAllowed") == 1, timeout=120, what="the budget allowing one eviction (every pod ready)")
    with Traffic(url(cluster)) as traffic:
        eventually(lambda: traffic.answers >= 20, timeout=60, what="traffic before the fault")
        started = time.monotonic()
        evicted = evict(pod["metadata"]["name"])
        assert evicted.returncode == 0, evicted.stderr
        # While that pod moves its replica, the budget refuses a second eviction (429 from the API server).
        refused = evict(other["metadata"]["name"])
        assert refused.returncode != 0 and "disruption budget" in refused.stderr, refused.stderr
        seconds = full_strength(cluster, NAME, started, gone_pod=pod["metadata"]["name"])
        answered = traffic.answers
        eventually(lambda: traffic.answers >= answered + 20, timeout=60, what="traffic after the fault")
    report_fault("worker pod evicted", traffic, seconds)
    assert not traffic.failures, traffic.failures[:5]
    assert len(set(replica_pids(cluster.sd(NAME))) & set(pids)) == 1


def test_a_force_deleted_worker_pod_costs_at_most_what_was_in_flight_on_it(cluster, sturdy):
    pod, pids = a_replica_pod(cluster)
    with Traffic(url(cluster)) as traffic:
        eventually(lambda: traffic.answers >= 20, timeout=60, what="traffic before the fault")
        started = time.monotonic()
        cluster.kubectl("delete", "pod", pod["metadata"]["name"], "-n", NAMESPACE, "--grace-period=0", "--force",
                        "--wait=false")

        def lost_replica_unready():  # the status stops counting the dead replica as ready within seconds
            status = cluster.sd(NAME)["status"]
            return pod["status"]["podIP"] not in {r["node"] for r in status["replicaStatuses"] if r["state"] == "READY"}
        eventually(lost_replica_unready, timeout=60, interval=0.5, what="the lost replica no longer counted ready")
        noticed = time.monotonic() - started
        seconds = full_strength(cluster, NAME, started, gone_pod=pod["metadata"]["name"])
        answered = traffic.answers
        eventually(lambda: traffic.answers >= answered + 20, timeout=60, what="traffic after the fault")
    report_fault("worker pod force-deleted", traffic, seconds)
    print(f"[e2e] the lost replica left the ready count after {noticed:.1f} s", flush=True)
    # New connections kube-proxy still sends to the deleted pod's address are refused until its endpoint is
    # gone (the cluster's window, a plain Deployment's too: 1 and 4 of them in two CI runs); what rayfleet
    # loses is what was in flight on the pod. Refusals must end before the deployment is back at full strength.
    refused = [sent - started for (_, body), sent in zip(traffic.failures, traffic.sent_failed)
               if "Connection refused" in str(body.get("error"))]
    lost = [f for f in traffic.failures if "Connection refused" not in str(f[1].get("error"))]
    print(f"[e2e] force-deleted pod: {len(refused)} connection(s) refused, {len(lost)} other failure(s)", flush=True)
    assert len(lost) <= FORCED_LOSS_BOUND, traffic.failures
    assert all(at <= seconds for at in refused), (refused, seconds)
    assert len(set(replica_pids(cluster.sd(NAME))) & set(pids)) == 1


def test_deleting_the_head_replaces_no_replica_and_fails_no_request(cluster, sturdy):
    sd = spread(cluster)  # no rebalance to come, which would replace a replica
    pids = replica_pids(sd)
    (head,) = [p for p in cluster.pods(NAME) if p["metadata"]["labels"]["ray.io/node-type"] == "head"]
    worker_restarts = {p["metadata"]["name"]: p["status"]["containerStatuses"][0]["restartCount"]
                       for p in workers(cluster, NAME)}
    with Traffic(url(cluster)) as traffic:
        eventually(lambda: traffic.answers >= 20, timeout=60, what="traffic before the fault")
        started = time.monotonic()
        cluster.kubectl("delete", "pod", head["metadata"]["name"], "-n", NAMESPACE, "--wait=false")

        def new_head_ready():
            heads = [p for p in cluster.pods(NAME) if p["metadata"]["labels"]["ray.io/node-type"] == "head"
                     and p["metadata"]["uid"] != head["metadata"]["uid"]]
            return heads and any(c["type"] == "Ready" and c["status"] == "True"
                                 for c in heads[0]["status"].get("conditions") or [])
        eventually(new_head_ready, timeout=300, interval=1, what="a new head pod, ready (it routes)",
                   diagnostics=lambda: cluster.diagnostics(NAME))
        seconds = time.monotonic() - started
        # the new head's controller adopted both replicas: the status sees them again
        def adopted():
            status = cluster.sd(NAME).get("status") or {}
            return status.get("readyReplicas") == 2 and replica_pids({"status": status}) == pids
        eventually(adopted, timeout=180, interval=1, what="the same replicas, adopted",
                   diagnostics=lambda: cluster.diagnostics(NAME))
        answered = traffic.answers
        eventually(lambda: traffic.answers >= answered + 20, timeout=60, what="traffic after the fault")
    report_fault("head pod deleted (GCS in Redis)", traffic, seconds)
    assert not traffic.failures, traffic.failures[:5]
    sd = cluster.sd(NAME)
    assert all(r["restarts"] == 0 for r in sd["status"]["replicaStatuses"]), sd["status"]["replicaStatuses"]
    assert {p["metadata"]["name"]: p["status"]["containerStatuses"][0]["restartCount"]
            for p in workers(cluster, NAME)} == worker_restarts  # the workers' containers never restarted
