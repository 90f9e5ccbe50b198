"""Redis stays bounded (issue 16, item 5): bytes per entity measured on a real
redis-server, an idle tenant collected by the background sweep with no traffic, and the
per-user usage aggregates split from the totals with their own, shorter retention."""

from __future__ import annotations

import asyncio
from typing import Any

import redis

from bench import memory
from sidecar import keys
from sidecar.api.app import SWEEPER
from sidecar.clock import FakeClock
from tests.conftest import T0_MS, ClientFactory
from tests.harness import RedisServer

TENANT = keys.tenant_keys("default")
DAY_MS = 86_400_000


# ---- 1. at most 500 bytes per entity, indexes smaller than what they index -------------


USERS = 10_000  # make bench-memory measures 20,000; half of it gives the same bytes per user
BATCH = USERS // 100  # users calling at once; the last batch calls 14.4 minutes before midnight


async def test_ten_thousand_entities_cost_at_most_500_bytes_each(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    """10,000 users, each with a per-user daily budget and a per-user request limit, one
    settled call a day for two days (the default per-user aggregate retention), then the
    sweep: INFO used_memory grew by at most 500 bytes per user, all keys counted (one day
    of ledger records, one per user, included)."""
    m = await memory.measure(redis_server.url, entities=USERS, days=2, concurrency=BATCH)
    print("\n", m.as_dict())
    assert m.per_entity <= 500, m.as_dict()
    # What is indexed: finished reservations in res; their index: the gc zset. Counters
    # and limiters have no index at all.
    assert m.by_kind["gc"] < m.by_kind["res"], m.by_kind
    assert m.fields["gc"] <= m.fields["res"], m.fields
    # The steady state really is one: yesterday's counters and every idle limiter are gone
    # (one counter field per user), finished reservations kept an hour (1/24 of a day's).
    # Recent-spend windows (forecasts) stay only while they say something: the last batch
    # of users called within the last two 10-minute buckets.
    windows = sum(
        1
        for key in redis_client.scan_iter(match="*:ctr")
        for field in redis_client.hkeys(key)
        if field.startswith("w:")
    )
    assert windows == BATCH, m.fields
    assert m.fields["ctr"] == USERS + windows, m.fields
    assert m.fields["res"] < USERS / 12, m.fields


# ---- 2. an idle tenant is collected with no traffic ------------------------------------


DOC = {
    "budgets": [
        {"id": "user", "name": "Each user", "scope": "user", "limit_usd": 10, "period": "daily"}
    ],
    "rate_limits": [
        {"id": "rpm", "scope": "user", "metric": "requests", "limit": 60, "window": "1m"},
        {"id": "conc", "scope": "user", "metric": "concurrent", "limit": 5},
    ],
}


async def post(client: Any, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = await client.post(path, json=body)
    assert r.status == 200, await r.text()
    data: dict[str, Any] = await r.json()
    return data


async def test_an_idle_tenants_expired_items_disappear_with_no_traffic(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    """Counters, limiters, finished and expired reservations and idempotency keys of a
    tenant that then sends nothing at all: the app's own background sweep deletes every
    one of them once its retention has passed, and nothing before."""
    client = await make_client(DOC)
    sweeper = client.server.app[SWEEPER]
    for i in range(30):
        d = await post(client, "/v1/authorize", {"user_id": f"u{i}", "estimated_usd": 0.1,
                                                 "idempotency_key": f"k{i}"})  # fmt: skip
        if i % 3 == 0:
            await post(client, "/v1/settle", {"reservation_id": d["reservation_id"],
                                              "cost_usd": 0.05})  # fmt: skip
        elif i % 3 == 1:
            await post(client, "/v1/release", {"reservation_id": d["reservation_id"]})
        # and every third is left held: its lease ends, nobody settles it
    await post(client, "/v1/record", {"user_id": "u0", "cost_usd": 0.01, "idempotency_key": "r1"})
    ctr_before = redis_client.hlen(TENANT.counters)
    assert ctr_before > 60 and redis_client.hlen(TENANT.reservations) >= 60

    # The same day, an hour later (the default lease is a minute): nothing due yet but the
    # leases; counters of today stay.
    clock.advance(30 * 60_000)
    await _swept(sweeper, redis_client)
    assert redis_client.zcard(TENANT.leases) == 0  # every lease returned, by the sweep
    assert all(f.startswith("u:") for f in redis_client.hkeys(TENANT.counters))  # no holds
    assert sum(1 for f in redis_client.hkeys(TENANT.counters) if f.startswith("u:")) == 10
    assert redis_client.hlen(TENANT.reservations) > 0  # finished ones are kept an hour

    # Two days on, with no request in between: everything the tenant wrote has gone.
    clock.advance(2 * DAY_MS)
    await _swept(sweeper, redis_client)
    assert not redis_client.exists(TENANT.counters, TENANT.leases, TENANT.reservations,
                                   TENANT.gc, TENANT.sweep)  # fmt: skip


async def _swept(sweeper: Any, rc: redis.Redis) -> None:
    """Wait for the app's own sweep loop (not a call of ours) to have done a whole walk."""
    calls = sweeper.calls
    for _ in range(400):
        await asyncio.sleep(0.05)
        if sweeper.calls >= calls + 3 and sweeper.idle:
            return
    raise AssertionError(f"the background sweep did not run ({sweeper.calls} calls)")


# ---- 3. per-user aggregates apart, with their own shorter retention --------------------


async def test_user_level_aggregates_have_their_own_shorter_retention(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    """The day's totals leave user and step out and are kept usage_aggregate_days; the
    (user, step) totals are a hash of their own kept usage_user_aggregate_days from the
    day's start. The breakdowns stay exact: a day whose user hash expired counts under ""."""
    client = await make_client({**DOC, "rate_limits": []})
    for user, step, usd in (("u1", "plan", 0.25), ("u1", "act", 0.5), ("u2", "", 1.0)):
        await post(client, "/v1/record", {"user_id": user, "step_id": step or None,
                                          "team_id": "t1", "cost_usd": usd})  # fmt: skip
    await post(client, "/v1/record", {"team_id": "t1", "cost_usd": 2.0})
    day = "20260310"
    totals = redis_client.hgetall(TENANT.usage_day(day))
    assert all("u1" not in f and "u2" not in f and "plan" not in f for f in totals), totals
    users = redis_client.hgetall(TENANT.user_day(day))
    assert users == {"u1\x1fplan": "250000:1:0:0", "u1\x1fact": "500000:1:0:0",
                     "u2\x1f": "1000000:1:0:0"}  # fmt: skip
    # Retention: 400 days for totals; 2 days counted from the day's start for users (the
    # fake clock is at noon: 1.5 days left).
    assert 399 * 86_400 < redis_client.ttl(TENANT.usage_day(day)) <= 400 * 86_400
    assert redis_client.ttl(TENANT.user_day(day)) == (T0_MS // DAY_MS * DAY_MS + 2 * DAY_MS
                                                      - T0_MS) // 1000  # fmt: skip

    async def breakdown(group_by: str) -> dict[str, float]:
        r = await client.get(f"/api/v1/usage/breakdown?group_by={group_by}&period=daily")
        assert r.status == 200
        return {i["group_value"]: i["cost_usd"] for i in (await r.json())["items"]}

    assert await breakdown("user") == {"u1": 0.75, "u2": 1.0, "": 2.0}
    assert await breakdown("step") == {"plan": 0.25, "act": 0.5, "": 3.0}
    assert await breakdown("team") == {"t1": 3.75}
    # The user hash expires (as Redis will): totals unchanged, attribution under "".
    redis_client.delete(TENANT.user_day(day))
    assert await breakdown("user") == {"": 3.75}
    r = await client.get("/api/v1/usage?period=daily")
    assert (await r.json())["total_cost_usd"] == 3.75
