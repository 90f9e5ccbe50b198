"""Redis frozen mid-load: the circuit breaker stops waiting on it, decisions answer by the
fail mode at once, and decisions come back by themselves once Redis does."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from sidecar.api.app import STORE, create_app
from sidecar.resp import CircuitBreaker
from sidecar.store import RedisStore
from tests.conftest import make_config
from tests.harness import RedisServer


def test_breaker_opens_after_threshold_probes_after_cooldown_and_closes() -> None:
    b = CircuitBreaker(threshold=3, cooldown_s=0.25)
    for t in (0.0, 0.1):
        b.failure(t)
    assert b.allow(0.11) and not b.is_open  # two failures: still closed
    b.failure(0.2)
    assert b.is_open and b.opened == 1
    assert not b.allow(0.3) and not b.allow(0.449)  # cooling down: no call waits
    assert b.allow(0.45)  # one probe...
    assert not b.allow(0.46)  # ...at a time
    b.failure(0.5)  # the probe failed: open again
    assert not b.allow(0.6) and b.allow(0.75)
    b.success()
    assert not b.is_open and b.allow(0.76) and b.allow(0.77)
    assert b.opened == 1


async def post(client: TestClient[Any, Any], path: str, body: dict[str, Any]) -> Any:
    resp = await client.post(path, json=body)
    return resp.status, await resp.json()


async def test_frozen_redis_opens_the_breaker_and_decisions_come_back(
    server: RedisServer,
) -> None:
    doc = {
        "budgets": [{"id": "b", "name": "B", "scope": "user", "limit_usd": 5, "period": "daily"}],
        "settings": {"redis_timeout_ms": 50, "fail_mode": "open"},
    }
    store = RedisStore.from_url(server.url, timeout_ms=50)
    client = TestClient(TestServer(create_app(make_config(doc), store)))
    await client.start_server()
    breaker = client.app[STORE]._hot.breaker  # type: ignore[attr-defined]
    call = {"user_id": "u1", "estimated_usd": 0.01}
    try:
        status, d = await post(client, "/v1/authorize", call)
        assert status == 200 and not d["degraded"]
        assert server.process is not None
        pid = server.process.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            waited, fast = [], []
            for _ in range(breaker.threshold):  # each waits for the timeout
                start = time.monotonic()
                status, d = await post(client, "/v1/authorize", call)
                waited.append(time.monotonic() - start)
                assert status == 200 and d["degraded"] and d["lease_expires_at"] is None
            assert breaker.is_open and breaker.opened == 1
            for _ in range(50):  # the breaker answers: nothing is queued to Redis
                start = time.monotonic()
                status, d = await post(client, "/v1/authorize", call)
                fast.append(time.monotonic() - start)
                assert status == 200 and d["degraded"]
                protocol = client.app[STORE]._hot._protocol  # type: ignore[attr-defined]
                assert protocol is None or not protocol._waiting
            status, _ = await post(client, "/v1/check", {"user_id": "u1"})
            assert status == 200
            assert (await client.get("/readyz")).status == 503
        finally:
            os.kill(pid, signal.SIGCONT)
        back = time.monotonic()
        resumed = None
        while time.monotonic() < back + 5:
            status, d = await post(client, "/v1/authorize", call)
            if not d["degraded"]:
                resumed = time.monotonic() - back
                break
            await asyncio.sleep(0.01)
        assert resumed is not None, "decisions did not come back"
        assert (await client.get("/readyz")).status == 200
        print(
            f"outage: first {len(waited)} calls {statistics.median(waited) * 1000:.0f} ms each "
            f"(timeout 50), then p50 {statistics.median(fast) * 1000:.2f} ms with the breaker "
            f"open; decisions again {resumed * 1000:.0f} ms after Redis returned"
        )
    finally:
        await client.close()
