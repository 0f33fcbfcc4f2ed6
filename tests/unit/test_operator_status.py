"""Status and conditions computed from observations: each typed reason and transition rule."""
from rayfleet_operator.conditions import merge_conditions, Condition
from rayfleet_operator.serve_spec import ServeSpec
from rayfleet_operator.status import (Observation, compute_status, conditions_for, desired_replicas, status_patch,
                                      transition_events)


def typed(spec):
    """The spec, with a handler, as the reconcile reads it."""
    return ServeSpec.from_spec({"handler": "examples.echo:Echo", **spec})


def obs(**kw):
    base = dict(generation=3, spec={"replicas": 2, "maxConcurrency": 10}, cluster_name="echo",
                selector="ray.io/cluster=echo", endpoint="http://echo.ns.svc:8000/", cluster_ready=True, cluster_state="ready")
    base.update(kw)
    return Observation(**{**base, "spec": typed(base["spec"])})


def replica(id_, state="READY", version="v1", restarts=0, in_flight=0):
    return {"id": id_, "state": state, "version": version, "pid": 100, "nodeIp": "10.0.0.1", "inFlight": in_flight, "restarts": restarts}


def controller(*replicas, version="v1", in_flight=0, error=None):
    return {"version": version, "replicas": list(replicas), "readyReplicas": sum(r["state"] == "READY" for r in replicas),
            "updatedReplicas": sum(r["version"] == version for r in replicas), "inFlight": in_flight, "error": error}


def by_type(conds):
    return {c.type: (c.status, c.reason) for c in conds}


def test_blocked_states_have_typed_reasons():
    assert by_type(conditions_for(obs(problems=["numCpus too big"])))["Ready"] == (False, "InvalidSpec")
    assert by_type(conditions_for(obs(cluster_ready=False, cluster_state="pending")))["Ready"] == (False, "RayClusterNotReady")
    assert by_type(conditions_for(obs(controller_error="refused")))["Ready"] == (False, "ControllerUnreachable")
    err = conditions_for(obs(controller=controller(error={"reason": "HandlerImportError", "message": "No module named 'nope'"})))
    assert by_type(err) == {"Ready": (False, "HandlerImportError"), "Progressing": (False, "HandlerImportError"),
                            "Degraded": (True, "HandlerImportError")}
    assert "nope" in err[0].message


def test_all_ready():
    conds = by_type(conditions_for(obs(controller=controller(replica("a"), replica("b")))))
    # Complete is Progressing=True, as a Deployment's: False means progress stopped
    assert conds == {"Ready": (True, "AllReplicasReady"), "Progressing": (True, "Complete"), "Degraded": (False, "AsExpected")}


def test_ready_replicas_the_service_reaches_through_no_pod_yet_are_not_ready():
    ready = controller(replica("a"), replica("b"))
    conds = conditions_for(obs(controller=ready, serving_pods=0))
    assert by_type(conds)["Ready"] == (False, "IngressNotReady") and "endpoints" in conds[0].message
    assert by_type(conditions_for(obs(controller=ready, serving_pods=1)))["Ready"] == (True, "AllReplicasReady")
    # a cluster without Pod objects (rayfleet dev's provider) is judged by its replicas alone
    assert by_type(conditions_for(obs(controller=ready, serving_pods=None)))["Ready"] == (True, "AllReplicasReady")


def test_serving_pods_are_ready_and_not_terminating():
    from rayfleet_operator.reconcile import _serving_pods

    def pod(ready: bool, deleting: bool = False) -> dict:
        meta = {"deletionTimestamp": "2026-12-02T00:00:00Z"} if deleting else {}
        return {"metadata": meta, "status": {"conditions": [{"type": "Ready", "status": str(ready)}]}}

    assert _serving_pods([pod(True), pod(False), pod(True, deleting=True)]) == 1
    assert _serving_pods([]) is None


def test_scaling_rolling_unhealthy_overloaded():
    scaling = by_type(conditions_for(obs(controller=controller(replica("a"), replica("b", "STARTING")))))
    assert scaling["Ready"] == (False, "ReplicasNotReady") and scaling["Progressing"] == (True, "Scaling")
    rolling = by_type(conditions_for(obs(controller=controller(replica("a", version="v1"), replica("b", version="v1"), version="v2"))))
    assert rolling["Ready"] == (True, "AllReplicasReady") and rolling["Progressing"] == (True, "RollingUpdate")
    restarted = by_type(conditions_for(obs(controller=controller(replica("a"), replica("b", "STARTING", restarts=1)))))
    assert restarted["Degraded"] == (True, "ReplicasUnhealthy")
    busy = by_type(conditions_for(obs(controller=controller(replica("a"), replica("b"), in_flight=20))))
    assert busy["Degraded"] == (True, "Overloaded")


def test_transition_time_moves_only_on_status_change():
    first = merge_conditions(None, [Condition("Ready", False, "ReplicasNotReady", "")], 1, "t1")
    same = merge_conditions(first, [Condition("Ready", False, "RayClusterNotReady", "x")], 2, "t2")
    flipped = merge_conditions(same, [Condition("Ready", True, "AllReplicasReady", "")], 2, "t3")
    assert [c["lastTransitionTime"] for c in (first[0], same[0], flipped[0])] == ["t1", "t1", "t3"]


def test_status_fields_and_patch_only_changes():
    o = obs(controller=controller(replica("a", in_flight=2), replica("b")))
    status = compute_status(o, None, "t1")
    assert (status["replicas"], status["readyReplicas"], status["observedGeneration"]) == (2, 2, 3)
    assert [r["id"] for r in status["replicaStatuses"]] == ["a", "b"] and status["replicaStatuses"][0]["inFlight"] == 2
    assert status_patch(status, compute_status(o, status, "t2")) == {}
    later = compute_status(obs(controller=controller(replica("a"))), status, "t3")
    assert set(status_patch(status, later)) >= {"replicas", "readyReplicas", "replicaStatuses", "conditions"}


def test_a_replica_ray_cant_place_stops_progress_with_the_reason():
    waiting = {**replica("b", state="STARTING", version="v2"), "unschedulable": "waiting for resources: needs CPU 1"}
    conds = conditions_for(obs(controller=controller(replica("a"), waiting, version="v2")))
    progressing = next(c for c in conds if c.type == "Progressing")
    assert (progressing.status, progressing.reason) == (False, "InsufficientResources")
    assert "needs CPU 1" in progressing.message


def test_events_for_readiness_changes_and_for_a_replica_ray_cant_place():
    def status(controller_obs):
        return compute_status(obs(controller=controller_obs), None, "t")

    running = status(controller(replica("a"), replica("b")))
    assert transition_events({}, running) == [("Normal", "AllReplicasReady", "2/2 replicas ready")]
    assert transition_events(running, running) == []
    waiting = {**replica("b", state="STARTING", version="v2"), "unschedulable": "needs CPU 1; 0 of 2 free"}
    stuck = status(controller(replica("a"), waiting, version="v2"))
    events = transition_events(running, stuck)
    assert ("Warning", "InsufficientResources", "1 replica(s) can't be placed: needs CPU 1; 0 of 2 free") in events
    assert ("Warning", "ReplicasNotReady", "1/2 replicas ready") in events
    assert transition_events(stuck, stuck) == []
    # A blocked state is one Event, not one per condition that names it.
    invalid = compute_status(obs(problems=["spec.x: bad"]), None, "t")
    assert [e[1] for e in transition_events(running, invalid)] == ["InvalidSpec"]


def test_a_replica_restarted_between_two_reconciles_is_an_event_though_no_condition_changed():
    def status(*replicas):
        return compute_status(obs(controller=controller(*replicas)), None, "t")

    running = status(replica("a"), replica("b"))
    restarted = status(replica("a"), {**replica("b", restarts=1), "lastError": "the actor died: SIGKILL"})
    assert transition_events(running, restarted) == [
        ("Warning", "ReplicaRestarted", "replica b restarted (1 in all): the actor died: SIGKILL")]
    assert transition_events(restarted, restarted) == []
    # a new replica (a scale-up, a replacement under another id) is no restart, whatever it counts
    assert transition_events(running, status(replica("a"), replica("b"), replica("c", restarts=2))) == []


AUTOSCALED = {"replicas": 2, "maxConcurrency": 10, "autoscaling": {"minReplicas": 1, "maxReplicas": 5}}


def autoscaled(*replicas, desired, load=None, when=None, reason=None):
    """The controller's observed state of an autoscaled deployment."""
    return {**controller(*replicas), "desiredReplicas": desired,
            "autoscaling": {"load": load, "lastScaleTime": when, "lastScaleReason": reason}}


def test_with_autoscaling_the_desired_count_is_the_autoscalers_and_readiness_is_judged_by_it():
    o = obs(spec=AUTOSCALED, controller=autoscaled(replica("a"), replica("b"), replica("c", "STARTING"), desired=3,
                                                   load=5.25, when=1767225600.4, reason="load 5.25 ... -> 3 replicas"))
    status = compute_status(o, None, "t")
    assert status["desiredReplicas"] == 3
    assert status["autoscaling"] == {"load": 5.25, "lastScaleTime": "2026-01-01T00:00:00Z",
                                     "lastScaleReason": "load 5.25 ... -> 3 replicas"}
    conds = {c.type: (c.status, c.reason, c.message) for c in conditions_for(o)}
    assert conds["Ready"] == (False, "ReplicasNotReady", "2/3 replicas ready")
    assert conds["Progressing"][:2] == (True, "Scaling")
    # Scaled to zero: nothing to wait for; a request is held until a replica is up.
    zero = obs(spec={**AUTOSCALED, "autoscaling": {"minReplicas": 0, "maxReplicas": 5}},
               controller=autoscaled(desired=0, load=0))
    assert by_type(conditions_for(zero))["Ready"] == (True, "AllReplicasReady")
    assert compute_status(zero, None, "t")["autoscaling"] == {"load": 0}  # not scaled yet: no time, no reason


def test_the_desired_count_falls_back_to_the_last_reported_then_the_spec_within_the_range():
    assert desired_replicas(typed({"replicas": 2}).desired, None, None) == 2  # no autoscaling: spec.replicas, known without asking
    assert desired_replicas(typed({"replicas": 2}).desired, {"desiredReplicas": 2}, {"desiredReplicas": 7}) == 2
    assert desired_replicas(typed(AUTOSCALED).desired, {"desiredReplicas": 4}, None) == 4
    last = {"desiredReplicas": 4, "autoscaling": {"load": 7}}
    assert desired_replicas(typed(AUTOSCALED).desired, None, last) == 4  # the controller unreachable: the last one reported
    assert desired_replicas(typed(AUTOSCALED).desired, None, {"desiredReplicas": 9}) == 2  # spec.replicas' then, not the autoscaler's
    assert desired_replicas(typed({**AUTOSCALED, "replicas": 9}).desired, None, None) == 5  # where the autoscaler starts
    unreachable = compute_status(obs(spec=AUTOSCALED, controller_error="refused"), last, "t")
    assert (unreachable["desiredReplicas"], unreachable["autoscaling"]) == (4, {"load": 7})
    turned_off = status_patch(last, compute_status(obs(controller=controller(replica("a"), replica("b"))), last, "t"))
    assert (turned_off["desiredReplicas"], turned_off["autoscaling"]) == (2, None)  # None clears the field


def test_an_event_says_when_and_why_the_autoscaler_changed_the_count():
    def status(desired, when, reason, old=None):
        return compute_status(obs(spec=AUTOSCALED, controller=autoscaled(
            *[replica(f"r{i}") for i in range(desired)], desired=desired, load=1, when=when, reason=reason)), old, "t")

    before = status(2, 100.0, "scaled up")
    after = status(4, 200.0, "load 7 over 2 replicas (target 2 each); at least 7 for 3s -> 4 replicas", before)
    scaled = [e for e in transition_events(before, after) if e[1] == "Scaled"]
    assert scaled == [("Normal", "Scaled", "replicas 2 -> 4: load 7 over 2 replicas (target 2 each); "
                                           "at least 7 for 3s -> 4 replicas")]
    assert [e for e in transition_events(after, status(4, 200.0, "same", after)) if e[1] == "Scaled"] == []
    # An operator meeting a status without desiredReplicas (written before it had one) says nothing.
    assert [e for e in transition_events({}, after) if e[1] == "Scaled"] == []


def rolled(*replicas, revisions, rollout, version="v2", **kw):
    """The controller's observed state with its revisions and rollout record (the controller's contract)."""
    return {**controller(*replicas, version=version, **kw), "servingVersion": "v1",
            "revisions": [{"revision": n, "version": f"v{n - 2}", "state": state, "good": state != "Failed"}
                          for n, state in revisions],
            "rollout": rollout}


def rollout(state, reason, revision=4, weight=None, message="", rolled_back_to=None):
    return {"revision": revision, "version": f"v{revision - 2}", "state": state, "reason": reason, "message": message,
            "canaryWeight": weight, "rolledBackTo": rolled_back_to}


FAILED = rollout("Failed", "HandlerImportError", rolled_back_to=3,
                 message="revision 4 (v2): HandlerImportError: No module named 'x'; rolled back to revision 3")


def test_a_rollout_progresses_by_revision_then_completes():
    updating = rolled(replica("a"), replica("b", version="v2"), revisions=[(4, "Updating"), (3, "Serving")],
                      rollout=rollout("Progressing", "NewRevisionProgressing"))
    conds = {c.type: c for c in conditions_for(obs(controller=updating))}
    # the controller's NewRevisionProgressing is the RollingUpdate users already match on
    assert (conds["Progressing"].status, conds["Progressing"].reason) == (True, "RollingUpdate")
    assert conds["Progressing"].message == "revision 4 (v2): 1/2 replicas updated"
    status = compute_status(obs(controller=updating), None, "t")
    assert (status["revision"], status["updateRevision"], status["canaryWeight"]) == (3, 4, None)
    done = rolled(replica("a", version="v2"), replica("b", version="v2"), revisions=[(4, "Serving"), (3, "Previous")],
                  rollout=rollout("Complete", "RolloutComplete"))
    conds = {c.type: c for c in conditions_for(obs(controller=done))}
    assert (conds["Progressing"].status, conds["Progressing"].reason) == (True, "Complete")
    assert conds["Progressing"].message == "revision 4 rolled out; 2/2 replicas ready"
    status = compute_status(obs(controller=done), None, "t")
    assert (status["revision"], status["updateRevision"], status["canaryWeight"]) == (4, 4, None)
    assert status["previousRevision"] == 3  # the last good one before it: where reverting the spec goes


def test_a_canary_says_its_weight():
    canary = rolled(replica("a"), replica("b"), replica("c", version="v2"), revisions=[(4, "Canary"), (3, "Serving")],
                    rollout=rollout("Progressing", "CanaryStep", weight=25, message="revision 4 gets 25 % of the requests"))
    conds = {c.type: c for c in conditions_for(obs(controller=canary))}
    assert (conds["Progressing"].status, conds["Progressing"].reason) == (True, "CanaryStep")
    assert conds["Progressing"].message == "revision 4 gets 25 % of the requests"
    quiet = {**canary, "rollout": rollout("Progressing", "CanaryStep", weight=25)}  # no message: the weight still shows
    assert next(c for c in conditions_for(obs(controller=quiet)) if c.type == "Progressing").message == (
        "revision 4 (v2) gets 25% of requests")
    assert conds["Ready"].status is True  # the old revision serves meanwhile
    status = compute_status(obs(controller=canary), None, "t")
    assert (status["revision"], status["updateRevision"], status["canaryWeight"]) == (3, 4, 25)
    waiting = rolled(replica("a"), replica("b"), revisions=[(4, "Canary"), (3, "Serving")],
                     rollout=rollout("Progressing", "CanaryWaiting", weight=0))
    assert by_type(conditions_for(obs(controller=waiting)))["Progressing"] == (True, "CanaryWaiting")
    assert compute_status(obs(controller=waiting), None, "t")["canaryWeight"] == 0  # 0 is a weight, not none


def test_a_rolled_back_rollout_is_not_progressing_yet_ready():
    back = rolled(replica("a", version="v1"), replica("b", version="v1"), revisions=[(4, "Failed"), (3, "Serving")],
                  rollout=FAILED)
    conds = {c.type: c for c in conditions_for(obs(controller=back))}
    assert (conds["Progressing"].status, conds["Progressing"].reason) == (False, "HandlerImportError")
    assert conds["Progressing"].message == FAILED["message"]
    assert (conds["Ready"].status, conds["Ready"].reason) == (True, "AllReplicasReady")  # revision 3 at full strength
    assert (conds["Degraded"].status, conds["Degraded"].reason) == (False, "AsExpected")
    status = compute_status(obs(controller=back), None, "t")
    assert (status["revision"], status["updateRevision"], status["canaryWeight"]) == (3, 4, None)
    deadline = rolled(replica("a"), revisions=[(4, "Failed"), (3, "Serving")],
                      rollout=rollout("Failed", "ProgressDeadlineExceeded", message="no progress in 600s"))
    assert by_type(conditions_for(obs(controller=deadline)))["Progressing"] == (False, "ProgressDeadlineExceeded")


def test_revisions_stand_while_the_controller_cant_be_asked():
    back = compute_status(obs(controller=rolled(replica("a"), replica("b"), revisions=[(4, "Failed"), (3, "Serving")],
                                                rollout=FAILED)), None, "t")
    unreachable = compute_status(obs(controller_error="refused"), back, "t2")
    assert (unreachable["revision"], unreachable["updateRevision"]) == (3, 4)
    # a controller without revisions (an older one) reports none: the fields go
    older = compute_status(obs(controller=controller(replica("a"), replica("b"))), back, "t3")
    assert status_patch(back, older)["revision"] is None and "canaryWeight" not in status_patch(back, older)


def test_events_once_when_a_rollout_fails_and_when_one_completes():
    def status(ctl, old=None):
        return compute_status(obs(controller=ctl), old, "t")

    serving = status(rolled(replica("a", version="v1"), replica("b", version="v1"), version="v1",
                            revisions=[(3, "Serving")], rollout=rollout("Complete", "RolloutComplete", revision=3)))
    updating = status(rolled(replica("a"), replica("b"), revisions=[(4, "Updating"), (3, "Serving")],
                             rollout=rollout("Progressing", "NewRevisionProgressing")), serving)
    assert transition_events(serving, updating) == []  # progress itself is no Event
    back = status(rolled(replica("a"), replica("b"), revisions=[(4, "Failed"), (3, "Serving")], rollout=FAILED), updating)
    assert transition_events(updating, back) == [("Warning", "HandlerImportError", FAILED["message"])]
    assert transition_events(back, back) == []  # once
    # the next revision failing for the same reason, seen by no reconcile in between: its own Event
    again = {**FAILED, "revision": 5, "message": "revision 5 (v3): HandlerImportError: ...; rolled back to revision 3"}
    next_back = status(rolled(replica("a"), replica("b"), revisions=[(5, "Failed"), (4, "Failed"), (3, "Serving")],
                              rollout=again), back)
    assert transition_events(back, next_back) == [("Warning", "HandlerImportError", again["message"])]
    done = status(rolled(replica("a", version="v2"), replica("b", version="v2"), revisions=[(4, "Serving"), (3, "Previous")],
                         rollout=rollout("Complete", "RolloutComplete")), updating)
    assert transition_events(updating, done) == [("Normal", "Complete", "revision 4 rolled out; 2/2 replicas ready")]
    assert transition_events(done, done) == []
    # rolled out between two reconciles: still one Event; a mere change of the count is none
    assert transition_events(serving, done) == [("Normal", "Complete", "revision 4 rolled out; 2/2 replicas ready")]
    scaled = status(rolled(replica("a", version="v2"), replica("b", "STARTING", version="v2"),
                           revisions=[(4, "Serving"), (3, "Previous")], rollout=rollout("Complete", "RolloutComplete")))
    assert [e for e in transition_events(scaled, done) if e[1] == "Complete"] == []


def test_every_status_field_written_is_in_the_crds_status_schema():
    """The API server prunes status fields its schema doesn't list: each one written must be declared."""
    from pathlib import Path

    import yaml
    crd = yaml.safe_load((Path(__file__).parents[2] / "crds/rayfleet.io_servedeployments.yaml").read_text())
    version = crd["spec"]["versions"][0]
    declared = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    canary = rolled(replica("a"), revisions=[(4, "Canary"), (3, "Serving")], rollout=rollout("Progressing", "CanaryStep", weight=5))
    assert set(compute_status(obs(controller=canary), None, "t")) <= set(declared)
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert (columns["Revision"], columns["Canary"]) == (".status.revision", ".status.canaryWeight")
