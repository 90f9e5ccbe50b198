"""The engine: one config snapshot + one store -> decisions.

It resolves which budgets apply to an identity, prices estimates, builds each script's
KEYS/ARGV, runs exactly one script per operation, and turns the reply into the response
types. Definitions come from the in-memory snapshot only; nothing is read from Redis
except through the one script call (invariant 5).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from sidecar import keys, tasks
from sidecar.auth import OPEN
from sidecar.clock import Clock
from sidecar.decision import Applied, decide, percentage
from sidecar.events import EngineEvents, NoEvents
from sidecar.model import (
    SCOPE_FIELD,
    Action,
    Budget,
    Config,
    FailMode,
    Identity,
    LimitMode,
    Metric,
    OnExceed,
    Price,
    RateLimit,
    Scope,
    TenantDefinitions,
    UnpricedModel,
)
from sidecar.money import MICRO, cost_micro, micro_to_usd, usd_to_micro
from sidecar.periods import WindowCache, iso
from sidecar.pricing import Prices, catalogue
from sidecar.schemas import (
    AuthorizeRequest,
    BudgetInfo,
    BudgetState,
    BudgetStatus,
    CheckRequest,
    Decision,
    IdentityFields,
    RateLimitState,
    RecordRequest,
    RecordResult,
    SettleRequest,
    SettleResult,
)
from sidecar.scripts import Script, Scripts
from sidecar.store import Store, StoreUnavailable

# A counter outlives its window by this much before garbage collection may delete it; it
# must exceed the longest lease so a late settle never recreates a collected counter.
COUNTER_GRACE_MS = 2 * 86_400_000

_MODE = {OnExceed.BLOCK: "b", OnExceed.WARN: "w", OnExceed.DOWNGRADE: "d"}
_SCOPE_FIELDS = tuple((scope, SCOPE_FIELD[scope]) for scope in Scope)
_MEMO_SIZE = 10_000
_MAX_PENDING_CANCELS = 10_000
# The scripts' answer when more ended leases wait than one call returns (lua/_lib.lua).
BACKLOG = -9
# Leases reclaim.lua returns per call while draining a backlog: about 5 ms of Redis time
# each, so other clients' calls interleave with a drain of any size.
RECLAIM_BATCH = 500
# A decision that meets a backlog drains it and asks again, this many times at most.
_BACKLOG_ROUNDS = 4
# settle's cost argument for "charge the held estimate" (an unpriced model).
CHARGE_ESTIMATE = -1
_PRICED_BY = {"t": "tokens", "c": "cost", "e": "estimate"}


class RequestError(Exception):
    """The request is well-formed but cannot be served as asked (HTTP 400 or 404)."""

    def __init__(self, field: str, message: str, status: int = 400) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status


class IdempotencyConflict(RequestError):
    """An idempotency key names a reservation this request may not be handed: one made by
    a different request, or one no longer held (HTTP 409). Nothing changed."""

    def __init__(self, reservation_id: str, state: str, *, reused: bool) -> None:
        held = {"H": "held", "E": "expired", "S": "settled", "R": "released"}.get(state, state)
        if reused:
            message = (
                f"already used by another request (reservation {reservation_id}, {held}): "
                "use a new key for a new call"
            )
        else:
            message = (
                f"its reservation {reservation_id} is {held}, no longer held: a new call "
                "needs a new key"
            )
        super().__init__("idempotency_key", message, status=409)
        self.reservation_id = reservation_id


class Unavailable(Exception):
    """Redis is unreachable and the fail mode is closed (HTTP 503)."""


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

    @classmethod
    def of(cls, config: Config, api_pricing: Iterable[Price] = ()) -> Snapshot:
        by_entity, per_entity = _index(b for b in config.budgets if b.enabled)
        limits_by_entity, limits_per_entity = _index(config.rate_limits)
        return cls(
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
class Resolved:
    """Everything that applies to one (identity, provider, model), and what the decisions
    on it send and answer that does not change from one decision to the next."""

    budgets: list[Applied]
    limits: list[AppliedLimit]
    valid_until_ms: int
    # authorize.lua's five arguments per budget, then its six per rate limit.
    script_args: tuple[str | int, ...]
    # The ledger tuple (see _meta_head) up to the step and run ids, which vary per call.
    meta_head: str
    # The model the first downgrade budget falls back to, and the ledger tuple's head for
    # a call downgraded to it (None: no downgrade budget applies).
    downgrade_model: str | None = None
    meta_head_down: str = ""


class Engine:
    def __init__(
        self,
        config: Config,
        store: Store,
        clock: Clock,
        scripts: Scripts,
        events: EngineEvents | None = None,
    ) -> None:
        self.events: EngineEvents = events or NoEvents()
        self._store = store
        self._clock = clock
        self._scripts = scripts
        self._windows = WindowCache()
        self._snapshot = Snapshot.of(config)
        # Definitions made through the API, per tenant, and the snapshots that merge them
        # with the config file's (tenants without any use self._snapshot).
        self._api: dict[str, TenantDefinitions] = {}
        self._snapshots: dict[str, Snapshot] = {}
        self._ledger = _ledger_config(config)
        self._charging_day = -1
        self._charging: dict[str, tuple[str, ...]] = {}
        # (tenant, org, team, agent, workflow, user, provider, model) as the request named
        # them -> (the snapshot resolved against, what applies).
        self._memo: dict[tuple[str | None, ...], tuple[Snapshot, Resolved]] = {}
        self._cancels: set[asyncio.Task[None]] = set()

    # ---- definitions ------------------------------------------------------------------

    @property
    def config(self) -> Config:
        return self._snapshot.config

    def swap(self, config: Config) -> None:
        """Replace the config file's definitions at once; decisions in flight keep the old
        snapshot."""
        self._snapshot = Snapshot.of(config)
        self._ledger = _ledger_config(config)
        self._rebuild_tenants()

    def set_definitions(self, definitions: dict[str, TenantDefinitions]) -> None:
        """Replace every tenant's API definitions (see sidecar.definitions)."""
        self._api = dict(definitions)
        self._rebuild_tenants()

    def definitions(self, tenant: str) -> TenantDefinitions:
        return self._api.get(tenant, _NONE_DEFINED)

    def api_limits(self, tenant: str) -> tuple[RateLimit, ...]:
        return self.definitions(tenant).rate_limits

    def _rebuild_tenants(self) -> None:
        config = self._snapshot.config
        self._snapshots = {}
        for tenant, d in self._api.items():
            if not (d.rate_limits or d.budgets or d.pricing):
                continue
            # A price set through the API replaces the file's for the same model.
            prices = {(p.provider, p.model): p for p in (*config.pricing, *d.pricing)}
            self._snapshots[tenant] = Snapshot.of(
                replace(
                    config,
                    rate_limits=config.rate_limits + d.rate_limits,
                    budgets=config.budgets + d.budgets,
                    pricing=tuple(prices.values()),
                ),
                api_pricing=d.pricing,
            )

    def snapshot(self, tenant: str) -> Snapshot:
        return self._snapshots.get(tenant, self._snapshot)

    def budget(self, tenant: str, budget_id: str) -> Budget | None:
        """A budget as `tenant` sees it: the config file's, or one of its own API budgets."""
        return self.snapshot(tenant).by_id.get(budget_id)

    def budget_name(self, tenant: str, budget_id: str) -> str | None:
        found = self.budget(tenant, budget_id)
        return found.name if found is not None else None

    def budgets(self, tenant: str) -> tuple[Budget, ...]:
        """The config file's budgets, then the tenant's own, in creation order."""
        return self.snapshot(tenant).config.budgets

    @property
    def store_client(self) -> Any:
        """The store's redis-py client, for reads off the hot path (ledger, alerts)."""
        return self._store.client

    def now_ms(self) -> int:
        return self._clock.now_ms()

    def limiter_ms(self) -> str:
        return self._clock.limiter_ms()

    @property
    def scripts(self) -> Scripts:
        return self._scripts

    def report_expired(self, reply: list[Any]) -> None:
        """Pop and report the expiry counts a script reply ends with (the sweep's too)."""
        self._expired(reply)

    def tenants(self) -> set[str]:
        """Every tenant a client can act for (open mode: the one default tenant)."""
        clients = self._snapshot.config.clients
        return {c.tenant for c in clients} if clients else {OPEN.tenant}

    def identity(self, fields: IdentityFields) -> Identity:
        return Identity(
            org_id=fields.org_id or self._snapshot.config.settings.default_org_id,
            team_id=fields.team_id,
            agent_id=fields.agent_id,
            workflow_id=fields.workflow_id,
            user_id=fields.user_id,
        )

    def resolve(
        self,
        tenant: str,
        fields: IdentityFields,
        provider: str | None,
        model: str | None,
        now_ms: int,
    ) -> Resolved:
        """Every budget and rate limit that covers this call.

        Memoized per (tenant, identity fields, provider, model) until the earliest budget
        window ends: agents repeat the same identity, and resolving it costs more than the
        decision's own Python work. The key is the request's own fields, so a hit builds
        nothing. A snapshot swap starts a fresh memo.
        """
        snap = self.snapshot(tenant)
        memo_key = (
            tenant,
            fields.org_id,
            fields.team_id,
            fields.agent_id,
            fields.workflow_id,
            fields.user_id,
            provider,
            model,
        )
        hit = self._memo.get(memo_key)
        if hit is not None and hit[0] is snap and now_ms < hit[1].valid_until_ms:
            return hit[1]
        resolved = self._resolve(snap, self.identity(fields), provider, model, now_ms)
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
        for scope, field in _SCOPE_FIELDS:
            entity: str | None = getattr(identity, field)
            if entity is None:
                continue
            for b in snap.by_entity.get((scope, entity), ()):
                budgets.append(self._applied(b, entity, model, now_ms))
            for b in snap.per_entity.get(scope, ()):
                budgets.append(self._applied(b, entity, model, now_ms))
            for r in snap.limits_by_entity.get((scope, entity), ()):
                if _covers(r, provider, model):
                    limits.append(_applied_limit(r, entity))
            for r in snap.limits_per_entity.get(scope, ()):
                if _covers(r, provider, model):
                    limits.append(_applied_limit(r, entity))
        script_args: list[str | int] = []
        for a in budgets:
            script_args += (
                a.cid,
                a.budget.limit_micro,
                a.mode,
                a.window_end_ms + COUNTER_GRACE_MS,
                a.thresholds,
            )
        for limit in limits:
            script_args += limit.args
        down = next((a.downgrade_model for a in budgets if a.mode == "d"), None)
        return Resolved(
            budgets=budgets,
            limits=limits,
            valid_until_ms=min((a.window_end_ms for a in budgets), default=now_ms + 60_000),
            script_args=tuple(script_args),
            meta_head=_meta_head(provider, model, identity),
            downgrade_model=down,
            meta_head_down=_meta_head(provider, down, identity) if down else "",
        )

    def _applied(self, b: Budget, entity: str, model: str | None, now_ms: int) -> Applied:
        w = self._windows.get(b.period, b.timezone, now_ms)
        mode = _MODE[b.on_exceed]
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

    def price(
        self, provider: str | None, model: str | None, tenant: str | None = None
    ) -> Price | None:
        """The price of a model (as `tenant` sees it; None: the config file's), the fallback
        price, or None (unpriced)."""
        if model is None:
            return None
        snap = self._snapshot if tenant is None else self.snapshot(tenant)
        found = snap.prices.find(provider, model)
        if found is None and snap.config.settings.unpriced_model is UnpricedModel.FALLBACK:
            return snap.config.settings.fallback_price
        return None if found is None else found[0]

    def _priced(
        self, tenant: str, provider: str | None, model: str | None, usd: float | None = None
    ) -> Price | None:
        """The model's price; a model with none is refused unless the call names its dollar
        amount (`usd`: then no price is needed, and a settle by tokens alone is refused)."""
        price = self.price(provider, model, tenant)
        if price is None and model is not None and usd is None:
            raise RequestError(
                "model",
                f"no price for {provider or '*'}/{model}: add it to pricing, or set "
                "settings.unpriced_model to fallback",
            )
        return price

    def _estimate(
        self,
        price: Price | None,
        usd: float | None,
        tokens_in: int | None,
        tokens_out: int | None,
    ) -> int:
        if usd is not None:
            return usd_to_micro(usd)
        if price is None:
            return 0
        return cost_micro(tokens_in or 0, price.input_pico) + cost_micro(
            tokens_out or 0, price.output_pico
        )

    # ---- operations -------------------------------------------------------------------

    async def _authorize(self, tenant: str, req: AuthorizeRequest) -> Decision:
        settings = self._snapshot.config.settings
        now = self._clock.now_ms()
        price = self._priced(tenant, req.provider, req.model, req.estimated_usd)
        asked = self._estimate(
            price, req.estimated_usd, req.estimated_tokens_in, req.estimated_tokens_out
        )
        est = max(asked, settings.min_estimate_micro)
        lease_ms = req.lease_ms if req.lease_ms is not None else settings.default_lease_ms
        if lease_ms > settings.max_lease_ms:
            raise RequestError(
                "lease_ms", f"at most {settings.max_lease_ms} (settings.max_lease_ms)"
            )
        resolved = self.resolve(tenant, req, req.provider, req.model, now)
        applied = resolved.budgets
        down_price, est_down = self._downgrade(tenant, resolved, req, price, est)
        rid = new_reservation_id()
        key = req.idempotency_key
        args = (
            now,
            rid,
            lease_ms,
            est,
            key or "",
            price.input_pico if price else "",
            price.output_pico if price else "",
            settings.keep_finished_ms,
            _meta(resolved.meta_head, req.step_id, req.run_id),
            (req.estimated_tokens_in or 0) + (req.estimated_tokens_out or 0),
            len(applied),
            self._clock.limiter_ms(),
            _fingerprint(req, asked) if key else "",
            "" if est_down is None else est_down,
            down_price.input_pico if down_price else "",
            down_price.output_pico if down_price else "",
            _meta(resolved.meta_head_down, req.step_id, req.run_id) if est_down else "",
            "c" if req.on_expiry == "charge" else "",
            self._ledger,
            *resolved.script_args,
        )
        try:
            reply = await self._call(self._scripts.authorize, tenant, args)
        except StoreUnavailable:
            # Redis may still run this authorize when it recovers; the caller is told no
            # hold exists, so make that true.
            self._cancel_later(tenant, rid, now + lease_ms)
            self.events.store_unavailable("authorize")
            return self._degraded(applied, est)
        verdict = int(reply[0])
        if verdict == 3:  # cancelled before it ran: only possible for a reused id
            raise Unavailable("the reservation was cancelled before Redis ran it")
        if verdict in (4, 5):
            raise IdempotencyConflict(str(reply[1]), str(reply[2]), reused=verdict == 4)
        held = verdict == 1
        held_est = int(reply[3])
        decision = self._decision(
            resolved,
            reply[4:],
            est,
            verdict != 0,
            now,
            held_est=held_est if held else 0,
            est_down=est_down,
        )
        if verdict == 0:
            return decision
        decision.estimated_usd = micro_to_usd(held_est)
        decision.reservation_id = str(reply[1])
        decision.lease_expires_at = iso(now + lease_ms) if held else None
        decision.replayed = verdict == 2
        return decision

    def _downgrade(
        self,
        tenant: str,
        resolved: Resolved,
        req: AuthorizeRequest | CheckRequest,
        price: Price | None,
        est: int,
    ) -> tuple[Price | None, int | None]:
        """The price of the model a downgrade budget falls back to, and the estimate
        re-priced for it (None: it cannot be re-priced, so the downgrade budget blocks).

        Tokens are priced at the cheaper model's price; a dollar estimate is scaled by the
        ratio of the two models' per-token prices (input + output), rounded up.
        """
        target = resolved.downgrade_model
        if target is None:
            return None, None
        down = self.price(req.provider, target, tenant)
        if down is None:
            return None, None
        floor = self._snapshot.config.settings.min_estimate_micro
        if req.estimated_tokens_in is not None or req.estimated_tokens_out is not None:
            cost = self._estimate(down, None, req.estimated_tokens_in, req.estimated_tokens_out)
            return down, max(cost, floor)
        if price is None or price.input_pico + price.output_pico <= 0:
            return down, None
        per_token, per_token_down = (
            price.input_pico + price.output_pico,
            down.input_pico + down.output_pico,
        )
        scaled = -(-est * per_token_down // per_token)  # rounded up
        return down, max(min(scaled, est), floor)

    async def _check(self, tenant: str, req: CheckRequest) -> Decision:
        settings = self._snapshot.config.settings
        now = self._clock.now_ms()
        # The same pricing and estimate rules as authorize: check answers what authorize
        # would (a check without an estimate asks about the least a hold may be).
        price = self._priced(tenant, req.provider, req.model, req.estimated_usd)
        est = max(
            self._estimate(
                price, req.estimated_usd, req.estimated_tokens_in, req.estimated_tokens_out
            ),
            settings.min_estimate_micro,
        )
        resolved = self.resolve(tenant, req, req.provider, req.model, now)
        applied = resolved.budgets
        _, est_down = self._downgrade(tenant, resolved, req, price, est)
        tokens = (req.estimated_tokens_in or 0) + (req.estimated_tokens_out or 0)
        args: list[str | int] = [
            now,
            est,
            settings.keep_finished_ms,
            tokens,
            len(applied),
            self._clock.limiter_ms(),
            "" if est_down is None else est_down,
        ]
        for a in applied:
            args += (a.cid, a.budget.limit_micro, a.mode)
        for limit in resolved.limits:
            args += limit.args
        try:
            reply = await self._call(self._scripts.check, tenant, args)
        except StoreUnavailable:
            self.events.store_unavailable("check")
            return self._degraded(applied, est)
        decision = self._decision(
            resolved, reply[2:], est, int(reply[0]) == 1, now, est_down=est_down
        )
        decision.estimated_usd = micro_to_usd(int(reply[1]))
        return decision

    def _decision(
        self,
        resolved: Resolved,
        values_raw: list[Any],
        est: int,
        allowed: bool,
        now: int,
        *,
        held_est: int = 0,
        est_down: int | None = None,
    ) -> Decision:
        """A decision from the script's figures: budget counters before this call, then
        (for a fresh decision) three figures per rate limit. `held_est` is what this call
        now holds on each budget (reported in held_usd)."""
        applied = resolved.budgets
        nb = len(applied)
        # hiredis gives Lua's integer replies as ints already.
        values: list[int] = values_raw[: 2 * nb]
        outcome = decide(applied, values, est, allowed, est_down)
        states = [
            self._state(a, values[2 * i], values[2 * i + 1] + held_est)
            for i, a in enumerate(applied)
        ]
        limits: list[RateLimitState] = []
        denying: list[RateLimitState] = []
        binding_limit = None
        if resolved.limits:
            rate_raw: list[int] = values_raw[2 * nb :]
            limits = [
                _limit_state(limit, rate_raw[3 * j : 3 * j + 3])
                for j, limit in enumerate(resolved.limits)
                if len(rate_raw) >= 3 * j + 3
            ]
            denying = [r for r in limits if r.would_deny and r.mode == LimitMode.ENFORCE]
            if denying:
                binding_limit = max(denying, key=lambda r: r.retry_after_ms)
            elif limits:
                binding_limit = min(limits, key=lambda r: r.remaining)
        budget_denied = not allowed and outcome.action is Action.BLOCK
        action = Action.BLOCK if not allowed else outcome.action
        info = None
        if outcome.binding is not None:
            info = _info(states[outcome.binding], applied[outcome.binding].budget, outcome.action)
        retry_after_ms = None
        message = _message(outcome.action, applied, outcome.binding, values, est)
        if budget_denied and outcome.binding is not None:
            retry_after_ms = applied[outcome.binding].window_end_ms - now
        elif not allowed and denying:
            retry_after_ms = max(
                r.retry_after_ms if r.retry_after_ms >= 0 else _SLOT_RETRY_MS for r in denying
            )
            message = _limit_message(denying[0])
        return Decision(
            allowed=allowed,
            action=action,
            budget_info=info,
            budgets=states,
            downgrade_model=outcome.downgrade_model if allowed else None,
            message=message,
            estimated_usd=micro_to_usd(est),
            rate_limits=limits,
            rate_limit=binding_limit,
            retry_after_ms=retry_after_ms,
            would_deny=bool(limits)
            and any(r.would_deny and r.mode == LimitMode.SHADOW for r in limits),
        )

    async def _settle(
        self,
        tenant: str,
        rid: str,
        cost_micro: int | None,
        tokens: tuple[int, int] | None,
        latency_ms: int | None,
        success: bool,
        provider_model: tuple[str, str] | None = None,
        *,
        priced_here: bool = False,
    ) -> SettleResult:
        """Settle at `cost_micro`, or (None) at `tokens` priced as the reservation was
        (`priced_here`: the cost is the tokens priced by the sidecar, not the caller's).
        Tokens given with a cost are recorded and correct the token limiters;
        `provider_model` replaces the reservation's in its usage record (the gateway's
        audit names the model only after the call)."""
        settings = self._snapshot.config.settings
        now = self._clock.now_ms()
        args: list[str | int] = [
            now,
            rid,
            settings.keep_finished_ms,
            _settle_mode(cost_micro, priced_here),
            "" if tokens is None else tokens[0],
            "" if tokens is None else tokens[1],
            max(cost_micro or 0, 0),
            self._clock.limiter_ms(),
            self._ledger,
            "" if latency_ms is None else latency_ms,
            "1" if success else "0",
            "" if provider_model is None else _SEP.join(provider_model),
        ]
        reply = await self._run(
            self._scripts.settle, tenant, args, self._charging_keys(tenant, now)
        )
        return self._finished(tenant, rid, reply, "tokens_in")

    async def _release(self, tenant: str, reservation_id: str) -> SettleResult:
        settings = self._snapshot.config.settings
        now = self._clock.now_ms()
        args: list[str | int] = [
            now,
            reservation_id,
            settings.keep_finished_ms,
            "0",
            self._clock.limiter_ms(),
        ]
        reply = await self._run(self._scripts.release, tenant, args)
        return self._finished(tenant, reservation_id, reply, "reservation_id")

    async def _record(self, tenant: str, req: RecordRequest) -> RecordResult:
        settings = self._snapshot.config.settings
        now = self._clock.now_ms()
        has_tokens = req.tokens_in is not None or req.tokens_out is not None
        price = self._priced(tenant, req.provider, req.model, req.cost_usd) if has_tokens else None
        cost = self._estimate(price, req.cost_usd, req.tokens_in, req.tokens_out)
        resolved = self.resolve(tenant, req, req.provider, req.model, now)
        applied = resolved.budgets
        args: list[str | int] = [
            now,
            cost,
            req.idempotency_key or "",
            settings.keep_finished_ms,
            _meta(resolved.meta_head, req.step_id, req.run_id),
            req.tokens_in or 0,
            req.tokens_out or 0,
            self._ledger,
            "" if req.latency_ms is None else req.latency_ms,
            "1" if req.success else "0",
        ]
        for a in applied:
            args += (a.cid, a.window_end_ms + COUNTER_GRACE_MS, a.budget.limit_micro, a.thresholds)
        reply = await self._run(
            self._scripts.record, tenant, args, self._charging_keys(tenant, now)
        )
        values = [int(v) for v in reply[1:]]
        return RecordResult(
            cost_usd=micro_to_usd(cost),
            replayed=int(reply[0]) == 2,
            budgets=[
                self._state(a, values[2 * i], values[2 * i + 1]) for i, a in enumerate(applied)
            ],
        )

    async def status(self, tenant: str, budget_id: str, scope_id: str | None) -> BudgetStatus:
        budget = self.snapshot(tenant).by_id.get(budget_id)
        if budget is None:
            raise RequestError("budget_id", f"no budget {budget_id!r}", status=404)
        entity = budget.scope_id or scope_id
        if entity is None and budget.scope is Scope.ORGANIZATION:
            # As in decisions: a request that names no org is the default org's.
            entity = self._snapshot.config.settings.default_org_id
        if entity is None:
            raise RequestError(
                "scope_id", f"budget {budget_id!r} is per {budget.scope}: name the entity"
            )
        if budget.scope_id is not None and scope_id not in (None, budget.scope_id):
            raise RequestError("scope_id", f"budget {budget_id!r} covers {budget.scope_id} only")
        now = self._clock.now_ms()
        a = self._applied(budget, entity, None, now)
        args: list[str | int] = [now, self._snapshot.config.settings.keep_finished_ms, a.cid]
        reply = await self._run(self._scripts.status, tenant, args)
        s = self._state(a, int(reply[1]), int(reply[2]))
        return BudgetStatus(
            budget_id=s.budget_id,
            budget_name=s.budget_name,
            scope=s.scope,
            entity=s.entity,
            period=s.period,
            on_exceed=s.on_exceed,
            limit_usd=s.limit_usd,
            used_usd=s.used_usd,
            held_usd=s.held_usd,
            remaining_usd=s.remaining_usd,
            percentage=s.percentage,
            exceeded=s.exceeded,
            period_start=iso(a.window_start_ms),
            period_end=iso(a.window_end_ms),
        )

    async def authorize(self, tenant: str, req: AuthorizeRequest) -> Decision:
        start = time.perf_counter()
        decision = await self._authorize(tenant, req)
        self.events.decided("authorize", decision, time.perf_counter() - start)
        return decision

    async def check(self, tenant: str, req: CheckRequest) -> Decision:
        start = time.perf_counter()
        decision = await self._check(tenant, req)
        self.events.decided("check", decision, time.perf_counter() - start)
        return decision

    async def settle(self, tenant: str, req: SettleRequest) -> SettleResult:
        start = time.perf_counter()
        has_tokens = req.tokens_in is not None or req.tokens_out is not None
        result = await self._settle(
            tenant,
            req.reservation_id,
            None if req.cost_usd is None else usd_to_micro(req.cost_usd),
            ((req.tokens_in or 0), (req.tokens_out or 0)) if has_tokens else None,
            req.latency_ms,
            req.success,
        )
        self.events.finished("settle", result, time.perf_counter() - start)
        return result

    async def settle_call(
        self,
        tenant: str,
        reservation_id: str,
        *,
        provider: str,
        model: str,
        tokens_in: int,
        tokens_out: int,
        latency_ms: int | None,
        fallback_cost_usd: float | None = None,
    ) -> SettleResult:
        """Settle a reservation with a finished call's tokens, priced by `provider`/`model`
        from the tenant's pricing (else at `fallback_cost_usd`); the call's provider and
        model go to the usage ledger. The gateway's audit uses this."""
        start = time.perf_counter()
        price = self.price(provider, model, tenant)
        if price is not None:
            cost = self._estimate(price, None, tokens_in, tokens_out)
        elif fallback_cost_usd is not None:
            cost = usd_to_micro(fallback_cost_usd)
        else:
            cost = CHARGE_ESTIMATE  # no price anywhere: the held estimate, never $0
        result = await self._settle(
            tenant,
            reservation_id,
            cost,
            (tokens_in, tokens_out),
            latency_ms,
            True,
            (provider, model),
            priced_here=price is not None,
        )
        self.events.finished("settle", result, time.perf_counter() - start)
        return result

    async def release(self, tenant: str, reservation_id: str) -> SettleResult:
        start = time.perf_counter()
        result = await self._release(tenant, reservation_id)
        self.events.finished("release", result, time.perf_counter() - start)
        return result

    async def record(self, tenant: str, req: RecordRequest) -> RecordResult:
        start = time.perf_counter()
        result = await self._record(tenant, req)
        self.events.recorded(
            result,
            req.provider,
            req.model,
            req.tokens_in or 0,
            req.tokens_out or 0,
            time.perf_counter() - start,
        )
        return result

    # ---- cancelling timed-out authorizes ---------------------------------------------

    def _cancel_later(self, tenant: str, rid: str, lease_end_ms: int) -> None:
        if len(self._cancels) >= _MAX_PENDING_CANCELS:
            return  # past this many, the leases returning the holds will have to do
        task = asyncio.get_running_loop().create_task(self._cancel(tenant, rid, lease_end_ms))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _cancel(self, tenant: str, rid: str, lease_end_ms: int) -> None:
        """Release (or tombstone) a reservation whose authorize timed out, retrying until
        it succeeds or the lease has ended (then the hold is back by itself)."""
        delay_s = 0.05
        while self._clock.now_ms() < lease_end_ms:
            keep = self._snapshot.config.settings.keep_finished_ms
            args: list[str | int] = [self._clock.now_ms(), rid, keep, "1", self._clock.limiter_ms()]
            try:
                await self._call(self._scripts.release, tenant, args)
                return
            except StoreUnavailable:
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 1.0)

    @property
    def pending_cancels(self) -> int:
        return len(self._cancels)

    async def close(self) -> None:
        """Stop retrying cancels (the leases return those holds)."""
        await tasks.stop(self._cancels, what="cancels of timed-out authorizes")

    # ---- helpers ------------------------------------------------------------------------

    async def _call(
        self,
        script: Script,
        tenant: str,
        args: Sequence[str | int],
        script_keys: Sequence[str] | None = None,
    ) -> list[Any]:
        """Run one script (on the tenant's reservation keys unless `script_keys` are given);
        its reply's last element (leases it found ended) is reported to the observers and
        removed, so callers see the reply their script header lists.

        A script that finds more ended leases than it may return in one call answers
        BACKLOG: the holds are returned in batches (reclaim.lua) and the script runs again,
        so no answer counts a hold whose lease has ended."""
        if script_keys is None:
            script_keys = self._charging_keys(tenant, self._clock.now_ms())
        for _ in range(_BACKLOG_ROUNDS):
            reply: list[Any] = await self._store.run(script, script_keys, args)
            self._expired(reply)
            if reply[0] != BACKLOG:
                return reply
            await self._drain(tenant)
        raise StoreUnavailable(f"{script.name}: ended leases pile up faster than they return")

    async def _drain(self, tenant: str) -> None:
        """Return every hold whose lease has ended, RECLAIM_BATCH leases per script call."""
        keep = self._snapshot.config.settings.keep_finished_ms
        while True:
            now = self._clock.now_ms()
            script_keys = self._charging_keys(tenant, now)
            args = (now, keep, RECLAIM_BATCH)
            reply: list[Any] = await self._store.run(self._scripts.reclaim, script_keys, args)
            self._expired(reply)
            if int(reply[0]) == 0:
                return

    def _expired(self, reply: list[Any]) -> None:
        """Pop the two counts every script reply ends with (lua/_lib.lua done()) and tell
        the observers: leases found ended with their hold in place, and how many of those
        were charged their estimate."""
        charged, expired = int(reply.pop()), int(reply.pop())
        if expired:
            self.events.expired(expired - charged)
        if charged:
            self.events.charged_at_lease_end(charged)

    async def _run(
        self,
        script: Script,
        tenant: str,
        args: Sequence[str | int],
        script_keys: Sequence[str] | None = None,
    ) -> list[Any]:
        try:
            reply = await self._call(script, tenant, args, script_keys)
        except StoreUnavailable as exc:
            self.events.store_unavailable(script.name)
            raise Unavailable(str(exc)) from exc
        return reply

    def _degraded(self, applied: Sequence[Applied], est: int) -> Decision:
        """Redis did not answer in time: apply the fail mode (invariant 8).

        Open only when every applicable budget (or, with none, the settings) says open.
        """
        default = self._snapshot.config.settings.fail_mode
        modes = [a.budget.fail_mode or default for a in applied] or [default]
        if any(m is FailMode.CLOSED for m in modes):
            raise Unavailable("redis unavailable; fail mode closed")
        return Decision(
            allowed=True,
            action=Action.ALLOW,
            message="redis unavailable; allowed by fail mode open without a reservation",
            estimated_usd=micro_to_usd(est),
            degraded=True,
        )

    def _charging_keys(self, tenant: str, now_ms: int) -> tuple[str, ...]:
        """settle's and record's KEYS: the aggregate key names the UTC day, so the tuples
        are built once per tenant and day, not per call (settle is on the hot path)."""
        day = now_ms // 86_400_000
        if day != self._charging_day:
            self._charging_day = day
            self._charging = {}
        found = self._charging.get(tenant)
        if found is None:
            yyyymmdd = time.strftime("%Y%m%d", time.gmtime(day * 86_400))
            found = self._charging[tenant] = keys.tenant_keys(tenant).charging(yyyymmdd)
        return found

    def _finished(
        self, tenant: str, rid: str, reply: list[Any], unpriced_field: str
    ) -> SettleResult:
        status = int(str(reply[0]))
        if status == 0:
            raise RequestError("reservation_id", f"no reservation {rid!r}", status=404)
        state = "settled" if reply[1] == "S" else "released"
        cost, est = int(str(reply[2])), int(str(reply[3]))
        cids = str(reply[5]).split(",") if reply[5] else []
        provider, model = _unmeta(str(reply[6]))
        tokens_in, tokens_out = int(reply[7]), int(reply[8])
        overshoot, priced_by = int(reply[9]), str(reply[10])
        values = [int(str(v)) for v in reply[11:]]
        settled = state == "settled"
        return SettleResult(
            reservation_id=rid,
            state=state,
            cost_usd=micro_to_usd(cost),
            estimated_usd=micro_to_usd(est),
            overshoot_usd=micro_to_usd(overshoot) if settled else 0.0,
            estimate_error_usd=micro_to_usd(max(0, cost - est)) if settled else 0.0,
            priced_by=_PRICED_BY.get(priced_by, "none") if settled else "none",
            lease_expired=str(reply[4]) == "1",
            replayed=status == 2,
            provider=provider,
            model=model,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            budgets=self._states_of(tenant, cids, values),
        )

    def _states_of(
        self, tenant: str, cids: Sequence[str], values: Sequence[int]
    ) -> list[BudgetState]:
        """Budget states of a reservation's counters, by the cids its record kept.

        A budget deleted since the hold is left out: it has no limit to report against.
        """
        states = []
        for i, cid in enumerate(cids):
            budget_id, entity, _window = keys.parse_counter_id(cid)
            budget = self.snapshot(tenant).by_id.get(budget_id)
            if budget is None:
                continue
            a = Applied(budget, entity, cid, 0, 0, _MODE[budget.on_exceed], None)
            states.append(self._state(a, values[2 * i], values[2 * i + 1]))
        return states

    def _state(self, a: Applied, used: int, held: int) -> BudgetState:
        b = a.budget
        limit = b.limit_micro
        committed = used + held
        # micro_to_usd inline (micro / MICRO): four calls per budget per decision cost
        # 0.6 us of a 15.5 us in-process authorize.
        return BudgetState(
            budget_id=b.id,
            budget_name=b.name,
            scope=b.scope,
            entity=a.entity,
            period=b.period,
            on_exceed=b.on_exceed,
            limit_usd=limit / MICRO,
            used_usd=used / MICRO,
            held_usd=held / MICRO,
            remaining_usd=(limit - committed) / MICRO,
            percentage=percentage(committed, limit),
            exceeded=committed >= limit if limit else committed > 0,
        )


def _covers(limit: RateLimit, provider: str | None, model: str | None) -> bool:
    return (limit.model is None or limit.model == model) and (
        limit.provider is None or limit.provider == provider
    )


_METRIC = {Metric.REQUESTS: "r", Metric.TOKENS: "t", Metric.CONCURRENT: "c"}
# A concurrency limit frees a slot when some reservation ends: a hint, not a promise.
_SLOT_RETRY_MS = 1000


def _applied_limit(limit: RateLimit, entity: str) -> AppliedLimit:
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


def _limit_state(applied: AppliedLimit, figures: list[int]) -> RateLimitState:
    would_deny, remaining, retry_ms = figures
    r = applied.limit
    return RateLimitState(
        rate_limit_id=r.id,
        scope=r.scope,
        entity=applied.entity,
        metric=r.metric,
        limit=r.limit,
        window_ms=r.window_ms,
        burst=r.burst,
        mode=r.mode,
        remaining=max(remaining, 0),
        would_deny=would_deny == 1,
        retry_after_ms=retry_ms,
    )


def _limit_message(state: RateLimitState) -> str:
    if state.metric == Metric.CONCURRENT:
        return f"Rate limit '{state.rate_limit_id}' reached: {state.limit} calls in flight"
    per = f"{state.window_ms} ms"
    return f"Rate limit '{state.rate_limit_id}' reached: {state.limit} {state.metric} per {per}"


# Reservation ids come from the OS's CSPRNG 4 KiB at a time: one getrandom() call per
# 256 ids instead of one per decision (a syscall costs several microseconds under load on
# a VM; measured with py-spy, 4% of an authorize).
_RANDOM_CHUNK = 4096
_random = bytearray()
_random_at = 0


def _forget_random() -> None:
    # A forked child must not hand out the ids its parent also holds.
    global _random, _random_at
    _random, _random_at = bytearray(), 0


os.register_at_fork(after_in_child=_forget_random)


def new_reservation_id() -> str:
    """128 random bits in hex (the ReservationId format)."""
    global _random, _random_at
    at = _random_at
    if at + 16 > len(_random):
        _random, at = bytearray(os.urandom(_RANDOM_CHUNK)), 0
    _random_at = at + 16
    return _random[at : at + 16].hex()


# The record's meta field: the call's ledger tuple (lua/_lib.lua, record field 11), which
# settle returns and writes to the usage ledger. Identifiers are validated, so the unit
# separator cannot occur in them (nor '|', the record's own).
_SEP = "\x1f"
_NONE_DEFINED = TenantDefinitions()


def _meta_head(provider: str | None, model: str | None, identity: Identity) -> str:
    """The ledger tuple's fields that stay the same for one resolved identity."""
    return _SEP.join(
        (
            provider or "",
            model or "",
            identity.org_id,
            identity.team_id or "",
            identity.agent_id or "",
            identity.workflow_id or "",
            identity.user_id or "",
        )
    )


def _meta(head: str, step_id: str | None, run_id: str | None) -> str:
    # The run last: the daily aggregates leave it out.
    return f"{head}{_SEP}{step_id or ''}{_SEP}{run_id or ''}"


def _settle_mode(cost_micro: int | None, priced_here: bool) -> str:
    """settle.lua's ARGV[4]: price the tokens ('t'), charge the estimate ('e'), or charge a
    cost given by the caller ('c') or priced from tokens by the sidecar ('p')."""
    if cost_micro is None:
        return "t"
    if cost_micro == CHARGE_ESTIMATE:
        return "e"
    return "p" if priced_here else "c"


def _fingerprint(req: AuthorizeRequest, asked_micro: int) -> str:
    """What an idempotency key is bound to: the request's identity, model, estimate, lease
    and run. A retry of the same request carries the same fingerprint; any other does not."""
    parts = (
        req.org_id,
        req.team_id,
        req.agent_id,
        req.workflow_id,
        req.user_id,
        req.provider,
        req.model,
        asked_micro,
        req.estimated_tokens_in,
        req.estimated_tokens_out,
        req.lease_ms,
        req.run_id,
        req.step_id,
    )
    text = _SEP.join("" if p is None else str(p) for p in parts)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def _unmeta(meta: str) -> tuple[str | None, str | None]:
    provider, model, *_ = (*meta.split(_SEP), "")
    return provider or None, model or None


def _ledger_config(config: Config) -> str:
    """settle.lua's and record.lua's ledger argument (see lua/_lib.lua, ledger())."""
    s = config.settings
    return (
        f"{s.usage_max_records}:{s.usage_max_age_days * 86_400_000}:"
        f"{s.usage_aggregate_days * 86_400}:{s.usage_user_aggregate_days * 86_400}"
    )


def _info(state: BudgetState, budget: Budget, action: Action) -> BudgetInfo:
    """The binding budget; `exceeded` is true when this call would pass its limit."""
    return BudgetInfo(
        budget_id=state.budget_id,
        budget_name=state.budget_name,
        used_usd=state.used_usd,
        limit_usd=state.limit_usd,
        percentage=state.percentage,
        exceeded=state.exceeded or action is not Action.ALLOW,
        action=budget.on_exceed,
    )


def _message(
    action: Action,
    applied: Sequence[Applied],
    binding: int | None,
    values: Sequence[int],
    est: int,
) -> str | None:
    """What binds, in words: "exceeded" only when the budget is truly spent; otherwise the
    estimate against what is left."""
    if binding is None or action is Action.ALLOW:
        return None
    b = applied[binding].budget
    if action is Action.BLOCK:
        outcome = "requests blocked"
    elif action is Action.DOWNGRADE:
        outcome = f"downgraded to {applied[binding].downgrade_model}"
    else:
        outcome = "warning"
    left = b.limit_micro - values[2 * binding] - values[2 * binding + 1]
    if left <= 0:
        return f"Budget '{b.name}' exceeded - {outcome}"
    return f"Estimate {_usd(est)} exceeds the {_usd(left)} left on '{b.name}' - {outcome}"


def _usd(micro: int) -> str:
    """$9.00, $0.0042: cents always, then as many micro-dollar digits as there are."""
    whole = f"{micro / MICRO:.6f}".rstrip("0")
    return f"${whole}{'0' * max(0, 2 - len(whole.partition('.')[2]))}"
