"""Models the tests build locally from the bundled weights (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path


def untrained_hf_checkpoint(dest: Path) -> Path:
    """A ``BertForSequenceClassification`` with an untrained scoring head on the bundled MiniLM
    encoder, saved with its tokenizer: a real ``hf`` reward model whose scores need not mean
    anything (the inference tests count scores, they do not judge them)."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from monitor.reward.model import packaged_encoder_dir

    torch.manual_seed(0)
    src = packaged_encoder_dir()
    model = BertForSequenceClassification.from_pretrained(src, num_labels=1, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)  # type: ignore[no-untyped-call, unused-ignore]
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest
