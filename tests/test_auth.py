"""Credentials: once clients are configured every API call needs one; roles gate what it
may do; tenants never see or change each other's budgets, limits or counters; a refused
request writes nothing; probes and scrapers need no credentials."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest
import redis

from sidecar import config as config_mod
from sidecar.api import openapi
from sidecar.api.auth import OPEN_PATHS
from tests.conftest import ClientFactory
from tests.harness import data_dump


def basic(client_id: str, secret: str) -> dict[str, str]:
    token = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {token}", "X-Client-ID": client_id}


ADMIN = basic("ops", "s3cret")
ADMIN_B = basic("ops-b", "b-admin")
AGENT_A = basic("agent-a", "a-pass")
AGENT_B = basic("agent-b", "b-pass")
READER = basic("dash", "r-pass")

DOC: dict[str, Any] = {
    "budgets": [{"id": "cap", "name": "Cap", "scope": "organization", "limit_usd": 1.0,
                 "period": "monthly"}],
    "auth": {
        "clients": [
            {"client_id": "ops", "tenant": "team-a", "role": "admin",
             "secret_sha256": hashlib.sha256(b"s3cret").hexdigest()},
            {"client_id": "agent-a", "tenant": "team-a", "role": "agent", "secret": "a-pass"},
            {"client_id": "agent-b", "tenant": "team-b", "role": "agent", "secret": "b-pass"},
            {"client_id": "ops-b", "tenant": "team-b", "role": "admin", "secret": "b-admin"},
            {"client_id": "dash", "tenant": "team-a", "role": "read", "secret": "r-pass"},
            {"client_id": "community", "tenant": "lab", "role": "agent"},
        ]
    },
}  # fmt: skip
LIMIT = {"id": "rpm", "scope": "organization", "metric": "requests", "limit": 5, "window": "1m"}
CALL = {"estimated_usd": 0.6}
# The AxonFlow SDK's bodies.
NEW_BUDGET = {"id": "per-agent", "name": "Per agent", "scope": "agent", "limit_usd": 0.5,
              "period": "monthly", "on_exceed": "block"}  # fmt: skip
PRICE = {"provider": "acme", "model": "m-1",
         "pricing": {"input_per_1k": 0.001, "output_per_1k": 0.002}}  # fmt: skip
PRE_CHECK = {"user_token": "", "client_id": "agent-a", "query": "", "data_sources": [],
             "context": {"agent_id": "x", "estimated_usd": 0.3}}  # fmt: skip
AUDIT = {"context_id": "0" * 32, "client_id": "agent-a", "response_summary": "",
         "provider": "acme", "model": "unpriced", "latency_ms": 5,
         "token_usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
         "metadata": {"cost_usd": 0.3}}  # fmt: skip
# What a path parameter is filled with when every route is called.
PATH_VALUES = {
    "{budget_id}": "cap",
    "{limit_id}": "rpm",
    "{tail}": "v1/chat",
    "{entity}": "u1",
    "{stop_id}": "stop_0123456789abcdef",
}


dump = data_dump  # every key but the state markers (tests.harness)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/authorize", CALL),
        ("POST", "/v1/check", {}),
        ("POST", "/v1/settle", {"reservation_id": "0" * 32, "cost_usd": 0.1}),
        ("POST", "/v1/release", {"reservation_id": "0" * 32}),
        ("POST", "/v1/record", {"cost_usd": 0.1}),
        ("GET", "/v1/budgets/cap/status", None),
        ("GET", "/v1/rate-limits", None),
        ("POST", "/v1/rate-limits", LIMIT),
        ("DELETE", "/v1/rate-limits/rpm", None),
        ("GET", "/ext_authz/v1/chat", None),
        ("GET", "/api/v1/budgets", None),
        ("POST", "/api/v1/budgets", NEW_BUDGET),
        ("GET", "/api/v1/budgets/cap", None),
        ("PUT", "/api/v1/budgets/cap", {"limit_usd": 2}),
        ("DELETE", "/api/v1/budgets/cap", None),
        ("GET", "/api/v1/budgets/cap/status", None),
        ("GET", "/api/v1/budgets/cap/alerts", None),
        ("POST", "/api/v1/budgets/check", {}),
        ("GET", "/api/v1/usage", None),
        ("GET", "/api/v1/usage/breakdown?group_by=model", None),
        ("GET", "/api/v1/usage/records", None),
        ("GET", "/api/v1/pricing", None),
        ("PUT", "/api/v1/pricing", PRICE),
        ("DELETE", "/api/v1/pricing?provider=acme&model=m-1", None),
        ("POST", "/api/policy/pre-check", PRE_CHECK),
        ("POST", "/api/audit/llm-call", AUDIT),
    ],
)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        basic("ops", "wrong"),
        basic("nobody", "x"),
        {"Authorization": "Basic !!!"},
        {"Authorization": "Bearer abc"},
        {**basic("ops", "s3cret"), "X-Client-ID": "agent-a"},
        {"X-Client-ID": "ops"},  # a client with a secret must present it
    ],
    ids=["none", "wrong-secret", "unknown", "garbled", "bearer", "two-ids", "id-only"],
)
async def test_without_valid_credentials_401_and_nothing_written(
    make_client: ClientFactory,
    redis_client: redis.Redis,
    method: str,
    path: str,
    body: Any,
    headers: dict[str, str],
) -> None:
    client = await make_client(DOC)
    await client.post("/v1/authorize", json=CALL, headers=AGENT_A)  # some state first
    before = dump(redis_client)
    resp = await client.request(method, path, json=body, headers=headers)
    assert resp.status == 401, await resp.text()
    assert resp.content_type == "application/problem+json"
    assert resp.headers["WWW-Authenticate"].startswith("Basic")
    assert dump(redis_client) == before


async def test_every_route_but_the_open_ones_needs_credentials(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """Every route the router serves (not a list kept by hand): 401 without credentials and
    with a wrong secret, nothing written."""
    client = await make_client(DOC)
    await client.post("/v1/authorize", json=CALL, headers=AGENT_A)  # some state first
    before = dump(redis_client)
    routes = sorted(openapi.routes_of(client.app))
    assert len(routes) > 40, routes
    answered = []
    for method, template in routes:
        path = template
        for name, value in PATH_VALUES.items():
            path = path.replace(name, value)
        assert "{" not in path, template
        body: dict[str, Any] | None = {} if method in ("post", "put", "patch") else None
        for headers in ({}, basic("ops", "wrong")):
            resp = await client.request(method.upper(), path, json=body, headers=headers)
            answered.append((method, template, resp.status))
            if template in OPEN_PATHS:
                assert resp.status != 401, (method, template)
            else:
                assert resp.status == 401, (method, template, resp.status, await resp.text())
                assert resp.headers["WWW-Authenticate"].startswith("Basic")
    assert dump(redis_client) == before
    assert {("post", "/api/policy/pre-check", 401), ("get", "/health", 200)} <= set(answered)


async def test_probes_and_scrapes_need_no_credentials(make_client: ClientFactory) -> None:
    client = await make_client(DOC)
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    health = await client.get("/health")  # the AxonFlow SDK's heartbeat sends none
    assert health.status == 200 and (await health.json())["status"] == "healthy"
    assert (await client.get("/openapi.json")).status == 200


async def test_roles(make_client: ClientFactory, redis_client: redis.Redis) -> None:
    client = await make_client(DOC)
    # read: reads only
    assert (await client.get("/v1/budgets/cap/status", headers=READER)).status == 200
    assert (await client.get("/v1/rate-limits", headers=READER)).status == 200
    denied = await client.post("/v1/authorize", json=CALL, headers=READER)
    assert denied.status == 403 and denied.content_type == "application/problem+json"
    # agent: decisions, not definitions
    assert (await client.post("/v1/authorize", json=CALL, headers=AGENT_A)).status == 200
    before = dump(redis_client)
    assert (await client.post("/v1/rate-limits", json=LIMIT, headers=AGENT_A)).status == 403
    assert dump(redis_client) == before
    # admin: definitions too
    assert (await client.post("/v1/rate-limits", json=LIMIT, headers=ADMIN)).status == 201
    # an id-only client (no secret configured), as the SDK sends it without credentials
    community = {"X-Client-ID": "community"}
    assert (await client.post("/v1/check", json={}, headers=community)).status == 200
    sdk_default = basic("community", "")
    assert (await client.post("/v1/check", json={}, headers=sdk_default)).status == 200


# The AxonFlow SDK's routes by the role they need.
AX_READS = [
    ("GET", "/api/v1/budgets"),
    ("GET", "/api/v1/budgets/cap"),
    ("GET", "/api/v1/budgets/cap/status"),
    ("GET", "/api/v1/budgets/cap/alerts"),
    ("GET", "/api/v1/usage"),
    ("GET", "/api/v1/usage/breakdown?group_by=model"),
    ("GET", "/api/v1/usage/records"),
    ("GET", "/api/v1/pricing"),
]
# (method, path, body, the status an allowed caller gets)
AX_AGENT_OPS: list[tuple[str, str, Any, int]] = [
    ("POST", "/api/v1/budgets/check", {}, 200),
    ("POST", "/api/policy/pre-check", PRE_CHECK, 200),
    ("POST", "/api/audit/llm-call", AUDIT, 404),  # allowed, but no such pre-check
]
AX_ADMIN_OPS: list[tuple[str, str, Any, int]] = [
    ("POST", "/api/v1/budgets", NEW_BUDGET, 201),
    ("PUT", "/api/v1/budgets/per-agent", {"limit_usd": 0.75}, 200),
    ("DELETE", "/api/v1/budgets/per-agent", None, 204),
    ("PUT", "/api/v1/pricing", PRICE, 200),
    ("DELETE", "/api/v1/pricing?provider=acme&model=m-1", None, 204),
]


async def test_roles_on_the_axonflow_routes(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(DOC)
    for headers in (READER, AGENT_A, ADMIN):
        for method, path in AX_READS:
            resp = await client.request(method, path, headers=headers)
            assert resp.status == 200, (headers, method, path, await resp.text())
    # read: no decisions, no definitions; agent: decisions, no definitions. Nothing written.
    before = dump(redis_client)
    refused = [(READER, op) for op in AX_AGENT_OPS + AX_ADMIN_OPS]
    refused += [(AGENT_A, op) for op in AX_ADMIN_OPS]
    for headers, (method, path, body, _) in refused:
        resp = await client.request(method, path, json=body, headers=headers)
        assert resp.status == 403, (headers["X-Client-ID"], method, path, await resp.text())
        assert resp.content_type == "application/problem+json"
    assert dump(redis_client) == before
    for headers in (AGENT_A, ADMIN):  # admin may do what an agent does
        for method, path, body, status in AX_AGENT_OPS:
            resp = await client.request(method, path, json=body, headers=headers)
            assert resp.status == status, (headers["X-Client-ID"], path, await resp.text())
    for method, path, body, status in AX_ADMIN_OPS:
        resp = await client.request(method, path, json=body, headers=ADMIN)
        assert resp.status == status, (method, path, await resp.text())


async def test_tenants_never_see_each_other(make_client: ClientFactory) -> None:
    client = await make_client(DOC)
    a = await (await client.post("/v1/authorize", json=CALL, headers=AGENT_A)).json()
    b = await (await client.post("/v1/authorize", json=CALL, headers=AGENT_B)).json()
    # Each tenant has its own $1 cap: 0.6 + 0.6 would pass one cap, not two.
    assert a["allowed"] and b["allowed"]
    assert (await (await client.post("/v1/authorize", json=CALL, headers=AGENT_A)).json())[
        "allowed"
    ] is False
    # B cannot settle or release A's reservation: it does not exist in B's tenant.
    rid = {"reservation_id": a["reservation_id"], "cost_usd": 0.1}
    assert (await client.post("/v1/settle", json=rid, headers=AGENT_B)).status == 404
    assert (await client.post("/v1/settle", json=rid, headers=AGENT_A)).status == 200
    # A rate limit made by team-a's admin does not apply to, nor show for, team-b.
    assert (await client.post("/v1/rate-limits", json=LIMIT, headers=ADMIN)).status == 201
    listed = await (await client.get("/v1/rate-limits", headers=AGENT_B)).json()
    assert listed["rate_limits"] == []
    assert (await client.get("/v1/rate-limits/rpm", headers=AGENT_B)).status == 404
    b2 = await (await client.post("/v1/check", json={}, headers=AGENT_B)).json()
    assert b2["rate_limits"] == []
    a2 = await (await client.post("/v1/check", json={}, headers=AGENT_A)).json()
    assert [r["rate_limit_id"] for r in a2["rate_limits"]] == ["rpm"]


async def test_api_budgets_prices_and_usage_stay_in_their_tenant(
    make_client: ClientFactory,
) -> None:
    client = await make_client(DOC)

    async def ids(headers: dict[str, str]) -> set[str]:
        listed = await (await client.get("/api/v1/budgets", headers=headers)).json()
        assert listed["total"] == len(listed["budgets"])
        return {b["id"] for b in listed["budgets"]}

    made = await client.post("/api/v1/budgets", json=NEW_BUDGET, headers=ADMIN)
    assert made.status == 201 and (await made.json())["tenant_id"] == "team-a"
    # The config file's budget is listed to both tenants; A's own budget to A only.
    assert await ids(READER) == {"cap", "per-agent"}
    assert await ids(AGENT_B) == await ids(ADMIN_B) == {"cap"}
    assert (await client.get("/api/v1/budgets/per-agent", headers=READER)).status == 200
    for headers, method, path, body in (
        (AGENT_B, "GET", "/api/v1/budgets/per-agent", None),
        (AGENT_B, "GET", "/api/v1/budgets/per-agent/status", None),
        (AGENT_B, "GET", "/api/v1/budgets/per-agent/alerts", None),
        (ADMIN_B, "GET", "/api/v1/budgets/per-agent", None),
        (ADMIN_B, "PUT", "/api/v1/budgets/per-agent", {"limit_usd": 9}),
        (ADMIN_B, "DELETE", "/api/v1/budgets/per-agent", None),
        (ADMIN_B, "GET", "/api/v1/budgets/per-agent/status", None),
        (ADMIN_B, "GET", "/api/v1/budgets/per-agent/alerts", None),
    ):
        resp = await client.request(method, path, json=body, headers=headers)
        assert resp.status == 404, (headers["X-Client-ID"], method, path, await resp.text())
    a_view = await (await client.get("/api/v1/budgets/per-agent", headers=ADMIN)).json()
    assert a_view["limit_usd"] == 0.5  # B's PUT changed nothing

    # A's budget is enforced on A's calls only.
    big = {**PRE_CHECK, "context": {"agent_id": "x", "estimated_usd": 0.6}}
    assert (await client.post("/api/policy/pre-check", json=big, headers=AGENT_A)).status == 402
    assert (await client.post("/api/policy/pre-check", json=big, headers=AGENT_B)).status == 200

    # A pre-check of A: B cannot audit it; A can. Then A records a second charge.
    pre = await (await client.post("/api/policy/pre-check", json=PRE_CHECK, headers=AGENT_A)).json()
    audit = {**AUDIT, "context_id": pre["context_id"]}
    assert (await client.post("/api/audit/llm-call", json=audit, headers=AGENT_B)).status == 404
    assert (await client.post("/api/audit/llm-call", json=audit, headers=AGENT_A)).status == 200
    recorded = {"agent_id": "y", "provider": "acme", "model": "m-2", "cost_usd": 0.25}
    assert (await client.post("/v1/record", json=recorded, headers=AGENT_A)).status == 200

    # Usage: A sees its two charges, B none of them.
    a_sum = await (await client.get("/api/v1/usage", headers=READER)).json()
    b_sum = await (await client.get("/api/v1/usage", headers=AGENT_B)).json()
    assert a_sum["total_requests"] == 2 and a_sum["total_cost_usd"] == pytest.approx(0.55)
    assert b_sum["total_requests"] == 0 and b_sum["total_cost_usd"] == 0
    a_rec = await (await client.get("/api/v1/usage/records", headers=READER)).json()
    b_rec = await (await client.get("/api/v1/usage/records", headers=AGENT_B)).json()
    assert a_rec["total"] == 2 and {r["tenant_id"] for r in a_rec["records"]} == {"team-a"}
    assert {r["model"] for r in a_rec["records"]} == {"unpriced", "m-2"}
    assert b_rec == {"records": [], "total": 0}
    path = "/api/v1/usage/breakdown?group_by=model"
    a_by = await (await client.get(path, headers=READER)).json()
    b_by = await (await client.get(path, headers=AGENT_B)).json()
    assert {i["group_value"] for i in a_by["items"]} == {"unpriced", "m-2"}
    assert b_by["items"] == [] and b_by["total_cost_usd"] == 0

    # Alerts: A crossed 50% of its own per-agent budget and of the shared config budget;
    # B, whose counters of the config budget are its own, sees no alert of it.
    a_alerts = await (await client.get("/api/v1/budgets/cap/alerts", headers=READER)).json()
    b_alerts = await (await client.get("/api/v1/budgets/cap/alerts", headers=AGENT_B)).json()
    assert [a["threshold"] for a in a_alerts["alerts"]] == [50], a_alerts
    assert {a["tenant_id"] for a in a_alerts["alerts"]} == {"team-a"}
    assert b_alerts == {"alerts": [], "count": 0}
    own = await (await client.get("/api/v1/budgets/per-agent/alerts", headers=READER)).json()
    # x spent 0.30 and y 0.25 of their $0.50 each: both at 50%, newest first.
    assert [(a["threshold"], a["entity"]) for a in own["alerts"]] == [(50, "y"), (50, "x")]
    b_status = await (await client.get("/api/v1/budgets/cap/status", headers=AGENT_B)).json()
    assert b_status["used_usd"] == 0

    # Prices: A's is not B's; B cannot drop it.
    assert (await client.put("/api/v1/pricing", json=PRICE, headers=ADMIN)).status == 200
    one = "/api/v1/pricing?provider=acme&model=m-1"
    assert (await client.get(one, headers=READER)).status == 200
    assert (await client.get(one, headers=AGENT_B)).status == 404
    assert (await client.delete(one, headers=ADMIN_B)).status == 404
    assert (await client.get(one, headers=READER)).status == 200

    # B may make a budget with the same id: its own, A's is untouched.
    other = {**NEW_BUDGET, "limit_usd": 7}
    made_b = await client.post("/api/v1/budgets", json=other, headers=ADMIN_B)
    assert made_b.status == 201 and (await made_b.json())["tenant_id"] == "team-b"
    b_view = await (await client.get("/api/v1/budgets/per-agent", headers=AGENT_B)).json()
    a_view = await (await client.get("/api/v1/budgets/per-agent", headers=READER)).json()
    assert (b_view["limit_usd"], a_view["limit_usd"]) == (7, 0.5)
    assert (await client.delete("/api/v1/budgets/per-agent", headers=ADMIN_B)).status == 204
    assert (await client.get("/api/v1/budgets/per-agent", headers=READER)).status == 200


def test_client_config_errors_name_the_field() -> None:
    bad = [
        ({"client_id": "x", "secret": "a", "secret_sha256": "0" * 64}, "secret"),
        ({"client_id": "x", "secret_sha256": "nothex"}, "secret_sha256"),
        ({"client_id": "x", "role": "root"}, "role"),
        ({"client_id": "x{y}"}, "client_id"),
        ({"client_id": "x", "tenant": "a:b"}, "tenant"),
    ]
    for spec, field in bad:
        with pytest.raises(config_mod.ConfigError) as err:
            config_mod.parse({"auth": {"clients": [spec]}}, "c.yaml")
        assert err.value.path == f"$.auth.clients[0].{field}", str(err.value)
    twice = [{"client_id": "x"}, {"client_id": "x"}]
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.parse({"auth": {"clients": twice}}, "c.yaml")
    assert err.value.path == "$.auth.clients[1].client_id"


async def test_openapi_documents_credentials_once_clients_exist(
    make_client: ClientFactory,
) -> None:
    client = await make_client(DOC)
    resp = await client.get("/openapi.json")  # open: tools read it without credentials
    assert resp.status == 200
    doc = await resp.json()
    assert set(doc["components"]["securitySchemes"]) == {"basic", "clientId"}
    authorize = doc["paths"]["/v1/authorize"]["post"]
    assert {"401", "403"} <= set(authorize["responses"])
    assert authorize["security"] == [{"basic": []}, {"clientId": []}]
    assert "security" not in doc["paths"]["/healthz"]["get"]
    assert "security" not in doc["paths"]["/health"]["get"]
    for path, method in (
        ("/api/v1/budgets", "post"),
        ("/api/v1/pricing", "delete"),
        ("/api/policy/pre-check", "post"),
        ("/api/v1/usage/records", "get"),
    ):
        op = doc["paths"][path][method]
        assert {"401", "403"} <= set(op["responses"]), (method, path)
        assert op["security"] == [{"basic": []}, {"clientId": []}], (method, path)
    open_doc = await (await (await make_client({})).get("/openapi.json")).json()
    assert "401" not in open_doc["paths"]["/v1/authorize"]["post"]["responses"]
