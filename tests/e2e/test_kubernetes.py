"""End to end on a real cluster: the user's path, from `helm install` to `kubectl delete`.

A real kubelet runs the images built from our Dockerfiles, KubeRay's real operator turns the
ServeDeployments' RayClusters into pods, requests go through each ServeDeployment's Service. The
tests run in order and share the echo deployment, as a user's session would.

    make e2e        # or: .venv/bin/python -m pytest tests/e2e -v -rs   (as root)
"""
from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from rayfleet.waiting import eventually
from rayfleet_api.constants import CONTROL_PORT, INGRESS_PORT, METRICS_PORT

from .conftest import NAMESPACE, OPERATOR_NAMESPACE
from .helpers import (Traffic, apply, auth_secret, client_pod, connects, example, from_operator, http_get, replica_pids,
                      report_fault, serving, workers)

# Image builds (cold: minutes) happen in the session fixture's setup, which this budget covers.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]


@pytest.fixture(scope="module")
def echo(cluster):
    sd = example("echo")
    apply(cluster, sd)
    return sd


def test_echo_serves_from_distinct_replica_processes(cluster, echo):
    name, replicas = echo["metadata"]["name"], echo["spec"]["replicas"]
    sd = cluster.wait_ready(name, replicas)
    pids = set(replica_pids(sd).values())
    assert len(pids) == replicas and all(pids), sd["status"]["replicaStatuses"]

    base, prefix = cluster.service_url(name), echo["spec"]["routePrefix"]
    status, body = http_get(f"{base}{prefix}/hello?x=1")
    assert status == 200, body
    assert body["path"] == f"{prefix}/hello" and body["query"] == {"x": "1"}
    assert body["greeting"] == echo["spec"]["handlerArgs"]["greeting"]

    def spread_over_every_replica():
        """Every replica is its own OS process, and the Service + ingress spread requests over all of them.
        Against the replicas of the moment: a worker pod that joins after Ready may take one (a rebalance)."""
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda i: http_get(f"{base}{prefix}/n/{i}"), range(64)))
        assert all(code == 200 for code, _ in answers), answers
        now = set(replica_pids(cluster.sd(name)).values())
        return len(now) == replicas and {body["pid"] for _, body in answers} == now
    eventually(spread_over_every_replica, 90, 2, what="answers from every replica of the moment",
               diagnostics=lambda: cluster.diagnostics(name))


def test_ray_and_the_controller_need_the_clusters_tokens(cluster, echo):
    """Ray's token auth is on: the Jobs API (which runs code) refuses a client without the token; and it
    listens inside the head pod only."""
    name = echo["metadata"]["name"]
    (head,) = [p for p in cluster.pods(name) if p["metadata"]["labels"].get("ray.io/node-type") == "head"]
    # nothing answers from outside the head pod (the operator's pod may reach it, on the controller's port)
    assert from_operator(cluster, f"http://{head['status']['podIP']}:8265/api/jobs/") == 0

    def jobs_status(token: str | None) -> int:
        """The Jobs API's answer from inside the head container (where `kubectl port-forward` lands too)."""
        script = ("import sys, urllib.request, urllib.error\n"
                  "h = {'Authorization': 'Bearer ' + sys.argv[1]} if sys.argv[1] else {}\n"
                  "try: print(urllib.request.urlopen(urllib.request.Request('http://127.0.0.1:8265/api/jobs/', headers=h)).status)\n"
                  "except urllib.error.HTTPError as e: print(e.code)")
        return int(cluster.kubectl("exec", "-n", NAMESPACE, head["metadata"]["name"], "-c", "ray-head", "--",
                                   "python", "-c", script, token or "").stdout.strip())

    data = cluster.get("secret", auth_secret(cluster, name), "-n", NAMESPACE)["data"]
    token = base64.b64decode(data["ray-token"]).decode()
    assert jobs_status(None) == 401
    assert jobs_status("not-the-token") in (401, 403)
    assert jobs_status(token) == 200
    # So does the rayfleet controller's API (it deploys code too), with a token of its own; only the
    # operator's pod may reach it at all (the NetworkPolicy), so ask from there.
    control = f"http://{head['status']['podIP']}:8090/v1/deployments"
    control_token = base64.b64decode(data["control-token"]).decode()
    assert from_operator(cluster, control) == 401
    assert from_operator(cluster, control, token) == 401  # Ray's token is not it
    assert from_operator(cluster, control, control_token) == 200


def test_the_network_policy_refuses_other_namespaces(cluster, echo):
    """Enforced by the cluster's network plugin (kube-router), not only written: a pod of another namespace
    can't open a connection to the HTTP port, the controller's or Ray's; a pod of the deployment's own
    namespace reaches HTTP but not the controller (only the operator's pod does: the test above); every pod
    reaches the metrics port."""
    name = echo["metadata"]["name"]
    cluster.wait_ready(name, echo["spec"]["replicas"])
    (head,) = [p for p in cluster.pods(name) if p["metadata"]["labels"].get("ray.io/node-type") == "head"]
    ip = head["status"]["podIP"]
    ray_ports = [p["containerPort"] for p in head["spec"]["containers"][0]["ports"] if p["name"] in ("gcs-server", "client")]
    assert len(ray_ports) == 2
    outsider_namespace = "outsider-e2e"
    cluster.kubectl("create", "namespace", outsider_namespace)
    try:
        outsider = client_pod(cluster, outsider_namespace, "outsider")
        insider = client_pod(cluster, NAMESPACE, "insider")
        # kube-router admits a new pod once it has put its IP in the policy's sets, a moment after it runs
        eventually(lambda: connects(cluster, NAMESPACE, insider, ip, INGRESS_PORT), timeout=60, interval=2,
                   what="the insider admitted to the HTTP port")
        assert not connects(cluster, NAMESPACE, insider, ip, CONTROL_PORT)
        assert connects(cluster, outsider_namespace, outsider, ip, METRICS_PORT)
        for port in (INGRESS_PORT, CONTROL_PORT, *ray_ports):
            assert not connects(cluster, outsider_namespace, outsider, ip, port), port
    finally:
        cluster.kubectl("delete", "pod", "insider", "-n", NAMESPACE, "--wait=false", check=False)
        cluster.kubectl("delete", "namespace", outsider_namespace, "--wait=false", check=False)


def test_kubectl_get_and_events_read_well(cluster, echo):
    name = echo["metadata"]["name"]
    table = cluster.kubectl("get", "sd", name, "-n", NAMESPACE).stdout.splitlines()
    header, row = table[0].split(), table[1].split()
    assert header[:5] == ["NAME", "DESIRED", "READY", "IN-FLIGHT", "STATUS"], table
    assert row[:3] == [name, "2", "2"] and row[4] == "AllReplicasReady", table
    assert f"{name}.{NAMESPACE}.svc" in table[1], table
    events = cluster.get("events", "-n", NAMESPACE, "--field-selector",
                         f"involvedObject.kind=ServeDeployment,involvedObject.name={name}")["items"]
    assert any(e["reason"] == "AllReplicasReady" and e["type"] == "Normal" for e in events), events
    described = cluster.kubectl("describe", "sd", name, "-n", NAMESPACE).stdout
    assert "AllReplicasReady" in described and "Replica Statuses" in described, described
    # `kubectl logs` reaches the kubelet: Ray's own start-up, and the operator's reconciles.
    (head,) = [p["metadata"]["name"] for p in cluster.pods(name) if p["metadata"]["labels"]["ray.io/node-type"] == "head"]
    assert "Ray runtime started" in cluster.kubectl("logs", "-n", NAMESPACE, head, "-c", "ray-head").stdout
    assert "Handler 'apply' succeeded" in cluster.kubectl("logs", "-n", OPERATOR_NAMESPACE, "deployment/rayfleet").stdout


def test_prometheus_scrapes_every_pod_and_kubectl_logs_shows_lifecycle_events(cluster, echo):
    """What a PodMonitor would scrape: each Ray pod's and the operator's `metrics` port, by pod IP, from a
    Prometheus pod in a namespace of its own (the NetworkPolicies admit every pod to those ports). Exactly
    the requests sent through the Service are counted, by the replicas and by HAProxy."""
    from .prometheus_pod import PrometheusPod

    name, replicas = echo["metadata"]["name"], echo["spec"]["replicas"]
    cluster.wait_ready(name, replicas)
    ray_pods = [p for p in cluster.pods(name) if not p["metadata"].get("deletionTimestamp")]
    operator_pods = (cluster.get("pods", "-n", OPERATOR_NAMESPACE, "-l", "app.kubernetes.io/part-of=rayfleet")
                     or {}).get("items", [])
    assert ray_pods and operator_pods

    def port(pod: dict) -> int:
        ports = [p for c in pod["spec"]["containers"] for p in c.get("ports") or [] if p.get("name") == "metrics"]
        assert len(ports) == 1, pod["metadata"]["name"]  # declared, as a PodMonitor finds it
        return ports[0]["containerPort"]

    targets = {"ray": [f"{p['status']['podIP']}:{port(p)}" for p in ray_pods],
               "operator": [f"{p['status']['podIP']}:{port(p)}" for p in operator_pods]}
    mine = f'namespace="{NAMESPACE}",deployment="{name}"'
    served = f'sum(rayfleet_replica_requests_total{{{mine},code="200"}})'
    proxied = f'sum(haproxy_backend_http_responses_total{{{mine},code="2xx"}})'
    with PrometheusPod(cluster, targets) as prom:
        prom.wait_up("ray")
        prom.wait_up("operator")
        prom.wait_scraped_after("ray", time.time())
        before = {q: prom.value(q) or 0 for q in (served, proxied)}
        base, prefix, n = cluster.service_url(name), echo["spec"]["routePrefix"], 25
        assert [http_get(f"{base}{prefix}/metrics-test")[0] for _ in range(n)] == [200] * n
        prom.wait_value(served, before[served] + n)
        prom.wait_value(proxied, before[proxied] + n)
        per_replica = prom.values(f'rayfleet_replica_requests_total{{{mine},code="200"}}', by="replica")
        assert len(per_replica) == replicas, per_replica
        assert prom.value(f'rayfleet_controller_replicas{{{mine},state="READY"}}') == replicas
        assert prom.value(f'sum(rayfleet_operator_reconciles_total{{{mine},outcome="ok"}})') > 0
        assert prom.value('sum(rayfleet_ingress_scrape_errors_total)') == 0
    # The controller's lifecycle lines reach the head pod's own log, not only Ray's files in the pod.
    head = next(p for p in ray_pods if p["metadata"]["labels"].get("ray.io/node-type") == "head")
    logs = cluster.kubectl("logs", "-n", NAMESPACE, head["metadata"]["name"], check=False).stdout
    assert f"event=replica_ready deployment={NAMESPACE}.{name}" in logs, logs[-3000:]


def test_scale_up_and_down_fails_no_request(cluster, echo):
    name, prefix = echo["metadata"]["name"], echo["spec"]["routePrefix"]
    before = replica_pids(cluster.sd(name))
    with Traffic(f"{cluster.service_url(name)}{prefix}/scale") as traffic:
        cluster.kubectl("scale", f"sd/{name}", "-n", NAMESPACE, "--replicas=3")
        sd = cluster.wait_ready(name, 3)
        after = replica_pids(sd)
        assert len(set(after.values())) == 3 and before.items() <= after.items(), (before, after)
        # 3 replicas of 0.5 CPU need a second 1-CPU worker: KubeRay made that pod, and it joined the
        # Service only once its HAProxy routed (the traffic saw no refused connection and no 404).
        assert len(workers(cluster, name)) == 2
        answered = traffic.answers
        eventually(lambda: traffic.answers >= answered + 20, timeout=60, what="traffic after scaling up")

        cluster.kubectl("scale", f"sd/{name}", "-n", NAMESPACE, "--replicas=2")
        sd = cluster.wait_ready(name, 2)
        answered = traffic.answers
        eventually(lambda: traffic.answers >= answered + 20, timeout=60, what="traffic after scaling down")
    assert not traffic.failures, traffic.failures[:5]
    # Only the drained replica stopped: no worker pod that still served was taken away.
    assert replica_pids(sd).items() <= after.items(), "scale-down only removes replicas"
    serving = {r["node"] for r in sd["status"]["replicaStatuses"]}
    assert serving <= {p["status"].get("podIP") for p in workers(cluster, name)}


def test_rolling_update_fails_no_request(cluster, echo):
    name, prefix = echo["metadata"]["name"], echo["spec"]["routePrefix"]
    old = replica_pids(cluster.sd(name))
    with Traffic(f"{cluster.service_url(name)}{prefix}/rollout") as traffic:
        eventually(lambda: traffic.answers >= 20, timeout=60, what="traffic flowing before the rollout")
        patch = {"spec": {"handlerArgs": {"greeting": "rolled"}}}
        cluster.kubectl("patch", "sd", name, "-n", NAMESPACE, "--type=merge", "-p", json.dumps(patch))
        sd = cluster.wait_ready(name, 2)
        eventually(lambda: traffic.last.get("greeting") == "rolled", timeout=60, what="the new version answering")
        answered = traffic.answers
        eventually(lambda: traffic.answers >= answered + 20, timeout=60, what="traffic after the rollout")
    assert not traffic.failures, traffic.failures[:5]
    assert not set(replica_pids(sd)) & set(old), "every replica was replaced"


def test_operator_restart_keeps_replicas(cluster, echo):
    name = echo["metadata"]["name"]
    sd = cluster.sd(name)
    pids = replica_pids(sd)
    pods = {p["metadata"]["uid"]: p["status"]["containerStatuses"][0]["restartCount"] for p in cluster.pods(name)}
    old_operator = cluster.get("pods", "-n", OPERATOR_NAMESPACE, "-l", "app.kubernetes.io/name=rayfleet")["items"]
    cluster.kubectl("delete", "pod", "-n", OPERATOR_NAMESPACE, "-l", "app.kubernetes.io/name=rayfleet", "--wait=true",
                    timeout=180)
    cluster.kubectl("rollout", "status", "-n", OPERATOR_NAMESPACE, "deployment/rayfleet", "--timeout=180s", timeout=200)
    new_operator = cluster.get("pods", "-n", OPERATOR_NAMESPACE, "-l", "app.kubernetes.io/name=rayfleet")["items"]
    assert {p["metadata"]["uid"] for p in new_operator}.isdisjoint(p["metadata"]["uid"] for p in old_operator)

    # An in-place change proves the new operator pod has reconciled (observedGeneration moves).
    cluster.kubectl("patch", "sd", name, "-n", NAMESPACE, "--type=merge", "-p", '{"spec": {"requestTimeoutSeconds": 45}}')
    sd = cluster.wait_ready(name, 2)
    assert replica_pids(sd) == pids, "the operator's restart restarted no replica"
    assert all(r["restarts"] == 0 for r in sd["status"]["replicaStatuses"]), sd["status"]["replicaStatuses"]
    assert {p["metadata"]["uid"]: p["status"]["containerStatuses"][0]["restartCount"] for p in cluster.pods(name)} == pods


def test_a_head_loss_without_redis_is_announced_and_recovered_from(cluster, echo):
    """Without GCS fault tolerance the head's loss costs every replica: the Event and the status say so
    beforehand, and the deployment comes back by itself. What it costs is measured here, not promised."""
    name, prefix = echo["metadata"]["name"], echo["spec"]["routePrefix"]
    events = cluster.get("events", "-n", NAMESPACE, "--field-selector",
                         f"involvedObject.kind=ServeDeployment,involvedObject.name={name}")["items"]
    assert any(e["reason"] == "NoHeadFaultTolerance" and e["type"] == "Warning" for e in events), events
    sd = cluster.wait_ready(name, 2)
    assert sd["status"]["headFaultTolerant"] is False
    pids = set(replica_pids(sd).values())
    (head,) = [p for p in cluster.pods(name) if p["metadata"]["labels"]["ray.io/node-type"] == "head"]
    with Traffic(f"{cluster.service_url(name)}{prefix}/head-loss") as traffic:
        eventually(lambda: traffic.answers >= 20, timeout=60, what="traffic before the fault")
        started = time.monotonic()
        cluster.kubectl("delete", "pod", head["metadata"]["name"], "-n", NAMESPACE, "--wait=false")
        def recovered():  # every replica was replaced (their raylets died without a GCS), and all serve
            status = cluster.sd(name).get("status") or {}
            return status.get("readyReplicas") == 2 and not set(replica_pids({"status": status}).values()) & pids
        eventually(recovered, timeout=600, interval=1, what="new replicas serving after the head's loss",
                   diagnostics=lambda: cluster.diagnostics(name))
        seconds = time.monotonic() - started
        answered = traffic.answers
        eventually(lambda: traffic.answers >= answered + 20, timeout=120, what="traffic after the fault")
    report_fault("head pod deleted (no Redis)", traffic, seconds)


def test_delete_removes_everything(cluster, echo):
    name = echo["metadata"]["name"]
    owned = [("raycluster", name), ("service", name), ("networkpolicy", name), ("poddisruptionbudget", name),
             ("secret", auth_secret(cluster, name))]
    assert all(cluster.get(kind, obj, "-n", NAMESPACE) for kind, obj in owned)
    cluster.kubectl("delete", "sd", name, "-n", NAMESPACE, "--timeout=300s", timeout=330)

    def gone():
        return not cluster.pods(name) and not any(cluster.get(kind, obj, "-n", NAMESPACE) for kind, obj in owned)
    eventually(gone, timeout=300, interval=2, what=f"RayCluster, pods, Service, NetworkPolicy, PDB and Secret of sd/{name} deleted",
               diagnostics=cluster.diagnostics)


def test_async_handler_overlaps_concurrent_requests(cluster):
    with serving(cluster, "async_io") as route:
        url = f"{route}?seconds=1"
        assert http_get(url)[0] == 200  # warm up: connections, imports
        with ThreadPoolExecutor(5) as pool:
            started = time.monotonic()
            answers = list(pool.map(lambda _: http_get(url), range(5)))
            elapsed = time.monotonic() - started
        assert all(code == 200 for code, _ in answers), answers
        assert len({body["pid"] for _, body in answers}) == 1, "one replica served them all"
        # One replica, five 1-second awaits: concurrent, not 5 s in a row.
        assert elapsed < 2.5, f"5 concurrent 1 s requests took {elapsed:.2f}s"


def test_a_fastapi_app_streams_and_upgrades_through_the_service(cluster):
    import httpx
    from websockets.sync.client import connect

    with serving(cluster, "fastapi_app") as base:
        code, body = http_get(f"{base}/items/3?q=x")
        assert code == 200 and body["item_id"] == 3 and body["model"] == "loaded", body  # lifespan ran
        t0, arrivals = time.monotonic(), []
        with httpx.stream("GET", f"{base}/stream", params={"n": 3, "interval": 0.5}, timeout=30) as r:
            for chunk in r.iter_text():
                arrivals.append((time.monotonic() - t0, chunk))
        assert "".join(c for _, c in arrivals) == "chunk 0\nchunk 1\nchunk 2\n"
        assert arrivals[0][0] < 0.5 < arrivals[-1][0], arrivals  # each chunk as it is produced
        with connect(base.replace("http://", "ws://") + "/echo", open_timeout=30) as ws:
            ws.send("hi")
            assert ws.recv(timeout=30) == "echo: hi"
