"""The domain model: the words of the glossary as types. No I/O here."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from sidecar.auth import Client
from sidecar.proxy_config import ProxySpec


class Scope(enum.StrEnum):
    ORGANIZATION = "organization"
    TEAM = "team"
    AGENT = "agent"
    WORKFLOW = "workflow"
    USER = "user"
    # One run of an agent: the entity is the call's run_id (per-run caps, loop guards).
    RUN = "run"


# The identity field each scope reads its entity from.
SCOPE_FIELD: dict[Scope, str] = {
    Scope.ORGANIZATION: "org_id",
    Scope.TEAM: "team_id",
    Scope.AGENT: "agent_id",
    Scope.WORKFLOW: "workflow_id",
    Scope.USER: "user_id",
    Scope.RUN: "run_id",
}


class Period(enum.StrEnum):
    DAILY = "daily"
    WEEKLY = "weekly"
    MONTHLY = "monthly"
    QUARTERLY = "quarterly"
    YEARLY = "yearly"
    # No calendar window: one counter from the entity's first call on, collected an idle
    # time after its last (a run's cap).
    TOTAL = "total"


class OnExceed(enum.StrEnum):
    WARN = "warn"
    BLOCK = "block"
    DOWNGRADE = "downgrade"


class Action(enum.StrEnum):
    ALLOW = "allow"
    WARN = "warn"
    BLOCK = "block"
    DOWNGRADE = "downgrade"


class UnpricedModel(enum.StrEnum):
    """What to do with a model that has no price: never cost it at $0."""

    REFUSE = "refuse"
    FALLBACK = "fallback"


class EstimateMode(enum.StrEnum):
    """What a call holds when its caller gives no estimate or a smaller one (issue 19):
    `fixed` the configured default (or the caller's figure); `learned` the p95 of the
    recent settled costs of its tenant, model and agent, once enough were seen."""

    FIXED = "fixed"
    LEARNED = "learned"


class FailMode(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is spending. `org_id` defaults to the configured default organization."""

    org_id: str
    team_id: str | None = None
    agent_id: str | None = None
    workflow_id: str | None = None
    user_id: str | None = None
    run_id: str | None = None

    def entity(self, scope: Scope) -> str | None:
        value: str | None = getattr(self, SCOPE_FIELD[scope])
        return value


# The dollar limit of a budget that caps calls only: more than any config may set ($1e9).
UNCAPPED_MICRO = 10**15 + 1


@dataclass(frozen=True, slots=True)
class Budget:
    """A USD cap on a scope for a calendar period.

    With `scope_id` it caps one entity; without, every entity of the scope gets its own
    counter of this size ("each user $5 a day").
    """

    id: str
    name: str
    scope: Scope
    limit_micro: int
    period: Period
    on_exceed: OnExceed = OnExceed.BLOCK
    scope_id: str | None = None
    downgrade_to: dict[str, str] = field(default_factory=dict)
    alert_thresholds: tuple[int, ...] = (50, 80, 100)
    # Alert (kind "forecast") the first time in a period that the forecast reaches the
    # limit before the period ends (sidecar/forecast.py).
    forecast_alert: bool = False
    enabled: bool = True
    timezone: str = "UTC"
    fail_mode: FailMode | None = None
    # None: as settings.estimate says (see sidecar.learned.mode_of).
    estimate: EstimateMode | None = None
    source: str = "config"
    # Budgets made through the API carry when (RFC 3339); the config file's do not.
    created_at: str | None = None
    updated_at: str | None = None
    # At most this many calls in the period (None: no call cap). A budget may cap calls
    # only: its dollar limit is then UNCAPPED_MICRO.
    limit_calls: int | None = None
    # period total: the counter goes this long after its last call.
    idle_ms: int = 86_400_000

    @property
    def capped_usd(self) -> bool:
        return self.limit_micro < UNCAPPED_MICRO

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


class Metric(enum.StrEnum):
    REQUESTS = "requests"
    TOKENS = "tokens"
    CONCURRENT = "concurrent"
    # Dollars per rolling window (spend velocity), counted in USD_UNIT_MICRO units.
    USD = "usd"


# A usd rate limit counts in units of $0.001 (estimates are at least $0.01): its debt
# (limit x window) stays below 2^53 for up to about $3,800 a day, where micro-USD would stop
# at $3.
USD_UNIT_MICRO = 1000


class LimitMode(enum.StrEnum):
    ENFORCE = "enforce"
    SHADOW = "shadow"


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A cap on requests or tokens per rolling window, or on reservations in flight.

    Like a budget, it covers one entity (`scope_id`) or every entity of its scope on its
    own; `model`/`provider` narrow it to calls of that model or provider.
    """

    id: str
    scope: Scope
    metric: Metric
    limit: int
    window_ms: int  # 0 for concurrent
    burst: int = 0
    scope_id: str | None = None
    model: str | None = None
    provider: str | None = None
    mode: LimitMode = LimitMode.ENFORCE
    source: str = "config"


@dataclass(frozen=True, slots=True)
class LoopGuard:
    """Denies a call when one entity of `scope` has sent the same fingerprint `repeats`
    times within the last `window_ms` (a loop: the same prompt again and again)."""

    id: str
    scope: Scope
    repeats: int
    window_ms: int
    mode: LimitMode = LimitMode.ENFORCE


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1k tokens, held as integer pico-USD per token."""

    provider: str
    model: str
    input_pico: int
    output_pico: int


@dataclass(frozen=True, slots=True)
class Settings:
    """The `settings` section of the config file."""

    unpriced_model: UnpricedModel = UnpricedModel.REFUSE
    fallback_price: Price | None = None
    default_org_id: str = "default"
    default_lease_ms: int = 60_000
    max_lease_ms: int = 3_600_000
    # How long a finished reservation (and its idempotency key) is remembered, so that a
    # repeated settle or release returns the first result, a retried authorize gets its
    # reservation back, and a settle after the lease ended is still charged. An hour:
    # clients retry within seconds to minutes (SDK backoffs, proxy retries), and a
    # reservation kept a day cost more Redis than every counter of its entity (issue 16).
    keep_finished_ms: int = 3_600_000
    fail_mode: FailMode = FailMode.CLOSED
    # Fail mode open: how many allowed decisions (and their settles waiting for Redis) are
    # remembered in memory at once, so their spend is charged once Redis answers
    # (sidecar.fail_open); past it a decision is allowed without an id, counted as dropped.
    fail_open_max_pending: int = 10_000
    # Redis's time to answer, counted while the sidecar runs (its own scheduling lag is
    # not Redis's); a decision waits at most twice this of wall-clock time (sidecar.resp).
    redis_timeout_ms: int = 500
    max_body_bytes: int = 65_536
    # The most budgets, and the most rate limits, one tenant may make through the admin
    # API: each decision evaluates them all in one script, which blocks Redis meanwhile.
    max_api_definitions: int = 200
    # The most stops one tenant may have in force (409 past it): every state check of
    # every replica reads them all (sidecar.state_loss, every few seconds), and a list
    # reads them all in one script, which blocks Redis meanwhile (about 13 ms per 1,000
    # stops, measured: README "Stops").
    max_stops: int = 1_000
    # The usage ledger: at most this many records, none older than the age; per-day
    # aggregates kept this many days (a yearly summary reads up to 366 of them).
    usage_max_records: int = 100_000
    usage_max_age_days: int = 30
    # Alerts older than this leave the alerts stream (the sweep; those no webhook had
    # delivered count as dropped), beside its cap of about 10,000.
    alerts_max_age_days: int = 30
    usage_aggregate_days: int = 400
    # The per-(user, step) daily totals: users and steps are many, so kept shorter. Older
    # days still count in every total; a breakdown by user or step shows them under "".
    usage_user_aggregate_days: int = 2
    # What a gateway-mode pre-check holds (the SDK's pre-check carries no estimate).
    pre_check_estimate_usd: float = 0.01
    # The least a hold may be (micro-USD): an estimate of $0 would hold nothing, and any
    # number of concurrent calls would pass a block budget before the first one settles.
    min_estimate_micro: int = 10_000
    # Learned estimates (sidecar.learned): off by default. A learned hold is at most the
    # ceiling, and only after a series was taught min_count settled costs; the statistics
    # expire stats_days after the last cost taught, at most max_series series per tenant.
    estimate: EstimateMode = EstimateMode.FIXED
    estimate_ceiling_micro: int = 1_000_000
    estimate_min_count: int = 10
    estimate_stats_days: int = 7
    estimate_max_series: int = 10_000
    # Also export spend under the AxonFlow platform's metric names (sidecar.metrics).
    axonflow_metrics: bool = False
    # The hot routes on sidecar.api.fast's protocol (False: aiohttp serves every route).
    fast_http: bool = True
    # Host names accepted besides the built-in ones, lower-case (sidecar.api.origin).
    allowed_hosts: tuple[str, ...] = ()
    # The most client connections open at once (sidecar.api.connection): past it the
    # idle one open longest is closed. An idle connection costs about 6.6 KB and one
    # descriptor; 4,096 of them about 27 MB.
    max_connections: int = 4_096


@dataclass(frozen=True, slots=True)
class Webhook:
    """Where threshold alerts are POSTed, signed with HMAC-SHA256 of the body."""

    name: str
    url: str
    secret: bytes
    tenant: str | None = None  # None: every tenant's alerts
    timeout_ms: int = 5000


@dataclass(frozen=True, slots=True)
class TenantDefinitions:
    """What one tenant defined through the API (stored in Redis, see sidecar.definitions)."""

    rate_limits: tuple[RateLimit, ...] = ()
    budgets: tuple[Budget, ...] = ()
    pricing: tuple[Price, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    """One immutable snapshot of every definition the hot path needs (invariant 5)."""

    budgets: tuple[Budget, ...] = ()
    pricing: tuple[Price, ...] = ()
    rate_limits: tuple[RateLimit, ...] = ()
    loop_guards: tuple[LoopGuard, ...] = ()
    settings: Settings = field(default_factory=Settings)
    proxy: ProxySpec = field(default_factory=ProxySpec)
    # Who may call (empty: open mode, one default tenant).
    clients: tuple[Client, ...] = ()
    webhooks: tuple[Webhook, ...] = ()
    source: str = "<defaults>"
