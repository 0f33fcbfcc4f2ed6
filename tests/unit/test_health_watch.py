"""Which of its own node's replicas an ingress reports down (rayfleet_runtime.ingress.health_watch)."""
from rayfleet_runtime.ingress import health_watch as hw
from rayfleet_runtime.routing import RoutingTable

TABLE = RoutingTable.from_wire({"sharedHealth": True, "deployments": {"d": {"routePrefix": "/d", "replicas": [
    {"id": "d-0", "host": "10.0.0.1", "port": 1, "nodeId": "n1"},
    {"id": "d-1", "host": "10.0.0.1", "port": 2, "nodeId": "n1"},
    {"id": "d-2", "host": "10.0.0.2", "port": 3, "nodeId": "n2"}]}}})


def row(server, status, backend="be_d"):
    return {"pxname": backend, "svname": server, "status": status}


def test_only_this_nodes_replicas_found_down_are_reported():
    rows = [row("d-0", "DOWN"), row("d-1", "UP 1/2"), row("d-2", "DOWN"), row("d-0", "DOWN", "be_other")]
    assert hw.down_here(rows, TABLE, "n1") == {"d-0"}
    assert hw.down_here(rows, TABLE, "n2") == {"d-2"}
    assert hw.down_here([row("d-0", "DOWN 1/2")], TABLE, "n1") == {"d-0"}  # going up: still down
    assert hw.down_here([row("d-0", "MAINT")], TABLE, "n1") == frozenset()  # leaving: not a finding


def test_a_finding_is_sent_when_it_changes_and_again_after_a_while():
    findings = hw.Findings()
    assert findings.to_send(frozenset(), 0.0)
    findings.sent(frozenset(), 0.0)
    assert not findings.to_send(frozenset(), 1.0)
    assert findings.to_send(frozenset({"d-0"}), 1.0)
    assert findings.to_send(frozenset(), hw.RESEND_S)  # a controller that restarted learns it again
