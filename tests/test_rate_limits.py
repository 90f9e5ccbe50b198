"""Rate and concurrency limits (issue 4) on real Redis: the window bound under real
concurrency across two sidecar processes, token estimates corrected at settle,
concurrency slots, all-or-nothing with budgets, shadow mode, and invalid definitions."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from sidecar import config as config_mod
from sidecar import keys
from sidecar.clock import FakeClock
from tests.conftest import ClientFactory
from tests.harness import RedisServer, sidecars

CTR = keys.tenant_keys("default").counters
SETTINGS = {"redis_timeout_ms": 5000}


def rate(id: str, metric: str, limit: int, window: str | None = None, **kw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": id, "scope": "organization", "metric": metric, "limit": limit}
    if window is not None:
        doc["window"] = window
    return {**doc, **kw}


# ---- requests per window, two processes, 200 clients ---------------------------------------

LIMIT, BURST, WINDOW_MS = 100, 10, 2000


async def test_requests_per_window_never_exceed_limit_plus_burst(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    write_config: Callable[[dict[str, Any]], Path],
) -> None:
    """GCRA's bound: at most limit + burst admitted in ANY interval of one window.

    The limiter judges each call at Redis TIME, some instant between the client sending it
    and receiving the answer. A call is counted in a window only if both its send and its
    receipt fall inside: that count can only be lower than the limiter's own, so the
    assertion is sound (tolerance 0) without knowing Redis's clock.
    """
    path = write_config(
        {"rate_limits": [rate("rpm", "requests", LIMIT, f"{WINDOW_MS}ms", burst=BURST)],
         "settings": SETTINGS}
    )  # fmt: skip
    admitted: list[tuple[float, float]] = []
    denied = 0
    run_s = 3 * WINDOW_MS / 1000

    with sidecars(redis_server.url, str(path), count=2) as procs:
        start = time.monotonic() + 0.3
        stop = start + run_s

        async def client(n: int) -> None:
            nonlocal denied
            url = procs[n % 2].url + "/v1/authorize"
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
                await asyncio.sleep(max(0.0, start - time.monotonic()))
                while time.monotonic() < stop:
                    sent = time.monotonic()
                    async with s.post(url, json={"estimated_usd": 0.000001}) as resp:
                        d = await resp.json()
                    received = time.monotonic()
                    if d["allowed"]:
                        admitted.append((sent, received))
                    else:
                        denied += 1
                        assert d["rate_limit"]["rate_limit_id"] == "rpm"
                        assert d["retry_after_ms"] > 0
                        await asyncio.sleep(0.01)

        await asyncio.gather(*(client(n) for n in range(200)))

    assert denied > 0 and len(admitted) > LIMIT, (denied, len(admitted))
    w = WINDOW_MS / 1000
    # The three windows of the run, and every window that starts at an admitted call.
    starts = [start + k * w for k in range(3)] + [s for s, _ in admitted]
    worst = max(sum(1 for s, r in admitted if t <= s and r < t + w) for t in starts)
    assert worst <= LIMIT + BURST, worst
    # Over the whole run: the bucket's capacity plus what the rate refills, at most.
    assert len(admitted) <= LIMIT + BURST + LIMIT * (max(r for _, r in admitted) - start) / w


# ---- tokens: estimates held, corrected at settle -----------------------------------------


async def test_token_window_stays_within_the_documented_bound(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    """Sequential calls (each settled before the next): in any window, the actual tokens
    of admitted calls are at most limit + burst + the largest single call."""
    limit, burst, window_ms = 1000, 200, 1000
    client = await make_client(
        {
            "rate_limits": [rate("tpm", "tokens", limit, f"{window_ms}ms", burst=burst)],
            "pricing": [{"provider": "p", "model": "m", "input_per_1k": 0.001,
                         "output_per_1k": 0.002}],
        }
    )  # fmt: skip
    rng = random.Random(5)
    admitted: list[tuple[int, int]] = []  # (decision ms, actual tokens)
    denials = 0
    for _ in range(600):
        clock.advance(rng.randint(0, 40))
        est_in, est_out = rng.randint(20, 150), rng.randint(10, 100)
        d = await (await client.post("/v1/authorize", json={
            "provider": "p", "model": "m",
            "estimated_tokens_in": est_in, "estimated_tokens_out": est_out,
        })).json()  # fmt: skip
        if not d["allowed"]:
            denials += 1
            assert d["rate_limit"]["metric"] == "tokens" and d["retry_after_ms"] > 0
            continue
        # Actual usage off the estimate by up to +-50%.
        act_in = max(0, est_in + rng.randint(-est_in // 2, est_in // 2))
        act_out = max(0, est_out + rng.randint(-est_out // 2, est_out // 2))
        s = await client.post("/v1/settle", json={
            "reservation_id": d["reservation_id"], "tokens_in": act_in, "tokens_out": act_out,
        })  # fmt: skip
        assert s.status == 200
        admitted.append((clock.now_ms(), act_in + act_out))
    assert denials > 0 and len(admitted) > 50
    largest = max(t for _, t in admitted)
    for t0, _ in admitted:
        in_window = sum(tokens for t, tokens in admitted if t0 <= t < t0 + window_ms)
        assert in_window <= limit + burst + largest, (t0, in_window)


async def test_release_gives_estimated_tokens_back(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    client = await make_client(
        {"rate_limits": [rate("tpm", "tokens", 100, "1s")],
         "pricing": [{"provider": "p", "model": "m", "input_per_1k": 1, "output_per_1k": 1}]}
    )  # fmt: skip
    body = {"provider": "p", "model": "m", "estimated_tokens_in": 80, "estimated_tokens_out": 0}
    first = await (await client.post("/v1/authorize", json=body)).json()
    assert first["allowed"]
    # 80 tokens of debt: nothing more passes until it is paid back (burst 0)...
    assert not (await (await client.post("/v1/authorize", json=body)).json())["allowed"]
    # ...unless the call never happened.
    await client.post("/v1/release", json={"reservation_id": first["reservation_id"]})
    assert (await (await client.post("/v1/authorize", json=body)).json())["allowed"]


# ---- concurrency ------------------------------------------------------------------------


async def test_concurrency_limit_of_five_under_fifty_holders(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    client = await make_client({"rate_limits": [rate("conc", "concurrent", 5)]})
    body = {"estimated_usd": 0.01, "lease_ms": 10_000}
    decisions = await asyncio.gather(*(client.post("/v1/authorize", json=body) for _ in range(50)))
    bodies = [await d.json() for d in decisions]
    live = [b["reservation_id"] for b in bodies if b["allowed"]]
    assert len(live) == 5
    assert all(b["message"].startswith("Rate limit 'conc'") for b in bodies if not b["allowed"])
    assert int(redis_client.hget(CTR, "n:conc/default")) == 5

    # Releasing two frees exactly two slots.
    for rid in live[:2]:
        await client.post("/v1/release", json={"reservation_id": rid})
    again = [await (await client.post("/v1/authorize", json=body)).json() for _ in range(10)]
    assert sum(d["allowed"] for d in again) == 2

    # Leases ending free every slot, once: five pass again, then no more.
    clock.advance(10_000)
    after = [await (await client.post("/v1/authorize", json=body)).json() for _ in range(10)]
    assert sum(d["allowed"] for d in after) == 5
    assert int(redis_client.hget(CTR, "n:conc/default")) == 5


async def test_concurrency_never_more_than_five_live_across_two_processes(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    write_config: Callable[[dict[str, Any]], Path],
) -> None:
    path = write_config({"rate_limits": [rate("conc", "concurrent", 5)], "settings": SETTINGS})
    live = peak = granted = 0
    with sidecars(redis_server.url, str(path), count=2) as procs:

        async def holder(n: int) -> None:
            nonlocal live, peak, granted
            base = procs[n % 2].url
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
                for _ in range(15):
                    async with s.post(base + "/v1/authorize", json={"estimated_usd": 0.001}) as r:
                        d = await r.json()
                    if not d["allowed"]:
                        await asyncio.sleep(0.005)
                        continue
                    # Counted live only between the grant and the release request: the
                    # server's own count can only be higher.
                    live += 1
                    granted += 1
                    peak = max(peak, live)
                    await asyncio.sleep(0.01)
                    live -= 1
                    rid = {"reservation_id": d["reservation_id"]}
                    async with s.post(base + "/v1/release", json=rid) as r:
                        assert r.status == 200

        await asyncio.gather(*(holder(n) for n in range(50)))
    assert granted > 5 and peak <= 5, (granted, peak)
    assert peak == 5  # the limit was actually reached
    # A slot count back at zero is deleted (absent reads as zero).
    assert redis_client.hget(CTR, "n:conc/default") is None


# ---- all or nothing with budgets ---------------------------------------------------------


async def test_rate_denial_holds_no_budget_and_budget_denial_charges_no_rate(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    client = await make_client(
        {
            "budgets": [{"id": "b", "name": "B", "scope": "user", "limit_usd": 1.0,
                         "period": "daily"}],
            "rate_limits": [
                rate("rpm", "requests", 2, "10s", burst=1, scope="user"),
                rate("conc", "concurrent", 10, scope="user"),
            ],
        }
    )  # fmt: skip

    def raw() -> dict[str, str]:
        return redis_client.hgetall(CTR)

    ok = {"user_id": "u1", "estimated_usd": 0.1, "lease_ms": 60_000}
    for _ in range(2):
        assert (await (await client.post("/v1/authorize", json=ok)).json())["allowed"]
    before = raw()
    d = await (await client.post("/v1/authorize", json=ok)).json()
    assert not d["allowed"] and d["rate_limit"]["rate_limit_id"] == "rpm"
    assert d["budget_info"]["exceeded"] is False
    assert raw() == before  # no budget held, no slot taken, no request counted

    # A budget denial on another user: the rate limiters of that user stay untouched.
    big = {"user_id": "u2", "estimated_usd": 1.5}
    d = await (await client.post("/v1/authorize", json=big)).json()
    assert not d["allowed"] and d["budget_info"]["budget_id"] == "b"
    assert d["retry_after_ms"] > 0
    assert not any(field.endswith("/u2") for field in raw()), raw()


async def test_denials_carry_retry_after_and_ratelimit_headers(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    client = await make_client({"rate_limits": [rate("rps", "requests", 1, "2s", burst=1)]})
    for _ in range(2):
        assert (await (await client.post("/v1/authorize", json={"estimated_usd": 0.1})).json())[
            "allowed"
        ]
    resp = await client.post("/v1/authorize", json={"estimated_usd": 0.1})
    d = await resp.json()
    assert resp.status == 200 and not d["allowed"]
    # Debt 4000 (two calls x 2000), admitted at <= 2000 (burst 1 x 2000): 2000 ms to wait.
    assert d["retry_after_ms"] == 2000
    assert resp.headers["Retry-After"] == "2"
    assert resp.headers["RateLimit-Policy"] == '"rps";q=2;w=2'
    assert resp.headers["RateLimit"] == '"rps";r=0;t=2'
    clock.advance(2000)
    assert (await (await client.post("/v1/authorize", json={"estimated_usd": 0.1})).json())[
        "allowed"
    ]


async def test_shadow_mode_reports_would_deny_and_allows(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    client = await make_client(
        {"rate_limits": [rate("trial", "requests", 1, "10s", mode="shadow")]}
    )
    first = await (await client.post("/v1/authorize", json={"estimated_usd": 0.1})).json()
    second = await (await client.post("/v1/authorize", json={"estimated_usd": 0.1})).json()
    assert first["allowed"] and not first["would_deny"]
    assert second["allowed"] and second["would_deny"]
    assert second["rate_limits"][0]["would_deny"] is True
    assert second["rate_limits"][0]["mode"] == "shadow"


async def test_model_filter(make_client: ClientFactory, clock: FakeClock) -> None:
    client = await make_client(
        {"rate_limits": [rate("gpt", "requests", 1, "10s", model="gpt-4o")],
         "pricing": [{"provider": "openai", "model": "gpt-4o", "input_per_1k": 1,
                      "output_per_1k": 1},
                     {"provider": "openai", "model": "mini", "input_per_1k": 1,
                      "output_per_1k": 1}]}
    )  # fmt: skip
    gpt = {"provider": "openai", "model": "gpt-4o", "estimated_usd": 0.1}
    mini = {"provider": "openai", "model": "mini", "estimated_usd": 0.1}
    assert (await (await client.post("/v1/authorize", json=gpt)).json())["allowed"]
    assert not (await (await client.post("/v1/authorize", json=gpt)).json())["allowed"]
    for _ in range(3):
        d = await (await client.post("/v1/authorize", json=mini)).json()
        assert d["allowed"] and d["rate_limits"] == []


# ---- invalid definitions ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "path"),
    [
        ({"window": "2 seconds"}, "$.rate_limits[0].window"),
        ({"window": "50ms"}, "$.rate_limits[0].window"),
        ({"window": "2d"}, "$.rate_limits[0].window"),
        ({"window": None}, "$.rate_limits[0].window"),
        ({"limit": 0}, "$.rate_limits[0].limit"),
        ({"limit": "ten"}, "$.rate_limits[0].limit"),
        ({"burst": -1}, "$.rate_limits[0].burst"),
        ({"metric": "calls"}, "$.rate_limits[0].metric"),
        ({"mode": "dry-run"}, "$.rate_limits[0].mode"),
        ({"scope": "galaxy"}, "$.rate_limits[0].scope"),
        ({"limit": 1_000_000_000, "window": "1d"}, "$.rate_limits[0].limit"),
        ({"per_minute": 5}, "$.rate_limits[0].per_minute"),
        ({"id": "a b"}, "$.rate_limits[0].id"),
    ],
)
def test_invalid_definitions_name_the_field(limit: dict[str, Any], path: str) -> None:
    doc = {"rate_limits": [{**rate("r", "requests", 10, "1m"), **limit}]}
    doc["rate_limits"][0] = {k: v for k, v in doc["rate_limits"][0].items() if v is not None}
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.parse(doc, "limits.yaml")
    assert err.value.path == path, str(err.value)
    assert str(err.value).startswith("limits.yaml: ")


def test_concurrent_limits_take_no_window_and_ids_are_unique() -> None:
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.parse({"rate_limits": [rate("c", "concurrent", 5, "1s")]}, "x")
    assert err.value.path == "$.rate_limits[0].window"
    twice = [rate("r", "requests", 1, "1s"), rate("r", "tokens", 1, "1s")]
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.parse({"rate_limits": twice}, "x")
    assert err.value.path == "$.rate_limits[1].id"
