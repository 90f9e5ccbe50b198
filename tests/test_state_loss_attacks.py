"""Attacks on "the cap holds" when Redis loses what it held or kills our script.

1. A SCRIPT KILL (an operator's redis-cli) of one of our scripts while it runs: Redis
   answers the caller with an error reply; it allows the kill only before the script's
   first write, so nothing was written. The answer is the configured fail mode, never a 500.
2. Redis restarted empty (no persistence, a deleted dump), a FLUSHALL, a failover to an
   empty replica, while sidecars run and hold reservations: each surface is tried after
   the loss, and the sidecar must notice it (sidecar.state_loss), say so (log, metric,
   /readyz, an alert) and put back what it can (the admin API's definitions, the stops).

Each test runs the app in-process over its own redis-server (harness), which it restarts
or flushes as it likes.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from sidecar.api.app import create_app
from sidecar.clock import FakeClock
from sidecar.keys import tenant_keys
from sidecar.store import RedisStore
from tests.conftest import T0_MS, make_config
from tests.harness import RedisServer

GUARD_S = 10.0  # not a timing assertion: only keeps a hang from hanging the suite
TENANT = tenant_keys("default")


@pytest.fixture
def server() -> Iterator[RedisServer]:
    srv = RedisServer().start()
    try:
        yield srv
    finally:
        srv.cleanup()


async def app_over(url: str, document: Any, clock: FakeClock | None = None) -> TestClient[Any, Any]:
    cfg = make_config(document)
    store = RedisStore.from_url(url, timeout_ms=cfg.settings.redis_timeout_ms)
    app = create_app(cfg, store, clock=clock or FakeClock(T0_MS))
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def call(
    client: TestClient[Any, Any], method: str, path: str, body: Any = None
) -> tuple[int, dict[str, Any]]:
    """(status, JSON body); a 500 or a stack trace fails the test wherever it appears."""

    async def go() -> tuple[int, dict[str, Any]]:
        resp = await client.request(method, path, json=body)
        text = await resp.text()
        assert "Traceback" not in text, text
        assert resp.status != 500, text
        return resp.status, json.loads(text) if text else {}

    return await asyncio.wait_for(go(), GUARD_S)


# ---- 1. SCRIPT KILL of our script ---------------------------------------------------------

# check.lua over this many budgets runs ~3 ms in Redis (measured: 2000 budgets ~7 ms), well
# past a busy-reply-threshold of 1 ms, and it writes nothing (no lease has ended): so an
# operator's SCRIPT KILL may kill it, as it would a real slow call on a loaded server.
KILL_BUDGETS = 2500
KILL_CALLS_MAX = 150


@pytest.mark.parametrize("fail_mode", ["closed", "open"])
async def test_a_script_kill_of_our_running_script_answers_the_fail_mode(
    server: RedisServer, fail_mode: str
) -> None:
    budgets = [
        {"id": f"b{i}", "name": f"b{i}", "scope": "agent", "scope_id": "a1",
         "limit_usd": 100.0, "period": "daily"}
        for i in range(KILL_BUDGETS)
    ]  # fmt: skip
    doc = {"budgets": budgets, "settings": {"fail_mode": fail_mode}}
    client = await app_over(server.url, doc)
    rc = server.client()
    stop = threading.Event()
    kills = 0

    def killer() -> None:
        # An operator's redis-cli SCRIPT KILL, again and again: NOTBUSY while no script
        # runs past the threshold, OK when it killed one.
        nonlocal kills
        with server.client() as k:
            while not stop.is_set():
                try:
                    k.script_kill()
                    kills += 1
                except redis.ResponseError as exc:
                    assert "NOTBUSY" in str(exc) or "UNKILLABLE" in str(exc), exc

    body = {"agent_id": "a1", "estimated_usd": 0.01}
    answers = {"decided": 0, "fail_mode": 0}
    try:
        status, _ = await call(client, "POST", "/v1/check", body)  # scripts loaded
        assert status == 200
        rc.config_set("busy-reply-threshold", 1)
        thread = threading.Thread(target=killer)
        thread.start()
        for _ in range(KILL_CALLS_MAX):
            status, got = await call(client, "POST", "/v1/check", body)
            if status == 200 and not got.get("degraded"):
                answers["decided"] += 1
            elif fail_mode == "closed":
                assert status == 503 and got["degraded"] is True, (status, got)
                answers["fail_mode"] += 1
            else:
                assert status == 200 and got["degraded"] is True and got["allowed"], got
                answers["fail_mode"] += 1
            if answers["fail_mode"] >= 3:
                break
        stop.set()
        thread.join()
        # Every kill was of one of our checks (nothing else runs scripts here but the
        # sidecar's own sweep, whose kill is its own retry): each answered the fail mode.
        assert kills >= 1, "no SCRIPT KILL landed on a running script"
        assert answers["fail_mode"] >= 1, (answers, kills)
        rc.config_set("busy-reply-threshold", 5000)
        status, got = await call(client, "POST", "/v1/check", body)
        assert status == 200 and not got["degraded"], got
    finally:
        stop.set()
        rc.close()
        await client.close()
