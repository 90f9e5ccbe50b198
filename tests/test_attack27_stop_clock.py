"""A stop's expiry on one clock, Redis's: two replicas whose own clocks disagree end a
stop at the same moment.

A stop's expiry was the making replica's clock plus the ttl, compared in authorize and
check with the deciding replica's clock: a replica whose clock ran ahead by the ttl or
more ignored the stop from its first call (a 3 s stop, a replica +3,000 ms ahead: 10 of
10 calls allowed), and one behind kept denying after it ended. lua/stops.lua now sets the
expiry from the stops' clock (the rate limiters' one: Redis TIME, or the FakeClock's
reading passed in its place here), and every decision, the sweep, GET /v1/stops and the
put-back after a loss compare with that clock.

Two sidecars in-process over one real redis-server. Each replica's own clock (now_ms:
leases, periods) is `skew` ms off a shared FakeClock that stands for Redis TIME (the
value every replica passes as the limiters' clock), or, in the last tests, off real time
with Redis TIME itself. Every count is exact.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from sidecar import keys
from sidecar.api.app import STATE_WATCH, SWEEPER
from sidecar.clock import FakeClock
from sidecar.definitions import DefinitionWatcher
from sidecar.periods import iso
from sidecar.state_loss import StateWatch
from sidecar.sweep import Sweeper
from tests.conftest import T0_MS
from tests.harness import RedisServer
from tests.inprocess import app_over, call

TK = keys.tenant_keys("default")
DOC = {
    "budgets": [{"id": "org", "name": "Org", "scope": "organization", "period": "monthly",
                 "limit_usd": 1000, "on_exceed": "block", "alert_thresholds": []}],
    "settings": {"fail_mode": "closed", "redis_timeout_ms": 2000},
}  # fmt: skip
TTL_S = 3
STOP = {"scope": "agent", "scope_id": "runaway", "reason": "loop", "ttl_s": TTL_S}
ASK = {"agent_id": "runaway", "estimated_usd": 0.01}
SKEWS = [-5_000, 0, 2_999, 3_000, 5_000]
N = 10


@pytest.fixture(autouse=True)
def quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    """No background loop (the sweep, the state check, the definitions' poll): each sweep
    and state check here is the test's own call, and Redis's command counts are the
    test's calls' alone."""

    async def idle(self: object) -> None:
        await asyncio.Event().wait()

    for loop in (Sweeper, StateWatch, DefinitionWatcher):
        monkeypatch.setattr(loop, "run", idle)


class ReplicaClock:
    """A replica's own clock `skew_ms` off `redis` (a FakeClock standing for Redis TIME),
    which it passes as the limiters' (and stops') clock, as SystemClock lets each script
    read Redis TIME."""

    def __init__(self, redis: FakeClock, skew_ms: int) -> None:
        self._redis = redis
        self._skew = skew_ms

    def now_ms(self) -> int:
        return self._redis.now_ms() + self._skew

    def limiter_ms(self) -> str:
        return self._redis.limiter_ms()


class SkewedSystemClock:
    """A replica's own clock `skew_ms` off real time; the limiters' and stops' clock is
    Redis TIME ('')."""

    def __init__(self, skew_ms: int) -> None:
        self._skew = skew_ms

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000 + self._skew

    def limiter_ms(self) -> str:
        return ""


async def allowed(client: Any, n: int = N, path: str = "/v1/authorize") -> int:
    """How many of `n` calls of the stopped agent were allowed."""
    got = 0
    for _ in range(n):
        status, decision = await call(client, "POST", path, ASK)
        assert status == 200, decision
        got += bool(decision["allowed"])
    return got


async def retry_after(client: Any) -> list[int | None]:
    """The denial's retry_after_ms on authorize and check (the stop's time left)."""
    out = []
    for path in ("/v1/authorize", "/v1/check"):
        status, decision = await call(client, "POST", path, ASK)
        assert status == 200 and decision["reason"] == "stop", decision
        out.append(decision["retry_after_ms"])
    return out


async def listed(client: Any) -> list[tuple[str, str | None]]:
    status, body = await call(client, "GET", "/v1/stops")
    assert status == 200, body
    return [(s["scope_id"], s["expires_at"]) for s in body["stops"]]


async def replicas(server: RedisServer, redis: FakeClock, skew_ms: int) -> tuple[Any, Any]:
    """A on Redis's clock, B `skew_ms` off it."""
    a = await app_over(server.url, DOC, clock=ReplicaClock(redis, 0))
    b = await app_over(server.url, DOC, clock=ReplicaClock(redis, skew_ms))
    return a, b


@pytest.mark.parametrize("skew_ms", SKEWS)
@pytest.mark.parametrize("maker", ["a", "b"])
async def test_a_stop_ends_at_its_expiry_on_redis_clock_whatever_each_replicas_clock(
    server: RedisServer, skew_ms: int, maker: str
) -> None:
    """A 3 s stop made on A (or on B, the skewed one): while Redis's clock is short of its
    expiry, 0 of 10 calls pass on either replica (authorize and check); from its expiry on,
    10 of 10. GET /v1/stops shows the same expires_at on both (Redis's clock + ttl), and a
    denial the same retry_after_ms (the ms left on Redis's clock)."""
    redis = FakeClock(T0_MS)
    a, b = await replicas(server, redis, skew_ms)
    try:
        status, stop = await call(a if maker == "a" else b, "POST", "/v1/stops", STOP)
        assert status == 201, stop
        counts = [await allowed(a), await allowed(b), await allowed(b, path="/v1/check")]
        assert counts == [0, 0, 0], counts
        expires_at = iso(T0_MS + TTL_S * 1000)
        assert stop["expires_at"] == expires_at and stop["created_at"] == iso(T0_MS), stop
        # The time left, on Redis's clock too (not expires_at minus the replica's clock).
        assert await retry_after(a) == await retry_after(b) == [3_000, 3_000]
        assert await listed(a) == await listed(b) == [("runaway", expires_at)]
        redis.advance(TTL_S * 1000 - 1)  # 1 ms short of the expiry on Redis's clock
        counts = [await allowed(a), await allowed(b), await allowed(b, path="/v1/check")]
        assert counts == [0, 0, 0], counts
        assert await listed(b) == [("runaway", expires_at)]
        assert await retry_after(a) == await retry_after(b) == [1, 1]
        redis.advance(1)  # at the expiry: over on every replica
        counts = [await allowed(a), await allowed(b), await allowed(b, path="/v1/check")]
        assert counts == [N, N, N], counts
        assert await listed(a) == await listed(b) == []
    finally:
        for c in (a, b):
            await c.close()


@pytest.mark.parametrize("skew_ms", SKEWS)
async def test_the_sweep_collects_a_stop_at_its_expiry_on_redis_clock(
    server: RedisServer, skew_ms: int
) -> None:
    """B's sweep (its own clock `skew_ms` off) leaves the stop's mirror and record while
    Redis's clock is short of the expiry, and collects both at it."""
    redis = FakeClock(T0_MS)
    a, b = await replicas(server, redis, skew_ms)
    sweeper: Sweeper = b.app[SWEEPER]  # type: ignore[index]
    field = keys.stop_field("agent", "runaway")
    try:
        status, stop = await call(a, "POST", "/v1/stops", STOP)
        assert status == 201, stop

        def present() -> tuple[bool, bool, bool]:
            with server.client() as rc:
                return (rc.hexists(TK.counters, "s:" + field), rc.hexists(TK.stops, field),
                        rc.hexists(TK.stops, "#" + stop["id"]))  # fmt: skip

        redis.advance(TTL_S * 1000 - 1)
        await sweeper.sweep_once("default")
        assert present() == (True, True, True)
        assert await allowed(b) == 0
        redis.advance(1)
        await sweeper.sweep_once("default")
        assert present() == (False, False, False)
        assert await allowed(b) == N
    finally:
        for c in (a, b):
            await c.close()


@pytest.mark.parametrize("skew_ms", SKEWS)
async def test_a_stop_put_back_after_a_loss_keeps_its_expiry_on_redis_clock(
    server: RedisServer, skew_ms: int
) -> None:
    """B (its clock `skew_ms` off) sees A's 3 s stop at its check, Redis loses everything
    1 ms before the expiry on Redis's clock: B puts it back (1 restored), it denies 0 of
    10 until its expiry, then 10 of 10."""
    redis = FakeClock(T0_MS)
    a, b = await replicas(server, redis, skew_ms)
    watch: StateWatch = b.app[STATE_WATCH]  # type: ignore[index]
    try:
        status, stop = await call(a, "POST", "/v1/stops", STOP)
        assert status == 201, stop
        await watch.check()  # B has seen the stop in force
        redis.advance(TTL_S * 1000 - 1)
        with server.client() as rc:
            rc.flushall()
        assert await watch.check() is True
        assert watch.last_loss is not None and watch.last_loss.restored_stops == 1
        assert await allowed(b) == 0 and await allowed(a) == 0
        assert await listed(b) == [("runaway", iso(T0_MS + TTL_S * 1000))]
        redis.advance(1)
        assert await allowed(b) == N and await allowed(a) == N
    finally:
        for c in (a, b):
            await c.close()


# ---- Redis TIME itself (SystemClock's '' limiters' clock) ----------------------------------


def commands(server: RedisServer) -> dict[str, int]:
    with server.client() as rc:
        stats: dict[str, Any] = rc.info("commandstats")  # type: ignore[assignment]
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


async def test_on_redis_time_a_replica_a_minute_off_keeps_and_ends_the_stop(
    server: RedisServer,
) -> None:
    """Real clocks: A on real time, B +60 s and C -60 s. A 30 s stop made on A: 0 of 10 on
    B (it once allowed 10 of 10: its clock was past the expiry). A 1 s stop: once Redis
    TIME is past its expiry, 10 of 10 on C (it once denied them for another minute)."""
    a = await app_over(server.url, DOC, clock=SkewedSystemClock(0))
    b = await app_over(server.url, DOC, clock=SkewedSystemClock(60_000))
    c = await app_over(server.url, DOC, clock=SkewedSystemClock(-60_000))
    try:
        status, stop = await call(a, "POST", "/v1/stops", {**STOP, "ttl_s": 30})
        assert status == 201, stop
        assert [await allowed(b), await allowed(c), await allowed(b, path="/v1/check")] == [0, 0, 0]
        status, stop = await call(a, "POST", "/v1/stops", {**STOP, "ttl_s": 1})
        assert status == 201, stop
        with server.client() as rc:
            value = rc.hget(TK.stops, keys.stop_field("agent", "runaway"))
            expires = int(str(value).split("|")[1])
            for _ in range(400):  # bounded: at most ~20 s
                seconds, micros = rc.time()
                if seconds * 1000 + micros // 1000 >= expires:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("Redis TIME never reached the stop's expiry")
        assert [await allowed(c), await allowed(b), await allowed(a)] == [N, N, N]
    finally:
        for x in (a, b, c):
            await x.close()


async def test_a_decision_reads_redis_time_only_for_a_stop_with_an_expiry(
    server: RedisServer,
) -> None:
    """The hot path pays no TIME: 10 calls of an agent without a stop, and 10 of one with
    a stop until lifted, read TIME 0 times; 10 of one with a ttl stop read it 10 times
    (once each). No rate limit is configured (a limiter reads it anyway)."""
    a = await app_over(server.url, DOC, clock=SkewedSystemClock(0))
    try:
        for agent, ttl in (("ttl", 60), ("ever", None)):
            status, stop = await call(a, "POST", "/v1/stops",
                                      {**STOP, "scope_id": agent, "ttl_s": ttl})  # fmt: skip
            assert status == 201, stop
        assert await allowed(a, 1) == 1  # warm: the scripts loaded, the marker seen
        got = {}
        for agent in ("free", "ever", "ttl"):
            with server.client() as rc:
                rc.config_resetstat()
            n = 0
            for _ in range(N):
                status, d = await call(a, "POST", "/v1/authorize",
                                       {"agent_id": agent, "estimated_usd": 0.01})  # fmt: skip
                assert status == 200, d
                n += bool(d["allowed"])
            got[agent] = (n, commands(server).get("time", 0))
        assert got == {"free": (N, 0), "ever": (0, 0), "ttl": (0, N)}, got
    finally:
        await a.close()
