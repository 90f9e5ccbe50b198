"""Attack 16: a replica killed (-9) after the thresholds were crossed and while it was
delivering their alerts (its POSTs hanging at the receiver). README promises alerts a
dead replica had taken are claimed by another: here the survivor is an in-process
WebhookDeliverer over the same real redis-server with a short takeover idle time (the
process's own is 30 s), and it delivers every alert the dead one held, each
acknowledged once. Then a limit raised through the admin API after its 100% alert, and
crossed again: no second alert in that period (once per budget, entity, period and
threshold), and the next period alerts again, once.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import redis
import redis.asyncio as aioredis

from sidecar import keys
from sidecar.clock import FakeClock
from sidecar.model import Webhook
from tests.conftest import ClientFactory
from tests.harness import RedisServer, SidecarProcess
from tests.test_attack16_webhook_isolation import SECRET, Receiver, deliverer, eventually

STREAM = keys.tenant_keys("default").alerts
GROUP = "webhook:ops"


@pytest.fixture
def processes() -> Iterator[list[SidecarProcess]]:
    started: list[SidecarProcess] = []
    yield started
    for p in started:
        p.cleanup()


def pending_by(rc: redis.Redis) -> dict[str, int]:
    try:
        rows: Any = rc.xpending_range(STREAM, GROUP, "-", "+", 100)
    except redis.ResponseError:
        return {}
    out: dict[str, int] = {}
    for row in rows:
        out[str(row["consumer"])] = out.get(str(row["consumer"]), 0) + 1
    return out


@pytest.mark.slow
async def test_alerts_a_killed_replica_was_delivering_are_taken_over_and_delivered_once(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    write_config: Any,
    processes: list[SidecarProcess],
) -> None:
    receiver = await Receiver("hang").start()
    client = aioredis.Redis(host="127.0.0.1", port=redis_server.port, decode_responses=True)
    try:
        hook = {"name": "ops", "url": receiver.url(), "secret": SECRET.decode(),
                "timeout_ms": 60_000}  # fmt: skip
        budget = {"id": "team-day", "name": "Team day", "scope": "team", "limit_usd": 1.0,
                  "period": "daily", "on_exceed": "warn",
                  "alert_thresholds": [50, 80, 100]}  # fmt: skip
        path = write_config({"budgets": [budget], "webhooks": [hook]})
        a = SidecarProcess(redis_server.url, str(path)).start()
        processes.append(a)
        async with aiohttp.ClientSession() as http:
            for team in ("t1", "t2"):
                body = {"team_id": team, "cost_usd": 1.0}
                async with http.post(a.url + "/v1/record", json=body) as resp:
                    assert resp.status == 200, await resp.text()
        await eventually(lambda: len(receiver.bodies) == 6, "A's six POSTs hanging")
        held = pending_by(redis_client)
        assert list(held.values()) == [6], held  # all six taken by A, none acknowledged
        assert a.process is not None
        os.kill(a.process.pid, signal.SIGKILL)
        a.process.wait(timeout=10)
        a.process = None
        receiver.mode = "ok"

        survivor = deliverer(client, (Webhook("ops", receiver.url(), SECRET),), "default")
        survivor.consumer = "survivor"
        survivor.CLAIM_IDLE_MS = 300
        survivor.CLAIM_INTERVAL_S = 0.05
        run = survivor.lifecycle()
        await anext(run)
        try:
            await eventually(lambda: len(receiver.ok_ids()) == 6, "six delivered by the survivor")
            await eventually(lambda: pending_by(redis_client) == {}, "all acknowledged")
        finally:
            await anext(run, None)
        ok = receiver.ok_ids()
        assert len(set(ok)) == 6 == len(ok)
        # The hung attempts and the takeover's are the same six alerts, same ids.
        assert {i for i, _b, m in receiver.bodies if m == "hang"} == set(ok)
    finally:
        await client.aclose()
        await receiver.stop()


async def test_a_raised_limit_crossed_again_alerts_nothing_more_that_period(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    client = await make_client({})
    created = await client.post("/api/v1/budgets", json={
        "id": "api-cap", "name": "API cap", "scope": "organization", "limit_usd": 1.0,
        "period": "daily", "on_exceed": "warn", "alert_thresholds": [50, 80, 100]})  # fmt: skip
    assert created.status == 201, await created.text()

    async def record(usd: float) -> None:
        r = await client.post("/v1/record", json={"org_id": "acme", "cost_usd": usd})
        assert r.status == 200, await r.text()

    def thresholds() -> list[tuple[str, str]]:
        entries: Any = redis_client.xrange(STREAM)
        return [(f["cid"], f["t"]) for _, f in entries if "k" not in f]

    await record(1.0)
    day1 = [("api-cap/acme/d20260310", t) for t in ("50", "80", "100")]
    assert thresholds() == day1
    put = await client.put("/api/v1/budgets/api-cap", json={"limit_usd": 2.0})
    assert put.status == 200, await put.text()
    await record(1.2)  # $2.2 of $2: every threshold of the new limit passed again
    assert thresholds() == day1
    clock.advance(86_400_000)
    await record(2.2)
    assert thresholds() == [*day1, *[("api-cap/acme/d20260311", t) for t in ("50", "80", "100")]]
    await record(0.5)
    assert len(thresholds()) == 6
