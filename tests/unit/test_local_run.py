"""`rayfleet run`'s parts that need no Ray: sizing the local Ray, the lines a terminal shows, and
following FILE.yaml (a changed file applied again, an invalid edit refused, a removed deployment deleted)."""
import os

import pytest

from rayfleet.follow import Follower, WatchedFile, status_line as _status_line
from rayfleet.local_run import local_cpus, worker_env
from rayfleet.manifest import validate, Manifest
from rayfleet_api.controller_client import ControllerRejected, ControllerUnreachable


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


def test_workers_import_from_this_directory_first_and_log_at_the_level_asked():
    env = worker_env("/here", os.pathsep.join(["/lib", "/here", ""]), verbose=False)
    assert env["PYTHONPATH"] == os.pathsep.join(["/here", "/lib"])  # once each, this directory first
    assert env["RAYFLEET_LOG_LEVEL"] == "INFO" and worker_env("/here", "", True)["RAYFLEET_LOG_LEVEL"] == "DEBUG"


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


def deployment(name, version="1", route="/"):
    return (f"apiVersion: rayfleet.io/v1alpha1\nkind: ServeDeployment\nmetadata: {{name: {name}}}\n"
            f"spec: {{handler: 'examples.echo:Echo', routePrefix: '{route}', handlerArgs: {{v: '{version}'}}}}\n")


def write(path, *docs, mtime_ns=None):
    path.write_text("---\n".join(docs))
    if mtime_ns is not None:  # a new stamp even within the file system's time granularity
        os.utime(path, ns=(mtime_ns, mtime_ns))


def test_a_file_changes_when_its_contents_do(tmp_path):
    path = tmp_path / "app.yaml"
    write(path, deployment("a"), mtime_ns=10**18)
    watched = WatchedFile(path)
    assert watched.changed() and not watched.changed()  # the first look is the baseline
    write(path, deployment("a"), mtime_ns=10**18 + 1)
    assert not watched.changed()  # saved again unchanged (or touched)
    write(path, deployment("a", "2"), mtime_ns=10**18 + 2)
    assert watched.changed() and not watched.changed()
    path.unlink()
    assert not watched.changed()  # an editor replacing it by rename: gone a moment, no change
    write(path, deployment("a", "2"), mtime_ns=10**18 + 3)
    assert not watched.changed()
    watched.forget()
    assert watched.changed()  # to be applied again


class FakeController:
    """The controller client's calls that the follower makes; `observed` is what GET /v1/deployments says."""

    def __init__(self):
        self.calls, self.observed, self.reject, self.down = [], [], set(), False

    def put_deployment(self, name, desired):
        if self.down:
            raise ControllerUnreachable("refused")
        if name in self.reject:
            raise ControllerRejected(f"{name}: no")
        self.calls.append(("PUT", name, desired.handler_args["v"]))

    def delete_deployment(self, name):
        self.calls.append(("DELETE", name))

    def list_deployments(self):
        if self.down:
            raise ControllerUnreachable("refused")
        return self.observed


@pytest.fixture
def followed(tmp_path):
    path = tmp_path / "app.yaml"
    write(path, deployment("a"), deployment("b", route="/b"), mtime_ns=10**18)
    watched = WatchedFile(path)
    watched.changed()
    api = FakeController()
    from rayfleet.manifest import load_manifests
    return path, api, Follower(api, watched, "strict", load_manifests(path), "127.0.0.1", 8000)


def test_an_edit_is_applied_and_a_removed_deployment_deleted(followed, capsys):
    path, api, follower = followed
    follower.turn()
    assert api.calls == []  # nothing changed since it started
    write(path, deployment("b", "2", route="/b"), deployment("c", route="/c"), mtime_ns=10**18 + 1)
    follower.turn()
    assert api.calls == [("PUT", "b", "2"), ("PUT", "c", "1"), ("DELETE", "a")]
    out = capsys.readouterr().out
    assert f"{path} changed: applying it" in out and "rayfleet: c -> http://127.0.0.1:8000/c" in out
    assert f"rayfleet: a is no longer in {path}: deleting it" in out
    assert follower.names == ["b", "c"]


def test_an_invalid_edit_keeps_what_runs(followed, capsys):
    path, api, follower = followed
    write(path, deployment("a").replace("routePrefix: '/'", "replicas: -1"), mtime_ns=10**18 + 1)
    follower.turn()
    assert api.calls == [] and follower.names == ["a", "b"]
    err = capsys.readouterr().err
    assert "spec.replicas" in err and f"still running the last valid {path}" in err
    # one deployment the controller refuses: the others still apply
    api.reject = {"a"}
    write(path, deployment("a", "3"), deployment("b", "3", route="/b"), mtime_ns=10**18 + 2)
    follower.turn()
    assert api.calls == [("PUT", "b", "3")] and "a: no" in capsys.readouterr().err


def test_an_edit_the_controller_couldnt_take_is_applied_once_it_answers(followed, capsys):
    path, api, follower = followed
    api.down = True
    write(path, deployment("a", "2"), deployment("b", route="/b"), mtime_ns=10**18 + 1)
    follower.turn()
    assert api.calls == [] and "controller not answering" in capsys.readouterr().err
    api.down = False
    follower.turn()
    assert api.calls == [("PUT", "a", "2"), ("PUT", "b", "1")]


def observed(rollout, status="Running"):
    return {"name": "a", "readyReplicas": 2, "targetReplicas": 2, "status": status, "error": None, "restarts": 0,
            "replicas": [], "rollout": rollout}


def rollout(state, revision=4, weight=None, reason="", message="", back=None):
    return {"revision": revision, "version": "ab12cd34ef56", "state": state, "reason": reason, "message": message,
            "canaryWeight": weight, "rolledBackTo": back}


def test_a_line_when_a_rollout_starts_advances_completes_or_fails(followed, capsys):
    _, _, follower = followed

    def lines(*rollouts):
        for r in rollouts:
            follower.show([observed(r)])
        return [line for line in capsys.readouterr().out.splitlines() if not line.startswith("a: 2/2")]

    assert lines(rollout("Progressing"), rollout("Progressing"), rollout("Complete")) == [
        "a: rolling out revision 4 (ab12cd34ef56)", "a: revision 4 (ab12cd34ef56) rolled out"]
    assert lines(rollout("Progressing", 5, weight=10, reason="CanaryStep"), rollout("Progressing", 5, weight=10),
                 rollout("Progressing", 5, weight=50), rollout("Complete", 5, weight=100)) == [
        "a: canary of revision 5 (ab12cd34ef56) at 10% of requests", "a: canary at 50% of requests",
        "a: revision 5 (ab12cd34ef56) rolled out"]
    message = "revision 6 (ab12cd34ef56): HandlerImportError: No module named 'x'; rolled back to revision 5"
    assert lines(rollout("Progressing", 6), rollout("Failed", 6, reason="HandlerImportError", message=message, back=5),
                 rollout("Failed", 6, reason="HandlerImportError", message=message, back=5)) == [
        "a: rolling out revision 6 (ab12cd34ef56)", f"a: rollout failed: {message}"]
    # without a message from the controller, the line says it from the fields
    assert lines(rollout("Failed", 7, reason="ProgressDeadlineExceeded", back=5)) == [
        "a: rollout failed: revision 7 (ab12cd34ef56): ProgressDeadlineExceeded; rolled back to revision 5"]
    assert lines(None) == []  # a controller without rollout records: only status lines
