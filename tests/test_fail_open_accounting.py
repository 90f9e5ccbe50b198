"""Fail mode open loses no spend: a decision allowed while Redis is away gets an id, its
settle (or the AxonFlow audit of its context_id) is charged as a record, at once or once
Redis is back, exactly once (sidecar.fail_open).

Each test runs the app in-process over its own redis-server (the `server` fixture), which
it stops and starts again. The clock is fake (leases end only when a test says so).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from sidecar.api.app import ENGINE, create_app
from sidecar.clock import FakeClock
from sidecar.fail_open import MARK
from sidecar.metrics import Metrics
from sidecar.store import RedisStore
from tests.conftest import T0_MS, make_config
from tests.harness import RedisServer

os.environ["AXONFLOW_TELEMETRY"] = "off"

from axonflow import AxonFlow
from axonflow.types import RetryConfig, TokenUsage

GUARD_S = 10.0  # not a timing assertion: only keeps a hang from hanging the suite
PRICE = {"provider": "openai", "model": "gpt-4o", "input_per_1k": 0.0025, "output_per_1k": 0.01}


def doc(fail_mode: str = "open", **settings: Any) -> dict[str, Any]:
    return {
        "budgets": [
            {
                "id": "user",
                "name": "Each user",
                "scope": "user",
                "limit_usd": 1.0,
                "period": "daily",
                "alert_thresholds": [50],
            },
            {
                "id": "agent",
                "name": "Each agent",
                "scope": "agent",
                "limit_usd": 5.0,
                "period": "daily",
            },
        ],
        "pricing": [PRICE],
        "settings": {"fail_mode": fail_mode, "redis_timeout_ms": 2000, **settings},
    }


class App:
    def __init__(self, client: TestClient[Any, Any], metrics: Metrics, clock: FakeClock) -> None:
        self.client = client
        self.metrics = metrics
        self.clock = clock

    @property
    def url(self) -> str:
        return str(self.client.make_url("")).rstrip("/")

    @property
    def pending(self) -> int:
        return self.client.app[ENGINE].fail_open.pending

    def metric(self, name: str, **labels: str) -> float:
        self.metrics.exposition()  # flushes the tallies
        value = self.metrics.registry.get_sample_value(f"budget_sidecar_{name}", labels)
        return 0.0 if value is None else value

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
        async def go() -> tuple[int, dict[str, Any]]:
            resp = await self.client.request(method, path, json=body)
            return resp.status, json.loads(await resp.text())

        return await asyncio.wait_for(go(), GUARD_S)

    async def drained(self) -> None:
        """Wait (bounded) until every queued charge was recorded."""
        deadline = time.monotonic() + GUARD_S
        while self.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert self.pending == 0, "queued fail-open charges were not recorded"


AppFactory = Callable[..., Awaitable[App]]


@pytest.fixture
async def make_app(server: RedisServer) -> AsyncIterator[AppFactory]:
    clients: list[TestClient[Any, Any]] = []

    async def make(document: dict[str, Any]) -> App:
        cfg = make_config(document)
        store = RedisStore.from_url(server.url, timeout_ms=cfg.settings.redis_timeout_ms)
        clock = FakeClock(T0_MS)
        metrics = Metrics(clock=clock)
        app = create_app(cfg, store, clock=clock, events=metrics)
        client = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return App(client, metrics, clock)

    yield make
    for c in clients:
        await c.close()


async def degraded_authorize(app: App, **fields: Any) -> str:
    status, d = await app.call(
        "POST", "/v1/authorize", {"user_id": "u1", "agent_id": "a1", "estimated_usd": 0.1, **fields}
    )
    assert status == 200 and d["allowed"] is True and d["degraded"] is True, d
    rid = d["reservation_id"]
    assert isinstance(rid, str) and rid.startswith(MARK) and len(rid) == 32, d
    assert d["lease_expires_at"] is None  # nothing is held
    return rid


async def used(app: App, budget: str = "user", entity: str = "u1") -> tuple[float, float]:
    status, s = await app.call("GET", f"/v1/budgets/{budget}/status?scope_id={entity}")
    assert status == 200, s
    return s["used_usd"], s["held_usd"]


async def ledger(app: App) -> list[dict[str, Any]]:
    status, body = await app.call("GET", "/api/v1/usage/records?limit=100")
    assert status == 200, body
    records: list[dict[str, Any]] = body["records"] or []
    return records


async def test_settles_during_and_after_the_outage_are_charged_exactly_once(
    make_app: AppFactory, server: RedisServer
) -> None:
    app = await make_app(doc())
    assert await used(app) == (0.0, 0.0)  # a pooled connection, and Redis answering
    server.stop()
    rids = [await degraded_authorize(app) for _ in range(5)]
    assert len(set(rids)) == 5
    costs = [0.01, 0.02, 0.03, 0.04, 0.05]
    for rid, cost in zip(rids[:3], costs[:3], strict=True):
        status, s = await app.call("POST", "/v1/settle", {"reservation_id": rid, "cost_usd": cost})
        assert status == 202 and s["state"] == "queued" and s["cost_usd"] == cost, s
        assert s["replayed"] is False
    # The first settle retried twice while Redis is away: the same answer, nothing more.
    for _ in range(2):
        status, s = await app.call(
            "POST", "/v1/settle", {"reservation_id": rids[0], "cost_usd": 0.01}
        )
        assert (status, s["state"], s["replayed"]) == (202, "queued", True), s
    assert app.metric("fail_open_charges_total", event="queued") == 3
    server.start()  # empty, on the same port
    # Settled after Redis is back (at once, or queued while the breaker cools down).
    for rid, cost in zip(rids[3:], costs[3:], strict=True):
        status, s = await app.call("POST", "/v1/settle", {"reservation_id": rid, "cost_usd": cost})
        assert status in (200, 202) and s["cost_usd"] == cost, s
    await app.drained()
    # ... and retried after it was recorded: replayed, nothing more.
    for rid in (rids[0], rids[4]):
        status, s = await app.call("POST", "/v1/settle", {"reservation_id": rid, "cost_usd": 0.5})
        assert (status, s["state"], s["replayed"]) == (200, "settled", True), s
    assert await used(app) == (0.15, 0.0)
    assert await used(app, "agent", "a1") == (0.15, 0.0)
    records = await ledger(app)
    assert sorted(r["cost_usd"] for r in records) == costs
    assert {(r["user_id"], r["agent_id"]) for r in records} == {("u1", "a1")}
    recorded = app.metric("fail_open_charges_total", event="recorded")
    later = app.metric("fail_open_charges_total", event="recorded_later")
    assert recorded + later == 5 and later >= 3
    assert app.metric("llm_cost_usd_total", provider="other", model="other") == pytest.approx(0.15)
    assert app.metric("fail_open_pending") == 0


async def test_two_replicas_charge_a_grant_once(make_app: AppFactory, server: RedisServer) -> None:
    """An authorize retried on another replica with the same idempotency key gets the same
    id there; both replicas queue its settle (a client retrying on the other), and both
    record it when Redis is back: it is charged once."""
    a, b = await make_app(doc()), await make_app(doc())
    assert await used(a) == await used(b) == (0.0, 0.0)
    server.stop()
    rid = await degraded_authorize(a, idempotency_key="call-1")
    assert await degraded_authorize(b, idempotency_key="call-1") == rid
    other = await degraded_authorize(a, idempotency_key="call-2")
    assert other != rid
    for app in (a, b, a):
        status, s = await app.call("POST", "/v1/settle", {"reservation_id": rid, "cost_usd": 0.2})
        assert status == 202 and s["state"] == "queued", s
    status, s = await a.call("POST", "/v1/release", {"reservation_id": other})
    assert (status, s["state"]) == (200, "released"), s
    server.start()
    await a.drained()
    await b.drained()
    assert await used(a) == (0.2, 0.0)
    assert [r["cost_usd"] for r in await ledger(a)] == [0.2]
    later = [app.metric("fail_open_charges_total", event="recorded_later") for app in (a, b)]
    assert later == [1, 1]  # both sent it; Redis charged it once
    # The released grant was forgotten: nothing charged, and no drop counted.
    assert a.metric("fail_open_dropped_total", reason="lease_ended") == 0


async def test_the_axonflow_sdk_audit_of_a_fail_open_pre_check_is_charged(
    make_app: AppFactory, server: RedisServer
) -> None:
    app = await make_app(doc())
    assert await used(app) == (0.0, 0.0)
    sdk = AxonFlow(endpoint=app.url, client_id="fo-test", retry_config=RetryConfig(enabled=False))
    try:
        server.stop()
        context = {"user_id": "u1", "agent_id": "a1", "provider": "openai", "model": "gpt-4o"}
        approval = await asyncio.wait_for(
            sdk.pre_check(user_token="", query="q", context=context), GUARD_S
        )
        assert approval.approved is True and approval.approved_data == {"degraded": True}
        assert approval.context_id.startswith(MARK)
        usage = TokenUsage(prompt_tokens=1000, completion_tokens=2000, total_tokens=3000)
        audit = await asyncio.wait_for(
            sdk.audit_llm_call(context_id=approval.context_id, response_summary="ok",
                               provider="openai", model="gpt-4o", token_usage=usage,
                               latency_ms=5),
            GUARD_S,
        )  # fmt: skip
        assert audit.success is True and audit.audit_id == approval.context_id
    finally:
        await sdk.close()
    server.start()
    await app.drained()
    cost = 0.0025 + 0.02  # 1k input and 2k output tokens at gpt-4o's price
    assert await used(app) == (pytest.approx(cost), 0.0)
    [record] = await ledger(app)
    assert (record["provider"], record["model"]) == ("openai", "gpt-4o")
    assert (record["tokens_in"], record["tokens_out"], record["latency_ms"]) == (1000, 2000, 5)
    assert record["cost_usd"] == pytest.approx(cost)
    assert app.metric("llm_cost_usd_total", provider="openai", model="gpt-4o") == pytest.approx(
        cost
    )


async def test_recorded_spend_raises_the_threshold_alert(
    make_app: AppFactory, server: RedisServer
) -> None:
    app = await make_app(doc())
    assert await used(app) == (0.0, 0.0)
    server.stop()
    rids = [await degraded_authorize(app) for _ in range(2)]
    for rid in rids:  # 0.3 + 0.3 of 1.0: past the 50% threshold
        status, s = await app.call("POST", "/v1/settle", {"reservation_id": rid, "cost_usd": 0.3})
        assert status == 202, s
    server.start()
    await app.drained()
    status, body = await app.call("GET", "/api/v1/budgets/user/alerts")
    assert status == 200, body
    alerts = body["alerts"] or []
    kinds = [(x["threshold"], x["alert_type"]) for x in alerts]
    assert kinds == [(50, "threshold_reached")], alerts
    assert alerts[0]["amount_usd"] == 0.6


async def test_the_cap_drops_what_it_cannot_keep_and_says_so(
    make_app: AppFactory, server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    app = await make_app(doc(fail_open_max_pending=3))
    assert await used(app) == (0.0, 0.0)
    server.stop()
    rids = [await degraded_authorize(app) for _ in range(3)]
    with caplog.at_level(logging.WARNING, logger="sidecar.fail_open"):
        status, d = await app.call("POST", "/v1/authorize", {"user_id": "u1", "estimated_usd": 0.1})
    # Still allowed (fail mode open), but with nothing to settle: counted and logged.
    assert status == 200 and d["degraded"] is True and d["reservation_id"] is None, d
    assert app.metric("fail_open_dropped_total", reason="full") == 1
    warnings = [r for r in caplog.records if r.name == "sidecar.fail_open"]
    assert len(warnings) == 1 and "fail_open_max_pending" in warnings[0].getMessage()
    for rid in rids:
        status, s = await app.call("POST", "/v1/settle", {"reservation_id": rid, "cost_usd": 0.1})
        assert status == 202, s
    server.start()
    await app.drained()
    assert await used(app) == (pytest.approx(0.3), 0.0)
    assert len(await ledger(app)) == 3


async def test_a_grant_unsettled_at_its_lease_end_is_counted_as_dropped(
    make_app: AppFactory, server: RedisServer
) -> None:
    """Unsettled at its lease's end: let go and counted; with on_expiry charge, its
    estimate is charged instead (as a reservation's would be)."""
    app = await make_app(doc())
    assert await used(app) == (0.0, 0.0)
    server.stop()
    await degraded_authorize(app, lease_ms=1000)
    await degraded_authorize(app, lease_ms=1000, on_expiry="charge")
    app.clock.advance(1000)
    server.start()
    await app.drained()
    assert app.metric("fail_open_dropped_total", reason="lease_ended") == 1
    assert await used(app) == (0.1, 0.0)
    [record] = await ledger(app)
    assert record["cost_usd"] == 0.1


async def test_fail_mode_closed_is_unchanged(make_app: AppFactory, server: RedisServer) -> None:
    app = await make_app(doc("closed"))
    assert await used(app) == (0.0, 0.0)
    server.stop()
    status, body = await app.call("POST", "/v1/authorize", {"user_id": "u1", "estimated_usd": 0.1})
    assert status == 503 and body["degraded"] is True, body
    status, body = await app.call(
        "POST", "/v1/settle", {"reservation_id": MARK + "0" * 28, "cost_usd": 0.1}
    )
    assert status == 503, body
    assert app.pending == 0
    assert app.metric("fail_open_charges_total", event="queued") == 0
    server.start()
    deadline = time.monotonic() + GUARD_S  # the breaker cools down before it asks again
    while (await app.call("GET", "/v1/budgets/user/status?scope_id=u1"))[0] != 200:
        assert time.monotonic() < deadline, "Redis did not answer again"
        await asyncio.sleep(0.05)
    assert await used(app) == (0.0, 0.0)
    assert await ledger(app) == []
