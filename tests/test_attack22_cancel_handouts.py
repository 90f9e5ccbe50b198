"""A hold stands only while an answer granting it may have reached a caller.

An authorize whose reply is lost past the timeout (a FaultProxy holds it: Redis ran the
script, the sidecar answered 503 and cancels in the background) and its retries under the
same idempotency key (HAProxy repeats a slow check up to 4 times under one request id)
each hand the reservation out; each lost handout is cancelled by the sidecar that gave up
on it. The reservation is released once every handout was cancelled, and stands while any
handout was delivered (a background cancel never undoes what a retry was handed).

Found: a retry whose answer was lost too had claimed the reservation, so every cancel left
it alone: every caller was told 503, yet the hold stood until its lease ended and, with
on_expiry charge, was then charged.

The cancels the sidecars would send are recorded (Engine._cancel_later) and run by the test
in the order it picks, through the engine that made them (Engine._cancel, what the
background task runs), then all repeated. Three sidecars share one redis-server and one
FakeClock: two behind their own FaultProxy, one direct.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from sidecar.api.app import ENGINE, create_app
from sidecar.clock import FakeClock
from sidecar.engine import Engine
from sidecar.schemas import AuthorizeRequest
from sidecar.scripts import Scripts
from sidecar.store import RedisStore
from tests.conftest import T0_MS, make_config
from tests.harness import RedisServer
from tests.harness import until as harness_until
from tests.test_redis_fault_attacks import TENANT, FaultProxy, held_micro, used_micro

GUARD_S = 10.0  # not a timing assertion: only keeps a hang from hanging the suite
SCRIPTS = Scripts.load_all()
EST = 250_000  # micro-USD each hold
LEASE_MS = 10_000
DOC: dict[str, Any] = {
    "budgets": [{"id": "org", "name": "Org", "scope": "organization", "limit_usd": 100.0,
                 "period": "monthly"}],
    "settings": {"redis_timeout_ms": 100},
}  # fmt: skip


@dataclass
class Cancel:
    engine: Engine
    rid: str
    key: str


@dataclass
class World:
    rc: redis.Redis
    clock: FakeClock
    flaky: list[TestClient[Any, Any]]
    proxies: list[FaultProxy]
    direct: TestClient[Any, Any]
    cancels: list[Cancel] = field(default_factory=list)

    def body(self, key: str) -> dict[str, Any]:
        return {"estimated_usd": EST / 1e6, "on_expiry": "charge", "lease_ms": LEASE_MS,
                "idempotency_key": key}  # fmt: skip


@pytest.fixture
async def world(server: RedisServer) -> AsyncIterator[World]:
    rc = redis.Redis(port=server.port, decode_responses=True)
    for script in SCRIPTS:  # an EVALSHA whose NOSCRIPT was lost would run nothing
        rc.script_load(script.source)
    clock = FakeClock(T0_MS)
    proxies = [await FaultProxy(server.port).start() for _ in range(2)]
    clients = []
    for url in (proxies[0].url, proxies[1].url, server.url):
        cfg = make_config(DOC)
        store = RedisStore.from_url(url, timeout_ms=cfg.settings.redis_timeout_ms)
        client = TestClient(TestServer(create_app(cfg, store, clock=clock)))
        await client.start_server()
        clients.append(client)
    w = World(rc, clock, clients[:2], proxies, clients[2])
    for client in clients:
        engine: Engine = client.server.app[ENGINE]

        def record(
            tenant: str,
            rid: str,
            lease_end_ms: int,
            key: str | None = None,
            engine: Engine = engine,
        ) -> None:
            assert tenant == "default"
            w.cancels.append(Cancel(engine, rid, key or ""))

        engine._cancel_later = record  # type: ignore[method-assign]
    try:
        yield w
    finally:
        for p in proxies:
            p.let_go()
            p.mode = "forward"
        for client in clients:
            await client.close()
        for p in proxies:
            await p.close()
        rc.close()


async def post(client: Any, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async def go() -> tuple[int, dict[str, Any]]:
        r = await client.post(path, json=body)
        text = await r.text()
        assert r.status != 500, text
        return r.status, await r.json(content_type=None)

    return await asyncio.wait_for(go(), GUARD_S)


def record(rc: redis.Redis, rid: str) -> list[str]:
    rec = rc.hget(TENANT.reservations, rid)
    assert isinstance(rec, str), rid
    return rec.split("|")


def reservation(rc: redis.Redis, key: str) -> str | None:
    rid = rc.hget(TENANT.reservations, f"k:{key}")
    assert rid is None or isinstance(rid, str)
    return rid


def handouts(rc: redis.Redis, key: str) -> list[str]:
    """The handouts record field 27 counts of the key's reservation ('*': its authorize)."""
    rid = reservation(rc, key)
    assert rid is not None, key
    r = record(rc, rid)
    assert len(r) == 28, r
    if r[18] != "1":
        assert r[26] == "", r
        return ["*"]
    return r[26].split(",")


async def until(check: Any, what: str) -> None:
    await harness_until(check, what, guard_s=GUARD_S, every_s=0.02)


async def lost(w: World, i: int, key: str) -> Cancel:
    """An authorize on flaky sidecar `i` that Redis runs, whose reply comes after the
    timeout: 503, and the one cancel its sidecar schedules."""
    proxy = w.proxies[i]
    await answering(w.flaky[i])  # so that the authorize is sent, not failed at once
    before = len(w.cancels)
    proxy.mode, proxy.delay_s = "delay", 0.3
    try:
        status, d = await post(w.flaky[i], "/v1/authorize", w.body(key))
    finally:
        proxy.mode = "forward"
    assert status == 503, d
    assert len(w.cancels) == before + 1
    cancel = w.cancels[-1]
    # It ran: it made the key's reservation, or was handed it.
    await until(
        lambda: reservation(w.rc, key) == cancel.rid or cancel.rid[-12:] in handouts(w.rc, key),
        "the authorize never ran",
    )
    return cancel


async def run(cancel: Cancel) -> None:
    await asyncio.wait_for(
        cancel.engine._cancel("default", cancel.rid, T0_MS + 10**12, cancel.key), GUARD_S
    )


async def delivered(w: World, key: str) -> dict[str, Any]:
    status, d = await post(w.direct, "/v1/authorize", w.body(key))
    assert status == 200 and d["allowed"] is True, d
    return d


async def answering(client: Any) -> None:
    """A call answered on `client`: its circuit breaker (sidecar.resp) is closed and counts
    no failure in a row (the timeouts of the lost replies, and of the background sweep's
    calls meanwhile, open it)."""
    for _ in range(int(GUARD_S / 0.05)):
        status, _ = await post(client, "/v1/check", {"estimated_usd": 0.01})
        if status == 200:
            return
        assert status == 503
        await asyncio.sleep(0.05)
    raise AssertionError("the sidecar never answered again")


async def nothing_charged_at_lease_end(w: World, used: int) -> None:
    """Past every lease, a decision returns (and, on_expiry charge, would charge) each
    hold whose lease ended: nothing is held and the settled spend is `used`."""
    w.clock.advance(LEASE_MS + 1)
    status, d = await post(w.direct, "/v1/check", {"estimated_usd": 0.01})
    assert status == 200, d
    assert (held_micro(w.rc), used_micro(w.rc)) == (0, used)


# ---- every handout lost: released once all are cancelled, in every order --------------


@pytest.mark.parametrize("n", [1, 2, 4])
async def test_every_handout_lost_is_released_by_the_last_cancel_in_every_order(
    world: World, n: int
) -> None:
    """n authorizes under one key, alternating between the two flaky sidecars, each
    answered 503 after Redis ran it. For every order of their n cancels, the hold stands
    until the last one and is released by it; the repeats of all n change nothing, the key
    is free for a new request, and nothing is charged at the lease's end."""
    w = world
    orders = list(itertools.permutations(range(n)))
    assert len(orders) == {1: 1, 2: 2, 4: 24}[n]
    for o, order in enumerate(orders):
        key = f"n{n}-order{o}"
        w.cancels.clear()
        made = [await lost(w, i % 2, key) for i in range(n)]
        rid = reservation(w.rc, key)
        assert rid == made[0].rid
        assert handouts(w.rc, key) == ["*"] + [c.rid[-12:] for c in made[1:]]
        assert held_micro(w.rc) == EST
        for done, j in enumerate(order, start=1):
            await run(made[j])
            if done < n:
                assert record(w.rc, rid)[0] == "H" and held_micro(w.rc) == EST, (order, done)
                assert len(handouts(w.rc, key)) == n - done
        assert record(w.rc, rid)[0] == "R", order
        assert held_micro(w.rc) == 0 and reservation(w.rc, key) is None
        for c in reversed(made):  # each cancel repeated (its own answer lost): no change
            await run(c)
        assert record(w.rc, rid)[0] == "R" and held_micro(w.rc) == 0
    # A new request under a used key holds again (its first was released by its cancels).
    d = await delivered(w, "n-fresh")
    assert d["replayed"] is False
    status, r = await post(w.direct, "/v1/release", {"reservation_id": d["reservation_id"]})
    assert status == 200 and r["state"] == "released", r
    await nothing_charged_at_lease_end(w, 0)


# ---- a delivered handout among lost ones: it stands -------------------------------------


@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize("at", [0, 1, 2])
async def test_a_delivered_handout_among_lost_ones_keeps_the_hold(
    world: World, at: int, order: str
) -> None:
    """Three handouts under one key, the one at position `at` delivered (on the direct
    sidecar: 200), the two others lost on the flaky ones. However the two cancels run,
    the hold stands for the caller that was told of it, who settles it once."""
    w = world
    key = f"delivered-at-{at}"
    made: list[Cancel] = []
    answer: dict[str, Any] = {}
    for i in range(3):
        if i == at:
            answer = await delivered(w, key)
            assert answer["replayed"] is (at != 0), answer
        else:
            made.append(await lost(w, len(made), key))
    rid = reservation(w.rc, key)
    assert rid is not None and answer["reservation_id"] == rid
    assert len(handouts(w.rc, key)) == 3
    for c in made if order == "forward" else reversed(made):
        await run(c)
        assert record(w.rc, rid)[0] == "H" and held_micro(w.rc) == EST
    for c in made:
        await run(c)
    # The delivered handout is the one left.
    left = handouts(w.rc, key)
    assert len(left) == 1 and left[0] not in {c.rid[-12:] for c in made}, left
    assert (left[0] == "*") == (at == 0)
    assert held_micro(w.rc) == EST
    status, s = await post(w.flaky[0], "/v1/settle", {"reservation_id": rid, "cost_usd": 0.2})
    assert status == 200 and s["state"] == "settled" and s["replayed"] is False, s
    assert (held_micro(w.rc), used_micro(w.rc)) == (0, 200_000)
    await nothing_charged_at_lease_end(w, 200_000)


# ---- a cancel that reaches Redis before its authorize --------------------------------------


@pytest.mark.parametrize("early", ["the first", "a retry"])
async def test_a_cancel_run_before_its_authorize_leaves_it_nothing_to_hold(
    world: World, early: str
) -> None:
    """One authorize is held on its way to Redis past the timeout, and its cancel runs
    first (a released record under its id); then it runs and holds, and is handed,
    nothing. With two more handouts lost (one before, one after it, across both flaky
    sidecars), their cancels release what they made, and nothing is charged."""
    w = world
    key = f"early-{early.replace(' ', '-')}"
    made: list[Cancel] = []
    if early == "a retry":
        made.append(await lost(w, 1, key))
    before = len(w.cancels)
    w.proxies[0].hold(SCRIPTS.authorize.sha.encode())
    status, d = await post(w.flaky[0], "/v1/authorize", w.body(key))
    assert status == 503, d
    assert len(w.cancels) == before + 1
    held_back = w.cancels[-1]
    await run(held_back)  # before its authorize reached Redis
    assert record(w.rc, held_back.rid)[0] == "R"
    assert w.proxies[0].held == 1
    port = w.proxies[0].held_ports[0]
    w.proxies[0].let_go()
    # Its sidecar closed that connection at the timeout: once Redis has read the command
    # (and run it), it reads the end of the stream and drops the client.
    await until(
        lambda: all(not c["addr"].endswith(f":{port}") for c in w.rc.client_list()),
        "the held authorize never ran",
    )
    if early == "the first":
        assert reservation(w.rc, key) is None and held_micro(w.rc) == 0
    else:
        assert handouts(w.rc, key) == ["*"] and held_micro(w.rc) == EST
    made.append(await lost(w, 1, key))
    rid = reservation(w.rc, key)
    assert rid is not None
    assert len(handouts(w.rc, key)) == len(made)
    for c in made:
        await run(c)
    assert record(w.rc, rid)[0] == "R" and held_micro(w.rc) == 0
    assert reservation(w.rc, key) is None
    await run(held_back)  # repeated: nothing changes
    assert record(w.rc, held_back.rid)[0] == "R" and held_micro(w.rc) == 0
    await nothing_charged_at_lease_end(w, 0)


# ---- a replay whose answer never reached its caller -------------------------------------


async def test_a_replay_whose_answer_was_not_delivered_is_taken_back(world: World) -> None:
    """The first authorize is lost (503); its retry is answered replayed, but the caller's
    connection is gone before the answer is written (sidecar.api.undelivered takes it
    back). Both handouts are cancelled: released, nothing charged at the lease's end."""
    w = world
    key = "undelivered-replay"
    first = await lost(w, 0, key)
    engine: Engine = w.direct.server.app[ENGINE]
    req = msgspec.convert(w.body(key), AuthorizeRequest)
    decision = await engine.authorize("default", req)
    assert decision.replayed and decision.reservation_id == first.rid
    engine.take_back("default", decision)
    assert len(w.cancels) == 2
    again = w.cancels[-1]
    assert again.engine is engine and again.key == key and again.rid != first.rid
    assert handouts(w.rc, key) == ["*", again.rid[-12:]]
    await run(again)
    assert record(w.rc, first.rid)[0] == "H" and held_micro(w.rc) == EST
    await run(first)
    assert record(w.rc, first.rid)[0] == "R" and held_micro(w.rc) == 0
    await nothing_charged_at_lease_end(w, 0)


# ---- a reservation handed out past what its record counts ---------------------------------


async def test_past_sixteen_handouts_no_cancel_releases_the_hold(world: World) -> None:
    """A client repeating one authorize: the record counts 16 handouts (the authorize and 15
    retries); the 16th retry makes it stop counting, and from then on no cancel releases it
    (its lease does), so no retry ever handed it can lose it to a cancel."""
    w = world
    key = "many-retries"
    first = await lost(w, 0, key)
    for i in range(15):
        d = await delivered(w, key)
        assert d["replayed"] is True and d["reservation_id"] == first.rid
        assert len(handouts(w.rc, key)) == i + 2
    d = await delivered(w, key)
    assert d["replayed"] is True
    r = record(w.rc, first.rid)
    assert (r[0], r[18], r[26]) == ("H", "1", "")
    await run(first)
    assert record(w.rc, first.rid)[0] == "H" and held_micro(w.rc) == EST
    status, s = await post(w.direct, "/v1/settle", {"reservation_id": first.rid,
                                                    "cost_usd": 0.1})  # fmt: skip
    assert status == 200 and s["state"] == "settled", s
    assert (held_micro(w.rc), used_micro(w.rc)) == (0, 100_000)
    await nothing_charged_at_lease_end(w, 100_000)
