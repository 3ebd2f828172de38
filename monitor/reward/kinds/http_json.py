"""A generic JSON scoring endpoint (Triton, KServe, TEI, a team's own reward service).

The request and response shapes are configuration (:class:`HttpJsonConfig`): the fields an item's
prompt and response go in, the list they are sent under (batched) and the dotted path of the
score(s) in the answer. The endpoint's answer is untrusted like any input: a missing path, a
wrong length or a non-number is a malformed answer and the items stay unscored.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from monitor.reward.kinds.base import Item, Score
from monitor.reward.kinds.config import HttpJsonConfig
from monitor.reward.kinds.resilience import BackendMetrics, RemoteError, Resilient

log = logging.getLogger(__name__)


def at_path(data: Any, path: str) -> Any:
    """``data`` followed along a dotted path; integer steps index lists (``outputs.0.data``)."""
    for step in path.split("."):
        data = data[int(step)] if isinstance(data, list) else data[step]
    return data


def as_number(v: Any) -> float:
    while isinstance(v, list) and len(v) == 1:
        v = v[0]
    if isinstance(v, dict) and "score" in v:  # TEI's [{"score": .., "label": ..}]
        v = v["score"]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise ValueError(f"score is not a finite number: {str(v)[:40]}")
    return float(v)


class HttpJsonBackend:
    kind = "http"
    remote = True

    def __init__(self, cfg: HttpJsonConfig, version: str | None, metrics: BackendMetrics, client: Any = None):
        self.cfg = cfg
        self.version = version
        self.metrics = metrics
        key = cfg.api_key()
        self._headers = {}
        if key is not None:
            secret = key.get_secret_value()
            self._headers[cfg.auth_header] = f"{cfg.auth_scheme} {secret}" if cfg.auth_scheme else secret
        self.http = Resilient(cfg.resilience, self.kind, metrics, client)

    def _fields(self, item: Item) -> tuple[dict[str, str], bool]:
        n = self.cfg.max_chars
        p, r = item.prompt[-n:], item.response[:n]
        return {self.cfg.prompt_field: p, self.cfg.response_field: r}, len(p) < len(item.prompt) or len(r) < len(
            item.response
        )

    def _parse_many(self, data: Any, n: int) -> list[float]:
        values = at_path(data, self.cfg.score_path)
        if not isinstance(values, list) or len(values) != n:
            raise ValueError(f"expected a list of {n} scores at {self.cfg.score_path}")
        return [as_number(v) for v in values]

    def _chunk(self, items: Sequence[Item]) -> list[Score]:
        fields = [self._fields(i) for i in items]
        if self.cfg.batched:
            body = {**self.cfg.extra_body, self.cfg.items_field: [f for f, _ in fields]}
            try:
                values = self.http.post_json(
                    self.cfg.url, body, self._headers, lambda d: self._parse_many(d, len(items))
                )
            except RemoteError as e:
                return [e.score()] * len(items)
        else:
            return [self._single(f, cut) for f, cut in fields]
        return [self._done(v, cut) for v, (_, cut) in zip(values, fields, strict=True)]

    def _single(self, fields: dict[str, str], cut: bool) -> Score:
        body = {**self.cfg.extra_body, **fields}
        try:
            value = self.http.post_json(
                self.cfg.url, body, self._headers, lambda d: as_number(at_path(d, self.cfg.score_path))
            )
        except RemoteError as e:
            return e.score()
        return self._done(value, cut)

    def _done(self, value: float, cut: bool) -> Score:
        if cut:
            self.metrics.truncated.labels(self.kind).inc()
        return Score(value, truncated=cut)

    def _guarded(self, items: list[Item]) -> list[Score]:
        try:
            return self._chunk(items)
        except Exception as e:  # a bug: these items alone stay unscored, not the whole call
            log.exception("http scorer: scoring %d items failed", len(items))
            return [Score.failed(f"internal_error: {type(e).__name__}")] * len(items)

    def score(self, items: Sequence[Item]) -> list[Score]:
        if not self.cfg.batched:
            return [s for chunk in self.http.map(lambda i: self._guarded([i]), list(items)) for s in chunk]
        size = self.cfg.max_batch
        chunks = [list(items[s : s + size]) for s in range(0, len(items), size)]
        return [s for chunk in self.http.map(self._guarded, chunks) for s in chunk]

    def close(self) -> None:
        self.http.close()
