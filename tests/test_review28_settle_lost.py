"""Review 28: lua/settle_lost.lua and record field 28 (who counts a settle's charge in the
spend metrics), on a real redis-server.

End to end (the app's Metrics behind a FaultProxy, as tests/test_attack15_fault_books.py):
a settle whose search overtakes it while the charge is already waiting to be counted
('?'). Then settle_lost.lua's answers for each state a reservation can be in, and for
records of the previous version (26 fields)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis

from sidecar.engine import Engine
from tests.harness import RedisServer, until
from tests.inprocess import call
from tests.test_attack15_fault_books import (
    SCRIPTS,
    authorized_and_warm,
    count_field,
    metered_app,
    post,
    proxy,
    searches_done,
    settle_until_answered,
    spend_counted,
)
from tests.test_redis_fault_attacks import TENANT, FaultProxy, ledger_micro, used_micro
from tests.test_review28_replies import World, fields, old_record, world

__all__ = ["proxy", "world"]  # fixtures
RES = TENANT.reservations


async def held_settle(flaky: Any, proxy: FaultProxy, body: dict[str, Any]) -> None:
    """A settle held on its way to Redis past the timeout (503); its sidecar's search for
    it goes through first."""
    proxy.hold(SCRIPTS.settle.sha.encode())
    status, s = await post(flaky, "/v1/settle", body)
    assert status == 503, s
    await searches_done(flaky)


async def test_a_second_lost_settle_overtaken_by_its_search_still_counts_the_charge(
    server: RedisServer, proxy: FaultProxy
) -> None:
    """Attempt 1 is held on its way to Redis and its search runs first ('~1'); then it
    charges: nobody counted it ('?'). The client repeats: attempt 2 is held the same way,
    its search overtakes it, then it runs. However those answers go, the charge is
    counted once over both replicas, and every later settle is a plain replay."""
    flaky, _ = await metered_app(proxy.url)
    direct, _ = await metered_app(server.url)
    rc = redis.Redis(port=server.port, decode_responses=True)
    try:
        d = await authorized_and_warm(flaky)
        rid = d["reservation_id"]
        body = {"reservation_id": rid, "tokens_in": 1000, "tokens_out": 500}
        await held_settle(flaky, proxy, body)
        assert count_field(rc, rid).startswith("~")
        proxy.let_go()
        await until(lambda: count_field(rc, rid) == "?", "the first settle never ran")
        assert used_micro(rc) == 8500 and ledger_micro(rc) == (2, 8500)
        # The repeat, lost the same way: its search finds the charge nobody counted.
        await held_settle(flaky, proxy, body)
        counted_by_search = await spend_counted(flaky, direct)
        proxy.let_go()
        await until(lambda: count_field(rc, rid) != "?", "the second settle never ran")
        await asyncio.sleep(0)
        await searches_done(flaky, direct)
        for app in (flaky, direct):
            again = await settle_until_answered(app, body)
            assert again["state"] == "settled" and again["replayed"] is True, again
        await searches_done(flaky, direct)
        assert (counted_by_search, await spend_counted(flaky, direct)) == (
            (7500, 1000, 500),
            (7500, 1000, 500),
        )
        assert used_micro(rc) == 8500 and ledger_micro(rc) == (2, 8500)
    finally:
        rc.close()
        proxy.let_go()
        proxy.mode = "forward"
        for app in (flaky, direct):
            await app.close()


# ---- settle_lost.lua in every state ---------------------------------------------------


async def search(engine: Engine, rid: str, attempt: str) -> int:
    reply = await engine.run_script(engine._scripts.settle_lost, "default", (rid, attempt), (RES,))
    return int(reply[0])


async def authorize(app: Any, **kw: Any) -> str:
    status, d = await call(app, "POST", "/v1/authorize", {"estimated_usd": 0.25, **kw})
    assert status == 200 and d["allowed"], d
    rid = d["reservation_id"]
    assert isinstance(rid, str)
    return rid


async def test_a_search_for_a_reservation_never_charged_by_its_attempt_counts_nothing(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No such reservation, an idempotency key's field, an empty attempt: 0. Released,
    or settled by another attempt (whose answer counted it): 2, nothing written. Held or
    its lease ended: 3, the attempt noted once however often searched, at most 8 noted
    (the oldest forgotten). Collected past the keep time: 0."""
    w = world
    (e, _), app = w.engines, w.apps[0]
    assert await search(e, "f" * 32, "00000001") == 0
    released = await authorize(app, idempotency_key="K")
    assert await search(e, "k:K", "00000001") == 0
    assert await search(e, released, "") == 0
    status, _ = await call(app, "POST", "/v1/release", {"reservation_id": released})
    assert status == 200
    before = w.rc.hget(RES, released)
    assert await search(e, released, "00000001") == 2
    assert w.rc.hget(RES, released) == before

    ids = iter(["0000000a", "0000000b"])
    monkeypatch.setattr("sidecar.engine.new_attempt_id", lambda: next(ids))
    settled = await authorize(app)
    status, s = await call(app, "POST", "/v1/settle", {"reservation_id": settled, "cost_usd": 0.1})
    assert status == 200 and s["replayed"] is False
    assert fields(w.rc, settled)[27] == "0000000a"
    assert await search(e, settled, "0000000b") == 2
    assert await search(e, settled, "~0000000a") == 2
    assert fields(w.rc, settled)[27] == "0000000a"

    held = await authorize(app)
    for i in range(10):
        assert await search(e, held, f"{i:08x}") == 3
        assert await search(e, held, f"{i:08x}") == 3  # repeated: noted once
    noted = fields(w.rc, held)[27].split(",")
    assert noted == [f"~{i:08x}" for i in range(2, 10)]
    w.clock.advance(10**6)  # past its lease: reclaimed by the next call (state E)
    ended = await authorize(app)
    assert fields(w.rc, held)[0] == "E"
    assert await search(e, held, "0000000a") == 3
    assert fields(w.rc, held)[27].split(",") == [*noted[1:], "~0000000a"]

    w.clock.advance(10**7)  # past the keep time: collected
    await authorize(app)
    for rid in (released, settled, held):
        assert w.rc.hget(RES, rid) is None
        assert await search(e, rid, "0000000a") == 0
    assert w.rc.hget(RES, ended) is not None


async def test_a_search_on_a_record_of_the_previous_version(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """26 fields: settled (no field 28), 2, nothing written; held, the attempt is noted
    (28 fields written, the rest as it was); that attempt's settle then leaves the charge
    for the next settle to count (status 4), which counts it once (then 2)."""
    w = world
    (e, _), app = w.engines, w.apps[0]
    held = await authorize(app)
    settled = await authorize(app)
    status, _ = await call(app, "POST", "/v1/settle", {"reservation_id": settled, "cost_usd": 0.1})
    assert status == 200
    r = fields(w.rc, settled)
    w.rc.hset(RES, settled, "|".join(r[:26]))
    assert await search(e, settled, r[27]) == 2
    assert w.rc.hget(RES, settled) == "|".join(r[:26])
    old_record(w.rc, held)
    before = fields(w.rc, held)
    assert await search(e, held, "0000000c") == 3
    assert fields(w.rc, held) == [*before, "", "~0000000c"]

    statuses = await settle_statuses(monkeypatch, e, app, held, ["0000000c", "0000000d", "e"])
    assert statuses == [1, 4, 2]
    assert fields(w.rc, held)[27] == "0000000d"
    assert used_micro(w.rc) == 200_000


async def settle_statuses(
    monkeypatch: pytest.MonkeyPatch, e: Engine, app: Any, rid: str, attempts: list[str]
) -> list[int]:
    """Settle `rid` once per attempt id (on `app`, whose engine is `e`): settle.lua's
    statuses."""
    ids = iter(attempts)
    monkeypatch.setattr("sidecar.engine.new_attempt_id", lambda: next(ids))
    out: list[int] = []
    real = e.run_script

    async def spy(script: Any, tenant: str, args: Any, keys: Any = None) -> list[Any]:
        reply = await real(script, tenant, args, keys)
        if script.name == "settle":
            out.append(int(reply[0]))
        return reply

    monkeypatch.setattr(e, "run_script", spy)
    for _ in attempts:
        status, s = await call(app, "POST", "/v1/settle", {"reservation_id": rid, "cost_usd": 0.1})
        assert status == 200, s
    monkeypatch.setattr(e, "run_script", real)
    return out


async def test_a_lost_attempt_of_a_hold_charged_at_its_lease_end_counts_nothing_more(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """on_expiry charge: attempt a is noted lost on the hold ('~a'); the lease ends and the
    next call charges the estimate (the lease's end counts it). Then a runs, and a
    repeat: both answer 2 (the first result), the searches for them 2; the charge is the
    estimate, once."""
    w = world
    (e, _), app = w.engines, w.apps[0]
    rid = await authorize(app, on_expiry="charge", lease_ms=1000)
    assert await search(e, rid, "0000000a") == 3
    w.clock.advance(1001)
    await authorize(app)  # reclaims it: charged at its lease's end
    r = fields(w.rc, rid)
    assert (r[0], r[27]) == ("S", "~0000000a")
    assert used_micro(w.rc) == 250_000
    statuses = await settle_statuses(monkeypatch, e, app, rid, ["0000000a", "0000000b"])
    assert statuses == [2, 2]
    assert await search(e, rid, "0000000a") == 2
    assert await search(e, rid, "0000000b") == 2
    assert fields(w.rc, rid) == r
    assert used_micro(w.rc) == 250_000
