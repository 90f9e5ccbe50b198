"""A budget that denies every call still sends its threshold alerts (lua/_lib.lua
alert_at_denial), attacked on the real Redis: a limit lowered under the spend by a reload
or by an admin PUT, a budget filled by holds, a warn and a downgrade budget. Alerts are
raised by the scripts that charge; a denied call charges nothing, so before this a budget
turned every call away for the rest of its period and its webhook never heard it was
exhausted. Every assertion counts exactly: alerts on the stream (raw), webhook deliveries,
the raw counters (a denial moves none), and the denial's own answer (unchanged)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis

from sidecar import keys
from sidecar.api.app import ENGINE
from sidecar.clock import FakeClock
from tests.conftest import ClientFactory, make_config
from tests.test_webhooks import SECRET, Receiver, eventually, verify

TENANT = keys.tenant_keys("default")
DAY = 86_400_000
CID = "day/acme/d20260310"  # the fake clock's day (conftest.T0_MS)
NEXT = "day/acme/d20260311"


def budget(limit_usd: float, **extra: Any) -> dict[str, Any]:
    return {"id": "day", "name": "Day", "scope": "organization", "limit_usd": limit_usd,
            "period": "daily", "on_exceed": "block", "alert_thresholds": [50, 80, 100],
            **extra}  # fmt: skip


def doc(limit_usd: float, webhook: str | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "budgets": [budget(limit_usd, **extra)],
        "pricing": [
            {"provider": "openai", "model": "gpt-4o", "input_per_1k": 0.0025,
             "output_per_1k": 0.01},
            {"provider": "openai", "model": "gpt-4o-mini", "input_per_1k": 0.00015,
             "output_per_1k": 0.0006},
        ],
    }  # fmt: skip
    if webhook:
        out["webhooks"] = [{"name": "ops", "url": webhook, "secret": SECRET}]
    return out


def amounts(rc: redis.Redis) -> dict[str, int]:
    """The raw counters that are money or calls: settled "u:", held "h:", calls "c:"."""
    raw: dict[str, str] = rc.hgetall(TENANT.counters)  # type: ignore[assignment]
    return {k: int(v) for k, v in raw.items() if k.startswith(("u:", "h:", "c:"))}


def alerts(rc: redis.Redis) -> list[tuple[str, str, str | None]]:
    """(counter id, threshold, held) of every threshold alert on the stream, in order."""
    entries: list[tuple[str, dict[str, str]]] = rc.xrange(TENANT.alerts)  # type: ignore[assignment]
    return [(f["cid"], f["t"], f.get("h")) for _, f in entries if "k" not in f]


async def post(client: Any, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = await client.post(path, json=body)
    out: dict[str, Any] = await r.json(content_type=None)
    assert r.status == 200, (path, body, r.status, out)
    return out


async def authorize(client: Any, usd: float, **extra: Any) -> dict[str, Any]:
    body = {"org_id": "acme", "estimated_usd": usd, **extra}
    return await post(client, "/v1/authorize", body)


async def spend(client: Any, usd: float) -> None:
    d = await authorize(client, usd)
    assert d["allowed"] is True, d
    await post(client, "/v1/settle", {"reservation_id": d["reservation_id"], "cost_usd": usd})


def reload(client: Any, document: dict[str, Any]) -> None:
    """What the config watcher does once a changed file has loaded."""
    client.server.app[ENGINE].swap(make_config(document))


def decision(d: dict[str, Any]) -> dict[str, Any]:
    """A denial's answer without what differs from call to call (ids, the forecast)."""
    out = {k: v for k, v in d.items() if k not in ("reservation_id", "request_id")}
    out["budgets"] = [
        {k: v for k, v in b.items() if k not in ("forecast_usd", "exhausted_at")}
        for b in d.get("budgets") or []
    ]
    return out


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


async def test_a_reload_under_the_spend_alerts_at_the_first_denial_once_per_period(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock, receiver: Receiver
) -> None:
    """$3 of a $10 budget is spent (no threshold); a reload lowers the limit to $2. Every
    call is now denied, and no charge ever comes: the first denial alerts 50, 80 and 100
    (once each, on the stream and at the webhook), 20 more denials and a second replica
    alert nothing more, and no counter moves. The next day, lowered again under its spend,
    alerts its own."""
    hook = receiver.url()
    first = await make_client(doc(10.0, hook))
    second = await make_client(doc(10.0, hook))
    await spend(first, 3.0)
    assert alerts(redis_client) == []
    for client in (first, second):
        reload(client, doc(2.0, hook))
    before = amounts(redis_client)
    assert before == {f"u:{CID}": 3_000_000}

    denied = await authorize(first, 0.1)
    assert denied["allowed"] is False and denied["action"] == "block", denied
    assert denied["budget_info"]["budget_id"] == "day"
    passed = [(CID, "50", "0"), (CID, "80", "0"), (CID, "100", "0")]
    assert alerts(redis_client) == passed
    assert amounts(redis_client) == before
    for i in range(20):
        again = await authorize((first, second)[i % 2], 0.1)
        assert decision(again) == decision(denied)
    assert alerts(redis_client) == passed
    assert amounts(redis_client) == before

    # The next day: $1.5 spent under $2 (its 50% by the charge), then lowered to $1.
    clock.advance(DAY)
    for client in (first, second):
        reload(client, doc(2.0, hook))
    await spend(second, 1.5)
    for client in (first, second):
        reload(client, doc(1.0, hook))
    for i in range(5):
        assert (await authorize((first, second)[i % 2], 0.1))["allowed"] is False
    assert alerts(redis_client) == [*passed, (NEXT, "50", None), (NEXT, "80", "0"),
                                    (NEXT, "100", "0")]  # fmt: skip

    # The webhook: the stream is delivered in order, so once the next day's three have
    # arrived, the first day's deliveries are all there is.
    await eventually(lambda: len(receiver.acked()) == 6, "six alerts delivered")
    assert len(receiver.deliveries) == 6
    for d in receiver.deliveries:
        verify(d)
    first_day = [d.alert for d in receiver.deliveries if "/d20260310/" in d.alert_id]
    assert sorted(a["threshold"] for a in first_day) == [50, 80, 100]
    for a in first_day:
        assert (a["amount_usd"], a["limit_usd"], a["held_usd"]) == (3.0, 2.0, 0.0)
        assert a["percentage_reached"] == 150.0 and a["alert_type"] == "threshold_reached"


async def test_an_admin_put_under_the_spend_alerts_at_the_first_denial(
    make_client: ClientFactory, redis_client: redis.Redis, receiver: Receiver
) -> None:
    """A budget made through the AxonFlow admin API, $0.6 of $1 spent (its 50% alert by the
    charge); a PUT lowers it to $0.5. The first denial alerts 80 and 100, the budget's
    alert route lists the three, and 20 more denials add none."""
    client = await make_client({"webhooks": [{"name": "ops", "url": receiver.url(),
                                              "secret": SECRET}]})  # fmt: skip
    created = await client.post("/api/v1/budgets", json={
        "id": "api-cap", "name": "API cap", "scope": "organization", "limit_usd": 1.0,
        "period": "daily", "on_exceed": "block", "alert_thresholds": [50, 80, 100]})  # fmt: skip
    assert created.status == 201, await created.text()
    await spend(client, 0.6)
    cid = "api-cap/acme/d20260310"
    assert alerts(redis_client) == [(cid, "50", None)]
    put = await client.put("/api/v1/budgets/api-cap", json={"limit_usd": 0.5})
    assert put.status == 200, await put.text()
    before = amounts(redis_client)

    denied = await authorize(client, 0.01)
    assert denied["allowed"] is False and denied["budget_info"]["limit_usd"] == 0.5, denied
    passed = [(cid, "50", None), (cid, "80", "0"), (cid, "100", "0")]
    assert alerts(redis_client) == passed
    for _ in range(20):
        assert decision(await authorize(client, 0.01)) == decision(denied)
    assert alerts(redis_client) == passed
    assert amounts(redis_client) == before

    listed = await (await client.get("/api/v1/budgets/api-cap/alerts")).json()
    assert listed["count"] == 3
    assert sorted(a["threshold"] for a in listed["alerts"]) == [50, 80, 100]
    await eventually(lambda: len(receiver.acked()) == 3, "three alerts delivered")
    assert sorted(d.alert["threshold"] for d in receiver.deliveries) == [50, 80, 100]


async def test_a_budget_filled_by_holds_alerts_at_the_denial_naming_what_is_held(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """Two holds fill a $1 budget ($0.6 + $0.4, nothing settled). An allowed authorize
    raises nothing (its path is unchanged); the first denied one alerts 50, 80 and 100 with
    the held amount, 20 more add none, and settling the holds later alerts nothing again:
    once per counter and threshold whoever raises it."""
    client = await make_client(doc(1.0))
    a = await authorize(client, 0.6)
    b = await authorize(client, 0.4)
    assert a["allowed"] and b["allowed"]
    assert alerts(redis_client) == []
    before = amounts(redis_client)
    assert before == {f"h:{CID}": 1_000_000}

    denied = await authorize(client, 0.01)
    assert denied["allowed"] is False, denied
    passed = [(CID, "50", "1000000"), (CID, "80", "1000000"), (CID, "100", "1000000")]
    assert alerts(redis_client) == passed
    for _ in range(20):
        assert decision(await authorize(client, 0.01)) == decision(denied)
    assert alerts(redis_client) == passed
    assert amounts(redis_client) == before

    listed = await (await client.get("/v1/alerts")).json()
    shown = [x for x in listed["alerts"] if x["threshold"] == 100]
    assert len(shown) == 1 and shown[0]["held_usd"] == 1.0 and shown[0]["amount_usd"] == 1.0
    assert "1.0 USD of it held" in shown[0]["message"]
    for held in (a, b):
        await post(client, "/v1/settle", {"reservation_id": held["reservation_id"],
                                          "cost_usd": held["estimated_usd"]})  # fmt: skip
    assert alerts(redis_client) == passed
    assert amounts(redis_client) == {f"u:{CID}": 1_000_000}


async def test_a_warn_budget_alerts_at_its_next_charge_and_a_downgrade_budget_at_its_denial(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """As README documents: a warn budget lowered under its spend lets calls through, its
    allowed authorizes alert nothing and its next charge alerts what is passed, once; a
    downgrade budget lowered under its spend cannot fit even the cheaper model, so it
    denies, and its first denial alerts."""
    warn = await make_client(doc(10.0, on_exceed="warn"))
    await spend(warn, 3.0)
    reload(warn, doc(2.0, on_exceed="warn"))
    allowed = await authorize(warn, 0.1)
    assert allowed["allowed"] is True and allowed["action"] == "warn", allowed
    assert alerts(redis_client) == []
    await post(warn, "/v1/settle", {"reservation_id": allowed["reservation_id"], "cost_usd": 0.1})
    passed = [(CID, "50", None), (CID, "80", None), (CID, "100", None)]
    assert alerts(redis_client) == passed
    for _ in range(20):
        await spend(warn, 0.01)
    assert alerts(redis_client) == passed

    redis_client.flushall()
    down = {"on_exceed": "downgrade", "downgrade_to": {"gpt-4o": "gpt-4o-mini"}}
    client = await make_client(doc(10.0, **down))
    await spend(client, 3.0)
    reload(client, doc(2.0, **down))
    call = {"provider": "openai", "model": "gpt-4o", "estimated_tokens_in": 1000}
    before = amounts(redis_client)
    denied = await post(client, "/v1/authorize", {"org_id": "acme", **call})
    assert denied["allowed"] is False and denied["action"] == "block", denied
    passed = [(CID, "50", "0"), (CID, "80", "0"), (CID, "100", "0")]
    assert alerts(redis_client) == passed
    for _ in range(20):
        again = await post(client, "/v1/authorize", {"org_id": "acme", **call})
        assert decision(again) == decision(denied)
    assert alerts(redis_client) == passed
    assert amounts(redis_client) == before


async def test_a_denial_below_every_threshold_alerts_nothing(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """A call too large for a budget that is barely used is denied, and nothing is passed:
    no alert (the committed spend, not the asked estimate, is what passes a threshold)."""
    client = await make_client(doc(1.0))
    await spend(client, 0.2)
    assert (await authorize(client, 5.0))["allowed"] is False
    assert alerts(redis_client) == []


async def test_one_denial_alerts_every_budget_of_the_call_that_passed_a_threshold(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """Three budgets on one call, $3 spent on each: a block budget lowered to $2 denies;
    the denial also sees a warn budget lowered to $5 (past 50%) and a block budget still
    at $10 (30%: nothing passed). One denial alerts the first's 50/80/100 and the warn
    budget's 50, nothing for the third; repeated, nothing more."""

    def three(org: float, warn: float) -> dict[str, Any]:
        return {"budgets": [
            budget(org),
            {**budget(warn, on_exceed="warn"), "id": "soft", "scope": "team",
             "scope_id": "t1"},
            {**budget(10.0), "id": "roomy", "scope": "user", "scope_id": "u1"},
        ]}  # fmt: skip

    client = await make_client(three(10.0, 10.0))
    ids = {"team_id": "t1", "user_id": "u1"}
    d = await authorize(client, 3.0, **ids)
    await post(client, "/v1/settle", {"reservation_id": d["reservation_id"], "cost_usd": 3.0})
    assert alerts(redis_client) == []
    reload(client, three(2.0, 5.0))
    before = amounts(redis_client)
    for _ in range(5):
        assert (await authorize(client, 0.1, **ids))["allowed"] is False
    soft = "soft/t1/d20260310"
    assert sorted(alerts(redis_client)) == sorted(
        [(CID, "50", "0"), (CID, "80", "0"), (CID, "100", "0"), (soft, "50", "0")]
    )
    assert amounts(redis_client) == before


async def test_the_sdks_pre_check_denial_alerts_and_its_alert_list_reads_them(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """Through the real AxonFlow SDK: a pre-check turned away by a limit lowered under the
    spend raises BudgetExceededError as before, and that denial alerts; get_budget_alerts
    parses the alerts (held_usd is an extra key to it)."""
    os.environ["AXONFLOW_TELEMETRY"] = "off"
    from axonflow import AxonFlow
    from axonflow.exceptions import BudgetExceededError

    client = await make_client(doc(10.0))
    await spend(client, 3.0)
    reload(client, doc(2.0))
    before = amounts(redis_client)
    url = str(client.make_url("")).rstrip("/")
    async with AxonFlow(endpoint=url, client_id="sdk") as sdk:
        for _ in range(3):
            with pytest.raises(BudgetExceededError) as denied:
                await sdk.pre_check(user_token="", query="q", context={"org_id": "acme"})
            assert (denied.value.budget_id, denied.value.limit_usd) == ("day", 2.0)
        listed = await sdk.get_budget_alerts("day")
    assert sorted(a.threshold for a in listed.alerts or []) == [50, 80, 100]
    assert alerts(redis_client) == [(CID, "50", "0"), (CID, "80", "0"), (CID, "100", "0")]
    assert amounts(redis_client) == before
