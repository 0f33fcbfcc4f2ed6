"""Replica changes through HAProxy's runtime API (rayfleet_runtime.ingress.server_updates), against a fake
runtime API that answers as HAProxy 2.8 does (the real one: tests/runtime/test_ingress.py)."""
from rayfleet_runtime.ingress import server_updates as su
from rayfleet_runtime.ingress.haproxy_config import ServerLine


def line(args, own=True, enabled=True):
    return ServerLine(args, own, enabled)


class FakeRuntimeAPI:
    """Servers by (backend, name): their state and the connections HAProxy still holds to them."""

    def __init__(self, backends=("be_a",), servers=()):
        self.backends = set(backends)
        self.servers = {key: {"state": "ready", "connections": 0} for key in servers}
        self.commands: list[str] = []

    def __call__(self, command: str) -> str:
        self.commands.append(command)
        words = command.split()
        backend, _, name = words[2].partition("/")
        if backend not in self.backends:
            return "No such backend.\n\n"
        key = (backend, name)
        if words[0] == "add":
            if key in self.servers:
                return "Already exists a server with the same name in backend.\n\n"
            self.servers[key] = {"state": "maint", "connections": 0, "args": " ".join(words[3:])}
            return "New server registered.\n\n"
        if key not in self.servers:
            return "No such server.\n\n"
        server = self.servers[key]
        if words[0] == "del":
            if server["state"] != "maint":
                return "Only servers in maintenance mode can be deleted.\n\n"
            if server["connections"]:
                return su.STILL_USED + "\n\n"
            del self.servers[key]
            return "Server deleted.\n\n"
        if command.startswith("enable server"):
            server["state"] = "ready"
        elif command.startswith("set server"):
            server["state"] = words[-1]
        return "\n"


def test_plan_adds_before_it_removes_and_replaces_a_server_whose_arguments_changed():
    running = {("be_a", "a-0"): line("127.0.0.1:1 maxconn 5"), ("be_a", "a-1"): line("127.0.0.1:2 maxconn 5")}
    wanted = {("be_a", "a-1"): line("127.0.0.1:2 maxconn 9"), ("be_a", "a-2"): line("127.0.0.1:3 maxconn 9")}
    update = su.plan(running, wanted)
    assert update.add == ((("be_a", "a-1"), wanted[("be_a", "a-1")]), (("be_a", "a-2"), wanted[("be_a", "a-2")]))
    assert update.remove == ((("be_a", "a-0"), running[("be_a", "a-0")]), (("be_a", "a-1"), running[("be_a", "a-1")]))
    assert not su.plan(wanted, dict(wanted))


def test_plan_puts_a_replica_checked_elsewhere_in_or_out_of_rotation_as_found_there():
    running = {("be_a", "a-0"): line("x:1 maxconn 5", False, True), ("be_a", "a-1"): line("x:2 maxconn 5", False, False)}
    wanted = {("be_a", "a-0"): line("x:1 maxconn 5", False, False), ("be_a", "a-1"): line("x:2 maxconn 5", False, True)}
    update = su.plan(running, wanted)
    assert (update.add, update.remove, update.enable, update.disable) == ((), (), (("be_a", "a-1"),), (("be_a", "a-0"),))
    api = FakeRuntimeAPI(servers=[("be_a", "a-0"), ("be_a", "a-1")])
    assert su.RuntimeServers(api).apply(update) is None
    assert api.commands == ["set server be_a/a-1 state ready", "set server be_a/a-0 state maint"]


def test_a_new_server_is_enabled_with_its_checks_and_one_that_left_is_deleted_once_haproxy_lets_go():
    api = FakeRuntimeAPI(servers=[("be_a", "a-0")])
    api.servers[("be_a", "a-0")]["connections"] = 1  # a request still in flight there
    servers = su.RuntimeServers(api)
    assert servers.apply(su.plan({("be_a", "a-0"): line("x")}, {("be_a", "a-1"): line("127.0.0.1:2 check maxconn 5")})) is None
    assert api.commands[:3] == ["add server be_a/a-1 127.0.0.1:2 check maxconn 5", "enable health be_a/a-1",
                                "enable server be_a/a-1"]
    assert api.servers[("be_a", "a-1")]["state"] == "ready"
    # The one that left gets no new request, and stays until its last connection is gone.
    assert api.servers[("be_a", "a-0")]["state"] == "maint" and set(servers.leaving) == {("be_a", "a-0")}
    servers.sweep()
    assert ("be_a", "a-0") in api.servers
    api.servers[("be_a", "a-0")]["connections"] = 0
    servers.sweep()
    assert ("be_a", "a-0") not in api.servers and not servers.leaving


def test_what_haproxy_refuses_is_an_error_for_the_ingress_to_reload_instead():
    api = FakeRuntimeAPI(servers=[("be_a", "a-1")])
    update = su.ServerUpdate(add=((("be_a", "a-1"), line("127.0.0.1:2")),))  # HAProxy has it already
    assert "Already exists" in su.RuntimeServers(api).apply(update)
    assert "No such backend" in su.RuntimeServers(api).apply(su.ServerUpdate(add=((("be_b", "b-0"), line("127.0.0.1:3")),)))


def test_a_replica_found_down_by_its_own_node_is_added_out_of_rotation():
    api = FakeRuntimeAPI()
    assert su.RuntimeServers(api).apply(su.ServerUpdate(add=((("be_a", "a-0"), line("x:1 maxconn 5", False, False)),))) is None
    assert api.commands == ["add server be_a/a-0 x:1 maxconn 5", "enable health be_a/a-0"]
    assert api.servers[("be_a", "a-0")]["state"] == "maint"


def test_a_server_gone_already_is_no_error_and_one_back_while_still_leaving_is_ready_again_unless_changed():
    api = FakeRuntimeAPI(servers=[("be_a", "a-0")])
    servers = su.RuntimeServers(api)
    assert servers.apply(su.ServerUpdate(remove=((("be_a", "gone"), line("x")), (("be_x", "gone"), line("x"))))) is None
    api.servers[("be_a", "a-0")]["connections"] = 1
    leave = su.ServerUpdate(remove=((("be_a", "a-0"), line("127.0.0.1:1")),))
    assert servers.apply(leave) is None and api.servers[("be_a", "a-0")]["state"] == "maint"
    assert servers.apply(su.ServerUpdate(add=((("be_a", "a-0"), line("127.0.0.1:1")),))) is None
    assert api.servers[("be_a", "a-0")]["state"] == "ready" and not servers.leaving
    assert servers.apply(leave) is None
    assert "changed" in servers.apply(su.ServerUpdate(add=((("be_a", "a-0"), line("127.0.0.1:9")),)))
    # After a reload the new worker never had it: nothing is left to delete.
    servers.forget()
    assert not servers.leaving
