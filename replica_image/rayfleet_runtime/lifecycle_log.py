"""One logfmt line per lifecycle event of a replica or a rollout, for people and log pipelines alike:

    event=replica_ready deployment=ns.name replica=ns.name-3 version=v1 node=10.0.0.7 port=41234

The controller calls ``lifecycle()`` on transitions only, never once per reconcile tick.
"""
from __future__ import annotations

import json
import logging
from typing import Any

logger = logging.getLogger("rayfleet.controller")

# Events that say something went wrong; the others are INFO.
WARNING_EVENTS = frozenset({"replica_unhealthy", "replica_failed", "replica_replaced", "replica_unschedulable"})


def logfmt(**fields: Any) -> str:
    """``key=value`` pairs in order; a value that is empty or holds spaces, quotes, ``=`` or control
    characters is quoted (JSON string escapes, so the line stays one line). ``None`` fields are left out."""
    return " ".join(f"{key}={_value(value)}" for key, value in fields.items() if value is not None)


def _value(value: Any) -> str:
    text = str(value)
    if text and text.isprintable() and not any(c in text for c in ' ="\\'):
        return text
    return json.dumps(text, ensure_ascii=False)


def lifecycle(event: str, **fields: Any) -> None:
    logger.log(logging.WARNING if event in WARNING_EVENTS else logging.INFO, logfmt(event=event, **fields))
