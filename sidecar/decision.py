"""Pure decision logic: from counter values to an action and a binding budget.

The block verdict itself is taken inside the Lua script (atomically with the hold); this
module reads the same numbers to say *why*: which budget binds, and whether the call
proceeds with a warning or a cheaper model. `over()` is the same rule as lua/_lib.lua.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from sidecar.model import Action, Budget, OnExceed


@dataclass(frozen=True, slots=True)
class Applied:
    """A budget as it applies to one decision: its counter for this entity and window."""

    budget: Budget
    entity: str
    cid: str
    window_start_ms: int
    window_end_ms: int
    # 'b' block, 'w' warn, 'd' downgrade: what the script enforces. A downgrade budget
    # with no cheaper model for the requested one is enforced as a block.
    mode: str
    downgrade_model: str | None
    # The budget's alert thresholds as the scripts take them ("50.80.100").
    thresholds: str = ""


# Enum members as module constants (an enum attribute lookup is ~900 instructions on 3.11).
_BLOCK, _ALLOW = Action.BLOCK, Action.ALLOW
_WARN_ON_EXCEED = OnExceed.WARN


def over(used: int, held: int, est: int, limit: int) -> bool:
    """Would adding `est` pass the limit? A zero estimate asks whether anything is left."""
    if est == 0:
        return used + held >= limit
    return used + held + est > limit


def percentage(committed: int, limit: int) -> float:
    if limit <= 0:
        return 100.0 if committed > 0 else 0.0
    return round(committed * 100 / limit, 4)


class Outcome(NamedTuple):
    # A tuple, not a frozen dataclass: one is made per decision, and a frozen
    # dataclass's __init__ sets each field through object.__setattr__.
    action: Action
    binding: int | None  # index into the applied budgets
    downgrade_model: str | None


def decide(
    applied: Sequence[Applied],
    values: Sequence[int],
    est: int,
    allowed: bool,
    est_down: int | None = None,
) -> Outcome:
    """The action and binding budget, given counters *before* this estimate.

    Denied: the first block budget the estimate would pass, else the first downgrade budget
    the estimate would pass (the call re-priced for the cheaper model, `est_down`, did not
    fit or could not be priced: blocked). Allowed: a downgrade budget passed wins over a
    warn budget passed; otherwise the budget closest to its limit binds.
    """
    downgrade = warn = None
    closest, closest_ratio = None, -1.0
    for i, a in enumerate(applied):
        committed = values[2 * i] + values[2 * i + 1]
        b = a.budget
        limit = b.limit_micro
        # over(committed, 0, est, limit), inline: this loop runs for every budget of
        # every decision.
        if committed + est > limit if est else committed >= limit:
            if a.mode == "b" and not allowed:
                return Outcome(_BLOCK, i, None)
            if a.mode == "d" and downgrade is None:
                downgrade = i
            elif b.on_exceed is _WARN_ON_EXCEED and warn is None:
                warn = i
        # The ratio, not the rounded percentage: the same order, without round().
        ratio = (committed + est) / limit if limit > 0 else float(committed + est > 0)
        if ratio > closest_ratio:
            closest, closest_ratio = i, ratio
    if not allowed and downgrade is not None:
        # The budget the downgraded estimate did not fit (the downgrade budget itself when
        # the call could not be re-priced); if it fitted, a rate limit denied.
        if est_down is None:
            return Outcome(Action.BLOCK, downgrade, None)
        for i, a in enumerate(applied):
            committed = values[2 * i] + values[2 * i + 1]
            if a.mode != "w" and over(committed, 0, est_down, a.budget.limit_micro):
                return Outcome(Action.BLOCK, i, None)
    if downgrade is not None:
        return Outcome(Action.DOWNGRADE, downgrade, applied[downgrade].downgrade_model)
    if warn is not None:
        return Outcome(Action.WARN, warn, None)
    return Outcome(_ALLOW, closest, None)
