"""rayfleet_api.spec and rayfleet.manifest: the CRD's defaults, schema and CEL rules applied without a cluster.

Agreement with the real API server is tests/integration/test_manifest_parity.py's job; here, that its
corpus (tests/manifests) covers every field and every rule of the CRD.
"""
import copy
import re
from pathlib import Path

import pytest

from rayfleet.manifest import UnknownFieldsError, crd_schema, load_manifests, read_documents, validate
from rayfleet_api.errors import SpecError
from rayfleet_api.quantity import parse_quantity
from rayfleet_api.spec import desired_state, spec_version

CORPUS = Path(__file__).resolve().parents[1] / "manifests"
# The schema keywords that refuse a value; each needs an invalid manifest naming it in a `# rule:` line.
RULE_KEYWORDS = ("required", "pattern", "maxLength", "minimum", "maximum", "x-kubernetes-validations", "x-kubernetes-list-type")

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
    with pytest.raises(SpecError, match="spec.handler: Required value"):
        validate(obj)
    with pytest.raises(SpecError, match='no matches for kind "Deployment" in version "rayfleet.io/v1alpha1"'):
        validate({**BASE, "kind": "Deployment"})


def test_unknown_fields_are_refused_naming_each_path():
    obj = with_spec(replica=3, env=[{"name": "A", "valu": "x"}], handlerArgs={"free": {"form": 1}})
    obj["metadata"]["lables"] = {"app": "echo"}
    with pytest.raises(UnknownFieldsError) as err:
        validate(obj)
    assert err.value.paths == ["metadata.lables", "spec.env[0].valu", "spec.replica"]
    assert str(err.value) == 'unknown field "metadata.lables", unknown field "spec.env[0].valu", unknown field "spec.replica"'


@pytest.mark.parametrize("mode, warned", [("warn", ['unknown field "spec.replica"']), ("ignore", [])])
def test_warn_and_ignore_drop_unknown_fields(mode, warned):
    warnings = []
    spec = validate(with_spec(replica=3), mode, warnings)["spec"]
    assert "replica" not in spec and spec["replicas"] == 1 and warnings == warned


def test_nulls_are_unset_and_status_is_ignored():
    obj = with_spec(replicas=None, image=None, handlerArgs={"a": None, "b": [None]})
    obj["status"] = {"replicas": "not even a number"}
    obj = validate(obj)
    assert obj["spec"]["replicas"] == 1 and "image" not in obj["spec"] and obj["spec"]["handlerArgs"] == {"b": [None]}
    assert "status" not in obj


def test_yaml_is_read_as_kubectl_reads_it(tmp_path):
    path = tmp_path / "scalars.yaml"
    path.write_text("{y: yes, n: n, o: 0o17, e: 1e3, u: 1_000, d: 2024-01-31, t: 1:30, q: '017', s: ~}")
    assert read_documents(path) == [{True: True, False: False, "o": 15, "e": 1000.0, "u": 1000,
                                     "d": "2024-01-31", "t": "1:30", "q": "017", "s": None}]


@pytest.mark.parametrize("metadata, field", [
    ({"name": "Echo"}, "metadata.name"),
    ({"name": "a" * 254}, "metadata.name"),
    ({}, "metadata.name"),
    ({"name": "echo", "namespace": "Team_A"}, "metadata.namespace"),
    ({"name": "echo", "labels": {"canary": True}}, "metadata.labels"),
    ({"name": "echo", "labels": {"example.com/app": "x y"}}, "metadata.labels.example.com/app"),
])
def test_metadata_is_checked_as_the_api_server_does(metadata, field):
    with pytest.raises(SpecError) as err:
        validate({**BASE, "metadata": metadata})
    assert err.value.field == field


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
    assert (b.name, b.namespace, b.desired_state().replicas) == ("b", "team", 3)
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
    state = desired_state(spec).to_json()
    assert state["env"] == {"MODE": "fast"}
    assert state["rayActorOptions"] == {"numCpus": 0.5, "numGpus": 0, "memory": 2**30}
    assert state["version"] == spec_version(spec) and state["replicas"] == 1


def schema_nodes(schema, path=""):
    """(path, schema) for every node of the CRD's schema, in the `# rule:` lines' notation:
    properties as `.name`, array items as `[]`, additionalProperties as `.*`."""
    yield path, schema
    for name, prop in schema.get("properties", {}).items():
        yield from schema_nodes(prop, f"{path}.{name}".lstrip("."))
    if "items" in schema:
        yield from schema_nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from schema_nodes(schema["additionalProperties"], f"{path}.*")


def user_nodes():
    """What a manifest can set and a create keeps: not status, and metadata is ObjectMeta, not this schema."""
    return [(p, s) for p, s in schema_nodes(crd_schema()) if p == "spec" or p.startswith(("spec.", "spec["))]


def instance_paths(value, path=""):
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from instance_paths(item, f"{path}.{key}".lstrip("."))
    elif isinstance(value, list):
        for item in value:
            yield from instance_paths(item, f"{path}[]")


def test_every_crd_field_is_in_a_valid_manifest():
    # A field added to the CRD joins tests/manifests/valid/ in the same change (see its README).
    fields = {p for p, _ in user_nodes() if not p.endswith(".*")}
    present = {p for f in CORPUS.glob("valid/*.yaml") for doc in read_documents(f) for p in instance_paths(doc)}
    assert fields - present == set()


def test_every_crd_rule_has_an_invalid_manifest():
    # A rule added to the CRD joins tests/manifests/invalid/ in the same change (see its README).
    nodes = dict(user_nodes())
    rules = {(p, k) for p, s in nodes.items() for k in RULE_KEYWORDS if k in s and k != "required"}
    rules |= {(f"{p}.{name}".lstrip("."), "required") for p, s in [("", crd_schema()), *nodes.items()]
              for name in s.get("required", [])}
    # CEL rules on the whole object (they may read metadata.name) are named `<root>`.
    nodes["<root>"] = {"x-kubernetes-validations": crd_schema().get("x-kubernetes-validations", [])}
    rules |= {("<root>", "x-kubernetes-validations")} if nodes["<root>"]["x-kubernetes-validations"] else set()
    texts = [f.read_text() for f in CORPUS.glob("invalid/*.yaml")]
    declared = {tuple(m.split()) for text in texts for m in re.findall(r"^# rule: (.+)$", text, re.M)}
    assert rules - declared == set()
    refused = "\n".join(m for text in texts for m in re.findall(r"^# refused: (.+)$", text, re.M))
    cel = {r.get("message", r["rule"]) for s in nodes.values() for r in s.get("x-kubernetes-validations", [])}
    assert {message for message in cel if message not in refused} == set(), "every CEL rule needs its own manifest"
    unknown = {(p, k) for p, k in declared - rules if k not in nodes.get(p, {})}
    assert unknown == set(), "`# rule:` lines naming no keyword of the CRD"
