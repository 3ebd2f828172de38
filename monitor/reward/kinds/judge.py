"""An OpenAI-compatible chat-completions endpoint as a pointwise LLM judge.

Request: the rubric as the system message, the conversation (or prompt) and the response as the
user message between markers, ``temperature`` 0, a few ``max_tokens``, and ``logprobs`` with
``top_logprobs`` when configured. The episode's text is untrusted and may try to instruct the
judge: it is fenced, and the rubric says the fenced text is data.

Score: when the answer carries logprobs, the expected value of the integer score over the
alternatives at the first score token (probabilities renormalised over the tokens that are
integers in ``[score_min, score_max]``); that is finer than the argmax and uses the judge's
uncertainty. Otherwise the first integer in the answer's text. An answer with neither, or with an
integer outside the range, is malformed: the item stays unscored and is counted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from monitor.reward.kinds.base import Item, Score
from monitor.reward.kinds.config import JudgeConfig
from monitor.reward.kinds.resilience import BackendMetrics, RemoteError, Resilient

_INT = re.compile(r"-?\d+")


def _clip(text: str, n: int) -> tuple[str, bool]:
    return (text, False) if len(text) <= n else (text[:n], True)


def _conversation(item: Item, max_chars: int) -> tuple[str, bool]:
    if item.messages:
        turns = [f"{m.get('role', 'user')}: {m.get('content', '')}" for m in item.messages[:-1]]
        text = "\n".join(turns) or item.prompt
    else:
        text = item.prompt
    # The end of the conversation is the request being answered: keep it.
    return (text, False) if len(text) <= max_chars else (text[-max_chars:], True)


def messages_for(cfg: JudgeConfig, item: Item) -> tuple[list[dict[str, str]], bool]:
    prompt, cut_p = _conversation(item, cfg.max_chars)
    response, cut_r = _clip(item.response, cfg.max_chars)
    user = (
        "<<<CONVERSATION\n" + prompt + "\nCONVERSATION>>>\n\n<<<RESPONSE\n" + response + "\nRESPONSE>>>\n\n"
        f"Score ({cfg.score_min}-{cfg.score_max}):"
    )
    system = cfg.rubric.replace("{min}", str(cfg.score_min)).replace("{max}", str(cfg.score_max))
    return [{"role": "system", "content": system}, {"role": "user", "content": user}], cut_p or cut_r


def _in_range(token: str, cfg: JudgeConfig) -> int | None:
    t = token.strip()
    if not _INT.fullmatch(t):
        return None
    v = int(t)
    return v if cfg.score_min <= v <= cfg.score_max else None


def expected_from_logprobs(choice: Mapping[str, Any], cfg: JudgeConfig) -> float | None:
    """The expected score at the first content token that is a score, or None without logprobs."""
    lp = choice.get("logprobs")
    if not isinstance(lp, Mapping) or not isinstance(lp.get("content"), list):
        return None
    for tok in lp["content"]:
        if _in_range(str(tok.get("token", "")), cfg) is None:
            continue
        alts = tok.get("top_logprobs") or [tok]
        mass: dict[int, float] = {}
        for alt in alts:
            v = _in_range(str(alt["token"]), cfg)
            if v is not None:
                mass[v] = mass.get(v, 0.0) + math.exp(float(alt["logprob"]))
        total = sum(mass.values())
        if total <= 0:
            return None
        return sum(v * p for v, p in mass.items()) / total
    return None


def parse_answer(data: Any, cfg: JudgeConfig) -> tuple[float, int, int]:
    """(score, input tokens, output tokens) from a chat-completions answer; ValueError when malformed."""
    choice = data["choices"][0]
    usage = data.get("usage") or {}
    tokens = (int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
    value = expected_from_logprobs(choice, cfg) if cfg.logprobs else None
    if value is None:
        text = str(choice["message"]["content"] or "")
        m = _INT.search(text)
        if m is None:
            raise ValueError(f"no integer score in the answer {text[:40]!r}")
        v = _in_range(m.group(0), cfg)
        if v is None:
            raise ValueError(f"score {m.group(0)} outside [{cfg.score_min}, {cfg.score_max}]")
        value = float(v)
    return value, tokens[0], tokens[1]


class JudgeBackend:
    kind = "judge"
    remote = True

    def __init__(self, cfg: JudgeConfig, version: str | None, metrics: BackendMetrics, client: Any = None):
        self.cfg = cfg
        self.version = version
        self.metrics = metrics
        key = cfg.api_key()
        self._headers = {} if key is None else {"Authorization": f"Bearer {key.get_secret_value()}"}
        self._url = f"{cfg.base_url}/chat/completions"
        self.http = Resilient(cfg.resilience, self.kind, metrics, client)

    def _body(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.cfg.model,
            "messages": messages,
            "temperature": 0,
            "max_tokens": self.cfg.max_tokens,
        }
        if self.cfg.logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = self.cfg.top_logprobs
        return body

    def _one(self, item: Item) -> Score:
        messages, truncated = messages_for(self.cfg, item)
        try:
            value, t_in, t_out = self.http.post_json(
                self._url, self._body(messages), self._headers, lambda d: parse_answer(d, self.cfg)
            )
        except RemoteError as e:
            return Score.failed(f"{e.outcome}: {e}")
        self.metrics.tokens.labels(self.kind, "input").inc(t_in)
        self.metrics.tokens.labels(self.kind, "output").inc(t_out)
        if truncated:
            self.metrics.truncated.labels(self.kind).inc()
        return Score(value, truncated=truncated, tokens=t_in + t_out)

    def score(self, items: Sequence[Item]) -> list[Score]:
        return self.http.map(self._one, items)

    def close(self) -> None:
        self.http.close()
