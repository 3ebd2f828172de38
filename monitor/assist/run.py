"""Running an experiment's assistants for one reviewer and item: bounded in time, never raising.

:class:`Assistance` is built once per review app from ``review.assist``; :meth:`Assistance.hints`
runs the assistants of the (reviewer, item)'s condition concurrently and waits at most
``review.assist.timeout_s`` for them. An assistant that raises, times out or returns something
that is not a list of its own hints yields nothing for this item; it is logged and reported to
``on_error`` (the review service counts it in ``oversight_assist_errors_total{assistant}``). The
page the reviewer is waiting for is never held up or broken by an assistant.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from monitor.assist.base import MAX_HINTS, Assistant, AssistContext, EpisodeView, Hint, make, registered
from monitor.assist.experiment import assistants_of, condition_of
from monitor.config import AssistExperimentConfig, ConfigError

log = logging.getLogger(__name__)

ErrorHook = Callable[[str], None]


def used_assistants(cfg: AssistExperimentConfig) -> list[str]:
    """Every assistant some condition of the experiment shows, sorted."""
    return sorted({a for names in cfg.conditions.values() for a in names})


def check_experiment(cfg: AssistExperimentConfig) -> dict[str, Assistant]:
    """The experiment's assistants, built; :class:`monitor.config.ConfigError` naming the
    assistant when one is not registered or its ``assistant_params`` are invalid.

    Why here and not in the config model's validator: the registry is a layer above the
    configuration (tests/import_graph.py), so the review app and ``oversight config check``
    call this where they read the settings."""
    known = registered()
    unknown = [a for a in used_assistants(cfg) if a not in known]
    if unknown:
        raise ConfigError(
            f"review.assist.conditions names unknown assistants {unknown}; registered: {', '.join(known) or 'none'}"
        )
    stray = sorted(set(cfg.assistant_params) - set(used_assistants(cfg)))
    if stray:
        raise ConfigError(f"review.assist.assistant_params for assistants no condition uses: {stray}")
    built: dict[str, Assistant] = {}
    for name in used_assistants(cfg):
        try:
            built[name] = make(name, cfg.assistant_params.get(name))
        except Exception as e:  # a factory's own validation error, said in one line
            raise ConfigError(f"review.assist.assistant_params.{name}: {' '.join(str(e).split())}") from None
    return built


class Assistance:
    """The hints of an assistance experiment (nothing when ``review.assist.enabled`` is off)."""

    def __init__(self, cfg: AssistExperimentConfig, on_error: ErrorHook | None = None):
        self.cfg = cfg
        self.on_error = on_error
        self.assistants = check_experiment(cfg) if cfg.enabled else {}
        # Threads only bound the wait: a stuck assistant keeps its worker, the page does not wait.
        self._pool = ThreadPoolExecutor(max_workers=max(2, 2 * len(self.assistants)), thread_name_prefix="assist")

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    def names_for(self, user_id: int, episode_id: str, slot: int) -> list[str]:
        """The assistants shown to this reviewer for this item (none without an experiment)."""
        return assistants_of(self.cfg, condition_of(self.cfg, user_id, episode_id, slot))

    def hints(
        self, user_id: int, slot: int, episode: EpisodeView, ctx: AssistContext, item_id: str | None = None
    ) -> list[Hint]:
        """The hints of the (reviewer, item)'s condition, in the condition's assistant order.
        ``item_id``: the id the reviewer sees when it is not ``episode.episode_id`` (a canary:
        its condition is drawn on the id it is shown and labelled under)."""
        names = self.names_for(user_id, item_id or episode.episode_id, slot)
        if not names:
            return []
        futures: dict[str, Future[list[Hint]]] = {}
        for name in names:
            try:
                futures[name] = self._pool.submit(self.assistants[name].hints, episode, ctx)
            except RuntimeError:  # the pool is shut down (the app is stopping)
                self.failed(name, "could not be started", episode)
        wait(list(futures.values()), timeout=self.cfg.timeout_s)
        out: list[Hint] = []
        for name, fut in futures.items():
            if not fut.done():
                fut.cancel()
                self.failed(name, f"took longer than {self.cfg.timeout_s} s", episode)
                continue
            try:
                got = fut.result()
            except Exception:
                log.warning("assistant %r failed on episode %r", name, episode.episode_id, exc_info=True)
                self.failed(name, None, episode)
                continue
            if not isinstance(got, list) or not all(isinstance(h, Hint) and h.assistant == name for h in got):
                self.failed(name, "returned something other than a list of its own hints", episode)
                continue
            out.extend(got[:MAX_HINTS])
        return out

    def failed(self, name: str, why: str | None, episode: EpisodeView) -> None:
        if why is not None:
            log.warning("assistant %r on episode %r: %s; no hints", name, episode.episode_id, why)
        if self.on_error is not None:
            self.on_error(name)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
