"""The JSON bodies of the native API, as msgspec Structs: the types are the schema.

Constraints live in the types (`Meta`) so a violation names its field
(``Expected `str` matching regex ... - at `$.org_id` ``); cross-field rules raise
ValueError("<field>: <reason>") from __post_init__, which api.problems turns into the field.
"""

from __future__ import annotations

import enum
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

# Identifiers end up inside Redis key names: a strict alphabet (no '{', '}', ':', '|',
# ',', '/', spaces or control characters) and a bounded length, so no input can break a
# hash tag or a record. keys.escape() is the second line of defence.
ID_PATTERN = r"^[A-Za-z0-9._~@+\-]+\Z"
Id = Annotated[str, Meta(pattern=ID_PATTERN, min_length=1, max_length=128)]
# Model names carry ':' and '/' (anthropic.claude-3-sonnet-20240229-v1:0, meta/llama-3).
ModelName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9._~@+:/\-]+\Z", min_length=1, max_length=200)]
# Idempotency keys and reservation ids: opaque, but never a record separator.
Token = Annotated[str, Meta(pattern=r"^[A-Za-z0-9._~@+:=\-]+\Z", min_length=1, max_length=128)]
# Reservation ids are made by the sidecar: 128 random bits in hex, nothing else.
# Any text (a prompt's hash, a tool call's name and arguments): only its hash is kept.
Fingerprint = Annotated[str, Meta(min_length=1, max_length=1024)]
ReservationId = Annotated[str, Meta(pattern=r"^[0-9a-f]{32}\Z")]
Usd = Annotated[float, Meta(ge=0, le=1_000_000)]
Tokens = Annotated[int, Meta(ge=0, le=100_000_000)]
LeaseMs = Annotated[int, Meta(ge=100, le=86_400_000)]


def _usd_or_tokens(
    usd_field: str,
    usd: float | None,
    tokens_in: int | None,
    tokens_out: int | None,
    *,
    required: bool,
    model: str | bool | None = False,
) -> None:
    """An amount is given in USD or in tokens, never both; tokens need a model to price
    them (pass `model=False` where the reservation already carries its price)."""
    tokens = tokens_in is not None or tokens_out is not None
    if usd is None and not tokens and required:
        raise ValueError(f"{usd_field}: give {usd_field} or tokens")
    if usd is not None and tokens:
        raise ValueError(f"{usd_field}: give {usd_field} or tokens, not both")
    if tokens and model is None:
        raise ValueError("model: tokens need the model to price them")


class IdentityFields(Struct, forbid_unknown_fields=True, kw_only=True):
    org_id: Id | None = None
    team_id: Id | None = None
    agent_id: Id | None = None
    workflow_id: Id | None = None
    user_id: Id | None = None
    # One run of an agent (the entity of scope run; recorded with the call's usage).
    run_id: Id | None = None


class AuthorizeRequest(IdentityFields, kw_only=True):
    provider: Id | None = None
    model: ModelName | None = None
    estimated_usd: Usd | None = None
    estimated_tokens_in: Tokens | None = None
    estimated_tokens_out: Tokens | None = None
    lease_ms: LeaseMs | None = None
    idempotency_key: Token | None = None
    step_id: Id | None = None
    # What the call asks, reduced to a token (e.g. a hash of the prompt): the same one from
    # one entity again and again is a loop (loop_guards). Only its hash is stored.
    fingerprint: Fingerprint | None = None
    # A hold still unsettled when its lease ends: "release" gives it back (the call did
    # not happen, or its caller will settle late), "charge" charges the estimate as spent
    # (a proxy flow where nobody settles: the call went through).
    on_expiry: Literal["release", "charge"] = "release"

    def __post_init__(self) -> None:
        _usd_or_tokens(
            "estimated_usd",
            self.estimated_usd,
            self.estimated_tokens_in,
            self.estimated_tokens_out,
            required=True,
            model=self.model,
        )


class CheckRequest(IdentityFields, kw_only=True):
    provider: Id | None = None
    model: ModelName | None = None
    estimated_usd: Usd | None = None
    estimated_tokens_in: Tokens | None = None
    estimated_tokens_out: Tokens | None = None
    fingerprint: Fingerprint | None = None

    def __post_init__(self) -> None:
        _usd_or_tokens(
            "estimated_usd",
            self.estimated_usd,
            self.estimated_tokens_in,
            self.estimated_tokens_out,
            required=False,
            model=self.model,
        )


class SettleRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    reservation_id: ReservationId
    tokens_in: Tokens | None = None
    tokens_out: Tokens | None = None
    cost_usd: Usd | None = None
    latency_ms: Annotated[int, Meta(ge=0, le=86_400_000)] | None = None
    success: bool = True

    def __post_init__(self) -> None:
        _usd_or_tokens("cost_usd", self.cost_usd, self.tokens_in, self.tokens_out, required=True)


class ReleaseRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    reservation_id: ReservationId


class RecordRequest(IdentityFields, kw_only=True):
    provider: Id | None = None
    model: ModelName | None = None
    tokens_in: Tokens | None = None
    tokens_out: Tokens | None = None
    cost_usd: Usd | None = None
    idempotency_key: Token | None = None
    step_id: Id | None = None
    latency_ms: Annotated[int, Meta(ge=0, le=86_400_000)] | None = None
    success: bool = True

    def __post_init__(self) -> None:
        _usd_or_tokens(
            "cost_usd",
            self.cost_usd,
            self.tokens_in,
            self.tokens_out,
            required=True,
            model=self.model,
        )


# ---- responses --------------------------------------------------------------------------


class BudgetInfo(Struct, kw_only=True):
    """The binding budget of a decision (the AxonFlow `budget_info` shape)."""

    budget_id: str
    budget_name: str
    used_usd: float
    limit_usd: float
    percentage: float
    exceeded: bool
    action: str


class BudgetState(Struct):
    """One evaluated budget counter. `percentage` counts held amounts: they are committed.

    Not kw_only: rendering.budget_state makes one per budget per decision, and sixteen
    keyword arguments cost five times the positional ones (msgspec matches each name)."""

    budget_id: str
    budget_name: str
    scope: str
    entity: str
    period: str
    on_exceed: str
    # null for a budget that caps calls only.
    limit_usd: float | None
    used_usd: float
    held_usd: float
    remaining_usd: float | None
    percentage: float
    exceeded: bool
    # A budget with a call cap: its calls in the period (before this one) and the cap.
    calls: int | None = None
    limit_calls: int | None = None
    # The projected spend at the period's end and when it reaches the limit (null: not
    # within the period), sidecar/forecast.py. Decisions carry them; settle and record
    # results leave them null (their scripts return no recent-spend window), and so do
    # period-total and calls-only budgets (no period end, no dollar limit).
    forecast_usd: float | None = None
    exhausted_at: str | None = None


class LoopGuardState(Struct):  # positional: one per loop guard per decision
    """One evaluated loop guard: this call's fingerprint from this entity, `calls` times
    within the window before this call."""

    loop_guard_id: str
    scope: str
    entity: str
    repeats: int
    window_ms: int
    mode: str
    calls: int
    would_deny: bool


class StopState(Struct, kw_only=True):
    """The stop in force that denied a call (POST /v1/stops)."""

    stop_id: str
    scope: str
    entity: str
    reason: str
    expires_at: str | None = None


class RateLimitState(Struct):  # positional: one per rate limit per decision
    """One evaluated rate limit. `remaining`: requests (or concurrent slots) that would
    still pass now; for a token limit, > 0 means the next call passes whatever its size.
    `retry_after_ms`: when it would admit again (-1: when a reservation ends)."""

    rate_limit_id: str
    scope: str
    entity: str
    metric: str
    # Dollars for metric usd, else requests, tokens or slots.
    limit: int | float
    window_ms: int
    burst: int | float
    mode: str
    remaining: int | float  # dollars that still fit now, for metric usd
    would_deny: bool
    retry_after_ms: int


class EstimateSource(enum.StrEnum):
    """Which estimate a decision held (Decision.estimate_source; sidecar.learned)."""

    CALLER = "caller"  # the request's own estimate (dollars, or tokens priced)
    LEARNED = "learned"  # the series' p95 (capped), larger than what the request gave
    DEFAULT = "default"  # a configured default: pre_check_estimate_usd, the proxy's
    FLOOR = "floor"  # settings.min_estimate_usd: what the request gave was less


# dict=True: the engine keeps on a decision, off the wire (msgspec encodes only the fields),
# what a cancel of its answer names (Engine.take_back).
class Decision(Struct, kw_only=True, omit_defaults=False, dict=True):
    allowed: bool
    action: str
    reservation_id: str | None = None
    budget_info: BudgetInfo | None = None
    budgets: list[BudgetState] = msgspec.field(default_factory=list)
    downgrade_model: str | None = None
    message: str | None = None
    estimated_usd: float = 0.0
    lease_expires_at: str | None = None
    replayed: bool = False
    degraded: bool = False
    rate_limits: list[RateLimitState] = msgspec.field(default_factory=list)
    # The rate limit that denied (or, allowed, the one with the least left).
    rate_limit: RateLimitState | None = None
    # Denied: when to try again (the binding budget's window end, or the rate limits').
    retry_after_ms: int | None = None
    # A shadow-mode rate limit or loop guard would have denied this call (it was allowed).
    would_deny: bool = False
    # Denied: what denied it, "stop" | "loop" | "calls" | "budget" | "velocity" |
    # "rate_limit" (the first of these that applies).
    reason: str | None = None
    loop_guards: list[LoopGuardState] = msgspec.field(default_factory=list)
    stop: StopState | None = None
    # Which estimate was held (or, denied, weighed) and why (issue 19; sidecar.learned).
    estimate_source: (
        Annotated[
            EstimateSource,
            Meta(
                description="Which estimate the decision held (denied: weighed): caller "
                "(the request's estimated_usd or tokens priced), learned (the p95 of the "
                "recent settled costs of this tenant, model and agent, at most "
                "settings.estimate_ceiling_usd, where larger than the request's; with "
                "estimate: learned once the series was taught "
                "settings.estimate_min_count costs), default (a configured default: "
                "settings.pre_check_estimate_usd, proxy.default_estimate_usd or a route's "
                "estimated_usd), floor (settings.min_estimate_usd: the request's was less)"
            ),
        ]
        | None
    ) = None


class SettleResult(Struct, kw_only=True):
    reservation_id: str
    state: str  # settled | released
    cost_usd: float
    estimated_usd: float
    # This charge's spend past the cap of a block or downgrade budget (the largest over the
    # reservation's budgets); summed over settles, the settled spend past the cap.
    overshoot_usd: float
    # How far the cost passed the estimate held for it (0 when it did not).
    estimate_error_usd: float
    # What priced the charge: "tokens" (at the reservation's price), "cost" (given), or
    # "estimate" (the model has no price: the held estimate was charged).
    priced_by: str
    lease_expired: bool
    replayed: bool
    provider: str | None
    model: str | None
    # The tokens this settle charged (0 for a release or a settle by cost_usd).
    tokens_in: int
    tokens_out: int
    budgets: list[BudgetState]


class RecordResult(Struct, kw_only=True):
    cost_usd: float
    replayed: bool
    budgets: list[BudgetState]


class BudgetStatus(Struct, kw_only=True):
    budget_id: str
    budget_name: str
    scope: str
    entity: str
    period: str
    on_exceed: str
    limit_usd: float | None  # null: the budget caps calls only
    used_usd: float
    held_usd: float
    remaining_usd: float | None
    percentage: float
    exceeded: bool
    period_start: str | None  # null for period total
    period_end: str | None
    forecast_usd: float | None  # null for period total and calls-only budgets
    exhausted_at: str | None
    calls: int | None = None
    limit_calls: int | None = None
