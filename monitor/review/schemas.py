"""The shapes of the review API: request bodies and response models, one per JSON answer.

Both forbid fields they do not name: a request with an unknown field is a 422, and a response
that drifts from its model fails loudly in the tests (schemathesis checks every answer against
the OpenAPI document these models generate) instead of documenting a shape the API no longer has.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from monitor.assist import Hint
from monitor.review import auth, queue


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StrictIn(BaseModel):
    """A request body: unknown fields refused, and no value converted to a field's type. Lenient
    parsing took ``"rating": true`` for 1 and ``"5"``, ``5.0`` for 5, so the label validation's
    refusal of a boolean rating never ran."""

    model_config = ConfigDict(extra="forbid", strict=True)


# -- requests -------------------------------------------------------------------------------


class LoginIn(StrictIn):
    name: str = Field(max_length=64)
    password: str = Field(max_length=auth.MAX_PASSWORD)


class LeaseIn(StrictIn):
    """Names a lease: the item, its slot and the fencing token the claim handed out."""

    episode_id: str = Field(min_length=1, max_length=128)
    slot: int = Field(ge=0, le=16)
    fence: int = Field(ge=0)


class LabelBody(LeaseIn):
    rating: int = Field(ge=1, le=7)
    flags: list[str] = Field(default_factory=list, max_length=32)
    critique: str = Field("", max_length=queue.MAX_CRITIQUE)
    preference: Literal["response", "alternative", "tie"] | None = None
    time_spent_ms: int = Field(0, ge=0, le=86_400_000)


class SkipBody(LeaseIn):
    reason: str = Field(min_length=1, max_length=queue.MAX_SKIP_REASON)
    time_spent_ms: int = Field(0, ge=0, le=86_400_000)


class ReleaseBody(LeaseIn):
    pass


class UserIn(StrictIn):
    name: str = Field(min_length=1, max_length=64, pattern=f"^{auth.NAME_RE}$")
    role: Literal["reviewer", "admin"]
    password: str | None = Field(None, min_length=10, max_length=auth.MAX_PASSWORD)


class TokenIn(StrictIn):
    name: str = Field("api", min_length=1, max_length=64)


class AdjudicationIn(StrictIn):
    """An administrator's final label of an item whose reviewers disagreed, and why."""

    episode_id: str = Field(min_length=1, max_length=128)
    rating: int = Field(ge=1, le=7)
    flags: list[str] = Field(default_factory=list, max_length=32)
    preference: Literal["response", "alternative", "tie"] | None = Field(None, description="pairs only")
    note: str = Field(min_length=1, max_length=2000, description="why: the final label is audited")


# -- responses ------------------------------------------------------------------------------


class LabelSeenOut(Strict):
    """A reviewer's label of a disagreeing item."""

    label_id: int
    user_id: int
    reviewer: str
    rating: int
    flags: list[str]
    preference: str | None
    critique: str
    created_at: float


class DisagreementOut(Strict):
    episode_id: str
    stream: str
    reasons: list[str] = Field(description="why the labels disagree: rating, flags, preference")
    rating_spread: int = Field(description="highest minus lowest rating")
    split_flags: list[str] = Field(description="flags some reviewers set and others did not")
    labels: list[LabelSeenOut]
    first_label_at: float
    adjudicated: bool


class AdjudicationOut(Strict):
    id: int
    episode_id: str
    stream: str
    adjudicator: str
    rating: int
    flags: list[str]
    preference: str | None
    note: str
    label_ids: list[int] = Field(description="the reviewers' labels the adjudicator was shown")
    reasons: list[str] = Field(description="why they disagreed when adjudicated (empty: they did not)")
    created_at: float
    current: bool = Field(description="false once a later adjudication of the same item superseded it")


class ErrorOut(Strict):
    """Every refusal but a validation error (401, 403, 404, 409, 429, 500, 503)."""

    detail: str


class UserOut(Strict):
    name: str
    role: str


class LoginOut(Strict):
    user: UserOut
    csrf_token: str = Field(description="send as X-CSRF-Token with every unsafe request of this session")


class LogoutOut(Strict):
    logged_out: bool


class MeOut(Strict):
    name: str
    role: str
    flags: list[str] = Field(description="the flags a label may carry")


class ToolCallOut(Strict):
    id: str | None
    name: str
    arguments: str = Field(description="as the model wrote them (usually JSON text)")


class MessageOut(Strict):
    """One message of a conversation, its content as text (non-text parts as placeholders)."""

    role: Literal["system", "developer", "user", "assistant", "tool", "unknown"]
    name: str | None
    content: str
    tool_calls: list[ToolCallOut]
    tool_call_id: str | None = Field(description="a tool result: the call it answers")
    tool_name: str | None = Field(description="a tool result: the name of the function it answers, if known")
    final: bool = Field(description="the final assistant turn")
    rated: bool = Field(description="part of what the reviewer rates (the final turn, or every turn)")


class ItemOut(Strict):
    """A claimed item, as its stream's blinding allows (no model and no hidden metadata).
    A conversation (schema v2) comes as ``messages``; ``prompt`` and ``response`` hold its
    flattening (``response``: the final assistant turn)."""

    episode_id: str
    slot: int
    fence: int
    lease_expires_at: float
    stream: str
    model: str | None
    timestamp: float | None = Field(description="episode time; null when the stored time is not finite")
    prompt: str
    response: str
    alternative: str | None
    alternative_first: bool
    metadata: dict[str, Any] | None
    invisible_characters: dict[str, int] = Field(description="invisible characters per shown field")
    messages: list[MessageOut] | None = Field(description="the conversation (schema v2); null for a v1 episode")
    rate: Literal["final_turn", "conversation"] = Field(
        description="what a label of a conversation rates: the final assistant turn or the whole conversation"
    )
    hints: list[Hint] = Field(
        default_factory=list,
        description="assistance for the reviewer under an assistance experiment (review.assist); empty without one."
        " Texts quote model output: untrusted, escape them",
    )


class OkOut(Strict):
    ok: bool


class QueueDepthOut(Strict):
    stream: str
    waiting: int
    leased: int
    done: int
    oldest_wait_s: float | None
    error: int = Field(description="items set aside because they could not be shown")


class ThroughputOut(Strict):
    reviewer: str
    labels_1h: int
    labels_24h: int
    skips_24h: int
    median_time_s: float | None


class KappaOut(Strict):
    kappa: float | None
    n: int


class AgreementOut(Strict):
    krippendorff_alpha: float | None
    n_items: int
    kappa: dict[str, KappaOut]


class EstimateOut(Strict):
    """A Horvitz-Thompson (Hajek) estimate with its interval; null where it is not defined."""

    mean: float | None
    total: float | None
    se: float | None
    ci_low: float | None
    ci_high: float | None
    confidence: float | None
    n_sampled: int
    population: float | None
    method: str
    interval: str
    n_effective: float | None


class StreamEstimateOut(Strict):
    stream: str
    population: int
    window_start: float | None = Field(
        None,
        description="event time the estimate starts at: the stream's last quality.window_days of traffic"
        " (null: every label kept)",
    )
    n_labelled: int
    n_adjudicated: int = Field(0, description="labelled items counted at their adjudicated label")
    rating: EstimateOut
    flags: dict[str, EstimateOut]
    rating_unweighted: EstimateOut | None = Field(
        None, description="with quality.reliability_weighting: the rating estimate without weighting"
    )
    reliability: dict[str, Any] | None = Field(
        None, description="with quality.reliability_weighting: the fitted bias and noise of each reviewer"
    )


class KindSensitivityOut(Strict):
    n: int = Field(description="probe pairs of this kind")
    detected: int
    rate: float | None = Field(description="share of the pairs whose worse version scored lower; null: n = 0")
    ci_low: float | None
    ci_high: float | None


class KindLossOut(Strict):
    n: int
    loss: float = Field(description="detection rate lost against the version gated against, on the same pairs")
    lo: float = Field(description="one-sided lower bound of the loss at the gate's confidence")
    failed: bool


class RmSensitivityOut(Strict):
    """A reward-model version's sensitivity per perturbation kind, as its gate recorded it."""

    version: str | None = Field(description="the version (default: the active one); null: none active")
    status: str | None
    per_kind: dict[str, KindSensitivityOut] | None = Field(
        description="null: no gate measured it (activated by hand; `oversight rm sensitivity` measures it)"
    )
    compared_with: str | None = Field(description="the active version at its gate")
    comparison: dict[str, KindLossOut] | None
    failed: list[str] = Field(description="kinds on which the gate found a significant loss beyond the tolerance")
    blind_spots: list[str] = Field(description="kinds whose detection rate is surely below 0.5 (upper bound)")


class DriftEventOut(Strict):
    stream: str
    signal: str
    detector: str
    size: str = Field(description="the measured size in words (shift and 95% interval, or statistic vs threshold)")
    statistic: float | None
    threshold: float | None
    episode_id: str
    input_index: int
    event_ts: float
    created_at: float
    detail: dict[str, Any] | None = Field(
        description="what the detector measured: windowed: shift_sd, ci_low, ci_high, min_shift, window_s,"
        " window_end, n, p_val, alpha, ert_s, reference; count detectors: statistic, threshold, ert, n;"
        " null before migration 0009"
    )


class DriftStreamOut(Strict):
    stream: str
    open_incident_since: float | None = Field(description="event time the open incident began; null: none open")
    events_attached: int
    incidents_24h: int = Field(description="incidents opened in the 24 h of event time before the latest traffic")
    incident_limit_24h: int = Field(description="actions.max_requests_per_stream_per_day")
    false_alarms_per_30d: float = Field(description="drift.false_alarms_per_30d: the time budget of windowed detectors")


class RequestOut(Strict):
    id: str
    kind: str
    stream: str | None
    state: str
    attempts: int
    created_at: float
    updated_at: float
    last_error: str | None


class SummaryOut(Strict):
    queue: list[QueueDepthOut]
    throughput: list[ThroughputOut]
    agreement: AgreementOut
    rm_agreement: dict[str, str | float | None] | None = Field(
        description="the active reward-model version and its agreement with reviewers per stream; null: none"
    )
    drift_events: list[DriftEventOut]
    drift_streams: list[DriftStreamOut]
    requests: list[RequestOut]
    estimates: list[StreamEstimateOut]
    labels_computed_at: float = Field(
        description="when agreement and estimates were computed from the labels (Unix time): a computation that"
        " took t seconds (1 s or more) serves the next 10 t seconds"
    )
    labels_window_days: float | None = Field(
        None, description="agreement and estimates cover each stream's last N days of traffic (null: every label)"
    )


class SeriesPointOut(Strict):
    start: int
    mean: float | None
    ci_low: float | None
    ci_high: float | None
    n: int


class CreatedUserOut(Strict):
    name: str
    role: str
    password: str | None = Field(None, description="the generated password, shown once; absent when one was given")


class TokenOut(Strict):
    token: str = Field(description="shown once; only its hash is stored")


# -- documented refusals ---------------------------------------------------------------------


Responses = dict[int | str, dict[str, Any]]  # FastAPI's ``responses=``: status -> OpenAPI entry


def refusal(description: str) -> dict[str, Any]:
    """An OpenAPI ``responses`` entry for a refusal with an :class:`ErrorOut` body."""
    return {"model": ErrorOut, "description": description}


SIGNED_IN: Responses = {
    401: refusal("no session cookie nor a valid API token (WWW-Authenticate: Bearer)"),
    403: refusal("a cookie session without its X-CSRF-Token header on an unsafe method"),
}
ADMIN_ONLY: Responses = {**SIGNED_IN, 403: refusal("not an admin, or a cookie session without its X-CSRF-Token header")}
# FastAPI's own answer to a request body it cannot parse (not UTF-8, not JSON).
BODY: Responses = {400: refusal("the request body could not be parsed")}
LEASED: Responses = {
    **BODY,
    409: refusal(
        "the lease is no longer valid (expired, released, claimed by someone else, or never held: "
        "no such item) or already used"
    ),
}


def validation_detail(loc: tuple[str, ...], msg: str) -> dict[str, Any]:
    """A 422 body of the same shape as FastAPI's own (``HTTPValidationError``), as documented."""
    return {"detail": [{"type": "value_error", "loc": list(loc), "msg": msg}]}


# -- the reviewer's workday: progress, undo, guidelines ----------------------------------------


class ProgressOut(Strict):
    labelled_today: int = Field(description="the caller's labels since the start of the UTC day")
    skipped_today: int = Field(description="the caller's skips since the start of the UTC day")
    waiting: int = Field(
        description="items waiting in the queue that the caller could claim, counted up to 10,000 (waiting_more)"
    )
    waiting_more: bool = Field(description="more items than ``waiting`` wait: the count stops at 10,000")
    day_start: float = Field(description="the start of the UTC day (Unix seconds)")
    undo_left_s: float = Field(description="seconds left to undo the caller's last label (0: none to undo)")


class UndoneOut(Strict):
    """The withdrawn label's item, leased back to the caller (claim it to see it again)."""

    episode_id: str
    slot: int
    fence: int
    lease_expires_at: float


class GuidelinesIn(StrictIn):
    stream: str = Field(min_length=1, max_length=128)
    markdown: str = Field(min_length=1, max_length=50_000)


class GuidelinesOut(Strict):
    stream: str
    version: int = Field(description="1 for the first save of a stream, one more with every save")
    markdown: str
    created_at: float
    created_by: str


UNDO: Responses = {
    404: refusal("the caller has no label to undo"),
    409: refusal("the undo window has passed, or the item is now leased to someone else"),
}


# -- reviewer quality and the assistance experiment (monitor/quality/canaries.py) ----------------


class RateOut(Strict):
    rate: float | None = Field(description="k / n (null when n is 0)")
    ci: tuple[float, float] | None = Field(description="95% Wilson score interval")
    k: int
    n: int


class DetectionOut(Strict):
    rate: float | None = Field(
        description="detection corrected for chance (a single response: against the reviewer's own rate on originals,"
        " or flags alone; a pair: original preferred minus perturbed preferred); null when n is 0"
    )
    ci: tuple[float, float] | None = Field(description="95% interval of rate")
    k: int = Field(description="perturbed and pair canaries the raw rule in use called detected")
    n: int = Field(description="perturbed and pair canaries")
    rule: Literal["baseline", "flag"] | None = Field(
        description="single responses: baseline (flag or rating below the reference, corrected for the same rule on"
        " originals) or flag (flags alone: too few originals, or the rule fired on every one); null: none"
    )
    raw: float | None = Field(description="k / n, uncorrected")
    baseline: RateOut = Field(description="the rule on the originals the correction is read from")
    pairs: int = Field(description="pairs among n")
    pairs_reversed: int = Field(description="pairs where the perturbed response was preferred")


class SecondsOut(Strict):
    mean: float | None = Field(description="mean seconds per item")
    ci: tuple[float, float] | None = Field(description="95% t interval of the mean (n - 1 degrees of freedom)")
    n: int
    geomean: float | None = Field(description="geometric mean seconds per item (times of 0 left out)")
    geo_ci: tuple[float, float] | None = Field(description="95% t interval of the mean log time, back-transformed")
    geo_n: int = Field(description="times above 0")


class QualityPartOut(Strict):
    detection: DetectionOut
    false_flag: RateOut
    seconds: SecondsOut
    n: int


class KindQualityOut(QualityPartOut):
    kind: str
    low: bool = Field(description="detection rate below review.canaries.min_detection_rate with confidence")


class TrendPointOut(QualityPartOut):
    start: float = Field(description="start of the day (or week), UTC epoch seconds")


class ReviewerQualityOut(QualityPartOut):
    reviewer: str
    low: bool
    kinds: list[KindQualityOut]
    trend: list[TrendPointOut]


class DiffOut(Strict):
    diff: float | None
    ci: tuple[float, float] | None


class SecondsDiffOut(DiffOut):
    ratio: float | None = Field(description="geometric mean over the control's")
    ratio_ci: tuple[float, float] | None = Field(description="95% Welch interval on log times, back-transformed")


class ConditionRowOut(QualityPartOut):
    condition: str
    kind: str = Field(description="a perturbation kind, or all")
    control: bool
    detection_diff: DiffOut | None = Field(
        description="detection minus the control's (square-and-add interval from the two intervals)"
    )
    seconds_diff: SecondsDiffOut | None = Field(
        description="seconds per item minus the control's (Welch t interval, Welch-Satterthwaite degrees of freedom)"
    )


class ExperimentReportOut(Strict):
    experiment: str
    enabled: bool
    control: str | None
    conditions: list[str]
    rows: list[ConditionRowOut]
