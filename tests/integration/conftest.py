"""Integration fixtures: a real etcd + kube-apiserver + kube-controller-manager."""

import contextlib
import uuid

import pytest
from kubernetes import client, config

from rayfleet.dev.controlplane import ControlPlane
from rayfleet.dev.toolchain import ensure_binaries, ensure_tools, kuberay_crds
from rayfleet.manifest import CRD_FILE
from rayfleet.waiting import eventually


def pytest_collection_finish(session):
    # Build/download before any test starts: a cold build takes many minutes and
    # must not count against a test's pytest-timeout. Progress goes to the terminal.
    if any(item.get_closest_marker("integration") for item in session.items):
        capman = session.config.pluginmanager.getplugin("capturemanager")
        with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
            ensure_binaries(), ensure_tools(), kuberay_crds()


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory):
    """A running control plane with KubeRay's CRDs and rayfleet's CRD installed; logs in cp.workdir."""
    with ControlPlane(tmp_path_factory.mktemp("controlplane")) as cp:
        cp.install_crds([*kuberay_crds(), CRD_FILE])
        yield cp


@pytest.fixture(scope="session")
def k8s_client(control_plane):
    """kubernetes.client.ApiClient authenticated as cluster admin."""
    with config.new_client_from_config(config_file=str(control_plane.kubeconfig)) as api:
        yield api


@pytest.fixture
def namespace(k8s_client):
    """A fresh namespace, deleted afterwards. Waits for its `default`
    ServiceAccount, as pods are rejected by admission until it exists."""
    core = client.CoreV1Api(k8s_client)
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    eventually(lambda: core.list_namespaced_service_account(name, field_selector="metadata.name=default").items,
               timeout=30, interval=0.1, what=f"kube-controller-manager to make the default ServiceAccount in {name}")
    yield name
    core.delete_namespace(name)
