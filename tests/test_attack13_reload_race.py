"""Two reloads of the API definitions on one replica at once (its poll and an admin
write's own reload), on a real redis-server. The poll's reload read the definitions
before the write and is slow to finish (a slow Redis reply, a busy loop); the write's
reload reads the new ones and the PUT answers. The poll's stale copy must not then be
applied over the new one: after the PUT has answered, this replica decides on the new
limit, not on the old one until its next poll."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import redis

from sidecar.api.app import ENGINE, WATCHER
from sidecar.model import TenantDefinitions
from tests.conftest import ClientFactory

BUDGET = {"id": "cap", "name": "Cap", "scope": "organization", "limit_usd": 10,
          "period": "monthly"}  # fmt: skip
# How long the stale reload waits for the write's to have read (not asserted on). Where
# reloads run one at a time the write's cannot start before it ends: the wait runs out.
BOUND_S = 1.0


async def test_a_reload_that_read_before_a_write_does_not_undo_it(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client({"budgets": []})
    assert (await client.post("/api/v1/budgets", json=BUDGET)).status == 201
    watcher, engine = client.app[WATCHER], client.app[ENGINE]
    store = watcher.store
    real_load = store.load
    fresh_loaded = asyncio.Event()
    calls = 0

    async def load() -> dict[str, TenantDefinitions]:
        nonlocal calls
        calls += 1
        first = calls == 1
        found = await real_load()
        if first:
            # The poll's reload: it has read the old limit; it finishes after the write's.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fresh_loaded.wait(), BOUND_S)
        else:
            fresh_loaded.set()
        return found

    store.load = load  # type: ignore[method-assign]
    poll = asyncio.ensure_future(watcher.reload())
    await asyncio.sleep(0)  # the poll's reload starts reading first
    put = await client.put("/api/v1/budgets/cap", json={"limit_usd": 0.5})
    assert put.status == 200 and (await put.json())["limit_usd"] == 0.5
    await poll
    store.load = real_load  # type: ignore[method-assign]

    budget = engine.budget("default", "cap")
    assert budget is not None and budget.limit_micro == 500_000
    shown: dict[str, Any] = await (await client.get("/api/v1/budgets/cap")).json()
    assert shown["limit_usd"] == 0.5
    decision = await (await client.post("/v1/authorize", json={"estimated_usd": 0.6})).json()
    assert decision["allowed"] is False, decision
    assert decision["budget_info"]["limit_usd"] == 0.5
