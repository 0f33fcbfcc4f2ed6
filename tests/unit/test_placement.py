"""Where the controller puts a new replica, and which one it moves (pure: placement.py)."""
from __future__ import annotations

from rayfleet_runtime.controller.placement import NodeView, Placed, choose_node, to_rebalance

ONE_CPU = {"CPU": 1.0}
HALF = {"CPU": 0.5}


def nodes(*ids: str, cpu: float = 1.0, **flags: set[str]) -> list[NodeView]:
    return [NodeView(i, {"CPU": cpu}, draining=i in flags.get("draining", ()), suspect=i in flags.get("suspect", ()))
            for i in ids]


def test_a_new_replica_goes_where_its_deployment_has_the_fewest():
    placed = [Placed("a", "d", HALF), Placed("b", "other", HALF), Placed("b", "other", HALF)]
    # b has less room but none of d's replicas: spreading d beats packing
    assert choose_node(nodes("a", "b", cpu=2.0), placed, "d", HALF) == "b"
    assert choose_node(nodes("a", "b", cpu=2.0), placed, "other", HALF) == "a"


def test_among_equals_the_node_with_the_most_room_wins():
    placed = [Placed("a", "other", ONE_CPU)]
    assert choose_node(nodes("a", "b", cpu=2.0), placed, "d", HALF) == "b"


def test_draining_suspect_and_full_nodes_take_nothing():
    assert choose_node(nodes("a", "b", draining={"a"}), [], "d", HALF) == "b"
    assert choose_node(nodes("a", "b", suspect={"b"}), [], "d", HALF) == "a"
    full = [Placed("a", "d", ONE_CPU), Placed("b", "d", HALF)]
    assert choose_node(nodes("a", "b"), full, "d", ONE_CPU) is None
    assert choose_node(nodes("a", "b"), full, "d", HALF) == "b"
    assert choose_node(nodes("a", draining={"a"}), [], "d", HALF) is None


def test_a_crowded_node_gives_up_its_newest_replica_to_a_node_with_room():
    replicas = [("d-0", "b"), ("d-1", "b")]  # oldest first
    placed = [Placed(node, "d", HALF) for _, node in replicas]
    assert to_rebalance(nodes("b", "c"), placed, HALF, replicas) == "d-1"
    # one apart is as even as it gets
    three = [("d-0", "b"), ("d-1", "b"), ("d-2", "c")]
    assert to_rebalance(nodes("b", "c", cpu=2.0), [Placed(n, "d", HALF) for _, n in three], HALF, three) is None


def test_no_move_without_a_node_that_can_take_it():
    replicas = [("d-0", "b"), ("d-1", "b")]
    placed = [Placed("b", "d", HALF), Placed("b", "d", HALF), Placed("c", "other", ONE_CPU)]
    assert to_rebalance(nodes("b", "c"), placed, HALF, replicas) is None  # c is full
    assert to_rebalance(nodes("b", "c", draining={"c"}), placed[:2], HALF, replicas) is None
    assert to_rebalance(nodes("b"), placed[:2], HALF, replicas) is None
