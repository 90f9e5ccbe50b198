"""Rendering: scripts' replies -> the response types (decisions, budget states, settle
results, statuses). Pure functions of the resolved call and the reply's figures."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sidecar import keys
from sidecar.decision import Applied, decide, percentage
from sidecar.errors import RequestError
from sidecar.forecast import forecast, parse_window
from sidecar.model import UNCAPPED_MICRO, USD_UNIT_MICRO, Action, Budget, LimitMode, Metric, Period
from sidecar.money import MICRO, micro_to_usd
from sidecar.periods import iso
from sidecar.reservations import unmeta
from sidecar.resolution import MODE, AppliedLimit, AppliedLoop, Resolved, Snapshot
from sidecar.schemas import (
    BudgetInfo,
    BudgetState,
    BudgetStatus,
    Decision,
    LoopGuardState,
    RateLimitState,
    SettleResult,
    StopState,
)

# Enum members as module constants: on Python 3.11 `Action.BLOCK` goes through EnumType's
# __getattr__ hook (about 900 instructions a lookup, callgrind), and a decision made ten
# of them here.
_BLOCK, _ALLOW, _DOWNGRADE, _WARN = Action.BLOCK, Action.ALLOW, Action.DOWNGRADE, Action.WARN
_ENFORCE, _SHADOW = LimitMode.ENFORCE, LimitMode.SHADOW
_TOTAL = Period.TOTAL
_USD, _CONCURRENT = Metric.USD, Metric.CONCURRENT
# A concurrency limit frees a slot when some reservation ends: a hint, not a promise.
_SLOT_RETRY_MS = 1000
_PRICED_BY = {"t": "tokens", "c": "cost", "e": "estimate"}


def decision(
    resolved: Resolved,
    values_raw: list[Any],
    est: int,
    allowed: bool,
    now: int,
    *,
    held_est: int = 0,
    est_down: int | None = None,
) -> Decision:
    """A decision from the script's figures: budget counters before this call (u, h per
    budget), each budget's recent-spend window, then (for a fresh decision) three figures
    per rate limit, each budget's calls, the stop in force and two figures per loop guard
    (lua/authorize.lua). `held_est` is what this call now holds on each budget (reported
    in held_usd)."""
    applied = resolved.budgets
    nb, nl = len(applied), len(resolved.limits)
    # hiredis gives Lua's integer replies as ints already.
    values: list[int] = values_raw[: 2 * nb]
    windows: list[Any] = values_raw[2 * nb : 3 * nb]
    fresh = len(values_raw) > 3 * nb  # a retry's reply has the counters and windows only
    guards_at = 3 * nb + 3 * nl
    # A retry's reply carries no call counts: its states report none (not 0).
    calls: list[int | None] = (
        [int(c) + (1 if held_est else 0) for c in values_raw[guards_at : guards_at + nb]]
        if fresh
        else [None] * nb
    )
    outcome = decide(applied, values, est, allowed, est_down)
    states = [
        budget_state(a, values[2 * i], values[2 * i + 1] + held_est, calls[i], windows[i], now)
        for i, a in enumerate(applied)
    ]
    limits: list[RateLimitState] = []
    denying: list[RateLimitState] = []
    binding_limit = None
    if resolved.limits and fresh:
        rate_raw: list[int] = values_raw[3 * nb : guards_at]
        limits = [
            limit_state(limit, rate_raw[3 * j : 3 * j + 3])
            for j, limit in enumerate(resolved.limits)
        ]
        denying = [r for r in limits if r.would_deny and r.mode == _ENFORCE]
        if denying:
            binding_limit = max(denying, key=lambda r: r.retry_after_ms)
        elif limits:
            binding_limit = min(limits, key=lambda r: r.remaining)
    stop, stop_left, loops = None, None, []
    if fresh:
        found = stop_state(
            str(values_raw[guards_at + nb]),
            str(values_raw[guards_at + nb + 1]),
            str(values_raw[guards_at + nb + 2]),
        )
        if found is not None:
            stop, stop_left = found
        loop_raw: list[int] = values_raw[guards_at + nb + 3 :]
        if len(loop_raw) == 2 * len(resolved.loops):
            loops = [
                loop_state(loop, loop_raw[2 * g : 2 * g + 2])
                for g, loop in enumerate(resolved.loops)
            ]
    budget_denied = not allowed and outcome.action is _BLOCK
    action = _BLOCK if not allowed else outcome.action
    info = None
    if outcome.binding is not None:
        bound = outcome.binding
        info = binding_info(states[bound], applied[bound].budget, outcome.action)
    retry_after_ms = None
    reason = None
    message = binding_message(outcome.action, applied, outcome.binding, values, est)
    looping = next((s for s in loops if s.would_deny and s.mode == _ENFORCE), None)
    capped = _past_call_cap(applied, calls, "b", 0) if resolved.calls_capped else None
    if allowed:
        if action is _ALLOW and fresh and resolved.calls_capped:
            # A warn budget whose entity made its calls reports it, as a spent warn
            # budget does (a block one would have denied).
            warned = _past_call_cap(applied, calls, "w", 1 if held_est else 0)
            if warned is not None:
                b = applied[warned].budget
                action = _WARN
                message = f"Budget '{b.name}' reached its {b.limit_calls} calls - warning"
                info = binding_info(states[warned], b, _WARN)
    elif stop is not None:
        reason, message = "stop", stop_message(stop)
        retry_after_ms = stop_left
    elif looping is not None:
        reason, message = "loop", loop_message(looping)
        retry_after_ms = looping.window_ms
    elif capped is not None and fresh:
        b = applied[capped].budget
        reason = "calls"
        message = f"Budget '{b.name}' reached its {b.limit_calls} calls - requests blocked"
        info = binding_info(states[capped], b, _BLOCK)
        retry_after_ms = _retry_of(applied[capped], now)
    elif budget_denied and outcome.binding is not None:
        reason = "budget"
        retry_after_ms = _retry_of(applied[outcome.binding], now)
    elif denying:
        reason = "velocity" if denying[0].metric == _USD else "rate_limit"
        waits = [_limit_wait(r) for r in denying]
        # A call larger than a token or dollar limit ever admits passes by no waiting.
        retry_after_ms = None if None in waits else max(w for w in waits if w is not None)
        message = limit_message(denying[0])
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
        would_deny=any(r.would_deny and r.mode == _SHADOW for r in limits)
        or any(s.would_deny and s.mode == _SHADOW for s in loops),
        reason=reason,
        loop_guards=loops,
        stop=stop,
    )


def _past_call_cap(
    applied: Sequence[Applied], calls: Sequence[int | None], mode: str, this_call: int
) -> int | None:
    """The first budget of `mode` whose entity had made its calls before this one
    (`calls` counts this call too when `this_call` is 1), or None."""
    return next(
        (
            i
            for i, a in enumerate(applied)
            if (cap := a.budget.limit_calls) is not None
            and a.mode == mode
            and (n := calls[i]) is not None
            and n - this_call >= cap
        ),
        None,
    )


def _retry_of(a: Applied, now: int) -> int | None:
    """A spent budget admits again when its window ends; a period-total one never does."""
    if a.budget.period is _TOTAL:
        return None
    return a.window_end_ms - now


def _limit_wait(r: RateLimitState) -> int | None:
    """When a denying limit admits again: its figure, a slot's hint for a concurrency limit
    (-1: when some reservation ends), or None for -1 of any other (never: the call is larger
    than the limit ever admits)."""
    if r.retry_after_ms >= 0:
        return r.retry_after_ms
    return _SLOT_RETRY_MS if r.metric == _CONCURRENT else None


def budget_state(
    a: Applied,
    used: int,
    held: int,
    calls: int | None = None,
    window: Any = None,
    now: int | None = None,
) -> BudgetState:
    """`calls`: the budget's calls in the period, reported when it caps them; with its
    recent-spend window and the clock (decisions, statuses), its forecast too (none for a
    period-total budget, which has no period end, or one that caps calls only)."""
    b = a.budget
    limit = b.limit_micro
    committed = used + held
    cap = b.limit_calls
    forecast_usd = exhausted_at = None
    if limit < UNCAPPED_MICRO:  # b.capped_usd, without the property's call
        if now is not None and b.period is not _TOTAL:
            f_micro, f_at = forecast(
                used, held, limit, parse_window(window), a.window_start_ms, a.window_end_ms, now
            )
            forecast_usd = f_micro / MICRO
            exhausted_at = None if f_at is None else iso(f_at)
        # micro_to_usd inline (micro / MICRO): four calls per budget per decision cost
        # 0.6 us of a 15.5 us in-process authorize.
        limit_usd: float | None = limit / MICRO
        remaining_usd: float | None = (limit - committed) / MICRO
        pct = percentage(committed, limit)
        exceeded = committed >= limit if limit else committed > 0
    else:  # calls only: the percentage and `exceeded` are the calls'
        limit_usd = remaining_usd = None
        n = calls or 0
        pct, exceeded = percentage(n, cap or 0), n >= (cap or 0)
    # Positional, in BudgetState's field order: budget_id, budget_name, scope, entity,
    # period, on_exceed, limit_usd, used_usd, held_usd, remaining_usd, percentage,
    # exceeded, calls, limit_calls, forecast_usd, exhausted_at.
    return BudgetState(
        b.id,
        b.name,
        b.scope,
        a.entity,
        b.period,
        b.on_exceed,
        limit_usd,
        used / MICRO,
        held / MICRO,
        remaining_usd,
        pct,
        exceeded,
        calls if cap is not None else None,
        cap,
        forecast_usd,
        exhausted_at,
    )


def budget_status(
    a: Applied, used: int, held: int, window: Any, calls: int, now: int
) -> BudgetStatus:
    s = budget_state(a, used, held, calls, window, now)
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
        # A period-total counter has no calendar window.
        period_start=None if a.budget.period is _TOTAL else iso(a.window_start_ms),
        period_end=None if a.budget.period is _TOTAL else iso(a.window_end_ms),
        calls=s.calls,
        limit_calls=s.limit_calls,
        forecast_usd=s.forecast_usd,
        exhausted_at=s.exhausted_at,
    )


def settle_result(
    snap: Snapshot, rid: str, reply: list[Any], unpriced_field: str, lost_at: str | None = None
) -> SettleResult:
    """`lost_at`: when this sidecar last saw Redis lose its state (sidecar.state_loss)."""
    status = int(str(reply[0]))
    if status == 0:
        detail = f"no reservation {rid!r}"
        if lost_at is not None:
            detail += (
                f" (the budget store lost its state at {lost_at}: a hold made before then"
                " is gone with it, and nothing was charged for it)"
            )
        raise RequestError("reservation_id", detail, status=404)
    state = "settled" if reply[1] == "S" else "released"
    cost, est = int(str(reply[2])), int(str(reply[3]))
    cids = str(reply[5]).split(",") if reply[5] else []
    provider, model = unmeta(str(reply[6]))
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
        replayed=status in (2, 4),  # 4: a first result this answer counts (see engine)
        provider=provider,
        model=model,
        tokens_in=tokens_in,
        tokens_out=tokens_out,
        budgets=states_of(snap, cids, values),
    )


def states_of(snap: Snapshot, cids: Sequence[str], values: Sequence[int]) -> list[BudgetState]:
    """Budget states of a reservation's counters, by the cids its record kept.

    A budget deleted since the hold is left out: it has no limit to report against.
    """
    states = []
    by_id = snap.by_id
    for i, cid in enumerate(cids):
        known = _APPLIED.get(cid)
        if known is not None and by_id.get(known.budget.id) is known.budget:
            a = known  # the same budget (not one a reload replaced), the same entity
        else:
            budget_id, entity, _window = keys.parse_counter_id(cid)
            budget = by_id.get(budget_id)
            if budget is None:
                continue
            a = Applied(budget, entity, cid, 0, 0, MODE[budget.on_exceed], None)
            if len(_APPLIED) >= _APPLIED_MAX:
                _APPLIED.clear()
            _APPLIED[cid] = a
        states.append(budget_state(a, values[2 * i], values[2 * i + 1]))
    return states


# A settle's counters, parsed once: the same few cids come back on call after call, and
# parsing one (split, unquote twice) and making its Applied cost more than the budget
# state itself. Bounded: emptied when full.
_APPLIED: dict[str, Applied] = {}
_APPLIED_MAX = 4096


def limit_state(applied: AppliedLimit, figures: list[int]) -> RateLimitState:
    would_deny, remaining, retry_ms = figures
    r = applied.limit
    limit: int | float = r.limit
    burst: int | float = r.burst
    left: int | float = max(remaining, 0)
    if r.metric is _USD:  # counted in USD_UNIT_MICRO units, shown in dollars
        unit = USD_UNIT_MICRO / MICRO
        limit, burst, left = r.limit * unit, r.burst * unit, round(left * unit, 3)
    # Positional (keyword arguments cost msgspec a name match each), in field order:
    # rate_limit_id, scope, entity, metric, limit, window_ms, burst, mode, remaining,
    # would_deny, retry_after_ms.
    return RateLimitState(
        r.id,
        r.scope,
        applied.entity,
        r.metric,
        limit,
        r.window_ms,
        burst,
        r.mode,
        left,
        would_deny == 1,
        retry_ms,
    )


def limit_message(state: RateLimitState) -> str:
    if state.metric == _CONCURRENT:
        return f"Rate limit '{state.rate_limit_id}' reached: {state.limit} calls in flight"
    per = f"{state.window_ms} ms"
    if state.metric == _USD:
        return f"Spend velocity '{state.rate_limit_id}' reached: ${state.limit:g} per {per}"
    return f"Rate limit '{state.rate_limit_id}' reached: {state.limit} {state.metric} per {per}"


def stop_state(field: str, value: str, left: str) -> tuple[StopState, int | None] | None:
    """The stop in force the script found (its stops-hash field, value, and the ms left
    until its expiry on the stops' clock, Redis's: '' never), and those ms (None: never).
    Not its expires_at minus this replica's clock, which is off by the replica's skew."""
    if not field:
        return None
    scope, entity = keys.parse_stop_field(field.removeprefix("s:"))
    stop_id, expires, _created, reason = (*value.split("|", 3), "", "", "")[:4]
    expires_ms = int(expires) if expires.isdigit() and int(expires) > 0 else None
    state = StopState(
        stop_id=stop_id,
        scope=scope,
        entity=entity,
        reason=reason,
        expires_at=iso(expires_ms) if expires_ms is not None else None,
    )
    return state, int(left) if left.isdigit() else None


def stop_message(stop: StopState) -> str:
    return f"Stopped: {stop.reason} (stop {stop.stop_id} on {stop.scope} {stop.entity})"


def loop_state(loop: AppliedLoop, figures: list[int]) -> LoopGuardState:
    would_deny, calls = figures
    g = loop.guard
    # Positional, in field order: loop_guard_id, scope, entity, repeats, window_ms, mode,
    # calls, would_deny.
    return LoopGuardState(
        g.id, g.scope, loop.entity, g.repeats, g.window_ms, g.mode, calls, would_deny == 1
    )


def loop_message(state: LoopGuardState) -> str:
    return (
        f"Loop guard '{state.loop_guard_id}': the same call {state.calls} times within "
        f"{state.window_ms} ms for {state.scope} {state.entity} - requests blocked"
    )


def binding_info(state: BudgetState, budget: Budget, action: Action) -> BudgetInfo:
    """The binding budget; `exceeded` is true when this call would pass its limit."""
    return BudgetInfo(
        budget_id=state.budget_id,
        budget_name=state.budget_name,
        used_usd=state.used_usd,
        limit_usd=state.limit_usd if state.limit_usd is not None else 0.0,
        percentage=state.percentage,
        exceeded=state.exceeded or action is not _ALLOW,
        action=budget.on_exceed,
    )


def binding_message(
    action: Action,
    applied: Sequence[Applied],
    binding: int | None,
    values: Sequence[int],
    est: int,
) -> str | None:
    """What binds, in words: "exceeded" only when the budget is truly spent; otherwise the
    estimate against what is left."""
    if binding is None or action is _ALLOW:
        return None
    b = applied[binding].budget
    if action is _BLOCK:
        outcome = "requests blocked"
    elif action is _DOWNGRADE:
        outcome = f"downgraded to {applied[binding].downgrade_model}"
    else:
        outcome = "warning"
    left = b.limit_micro - values[2 * binding] - values[2 * binding + 1]
    if left <= 0:
        return f"Budget '{b.name}' exceeded - {outcome}"
    return f"Estimate {usd(est)} exceeds the {usd(left)} left on '{b.name}' - {outcome}"


def usd(micro: int) -> str:
    """$9.00, $0.0042: cents always, then as many micro-dollar digits as there are."""
    whole = f"{micro / MICRO:.6f}".rstrip("0")
    return f"${whole}{'0' * max(0, 2 - len(whole.partition('.')[2]))}"
