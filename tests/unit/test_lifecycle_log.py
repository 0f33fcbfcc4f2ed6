"""The controller's lifecycle lines: logfmt, one line whatever a value holds."""
from __future__ import annotations

import logging

from rayfleet_runtime.lifecycle_log import lifecycle, logfmt


def test_logfmt_quotes_only_what_needs_it_and_leaves_out_none():
    assert logfmt(event="replica_ready", deployment="ns.name", replica="ns.name-3", port=4123, node=None) == (
        "event=replica_ready deployment=ns.name replica=ns.name-3 port=4123")
    assert logfmt(message="no answer within 5s", empty="", eq="a=b") == (
        'message="no answer within 5s" empty="" eq="a=b"')
    assert logfmt(message='say "hi"\nTraceback \\ ...') == r'message="say \"hi\"\nTraceback \\ ..."'
    assert logfmt(reason="ümlaut") == "reason=ümlaut"


def test_lifecycle_logs_one_line_at_the_events_level(caplog):
    caplog.set_level(logging.INFO, "rayfleet.controller")
    lifecycle("replica_ready", deployment="d", replica="d-0")
    lifecycle("replica_unhealthy", deployment="d", replica="d-0", message="timed out")
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("rayfleet.controller", logging.INFO, "event=replica_ready deployment=d replica=d-0"),
        ("rayfleet.controller", logging.WARNING,
         'event=replica_unhealthy deployment=d replica=d-0 message="timed out"')]
