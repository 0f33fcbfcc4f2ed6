"""The operator's pure builders and decisions: RayCluster, Service, worker sizing, spec problems."""
import asyncio
import copy
from pathlib import Path

import pytest
import yaml

from rayfleet.manifest import validate
from rayfleet_operator import reconcile
from rayfleet_operator.config import OperatorConfig
from rayfleet_operator.disruption import build_pdb, pdb_needs_update
from rayfleet_operator.credentials import control_token, ray_token
from rayfleet_operator.networkpolicy import build_network_policy
from rayfleet_api.constants import CONTROL_PORT_NAME, METRICS_PORT, METRICS_PORT_NAME
from rayfleet_operator.naming import ANNOTATION_SPEC_HASH
from rayfleet_operator.raycluster import (build_auth_secret, build_raycluster, controller_url, plan_workers,
                                          readiness, requested_worker_pods, should_update_cluster, shrink_workers,
                                          spec_problems)
from rayfleet_operator.serve_spec import ClusterSpec, ServeSpec, WorkerGroup
from rayfleet_operator.service import build_service, endpoint, service_needs_update
from rayfleet_operator.status import Observation

CONFIG = OperatorConfig()
CRD_SPEC = yaml.safe_load((Path(__file__).resolve().parents[2] / "crds" / "rayfleet.io_servedeployments.yaml").read_text())[
    "spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]


def body(**spec):
    obj = validate({"apiVersion": "rayfleet.io/v1alpha1", "kind": "ServeDeployment",
                    "metadata": {"name": "echo"}, "spec": {"handler": "examples.echo:Echo", **spec}})
    obj["metadata"].update(namespace="team", uid="uid-1", generation=1)
    return obj


def read(b):
    """The body, and its spec as the reconcile reads it (what the builders take)."""
    return b, ServeSpec.from_spec(b["spec"])


def test_raycluster_shape_and_owner():
    rc = build_raycluster(*read(body(replicas=2, image="example/replica:1")), CONFIG)
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    assert rc["metadata"]["ownerReferences"] == [{"apiVersion": "rayfleet.io/v1alpha1", "kind": "ServeDeployment", "name": "echo",
                                                 "uid": "uid-1", "controller": True, "blockOwnerDeletion": True}]
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    container = head["template"]["spec"]["containers"][0]
    assert container["image"] == "example/replica:1"
    assert {p["name"]: p["containerPort"] for p in container["ports"]}[CONTROL_PORT_NAME] == CONFIG.control_port
    group = rc["spec"]["workerGroupSpecs"][0]
    assert group["replicas"] == 2 and group["template"]["spec"]["containers"][0]["image"] == "example/replica:1"
    assert rc["spec"]["enableInTreeAutoscaling"] is False


def test_the_clusters_pods_prefer_distinct_kubernetes_nodes():
    """The controller spreads replicas over pods; spreading the pods over nodes (softly: never Pending for
    it) is what keeps one lost node from taking every replica."""
    rc = build_raycluster(*read(body(replicas=2)), CONFIG)

    def spread_among(template):
        (constraint,) = template["spec"]["topologySpreadConstraints"]
        assert constraint["maxSkew"] == 1 and constraint["whenUnsatisfiable"] == "ScheduleAnyway"
        assert constraint["topologyKey"] == "kubernetes.io/hostname"
        return constraint["labelSelector"]["matchLabels"]
    # The workers hold the replicas: spread among themselves, or the head alone on one node and both
    # workers on the other would count as even.
    assert spread_among(rc["spec"]["workerGroupSpecs"][0]["template"]) == {"ray.io/cluster": "echo",
                                                                            "ray.io/node-type": "worker"}
    assert spread_among(rc["spec"]["headGroupSpec"]["template"]) == {"ray.io/cluster": "echo"}


def test_every_ray_pod_declares_its_metrics_port_and_the_label_the_pod_monitor_selects():
    rc = build_raycluster(*read(body()), CONFIG)
    for group in [rc["spec"]["headGroupSpec"], *rc["spec"]["workerGroupSpecs"]]:
        (container,) = group["template"]["spec"]["containers"]
        assert {"containerPort": METRICS_PORT, "name": METRICS_PORT_NAME, "protocol": "TCP"} in container["ports"]
        assert group["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "rayfleet"


def test_pods_are_ready_only_with_their_ingress_and_drain_before_stopping():
    rc = build_raycluster(*read(body()), CONFIG)
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    worker = rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    probes = {c["name"]: c["readinessProbe"]["exec"]["command"][-1] for c in (head, worker)}
    assert all("local_raylet_healthz" in probe for probe in probes.values())
    # Every pod, a new head too, joins the Service only once its HAProxy routes (no 404 from a routeless head).
    assert all(f"localhost:{CONFIG.ingress_port}/-/ingress/ready" in probe for probe in probes.values())
    assert "gcs_healthz" in probes["ray-head"]
    # A terminating pod first gives its replicas away, within its grace period.
    assert all(c["lifecycle"]["preStop"]["exec"]["command"] == [
        "rayfleet-node-drain", "--timeout", "120", "--min-seconds", "5"] for c in (head, worker))
    assert {g["template"]["spec"]["terminationGracePeriodSeconds"]
            for g in (rc["spec"]["headGroupSpec"], *rc["spec"]["workerGroupSpecs"])} == {120 + 30 + 15}
    sd = body()
    sd["spec"].update(gracefulShutdownSeconds=10, rayCluster={"drainTimeoutSeconds": 60})
    rc = build_raycluster(*read(sd), CONFIG)
    assert rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["terminationGracePeriodSeconds"] == 60 + 10 + 15
    assert "60" in rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"][
        "exec"]["command"]
    assert "rayfleet-head-start" in head["lifecycle"]["postStart"]["exec"]["command"][-1]


def pod(name, ip=None, deleting=False):
    meta = {"name": name, **({"deletionTimestamp": "2026-01-01T00:00:00Z"} if deleting else {})}
    return {"metadata": meta, "status": {"podIP": ip} if ip else {}}


@pytest.mark.parametrize("current, wanted, pods, serving, named, expected", [
    (2, 3, [], set(), [], (3, [])),                                                # growing: the plan's count
    (2, 1, [pod("w-a", "10.0.0.5"), pod("w-b", "10.0.0.6")], {"10.0.0.5"}, [], (1, ["w-b"])),  # only the idle pod goes
    (2, 1, [pod("w-a", "10.0.0.5"), pod("w-b", "10.0.0.6")], {"10.0.0.5", "10.0.0.6"}, [], (2, [])),  # both serve
    (3, 1, [pod("w-a", "10.0.0.5"), pod("w-b"), pod("w-c", "10.0.0.7")], {"10.0.0.5"}, [], (1, ["w-b", "w-c"])),
    (2, 1, [pod("w-a", "10.0.0.5"), pod("w-b", "10.0.0.6", deleting=True)], {"10.0.0.5"}, [], (1, [])),  # already going
    (3, 1, [pod("w-a", "10.0.0.5")], {"10.0.0.5"}, [], (1, [])),                  # workers not running: drop freely
    (2, 1, [pod("w-a", "10.0.0.5"), pod("w-b", "10.0.0.6")], {"10.0.0.5", None}, [], (2, [])),  # a replica unplaced
    # Named pods stay named until they are gone, and are not counted again.
    (1, 1, [pod("w-a", "10.0.0.5"), pod("w-b", "10.0.0.6")], {"10.0.0.5"}, ["w-b"], (1, ["w-b"])),
    (1, 1, [pod("w-a", "10.0.0.5")], {"10.0.0.5"}, ["w-b"], (1, [])),
    (2, 1, [pod("w-a", "10.0.0.5"), pod("w-b", "10.0.0.6"), pod("w-c", "10.0.0.7")], {"10.0.0.5"}, ["w-c"],
     (1, ["w-c", "w-b"])),
])
def test_shrink_workers_never_takes_a_serving_pod(current, wanted, pods, serving, named, expected):
    assert shrink_workers(current, wanted, pods, serving, named) == expected


def test_scale_down_names_the_pods_that_go():
    rc = build_raycluster(*read(body(replicas=1)), CONFIG, (2, ["echo-replicas-worker-b"]))
    group = rc["spec"]["workerGroupSpecs"][0]
    assert group["replicas"] == 2 and group["scaleStrategy"] == {"workersToDelete": ["echo-replicas-worker-b"]}
    assert requested_worker_pods(rc) == (2, ["echo-replicas-worker-b"]) and requested_worker_pods(None) is None
    assert "scaleStrategy" not in build_raycluster(*read(body(replicas=1)), CONFIG)["spec"]["workerGroupSpecs"][0]


def test_ray_and_controller_tokens_from_the_clusters_secret():
    b = body()
    token = control_token("k" * 32, "team", "echo")
    rc, secret = build_raycluster(*read(b), CONFIG), build_auth_secret(b, "s3cret", token)
    assert secret["metadata"]["name"] == "echo-auth-uid-1" and secret["metadata"]["namespace"] == "team"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert secret["stringData"] == {"ray-token": "s3cret", "control-token": token}
    groups = [rc["spec"]["headGroupSpec"], *rc["spec"]["workerGroupSpecs"]]
    for group in groups:
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "echo-auth-uid-1", "key": "ray-token"}}
        # Only the head runs the controller: only it gets the controller's token.
        assert ("RAYFLEET_CONTROL_TOKEN" in env) == (group is groups[0])
    head_env = {e["name"]: e for e in groups[0]["template"]["spec"]["containers"][0]["env"]}
    assert head_env["RAYFLEET_CONTROL_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "echo-auth-uid-1", "key": "control-token"}}


def test_controller_token_is_per_cluster_and_needs_the_operator_key():
    token = control_token("k" * 32, "team", "echo")
    assert len(token) == 64 and token == control_token("k" * 32, "team", "echo")  # every sharer computes it
    assert len({token, control_token("k" * 32, "team", "echo2"), control_token("k" * 32, "team2", "echo"),
                control_token("j" * 32, "team", "echo"), ray_token("k" * 32, "team", "echo")}) == 5


@pytest.mark.parametrize("replicas, num_cpus, worker_cpu, low, high, expected, capped, spread", [
    (2, 1, "1", 1, 10, 2, False, None),     # one replica per 1-CPU worker
    (4, 0.5, "2", 1, 10, 2, False, None),   # four half-CPU replicas would pack onto one 2-CPU worker: spread over 2
    (8, 0.5, "2", 1, 10, 2, False, None),   # past the spread, packed
    (2, 0.5, "1", 1, 10, 2, False, None),   # two replicas never share a pod by default
    (2, 0.5, "1", 1, 1, 1, False, None),    # unless maxReplicas says so
    (1, 0.5, "1", 1, 10, 1, False, None),   # never more pods than replicas
    (3, 1, "2", 1, 10, 2, False, None),
    (0, 1, "1", 1, 10, 1, False, None),     # minReplicas holds
    (20, 1, "1", 0, 4, 4, True, None),      # capped by maxReplicas
    (3, 0, "1", 1, 10, 2, False, None),     # zero-CPU replicas need no room, only the spread
    (4, 0.5, "2", 1, 10, 1, False, 1),  # spreadPods 1: packed
    (4, 0.5, "2", 1, 10, 3, False, 3),
])
def test_worker_sizing(replicas, num_cpus, worker_cpu, low, high, expected, capped, spread):
    workers = {"minReplicas": low, "maxReplicas": high, "resources": {"limits": {"cpu": worker_cpu}},
               **({"spreadPods": spread} if spread else {})}
    spec = body(replicas=replicas, rayActorOptions={"numCpus": num_cpus}, rayCluster={"workers": workers})["spec"]
    plan = plan_workers(ServeSpec.from_spec(spec), CONFIG)
    assert (plan.pods, plan.capped) == (expected, capped)


def test_spec_problems_the_schema_cannot_catch():
    assert spec_problems(ServeSpec.from_spec(body()["spec"]), CONFIG) == []
    too_big = body(rayActorOptions={"numCpus": 4})["spec"]
    assert "exceeds the 1 CPU(s)" in spec_problems(ServeSpec.from_spec(too_big), CONFIG)[0]
    gpu = body(rayActorOptions={"numGpus": 1})["spec"]
    assert "nvidia.com/gpu" in spec_problems(ServeSpec.from_spec(gpu), CONFIG)[0]
    with_gpu = body(rayActorOptions={"numGpus": 1}, rayCluster={"workers": {"resources": {"limits": {"cpu": "2", "nvidia.com/gpu": 1}}}})["spec"]
    assert spec_problems(ServeSpec.from_spec(with_gpu), CONFIG) == []
    memory = body(rayActorOptions={"memory": "4Gi"})["spec"]
    assert "exceeds a worker's memory" in spec_problems(ServeSpec.from_spec(memory), CONFIG)[0]
    shared = body(rayCluster={"existing": {"name": "shared"}}, rayActorOptions={"numCpus": 64})["spec"]
    assert spec_problems(ServeSpec.from_spec(shared), CONFIG) == []


def test_should_update_cluster_reasons():
    desired = build_raycluster(*read(body()), CONFIG)
    assert should_update_cluster(None, desired) == (True, "RayCluster does not exist")
    same = copy.deepcopy(desired)
    assert should_update_cluster(same, desired) == (False, "RayCluster is up to date")
    changed = build_raycluster(*read(body(replicas=3)), CONFIG)
    update, reason = should_update_cluster(same, changed)
    assert update and "spec hash changed" in reason
    foreign = copy.deepcopy(desired)
    foreign["metadata"]["ownerReferences"] = []
    assert should_update_cluster(foreign, desired) == (False, "RayCluster echo exists and is not owned by this ServeDeployment")


def test_spec_hash_ignores_fields_that_do_not_shape_the_cluster():
    a = build_raycluster(*read(body()), CONFIG)["metadata"]["annotations"][ANNOTATION_SPEC_HASH]
    b = build_raycluster(*read(body(healthCheck={"periodSeconds": 20, "timeoutSeconds": 2})), CONFIG)["metadata"]["annotations"][ANNOTATION_SPEC_HASH]
    c = build_raycluster(*read(body(image="other:2")), CONFIG)["metadata"]["annotations"][ANNOTATION_SPEC_HASH]
    assert a == b != c


def test_readiness_and_controller_url():
    assert readiness(None) == (False, "missing")
    assert readiness({"status": {"state": "ready"}}) == (True, "ready")
    assert readiness({"status": {"conditions": [{"type": "HeadPodReady", "status": "True"}]}})[0]
    cluster = {"status": {"head": {"podIP": "10.1.2.3"}, "endpoints": {CONTROL_PORT_NAME: "18090"}}}
    assert controller_url(cluster, CONFIG) == "http://10.1.2.3:18090"
    assert controller_url({"status": {"head": {"podIP": "10.1.2.3"}}}, CONFIG) == "http://10.1.2.3:8090"
    assert controller_url({"status": {}}, CONFIG) is None


def test_service_selects_the_cluster_pods():
    svc = build_service(*read(body()), CONFIG)
    assert svc["spec"]["selector"] == {"ray.io/cluster": "echo"}
    assert svc["spec"]["ports"][0]["port"] == CONFIG.ingress_port
    shared = build_service(*read(body(rayCluster={"existing": {"name": "shared"}})), CONFIG)
    assert shared["spec"]["selector"] == {"ray.io/cluster": "shared"}
    assert service_needs_update(svc, shared) and not service_needs_update(svc, svc)
    assert endpoint(*read(body(routePrefix="/echo")), CONFIG) == "http://echo.team.svc:8000/echo"


def test_config_refuses_to_start_without_a_control_key(monkeypatch):
    monkeypatch.delenv("RAYFLEET_CONTROL_KEY", raising=False)
    with pytest.raises(SystemExit, match="RAYFLEET_CONTROL_KEY must hold a random key"):
        OperatorConfig.from_env()
    monkeypatch.setenv("RAYFLEET_CONTROL_KEY", "short")
    with pytest.raises(SystemExit):
        OperatorConfig.from_env()
    monkeypatch.setenv("RAYFLEET_CONTROL_KEY", "k" * 32)
    assert OperatorConfig.from_env().control_key == "k" * 32
    monkeypatch.setenv("RAYFLEET_OPERATOR_POD_LABELS", "a=1, b.io/c=x=y")
    monkeypatch.setenv("RAYFLEET_HTTP_NAMESPACES", "ingress-nginx,,gw ")
    config = OperatorConfig.from_env()
    assert config.operator_pod_labels == {"a": "1", "b.io/c": "x=y"} and config.http_namespaces == ("ingress-nginx", "gw")
    assert config.metrics_port == METRICS_PORT
    monkeypatch.setenv("RAYFLEET_METRICS_PORT", "0")
    assert OperatorConfig.from_env().metrics_port == 0  # not served
    for bad in ("-1", "65536", "metrics"):
        monkeypatch.setenv("RAYFLEET_METRICS_PORT", bad)
        with pytest.raises(SystemExit, match="RAYFLEET_METRICS_PORT must be a TCP port"):
            OperatorConfig.from_env()


def test_ray_pods_meet_the_restricted_pod_security_standard():
    rc = build_raycluster(*read(body()), CONFIG)
    for group in [rc["spec"]["headGroupSpec"], *rc["spec"]["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 100, "fsGroup": 100,
                                          "seccompProfile": {"type": "RuntimeDefault"}}
        (container,) = pod["containers"]
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
        assert not pod.get("volumes") and "hostNetwork" not in pod


def test_network_policy_admits_http_from_peers_the_controller_from_the_operator_metrics_from_any_pod_and_ray_from_its_own_pods():
    config = OperatorConfig(operator_namespace="rayfleet-system", http_namespaces=("ingress-nginx",),
                            operator_pod_labels={"app.kubernetes.io/component": "operator"})
    policy = build_network_policy(*read(body()), config)
    assert policy["metadata"]["name"] == "echo" and policy["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": {"ray.io/cluster": "echo"}} and spec["policyTypes"] == ["Ingress"]
    http, control, metrics, ray = spec["ingress"]
    assert http == {"from": [{"podSelector": {}}, {"namespaceSelector": {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["ingress-nginx"]}]}}],
        "ports": [{"protocol": "TCP", "port": "rayfleet-http"}]}
    assert control == {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "rayfleet-system"}},
                                 "podSelector": {"matchLabels": {"app.kubernetes.io/component": "operator"}}}],
                       "ports": [{"protocol": "TCP", "port": "rayfleet-ctl"}]}
    # Read-only metrics: any pod of any namespace (wherever Prometheus runs), never the world.
    assert metrics == {"from": [{"namespaceSelector": {}}], "ports": [{"protocol": "TCP", "port": "metrics"}]}
    assert ray == {"from": [{"podSelector": {"matchLabels": {"ray.io/cluster": "echo"}}}]}  # every port, own pods only
    # The spec's httpFrom replaces the default peers; every rule names its peers (an empty `from` admits all).
    peers = [{"ipBlock": {"cidr": "10.0.0.0/8"}}]
    assert build_network_policy(*read(body(httpFrom=peers)), config)["spec"]["ingress"][0]["from"] == peers
    # An operator of unknown whereabouts (run outside the cluster): no rule for the controller's port at all.
    assert [rule["from"] for rule in build_network_policy(*read(body()), CONFIG)["spec"]["ingress"]] == [
        [{"podSelector": {}}], [{"namespaceSelector": {}}], [{"podSelector": {"matchLabels": {"ray.io/cluster": "echo"}}}]]
    assert all(rule["from"] for rule in spec["ingress"])


def test_with_autoscaling_the_workers_follow_the_autoscalers_count_not_spec_replicas():
    b = body(replicas=1, rayActorOptions={"numCpus": 1}, autoscaling={"maxReplicas": 8},
             rayCluster={"workers": {"minReplicas": 1, "maxReplicas": 4, "resources": {"limits": {"cpu": "1"}}}})
    pods = [pod("w-a", "10.0.0.5"), pod("w-b", "10.0.0.6"), pod("w-c", "10.0.0.7"), pod("w-d", "10.0.0.8")]

    class Kube:
        async def list_pods(self, namespace, selector):
            return pods

    def workers(desired, cluster, serving=()):
        ctl = {"desiredReplicas": desired, "replicas": [{"nodeIp": ip} for ip in serving]}
        obs = Observation(1, ServeSpec.from_spec(b["spec"]), "echo", "sel", "url", controller=ctl)
        return asyncio.run(reconcile._workers(b, CONFIG, Kube(), obs, cluster))

    assert workers(3, None) == (3, [])  # a new cluster: room for the autoscaler's 3, not spec.replicas' 1
    grown = build_raycluster(*read(b), CONFIG, workers(6, build_raycluster(*read(b), CONFIG, (3, []))))
    assert requested_worker_pods(grown) == (4, [])  # within rayCluster.workers.maxReplicas
    # Scaled down to 2: the controller drained the others; only pods that host no replica go.
    assert workers(2, grown, serving={"10.0.0.5", "10.0.0.7"}) == (2, ["w-b", "w-d"])


@pytest.mark.parametrize("replicas, expected", [(1, 1), (6, 4), (0, 1)])
def test_worker_sizing_for_a_count_other_than_spec_replicas(replicas, expected):
    spec = body(replicas=2, rayCluster={"workers": {"minReplicas": 1, "maxReplicas": 4,
                                                    "resources": {"limits": {"cpu": "1"}}}})["spec"]
    assert plan_workers(ServeSpec.from_spec(spec), CONFIG, replicas).pods == expected


def test_head_fault_tolerance_names_the_redis_kuberay_keeps_the_gcs_in():
    assert "gcsFaultToleranceOptions" not in build_raycluster(*read(body()), CONFIG)["spec"]
    redis = {"redisAddress": "redis.db:6379", "redisPasswordSecret": {"name": "redis-auth", "key": "password"}}
    expected = {"redisAddress": "redis.db:6379",
                "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "redis-auth", "key": "password"}}}}
    assert build_raycluster(*read(body(rayCluster={"gcsFaultTolerance": redis})), CONFIG)["spec"][
        "gcsFaultToleranceOptions"] == expected
    # the chart's default, for ServeDeployments that name none
    chart = OperatorConfig(gcs_fault_tolerance={"redisAddress": "redis.db:6379"})
    assert build_raycluster(*read(body()), chart)["spec"]["gcsFaultToleranceOptions"] == {"redisAddress": "redis.db:6379"}


def test_config_reads_the_charts_redis_and_disruption_budget(monkeypatch):
    monkeypatch.setenv("RAYFLEET_CONTROL_KEY", "k" * 32)
    config = OperatorConfig.from_env()
    assert config.gcs_fault_tolerance is None and config.pdb_max_unavailable == 1
    monkeypatch.setenv("RAYFLEET_GCS_REDIS_ADDRESS", "redis.db:6379")
    monkeypatch.setenv("RAYFLEET_GCS_REDIS_PASSWORD_SECRET", "redis-auth/password")
    monkeypatch.setenv("RAYFLEET_PDB_MAX_UNAVAILABLE", "25%")
    config = OperatorConfig.from_env()
    assert config.gcs_fault_tolerance == {"redisAddress": "redis.db:6379",
                                          "redisPasswordSecret": {"name": "redis-auth", "key": "password"}}
    assert config.pdb_max_unavailable == "25%"
    monkeypatch.setenv("RAYFLEET_PDB_MAX_UNAVAILABLE", "")
    assert OperatorConfig.from_env().pdb_max_unavailable is None
    for name, bad, message in (("RAYFLEET_PDB_MAX_UNAVAILABLE", "0", "count > 0"),
                               ("RAYFLEET_GCS_REDIS_PASSWORD_SECRET", "no-key", "NAME/KEY")):
        monkeypatch.setenv(name, bad)
        with pytest.raises(SystemExit, match=message):
            OperatorConfig.from_env()
        monkeypatch.delenv(name)


def test_the_disruption_budget_covers_every_pod_of_the_cluster_and_lets_one_go_at_a_time():
    pdb = build_pdb(body(), 1, pods=3)  # the head and two workers
    # minAvailable, not maxUnavailable: a RayCluster has no scale subresource for the disruption controller
    assert pdb["spec"] == {"minAvailable": 2, "selector": {"matchLabels": {"ray.io/cluster": "echo"}}}
    assert pdb["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert build_pdb(body(), "25%", pods=5)["spec"]["minAvailable"] == 3  # 25 % of 5, rounded up, may go
    assert build_pdb(body(), 2, pods=1)["spec"]["minAvailable"] == 0
    assert not pdb_needs_update({"spec": {**pdb["spec"], "unhealthyPodEvictionPolicy": "IfHealthyBudget"}}, pdb)
    assert pdb_needs_update({"spec": {**pdb["spec"], "minAvailable": 3}}, pdb)  # the workers changed


def test_the_operator_only_defaults_match_the_crds():
    cluster = CRD_SPEC["rayCluster"]["properties"]
    workers = cluster["workers"]["properties"]
    assert workers["spreadPods"]["default"] == WorkerGroup.spread_pods
    assert (workers["minReplicas"]["default"], workers["maxReplicas"]["default"]) == (WorkerGroup.min_pods,
                                                                                    WorkerGroup.max_pods)
    assert cluster["drainTimeoutSeconds"]["default"] == ClusterSpec.drain_timeout_seconds
    assert cluster["rayVersion"]["default"] == ClusterSpec.ray_version


def test_a_new_cluster_without_redis_says_what_a_head_loss_costs():
    class Kube:
        async def get_raycluster(self, namespace, name):
            return None

        async def create_raycluster(self, obj):
            return obj

        async def create_secret_unless_present(self, obj):
            return True

    events = []
    obs = Observation(1, ServeSpec.from_spec(body()["spec"]), "echo", "sel", "url")
    asyncio.run(reconcile._ensure_cluster(body(), CONFIG, Kube(), obs, None, events))
    assert [e[:2] for e in events] == [("Normal", "RayClusterCreated"), ("Warning", "NoHeadFaultTolerance")]
    assert "restarts every replica" in events[1][2]
    events.clear()
    redis = body(rayCluster={"gcsFaultTolerance": {"redisAddress": "r:6379"}})
    obs = Observation(1, ServeSpec.from_spec(redis["spec"]), "echo", "sel", "url")
    asyncio.run(reconcile._ensure_cluster(redis, CONFIG, Kube(), obs, None, events))
    assert [e[1] for e in events] == ["RayClusterCreated"]
