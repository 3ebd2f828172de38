"""The Alertmanager routing example (deploy/alertmanager/alertmanager.yml), checked with Debian's amtool
(package prometheus-alertmanager, installed by `make prometheus`): a valid configuration, and every alert of
deploy/prometheus/rules.yaml, with the labels it fires with, reaches the receiver its severity calls for."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from deploy_helpers import DEPLOY, alerting_rules, binary

ALERTMANAGER = DEPLOY / "alertmanager" / "alertmanager.yml"


def amtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary("amtool"), *map(str, args)], capture_output=True, text=True, timeout=60, check=False)


def receiver_of(labels: dict[str, str], config: Path = ALERTMANAGER) -> str:
    """The receiver Alertmanager picks for an alert with these labels (`amtool config routes test`)."""
    result = amtool("config", "routes", "test", f"--config.file={config}", *(f"{k}={v}" for k, v in labels.items()))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


def test_amtool_check_config() -> None:
    result = amtool("check-config", ALERTMANAGER)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_amtool_check_config_can_fail(tmp_path: Path) -> None:
    config = yaml.safe_load(ALERTMANAGER.read_text())
    config["route"]["routes"][0]["receiver"] = "nobody"
    broken = tmp_path / "alertmanager.yml"
    broken.write_text(yaml.safe_dump(config))
    result = amtool("check-config", broken)
    assert result.returncode != 0 and "nobody" in result.stdout + result.stderr


def test_every_alert_is_routed_by_severity() -> None:
    expected = {"critical": "oversight-page", "warning": "oversight-ticket", "info": "oversight-ticket"}
    alerts = alerting_rules()
    assert alerts
    for rule in alerts:
        labels = {"alertname": rule["alert"], "stream": "chat", **rule["labels"]}
        want = expected[labels["severity"]]
        if labels["severity"] == "warning" and labels["component"] == "review":
            want = "oversight-review-team"
        assert receiver_of(labels) == want, rule["alert"]


def test_alerts_are_grouped_by_name_and_stream() -> None:
    route = yaml.safe_load(ALERTMANAGER.read_text())["route"]
    assert route["group_by"] == ["alertname", "stream"]
    # Routes set no grouping of their own, so two streams never share a notification.
    assert all("group_by" not in r for r in route["routes"])
