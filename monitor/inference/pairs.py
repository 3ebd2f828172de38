"""One encoder input for an episode: the pair ``[CLS] prompt [SEP] response [SEP]``.

The built-in reward model and the drift embeddings (``drift.embedding.input: pair``) encode an
episode this same way, so one encoder pass can serve both (``monitor.inference.shared``). When the
pair does not fit in ``max_length`` tokens, the **response keeps its beginning and the prompt keeps
its end**: the prompt gets at most ``max_prompt_tokens`` tokens (more when the response is short),
cut from the left so that the turn right before the response survives (in a multi-turn dialogue,
the request being answered); the response gets the rest, cut from the right.

>>> from transformers import AutoTokenizer
>>> from monitor.signals.embeddings import model_dir
>>> tok = AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)
>>> [(ids, types)] = encode_pairs(tok, ["Say hi."], ["Hi! " * 200], max_length=32, max_prompt_tokens=8)
>>> len(ids), sum(types)  # the prompt fits whole (3 tokens, [CLS] and [SEP]); the response is cut
(32, 27)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# A character cap per token before tokenizing: a pathological text (megabytes, one line) costs
# no more than one that just overflows the limit. No real token is longer on average.
CHARS_PER_TOKEN = 12

Encoded = tuple[list[int], list[int]]  # token ids and token types of one pair


def encode_pairs(
    tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], *, max_length: int, max_prompt_tokens: int
) -> list[Encoded]:
    """Token ids and token types per (prompt, response), truncated as the module says."""
    # The tokenizer's Rust backend (the same one transformers' fast tokenizer calls): it cuts
    # each piece and builds the pair with the tokenizer's own template, on transformers 4 and 5
    # alike (5 dropped prepare_for_model). Its saved truncation/padding settings must not apply.
    backend = tokenizer.backend_tokenizer
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    budget = max_length - backend.num_special_tokens_to_add(True)
    cap = max_length * CHARS_PER_TOKEN
    p_enc = backend.encode_batch([p[-cap:] for p in prompts], add_special_tokens=False)
    r_enc = backend.encode_batch([r[:cap] for r in responses], add_special_tokens=False)
    out = []
    for p, r in zip(p_enc, r_enc, strict=True):
        n_p = min(len(p.ids), max(min(max_prompt_tokens, budget), budget - len(r.ids)))
        p.truncate(n_p, direction="left")  # the prompt keeps its end
        r.truncate(budget - n_p, direction="right")  # the response keeps its beginning
        enc = backend.post_process(p, r, add_special_tokens=True)
        out.append((list(enc.ids), list(enc.type_ids)))
    return out


def pad_pairs(encs: Sequence[Encoded]) -> tuple[Any, Any, Any]:
    """``(input_ids, token_type_ids, attention_mask)`` int64 numpy arrays, right-padded with zeros."""
    import numpy as np

    width = max(len(ids) for ids, _ in encs)
    ids = np.zeros((len(encs), width), dtype=np.int64)
    types = np.zeros_like(ids)
    mask = np.zeros_like(ids)
    for j, (i_ids, i_types) in enumerate(encs):
        n = len(i_ids)
        ids[j, :n] = i_ids
        types[j, :n] = i_types
        mask[j, :n] = 1
    return ids, types, mask
