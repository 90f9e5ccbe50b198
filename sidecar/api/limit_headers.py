"""Retry-After and the IETF RateLimit header fields of a decision, for every HTTP surface.

The RateLimit fields follow draft-ietf-httpapi-ratelimit-headers-09:
`RateLimit-Policy: "<id>";q=<quota>[;w=<window s>]` and
`RateLimit: "<id>";r=<remaining>;t=<seconds to reset>`. A budget's quota is in micro-USD
(the draft's quota units are integers) and has no `w`: calendar periods have no fixed
length. A rate limit's quota is its own unit (requests, tokens, slots) over its window; a
spend velocity's is micro-USD too.
"""

from __future__ import annotations

from sidecar.schemas import Decision, RateLimitState


def seconds(ms: int) -> int:
    # Whole seconds, rounded up: retrying a second early would only be denied again.
    return max(1, -(-ms // 1000))


def _limit_fields(limit: RateLimitState, reset_s: int) -> dict[str, str]:
    window = f";w={limit.window_ms // 1000}" if limit.window_ms >= 1000 else ""
    quota, remaining = limit.limit + limit.burst, max(0, limit.remaining)
    if limit.metric == "usd":
        # A spend velocity's state is in dollars; the draft's q and r are integers (a
        # strict structured-field parser refuses "6000.0"): micro-USD, as for budgets.
        quota, remaining = round(quota * 1_000_000), round(remaining * 1_000_000)
    return {
        "RateLimit-Policy": f'"{limit.rate_limit_id}";q={quota}{window}',
        "RateLimit": f'"{limit.rate_limit_id}";r={remaining};t={reset_s}',
    }


def headers(decision: Decision) -> dict[str, str]:
    """Denied: Retry-After and the fields of what denied. Allowed: the RateLimit fields of
    the rate limit with the least left, if any applies."""
    if decision.allowed:
        limit = decision.rate_limit
        if limit is None:
            return {}
        reset_s = seconds(limit.window_ms) if limit.window_ms else 1
        return _limit_fields(limit, reset_s)
    retry_s = seconds(decision.retry_after_ms) if decision.retry_after_ms else 1
    # None: nothing admits it by waiting (a call larger than a limit ever admits, a spent
    # period-total budget, a stop with no end): no Retry-After, so that no client retries
    # every second for ever.
    out = {} if decision.retry_after_ms is None else {"Retry-After": str(retry_s)}
    limit, info = decision.rate_limit, decision.budget_info
    if limit is not None and limit.would_deny and limit.mode == "enforce":
        out.update(_limit_fields(limit, retry_s))
    elif info is not None:
        state = next((b for b in decision.budgets if b.budget_id == info.budget_id), None)
        if state is not None and state.limit_calls is not None and state.limit_usd is None:
            # A call cap: the quota is calls.
            quota, remaining = state.limit_calls, max(0, state.limit_calls - (state.calls or 0))
        else:
            left = state.remaining_usd if state is not None else None
            remaining = max(0, round(left * 1_000_000)) if left is not None else 0
            quota = round(info.limit_usd * 1_000_000)
        out["RateLimit-Policy"] = f'"{info.budget_id}";q={quota}'
        out["RateLimit"] = f'"{info.budget_id}";r={remaining};t={retry_s}'
    return out
