"""Desired-state validation of the controller API (no Ray)."""
import pytest

from rayfleet_runtime.control_api import DesiredStateError, validate_desired, validate_name


def test_defaults_and_version():
    d = validate_desired({"handler": "examples.echo:Echo"})
    assert d["replicas"] == 1 and d["maxConcurrency"] == 100 and d["syncThreads"] == 1
    assert d["healthCheck"] == {"periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3}
    assert d["rayActorOptions"] == {"numCpus": 1, "numGpus": 0, "memory": None}
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
    ({"handler": "a:b", "rayActorOptions": {"numCpus": -1}}, "rayActorOptions.numCpus"),
    ({"handler": "a:b", "rayActorOptions": {"memory": "1Gi"}}, "rayActorOptions.memory"),
    ({"handler": "a:b", "env": {"A": 1}}, "env"),
    ({"handler": "a:b", "healthCheck": {"timeoutSeconds": 0}}, "healthCheck.timeoutSeconds"),
    ({"handler": "a:b", "runtimeEnv": "pip"}, "runtimeEnv"),
    ({"handler": "a:b", "healthCheck": {"periodSeconds": float("nan")}}, "healthCheck.periodSeconds"),
    ({"handler": "a:b", "gracefulShutdownSeconds": float("inf")}, "gracefulShutdownSeconds"),
    ([], "<body>"),
])
def test_invalid_fields_are_named(body, field):
    with pytest.raises(DesiredStateError) as err:
        validate_desired(body)
    assert err.value.field == field and str(err.value).startswith(field)


def test_names():
    validate_name("echo-2")
    validate_name("team-a.echo")  # the operator's "<namespace>.<name>"
    for bad in ("Echo", "a:b", "-x", "x" * 128, "", "a.b.c", "a..b", ".a"):
        with pytest.raises(DesiredStateError):
            validate_name(bad)
