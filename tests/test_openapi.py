"""GET /openapi.json stays true: every route the router serves is documented and nothing
else is; the document is valid OpenAPI 3.1 with valid JSON Schemas; and real answers of
every documented status validate against the documented schema and content type."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import redis
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from sidecar.api import openapi
from sidecar.api.app import create_app
from sidecar.clock import FakeClock
from sidecar.metrics import Metrics
from sidecar.store import RedisStore
from tests.conftest import make_config
from tests.harness import RedisServer, free_port

CONFIG: dict[str, Any] = {
    "budgets": [
        {"id": "org", "name": "Org", "scope": "organization", "limit_usd": 1.0,
         "period": "daily", "on_exceed": "block"},
        {"id": "each-user", "name": "Each user", "scope": "user", "limit_usd": 0.5,
         "period": "daily"},
    ],
    "pricing": [{"provider": "openai", "model": "gpt-4o", "input_per_1k": 0.0025,
                 "output_per_1k": 0.01}],
    "rate_limits": [{"id": "from-file", "scope": "organization", "metric": "requests",
                     "limit": 1000, "window": "1m", "burst": 999}],
}  # fmt: skip

Factory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def make_app(
    redis_server: RedisServer, redis_client: redis.Redis, clock: FakeClock
) -> AsyncIterator[Factory]:
    clients: list[TestClient[Any, Any]] = []

    async def make(
        *, metrics: bool = True, redis_url: str | None = None, doc: dict[str, Any] | None = None
    ) -> TestClient[Any, Any]:
        cfg = make_config(doc or CONFIG)
        store = RedisStore.from_url(redis_url or redis_server.url, timeout_ms=300)
        app = create_app(cfg, store, clock=clock, events=Metrics(clock=clock) if metrics else None)
        client = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for c in clients:
        await c.close()


async def served_doc(client: TestClient[Any, Any]) -> dict[str, Any]:
    resp = await client.get(openapi.PATH)
    assert resp.status == 200 and resp.content_type == "application/json"
    doc: dict[str, Any] = await resp.json()
    return doc


async def test_every_route_is_documented_and_nothing_else(make_app: Factory) -> None:
    client = await make_app()
    routes = openapi.routes_of(client.app)
    full = openapi.document(make_config(CONFIG))
    assert openapi.documented(full) == routes
    assert openapi.documented(await served_doc(client)) == routes
    # Spot-check that the comparison sees what it must (it is not vacuous).
    assert {("post", "/v1/settle"), ("delete", "/v1/rate-limits/{limit_id}"),
            ("trace", "/ext_authz/{tail}"), ("get", "/metrics")} <= routes  # fmt: skip
    assert {("get", "/health"), ("put", "/api/v1/pricing"), ("post", "/api/audit/llm-call"),
            ("get", "/api/v1/budgets/{budget_id}/alerts")} <= routes  # fmt: skip
    # healthz, readyz, metrics, prometheus, openapi; native; status; admin; ext_authz;
    # the AxonFlow SDK's: health, budgets (list, create, get, update, delete, status, an
    # entity's status, alerts, check), usage (summary, breakdown, records), pricing (get, put,
    # delete), pre-check, audit; the status page at / and /ui; stops (list, make, read,
    # lift) and every alert
    assert len(routes) == 5 + 5 + 1 + 5 + 2 * 8 + (1 + 9 + 3 + 3 + 2) + 2 + (4 + 1)


async def test_without_metrics_the_served_document_leaves_them_out(make_app: Factory) -> None:
    client = await make_app(metrics=False)
    doc = await served_doc(client)
    assert "/metrics" not in doc["paths"] and "/prometheus" not in doc["paths"]
    assert openapi.documented(doc) == openapi.routes_of(client.app)


def test_document_is_valid_openapi_with_valid_schemas() -> None:
    doc = openapi.document(make_config(CONFIG))
    assert doc["openapi"] == "3.1.0"
    for name, schema in doc["components"]["schemas"].items():
        assert "type" in schema or "enum" in schema, name
        jsonschema.Draft202012Validator.check_schema(schema)
    # Every $ref resolves and every pattern is ECMA-262 (no Python-only `\Z`).
    text = json.dumps(doc)
    assert "\\\\Z" not in text
    for ref in {part.split('"')[0] for part in text.split('"$ref": "')[1:]}:
        assert ref.removeprefix("#/components/schemas/") in doc["components"]["schemas"], ref
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in openapi.ALL_METHODS:
                assert op["responses"], (method, path)
    # The proxy documents the configured header names and deny status.
    proxied = openapi.document(
        make_config({**CONFIG, "proxy": {"deny_status": 403, "headers": {"user_id": "x-u"}}})
    )
    op = proxied["paths"]["/ext_authz"]["post"]
    assert "403" in op["responses"] and "429" not in op["responses"]
    assert "x-u" in {p["name"] for p in op["parameters"]}


class Checker:
    """Validates answers against the documented operation; remembers what it saw."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.seen: set[tuple[str, str, str]] = set()

    async def __call__(self, resp: ClientResponse, method: str, path: str) -> Any:
        op = self.doc["paths"][path][method]
        status = str(resp.status)
        assert status in op["responses"], (method, path, status, await resp.text())
        documented = op["responses"][status]
        self.seen.add((method, path, status))
        body = await resp.read()
        if "content" not in documented:
            assert body == b"", (method, path, status)
            return None
        assert resp.content_type in documented["content"], (method, path, resp.content_type)
        schema = documented["content"][resp.content_type]["schema"]
        if resp.content_type == "text/plain":
            return body.decode()
        value = json.loads(body)
        root = {**schema, "components": self.doc["components"]}
        jsonschema.Draft202012Validator(root).validate(value)
        return value


async def test_real_answers_validate_against_the_document(make_app: Factory) -> None:
    client = await make_app()
    check = Checker(await served_doc(client))

    async def call(method: str, path: str, template: str | None = None, **kw: Any) -> Any:
        resp = await client.request(method.upper(), path, **kw)
        return await check(resp, method, template or path.partition("?")[0])

    await call("get", "/healthz")
    await call("get", "/readyz")
    assert "# TYPE" in await call("get", "/metrics")
    await call("get", "/prometheus")
    await call("get", "/openapi.json")

    ok = await call("post", "/v1/authorize", json={"user_id": "u1", "estimated_usd": 0.1})
    assert ok["allowed"] is True
    denied = await call("post", "/v1/authorize", json={"user_id": "u1", "estimated_usd": 0.45})
    assert denied["allowed"] is False
    await call("post", "/v1/authorize", json={"user_id": "u 1", "estimated_usd": 0.1})
    too_big = make_config(CONFIG).settings.max_body_bytes + 1
    await call("post", "/v1/authorize", data=b"{" + b" " * too_big + b"}")
    await call("post", "/v1/check", json={"user_id": "u2", "model": "gpt-4o",
                                          "estimated_tokens_in": 10})  # fmt: skip
    await call("post", "/v1/check", json={"estimated_usd": -1})
    settled = await call(
        "post", "/v1/settle", json={"reservation_id": ok["reservation_id"], "cost_usd": 0.05}
    )
    assert settled["state"] == "settled"
    await call("post", "/v1/settle", json={"reservation_id": "0" * 32, "cost_usd": 0.05})
    await call("post", "/v1/settle", json={"reservation_id": "nope", "cost_usd": 0.05})
    held = await call("post", "/v1/authorize", json={"user_id": "u3", "estimated_usd": 0.1})
    await call("post", "/v1/release", json={"reservation_id": held["reservation_id"]})
    await call("post", "/v1/release", json={"reservation_id": "f" * 32})
    await call("post", "/v1/record", json={"user_id": "u4", "cost_usd": 0.01})
    await call("post", "/v1/record", json={"user_id": "u4"})

    status = "/v1/budgets/{budget_id}/status"
    await call("get", "/v1/budgets/org/status", status)
    await call("get", "/v1/budgets/each-user/status?scope_id=u1", status)
    await call("get", "/v1/budgets/each-user/status", status)
    await call("get", "/v1/budgets/nope/status", status)

    one = "/v1/rate-limits/{limit_id}"
    spec = {"id": "per-user", "scope": "user", "metric": "requests", "limit": 5, "window": "1m"}
    await call("get", "/v1/rate-limits")
    await call("post", "/v1/rate-limits", json=spec)
    await call("post", "/v1/rate-limits", json=spec)
    await call("post", "/v1/rate-limits", json={**spec, "limit": 0})
    await call("get", "/v1/rate-limits/per-user", one)
    await call("get", "/v1/rate-limits/nope", one)
    await call("put", "/v1/rate-limits/per-user", one, json={**spec, "limit": 6})
    await call("put", "/v1/rate-limits/nope", one, json={**spec, "id": "nope"})
    await call("put", "/v1/rate-limits/from-file", one, json={**spec, "id": "from-file"})
    await call("put", "/v1/rate-limits/per-user", one, json={**spec, "id": "other"})
    await call("delete", "/v1/rate-limits/from-file", one)
    await call("delete", "/v1/rate-limits/per-user", one)
    await call("delete", "/v1/rate-limits/per-user", one)

    tail = "/ext_authz/{tail}"
    await call("post", "/ext_authz", headers={"x-user-id": "u5", "x-budget-estimate-usd": "0.1"})
    await call("get", "/ext_authz/v1/chat", tail, headers={"x-user-id": "u1"})
    await call("get", "/ext_authz/v1/chat", tail,
               headers={"x-user-id": "u6", "x-budget-estimate-usd": "0.9"})  # fmt: skip
    await call("put", "/ext_authz", headers={"x-user-id": "{bad}"})

    await axonflow_answers(call)

    # Redis away, fail mode closed (the default): the documented 503s.
    away = await make_app(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    audit = {"context_id": "0" * 32, "provider": "openai", "model": "gpt-4o"}
    for method, path, template, body in (
        ("post", "/v1/authorize", None, {"user_id": "u1", "estimated_usd": 0.1}),
        ("post", "/v1/settle", None, {"reservation_id": "0" * 32, "cost_usd": 0.1}),
        ("post", "/v1/record", None, {"user_id": "u1", "cost_usd": 0.1}),
        ("get", "/v1/budgets/org/status", status, None),
        ("get", "/readyz", None, None),
        ("delete", "/ext_authz/x", tail, None),
        ("get", "/api/v1/budgets/org/status", AX_STATUS, None),
        ("post", "/api/v1/budgets/check", None, {}),
        ("post", PRE_CHECK, None, {"context": {"user_id": "u1"}}),
        ("post", AUDIT, None, audit),
    ):
        resp = await away.request(method.upper(), path, json=body)
        await check(resp, method, template or path)

    expected = {
        ("get", "/readyz", "503"), ("post", "/v1/authorize", "413"),
        ("post", "/v1/authorize", "503"), ("post", "/v1/settle", "404"),
        ("get", status, "404"), ("post", "/v1/rate-limits", "409"),
        ("put", one, "409"), ("delete", one, "204"), ("delete", "/ext_authz/{tail}", "503"),
        ("get", "/ext_authz/{tail}", "429"), ("put", "/ext_authz", "400"),
        ("post", "/ext_authz", "200"), ("post", "/v1/release", "404"),
        ("get", "/health", "200"), ("post", BUDGETS, "201"), ("post", BUDGETS, "409"),
        ("put", ONE_BUDGET, "200"), ("put", ONE_BUDGET, "409"), ("put", ONE_BUDGET, "404"),
        ("delete", ONE_BUDGET, "204"), ("delete", ONE_BUDGET, "409"), ("get", ALERTS, "200"),
        ("get", ALERTS, "404"), ("get", "/api/v1/usage", "200"),
        ("get", "/api/v1/usage/breakdown", "200"), ("get", "/api/v1/usage/breakdown", "400"),
        ("get", "/api/v1/usage/records", "200"), ("put", PRICING, "200"),
        ("put", PRICING, "400"), ("delete", PRICING, "204"), ("delete", PRICING, "404"),
        ("delete", PRICING, "400"), ("post", PRE_CHECK, "200"), ("post", PRE_CHECK, "402"),
        ("post", PRE_CHECK, "400"), ("post", PRE_CHECK, "503"),
        ("post", AUDIT, "200"), ("post", AUDIT, "404"), ("post", AUDIT, "400"),
        ("post", AUDIT, "503"), ("get", AX_STATUS, "503"),
    }  # fmt: skip
    assert expected <= check.seen, expected - check.seen


BUDGETS = "/api/v1/budgets"
ONE_BUDGET = "/api/v1/budgets/{budget_id}"
AX_STATUS = "/api/v1/budgets/{budget_id}/status"
AX_ENTITY_STATUS = "/api/v1/budgets/{budget_id}/{entity}/status"
ALERTS = "/api/v1/budgets/{budget_id}/alerts"
PRICING = "/api/v1/pricing"
PRE_CHECK = "/api/policy/pre-check"
AUDIT = "/api/audit/llm-call"
Call = Callable[..., Awaitable[Any]]


async def axonflow_answers(call: Call) -> None:
    """The AxonFlow SDK's routes, every documented outcome that can be made with Redis up.
    (Runs after the native calls above: u1 and u4 have spent, from-file and org exist.)"""
    await call("get", "/health")

    # Budgets: create, list, get, update, status, alerts, check, delete.
    team = {"id": "api-team", "name": "API team", "scope": "team", "limit_usd": 2.5,
            "period": "monthly", "on_exceed": "warn"}  # fmt: skip
    made = await call("post", BUDGETS, json=team)
    assert made["source"] == "api" and made["alert_thresholds"] == [50, 80, 100], made
    await call("post", BUDGETS, json=team)  # exists: 409
    await call("post", BUDGETS, json={**team, "id": "org"})  # the config file's: 409
    await call("post", BUDGETS, json={**team, "id": "x", "limit_usd": 0})
    listed = await call("get", BUDGETS)
    assert {b["id"] for b in listed["budgets"]} == {"org", "each-user", "api-team"}, listed
    page = await call("get", f"{BUDGETS}?scope=team&limit=1&offset=0")
    assert [b["id"] for b in page["budgets"]] == ["api-team"] and page["total"] == 1
    await call("get", f"{BUDGETS}?scope=galaxy")
    await call("get", f"{BUDGETS}?limit=0")
    await call("get", "/api/v1/budgets/api-team", ONE_BUDGET)
    await call("get", "/api/v1/budgets/nope", ONE_BUDGET)
    changed = await call("put", "/api/v1/budgets/api-team", ONE_BUDGET,
                         json={"limit_usd": 3, "alert_thresholds": [90]})  # fmt: skip
    assert changed["limit_usd"] == 3 and changed["alert_thresholds"] == [90], changed
    await call("put", "/api/v1/budgets/org", ONE_BUDGET, json={"limit_usd": 3})
    await call("put", "/api/v1/budgets/nope", ONE_BUDGET, json={"limit_usd": 3})
    await call("put", "/api/v1/budgets/api-team", ONE_BUDGET, json={"limit_usd": -1})
    await call("put", "/api/v1/budgets/api-team", ONE_BUDGET, json={"scope": "user"})
    await call("get", "/api/v1/budgets/api-team/status", AX_STATUS)
    await call("get", "/api/v1/budgets/each-user/status?scope_id=u1", AX_STATUS)
    await call("get", "/api/v1/budgets/nope/status", AX_STATUS)
    await call("get", "/api/v1/budgets/each-user/status", AX_STATUS)  # no entity: 400
    entity = await call("get", "/api/v1/budgets/each-user/u1/status", AX_ENTITY_STATUS)
    assert entity["used_usd"] > 0, entity
    await call("get", "/api/v1/budgets/each-user/u%201/status", AX_ENTITY_STATUS)
    await call("get", "/api/v1/budgets/nope/u1/status", AX_ENTITY_STATUS)
    checked = await call("post", "/api/v1/budgets/check", json={"team_id": "t1"})
    assert "api-team" in {b["id"] for b in checked["budgets"]}, checked
    await call("post", "/api/v1/budgets/check", json={"user_id": "{u}"})
    # 60% of each-user's $0.50: one alert, at 50%.
    await call("post", "/v1/record", json={"user_id": "u7", "cost_usd": 0.3})
    alerts = await call("get", "/api/v1/budgets/each-user/alerts", ALERTS)
    assert [(a["threshold"], a["entity"]) for a in alerts["alerts"]] == [(50, "u7")], alerts
    assert alerts["count"] == 1
    await call("get", "/api/v1/budgets/api-team/alerts", ALERTS)
    await call("get", "/api/v1/budgets/nope/alerts", ALERTS)
    await call("delete", "/api/v1/budgets/api-team", ONE_BUDGET)
    await call("delete", "/api/v1/budgets/api-team", ONE_BUDGET)  # gone: 404
    await call("delete", "/api/v1/budgets/org", ONE_BUDGET)  # the config file's: 409

    # Pricing: set, read, replace, drop.
    price = {"provider": "acme", "model": "m-1",
             "pricing": {"input_per_1k": 0.001, "output_per_1k": 0.002}}  # fmt: skip
    assert await call("put", PRICING, json=price) == price
    from_api = {"source": "api", "source_version": None, "source_date": None}
    assert await call("get", f"{PRICING}?provider=acme&model=m-1") == {**price, **from_api}
    listed_prices = await call("get", PRICING)  # the bundled catalogue's too
    pairs = {(p["provider"], p["model"], p["source"]) for p in listed_prices["pricing"]}
    assert {("openai", "gpt-4o", "config"), ("acme", "m-1", "api")} < pairs, pairs
    assert ("openai", "gpt-4o-mini", "genai-prices") in pairs
    await call("get", f"{PRICING}?provider=acme&model=nope")
    await call("put", PRICING, json={**price, "pricing": {"input_per_1k": -1,
                                                          "output_per_1k": 0}})  # fmt: skip
    await call("put", PRICING, json={**price, "extra": 1})
    await call("delete", f"{PRICING}?provider=acme&model=m-1")
    await call("delete", f"{PRICING}?provider=acme&model=m-1")  # gone: 404
    await call("delete", f"{PRICING}?provider=openai&model=gpt-4o")  # the file's: 404
    await call("delete", f"{PRICING}?provider=acme")

    # Gateway mode: pre-check, audit (twice: the SDK re-sends after a timeout).
    body = {"user_token": "", "client_id": "community", "query": "hi", "data_sources": [],
            "context": {"user_id": "u8", "provider": "openai", "model": "gpt-4o"}}  # fmt: skip
    approved = await call("post", PRE_CHECK, json=body)
    assert approved["approved"] is True and approved["block_reason"] is None, approved
    audit = {"context_id": approved["context_id"], "client_id": "community",
             "response_summary": "", "provider": "openai", "model": "gpt-4o",
             "token_usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150},
             "latency_ms": 250, "metadata": {}}  # fmt: skip
    first = await call("post", AUDIT, json=audit)
    assert (first["success"], first["audit_id"], first["priced_by"]) == (
        True,
        approved["context_id"],
        "tokens",
    )
    assert first["cost_usd"] > 0
    assert await call("post", AUDIT, json=audit) == first
    await call("post", AUDIT, json={**audit, "context_id": "0" * 32})  # 404
    await call("post", AUDIT, json={**audit, "model": "unpriced"})  # no price, no cost: 400
    await call("post", AUDIT, json={**audit, "metadata": {"cost_usd": "1"}})
    await call("post", AUDIT, json={**audit, "context_id": "nope"})
    await call("post", PRE_CHECK, json={**body, "context": {"org_id": "{bad}"}})
    await call("post", PRE_CHECK, json={**body, "context": {"estimated_usd": -1}})
    # The org's $1 block budget cannot hold $5: 402, the body of BudgetExceededError.
    over = await call("post", PRE_CHECK, json={**body, "context": {"estimated_usd": 5}})
    assert over["error"] == "budget_exceeded" and over["budget_info"]["budget_id"] == "org"
    # One request a minute per workflow: the second pre-check is rate limited, which the
    # SDK honours as 200 approved false (a 429 it would read as an outage).
    once = {"id": "once", "scope": "workflow", "metric": "requests", "limit": 1, "window": "1m"}
    await call("post", "/v1/rate-limits", json=once)
    flow = {**body, "context": {"workflow_id": "w1"}}
    assert (await call("post", PRE_CHECK, json=flow))["approved"] is True
    limited = await call("post", PRE_CHECK, json=flow)
    assert limited["approved"] is False and "once" in limited["block_reason"], limited
    await call("delete", "/v1/rate-limits/once", "/v1/rate-limits/{limit_id}")

    # Usage: what the calls above charged.
    usage = await call("get", "/api/v1/usage?period=daily")
    assert usage["period"] == "daily" and usage["total_requests"] >= 3, usage
    await call("get", "/api/v1/usage")
    await call("get", "/api/v1/usage?period=hourly")
    by_model = await call("get", "/api/v1/usage/breakdown?group_by=model&period=daily")
    assert "gpt-4o" in {i["group_value"] for i in by_model["items"]}, by_model
    await call("get", "/api/v1/usage/breakdown?group_by=user")
    await call("get", "/api/v1/usage/breakdown")  # group_by is required
    await call("get", "/api/v1/usage/breakdown?group_by=colour")
    records = await call("get", "/api/v1/usage/records?limit=5&provider=openai&model=gpt-4o")
    assert records["records"] and {r["model"] for r in records["records"]} == {"gpt-4o"}
    await call("get", "/api/v1/usage/records")
    await call("get", "/api/v1/usage/records?limit=0")
    await call("get", "/api/v1/usage/records?offset=x")


async def test_redis_away_is_503_on_every_route_that_reads_redis(make_app: Factory) -> None:
    client = await make_app()
    check = Checker(await served_doc(client))
    away = await make_app(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    team = {"id": "t", "name": "T", "scope": "team", "limit_usd": 1, "period": "daily"}
    price = {"provider": "a", "model": "b", "pricing": {"input_per_1k": 1, "output_per_1k": 1}}
    spec = {"id": "per-user", "scope": "user", "metric": "requests", "limit": 5, "window": "1m"}
    statuses = []
    for method, path, template, body in (
        ("get", "/api/v1/usage", None, None),
        ("get", "/api/v1/usage/breakdown?group_by=model", None, None),
        ("get", "/api/v1/usage/records", None, None),
        ("get", "/api/v1/budgets/org/alerts", ALERTS, None),
        ("post", BUDGETS, None, team),
        ("put", PRICING, None, price),
        ("delete", f"{PRICING}?provider=a&model=b", None, None),
        ("post", "/v1/rate-limits", None, spec),
    ):
        resp = await away.request(method.upper(), path, json=body)
        statuses.append((method, path, resp.status))
        await check(resp, method, template or path.partition("?")[0])
    assert {s for *_, s in statuses} == {503}, statuses
