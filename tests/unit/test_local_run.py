"""`rayfleet run`'s pure parts: sizing the local Ray, and the status line a terminal shows."""
import os

from rayfleet.local_run import _status_line, local_cpus
from rayfleet.manifest import validate, Manifest


def manifest(replicas: int, cpus: float) -> Manifest:
    obj = validate({"apiVersion": "rayfleet.io/v1alpha1", "kind": "ServeDeployment", "metadata": {"name": "m"},
                    "spec": {"handler": "a:b", "replicas": replicas, "rayActorOptions": {"numCpus": cpus}}})
    return Manifest("m", "default", obj["spec"])


def test_the_local_ray_fits_the_replicas_it_is_given():
    cores = os.cpu_count()
    assert local_cpus([manifest(1, 1)], None) == (cores, None)
    cpus, note = local_cpus([manifest(cores * 2, 1), manifest(1, 0.5)], None)
    assert cpus == cores * 2 + 1 and f"this machine has {cores} cores" in note  # said, not silently
    assert local_cpus([manifest(cores * 2, 1)], 1) == (1, None)  # --num-cpus wins


def test_the_status_line_says_why_a_replica_waits():
    obs = {"name": "echo", "readyReplicas": 1, "targetReplicas": 2, "status": "Updating", "error": None,
           "restarts": 0, "replicas": [{"unschedulable": "waiting for resources: needs CPU 1 (0 of 2 free)"}]}
    assert _status_line(obs) == ("echo: 1/2 ready (Updating) - 1 replica(s) waiting for resources: needs CPU 1 "
                                 "(0 of 2 free)")


def test_the_status_line_shows_the_autoscalers_count_and_load():
    obs = {"name": "echo", "readyReplicas": 3, "targetReplicas": 3, "desiredReplicas": 3, "status": "Running",
           "error": None, "restarts": 0, "replicas": [],
           "autoscaling": {"load": 5.2345, "lastScaleTime": None, "lastScaleReason": None}}
    assert _status_line(obs) == "echo: 3/3 ready (Running), autoscaling 3 (load 5.2)"
    assert _status_line({**obs, "autoscaling": {**obs["autoscaling"], "load": None}}) == (
        "echo: 3/3 ready (Running), autoscaling 3")  # not sampled yet
