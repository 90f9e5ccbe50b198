"""Attack 16: one webhook's trouble must not keep alerts from the others, and what a
hanging, resetting or failing receiver does to delivery (retried, once, same id).

In-process WebhookDeliverers over the session's real redis-server, receivers on
127.0.0.1 started here. Waits poll up to a deadline, then counts are asserted exactly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from aiohttp import web

from sidecar import keys
from sidecar.model import Webhook
from sidecar.webhooks import WebhookDeliverer
from tests.harness import RedisServer, free_port

SECRET = b"whsec-0123456789abcdef0123456789"
DEADLINE_S = 20.0


async def eventually(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {DEADLINE_S}s")
        await asyncio.sleep(0.02)


class Receiver:
    """Records every POST; `mode` picks the answer: ok (200), fail (500), hang (never
    answers until released), reset (closes the connection without an answer)."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.port = free_port()
        self.bodies: list[tuple[str, bytes, str]] = []  # (alert id, body, mode answered)
        self.release = asyncio.Event()
        self._runner: web.AppRunner | None = None

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        mode = self.mode
        self.bodies.append((request.headers["X-Budget-Alert-Id"], body, mode))
        if mode == "hang":
            await self.release.wait()
            return web.Response(status=503)
        if mode == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)
        return web.Response(status=500 if mode == "fail" else 200)

    def ok_ids(self) -> list[str]:
        return [i for i, _b, m in self.bodies if m == "ok"]

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def aclient(redis_server: RedisServer) -> AsyncIterator[Any]:
    client = aioredis.Redis(host="127.0.0.1", port=redis_server.port, decode_responses=True)
    yield client
    await client.aclose()


def entry(entity: str, threshold: int) -> dict[str, str]:
    cid = keys.counter_id("team-cap", entity, "m202603")
    return {"cid": cid, "t": str(threshold), "l": "1000000", "u": "1000000", "at": "1773144000000"}


def raise_alerts(client: redis.Redis, tenant: str, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        client.xadd(keys.tenant_keys(tenant).alerts, entry(f"e{i}", 100))  # type: ignore[arg-type]


def deliverer(client: Any, hooks: tuple[Webhook, ...], tenant: str) -> WebhookDeliverer:
    d = WebhookDeliverer(client, lambda: hooks, lambda: (tenant,), lambda _t, _b: "Team cap")
    d.POLL_INTERVAL_S = 0.02
    d.BACKOFF_INITIAL_S = 0.05
    d.BACKOFF_MAX_S = 0.2
    return d


@pytest.mark.parametrize("trouble", ["hang", "fail"])
async def test_a_stuck_webhook_does_not_stop_the_others_receiving(
    aclient: Any, redis_client: redis.Redis, trouble: str
) -> None:
    """Past the in-flight bound, one webhook's retries (a receiver that hangs, or answers
    500 for good) held every slot: the healthy webhook got no alert raised after that.
    Each webhook has its own bound now; the stuck one's alerts wait in the stream."""
    tenant = f"iso-{trouble}"
    stuck, healthy = await Receiver(trouble).start(), await Receiver().start()
    hooks = (
        Webhook("stuck", stuck.url(), SECRET, None, 60_000),
        Webhook("healthy", healthy.url(), SECRET),
    )
    d = deliverer(aclient, hooks, tenant)
    d.MAX_IN_FLIGHT = 5
    run = d.lifecycle()
    await anext(run)
    try:
        raise_alerts(redis_client, tenant, 8)
        await eventually(lambda: len(set(healthy.ok_ids())) == 8, "first alerts, healthy")
        await eventually(lambda: len(stuck.bodies) >= 5, "the stuck webhook's bound filled")
        raise_alerts(redis_client, tenant, 8, start=8)
        await eventually(lambda: len(set(healthy.ok_ids())) == 16, "later alerts, healthy")
        assert sorted(healthy.ok_ids()) == sorted(set(healthy.ok_ids()))  # each once
        # The stuck webhook never holds more than its bound at once.
        assert len({i for i, _b, _m in stuck.bodies}) == 5
    finally:
        await anext(run, None)
        await stuck.stop()
        await healthy.stop()
