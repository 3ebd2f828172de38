"""Helpers for the deployment tests: paths, promtool, PromQL metric names, the service's metric registry.

Imported by module name (pytest puts this directory on sys.path; there is no ``__init__.py`` in tests/ subdirs).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yaml"
RULE_TESTS = sorted((DEPLOY / "prometheus" / "tests").glob("*.yaml"))
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "oversight.json"
DOCKERFILE = DEPLOY / "Dockerfile"
CHART = REPO / "helm" / "oversight"

# Grafana template variables, replaced by values Prometheus accepts (what Grafana would send).
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "$stream": ".*"}


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        # Fail, not skip: `make test` installs Debian's prometheus package (`make prometheus`).
        pytest.fail(f"{name} is not installed: run `make prometheus` (Debian package prometheus)")
    return path


def promtool(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary("promtool"), *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["groups"]
    return groups


def recording_rules() -> list[dict[str, Any]]:
    return [r for g in rule_groups() for r in g["rules"] if "record" in r]


def alerting_rules() -> list[dict[str, Any]]:
    return [r for g in rule_groups() for r in g["rules"] if "alert" in r]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_exprs(dash: dict[str, Any] | None = None) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets, annotations, template variable queries."""
    dash = dash if dash is not None else dashboard()
    exprs: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))

    walk(dash["panels"])
    exprs.extend(a["expr"] for a in dash.get("annotations", {}).get("list", []) if a.get("expr"))
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        if var.get("type") == "query" and isinstance(query, dict):
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", query["query"])
            assert m, f"template variable {var['name']}: unsupported query {query['query']!r}"
            exprs.append(m.group(1))
    return exprs


def substitute(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable left in {expr!r}"
    return expr


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def healthcheck_command() -> list[str]:
    """The exec-form CMD of the image's HEALTHCHECK."""
    health = dict(dockerfile_instructions())["HEALTHCHECK"]
    command: list[str] = json.loads(health[health.index("CMD") + 3 :].strip())
    return command


# --- PromQL: metric names and selectors --------------------------------------------------------------------
#
# A small lexer, enough for the expressions of this repository: strings, label matchers, ranges and
# numbers are single tokens; an identifier is a metric name unless it is a keyword, a function or
# aggregation (followed by "(" or "by"/"without"), or a label name inside by/on/ignoring/... lists.

_TOKEN = re.compile(
    r"""(?P<str>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)"""
    r"""|(?P<matcher>\{[^}]*\})|(?P<range>\[[^\]]*\])|(?P<num>\d[\w.]*)"""
    r"""|(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)|(?P<other>\S)"""
)
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right"}
_AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile",
}  # fmt: skip
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}


@dataclass(frozen=True)
class Selector:
    name: str
    matchers: str  # "" or "{...}" as written

    def __str__(self) -> str:
        return self.name + self.matchers


def selectors(expr: str) -> list[Selector]:
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr)]
    out: list[Selector] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else (None, "")
        if kind == "ident" and text in _LABEL_LISTS and nxt[1] == "(":
            i += 2
            while i < len(tokens) and tokens[i][1] != ")":
                i += 1
        elif kind == "ident" and text not in _KEYWORDS and text not in _AGGREGATIONS and nxt[1] != "(":
            out.append(Selector(text, nxt[1] if nxt[0] == "matcher" else ""))
        i += 1
    return out


def metric_names(expr: str) -> set[str]:
    return {s.name for s in selectors(expr)}


# Series Prometheus makes itself.
PROMETHEUS_BUILTINS = {"up", "ALERTS", "ALERTS_FOR_STATE"}


def service_metric_names(tmp_path: Path) -> set[str]:
    """Every sample name the pipeline and the review service can expose, from their real registries."""
    from monitor.metrics import Metrics
    from monitor.review.metrics import ReviewMetrics
    from monitor.store import Store

    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"),
        "info": ("_info",),
        "gauge": ("",),
    }
    store = Store(f"sqlite:///{tmp_path / 'metrics.db'}")
    try:
        names: set[str] = set()
        for registry in (Metrics().registry, ReviewMetrics(store).registry):
            for family in registry.collect():
                names.update(family.name + s for s in suffixes[family.type])
        return names
    finally:
        store.close()
