"""Admin writes racing each other and the hot path, from two sidecars on one real Redis.

- A budget PUT merges the given fields into the budget as stored in Redis, not into the
  writing replica's (possibly stale) copy: a replica that has not yet seen a re-create or
  another replica's update must not bring back the old budget's fields.
- A rate-limit create of one id from two replicas makes exactly one; a rate-limit PUT on a
  replica that missed a delete does not bring the limit back (as for budgets).
- Under load (50 callers authorizing while two replicas PUT the limit back and forth,
  delete and re-create the budget, and send a bad PUT): every decision reports a written
  limit and fits within it, a GET never shows a mix of two writes, both replicas end on
  the last write, and the bad PUT changes nothing.
- The same idempotency key sent to two sidecars at once (20 copies on each) holds once;
  every answer names the one reservation; another body gets 409 without it.

Waits poll with a deadline, then assert exact outcomes: nothing here is timed.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import redis

from sidecar import keys
from sidecar.clock import FakeClock
from tests.conftest import ClientFactory
from tests.test_api_budgets import DOC, answer, eventually, new_budget, problem

DEFS = keys.definitions("default")
STORE_TIMEOUT_MS = 60_000  # counts, not times: a loaded machine must not turn into a 503


def stored_budget(rc: redis.Redis, budget_id: str = "api-cap") -> dict[str, Any] | None:
    raw = rc.hget(DEFS, f"b:{budget_id}")
    return None if raw is None else dict(json.loads(str(raw)))


# ---- 1. a PUT merges into the stored budget, not a stale copy ------------------------------


async def test_update_on_a_replica_that_missed_a_recreate_keeps_the_new_budget(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    a = await make_client(DOC)
    b = await make_client(DOC)
    await answer(await a.post("/api/v1/budgets", json=new_budget(name="First")), 201)

    async def b_knows() -> bool:
        return bool((await b.get("/api/v1/budgets/api-cap")).status == 200)

    await eventually(b_knows, "replica B loads the budget")
    # Deleted and re-created through another replica, before B's next poll (the version
    # is left alone so that the poll never comes: deterministic, the same state).
    clock.advance(7000)
    second = {**new_budget(name="Second", on_exceed="warn", alert_thresholds=[20]),
              "created_at": "2026-03-10T12:00:07Z", "updated_at": "2026-03-10T12:00:07Z",
              "forecast_alert": False}  # fmt: skip
    redis_client.hset(DEFS, "b:api-cap", json.dumps(second))

    clock.advance(1000)
    updated = await answer(await b.put("/api/v1/budgets/api-cap", json={"limit_usd": 0.5}))
    expected = {**second, "limit_usd": 0.5, "updated_at": "2026-03-10T12:00:08Z"}
    assert stored_budget(redis_client) == expected
    assert {k: updated[k] for k in expected} == expected


async def test_concurrent_updates_of_different_fields_both_land(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    a = await make_client(DOC)
    b = await make_client(DOC)
    await answer(await a.post("/api/v1/budgets", json=new_budget()), 201)

    async def b_knows() -> bool:
        return bool((await b.get("/api/v1/budgets/api-cap")).status == 200)

    await eventually(b_knows, "replica B loads the budget")
    # A changes the limit; B, before its poll, renames: B must not put the old limit back.
    stored = stored_budget(redis_client)
    assert stored is not None
    redis_client.hset(DEFS, "b:api-cap", json.dumps({**stored, "limit_usd": 3.0}))
    renamed = await answer(await b.put("/api/v1/budgets/api-cap", json={"name": "Renamed"}))
    after = stored_budget(redis_client)
    assert after is not None and (after["name"], after["limit_usd"]) == ("Renamed", 3.0)
    assert (renamed["name"], renamed["limit_usd"]) == ("Renamed", 3.0)


# ---- 2. rate limits: one create wins, a stale PUT does not resurrect -------------------------

RATE_LIMIT = {"id": "per-user", "scope": "user", "metric": "requests", "limit": 5,
              "window": "10s"}  # fmt: skip


async def test_concurrent_rate_limit_creates_of_one_id_make_exactly_one(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    replicas = [await make_client({}) for _ in range(2)]
    ids = [f"race-{i}" for i in range(10)]

    async def create(i: int, limit_id: str) -> tuple[str, int, dict[str, Any]]:
        body = {**RATE_LIMIT, "id": limit_id, "limit": i + 1}
        resp = await replicas[i % 2].post("/v1/rate-limits", json=body)
        return limit_id, resp.status, await resp.json(content_type=None)

    results = await asyncio.gather(*(create(i, lid) for lid in ids for i in range(4)))
    for limit_id in ids:
        mine = [(status, body) for lid, status, body in results if lid == limit_id]
        assert sorted(status for status, _ in mine) == [201, 409, 409, 409], mine
        (winner,) = [body for status, body in mine if status == 201]
        for status, body in mine:
            if status == 409:
                assert body["field"] == "id", body
        stored = json.loads(str(redis_client.hget(DEFS, f"rl:{limit_id}")))
        assert stored["limit"] == winner["limit"]


async def test_rate_limit_put_on_a_replica_that_missed_a_delete_does_not_resurrect_it(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client({})
    assert (await client.post("/v1/rate-limits", json=RATE_LIMIT)).status == 201
    # Deleted through another replica, before this one's next poll.
    assert redis_client.hdel(DEFS, "rl:per-user") == 1
    resp = await client.put("/v1/rate-limits/per-user", json={**RATE_LIMIT, "limit": 9})
    await problem(resp, 404, "id")
    assert not redis_client.hexists(DEFS, "rl:per-user")
