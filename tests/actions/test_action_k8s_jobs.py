"""The Kubernetes Job sink's manifests, built from the chart's real Job templates (rendered with the Helm
engine, as tests/deploy/test_helm.py does, and written where the chart mounts them) and validated against
the Kubernetes OpenAPI schemas (kubernetes-validate, strict).

There is no API server here, so ``create_job`` (the one function that calls the cluster) is not run: these
tests cover everything up to the manifest it is given.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from slow_server import drip_headers

from monitor.actions.sinks import KubernetesJobSink, SinkError, job_name, label_value
from monitor.cli import build_parser
from monitor.config import KubernetesJobConfig, load_settings

CHART = Path(__file__).resolve().parents[2] / "helm" / "oversight"
NAMESPACE = "oversight-ns"
K8S_VERSIONS = ["1.25.0", kubernetes_validate.latest_version()]
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@functools.cache
def _chart_job_templates(scenario: str) -> tuple[tuple[str, str], ...]:
    values = None if scenario == "default" else yaml.safe_load((CHART / "ci" / f"{scenario}-values.yaml").read_text())
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name="oversight", namespace=NAMESPACE)
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc and doc["kind"] == "ConfigMap" and doc["metadata"]["name"].endswith("-jobs"):
                return tuple(sorted(doc["data"].items()))
    raise AssertionError("the chart rendered no jobs ConfigMap")


def mount(tmp_path: Path, scenario: str) -> Path:
    """The jobs ConfigMap as pods see it at /etc/oversight-jobs."""
    d = tmp_path / "oversight-jobs"
    d.mkdir()
    for name, text in _chart_job_templates(scenario):
        (d / name).write_text(text)
    return d


def request(kind: str = "rm_update", rid: str = "rm_update-0123456789abcdef", **extra: Any) -> dict[str, Any]:
    return {
        "id": rid,
        "kind": kind,
        "key": "chat:17",
        "stream": "chat",
        "payload": {"events": [17], "signal": "response_length"},
        "created_at": 1_767_225_600.0,
        **extra,
    }


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


@pytest.mark.parametrize("kind", ["rm_update", "retrain", "rm_training"])
def test_jobs_validate_against_the_kubernetes_schema(tmp_path: Path, kind: str) -> None:
    sink = KubernetesJobSink(KubernetesJobConfig(templates_dir=str(mount(tmp_path, "postgres-kafka-ha"))))
    rid = f"{kind}-0123456789abcdef"
    job = sink.build_job(request(kind, rid, stream="Chat / EU \u00e9\n<x>"))
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(job, version, strict=True)
    meta = job["metadata"]
    assert "generateName" not in meta
    assert DNS_LABEL.match(meta["name"]) and len(meta["name"]) <= 63
    assert meta["name"].startswith(f"oversight-{kind.replace('_', '-')}-")
    assert meta["namespace"] == NAMESPACE
    pod_meta = job["spec"]["template"]["metadata"]
    for m in (meta, pod_meta):
        labels = m["labels"]
        assert labels["oversight.io/request-id"] == rid
        assert labels["oversight.io/kind"] == kind
        assert LABEL_VALUE.match(labels["oversight.io/stream"]) and len(labels["oversight.io/stream"]) <= 63
        assert labels["app.kubernetes.io/instance"] == "oversight"  # the chart's labels are kept
        assert m["annotations"] == {
            "oversight.io/request-id": rid,
            "oversight.io/stream": "Chat / EU \u00e9\n<x>",
            "oversight.io/request-key": "chat:17",
        }
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = env_of(container)
    assert env["ACTION_REQUEST_ID"] == rid
    assert env["ACTION_REQUEST_KIND"] == kind
    assert env["ACTION_REQUEST_STREAM"] == "Chat / EU \u00e9\n<x>"
    assert json.loads(env["ACTION_REQUEST_PAYLOAD"]) == {"events": [17], "signal": "response_length"}


def test_rm_update_job_runs_oversight_rm_update_for_the_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = KubernetesJobSink(KubernetesJobConfig(templates_dir=str(mount(tmp_path, "postgres-kafka-ha"))))
    job = sink.build_job(request())
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"][:2] == ["rm", "update"]
    assert container["args"][-2:] == ["--request", "rm_update-0123456789abcdef"]
    # The chart's secret environment stays, and what the sink adds does not trip the CLI's refusal of
    # unknown OVERSIGHT_* variables.
    assert {"OVERSIGHT_SAMPLING__KEY", "OVERSIGHT_DATABASE__URL"} <= set(env_of(container))
    for name, value in env_of(container).items():
        if value is not None:
            monkeypatch.setenv(name, value)
    assert load_settings(None, ["dev=true"]).dev


def test_rm_update_job_arguments_are_an_oversight_command(tmp_path: Path) -> None:
    sink = KubernetesJobSink(KubernetesJobConfig(templates_dir=str(mount(tmp_path, "postgres-kafka-ha"))))
    (container,) = sink.build_job(request())["spec"]["template"]["spec"]["containers"]
    parser = build_parser()
    try:
        args = parser.parse_args(container["args"])
    except SystemExit as e:
        pytest.fail(f"`oversight {' '.join(container['args'])}` is not a CLI command yet (exit {e.code})")
    assert args.request == "rm_update-0123456789abcdef"


@pytest.mark.parametrize("kind", ["retrain", "rm_training"])
def test_a_user_training_job_keeps_the_training_image_arguments(tmp_path: Path, kind: str) -> None:
    """jobs.retrain and jobs.rmTraining (a brought-in judge's owner retrains it) run the user's image."""
    sink = KubernetesJobSink(KubernetesJobConfig(templates_dir=str(mount(tmp_path, "postgres-kafka-ha"))))
    template = sink.template(kind)
    job = sink.build_job(request(kind, f"{kind}-0123456789abcdef"))
    before = template["spec"]["template"]["spec"]["containers"][0]
    after = job["spec"]["template"]["spec"]["containers"][0]
    # The image is not ours: the request reaches it through the environment only.
    assert after.get("args") == before.get("args")
    assert after.get("command") == before.get("command")
    assert after["image"] == before["image"]
    # Everything but metadata, the first container's env and args is the chart's template as rendered.
    for doc in (template, job):
        doc.pop("metadata")
        doc["spec"]["template"].pop("metadata")
        doc["spec"]["template"]["spec"]["containers"][0].pop("env", None)
    assert job == template


def test_names_are_deterministic_and_distinct(tmp_path: Path) -> None:
    sink = KubernetesJobSink(KubernetesJobConfig(templates_dir=str(mount(tmp_path, "postgres-kafka-ha"))))
    a1 = sink.build_job(request(rid="rm_update-aaaaaaaaaaaaaaaa"))
    a2 = sink.build_job(request(rid="rm_update-aaaaaaaaaaaaaaaa"))
    b = sink.build_job(request(rid="rm_update-aaaaaaaaaaaaaaab"))
    # A second delivery builds the same Job, which the API server refuses with 409 (counted as delivered).
    assert a1 == a2
    assert a1["metadata"]["name"] != b["metadata"]["name"]
    long_prefix = "a-very-long-release-name-that-fills-most-of-the-job-name-oversight-rm-update-"
    names = {job_name(long_prefix, f"rm_update-{i:016x}") for i in range(200)}
    assert len(names) == 200
    assert all(DNS_LABEL.match(n) and len(n) <= 63 for n in names)
    assert job_name("x-", "UPPER_and.dots") != job_name("x-", "upper-and-dots")


def test_label_values_are_sanitised_without_collisions() -> None:
    assert label_value("chat") == "chat"
    assert label_value("") == ""
    for raw in ("a/b", "a b", "-lead", "trail.", "\u00e9t\u00e9", "x" * 64, "\n", "a\u202eb"):
        v = label_value(raw)
        assert LABEL_VALUE.match(v) and len(v) <= 63, raw
    assert label_value("a/b") != label_value("a b")


def test_namespace_from_the_configuration_wins(tmp_path: Path) -> None:
    cfg = KubernetesJobConfig(templates_dir=str(mount(tmp_path, "postgres-kafka-ha")), namespace="training")
    job = KubernetesJobSink(cfg).build_job(request())
    assert job["metadata"]["namespace"] == "training"
    kubernetes_validate.validate(job, K8S_VERSIONS[-1], strict=True)


def test_missing_template_is_a_permanent_failure(tmp_path: Path) -> None:
    # The default values render no retraining template (no image configured).
    sink = KubernetesJobSink(KubernetesJobConfig(templates_dir=str(mount(tmp_path, "default"))))
    kubernetes_validate.validate(sink.build_job(request()), K8S_VERSIONS[-1], strict=True)
    with pytest.raises(SinkError, match=r"retrain-job\.yaml.*jobs\.retrain\.image\.repository") as e:
        sink.send(request("retrain", "retrain-0123456789abcdef"))
    assert e.value.permanent
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "rm-update-job.yaml").write_text("apiVersion: v1\nkind: Pod\n")
    with pytest.raises(SinkError, match="not a batch/v1 Job"):
        KubernetesJobSink(KubernetesJobConfig(templates_dir=str(tmp_path / "other"))).build_job(request())


class _StandInApiServer:
    """A STAND-IN for the Kubernetes API server (there is none here): answers POST .../jobs as scripted
    (``mode``: created | conflict | forbidden | unavailable | silent, which reads the request and never
    answers | drip, which answers its headers a byte every 0.2 s, for ever)."""

    def __init__(self, mode: str):
        import socket
        import threading

        self.mode = mode
        self.requests: list[bytes] = []
        self.heads: list[bytes] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self._held: list[Any] = []
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
            while len(body) < length:
                body += conn.recv(65536)
            self.requests.append(body)
            self.heads.append(head)
            if self.mode == "drip":
                threading.Thread(target=drip_headers, args=(conn, b"HTTP/1.1 201 Created"), daemon=True).start()
                self._held.append(conn)
                continue
            if self.mode in ("forbidden", "unavailable"):
                status = "403 Forbidden" if self.mode == "forbidden" else "503 Service Unavailable"
                conn.sendall(f"HTTP/1.1 {status}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}".encode())
                conn.close()
                continue
            if self.mode == "silent":
                self._held.append(conn)  # read, never answered
                continue
            manifest = json.loads(body)
            if self.mode == "conflict":
                status, answer = "409 Conflict", {"kind": "Status", "code": 409, "reason": "AlreadyExists"}
            else:
                status = "201 Created"
                answer = {**manifest, "metadata": {**manifest["metadata"], "uid": "uid-1"}}
            out = json.dumps(answer).encode()
            conn.sendall(
                f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(out)}\r\n"
                f"Connection: close\r\n\r\n".encode()
                + out
            )
            conn.close()

    def close(self) -> None:
        self._sock.close()
        for c in self._held:
            c.close()


@pytest.mark.parametrize("mode", ["created", "conflict", "forbidden", "unavailable", "silent", "drip"])
def test_create_job_against_a_stand_in_api_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """The one function that calls the cluster, against a STAND-IN API server. Without a request
    timeout, a server that took the request and never answered held the action worker for good; the
    client's own timeout bounds each read, so one that answered a byte at a time (``drip``) still did."""
    import time

    import kubernetes.client
    import kubernetes.config

    server = _StandInApiServer(mode)

    def in_cluster() -> None:
        cfg = kubernetes.client.Configuration()
        cfg.host = server.url
        cfg.api_key = {"BearerToken": "bearer sa-token"}  # as the in-cluster loader sets it
        kubernetes.client.Configuration.set_default(cfg)

    monkeypatch.setattr(kubernetes.config, "load_incluster_config", in_cluster)
    sink = KubernetesJobSink(
        KubernetesJobConfig(templates_dir=str(mount(tmp_path, "default")), namespace=NAMESPACE, timeout_s=1.0)
    )
    t0 = time.monotonic()
    try:
        if mode in ("silent", "drip", "forbidden", "unavailable"):
            with pytest.raises(SinkError) as e:
                sink.send(request())
            assert e.value.permanent == (mode == "forbidden") and "Kubernetes API" in str(e.value)
            assert time.monotonic() - t0 < 10
        else:
            out = sink.send(request())
            assert out["namespace"] == NAMESPACE and out["created"] == (mode == "created")
            assert DNS_LABEL.match(out["name"]) and out.get("uid") == ("uid-1" if mode == "created" else None)
        [sent] = server.requests
        assert json.loads(sent)["metadata"]["labels"]["oversight.io/kind"] == "rm_update"
        assert server.heads[0].startswith(f"POST /apis/batch/v1/namespaces/{NAMESPACE}/jobs ".encode())
        assert b"\r\nauthorization: bearer sa-token" in server.heads[0].lower()
    finally:
        server.close()
