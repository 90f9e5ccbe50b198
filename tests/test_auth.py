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
from tests.conftest import ClientFactory


def basic(client_id: str, secret: str) -> dict[str, str]:
    token = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {token}", "X-Client-ID": client_id}


ADMIN = basic("ops", "s3cret")
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
            {"client_id": "dash", "tenant": "team-a", "role": "read", "secret": "r-pass"},
            {"client_id": "community", "tenant": "lab", "role": "agent"},
        ]
    },
}  # fmt: skip
LIMIT = {"id": "rpm", "scope": "organization", "metric": "requests", "limit": 5, "window": "1m"}
CALL = {"estimated_usd": 0.6}


def dump(client: redis.Redis) -> dict[str, Any]:
    return {k: client.dump(k) for k in sorted(client.keys("*"))}


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


async def test_probes_and_scrapes_need_no_credentials(make_client: ClientFactory) -> None:
    client = await make_client(DOC)
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200


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
    open_doc = await (await (await make_client({})).get("/openapi.json")).json()
    assert "401" not in open_doc["paths"]["/v1/authorize"]["post"]["responses"]
