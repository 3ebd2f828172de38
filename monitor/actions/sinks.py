"""Where action requests go: Kafka, a signed webhook, a Kubernetes Job, or the log.

The contract is one method, ``Sink.send(request) -> dict``: ``request`` is a row of
``action_requests`` (``id``, ``kind``, ``key``, ``stream``, ``payload``, ``created_at``); it
returns a small JSON-able result that :mod:`monitor.actions.dispatch` stores, and raises
:class:`SinkError` when the request was not delivered (``permanent`` says whether trying
again could help). The request id is the idempotency key everywhere: the monitor may deliver a
request twice after a crash (see :mod:`monitor.actions.dispatch`), and receivers drop repeats
by that key (Kafka header ``oversight.idempotency_key``, HTTP header ``Idempotency-Key``, the
Job's deterministic name).

The body every sink sends is :func:`request_message`, JSON with sorted keys and ASCII escapes:
the stream name and payload come from monitored traffic and are untrusted text.
"""

from __future__ import annotations

import abc
import copy
import email.utils
import hashlib
import hmac
import http.client
import json
import logging
import re
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote

from monitor.deadline_http import DeadlineClient, DeadlineExceeded

if TYPE_CHECKING:
    from monitor.config import KafkaConfig, KubernetesJobConfig, Settings, WebhookConfig

log = logging.getLogger("monitor.actions")

# rm_training: a brought-in remote reward model asks its owner's pipeline to retrain (monitor/reward/kinds/updates.py).
KINDS = ("retrain", "rm_update", "rm_training")
SCHEMA_VERSION = 1
IDEMPOTENCY_HEADER = "oversight.idempotency_key"
KIND_HEADER = "oversight.kind"
# A receiver asking for a longer pause than this is retried after this long: the request's
# lease in dispatch must outlast all retries of one delivery.
MAX_RETRY_DELAY_S = 120.0
LABEL_PREFIX = "oversight.io/"
# The oversight CLI refuses unknown OVERSIGHT_* variables, so the request reaches the Job
# container under another prefix.
ENV_PREFIX = "ACTION_REQUEST_"
MAX_ENV_PAYLOAD_BYTES = 32 * 1024
JOB_TEMPLATES = {
    "rm_update": "rm-update-job.yaml",
    "retrain": "retrain-job.yaml",
    "rm_training": "rm-training-job.yaml",
}
SINK_NAMES = ("kafka", "webhook", "kubernetes", "log")


class SinkError(RuntimeError):
    """A request was not delivered. ``permanent``: the receiver refused it; retrying will not help."""

    def __init__(self, message: str, *, permanent: bool):
        super().__init__(message)
        self.permanent = permanent


class Sink(abc.ABC):
    name: ClassVar[str]

    @abc.abstractmethod
    def send(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Deliver one request (idempotency key: its id); returns a small result, raises SinkError."""

    def close(self) -> None:  # noqa: B027 (most sinks hold nothing)
        """Release connections."""


def request_message(request: Mapping[str, Any]) -> dict[str, Any]:
    """The body every sink delivers; raises a permanent SinkError for a malformed request."""
    rid, kind = request.get("id"), request.get("kind")
    if not isinstance(rid, str) or not rid:
        raise SinkError("request has no id", permanent=True)
    if kind not in KINDS:
        raise SinkError(f"request {rid}: unknown kind {kind!r}", permanent=True)
    payload = request.get("payload")
    return {
        "schema_version": SCHEMA_VERSION,
        "id": rid,
        "kind": kind,
        "key": request.get("key"),
        "stream": request.get("stream"),
        "payload": payload if payload is not None else {},
        "created_at": request.get("created_at"),
    }


def encode(obj: Any) -> bytes:
    """Canonical JSON: sorted keys, ASCII escapes (no raw control or bidi characters), no NaN."""
    try:
        return json.dumps(obj, sort_keys=True, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as e:
        raise SinkError(f"request is not JSON-serialisable: {e}", permanent=True) from None


def _printable(text: object, limit: int = 300) -> str:
    """Receiver-supplied text (reason phrases, API messages) made safe for logs and last_error."""
    s = str(text)
    s = "".join(c if " " <= c <= "~" else "?" for c in s)
    return s if len(s) <= limit else s[: limit - 3] + "..."


# --- Kafka ---------------------------------------------------------------------------------------------


class KafkaSink(Sink):
    """Publishes the request to ``kafka.retrain_topic``, keyed by stream, and waits for the broker's ack."""

    name = "kafka"

    def __init__(self, cfg: KafkaConfig, ack_timeout_s: float = 30.0):
        self.topic = cfg.retrain_topic
        self._cfg = cfg
        self._timeout = ack_timeout_s
        self._producer: Any = None
        self._connected()  # a broker down when the sink is built: it is built again next round

    def _connected(self) -> Any:
        if self._producer is None:
            from kafka import KafkaProducer

            from monitor.sources.kafka import client_security

            self._producer = KafkaProducer(
                bootstrap_servers=self._cfg.bootstrap_servers, acks="all", retries=5, **client_security(self._cfg)
            )
        return self._producer

    def send(self, request: Mapping[str, Any]) -> dict[str, Any]:
        from kafka.errors import KafkaError, MessageSizeTooLargeError

        from monitor.sources.kafka import discard_producer

        msg = request_message(request)
        stream = msg["stream"]
        try:
            future = self._connected().send(
                self.topic,
                key=None if stream is None else str(stream).encode(),
                value=encode(msg),
                headers=[(IDEMPOTENCY_HEADER, msg["id"].encode()), (KIND_HEADER, msg["kind"].encode())],
            )
            md = future.get(timeout=self._timeout)
        except MessageSizeTooLargeError as e:
            raise SinkError(f"Kafka refused the message: {_printable(e)}", permanent=True) from e
        except KafkaError as e:
            producer, self._producer = self._producer, None
            if producer is not None:
                discard_producer(producer)
            raise SinkError(f"Kafka: {_printable(e)}", permanent=False) from e
        return {"topic": md.topic, "partition": md.partition, "offset": md.offset}

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=10)


# --- webhook -------------------------------------------------------------------------------------------


def read_secret(path: str) -> bytes:
    """The HMAC secret; one trailing line break is not part of it (files made with ``echo``)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SinkError(f"cannot read the webhook secret file {path}: {e.strerror}", permanent=True) from None
    data = data.removesuffix(b"\n").removesuffix(b"\r")
    if not data:
        raise SinkError(f"the webhook secret file {path} is empty", permanent=True)
    return data


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def _retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]{1,9}", value):  # ASCII digits: isdigit() took "²", which float() refuses
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


class WebhookSink(Sink):
    """POSTs the request as JSON, signed with HMAC-SHA256, retrying transient failures with backoff.

    Headers: ``X-Oversight-Signature: sha256=<hex HMAC of the raw body>``, ``X-Oversight-Timestamp``
    (Unix seconds, also in the signed body as ``sent_at``, so a receiver can refuse old replays),
    ``Idempotency-Key: <request id>``. Retried: connection errors, timeouts, 5xx, 408 and 429
    (after ``Retry-After`` when given, at most MAX_RETRY_DELAY_S), up to ``max_attempts`` in all,
    ``backoff_s`` doubling between them. Other statuses (4xx, 3xx) fail at once.
    The secret file is read at every delivery, so a rotated Kubernetes secret takes effect.
    """

    name = "webhook"

    def __init__(
        self,
        cfg: WebhookConfig,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
    ):
        from monitor.config import ConfigError, http_url

        if not cfg.url:
            raise ConfigError("actions.webhook.url is required for the webhook sink")
        try:
            http_url(cfg.url)
        except ValueError as e:  # "http://[::1": Invalid IPv6 URL
            raise ConfigError(f"actions.webhook.url: {e}") from None
        if not cfg.secret_file:
            # Unsigned requests to a retraining trigger could not be told from forged ones.
            raise ConfigError("actions.webhook.secret_file is required for the webhook sink")
        try:
            read_secret(cfg.secret_file)
        except SinkError as e:
            raise ConfigError(str(e)) from None
        self.cfg = cfg
        self.url: str = cfg.url
        self.secret_file: str = cfg.secret_file
        self._sleep = sleep
        self._clock = clock
        # A whole-exchange deadline (monitor/deadline_http.py): urllib's timeout bounded each read,
        # and a receiver sending its headers a byte a second held the dispatch thread, and every
        # other request behind it, for hours, with nothing counted. Redirects are not followed
        # (a 3xx is a permanent failure): a redirected POST becomes a body-less GET elsewhere.
        self._http = DeadlineClient("webhook", max_connections=2)

    def send(self, request: Mapping[str, Any]) -> dict[str, Any]:
        msg = request_message(request)
        last = ""
        for attempt in range(1, self.cfg.max_attempts + 1):
            secret = read_secret(self.secret_file)
            now = self._clock()
            ts = int(now)
            body = encode({**msg, "sent_at": ts})
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "oversight-monitor",
                "X-Oversight-Signature": sign(secret, body),
                "X-Oversight-Timestamp": str(ts),
                "X-Oversight-Kind": msg["kind"],
                "Idempotency-Key": msg["id"],
            }
            wait: float | None = None
            try:
                answer = self._http.post(self.url, body, headers, timeout_s=self.cfg.timeout_s, max_bytes=64 * 1024)
            except DeadlineExceeded:
                last = f"no complete answer within {self.cfg.timeout_s} s"
            except Exception as e:  # httpx's transport errors (refused, reset, TLS, a bad address)
                last = f"connection error: {_printable(f'{type(e).__name__}: {e}', 120)}"
            else:
                status = answer.status
                if 200 <= status < 300:
                    return {"status": status, "attempts": attempt}
                last = f"HTTP {status} {_printable(http.client.responses.get(status, ''), 80)}".rstrip()
                if not (status >= 500 or status in (408, 429)):
                    raise SinkError(f"permanent failure: {last}", permanent=True)
                wait = _retry_after(answer.headers.get("retry-after"), now)
            if attempt < self.cfg.max_attempts:
                delay = wait if wait is not None else self.cfg.backoff_s * 2 ** (attempt - 1)
                log.info("webhook delivery of %s failed (%s), attempt %d; retrying", msg["id"], last, attempt)
                self._sleep(min(delay, MAX_RETRY_DELAY_S))
        raise SinkError(f"transient failure, gave up after {self.cfg.max_attempts} attempts: {last}", permanent=False)

    def close(self) -> None:
        self._http.close()


# --- Kubernetes Job ------------------------------------------------------------------------------------

_LABEL_VALUE = re.compile(r"^(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def _digest(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def label_value(text: str) -> str:
    """A valid label value for any string: unchanged when it already is one, else a readable part and a hash."""
    if _LABEL_VALUE.match(text):
        return text
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-_.")[:54].strip("-_.")
    # The hash keeps distinct inputs distinct after the lossy replacement.
    return f"{readable}-{_digest(text)}" if readable else _digest(text)


def job_name(prefix: str, rid: str) -> str:
    """A deterministic DNS-1123 label (at most 63: Kubernetes copies a Job's name into a pod label)."""
    suffix = re.sub(r"[^a-z0-9-]+", "-", rid.lower()).strip("-")
    if suffix != rid or len(suffix) > 40:
        suffix = f"{suffix[:30].strip('-')}-{_digest(rid)}".strip("-")
    prefix = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).lstrip("-")
    if prefix and not prefix.endswith("-"):
        prefix += "-"
    return (prefix[: 63 - len(suffix)] + suffix).lstrip("-")


def _set_env(container: dict[str, Any], values: Mapping[str, str]) -> None:
    env = [e for e in container.get("env") or [] if e.get("name") not in values]
    env.extend({"name": k, "value": v} for k, v in values.items())
    container["env"] = env


def _pod_namespace() -> str | None:
    try:
        return Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read_text().strip() or None
    except OSError:
        return None


def create_job(manifest: dict[str, Any], namespace: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """Create the Job with the pod's service-account credentials; a Job of that name already there is success.

    The only code that talks to the API server (the tests run it against a STAND-IN server: there
    is no cluster here). ``timeout_s`` bounds the whole exchange (``monitor.deadline_http``): the
    Kubernetes client's own request timeout bounds each socket read, so an API server, or a proxy
    before it, that answered a byte at a time held the action worker's dispatch thread, and every
    request behind it, for as long as it liked (and one that never answered, for good). The client
    library still reads the in-cluster configuration: the address, the CA and the (rotated) token.
    """
    import httpx
    from kubernetes import client, config

    load_config: Any = config.load_incluster_config
    load_config()
    cfg: Any = client.Configuration.get_default_copy()
    name = manifest["metadata"]["name"]
    url = f"{str(cfg.host).rstrip('/')}/apis/batch/v1/namespaces/{quote(namespace, safe='')}/jobs"
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    for auth in cfg.auth_settings().values():  # the bearer token, however this client names it
        if auth.get("in") == "header" and auth.get("value"):
            headers[str(auth["key"])] = str(auth["value"])
    api = DeadlineClient("kubernetes", max_connections=1, verify=_tls(cfg))
    try:
        answer = api.post(url, json.dumps(manifest).encode(), headers, timeout_s=timeout_s, max_bytes=1 << 20)
    except DeadlineExceeded:
        raise SinkError(f"Kubernetes API: no complete answer within {timeout_s} s", permanent=False) from None
    except (httpx.HTTPError, OSError, ValueError) as e:  # refused, reset, TLS, a bad address: try again later
        raise SinkError(f"Kubernetes API: {_printable(f'{type(e).__name__}: {e}', 200)}", permanent=False) from None
    finally:
        api.close()
    if answer.status == 409:
        # The name is derived from the request id: this request's Job exists (an earlier delivery).
        return {"name": name, "namespace": namespace, "created": False}
    if not 200 <= answer.status < 300:
        transient = answer.status >= 500 or answer.status in (408, 429)
        reason = http.client.responses.get(answer.status, "")
        body = answer.body.decode("utf-8", "replace")
        detail = f"{answer.status} {_printable(reason, 80)}: {_printable(body, 200)}"
        raise SinkError(f"Kubernetes API: {detail}", permanent=not transient)
    try:
        created = json.loads(answer.body)["metadata"]
        return {"name": str(created["name"]), "namespace": namespace, "uid": created.get("uid"), "created": True}
    except (ValueError, TypeError, KeyError):  # created, with an answer that says less than it should
        return {"name": name, "namespace": namespace, "uid": None, "created": True}


def _tls(cfg: Any) -> ssl.SSLContext | bool:
    """Verification as the in-cluster configuration says: the service account's CA."""
    if not getattr(cfg, "verify_ssl", True):
        return False
    return ssl.create_default_context(cafile=cfg.ssl_ca_cert) if getattr(cfg, "ssl_ca_cert", None) else True


class KubernetesJobSink(Sink):
    """Creates a Job from the chart's template for the request's kind (``templates_dir``/<kind>-job.yaml).

    The Job gets a name derived from the request id (a second delivery meets 409 Conflict, which counts
    as delivered), labels ``oversight.io/request-id``, ``/kind``, ``/stream`` (sanitised) on the Job and
    its pods, the exact values as annotations, and the request in the first container's environment
    (``ACTION_REQUEST_ID``, ``_KIND``, ``_KEY``, ``_STREAM``, ``_PAYLOAD`` as JSON); an rm_update Job's
    ``oversight rm update`` also gets ``--request <id>``.
    """

    name = "kubernetes"

    def __init__(self, cfg: KubernetesJobConfig):
        import importlib.util

        # The client is the optional `k8s` extra: a missing one fails when the sink is configured, not
        # at the first request. Looked up, not imported (it takes a second): create_job imports it.
        if importlib.util.find_spec("kubernetes") is None:
            from monitor.config import ConfigError

            raise ConfigError(
                "action sink 'kubernetes' needs the Kubernetes client, which the default install leaves out:"
                " pip install 'oversight-monitor[k8s]'"
            )
        self.cfg = cfg
        self.templates_dir = Path(cfg.templates_dir)

    def template(self, kind: str) -> dict[str, Any]:
        path = self.templates_dir / JOB_TEMPLATES[kind]
        try:
            doc = _load_yaml(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            values = {"retrain": "jobs.retrain", "rm_training": "jobs.rmTraining"}.get(kind)
            hint = f" (set {values}.image.repository in the chart)" if values else ""
            raise SinkError(f"no Job template {path}{hint}", permanent=True) from None
        except (OSError, ValueError) as e:
            raise SinkError(f"cannot read the Job template {path}: {e}", permanent=True) from None
        if not isinstance(doc, dict) or doc.get("kind") != "Job" or doc.get("apiVersion") != "batch/v1":
            raise SinkError(f"{path} is not a batch/v1 Job manifest", permanent=True)
        return doc

    def build_job(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """The Job manifest for a request (deterministic: the same request gives the same manifest)."""
        msg = request_message(request)
        rid, kind = msg["id"], msg["kind"]
        stream = "" if msg["stream"] is None else str(msg["stream"])
        job = copy.deepcopy(self.template(kind))
        meta = job.setdefault("metadata", {})
        prefix = meta.pop("generateName", None) or meta.get("name") or f"oversight-{kind}-"
        meta["name"] = job_name(prefix, rid)
        namespace = self.cfg.namespace or meta.get("namespace") or _pod_namespace()
        if not namespace:
            raise SinkError("no namespace: set actions.kubernetes.namespace", permanent=True)
        meta["namespace"] = namespace
        labels = {
            f"{LABEL_PREFIX}request-id": label_value(rid),
            f"{LABEL_PREFIX}kind": kind,
            f"{LABEL_PREFIX}stream": label_value(stream),
        }
        annotations = {f"{LABEL_PREFIX}request-id": rid, f"{LABEL_PREFIX}stream": stream}
        if msg["key"] is not None:
            annotations[f"{LABEL_PREFIX}request-key"] = str(msg["key"])
        pod_meta = job.setdefault("spec", {}).setdefault("template", {}).setdefault("metadata", {})
        for m in (meta, pod_meta):
            m["labels"] = {**(m.get("labels") or {}), **labels}
            m["annotations"] = {**(m.get("annotations") or {}), **annotations}
        containers = job["spec"]["template"].get("spec", {}).get("containers") or []
        if not containers:
            raise SinkError(f"the {kind} Job template has no container", permanent=True)
        first = containers[0]
        payload = encode(msg["payload"]).decode()
        if len(payload) > MAX_ENV_PAYLOAD_BYTES:
            raise SinkError(f"request payload over {MAX_ENV_PAYLOAD_BYTES} bytes", permanent=True)
        _set_env(
            first,
            {
                f"{ENV_PREFIX}ID": rid,
                f"{ENV_PREFIX}KIND": kind,
                f"{ENV_PREFIX}KEY": "" if msg["key"] is None else str(msg["key"]),
                f"{ENV_PREFIX}STREAM": stream,
                f"{ENV_PREFIX}PAYLOAD": payload,
            },
        )
        if kind == "rm_update":
            first["args"] = [*(first.get("args") or []), "--request", rid]
        return job

    def send(self, request: Mapping[str, Any]) -> dict[str, Any]:
        job = self.build_job(request)
        return create_job(job, job["metadata"]["namespace"], self.cfg.timeout_s)


def _load_yaml(text: str) -> Any:
    import yaml

    from monitor.config import load_yaml

    try:
        return load_yaml(text)
    except yaml.YAMLError as e:
        raise ValueError(f"not valid YAML: {e}") from None


# --- log -----------------------------------------------------------------------------------------------


class LogSink(Sink):
    """Logs the request as one line of ASCII JSON (the embedded default for retraining requests)."""

    name = "log"

    def __init__(self, logger: logging.Logger | None = None):
        self._log = logger or log

    def send(self, request: Mapping[str, Any]) -> dict[str, Any]:
        msg = request_message(request)
        # JSON escapes line breaks and non-ASCII, so a stream name cannot forge extra log lines.
        # WARNING: with this sink the log line is the only trace of the request, so it must show.
        self._log.warning("action request %s", encode(msg).decode())
        return {"logged": True}


def check_sinks(settings: Settings) -> None:
    """Builds, and closes, every configured sink that needs no connection (webhook, kubernetes, log):
    a sink the settings cannot make raises ``ConfigError`` here, at ``config check`` and at the
    start of ``run``. Sinks are built at their first request, so a webhook without a URL or secret
    passed both and then failed every dispatch round, with a traceback each time. The Kafka sink
    needs the broker (``config check`` tests it), so it is left to its first request."""
    a = settings.actions
    kinds: list[list[str]] = [
        list(a.retrain_sinks),
        [n for n in a.rm_update_sinks if n != "local"],
        list(a.rm_training_sinks),
    ]
    for names in kinds:
        offline = names if len(set(names)) != len(names) else [n for n in names if n != "kafka"]  # a repeat: named
        for sink in make_sinks(offline, settings):
            sink.close()


def make_sinks(names: Sequence[str], settings: Settings) -> list[Sink]:
    """The sinks named in ``actions.retrain_sinks`` / ``rm_update_sinks`` ('local' is not a sink)."""
    from monitor.config import ConfigError

    if len(set(names)) != len(names):
        raise ConfigError(f"a sink is named twice: {list(names)}")
    out: list[Sink] = []
    try:
        for n in names:
            if n == "kafka":
                out.append(KafkaSink(settings.kafka))
            elif n == "webhook":
                out.append(WebhookSink(settings.actions.webhook))
            elif n == "kubernetes":
                out.append(KubernetesJobSink(settings.actions.kubernetes))
            elif n == "log":
                out.append(LogSink())
            elif n == "local":
                raise ConfigError("'local' is the embedded rm_update worker, not a sink: it cannot be combined")
            else:
                raise ConfigError(f"unknown action sink {n!r} (one of {', '.join(SINK_NAMES)})")
    except BaseException:
        for s in out:
            s.close()
        raise
    return out
