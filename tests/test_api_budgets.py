"""Budgets and prices made through the AxonFlow-compatible admin API (/api/v1/budgets*,
/api/v1/pricing), against a real Redis.

- A budget created, changed or deleted through one replica is enforced by it at once, by
  every other replica after its definitions poll, and after a restart (it lives in Redis).
- The config file's budgets are read-only here (409); ids are unique per tenant, also
  when two replicas create the same id at once.
- Bad input is a 400 problem+json naming the field, and changes nothing in Redis at all.
- A price set through the API prices the tenant's next decisions (exactly) and only its
  own; deleting it restores the config file's.

Waits poll with a deadline, then assert exact outcomes: nothing here is timed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from aiohttp.test_utils import TestClient

from sidecar import keys
from sidecar.clock import FakeClock
from sidecar.money import cost_micro, price_to_pico
from tests.conftest import ClientFactory
from tests.harness import RedisServer, SidecarProcess, sidecars
from tests.test_bad_input import snapshot

PROPAGATION_S = 5.0
PRICING = [
    {"provider": "openai", "model": "gpt-4o", "input_per_1k": 0.0025, "output_per_1k": 0.01},
]
CFG_CAP = {"id": "cfg-cap", "name": "Config cap", "scope": "organization", "limit_usd": 100.0,
           "period": "monthly"}  # fmt: skip
DOC: dict[str, Any] = {"budgets": [CFG_CAP], "pricing": PRICING}


def new_budget(budget_id: str = "api-cap", **over: Any) -> dict[str, Any]:
    return {"id": budget_id, "name": "API cap", "scope": "team", "scope_id": "t1",
            "limit_usd": 1.0, "period": "monthly", "on_exceed": "block",
            "alert_thresholds": [], **over}  # fmt: skip


async def problem(resp: Any, status: int, field: str | None) -> dict[str, Any]:
    text = await resp.text()
    assert resp.status == status, text
    assert resp.content_type == "application/problem+json", text
    assert "Traceback" not in text
    body: dict[str, Any] = json.loads(text)
    assert body["status"] == status and body["title"] == HTTPStatus(status).phrase
    assert body.get("field") == field, body
    return body


async def answer(resp: Any, status: int = 200) -> Any:
    text = await resp.text()
    assert resp.status == status, text
    return json.loads(text) if text else None


async def authorize(client: Any, usd: float, **identity: str) -> dict[str, Any]:
    body = {"team_id": "t1", **identity, "estimated_usd": usd}
    decision: dict[str, Any] = await answer(await client.post("/v1/authorize", json=body))
    return decision


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + PROPAGATION_S
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {PROPAGATION_S}s")
        await asyncio.sleep(0.05)


class Http:
    """A real sidecar process over aiohttp, with the TestClient's call shape."""

    def __init__(self, session: aiohttp.ClientSession, proc: SidecarProcess) -> None:
        self.session = session
        self.proc = proc

    def post(self, path: str, **kw: Any) -> Any:
        return self.session.post(self.proc.url + path, **kw)

    def get(self, path: str, **kw: Any) -> Any:
        return self.session.get(self.proc.url + path, **kw)


# ---- 1. created, enforced everywhere, kept in Redis ------------------------------------------


@pytest.mark.slow
async def test_created_budget_is_enforced_at_once_by_others_after_poll_and_after_restart(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    write_config: Callable[..., Path],
) -> None:
    path = str(write_config({"pricing": PRICING}))
    with sidecars(redis_server.url, path, 2) as (proc_a, proc_b):
        async with aiohttp.ClientSession() as session:
            a, b = Http(session, proc_a), Http(session, proc_b)
            # Before: nothing applies to t1.
            assert (await authorize(b, 5.0))["budgets"] == []
            before = await authorize(b, 5.0)
            await answer(
                await b.post("/v1/release", json={"reservation_id": before["reservation_id"]})
            )
            await answer(await b.get("/api/v1/budgets/api-cap"), 404)

            created = await answer(await a.post("/api/v1/budgets", json=new_budget()), 201)
            assert created == {
                **created,
                "id": "api-cap",
                "name": "API cap",
                "scope": "team",
                "scope_id": "t1",
                "limit_usd": 1.0,
                "period": "monthly",
                "on_exceed": "block",
                "alert_thresholds": [50, 80, 100],
                "enabled": True,
                "source": "api",
                "tenant_id": "default",
            }
            assert created["created_at"] == created["updated_at"]
            assert isinstance(created["created_at"], str) and created["created_at"].endswith("Z")

            # The replica that wrote it enforces it at once.
            denied = await authorize(a, 1.5)
            assert not denied["allowed"]
            assert denied["budget_info"]["budget_id"] == "api-cap"
            assert (await authorize(a, 0.3))["allowed"]

            # The other replica after its poll (the GET reads the same snapshot).
            async def b_knows() -> bool:
                async with b.get("/api/v1/budgets/api-cap") as r:
                    return bool(r.status == 200)

            await eventually(b_knows, "replica B loads the new budget")
            assert await answer(await b.get("/api/v1/budgets/api-cap")) == created
            assert (await authorize(b, 0.6))["allowed"]  # 0.9 of 1.0 committed
            late = await authorize(b, 0.2)
            assert not late["allowed"] and late["budget_info"]["budget_id"] == "api-cap"
            listed = await answer(await b.get("/api/v1/budgets"))
            assert [x["id"] for x in listed["budgets"]] == ["api-cap"] and listed["total"] == 1

    # Every process gone; a fresh one enforces it before it serves its first request.
    assert redis_client.hexists(keys.definitions("default"), "b:api-cap")
    fresh = SidecarProcess(redis_server.url, path)
    try:
        fresh.start()
        async with aiohttp.ClientSession() as session:
            c = Http(session, fresh)
            assert await answer(await c.get("/api/v1/budgets/api-cap")) == created
            assert (await authorize(c, 0.1))["allowed"]  # exactly 1.0: still allowed
            last = await authorize(c, 0.01)
            assert not last["allowed"] and last["budget_info"]["budget_id"] == "api-cap"
            assert (await authorize(c, 0.5, team_id="t2"))["allowed"]  # t1 only
    finally:
        fresh.cleanup()


# ---- 2. update and delete --------------------------------------------------------------------


async def test_update_changes_only_given_fields_and_delete_stops_enforcing(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    client = await make_client(DOC)
    other = await make_client(DOC)  # a second replica on the same Redis
    created = await answer(
        await client.post("/api/v1/budgets", json=new_budget(alert_thresholds=[70])), 201
    )
    assert created["created_at"] == "2026-03-10T12:00:00Z"
    held = await authorize(client, 0.6)
    assert held["allowed"]
    await answer(await client.post("/v1/release", json={"reservation_id": held["reservation_id"]}))

    clock.advance(5000)
    lowered = await answer(await client.put("/api/v1/budgets/api-cap", json={"limit_usd": 0.5}))
    assert lowered == {**created, "limit_usd": 0.5, "updated_at": "2026-03-10T12:00:05Z"}
    denied = await authorize(client, 0.6)
    assert not denied["allowed"]
    assert denied["budget_info"]["budget_id"] == "api-cap"
    assert denied["budget_info"]["limit_usd"] == 0.5

    renamed = await answer(await client.put("/api/v1/budgets/api-cap", json={"name": "Renamed"}))
    assert renamed == {**lowered, "name": "Renamed"}
    # An empty threshold list means unchanged; a given one is deduplicated and sorted.
    same = await answer(await client.put("/api/v1/budgets/api-cap", json={"alert_thresholds": []}))
    assert same["alert_thresholds"] == [70]
    both = await answer(
        await client.put(
            "/api/v1/budgets/api-cap", json={"alert_thresholds": [90, 10, 90], "on_exceed": "warn"}
        )
    )
    assert both == {**renamed, "alert_thresholds": [10, 90], "on_exceed": "warn"}
    assert await answer(await client.get("/api/v1/budgets/api-cap")) == both
    warned = await authorize(client, 0.6)
    assert warned["allowed"] and warned["action"] == "warn"
    await answer(
        await client.post("/v1/release", json={"reservation_id": warned["reservation_id"]})
    )

    # The other replica follows every change.
    async def other_sees(expected: dict[str, Any]) -> bool:
        resp = await other.get("/api/v1/budgets/api-cap")
        return bool(resp.status == 200 and await resp.json() == expected)

    await eventually(lambda: other_sees(both), "the other replica loads the update")
    assert (await authorize(other, 0.6))["action"] == "warn"

    await answer(await client.delete("/api/v1/budgets/api-cap"), 204)
    assert not redis_client.hexists(keys.definitions("default"), "b:api-cap")
    free = await authorize(client, 5.0)
    assert free["allowed"] and [s["budget_id"] for s in free["budgets"]] == ["cfg-cap"]
    for method, path in [
        ("GET", "/api/v1/budgets/api-cap"),
        ("PUT", "/api/v1/budgets/api-cap"),
        ("DELETE", "/api/v1/budgets/api-cap"),
        ("GET", "/api/v1/budgets/api-cap/status"),
        ("GET", "/api/v1/budgets/api-cap/alerts"),
    ]:
        body = await problem(await client.request(method, path, json={"limit_usd": 2.0}), 404, "id")
        assert "api-cap" in body["detail"]

    async def other_forgot() -> bool:
        return bool((await other.get("/api/v1/budgets/api-cap")).status == 404)

    await eventually(other_forgot, "the other replica drops the deleted budget")
    assert [s["budget_id"] for s in (await authorize(other, 50.0))["budgets"]] == ["cfg-cap"]


async def test_update_on_a_replica_that_missed_a_delete_does_not_resurrect_it(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(DOC)
    await answer(await client.post("/api/v1/budgets", json=new_budget()), 201)
    # The budget deleted through another replica, before this one's next poll (its version
    # is left alone so that the poll never comes: deterministic, the same state).
    assert redis_client.hdel(keys.definitions("default"), "b:api-cap") == 1
    resp = await client.put("/api/v1/budgets/api-cap", json={"limit_usd": 0.5})
    assert not redis_client.hexists(keys.definitions("default"), "b:api-cap")
    await problem(resp, 404, "id")


# ---- 3. conflicts --------------------------------------------------------------------------


async def test_config_budgets_are_read_only_and_ids_unique(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(DOC)
    before = snapshot(redis_client)
    for method, path, body in [
        ("PUT", "/api/v1/budgets/cfg-cap", {"limit_usd": 5.0}),
        ("DELETE", "/api/v1/budgets/cfg-cap", None),
        ("POST", "/api/v1/budgets", new_budget("cfg-cap")),
    ]:
        found = await problem(await client.request(method, path, json=body), 409, "id")
        assert "cfg-cap" in found["detail"], found
    assert snapshot(redis_client) == before
    cfg = await answer(await client.get("/api/v1/budgets/cfg-cap"))
    assert cfg["source"] == "config" and cfg["limit_usd"] == 100.0

    await answer(await client.post("/api/v1/budgets", json=new_budget("dup")), 201)
    stored = snapshot(redis_client)
    again = await problem(
        await client.post("/api/v1/budgets", json=new_budget("dup", name="Again")), 409, "id"
    )
    assert "dup" in again["detail"]
    assert snapshot(redis_client) == stored
    assert (await answer(await client.get("/api/v1/budgets/dup")))["name"] == "API cap"


async def test_concurrent_creates_of_one_id_make_exactly_one(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    replicas: list[TestClient[Any, Any]] = [await make_client(DOC) for _ in range(3)]
    ids = [f"race-{i}" for i in range(10)]

    async def create(i: int, budget_id: str) -> tuple[str, int, dict[str, Any]]:
        body = new_budget(budget_id, name=f"by {i}", limit_usd=float(i + 1))
        resp = await replicas[i % len(replicas)].post("/api/v1/budgets", json=body)
        return budget_id, resp.status, await resp.json(content_type=None)

    results = await asyncio.gather(*(create(i, bid) for bid in ids for i in range(4)))
    for budget_id in ids:
        mine = [(status, body) for bid, status, body in results if bid == budget_id]
        winners = [body for status, body in mine if status == 201]
        assert len(winners) == 1, mine
        assert sorted(status for status, _ in mine) == [201, 409, 409, 409]
        stored = json.loads(str(redis_client.hget(keys.definitions("default"), f"b:{budget_id}")))
        assert (stored["name"], stored["limit_usd"]) == (winners[0]["name"],
                                                        winners[0]["limit_usd"])  # fmt: skip
    for replica in replicas:

        async def loaded(replica: TestClient[Any, Any] = replica) -> bool:
            listed = await answer(await replica.get("/api/v1/budgets?limit=100"))
            return bool(listed["total"] == 11)

        await eventually(loaded, "every replica lists the ten budgets")


# ---- 4. bad input ----------------------------------------------------------------------------

HEX = "0" * 32
# (method, path, body, status, field)
BAD: dict[str, tuple[str, str, Any, int, str]] = {
    "create-missing-id": ("POST", "/api/v1/budgets",
                          {k: v for k, v in new_budget().items() if k != "id"}, 400, "id"),
    "create-id-space": ("POST", "/api/v1/budgets", new_budget("a b"), 400, "id"),
    "create-id-slash": ("POST", "/api/v1/budgets", new_budget("a/b"), 400, "id"),
    "create-id-brace": ("POST", "/api/v1/budgets", new_budget("{default}"), 400, "id"),
    "create-id-empty": ("POST", "/api/v1/budgets", new_budget(""), 400, "id"),
    "create-id-long": ("POST", "/api/v1/budgets", new_budget("x" * 65), 400, "id"),
    "create-limit-zero": ("POST", "/api/v1/budgets", new_budget(limit_usd=0), 400, "limit_usd"),
    "create-limit-negative": ("POST", "/api/v1/budgets", new_budget(limit_usd=-1), 400,
                              "limit_usd"),
    "create-limit-string": ("POST", "/api/v1/budgets", new_budget(limit_usd="1"), 400,
                            "limit_usd"),
    "create-missing-limit": ("POST", "/api/v1/budgets",
                             {k: v for k, v in new_budget().items() if k != "limit_usd"}, 400,
                             "limit_usd"),
    "create-scope": ("POST", "/api/v1/budgets", new_budget(scope="galaxy"), 400, "scope"),
    "create-period": ("POST", "/api/v1/budgets", new_budget(period="hourly"), 400, "period"),
    "create-on-exceed": ("POST", "/api/v1/budgets", new_budget(on_exceed="explode"), 400,
                         "on_exceed"),
    "create-thresholds-str": ("POST", "/api/v1/budgets", new_budget(alert_thresholds=["50"]),
                              400, "alert_thresholds[0]"),
    "create-thresholds-float": ("POST", "/api/v1/budgets",
                                new_budget(alert_thresholds=[50, 80.5]), 400,
                                "alert_thresholds[1]"),
    "create-thresholds-zero": ("POST", "/api/v1/budgets", new_budget(alert_thresholds=[0]), 400,
                               "alert_thresholds[0]"),
    "create-thresholds-not-list": ("POST", "/api/v1/budgets", new_budget(alert_thresholds=50),
                                   400, "alert_thresholds"),
    "create-scope-id": ("POST", "/api/v1/budgets", new_budget(scope_id="t 1"), 400, "scope_id"),
    "create-unknown-field": ("POST", "/api/v1/budgets", new_budget(bogus=1), 400, "bogus"),
    "create-not-json": ("POST", "/api/v1/budgets", b"{", 400, "body"),
    "update-limit-zero": ("PUT", "/api/v1/budgets/api-cap", {"limit_usd": 0}, 400, "limit_usd"),
    "update-limit-negative": ("PUT", "/api/v1/budgets/api-cap", {"limit_usd": -3.5}, 400,
                              "limit_usd"),
    "update-unknown-field": ("PUT", "/api/v1/budgets/api-cap", {"bogus": True}, 400, "bogus"),
    "update-scope": ("PUT", "/api/v1/budgets/api-cap", {"scope": "user"}, 400, "scope"),
    "update-on-exceed": ("PUT", "/api/v1/budgets/api-cap", {"on_exceed": "nope"}, 400,
                         "on_exceed"),
    "list-scope": ("GET", "/api/v1/budgets?scope=galaxy", None, 400, "scope"),
    "list-limit": ("GET", "/api/v1/budgets?limit=0", None, 400, "limit"),
    "status-per-entity-without-scope-id": ("GET", "/api/v1/budgets/each-user/status", None,
                                           400, "scope_id"),
    "pricing-negative": ("PUT", "/api/v1/pricing",
                         {"provider": "openai", "model": "gpt-4o",
                          "pricing": {"input_per_1k": -0.1, "output_per_1k": 0.01}},
                         400, "pricing.input_per_1k"),
    "pricing-missing-model": ("PUT", "/api/v1/pricing",
                              {"provider": "openai",
                               "pricing": {"input_per_1k": 0.1, "output_per_1k": 0.01}},
                              400, "model"),
    "pricing-bad-provider": ("PUT", "/api/v1/pricing",
                             {"provider": "open ai", "model": "gpt-4o",
                              "pricing": {"input_per_1k": 0.1, "output_per_1k": 0.01}},
                             400, "provider"),
    "pricing-unknown-field": ("PUT", "/api/v1/pricing",
                              {"provider": "openai", "model": "gpt-4o", "extra": 1,
                               "pricing": {"input_per_1k": 0.1, "output_per_1k": 0.01}},
                              400, "extra"),
    "pricing-delete-no-model": ("DELETE", "/api/v1/pricing?provider=openai", None, 400, "model"),
    "pricing-delete-not-set": ("DELETE", "/api/v1/pricing?provider=openai&model=gpt-4o", None,
                               404, "model"),
    "usage-period": ("GET", "/api/v1/usage?period=bogus", None, 400, "period"),
    "breakdown-group-by": ("GET", "/api/v1/usage/breakdown?group_by=bogus", None, 400,
                           "group_by"),
    "breakdown-no-group-by": ("GET", "/api/v1/usage/breakdown", None, 400, "group_by"),
    "breakdown-period": ("GET", "/api/v1/usage/breakdown?group_by=step&period=hourly", None,
                         400, "period"),
    "records-limit-0": ("GET", "/api/v1/usage/records?limit=0", None, 400, "limit"),
    "records-limit-101": ("GET", "/api/v1/usage/records?limit=101", None, 400, "limit"),
    "records-limit-abc": ("GET", "/api/v1/usage/records?limit=abc", None, 400, "limit"),
    "records-offset-negative": ("GET", "/api/v1/usage/records?offset=-1", None, 400, "offset"),
    "pre-check-team-space": ("POST", "/api/policy/pre-check", {"context": {"team_id": "a b"}},
                             400, "context.team_id"),
    "pre-check-model": ("POST", "/api/policy/pre-check", {"context": {"model": "a|b"}}, 400,
                        "context.model"),
    "audit-context-id": ("POST", "/api/audit/llm-call",
                         {"context_id": "not-a-reservation", "provider": "openai",
                          "model": "gpt-4o"}, 400, "context_id"),
    "audit-negative-tokens": ("POST", "/api/audit/llm-call",
                              {"context_id": HEX, "provider": "openai", "model": "gpt-4o",
                               "token_usage": {"prompt_tokens": -1}}, 400,
                              "token_usage.prompt_tokens"),
    "audit-unknown-context": ("POST", "/api/audit/llm-call",
                              {"context_id": HEX, "provider": "openai", "model": "gpt-4o"},
                              404, "context_id"),
    "get-unknown": ("GET", "/api/v1/budgets/nope", None, 404, "id"),
    "put-unknown": ("PUT", "/api/v1/budgets/nope", {"limit_usd": 2.0}, 404, "id"),
    "put-unknown-bad-body": ("PUT", "/api/v1/budgets/nope", {"limit_usd": -2}, 404, "id"),
    "delete-unknown": ("DELETE", "/api/v1/budgets/nope", None, 404, "id"),
    "status-unknown": ("GET", "/api/v1/budgets/nope/status", None, 404, "id"),
    "alerts-unknown": ("GET", "/api/v1/budgets/nope/alerts", None, 404, "id"),
}  # fmt: skip


@pytest.fixture
async def seeded(
    make_client: ClientFactory, redis_client: redis.Redis
) -> tuple[TestClient[Any, Any], dict[str, Any]]:
    each_user = {"id": "each-user", "name": "Each user", "scope": "user", "limit_usd": 5.0,
                 "period": "daily"}  # fmt: skip
    client = await make_client({**DOC, "budgets": [CFG_CAP, each_user]})
    await answer(await client.post("/api/v1/budgets", json=new_budget()), 201)
    price = {"provider": "acme", "model": "m:1",
             "pricing": {"input_per_1k": 0.001, "output_per_1k": 0.002}}  # fmt: skip
    await answer(await client.put("/api/v1/pricing", json=price))
    held = await authorize(client, 0.7)
    await answer(await client.post("/v1/settle", json={"reservation_id": held["reservation_id"],
                                                       "cost_usd": 0.6}))  # fmt: skip
    await authorize(client, 0.2)  # left held
    await answer(await client.post("/v1/record", json={"user_id": "u1", "cost_usd": 0.01}))
    before = snapshot(redis_client)
    assert any(k.endswith(":usage") for k in before) and any(":agg:" in k for k in before)
    assert any(k.endswith(":alerts") for k in before)  # the settle crossed 50%
    return client, before


@pytest.mark.parametrize("case", sorted(BAD))
async def test_bad_input_is_a_problem_naming_the_field_and_changes_nothing(
    seeded: tuple[TestClient[Any, Any], dict[str, Any]], redis_client: redis.Redis, case: str
) -> None:
    client, before = seeded
    method, path, body, status, field = BAD[case]
    if isinstance(body, bytes):
        resp = await client.request(
            method, path, data=body, headers={"Content-Type": "application/json"}
        )
    else:
        resp = await client.request(method, path, json=body)
    await problem(resp, status, field)
    assert snapshot(redis_client) == before


# ---- 5. prices -------------------------------------------------------------------------------


def basic(client_id: str, secret: str) -> dict[str, str]:
    token = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


ADMIN_A = basic("admin-a", "a-secret")
ADMIN_B = basic("admin-b", "b-secret")
TENANTS_DOC: dict[str, Any] = {
    "pricing": PRICING,
    # The estimates compared here are fractions of a cent: no floor may raise them.
    "settings": {"min_estimate_usd": 0.000001},
    "auth": {
        "clients": [
            {"client_id": "admin-a", "tenant": "ta", "role": "admin", "secret": "a-secret"},
            {"client_id": "admin-b", "tenant": "tb", "role": "admin", "secret": "b-secret"},
        ]
    },
}


def micro(tokens_in: int, tokens_out: int, input_per_1k: float, output_per_1k: float) -> int:
    return cost_micro(tokens_in, price_to_pico(input_per_1k)) + cost_micro(
        tokens_out, price_to_pico(output_per_1k)
    )


async def test_prices_set_through_the_api_price_decisions_of_their_tenant_only(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(TENANTS_DOC)
    tokens = {"provider": "openai", "model": "gpt-4o", "estimated_tokens_in": 1234,
              "estimated_tokens_out": 567}  # fmt: skip

    async def estimate(headers: dict[str, str], **over: Any) -> dict[str, Any]:
        resp = await client.post("/v1/authorize", json={**tokens, **over}, headers=headers)
        decision: dict[str, Any] = await answer(resp)
        return decision

    async def price_of(headers: dict[str, str], query: str) -> Any:
        return await answer(await client.get(f"/api/v1/pricing?{query}", headers=headers))

    config_cost = micro(1234, 567, 0.0025, 0.01)
    held_before = await estimate(ADMIN_A)
    assert held_before["estimated_usd"] == config_cost / 1e6

    new_price = {"provider": "openai", "model": "gpt-4o",
                 "pricing": {"input_per_1k": 0.0051, "output_per_1k": 0.0203}}  # fmt: skip
    assert await answer(await client.put("/api/v1/pricing", json=new_price, headers=ADMIN_A)) == (
        new_price
    )
    api_cost = micro(1234, 567, 0.0051, 0.0203)
    assert api_cost != config_cost
    held_after = await estimate(ADMIN_A)
    assert held_after["estimated_usd"] == api_cost / 1e6
    from_api = {"source": "api", "source_version": None, "source_date": None}
    assert await price_of(ADMIN_A, "provider=openai&model=gpt-4o") == {**new_price, **from_api}
    # Tenant B still has the config file's price.
    assert (await estimate(ADMIN_B))["estimated_usd"] == config_cost / 1e6
    assert (await price_of(ADMIN_B, "provider=openai&model=gpt-4o"))["pricing"] == {
        "input_per_1k": 0.0025,
        "output_per_1k": 0.01,
    }

    # Settling by tokens uses the price each reservation was authorized at.
    for held, price in [(held_before, (0.0025, 0.01)), (held_after, (0.0051, 0.0203))]:
        settled = await answer(
            await client.post(
                "/v1/settle",
                json={"reservation_id": held["reservation_id"], "tokens_in": 2000,
                      "tokens_out": 300},
                headers=ADMIN_A,
            )
        )  # fmt: skip
        assert settled["cost_usd"] == micro(2000, 300, *price) / 1e6
    # A record priced by tokens uses the current one.
    await answer(
        await client.post(
            "/v1/record",
            json={"provider": "openai", "model": "gpt-4o", "tokens_in": 10, "tokens_out": 10},
            headers=ADMIN_A,
        )
    )
    page = await answer(await client.get("/api/v1/usage/records?limit=1", headers=ADMIN_A))
    assert page["records"][0]["cost_usd"] == micro(10, 10, 0.0051, 0.0203) / 1e6

    # A model only tenant A priced (a name with ':' and '/').
    model = {"provider": "bedrock", "model": "meta/llama-3:1",
             "pricing": {"input_per_1k": 0.0003, "output_per_1k": 0.0006}}  # fmt: skip
    await answer(await client.put("/api/v1/pricing", json=model, headers=ADMIN_A))
    only_a = {"provider": "bedrock", "model": "meta/llama-3:1"}
    assert (await estimate(ADMIN_A, **only_a))["estimated_usd"] == micro(1234, 567, 0.0003,
                                                                         0.0006) / 1e6  # fmt: skip
    await problem(
        await client.post("/v1/authorize", json={**tokens, **only_a}, headers=ADMIN_B),
        400,
        "model",
    )
    # Each tenant's own prices (the bundled catalogue's follow them in the full list).
    CAT = "genai-prices"
    listed_a = [p for p in (await price_of(ADMIN_A, ""))["pricing"] if p["source"] != CAT]
    listed_b = [p for p in (await price_of(ADMIN_B, ""))["pricing"] if p["source"] != CAT]
    assert sorted((p["provider"], p["model"], p["source"]) for p in listed_a) == [
        ("bedrock", "meta/llama-3:1", "api"),
        ("openai", "gpt-4o", "api"),
    ]
    assert listed_b == [{"provider": "openai", "model": "gpt-4o",
                         "pricing": {"input_per_1k": 0.0025, "output_per_1k": 0.01},
                         "source": "config", "source_version": None,
                         "source_date": None}]  # fmt: skip
    assert await price_of(ADMIN_A, "provider=bedrock&model=meta/llama-3:1") == {**model, **from_api}
    await problem(
        await client.get("/api/v1/pricing?provider=bedrock&model=meta/llama-3:1", headers=ADMIN_B),
        404,
        "model",
    )
    # B cannot delete A's price: it has none of its own.
    await problem(
        await client.delete("/api/v1/pricing?provider=openai&model=gpt-4o", headers=ADMIN_B),
        404,
        "model",
    )

    # Deleting the API price restores the config file's, for A only.
    resp = await client.delete("/api/v1/pricing?provider=openai&model=gpt-4o", headers=ADMIN_A)
    await answer(resp, 204)
    assert (await estimate(ADMIN_A))["estimated_usd"] == config_cost / 1e6
    assert (await price_of(ADMIN_A, "provider=openai&model=gpt-4o"))["pricing"] == {
        "input_per_1k": 0.0025,
        "output_per_1k": 0.01,
    }
    await problem(
        await client.delete("/api/v1/pricing?provider=openai&model=gpt-4o", headers=ADMIN_A),
        404,
        "model",
    )
    assert await price_of(ADMIN_A, "provider=bedrock&model=meta/llama-3:1") == {**model, **from_api}
    assert set(redis_client.hkeys(keys.definitions("ta"))) == {"p:bedrock/meta%2Fllama-3%3A1"}
    assert not redis_client.exists(keys.definitions("tb"))


async def test_budgets_belong_to_their_tenant(make_client: ClientFactory) -> None:
    client = await make_client(TENANTS_DOC)
    await answer(await client.post("/api/v1/budgets", json=new_budget(), headers=ADMIN_A), 201)
    await problem(await client.get("/api/v1/budgets/api-cap", headers=ADMIN_B), 404, "id")
    # B may make its own budget of the same id.
    await answer(
        await client.post("/api/v1/budgets", json=new_budget(limit_usd=3.0), headers=ADMIN_B), 201
    )
    a = await answer(await client.get("/api/v1/budgets/api-cap", headers=ADMIN_A))
    b = await answer(await client.get("/api/v1/budgets/api-cap", headers=ADMIN_B))
    assert (a["limit_usd"], a["tenant_id"]) == (1.0, "ta")
    assert (b["limit_usd"], b["tenant_id"]) == (3.0, "tb")
    body = {"team_id": "t1", "estimated_usd": 2.0}
    denied = await answer(await client.post("/v1/authorize", json=body, headers=ADMIN_A))
    allowed = await answer(await client.post("/v1/authorize", json=body, headers=ADMIN_B))
    assert not denied["allowed"] and allowed["allowed"]
    await answer(await client.delete("/api/v1/budgets/api-cap", headers=ADMIN_A), 204)
    assert (await answer(await client.get("/api/v1/budgets/api-cap", headers=ADMIN_B)))[
        "limit_usd"
    ] == 3.0
