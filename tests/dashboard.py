"""Reading the chart's Grafana dashboard: its PromQL per panel, and the metrics each query names."""
from __future__ import annotations

import json
import re
from pathlib import Path

# Grafana's variables, as a test running the queries outside Grafana substitutes them.
SUBSTITUTIONS = {"$namespace": ".*", "$deployment": ".*", "$__rate_interval": "1m"}

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right",
             "inf", "nan"}


def panels(dashboard: dict) -> list[dict]:
    """Every panel, those inside rows included, rows themselves left out."""
    out = []
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            out += panel.get("panels", [])
        else:
            out.append(panel)
    return out


def dashboard_queries(path: Path) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel of the dashboard JSON at `path`."""
    dashboard = json.loads(Path(path).read_text())
    return [(panel["title"], target["expr"]) for panel in panels(dashboard) for target in panel.get("targets", [])]


def substitute(expr: str) -> str:
    for variable, value in SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric (sample) names a PromQL expression selects: identifiers not called as functions, outside
    label matchers, ranges and grouping clauses."""
    bare = _GROUPING.sub(" ", _STRINGS.sub('""', expr))
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", bare)
    return {name for name in _IDENTIFIER.findall(bare) if name.lower() not in _KEYWORDS}


DASHBOARD = Path(__file__).resolve().parents[1] / "charts" / "rayfleet" / "dashboards" / "rayfleet.json"
# Families only the operator exports: `rayfleet run` has no operator, so panels made of them alone need one.
OPERATOR_PREFIX = "rayfleet_operator_"


def needs_operator(expr: str) -> bool:
    """Whether every metric ``expr`` reads is the operator's."""
    names = metric_names(expr)
    return bool(names) and all(name.startswith(OPERATOR_PREFIX) for name in names)


def operator_panels(path: Path = DASHBOARD) -> set[str]:
    """Titles of the panels whose every query reads only operator families."""
    by_title: dict[str, list[bool]] = {}
    for title, expr in dashboard_queries(path):
        by_title.setdefault(title, []).append(needs_operator(expr))
    return {title for title, flags in by_title.items() if all(flags)}


def empty_panel_queries(query, path: Path = DASHBOARD, only=None) -> list[str]:
    """"title: PromQL" for every query (substituted) that returns no series from ``query`` (a function of a PromQL
    string returning the result list, e.g. ``Prometheus.query``); ``only`` (a set of titles) limits the panels."""
    empty = []
    for title, expr in dashboard_queries(path):
        if only is not None and title not in only:
            continue
        promql = substitute(expr)
        if not query(promql):
            empty.append(f"{title}: {promql}")
    return empty
