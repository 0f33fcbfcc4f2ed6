"""rayfleet.spec and rayfleet.manifest: the CRD's defaults, schema and CEL rules applied without a cluster."""
import copy

import pytest

from rayfleet.manifest import load_manifests, validate
from rayfleet.spec import SpecError, desired_state, parse_quantity, spec_version

BASE = {"apiVersion": "rayfleet.io/v1alpha1", "kind": "ServeDeployment", "metadata": {"name": "echo"},
        "spec": {"handler": "examples.echo:Echo"}}


def with_spec(**fields):
    obj = copy.deepcopy(BASE)
    obj["spec"].update(fields)
    return obj


def test_defaults_match_the_crd():
    spec = validate(BASE)["spec"]
    assert spec["replicas"] == 1 and spec["maxConcurrency"] == 100 and spec["routePrefix"] == "/"
    assert spec["healthCheck"] == {"periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3}
    assert spec["rayActorOptions"] == {"numCpus": 1, "numGpus": 0}


@pytest.mark.parametrize("fields, field, words", [
    ({"handler": "no colon"}, "spec.handler", "does not match"),
    ({"replicas": -1}, "spec.replicas", "minimum"),
    ({"healthCheck": {"periodSeconds": 5, "timeoutSeconds": 5}}, "spec.healthCheck", "less than"),
    ({"rayCluster": {"workers": {"minReplicas": 3, "maxReplicas": 1}}}, "spec.rayCluster.workers", "must not exceed"),
    ({"rayCluster": {"existing": {"name": "shared"}, "workers": {}}}, "spec.rayCluster", "cannot be combined"),
    ({"rayActorOptions": {"memory": "lots"}}, "spec.rayActorOptions.memory", "does not match"),
    ({"routePrefix": "echo"}, "spec.routePrefix", "does not match"),
])
def test_invalid_specs_name_the_field(fields, field, words):
    with pytest.raises(SpecError) as err:
        validate(with_spec(**fields))
    assert err.value.field == field and words in str(err.value)


def test_missing_handler_and_wrong_kind():
    obj = copy.deepcopy(BASE)
    del obj["spec"]["handler"]
    with pytest.raises(SpecError, match="'handler' is a required property"):
        validate(obj)
    with pytest.raises(SpecError, match="kind"):
        validate({**BASE, "kind": "Deployment"})


def test_load_manifests_multi_document(tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text("""
apiVersion: rayfleet.io/v1alpha1
kind: ServeDeployment
metadata: {name: a}
spec: {handler: "m:f", routePrefix: /a}
---
apiVersion: rayfleet.io/v1alpha1
kind: ServeDeployment
metadata: {name: b, namespace: team}
spec: {handler: "m:g", replicas: 3}
""")
    a, b = load_manifests(path)
    assert (a.name, a.namespace, a.spec["routePrefix"]) == ("a", "default", "/a")
    assert (b.name, b.namespace, b.desired_state()["replicas"]) == ("b", "team", 3)
    path.write_text("spec: [unclosed")
    with pytest.raises(SpecError, match="invalid YAML"):
        load_manifests(path)


def test_parse_quantity():
    assert parse_quantity("512Mi", "f") == 512 * 2**20
    assert parse_quantity("250m", "f") == 0.25
    assert parse_quantity(3, "f") == 3
    with pytest.raises(SpecError, match="not a quantity"):
        parse_quantity("12Zi", "f")


def test_version_changes_only_for_fields_that_need_new_processes():
    spec = validate(BASE)["spec"]
    scaled = {**spec, "replicas": 5, "routePrefix": "/x", "healthCheck": {"periodSeconds": 30}}
    assert spec_version(scaled) == spec_version(spec)
    assert spec_version({**spec, "handlerArgs": {"greeting": "hi"}}) != spec_version(spec)
    assert spec_version({**spec, "env": [{"name": "A", "value": "1"}]}) != spec_version(spec)


def test_desired_state_shape():
    spec = validate(with_spec(env=[{"name": "MODE", "value": "fast"}], rayActorOptions={"numCpus": 0.5, "memory": "1Gi"}))["spec"]
    state = desired_state(spec)
    assert state["env"] == {"MODE": "fast"}
    assert state["rayActorOptions"] == {"numCpus": 0.5, "numGpus": 0, "memory": 2**30}
    assert state["version"] == spec_version(spec) and state["replicas"] == 1
