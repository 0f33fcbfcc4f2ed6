"""Issue: end to end on the local Kubernetes environment — real API server, real operator process,
the local RayCluster provider running real Ray, the rayfleet controller and HAProxy ingress.

One ServeDeployment lives through the module (tests run in file order): apply → Ready → traffic →
scale → replica killed → operator restarted → a broken sibling on the same RayCluster → delete.
"""
import asyncio
import contextlib
import json
import os
import signal
import threading
import urllib.error
import urllib.request

import pytest
import yaml
from kubernetes import watch
from urllib3.exceptions import ProtocolError

from rayfleet.dev.operator import OperatorProcess
from rayfleet.dev.provider import LocalProvider
from rayfleet.waiting import eventually

WAIT_S = 90  # Ray processes start and stop on this 2-core machine

pytestmark = [pytest.mark.integration, pytest.mark.ray]
NAME = "echo"


def sd(name=NAME, **spec):
    return {"apiVersion": "rayfleet.io/v1alpha1", "kind": "ServeDeployment", "metadata": {"name": name},
            "spec": {"handler": "examples.echo:Echo", "replicas": 2, "routePrefix": "/echo",
                     "rayActorOptions": {"numCpus": 0.25}, "healthCheck": {"periodSeconds": 2, "timeoutSeconds": 1},
                     "gracefulShutdownSeconds": 5, **spec}}



class Cluster:
    def __init__(self, cp, ns):
        self.cp, self.ns = cp, ns

    def apply(self, obj):
        self.cp.kubectl("apply", "-n", self.ns, "-f", "-", input=yaml.safe_dump(obj))

    def get(self, kind, name):
        proc = self.cp.kubectl("get", kind, name, "-n", self.ns, "-o", "json", check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def status(self, name=NAME):
        return (self.get("sd", name) or {}).get("status") or {}

    def condition(self, type_, name=NAME):
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == type_), {})

    def url(self, path=""):
        rc = self.get("raycluster", NAME)
        return f"http://127.0.0.1:{rc['status']['endpoints']['rayfleet-http']}/echo{path}"

    def forget_observation(self, name=NAME):
        """Set status.observedGeneration to 0, so that only a reconcile run after this can set it back."""
        self.cp.kubectl("patch", "sd", name, "-n", self.ns, "--subresource=status", "--type=merge",
                        "-p", json.dumps({"status": {"observedGeneration": 0}}))

    def reconciled_again(self, what, name=NAME):
        """Wait for the operator to write status.observedGeneration back after `forget_observation`."""
        def observed():
            obj = self.get("sd", name)
            return (obj.get("status") or {}).get("observedGeneration") == obj["metadata"]["generation"]
        eventually(observed, timeout=WAIT_S, interval=0.2, what=what,
                   diagnostics=lambda: f"{self.get('sd', name)}\n{self.operator.log_tail(60)}")

    def ready_with(self, n, name=NAME):
        s = self.status(name)
        ready = self.condition("Ready", name)
        return ready.get("status") == "True" and s.get("readyReplicas") == n and s.get("replicas") == n and s


def fetch(url, timeout=10):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None


@pytest.fixture(scope="module")
def env(control_plane, tmp_path_factory, k8s_client):
    from kubernetes import client
    ns = f"dev-{os.getpid()}"
    client.CoreV1Api(k8s_client).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    work = tmp_path_factory.mktemp("dev")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    provider = LocalProvider(control_plane.kubeconfig, work / "provider", code_dir=repo).start()
    operator = OperatorProcess(control_plane.kubeconfig, work / "operator.log", namespaces=[ns],
                               env={"RAYFLEET_RESYNC_SECONDS": "1"}).start()
    cluster = Cluster(control_plane, ns)
    cluster.operator = operator
    cluster.api = client.CustomObjectsApi(k8s_client)
    yield cluster
    operator.stop()
    provider.stop()
    client.CoreV1Api(k8s_client).delete_namespace(ns)


def test_apply_becomes_ready_with_distinct_pids_and_serves(env):
    env.apply(sd())
    status = eventually(lambda: env.ready_with(2), timeout=180, what="Ready with 2 replicas")
    pids = {r["pid"] for r in status["replicaStatuses"]}
    assert len(pids) == 2 and all(pids)
    assert status["endpoint"] == f"http://echo.{env.ns}.svc:8000/echo"
    seen = set()
    for _ in range(40):
        code, body = fetch(env.url("/hello?x=1"))
        assert code == 200 and body["path"] == "/echo/hello" and body["query"] == {"x": "1"}
        seen.add(body["pid"])
    assert seen == pids  # the ingress balanced across both replica processes
    printed = env.cp.kubectl("get", "sd", NAME, "-n", env.ns).stdout.splitlines()[1].split()
    assert printed[:5] == [NAME, "2", "2", "0", "AllReplicasReady"]


def test_kubectl_scale_up_and_down(env):
    env.cp.kubectl("scale", f"sd/{NAME}", "-n", env.ns, "--replicas=3")
    eventually(lambda: env.ready_with(3), timeout=WAIT_S, what="3 ready replicas")
    env.cp.kubectl("scale", f"sd/{NAME}", "-n", env.ns, "--replicas=2")
    eventually(lambda: env.ready_with(2), timeout=WAIT_S, what="back to 2 ready replicas")


def test_killed_replica_is_reported_then_recovers_with_a_restart(env):
    """Every status the operator writes is seen through a watch, so a Degraded spell can't slip between polls;
    a replacement quicker than the operator's resync shows no condition at all, and the Event says it then."""
    seen, watcher = [], watch.Watch()

    def record():
        stream = watcher.stream(env.api.list_namespaced_custom_object, "rayfleet.io", "v1alpha1", env.ns, "servedeployments",
                                field_selector=f"metadata.name={NAME}", timeout_seconds=120)
        with contextlib.suppress(ProtocolError):  # the server closes the stream when the test module tears down
            for event in stream:
                seen.append({c["type"]: c["status"] for c in (event["object"].get("status") or {}).get("conditions", [])})

    thread = threading.Thread(target=record, daemon=True)
    thread.start()
    # The watch is established once it delivers the synthetic ADDED event for the object as it is now.
    eventually(lambda: seen, timeout=30, interval=0.1, what="the watch's initial event")
    victim = env.status()["replicaStatuses"][0]
    os.kill(victim["pid"], signal.SIGKILL)

    def reported():
        restarted = env.cp.kubectl("get", "events", "-n", env.ns, "-o", "json", "--field-selector",
                                   f"involvedObject.name={NAME},reason=ReplicaRestarted").stdout
        return (any(c.get("Degraded") == "True" or c.get("Ready") == "False" for c in seen)
                or any(f"replica {victim['id']} restarted" in e["message"] for e in json.loads(restarted)["items"]))
    eventually(reported, timeout=WAIT_S, what="Degraded, not Ready or a ReplicaRestarted Event after the kill")
    status = eventually(lambda: env.ready_with(2), timeout=WAIT_S, what="Ready again")
    watcher.stop()
    assert sum(r["restarts"] for r in status["replicaStatuses"]) >= 1
    assert victim["pid"] not in {r["pid"] for r in status["replicaStatuses"]}
    assert fetch(env.url())[0] == 200


def test_operator_restart_restarts_no_replica(env):
    before = {r["id"]: r["pid"] for r in env.status()["replicaStatuses"]}
    env.operator.stop()
    env.forget_observation()  # while no operator runs
    env.operator.start()
    env.reconciled_again("the restarted operator's first reconcile")  # resume (or a resync)
    for n in (1, 2):  # then a couple of resyncs: the resume handler runs once, and a status change calls no handler
        env.forget_observation()
        env.reconciled_again(f"resync {n} after the restart")
    assert {r["id"]: r["pid"] for r in eventually(lambda: env.ready_with(2), timeout=WAIT_S, what="Ready")["replicaStatuses"]} == before


def test_handler_import_typo_reports_handler_import_error(env):
    env.apply(sd("broken", handler="examples.ecko:Echo", routePrefix="/broken", rayCluster={"existing": {"name": NAME}}))
    ready = eventually(lambda: env.condition("Ready", "broken").get("reason") == "HandlerImportError" and env.condition("Ready", "broken"),
                       timeout=WAIT_S, what="HandlerImportError")
    assert ready["status"] == "False" and "examples.ecko" in ready["message"]
    assert env.operator.alive() and fetch(env.url())[0] == 200
    env.cp.kubectl("delete", "sd/broken", "-n", env.ns, "--timeout=60s")


def test_an_autoscaled_deployment_idles_to_zero_and_serves_its_next_request(env):
    """Through kubectl apply: the autoscaler owns the count (status.desiredReplicas, the DESIRED column),
    stops the last replica of an idle deployment with minReplicas 0, and the next request is held by the
    ingress, not refused, until a replica serves it."""
    env.apply(sd("scaled", routePrefix="/scaled", rayCluster={"existing": {"name": NAME}},
                 autoscaling={"minReplicas": 0, "maxReplicas": 2, "targetInFlight": 1, "downscaleDelaySeconds": 2}))
    status = eventually(lambda: (s := env.status("scaled")).get("desiredReplicas") == 0 and s.get("replicas") == 0 and s,
                        timeout=WAIT_S, what="scaled to zero while idle",
                        diagnostics=lambda: f"{env.status('scaled')}\n{env.operator.log_tail(40)}")
    assert status["autoscaling"]["lastScaleReason"] and env.condition("Ready", "scaled")["status"] == "True"
    printed = env.cp.kubectl("get", "sd", "scaled", "-n", env.ns).stdout.splitlines()[1].split()
    assert printed[:3] == ["scaled", "0", "0"]  # NAME DESIRED READY
    rc = env.get("raycluster", NAME)
    code, body = fetch(f"http://127.0.0.1:{rc['status']['endpoints']['rayfleet-http']}/scaled/wake", timeout=60)
    assert code == 200 and body["path"] == "/scaled/wake"
    eventually(lambda: env.status("scaled").get("desiredReplicas") == 1, timeout=WAIT_S, what="desiredReplicas 1")
    eventually(lambda: json.loads(env.cp.kubectl("get", "events", "-n", env.ns, "--field-selector",
                                                 "involvedObject.name=scaled,reason=Scaled", "-o", "json").stdout)["items"],
               timeout=WAIT_S, what="a Scaled event")
    env.cp.kubectl("delete", "sd/scaled", "-n", env.ns, "--timeout=60s")


def test_a_bad_version_applied_with_kubectl_rolls_back_and_a_canary_gets_its_share(env):
    """Through kubectl on the real API server: a version that can't import is rolled back (Progressing=False
    with the reason, Ready=True, an Event) while every request to the old one is answered; a canary at 10 %
    gets 10 +- 2 % of 10,000 requests, and all of them once `kubectl patch` sets its weight to 100."""
    from tests.runtime.test_rollouts import greetings
    from tests.traffic import Traffic

    spec = {"routePrefix": "/rolls", "rayCluster": {"existing": {"name": NAME}}, "handlerArgs": {"greeting": "old"}}
    env.apply(sd("rolls", **spec))
    eventually(lambda: env.ready_with(2, "rolls"), timeout=WAIT_S, what="rolls Ready with 2 replicas")
    rc = env.get("raycluster", NAME)
    url = f"http://127.0.0.1:{rc['status']['endpoints']['rayfleet-http']}/rolls"
    eventually(lambda: fetch(url)[0] == 200, timeout=WAIT_S, what="rolls routed")
    with Traffic(url + "/x") as traffic:
        env.apply(sd("rolls", **{**spec, "handler": "examples.ecko:Echo"}))
        # Until the controller stops the rollout, the new revision's start error alone may show (its own
        # message): wait for the stop, which names the revision rolled back to.
        progressing = eventually(lambda: (c := env.condition("Progressing", "rolls")).get("reason") == "HandlerImportError"
                                 and "rolled back to revision 1" in c.get("message", "") and c, timeout=WAIT_S,
                                 what="the rollout stopped and rolled back",
                                 diagnostics=lambda: f"{env.status('rolls')}\n{env.operator.log_tail(40)}")
        eventually(lambda: env.ready_with(2, "rolls"), timeout=WAIT_S, what="two old replicas again")
    assert progressing["status"] == "False" and "rolled back to revision 1" in progressing["message"]
    assert traffic.failures == [] and traffic.answers > 0 and traffic.last["greeting"] == "old", traffic.failures[:3]
    status = env.status("rolls")
    assert (status["revision"], status["updateRevision"]) == (1, 2)
    events = json.loads(env.cp.kubectl("get", "events", "-n", env.ns, "--field-selector",
                                       "involvedObject.name=rolls,reason=HandlerImportError", "-o", "json").stdout)["items"]
    assert events and events[0]["type"] == "Warning"

    canary = {**spec, "handlerArgs": {"greeting": "new"}}
    env.apply(sd("rolls", **canary, rollout={"canary": {"weight": 10}}))
    eventually(lambda: env.condition("Progressing", "rolls").get("reason") == "CanaryWaiting", timeout=WAIT_S,
               what="the canary ready", diagnostics=lambda: f"{env.status('rolls')}")
    header, row = env.cp.kubectl("get", "sd", "rolls", "-n", env.ns).stdout.splitlines()[:2]
    assert row[header.index("CANARY"):].split()[0] == "10"
    seen = asyncio.run(greetings(url, 10_000))
    share = seen.count("new") / len(seen)
    assert 0.08 <= share <= 0.12, share
    env.cp.kubectl("patch", "sd", "rolls", "-n", env.ns, "--type=merge",
                   "-p", json.dumps({"spec": {"rollout": {"canary": {"weight": 100}}}}))
    eventually(lambda: env.condition("Progressing", "rolls").get("reason") == "Complete" and env.ready_with(2, "rolls"),
               timeout=WAIT_S, what="the canary promoted", diagnostics=lambda: f"{env.status('rolls')}")
    assert set(asyncio.run(greetings(url, 200))) == {"new"}
    env.cp.kubectl("delete", "sd/rolls", "-n", env.ns, "--timeout=60s")


def test_delete_drains_replicas_and_collects_the_raycluster(env):
    pids = [r["pid"] for r in env.status()["replicaStatuses"]]
    env.cp.kubectl("delete", f"sd/{NAME}", "-n", env.ns, "--timeout=90s")
    eventually(lambda: env.get("raycluster", NAME) is None, timeout=WAIT_S, what="RayCluster garbage-collected")

    def gone(pid):
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            return True
    eventually(lambda: all(gone(p) for p in pids), timeout=WAIT_S, what="replica processes gone")
