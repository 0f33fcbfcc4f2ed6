"""The desired state: defaults, validation of what the controller API receives, and the CRD's defaults."""
import dataclasses

import pytest

from rayfleet.manifest import crd_schema
from rayfleet_api.desired import (FIELDS, MAXIMUM, ROUTE_PREFIX_MAX_LENGTH, ROUTE_PREFIX_PATTERN, ActorOptions, Autoscaling,
                                  DesiredState, HealthCheck, validate_name)
from rayfleet_api.errors import SpecError
from rayfleet_api.fields import Nested, default_of, encode, walk
from rayfleet_api.spec import desired_state, spec_version


def validate_desired(body):
    return DesiredState.from_json(body).to_json()


def test_defaults_and_version():
    d = validate_desired({"handler": "examples.echo:Echo"})
    assert d["replicas"] == 1 and d["maxConcurrency"] == 100 and d["syncThreads"] == 1
    assert d["healthCheck"] == {"periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3}
    assert d["rayActorOptions"] == {"numCpus": 1, "numGpus": 0, "memory": None}
    assert "autoscaling" not in d  # off unless asked for (`replicas` is the count), and then not sent
    assert validate_desired({"handler": "a:b", "autoscaling": {"maxReplicas": 4}})["autoscaling"] == {
        "minReplicas": 1, "maxReplicas": 4, "targetInFlight": 2, "upscaleDelaySeconds": 3, "downscaleDelaySeconds": 60}
    assert isinstance(d["version"], str) and d["version"]
    assert validate_desired({"handler": "a:b", "version": "x"})["version"] == "x"
    assert validate_desired({"handler": "a:b", "healthCheck": {"periodSeconds": 2}})["healthCheck"]["failureThreshold"] == 3


@pytest.mark.parametrize("body,field", [
    ({"handler": "nocolon"}, "handler"),
    ({}, "handler"),
    ({"handler": "a:b", "replicas": -1}, "replicas"),
    ({"handler": "a:b", "replicas": 1.5}, "replicas"),
    ({"handler": "a:b", "maxConcurrency": 0}, "maxConcurrency"),
    ({"handler": "a:b", "routePrefix": "echo"}, "routePrefix"),
    ({"handler": "a:b", "routePrefix": "/echo/"}, "routePrefix"),  # would take /echo from another deployment
    ({"handler": "a:b", "routePrefix": "/it's"}, "routePrefix"),  # haproxy.cfg can't hold it
    ({"handler": "a:b", "routePrefix": "/echo\n"}, "routePrefix"),
    ({"handler": "a:b", "rayActorOptions": {"numCpus": -1}}, "rayActorOptions.numCpus"),
    ({"handler": "a:b", "rayActorOptions": {"memory": "1Gi"}}, "rayActorOptions.memory"),
    ({"handler": "a:b", "env": {"A": 1}}, "env"),
    ({"handler": "a:b", "healthCheck": {"timeoutSeconds": 0}}, "healthCheck.timeoutSeconds"),
    ({"handler": "a:b", "runtimeEnv": "pip"}, "runtimeEnv"),
    ({"handler": "a:b", "healthCheck": {"periodSeconds": float("nan")}}, "healthCheck.periodSeconds"),
    ({"handler": "a:b", "gracefulShutdownSeconds": float("inf")}, "gracefulShutdownSeconds"),
    ({"handler": "a:b", "maxConcurrency": 10**30}, "maxConcurrency"),  # haproxy.cfg can't hold it
    ({"handler": "a:b", "requestTimeoutSeconds": 3e6}, "requestTimeoutSeconds"),  # nor this (~35 days)
    ({"handler": "a:b", "healthCheck": {"failureThreshold": 101}}, "healthCheck.failureThreshold"),
    ([], "<body>"),
    ({"handler": "a:b", "maxQueued": 5}, "maxQueued"),  # a knob this controller doesn't know is refused
    ({"handler": "a:b", "rayActorOptions": {"resources": {"x": 1}}}, "rayActorOptions.resources"),
    ({"handler": "a:b", "autoscaling": 4}, "autoscaling"),
    ({"handler": "a:b", "autoscaling": {"minReplicas": 1}}, "autoscaling.maxReplicas"),  # the bound on cost: required
    ({"handler": "a:b", "autoscaling": {"maxReplicas": 0}}, "autoscaling.maxReplicas"),
    ({"handler": "a:b", "autoscaling": {"maxReplicas": 2.5}}, "autoscaling.maxReplicas"),
    ({"handler": "a:b", "autoscaling": {"maxReplicas": 2, "minReplicas": 3}}, "autoscaling.minReplicas"),
    ({"handler": "a:b", "autoscaling": {"maxReplicas": 2, "minReplicas": -1}}, "autoscaling.minReplicas"),
    ({"handler": "a:b", "autoscaling": {"maxReplicas": 2, "targetInFlight": 0}}, "autoscaling.targetInFlight"),
    ({"handler": "a:b", "autoscaling": {"maxReplicas": 2, "targetInFlight": "2"}}, "autoscaling.targetInFlight"),
    ({"handler": "a:b", "autoscaling": {"maxReplicas": 2, "upscaleDelaySeconds": -1}},
     "autoscaling.upscaleDelaySeconds"),
    ({"handler": "a:b", "autoscaling": {"maxReplicas": 2, "downscaleDelaySeconds": float("nan")}},
     "autoscaling.downscaleDelaySeconds"),
    ({"handler": "a:b", "autoscaling": {"maxReplicas": 2, "panicWindow": 6}}, "autoscaling.panicWindow"),
])
def test_invalid_fields_are_named(body, field):
    with pytest.raises(SpecError) as err:
        validate_desired(body)
    assert err.value.field == field and str(err.value).startswith(field)


def test_names():
    validate_name("echo-2")
    validate_name("team-a.echo")  # the operator's "<namespace>.<name>"
    for bad in ("Echo", "a:b", "-x", "x" * 128, "", "a.b.c", "a..b", ".a", "x\n"):
        with pytest.raises(SpecError):
            validate_name(bad)


def test_wire_form_round_trips():
    state = DesiredState.from_json({"handler": "a:b", "replicas": 3, "env": {"A": "1"}, "healthCheck": {"periodSeconds": 2},
                                    "rayActorOptions": {"numCpus": 0.5, "memory": 1024}, "version": "v7"})
    assert DesiredState.from_json(state.to_json()) == state
    assert state.health_check == HealthCheck(period_seconds=2) and state.ray_actor_options == ActorOptions(0.5, 0, 1024)
    scaled = DesiredState.from_json({"handler": "a:b", "autoscaling": {
        "minReplicas": 0, "maxReplicas": 8, "targetInFlight": 0.5, "downscaleDelaySeconds": 5}})
    assert DesiredState.from_json(scaled.to_json()) == scaled
    assert scaled.autoscaling == Autoscaling(max_replicas=8, min_replicas=0, target_in_flight=0.5,
                                             downscale_delay_seconds=5)


def test_autoscaling_does_not_roll_replicas():
    """Autoscaling moves the count only: like `replicas`, it stays out of the version hash."""
    spec = {"handler": "a:b"}
    scaled = {**spec, "autoscaling": {"minReplicas": 0, "maxReplicas": 8, "targetInFlight": 4, "upscaleDelaySeconds": 1,
                                      "downscaleDelaySeconds": 30}}
    assert spec_version(scaled) == spec_version(spec)
    assert (DesiredState.from_json({"handler": "a:b", "autoscaling": {"maxReplicas": 8}}).version
            == DesiredState.from_json({"handler": "a:b"}).version)
    assert desired_state(scaled).autoscaling == Autoscaling(max_replicas=8, min_replicas=0, target_in_flight=4,
                                                            upscale_delay_seconds=1, downscale_delay_seconds=30)
    assert desired_state({**spec, "autoscaling": {"maxReplicas": 8}}).autoscaling == Autoscaling(max_replicas=8)
    assert desired_state(spec).autoscaling is None


def test_autoscaling_clamps_a_count_into_its_range():
    scaling = Autoscaling(min_replicas=2, max_replicas=5)
    assert [scaling.clamp(n) for n in (0, 2, 4, 5, 9)] == [2, 2, 4, 5, 5]


def crd_default(schema, path):
    for key in path.split("."):
        schema = schema["properties"][key]
    return schema["default"]


def test_crd_defaults_are_the_desired_state_defaults():
    """One set of defaults: the CRD's (what `kubectl get -o yaml` shows) must be DesiredState's own, for
    every field of the table."""
    spec = crd_schema()["properties"]["spec"]
    checked = set()
    for path, owner, f in walk(DesiredState, FIELDS):
        if not f.in_spec:
            continue
        *parents, name = path.split(".")
        parent = spec
        for key in parents:
            parent = parent["properties"][key]
        schema, default = parent["properties"][name], default_of(owner, f.attr)
        if default is dataclasses.MISSING:  # no default: the CRD requires it
            assert name in parent.get("required", []), path
        elif isinstance(f.read, Nested):  # an object's own default, its fields' defaults filled in
            if "default" in schema:
                filled = {**{k: s["default"] for k, s in schema["properties"].items() if "default" in s}, **schema["default"]}
                assert filled == {k: v for k, v in encode(default, f.read.fields).items() if v is not None}, path
        elif default is not None and not isinstance(default, dict):
            assert crd_default(spec, path) == default, path
            checked.add(path)
        else:  # None, {}: nothing for the API server to write in
            assert "default" not in schema or schema["default"] == {}, path
    assert {"replicas", "maxConcurrency", "rayActorOptions.numCpus", "healthCheck.periodSeconds",
            "autoscaling.minReplicas", "autoscaling.downscaleDelaySeconds"} <= checked
    assert spec["required"] == ["handler"]
    assert spec["properties"]["autoscaling"]["required"] == ["maxReplicas"]  # the one field without a default
    # And a spec with nothing but a handler means the same before and after the API server defaults it
    # (but for the version: it hashes the spec as the API server stored it).
    top = [f.name for f in FIELDS if f.in_spec and "default" in spec["properties"][f.name]]
    assert dataclasses.replace(desired_state({"handler": "a:b"}), version="") == dataclasses.replace(desired_state(
        {"handler": "a:b", **{k: crd_default(spec, k) for k in top}}), version="")


def test_one_route_prefix_rule_for_the_crd_the_controller_and_the_proxy():
    spec = crd_schema()["properties"]["spec"]["properties"]["routePrefix"]
    assert (spec["pattern"], spec["maxLength"]) == (ROUTE_PREFIX_PATTERN, ROUTE_PREFIX_MAX_LENGTH)


def test_the_crds_maximums_are_the_controllers():
    """One set of upper bounds: the controller's API takes no more than Kubernetes would."""
    spec = crd_schema()["properties"]["spec"]
    assert MAXIMUM["autoscaling.maxReplicas"] == MAXIMUM["autoscaling.minReplicas"] == MAXIMUM["replicas"]
    for path, maximum in MAXIMUM.items():
        schema = spec
        for key in path.split("."):
            schema = schema["properties"][key]
        assert schema["maximum"] == maximum, path
        # maxReplicas is required and bounds minReplicas: at its maximum, each autoscaling bound is tested alone.
        # A canary sets weight or steps: each other canary bound is tested beside a weight.
        body: dict = {"handler": "a:b", "autoscaling": {"maxReplicas": MAXIMUM["autoscaling.maxReplicas"]},
                      "rollout": {"canary": {"weight": 10}}}
        *parents, key = path.split(".")
        owner = body
        for name in parents:
            owner = owner.setdefault(name, {})
        owner[key] = maximum
        DesiredState.from_json(body)
        owner[key] = maximum + 1
        with pytest.raises(SpecError):
            DesiredState.from_json(body)
