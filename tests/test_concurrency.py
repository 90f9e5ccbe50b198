"""Invariants 1 and 2 under real concurrency: several sidecar processes share one Redis and
hundreds of concurrent clients race for the same budgets. Granted estimates never sum past
a block limit, and a request denied by one budget holds nothing on any other."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import redis

from sidecar import keys
from sidecar.money import usd_to_micro
from tests.harness import RedisServer, sidecars

CLIENTS = 240
REQUESTS_PER_CLIENT = 8
# These tests are about overshoot, not timeouts: a slow shared CI machine must not turn a
# decision into a fail-closed 503.
# The random estimates here go down to one micro-USD: the floor must not raise them.
SETTINGS = {"redis_timeout_ms": 5000, "min_estimate_usd": 0.000001}


def held_and_used(client: redis.Redis) -> dict[str, tuple[int, int]]:
    """cid -> (used, held) micro-USD, read raw from the tenant's counter hash."""
    raw = client.hgetall(keys.tenant_keys("default").counters)
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for field, value in raw.items():
        kind, cid = field.split(":", 1)
        if kind not in ("u", "h"):
            continue  # "w:" recent-spend windows (forecasts), "a:" alerted thresholds
        out[cid][0 if kind == "u" else 1] = int(value)
    return {cid: (v[0], v[1]) for cid, v in out.items()}


async def storm(
    urls: list[str], bodies: Callable[[int, int], dict[str, Any]]
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """CLIENTS concurrent clients, each with its own connection, alternating sidecars."""
    results: list[tuple[dict[str, Any], dict[str, Any]]] = []
    start = asyncio.Event()

    async def one_client(n: int) -> None:
        url = urls[n % len(urls)] + "/v1/authorize"
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            await start.wait()
            for i in range(REQUESTS_PER_CLIENT):
                body = bodies(n, i)
                async with session.post(url, json=body) as resp:
                    assert resp.status == 200, await resp.text()
                    results.append((body, await resp.json()))

    tasks = [asyncio.create_task(one_client(n)) for n in range(CLIENTS)]
    await asyncio.sleep(0.2)
    start.set()
    await asyncio.gather(*tasks)
    return results


async def test_no_overshoot_one_budget_two_processes(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    write_config: Callable[[dict[str, Any]], Path],
) -> None:
    path = write_config(
        {
            "budgets": [
                {
                    "id": "cap",
                    "name": "One dollar",
                    "scope": "organization",
                    "limit_usd": 1.0,
                    "period": "monthly",
                }
            ],
            "settings": SETTINGS,
        }
    )
    rng = random.Random(7)
    amounts = [
        [rng.randint(1_000, 12_000) for _ in range(REQUESTS_PER_CLIENT)] for _ in range(CLIENTS)
    ]

    def body(n: int, i: int) -> dict[str, Any]:
        return {"estimated_usd": amounts[n][i] / 1_000_000, "lease_ms": 600_000}

    with sidecars(redis_server.url, str(path), count=2) as procs:
        results = await storm([p.url for p in procs], body)
        granted = [usd_to_micro(b["estimated_usd"]) for b, d in results if d["allowed"]]
        denied = [b for b, d in results if not d["allowed"]]
        assert len(results) == CLIENTS * REQUESTS_PER_CLIENT
        assert denied, "the storm must exhaust the budget for this test to mean anything"
        assert sum(granted) <= 1_000_000
        counters = held_and_used(redis_client)
        assert len(counters) == 1
        ((used, held),) = counters.values()
        assert (used, held) == (0, sum(granted))

        # What is left is exactly grantable, and one micro-USD more is not.
        left = 1_000_000 - sum(granted)
        async with aiohttp.ClientSession() as session:
            url = procs[0].url + "/v1/authorize"
            over = {"estimated_usd": (left + 1) / 1_000_000}
            async with session.post(url, json=over) as resp:
                assert (await resp.json())["allowed"] is False
            if left > 0:
                exact = {"estimated_usd": left / 1_000_000}
                async with session.post(url, json=exact) as resp:
                    assert (await resp.json())["allowed"] is True
        ((used, held),) = held_and_used(redis_client).values()
        assert held == 1_000_000 if left > 0 else held == sum(granted)


async def test_stacked_budgets_all_or_nothing(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    write_config: Callable[[dict[str, Any]], Path],
) -> None:
    def budget(id: str, scope: str, limit: float, period: str, **kw: str) -> dict[str, Any]:
        return {"id": id, "name": id, "scope": scope, "limit_usd": limit, "period": period, **kw}

    budgets = [
        budget("org", "organization", 1.0, "monthly"),
        budget("team-a", "team", 0.4, "daily", scope_id="a"),
        budget("agent", "agent", 0.3, "weekly"),
        budget("user", "user", 0.05, "daily"),
    ]
    path = write_config({"budgets": budgets, "settings": SETTINGS})
    limits = {b["id"]: usd_to_micro(b["limit_usd"]) for b in budgets}
    rng = random.Random(11)
    plan = [
        [
            {
                "team_id": rng.choice(["a", "b"]),
                "agent_id": f"agent-{rng.randrange(4)}",
                "user_id": f"user-{rng.randrange(30)}",
                "estimated_usd": rng.randint(500, 9_000) / 1_000_000,
                "lease_ms": 600_000,
            }
            for _ in range(REQUESTS_PER_CLIENT)
        ]
        for _ in range(CLIENTS)
    ]

    with sidecars(redis_server.url, str(path), count=3) as procs:
        results = await storm([p.url for p in procs], lambda n, i: plan[n][i])

    # The held amount of every counter is exactly the sum of the estimates granted to
    # requests it applies to: a denied request held nothing anywhere.
    expected: dict[tuple[str, str], int] = defaultdict(int)
    denials_by: dict[str, int] = defaultdict(int)
    for body, decision in results:
        if not decision["allowed"]:
            denials_by[decision["budget_info"]["budget_id"]] += 1
            continue
        est = usd_to_micro(body["estimated_usd"])
        expected[("org", "default")] += est
        if body["team_id"] == "a":
            expected[("team-a", "a")] += est
        expected[("agent", body["agent_id"])] += est
        expected[("user", body["user_id"])] += est
    actual = {}
    for cid, (used, held) in held_and_used(redis_client).items():
        budget_id, entity, _window = keys.parse_counter_id(cid)
        assert used == 0
        actual[(budget_id, entity)] = held
        assert held <= limits[budget_id], (cid, held)
    assert {k: v for k, v in actual.items() if v} == {k: v for k, v in expected.items() if v}
    # Each layer of the hierarchy denied something, so each was exercised under the race.
    assert set(denials_by) >= {"user", "team-a"}, dict(denials_by)
