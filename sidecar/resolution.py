"""Resolution: which budgets and rate limits apply to an identity, provider and model.

A Snapshot is a Config indexed for the hot path; a Resolver turns (snapshot, identity
fields, provider, model) into a Resolved: the applied budgets and limiters and the script
arguments that do not change from one decision to the next, memoized until the earliest
budget window ends.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

from sidecar import keys, learned
from sidecar.decision import Applied
from sidecar.model import (
    SCOPE_FIELD,
    Budget,
    Config,
    EstimateMode,
    Identity,
    LimitMode,
    LoopGuard,
    Metric,
    OnExceed,
    Period,
    Price,
    RateLimit,
    Scope,
)
from sidecar.periods import WindowCache
from sidecar.pricing import Prices, catalogue
from sidecar.reservations import meta_head
from sidecar.resp import Packed
from sidecar.schemas import IdentityFields

# A counter outlives its window by this much before garbage collection may delete it; it
# must exceed the longest lease so a late settle never recreates a collected counter.
COUNTER_GRACE_MS = 2 * 86_400_000

MODE = {OnExceed.BLOCK: "b", OnExceed.WARN: "w", OnExceed.DOWNGRADE: "d"}
_SCOPE_FIELDS = tuple((scope, SCOPE_FIELD[scope]) for scope in Scope)
_MEMO_SIZE = 10_000
_METRIC = {Metric.REQUESTS: "r", Metric.TOKENS: "t", Metric.CONCURRENT: "c", Metric.USD: "u"}

_RUN = Scope.RUN  # a module constant: an enum member lookup costs ~900 instructions on 3.11

_T = TypeVar("_T", Budget, RateLimit)


def _index(
    items: Iterable[_T],
) -> tuple[dict[tuple[Scope, str], tuple[_T, ...]], dict[Scope, tuple[_T, ...]]]:
    """(one entity -> items, scope -> items that apply to every entity of it)."""
    by_entity: dict[tuple[Scope, str], list[_T]] = defaultdict(list)
    per_entity: dict[Scope, list[_T]] = defaultdict(list)
    for item in items:
        if item.scope_id is None:
            per_entity[item.scope].append(item)
        else:
            by_entity[(item.scope, item.scope_id)].append(item)
    return (
        {k: tuple(v) for k, v in by_entity.items()},
        {k: tuple(v) for k, v in per_entity.items()},
    )


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A Config indexed for the hot path. Immutable: swapped whole on change."""

    config: Config
    by_entity: dict[tuple[Scope, str], tuple[Budget, ...]]
    per_entity: dict[Scope, tuple[Budget, ...]]
    limits_by_entity: dict[tuple[Scope, str], tuple[RateLimit, ...]]
    limits_per_entity: dict[Scope, tuple[RateLimit, ...]]
    by_id: dict[str, Budget]
    prices: Prices
    loops_per_scope: dict[Scope, tuple[LoopGuard, ...]]
    # Something applies per run (a budget, rate limit or loop guard of scope run): the run
    # id is then part of what a call resolves to. Else one resolution serves every run of
    # an identity, and only the run's stop field is the call's own (read_with_run).
    uses_run: bool

    @classmethod
    def of(cls, config: Config, api_pricing: Iterable[Price] = ()) -> Snapshot:
        by_entity, per_entity = _index(b for b in config.budgets if b.enabled)
        limits_by_entity, limits_per_entity = _index(config.rate_limits)
        loops: dict[Scope, list[LoopGuard]] = defaultdict(list)
        for g in config.loop_guards:
            loops[g.scope].append(g)
        scopes = {b.scope for b in config.budgets if b.enabled}
        scopes |= {r.scope for r in config.rate_limits} | set(loops)
        return cls(
            loops_per_scope={k: tuple(v) for k, v in loops.items()},
            uses_run=Scope.RUN in scopes,
            config=config,
            by_entity=by_entity,
            per_entity=per_entity,
            limits_by_entity=limits_by_entity,
            limits_per_entity=limits_per_entity,
            by_id={b.id: b for b in config.budgets},
            # Config and API prices over the bundled catalogue (sidecar/pricing.py).
            prices=Prices.of(config.pricing, api_pricing, catalogue()),
        )


@dataclass(frozen=True, slots=True)
class AppliedLimit:
    """A rate limit as it applies to one decision: its limiter for this entity."""

    limit: RateLimit
    entity: str
    # The limiter's script arguments, built once: rf, metric, limit, window, burst, shadow.
    args: tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class AppliedLoop:
    """A loop guard as it applies to one decision: the entity it watches."""

    guard: LoopGuard
    entity: str
    # The script's six arguments: guard id, repeats, window_ms, shadow, scope, entity.
    args: tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Resolved:
    """Everything that applies to one (identity, provider, model), and what the decisions
    on it send and answer that does not change from one decision to the next."""

    budgets: list[Applied]
    limits: list[AppliedLimit]
    valid_until_ms: int
    # authorize.lua's record parts (ARGV[26..31]), its four arguments per budget, then its
    # six per rate limit, and the ctr fields both scripts read (lua/authorize.lua's
    # header); check.lua's three per budget, then the same six; both scripts' six per
    # loop guard (sent only with a fingerprint: a call without one is no repeat of
    # anything).
    script_args: tuple[str | int, ...]
    read_fields: tuple[str, ...]
    check_args: tuple[str | int, ...]
    loops: list[AppliedLoop]
    loop_args: tuple[str | int, ...]
    # How many of read_fields are the call's entities' stop-switch fields in ctr
    # ("s:agent:a1", ...).
    stop_count: int
    # The ledger tuple (see _meta_head) up to the step and run ids, which vary per call.
    meta_head: str
    # The model the first downgrade budget falls back to, and the ledger tuple's head for
    # a call downgraded to it (None: no downgrade budget applies).
    downgrade_model: str | None = None
    meta_head_down: str = ""
    # The estimate mode of a call on this resolution whose route names none (the budgets'
    # or the settings', sidecar.learned.mode_of), worked out once.
    estimate_mode: EstimateMode = EstimateMode.FIXED
    # Resolved with the call's run (something applies per run); False: without it, and
    # the call's run stop field is added per call (read_with_run).
    run_resolved: bool = True
    # Some budget caps calls: only then does a decision look for one past its cap (the
    # look cost two generator passes a decision, 16k instructions, callgrind).
    calls_capped: bool = False
    # authorize.lua's and check.lua's last arguments when the call adds none of its own
    # (no loop guard's, no run's stop field): script_args or check_args, then read_fields,
    # packed as RESP once (sidecar.resp.Packed). Set in __post_init__.
    authorize_tail: Packed = dataclasses.field(init=False, repr=False, compare=False)
    check_tail: Packed = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "authorize_tail", Packed((*self.script_args, *self.read_fields)))
        object.__setattr__(self, "check_tail", Packed((*self.check_args, *self.read_fields)))


def identity_of(fields: IdentityFields, default_org_id: str) -> Identity:
    """The identity a request names; one that names no org is the default org's."""
    return Identity(
        org_id=fields.org_id or default_org_id,
        team_id=fields.team_id,
        agent_id=fields.agent_id,
        workflow_id=fields.workflow_id,
        user_id=fields.user_id,
        run_id=fields.run_id,
    )


class Resolver:
    """Resolves identities against snapshots, with a memo and the period windows' cache."""

    def __init__(self) -> None:
        self._windows = WindowCache()
        # (tenant, org, team, agent, workflow, user, provider, model, run) as the request named
        # them -> (the snapshot resolved against, what applies).
        self._memo: dict[tuple[str | None, ...], tuple[Snapshot, Resolved]] = {}

    def resolve(
        self,
        snap: Snapshot,
        tenant: str,
        fields: IdentityFields,
        provider: str | None,
        model: str | None,
        now_ms: int,
        default_org_id: str,
    ) -> Resolved:
        """Every budget and rate limit that covers this call.

        Memoized per (tenant, identity fields, provider, model) until the earliest budget
        window ends: agents repeat the same identity, and resolving it costs more than the
        decision's own Python work. The key is the request's own fields, so a hit builds
        nothing. A snapshot swap starts a fresh memo.
        """
        memo_key = (
            tenant,
            fields.org_id,
            fields.team_id,
            fields.agent_id,
            fields.workflow_id,
            fields.user_id,
            provider,
            model,
            # Runs are many and short: part of the key only when something applies per
            # run. Else the resolution leaves the run out, and each call adds its own
            # run's stop field (read_with_run): a memo entry shared by two runs must not
            # read one run's stop for the other.
            fields.run_id if snap.uses_run else None,
        )
        hit = self._memo.get(memo_key)
        if hit is not None and hit[0] is snap and now_ms < hit[1].valid_until_ms:
            return hit[1]
        identity = identity_of(fields, default_org_id)
        if not snap.uses_run and identity.run_id is not None:
            identity = dataclasses.replace(identity, run_id=None)
        resolved = self._resolve(snap, identity, provider, model, now_ms)
        if len(self._memo) >= _MEMO_SIZE:
            self._memo.clear()
        self._memo[memo_key] = (snap, resolved)
        return resolved

    def _resolve(
        self,
        snap: Snapshot,
        identity: Identity,
        provider: str | None,
        model: str | None,
        now_ms: int,
    ) -> Resolved:
        budgets: list[Applied] = []
        limits: list[AppliedLimit] = []
        loops: list[AppliedLoop] = []
        stop_fields: list[str] = []
        for scope, field in _SCOPE_FIELDS:
            entity: str | None = getattr(identity, field)
            if entity is None:
                continue
            stop_fields.append(stop_field(scope, entity))
            for b in snap.by_entity.get((scope, entity), ()):
                budgets.append(self.applied(b, entity, model, now_ms))
            for b in snap.per_entity.get(scope, ()):
                budgets.append(self.applied(b, entity, model, now_ms))
            for r in snap.limits_by_entity.get((scope, entity), ()):
                if _covers(r, provider, model):
                    limits.append(applied_limit(r, entity))
            for r in snap.limits_per_entity.get(scope, ()):
                if _covers(r, provider, model):
                    limits.append(applied_limit(r, entity))
            for g in snap.loops_per_scope.get(scope, ()):
                loops.append(_applied_loop(g, entity))
        budget_args: list[str | int] = []
        check_args: list[str | int] = []
        for a in budgets:
            b = a.budget
            calls = "" if b.limit_calls is None else b.limit_calls
            idle = b.idle_ms if b.period is Period.TOTAL else ""
            budget_args += (b.limit_micro, a.mode, calls, idle)
            check_args += (b.limit_micro, a.mode, calls)
        for limit in limits:
            budget_args += limit.args
            check_args += limit.args
        loop_args: list[str | int] = []
        for loop in loops:
            loop_args += loop.args
        down = next((a.downgrade_model for a in budgets if a.mode == "d"), None)
        return Resolved(
            budgets=budgets,
            limits=limits,
            valid_until_ms=min((a.window_end_ms for a in budgets), default=now_ms + 60_000),
            script_args=(*record_parts(budgets, limits), *budget_args),
            read_fields=read_fields(budgets, limits, stop_fields),
            check_args=tuple(check_args),
            loops=loops,
            loop_args=tuple(loop_args),
            stop_count=len(stop_fields),
            meta_head=meta_head(provider, model, identity),
            downgrade_model=down,
            meta_head_down=meta_head(provider, down, identity) if down else "",
            estimate_mode=learned.mode_of(
                snap.config.settings.estimate, (a.budget for a in budgets)
            ),
            run_resolved=snap.uses_run,
            calls_capped=any(a.budget.limit_calls is not None for a in budgets),
        )

    def applied(self, b: Budget, entity: str, model: str | None, now_ms: int) -> Applied:
        w = self._windows.get(b.period, b.timezone, now_ms)
        mode = MODE[b.on_exceed]
        target = b.downgrade_to.get(model) if model is not None else None
        if mode == "d" and target is None:
            mode = "b"  # nothing cheaper to fall back to: hold the line
        return Applied(
            budget=b,
            entity=entity,
            cid=keys.counter_id(b.id, entity, w.key),
            window_start_ms=w.start_ms,
            window_end_ms=w.end_ms,
            mode=mode,
            downgrade_model=target,
            thresholds=".".join(map(str, b.alert_thresholds)),
        )


def _covers(limit: RateLimit, provider: str | None, model: str | None) -> bool:
    return (limit.model is None or limit.model == model) and (
        limit.provider is None or limit.provider == provider
    )


def stop_field(scope: Scope, entity: str) -> str:
    """An entity's stop-switch field in ctr (keys.py documents it)."""
    return keys.ctr_field("s", keys.stop_field(scope.value, entity))


def _applied_loop(guard: LoopGuard, entity: str) -> AppliedLoop:
    shadow = "1" if guard.mode is LimitMode.SHADOW else "0"
    return AppliedLoop(
        guard=guard,
        entity=entity,
        # The entity escaped, as every alert carries it.
        args=(
            guard.id,
            guard.repeats,
            guard.window_ms,
            shadow,
            guard.scope.value,
            keys.escape(entity),
        ),
    )


def applied_limit(limit: RateLimit, entity: str) -> AppliedLimit:
    return AppliedLimit(
        limit=limit,
        entity=entity,
        args=(
            keys.rate_id(limit.id, entity),
            _METRIC[limit.metric],
            limit.limit,
            limit.window_ms,
            limit.burst,
            "1" if limit.mode is LimitMode.SHADOW else "0",
        ),
    )


def record_parts(budgets: list[Applied], limits: list[AppliedLimit]) -> tuple[str, ...]:
    """What authorize.lua's record keeps of the budgets and limiters (its ARGV[26..31]),
    joined here once per resolution rather than in Lua at every call: the cids; per cid
    "limit:thresholds:mode[:start_ms:end_ms]" (lua/_lib.lua parse_spec); the cids with a
    call cap; and the concurrency rfs, token limiters and usd limiters of a call every
    limiter charges ("rf:limit:window_ms")."""
    specs = []
    for a in budgets:
        window = forecast_window(a)
        spec = f"{a.budget.limit_micro}:{a.thresholds}:{a.mode}"
        specs.append(f"{spec}:{window}" if window else spec)

    def charged(metric: str) -> str:
        return ",".join(
            f"{rf}:{limit}:{window}"
            for rf, m, limit, window, *_ in (x.args for x in limits)
            if m == metric
        )

    return (
        ",".join(a.cid for a in budgets),
        ";".join(specs),
        ",".join(a.cid for a in budgets if a.budget.limit_calls is not None),
        ",".join(str(x.args[0]) for x in limits if x.args[1] == "c"),
        charged("t"),
        charged("u"),
    )


def read_fields(
    budgets: list[Applied], limits: list[AppliedLimit], stop_fields: list[str]
) -> tuple[str, ...]:
    """The ctr fields authorize.lua reads, in the order its header gives."""
    out: list[str] = []
    for a in budgets:
        out += (keys.ctr_field("u", a.cid), keys.ctr_field("h", a.cid))
    for x in limits:
        rf = str(x.args[0])
        if x.args[1] == "c":
            out += (keys.ctr_field("n", rf), keys.ctr_field("n", rf))
        else:
            # As the record names it (record_parts): correct_tokens finds the same fields.
            state = keys.limiter_state(rf, int(x.args[2]), int(x.args[3]))
            out += (keys.ctr_field("d", state), keys.ctr_field("l", state))
    out += (keys.ctr_field("c", a.cid) for a in budgets if a.budget.limit_calls is not None)
    out += stop_fields
    out += (keys.ctr_field("w", a.cid) for a in budgets)
    return tuple(out)


def record_slot(a: Applied) -> str | int:
    """record.lua's second slot of a budget: a period-total counter's idle ms (a charge
    by record pushes its collection on, as an authorize does), else forecast_window."""
    if a.budget.period is Period.TOTAL:
        return a.budget.idle_ms
    return forecast_window(a)


def read_with_run(resolved: Resolved, run_id: str | None) -> tuple[int, tuple[str, ...]]:
    """The number of stop fields and the ctr fields a call on `resolved` reads (authorize
    and check): resolved's, plus the call's own run's stop field where the resolution left
    the run out (Snapshot.uses_run), last among the stop fields as a resolution with the
    run puts it, just before the budgets' recent-spend windows (read_fields)."""
    fields = resolved.read_fields
    if run_id is None or resolved.run_resolved:
        return resolved.stop_count, fields
    at = len(fields) - len(resolved.budgets)
    return resolved.stop_count + 1, (*fields[:at], stop_field(_RUN, run_id), *fields[at:])


def forecast_window(a: Applied) -> str:
    """The scripts' forecast-alert slot of a budget: its period window "start_ms:end_ms",
    or '' when it asks for no forecast alert (lua/_lib.lua forecast_suffix)."""
    if not a.budget.forecast_alert or a.budget.period is Period.TOTAL:
        return ""
    return f"{a.window_start_ms}:{a.window_end_ms}"
