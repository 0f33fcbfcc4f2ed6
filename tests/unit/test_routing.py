"""The routing table (rayfleet_runtime.routing): built by the controller from DesiredState, read by the ingress."""
import pytest

from rayfleet_api.desired import Autoscaling, DesiredState
from rayfleet_runtime.routing import (QUEUE_TIMEOUT_S, Route, RoutingTable, build_table, normalize_prefix,
                                      prefix_taken)


def route(name, replicas=(), **fields):
    return Route(name, DesiredState(handler="m:h", **fields), tuple(replicas))


def test_a_fixed_deployment_queues_what_its_replicas_run_for_two_seconds():
    table = build_table([route("d", [("d-0", "10.0.0.1", 9000, "n1"), ("d-1", "10.0.0.2", 9000, "n2")],
                              max_concurrency=7, route_prefix="/d")])
    be = table.backend("d")
    assert (be.max_queued, be.queue_timeout_s, be.scale_from_zero) == (14, QUEUE_TIMEOUT_S, False)
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
