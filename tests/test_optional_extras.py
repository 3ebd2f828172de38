"""The default install is licence-clean: alibi-detect (BSL 1.1) and the Kubernetes client are extras.

Without an extra, asking for what needs it is a configuration error that names the extra: at
configuration time, at detector construction, and from the CLI as one line with exit code 2, never
a traceback. "Without" is made real in-process by hiding the package (``sys.modules[name] = None``
makes both ``import`` and ``importlib.util.find_spec`` see no such package), so these tests mean the
same in the default environment and in the ``alibi`` one.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

import detectors
from monitor.config import ConfigError, load_settings

REPO = Path(__file__).resolve().parents[1]
ALIBI_NAMES = ("cvm", "fet", "mmd", "lsdd")


@pytest.fixture
def no_alibi(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "alibi_detect", None)
    monkeypatch.setitem(sys.modules, "alibi_detect.cd", None)


def _project() -> dict[str, object]:
    data: dict[str, object] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return data


def _names(requirements: object) -> set[str]:
    assert isinstance(requirements, list)
    out = set()
    for req in requirements:
        head = str(req).split(";")[0]
        for sep in "<>=!~[ ":
            head = head.split(sep)[0]
        out.add(head.strip().lower().replace("_", "-"))
    return out


def test_default_and_dev_installs_carry_no_alibi_and_no_kubernetes_client() -> None:
    project = _project()
    extras = project["optional-dependencies"]
    assert isinstance(extras, dict)
    assert "alibi-detect" not in _names(project["dependencies"])
    assert "kubernetes" not in _names(project["dependencies"])
    # The test environment (`make test`) is licence-clean too; alibi has its own (`make test-alibi`).
    assert "alibi-detect" not in _names(extras["dev"])
    assert "alibi-detect" in _names(extras["alibi"])
    assert "kubernetes" in _names(extras["k8s"])
    # The PostgreSQL driver is an extra too (the embedded default is SQLite); the tests need it.
    assert "psycopg" not in _names(project["dependencies"])
    assert "psycopg" in _names(extras["postgres"]) and "psycopg" in _names(extras["dev"])


def test_every_alibi_detector_names_its_extra() -> None:
    assert {n for n in detectors.NAMES if detectors.extra_of(n) == "alibi"} == set(ALIBI_NAMES)
    assert detectors.extra_of("kmmd") is None and detectors.extra_of("nope") is None


@pytest.mark.usefixtures("no_alibi")
@pytest.mark.parametrize("name", ALIBI_NAMES)
def test_without_alibi_make_raises_one_sentence_naming_the_extra(name: str) -> None:
    message = detectors.missing_extra(name)
    assert message is not None and "oversight-monitor[alibi]" in message and repr(name) in message
    with pytest.raises(detectors.MissingExtraError, match=r"pip install 'oversight-monitor\[alibi\]'"):
        detectors.make(name, ert=100, x_ref=np.zeros((50, 2)))


@pytest.mark.usefixtures("no_alibi")
def test_without_alibi_the_class_itself_raises_the_same_error() -> None:
    with pytest.raises(detectors.MissingExtraError, match=r"oversight-monitor\[alibi\]"):
        detectors.MMDDetector(ert=100, x_ref=np.zeros((50, 2)))


@pytest.mark.usefixtures("no_alibi")
def test_without_alibi_the_defaults_work_and_the_builtin_detector_runs() -> None:
    settings = load_settings(None, [])
    assert settings.drift.embedding.detectors == ["kmmd"]
    assert detectors.missing_extra("kmmd") is None
    det = detectors.make("kmmd", ert=100, x_ref=np.random.default_rng(0).standard_normal((60, 3)), window_size=5)
    det.update(np.zeros(3))
    assert det.n == 1


@pytest.mark.usefixtures("no_alibi")
@pytest.mark.parametrize(
    "override",
    ['drift.embedding.detectors=["mmd"]', 'drift.signals={"response_log_chars": ["cvm"]}'],
)
def test_without_alibi_a_config_naming_an_alibi_detector_is_rejected_when_read(override: str) -> None:
    with pytest.raises(ConfigError, match=r"oversight-monitor\[alibi\]"):
        load_settings(None, [override])


@pytest.mark.usefixtures("no_alibi")
def test_without_alibi_a_disabled_embedding_channel_may_keep_the_name() -> None:
    load_settings(None, ["drift.embedding.enabled=false", 'drift.embedding.detectors=["mmd"]'])
    load_settings(None, ["drift.enabled=false", 'drift.embedding.detectors=["mmd"]'])


def cli_without(package: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``oversight ARGS`` in a child process where ``package`` cannot be imported."""
    code = f"import sys\nsys.modules[{package!r}] = None\nfrom monitor.cli import main\nsys.exit(main({args!r}))\n"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False, cwd=cwd
    )


def test_the_cli_says_which_extra_without_a_traceback(tmp_path: Path) -> None:
    out = cli_without("alibi_detect", ["config", "show", "--set", 'drift.embedding.detectors=["lsdd"]'], tmp_path)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "pip install 'oversight-monitor[alibi]'" in out.stderr
    assert "drift" in out.stderr


def test_without_the_kubernetes_client_the_job_sink_names_the_k8s_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from monitor.actions.sinks import make_sinks

    monkeypatch.setitem(sys.modules, "kubernetes", None)
    settings = load_settings(None, [f"actions.kubernetes.templates_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"pip install 'oversight-monitor\[k8s\]'"):
        make_sinks(["log", "kubernetes"], settings)


@pytest.mark.parametrize("url", ["postgresql://u@db:5432/o", "postgres://u@db/o", "postgresql+psycopg://u@db/o"])
def test_without_the_postgres_driver_a_postgresql_url_is_rejected_when_read(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    assert load_settings(None, [f"database.url={url}"]).database.url == url  # the dev install has it
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(ConfigError, match=r"pip install 'oversight-monitor\[postgres\]'"):
        load_settings(None, [f"database.url={url}"])
    assert load_settings(None, ["database.url=sqlite:///x.db"]).database.url == "sqlite:///x.db"


def test_the_cli_names_the_postgres_extra_without_a_traceback(tmp_path: Path) -> None:
    out = cli_without("psycopg", ["config", "show", "--db", "postgresql://oversight@db:5432/oversight"], tmp_path)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "pip install 'oversight-monitor[postgres]'" in out.stderr and "database" in out.stderr
