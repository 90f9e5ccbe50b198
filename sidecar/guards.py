"""The runaway guards as decisions report them: which guard bound a decision, for the
metrics and the log.

The guards themselves are evaluated inside the decision's script (lua/authorize.lua,
lua/_lib.lua): per-run and call caps are budgets (`period: total`, `limit_calls`), spend
velocity is a rate limit of metric usd, loop guards and the stop switch have their own
sections. A trip is alerted once per entity by the script (the alerts stream); here it is
counted per decision (budget_sidecar_guard_decisions_total) and logged once a minute per
guard and entity.
"""

from __future__ import annotations

import logging
import time

from sidecar.model import LimitMode, Metric
from sidecar.schemas import Decision

# Decision.reason values that name a runaway guard (the others: "budget", "rate_limit").
GUARD_REASONS = frozenset({"stop", "loop", "calls", "velocity"})

guard_log = logging.getLogger("sidecar.guard")
_LOG_EVERY_S = 60.0
_LOGGED_MAX = 10_000
_logged: dict[tuple[str, str, str], float] = {}


def guards_of(decision: Decision) -> list[tuple[str, str, str, str]]:
    """(kind, guard id, entity, mode) of each guard that denied this decision or, in mode
    shadow, would have."""
    out: list[tuple[str, str, str, str]] = []
    enforce = LimitMode.ENFORCE.value
    if decision.stop is not None and not decision.allowed:
        out.append(("stop", decision.stop.stop_id, decision.stop.entity, enforce))
    for loop in decision.loop_guards:
        if loop.would_deny:
            out.append(("loop", loop.loop_guard_id, loop.entity, str(loop.mode)))
    if decision.reason == "calls" and decision.budget_info is not None:
        bid = decision.budget_info.budget_id
        entity = next((b.entity for b in decision.budgets if b.budget_id == bid), "")
        out.append(("calls", bid, entity, enforce))
    for limit in decision.rate_limits:
        if limit.would_deny and limit.metric == Metric.USD:
            out.append(("velocity", limit.rate_limit_id, limit.entity, str(limit.mode)))
    return out


def log_trip(kind: str, guard_id: str, entity: str) -> None:
    """One line per guard and entity a minute while it keeps denying (a runaway loop makes
    thousands of denials a second; the alert stream has the trip itself)."""
    key = (kind, guard_id, entity)
    now = time.monotonic()
    last = _logged.get(key)
    if last is not None and now - last < _LOG_EVERY_S:
        return
    if len(_logged) >= _LOGGED_MAX:
        _logged.clear()
    _logged[key] = now
    guard_log.warning(
        "guard denied a call",
        extra={"guard_kind": kind, "guard_id": guard_id, "entity": entity},
    )
