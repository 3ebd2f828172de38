"""The version has one source, ``monitor.__version__``: the package metadata is built from it, and the
CLI, the ``oversight_build_info`` metric and the CHANGELOG all say the same number."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from prometheus_client import CollectorRegistry

import monitor
from monitor.config import load_settings
from monitor.service import build_service

REPO = Path(__file__).resolve().parent.parent


def test_pyproject_reads_the_version_from_the_package() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in pyproject["project"], "a second copy of the version in pyproject.toml"
    assert "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "monitor.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+(?:[.-]?(?:a|b|rc|dev|post)\d*)?", monitor.__version__)


def test_installed_metadata_and_cli_report_the_version() -> None:
    # `make test` reinstalls when monitor/__init__.py changes, so the metadata follows a bump.
    assert importlib.metadata.version("oversight-monitor") == monitor.__version__
    out = subprocess.run(
        [sys.executable, "-m", "monitor.cli", "--version"], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == monitor.__version__


def test_build_info_metric_reports_the_version(tmp_path: Path) -> None:
    source = tmp_path / "episodes.jsonl"
    source.write_text("")
    settings = load_settings(
        None,
        [
            "dev=true",
            "source.kind=file",
            f"source.path={source}",
            f"database.url=sqlite:///{tmp_path / 'oversight.db'}",
            f"dead_letter.path={tmp_path / 'dlq.jsonl'}",
            "drift.enabled=false",
        ],
    )
    registry = CollectorRegistry()
    with build_service(settings, serve=False, registry=registry):
        value = registry.get_sample_value("oversight_build_info", {"version": monitor.__version__, "source": "file"})
    assert value == 1.0


def test_changelog_has_a_section_for_the_version() -> None:
    changelog = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "## [Unreleased]" in changelog
    assert re.search(rf"^## \[{re.escape(monitor.__version__)}\]", changelog, re.MULTILINE), monitor.__version__
