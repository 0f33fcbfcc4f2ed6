"""The CRD and the operator against a real kube-apiserver + etcd + kube-controller-manager.

No KubeRay runs here, so RayClusters stay unready: these tests cover what the operator writes and
how the API server treats ServeDeployments. The data path is covered by tests/integration/test_dev_*.
"""
import base64
import contextlib
import http.server
import json
import threading

import pytest
import yaml

from rayfleet.dev.operator import OperatorProcess
from rayfleet_api.constants import CONTROL_PORT_NAME
from rayfleet.waiting import eventually

pytestmark = pytest.mark.integration


def sd(name="echo", **spec):
    return {"apiVersion": "rayfleet.io/v1alpha1", "kind": "ServeDeployment", "metadata": {"name": name},
            "spec": {"handler": "examples.echo:Echo", **spec}}


def apply(cp, ns, obj, check=True):
    return cp.kubectl("apply", "-n", ns, "-f", "-", check=check, input=yaml.safe_dump(obj))


def get(cp, ns, kind, name):
    proc = cp.kubectl("get", kind, name, "-n", ns, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


@pytest.fixture
def operator(control_plane, namespace, tmp_path):
    with OperatorProcess(control_plane.kubeconfig, tmp_path / "operator.log", namespaces=[namespace]) as op:
        yield op
        assert "Traceback" not in op.log_tail(400), op.log_tail(400)


def test_schema_defaults_and_explain(control_plane, namespace):
    apply(control_plane, namespace, sd())
    spec = get(control_plane, namespace, "sd", "echo")["spec"]
    assert spec["replicas"] == 1 and spec["maxConcurrency"] == 100 and spec["routePrefix"] == "/"
    assert spec["healthCheck"] == {"periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3}
    explained = control_plane.kubectl("explain", "servedeployment.spec.replicas").stdout
    assert "Number of replica actors" in explained and "kubectl scale" in explained


@pytest.mark.parametrize("spec, words", [
    ({"handler": None}, "spec.handler: Required value"),
    ({"handler": "not a path"}, "spec.handler: Invalid value"),
    ({"replicas": -1}, "spec.replicas: Invalid value: -1"),
    ({"rayCluster": {"workers": {"minReplicas": 3, "maxReplicas": 1}}}, "minReplicas must not exceed"),
    ({"healthCheck": {"periodSeconds": 2, "timeoutSeconds": 5}}, "timeoutSeconds must be less than"),
])
def test_invalid_specs_are_rejected_with_a_readable_message(control_plane, namespace, spec, words):
    obj = sd(**spec)
    obj["spec"] = {k: v for k, v in obj["spec"].items() if v is not None}
    proc = apply(control_plane, namespace, obj, check=False)
    assert proc.returncode != 0 and words in proc.stderr, proc.stderr
    assert get(control_plane, namespace, "sd", "echo") is None


def test_raycluster_service_status_and_printer_columns(control_plane, namespace, operator):
    apply(control_plane, namespace, sd(replicas=2, image="example/replica:1"))
    owner_uid = get(control_plane, namespace, "sd", "echo")["metadata"]["uid"]
    rc = eventually(lambda: get(control_plane, namespace, "raycluster", "echo"), what="RayCluster")
    assert [(r["kind"], r["uid"], r["controller"]) for r in rc["metadata"]["ownerReferences"]] == [("ServeDeployment", owner_uid, True)]
    assert rc["spec"]["workerGroupSpecs"][0]["replicas"] == 2
    assert rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == "example/replica:1"
    svc = eventually(lambda: get(control_plane, namespace, "service", "echo"), what="Service")
    assert svc["spec"]["selector"] == {"ray.io/cluster": "echo"}
    # Ray's token auth: the pods take the token from a Secret owned by the ServeDeployment.
    token_ref = {e["name"]: e for e in rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}["RAY_AUTH_TOKEN"]
    secret = get(control_plane, namespace, "secret", token_ref["valueFrom"]["secretKeyRef"]["name"])
    assert secret["metadata"]["ownerReferences"][0]["uid"] == owner_uid and len(secret["data"]["ray-token"]) >= 40
    # The controller's token, in the same Secret and only on the head: its API refuses everyone else.
    control_ref = {e["name"]: e for e in rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}[
        "RAYFLEET_CONTROL_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert control_ref == {"name": secret["metadata"]["name"], "key": "control-token"}
    assert len(base64.b64decode(secret["data"]["control-token"])) == 64
    # The NetworkPolicy: owned, applied by the real API server as built, and left alone by later reconciles.
    policy = eventually(lambda: get(control_plane, namespace, "networkpolicy", "echo"), what="NetworkPolicy")
    assert policy["metadata"]["ownerReferences"][0]["uid"] == owner_uid
    assert policy["spec"]["podSelector"] == {"matchLabels": {"ray.io/cluster": "echo"}}
    # HTTP from the allowed peers, metrics from any pod (no operator pod here), every port from the cluster's own
    assert [(sorted(rule), [p["port"] for p in rule.get("ports", [])]) for rule in policy["spec"]["ingress"]] == [
        (["from", "ports"], ["rayfleet-http"]), (["from", "ports"], ["metrics"]), (["from"], [])]
    status = eventually(lambda: (get(control_plane, namespace, "sd", "echo").get("status") or {}).get("conditions") and
                        get(control_plane, namespace, "sd", "echo")["status"], what="status")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "RayClusterNotReady")
    assert status["observedGeneration"] == 1 and status["endpoint"] == f"http://echo.{namespace}.svc:8000/"
    table = control_plane.kubectl("get", "sd", "-n", namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "DESIRED", "READY", "IN-FLIGHT", "STATUS", "REVISION", "CANARY", "ENDPOINT", "AGE"]
    assert table[1].split()[:2] == ["echo", "2"] and "RayClusterNotReady" in table[1]
    events = control_plane.kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    assert "RayClusterCreated" in events


def test_ray_pods_are_admitted_where_the_restricted_standard_is_enforced(control_plane, namespace, operator):
    """The pods KubeRay makes from the RayCluster's templates pass Pod Security admission at `restricted`."""
    control_plane.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted",
                          "pod-security.kubernetes.io/enforce-version=latest")
    apply(control_plane, namespace, sd(replicas=1))
    rc = eventually(lambda: get(control_plane, namespace, "raycluster", "echo"), what="RayCluster")
    for group in [rc["spec"]["headGroupSpec"], *rc["spec"]["workerGroupSpecs"]]:
        template = group["template"]
        main = template["spec"]["containers"][0]
        # KubeRay adds an init container to workers with the main container's image and securityContext.
        init = [{"name": "wait-gcs-ready", "image": main["image"], "command": ["true"],
                 "securityContext": main["securityContext"]}]
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "echo-", **template["metadata"]},
               "spec": {**template["spec"], "initContainers": init}}
        proc = control_plane.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-", check=False,
                                     input=yaml.safe_dump(pod))
        assert proc.returncode == 0, proc.stderr
    # And the check can fail: the same pod without its securityContext is refused.
    bare = {**pod, "spec": {"containers": [{k: v for k, v in main.items() if k != "securityContext"}]}}
    proc = control_plane.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-", check=False,
                                 input=yaml.safe_dump(bare))
    assert proc.returncode != 0 and "violates PodSecurity" in proc.stderr, proc.stderr


def test_kubectl_scale_moves_the_worker_group(control_plane, namespace, operator):
    apply(control_plane, namespace, sd(replicas=1))
    eventually(lambda: get(control_plane, namespace, "raycluster", "echo"), what="RayCluster")
    control_plane.kubectl("scale", "sd/echo", "-n", namespace, "--replicas=3")
    assert get(control_plane, namespace, "sd", "echo")["spec"]["replicas"] == 3
    eventually(lambda: get(control_plane, namespace, "raycluster", "echo")["spec"]["workerGroupSpecs"][0]["replicas"] == 3,
               what="worker group scaled to 3")
    scale = json.loads(control_plane.kubectl("get", "--raw", f"/apis/rayfleet.io/v1alpha1/namespaces/{namespace}/servedeployments/echo/scale").stdout)
    assert scale["spec"]["replicas"] == 3
    eventually(lambda: json.loads(control_plane.kubectl("get", "--raw", f"/apis/rayfleet.io/v1alpha1/namespaces/{namespace}/servedeployments/echo/scale").stdout)
               ["status"].get("selector") == "ray.io/cluster=echo", what="scale selector")


def test_invalid_spec_the_schema_cannot_catch(control_plane, namespace, operator):
    apply(control_plane, namespace, sd(rayActorOptions={"numCpus": 8}))
    status = eventually(lambda: (get(control_plane, namespace, "sd", "echo").get("status") or {}).get("conditions"), what="conditions")
    ready = next(c for c in status if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec") and "numCpus=8" in ready["message"]
    assert get(control_plane, namespace, "raycluster", "echo") is None
    eventually(lambda: "InvalidSpec" in control_plane.kubectl("get", "events", "-n", namespace, "-o", "json").stdout, what="Event")
    assert operator.alive()
    apply(control_plane, namespace, sd(rayActorOptions={"numCpus": 1}))  # fixing the spec recovers
    eventually(lambda: get(control_plane, namespace, "raycluster", "echo"), what="RayCluster after fix")


def test_delete_garbage_collects_owned_objects(control_plane, namespace, operator):
    apply(control_plane, namespace, sd())
    eventually(lambda: all(get(control_plane, namespace, kind, "echo") for kind in ("raycluster", "service", "networkpolicy")),
               what="owned objects")
    auth_secret = f"echo-auth-{get(control_plane, namespace, 'sd', 'echo')['metadata']['uid'][:8]}"
    first = get(control_plane, namespace, "secret", auth_secret)
    # Deleted by hand, the Secret comes back with the same tokens (derived, not random: the pods hold them).
    control_plane.kubectl("delete", "secret", auth_secret, "-n", namespace)
    again = eventually(lambda: get(control_plane, namespace, "secret", auth_secret), timeout=60, what="the Secret again")
    assert again["metadata"]["uid"] != first["metadata"]["uid"] and again["data"] == first["data"]
    assert again["metadata"]["ownerReferences"] == first["metadata"]["ownerReferences"]
    control_plane.kubectl("delete", "sd/echo", "-n", namespace, "--timeout=60s")
    eventually(lambda: all(get(control_plane, namespace, kind, name) is None for kind, name in
                           [("raycluster", "echo"), ("service", "echo"), ("networkpolicy", "echo"),
                            ("secret", auth_secret)]),
               timeout=60, what="garbage collection")


def forget_observation(cp, ns, name):
    """Set status.observedGeneration to 0, so that only a reconcile run after this can set it back.
    (Nothing else reacts to it: the operator's change handlers watch the spec only.)"""
    cp.kubectl("patch", "sd", name, "-n", ns, "--subresource=status", "--type=merge",
               "-p", json.dumps({"status": {"observedGeneration": 0}}))


def reconciled_again(cp, ns, name, what, log=None):
    """Wait for the operator to write status.observedGeneration back after `forget_observation`."""
    def observed():
        obj = get(cp, ns, "sd", name)
        return (obj.get("status") or {}).get("observedGeneration") == obj["metadata"]["generation"]
    eventually(observed, timeout=60, what=what,
               diagnostics=lambda: f"{get(cp, ns, 'sd', name)}\n{log.read_text()[-4000:] if log and log.exists() else ''}")


def test_operator_restart_readopts_without_duplicating(control_plane, namespace, tmp_path):
    log = tmp_path / "operator.log"
    with OperatorProcess(control_plane.kubeconfig, log, namespaces=[namespace]):
        apply(control_plane, namespace, sd())
        first = eventually(lambda: get(control_plane, namespace, "raycluster", "echo"), what="RayCluster")
        policy = eventually(lambda: get(control_plane, namespace, "networkpolicy", "echo"), what="NetworkPolicy")
    forget_observation(control_plane, namespace, "echo")  # while no operator runs
    with OperatorProcess(control_plane.kubeconfig, log, namespaces=[namespace], env={"RAYFLEET_RESYNC_SECONDS": "1"}):
        # The restarted operator has reconciled the object (its resume handler, or a resync) ...
        reconciled_again(control_plane, namespace, "echo", "the restarted operator's first reconcile", log)
        # ... and then a resync has run too (the resume handler runs once; a status change calls no change handler).
        forget_observation(control_plane, namespace, "echo")
        reconciled_again(control_plane, namespace, "echo", "a resync after the restart", log)
        clusters = json.loads(control_plane.kubectl("get", "rayclusters", "-n", namespace, "-o", "json").stdout)["items"]
        assert [(c["metadata"]["uid"], c["metadata"]["resourceVersion"]) for c in clusters] == \
               [(first["metadata"]["uid"], first["metadata"]["resourceVersion"])]
        assert get(control_plane, namespace, "networkpolicy", "echo")["metadata"]["resourceVersion"] == \
               policy["metadata"]["resourceVersion"]  # as the API server stored it, it needs no update


def test_namespace_scoped_operator_ignores_other_namespaces(control_plane, namespace, operator, k8s_client):
    from kubernetes import client
    other = namespace + "-other"
    client.CoreV1Api(k8s_client).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=other)))
    try:
        apply(control_plane, other, sd())
        apply(control_plane, namespace, sd())
        eventually(lambda: get(control_plane, namespace, "raycluster", "echo"), what="RayCluster in watched namespace")
        assert get(control_plane, other, "raycluster", "echo") is None
    finally:
        client.CoreV1Api(k8s_client).delete_namespace(other)


class StandInController(http.server.ThreadingHTTPServer):
    """The rayfleet controller's API as the operator calls it, answering with `observed` (the controller's
    observed state, rollout fields included); DELETE forgets the deployment, as a drained one is."""

    def __init__(self):
        self.observed: dict | None = None
        super().__init__(("127.0.0.1", 0), _StandInHandler)

    @contextlib.contextmanager
    def serving(self):
        thread = threading.Thread(target=self.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.shutdown()
            self.server_close()


class _StandInHandler(http.server.BaseHTTPRequestHandler):
    def do_PUT(self):  # noqa: N802 - http.server's names
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._answer(200, {})

    def do_GET(self):  # noqa: N802
        observed = self.server.observed
        if observed is None:
            self._answer(404, {"error": "no such deployment"})
        else:
            self._answer(200, observed)

    def do_DELETE(self):  # noqa: N802
        self.server.observed = None
        self._answer(200, {})

    def _answer(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_):
        pass


def observed_rollout(name, revisions, rollout):
    """One ready replica of the last good revision (v3), and the rollout record, as the controller reports them."""
    return {"name": name, "status": "Running", "version": "v4", "servingVersion": "v3", "error": None,
            "replicas": [{"id": "r1", "state": "READY", "version": "v3", "nodeIp": "127.0.0.1", "pid": 1}],
            "readyReplicas": 1, "updatedReplicas": 0, "targetReplicas": 1, "inFlight": 0,
            "revisions": [{"revision": n, "version": f"v{n}", "state": state} for n, state in revisions],
            "rollout": {"revision": 4, "version": "v4", "canaryWeight": None, "rolledBackTo": None, **rollout}}


def columns(cp, ns, *args):
    """`kubectl get sd` as {column: value}, cut where the header's columns start: an empty cell stays one."""
    header, row = cp.kubectl("get", "sd", "-n", ns, *args).stdout.splitlines()[:2]
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    return {header[a:b].strip(): row[a:b].strip() for a, b in zip(starts, [*starts[1:], None])}


def condition(cp, ns, type_):
    return next((c for c in (get(cp, ns, "sd", "echo").get("status") or {}).get("conditions") or []
                 if c["type"] == type_), None)


def test_a_failed_rollout_rolled_back_is_progressing_false_ready_true_with_an_event(control_plane, namespace, tmp_path):
    log = tmp_path / "operator.log"
    with StandInController().serving() as ctl, \
            OperatorProcess(control_plane.kubeconfig, log, namespaces=[namespace], env={"RAYFLEET_RESYNC_SECONDS": "1"}):
        apply(control_plane, namespace, sd(replicas=1))
        eventually(lambda: get(control_plane, namespace, "raycluster", "echo"), what="RayCluster")
        ctl.observed = observed_rollout(f"{namespace}.echo", [(4, "Canary"), (3, "Serving")],
                                        {"state": "Progressing", "reason": "CanaryStep", "canaryWeight": 25})
        # KubeRay's word that the head is up, at the stand-in's address
        control_plane.kubectl("patch", "raycluster", "echo", "-n", namespace, "--subresource=status", "--type=merge",
                              "-p", json.dumps({"status": {"state": "ready", "head": {"podIP": "127.0.0.1"},
                                                           "endpoints": {CONTROL_PORT_NAME: str(ctl.server_port)}}}))

        def diagnostics():
            return f"{get(control_plane, namespace, 'sd', 'echo').get('status')}\n{log.read_text()[-3000:]}"
        eventually(lambda: (condition(control_plane, namespace, "Progressing") or {}).get("reason") == "CanaryStep",
                   timeout=60, what="Progressing=True/CanaryStep", diagnostics=diagnostics)
        table = columns(control_plane, namespace)
        assert (table["REVISION"], table["CANARY"]) == ("3", "25"), table

        message = "revision 4 (v4): HandlerImportError: No module named 'x'; rolled back to revision 3"
        ctl.observed = observed_rollout(f"{namespace}.echo", [(4, "Failed"), (3, "Serving")],
                                        {"state": "Failed", "reason": "HandlerImportError", "message": message,
                                         "rolledBackTo": 3})
        eventually(lambda: (condition(control_plane, namespace, "Progressing") or {}).get("status") == "False",
                   timeout=60, what="Progressing=False", diagnostics=diagnostics)
        progressing, ready = (condition(control_plane, namespace, t) for t in ("Progressing", "Ready"))
        assert (progressing["reason"], progressing["message"]) == ("HandlerImportError", message)
        assert (ready["status"], ready["reason"]) == ("True", "AllReplicasReady")  # revision 3 serves at full strength
        status = get(control_plane, namespace, "sd", "echo")["status"]
        assert (status["revision"], status["updateRevision"], status.get("canaryWeight")) == (3, 4, None)
        wide = columns(control_plane, namespace, "-o", "wide")
        assert (wide["REVISION"], wide["CANARY"], wide["ROLLOUT"]) == ("3", "", "HandlerImportError"), wide

        def warnings():
            items = json.loads(control_plane.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
            return [(e["type"], e["message"], e.get("count", 1)) for e in items if e["reason"] == "HandlerImportError"]
        assert eventually(warnings, timeout=30, what="the Warning Event") == [("Warning", message, 1)]
        control_plane.kubectl("delete", "sd/echo", "-n", namespace, "--timeout=60s")  # the stand-in drains at once
        assert warnings() == [("Warning", message, 1)]  # once, though every resync saw the failure
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
