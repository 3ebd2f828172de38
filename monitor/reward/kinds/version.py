"""Versions of the non-built-in kinds, in the same registry as the built-in model.

A registered version is a folder under ``reward.models_dir`` named by its content id, holding
``kind.json``: the kind, its configuration (without secrets: the API key is an environment
variable's *name*) and its identity: for ``hf`` the SHA-256 over the checkpoint directory's files,
for ``judge`` and ``http`` the endpoint, the model name and the rubric's SHA-256. The id is
``<kind>-`` + 12 hex digits of a hash over the kind, the identity and the configuration that
changes scores (timeouts, retries and the key's variable do not): registering the same thing twice
is a no-op, and a changed checkpoint, endpoint, model or rubric is a new version that the gate
must pass. Loading an ``hf`` version checks the directory's hash again and refuses a checkpoint
changed in place, like the built-in model refuses a changed base encoder.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from monitor.reward.kinds.base import BackendError, BuiltinBackend, ScoringBackend
from monitor.reward.kinds.config import CONFIGS, HfConfig, HttpJsonConfig, JudgeConfig
from monitor.reward.kinds.resilience import BackendMetrics

KIND_FILE = "kind.json"
FORMAT = "oversight-reward-kind"
# Operational settings: they change how a version is called, not what it scores.
_NOT_IDENTITY = frozenset({"resilience", "api_key_env", "device", "batch_size", "max_batch"})
# Settings added later: unset, they stay out of the hash, so versions registered before them keep their id.
_OPTIONAL = frozenset({"lora", "calibration"})


def dir_sha256(path: Path) -> str:
    """SHA-256 over the relative names and contents of every file under ``path`` (sorted)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise BackendError(f"{path} holds no files")
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() + b"\x00")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\x00")
    return h.hexdigest()


def parse_config(kind: str, raw: dict[str, Any]) -> Any:
    if kind not in CONFIGS:
        raise BackendError(f"unknown reward-model kind {kind!r} (known: builtin, {', '.join(CONFIGS)})")
    try:
        return CONFIGS[kind].model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or kind
        raise BackendError(f"{kind} config: {where}: {first['msg']} ({e.error_count()} problem(s))") from None


def identity_of(kind: str, cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, HfConfig):
        path = Path(cfg.path)
        if not path.is_dir():
            raise BackendError(f"hf checkpoint {path} is not a directory")
        return {"checkpoint_sha256": dir_sha256(path)}
    out: dict[str, Any]
    if isinstance(cfg, JudgeConfig):
        out = {
            "endpoint": cfg.base_url,
            "model": cfg.model,
            "rubric_sha256": hashlib.sha256(cfg.rubric.encode()).hexdigest(),
        }
    else:
        assert isinstance(cfg, HttpJsonConfig), kind
        out = {"endpoint": cfg.url, "model": cfg.extra_body.get("model"), "rubric_sha256": None}
    if cfg.calibration is not None:
        blob = json.dumps(cfg.calibration.model_dump(), sort_keys=True).encode()
        out["calibration_sha256"] = hashlib.sha256(blob).hexdigest()
    return out


class KindVersion:
    """A version of a non-built-in kind, shaped like ``RewardModel`` for ``Registry.register``
    (``version``, ``parent``, ``metadata``, ``save``)."""

    def __init__(self, kind: str, config: Any, identity: dict[str, Any], metadata: dict[str, Any] | None = None):
        self.kind = kind
        self.config = config
        self.identity = identity
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.parent: str | None = None

    @classmethod
    def create(cls, kind: str, raw: dict[str, Any], description: str | None = None) -> KindVersion:
        cfg = parse_config(kind, raw)
        identity = identity_of(kind, cfg)  # first: a missing or empty checkpoint folder is said as such
        if isinstance(cfg, HfConfig):
            from monitor.reward.kinds.hf import check_checkpoint

            check_checkpoint(cfg)  # a broken checkpoint fails here, not at every scoring after activation
            if cfg.lora is not None:
                from monitor.reward.kinds.lora import require_peft

                require_peft()  # fail at registration, not at the first update
        meta: dict[str, Any] = {"training": {"description": description or f"{kind} registered by hand"}}
        return cls(kind, cfg, identity, meta)

    @property
    def version(self) -> str:
        scored = {
            k: v
            for k, v in self.config.model_dump().items()
            if k not in _NOT_IDENTITY and not (k in _OPTIONAL and v is None)
        }
        blob = json.dumps({"kind": self.kind, "identity": self.identity, "config": scored}, sort_keys=True)
        return f"{self.kind}-" + hashlib.sha256(blob.encode()).hexdigest()[:12]

    def record(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "kind": self.kind,
            "version": self.version,
            "config": self.config.model_dump(),
            "identity": self.identity,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def save(self, path: str | Path) -> Path:
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        (root / KIND_FILE).write_text(json.dumps(self.record(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        card = [f"# Reward model {self.version} ({self.kind})", "", "## Identity", ""]
        card += [f"* {k}: {v}" for k, v in sorted(self.identity.items())]
        card += ["", "Configuration: kind.json (no secrets; the API key is read from the named variable).", ""]
        (root / "MODEL_CARD.md").write_text("\n".join(card), encoding="utf-8")
        return root


def kind_of(path: str | Path) -> str:
    return (
        str(json.loads((Path(path) / KIND_FILE).read_text(encoding="utf-8"))["kind"])
        if (Path(path) / KIND_FILE).is_file()
        else "builtin"
    )


def load_backend(
    path: str | Path,
    *,
    device: str | None = None,
    batch_size: int = 32,
    registry: CollectorRegistry | None = None,
    client: Any = None,
    backend: str = "torch",
    quantisation: str = "fp32",
    precision: str = "fp32",
    threads: int | None = None,
) -> ScoringBackend:
    """The backend of the version folder ``path``: a ``kind.json`` names the kind, otherwise it is
    a built-in model folder, scored with ``backend`` (``reward.backend``: torch, onnx or auto) at
    ``quantisation`` (ONNX) or ``precision`` (PyTorch on the CPU), its ONNX Runtime session on
    ``threads`` (None: one per core). Raises BackendError (or the built-in's ValueError/OSError)."""
    root = Path(path)
    metrics = BackendMetrics.on(registry)
    if not (root / KIND_FILE).is_file():
        from monitor.reward.model import RewardModel

        model = RewardModel.load(root, device=device)
        # The built-in encoder in ONNX Runtime, or a TorchScript trace of it on the CPU, in bf16 where
        # the CPU multiplies bf16 faster (reward.backend, reward.quantisation, reward.precision); on a
        # GPU, PyTorch as loaded.
        model.use_backend(backend, "int8" if quantisation == "int8" else "fp32", precision, threads=threads)
        return BuiltinBackend(model, batch_size)
    rec = json.loads((root / KIND_FILE).read_text(encoding="utf-8"))
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        raise BackendError(f"{root}: {KIND_FILE} is not an {FORMAT} record")
    if not all(key in rec for key in ("kind", "config", "version")):
        raise BackendError(f"{root}: {KIND_FILE} lacks kind, config or version")
    kind, cfg, version = str(rec["kind"]), parse_config(str(rec["kind"]), rec["config"]), str(rec["version"])
    try:
        if isinstance(cfg, HfConfig):
            from monitor.reward.kinds.hf import HfBackend

            now = dir_sha256(Path(cfg.path))
            if now != rec["identity"]["checkpoint_sha256"]:
                raise BackendError(
                    f"{root}: checkpoint {cfg.path} changed since it was registered (sha256 {now[:12]}, registered "
                    f"{rec['identity']['checkpoint_sha256'][:12]}): register it as a new version"
                )
            return HfBackend(cfg, version, metrics, device=device)
        remote: ScoringBackend
        if isinstance(cfg, JudgeConfig):
            from monitor.reward.kinds.judge import JudgeBackend

            remote = JudgeBackend(cfg, version, metrics, client)
        else:
            from monitor.reward.kinds.http_json import HttpJsonBackend

            remote = HttpJsonBackend(cfg, version, metrics, client)
        if cfg.calibration is not None:
            from monitor.reward.kinds.calibration import Calibrated

            return Calibrated(remote, cfg.calibration)
        return remote
    except ValueError as e:  # the API key's variable is unset
        raise BackendError(f"{kind} version {version}: {e}") from None
