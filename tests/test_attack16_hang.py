"""Attack 16: a receiver that hangs, or answers too slowly for the webhook's timeout,
while the sidecar keeps deciding. Decisions are all answered while every delivery slot
hangs (counted, not timed); the receiver never holds more than the documented number of
POSTs at once (16 per webhook); a timed-out attempt is retried, and once the receiver
answers, every alert is acknowledged exactly once, under the id it first had.

The app in-process (conftest.make_client) over the session's real redis-server, the
receiver on 127.0.0.1 started here.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis

from sidecar import keys
from sidecar.webhooks import WebhookDeliverer
from tests.conftest import ClientFactory
from tests.test_attack16_webhook_isolation import SECRET, Receiver, eventually

ENTITIES = 40


def doc(url: str, timeout_ms: int) -> dict[str, Any]:
    return {
        "budgets": [{"id": "team-day", "name": "Team day", "scope": "team", "limit_usd": 1.0,
                     "period": "daily", "on_exceed": "warn", "alert_thresholds": [100]}],
        "webhooks": [{"name": "ops", "url": url, "secret": SECRET.decode(),
                      "timeout_ms": timeout_ms}],
    }  # fmt: skip


async def cross(client: Any) -> None:
    """One $1 record per entity: ENTITIES alerts at 100%."""
    for i in range(ENTITIES):
        r = await client.post("/v1/record", json={"team_id": f"t{i}", "cost_usd": 1.0})
        assert r.status == 200, await r.text()


def pending(rc: redis.Redis) -> int:
    try:
        return int(rc.xpending(keys.tenant_keys("default").alerts, "webhook:ops")["pending"])
    except redis.ResponseError:
        return 0


async def test_a_hanging_receiver_holds_sixteen_posts_and_no_decision(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    receiver = await Receiver("hang").start()
    try:
        client = await make_client(doc(receiver.url(), 60_000))
        await cross(client)
        limit = WebhookDeliverer.MAX_CONCURRENT_PER_WEBHOOK
        await eventually(lambda: len(receiver.bodies) == limit, "every slot hanging")
        # 100 decisions, 20 at a time, while every slot hangs: all answered.
        answered = 0
        for _ in range(5):
            rs = await asyncio.gather(*(
                client.post("/v1/authorize", json={"team_id": "other", "estimated_usd": 0.001})
                for _ in range(20)
            ))  # fmt: skip
            for r in rs:
                assert r.status == 200 and (await r.json())["allowed"] is True
                answered += 1
        assert answered == 100
        # The rest wait, taken into the group (by polls: the last alerts may be read a poll
        # after the decisions above), and no more POSTs than the slots are made for them.
        await eventually(lambda: pending(redis_client) == ENTITIES, "every alert taken")
        assert len(receiver.bodies) == limit
        receiver.mode = "ok"
        receiver.release.set()  # the hung ones get a 503: retried
        await eventually(lambda: len(set(receiver.ok_ids())) == ENTITIES, "all delivered")
        await eventually(lambda: pending(redis_client) == 0, "all acknowledged")
        assert len(receiver.ok_ids()) == ENTITIES  # each once
    finally:
        await receiver.stop()


async def test_attempts_past_the_timeout_are_retried_and_delivered_once(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    receiver = await Receiver("hang").start()
    try:
        # A timeout no 200 answered at once can outlast on a loaded machine: an answer
        # that came after it would be retried by right (a webhook is at-least-once; the
        # receiver dedupes by id), and would make the count below one of timing, not of
        # the sidecar's retries.
        client = await make_client(doc(receiver.url(), 1000))
        await cross(client)
        # Each alert tried, timed out and tried again while the receiver hangs.
        await eventually(
            lambda: (
                all(
                    sum(1 for i, _b, _m in receiver.bodies if i == alert_id) >= 2
                    for alert_id in {i for i, _b, _m in receiver.bodies}
                )
                and len({i for i, _b, _m in receiver.bodies}) == ENTITIES
            ),
            "every alert retried after a timeout",
        )
        receiver.mode = "ok"
        await eventually(lambda: len(set(receiver.ok_ids())) == ENTITIES, "all delivered")
        await eventually(lambda: pending(redis_client) == 0, "all acknowledged")
        await asyncio.sleep(0.5)
        ok = receiver.ok_ids()
        assert len(ok) == ENTITIES == len(set(ok))
        # The retries are the same alert: one body per id.
        bodies: dict[str, set[bytes]] = {}
        for alert_id, body, _m in receiver.bodies:
            bodies.setdefault(alert_id, set()).add(body)
        assert all(len(b) == 1 for b in bodies.values())
    finally:
        await receiver.stop()
