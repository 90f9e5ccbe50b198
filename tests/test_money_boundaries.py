"""Money, tokens and counters at their boundaries, on a real Redis (in-process app).

Every amount is exact or refused: a limit at the largest accepted value still holds to the
micro-USD (a call of exactly what is left passes, one micro-USD more is denied), values past
the bounds are a 400 problem+json naming the field (a config file: a ConfigError naming the
file and the field), and a nonzero amount never becomes $0 by rounding. Lua's numbers are
doubles: the bounds keep every counter, debt and product below 2^53.

By design (asserted where useful, not "fixed"): settings.min_estimate_usd floors a hold at
$0.01 by default; the admin API needs limit_usd > 0 (the AxonFlow SDK's contract); a JSON
number such as 1e400 is out of range -> 400.
"""

from __future__ import annotations

import json
from decimal import Decimal
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient

from sidecar import config as config_mod
from sidecar.clock import FakeClock
from sidecar.money import charge_to_micro, cost_micro, price_to_pico, usd_to_micro
from tests.conftest import ClientFactory
from tests.test_bad_input import snapshot

MAX_LIMIT_USD = 1_000_000_000  # the largest limit_usd a config or the admin API accepts
MAX_TOKENS = 100_000_000  # the most tokens one request may name, in or out
# $1000 per 1k tokens, the highest price accepted: $1 (10^6 micro-USD) per token.
MAX_PRICE = {"provider": "p", "model": "max", "input_per_1k": 1000, "output_per_1k": 1000}
# The cheapest model's price the money module names: 37,500 pico-USD per token.
CHEAP_PRICE = {"provider": "p", "model": "cheap", "input_per_1k": 0.0000375,
               "output_per_1k": 0.0000375}  # fmt: skip
FLOOR_1_MICRO = {"min_estimate_usd": 0.000001}


def micro(usd: float) -> int:
    """A JSON dollar amount back to micro-USD, exactly (its shortest repr, as sent)."""
    return int(Decimal(repr(usd)) * 1_000_000)


def budget(limit_usd: float, period: str = "yearly", **kw: Any) -> dict[str, Any]:
    return {"id": "cap", "name": "Cap", "scope": "organization", "limit_usd": limit_usd,
            "period": period, **kw}  # fmt: skip


async def post(c: TestClient[Any, Any], path: str, body: Any) -> dict[str, Any]:
    """POST a body, assert 200 (a denial is a 200 decision too), return the JSON."""
    resp = await c.post(path, json=body)
    text = await resp.text()
    assert resp.status == 200, text
    answer: dict[str, Any] = json.loads(text)
    return answer


async def refused(c: TestClient[Any, Any], method: str, path: str, body: Any, field: str) -> str:
    data = body if isinstance(body, str) else json.dumps(body)
    resp = await c.request(method, path, data=data, headers={"Content-Type": "application/json"})
    text = await resp.text()
    assert resp.status == HTTPStatus.BAD_REQUEST, text
    assert resp.content_type == "application/problem+json", text
    assert "Traceback" not in text
    problem = json.loads(text)
    assert problem["field"] == field, problem
    return str(problem["detail"])


async def status_of(c: TestClient[Any, Any], budget_id: str = "cap") -> dict[str, Any]:
    resp = await c.get(f"/v1/budgets/{budget_id}/status")
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


# ---- 1. the largest limit holds to the micro-USD -----------------------------------------


async def test_the_largest_limit_admits_exactly_what_is_left_and_not_a_micro_more(
    make_client: ClientFactory,
) -> None:
    """$10^9 (10^15 micro-USD, below 2^53): spend it to $1 short with the largest
    per-call costs (10^8 tokens in and out at $1000 per 1k: $2 x 10^8 a call), then to one
    micro-USD short; a hold of exactly one micro-USD passes, two are denied, and a second
    one-micro hold (the first is committed) is denied too."""
    c = await make_client({"budgets": [budget(MAX_LIMIT_USD)], "pricing": [MAX_PRICE],
                           "settings": FLOOR_1_MICRO})  # fmt: skip
    call = {"provider": "p", "model": "max", "tokens_in": MAX_TOKENS, "tokens_out": MAX_TOKENS}
    for _ in range(4):
        body = await post(c, "/v1/record", call)
        assert micro(body["cost_usd"]) == 2 * 10**14
    body = await post(c, "/v1/record", {**call, "tokens_out": MAX_TOKENS - 1})
    assert micro(body["cost_usd"]) == 2 * 10**14 - 10**6
    await post(c, "/v1/record", {"cost_usd": 0.999999})
    state = await status_of(c)
    assert micro(state["used_usd"]) == 10**15 - 1 and micro(state["limit_usd"]) == 10**15
    assert micro(state["remaining_usd"]) == 1 and not state["exceeded"]

    denied = await post(c, "/v1/authorize", {"estimated_usd": 0.000002})
    assert denied["allowed"] is False and denied["reason"] == "budget"
    check = await post(c, "/v1/check", {"estimated_usd": 0.000001})
    assert check["allowed"] is True
    allowed = await post(c, "/v1/authorize", {"estimated_usd": 0.000001})
    assert allowed["allowed"] is True
    assert micro(allowed["estimated_usd"]) == 1
    again = await post(c, "/v1/authorize", {"estimated_usd": 0.000001})
    assert again["allowed"] is False
    state = await status_of(c)
    assert micro(state["used_usd"]) + micro(state["held_usd"]) == 10**15
    assert micro(state["remaining_usd"]) == 0


async def test_the_largest_limit_through_the_admin_api_and_one_micro_more(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    c = await make_client({"settings": FLOOR_1_MICRO})
    new = {"id": "api", "name": "API", "scope": "organization", "limit_usd": MAX_LIMIT_USD,
           "period": "total", "on_exceed": "block", "alert_thresholds": []}  # fmt: skip
    before = snapshot(redis_client)
    for bad in (MAX_LIMIT_USD + 0.000001, 1e10, 1e308, 0, -1, 0.0000005, "1", True, None):
        await refused(c, "POST", "/api/v1/budgets", {**new, "limit_usd": bad}, "limit_usd")
    await refused(c, "POST", "/api/v1/budgets", json.dumps(new).replace(
        str(MAX_LIMIT_USD), "1e400"), "limit_usd")  # fmt: skip
    assert snapshot(redis_client) == before  # refused: nothing written
    resp = await c.post("/api/v1/budgets", json=new)
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["limit_usd"] == MAX_LIMIT_USD
    await refused(c, "PUT", "/api/v1/budgets/api", {"limit_usd": MAX_LIMIT_USD + 1}, "limit_usd")
    body = await post(c, "/v1/authorize", {"estimated_usd": 1_000_000})
    assert body["allowed"] is True
    assert micro(body["budgets"][0]["remaining_usd"]) == 10**15 - 10**12


def test_a_config_limit_past_the_largest_refuses_to_load_naming_file_and_field(
    write_config: Any,
) -> None:
    ok = config_mod.load(write_config({"budgets": [budget(MAX_LIMIT_USD)]}))
    assert ok.budgets[0].limit_micro == 10**15
    for bad in (MAX_LIMIT_USD + 1, 1e16, 2.0**53, 1e308):
        path: Path = write_config({"budgets": [budget(bad)]})
        with pytest.raises(config_mod.ConfigError) as err:
            config_mod.load(path)
        assert err.value.source == str(path) and err.value.path == "$.budgets[0].limit_usd"


async def test_amounts_past_their_bounds_are_400_naming_the_field(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """estimated_usd and cost_usd: at most $10^6 a call; tokens: integers 0..10^8."""
    c = await make_client({"budgets": [budget(100)], "pricing": [MAX_PRICE],
                           "settings": FLOOR_1_MICRO})  # fmt: skip
    hold = await post(c, "/v1/authorize", {"estimated_usd": 0.01})
    rid = hold["reservation_id"]
    before = snapshot(redis_client)
    for bad in (1_000_000.000001, 2**53, 2**63, 2**64, 10**30, -0.000001, "1", True):
        await refused(c, "POST", "/v1/authorize", {"estimated_usd": bad}, "estimated_usd")
        await refused(c, "POST", "/v1/settle", {"reservation_id": rid, "cost_usd": bad}, "cost_usd")
        await refused(c, "POST", "/v1/record", {"cost_usd": bad}, "cost_usd")
    await refused(c, "POST", "/v1/authorize", '{"estimated_usd": 1e400}', "estimated_usd")
    priced = {"provider": "p", "model": "max"}
    for bad in (MAX_TOKENS + 1, 2**31, 2**53, 2**63, 2**64, -1, 1.5, 1e8, "5", True):
        for field in ("estimated_tokens_in", "estimated_tokens_out"):
            await refused(c, "POST", "/v1/authorize", {**priced, field: bad}, field)
        for field in ("tokens_in", "tokens_out"):
            await refused(c, "POST", "/v1/settle", {"reservation_id": rid, field: bad}, field)
            await refused(c, "POST", "/v1/record", {**priced, field: bad}, field)
    assert snapshot(redis_client) == before


async def test_token_counts_at_their_edges_price_exactly(make_client: ClientFactory) -> None:
    """0, 1 and 10^8 tokens at the highest price: the hold, the settle and the record all
    charge tokens x $1 exactly (Python prices the estimate, Lua the settle)."""
    c = await make_client({"pricing": [MAX_PRICE], "settings": FLOOR_1_MICRO})
    for tokens in (0, 1, MAX_TOKENS):
        asked = {"estimated_tokens_in": tokens, "estimated_tokens_out": tokens}
        d = await post(c, "/v1/authorize", {"provider": "p", "model": "max", **asked})
        assert d["allowed"]
        # Zero tokens price at $0: the floor (one micro-USD here) is held instead.
        assert micro(d["estimated_usd"]) == max(2 * tokens * 10**6, 1)
        s = await post(c, "/v1/settle", {"reservation_id": d["reservation_id"],
                             "tokens_in": tokens, "tokens_out": tokens})  # fmt: skip
        assert micro(s["cost_usd"]) == 2 * tokens * 10**6
        assert s["tokens_in"] == tokens and s["tokens_out"] == tokens


# ---- sub-micro amounts: never $0 by rounding -------------------------------------------


async def test_a_charge_below_a_micro_usd_is_charged_one_not_zero(
    make_client: ClientFactory,
) -> None:
    """A cost or estimate given in dollars rounds UP to the micro-USD, as a cost priced from
    tokens does (money.cost_micro): $0.0000004 of real spend is charged $0.000001, never $0
    (a million such calls would otherwise pass any cap uncounted), and $0.0000014 is two."""
    c = await make_client({"budgets": [budget(1, period="total")], "settings": FLOOR_1_MICRO})
    body = await post(c, "/v1/record", {"cost_usd": 0.0000004})
    assert micro(body["cost_usd"]) == 1
    d = await post(c, "/v1/authorize", {"estimated_usd": 0.0000014})
    assert d["allowed"] and micro(d["estimated_usd"]) == 2
    s = await post(c, "/v1/settle", {"reservation_id": d["reservation_id"],
                                           "cost_usd": 0.0000014})  # fmt: skip
    assert micro(s["cost_usd"]) == 2
    # Exact amounts are unchanged by the rule: six decimals stay what they are.
    body = await post(c, "/v1/record", {"cost_usd": 0.000003})
    assert micro(body["cost_usd"]) == 3
    state = await status_of(c)
    assert micro(state["used_usd"]) == 1 + 2 + 3


def test_a_nonzero_limit_or_price_that_would_round_to_zero_is_refused() -> None:
    """$0.0000001 would be stored as a $0 limit (every call denied) and $10^-12 per 1k as
    a free model: refused, naming the field. $0 itself stays valid for both (a frozen
    budget, a free model)."""
    for bad in (0.0000001, 0.00000049):
        with pytest.raises(config_mod.ConfigError) as err:
            config_mod.parse({"budgets": [budget(bad)]}, "f.yaml")
        assert err.value.path == "$.budgets[0].limit_usd", err.value
    assert config_mod.parse({"budgets": [budget(0)]}, "f.yaml").budgets[0].limit_micro == 0
    price = {"provider": "p", "model": "m", "input_per_1k": 0.0, "output_per_1k": 0.0}
    for field in ("input_per_1k", "output_per_1k"):
        with pytest.raises(config_mod.ConfigError) as err:
            config_mod.parse({"pricing": [{**price, field: 1e-12}]}, "f.yaml")
        assert err.value.path == f"$.pricing[0].{field}", err.value
        with pytest.raises(config_mod.ConfigError) as err:
            config_mod.parse({"settings": {"unpriced_model": "fallback", "fallback_price": {
                "input_per_1k": 0, "output_per_1k": 0, field: 4e-10}}}, "f.yaml")  # fmt: skip
        assert err.value.path == f"$.settings.fallback_price.{field}", err.value
    free = config_mod.parse({"pricing": [price]}, "f.yaml").pricing[0]
    assert free.input_pico == 0 and free.output_pico == 0
    # One pico-USD per token, the finest price kept, is exact.
    assert price_to_pico(0.000000001) == 1


async def test_a_price_that_would_round_to_free_is_400_through_the_admin_api(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    c = await make_client({})
    before = snapshot(redis_client)
    for field in ("input_per_1k", "output_per_1k"):
        prices = {"input_per_1k": 0.001, "output_per_1k": 0.001, field: 1e-12}
        body = {"provider": "q", "model": "m", "pricing": prices}
        await refused(c, "PUT", "/api/v1/pricing", body, f"pricing.{field}")
    assert snapshot(redis_client) == before


# ---- 2./3. rate limits at their longest and shortest windows ----------------------------

DAY_MS = 86_400_000


def rate(metric: str, limit: float, window: str | None, **kw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": "r", "scope": "organization", "metric": metric, "limit": limit}
    return {**doc, **({"window": window} if window else {}), **kw}


def test_windows_past_the_accepted_range_are_refused_naming_the_field() -> None:
    """Windows run from 100ms to 1d; `1y` and `365d` are refused (a limiter's debt,
    limit x window, must stay an exact integer in Lua), as is a limit whose
    (limit + 2 x burst) x window passes 10^15."""
    for window in ("1y", "365d", "86400001ms", "99ms", "0s", "99999999999999999999d", "-1s"):
        with pytest.raises(config_mod.ConfigError) as err:
            config_mod.parse({"rate_limits": [rate("requests", 10, window)]}, "f.yaml")
        assert err.value.path == "$.rate_limits[0].window", err.value
    largest = 10**15 // DAY_MS  # 11,574,074 requests a day
    ok = config_mod.parse({"rate_limits": [rate("requests", largest, "1d")]}, "f.yaml")
    assert ok.rate_limits[0].limit * ok.rate_limits[0].window_ms <= 10**15 < 2**53
    for doc in (rate("requests", largest + 1, "1d"), rate("tokens", 10**9, "1d"),
                rate("usd", 1_000_000_000, "1d")):  # fmt: skip
        with pytest.raises(config_mod.ConfigError) as err:
            config_mod.parse({"rate_limits": [doc]}, "f.yaml")
        assert err.value.path == "$.rate_limits[0].limit", err.value
    # The smallest usd limit is a thousandth of a dollar (its counting unit); less is refused.
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.parse({"rate_limits": [rate("usd", 0.000001, "1s")]}, "f.yaml")
    assert err.value.path == "$.rate_limits[0].limit"


async def test_a_one_day_request_limit_counts_exactly_and_reopens_on_the_millisecond(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """100 a day with burst 99: 100 pass at once, the 101st is told to wait exactly
    864,000 ms (a day / 100), is still denied a millisecond before, admitted at it."""
    c = await make_client({"rate_limits": [rate("requests", 100, "1d", burst=99)],
                           "settings": FLOOR_1_MICRO})  # fmt: skip
    allowed = 0
    for _ in range(100):
        d = await post(c, "/v1/authorize", {"estimated_usd": 0.000001})
        allowed += d["allowed"]
    assert allowed == 100
    d = await post(c, "/v1/authorize", {"estimated_usd": 0.000001})
    assert d["allowed"] is False and d["retry_after_ms"] == DAY_MS // 100
    clock.advance(DAY_MS // 100 - 1)
    d = await post(c, "/v1/authorize", {"estimated_usd": 0.000001})
    assert d["allowed"] is False and d["retry_after_ms"] == 1
    clock.advance(1)
    results = [(await post(c, "/v1/authorize", {"estimated_usd": 0.000001}))["allowed"]
               for _ in range(2)]  # fmt: skip
    assert results == [True, False]


async def test_the_shortest_window_and_the_largest_token_calls(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """10^8 tokens a minute: a call of 2 x 10^8 tokens is larger than the limiter ever
    admits (denied, retry -1: not by waiting); one of exactly 10^8 passes and the next waits
    exactly the window. A 100ms window of 1 request reopens after exactly 100 ms."""
    c = await make_client({"rate_limits": [
        rate("tokens", MAX_TOKENS, "1m"),
        {**rate("requests", 1, "100ms"), "id": "fast", "scope": "agent", "scope_id": "a"},
    ], "pricing": [MAX_PRICE], "settings": FLOOR_1_MICRO})  # fmt: skip
    fast = {"agent_id": "a", "estimated_usd": 0.000001}
    assert (await post(c, "/v1/authorize", fast))["allowed"] is True
    d0 = await post(c, "/v1/authorize", fast)
    assert d0["allowed"] is False and d0["retry_after_ms"] == 100
    clock.advance(100)
    assert (await post(c, "/v1/authorize", fast))["allowed"] is True
    call = {"provider": "p", "model": "max", "estimated_tokens_in": MAX_TOKENS}
    d = await post(c, "/v1/authorize", {**call, "estimated_tokens_out": MAX_TOKENS})
    assert d["allowed"] is False and d["reason"] == "rate_limit"
    assert d["rate_limit"]["retry_after_ms"] == -1  # the limiter's own: never by waiting
    assert d["retry_after_ms"] is None  # and so the decision's (it said 1000: retry in 1 s)
    resp = await c.post("/v1/authorize", json={**call, "estimated_tokens_out": MAX_TOKENS})
    assert resp.status == 200 and "Retry-After" not in resp.headers, resp.headers
    assert "RateLimit" in resp.headers  # what denied is still named
    d = await post(c, "/v1/authorize", call)
    assert d["allowed"] is True, d
    d2 = await post(c, "/v1/authorize", {**call, "estimated_tokens_in": 1})
    assert d2["allowed"] is False and d2["retry_after_ms"] == 60_000
    # The settle says the call used 10^8 more tokens than held (out): the debt grows by
    # exactly 10^8 x window, so the wait is another minute, not an overflowed number.
    s = await post(c, "/v1/settle", {"reservation_id": d["reservation_id"],
                         "tokens_in": MAX_TOKENS, "tokens_out": MAX_TOKENS})  # fmt: skip
    assert micro(s["cost_usd"]) == 2 * MAX_TOKENS * 10**6
    d3 = await post(c, "/v1/authorize", {**call, "estimated_tokens_in": 1})
    assert d3["allowed"] is False and d3["retry_after_ms"] == 120_000
    clock.advance(120_000)
    d4 = await post(c, "/v1/authorize", {**call, "estimated_tokens_in": 1})
    assert d4["allowed"] is True


async def test_usd_velocity_limits_at_their_smallest_and_largest(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    """$0.001 a second (the smallest): a one-micro-USD call costs the limiter a whole
    $0.001 unit (rounded up: it never admits more dollars than it says), and burst (the
    most admitted at once, default the limit) is that one unit: one call passes, the next
    waits exactly the window. $10^9 per 100ms (the largest a 100ms window takes): a $10^6
    call passes and the figures stay exact."""
    c = await make_client({"rate_limits": [
        {**rate("usd", 0.001, "1s"), "scope": "agent", "scope_id": "tiny"},
        {**rate("usd", 1_000_000_000, "100ms"), "id": "huge", "scope": "agent",
         "scope_id": "huge"},
    ], "settings": FLOOR_1_MICRO})  # fmt: skip
    tiny = {"agent_id": "tiny", "estimated_usd": 0.000001}
    assert (await post(c, "/v1/authorize", tiny))["allowed"] is True
    d = await post(c, "/v1/authorize", tiny)
    assert d["allowed"] is False and d["reason"] == "velocity" and d["retry_after_ms"] == 1000
    clock.advance(999)
    assert (await post(c, "/v1/authorize", tiny))["allowed"] is False
    clock.advance(1)
    assert (await post(c, "/v1/authorize", tiny))["allowed"] is True
    d = await post(c, "/v1/authorize", {"agent_id": "huge", "estimated_usd": 1_000_000})
    assert d["allowed"] is True
    limit = d["rate_limit"]
    assert limit["limit"] == 1_000_000_000 and limit["remaining"] == 1_000_000_000 - 1_000_000


# ---- 4. a thousand micro-USD settles ----------------------------------------------------


async def test_a_thousand_one_micro_settles_fill_a_tenth_cent_budget_exactly(
    make_client: ClientFactory,
) -> None:
    """Period total, $0.001: 1,000 holds of one micro-USD each settled at $0.000001; the
    1,000th hold is exactly what is left (allowed), the 1,001st denied. Status, the usage
    summary and the ledger's records all say exactly $0.001 and 1,000 calls."""
    c = await make_client({"budgets": [budget(0.001, period="total")],
                           "settings": {**FLOOR_1_MICRO, "usage_max_records": 2000}})  # fmt: skip
    for n in range(1000):
        d = await post(c, "/v1/authorize", {"estimated_usd": 0.000001})
        assert d["allowed"], (n, d)
        s = await post(c, "/v1/settle", {"reservation_id": d["reservation_id"],
                                               "cost_usd": 0.000001})  # fmt: skip
        assert micro(s["cost_usd"]) == 1
    d = await post(c, "/v1/authorize", {"estimated_usd": 0.000001})
    assert d["allowed"] is False and d["reason"] == "budget"
    state = await status_of(c)
    assert state["used_usd"] == 0.001 and state["held_usd"] == 0.0
    assert state["remaining_usd"] == 0.0 and state["exceeded"] is True
    resp = await c.get("/api/v1/usage", params={"period": "monthly"})
    usage = await resp.json()
    assert usage["total_cost_usd"] == 0.001 and usage["total_requests"] == 1000
    assert usage["average_cost_per_request"] == 0.000001


async def test_per_token_pico_prices_round_the_same_at_hold_settle_and_ledger(
    make_client: ClientFactory,
) -> None:
    """At 37,500 pico-USD a token each call rounds up to the micro-USD on its own (never
    under-charged): one token costs $0.000001, 26,667 tokens $0.001001 (1,000,012,500
    pico). The hold priced in Python, the settle priced in Lua and the usage aggregates
    carry the same figure."""
    pico = price_to_pico(0.0000375)
    assert pico == 37_500
    c = await make_client({"pricing": [CHEAP_PRICE], "settings": FLOOR_1_MICRO})
    total = 0
    for tokens in (1, 26_667, 3, MAX_TOKENS):
        expected = cost_micro(tokens, pico)
        d = await post(c, "/v1/authorize", {"provider": "p", "model": "cheap",
                                                  "estimated_tokens_in": tokens})  # fmt: skip
        assert micro(d["estimated_usd"]) == expected
        s = await post(c, "/v1/settle", {"reservation_id": d["reservation_id"],
                                               "tokens_in": tokens, "tokens_out": 0})  # fmt: skip
        assert micro(s["cost_usd"]) == expected, (tokens, s)
        total += expected
    assert [cost_micro(t, pico) for t in (1, 26_667, 3, MAX_TOKENS)] == [1, 1001, 1, 3_750_000]
    resp = await c.get("/api/v1/usage", params={"period": "monthly"})
    usage = await resp.json()
    assert micro(usage["total_cost_usd"]) == total
    assert usage["total_tokens_in"] == 1 + 26_667 + 3 + MAX_TOKENS


def test_charges_round_up_but_float_noise_costs_nothing() -> None:
    """charge_to_micro rounds a real fraction of a micro-USD up and ignores the noise of a
    double's shortest repr (below a nano-USD), at both ends of the accepted range."""
    assert charge_to_micro(0.1 + 0.2) == 300_000  # 0.30000000000000004
    assert charge_to_micro(999_999.9 + 2**-33) == 999_999_900_000  # one ulp of noise
    assert charge_to_micro(1_000_000) == 10**12
    assert charge_to_micro(0.0000004) == 1 and charge_to_micro(0.0000014) == 2
    assert charge_to_micro(0.000001001) == 2  # a nano-USD past one micro: a real fraction
    assert charge_to_micro(0.0000010001) == 1  # a tenth of a nano-USD past: noise
    assert charge_to_micro(0) == 0 and charge_to_micro(-0.0) == 0
    # Limits keep rounding half up (rounding a cap up would raise it).
    assert usd_to_micro(0.0000014) == 1


# ---- 5. leases, stops and thresholds at their edges ------------------------------------


async def test_lease_stop_ttl_and_threshold_edges(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """lease_ms 100..settings.max_lease_ms, a stop's ttl_s 1..30 days, thresholds 1..1000
    percent (above 100: an alert past the cap); past either end a 400 naming the field."""
    c = await make_client({"settings": {**FLOOR_1_MICRO, "max_lease_ms": 86_400_000}})
    for lease in (100, 86_400_000):
        assert (await post(c, "/v1/authorize", {"estimated_usd": 0.01, "lease_ms": lease}))[
            "allowed"
        ]
    before = snapshot(redis_client)
    for lease in (0, 99, 86_400_001, 2**63, -1, 1.5):
        await refused(c, "POST", "/v1/authorize", {"estimated_usd": 0.01, "lease_ms": lease},
                      "lease_ms")  # fmt: skip
    stop = {"scope": "agent", "scope_id": "a", "reason": "r"}
    for ttl in (0, 30 * 86_400 + 1, 2**63, -1):
        await refused(c, "POST", "/v1/stops", {**stop, "ttl_s": ttl}, "ttl_s")
    new = {"id": "b", "name": "B", "scope": "team", "limit_usd": 1, "period": "monthly",
           "on_exceed": "block"}  # fmt: skip
    for bad in (0, 1001, -1):
        await refused(c, "POST", "/api/v1/budgets", {**new, "alert_thresholds": [bad]},
                      "alert_thresholds[0]")  # fmt: skip
    assert snapshot(redis_client) == before
    resp = await c.post("/v1/stops", json={**stop, "ttl_s": 30 * 86_400})
    assert resp.status in (200, 201), await resp.text()
    resp = await c.post("/api/v1/budgets", json={**new, "alert_thresholds": [100, 1000]})
    assert resp.status == 201 and (await resp.json())["alert_thresholds"] == [100, 1000]
