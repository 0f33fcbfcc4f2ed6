"""Which of its own node's replicas an ingress reports down (rayfleet_runtime.ingress.health_watch)."""
from rayfleet_runtime.ingress import health_watch as hw
from rayfleet_runtime.routing import RoutingTable

TABLE = RoutingTable.from_wire({"sharedHealth": True, "deployments": {"d": {"routePrefix": "/d", "replicas": [
    {"id": "d-0", "host": "10.0.0.1", "port": 1, "nodeId": "n1"},
    {"id": "d-1", "host": "10.0.0.1", "port": 2, "nodeId": "n1"},
    {"id": "d-2", "host": "10.0.0.2", "port": 3, "nodeId": "n2"}]}}})


def stat(*rows):
    """``show stat`` CSV as HAProxy writes it (the header's columns in its order, abridged)."""
    return "# pxname,svname,qcur,scur,status,weight,check_status,\n" + "".join(
        f"{backend},{server},0,0,{status},1,L7OK,\n" for server, status, backend in rows) + "\n"


def down_here(text, node_id):
    return hw.down_here(text, hw.checked_here(TABLE, node_id))


def test_only_this_nodes_replicas_found_down_are_reported():
    rows = stat(("d-0", "DOWN", "be_d"), ("d-1", "UP 1/2", "be_d"), ("d-2", "DOWN", "be_d"),
                ("d-0", "DOWN", "be_other"))
    assert down_here(rows, "n1") == {"d-0"}
    assert down_here(rows, "n2") == {"d-2"}
    assert down_here(stat(("d-0", "DOWN 1/2", "be_d")), "n1") == {"d-0"}  # going up: still down
    assert down_here(stat(("d-0", "MAINT", "be_d")), "n1") == frozenset()  # leaving: not a finding
    assert down_here("", "n1") == frozenset()  # HAProxy restarting


def test_a_finding_is_sent_when_it_changes_and_again_after_a_while():
    findings = hw.Findings()
    assert findings.to_send(frozenset(), 0.0)
    findings.sent(frozenset(), 0.0)
    assert not findings.to_send(frozenset(), 1.0)
    assert findings.to_send(frozenset({"d-0"}), 1.0)
    assert findings.to_send(frozenset(), hw.RESEND_S)  # a controller that restarted learns it again
