"""Attack 16: three real sidecar processes over one real redis-server cross the same
thresholds at once (tens of concurrent authorize + settle pairs spread over them), and a
settle far above its estimate jumps one entity from 40% to 120% in one call. The receiver
(aiohttp on 127.0.0.1, started here) resets the connection on the first attempt of every
alert, then answers 200: each alert (every configured threshold, 25 among them, and the
forecast) is retried and acknowledged exactly once, under one id, from one replica.

Waits poll up to a deadline, then assert exact counts; nothing here is timed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from aiohttp import web

from sidecar import keys
from tests.harness import RedisServer, SidecarProcess, wait_until
from tests.test_attack16_webhook_isolation import SECRET, Receiver, eventually

QUIET_S = 1.5  # after the expected deliveries, how long to watch that no more arrive
BUDGET: dict[str, Any] = {
    "id": "team-day", "name": "Team day", "scope": "team", "limit_usd": 1.0,
    "period": "daily", "on_exceed": "warn", "alert_thresholds": [25, 50, 80, 100],
    "forecast_alert": True,
}  # fmt: skip


class ResetFirst(Receiver):
    """Resets the connection on the first attempt of each alert id, then answers 200."""

    def __init__(self) -> None:
        super().__init__("ok")
        self.attempts: dict[str, list[int]] = {}

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        alert_id = request.headers["X-Budget-Alert-Id"]
        tries = self.attempts.setdefault(alert_id, [])
        tries.append(int(request.headers["X-Budget-Delivery"]))
        if len(tries) == 1:
            self.bodies.append((alert_id, body, "reset"))
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)
        self.bodies.append((alert_id, body, "ok"))
        return web.Response(status=200)


@pytest.fixture
def processes() -> Iterator[list[SidecarProcess]]:
    started: list[SidecarProcess] = []
    yield started
    for p in started:
        p.cleanup()


@pytest.mark.slow
async def test_three_replicas_crossing_together_send_each_alert_once_through_resets(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    write_config: Any,
    processes: list[SidecarProcess],
) -> None:
    receiver = ResetFirst()
    await receiver.start()
    try:
        path: Path = write_config(
            {
                "budgets": [BUDGET],
                "webhooks": [{"name": "ops", "url": receiver.url(), "secret": SECRET.decode()}],
            }
        )
        for _ in range(3):
            processes.append(SidecarProcess(redis_server.url, str(path)).start(wait=False))
        for p in processes:
            await asyncio.to_thread(wait_until, p.ready, what="sidecar", timeout_s=20)

        async with aiohttp.ClientSession() as http:

            async def post(i: int, route: str, body: dict[str, Any]) -> dict[str, Any]:
                async with http.post(processes[i % 3].url + route, json=body) as resp:
                    out: dict[str, Any] = await resp.json(content_type=None)
                    assert resp.status == 200, (route, out)
                    return out

            async def pair(i: int, team: str, estimate: float, cost: float) -> None:
                d = await post(i, "/v1/authorize", {"team_id": team, "estimated_usd": estimate})
                assert d["allowed"] is True, d
                await post(i + 1, "/v1/settle", {"reservation_id": d["reservation_id"],
                                                  "cost_usd": cost})  # fmt: skip

            # t1: 60 concurrent pairs of $0.02 on three replicas: $1.20, every threshold.
            await asyncio.gather(*(pair(i, "t1", 0.02, 0.02) for i in range(60)))
            # t2: $0.40 first (its 25%), then one settle of $0.80 on a $0.01 estimate.
            await pair(0, "t2", 0.40, 0.40)
            await pair(1, "t2", 0.01, 0.80)

        tenant = "default"
        want = {
            f"{tenant}/{keys.counter_id('team-day', team, window)}/{t}"
            for team in ("t1", "t2")
            for window in {_window(redis_client)}
            for t in ("25", "50", "80", "100", "forecast")
        }
        await eventually(lambda: set(receiver.ok_ids()) == want, "every alert acknowledged")
        await asyncio.sleep(QUIET_S)
        assert sorted(receiver.ok_ids()) == sorted(want)  # each acknowledged once
        # Every alert: a reset first attempt, a retry numbered 2 by the same replica.
        assert {i: tries for i, tries in receiver.attempts.items()} == {i: [1, 2] for i in want}
        by_id: dict[str, list[bytes]] = {}
        for alert_id, body, _mode in receiver.bodies:
            by_id.setdefault(alert_id, []).append(body)
        assert all(first == retry for first, retry in by_id.values())  # the same alert
        # t2's jump: 25 before, then 50, 80, 100 from one settle, in threshold order on the
        # stream, each with the spend after that settle.
        entries: Any = redis_client.xrange(keys.tenant_keys(tenant).alerts)
        t2 = [f for _, f in entries if "/t2/" in f["cid"] and "k" not in f]
        assert [(f["t"], f["u"]) for f in t2] == [
            ("25", "400000"),
            ("50", "1200000"),
            ("80", "1200000"),
            ("100", "1200000"),
        ]
        jumped = [json.loads(by_id[i][-1]) for i in want if "/t2/" in i and "forecast" not in i]
        assert sorted((a["threshold"], a["amount_usd"]) for a in jumped) == [
            (25, 0.4),
            (50, 1.2),
            (80, 1.2),
            (100, 1.2),
        ]
        assert redis_client.xpending(keys.tenant_keys(tenant).alerts, "webhook:ops")["pending"] == 0
    finally:
        await receiver.stop()


def _window(rc: redis.Redis) -> str:
    """The day window the counters were charged in (read back: the test does not guess
    the date the processes saw)."""
    every: Any = rc.hkeys(keys.tenant_keys("default").counters)
    fields = [str(f) for f in every if str(f).startswith("u:team-day/t1/")]
    assert len(fields) == 1, fields
    return fields[0].rsplit("/", 1)[1]
