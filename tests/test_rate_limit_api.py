"""/v1/rate-limits: CRUD, strict validation that writes nothing, config-file limits
read-only, immediate enforcement on the writing replica, propagation to another process
within the poll interval, and persistence across restarts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from sidecar import keys
from sidecar.clock import FakeClock
from tests.conftest import ClientFactory
from tests.harness import RedisServer, SidecarProcess, data_dump, sidecars

CONFIG: dict[str, Any] = {
    "rate_limits": [
        # burst 999: 1000 at once, not one every 60 ms (GCRA paces a burst-0 limit)
        {"id": "from-file", "scope": "organization", "metric": "requests", "limit": 1000,
         "window": "1m", "burst": 999}
    ]
}  # fmt: skip
API_LIMIT = {"id": "per-user", "scope": "user", "metric": "requests", "limit": 1,
             "window": "10s"}  # fmt: skip


dump = data_dump  # every key but the state markers (tests.harness)


async def test_create_read_list_replace_delete(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    client = await make_client(CONFIG)
    created = await client.post("/v1/rate-limits", json=API_LIMIT)
    assert created.status == 201
    body = await created.json()
    assert body == {**API_LIMIT, "burst": 0, "scope_id": None, "model": None,
                    "provider": None, "mode": "enforce", "source": "api"}  # fmt: skip

    listed = await (await client.get("/v1/rate-limits")).json()
    assert [(r["id"], r["source"]) for r in listed["rate_limits"]] == [
        ("from-file", "config"),
        ("per-user", "api"),
    ]
    assert (await (await client.get("/v1/rate-limits/per-user")).json())["limit"] == 1
    assert redis_client.hkeys(keys.definitions("default")) == ["rl:per-user"]

    # Enforced at once on this replica: one per 10 s per user.
    call = {"user_id": "u1", "estimated_usd": 0.01}
    assert (await (await client.post("/v1/authorize", json=call)).json())["allowed"]
    denied = await (await client.post("/v1/authorize", json=call)).json()
    assert not denied["allowed"] and denied["rate_limit"]["rate_limit_id"] == "per-user"

    replaced = await client.put("/v1/rate-limits/per-user", json={**API_LIMIT, "limit": 5,
                                                                   "burst": 4})  # fmt: skip
    assert replaced.status == 200 and (await replaced.json())["limit"] == 5
    after = await (await client.post("/v1/authorize", json=call)).json()
    assert after["allowed"], (after["rate_limits"], after["message"])

    deleted = await client.delete("/v1/rate-limits/per-user")
    assert deleted.status == 204
    assert (await client.get("/v1/rate-limits/per-user")).status == 404
    assert redis_client.hkeys(keys.definitions("default")) == []
    for _ in range(3):
        assert (await (await client.post("/v1/authorize", json=call)).json())["allowed"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**API_LIMIT, "window": "ten seconds"}, "window"),
        ({**API_LIMIT, "limit": 0}, "limit"),
        ({**API_LIMIT, "metric": "calls"}, "metric"),
        ({**API_LIMIT, "extra": True}, "extra"),
        ({k: v for k, v in API_LIMIT.items() if k != "scope"}, "scope"),
        ({**API_LIMIT, "id": "has space"}, "id"),
        ({**API_LIMIT, "metric": "concurrent"}, "window"),
        ([API_LIMIT], "body"),
    ],
)
async def test_invalid_definitions_are_400_and_write_nothing(
    make_client: ClientFactory, redis_client: redis.Redis, body: Any, field: str
) -> None:
    client = await make_client(CONFIG)
    before = dump(redis_client)
    resp = await client.post("/v1/rate-limits", json=body)
    assert resp.status == 400
    assert resp.content_type == "application/problem+json"
    assert (await resp.json())["field"] == field
    assert dump(redis_client) == before


async def test_config_file_limits_are_read_only_and_unknown_ones_404(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(CONFIG)
    file_limit = {**API_LIMIT, "id": "from-file"}
    for resp in (
        await client.post("/v1/rate-limits", json=file_limit),
        await client.put("/v1/rate-limits/from-file", json=file_limit),
        await client.delete("/v1/rate-limits/from-file"),
    ):
        assert resp.status == 409, await resp.text()
        assert "config file" in (await resp.json())["detail"]
    for resp in (
        await client.get("/v1/rate-limits/nope"),
        await client.put("/v1/rate-limits/nope", json={**API_LIMIT, "id": "nope"}),
        await client.delete("/v1/rate-limits/nope"),
    ):
        assert resp.status == 404
    mismatch = await client.put("/v1/rate-limits/per-user", json={**API_LIMIT, "id": "other"})
    assert mismatch.status == 400 and (await mismatch.json())["field"] == "id"
    assert await (await client.post("/v1/rate-limits", json=API_LIMIT)).json()
    again = await client.post("/v1/rate-limits", json=API_LIMIT)
    assert again.status == 409
    assert redis_client.hkeys(keys.definitions("default")) == ["rl:per-user"]


async def _allowed(session: aiohttp.ClientSession, url: str, user: str) -> bool:
    body = {"user_id": user, "estimated_usd": 0.01}
    async with session.post(url + "/v1/check", json=body) as resp:
        return bool((await resp.json())["allowed"])


async def test_a_change_through_one_replica_is_enforced_by_another(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    write_config: Callable[[dict[str, Any]], Path],
) -> None:
    path = write_config(CONFIG)
    with sidecars(redis_server.url, str(path), count=2) as (a, b):
        async with aiohttp.ClientSession() as session:
            # B enforces nothing for u7 yet; a request per user per 10 s from now on.
            async with session.post(
                a.url + "/v1/authorize", json={"user_id": "u7", "estimated_usd": 0.01}
            ) as r:
                assert (await r.json())["allowed"]  # fmt: skip
            assert await _allowed(session, b.url, "u7")
            async with session.post(a.url + "/v1/rate-limits", json=API_LIMIT) as r:
                assert r.status == 201
            # The write happened after u7's request: the limiter starts empty, so B's
            # first authorize passes and the second is denied, once B has the limit.
            deadline = time.monotonic() + 10
            seen = False
            while time.monotonic() < deadline and not seen:
                async with session.post(
                    b.url + "/v1/authorize", json={"user_id": "u8", "estimated_usd": 0.01}
                ) as r:
                    limits = (await r.json())["rate_limits"]
                    seen = any(x["rate_limit_id"] == "per-user" for x in limits)  # fmt: skip
                await asyncio.sleep(0.05)
            assert seen, "replica B never learned of the rate limit"
            assert not await _allowed(session, b.url, "u8")

            async with session.delete(a.url + "/v1/rate-limits/per-user") as r:
                assert r.status == 204
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not await _allowed(session, b.url, "u8"):
                await asyncio.sleep(0.05)
            assert await _allowed(session, b.url, "u8")


async def test_definitions_survive_a_restart(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    write_config: Callable[[dict[str, Any]], Path],
) -> None:
    path = write_config(CONFIG)
    first = SidecarProcess(redis_server.url, str(path)).start()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(first.url + "/v1/rate-limits", json=API_LIMIT) as r,
        ):
            assert r.status == 201
    finally:
        first.cleanup()
    second = SidecarProcess(redis_server.url, str(path)).start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(second.url + "/v1/rate-limits/per-user") as r:
                assert r.status == 200 and (await r.json())["source"] == "api"
            body = {"user_id": "u9", "estimated_usd": 0.01}
            async with session.post(second.url + "/v1/authorize", json=body) as r:
                assert (await r.json())["allowed"]
            async with session.post(second.url + "/v1/authorize", json=body) as r:
                assert not (await r.json())["allowed"]
    finally:
        second.cleanup()
