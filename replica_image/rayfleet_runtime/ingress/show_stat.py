"""HAProxy's ``show stat`` (the runtime API's CSV) read per deployment, for the ingress's ``stats()``: the
controller's autoscaler and route publisher read a deployment's queue from it, whichever of its backends
(the stable revision's, its canary's) the requests wait in."""
from __future__ import annotations

import csv
import io
from typing import Any


def parse_show_stat(text: str) -> list[dict[str, str]]:
    """Parse ``show stat`` CSV output into one dict per row."""
    text = text.lstrip()
    if text.startswith("# "):
        text = text[2:]
    rows = list(csv.DictReader(io.StringIO(text)))
    return [{k: v for k, v in row.items() if k} for row in rows if row.get("pxname")]


def _int(v: str | None) -> int:
    try:
        return int(v) if v not in (None, "") else 0
    except ValueError:
        return 0


# What a deployment's row adds up from both its backends when it has a canary: the autoscaler reads its
# queue as one load, whichever revision the requests wait for. Peaks (smax, qmax) don't add: they stay each
# backend's own.
_ADDITIVE = ("sessions", "limit", "total", "queue", "responses_5xx", "connect_errors", "retries", "redispatches")


def _stat_entry(row: dict[str, str]) -> dict[str, Any]:
    return {
        "status": row.get("status", ""),
        "sessions": _int(row.get("scur")),
        "max_sessions": _int(row.get("smax")),
        "limit": _int(row.get("slim")),
        "total": _int(row.get("stot")),
        "queue": _int(row.get("qcur")),
        "max_queue": _int(row.get("qmax")),
        "responses_5xx": _int(row.get("hrsp_5xx")),
        "connect_errors": _int(row.get("econ")),
        "retries": _int(row.get("wretr")),
        "redispatches": _int(row.get("wredis")),
        "check_status": row.get("check_status", ""),
    }


def stats_by_deployment(rows: list[dict[str, str]], names: dict[str, Any]) -> tuple[dict, dict, dict]:
    """``show stat`` rows -> (deployments, frontends, rows of backends no deployment has), by
    ``RoutingTable.names()``. A deployment's entry is its stable backend's row, with ``servers`` by replica id
    (the canary's replicas too); with a canary, its backend's own row is under ``canary`` and the
    deployment's counts (``_ADDITIVE``) are both backends' sums."""
    deployments: dict[str, Any] = {}
    frontends: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    for row in rows:
        px, sv = row["pxname"], row["svname"]
        entry = _stat_entry(row)
        info = names.get(px)
        if sv == "FRONTEND":
            frontends[px] = entry
        elif px in names and info is None:  # a canary backend with no canary
            continue
        elif info is None:
            raw.setdefault(px, {})[sv] = entry
        else:
            dep = deployments.setdefault(info["deployment"], {"servers": {}})
            if sv == "BACKEND" and info.get("revision") == "canary":
                dep["canary"] = {"backend": px, **entry}
            elif sv == "BACKEND":
                dep.update(entry, backend=px)
            elif sv in info["servers"]:  # the table's replicas, not one still leaving (server_updates)
                dep["servers"][info["servers"][sv]] = entry
    for dep in deployments.values():
        if "canary" in dep:
            dep.update({key: dep.get(key, 0) + dep["canary"][key] for key in _ADDITIVE})
    return deployments, frontends, raw
