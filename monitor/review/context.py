"""What the review routes share: settings, store, metrics, keys, the clock; built once per app.

:func:`monitor.review.app.create_app` keeps one :class:`ReviewContext` in ``app.state.review``;
routes are module-level functions that reach it through the :data:`Ctx` dependency, never
through a closure, so every route is a plain function of its request and its dependencies.

The clock is injectable (``create_app(..., clock=...)``): leases, login backoff and session
expiry are all measured with it, so tests move time instead of sleeping through it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Annotated, Any

from fastapi import Depends, Request, Response

from monitor.assist import RM_SCORE, Assistance, AssistContext, Hint
from monitor.config import CanaryConfig, Settings
from monitor.quality.adjudication import Rule
from monitor.review import adjudication, auth, canary, hints, queue, workday
from monitor.review.canary_score import CanaryScorer, ScoreUnavailable, shown_score_of, with_final_turn
from monitor.review.conversation import Rate
from monitor.review.label_stats import LabelStatsCache, compute
from monitor.review.metrics import ReviewMetrics
from monitor.store import Store

log = logging.getLogger(__name__)

SESSION_COOKIE = "oversight_session"
#: Canaries set aside for want of a score in one claim before the claim serves what it has.
MAX_CANARIES_SET_ASIDE = 3

Clock = Callable[[], float]


class ReviewContext:
    """The app's state and the few operations both the API and the pages perform."""

    def __init__(self, settings: Settings, store: Store, registry: Any = None, clock: Clock = time.time):
        self.settings = settings
        self.store = store
        self.clock = clock
        # When labels of one item disagree (``review.adjudication``): the metrics, the API and the page.
        self.disagreement_rule = Rule.of(settings.review.adjudication)
        self.metrics = ReviewMetrics(
            store,
            registry,
            settings.metrics.max_streams,
            clock=clock,
            canaries=settings.review.canaries,
            disagreement=self.disagreement_rule,
        )
        # Fails closed at start on an unknown perturbation kind (config cannot import monitor.perturb).
        canary.check_kinds(settings.review.canaries)
        self.secret = settings.review_secret()  # signs the login form's CSRF token
        self.key = settings.sampling_key()  # keyed order of the two responses of a pair
        self.dev = settings.dev  # cookies without Secure (plain-HTTP development server)
        self.gate = auth.HashGate.of(settings.review)
        self.limits = auth.LoginLimits.of(settings.review)
        # Refuses to start on an experiment naming an unknown assistant or invalid parameters.
        self.assist = Assistance(settings.review.assist, on_error=self.count_assist_error)
        # A perturbed canary's text is scored when it is made, where a condition shows rm_score
        # (monitor/review/canary_score.py: without it, it is the one item with no score hint).
        scores = settings.review.canaries.share > 0 and RM_SCORE in self.assist.assistants
        self.canary_scorer = CanaryScorer.of(store, settings.reward, registry) if scores else None
        # The admin views of every label, computed once for all who ask together and paced.
        self.label_stats = LabelStatsCache(lambda: compute(store, settings, clock()))

    def now(self) -> float:
        return self.clock()

    # -- sessions -------------------------------------------------------------------------

    def login(self, request: Request, name: str, password: str) -> auth.Session:
        """The one login path of the API and the pages (throttled, hashing bounded by the gate).

        Raises :class:`monitor.review.auth.AuthError` (401, 429, 503), counted by result."""
        address = request.client.host if request.client else "unknown"
        try:
            sess = auth.login(
                self.store,
                name,
                password,
                address,
                limits=self.limits,
                gate=self.gate,
                hours=self.settings.review.session_hours,
                now=self.now(),
            )
        except auth.AuthError as e:
            self.metrics.login_refused(e.status)
            raise
        self.metrics.logins.labels("ok").inc()
        return sess

    def session(self, request: Request) -> auth.Session | None:
        """The live session the request's cookie names, if any."""
        return auth.session_from_token(self.store, request.cookies.get(SESSION_COOKIE), now=self.now())

    def start_session(self, request: Request, response: Response, sess: auth.Session) -> None:
        """Hand ``sess`` to the browser. A session the request still carried is revoked first:
        logging in again over an old session ends it, and a planted token is never adopted."""
        old = request.cookies.get(SESSION_COOKIE)
        if old:
            auth.revoke_session(self.store, old, now=self.now())
        self.set_cookie(response, SESSION_COOKIE, sess.token, max(1, int(sess.expires_at - self.now())))

    def set_cookie(self, response: Response, name: str, value: str, max_age: int, path: str = "/") -> None:
        response.set_cookie(
            name, value, max_age=max_age, path=path, httponly=True, samesite="strict", secure=not self.dev
        )

    def delete_cookie(self, response: Response, name: str, path: str = "/") -> None:
        response.delete_cookie(name, path=path, httponly=True, samesite="strict", secure=not self.dev)

    # -- the queue ------------------------------------------------------------------------

    def claim(self, user: auth.User, renew: bool = False) -> queue.Item | None:
        """The reviewer's lease (held or new), with the stream's blinding applied; ``renew``
        extends a held lease (the review page: see :func:`monitor.review.queue.claim`)."""
        rc = self.settings.review
        canaries: CanaryConfig | None = rc.canaries
        for attempt in range(MAX_CANARIES_SET_ASIDE + 1):
            item = queue.claim(
                self.store,
                user,
                rc.lease_seconds,
                self.key,
                now=self.now(),
                blinding=rc.blinding,
                renew=renew,
                canaries=canaries,
            )
            if item is None or attempt == MAX_CANARIES_SET_ASIDE or self.canary_scored(user, item):
                break
            # No canary without its score hint: it is set aside and the claim goes on, making no
            # new canary this time (the real item, or another canary the reviewer already had).
            canaries = None
        if item is None:
            return None
        # A pair compares two final turns, whatever the stream's setting (queue.submit records the same).
        return replace(item, rate="final_turn" if item.alternative is not None else self.rate(item.stream))

    def rate(self, stream: str) -> Rate:
        """What reviewers of ``stream`` rate in a conversation: its ``review.streams`` entry's
        ``rate``, else ``review.rate``."""
        rc = self.settings.review
        sc = rc.streams.get(stream)
        return sc.rate if sc is not None and sc.rate is not None else rc.rate

    def submit(
        self, user: auth.User, episode_id: str, slot: int, fence: int, label: queue.LabelIn, outcome: str
    ) -> None:
        """Store a label or a skip under the user's lease and count it by ``outcome``; raises
        :class:`monitor.review.queue.QueueError` (404, 409, 422) when refused."""
        rc = self.settings.review
        queue.submit(
            self.store, user, episode_id, slot, fence, label, rc.flags, now=self.now(), rate=self.rate, assist=rc.assist
        )
        self.metrics.labels.labels(outcome).inc()

    def undo(self, user: auth.User) -> queue.Claim:
        """Withdraw the user's last label and lease its item back to them; raises
        :class:`monitor.review.queue.QueueError` (404, 409) when refused."""
        rc = self.settings.review
        claim = workday.undo(self.store, user, rc.lease_seconds, rc.undo_window_s, now=self.now())
        self.metrics.labels.labels("undone").inc()
        return claim

    # -- adjudication ---------------------------------------------------------------------

    def adjudicate(self, user: auth.User, episode_id: str, verdict: adjudication.Verdict) -> adjudication.Adjudication:
        """Record an administrator's final label, counted by outcome; raises
        :class:`monitor.review.adjudication.AdjudicationError` (404, 409, 422) when refused."""
        try:
            out = adjudication.adjudicate(
                self.store,
                user,
                episode_id,
                verdict,
                self.settings.review.flags,
                self.disagreement_rule,
                now=self.now(),
            )
        except adjudication.AdjudicationError:
            self.metrics.adjudications.labels("refused").inc()
            raise
        self.metrics.adjudications.labels("adjudicated").inc()
        return out

    def progress(self, user: auth.User) -> dict[str, Any]:
        """Today's labels and skips of the user, the items waiting, the seconds left to undo."""
        now = self.now()
        out = workday.progress(self.store, user, now)
        out["undo_left_s"] = workday.undo_left(self.store, user, self.settings.review.undo_window_s, now)
        return out

    def canary_scored(self, user: auth.User, item: queue.Item) -> bool:
        """False when ``item`` is a perturbed canary whose text needs the active version's score
        for the reviewer's condition and none could be had: then it is set aside (never served,
        not measured) and counted as an ``rm_score`` error. True for everything else."""
        scorer = self.canary_scorer
        if scorer is None:
            return True
        with self.store.engine.connect() as conn:
            row = canary.find(conn, user.id, item.claim.episode_id)
        if row is None or RM_SCORE not in self.assist.names_for(user.id, row.id, item.claim.slot):
            return True
        if not canary.needs_shown_score(row, scorer.active_version()):
            return True
        return self._score_canary(scorer, row)

    def _score_canary(self, scorer: CanaryScorer, row: Any) -> bool:
        """Score the canary ``row``'s shown text and keep the score with it; else set it aside."""
        with self.store.engine.connect() as conn:
            source = queue.source_for_scoring(conn, row.episode_id)
        if source is None:
            return True  # the source is gone: the queue sets the canary aside when it reads it
        prompt, messages = source
        try:
            score = scorer.score(prompt, row.perturbed, with_final_turn(messages, row.perturbed))
        except ScoreUnavailable as e:
            log.warning("canary %r set aside: its text needs a reward-model score (%s)", row.id, e)
            self.count_assist_error(RM_SCORE)
            with self.store.engine.begin() as conn:
                canary.set_aside(conn, row.id)
            return False
        with self.store.engine.begin() as conn:
            canary.save_shown_score(conn, row, score)
        return True

    # -- assistance experiments -------------------------------------------------------------

    def count_assist_error(self, assistant: str) -> None:
        self.metrics.assist_errors.labels(assistant).inc()

    def hints_for(self, user: auth.User, item: queue.Item) -> list[Hint]:
        """The hints of the reviewer's condition for this item (none without an experiment)."""
        if not self.assist.enabled:
            return []
        ctx = AssistContext(store=self.store, settings=self.settings, now=self.now())
        view = hints.view_of(item)
        # A canary's assistants see its source episode's id (never shown): otherwise the source,
        # often labelled, would be the canary's own closest neighbour (a tell, and its rating a
        # leak), and a shown original would miss the score a real item of it gets.
        with self.store.engine.connect() as conn:
            row = canary.find(conn, user.id, item.claim.episode_id)
        if row is not None:
            view = replace(view, episode_id=row.episode_id, shown_scores=shown_score_of(row.detail))
        return self.assist.hints(user.id, item.claim.slot, view, ctx, item_id=item.claim.episode_id)

    def show(
        self, user: auth.User, item: queue.Item, build: Callable[[], Response], failed: Callable[[], Response]
    ) -> Response:
        """``build()`` the response for a claimed item; if that fails, set the item aside (so
        no lease is left behind and the next claim gets the next item) and answer ``failed()``."""
        try:
            return build()
        except Exception:
            log.exception("claimed item %r could not be shown; set aside", item.claim.episode_id)
            queue.set_aside(self.store, user, item.claim, now=self.now())
            self.metrics.claim_errors.inc()
            return failed()


async def review_context(request: Request) -> ReviewContext:
    """The app's :class:`ReviewContext` (async: no I/O, so no trip through the thread pool)."""
    ctx: ReviewContext = request.app.state.review
    return ctx


Ctx = Annotated[ReviewContext, Depends(review_context)]
