"""Grafana dashboard (deploy/grafana/dashboards/oversight.json): valid PromQL everywhere, only metrics the
service exposes (no recording rule: the dashboard must work on a Prometheus that has not loaded
deploy/prometheus/rules.yaml, e.g. the chart's default without a PrometheusRule), and a panel for each thing an
operator must see."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from deploy_helpers import (
    DEPLOY,
    PROMETHEUS_BUILTINS,
    dashboard,
    dashboard_exprs,
    metric_names,
    promtool,
    recording_rules,
    service_metric_names,
    substitute,
)


def _panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            out.append(p)
            walk(p.get("panels", []))

    walk(dash["panels"])
    return out


def test_dashboard_structure() -> None:
    dash = dashboard()
    assert dash["uid"] == "oversight-monitor" and dash["title"]
    panels = _panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["stream"]["includeAll"] and variables["stream"]["allValue"] == ".*"
    for p in panels:
        if p["type"] == "row":
            continue
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        # One datasource variable, so the same JSON works in compose and with the Grafana sidecar.
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]


def test_every_expression_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each expression as a recording rule of a throwaway rules file."""
    exprs = dashboard_exprs()
    assert len(exprs) > 30
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:expr_{i}", "expr": substitute(e)}
                                                        for i, e in enumerate(exprs)]}]}  # fmt: skip
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_promtool_check_catches_a_bad_expression(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "r", "expr": "sum(rate(x[5m])"}]}]}))
    assert promtool("check", "rules", path).returncode != 0


def test_every_metric_exists_without_the_recording_rules(tmp_path: Path) -> None:
    exposed = service_metric_names(tmp_path)
    recorded = {r["record"] for r in recording_rules()}
    used = {name for e in dashboard_exprs() for name in metric_names(e)}
    assert not used & recorded, (
        f"the dashboard reads recording rules, which may not be loaded: {sorted(used & recorded)}"
    )
    assert not {n for n in used if ":" in n}, "a name with ':' is a recording rule by convention"
    unknown = used - exposed - PROMETHEUS_BUILTINS
    assert not unknown, f"the dashboard uses metrics that the service does not expose: {sorted(unknown)}"
    assert len(used) > 30


def test_dashboard_covers_what_operators_watch() -> None:
    panels = [p for p in _panels(dashboard()) if p["type"] != "row"]

    def panel_using(*names: str) -> dict[str, Any]:
        for p in panels:
            used = {n for t in p["targets"] for n in metric_names(t["expr"])}
            if set(names) <= used:
                return p
        raise AssertionError(f"no panel shows {names} together")

    panel_using("oversight_episodes_total")
    panel_using("oversight_processing_latency_seconds_bucket")
    panel_using("oversight_consumer_lag")
    panel_using("oversight_inclusion_probability_min", "oversight_sampling_floor")
    panel_using("oversight_sampled_total")
    panel_using("oversight_sampling_boost_factor")
    panel_using("oversight_review_queue_waiting", "oversight_review_queue_leased")
    panel_using("oversight_review_queue_oldest_seconds")
    panel_using("oversight_drift_statistic", "oversight_drift_threshold")
    panel_using("oversight_rm_score_bucket")
    panel_using("oversight_rm_human_agreement")
    panel_using("oversight_reward_hacking_suspected")
    panel_using("oversight_dead_letters_total")
    # Quality with its confidence band: the band is filled from ci_low up to ci_high.
    (quality,) = [
        p for p in panels if all(metric_names(t["expr"]) == {"oversight_quality_estimate"} for t in p["targets"])
    ]
    bounds = {t["legendFormat"] for t in quality["targets"]}
    assert bounds == {"estimate", "ci_low", "ci_high"}
    fills = [
        prop
        for o in quality["fieldConfig"]["overrides"]
        if o["matcher"]["options"] == "ci_low"
        for prop in o["properties"]
        if prop["id"] == "custom.fillBelowTo"
    ]
    assert fills and fills[0]["value"] == "ci_high"


def test_provisioning_points_at_the_dashboards_folder() -> None:
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "oversight.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert datasource["datasources"][0]["type"] == "prometheus"
