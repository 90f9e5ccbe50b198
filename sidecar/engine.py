"""The engine: one config snapshot + one store -> decisions.

Each operation reads as its sequence: resolve what applies (sidecar/resolution.py), price
the estimate (sidecar/estimates.py), build the script's KEYS/ARGV, run exactly one script,
and render the reply (sidecar/rendering.py). Definitions come from the in-memory snapshot
only; nothing is read from Redis except through the one script call (invariant 5). A
decision allowed by fail mode open gets a grant whose spend is charged later
(sidecar/grant_charges.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import replace
from typing import Any

from sidecar import estimates, fail_open, keys, learned, rendering, tasks
from sidecar.auth import OPEN
from sidecar.clock import Clock
from sidecar.decision import Applied
from sidecar.errors import IdempotencyConflict, RequestError, Unavailable
from sidecar.estimates import CHARGE_ESTIMATE, Settlement
from sidecar.events import EngineEvents, NoEvents
from sidecar.grant_charges import GrantCharges
from sidecar.learned import NO_HINT, EstimateHint
from sidecar.model import (
    Action,
    Budget,
    Config,
    EstimateMode,
    FailMode,
    Identity,
    Price,
    RateLimit,
    Scope,
    Settings,
    TenantDefinitions,
)
from sidecar.money import charge_to_micro, micro_to_usd
from sidecar.periods import iso
from sidecar.reservations import (
    SEP,
    fingerprint,
    loop_fingerprint,
    meta,
    new_attempt_id,
    new_reservation_id,
)
from sidecar.resolution import (
    COUNTER_GRACE_MS,
    Resolved,
    Resolver,
    Snapshot,
    identity_of,
    read_with_run,
    record_slot,
)
from sidecar.resp import Packed
from sidecar.schemas import (
    AuthorizeRequest,
    BudgetStatus,
    CheckRequest,
    Decision,
    IdentityFields,
    RecordRequest,
    RecordResult,
    SettleRequest,
    SettleResult,
)
from sidecar.scripts import Script, Scripts
from sidecar.store import Store, StoreUnavailable

# Re-exported: the API modules and tests import these from here.
__all__ = [
    "BACKLOG",
    "CHARGE_ESTIMATE",
    "COUNTER_GRACE_MS",
    "RECLAIM_BATCH",
    "Engine",
    "IdempotencyConflict",
    "RequestError",
    "Snapshot",
    "Unavailable",
    "new_reservation_id",
]

_MAX_PENDING_CANCELS = 10_000
# lua/settle.lua and settle_lost.lua: a finished reservation's first result, whose charge
# this answer is the first to count in the spend metrics (its charging answer was lost).
LATE_CHARGE = 4
# Decision.__dict__'s entry for what a cancel of that answer names (see take_back).
_HANDOUT = "handout"
# The scripts' answer when more ended leases wait than one call returns (lua/_lib.lua).
BACKLOG = -9
# A decision's answer when the state marker it names is gone (lua/_lib.lua state_lost).
LOST = -8
# Leases reclaim.lua returns per call while draining a backlog: about 5 ms of Redis time
# each, so other clients' calls interleave with a drain of any size.
RECLAIM_BATCH = 500
# A decision that meets a backlog drains it and asks again, this many times at most.
_BACKLOG_ROUNDS = 4
# How long a decision that found the state marker gone waits for the state check.
_AFTER_LOSS_S = 2.0
_NONE_DEFINED = TenantDefinitions()


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
        self._resolver = Resolver()
        self._snapshot = Snapshot.of(config)
        # Definitions made through the API, per tenant, and the snapshots that merge them
        # with the config file's (tenants without any use self._snapshot).
        self._api: dict[str, TenantDefinitions] = {}
        self._snapshots: dict[str, Snapshot] = {}
        self._ledger = _ledger_config(config)
        self._learn_config = learned.settle_config(config.settings)
        self._learns = learned.anywhere(config)
        self._charging_day = -1
        self._charging: dict[str, tuple[str, ...]] = {}
        self._cancels: set[asyncio.Task[None]] = set()
        self._lost_settles: set[asyncio.Task[None]] = set()
        # When Redis was last seen losing its state (sidecar.state_loss sets it): a settle
        # or release of a reservation it took says so.
        self.state_lost_at: str | None = None
        # Tenants whose state marker the state check has seen written, and its key: their
        # decisions name it (lua/_lib.lua state_lost), and one that finds it gone awaits
        # `after_loss` (the check, which puts back the stops) before it asks again.
        self.marked: dict[str, str] = {}
        self.after_loss: Callable[[], Awaitable[None]] | None = None
        # Decisions allowed by fail mode open, charged once Redis answers.
        self.grants = GrantCharges(self, config)
        self.fail_open = self.grants.book

    # ---- definitions ------------------------------------------------------------------

    @property
    def config(self) -> Config:
        return self._snapshot.config

    def swap(self, config: Config) -> None:
        """Replace the config file's definitions at once; decisions in flight keep the old
        snapshot."""
        self._snapshot = Snapshot.of(config)
        self._ledger = _ledger_config(config)
        self._learn_config = learned.settle_config(config.settings)
        self._learns = learned.anywhere(config)
        self.grants.bound(config)
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

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def ledger(self) -> str:
        """settle.lua's and record.lua's ledger argument (see _ledger_config)."""
        return self._ledger

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
        return identity_of(fields, self._snapshot.config.settings.default_org_id)

    def resolve(
        self,
        tenant: str,
        fields: IdentityFields,
        provider: str | None,
        model: str | None,
        now_ms: int,
    ) -> Resolved:
        """Every budget and rate limit that covers this call (memoized; see Resolver)."""
        default_org = self._snapshot.config.settings.default_org_id
        return self._resolver.resolve(
            self.snapshot(tenant), tenant, fields, provider, model, now_ms, default_org
        )

    def price(
        self, provider: str | None, model: str | None, tenant: str | None = None
    ) -> Price | None:
        """The price of a model (as `tenant` sees it; None: the config file's), the fallback
        price, or None (unpriced)."""
        return estimates.price(
            self._snapshot if tenant is None else self.snapshot(tenant), provider, model
        )

    # ---- operations -------------------------------------------------------------------

    def _learning(
        self,
        settings: Settings,
        resolved: Resolved,
        req: AuthorizeRequest | CheckRequest,
        hint: EstimateHint,
    ) -> tuple[str | int, ...]:
        """The learned-estimate arguments of authorize.lua / check.lua (sidecar.learned)."""
        mode = resolved.estimate_mode if hint.mode is None else EstimateMode(hint.mode)
        if mode is not EstimateMode.LEARNED:
            return learned.FIXED_ARGS
        series = keys.estimate_series(req.provider, req.model, req.agent_id)
        return learned.script_args(settings, series)

    async def _authorize(
        self, tenant: str, req: AuthorizeRequest, hint: EstimateHint = NO_HINT
    ) -> Decision:
        settings = self._snapshot.config.settings
        now = self._clock.now_ms()
        price = estimates.priced(self.snapshot(tenant), req.provider, req.model, req.estimated_usd)
        asked = estimates.estimate(
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
        down_price, est_down = estimates.downgrade(self.snapshot(tenant), resolved, req, price, est)
        learning = self._learning(settings, resolved, req, hint)
        rid = new_reservation_id()
        key = req.idempotency_key
        loop_keys = self._loop_keys(tenant, resolved, req.fingerprint)
        stop_count, read_fields = read_with_run(resolved, req.run_id)
        args = (
            now,
            rid,
            lease_ms,
            est,
            key or "",
            price.input_pico if price else "",
            price.output_pico if price else "",
            settings.keep_finished_ms,
            meta(resolved.meta_head, req.step_id, req.run_id),
            (req.estimated_tokens_in or 0) + (req.estimated_tokens_out or 0),
            len(applied),
            self._clock.limiter_ms(),
            fingerprint(req, asked) if key else "",
            "" if est_down is None else est_down,
            down_price.input_pico if down_price else "",
            down_price.output_pico if down_price else "",
            meta(resolved.meta_head_down, req.step_id, req.run_id) if est_down else "",
            "c" if req.on_expiry == "charge" else "",
            self._ledger,
            *learning,
            len(resolved.limits),
            stop_count,
            len(loop_keys),
            *_tail(resolved, resolved.script_args, resolved.authorize_tail, loop_keys, read_fields),
            *((loop_fingerprint(req.fingerprint or ""),) if loop_keys else ()),
        )
        script_keys = self._deciding_keys(tenant, now, loop_keys, learning[0] != "")
        try:
            reply = await self.run_script(self._scripts.authorize, tenant, args, script_keys)
        except StoreUnavailable as exc:
            # Redis may still run this authorize when it recovers; the caller is told no
            # hold exists, so make that true.
            self._cancel_later(tenant, rid, now + lease_ms, key)
            self.events.store_unavailable("authorize", str(exc))
            # Nothing held, but what the call spends is charged once Redis answers.
            degraded = self._degraded(applied, est)
            return self.grants.grant(degraded, tenant, req, price, asked, est, now + lease_ms)
        except asyncio.CancelledError:
            # Cancelled (aiohttp past its shutdown timeout, or on a lost connection) after
            # the script may have been sent: Redis may still run it, and nobody is told.
            self._cancel_later(tenant, rid, now + lease_ms, key)
            raise
        verdict = int(reply[0])
        if verdict == 1 and self._clock.now_ms() >= now + lease_ms:
            # The reply was in time by the sidecar's running time (invariant 10), but the
            # process was stopped (SIGSTOP, a frozen VM) until past the hold's lease: another
            # replica may have reclaimed it and granted the same dollars again. Allowing
            # now would let this caller spend what others hold: answer as for a timed-out
            # authorize, and cancel (which frees its idempotency key for the retry).
            self._cancel_later(tenant, rid, self._clock.now_ms() + settings.max_lease_ms, key)
            self.events.store_unavailable("authorize", "its answer came after the lease ended")
            fresh_end = self._clock.now_ms() + lease_ms
            degraded = self._degraded(applied, est)
            return self.grants.grant(degraded, tenant, req, price, asked, est, fresh_end)
        if verdict == 3:  # cancelled before it ran: only possible for a reused id
            raise Unavailable("the reservation was cancelled before Redis ran it")
        if verdict in (4, 5):
            raise IdempotencyConflict(str(reply[1]), str(reply[2]), reused=verdict == 4)
        held = verdict == 1
        held_est, weighed = int(reply[3]), int(reply[4])
        decision = rendering.decision(
            resolved,
            reply[5:],
            weighed,
            verdict != 0,
            now,
            held_est=held_est if held else 0,
            est_down=est_down,
        )
        decision.estimate_source = learned.source_of(
            asked, settings.min_estimate_micro, est, weighed, hint.default
        )
        if verdict == 0:
            return decision
        decision.estimated_usd = micro_to_usd(held_est)
        decision.reservation_id = str(reply[1])
        decision.lease_expires_at = iso(now + lease_ms) if held else None
        decision.replayed = verdict == 2
        # What a cancel of this answer names (take_back): this call's own reservation id,
        # which a retry's handout is known by (lua/release.lua), and its key.
        decision.__dict__[_HANDOUT] = (rid, key or "")
        return decision

    async def _check(
        self, tenant: str, req: CheckRequest, hint: EstimateHint = NO_HINT
    ) -> Decision:
        settings = self._snapshot.config.settings
        now = self._clock.now_ms()
        # The same pricing and estimate rules as authorize: check answers what authorize
        # would (a check without an estimate asks about the least a hold may be).
        price = estimates.priced(self.snapshot(tenant), req.provider, req.model, req.estimated_usd)
        asked = estimates.estimate(
            price, req.estimated_usd, req.estimated_tokens_in, req.estimated_tokens_out
        )
        est = max(asked, settings.min_estimate_micro)
        resolved = self.resolve(tenant, req, req.provider, req.model, now)
        applied = resolved.budgets
        _, est_down = estimates.downgrade(self.snapshot(tenant), resolved, req, price, est)
        learning = self._learning(settings, resolved, req, hint)
        tokens = (req.estimated_tokens_in or 0) + (req.estimated_tokens_out or 0)
        loop_keys = self._loop_keys(tenant, resolved, req.fingerprint)
        stop_count, read_fields = read_with_run(resolved, req.run_id)
        args = (
            now,
            est,
            settings.keep_finished_ms,
            tokens,
            len(applied),
            self._clock.limiter_ms(),
            "" if est_down is None else est_down,
            *learning,
            len(resolved.limits),
            stop_count,
            len(loop_keys),
            *_tail(resolved, resolved.check_args, resolved.check_tail, loop_keys, read_fields),
            *((loop_fingerprint(req.fingerprint or ""),) if loop_keys else ()),
        )
        script_keys = self._deciding_keys(tenant, now, loop_keys, learning[0] != "")
        try:
            reply = await self.run_script(self._scripts.check, tenant, args, script_keys)
        except StoreUnavailable as exc:
            self.events.store_unavailable("check", str(exc))
            return self._degraded(applied, est)
        weighed = int(reply[2])
        decision = rendering.decision(
            resolved, reply[3:], weighed, int(reply[0]) == 1, now, est_down=est_down
        )
        decision.estimated_usd = micro_to_usd(int(reply[1]))
        decision.estimate_source = learned.source_of(
            asked, settings.min_estimate_micro, est, weighed, hint.default
        )
        return decision

    async def _settle(self, tenant: str, rid: str, settled: Settlement) -> SettleResult:
        if fail_open.is_grant_id(rid):
            granted = await self.grants.settle(tenant, rid, settled)
            if granted is not None:
                return granted
        settings = self._snapshot.config.settings
        now = self._clock.now_ms()
        tokens = settled.tokens
        args: list[str | int] = [
            now,
            rid,
            settings.keep_finished_ms,
            settled.mode,
            "" if tokens is None else tokens[0],
            "" if tokens is None else tokens[1],
            max(settled.cost_micro or 0, 0),
            self._clock.limiter_ms(),
            self._ledger,
            "" if settled.latency_ms is None else settled.latency_ms,
            "1" if settled.success else "0",
            "" if settled.provider_model is None else SEP.join(settled.provider_model),
            self._learn_config,
            attempt := new_attempt_id(),
        ]
        script_keys = self.charging_keys(tenant, now, self._learns)
        try:
            reply = await self.run_script(self._scripts.settle, tenant, args, script_keys)
        except StoreUnavailable as exc:
            # Redis may have run it and only its answer was lost: the caller is told 503
            # and repeats it, and the repeat answers "replayed", which the spend metrics
            # skip. Found in the background, the charge is counted here, once.
            self._find_lost_settle_later(tenant, rid, attempt)
            self.events.store_unavailable("settle", str(exc))
            raise Unavailable(str(exc)) from exc
        except asyncio.CancelledError:
            self._find_lost_settle_later(tenant, rid, attempt)
            raise
        result = rendering.settle_result(
            self.snapshot(tenant), rid, reply, "tokens_in", self.state_lost_at
        )
        if int(reply[0]) == LATE_CHARGE:
            # The attempt that charged it had its answer lost before its sidecar knew it
            # had charged: this answer is the first to count it (lua/settle.lua status 4).
            self.events.late_charge(result)
        return result

    async def _release(self, tenant: str, reservation_id: str) -> SettleResult:
        if fail_open.is_grant_id(reservation_id):
            released = self.grants.release(tenant, reservation_id)
            if released is not None:
                return released
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
        return rendering.settle_result(
            self.snapshot(tenant), reservation_id, reply, "reservation_id", self.state_lost_at
        )

    async def _record(self, tenant: str, req: RecordRequest) -> RecordResult:
        settings = self._snapshot.config.settings
        now = self._clock.now_ms()
        has_tokens = req.tokens_in is not None or req.tokens_out is not None
        price = (
            estimates.priced(self.snapshot(tenant), req.provider, req.model, req.cost_usd)
            if has_tokens
            else None
        )
        cost = estimates.estimate(price, req.cost_usd, req.tokens_in, req.tokens_out)
        resolved = self.resolve(tenant, req, req.provider, req.model, now)
        applied = resolved.budgets
        args: list[str | int] = [
            now,
            cost,
            req.idempotency_key or "",
            settings.keep_finished_ms,
            meta(resolved.meta_head, req.step_id, req.run_id),
            req.tokens_in or 0,
            req.tokens_out or 0,
            self._ledger,
            "" if req.latency_ms is None else req.latency_ms,
            "1" if req.success else "0",
            # Who counts the charge in the spend metrics (lua/record.lua ARGV[11]): only a
            # key's charge can be found again after its answer was lost.
            attempt := new_attempt_id() if req.idempotency_key else "",
        ]
        for a in applied:
            args += (a.cid, record_slot(a), a.budget.limit_micro, a.thresholds)
        key = req.idempotency_key
        try:
            reply = await self.run_script(
                self._scripts.record, tenant, args, self.charging_keys(tenant, now)
            )
        except StoreUnavailable as exc:
            # Redis may have run it and only its answer was lost: the caller repeats it
            # with its key, and the repeat answers "replayed", which the spend metrics
            # skip. Found in the background, the charge is counted here, once.
            if key:
                self._find_lost_record_later(tenant, key, attempt, req, cost)
            self.events.store_unavailable("record", str(exc))
            raise Unavailable(str(exc)) from exc
        except asyncio.CancelledError:
            if key:
                self._find_lost_record_later(tenant, key, attempt, req, cost)
            raise
        status = int(reply[0])
        values = [int(v) for v in reply[1:]]
        if status == LATE_CHARGE:
            # Charged by a call of this key whose answer was lost and that nobody counted
            # (lua/record.lua status 4): this answer is the first to count it.
            self._late_record(req, cost)
        return RecordResult(
            cost_usd=micro_to_usd(cost),
            replayed=status in (2, LATE_CHARGE),
            budgets=[
                rendering.budget_state(a, values[2 * i], values[2 * i + 1])
                for i, a in enumerate(applied)
            ],
        )

    def _late_record(self, req: RecordRequest, cost: int) -> None:
        """Count in the spend metrics a record's charge whose answer no caller received."""
        late = RecordResult(cost_usd=micro_to_usd(cost), replayed=False, budgets=[])
        self.events.late_record(
            late, req.provider, req.model, req.tokens_in or 0, req.tokens_out or 0
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
        a = self._resolver.applied(budget, entity, None, now)
        args: list[str | int] = [now, self._snapshot.config.settings.keep_finished_ms, a.cid]
        reply = await self._run(self._scripts.status, tenant, args)
        # {1, u, h, w, c}: one counter's figures, its recent-spend window, its calls.
        return rendering.budget_status(
            a, int(reply[1]), int(reply[2]), reply[3], int(reply[4]), now
        )

    async def authorize(
        self, tenant: str, req: AuthorizeRequest, hint: EstimateHint = NO_HINT
    ) -> Decision:
        """`hint`: what the surface knows of the estimate (a configured default, the proxy
        route's estimate mode; sidecar.learned)."""
        start = time.perf_counter()
        decision = await self._authorize(tenant, req, hint)
        self.events.decided("authorize", decision, time.perf_counter() - start)
        return decision

    async def check(self, tenant: str, req: CheckRequest, hint: EstimateHint = NO_HINT) -> Decision:
        start = time.perf_counter()
        decision = await self._check(tenant, req, hint)
        self.events.decided("check", decision, time.perf_counter() - start)
        return decision

    async def settle(self, tenant: str, req: SettleRequest) -> SettleResult:
        start = time.perf_counter()
        has_tokens = req.tokens_in is not None or req.tokens_out is not None
        settled = Settlement(
            None if req.cost_usd is None else charge_to_micro(req.cost_usd),
            ((req.tokens_in or 0), (req.tokens_out or 0)) if has_tokens else None,
            req.latency_ms,
            req.success,
        )
        result = await self._settle(tenant, req.reservation_id, settled)
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
            cost = estimates.estimate(price, None, tokens_in, tokens_out)
        elif fallback_cost_usd is not None:
            cost = charge_to_micro(fallback_cost_usd)
        else:
            cost = CHARGE_ESTIMATE  # no price anywhere: the held estimate, never $0
        settled = Settlement(
            cost,
            (tokens_in, tokens_out),
            latency_ms,
            True,
            (provider, model),
            priced_here=price is not None,
        )
        result = await self._settle(tenant, reservation_id, settled)
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

    def take_back(self, tenant: str, decision: Decision) -> None:
        """Release, in the background, the hold of a decision its caller never received (the
        connection was gone before the answer was written): the cancel of a timed-out
        authorize, so a hold nobody was told of does not sit until its lease ends, and its
        idempotency key is free for the retry. A replayed decision takes back only its own
        handout of the hold: release.lua releases it once no handout of it stands."""
        rid = decision.reservation_id
        if rid is not None and decision.degraded and not decision.replayed:
            self.fail_open.forget(tenant, rid)  # a fail-open grant: nobody will settle it
        if rid is None or (not decision.replayed and decision.lease_expires_at is None):
            return
        # A decision made elsewhere than _authorize names its reservation only.
        handout: tuple[str, str] | None = decision.__dict__.get(
            _HANDOUT, None if decision.replayed else (rid, "")
        )
        if handout is None:
            return
        # The lease's end bounds the retries; the longest lease is a safe bound.
        lease_end_ms = self._clock.now_ms() + self._snapshot.config.settings.max_lease_ms
        self._cancel_later(tenant, handout[0], lease_end_ms, handout[1])

    def _cancel_later(
        self, tenant: str, rid: str, lease_end_ms: int, key: str | None = None
    ) -> None:
        if len(self._cancels) >= _MAX_PENDING_CANCELS:
            return  # past this many, the leases returning the holds will have to do
        task = asyncio.get_running_loop().create_task(
            self._cancel(tenant, rid, lease_end_ms, key or "")
        )
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _cancel(self, tenant: str, rid: str, lease_end_ms: int, key: str = "") -> None:
        """Take back the handout of an authorize that sent `rid` and whose answer never
        reached its caller (lua/release.lua's cancel: the reservation is released once no
        handout of it stands, or tombstoned if the authorize has not run), retrying until
        it succeeds or the lease has ended (then the hold is back by itself)."""

        async def once() -> None:
            keep = self._snapshot.config.settings.keep_finished_ms
            args: list[str | int] = [
                self._clock.now_ms(), rid, keep, "1", self._clock.limiter_ms(), key
            ]  # fmt: skip
            await self.run_script(self._scripts.release, tenant, args)

        await self._retry_until(lease_end_ms, once)

    def _find_lost_settle_later(self, tenant: str, rid: str, attempt: str) -> None:
        self._search_later(lambda: self._find_lost_settle(tenant, rid, attempt))

    def _find_lost_record_later(
        self, tenant: str, key: str, attempt: str, req: RecordRequest, cost: int
    ) -> None:
        self._search_later(lambda: self._find_lost_record(tenant, key, attempt, req, cost))

    def _search_later(self, search: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run a search for a settle's or a record's lost answer in the background."""
        if len(self._lost_settles) >= _MAX_PENDING_CANCELS:
            return  # past this many, those go uncounted in the metrics (the books have them)
        task = asyncio.get_running_loop().create_task(search())
        self._lost_settles.add(task)
        task.add_done_callback(self._lost_settles.discard)

    async def _find_lost_record(
        self, tenant: str, key: str, attempt: str, req: RecordRequest, cost: int
    ) -> None:
        """A record call with an idempotency key whose answer was lost: if it charged, count
        that charge in the metrics (lua/record_lost.lua), retrying until Redis answers;
        bounded as a lost settle's search."""
        t = keys.tenant_keys(tenant)
        script_keys = (t.reservations, t.gc)

        async def once() -> None:
            keep = self._snapshot.config.settings.keep_finished_ms
            args = (key, attempt, self._clock.now_ms(), keep)
            reply = await self.run_script(self._scripts.record_lost, tenant, args, script_keys)
            if int(reply[0]) == LATE_CHARGE:
                self._late_record(req, cost)

        await self._retry_until(
            self._clock.now_ms() + self._snapshot.config.settings.max_lease_ms, once
        )

    async def _find_lost_settle(self, tenant: str, rid: str, attempt: str) -> None:
        """A settle call whose answer was lost: if it charged the reservation, count that
        charge in the metrics (lua/settle_lost.lua), retrying until Redis answers. Bounded
        like a cancel: past the longest lease, the attempt is left uncounted."""
        script_keys = (keys.tenant_keys(tenant).reservations,)

        async def once() -> None:
            reply = await self.run_script(
                self._scripts.settle_lost, tenant, (rid, attempt), script_keys
            )
            if int(reply[0]) == LATE_CHARGE:
                result = rendering.settle_result(self.snapshot(tenant), rid, reply, "tokens_in")
                self.events.late_charge(result)

        await self._retry_until(
            self._clock.now_ms() + self._snapshot.config.settings.max_lease_ms, once
        )

    async def _retry_until(self, until_ms: int, once: Callable[[], Awaitable[None]]) -> None:
        """Run `once` until Redis answers it, backing off (50 ms doubling to 1 s) while it is
        unavailable, and give up at `until_ms` (the background work of a cancel or a lost
        settle's search: past the longest lease nothing is left to do)."""
        delay_s = 0.05
        while self._clock.now_ms() < until_ms:
            try:
                await once()
                return
            except StoreUnavailable:
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 1.0)

    @property
    def pending_cancels(self) -> int:
        return len(self._cancels)

    @property
    def pending_lost_settles(self) -> int:
        """Settles and records whose answer was lost, not yet looked for (see
        _find_lost_settle, _find_lost_record)."""
        return len(self._lost_settles)

    async def close(self) -> None:
        """Stop retrying cancels (the leases return those holds) and the fail-open drain."""
        await tasks.stop(self._cancels, what="cancels of timed-out authorizes")
        await tasks.stop(self._lost_settles, what="searches for settles whose answer was lost")
        await self.fail_open.close()

    # ---- helpers ------------------------------------------------------------------------

    async def run_script(
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
            script_keys = self.charging_keys(tenant, self._clock.now_ms())
        for _ in range(_BACKLOG_ROUNDS):
            reply: list[Any] = await self._store.run(script, script_keys, args)
            self._expired(reply)
            if reply[0] == LOST:
                # Redis lost its state since the last check: let the check see it and put
                # back the stops, then decide on what is there (the marker is the last key).
                await self._after_loss()
                script_keys = script_keys[:-1]
                continue
            if reply[0] != BACKLOG:
                return reply
            await self._drain(tenant)
        raise StoreUnavailable(f"{script.name}: ended leases pile up faster than they return")

    async def _after_loss(self) -> None:
        if self.after_loss is None:
            return
        try:
            async with asyncio.timeout(_AFTER_LOSS_S):
                await self.after_loss()
        except Exception as exc:  # whatever the check raised (logged there)
            # The stops could not be put back: no decision as if they were, and the fail
            # mode's answer, not a 500 (a bug in the check is logged by it).
            raise StoreUnavailable(f"redis lost its state; checking it failed: {exc}") from exc

    async def _drain(self, tenant: str) -> None:
        """Return every hold whose lease has ended, RECLAIM_BATCH leases per script call."""
        keep = self._snapshot.config.settings.keep_finished_ms
        while True:
            now = self._clock.now_ms()
            script_keys = self.charging_keys(tenant, now)
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
            # Before the counts: what each charged, so the spend metrics count it as spend.
            costs = [str(c).split(SEP) for c in reply.pop()]
            self.events.charged_at_lease_end(charged, [(p, m, int(c)) for p, m, c in costs])

    async def _run(
        self,
        script: Script,
        tenant: str,
        args: Sequence[str | int],
        script_keys: Sequence[str] | None = None,
    ) -> list[Any]:
        try:
            reply = await self.run_script(script, tenant, args, script_keys)
        except StoreUnavailable as exc:
            self.events.store_unavailable(script.name, str(exc))
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

    def _deciding_keys(
        self, tenant: str, now_ms: int, loop_keys: tuple[str, ...], learning: bool
    ) -> tuple[str, ...]:
        """authorize's and check's KEYS: the charging keys, the loop keys, the learned
        estimates' hash when this call learns, and the tenant's state marker once seen. A
        key is named only where it is used: a Redis Cluster slot in migration runs a
        multi-key script only when every key it names has moved."""
        charging = self.charging_keys(tenant, now_ms, learning)
        marker = self.marked.get(tenant)
        if not loop_keys:
            return charging if marker is None else (*charging, marker)
        named = (*charging[:8], *loop_keys, charging[8]) if learning else (*charging, *loop_keys)
        return named if marker is None else (*named, marker)

    @staticmethod
    def _loop_keys(tenant: str, resolved: Resolved, text: str | None) -> tuple[str, ...]:
        """The loop guards' keys of this call's entities (none without a fingerprint: a
        call without one is no repeat of anything)."""
        if text is None or not resolved.loops:
            return ()
        return tuple(keys.loop_key(tenant, a.guard.id, a.entity) for a in resolved.loops)

    def charging_keys(self, tenant: str, now_ms: int, learning: bool = False) -> tuple[str, ...]:
        """settle's and record's KEYS: the aggregate key names the UTC day, so the tuples
        are built once per tenant and day, not per call (settle is on the hot path).
        `learning`: with the learned estimates' hash as KEYS[9] (settle's), named only
        where used."""
        day = now_ms // 86_400_000
        if day != self._charging_day:
            self._charging_day = day
            self._charging = {}
        found = self._charging.get(tenant)
        if found is None:
            yyyymmdd = time.strftime("%Y%m%d", time.gmtime(day * 86_400))
            found = self._charging[tenant] = keys.tenant_keys(tenant).learning(yyyymmdd)
        return found if learning else found[:8]


def _tail(
    resolved: Resolved,
    budget_args: tuple[str | int, ...],
    packed: Packed,
    loop_keys: tuple[str, ...],
    read_fields: tuple[str, ...],
) -> tuple[str | int | Packed, ...]:
    """authorize.lua's (check.lua's) arguments from the budgets' on: `budget_args`, the
    loop guards' (with loop keys), then `read_fields`. When they are the memo entry's own
    (no loop guard, no run's stop field added), they are its Packed tail: packed once, the
    last of the command."""
    if not loop_keys and read_fields is resolved.read_fields:
        return (packed,)
    return (*budget_args, *(resolved.loop_args if loop_keys else ()), *read_fields)


def _ledger_config(config: Config) -> str:
    """settle.lua's and record.lua's ledger argument (see lua/_lib.lua, ledger())."""
    s = config.settings
    return (
        f"{s.usage_max_records}:{s.usage_max_age_days * 86_400_000}:"
        f"{s.usage_aggregate_days * 86_400}:{s.usage_user_aggregate_days * 86_400}"
    )
