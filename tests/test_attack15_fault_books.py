"""The books under Redis faults: a settle whose script ran in Redis but whose reply never
came back (a TCP proxy holds the reply past the timeout, tests/test_redis_fault_attacks.py
FaultProxy) is charged once in the counters and the ledger, and once in the Prometheus
spend counters, whoever's retry finds it finished.

The app runs in-process over its own redis-server (the `server` fixture), behind the proxy,
with a FakeClock and its Metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from sidecar.api.app import ENGINE, create_app
from sidecar.clock import FakeClock
from sidecar.metrics import Metrics
from sidecar.scripts import Scripts
from sidecar.store import RedisStore
from tests.conftest import T0_MS, make_config
from tests.harness import RedisServer
from tests.test_attack15_books import micro, scrape_spend
from tests.test_redis_fault_attacks import TENANT, FaultProxy, ledger_micro, used_micro

SCRIPTS = Scripts.load_all()
GUARD_S = 10.0  # not a timing assertion: only keeps a hang from hanging the suite
DOC: dict[str, Any] = {
    "budgets": [{"id": "org", "name": "Org", "scope": "organization", "limit_usd": 100.0,
                 "period": "monthly"}],
    "pricing": [{"provider": "openai", "model": "gpt-4o", "input_per_1k": 0.0025,
                 "output_per_1k": 0.01}],
    "settings": {"redis_timeout_ms": 100},
}  # fmt: skip


@pytest.fixture
async def proxy(server: RedisServer) -> AsyncIterator[FaultProxy]:
    p = await FaultProxy(server.port).start()
    try:
        yield p
    finally:
        await p.close()


async def metered_app(
    url: str, doc: dict[str, Any] = DOC
) -> tuple[TestClient[Any, Any], Metrics]:
    clock = FakeClock(T0_MS)
    metrics = Metrics(clock=clock)
    cfg = make_config(doc)
    store = metrics.wrap(RedisStore.from_url(url, timeout_ms=cfg.settings.redis_timeout_ms))
    client = TestClient(TestServer(create_app(cfg, store, clock=clock, events=metrics)))
    await client.start_server()
    return client, metrics


async def post(client: Any, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async def go() -> tuple[int, dict[str, Any]]:
        r = await client.post(path, json=body)
        text = await r.text()
        assert r.status != 500, text
        return r.status, await r.json(content_type=None)

    return await asyncio.wait_for(go(), GUARD_S)


async def settle_until_answered(client: Any, body: dict[str, Any]) -> dict[str, Any]:
    for _ in range(100):
        status, s = await post(client, "/v1/settle", body)
        if status == 200:
            return s
        assert status == 503, s
        await asyncio.sleep(0.05)
    raise AssertionError("the settle was never answered")


async def searches_done(*apps: Any) -> None:
    """Every background search for a settle whose answer was lost has answered."""
    for _ in range(int(GUARD_S / 0.05)):
        if all(app.server.app[ENGINE].pending_lost_settles == 0 for app in apps):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("a search for a lost settle never ended")


async def spend_counted(*apps: Any) -> tuple[int, int, int]:
    """gpt-4o's cost (micro-USD) and input and output tokens, summed over `apps`' metrics."""
    counted, tin, tout = 0, 0, 0
    for app in apps:
        cost, tokens = await scrape_spend(app)
        counted += micro(cost.get(("openai", "gpt-4o"), 0.0))
        tin += int(tokens.get(("openai", "gpt-4o", "input"), 0))
        tout += int(tokens.get(("openai", "gpt-4o", "output"), 0))
    return counted, tin, tout


def count_field(rc: redis.Redis, rid: str) -> str:
    """Record field 28 (lua/_lib.lua): who counts the charge in the metrics."""
    record = rc.hget(TENANT.reservations, rid)
    assert isinstance(record, str), rid
    fields = record.split("|")
    assert len(fields) == 28, record
    return fields[27]


async def authorized_and_warm(flaky: Any) -> dict[str, Any]:
    """A gpt-4o hold on `flaky`, and one settle run so that the script is loaded (a NOSCRIPT
    held by the proxy would run nothing): 1000 micro-USD charged."""
    status, d = await post(flaky, "/v1/authorize", {"provider": "openai", "model": "gpt-4o",
                                                     "estimated_usd": 0.5})  # fmt: skip
    assert status == 200 and d["allowed"] is True, d
    status, w = await post(flaky, "/v1/authorize", {"estimated_usd": 0.5})
    warm = await settle_until_answered(flaky, {"reservation_id": w["reservation_id"],
                                               "cost_usd": 0.001})  # fmt: skip
    assert warm["state"] == "settled", warm
    return d


@pytest.mark.parametrize("retry_on", ["same", "other"])
async def test_a_settle_whose_reply_was_lost_is_counted_once_in_the_metrics(
    server: RedisServer, proxy: FaultProxy, retry_on: str
) -> None:
    """Redis ran the settle, its reply came after the timeout (503, "repeat it"); the
    retry, on the same replica or another, is answered replayed. The charge is in the
    counters and the ledger once, and the spend counters summed over the replicas count it
    once, as they count a settle answered at once."""
    flaky, _ = await metered_app(proxy.url)
    direct, _ = await metered_app(server.url)
    rc = redis.Redis(port=server.port, decode_responses=True)
    try:
        status, d = await post(flaky, "/v1/authorize", {"provider": "openai", "model": "gpt-4o",
                                                         "estimated_usd": 0.5})  # fmt: skip
        assert status == 200 and d["allowed"] is True, d
        # A first settle loads the script (a NOSCRIPT held by the proxy would run nothing).
        status, w = await post(flaky, "/v1/authorize", {"estimated_usd": 0.5})
        warm = await settle_until_answered(flaky, {"reservation_id": w["reservation_id"],
                                                   "cost_usd": 0.001})  # fmt: skip
        assert warm["state"] == "settled", warm
        body = {"reservation_id": d["reservation_id"], "tokens_in": 1000, "tokens_out": 500}
        proxy.mode, proxy.delay_s = "delay", 0.5
        status, s = await post(flaky, "/v1/settle", body)
        assert status == 503, s
        proxy.mode = "forward"
        # The script ran: charged once (0.0025 + 0.005 = 7500 micro-USD, after the 1000).
        assert used_micro(rc) == 8500 and ledger_micro(rc) == (2, 8500)
        s = await settle_until_answered(flaky if retry_on == "same" else direct, body)
        assert s["state"] == "settled" and s["replayed"] is True, s
        assert used_micro(rc) == 8500 and ledger_micro(rc) == (2, 8500)
        # The first attempt's own reply reaches the proxy after the retry was answered: its
        # connection was closed at the timeout, so nobody reads it.
        await asyncio.sleep(proxy.delay_s)
        await searches_done(flaky, direct)
        assert await spend_counted(flaky, direct) == (7500, 1000, 500)
    finally:
        rc.close()
        proxy.mode = "forward"
        for app in (flaky, direct):
            await app.close()


async def test_two_retries_racing_before_the_search_count_a_lost_settle_once(
    server: RedisServer, proxy: FaultProxy
) -> None:
    """The settle's reply is lost; the sidecar that timed out looks for its charge in the
    background, but that search is held on the way to Redis while two retries race on the
    other replica (both answered replayed, neither counts: the first attempt's sidecar
    will). Then the search arrives: counted once, over both replicas."""
    flaky, _ = await metered_app(proxy.url)
    direct, _ = await metered_app(server.url)
    rc = redis.Redis(port=server.port, decode_responses=True)
    try:
        d = await authorized_and_warm(flaky)
        rid = d["reservation_id"]
        body = {"reservation_id": rid, "tokens_in": 1000, "tokens_out": 500}
        proxy.mode, proxy.delay_s = "delay", 0.5
        proxy.hold(SCRIPTS.settle_lost.sha.encode())  # the search waits on its way
        status, s = await post(flaky, "/v1/settle", body)
        assert status == 503, s
        proxy.mode = "forward"
        assert used_micro(rc) == 8500 and ledger_micro(rc) == (2, 8500)
        attempt = count_field(rc, rid)
        assert len(attempt) == 8, attempt  # the attempt that charged it counts it
        both = await asyncio.gather(*(settle_until_answered(direct, body) for _ in range(2)))
        assert [(r["state"], r["replayed"]) for r in both] == [("settled", True)] * 2, both
        assert await spend_counted(flaky, direct) == (0, 0, 0)
        assert flaky.server.app[ENGINE].pending_lost_settles == 1
        proxy.let_go()
        await searches_done(flaky, direct)
        assert count_field(rc, rid) == attempt + "!"
        assert await spend_counted(flaky, direct) == (7500, 1000, 500)
        # Nothing more counts it: a settle anywhere, repeated, is a plain replay.
        for app in (flaky, direct):
            again = await settle_until_answered(app, body)
            assert again["replayed"] is True, again
        assert await spend_counted(flaky, direct) == (7500, 1000, 500)
        assert used_micro(rc) == 8500 and ledger_micro(rc) == (2, 8500)
    finally:
        rc.close()
        proxy.let_go()
        proxy.mode = "forward"
        for app in (flaky, direct):
            await app.close()


@pytest.mark.parametrize("next_answer", ["delivered", "lost too"])
async def test_a_settle_redis_ran_after_its_search_is_counted_by_the_next_settle(
    server: RedisServer, proxy: FaultProxy, next_answer: str
) -> None:
    """The settle itself is held on its way to Redis past the timeout, and its sidecar's
    search for it runs first: nothing charged yet, the attempt is noted lost. Then the
    settle reaches Redis and charges (its answer goes nowhere). Two retries race, one per
    replica: exactly one of them counts the charge. With that answer lost too, its own
    sidecar's search counts it instead."""
    flaky, _ = await metered_app(proxy.url)
    direct, _ = await metered_app(server.url)
    rc = redis.Redis(port=server.port, decode_responses=True)
    try:
        d = await authorized_and_warm(flaky)
        rid = d["reservation_id"]
        body = {"reservation_id": rid, "tokens_in": 1000, "tokens_out": 500}
        proxy.hold(SCRIPTS.settle.sha.encode())  # the settle waits on its way to Redis
        status, s = await post(flaky, "/v1/settle", body)
        assert status == 503, s
        await searches_done(flaky)  # the search went through
        lost = count_field(rc, rid)
        assert lost.startswith("~") and len(lost) == 9, lost
        assert used_micro(rc) == 1000 and ledger_micro(rc) == (1, 1000)
        proxy.let_go()
        for _ in range(int(GUARD_S / 0.05)):  # the held settle runs
            if used_micro(rc) == 8500:
                break
            await asyncio.sleep(0.05)
        assert used_micro(rc) == 8500 and ledger_micro(rc) == (2, 8500)
        assert count_field(rc, rid) == "?"  # charged by an attempt known lost: uncounted
        assert await spend_counted(flaky, direct) == (0, 0, 0)
        if next_answer == "lost too":
            proxy.mode, proxy.delay_s = "delay", 0.5
            status, s = await post(flaky, "/v1/settle", body)
            assert status == 503, s
            proxy.mode = "forward"
            await asyncio.sleep(proxy.delay_s)
            await searches_done(flaky)
            assert count_field(rc, rid).endswith("!")
            assert await spend_counted(flaky, direct) == (7500, 1000, 500)
        both = await asyncio.gather(
            settle_until_answered(flaky, body), settle_until_answered(direct, body)
        )
        assert [(r["state"], r["replayed"]) for r in both] == [("settled", True)] * 2, both
        await searches_done(flaky, direct)
        assert await spend_counted(flaky, direct) == (7500, 1000, 500)
        owner = count_field(rc, rid)
        assert len(owner) == (9 if next_answer == "lost too" else 8), owner
        assert used_micro(rc) == 8500 and ledger_micro(rc) == (2, 8500)
    finally:
        rc.close()
        proxy.let_go()
        proxy.mode = "forward"
        for app in (flaky, direct):
            await app.close()
