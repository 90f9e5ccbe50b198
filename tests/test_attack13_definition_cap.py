"""A tenant's admin making budgets or rate limits without end, on a real redis-server.
Every decision of the tenant evaluates all of them in one script, and Redis runs nothing
else meanwhile: measured on the 2-core test machine, 2,000 organization budgets made one
authorize block Redis about 14 ms (for every tenant), and at 3,000 every authorize of the
tenant failed with 500 (authorize.lua: "too many results to unpack"). The admin API now
makes at most settings.max_api_definitions (default 200) of each kind per tenant: past it
409 naming the setting, nothing written; other tenants and the other kind unaffected; a
delete makes room; concurrent creates cannot pass it between them."""

from __future__ import annotations

import asyncio
from typing import Any

import redis

from tests.conftest import ClientFactory
from tests.harness import data_dump
from tests.test_auth import ADMIN, ADMIN_B, DOC


def budget(i: int) -> dict[str, Any]:
    return {"id": f"b{i}", "name": "B", "scope": "organization", "limit_usd": 1000,
            "period": "monthly"}  # fmt: skip


def limit(i: int) -> dict[str, Any]:
    return {"id": f"rl{i}", "scope": "organization", "metric": "requests", "limit": 1000,
            "window": "1m"}  # fmt: skip


async def test_the_default_most_is_200_budgets_per_tenant(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(DOC)
    for i in range(200):
        resp = await client.post("/api/v1/budgets", json=budget(i), headers=ADMIN)
        assert resp.status == 201, (i, await resp.text())
    before = data_dump(redis_client)
    resp = await client.post("/api/v1/budgets", json=budget(200), headers=ADMIN)
    answer = await resp.json()
    assert (resp.status, answer["field"]) == (409, "id"), answer
    assert "settings.max_api_definitions" in answer["detail"]
    assert data_dump(redis_client) == before
    decision = await (await client.post("/v1/authorize", json={"estimated_usd": 0.01},
                                        headers=ADMIN)).json()  # fmt: skip
    assert decision["allowed"] is True and len(decision["budgets"]) == 201  # 200 + the file's


async def test_the_most_per_tenant_and_kind_holds_under_concurrent_creates(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client({**DOC, "settings": {"max_api_definitions": 5}})

    async def create(path: str, body: dict[str, Any], headers: dict[str, str]) -> int:
        return (await client.post(path, json=body, headers=headers)).status

    for path, make in (("/api/v1/budgets", budget), ("/v1/rate-limits", limit)):
        # 12 at once from one tenant, 3 from the other: exactly 5 and 3 made.
        statuses = await asyncio.gather(
            *(create(path, make(i), ADMIN) for i in range(12)),
            *(create(path, make(100 + i), ADMIN_B) for i in range(3)),
        )
        assert sorted(statuses[:12]) == [201] * 5 + [409] * 7, statuses
        assert statuses[12:] == [201] * 3
    listed = await (await client.get("/api/v1/budgets", headers=ADMIN)).json()
    assert listed["total"] == 6  # 5 of the API's and the config file's
    limits = await (await client.get("/v1/rate-limits", headers=ADMIN)).json()
    assert len(limits["rate_limits"]) == 5
    # Full: refused with nothing written; a delete makes room for one.
    made = next(b["id"] for b in listed["budgets"] if b["source"] == "api")
    before = data_dump(redis_client)
    assert await create("/api/v1/budgets", budget(50), ADMIN) == 409
    assert data_dump(redis_client) == before
    assert (await client.delete(f"/api/v1/budgets/{made}", headers=ADMIN)).status == 204
    assert await create("/api/v1/budgets", budget(50), ADMIN) == 201
    assert await create("/api/v1/budgets", budget(51), ADMIN) == 409
