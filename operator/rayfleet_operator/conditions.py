"""metav1.Condition bookkeeping: a transition time moves only when a condition's status changes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

READY, PROGRESSING, DEGRADED = "Ready", "Progressing", "Degraded"


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str


def merge_conditions(old: list[dict[str, Any]] | None, new: list[Condition], generation: int, now: str) -> list[dict[str, Any]]:
    previous = {c["type"]: c for c in old or []}
    merged = []
    for cond in new:
        status = "True" if cond.status else "False"
        before = previous.get(cond.type)
        merged.append({
            "type": cond.type,
            "status": status,
            "observedGeneration": generation,
            "lastTransitionTime": before["lastTransitionTime"] if before and before.get("status") == status else now,
            "reason": cond.reason,
            "message": cond.message[:32768],
        })
    return merged


def find(conditions: list[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)
