"""Attack 30: defects the ninth sitting's note left open.

1. Spend metrics that missed a charge the books have (a /v1/record whose answer was lost,
   then repeated with its key; a fail-open grant's queued charge whose answer was lost), on
   a real redis-server behind a FaultProxy (tests/test_attack15_fault_books.py's set-up).
2. A request line naming HTTP/2.0 (or 0.9, 1.2, 3.0), on the fast path and on aiohttp.
3. A reload that changes settings.allowed_hosts.
4. A warn budget's hold near 2^63 (tests/test_attack24_bounds.py's pattern).
5. A state loss whose alert write failed (tests/test_state_loss_attacks.py's pattern)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from aiohttp.test_utils import TestClient, TestServer

from sidecar import config, keys
from sidecar.api.app import ENGINE, STATE_WATCH, create_app
from sidecar.metrics import Metrics
from sidecar.reload import ConfigWatcher
from sidecar.state_loss import ALERT_KIND, StateWatch
from sidecar.store import RedisStore
from tests.conftest import ClientFactory
from tests.harness import RedisServer, until
from tests.inprocess import app_over as inprocess_app
from tests.test_attack15_fault_books import (
    DOC,
    SCRIPTS,
    metered_app,
    post,
    proxy,
    searches_done,
    spend_counted,
)
from tests.test_attack24_bounds import COUNTER_MAX as BOUNDS_MAX
from tests.test_attack24_bounds import NEAR_2_63, WARN2, WHO, cids_of, spend_fields
from tests.test_attack24_bounds import post as bounds_post
from tests.test_fast_path import AUTHORIZE, exchange, fast_server, serve
from tests.test_fast_path import post as fp_post
from tests.test_fast_path import status as fp_status
from tests.test_redis_fault_attacks import (
    TENANT,
    FaultProxy,
    held_micro,
    ledger_micro,
    used_micro,
)
from tests.test_state_loss_attacks import LOSS_DOC, lose_state

__all__ = ["proxy", "serve"]  # fixtures

# 1000 tokens in and 500 out of gpt-4o: 0.0025 + 0.005 = 7500 micro-USD.
RECORD = {"provider": "openai", "model": "gpt-4o", "tokens_in": 1000, "tokens_out": 500}
COUNTED = (7500, 1000, 500)
TOKENS = {"tokens_in": 1000, "tokens_out": 500}


async def metered(url: str, doc: dict[str, Any] = DOC) -> TestClient[Any, Any]:
    return (await metered_app(url, doc))[0]


def key_field(rc: redis.Redis, key: str) -> str | None:
    """A /v1/record idempotency key's field (lua/record.lua ARGV[11]): who counts it."""
    value = rc.hget(TENANT.reservations, f"q:{key}")
    assert value is None or isinstance(value, str)
    return value


async def warm_record(flaky: Any) -> None:
    """One record through `flaky`, so that record.lua is loaded (a NOSCRIPT held or delayed
    by the proxy would run nothing): 1000 micro-USD, counted under no model."""
    status, r = await post(flaky, "/v1/record", {"cost_usd": 0.001})
    assert status == 200 and r["replayed"] is False, r


# ---- 1. /v1/record: a charge whose answer was lost --------------------------------------


async def test_a_record_whose_answer_was_lost_then_repeated_with_its_key_is_counted_once(
    server: RedisServer, proxy: FaultProxy
) -> None:
    """Redis ran the record, its answer came after the timeout (503); the client repeats it
    with its key on another replica: replayed, nothing charged. The sidecar that timed out
    finds its attempt charged it: counted once over both replicas, and no later repeat
    counts it again."""
    flaky, direct = await metered(proxy.url), await metered(server.url)
    rc = redis.Redis(port=server.port, decode_responses=True)
    try:
        await warm_record(flaky)
        body = {**RECORD, "idempotency_key": "lost-answer"}
        proxy.mode, proxy.delay_s = "delay", 0.5
        status, r = await post(flaky, "/v1/record", body)
        assert status == 503, r
        proxy.mode = "forward"
        assert used_micro(rc) == 8500 and ledger_micro(rc) == (2, 8500)
        status, r = await post(direct, "/v1/record", body)
        assert status == 200 and r["replayed"] is True, r
        await asyncio.sleep(proxy.delay_s)
        await searches_done(flaky, direct)
        assert (key_field(rc, "lost-answer") or "").endswith("!")
        assert await spend_counted(flaky, direct) == COUNTED
        for app in (flaky, direct):
            status, r = await post(app, "/v1/record", body)
            assert status == 200 and r["replayed"] is True, r
        await searches_done(flaky, direct)
        assert await spend_counted(flaky, direct) == COUNTED
        assert used_micro(rc) == 8500 and ledger_micro(rc) == (2, 8500)
    finally:
        rc.close()
        proxy.mode = "forward"
        for app in (flaky, direct):
            await app.close()


async def test_a_record_redis_ran_after_its_search_is_counted_by_the_repeat(
    server: RedisServer, proxy: FaultProxy
) -> None:
    """The record is held on its way to Redis past the timeout, and its sidecar's search
    runs first: nothing charged, the attempt is noted lost. Then the record reaches Redis
    and charges (its answer goes nowhere): nobody counted it ('?'). The client's repeat
    with the key, on the other replica, counts it; every later repeat is a plain replay."""
    flaky, direct = await metered(proxy.url), await metered(server.url)
    rc = redis.Redis(port=server.port, decode_responses=True)
    try:
        await warm_record(flaky)
        body = {**RECORD, "idempotency_key": "held"}
        proxy.hold(SCRIPTS.record.sha.encode())
        status, r = await post(flaky, "/v1/record", body)
        assert status == 503, r
        await searches_done(flaky)
        assert key_field(rc, "held") is None  # not charged: a previous version still charges
        noted = rc.hget(TENANT.reservations, "w:held") or ""
        assert isinstance(noted, str) and len(noted) == 8, noted
        assert used_micro(rc) == 1000
        proxy.let_go()
        await until(lambda: used_micro(rc) == 8500, "the held record never ran")
        assert key_field(rc, "held") == "?" and ledger_micro(rc) == (2, 8500)
        assert await spend_counted(flaky, direct) == (0, 0, 0)
        status, r = await post(direct, "/v1/record", body)
        assert status == 200 and r["replayed"] is True, r
        assert await spend_counted(flaky, direct) == COUNTED
        for app in (flaky, direct):
            status, r = await post(app, "/v1/record", body)
            assert status == 200 and r["replayed"] is True, r
        await searches_done(flaky, direct)
        assert await spend_counted(flaky, direct) == COUNTED
        assert used_micro(rc) == 8500 and ledger_micro(rc) == (2, 8500)
    finally:
        rc.close()
        proxy.let_go()
        proxy.mode = "forward"
        for app in (flaky, direct):
            await app.close()


async def test_a_record_whose_search_ran_first_and_that_never_ran_is_charged_by_the_repeat(
    server: RedisServer, proxy: FaultProxy
) -> None:
    """The record is held and its search notes the attempt lost; the client's repeat
    charges (the key had charged nothing) and counts it. Then the held one reaches Redis:
    the key is charged already, nothing more, in the books or the metrics."""
    flaky, direct = await metered(proxy.url), await metered(server.url)
    rc = redis.Redis(port=server.port, decode_responses=True)
    try:
        await warm_record(flaky)
        body = {**RECORD, "idempotency_key": "never-ran"}
        proxy.hold(SCRIPTS.record.sha.encode())
        status, r = await post(flaky, "/v1/record", body)
        assert status == 503, r
        await searches_done(flaky)
        status, r = await post(direct, "/v1/record", body)
        assert status == 200 and r["replayed"] is False, r
        assert used_micro(rc) == 8500 and await spend_counted(flaky, direct) == COUNTED
        proxy.let_go()
        held = proxy.held
        assert held == 1
        await asyncio.sleep(0.2)  # not a timing assertion: the held record's turn
        status, r = await post(direct, "/v1/record", body)
        assert status == 200 and r["replayed"] is True, r
        assert await spend_counted(flaky, direct) == COUNTED
        assert used_micro(rc) == 8500 and ledger_micro(rc) == (2, 8500)
    finally:
        rc.close()
        proxy.let_go()
        proxy.mode = "forward"
        for app in (flaky, direct):
            await app.close()


# ---- 1. fail open: a queued charge whose answer was lost --------------------------------

OPEN_DOC: dict[str, Any] = {**DOC, "settings": {"redis_timeout_ms": 100, "fail_mode": "open"}}


async def test_a_fail_open_charge_whose_answer_was_lost_is_counted_once(
    server: RedisServer, proxy: FaultProxy
) -> None:
    """An authorize allowed by fail mode open (its answer lost) gets a grant; its settle's
    record runs in Redis but the answer is lost (queued); the drain sends it again once
    Redis answers, and that send is the first answer of the charge: counted once."""
    flaky = await metered(proxy.url, OPEN_DOC)
    rc = redis.Redis(port=server.port, decode_responses=True)
    try:
        await warm_record(flaky)
        engine = flaky.server.app[ENGINE]
        proxy.mode, proxy.delay_s = "delay", 0.5
        status, d = await post(flaky, "/v1/authorize", {"provider": "openai", "model": "gpt-4o",
                                                         "estimated_usd": 0.5})  # fmt: skip
        assert status == 200 and d["degraded"] is True, d
        rid = d["reservation_id"]
        status, s = await post(flaky, "/v1/settle", {"reservation_id": rid, **TOKENS})
        assert status == 202 and s["state"] == "queued", s
        proxy.mode = "forward"
        await until(lambda: engine.fail_open.pending == 0, "the queued charge was never sent")
        await until(lambda: engine.pending_cancels == 0, "the authorize's cancel never ended")
        assert used_micro(rc) == 8500 and ledger_micro(rc) == (2, 8500)
        assert await spend_counted(flaky) == COUNTED
        status, s = await post(flaky, "/v1/settle", {"reservation_id": rid, **TOKENS})
        assert status == 200 and s["replayed"] is True, s
        assert await spend_counted(flaky) == COUNTED
        assert used_micro(rc) == 8500 and ledger_micro(rc) == (2, 8500)
    finally:
        rc.close()
        proxy.mode = "forward"
        await flaky.close()


# ---- 2. a request line that names another HTTP version ---------------------------------


def holds(rc: redis.Redis) -> tuple[int, int]:
    """(micro-USD held, reservation records) of the default tenant."""
    records = [k for k in rc.hkeys(TENANT.reservations) if not str(k).startswith(("k:", "q:"))]
    return held_micro(rc), len(records)


def normalized(answer: bytes) -> bytes:
    return re.sub(rb"\r\nDate: [^\r]*", b"", answer)


@pytest.mark.parametrize("version", ["2.0", "0.9", "1.2", "3.0"])
async def test_a_request_line_of_another_http_version_is_refused_on_both_paths(
    serve: Any, redis_client: redis.Redis, version: str
) -> None:
    """HTTP/2.0 (and 0.9) in a request line was served as 1.1, on both paths, and held
    spend. Every version but 1.0 and 1.1 answers the same 400 problem+json naming
    `http_version` (what aiohttp's parser answers for 1.2 or 3.0), byte for byte on the
    fast path and on aiohttp alone, through /v1/authorize and /ext_authz; nothing is held.
    HTTP/1.0 is served (and holds) on both."""
    answers: dict[tuple[bool, str], bytes] = {}
    for fast_http in (True, False):
        srv = await serve(fast=fast_http)
        for path, body in (("/v1/authorize", AUTHORIZE), ("/ext_authz/v1/chat", b"")):
            request = fp_post(path, body).replace(b"HTTP/1.1", f"HTTP/{version}".encode(), 1)
            [answer] = await exchange(srv, request, 1)
            head, _, text = answer.partition(b"\r\n\r\n")
            assert fp_status(answer) == 400, answer
            assert b"\r\nContent-Type: application/problem+json" in head, answer
            problem = json.loads(text)
            assert problem["field"] == "http_version", problem
            assert holds(redis_client) == (0, 0)
            answers[(fast_http, path)] = normalized(answer)
        if fast_http:
            assert fast_server(srv).served == 0
    for path in ("/v1/authorize", "/ext_authz/v1/chat"):
        assert answers[(True, path)] == answers[(False, path)]
    # The control: HTTP/1.0 is served on both paths, and its holds are seen.
    for fast_http in (True, False):
        srv = await serve(fast=fast_http)
        request = fp_post("/v1/authorize", AUTHORIZE).replace(b"HTTP/1.1", b"HTTP/1.0", 1)
        [answer] = await exchange(srv, request, 1)
        assert fp_status(answer) == 200, answer
    assert holds(redis_client)[1] == 2


# ---- 3. a reload that changes settings.allowed_hosts -----------------------------------


def hosts_doc(*allowed: str, fast_http: bool) -> dict[str, Any]:
    return {
        "budgets": [{"id": "org", "name": "Org", "scope": "organization", "limit_usd": 10.0,
                     "period": "monthly"}],
        "settings": {"allowed_hosts": list(allowed), "fast_http": fast_http},
    }  # fmt: skip


@pytest.mark.parametrize("fast_http", [True, False])
async def test_a_reload_that_changes_allowed_hosts_takes_effect_at_once(
    tmp_path: Path, redis_server: RedisServer, redis_client: redis.Redis, fast_http: bool
) -> None:
    """allowed_hosts [old.example.com] reloaded as [new.example.com]: new is 421 before
    the reload and answered after it; old is answered before and 421 after; on the fast
    path and on aiohttp alone. The refused calls hold nothing."""
    path = tmp_path / "budgets.yaml"
    path.write_text(yaml.safe_dump(hosts_doc("old.example.com", fast_http=fast_http)))
    store = RedisStore.from_url(redis_server.url, timeout_ms=2000)
    client = TestClient(TestServer(create_app(config.load(path), store), host="127.0.0.1"))
    await client.start_server()
    watcher = ConfigWatcher(path, client.server.app[ENGINE])

    async def statuses() -> tuple[int, int]:
        out = []
        for host in ("old.example.com", "new.example.com"):
            r = await client.post("/v1/authorize", json={"estimated_usd": 0.01},
                                  headers={"Host": host})  # fmt: skip
            text = await r.text()
            if r.status == 421:
                assert json.loads(text)["field"] == "Host", text
            else:
                assert r.status == 200 and json.loads(text)["allowed"] is True, text
            out.append(r.status)
        return out[0], out[1]

    try:
        assert await statuses() == (200, 421)
        assert holds(redis_client) == (10_000, 1)
        time.sleep(0.01)  # a distinct mtime even on coarse-timestamp filesystems
        path.write_text(yaml.safe_dump(hosts_doc("new.example.com", fast_http=fast_http)))
        assert await watcher.check() is None  # changed: it waits one tick for it to settle
        assert await watcher.check() is True
        assert client.server.app[ENGINE].config.settings.allowed_hosts == ("new.example.com",)
        assert await statuses() == (421, 200)
        assert holds(redis_client) == (20_000, 2)
    finally:
        await client.close()


# ---- 4. a warn budget's hold at COUNTER_MAX -------------------------------------------


async def test_a_warn_budgets_hold_saturates_at_counter_max_and_never_goes_negative(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """Two warn budgets; the team's hold is 1,000 micro-USD from 2^63 and an authorize
    holds 10,000. Before: HINCRBY overflowed on the team's hold after the org's was written:
    500, and the org's hold stayed with no reservation to give it back. Now: 200, the org
    holding exactly 10,000, the team COUNTER_MAX; the release gives back 10,000 to each.
    A hold that saturated got less than its holds' sum: given back, it ends at zero, not
    below."""
    c = await make_client(WARN2)
    st, d = await bounds_post(c, "/v1/authorize", {**WHO, "estimated_usd": 0.01})
    assert st == 200, d
    org, team = cids_of(redis_client, d["reservation_id"])
    st, r = await bounds_post(c, "/v1/release", {"reservation_id": d["reservation_id"]})
    assert st == 200 and spend_fields(redis_client) == {}, r
    redis_client.hset(TENANT.counters, f"h:{team}", NEAR_2_63)
    st, d = await bounds_post(c, "/v1/authorize", {**WHO, "estimated_usd": 0.01})
    assert st == 200 and d["allowed"] is True, d
    assert spend_fields(redis_client) == {f"h:{org}": 10_000, f"h:{team}": BOUNDS_MAX}
    st, r = await bounds_post(c, "/v1/release", {"reservation_id": d["reservation_id"]})
    assert st == 200 and r["state"] == "released", r
    assert spend_fields(redis_client) == {f"h:{team}": BOUNDS_MAX - 10_000}
    # The holds the saturated counter stood for end (here: set by hand), then this one.
    st, d = await bounds_post(c, "/v1/authorize", {**WHO, "estimated_usd": 0.01})
    assert st == 200, d
    redis_client.hset(TENANT.counters, f"h:{team}", 4_000)
    st, s = await bounds_post(c, "/v1/settle", {"reservation_id": d["reservation_id"],
                                                "cost_usd": 0.01})  # fmt: skip
    assert st == 200 and s["state"] == "settled", s
    assert spend_fields(redis_client) == {f"u:{org}": 10_000, f"u:{team}": 10_000}


# ---- 5. a state loss whose alert could not be written -----------------------------------


class FailingAlerts:
    """A pipeline whose execute fails when it carries an XADD (the alerts' write) while
    `failing` is set; the check's reads go through (test_state_loss_attacks' pattern)."""

    failing = True
    applied = False  # the write reaches Redis, only its answer is lost

    def __init__(self, inner: Any) -> None:
        self.inner, self.alerts = inner, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def xadd(self, *args: Any, **kwargs: Any) -> Any:
        self.alerts = True
        return self.inner.xadd(*args, **kwargs)

    async def execute(self) -> Any:
        if self.alerts and FailingAlerts.failing:
            if FailingAlerts.applied:
                await self.inner.execute()
            raise redis.ConnectionError("the alerts' write was cut")
        return await self.inner.execute()


def loss_alerts(rc: redis.Redis) -> list[dict[str, str]]:
    entries: list[Any] = rc.xrange(TENANT.alerts)  # type: ignore[assignment]
    return [f for _, f in entries if f.get("k") == ALERT_KIND]


@pytest.mark.parametrize("applied", [False, True])
async def test_a_loss_whose_alert_write_failed_is_alerted_at_the_next_check_once(
    server: RedisServer, applied: bool
) -> None:
    """Redis lost its state; the check that noticed it failed to write the alert (or wrote
    it and lost the answer: `applied`). The next check writes it if it is not there (one
    alert, the loss's id); the loss is counted once, in `losses` and the metric, and no
    later check writes it again. Before: the failed check was undone, the next one found
    the loss again and counted it twice (and with `applied`, alerted it twice)."""
    client = await inprocess_app(server.url, LOSS_DOC, events=Metrics())
    watch: StateWatch = client.app[STATE_WATCH]  # type: ignore[index]
    rc = redis.Redis(port=server.port, decode_responses=True)
    real = watch.client.pipeline
    try:
        await watch.check()
        lose_state(server, "flushall")
        FailingAlerts.failing, FailingAlerts.applied = True, applied
        watch.client.pipeline = lambda **kw: FailingAlerts(real(**kw))  # type: ignore[method-assign]
        assert await watch.check() is True  # the loss handled, its alert left for later
        assert watch.losses == 1 and len(loss_alerts(rc)) == int(applied)
        FailingAlerts.failing = False
        for _ in range(3):
            await watch.check()
        [alert] = loss_alerts(rc)
        assert alert["g"] == watch._epochs[keys.state_marker("default")], alert
        assert watch.losses == 1
        text = await (await client.get("/metrics")).text()
        assert 'budget_sidecar_store_state_lost_total{kind="lost"} 1.0' in text
    finally:
        watch.client.pipeline = real  # type: ignore[method-assign]
        rc.close()
        await client.close()
