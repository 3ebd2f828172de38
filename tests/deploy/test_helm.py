"""The Helm chart (helm/oversight), rendered with the real Helm engine (helm-python-sdk) for the default values
and every ci/*-values.yaml scenario, linted, and every manifest validated: built-in kinds against the
Kubernetes OpenAPI schemas (kubernetes-validate, strict), the CRD kinds (ServiceMonitor, PrometheusRule,
ScaledObject) against hand-written subsets of their CRD schemas below. The configuration, environment and
commands the pods get are loaded through the service's own Settings and CLI parser.

Scenarios render as on a cluster that has the optional CRDs' APIs (prometheus-operator, KEDA), the way
`helm install` sees them there; the tests of the Capabilities guards render without them too."""

from __future__ import annotations

import base64
import functools
import json
import posixpath
import re
import subprocess
import sys
import typing
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from chart_schema import VALUES_SCHEMA, generated_values_schema, reserved_config_keys
from deploy_helpers import CHART, DASHBOARD, RULES, promtool, rule_groups
from helm_python import _native as helm_native
from pydantic import BaseModel, SecretStr

from monitor.cli import build_parser
from monitor.config import Settings, load_settings

CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
SCENARIOS = ["default", *(p.name.removesuffix("-values.yaml") for p in CI_VALUES)]
RELEASE, NAMESPACE = "oversight", "oversight-ns"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest the schemas know.
K8S_VERSIONS = ["1.25.0", kubernetes_validate.latest_version()]
DRAIN_S = 10  # the service exits within 10 s of SIGTERM (README: delivery guarantees)


def scenario_values(name: str) -> dict[str, Any] | None:
    if name == "default":
        return None
    data: dict[str, Any] = yaml.safe_load((CHART / "ci" / f"{name}-values.yaml").read_text())
    return data


# The optional CRDs' APIs, as `helm install` finds them on a cluster with prometheus-operator and KEDA.
CRD_APIS = (
    "monitoring.coreos.com/v1/ServiceMonitor",
    "monitoring.coreos.com/v1/PrometheusRule",
    "keda.sh/v1alpha1/ScaledObject",
)


def render(values: dict[str, Any] | None, api_versions: tuple[str, ...] = CRD_APIS) -> dict[str, str]:
    """`helm template` of the chart; api_versions as `--api-versions` gives them (() : a cluster without the CRDs)."""
    with helm.Chart.load(CHART) as chart:
        if not api_versions:
            return chart.render(values, name=RELEASE, namespace=NAMESPACE)
        # Chart.render of helm-python-sdk does not pass API versions on, though the engine under it takes them
        # (its render options are those of `helm template`): the same native call with that option added.
        options = {"name": RELEASE, "namespace": NAMESPACE, "api_versions": list(api_versions)}
        raw = None if values is None else json.dumps(values)
        rendered: dict[str, str] = json.loads(
            helm_native.call_string("helm_render", chart._raw(), raw, json.dumps(options))
        )
        return rendered


def render_docs(values: dict[str, Any] | None, api_versions: tuple[str, ...] = CRD_APIS) -> list[dict[str, Any]]:
    return [
        doc
        for path, text in render(values, api_versions).items()
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def notes(values: dict[str, Any] | None, api_versions: tuple[str, ...] = CRD_APIS) -> str:
    return next(text for path, text in render(values, api_versions).items() if path.endswith("NOTES.txt"))


@functools.cache
def _rendered(name: str) -> tuple[dict[str, Any], ...]:
    return tuple(render_docs(scenario_values(name)))


def manifests(name: str) -> list[dict[str, Any]]:
    # A fresh copy per test: tests may walk and never share mutations.
    copied: list[dict[str, Any]] = json.loads(json.dumps(list(_rendered(name))))
    return copied


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def job_templates(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Job manifests the service instantiates, from the jobs ConfigMap."""
    out: list[dict[str, Any]] = []
    for cm in by_kind(docs, "ConfigMap"):
        if cm["metadata"]["name"].endswith("-jobs"):
            out.extend(yaml.safe_load(text) for text in cm["data"].values())
    return out


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) of every pod the release runs: Deployments, Job templates, the `helm test` Pod."""
    for d in by_kind(docs, "Deployment") + job_templates(docs):
        yield f"{d['kind']}/{d['metadata'].get('name') or d['metadata']['generateName']}", d["spec"]["template"]
    for pod in by_kind(docs, "Pod"):
        yield f"Pod/{pod['metadata']['name']}", {"metadata": pod["metadata"], "spec": pod["spec"]}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- rendering, lint, schema ------------------------------------------------------------------------------


def test_scenarios_exist() -> None:
    names = set(SCENARIOS)
    assert {
        "minimal-sqlite",
        "postgres-kafka-ha",
        "ingress-tls",
        "existing-secret",
        "keda",
        "inference-worker",
    } <= names


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_is_clean(scenario: str) -> None:
    report = helm.lint(CHART, scenario_values(scenario), strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2 or m["error"] != "icon is recommended"]
    assert problems == [], problems


def test_values_schema_rejects_typos_and_wrong_types() -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(None)
        for path in CI_VALUES:
            chart.validate_schema(yaml.safe_load(path.read_text()))
        bad: dict[str, Any]
        for bad in (
            {"pipline": {"replicas": 1}},
            {"pipeline": {"replicas": "3"}},
            {"review": {"ingress": {"enabeld": True}}},
            {"database": {"url": "mysql://x"}},
            {"secrets": {"reviewSecretKey": "short"}},
            {"inferenceWorker": {"gpus": 1}},
            {"inferenceWorker": {"gpu": -1}},
            {"inferenceWorker": {"gpu": "1"}},
            {"inferenceWorker": {"resources": {"limit": {"memory": "2Gi"}}}},
            {"modelsVolume": {"storageClass": "nfs"}},
            {"modelsVolume": {"accessModes": ["ReadWriteOnce"]}},
            {"modelsVolume": {"accessModes": []}},
            {"modelsVolume": {"size": "lots"}},
            {"modelsVolume": {"enabled": "true"}},
        ):
            with pytest.raises(helm.HelmValuesError):
                chart.validate_schema(bad)


def test_every_values_key_has_a_comment() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    key = re.compile(r"^(\s*)([A-Za-z_][\w.-]*):")
    missing = []
    for i, line in enumerate(lines):
        m = key.match(line)
        if not m or "#" in line.split(":", 1)[1]:
            continue
        prev = next((p for p in reversed(lines[:i]) if p.strip()), "")
        if not prev.strip().startswith("#"):
            missing.append(f"line {i + 1}: {line.strip()}")
    assert missing == [], "values.yaml keys without a comment above them:\n" + "\n".join(missing)


# --- validation of every manifest -----------------------------------------------------------------------

_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d|w|y))+$"}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_META = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _LABELS},
}
# Hand-written subsets of the CRD schemas (prometheus-operator v0.7x, KEDA v2): every field the chart uses,
# with the CRDs' types and enums; unknown fields are refused, as the API server's structural schema would.
CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": _META,
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "additionalProperties": False,
                "properties": {
                    "selector": {
                        "type": "object",
                        "required": ["matchLabels"],
                        "properties": {"matchLabels": _LABELS},
                        "additionalProperties": False,
                    },
                    "namespaceSelector": {
                        "type": "object",
                        "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}},
                        "additionalProperties": False,
                    },
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["port"],
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string", "pattern": "^/"},
                                "interval": _DURATION,
                                "scrapeTimeout": _DURATION,
                                "relabelings": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "properties": {
                                            "action": {"enum": ["replace", "keep", "drop", "labelmap", "labeldrop"]},
                                            "sourceLabels": {"type": "array", "items": {"type": "string"}},
                                            "targetLabel": {"type": "string"},
                                            "replacement": {"type": "string"},
                                            "regex": {"type": "string"},
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": _META,
            "spec": {
                "type": "object",
                "required": ["groups"],
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string", "minLength": 1},
                                "interval": _DURATION,
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["expr"],
                                        "additionalProperties": False,
                                        "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
                                        "properties": {
                                            "record": {"type": "string"},
                                            "alert": {"type": "string"},
                                            "expr": {"type": "string", "minLength": 1},
                                            "for": _DURATION,
                                            "labels": _LABELS,
                                            "annotations": _LABELS,
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            },
        },
    },
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": _META,
            "spec": {
                "type": "object",
                "required": ["scaleTargetRef", "triggers"],
                "additionalProperties": False,
                "properties": {
                    "scaleTargetRef": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {
                            "apiVersion": {"type": "string"},
                            "kind": {"type": "string"},
                            "name": {"type": "string"},
                        },
                    },
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer", "minimum": 0},
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["type", "metadata"],
                            "additionalProperties": False,
                            "properties": {
                                "type": {"type": "string"},
                                # KEDA trigger metadata is map[string]string: a number here is refused.
                                "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                                "authenticationRef": {
                                    "type": "object",
                                    "required": ["name"],
                                    "properties": {"name": {"type": "string"}},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def validate(doc: dict[str, Any], version: str) -> None:
    schema = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if schema is not None:
        jsonschema.validate(doc, schema)
    else:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_manifest_validates(scenario: str) -> None:
    docs = manifests(scenario) + job_templates(manifests(scenario))
    assert len(docs) >= 8
    for version in K8S_VERSIONS:
        for doc in docs:
            validate(doc, version)


def test_validation_can_fail() -> None:
    """Both validators refuse what the API server would refuse."""
    docs = manifests("postgres-kafka-ha")
    deployment = one(docs, "Deployment", "-pipeline")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pathh"] = "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment, K8S_VERSIONS[-1])
    monitor = one(docs, "ServiceMonitor", "-pipeline")
    monitor["spec"]["endpoints"][0]["interval"] = 30
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor, K8S_VERSIONS[-1])
    keda = one(manifests("keda"), "ScaledObject")
    keda["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 2000
    with pytest.raises(jsonschema.ValidationError):
        validate(keda, K8S_VERSIONS[-1])


# --- security, probes, shutdown --------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_restricted_pod_security(scenario: str) -> None:
    specs = list(pod_specs(manifests(scenario)))
    assert specs
    for where, template in specs:
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), where
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert not any("hostPath" in v for v in volumes.values()), where
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["runAsNonRoot"] is True and sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert "emptyDir" in volumes[mounts["/tmp"]], f"{where}: /tmp must be an emptyDir"
            if c["image"].startswith("oversight-monitor"):
                assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"], where
                assert c["resources"]["limits"]["memory"], where
            if c["image"].startswith("oversight-monitor") and "command" not in c:
                # The service itself (the image's entrypoint) writes its database and dead letters under /data.
                assert "/data" in mounts, where
                data = volumes[mounts["/data"]]
                assert "emptyDir" in data or "persistentVolumeClaim" in data, where


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_probes_and_graceful_shutdown(scenario: str) -> None:
    deployments = by_kind(manifests(scenario), "Deployment")
    assert deployments
    for d in deployments:
        spec = d["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz", d["metadata"]["name"]
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", d["metadata"]["name"]
        assert c["startupProbe"]["httpGet"]["path"] == "/healthz", d["metadata"]["name"]
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            assert c[probe]["httpGet"]["port"] in ports
        # Readiness (broker or database down) never restarts the pod.
        assert all(c[p]["httpGet"]["path"] != "/readyz" for p in ("livenessProbe", "startupProbe"))
        if c["name"] == "inference-worker":
            # No Service sends it work and no broker assigns it partitions: SIGTERM at once, no preStop sleep.
            assert "lifecycle" not in c
            assert spec["terminationGracePeriodSeconds"] >= DRAIN_S
            continue
        sleep = c["lifecycle"]["preStop"]["exec"]["command"]
        assert sleep[0] == "sleep" and int(sleep[1]) > 0
        assert spec["terminationGracePeriodSeconds"] >= int(sleep[1]) + DRAIN_S


def test_grace_period_too_short_for_the_drain_is_rejected() -> None:
    with pytest.raises(helm.HelmRenderError, match="terminationGracePeriodSeconds"):
        render({"pipeline": {"preStopSleepSeconds": 10, "terminationGracePeriodSeconds": 15}})


# --- selectors and references ----------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_selectors_match_pod_labels(scenario: str) -> None:
    docs = manifests(scenario)
    pods = {d["metadata"]["name"]: d["spec"]["template"] for d in by_kind(docs, "Deployment")}
    for name, template in pods.items():
        d = one(docs, "Deployment", name)
        assert matches(d["spec"]["selector"]["matchLabels"], template["metadata"]["labels"]), name
    # Deployments do not select each other's pods.
    for a in pods:
        for b in pods:
            if a != b:
                assert not matches(
                    one(docs, "Deployment", a)["spec"]["selector"]["matchLabels"], pods[b]["metadata"]["labels"]
                )

    def pods_of(selector: dict[str, str]) -> list[dict[str, Any]]:
        return [t for t in pods.values() if matches(selector, t["metadata"]["labels"])]

    services = {}
    for svc in by_kind(docs, "Service"):
        selected = pods_of(svc["spec"]["selector"])
        assert selected, f"Service {svc['metadata']['name']} selects no pods"
        for port in svc["spec"]["ports"]:
            for t in selected:
                names = {p["name"] for c in t["spec"]["containers"] for p in c["ports"]}
                assert port["targetPort"] in names, f"{svc['metadata']['name']}: no container port {port['targetPort']}"
        services[svc["metadata"]["name"]] = svc
    for kind in ("PodDisruptionBudget",):
        for pdb in by_kind(docs, kind):
            assert pods_of(pdb["spec"]["selector"]["matchLabels"]), pdb["metadata"]["name"]
    for np in by_kind(docs, "NetworkPolicy"):
        selected = pods_of(np["spec"]["podSelector"]["matchLabels"])
        assert selected, np["metadata"]["name"]
        names = {p["name"] for t in selected for c in t["spec"]["containers"] for p in c["ports"]}
        for rule in np["spec"]["ingress"]:
            assert all(p["port"] in names for p in rule["ports"]), np["metadata"]["name"]
    for sm in by_kind(docs, "ServiceMonitor"):
        targets = [
            s for s in services.values() if matches(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        assert len(targets) == 1, sm["metadata"]["name"]
        assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in targets[0]["spec"]["ports"]}
        assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    for scaler in by_kind(docs, "HorizontalPodAutoscaler") + by_kind(docs, "ScaledObject"):
        assert scaler["spec"]["scaleTargetRef"]["name"] in pods
    for ing in by_kind(docs, "Ingress"):
        for rule in ing["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["port"]["name"] in {p["name"] for p in services[backend["name"]]["spec"]["ports"]}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_secret_and_config_references_resolve(scenario: str) -> None:
    docs = manifests(scenario)
    values = scenario_values(scenario) or {}
    existing = values.get("secrets", {}).get("existingSecret")
    secrets = {s["metadata"]["name"]: s for s in by_kind(docs, "Secret")}
    configmaps = {c["metadata"]["name"] for c in by_kind(docs, "ConfigMap")}
    assert bool(existing) != bool(secrets), "the chart's Secret exactly when no existingSecret is given"
    for where, template in pod_specs(docs):
        for v in template["spec"]["volumes"]:
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps, where
            if "secret" in v:
                assert v["secret"]["secretName"] in (existing or secrets), where
        for c in template["spec"]["containers"]:
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if not ref:
                    continue
                if existing:
                    assert ref["name"] == existing, where
                elif not ref.get("optional"):
                    assert ref["key"] in secrets[ref["name"]]["data"], f"{where}: {ref['key']} not in the Secret"


# --- what the pods run: config, environment, commands ---------------------------------------------------


def _pod_settings(
    docs: list[dict[str, Any]], template: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp: Path
) -> Settings:
    """Settings exactly as the container would load them: its args, its config file, its environment."""
    (c,) = template["spec"]["containers"]
    secrets = {s["metadata"]["name"]: s["data"] for s in by_kind(docs, "Secret")}
    for env in c.get("env", []):
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref is None:
            monkeypatch.setenv(env["name"], env["value"])
        elif ref["name"] in secrets and ref["key"] in secrets[ref["name"]]:
            monkeypatch.setenv(env["name"], base64.b64decode(secrets[ref["name"]][ref["key"]]).decode())
        elif not ref.get("optional"):
            # A Secret managed outside the chart (existingSecret): a stand-in value of the right shape (a key with
            # real entropy, as the service demands of sampling.key and review.secret_key).
            stand_in = {"OVERSIGHT_DATABASE__URL": "postgresql://u:p@db:5432/o"}.get(
                env["name"], "Zq7vK2mX9pLw4RtB8nYc"
            )
            monkeypatch.setenv(env["name"], stand_in)
    args = build_parser().parse_args(c["args"])
    assert args.config == "/etc/oversight/config.yaml"
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/oversight")
    volume = next(v for v in template["spec"]["volumes"] if v["name"] == mount["name"])
    cm = one(docs, "ConfigMap", volume["configMap"]["name"])
    path = tmp / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    return load_settings(path, args.overrides)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pods_load_their_configuration_through_settings(
    scenario: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every OVERSIGHT_* variable and config key must be a real setting (Settings rejects unknown ones), the
    secrets must be usable outside dev mode, and the ports the probes and Services use are the ones the
    service listens on."""
    docs = manifests(scenario)
    workers = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-inference-worker")]
    for d in by_kind(docs, "Deployment"):
        with monkeypatch.context() as m:
            template = d["spec"]["template"]
            settings = _pod_settings(docs, template, m, tmp_path)
            (c,) = template["spec"]["containers"]
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            args = build_parser().parse_args(c["args"])
            assert not settings.dev
            settings.sampling_key()
            assert settings.source.kind == "kafka"
            assert settings.server.host == "0.0.0.0"
            # The pipeline loads no model exactly when the inference workers run in pods of their own.
            assert settings.inference.external is bool(workers)
            if args.command == "run":
                assert ports["ops"] == settings.server.port
                if args.review:
                    assert ports["http"] == settings.review.port
                    assert ports["metrics"] == settings.review.metrics_port
                    settings.review_secret()
            elif args.command == "infer":
                # `oversight infer` serves its ops endpoints at --port on server.host.
                assert ports["ops"] == args.port
                assert not settings.database.url.startswith("sqlite")
            else:
                assert args.command == "serve" and ports["http"] == settings.review.port
                assert ports["metrics"] == settings.review.metrics_port
                assert settings.review.host == "0.0.0.0"
                settings.review_secret()
            if "metrics" in ports:
                # Prometheus reaches the review app's metrics listener from outside the pod.
                assert settings.review.metrics_host == "0.0.0.0"
            if settings.database.url.startswith("sqlite"):
                assert settings.database.url.startswith("sqlite:////data/")


def test_config_values_reach_the_service(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    docs = manifests("postgres-kafka-ha")
    settings = _pod_settings(docs, one(docs, "Deployment", "-pipeline")["spec"]["template"], monkeypatch, tmp_path)
    values = scenario_values("postgres-kafka-ha")
    assert values is not None
    assert settings.kafka.bootstrap_servers == values["kafka"]["bootstrapServers"]
    assert settings.kafka.topic == "prod.episodes" and settings.kafka.group_id == "oversight-prod"
    assert settings.kafka.security_protocol == "SASL_SSL"
    assert (
        settings.kafka.sasl_password is not None
        and settings.kafka.sasl_password.get_secret_value() == "ci-sasl-password"
    )
    assert settings.sampling.human_budget_per_hour == 200
    assert settings.sampling.streams["chat"].human is not None and settings.sampling.streams["chat"].human.rate == 0.02
    assert settings.database.url == values["database"]["url"]
    assert settings.sampling_key() == b"ci-sampling-key-0123456789abcdef"


def test_an_unknown_config_key_fails_the_check(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The check above can fail: a config file with a key that is not a setting is refused. (The chart's schema
    refuses such values before this, see test_a_typo_under_config_fails_the_render; the file is edited here.)"""
    from monitor.config import ConfigError

    docs = manifests("default")
    config = one(docs, "ConfigMap", "-config")
    data = yaml.safe_load(config["data"]["config.yaml"])
    data["sampling"] = {"humann": {"rate": 0.5}}
    config["data"]["config.yaml"] = yaml.safe_dump(data)
    with pytest.raises(ConfigError, match="humann"):
        _pod_settings(docs, one(docs, "Deployment", "-pipeline")["spec"]["template"], monkeypatch, tmp_path)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_deployment_commands_are_real_cli_subcommands(scenario: str) -> None:
    commands = {}
    for d in by_kind(manifests(scenario), "Deployment"):
        (c,) = d["spec"]["template"]["spec"]["containers"]
        assert "command" not in c, "the image's entrypoint is oversight"
        commands[d["metadata"]["name"]] = build_parser().parse_args(c["args"]).command
    assert commands[f"{RELEASE}-pipeline"] == "run"
    if f"{RELEASE}-review" in commands:
        assert commands[f"{RELEASE}-review"] == "serve"
    worker_enabled = ((scenario_values(scenario) or {}).get("inferenceWorker") or {}).get("enabled", False)
    assert (f"{RELEASE}-inference-worker" in commands) is worker_enabled
    if worker_enabled:
        assert commands[f"{RELEASE}-inference-worker"] == "infer"


def test_rm_update_job_template_command_is_a_real_cli_subcommand() -> None:
    """`oversight rm update` comes with the reward-model feature; until it lands this fails (argparse exits 2)."""
    jobs = {j["metadata"]["generateName"]: j for j in job_templates(manifests("postgres-kafka-ha"))}
    rm = jobs[f"{RELEASE}-rm-update-"]
    (c,) = rm["spec"]["template"]["spec"]["containers"]
    assert c["args"][:2] == ["rm", "update"]
    try:
        args = build_parser().parse_args(c["args"])
    except SystemExit as e:
        pytest.fail(f"`oversight {' '.join(c['args'])}` is not a CLI command yet (exit {e.code})")
    assert args.config == "/etc/oversight/config.yaml"


# --- scenarios: SQLite, secrets, monitoring ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"pipeline": {"replicas": 2}}, "SQLite"),
        ({"pipeline": {"replicas": 3}, "database": {"url": "sqlite:////data/other.db"}}, "SQLite"),
        ({"pipeline": {"keda": {"enabled": True}}}, "SQLite"),
        ({"pipeline": {"autoscaling": {"enabled": True}}}, "SQLite"),
        ({"database": {"url": "sqlite:///relative.db"}}, "data volume"),
        ({"database": {"url": ""}}, "database.url is empty"),
        (
            {
                "database": {"url": "postgresql://u@db:5432/o"},
                "pipeline": {"keda": {"enabled": True}, "autoscaling": {"enabled": True}},
            },
            "enable one",
        ),
        ({"review": {"ingress": {"enabled": True}}}, "hosts"),
        ({"review": {"metricsPort": 8080}}, "review.metricsPort"),
        ({"review": {"metricsPort": 9108}}, "review.metricsPort"),
        # The worker pods cannot open the pipeline pod's SQLite file.
        ({"inferenceWorker": {"enabled": True}}, r"inferenceWorker\.enabled needs PostgreSQL: database\.url is SQLite"),
        (
            {
                "database": {"url": "postgresql://u@db:5432/o"},
                "inferenceWorker": {"enabled": True},
                "config": {"inference": {"workers": False}},
            },
            r"inferenceWorker\.enabled needs config\.inference\.workers",
        ),
        (
            {
                "database": {"url": "postgresql://u@db:5432/o"},
                "inferenceWorker": {"enabled": True, "terminationGracePeriodSeconds": 5},
            },
            r"inferenceWorker\.terminationGracePeriodSeconds \(5\) must be at least 10",
        ),
        # The review UI inside the pipeline pod (SQLite) on the pipeline's own port.
        ({"review": {"port": 9000}, "pipeline": {"port": 9000}}, r"review\.port and pipeline\.port are both 9000"),
        # The chart's Secret is not written: the URL would be dropped without a word.
        (
            {"database": {"url": "postgresql://u@db:5432/o"}, "secrets": {"existingSecret": "mine"}},
            r"the URL would not be used",
        ),
        (
            {"metrics": {"serviceMonitor": {"enabled": True, "interval": "30s", "scrapeTimeout": "1m"}}},
            r"scrapeTimeout \(1m\) must not exceed its interval \(30s\)",
        ),
        (
            {
                "database": {"url": "postgresql://u@db:5432/o"},
                "pipeline": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}},
            },
            r"pipeline\.autoscaling\.minReplicas \(5\) is above its maxReplicas \(2\)",
        ),
        (
            {
                "database": {"url": "postgresql://u@db:5432/o"},
                "pipeline": {"keda": {"enabled": True, "minReplicaCount": 7}},
            },
            r"pipeline\.keda\.minReplicaCount \(7\) is above its maxReplicaCount",
        ),
        ({"fullnameOverride": "o" * 47}, r"is 47 characters"),
        # With SQLite the pipeline's own claim holds the versions for its one pod and its Jobs.
        ({"modelsVolume": {"enabled": True}}, r"modelsVolume\.enabled needs PostgreSQL: with SQLite"),
        (
            {"database": {"url": "sqlite:////data/o.db"}, "modelsVolume": {"enabled": True, "existingClaim": "m"}},
            r"modelsVolume\.enabled needs PostgreSQL",
        ),
        # The shared claim must not cover, or sit inside, one of the chart's own mounts.
        *(
            (
                {
                    "database": {"url": "postgresql://u@db:5432/o"},
                    "modelsVolume": {"enabled": True},
                    "config": {"reward": {"models_dir": models_dir}},
                },
                rf"reward\.models_dir, which resolves to {re.escape(resolved)}: that would cover or sit inside",
            )
            for models_dir, resolved in [
                (".", "/data"),
                ("./", "/data"),
                ("/", "/"),
                ("/tmp", "/tmp"),
                ("/etc", "/etc"),
                ("/etc/oversight/models", "/etc/oversight/models"),
                ("/var/run/secrets/oversight/m", "/var/run/secrets/oversight/m"),
            ]
        ),
    ],
)
def test_invalid_combinations_are_rejected_at_render_time(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        render(values)


def test_the_limits_of_those_checks_render() -> None:
    """The edges the checks above allow: a timeout equal to the interval (other units), a full name
    of 46 characters, as many replicas at least as at most."""
    docs = render_docs(
        {
            "fullnameOverride": "o" * 46,
            "metrics": {"serviceMonitor": {"enabled": True, "interval": "1m", "scrapeTimeout": "60000ms"}},
            "database": {"url": "postgresql://u@db:5432/o"},
            "pipeline": {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 3}},
        }
    )
    names = [d["metadata"]["name"] for d in docs]
    assert by_kind(docs, "ServiceMonitor") and max(len(n) for n in names) <= 63, max(names, key=len)


def test_sqlite_runs_one_process_with_the_review_ui_inside() -> None:
    docs = manifests("default")
    assert [d["metadata"]["name"] for d in by_kind(docs, "Deployment")] == [f"{RELEASE}-pipeline"]
    pipeline = one(docs, "Deployment", "-pipeline")
    assert pipeline["spec"]["replicas"] == 1
    assert pipeline["spec"]["strategy"]["type"] == "Recreate", "never two processes on the SQLite file"
    (c,) = pipeline["spec"]["template"]["spec"]["containers"]
    assert "--review" in c["args"]
    review_svc = one(docs, "Service", "-review")
    assert review_svc["spec"]["selector"]["app.kubernetes.io/component"] == "pipeline"
    claim = one(docs, "PersistentVolumeClaim")
    data = next(v for v in pipeline["spec"]["template"]["spec"]["volumes"] if v["name"] == "data")
    assert data["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    # The job template opens the same file.
    (job,) = job_templates(docs)
    job_data = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "data")
    assert job_data == data
    # ReadWriteOnce: the job must land on the pipeline pod's node.
    (term,) = job["spec"]["template"]["spec"]["affinity"]["podAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert matches(term["labelSelector"]["matchLabels"], pipeline["spec"]["template"]["metadata"]["labels"])


def test_postgres_ha_scales_and_spreads() -> None:
    docs = manifests("postgres-kafka-ha")
    pipeline = one(docs, "Deployment", "-pipeline")
    assert pipeline["spec"]["replicas"] == 3 and pipeline["spec"]["strategy"]["type"] == "RollingUpdate"
    review = one(docs, "Deployment", "-review")
    assert "replicas" not in review["spec"], "the review HPA owns the replica count"
    (spread,) = pipeline["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert matches(spread["labelSelector"]["matchLabels"], pipeline["spec"]["template"]["metadata"]["labels"])
    assert {d["metadata"]["name"] for d in by_kind(docs, "PodDisruptionBudget")} == {
        f"{RELEASE}-pipeline",
        f"{RELEASE}-review",
    }
    # Only the pipeline may create Jobs, and only it gets a token.
    role = one(docs, "Role")
    assert role["rules"] == [
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list", "watch", "delete"]}
    ]
    binding = one(docs, "RoleBinding")
    assert binding["subjects"][0]["name"] == pipeline["spec"]["template"]["spec"]["serviceAccountName"]
    assert pipeline["spec"]["template"]["spec"]["automountServiceAccountToken"] is True
    assert review["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    jobs = {j["metadata"]["generateName"] for j in job_templates(docs)}
    assert jobs == {f"{RELEASE}-rm-update-", f"{RELEASE}-retrain-", f"{RELEASE}-rm-training-"}
    policies = {n["metadata"]["name"]: n for n in by_kind(docs, "NetworkPolicy")}
    assert policies[f"{RELEASE}-pipeline"]["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }


def test_existing_secret_supplies_every_secret() -> None:
    docs = manifests("existing-secret")
    assert by_kind(docs, "Secret") == []
    review = one(docs, "Deployment", "-review")
    (c,) = review["spec"]["template"]["spec"]["containers"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
    assert refs["OVERSIGHT_DATABASE__URL"] == {"name": "oversight-managed", "key": "database-url"}
    assert refs["OVERSIGHT_SAMPLING__KEY"]["name"] == "oversight-managed"
    assert refs["OVERSIGHT_REVIEW__SECRET_KEY"]["name"] == "oversight-managed"
    assert one(docs, "Deployment", "-pipeline")["spec"]["replicas"] == 2


def test_chart_secret_keeps_given_values_and_generates_the_rest() -> None:
    given = one(manifests("postgres-kafka-ha"), "Secret")
    data = {k: base64.b64decode(v).decode() for k, v in given["data"].items()}
    assert data == {
        "sampling-key": "ci-sampling-key-0123456789abcdef",
        "review-secret-key": "ci-review-secret-0123456789abcdef",
        "database-url": "postgresql://oversight:ci-password@postgres.db.svc:5432/oversight",
        "webhook-secret": "ci-webhook-secret",
        "kafka-sasl-password": "ci-sasl-password",
    }
    assert given["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    generated = one(manifests("default"), "Secret")
    keys = {k: base64.b64decode(v).decode() for k, v in generated["data"].items()}
    assert set(keys) == {"sampling-key", "review-secret-key"}, "SQLite: no database-url in the Secret"
    assert all(len(v) == 48 for v in keys.values())


def test_config_change_rolls_the_pods() -> None:
    def checksum(values: dict[str, Any] | None) -> str:
        pipeline = one(render_docs(values), "Deployment", "-pipeline")
        return str(pipeline["spec"]["template"]["metadata"]["annotations"]["checksum/config"])

    assert checksum(None) == checksum(None), "generated secrets must not roll the pods on every upgrade"
    assert checksum(None) != checksum({"config": {"sampling": {"human": {"rate": 0.02}}}})


def release_rule_groups(scales_to_zero: bool = False) -> list[dict[str, Any]]:
    """deploy/prometheus/rules.yaml as the chart installs it: rules on an absent series scoped to the release's
    namespace, and OversightMonitorAbsent left out where KEDA may scale the pipeline to zero."""
    groups = rule_groups()
    for group in groups:
        group["rules"] = [
            {**r, "expr": r["expr"].replace("absent(up{", f'absent(up{{namespace="{NAMESPACE}", ')}
            for r in group["rules"]
            if not (scales_to_zero and r.get("alert") == "OversightMonitorAbsent")
        ]
    return groups


def test_monitoring_resources_come_from_the_deploy_files() -> None:
    docs = manifests("postgres-kafka-ha")
    rule = one(docs, "PrometheusRule")
    assert rule["spec"]["groups"] == release_rule_groups(), "the PrometheusRule must be deploy/prometheus/rules.yaml"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    dashboard = one(docs, "ConfigMap", "-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert json.loads(dashboard["data"]["oversight.json"]) == json.loads(DASHBOARD.read_text())
    jobs = {sm["spec"]["endpoints"][0]["relabelings"][0]["replacement"] for sm in by_kind(docs, "ServiceMonitor")}
    # The job names the rules' up{job=...} alerts match.
    assert jobs == {"oversight-pipeline", "oversight-review"}
    assert all(j in RULES.read_text() for j in jobs)
    assert (CHART / "files" / "rules.yaml").resolve() == RULES
    assert (CHART / "files" / "oversight.json").resolve() == DASHBOARD


def test_monitoring_resources_are_off_by_default() -> None:
    kinds = {d["kind"] for d in manifests("default")}
    assert not kinds & {"ServiceMonitor", "PrometheusRule", "ScaledObject", "HorizontalPodAutoscaler", "Ingress"}


def test_keda_scales_the_pipeline_on_the_consumer_group_lag() -> None:
    docs = manifests("keda")
    pipeline = one(docs, "Deployment", "-pipeline")
    assert "replicas" not in pipeline["spec"], "KEDA owns the replica count"
    scaled = one(docs, "ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"] == {
        "bootstrapServers": "kafka:9092",
        "consumerGroup": "oversight-monitor",
        "topic": "oversight.episodes",
        "lagThreshold": "2000",
        "offsetResetPolicy": "earliest",
    }
    assert trigger["authenticationRef"] == {"name": "kafka-sasl"}
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (1, 12)


@pytest.mark.parametrize("minimum", [0, 1])
def test_a_pipeline_scaled_to_zero_is_not_paged_as_absent(minimum: int) -> None:
    values = scenario_values("keda") or {}
    values["pipeline"]["keda"]["minReplicaCount"] = minimum
    values["metrics"] = {"prometheusRule": {"enabled": True}}
    groups = one(render_docs(values), "PrometheusRule")["spec"]["groups"]
    assert groups == release_rule_groups(scales_to_zero=minimum == 0)
    alerts = {r["alert"] for g in groups for r in g["rules"] if "alert" in r}
    assert ("OversightMonitorAbsent" in alerts) == (minimum > 0)
    assert ("OversightMonitorAbsent is left out" in notes(values)) == (minimum == 0)


def test_another_namespace_pipeline_does_not_hide_this_release_absence(tmp_path: Path) -> None:
    """Two releases in one Prometheus: the chart's absence rule watches its own namespace only."""
    groups = one(render_docs({"metrics": {"prometheusRule": {"enabled": True}}}), "PrometheusRule")["spec"]["groups"]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    case: dict[str, Any] = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": 'up{job="oversight-pipeline",namespace="other",instance="o0:9108"}', "values": "1x20"},
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "10m",
                        "alertname": "OversightMonitorAbsent",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "critical",
                                    "component": "monitor",
                                    "job": "oversight-pipeline",
                                    "namespace": NAMESPACE,
                                }
                            },
                        ],
                    }
                ],
            }
        ],
    }
    for rule in (r for g in groups for r in g["rules"] if r.get("alert") == "OversightMonitorAbsent"):
        case["tests"][0]["alert_rule_test"][0]["exp_alerts"][0]["exp_annotations"] = rule["annotations"]
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(case))
    result = promtool("test", "rules", tmp_path / "test.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ingress_terminates_tls_for_the_review_service() -> None:
    docs = manifests("ingress-tls")
    ingress = one(docs, "Ingress")
    assert ingress["spec"]["tls"] == [{"secretName": "oversight-review-tls", "hosts": ["review.oversight.example.com"]}]
    assert ingress["spec"]["ingressClassName"] == "nginx"
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "review.oversight.example.com"
    assert rule["http"]["paths"][0]["backend"]["service"]["name"] == f"{RELEASE}-review"


def test_runbook_links_follow_the_configured_base_url() -> None:
    base = "https://git.example.com/oversight-monitor/blob/v0.1.0/deploy/prometheus/RUNBOOK.md"
    docs = render_docs({"metrics": {"prometheusRule": {"enabled": True, "runbookBaseUrl": base + "/"}}})
    groups = one(docs, "PrometheusRule")["spec"]["groups"]
    alerts = [r for g in groups for r in g["rules"] if "alert" in r]
    assert alerts
    for rule in alerts:
        assert rule["annotations"]["runbook_url"] == f"{base}#{rule['alert'].lower()}"
    # Apart from the links, the rules are deploy/prometheus/rules.yaml.
    for rule in alerts:
        rule["annotations"].pop("runbook_url")
    expected = release_rule_groups()
    for rule in (r for g in expected for r in g["rules"] if "alert" in r):
        rule["annotations"].pop("runbook_url")
    assert groups == expected


# --- config: the schema generated from Settings, keys the chart reserves ------------------------------------

RESERVED = reserved_config_keys()


def _nested(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return out


def _leaves(node: Any, prefix: str = "") -> set[str]:
    if not isinstance(node, dict):
        return {prefix.rstrip(".")}
    return {leaf for key, value in node.items() for leaf in _leaves(value, f"{prefix}{key}.")}


def _secret_settings(model: type[BaseModel] = Settings, prefix: str = "") -> set[str]:
    """Dotted keys of every SecretStr setting."""
    out: set[str] = set()
    for name, field in model.model_fields.items():
        types = typing.get_args(field.annotation) or (field.annotation,)
        if SecretStr in types:
            out.add(prefix + name)
        for tp in types:
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                out |= _secret_settings(tp, f"{prefix}{name}.")
    return out


def test_values_schema_config_is_generated_from_settings() -> None:
    assert VALUES_SCHEMA.read_text() == generated_values_schema(), (
        "helm/oversight/values.schema.json is stale: its `config` part is generated from the settings in "
        "monitor/config.py. Run `make schema` and commit the result."
    )


def test_generated_config_schema_is_closed_and_holds_no_secret() -> None:
    config = json.loads(VALUES_SCHEMA.read_text())["properties"]["config"]
    objects = 0

    def walk(node: Any, where: str) -> None:
        nonlocal objects
        if isinstance(node, list):
            for item in node:
                walk(item, where)
            return
        if not isinstance(node, dict):
            return
        assert node.get("format") != "password", f"{where}: a secret in the schema"
        if "properties" in node:
            objects += 1
            assert node.get("additionalProperties") is False, f"{where}: unknown keys must be refused"
            for name, sub in node["properties"].items():
                walk(sub, f"{where}.{name}")
        for key in ("anyOf", "items", "additionalProperties"):
            if key in node:
                walk(node[key], where)

    walk(config, "config")
    assert objects > 20, "every settings section is an object of its own"
    for key, why in RESERVED.items():
        node = config
        for part in key.split("."):
            node = node["properties"][part]
        assert node == {"description": why}, f"config.{key}: reserved keys pass the schema to the render's message"


@pytest.mark.parametrize(
    ("config", "where"),
    [
        ({"sampling": {"humann": {"rate": 0.5}}}, "humann"),
        ({"drift": {"embeding": {"enabled": False}}}, "embeding"),
        ({"unknown_section": {"a": 1}}, "unknown_section"),
        ({"pipeline": {"batch_size": "500"}}, "batch_size"),
        ({"sampling": {"human": {"rate": 1.5}}}, "rate"),
        ({"kafka": {"security_protocol": "TLS"}}, "security_protocol"),
    ],
)
def test_a_typo_under_config_fails_the_render(config: dict[str, Any], where: str) -> None:
    """Before, these rendered fine and the pod crash-looped on start."""
    with pytest.raises(helm.HelmValuesError, match=where):
        render({"config": config})


def test_chart_managed_keys_and_secrets_under_config_fail_the_render() -> None:
    """Before, the chart overwrote config.server.port without a word, and a secret landed in the ConfigMap."""
    with pytest.raises(helm.HelmRenderError, match=r"config\.server\.port is set by the chart; set pipeline\.port"):
        render({"config": {"server": {"port": 9000}}})
    with pytest.raises(helm.HelmRenderError, match=r"config\.sampling\.key is a secret; set secrets\.samplingKey"):
        render({"config": {"sampling": {"key": "Zq7vK2mX9pLw4RtB8nYc"}}})


@pytest.mark.parametrize("key", sorted(RESERVED))
def test_every_reserved_config_key_fails_the_render_with_its_message(key: str) -> None:
    with pytest.raises(helm.HelmRenderError) as failed:
        render({"config": _nested(key, "x")})
    assert f"config.{key} {RESERVED[key]}." in str(failed.value)


def test_reserved_keys_are_the_chart_managed_ones_the_secrets_and_dev() -> None:
    """files/reserved-config.yaml lists exactly what the chart writes into the config file itself, every secret
    setting, and dev: a key the chart starts to manage, or a new secret setting, must be added there."""
    chart_managed: set[str] = set()
    for database in ("sqlite:////data/oversight.db", "postgresql://u@db:5432/o"):
        docs = render_docs({"config": None, "database": {"url": database}})
        chart_managed |= _leaves(yaml.safe_load(one(docs, "ConfigMap", "-config")["data"]["config.yaml"]))
    secrets = _secret_settings()
    assert {"sampling.key", "review.secret_key", "kafka.sasl_password"} <= secrets
    assert set(RESERVED) == chart_managed | secrets | {"dev"}


def test_user_config_is_merged_with_the_chart_keys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A user's key next to chart-managed ones in the same section survives, and so do the chart's."""
    docs = render_docs({"config": {"kafka": {"auto_offset_reset": "latest"}, "review": {"lease_seconds": 120}}})
    settings = _pod_settings(docs, one(docs, "Deployment", "-pipeline")["spec"]["template"], monkeypatch, tmp_path)
    assert settings.kafka.auto_offset_reset == "latest" and settings.kafka.topic == "oversight.episodes"
    assert settings.review.lease_seconds == 120 and settings.review.port == 8080


# --- optional CRDs: Capabilities guards ---------------------------------------------------------------------


def test_monitoring_crds_need_their_api_and_the_notes_warn_when_left_out() -> None:
    values = scenario_values("postgres-kafka-ha")
    without = {d["kind"] for d in render_docs(values, api_versions=())}
    assert not without & {"ServiceMonitor", "PrometheusRule"}, "the install would fail on a cluster without the CRDs"
    text = notes(values, api_versions=())
    assert "WARNING: metrics.serviceMonitor.enabled" in text
    assert "--api-versions monitoring.coreos.com/v1/ServiceMonitor" in text
    assert "WARNING: metrics.prometheusRule.enabled" in text
    assert {"ServiceMonitor", "PrometheusRule"} <= {d["kind"] for d in render_docs(values)}
    assert "WARNING" not in notes(values)
    # Each resource depends on its own API only.
    only_sm = {d["kind"] for d in render_docs(values, api_versions=("monitoring.coreos.com/v1/ServiceMonitor",))}
    assert "ServiceMonitor" in only_sm and "PrometheusRule" not in only_sm


def test_keda_without_its_api_leaves_a_fixed_replica_count_and_a_warning() -> None:
    values = scenario_values("keda")
    docs = render_docs(values, api_versions=())
    assert by_kind(docs, "ScaledObject") == []
    assert one(docs, "Deployment", "-pipeline")["spec"]["replicas"] == 1, "nothing else would set the count"
    assert "WARNING: pipeline.keda.enabled" in notes(values, api_versions=())
    assert "WARNING" not in notes(values)


def test_notes_state_the_source_and_the_layout() -> None:
    default = notes(None)
    assert "Source: Kafka, topic oversight.episodes on kafka:9092, consumer group oversight-monitor" in default
    assert "Layout: embedded, one pod" in default and "`oversight run --review`" in default
    ha = notes(scenario_values("postgres-kafka-ha"))
    assert "Source: Kafka, topic prod.episodes on kafka-0.kafka.streaming.svc:9092," in ha
    assert "Layout: 3 pipeline replica(s) and a separate review service, on PostgreSQL." in ha


# --- review metrics listener, network policies --------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_review_metrics_have_their_own_port_and_service(scenario: str) -> None:
    docs = manifests(scenario)
    review_pods = []
    for d in by_kind(docs, "Deployment"):
        (c,) = d["spec"]["template"]["spec"]["containers"]
        args = build_parser().parse_args(c["args"])
        if args.command == "serve" or getattr(args, "review", False):
            review_pods.append(d)
            assert {p["name"]: p["containerPort"] for p in c["ports"]}["metrics"] == 9109
    assert len(review_pods) == 1
    review = one(docs, "Service", "-review")
    assert [p["name"] for p in review["spec"]["ports"]] == ["http"], "the public review Service carries no metrics"
    metrics = one(docs, "Service", "-review-metrics")
    assert metrics["spec"]["type"] == "ClusterIP"
    assert metrics["spec"]["ports"] == [{"name": "metrics", "port": 9109, "targetPort": "metrics", "protocol": "TCP"}]
    assert matches(metrics["spec"]["selector"], review_pods[0]["spec"]["template"]["metadata"]["labels"])
    for sm in by_kind(docs, "ServiceMonitor"):
        assert sm["spec"]["endpoints"][0]["port"] in {"ops", "metrics"}


PROMETHEUS_PEERS = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
INGRESS_PEERS = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]


@pytest.mark.parametrize(
    ("database", "worker"),
    [("sqlite:////data/oversight.db", False), ("postgresql://u@db:5432/o", False), ("postgresql://u@db:5432/o", True)],
)
def test_network_policy_admits_prometheus_to_metrics_and_reviewers_to_the_ui(database: str, worker: bool) -> None:
    docs = render_docs(
        {
            "database": {"url": database},
            "inferenceWorker": {"enabled": worker},
            "networkPolicy": {"metricsFrom": PROMETHEUS_PEERS, "reviewFrom": INGRESS_PEERS},
        }
    )
    test_pod = one(docs, "Pod", "-test-endpoints")
    pods = [d["spec"]["template"] for d in by_kind(docs, "Deployment")]
    # Every pod of the release is behind a policy (the inference workers' too).
    policies = by_kind(docs, "NetworkPolicy")
    assert all(
        any(matches(np["spec"]["podSelector"]["matchLabels"], t["metadata"]["labels"]) for np in policies) for t in pods
    )
    assert len(pods) == (3 if worker else 1 if database.startswith("sqlite") else 2)
    for np in policies:
        (pod,) = [t for t in pods if matches(np["spec"]["podSelector"]["matchLabels"], t["metadata"]["labels"])]
        covered: set[str] = set()
        for rule in np["spec"]["ingress"]:
            ports = {p["port"] for p in rule["ports"]}
            covered |= ports
            peers = rule["from"]
            # The `helm test` pod may reach everything it checks, and nothing else is added.
            (extra,) = [p for p in peers if p not in PROMETHEUS_PEERS + INGRESS_PEERS]
            assert matches(extra["podSelector"]["matchLabels"], test_pod["metadata"]["labels"])
            if ports & {"ops", "metrics"}:
                assert ports <= {"ops", "metrics"}, "metrics ports and the UI never share a rule"
                assert peers[:-1] == PROMETHEUS_PEERS, np["metadata"]["name"]
            else:
                assert ports == {"http"} and peers[:-1] == INGRESS_PEERS, np["metadata"]["name"]
        # Every port the pod listens on has a rule (a missing one would be closed to everybody).
        assert covered == {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}


def test_network_policy_without_peer_lists_admits_everyone() -> None:
    for np in by_kind(manifests("default"), "NetworkPolicy"):
        assert all("from" not in rule for rule in np["spec"]["ingress"])


# --- inference workers: `oversight infer` in a Deployment of its own ------------------------------------------

POSTGRES_URL = "postgresql://oversight:ci-password@postgres.db.svc:5432/oversight"
WORKER = "-inference-worker"


def _config_file(docs: list[dict[str, Any]]) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(one(docs, "ConfigMap", "-config")["data"]["config.yaml"])
    return config


def _worker_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = one(docs, "Deployment", WORKER)["spec"]["template"]["spec"]["containers"]
    (c,) = containers
    return c


@pytest.mark.parametrize("database", ["sqlite:////data/oversight.db", POSTGRES_URL])
def test_inference_worker_is_off_by_default(database: str) -> None:
    docs = render_docs({"database": {"url": database}, "config": {"inference": {"batch_size": 64}}})
    assert [d for d in docs if d["metadata"]["name"].endswith(WORKER)] == []
    assert [d["metadata"]["name"] for d in by_kind(docs, "Deployment")] == [
        f"{RELEASE}-pipeline",
        *([] if database.startswith("sqlite") else [f"{RELEASE}-review"]),
    ]
    # The pipeline runs the models itself; the user's inference keys stay beside the chart's.
    assert _config_file(docs)["inference"] == {"external": False, "batch_size": 64}
    assert "-inference-worker" not in " ".join(_test_command(docs)[3:])
    assert "Inference workers" not in notes({"database": {"url": database}})


def test_inference_worker_runs_infer_against_postgresql(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    docs = manifests("inference-worker")
    worker = one(docs, "Deployment", WORKER)
    pipeline = one(docs, "Deployment", "-pipeline")
    template = worker["spec"]["template"]
    assert worker["metadata"]["labels"]["app.kubernetes.io/component"] == "inference-worker"
    assert worker["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "inference-worker"
    assert template["metadata"]["annotations"]["example.com/team"] == "ml-platform"
    c = _worker_container(docs)
    assert c["args"] == ["infer", "--config", "/etc/oversight/config.yaml", "--port", "9110", "--log-level", "INFO"]
    assert c["image"] == pipeline["spec"]["template"]["spec"]["containers"][0]["image"]
    assert c["ports"] == [{"name": "ops", "containerPort": 9110, "protocol": "TCP"}]
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}
    # The pipeline's Secret environment without the review key; the database URL from the Secret.
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
    assert refs["OVERSIGHT_DATABASE__URL"] == {"name": f"{RELEASE}-secrets", "key": "database-url"}
    assert "OVERSIGHT_REVIEW__SECRET_KEY" not in refs and "OVERSIGHT_SAMPLING__KEY" in refs
    # The same config file, so a config change rolls the workers with the pipeline.
    annotations = template["metadata"]["annotations"]
    assert annotations["checksum/config"] == pipeline["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert template["spec"]["priorityClassName"] == "oversight-inference"
    assert template["spec"]["automountServiceAccountToken"] is False, "the workers never call the Kubernetes API"
    # Security as the pipeline's; the config and data mounts, never the Job templates.
    pipeline_spec = pipeline["spec"]["template"]["spec"]
    assert template["spec"]["securityContext"] == pipeline_spec["securityContext"]
    assert c["securityContext"] == pipeline_spec["containers"][0]["securityContext"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    # The scenario shares the reward-model versions (modelsVolume): their claim over /data/models.
    assert set(mounts) == {"/etc/oversight", "/tmp", "/data", "/var/run/secrets/oversight", "/data/models"}
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert volumes[mounts["/etc/oversight"]]["configMap"]["name"] == f"{RELEASE}-config"
    assert "emptyDir" in volumes[mounts["/data"]]
    # What the process reads: the database from the Secret, the external mode, the user's other inference keys.
    settings = _pod_settings(docs, template, monkeypatch, tmp_path)
    assert settings.database.url == POSTGRES_URL
    assert settings.inference.external is True
    assert (settings.inference.batch_size, settings.inference.threads) == (64, 4)
    assert build_parser().parse_args(c["args"]).port == 9110
    assert _config_file(docs)["inference"] == {"external": True, "batch_size": 64, "threads": 4}
    for version in K8S_VERSIONS:
        for doc in docs:
            if doc["metadata"]["name"].endswith(WORKER):
                validate(doc, version)


def test_inference_worker_defaults_on_postgresql() -> None:
    docs = render_docs({"database": {"url": POSTGRES_URL}, "inferenceWorker": {"enabled": True}})
    worker = one(docs, "Deployment", WORKER)
    assert worker["spec"]["replicas"] == 1
    assert worker["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    c = _worker_container(docs)
    assert c["args"] == ["infer", "--config", "/etc/oversight/config.yaml", "--port", "9109"]
    assert c["resources"] == {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}}
    spec = worker["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] == 30
    assert not {"nodeSelector", "tolerations", "affinity", "priorityClassName"} & set(spec)
    # One fixed replica: no PodDisruptionBudget, no autoscaler for the workers.
    assert not [
        d
        for d in docs
        if d["kind"] in {"PodDisruptionBudget", "HorizontalPodAutoscaler"} and WORKER in d["metadata"]["name"]
    ]
    assert _config_file(docs)["inference"] == {"external": True}
    text = notes({"database": {"url": POSTGRES_URL}, "inferenceWorker": {"enabled": True}})
    assert "Inference workers: 1 pod(s) of `oversight infer`" in text
    assert f"svc/{RELEASE}-inference-worker port 9109" in text
    for version in K8S_VERSIONS:
        for doc in docs:
            validate(doc, version)


def test_inference_worker_gpu_goes_into_the_limits_beside_the_users_resources() -> None:
    docs = manifests("inference-worker")
    c = _worker_container(docs)
    assert c["resources"] == {
        "requests": {"cpu": "2", "memory": "3Gi"},
        "limits": {"memory": "6Gi", "nvidia.com/gpu": 1},
    }
    worker = one(docs, "Deployment", WORKER)
    spec = worker["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    (spread,) = spec["topologySpreadConstraints"]
    assert matches(spread["labelSelector"]["matchLabels"], worker["spec"]["template"]["metadata"]["labels"])
    # A rollout needs no spare GPU.
    assert worker["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    assert "with 1 GPU(s) each" in notes(scenario_values("inference-worker"))

    def resources(worker_values: dict[str, Any]) -> Any:
        values = {"database": {"url": POSTGRES_URL}, "inferenceWorker": {"enabled": True, **worker_values}}
        return _worker_container(render_docs(values))["resources"]

    # CPU and memory limits of the user's stay; gpu wins over a count in the limits; no limits at all still works.
    assert resources({"gpu": 2, "resources": {"limits": {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": 1}}}) == {
        "requests": {"cpu": "1", "memory": "1Gi"},
        "limits": {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": 2},
    }
    assert resources({"gpu": 1, "resources": {"limits": None}}) == {
        "requests": {"cpu": "1", "memory": "1Gi"},
        "limits": {"nvidia.com/gpu": 1},
    }
    assert "nvidia.com/gpu" not in resources({"gpu": 0})["limits"]


def test_inference_worker_is_scraped_scaled_and_fenced() -> None:
    docs = manifests("inference-worker")
    worker = one(docs, "Deployment", WORKER)
    labels = worker["spec"]["template"]["metadata"]["labels"]
    pipeline_labels = one(docs, "Deployment", "-pipeline")["spec"]["template"]["metadata"]["labels"]
    # A ClusterIP Service of the workers' ops port, and nobody else's.
    svc = one(docs, "Service", WORKER)
    assert svc["spec"]["type"] == "ClusterIP" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["ports"] == [{"name": "ops", "port": 9110, "targetPort": "ops", "protocol": "TCP"}]
    assert matches(svc["spec"]["selector"], labels) and not matches(svc["spec"]["selector"], pipeline_labels)
    # Prometheus scrapes it as job oversight-inference-worker.
    monitor = one(docs, "ServiceMonitor", WORKER)
    assert matches(monitor["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert not matches(
        monitor["spec"]["selector"]["matchLabels"], one(docs, "Service", "-pipeline")["metadata"]["labels"]
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "ops" and endpoint["path"] == "/metrics"
    assert endpoint["relabelings"] == [
        {"action": "replace", "targetLabel": "job", "replacement": "oversight-inference-worker"}
    ]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # Only Prometheus's namespace (and the `helm test` pod) reach the ops port.
    policy = one(docs, "NetworkPolicy", WORKER)
    assert matches(policy["spec"]["podSelector"]["matchLabels"], labels)
    assert not matches(policy["spec"]["podSelector"]["matchLabels"], pipeline_labels)
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "ops", "protocol": "TCP"}]
    assert rule["from"][0] == PROMETHEUS_PEERS[0] and len(rule["from"]) == 2
    # The autoscaler owns the count; the PodDisruptionBudget keeps all but one worker through a drain.
    assert "replicas" not in worker["spec"]
    hpa = one(docs, "HorizontalPodAutoscaler", WORKER)
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": f"{RELEASE}{WORKER}",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 5)
    pdb = one(docs, "PodDisruptionBudget", WORKER)
    assert matches(pdb["spec"]["selector"]["matchLabels"], labels) and pdb["spec"]["maxUnavailable"] == 1
    # `helm test` asks the workers too.
    urls = _test_command(docs)[3:]
    assert f"http://{RELEASE}{WORKER}:9110/readyz" in urls and f"http://{RELEASE}{WORKER}:9110/metrics" in urls
    # Without the monitoring API, or with the ServiceMonitor off, no worker ServiceMonitor; the Service stays.
    values = scenario_values("inference-worker")
    assert not [d for d in render_docs(values, api_versions=()) if d["kind"] == "ServiceMonitor"]
    assert values is not None
    values["metrics"]["serviceMonitor"]["enabled"] = False
    off = render_docs(values)
    assert by_kind(off, "ServiceMonitor") == [] and one(off, "Service", WORKER)
    # Two fixed replicas get a PodDisruptionBudget too.
    fixed = render_docs({"database": {"url": POSTGRES_URL}, "inferenceWorker": {"enabled": True, "replicas": 2}})
    assert one(fixed, "Deployment", WORKER)["spec"]["replicas"] == 2
    assert one(fixed, "PodDisruptionBudget", WORKER)


def test_enabling_the_inference_worker_rolls_the_pipeline() -> None:
    """The pipeline must restart to stop loading the models (inference.external is read at start)."""

    def checksum(enabled: bool) -> str:
        docs = render_docs({"database": {"url": POSTGRES_URL}, "inferenceWorker": {"enabled": enabled}})
        return str(
            one(docs, "Deployment", "-pipeline")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        )

    assert checksum(True) != checksum(False)


# --- shared reward-model volume ---------------------------------------------------------------------------

MODELS = "models"


def _models_mounts(template: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(container, mount, volume) of every mount of the pod's "models" volume."""
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    return [
        (c["name"], m, volumes[m["name"]])
        for c in template["spec"]["containers"]
        for m in c.get("volumeMounts", [])
        if m["name"] == MODELS
    ]


def _model_pods(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Pod templates by component: pipeline, review, inference-worker, rm-update (Job template), ..."""
    return {t["metadata"]["labels"]["app.kubernetes.io/component"]: t for _, t in pod_specs(docs)}


@pytest.mark.parametrize(
    ("database", "worker"), [("sqlite:////data/oversight.db", False), (POSTGRES_URL, False), (POSTGRES_URL, True)]
)
def test_models_volume_is_off_by_default(database: str, worker: bool) -> None:
    values = {"database": {"url": database}, "inferenceWorker": {"enabled": worker}}
    docs = render_docs(values)
    claims = [d["metadata"]["name"] for d in by_kind(docs, "PersistentVolumeClaim")]
    assert f"{RELEASE}-models" not in claims
    pods = _model_pods(docs)
    assert {"pipeline", "rm-update"} <= set(pods) and ("inference-worker" in pods) is worker
    for component, template in pods.items():
        assert MODELS not in {v["name"] for v in template["spec"]["volumes"]}, component
        assert _models_mounts(template) == [], component
    text = notes(values)
    if database.startswith("sqlite"):
        # The one pod's claim holds the versions: nothing to warn about.
        assert "modelsVolume" not in text
    else:
        line = next(x for x in text.splitlines() if "modelsVolume.enabled is false" in x)
        assert line.startswith("WARNING: " if worker else "NOTE: ")
        assert "(/data/models)" in line and "is not visible to the others" in line
        assert ("inference workers score with the active version" in line) is worker


def test_models_volume_is_shared_by_the_pods_that_train_and_load_versions(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """One ReadWriteMany claim, the whole of it (no subPath) at the folder reward.models_dir names, in the pipeline,
    the inference workers and the rm-update Job; not in the review pods, which read only the database's rows."""
    docs = manifests("inference-worker")
    (claim,) = [d for d in by_kind(docs, "PersistentVolumeClaim") if d["metadata"]["name"] == f"{RELEASE}-models"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["storageClassName"] == "nfs-client"
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert claim["metadata"]["labels"]["app.kubernetes.io/component"] == "models"
    pods = _model_pods(docs)
    assert {"pipeline", "review", "inference-worker", "rm-update"} <= set(pods)
    for component in ("pipeline", "inference-worker", "rm-update"):
        template = pods[component]
        (mount_of,) = _models_mounts(template)
        _, mount, volume = mount_of
        assert mount == {"name": MODELS, "mountPath": "/data/models"}, component
        assert volume == {"name": MODELS, "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}
        # The folder the service itself uses: reward.models_dir, relative to the working directory /data.
        with monkeypatch.context() as m:
            settings = _pod_settings(docs, template, m, tmp_path)
        assert posixpath.normpath(posixpath.join("/data", settings.reward.models_dir)) == mount["mountPath"]
    assert _models_mounts(pods["review"]) == []
    assert MODELS not in {v["name"] for v in pods["review"]["spec"]["volumes"]}
    text = notes(scenario_values("inference-worker"))
    assert (
        f"Reward-model versions: the claim {RELEASE}-models (modelsVolume), mounted at /data/models"
        " (reward.models_dir) in the pipeline, inference-worker and rm-update Job pods." in text
    )
    assert "modelsVolume.enabled is false" not in text
    for version in K8S_VERSIONS:
        for doc in docs + job_templates(docs):
            validate(doc, version)


def test_models_volume_on_postgresql_without_inference_workers() -> None:
    values = {
        "database": {"url": POSTGRES_URL},
        "modelsVolume": {"enabled": True, "annotations": {"example.com/backup": "daily"}},
        "config": {"reward": {"models_dir": "/srv/oversight/models"}},
    }
    docs = render_docs(values)
    claim = one(docs, "PersistentVolumeClaim", "-models")
    # The defaults: RWX, 10Gi, the cluster's default StorageClass (no field); the user's annotations kept.
    assert claim["spec"] == {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "10Gi"}}}
    assert claim["metadata"]["annotations"] == {"example.com/backup": "daily", "helm.sh/resource-policy": "keep"}
    pods = _model_pods(docs)
    assert "inference-worker" not in pods
    for component in ("pipeline", "rm-update"):
        ((_, mount, volume),) = _models_mounts(pods[component])
        # An absolute reward.models_dir is where the claim goes.
        assert mount["mountPath"] == "/srv/oversight/models" and "subPath" not in mount, component
        assert volume["persistentVolumeClaim"]["claimName"] == f"{RELEASE}-models"
    assert _models_mounts(pods["review"]) == []
    assert "mounted at /srv/oversight/models (reward.models_dir) in the pipeline and rm-update Job pods." in notes(
        values
    )
    for version in K8S_VERSIONS:
        for doc in docs + job_templates(docs):
            validate(doc, version)
    # A relative reward.models_dir is relative to /data; without the Job templates only the pipeline mounts it.
    values = {
        "database": {"url": POSTGRES_URL},
        "modelsVolume": {"enabled": True},
        "config": {"reward": {"models_dir": "./rm/versions/"}},
        "jobs": {"enabled": False},
    }
    pods = _model_pods(render_docs(values))
    assert "rm-update" not in pods
    ((_, mount, _),) = _models_mounts(pods["pipeline"])
    assert mount["mountPath"] == "/data/rm/versions"
    assert "in the pipeline pods." in notes(values)


def test_models_volume_existing_claim_is_used_and_not_created() -> None:
    values = {
        "database": {"url": POSTGRES_URL},
        "inferenceWorker": {"enabled": True},
        "modelsVolume": {"enabled": True, "existingClaim": "shared-rm-versions", "storageClassName": "ignored"},
    }
    docs = render_docs(values)
    assert by_kind(docs, "PersistentVolumeClaim") == [], "the existing claim is the user's: none is created"
    pods = _model_pods(docs)
    for component in ("pipeline", "inference-worker", "rm-update"):
        ((_, mount, volume),) = _models_mounts(pods[component])
        assert mount["mountPath"] == "/data/models", component
        assert volume["persistentVolumeClaim"] == {"claimName": "shared-rm-versions"}, component
    assert _models_mounts(pods["review"]) == []
    assert "the claim shared-rm-versions (modelsVolume)" in notes(values)


# --- helm test -------------------------------------------------------------------------------------------


def _test_command(docs: list[dict[str, Any]]) -> list[str]:
    pod = one(docs, "Pod", "-test-endpoints")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    (c,) = pod["spec"]["containers"]
    assert c["image"] == one(docs, "Deployment", "-pipeline")["spec"]["template"]["spec"]["containers"][0]["image"]
    command: list[str] = c["command"]
    assert command[:2] == ["python", "-c"]
    return command


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_test_checks_readyz_and_metrics_of_every_service(scenario: str) -> None:
    docs = manifests(scenario)
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    pods = [d["spec"]["template"] for d in by_kind(docs, "Deployment")]
    checked = set()
    for url in _test_command(docs)[3:]:
        parts = urllib.parse.urlsplit(url)
        assert parts.hostname is not None and parts.hostname in services, url
        svc = services[parts.hostname]
        (port,) = [p for p in svc["spec"]["ports"] if p["port"] == parts.port]
        # The pipeline and the inference workers serve /readyz and /metrics on their ops port; the review app
        # /readyz on its http port (its readiness probe) and /metrics on its metrics port, in its own pod or inside
        # the pipeline's.
        app_port = port["targetPort"]
        assert parts.path in {"ops": {"/readyz", "/metrics"}, "http": {"/readyz"}, "metrics": {"/metrics"}}[app_port], (
            url
        )
        selected = [t for t in pods if matches(svc["spec"]["selector"], t["metadata"]["labels"])]
        assert selected, url
        apps = set()
        for pod in selected:
            (c,) = pod["spec"]["containers"]
            args = build_parser().parse_args(c["args"])
            if app_port == "ops":
                apps.add({"run": "pipeline", "infer": "inference-worker"}[args.command])
            else:
                assert args.command == "serve" or args.review, url
                apps.add("review")
            if parts.path == "/readyz" and args.command in ("serve", "infer"):
                assert c["readinessProbe"]["httpGet"]["port"] == app_port, url
        (app,) = apps
        checked.add((app, parts.path))
    expected = {"pipeline", "review"}
    if any(d["metadata"]["name"].endswith("-inference-worker") for d in by_kind(docs, "Deployment")):
        expected.add("inference-worker")
    assert checked == {(app, path) for app in expected for path in ("/readyz", "/metrics")}


def test_helm_test_passes_on_live_endpoints_and_names_what_fails() -> None:
    """The test Pod's script, run here against the service's real ops server (monitor.ops.OpsServer with the
    pipeline's metric registry); the readiness check it calls is a stand-in that the test switches."""
    from prometheus_client import CollectorRegistry

    from monitor.metrics import Metrics
    from monitor.ops import OpsServer

    command = _test_command(render_docs({"helmTest": {"attempts": 1}}))
    ready = {"source": True}
    live = OpsServer("127.0.0.1", 0, Metrics().registry, lambda: dict(ready)).start()
    empty = OpsServer("127.0.0.1", 0, CollectorRegistry(), lambda: {"source": True}).start()
    try:

        def run(server: OpsServer) -> subprocess.CompletedProcess[str]:
            urls = [urllib.parse.urlsplit(u)._replace(netloc=f"127.0.0.1:{server.port}").geturl() for u in command[3:]]
            return subprocess.run(
                [sys.executable, "-c", command[2], *urls], capture_output=True, text=True, timeout=60, check=False
            )

        ok = run(live)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert ok.stdout.count("ok http://") == len(command) - 3
        ready["source"] = False
        not_ready = run(live)
        assert not_ready.returncode == 1
        assert not_ready.stdout.count("FAILED") == 2 and "/readyz - HTTP Error 503" in not_ready.stdout
        no_metrics = run(empty)
        assert no_metrics.returncode == 1 and "/metrics - the response holds no oversight_ metrics" in no_metrics.stdout
    finally:
        live.stop()
        empty.stop()
