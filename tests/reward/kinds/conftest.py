"""Fixtures for the reward-model kinds: a real HF sequence-classification checkpoint built from the
bundled MiniLM weights, and the STAND-IN servers of ``standin.py`` for the remote kinds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from standin import StandIn, chat_answer, json_answer, serve


@pytest.fixture
def judge_standin() -> Iterator[StandIn]:
    """STAND-IN for a remote LLM judge: an OpenAI chat-completions server (``{url}/v1``)."""
    yield from serve(chat_answer)


@pytest.fixture
def json_standin() -> Iterator[StandIn]:
    """STAND-IN for a Triton/KServe-style JSON scoring endpoint (``{url}/score``)."""
    yield from serve(json_answer)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory, alpaca_split: dict[str, list[dict[str, Any]]]) -> Path:
    """A real ``BertForSequenceClassification`` (num_labels=1) on the bundled MiniLM weights, its
    head trained for a few Bradley-Terry steps on bundled AlpacaEval pairs, saved with
    ``save_pretrained``."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from monitor.reward.model import packaged_encoder_dir

    src = packaged_encoder_dir()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)  # type: ignore[no-untyped-call, unused-ignore]
    model = BertForSequenceClassification.from_pretrained(src, num_labels=1, local_files_only=True)
    for p in model.bert.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(model.classifier.parameters(), lr=1e-2)
    pairs = alpaca_split["train"][:64]
    for s in range(0, len(pairs), 16):
        chunk = pairs[s : s + 16]

        def logits(key: str, chunk: list[dict[str, Any]] = chunk) -> Any:
            enc = tok(
                [p["prompt"] for p in chunk],
                [p[key] for p in chunk],
                truncation=True,
                max_length=64,
                padding=True,
                return_tensors="pt",
            )
            return model(**enc).logits[:, 0]

        loss = -torch.nn.functional.logsigmoid(logits("chosen") - logits("rejected")).mean()
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    out = tmp_path_factory.mktemp("hf-rm")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
