"""Prometheus metrics: an EngineEvents observer, a metered Store, and the /metrics route.

Every metric is created once per `Metrics`, on its own registry (so several apps in one
test process do not collide). The hot path only looks up label children, most of them
resolved ahead of time into plain dicts.

Label cardinality is bounded by the config, never by traffic: `budget_id` comes from the
configured budgets, `provider`/`model` from the configured prices (anything else is
`other`), the rest are fixed enums. No label names an entity, a reservation or a request.

With `settings.axonflow_metrics: true` the spend is also exported under the AxonFlow
platform's names, so dashboards and alerts written for AxonFlow keep working: the same
facts, counted at the same place, with AxonFlow's labels (`AxonFlowSpend`).

With PROMETHEUS_MULTIPROC_DIR set (several worker processes), prometheus-client keeps each
value in a per-process file and /metrics sums (counters, histograms) or takes the maximum
of live processes (the used-ratio gauge) across every process writing to that directory.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    multiprocess,
)

from sidecar.clock import Clock, SystemClock
from sidecar.engine import Engine
from sidecar.guards import GUARD_REASONS, guards_of, log_trip
from sidecar.logs import decision_log, log_decision
from sidecar.model import Action, Budget, Config
from sidecar.money import micro_to_usd
from sidecar.periods import WindowCache
from sidecar.schemas import BudgetState, Decision, RecordResult, SettleResult
from sidecar.scripts import Script
from sidecar.store import Store, StoreUnavailable
from sidecar.tally import Incrementable, Observable, Tallies

log = logging.getLogger("sidecar.metrics")

PREFIX = "budget_sidecar"
OTHER = "other"
# The classic text format, which every Prometheus since 2.0 reads; newer prometheus-client
# versions announce 1.0.0 (UTF-8 names), which we do not need: our names are ASCII.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Decisions take well under a millisecond when Redis is local; the buckets resolve that
# range and still reach the Redis timeout and beyond.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
OPERATIONS = ("authorize", "check", "settle", "release", "record")
OUTCOMES = ("allowed", "denied", "degraded")
_LABEL_CACHE_SIZE = 1024


def multiprocess_dir() -> str | None:
    """The directory prometheus-client shares between worker processes, if configured."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """EngineEvents on prometheus-client. Never raises into the engine."""

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()
        self._engine: Engine | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self._multiprocess = multiprocess_dir() is not None
        if not self._multiprocess:
            # Process figures are per process and meaningless summed; multiprocess mode
            # leaves them out.
            ProcessCollector(registry=reg)
            PlatformCollector(registry=reg)

        self.decisions = Counter(
            f"{PREFIX}_decisions",
            "authorize and check answers, by action taken and outcome "
            "(allowed, denied, or degraded: allowed by fail mode open without Redis).",
            ["operation", "action", "outcome"],
            registry=reg,
        )
        self.duration = Histogram(
            f"{PREFIX}_decision_duration_seconds",
            "Engine wall time per operation, Redis included.",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.redis_duration = Histogram(
            f"{PREFIX}_redis_duration_seconds",
            "Wall time of one Redis script call (or ping), failures included.",
            ["script"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.redis_errors = Counter(
            f"{PREFIX}_redis_errors",
            "Failed Redis calls: kind=unavailable (timeout, lost connection: the fail mode "
            "applies) or kind=error (a script error: HTTP 500).",
            ["script", "kind"],
            registry=reg,
        )
        self.unavailable = Counter(
            f"{PREFIX}_store_unavailable",
            "Operations whose Redis call timed out or lost its connection; for authorize "
            "and check the fail mode decided (see fail_open_total; the rest failed closed).",
            ["operation"],
            registry=reg,
        )
        self.fail_open = Counter(
            f"{PREFIX}_fail_open",
            "Decisions allowed by fail mode open while Redis was unavailable.",
            ["operation"],
            registry=reg,
        )
        self.fail_open_charges = Counter(
            f"{PREFIX}_fail_open_charges",
            "Settles of decisions allowed by fail mode open, charged as a record: event "
            "queued (Redis away: kept in memory until it answers), recorded (at the settle), "
            "recorded_later (a queued one, once Redis answered).",
            ["event"],
            registry=reg,
        )
        self.fail_open_drops = Counter(
            f"{PREFIX}_fail_open_dropped",
            "Fail-open grants or queued charges let go, whose spend is not charged: reason "
            "full (settings.fail_open_max_pending reached: allowed without an id), "
            "lease_ended (never settled nor released within its lease), expired (queued "
            "longer than settings.keep_finished_ms).",
            ["reason"],
            registry=reg,
        )
        self.fail_open_pending = Gauge(
            f"{PREFIX}_fail_open_pending",
            "Fail-open grants waiting for their settle, and settles waiting for Redis, held "
            "in this process's memory (lost if it is killed).",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.reservations = Counter(
            f"{PREFIX}_reservations",
            "Reservation lifecycle events seen by this sidecar: held (authorize), settled, "
            "released, expired (a lease that ended with its hold in place: counted once, "
            "by whichever call's script returned the hold), and charged_at_lease_end (one "
            "that ended unsettled and was charged its estimate, as proxy routes ask).",
            ["event"],
            registry=reg,
        )
        self.used_ratio = Gauge(
            f"{PREFIX}_budget_used_ratio",
            "Highest (used + held) / limit of any entity of this budget in the answers this "
            "sidecar gave during the budget's current period (1 = at the limit).",
            ["budget_id"],
            registry=reg,
            multiprocess_mode="livemax",
        )
        self.forecast_ratio = Gauge(
            f"{PREFIX}_budget_forecast_ratio",
            "Highest forecast / limit (projected spend at the period's end, sidecar/forecast.py) "
            "of any entity of this budget in the decisions this sidecar gave during the "
            "budget's current period (>= 1: on course to run out before the period ends).",
            ["budget_id"],
            registry=reg,
            multiprocess_mode="livemax",
        )
        self.alerts = Counter(
            f"{PREFIX}_alerts",
            "Budget threshold alerts by result (delivered, failed).",
            ["result"],
            registry=reg,
        )
        self.tokens = Counter(
            f"{PREFIX}_llm_tokens",
            "Tokens charged by settle and record, by provider, model and type "
            "(input, output). Unpriced provider/model pairs are labelled other.",
            ["provider", "model", "type"],
            registry=reg,
        )
        self.cost = Counter(
            f"{PREFIX}_llm_cost_usd",
            "USD charged by settle, record and a hold's charge at its lease end (on_expiry "
            "charge), by provider and model.",
            ["provider", "model"],
            registry=reg,
        )
        # Made on first use, only with settings.axonflow_metrics (see AxonFlowSpend).
        self._axonflow: AxonFlowSpend | None = None
        self.state_losses = Counter(
            f"{PREFIX}_store_state_lost",
            "Times this sidecar found Redis had lost its state, by kind: lost (restarted "
            "empty, flushed, failed over to an empty replica: counters restarted at zero) or "
            "rolled_back (restored from an older dump, failed over to a replica far behind: "
            "counters went back to that dump's) or evicted (Redis deleted keys at its "
            "maxmemory since the last check: any of them may have been counters) "
            "(sidecar.state_loss).",
            ["kind"],
            registry=reg,
        )
        for kind in ("lost", "rolled_back", "evicted"):  # at 0 from the start, for rate()
            self.state_losses.labels(kind)
        self.store_evicting = Gauge(
            f"{PREFIX}_store_evicting",
            "1 while a Redis primary this sidecar uses has maxmemory set with a "
            "maxmemory-policy other than noeviction (it deletes keys at that limit, "
            "counters included: set noeviction), as its last state check read INFO.",
            registry=reg,
            multiprocess_mode="livemax",
        )
        self.reloads = Counter(
            f"{PREFIX}_config_reloads",
            "Config file reloads by result (success, failure: the last good config stays).",
            ["result"],
            registry=reg,
        )
        self.overshoot = Counter(
            f"{PREFIX}_overshoot_usd",
            "Settled spend past the cap of a block or downgrade budget: what settles charged "
            "beyond the estimates held for them (the estimate error of calls in flight, and "
            "settles that came after their lease ended). Summed, it equals the settled spend "
            "past the caps.",
            registry=reg,
        )
        self.estimate_charges = Counter(
            f"{PREFIX}_estimate_charges",
            "Settles that charged the held estimate because the model has no price.",
            registry=reg,
        )
        self.rate_limited = Counter(
            f"{PREFIX}_rate_limit_decisions",
            "Decisions a rate limit denied (mode enforce) or would have denied (mode shadow),"
            " by rate limit id.",
            ["rate_limit_id", "mode"],
            registry=reg,
        )

        self.guarded = Counter(
            f"{PREFIX}_guard_decisions",
            "Decisions a runaway guard denied (or, mode shadow, would have denied): kind "
            "stop, loop, calls or velocity, by guard id (stop id, loop guard, budget, rate "
            "limit).",
            ["kind", "guard_id", "mode"],
            registry=reg,
        )

        # Children resolved once: the hot path does dict lookups, not labels() calls. What
        # every decision writes goes through tallies (sidecar.tally), flushed by scrapes.
        self._tallies = Tallies(direct=self._multiprocess)
        count, observations = self._tallies.count, self._tallies.observations
        self._rate_limited_children: dict[tuple[str, str], Incrementable] = {}
        self._guard_children: dict[tuple[str, str, str], Incrementable] = {}
        self._decision_children: dict[tuple[str, str, str], Incrementable] = {
            (op, str(action), outcome): count(self.decisions.labels(op, str(action), outcome))
            for op in ("authorize", "check")
            for action in Action
            for outcome in OUTCOMES
        }
        self._duration_children: dict[str, Observable] = {
            op: observations(self.duration.labels(op)) for op in OPERATIONS
        }
        self._unavailable_children = {op: self.unavailable.labels(op) for op in OPERATIONS}
        self._fail_open_children = {op: self.fail_open.labels(op) for op in ("authorize", "check")}
        self._held = count(self.reservations.labels("held"))
        self._settled = count(self.reservations.labels("settled"))
        self._released = count(self.reservations.labels("released"))
        self._expired = count(self.reservations.labels("expired"))
        self._charged_at_end = count(self.reservations.labels("charged_at_lease_end"))
        self.alerts_delivered = self.alerts.labels("delivered")
        self.alerts_failed = self.alerts.labels("failed")
        self.alerts_dropped = self.alerts.labels("dropped")
        self._reload_ok = self.reloads.labels("success")
        self._reload_failed = self.reloads.labels("failure")
        self._redis_children: dict[str, tuple[Observable, Any, Any]] = {}
        self._spend_children: dict[tuple[str | None, str | None], _SpendChildren] = {}
        self._spend_config: Config | None = None
        # budget_id -> [highest ratio this period, period end (ms), gauge child, budget id,
        #               highest forecast ratio this period, its gauge child]
        self._ratios: dict[str, list[Any]] = {}
        self._budgets: dict[str, Budget] = {}
        self._budgets_config: Config | None = None
        self._windows = WindowCache()
        self._last_unavailable_log = -1e9

    # ---- wiring -------------------------------------------------------------------------

    def state_lost(self, kind: str = "lost") -> None:
        """Redis was found to have lost its state, or gone back to an older one (kind:
        sidecar.state_loss.LOST / ROLLED_BACK)."""
        self.state_losses.labels(kind).inc()

    def evicting(self, evicts: bool) -> None:
        """Whether a Redis primary's policy evicts keys (sidecar.state_loss, every check)."""
        self.store_evicting.set(1.0 if evicts else 0.0)

    def alert_attempt(self, ok: bool) -> None:
        """One webhook POST of an alert: delivered (2xx) or failed (retried later)."""
        (self.alerts_delivered if ok else self.alerts_failed).inc()

    def alerts_trimmed(self, count: int) -> None:
        """Alerts the stream's cap trimmed before any webhook delivered them."""
        self.alerts_dropped.inc(count)

    def add_routes(self, app: web.Application, engine: Engine) -> None:
        """Serve /metrics and /prometheus (the same page) and learn the engine's config."""
        self._engine = engine
        app.router.add_get("/metrics", self.handle)
        app.router.add_get("/prometheus", self.handle)

        async def forget_process(app: web.Application) -> None:
            if self._multiprocess:
                # The used-ratio gauge is a max over live processes: drop this one's.
                multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

        app.on_cleanup.append(forget_process)

    def wrap(self, store: Store) -> MeteredStore:
        return MeteredStore(store, self)

    def exposition(self) -> bytes:
        self._tallies.flush()
        self.refresh()
        if self._multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)

    async def handle(self, request: web.Request) -> web.Response:
        body = self.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    def refresh(self) -> None:
        """At scrape time: a budget whose period ended since its last answer reads 0."""
        now_ms = self._clock.now_ms()
        if self._engine is not None:
            self.fail_open_pending.set(self._engine.fail_open.pending)
        for entry in self._ratios.values():
            if now_ms >= entry[1]:
                entry[0] = entry[4] = 0.0
                entry[1] = self._period_end(entry[3], now_ms)
                entry[2].set(0.0)
                entry[5].set(0.0)
            elif not self._multiprocess:
                # One process: the highs are kept in plain numbers between scrapes (a
                # gauge write takes a lock, and a new high comes with nearly every call
                # of a budget filling up).
                entry[2].set(entry[0])
                entry[5].set(entry[4])

    # ---- EngineEvents -------------------------------------------------------------------

    def decided(self, operation: str, decision: Decision, seconds: float) -> None:
        if decision.degraded:
            outcome = "degraded"
            child = self._fail_open_children.get(operation)
            if child is not None:
                child.inc()
        else:
            outcome = "allowed" if decision.allowed else "denied"
        key = (operation, decision.action, outcome)
        counter = self._decision_children.get(key)
        if counter is None:
            counter = self._decision_children[key] = self._tallies.count(
                self.decisions.labels(*key)
            )
        counter.inc()
        self._observe_duration(operation, seconds)
        if decision.rate_limits and (decision.would_deny or not decision.allowed):
            for limit in decision.rate_limits:
                if limit.would_deny:
                    self._count_rate_limited(limit.rate_limit_id, limit.mode)
        if decision.reason in GUARD_REASONS or decision.would_deny:
            for kind, guard_id, entity, mode in guards_of(decision):
                self._count_guard(kind, guard_id, mode)
                if mode == "enforce" and operation == "authorize":
                    log_trip(kind, guard_id, entity)
        if operation == "authorize" and decision.lease_expires_at is not None:
            # lease_expires_at is set exactly when this answer took a new hold (not a
            # replay, not a denial, not degraded).
            self._held.inc()
        if decision.budgets:
            self._observe_ratios(decision.budgets)
        # The per-decision log line lives here because this is the one place every
        # decision passes; isEnabledFor is a cached lookup, so info level costs nothing.
        if decision_log.isEnabledFor(logging.DEBUG):
            log_decision(operation, decision, seconds)

    def finished(self, operation: str, result: SettleResult, seconds: float) -> None:
        self._observe_duration(operation, seconds)
        if result.replayed or result.state == "queued":
            return  # the first answer counted it; a queued charge counts once recorded
        if result.state == "settled":
            self._settled.inc()
            self._spend(result.provider, result.model, result.cost_usd, *_tokens(result))
            if result.overshoot_usd:
                self.overshoot.inc(result.overshoot_usd)
            if result.priced_by == "estimate":
                self.estimate_charges.inc()
        else:
            self._released.inc()
        if result.budgets:
            self._observe_ratios(result.budgets)

    def recorded(
        self,
        result: RecordResult,
        provider: str | None,
        model: str | None,
        tokens_in: int,
        tokens_out: int,
        seconds: float,
    ) -> None:
        self._observe_duration("record", seconds)
        if result.replayed:
            return
        self._spend(provider, model, result.cost_usd, tokens_in, tokens_out)
        if result.budgets:
            self._observe_ratios(result.budgets)

    def expired(self, count: int) -> None:
        self._expired.inc(count)

    def charged_at_lease_end(self, count: int, charges: Sequence[tuple[str, str, int]]) -> None:
        self._charged_at_end.inc(count)
        for provider, model, cost_micro in charges:
            # Spend like a settle's (the held estimate, no tokens): the cost counters agree
            # with the usage ledger, whose kind "expiry" records these.
            self._spend(provider or None, model or None, micro_to_usd(cost_micro), 0, 0)

    def late_charge(self, result: SettleResult) -> None:
        # A settle's charge no answer reported (see EngineEvents.late_charge): counted as
        # finished() counts one answered at once.
        self._settled.inc()
        self._spend(result.provider, result.model, result.cost_usd, *_tokens(result))
        if result.overshoot_usd:
            self.overshoot.inc(result.overshoot_usd)
        if result.priced_by == "estimate":
            self.estimate_charges.inc()

    def late_record(
        self,
        result: RecordResult,
        provider: str | None,
        model: str | None,
        tokens_in: int,
        tokens_out: int,
    ) -> None:
        # A record's charge no answer reported (see EngineEvents.late_record).
        self._spend(provider, model, result.cost_usd, tokens_in, tokens_out)

    def fail_open_charge(self, event: str, result: SettleResult | None) -> None:
        self.fail_open_charges.labels(event).inc()
        if result is not None and not result.replayed:
            # Recorded later: no settle answer reported this spend.
            self._settled.inc()
            self._spend(result.provider, result.model, result.cost_usd, *_tokens(result))
            if result.budgets:
                self._observe_ratios(result.budgets)

    def fail_open_dropped(self, reason: str) -> None:
        self.fail_open_drops.labels(reason).inc()

    def store_unavailable(self, operation: str, reason: str = "") -> None:
        now = time.monotonic()
        if now - self._last_unavailable_log >= 1.0:
            # An outage at thousands of calls per second is one line a second, not one
            # per call; the counter has every one. The reason tells a Redis too slow from
            # one refusing writes (MISCONF: its disk) or out of reach (no descriptor free).
            self._last_unavailable_log = now
            log.error(
                "redis unavailable for %s (%s); the fail mode applies",
                operation,
                reason or "no answer in time",
                extra={"operation": operation},
            )
        child = self._unavailable_children.get(operation)
        if child is None:
            child = self._unavailable_children[operation] = self.unavailable.labels(operation)
        child.inc()

    # ---- other sources ------------------------------------------------------------------

    def config_reloaded(self, ok: bool) -> None:
        (self._reload_ok if ok else self._reload_failed).inc()

    def redis_call(self, script: str) -> tuple[Observable, Any, Any]:
        """(duration, unavailable, error) children for one script name."""
        children = self._redis_children.get(script)
        if children is None:
            children = self._redis_children[script] = (
                self._tallies.observations(self.redis_duration.labels(script)),
                self.redis_errors.labels(script, "unavailable"),
                self.redis_errors.labels(script, "error"),
            )
        return children

    # ---- helpers ------------------------------------------------------------------------

    def _count_guard(self, kind: str, guard_id: str, mode: str) -> None:
        key = (kind, guard_id, mode)
        child = self._guard_children.get(key)
        if child is None:
            if len(self._guard_children) >= _LABEL_CACHE_SIZE:
                return  # stop ids are made at run time: bounded whatever is made
            child = self._guard_children[key] = self._tallies.count(self.guarded.labels(*key))
        child.inc()

    def _count_rate_limited(self, limit_id: str, mode: str) -> None:
        key = (limit_id, mode)
        child = self._rate_limited_children.get(key)
        if child is None:
            if len(self._rate_limited_children) >= _LABEL_CACHE_SIZE:
                return  # ids come from definitions, but stay bounded whatever is defined
            child = self._rate_limited_children[key] = self._tallies.count(
                self.rate_limited.labels(*key)
            )
        child.inc()

    def _observe_duration(self, operation: str, seconds: float) -> None:
        child = self._duration_children.get(operation)
        if child is None:
            child = self._duration_children[operation] = self._tallies.observations(
                self.duration.labels(operation)
            )
        child.observe(seconds)

    def _spend(
        self,
        provider: str | None,
        model: str | None,
        cost_usd: float,
        tokens_in: int,
        tokens_out: int,
    ) -> None:
        engine = self._engine
        config = engine.config if engine is not None else None
        if config is not self._spend_config or len(self._spend_children) >= _LABEL_CACHE_SIZE:
            # Labels follow the pricing: a reload may price (or stop pricing) a model.
            # (Tallies already made keep adding to their children until the next scrape.)
            self._spend_children = {}
            self._spend_config = config
        key = (provider, model)
        children = self._spend_children.get(key)
        if children is None:
            label_provider, label_model = OTHER, OTHER
            price = engine.price(provider, model) if engine is not None else None
            if price is not None and price.model != "*":  # "*" is the fallback price
                label_provider, label_model = price.provider, price.model
            count = self._tallies.count
            axonflow = None
            if config is not None and config.settings.axonflow_metrics:
                axonflow = self._axonflow_spend().children(count, label_provider, label_model)
            children = self._spend_children[key] = (
                count(self.cost.labels(label_provider, label_model)),
                count(self.tokens.labels(label_provider, label_model, "input")),
                count(self.tokens.labels(label_provider, label_model, "output")),
                axonflow,
            )
        cost, tokens_input, tokens_output, axonflow = children
        if cost_usd:
            cost.inc(cost_usd)
        if tokens_in:
            tokens_input.inc(tokens_in)
        if tokens_out:
            tokens_output.inc(tokens_out)
        if axonflow is not None:
            ax_cost, ax_prompt, ax_completion, ax_calls = axonflow
            if cost_usd:
                ax_cost.inc(cost_usd)
            if tokens_in:
                ax_prompt.inc(tokens_in)
            if tokens_out:
                ax_completion.inc(tokens_out)
            ax_calls.inc()

    def _axonflow_spend(self) -> AxonFlowSpend:
        if self._axonflow is None:
            self._axonflow = AxonFlowSpend(self.registry)
        return self._axonflow

    def _observe_ratios(self, states: Sequence[BudgetState]) -> None:
        now_ms = self._clock.now_ms()
        direct = self._multiprocess  # else refresh() writes the highs at the scrape
        for state in states:
            entry = self._ratios.get(state.budget_id)
            if entry is None:
                entry = self._new_ratio(state.budget_id, now_ms)
                if entry is None:
                    continue  # a budget the config no longer has
            if now_ms >= entry[1]:  # a new period: the old high no longer says anything
                entry[0] = entry[4] = 0.0
                entry[1] = self._period_end(state.budget_id, now_ms)
                entry[2].set(0.0)
                entry[5].set(0.0)
            ratio = state.percentage / 100
            if ratio > entry[0]:  # only a new high writes to the gauge
                entry[0] = ratio
                if direct:
                    entry[2].set(ratio)
            if state.forecast_usd is not None and state.limit_usd:
                projected = state.forecast_usd / state.limit_usd
                if projected > entry[4]:
                    entry[4] = projected
                    if direct:
                        entry[5].set(projected)

    def _new_ratio(self, budget_id: str, now_ms: int) -> list[Any] | None:
        budget = self._budget(budget_id)
        if budget is None:
            return None
        entry: list[Any] = [
            0.0,
            self._period_end(budget_id, now_ms),
            self.used_ratio.labels(budget_id),
            budget_id,
            0.0,
            self.forecast_ratio.labels(budget_id),
        ]
        self._ratios[budget_id] = entry
        return entry

    def _budget(self, budget_id: str) -> Budget | None:
        engine = self._engine
        if engine is None:
            return None
        if engine.config is not self._budgets_config:
            self._budgets_config = engine.config
            self._budgets = {b.id: b for b in engine.config.budgets}
        return self._budgets.get(budget_id)

    def _period_end(self, budget_id: str, now_ms: int) -> int:
        budget = self._budget(budget_id)
        if budget is None:
            return now_ms  # no longer configured: reads 0 from the next scrape on
        return self._windows.get(budget.period, budget.timezone, now_ms).end_ms


_AxonFlowChildren = tuple[Incrementable, Incrementable, Incrementable, Incrementable]
# cost, tokens in, tokens out, and the AxonFlow names' children (None: not exported).
_SpendChildren = tuple[Incrementable, Incrementable, Incrementable, _AxonFlowChildren | None]


class AxonFlowSpend:
    """The AxonFlow platform's LLM metrics, on the sidecar's registry (opt-in:
    settings.axonflow_metrics). Names and labels are the platform's own (its gateway audit
    handler and orchestrator), so its PromQL runs unchanged:

    - axonflow_gateway_llm_tokens_total{provider, model, type}: type `prompt` or
      `completion` (the platform's values; the sidecar's own metric says input/output);
    - axonflow_gateway_llm_cost_usd_total{provider, model};
    - axonflow_orchestrator_llm_calls_total{provider, model, status}: one per settled
      call (settle, audit, record), status `success`. The platform labels provider and
      status; `model` is added so "average tokens per request" also works per model (a
      query that sums by provider is unchanged by it).

    Counted exactly where budget_sidecar_llm_* are, with the same label values: a priced
    provider/model pair or `other`, so the series stay bounded by the pricing.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.tokens = Counter(
            "axonflow_gateway_llm_tokens",
            "LLM tokens charged (settle, audit, record), by provider, model and type "
            "(prompt, completion); the AxonFlow platform's name for budget_sidecar_llm_tokens.",
            ["provider", "model", "type"],
            registry=registry,
        )
        self.cost = Counter(
            "axonflow_gateway_llm_cost_usd",
            "USD charged, by provider and model; the AxonFlow platform's name for "
            "budget_sidecar_llm_cost_usd.",
            ["provider", "model"],
            registry=registry,
        )
        self.calls = Counter(
            "axonflow_orchestrator_llm_calls",
            "LLM calls charged (one per settle, audit or record), by provider, model and "
            "status (success).",
            ["provider", "model", "status"],
            registry=registry,
        )

    def children(self, count: Any, provider: str, model: str) -> _AxonFlowChildren:
        """(cost, prompt tokens, completion tokens, calls) writers of one label pair."""
        return (
            count(self.cost.labels(provider, model)),
            count(self.tokens.labels(provider, model, "prompt")),
            count(self.tokens.labels(provider, model, "completion")),
            count(self.calls.labels(provider, model, "success")),
        )


def _tokens(result: SettleResult) -> tuple[int, int]:
    return result.tokens_in, result.tokens_out


class MeteredStore:
    """A Store that times every Redis call and counts its failures, then delegates."""

    def __init__(self, inner: Store, metrics: Metrics) -> None:
        self.inner = inner
        self._metrics = metrics

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        duration, unavailable, error = self._metrics.redis_call(script.name)
        start = time.perf_counter()
        try:
            return await self.inner.run(script, keys, args)
        except StoreUnavailable:
            unavailable.inc()
            raise
        except Exception:
            error.inc()
            raise
        finally:
            duration.observe(time.perf_counter() - start)

    async def ping(self) -> bool:
        duration, unavailable, _error = self._metrics.redis_call("ping")
        start = time.perf_counter()
        ok = await self.inner.ping()
        duration.observe(time.perf_counter() - start)
        if not ok:
            unavailable.inc()
        return ok

    async def close(self) -> None:
        await self.inner.close()

    @property
    def client(self) -> aioredis.Redis:
        return self.inner.client
