"""The config file: YAML with `budgets`, `pricing`, `rate_limits`, `settings`, `proxy` and
`auth`.
Strict: unknown keys, wrong types and bad values
are errors that name the file and the path of the field."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
import yaml
from msgspec import Meta, Struct

from sidecar.auth import Client, Role
from sidecar.model import (
    UNCAPPED_MICRO,
    USD_UNIT_MICRO,
    Budget,
    Config,
    EstimateMode,
    FailMode,
    LimitMode,
    LoopGuard,
    Metric,
    OnExceed,
    Period,
    Price,
    RateLimit,
    Scope,
    Settings,
    UnpricedModel,
    Webhook,
)
from sidecar.money import MICRO, price_to_pico, usd_to_micro
from sidecar.proxy_config import ProxySpec
from sidecar.schemas import Id, ModelName

# Budget ids appear raw in SDK URL paths (wire contract §7.3): the URL-safe alphabet only.
BudgetId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9._~\-]+\Z", min_length=1, max_length=64)]
PricePer1k = Annotated[float, Meta(ge=0, le=1000)]
# Names in the zoneinfo directory that are the host's settings (/etc/localtime, the POSIX
# TZ default rules), which ZoneInfo loads like any zone.
_HOST_ZONES = frozenset({"localtime", "posixrules"})


class ConfigError(Exception):
    """A config file is unusable; the message names the file and the field."""

    def __init__(self, source: str, path: str, message: str) -> None:
        super().__init__(f"{source}: {path}: {message}")
        self.source = source
        self.path = path
        self.message = message


class BudgetSpec(Struct, forbid_unknown_fields=True, kw_only=True):
    id: BudgetId
    name: Annotated[str, Meta(min_length=1, max_length=200)]
    scope: Scope
    # One of limit_usd and limit_calls, or both ("each run at most 50 calls and $2").
    limit_usd: Annotated[float, Meta(ge=0, le=1_000_000_000)] | None = None
    limit_calls: Annotated[int, Meta(ge=0, le=1_000_000_000)] | None = None
    period: Period
    # period total: the counter goes this long after its entity's last call.
    idle: str | None = None
    on_exceed: OnExceed = OnExceed.BLOCK
    scope_id: Id | None = None
    downgrade_to: dict[ModelName, ModelName] = msgspec.field(default_factory=dict)
    alert_thresholds: list[Annotated[int, Meta(ge=1, le=1000)]] = msgspec.field(
        default_factory=lambda: [50, 80, 100]
    )
    forecast_alert: bool = False
    enabled: bool = True
    timezone: str = "UTC"
    fail_mode: FailMode | None = None
    estimate: EstimateMode | None = None

    def __post_init__(self) -> None:
        if self.timezone in _HOST_ZONES:
            # Files of the host's own settings, not zones: two pods whose hosts differ would
            # start the same budget's window at different instants (two counters at once).
            raise ValueError(
                f"timezone: {self.timezone!r} is the host's setting, not an IANA time zone; "
                "name the zone (e.g. 'Europe/Berlin')"
            )
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone: unknown IANA time zone {self.timezone!r}") from None
        if self.limit_usd is None and self.limit_calls is None:
            raise ValueError("limit_usd: give limit_usd, limit_calls, or both")
        if self.limit_usd and usd_to_micro(self.limit_usd) == 0:
            # It would be kept as $0: a budget that denies every call, not the one meant.
            raise ValueError("limit_usd: at least $0.000001 (one micro-USD), or 0 to deny all")
        if self.forecast_alert and (self.period is Period.TOTAL or self.limit_usd is None):
            raise ValueError(
                "forecast_alert: needs a calendar period and limit_usd (a forecast projects"
                " dollars to the period's end)"
            )
        if self.idle is not None:
            if self.period is not Period.TOTAL:
                raise ValueError("idle: applies only with period: total")
            try:
                idle_ms = parse_duration_ms(self.idle)
            except ValueError as exc:
                raise ValueError(f"idle: {exc}") from None
            if not 60_000 <= idle_ms <= 366 * 86_400_000:
                raise ValueError("idle: between 1m and 366d")
        if self.limit_calls is not None and self.on_exceed is OnExceed.DOWNGRADE:
            # A cheaper model is still a call: a call cap can only block (or warn).
            raise ValueError("limit_calls: a call cap cannot downgrade; use block or warn")
        if self.on_exceed is OnExceed.DOWNGRADE and not self.downgrade_to:
            raise ValueError("downgrade_to: on_exceed downgrade needs a model map")
        if self.downgrade_to and self.on_exceed is not OnExceed.DOWNGRADE:
            # A map that would never be used is a mistake, not a preference.
            raise ValueError(
                f"downgrade_to: applies only with on_exceed: downgrade (this budget's "
                f"on_exceed is {self.on_exceed.value}): set on_exceed: downgrade, or remove it"
            )

    def to_budget(self, source: str) -> Budget:
        return Budget(
            id=self.id,
            name=self.name,
            scope=self.scope,
            scope_id=self.scope_id,
            limit_micro=UNCAPPED_MICRO if self.limit_usd is None else usd_to_micro(self.limit_usd),
            limit_calls=self.limit_calls,
            idle_ms=parse_duration_ms(self.idle) if self.idle else 86_400_000,
            period=self.period,
            on_exceed=self.on_exceed,
            downgrade_to=dict(self.downgrade_to),
            alert_thresholds=tuple(sorted(set(self.alert_thresholds))),
            forecast_alert=self.forecast_alert,
            enabled=self.enabled,
            timezone=self.timezone,
            fail_mode=self.fail_mode,
            estimate=self.estimate,
            source=source,
        )


# [0-9], not \d: \d (and int()) take every script's digits, so "\uff11m" (fullwidth) passed as 1m
# and were stored as given, a spelling no other reader of the definitions expects.
_DURATION = re.compile(r"^([0-9]+)(ms|s|m|h|d)\Z")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
# Limiter debts are integers of limit x window units inside Lua's doubles (2^53).
MAX_LIMIT_TIMES_WINDOW = 10**15


def parse_duration_ms(text: str) -> int:
    """'500ms', '2s', '1m', '1h', '1d' -> milliseconds; ValueError otherwise."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration such as 500ms, 2s, 1m, 1h or 1d")
    return int(match.group(1)) * _UNIT_MS[match.group(2)]


class RateLimitSpec(Struct, forbid_unknown_fields=True, kw_only=True):
    id: BudgetId
    scope: Scope
    metric: Metric
    # Requests, tokens or slots (a whole number); for metric usd, dollars.
    limit: (
        Annotated[int, Meta(ge=1, le=1_000_000_000)]
        | Annotated[float, Meta(gt=0, le=1_000_000_000)]
    )
    window: str | None = None
    # Requests or tokens past the steady rate; for usd, the most admitted at once (default:
    # the limit): at most limit + burst dollars in any window.
    burst: (
        Annotated[int, Meta(ge=0, le=1_000_000_000)]
        | Annotated[float, Meta(ge=0, le=1_000_000_000)]
        | None
    ) = None
    scope_id: Id | None = None
    model: ModelName | None = None
    provider: Id | None = None
    mode: LimitMode = LimitMode.ENFORCE

    def __post_init__(self) -> None:
        if self.metric is not Metric.USD:
            for name, value in (("limit", self.limit), ("burst", self.burst or 0)):
                if not float(value).is_integer():
                    raise ValueError(f"{name}: a whole number for a {self.metric} limit")
            if self.limit < 1:
                raise ValueError("limit: at least 1")
        elif round(self.limit * MICRO) < USD_UNIT_MICRO:
            raise ValueError("limit: at least $0.001 for a usd limit")
        elif self.burst is not None and round(self.burst * MICRO) < USD_UNIT_MICRO:
            raise ValueError("burst: the most a usd limit admits at once: at least $0.001")
        if self.metric is Metric.CONCURRENT:
            if self.window is not None:
                raise ValueError("window: a concurrent limit has no window")
            return
        if self.window is None:
            raise ValueError(f"window: required for a {self.metric} limit")
        try:
            window_ms = parse_duration_ms(self.window)
        except ValueError as exc:
            raise ValueError(f"window: {exc}") from None
        if not 100 <= window_ms <= 86_400_000:
            raise ValueError("window: between 100ms and 1d")
        if (self._units(self.limit) + 2 * self._units(self._burst)) * window_ms > (
            MAX_LIMIT_TIMES_WINDOW
        ):
            raise ValueError(
                f"limit: (limit + 2 x burst) x window must stay below "
                f"{MAX_LIMIT_TIMES_WINDOW:.0e} unit-milliseconds; use a shorter window"
            )

    @property
    def _burst(self) -> float:
        if self.burst is not None:
            return self.burst
        return self.limit if self.metric is Metric.USD else 0

    def _units(self, amount: float) -> int:
        """What the limiter counts: dollars in USD_UNIT_MICRO units for metric usd."""
        if self.metric is Metric.USD:
            return round(amount * MICRO) // USD_UNIT_MICRO
        return int(amount)

    def to_rate_limit(self, source: str) -> RateLimit:
        return RateLimit(
            id=self.id,
            scope=self.scope,
            metric=self.metric,
            limit=self._units(self.limit),
            window_ms=parse_duration_ms(self.window) if self.window else 0,
            burst=self._units(self._burst),
            scope_id=self.scope_id,
            model=self.model,
            provider=self.provider,
            mode=self.mode,
            source=source,
        )


class LoopGuardSpec(Struct, forbid_unknown_fields=True, kw_only=True):
    """`{id, scope, repeats, window, mode}`: the same fingerprint from one entity more than
    `repeats` times within `window` is a loop."""

    id: BudgetId
    scope: Scope
    repeats: Annotated[int, Meta(ge=1, le=100)]
    window: str
    mode: LimitMode = LimitMode.ENFORCE

    def __post_init__(self) -> None:
        try:
            window_ms = parse_duration_ms(self.window)
        except ValueError as exc:
            raise ValueError(f"window: {exc}") from None
        if not 1000 <= window_ms <= 86_400_000:
            raise ValueError("window: between 1s and 1d")

    def to_loop_guard(self) -> LoopGuard:
        return LoopGuard(
            id=self.id,
            scope=self.scope,
            repeats=self.repeats,
            window_ms=parse_duration_ms(self.window),
            mode=self.mode,
        )


def check_price(input_per_1k: float, output_per_1k: float) -> None:
    """A nonzero price below one pico-USD per token ($0.000000001 per 1k) would be kept as
    0: a priced model charged nothing. ValueError naming the field."""
    for name, value in (("input_per_1k", input_per_1k), ("output_per_1k", output_per_1k)):
        if value and price_to_pico(value) == 0:
            raise ValueError(f"{name}: at least 0.000000001 (one pico-USD per token), or 0")


class PriceSpec(Struct, forbid_unknown_fields=True, kw_only=True):
    provider: Id
    model: ModelName
    input_per_1k: PricePer1k
    output_per_1k: PricePer1k

    def __post_init__(self) -> None:
        check_price(self.input_per_1k, self.output_per_1k)

    def to_price(self) -> Price:
        return Price(
            provider=self.provider,
            model=self.model,
            input_pico=price_to_pico(self.input_per_1k),
            output_pico=price_to_pico(self.output_per_1k),
        )


class FallbackPriceSpec(Struct, forbid_unknown_fields=True, kw_only=True):
    input_per_1k: PricePer1k
    output_per_1k: PricePer1k

    def __post_init__(self) -> None:
        check_price(self.input_per_1k, self.output_per_1k)


# A Host name (no port), `*.` and a name for every name under it, or `*` for any Host.
AllowedHost = Annotated[
    str,
    Meta(
        pattern=r"^(\*|(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?)\Z",
        max_length=253,
    ),
]


class SettingsSpec(Struct, forbid_unknown_fields=True, kw_only=True):
    unpriced_model: UnpricedModel = UnpricedModel.REFUSE
    fallback_price: FallbackPriceSpec | None = None
    default_org_id: Id = "default"
    default_lease_ms: Annotated[int, Meta(ge=100, le=86_400_000)] = 60_000
    max_lease_ms: Annotated[int, Meta(ge=100, le=86_400_000)] = 3_600_000
    keep_finished_ms: Annotated[int, Meta(ge=60_000, le=30 * 86_400_000)] = 3_600_000
    fail_mode: FailMode = FailMode.CLOSED
    fail_open_max_pending: Annotated[int, Meta(ge=0, le=1_000_000)] = 10_000
    redis_timeout_ms: Annotated[int, Meta(ge=1, le=60_000)] = 500
    max_body_bytes: Annotated[int, Meta(ge=1024, le=16 * 1024 * 1024)] = 65_536
    max_api_definitions: Annotated[int, Meta(ge=1, le=10_000)] = 200
    max_stops: Annotated[int, Meta(ge=1, le=10_000)] = 1_000
    usage_max_records: Annotated[int, Meta(ge=0, le=100_000_000)] = 100_000
    usage_max_age_days: Annotated[int, Meta(ge=1, le=3660)] = 30
    alerts_max_age_days: Annotated[int, Meta(ge=1, le=3660)] = 30
    usage_aggregate_days: Annotated[int, Meta(ge=1, le=3660)] = 400
    usage_user_aggregate_days: Annotated[int, Meta(ge=1, le=3660)] = 2
    pre_check_estimate_usd: Annotated[float, Meta(ge=0, le=1_000_000)] = 0.01
    min_estimate_usd: Annotated[float, Meta(ge=0.000001, le=1_000_000)] = 0.01
    axonflow_metrics: bool = False
    # Learned estimates (issue 19; sidecar.learned).
    estimate: EstimateMode = EstimateMode.FIXED
    estimate_ceiling_usd: Annotated[float, Meta(gt=0, le=1_000_000)] = 1.0
    estimate_min_count: Annotated[int, Meta(ge=1, le=1_000_000)] = 10
    estimate_stats_days: Annotated[int, Meta(ge=1, le=3660)] = 7
    estimate_max_series: Annotated[int, Meta(ge=1, le=1_000_000)] = 10_000
    fast_http: bool = True
    # Host names the sidecar answers to besides its built-in ones (sidecar.api.origin).
    allowed_hosts: Annotated[tuple[AllowedHost, ...], Meta(max_length=100)] = ()
    max_connections: Annotated[int, Meta(ge=16, le=1_000_000)] = 4_096

    def __post_init__(self) -> None:
        if usd_to_micro(self.estimate_ceiling_usd) < usd_to_micro(self.min_estimate_usd):
            # A learned hold is never below the floor: a lower ceiling would never apply.
            raise ValueError(
                "estimate_ceiling_usd: below min_estimate_usd; a learned estimate could "
                "never be held"
            )
        if self.unpriced_model is UnpricedModel.FALLBACK and self.fallback_price is None:
            raise ValueError("fallback_price: unpriced_model fallback needs a fallback_price")
        if self.default_lease_ms > self.max_lease_ms:
            raise ValueError("default_lease_ms: larger than max_lease_ms")

    def to_settings(self) -> Settings:
        fallback = None
        if self.fallback_price is not None:
            fallback = Price(
                provider="*",
                model="*",
                input_pico=price_to_pico(self.fallback_price.input_per_1k),
                output_pico=price_to_pico(self.fallback_price.output_per_1k),
            )
        return Settings(
            unpriced_model=self.unpriced_model,
            fallback_price=fallback,
            default_org_id=self.default_org_id,
            default_lease_ms=self.default_lease_ms,
            max_lease_ms=self.max_lease_ms,
            keep_finished_ms=self.keep_finished_ms,
            fail_mode=self.fail_mode,
            fail_open_max_pending=self.fail_open_max_pending,
            redis_timeout_ms=self.redis_timeout_ms,
            max_body_bytes=self.max_body_bytes,
            max_api_definitions=self.max_api_definitions,
            max_stops=self.max_stops,
            usage_max_records=self.usage_max_records,
            usage_max_age_days=self.usage_max_age_days,
            alerts_max_age_days=self.alerts_max_age_days,
            usage_aggregate_days=self.usage_aggregate_days,
            usage_user_aggregate_days=self.usage_user_aggregate_days,
            pre_check_estimate_usd=self.pre_check_estimate_usd,
            min_estimate_micro=usd_to_micro(self.min_estimate_usd),
            axonflow_metrics=self.axonflow_metrics,
            estimate=self.estimate,
            estimate_ceiling_micro=usd_to_micro(self.estimate_ceiling_usd),
            estimate_min_count=self.estimate_min_count,
            estimate_stats_days=self.estimate_stats_days,
            estimate_max_series=self.estimate_max_series,
            fast_http=self.fast_http,
            allowed_hosts=tuple(h.lower() for h in self.allowed_hosts),
            max_connections=self.max_connections,
        )


class ClientSpec(Struct, forbid_unknown_fields=True, kw_only=True):
    client_id: Id
    tenant: Id | None = None  # default: the client id
    role: Role = Role.AGENT
    secret_sha256: Annotated[str, Meta(pattern=r"^[0-9a-f]{64}\Z")] | None = None
    # A plain secret is accepted too (hashed at load, compared in constant time), but keep
    # it in a Secret, not in a ConfigMap: prefer secret_sha256.
    secret: Annotated[str, Meta(min_length=1, max_length=512)] | None = None

    def __post_init__(self) -> None:
        if self.secret is not None and self.secret_sha256 is not None:
            raise ValueError("secret: give secret or secret_sha256, not both")

    def to_client(self) -> Client:
        digest = None
        if self.secret_sha256 is not None:
            digest = bytes.fromhex(self.secret_sha256)
        elif self.secret is not None:
            digest = hashlib.sha256(self.secret.encode("utf-8")).digest()
        return Client(self.client_id, self.tenant or self.client_id, self.role, digest)


class WebhookSpec(Struct, forbid_unknown_fields=True, kw_only=True):
    """A webhook for threshold alerts. The signing secret comes from the file (`secret`)
    or, better, from an environment variable (`secret_env`), e.g. a mounted Secret."""

    name: Id
    url: Annotated[str, Meta(pattern=r"^https?://[^\s]+\Z", max_length=2048)]
    secret: Annotated[str, Meta(min_length=16, max_length=512)] | None = None
    secret_env: Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*\Z")] | None = None
    tenant: Id | None = None
    timeout_ms: Annotated[int, Meta(ge=100, le=60_000)] = 5000

    def __post_init__(self) -> None:
        if (self.secret is None) == (self.secret_env is None):
            raise ValueError("secret: give secret or secret_env (one of them)")

    def to_webhook(self, env: Mapping[str, str]) -> Webhook:
        secret = self.secret
        if self.secret_env is not None:
            secret = env.get(self.secret_env)
            if not secret:
                raise ValueError(f"secret_env: environment variable {self.secret_env} is unset")
        assert secret is not None  # __post_init__
        return Webhook(self.name, self.url, secret.encode("utf-8"), self.tenant, self.timeout_ms)


class AuthSpec(Struct, forbid_unknown_fields=True, kw_only=True):
    clients: list[ClientSpec] = msgspec.field(default_factory=list)


class ConfigFile(Struct, forbid_unknown_fields=True, kw_only=True):
    budgets: list[BudgetSpec] = msgspec.field(default_factory=list)
    pricing: list[PriceSpec] = msgspec.field(default_factory=list)
    rate_limits: list[RateLimitSpec] = msgspec.field(default_factory=list)
    loop_guards: list[LoopGuardSpec] = msgspec.field(default_factory=list)
    settings: SettingsSpec = msgspec.field(default_factory=SettingsSpec)
    proxy: ProxySpec = msgspec.field(default_factory=ProxySpec)
    auth: AuthSpec = msgspec.field(default_factory=AuthSpec)
    webhooks: list[WebhookSpec] = msgspec.field(default_factory=list)


_AT = re.compile(r"^(?P<msg>.*?)(?: - at `(?P<path>[^`]*)`)?$", re.S)


# What each pattern a field is checked against means, in words: a message quotes these
# instead of the regex.
_PATTERN_WORDS = {
    r"^[0-9a-f]{32}\Z": "a reservation id: the 32 lowercase hex characters authorize returned",
    r"^[0-9a-f]{64}\Z": "a SHA-256 in hex: 64 lowercase hex characters "
    "(`budget-sidecar hash-secret` prints it)",
    r"^[A-Za-z0-9._~@+\-]+\Z": "letters, digits and . _ ~ @ + - only",
    r"^[A-Za-z0-9._~@+:/\-]+\Z": "letters, digits and . _ ~ @ + : / - only",
    r"^[A-Za-z0-9._~@+:=\-]+\Z": "letters, digits and . _ ~ @ + : = - only",
    r"^[A-Za-z0-9._~\-]+\Z": "letters, digits and . _ ~ - only",
    r"^https?://[^\s]+\Z": "an http:// or https:// URL without spaces",
    r"^[A-Za-z_][A-Za-z0-9_]*\Z": "an environment variable name (letters, digits, _)",
}
_REGEX = re.compile(r"Expected `str` matching regex '(?P<regex>.*)'\Z", re.S)
# The enum each field name carries, so a bad value lists the allowed ones.
_ENUMS: dict[str, tuple[str, ...]] = {
    name: tuple(e.value for e in enum_type)
    for name, enum_type in (
        ("scope", Scope),
        ("period", Period),
        ("on_exceed", OnExceed),
        ("unpriced_model", UnpricedModel),
        ("fail_mode", FailMode),
        ("metric", Metric),
        ("mode", LimitMode),
        ("role", Role),
        ("estimate", EstimateMode),
    )
}
_BAD_ENUM = re.compile(r"Invalid enum value (?P<value>.*)\Z", re.S)


def _in_words(path: str, message: str) -> str:
    """A msgspec message a person can act on: patterns described, enums listed."""
    regex = _REGEX.match(message)
    if regex is not None:
        words = _PATTERN_WORDS.get(regex.group("regex").replace("\\\\", "\\"))
        if words is not None:
            return f"expected {words}"
    bad = _BAD_ENUM.match(message)
    if bad is not None:
        allowed = _ENUMS.get(path.rpartition(".")[2])
        if allowed is not None:
            return f"{bad.group('value')} is not one of: {', '.join(allowed)}"
    return message


def split_validation_error(text: str) -> tuple[str, str]:
    """("$.budgets[0].limit_usd", "Expected ...") from a msgspec ValidationError text.

    Errors raised in __post_init__ as "<field>: <reason>" point at the struct; the field
    named in the message is appended to the path. Regexes and enums are put in words.
    """
    path, message = _split(text)
    return path, _in_words(path, message)


def _split(text: str) -> tuple[str, str]:
    match = _AT.match(text)
    assert match is not None  # the pattern matches any string
    message, path = match.group("msg"), match.group("path") or "$"
    field, sep, reason = message.partition(": ")
    if sep and re.fullmatch(r"[a-z_][a-z0-9_]*", field):
        return f"{path}.{field}", reason
    missing = re.match(r"Object missing required field `([^`]+)`", message)
    if missing:
        return f"{path}.{missing.group(1)}", message
    unknown = re.fullmatch(r"Object contains unknown field `(.*)`", message, re.S)
    if unknown:
        return f"{path}.{unknown.group(1)}", message
    return path, message


def _not_unicode(data: Any, path: str = "$") -> str | None:
    """The path of the first text in `data` that is not valid Unicode (a lone surrogate,
    which YAML's "\\ud800" escape makes): nothing could send or show it (JSON encoding a
    name that holds one raises), so it is refused with the file, not met by every answer
    that names it."""
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError:
            return path
    elif isinstance(data, dict):
        for key, value in data.items():
            found = _not_unicode(key, path) or _not_unicode(value, f"{path}.{key}")
            if found is not None:
                return found
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found = _not_unicode(value, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def parse(data: Any, source: str) -> Config:
    """Validate an already-parsed document (YAML or JSON) into a Config."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, "$", "the top level must be a mapping")
    bad_text = _not_unicode(data)
    if bad_text is not None:
        raise ConfigError(
            source, bad_text, "not valid Unicode text (a lone surrogate such as \\ud800)"
        )
    try:
        spec = msgspec.convert(data, ConfigFile)
    except msgspec.ValidationError as exc:
        path, message = split_validation_error(str(exc))
        raise ConfigError(source, path, message) from None
    limit_ids: set[str] = set()
    for i, r in enumerate(spec.rate_limits):
        if r.id in limit_ids:
            raise ConfigError(source, f"$.rate_limits[{i}].id", f"duplicate rate limit id {r.id!r}")
        limit_ids.add(r.id)
    guard_ids: set[str] = set()
    for i, g in enumerate(spec.loop_guards):
        if g.id in guard_ids:
            raise ConfigError(source, f"$.loop_guards[{i}].id", f"duplicate loop guard id {g.id!r}")
        guard_ids.add(g.id)
    seen: set[str] = set()
    for i, b in enumerate(spec.budgets):
        if b.id in seen:
            raise ConfigError(source, f"$.budgets[{i}].id", f"duplicate budget id {b.id!r}")
        seen.add(b.id)
    client_ids: set[str] = set()
    for i, c in enumerate(spec.auth.clients):
        if c.client_id in client_ids:
            raise ConfigError(
                source, f"$.auth.clients[{i}].client_id", f"duplicate client {c.client_id!r}"
            )
        client_ids.add(c.client_id)
    prices: set[tuple[str, str]] = set()
    for i, p in enumerate(spec.pricing):
        if (p.provider, p.model) in prices:
            raise ConfigError(
                source, f"$.pricing[{i}]", f"duplicate price for {p.provider}/{p.model}"
            )
        prices.add((p.provider, p.model))
    webhooks = []
    names: set[str] = set()
    for i, w in enumerate(spec.webhooks):
        if w.name in names:
            raise ConfigError(source, f"$.webhooks[{i}].name", f"duplicate webhook {w.name!r}")
        names.add(w.name)
        try:
            webhooks.append(w.to_webhook(os.environ))
        except ValueError as exc:
            field, _, reason = str(exc).partition(": ")
            raise ConfigError(source, f"$.webhooks[{i}].{field}", reason) from None
    return Config(
        webhooks=tuple(webhooks),
        budgets=tuple(b.to_budget("config") for b in spec.budgets),
        pricing=tuple(p.to_price() for p in spec.pricing),
        rate_limits=tuple(r.to_rate_limit("config") for r in spec.rate_limits),
        loop_guards=tuple(g.to_loop_guard() for g in spec.loop_guards),
        settings=spec.settings.to_settings(),
        proxy=spec.proxy,
        clients=tuple(c.to_client() for c in spec.auth.clients),
        source=source,
    )


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _mapping_without_duplicates,
)


def load(path: str | Path) -> Config:
    """Read and validate a config file; raises ConfigError naming the file and field."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, "$", f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(source, "$", f"not UTF-8 text (byte {exc.start})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError(source, "$", f"not valid YAML: {problem} ({where})") from None
    return parse(data, source)
