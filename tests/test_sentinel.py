"""redis+sentinel://: decisions go to the primary the sentinels name, and follow it when
the sentinels promote the replica after the primary dies."""

from __future__ import annotations

import asyncio
import time

import pytest

from sidecar import config as config_mod
from sidecar import keys
from sidecar.clock import SystemClock
from sidecar.engine import Engine, Unavailable
from sidecar.schemas import AuthorizeRequest, SettleRequest
from sidecar.scripts import Scripts
from sidecar.store import SentinelStore, open_store
from tests.harness import wait_until
from tests.sentinel_harness import RedisSentinel

pytestmark = pytest.mark.slow

CONFIG = config_mod.parse(
    {"budgets": [{"id": "cap", "name": "Cap", "scope": "organization", "limit_usd": 100,
                  "period": "monthly"}],
     "settings": {"redis_timeout_ms": 1000}},
    "<sentinel>",
)  # fmt: skip


async def test_decisions_follow_the_primary_through_a_failover(sentinel: RedisSentinel) -> None:
    store = open_store(sentinel.url, timeout_ms=1000)
    assert isinstance(store, SentinelStore)
    engine = Engine(CONFIG, store, SystemClock(), Scripts.load_all())
    settled = 0
    try:
        for _ in range(20):
            d = await engine.authorize("t", AuthorizeRequest(estimated_usd=0.01))
            await engine.settle("t", SettleRequest(reservation_id=d.reservation_id or "",
                                                   cost_usd=0.01))  # fmt: skip
            settled += 1
        wait_until(
            lambda: (
                sentinel.replica.client().info("replication")["master_repl_offset"]
                >= sentinel.primary.client().info("replication")["master_repl_offset"]
            ),
            what="replica caught up",
        )
        assert sentinel.primary.process is not None
        sentinel.primary.process.kill()  # kill -9: the sentinels promote the replica
        sentinel.primary.process.wait()
        sentinel.primary.process = None
        deadline = time.monotonic() + 30
        resumed = False
        while time.monotonic() < deadline and not resumed:
            try:
                d = await engine.authorize("t", AuthorizeRequest(estimated_usd=0.01))
                await engine.settle("t", SettleRequest(reservation_id=d.reservation_id or "",
                                                       cost_usd=0.01))  # fmt: skip
                settled += 1
                resumed = True
            except Unavailable:
                await asyncio.sleep(0.2)
        assert resumed, "decisions never reached the promoted replica"
    finally:
        await store.close()
    raw = sentinel.replica.client().hgetall(keys.tenant_keys("t").counters)
    used = sum(int(v) for k, v in raw.items() if k.startswith("u:"))
    assert used == settled * 10_000  # nothing lost (synced before the kill), nothing doubled
