"""Replicas spread over real Ray nodes, and a node's drain under traffic (three raylets on this machine:
a head with no CPUs, as on Kubernetes, and workers of 1 CPU each)."""
from __future__ import annotations

import httpx
import pytest

from rayfleet.waiting import eventually
from rayfleet_api.constants import CONTROLLER_NAME, RAY_NAMESPACE
from tests.traffic import Traffic

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def ray_cluster(connect_ray):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    cluster.workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    connect_ray(ray, address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def nodes(obs) -> list[str]:
    return sorted(r["nodeId"] for r in obs["replicas"] if r["state"] == "READY")


def test_replicas_spread_and_a_draining_node_hands_its_replica_over_without_a_failed_request(ray_cluster, api):
    import ray

    api.put("spread", replicas=2, rayActorOptions={"numCpus": 0.5})
    obs = api.wait_ready("spread", 2)
    worker_ids = {node.node_id for node in ray_cluster.workers}
    assert len(set(nodes(obs))) == 2 and set(nodes(obs)) == worker_ids  # both would fit one node: spread

    controller = ray.get_actor(CONTROLLER_NAME, namespace=RAY_NAMESPACE)
    leaving = obs["replicas"][0]["nodeId"]
    url = f"{api.ingress}/spread/x"
    eventually(lambda: httpx.get(url, timeout=5).status_code == 200, timeout=60, what="the ingress routing",
               ignoring=(httpx.HTTPError,))
    with Traffic(url) as traffic:
        eventually(lambda: traffic.answers >= 20, timeout=30, what="traffic before the drain")
        eventually(lambda: ray.get(controller.drain_node.remote(leaving, 60)) == 0, timeout=60, interval=0.5,
                   what="the draining node's replica moved")
        obs = api.wait_ready("spread", 2)
        answered = traffic.answers
        eventually(lambda: traffic.answers >= answered + 20, timeout=30, what="traffic after the drain")
    assert not traffic.failures, traffic.failures[:5]
    assert leaving not in nodes(obs) and len(nodes(obs)) == 2

    # The pod goes, another comes: the deployment is spread over it again.
    (gone,) = [node for node in ray_cluster.workers if node.node_id == leaving]
    ray_cluster.remove_node(gone)
    fresh = ray_cluster.add_node(num_cpus=1)
    obs = api.wait("spread", lambda o: len(set(nodes(o))) == 2 and fresh.node_id in nodes(o)
                   and o["readyReplicas"] == 2 and o["status"] == "Running", 90, "spread over the new node")
    assert obs["restarts"] == 0  # moves, not failures
    api.delete("spread")
