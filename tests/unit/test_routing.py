"""The routing table (rayfleet_runtime.routing): built by the controller from DesiredState, read by the ingress."""
import pytest

from rayfleet_api.desired import Autoscaling, DesiredState
from rayfleet_runtime.routing import (QUEUE_TIMEOUT_S, CanaryRoute, ReplicaRow, Route, RoutingTable, build_table,
                                      normalize_prefix, prefix_taken)


def route(name, replicas=(), **fields):
    return Route(name, DesiredState(handler="m:h", **fields), rows(replicas))


def rows(replicas):
    return tuple(ReplicaRow(*r) for r in replicas)


def test_a_fixed_deployment_queues_what_its_replicas_up_run_for_two_seconds():
    table = build_table([route("d", [("d-0", "10.0.0.1", 9000, "n1"), ("d-1", "10.0.0.2", 9000, "n2")],
                              max_concurrency=7, route_prefix="/d")])
    be = table.backend("d")
    # None: HAProxy counts the replicas up (maxConcurrency x nbsrv), so a change of replicas changes no setting.
    assert (be.max_queued, be.queue_timeout_s, be.scale_from_zero) == (None, QUEUE_TIMEOUT_S, False)
    assert [(s.replica_id, s.addr, s.node_id) for s in be.servers] == [("d-0", "10.0.0.1:9000", "n1"),
                                                                       ("d-1", "10.0.0.2:9000", "n2")]


def test_an_autoscaled_deployment_queues_what_max_replicas_run_until_its_request_timeout():
    scaled = Autoscaling(max_replicas=5, min_replicas=0)
    be = build_table([route("a", max_concurrency=3, request_timeout_seconds=30, autoscaling=scaled)]).backend("a")
    assert (be.max_queued, be.queue_timeout_s, be.scale_from_zero) == (15, 30.0, True)
    one = build_table([route("a", autoscaling=Autoscaling(max_replicas=5))]).backend("a")
    assert one.scale_from_zero is False  # min 1: a deployment with no replica answers 503 at once


def test_routing_order_is_longest_prefix_first_and_the_catch_all_last():
    table = build_table([route("root"), route("a", route_prefix="/a"), route("ab", route_prefix="/a/b")])
    assert [be.prefix for be in table.backends] == ["/a/b", "/a", "/"]
    assert table.catch_all.deployment == "root"


def test_the_wire_form_reads_back_as_the_same_table():
    table = build_table([route("d", [("d-0", "::1", 9000, "n1")], route_prefix="/d", max_request_body_bytes=10),
                         route("z", autoscaling=Autoscaling(max_replicas=2, min_replicas=0))])
    assert RoutingTable.from_wire(table.to_wire()) == table
    assert table.to_wire()["deployments"]["d"]["replicas"] == [{"id": "d-0", "host": "::1", "port": 9000,
                                                                "nodeId": "n1"}]


def test_a_replica_haproxy_cannot_address_is_left_out_with_the_reason():
    table = build_table([route("d", [("d-0", "a b\nfrontend", 80, None), ("d-1", "10.0.0.1", 80, None)])])
    assert [s.replica_id for s in table.backend("d").servers] == ["d-1"]
    assert any("d-0" in reason and "invalid host" in reason for reason in table.skipped)


def test_a_prefix_is_its_first_claimants():
    assert prefix_taken("b", "/x", {"/x": "a"}) == "a"
    assert prefix_taken("a", "/x", {"/x": "a"}) is None  # its own
    assert prefix_taken("b", "/y", {"/x": "a"}) is None
    wire = {"deployments": {"b": {"routePrefix": "/x"}, "a": {"routePrefix": "/x/"}}}
    table = RoutingTable.from_wire(wire)  # by name, as no controller would send it
    assert [be.deployment for be in table.backends] == ["a"]
    assert table.skipped == ("deployment 'b': routePrefix /x already used by 'a'",)


def test_normalize_prefix():
    assert normalize_prefix("/") == "/"
    assert normalize_prefix("") == "/"
    assert normalize_prefix("/a/b/") == "/a/b"
    with pytest.raises(ValueError):
        normalize_prefix("no-slash")


def canary_route(name, stable_replicas, canary_replicas, weight, canary_fields=None, **fields):
    desired = DesiredState(handler="m:h", **fields)
    canary = CanaryRoute(DesiredState(handler="m:h2", **{**fields, **(canary_fields or {})}), rows(canary_replicas),
                         weight)
    return Route(name, desired, rows(stable_replicas), canary)


def test_a_canary_is_a_backend_of_its_own_with_its_revisions_limits():
    scaled = Autoscaling(max_replicas=4, min_replicas=0)
    table = build_table([canary_route("d", [("d-0", "10.0.0.1", 9000, "n1")], [("d-c0", "10.0.0.3", 9001, "n2")], 10,
                                      {"max_concurrency": 3, "max_request_body_bytes": 99, "route_prefix": "/other"},
                                      route_prefix="/d", max_concurrency=7, autoscaling=scaled)])
    be = table.backend("d")
    assert (be.name, be.canary_weight, be.canary_slot) == ("be_d", 10, be.canary)
    canary = be.canary
    assert (canary.name, canary.deployment, canary.prefix) == ("be_d:canary", "d", "/d")  # the stable's prefix
    assert (canary.max_concurrency, canary.max_body_bytes, canary.max_queued) == (3, 99, 12)  # its own limits
    assert canary.scale_from_zero is False and be.scale_from_zero is True  # the activator serves no canary
    assert [(s.replica_id, s.addr, s.node_id) for s in canary.servers] == [("d-c0", "10.0.0.3:9001", "n2")]
    assert [s.replica_id for s in be.servers] == ["d-0"]
    assert be.revisions() == (be, canary)
    assert table.names()["be_d:canary"] == {"deployment": "d", "servers": {"d-c0": "d-c0"}, "revision": "canary"}
    assert "revision" not in table.names()["be_d"]


def test_weights_are_percents_and_without_a_canary_its_slot_is_empty_with_the_deployments_limits():
    rep = [("d-c0", "10.0.0.3", 9001, None)]
    assert build_table([canary_route("d", [], rep, 250)]).backend("d").canary_weight == 100
    assert build_table([canary_route("d", [], rep, -1)]).backend("d").canary_weight == 0
    plain = build_table([route("d", max_concurrency=7)]).backend("d")
    assert plain.canary is None and plain.canary_weight == 0
    slot = plain.canary_slot
    assert (slot.name, slot.servers, slot.max_concurrency, slot.canary) == ("be_d:canary", (), 7, None)


def test_the_wire_form_of_a_canary_reads_back_as_the_same_table():
    table = build_table([canary_route("d", [("d-0", "::1", 9000, "n1")], [("d-c0", "10.0.0.3", 9001, "n2")], 5,
                                      {"max_concurrency": 2, "request_timeout_seconds": 7}, route_prefix="/d"),
                         canary_route("root", [], [], 0)])
    wire = table.to_wire()
    assert RoutingTable.from_wire(wire) == table
    assert wire["deployments"]["d"]["canary"] == {
        "weight": 5, "maxConcurrency": 2, "requestTimeoutSeconds": 7.0, "queueTimeoutSeconds": QUEUE_TIMEOUT_S,
        "maxQueued": None, "maxRequestBodyBytes": DesiredState.max_request_body_bytes,
        "replicas": [{"id": "d-c0", "host": "10.0.0.3", "port": 9001, "nodeId": "n2"}]}


@pytest.mark.parametrize("canary", [[1, 2], "x", {"weight": 101}, {"weight": -1}, {"weight": True}, {"weight": 1.5},
                                    {"replicas": []}])
def test_an_unusable_canary_is_left_out_with_the_reason_and_the_stable_backend_serves(canary):
    wire = {"deployments": {"d": {"routePrefix": "/d", "canary": canary,
                                  "replicas": [{"id": "d-0", "host": "10.0.0.1", "port": 80}]}}}
    table = RoutingTable.from_wire(wire)
    assert table.backend("d").canary is None and [s.replica_id for s in table.backend("d").servers] == ["d-0"]
    assert len(table.skipped) == 1 and "'d' canary" in table.skipped[0]


def test_a_canarys_bad_replica_is_left_out_and_names_never_collide():
    wire = {"deployments": {
        "d": {"routePrefix": "/d", "canary": {"weight": 10, "replicas": [{"id": "c", "host": "a b", "port": 1}, "x"]}},
        "d:canary": {"routePrefix": "/e"}}}  # no controller sends this name; its backend still has its own
    table = RoutingTable.from_wire(wire)
    assert table.backend("d").canary.servers == ()
    assert sum("'d' canary: bad replica" in reason for reason in table.skipped) == 2
    names = [b.name for be in table.backends for b in be.revisions()]
    assert len(names) == len(set(names)) == 3
    assert table.backend("d").canary.name == "be_d:canary"


def test_a_replicas_local_socket_travels_with_it_and_one_haproxy_cannot_hold_is_dropped():
    table = build_table([route("d", [("d-0", "10.0.0.1", 9000, "n1", "rayfleet/12/9000"),
                                     ("d-1", "10.0.0.1", 9001, "n1", "bad name\nbackend x"),
                                     ("d-2", "10.0.0.2", 9000, "n2")], route_prefix="/d")])
    servers = {s.replica_id: s for s in table.backend("d").servers}
    assert [servers[r].local for r in ("d-0", "d-1", "d-2")] == ["rayfleet/12/9000", None, None]
    assert servers["d-0"].address_for("n1") == "abns@rayfleet/12/9000"
    assert servers["d-0"].address_for("n2") == servers["d-0"].address_for(None) == "10.0.0.1:9000"
    assert RoutingTable.from_wire(table.to_wire()) == table
    assert table.to_wire()["deployments"]["d"]["replicas"][0]["local"] == "rayfleet/12/9000"
