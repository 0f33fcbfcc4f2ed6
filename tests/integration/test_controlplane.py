"""The local control plane is a real cluster minus nodes: API, CRDs, controllers."""

import pytest
from kubernetes import client

from rayfleet.waiting import eventually

pytestmark = pytest.mark.integration


def test_kubectl_talks_to_it(control_plane):
    out = control_plane.kubectl("version", "-o", "json").stdout
    assert '"serverVersion"' in out
    assert "default" in control_plane.kubectl("get", "namespaces", "-o", "name").stdout


def test_raycluster_crd_is_served(control_plane, k8s_client):
    crd = client.ApiextensionsV1Api(k8s_client).read_custom_resource_definition("rayclusters.ray.io")
    assert any(c.type == "Established" and c.status == "True" for c in crd.status.conditions)
    # Served, not just stored: the resource is discoverable and listable.
    assert "rayclusters" in control_plane.kubectl("api-resources", "--api-group=ray.io", "-o", "name").stdout
    assert client.CustomObjectsApi(k8s_client).list_cluster_custom_object("ray.io", "v1", "rayclusters")["items"] == []


def test_garbage_collection(k8s_client, namespace):
    core = client.CoreV1Api(k8s_client)
    owner = core.create_namespaced_config_map(namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="owner")))
    ref = client.V1OwnerReference(api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid)
    core.create_namespaced_config_map(namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="dependent", owner_references=[ref])))

    core.delete_namespaced_config_map("owner", namespace)  # background propagation: the GC deletes dependents
    eventually(lambda: not core.list_namespaced_config_map(namespace, field_selector="metadata.name=dependent").items,
               timeout=60, interval=0.2, what="kube-controller-manager's garbage collector to delete the dependent")
