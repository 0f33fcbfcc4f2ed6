"""A terminating pod's preStop hook and its node's end of it (node_drain.py), over a real Unix socket."""
from __future__ import annotations

import os

from rayfleet_runtime.ingress import node_drain


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_the_drain_asks_until_no_replica_is_left_and_rides_out_an_unreachable_controller():
    clock, answers = Clock(), iter([2, ConnectionError("head restarting"), 1, 0])
    asked = []

    def ask(left: float) -> int:
        asked.append(left)
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert node_drain.drain(ask, 30, clock=clock, sleep=clock.sleep) == {"remaining": 0, "drained": True, "error": None}
    assert asked == [30, 29, 28, 27]  # the time left goes with every ask


def test_the_drain_gives_up_at_its_timeout_and_says_what_is_left():
    clock = Clock()
    result = node_drain.drain(lambda left: 1, 3, clock=clock, sleep=clock.sleep)
    assert result == {"remaining": 1, "drained": False, "error": None} and clock.now == 3


def test_the_hook_reaches_the_node_over_a_socket_only_the_container_can_open(tmp_path):
    path = str(tmp_path / "drain.sock")
    remaining = iter([1, 0])
    server = node_drain.serve(path, lambda left: next(remaining))
    try:
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        assert node_drain.request(path, 10) == {"status": 200, "remaining": 0, "drained": True, "error": None}
    finally:
        server.shutdown()
        server.server_close()


def test_the_hook_returns_after_its_minimum_even_with_no_ingress_to_ask(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(node_drain, "socket_path", lambda port: str(tmp_path / "none.sock"))
    slept = []
    monkeypatch.setattr(node_drain.time, "sleep", slept.append)
    assert node_drain.main(["--timeout", "5", "--min-seconds", "2"]) == 0
    assert "no drain at" in capsys.readouterr().out and 0 < slept[0] <= 2
