"""A hold that asks for it (`on_expiry: charge`, what proxy routes use) is charged its
estimate when its lease ends unsettled, exactly once, with a ledger entry and a metric:
in a proxy flow nobody settles, and a call that went through did spend."""

from __future__ import annotations

from typing import Any

import redis
from aiohttp.test_utils import TestClient, TestServer

from sidecar import keys
from sidecar.api.app import create_app
from sidecar.clock import FakeClock
from sidecar.metrics import Metrics
from sidecar.store import RedisStore
from tests.conftest import make_config
from tests.harness import RedisServer

TENANT = keys.tenant_keys("default")
DOC: dict[str, Any] = {
    "budgets": [
        {"id": "user", "name": "Each user", "scope": "user", "limit_usd": 0.05,
         "period": "daily", "on_exceed": "block", "alert_thresholds": [100]},
    ],
}  # fmt: skip
USER = "user/u1/d20260310"  # the fake clock's day


async def app_client(redis_server: RedisServer, clock: FakeClock) -> TestClient[Any, Any]:
    store = RedisStore.from_url(redis_server.url, timeout_ms=60_000)
    app = create_app(make_config(DOC), store, clock=clock, events=Metrics(clock=clock))
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


def used_held(rc: redis.Redis) -> tuple[int, int]:
    raw: dict[str, str] = rc.hgetall(TENANT.counters)  # type: ignore[assignment]
    return int(raw.get(f"u:{USER}", 0)), int(raw.get(f"h:{USER}", 0))


async def test_unsettled_holds_are_charged_once_when_their_lease_ends(
    redis_server: RedisServer, redis_client: redis.Redis, clock: FakeClock
) -> None:
    """Issue 15's proxy flow: four rounds of $0.01 calls with leases of 0.5 s that nobody
    settles on a $0.05 budget. Charged at their lease ends, exactly five pass in all
    (before: 20 of 20, and used_usd stayed 0)."""
    client = await app_client(redis_server, clock)
    passed: list[str] = []
    body = {"user_id": "u1", "estimated_usd": 0.01, "lease_ms": 500, "on_expiry": "charge"}
    for _round in range(4):
        for _ in range(5):
            r = await client.post("/v1/authorize", json=body)
            d = await r.json()
            if d["allowed"]:
                passed.append(d["reservation_id"])
        clock.advance(600)
    assert len(passed) == 5
    status = await (await client.get("/v1/budgets/user/status?scope_id=u1")).json()
    assert (status["used_usd"], status["held_usd"]) == (0.05, 0.0)
    assert used_held(redis_client) == (50_000, 0)

    # Each ended settled at its estimate; a late settle gets that first result.
    r = await client.post("/v1/settle", json={"reservation_id": passed[0], "cost_usd": 0.03})
    late = await r.json()
    assert (late["state"], late["cost_usd"], late["replayed"], late["priced_by"]) == (
        "settled",
        0.01,
        True,
        "estimate",
    )
    assert used_held(redis_client) == (50_000, 0)

    # The ledger says what was charged and why; the metric counts each once.
    records = (await (await client.get("/api/v1/usage/records?limit=50")).json())["records"]
    charged = [x for x in records if x["kind"] == "expiry"]
    assert len(charged) == 5
    assert {(x["cost_usd"], x["priced_by"], x["user_id"]) for x in charged} == {
        (0.01, "estimate", "u1")
    }
    text = await (await client.get("/metrics")).text()
    line = next(
        x for x in text.splitlines()
        if x.startswith('budget_sidecar_reservations_total{event="charged_at_lease_end"}')
    )  # fmt: skip
    assert float(line.split()[-1]) == 5
    # The 100% alert fired once, from the charge that reached the limit.
    assert redis_client.xlen(TENANT.alerts) == 1
    await client.close()


async def test_release_is_still_the_default(
    redis_server: RedisServer, redis_client: redis.Redis, clock: FakeClock
) -> None:
    client = await app_client(redis_server, clock)
    body = {"user_id": "u1", "estimated_usd": 0.01, "lease_ms": 500}
    r = await client.post("/v1/authorize", json=body)
    assert (await r.json())["allowed"]
    clock.advance(600)
    status = await (await client.get("/v1/budgets/user/status?scope_id=u1")).json()
    assert (status["used_usd"], status["held_usd"]) == (0.0, 0.0)
    assert used_held(redis_client) == (0, 0)
    await client.close()


async def test_a_cancelled_proxy_hold_is_released_not_charged(
    redis_server: RedisServer, redis_client: redis.Redis, clock: FakeClock
) -> None:
    """An explicit release (the Envoy filter on an upstream error) returns the hold even on
    a charging reservation; its lease ending later charges nothing."""
    client = await app_client(redis_server, clock)
    body = {"user_id": "u1", "estimated_usd": 0.01, "lease_ms": 500, "on_expiry": "charge"}
    d = await (await client.post("/v1/authorize", json=body)).json()
    r = await client.post("/v1/release", json={"reservation_id": d["reservation_id"]})
    assert (await r.json())["state"] == "released"
    clock.advance(600)
    await client.get("/v1/budgets/user/status?scope_id=u1")
    assert used_held(redis_client) == (0, 0)
    await client.close()
