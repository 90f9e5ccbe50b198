"""Attack 21: the rate limits at their boundaries and under faults, on a real redis-server
with in-process replicas, each over its own FakeClock (the limiters' clock too).

Concurrency slots ended every way at once (settle, release, a lease reclaimed by another
replica, the cancel of a timed-out authorize, a replayed settle, an unknown id) return to
exactly zero; N+1 concurrent authorizes over three replicas admit exactly N; a token
limit at and past its size, and tokens 0; a window's edge judged by replicas whose clocks
differ by a few ms; shadow limits never deny; limits changed through the admin API while
holds are out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis

from sidecar import keys
from sidecar.api.app import ENGINE
from sidecar.clock import FakeClock
from tests.conftest import T0_MS
from tests.harness import RedisServer
from tests.inprocess import app_over, call

CTR = keys.tenant_keys("default").counters
SLOT = "n:conc/default"
PRICING = [{"provider": "p", "model": "m", "input_per_1k": 1, "output_per_1k": 1}]


def rate(id: str, metric: str, limit: int, window: str | None = None, **kw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": id, "scope": "organization", "metric": metric, "limit": limit}
    if window is not None:
        doc["window"] = window
    return {**doc, **kw}


Replicas = Callable[..., Any]


@pytest.fixture
async def replicas(redis_server: RedisServer, redis_client: redis.Redis) -> AsyncIterator[Replicas]:
    """replicas(doc, n, skews) -> n apps over the session's Redis, replica i on a FakeClock
    at T0_MS + skews[i]."""
    made: list[Any] = []

    async def make(doc: dict[str, Any], n: int, skews: tuple[int, ...] = ()) -> list[Any]:
        out = []
        for i in range(n):
            clock = FakeClock(T0_MS + (skews[i] if i < len(skews) else 0))
            settings = {"redis_timeout_ms": 5000}
            client = await app_over(redis_server.url, {**doc, "settings": settings}, clock=clock)
            client.clock = clock  # type: ignore[attr-defined]
            made.append(client)
            out.append(client)
        return out

    yield make
    for c in made:
        await c.close()


def slots(rc: redis.Redis, field: str = SLOT) -> int | None:
    value = rc.hget(CTR, field)
    return None if value is None else int(value)


async def authorize(client: Any, **body: Any) -> dict[str, Any]:
    base = {} if "estimated_tokens_in" in body else {"estimated_usd": 0.01}
    status, out = await call(client, "POST", "/v1/authorize", {**base, **body})
    assert status == 200, out
    return out


# ---- concurrency: every way a hold ends, at once ---------------------------------------


async def test_slots_ended_every_way_return_to_exactly_zero(
    replicas: Replicas, redis_client: redis.Redis
) -> None:
    a, b, c = await replicas({"rate_limits": [rate("conc", "concurrent", 4)]}, 3)
    held = [await authorize(x, lease_ms=lease) for x, lease in
            ((a, 60_000), (b, 60_000), (c, 1_000), (a, 60_000))]  # fmt: skip
    assert all(d["allowed"] for d in held)
    assert slots(redis_client) == 4
    assert not (await authorize(b))["allowed"]
    assert slots(redis_client) == 4  # a denied call takes no slot
    r1, r2, r3, r4 = (d["reservation_id"] for d in held)

    # The lease of r3 ends; every replica's clock moves past it.
    for x in (a, b, c):
        x.clock.advance(1_000)

    # All at once, each over another replica: a settle, its replay, a release, its replay,
    # a settle of an unknown id, a settle and a release of the reclaimed r3, and a call
    # on c that reclaims r3 (whichever of them runs first reclaims it) and takes its slot.
    outcomes = await asyncio.gather(
        call(b, "POST", "/v1/settle", {"reservation_id": r1, "cost_usd": 0.01}),
        call(c, "POST", "/v1/settle", {"reservation_id": r1, "cost_usd": 0.01}),
        call(a, "POST", "/v1/release", {"reservation_id": r2}),
        call(b, "POST", "/v1/release", {"reservation_id": r2}),
        call(a, "POST", "/v1/settle", {"reservation_id": "0" * 32, "cost_usd": 0.01}),
        call(b, "POST", "/v1/settle", {"reservation_id": r3, "cost_usd": 0.01}),
        call(a, "POST", "/v1/release", {"reservation_id": r3}),
        call(c, "POST", "/v1/authorize", {"estimated_usd": 0.01, "lease_ms": 60_000}),
    )
    assert all(s in (200, 404, 409) for s, _ in outcomes), [
        (s, o.get("title"), o.get("state")) for s, o in outcomes
    ]
    r5 = outcomes[-1][1]
    assert r5["allowed"], r5
    # Left: r4 and r5.
    assert slots(redis_client) == 2

    # The cancel of a timed-out authorize (what the engine runs when Redis timed out on
    # it), on r4 that did run: frees its slot once; a settle after it frees nothing more.
    await a.server.app[ENGINE]._cancel("default", r4, a.clock.now_ms() + 60_000)
    assert slots(redis_client) == 1
    await call(b, "POST", "/v1/settle", {"reservation_id": r4, "cost_usd": 0.01})
    await call(c, "POST", "/v1/release", {"reservation_id": r4})
    assert slots(redis_client) == 1
    await call(c, "POST", "/v1/settle", {"reservation_id": r5["reservation_id"], "cost_usd": 0})
    # Back at exactly zero: the field is gone (absent reads as zero, never below).
    assert slots(redis_client) is None
    # And exactly four slots are there again, no more (none given twice, none leaked).
    again = await asyncio.gather(*(authorize(x) for x in (a, b, c, a, b, c)))
    assert sum(d["allowed"] for d in again) == 4
    assert slots(redis_client) == 4


@pytest.mark.parametrize("n", [1, 3, 7])
async def test_n_plus_one_concurrent_authorizes_over_three_replicas_admit_exactly_n(
    replicas: Replicas, redis_client: redis.Redis, n: int
) -> None:
    apps = await replicas({"rate_limits": [rate("conc", "concurrent", n)]}, 3, (0, 3, -4))
    decided = await asyncio.gather(*(authorize(apps[i % 3]) for i in range(n + 1)))
    assert sum(d["allowed"] for d in decided) == n
    (denied,) = [d for d in decided if not d["allowed"]]
    assert denied["rate_limit"]["rate_limit_id"] == "conc"
    assert slots(redis_client) == n


# ---- tokens at and past the limit's size -----------------------------------------------


async def test_tokens_past_the_whole_limit_exactly_at_it_and_zero(
    replicas: Replicas, redis_client: redis.Redis
) -> None:
    (a,) = await replicas({"rate_limits": [rate("tpm", "tokens", 100, "1s", burst=20)],
                           "pricing": PRICING}, 1)  # fmt: skip

    def toks(n: int) -> dict[str, Any]:
        return {"provider": "p", "model": "m", "estimated_tokens_in": n, "estimated_tokens_out": 0}

    # One token more than limit + burst: never admitted, so no Retry-After.
    resp = await a.post("/v1/authorize", json=toks(121))
    big = await resp.json()
    assert not big["allowed"] and big["reason"] == "rate_limit"
    assert big["retry_after_ms"] is None and "Retry-After" not in resp.headers
    assert redis_client.hget(CTR, "d:tpm/default/100/1000") is None  # charged nothing
    # Exactly limit + burst: admitted on an empty limiter (debt 120 x 1000).
    at = await authorize(a, **toks(120))
    assert at["allowed"], at
    assert int(redis_client.hget(CTR, "d:tpm/default/100/1000")) == 120 * 1000
    # Debt 120000 over the allowance 20000: 1000 ms to wait, even for a call of 0 tokens.
    zero = await authorize(a, **toks(0))
    assert not zero["allowed"] and zero["retry_after_ms"] == 1000
    a.clock.advance(999)
    assert (await authorize(a, **toks(0)))["retry_after_ms"] == 1
    a.clock.advance(1)
    zero = await authorize(a, **toks(0))
    assert zero["allowed"], zero
    # A 0-token call charges nothing: the debt is the allowance, as paid back.
    assert int(redis_client.hget(CTR, "d:tpm/default/100/1000")) == 20 * 1000
    # Settled with its real tokens, it is charged them.
    await call(a, "POST", "/v1/settle", {"reservation_id": zero["reservation_id"],
                                         "tokens_in": 5, "tokens_out": 0})  # fmt: skip
    assert int(redis_client.hget(CTR, "d:tpm/default/100/1000")) == 25 * 1000


# ---- a window's edge, two replicas a few ms apart --------------------------------------


async def test_window_edge_judged_by_replicas_whose_clocks_differ(
    replicas: Replicas, redis_client: redis.Redis
) -> None:
    # One call per 1000 ms (burst 0); replica b's clock runs 3 ms behind a's.
    a, b = await replicas({"rate_limits": [rate("rps", "requests", 1, "1s")]}, 2, (0, -3))
    assert (await authorize(a))["allowed"]  # debt 1000 at T0
    admitted = [T0_MS]
    # b at T0 + 999 by a's clock (its own T0 + 996): 1 ms before the window's end.
    b.clock.advance(999)
    d = await authorize(b)
    assert not d["allowed"] and d["retry_after_ms"] == 4  # by b's clock, 3 ms late
    # a at T0 + 999 - 1 ms: denied, 1 ms left.
    a.clock.advance(999)
    d = await authorize(a)
    assert not d["allowed"] and d["retry_after_ms"] == 1
    # a at the window's end (+0): admitted.
    a.clock.advance(1)
    assert (await authorize(a))["allowed"]
    admitted.append(T0_MS + 1000)
    # b, behind, at T0 + 1001 by a's clock: its reading (T0 + 998) is before the last
    # update, which never moves back: the debt stands whole, denied.
    b.clock.advance(2)
    d = await authorize(b)
    assert not d["allowed"] and d["retry_after_ms"] == 1000
    # +1 ms past a's window: still 999 ms to go for a.
    a.clock.advance(1)
    d = await authorize(a)
    assert not d["allowed"] and d["retry_after_ms"] == 999
    assert int(redis_client.hget(CTR, "l:rps/default/1/1000")) == T0_MS + 1000
    # Exactly one call in any window of 1000 ms by the limiter's clock.
    assert admitted == [T0_MS, T0_MS + 1000]


# ---- shadow limits never deny ----------------------------------------------------------


async def test_shadow_limits_never_deny_and_count_only_what_they_would_admit(
    replicas: Replicas, redis_client: redis.Redis
) -> None:
    doc = {"rate_limits": [rate("conc", "concurrent", 1, mode="shadow"),
                           rate("tpm", "tokens", 100, "1s", mode="shadow"),
                           rate("rps", "requests", 1, "1s", mode="shadow")],
           "pricing": PRICING}  # fmt: skip
    a, b = await replicas(doc, 2)
    body = {"provider": "p", "model": "m", "estimated_tokens_in": 101, "estimated_tokens_out": 0}
    resp = await a.post("/v1/authorize", json=body)
    first = await resp.json()
    # Past the token limit's size: would deny, allowed, no Retry-After.
    assert first["allowed"] and first["would_deny"] and "Retry-After" not in resp.headers
    assert {r["rate_limit_id"]: r["would_deny"] for r in first["rate_limits"]} == {
        "conc": False, "tpm": True, "rps": False}  # fmt: skip
    decided = await asyncio.gather(*(authorize(x) for x in (a, b, a, b)))
    assert all(d["allowed"] and d["would_deny"] for d in decided)
    assert all(d["retry_after_ms"] is None and d["reason"] is None for d in decided)
    # The shadow concurrency limit counted only the call it would have admitted.
    assert slots(redis_client) == 1
    assert int(redis_client.hget(CTR, "d:rps/default/1/1000")) == 1000
    for d in [first, *decided]:
        await call(b, "POST", "/v1/settle", {"reservation_id": d["reservation_id"],
                                             "cost_usd": 0.01})  # fmt: skip
    assert slots(redis_client) is None
