"""Prometheus rules (deploy/prometheus/rules.yaml): valid, unit-tested with promtool, and built only on metrics
the service really exposes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from deploy_helpers import (
    DEPLOY,
    PROMETHEUS_BUILTINS,
    RULE_TESTS,
    RULES,
    alerting_rules,
    metric_names,
    promtool,
    recording_rules,
    service_metric_names,
)

# What the brief asks the rules to watch, by alert name.
REQUIRED_ALERTS = {
    "OversightDriftDetected",
    "OversightCoverageBelowFloor",
    "OversightReviewBacklog",
    "OversightReviewOldestItem",
    "OversightRewardModelAgreementLow",
    "OversightRewardModelAgreementDrop",
    "OversightRewardHackingSuspected",
    "OversightConsumerLagHigh",
    "OversightDeadLetterRate",
    "OversightCheckpointStale",
    "OversightMonitorDown",
    "OversightMonitorAbsent",
}


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    n = len(recording_rules()) + len(alerting_rules())
    assert f"SUCCESS: {n} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    assert RULE_TESTS, "no rule unit tests in deploy/prometheus/tests"
    result = promtool("test", "rules", *RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS), result.stdout


def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    """The unit tests check the thresholds: the same tests against rules with one threshold moved fail."""
    broken = RULES.read_text().replace("oversight:coverage_ratio < 0.999", "oversight:coverage_ratio < 0.4")
    assert broken != RULES.read_text()
    (tmp_path / "rules.yaml").write_text(broken)
    test = yaml.safe_load((DEPLOY / "prometheus" / "tests" / "sampling.yaml").read_text())
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "sampling.yaml").write_text(yaml.safe_dump(test))
    result = promtool("test", "rules", tmp_path / "tests" / "sampling.yaml")
    assert result.returncode != 0
    assert "OversightCoverageBelowFloor" in result.stdout + result.stderr


def _alert_cases() -> dict[str, dict[str, int]]:
    cases: dict[str, dict[str, int]] = {}
    for path in RULE_TESTS:
        doc = yaml.safe_load(path.read_text())
        assert doc["rule_files"] == ["../rules.yaml"], f"{path.name} must test deploy/prometheus/rules.yaml"
        for test in doc["tests"]:
            for case in test.get("alert_rule_test", []):
                kind = "firing" if case.get("exp_alerts") else "quiet"
                counts = cases.setdefault(case["alertname"], {"firing": 0, "quiet": 0})
                counts[kind] += 1
    return cases


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    alerts = {r["alert"] for r in alerting_rules()}
    assert alerts >= REQUIRED_ALERTS, f"missing alerts: {sorted(REQUIRED_ALERTS - alerts)}"
    cases = _alert_cases()
    assert set(cases) <= alerts, f"tests name alerts that do not exist: {sorted(set(cases) - alerts)}"
    lacking = {a: cases.get(a, {}) for a in alerts if not (cases.get(a, {}).get("firing") and cases[a].get("quiet"))}
    assert not lacking, f"alerts without both a firing and a not-firing unit test: {lacking}"


RUNBOOK = DEPLOY / "prometheus" / "RUNBOOK.md"


def _runbook_sections() -> dict[str, str]:
    """GitHub anchor of each `## ` section of the runbook -> its text."""
    sections: dict[str, str] = {}
    for chunk in RUNBOOK.read_text().split("\n## ")[1:]:
        title, _, body = chunk.partition("\n")
        sections[re.sub(r"[^a-z0-9 -]", "", title.strip().lower()).replace(" ", "-")] = body
    return sections


def test_every_alert_is_labelled_and_explained() -> None:
    sections = _runbook_sections()
    for rule in alerting_rules():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["labels"].get("component"), rule["alert"]
        annotations = rule["annotations"]
        assert annotations.get("summary") and annotations.get("description"), rule["alert"]
        # The runbook link: the repository path of the runbook and the alert's own section there (the chart
        # rewrites the path to metrics.prometheusRule.runbookBaseUrl).
        assert annotations.get("runbook_url") == f"deploy/prometheus/RUNBOOK.md#{rule['alert'].lower()}", rule["alert"]
        section = sections.get(rule["alert"].lower(), "")
        assert "**Means.**" in section and "**Fix.**" in section, f"RUNBOOK.md has no full section for {rule['alert']}"


def test_the_runbook_has_no_section_for_an_alert_that_does_not_exist() -> None:
    alerts = {r["alert"].lower() for r in alerting_rules()}
    assert set(_runbook_sections()) == alerts


def test_rules_use_only_metrics_the_service_exposes(tmp_path: Path) -> None:
    exposed = service_metric_names(tmp_path)
    recorded = {r["record"] for r in recording_rules()}
    used: dict[str, set[str]] = {}
    for rule in recording_rules() + alerting_rules():
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(rule.get("record") or rule["alert"])
    unknown = {n: sorted(by) for n, by in used.items() if n not in exposed | recorded | PROMETHEUS_BUILTINS}
    assert not unknown, f"rules use metrics nobody exposes: {unknown}"
    # The lexer found the families the brief names (a lexer that found nothing would pass the check above).
    for name in (
        "oversight_drift_events_total",
        "oversight_review_queue_oldest_seconds",
        "oversight_rm_score_positive_total",
        "oversight_rm_score_negative_total",
    ):
        assert name in used


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (stream, le) (rate(oversight_rm_score_bucket{stream=~"a|b"}[5m]))', {"oversight_rm_score_bucket"}),
        ("x > 0 and on (job, instance) sum by (job, instance) (y) > 0", {"x", "y"}),
        ("max(a) by (le) / ignoring (le) group_left (stream) b offset 1h", {"a", "b"}),
        ('absent(up{job="oversight-pipeline"}) or vector(0) * 3600', {"up"}),
    ],
)
def test_metric_name_lexer(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


AGGREGATION = re.compile(r"\b(sum|max|min|avg|count|topk|bottomk|quantile|stddev)\s*(?:by\s*\(([^)]*)\)\s*)?\(")
MATCHING = re.compile(r"\b(on|ignoring)\s*\(([^)]*)\)")


def test_every_aggregation_keeps_the_namespace() -> None:
    """Two releases in one Prometheus (one namespace each): a rule that aggregates across namespaces lets one
    release's traffic dilute or hide the other's alert, and its alert cannot say which release it is about."""
    for rule in recording_rules() + alerting_rules():
        expr = rule["expr"]
        for match in AGGREGATION.finditer(expr):
            grouping = match.group(2)
            assert grouping is not None and "namespace" in grouping, (rule.get("alert") or rule["record"], match[0])
        for match in MATCHING.finditer(expr):
            assert "namespace" in match.group(2), (rule.get("alert") or rule["record"], match[0])
