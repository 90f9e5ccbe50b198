"""Learned estimates (issue 19, sidecar/learned.py) on a real redis-server: settle teaches a
series the ring of its last 32 measured costs and their p95 (the Lua agrees with the Python
twin), authorize and check hold that p95 once the series was taught the minimum count, never
above the ceiling, never below what the caller gave; a charge of the held estimate teaches
nothing; the statistics are bounded and expire; `fixed` writes nothing; bad config values
are refused naming the field. The runaway acceptance through LiteLLM is in
tests/test_litellm_runaway.py."""

from __future__ import annotations

import random
from typing import Any

import pytest
import redis

from sidecar import keys
from sidecar.clock import FakeClock
from sidecar.config import ConfigError
from sidecar.learned import LEARN_RING, EstimateHint, mode_of, p95, parse_series, source_of
from sidecar.model import Budget, EstimateMode, OnExceed, Period, Scope
from tests.conftest import ClientFactory, make_config

TENANT = keys.tenant_keys("default")
SERIES = keys.estimate_series("openai", "gpt-4o", "agent-1")
PRICING = [{"provider": "openai", "model": "gpt-4o", "input_per_1k": 0.5, "output_per_1k": 0.5}]
CALL = {"agent_id": "agent-1", "provider": "openai", "model": "gpt-4o"}


def doc(budget_usd: float | None = None, **settings: Any) -> dict[str, Any]:
    budgets = []
    if budget_usd is not None:
        budgets = [{"id": "cap", "name": "Cap", "scope": "agent", "scope_id": "agent-1",
                    "limit_usd": budget_usd, "period": "daily"}]  # fmt: skip
    return {
        "budgets": budgets,
        "pricing": PRICING,
        "settings": {"estimate": "learned", "estimate_min_count": 5, **settings},
    }


async def post(client: Any, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = await client.post(path, json=body)
    assert r.status == 200, await r.text()
    out: dict[str, Any] = await r.json()
    return out


async def call(client: Any, cost_usd: float, estimate_usd: float = 0.01) -> dict[str, Any]:
    """One authorize of `estimate_usd` settled at `cost_usd`; the authorize's decision."""
    d = await post(client, "/v1/authorize", {**CALL, "estimated_usd": estimate_usd})
    assert d["allowed"], d
    await post(client, "/v1/settle", {"reservation_id": d["reservation_id"], "cost_usd": cost_usd})
    return d


def stats(rc: redis.Redis, series: str = SERIES) -> Any:
    raw = rc.hget(TENANT.estimates, series)
    return None if raw is None else parse_series(str(raw))


# ---- the pure rules ------------------------------------------------------------------------


def _budget(estimate: EstimateMode | None) -> Budget:
    return Budget("b", "B", Scope.AGENT, 1, Period.DAILY, OnExceed.BLOCK, estimate=estimate)


def test_the_mode_is_the_routes_then_any_learned_budget_then_the_settings() -> None:
    fixed, learned_ = EstimateMode.FIXED, EstimateMode.LEARNED
    assert mode_of(fixed, []) is fixed
    assert mode_of(learned_, []) is learned_
    assert mode_of(fixed, [_budget(None), _budget(learned_)]) is learned_
    assert mode_of(learned_, [_budget(fixed), _budget(None)]) is fixed
    assert mode_of(fixed, [_budget(fixed), _budget(learned_)]) is learned_
    assert mode_of(learned_, [_budget(learned_)], "fixed") is fixed
    assert mode_of(fixed, [], "learned") is learned_


def test_the_source_says_which_estimate_was_held() -> None:
    floor = 10_000
    assert source_of(20_000, floor, 20_000, 20_000, False) == "caller"
    assert source_of(20_000, floor, 20_000, 20_000, True) == "default"
    assert source_of(0, floor, 10_000, 10_000, False) == "floor"
    assert source_of(5_000, floor, 10_000, 15_000, True) == "learned"


def test_p95_is_the_nearest_rank() -> None:
    assert p95([7]) == 7
    assert p95(list(range(1, 21))) == 19  # ceil(0.95 * 20) = 19th smallest
    assert p95(list(range(1, 33))) == 31  # 31st of 32: one outlier ignored
    assert p95(list(range(1, 11))) == 10


# ---- teaching: settle.lua ----------------------------------------------------------------


async def test_the_ring_and_its_p95_match_the_python_twin(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(doc())
    rng = random.Random(19)
    taught: list[int] = []
    # Four rings' worth: the costs dropped include the ring's largest again and again (then
    # the two largest kept beside the ring are worked out from it anew).
    for i in range(4 * LEARN_RING + 9):
        cost = rng.choice([0, 1, 15_000, rng.randrange(1, 2_000_000)])
        await call(client, cost / 1e6)
        taught.append(cost)
        s = stats(redis_client)
        ring = taught[-LEARN_RING:]
        assert s.count == i + 1
        assert sorted(s.ring) == sorted(ring)
        assert s.p95 == p95(ring), (s, ring)
    # Bounded: 32 costs however many were taught.
    assert len(stats(redis_client).ring) == LEARN_RING
    ttl = redis_client.ttl(TENANT.estimates)
    assert 0 < ttl <= 7 * 86_400


async def test_a_series_written_before_the_two_largest_were_kept_goes_on(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """A full ring stored as "count:p95:ring" (no largest costs after it, oldest at count %
    32) is taught on: its p95 is that of its costs, and it is kept in the new form."""
    client = await make_client(doc())
    old = [5_000 + 1_000 * i for i in range(LEARN_RING)]  # 5,000 .. 36,000
    redis_client.hset(TENANT.estimates, SERIES, f"40:{p95(old)}:" + ",".join(map(str, old)))
    await call(client, 0.001)  # 1,000 micro-USD: one of the old costs leaves
    s = stats(redis_client)
    assert s.count == 41 and len(s.ring) == LEARN_RING
    assert s.p95 == p95(list(s.ring)) == 35_000, s
    assert str(redis_client.hget(TENANT.estimates, SERIES)).endswith(":36000.35000")


async def test_a_charge_of_the_held_estimate_teaches_nothing(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    """An unpriced model settled by tokens is charged its hold; a hold charged at its
    lease's end is its estimate too: neither is a measured cost."""
    client = await make_client(doc())
    body = {"agent_id": "agent-1", "model": "no-price", "estimated_usd": 0.02}
    d = await post(client, "/v1/authorize", body)
    settle = {"reservation_id": d["reservation_id"], "tokens_in": 5, "tokens_out": 5}
    r = await post(client, "/v1/settle", settle)
    assert r["priced_by"] == "estimate"
    assert redis_client.hlen(TENANT.estimates) == 0
    # On expiry charge: the lease ends unsettled, reclaim charges the estimate.
    d = await post(client, "/v1/authorize", {**CALL, "estimated_usd": 0.02, "lease_ms": 100,
                                            "on_expiry": "charge"})  # fmt: skip
    assert d["allowed"]
    clock.advance(1000)
    await post(client, "/v1/authorize", {**CALL, "estimated_usd": 0.01})  # reclaims it
    assert redis_client.hlen(TENANT.estimates) == 0
    # And a measured cost does teach.
    await call(client, 0.015)
    assert stats(redis_client).ring == (15_000,)


async def test_fixed_writes_no_statistics_and_holds_as_before(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client({"pricing": PRICING})  # settings.estimate: fixed (default)
    for _ in range(8):
        d = await call(client, 0.05)
        assert d["estimated_usd"] == 0.01 and d["estimate_source"] == "caller"
    assert not redis_client.exists(TENANT.estimates)


# ---- holding: authorize.lua and check.lua --------------------------------------------------


async def test_the_learned_p95_holds_once_the_minimum_count_was_taught(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(doc())
    for i in range(5):
        d = await call(client, 0.015)
        # Cold: fewer than estimate_min_count (5) costs seen, the caller's figure holds.
        assert (d["estimated_usd"], d["estimate_source"]) == (0.01, "caller"), (i, d)
    d = await call(client, 0.015)
    assert (d["estimated_usd"], d["estimate_source"]) == (0.015, "learned"), d
    # A caller's larger estimate wins over the learned figure.
    d = await call(client, 0.015, estimate_usd=0.02)
    assert (d["estimated_usd"], d["estimate_source"]) == (0.02, "caller"), d
    # Check answers what authorize would hold.
    c = await post(client, "/v1/check", {**CALL, "estimated_usd": 0.01})
    assert (c["estimated_usd"], c["estimate_source"]) == (0.015, "learned"), c
    # Another agent of the same model is its own series: still cold.
    other = await post(client, "/v1/authorize", {**CALL, "agent_id": "agent-2",
                                                "estimated_usd": 0.01})  # fmt: skip
    assert (other["estimated_usd"], other["estimate_source"]) == (0.01, "caller")


async def test_a_learned_hold_never_passes_the_ceiling(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(doc(estimate_ceiling_usd=0.012))
    for _ in range(5):
        await call(client, 0.5)
    d = await call(client, 0.5)
    assert (d["estimated_usd"], d["estimate_source"]) == (0.012, "learned"), d
    assert stats(redis_client).p95 == 500_000  # what was learned; the hold is capped


async def test_a_learned_hold_denies_what_would_pass_the_cap(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """$0.05 block budget, calls known to cost $0.015: with $0.01 left, a $0.01 hold would
    fit but the learned $0.015 does not; the denial says the learned figure was weighed."""
    client = await make_client(doc(budget_usd=0.05))
    for _ in range(5):
        await call(client, 0.008)  # $0.04 spent, cold: the $0.01 holds fit
    # Teach 5 costs of $0.015 straight into the series (as settle would), keeping the budget.
    redis_client.hset(TENANT.estimates, SERIES, "5:15000:15000,15000,15000,15000,15000")
    d = await post(client, "/v1/authorize", {**CALL, "estimated_usd": 0.01})
    assert d["allowed"] is False and d["estimate_source"] == "learned", d
    c = await post(client, "/v1/check", {**CALL, "estimated_usd": 0.01})
    assert c["allowed"] is False and c["estimate_source"] == "learned", c


async def test_the_proxy_route_names_its_mode(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """Settings fixed; a route that says learned holds the learned figure for requests
    without an estimate header, the route that says fixed its default."""
    proxy = {"routes": [{"prefix": "/learned", "estimate": "learned"},
                        {"prefix": "/fixed", "estimate": "fixed"}]}  # fmt: skip
    budget = {"id": "cap", "name": "Cap", "scope": "agent", "scope_id": "agent-1",
              "limit_usd": 1, "period": "daily"}  # fmt: skip
    client = await make_client({"pricing": PRICING, "proxy": proxy, "budgets": [budget],
                                "settings": {"estimate_min_count": 1}})  # fmt: skip
    headers = {"x-agent-id": "agent-1"}

    async def held() -> float:
        r = await client.get("/v1/budgets/cap/status")
        value: float = (await r.json())["held_usd"]
        return value

    r = await client.get("/ext_authz/learned", headers=headers)
    assert r.status == 200 and await held() == 0.01  # cold: the proxy's default
    rid = r.headers["x-budget-reservation-id"]
    await post(client, "/v1/settle", {"reservation_id": rid, "cost_usd": 0.03})
    assert stats(redis_client, keys.estimate_series(None, None, "agent-1")).p95 == 30_000
    r = await client.get("/ext_authz/learned", headers=headers)
    assert r.status == 200 and await held() == 0.03  # warm: the learned figure
    r = await client.get("/ext_authz/fixed", headers=headers)
    assert r.status == 200 and round(await held(), 6) == 0.04  # + the $0.01 default
    # The native API under settings fixed: the caller's figure.
    d = await post(client, "/v1/check", {"agent_id": "agent-1", "estimated_usd": 0.01})
    assert (d["estimated_usd"], d["estimate_source"]) == (0.01, "caller")


def test_bad_estimate_settings_are_refused_naming_the_field() -> None:
    cases = [
        ({"settings": {"estimate": "sometimes"}}, "$.settings.estimate", "fixed, learned"),
        ({"settings": {"estimate_ceiling_usd": 0}}, "$.settings.estimate_ceiling_usd", ""),
        ({"settings": {"estimate_ceiling_usd": 0.001, "min_estimate_usd": 0.01}},
         "$.settings.estimate_ceiling_usd", "min_estimate_usd"),
        ({"settings": {"estimate_min_count": 0}}, "$.settings.estimate_min_count", ""),
        ({"settings": {"estimate_stats_days": 0}}, "$.settings.estimate_stats_days", ""),
        ({"settings": {"estimate_max_series": 0}}, "$.settings.estimate_max_series", ""),
        ({"budgets": [{"id": "b", "name": "B", "scope": "agent", "limit_usd": 1,
                       "period": "daily", "estimate": "p95"}]},
         "$.budgets[0].estimate", "fixed, learned"),
        ({"proxy": {"routes": [{"prefix": "/x", "estimate": "yes"}]}},
         "$.proxy.routes[0].estimate", ""),
    ]  # fmt: skip
    for data, path, words in cases:
        with pytest.raises(ConfigError) as err:
            make_config(data)
        assert err.value.path == path, (data, err.value)
        assert words in err.value.message, err.value
    good = make_config({"settings": {"estimate": "learned", "estimate_ceiling_usd": 0.5}})
    assert good.settings.estimate is EstimateMode.LEARNED
    assert good.settings.estimate_ceiling_micro == 500_000


async def test_series_past_the_maximum_evict_one_another(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(doc(estimate_max_series=3))
    for agent in range(8):
        d = await post(client, "/v1/authorize", {**CALL, "agent_id": f"a{agent}",
                                                "estimated_usd": 0.01})  # fmt: skip
        await post(client, "/v1/settle", {"reservation_id": d["reservation_id"],
                                          "cost_usd": 0.02})  # fmt: skip
        assert redis_client.hlen(TENANT.estimates) == min(agent + 1, 3)
    assert redis_client.hexists(TENANT.estimates, keys.estimate_series("openai", "gpt-4o", "a7"))


def test_the_hint_defaults_to_the_callers_own_estimate() -> None:
    assert EstimateHint().default is False and EstimateHint().mode is None


async def test_a_surfaces_default_is_reported_as_default_then_as_learned(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """What the gateway's pre-check and the proxy pass: a configured default, not the
    caller's own figure."""
    from sidecar.api.app import ENGINE
    from sidecar.schemas import AuthorizeRequest

    client = await make_client(doc(estimate_min_count=1))
    engine = client.server.app[ENGINE]
    req = AuthorizeRequest(agent_id="agent-1", provider="openai", model="gpt-4o",
                           estimated_usd=0.01)  # fmt: skip
    d = await engine.authorize("default", req, EstimateHint(default=True))
    assert (d.estimated_usd, d.estimate_source) == (0.01, "default")
    await post(client, "/v1/settle", {"reservation_id": d.reservation_id, "cost_usd": 0.02})
    d = await engine.authorize("default", req, EstimateHint(default=True))
    assert (d.estimated_usd, d.estimate_source) == (0.02, "learned")
