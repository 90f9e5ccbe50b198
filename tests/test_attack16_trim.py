"""Attack 16: what the stream's cap (about 10,000 alerts per tenant, lua/_lib.lua
ALERTS_MAX) does to alerts not yet delivered while a receiver is down.

An alert this replica is retrying from memory when the cap trims its entry: the refresh
that renews its claim found it gone from the group and cancelled it, so it was lost
though the body was in hand. Alerts trimmed before any replica read them were dropped
with no log and no count.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
import redis

from sidecar import keys
from sidecar.metrics import Metrics
from sidecar.model import Webhook
from sidecar.webhooks import WebhookDeliverer
from tests.harness import RedisServer
from tests.inprocess import app_over
from tests.test_attack16_webhook_isolation import (
    SECRET,
    Receiver,
    aclient,
    deliverer,
    entry,
    eventually,
    raise_alerts,
)

__all__ = ["aclient"]  # the fixture, used by name


async def test_an_alert_trimmed_while_its_retry_runs_is_still_delivered_once(
    aclient: Any, redis_client: redis.Redis
) -> None:
    tenant = "trim-retry"
    stream = keys.tenant_keys(tenant).alerts
    redis_client.xadd(stream, entry("t1", 100))  # type: ignore[arg-type]
    receiver = await Receiver("fail").start()
    d = deliverer(aclient, (Webhook("ops", receiver.url(), SECRET),), tenant)
    d.REFRESH_INTERVAL_S = 0.05
    run = d.lifecycle()
    await anext(run)
    try:
        await eventually(lambda: len(receiver.bodies) >= 1, "a first failed attempt")
        # The cap trims it (newer alerts came).
        redis_client.xtrim(stream, maxlen=0, approximate=False)
        before = len(receiver.bodies)
        # Several refreshes pass while it is still retrying.
        await eventually(lambda: len(receiver.bodies) >= before + 3, "retries go on")
        receiver.mode = "ok"
        await eventually(lambda: len(receiver.ok_ids()) == 1, "delivered")
    finally:
        await anext(run, None)
        await receiver.stop()
    assert len(receiver.ok_ids()) == 1


async def test_alerts_trimmed_unread_are_counted_once_over_replicas_and_logged(
    aclient: Any, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Two replicas, a receiver that hangs, two alerts in flight at each (the in-flight
    bound, shortened): of ten alerts four are taken, six wait in the stream; the cap then
    keeps the newest three. The three trimmed unread are counted once in all (the
    replicas' counts add up to it) and logged; the four in hand and the three kept are
    delivered, once each: delivered + dropped = raised."""
    caplog.set_level(logging.WARNING, "sidecar.webhooks")
    tenant = "trim-unread"
    stream = keys.tenant_keys(tenant).alerts
    receiver = await Receiver("hang").start()
    hooks = (Webhook("ops", receiver.url(), SECRET, None, 60_000),)
    counted: list[int] = []
    replicas = []
    for name in ("r1", "r2"):
        d = deliverer(aclient, hooks, tenant)
        d.consumer = name
        d.MAX_IN_FLIGHT = 2
        d.CLAIM_INTERVAL_S = 0.05
        d.REFRESH_INTERVAL_S = 0.05
        d._on_dropped = counted.append
        replicas.append(d.lifecycle())
    for run in replicas:
        await anext(run)
    try:
        raise_alerts(redis_client, tenant, 10)
        await eventually(lambda: len(receiver.bodies) == 4, "four alerts in flight")
        redis_client.xtrim(stream, maxlen=3, approximate=False)
        await eventually(lambda: sum(counted) >= 3, "the drop counted")
        receiver.mode = "ok"
        receiver.release.set()
        await eventually(lambda: len(set(receiver.ok_ids())) == 7, "the rest delivered")
        await eventually(
            lambda: redis_client.xpending(stream, "webhook:ops")["pending"] == 0, "acked"
        )
    finally:
        for run in replicas:
            await anext(run, None)
        await receiver.stop()
    assert sum(counted) == 3
    assert len(receiver.ok_ids()) == 7 == len(set(receiver.ok_ids()))
    assert len(receiver.ok_ids()) + sum(counted) == 10
    assert "3 alerts trimmed from" in caplog.text


async def test_the_drop_is_on_the_metrics_page_of_the_app(
    redis_server: RedisServer, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the app: its deliverer reports trimmed alerts to
    budget_sidecar_alerts_total{result="dropped"}."""
    monkeypatch.setattr(WebhookDeliverer, "MAX_IN_FLIGHT", 2)
    monkeypatch.setattr(WebhookDeliverer, "CLAIM_INTERVAL_S", 0.05)
    receiver = await Receiver("hang").start()
    client = None
    try:
        client = await app_over(
            redis_server.url,
            {
                "budgets": [
                    {
                        "id": "team-day",
                        "name": "Team day",
                        "scope": "team",
                        "limit_usd": 1.0,
                        "period": "daily",
                        "on_exceed": "warn",
                        "alert_thresholds": [100],
                    }
                ],
                "webhooks": [
                    {
                        "name": "ops",
                        "url": receiver.url(),
                        "secret": SECRET.decode(),
                        "timeout_ms": 60_000,
                    }
                ],
            },
            events=Metrics(),
        )
        for i in range(10):
            r = await client.post("/v1/record", json={"team_id": f"t{i}", "cost_usd": 1.0})
            assert r.status == 200, await r.text()
        await eventually(lambda: len(receiver.bodies) == 2, "two alerts in flight")
        stream = keys.tenant_keys("default").alerts
        redis_client.xtrim(stream, maxlen=3, approximate=False)  # 2 taken, 5 unread gone

        async def dropped() -> float:
            page = await (await client.get("/metrics")).text()
            for line in page.splitlines():
                if line.startswith('budget_sidecar_alerts_total{result="dropped"}'):
                    return float(line.split()[-1])
            return -1.0

        found = -1.0
        for _ in range(200):
            found = await dropped()
            if found >= 5:
                break
            await asyncio.sleep(0.05)
        assert found == 5.0
    finally:
        await receiver.stop()
        if client is not None:
            await client.close()
