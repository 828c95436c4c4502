"""The Grafana dashboard's queries as plain PromQL, and a small Prometheus HTTP API client.

Shared by the file checks (tests/test_observability_files.py) and the live test that runs
Prometheus against a proxy under a flood: both must ask exactly what the panels ask, with the
dashboard's template variables replaced the way Grafana would.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "grafana" / "dashboards" / "synproxy.json"

# Grafana's built-in interval variables, should a panel ever use them: the values a test wants.
BUILTIN_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}

_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)\]\]|\$([A-Za-z_]\w*)")


class PanelQuery(NamedTuple):
    """One target of one panel: which panel asks, and what."""

    panel: str
    ref: str
    expr: str


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows (rows themselves too)."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace $var, ${var}, ${var:format} and [[var]] like Grafana; unknown variables raise."""

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in variables:
            raise KeyError(f"dashboard variable ${name} has no value (in {expr!r})")
        return variables[name]

    return _VARIABLE.sub(one, expr)


def panel_queries(dashboard_path: Path | str = DASHBOARD, instance_regex: str = ".*") -> list[PanelQuery]:
    """Every panel target's expression with `$instance` set to `instance_regex`."""
    dashboard = json.loads(Path(dashboard_path).read_text())
    variables = {**BUILTIN_VARIABLES, "instance": instance_regex}
    out = []
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            expr = target.get("expr", "")
            out.append(PanelQuery(panel.get("title", ""), target.get("refId", ""), substitute(expr, variables)))
    return out


def panel_exprs(dashboard_path: Path | str = DASHBOARD, instance_regex: str = ".*") -> list[str]:
    """The substituted expressions alone, in panel order."""
    return [q.expr for q in panel_queries(dashboard_path, instance_regex)]


# ---------------------------------------------------------------- metric names in an expression

_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
    "group_right", "inf", "nan", "atan2", "start", "end",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (a lexer-level approximation, enough for our
    dashboards and rules: strings, label matchers, ranges and grouping clauses are removed first,
    then every identifier that is not a function call or keyword is a metric name)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for m in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)", text):
        word = m.group(1)
        if word.lower() in _KEYWORDS or re.match(r"\s*\(", text[m.end():]):
            continue
        names.add(word)
    return names


# ---------------------------------------------------------------- Prometheus HTTP API


class PrometheusError(RuntimeError):
    """The API answered with an error (a PromQL syntax error, for instance)."""


def instant_query(base_url: str, expr: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Evaluate `expr` now via /api/v1/query; the result vector (or a one-element list for a scalar)."""
    url = f"{base_url.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as err:
        body = json.load(err)
    if body.get("status") != "success":
        raise PrometheusError(f"{expr!r}: {body.get('errorType')}: {body.get('error')}")
    data = body["data"]
    if data["resultType"] == "scalar":
        return [{"metric": {}, "value": data["result"]}]
    return list(data["result"])
