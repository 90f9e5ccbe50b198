"""The /ext_authz route in-process over the real Redis (fake clock): what each proxy style
sends, how headers and route defaults become an authorize, and every kind of answer."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from sidecar.api.app import create_app
from sidecar.clock import FakeClock
from sidecar.store import RedisStore
from tests.conftest import T0_MS, ClientFactory, make_config
from tests.harness import data_keys, free_port

PRICING = [
    {"provider": "openai", "model": "gpt-4o", "input_per_1k": 0.0025, "output_per_1k": 0.01},
    # What the downgrade budgets fall back to: a downgrade re-prices the call for it.
    {"provider": "openai", "model": "gpt-4o-mini", "input_per_1k": 0.00015,
     "output_per_1k": 0.0006},
]  # fmt: skip
USER_DAILY: dict[str, Any] = {
    "id": "user-daily",
    "name": "Each user daily",
    "scope": "user",
    "limit_usd": 1.0,
    "period": "daily",
}
ORG_MONTHLY: dict[str, Any] = {
    "id": "org-monthly",
    "name": "Org monthly",
    "scope": "organization",
    "limit_usd": 10.0,
    "period": "monthly",
}
IDENTITY = {"x-user-id": "u1", "x-provider": "openai", "x-model": "gpt-4o"}


def doc(budgets: list[dict[str, Any]] | None = None, **proxy: Any) -> dict[str, Any]:
    return {
        "budgets": [USER_DAILY] if budgets is None else budgets,
        "pricing": PRICING,
        "proxy": proxy,
    }


async def held(client: TestClient[Any, Any], budget: str = "user-daily", entity: str = "u1") -> Any:
    resp = await client.get(f"/v1/budgets/{budget}/status", params={"scope_id": entity})
    assert resp.status == 200
    body = await resp.json()
    return body["held_usd"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/ext_authz"),
        ("POST", "/ext_authz/v1/chat/completions"),
        ("PUT", "/ext_authz/a/b/c?x=1"),
        ("DELETE", "/ext_authz/"),
        ("PATCH", "/ext_authz/v1/messages"),
    ],
)
async def test_any_method_and_sub_path_is_a_check(
    make_client: ClientFactory, method: str, path: str
) -> None:
    client = await make_client(doc())
    resp = await client.request(method, path, headers={**IDENTITY, "x-budget-estimate-usd": "0.1"})
    assert resp.status == 200
    assert await resp.read() == b""
    assert resp.headers["x-budget-action"] == "allow"
    assert resp.headers["x-budget-remaining-usd"] == "0.900000"
    assert await held(client) == 0.1


async def test_the_default_estimate_is_held_when_none_is_given(make_client: ClientFactory) -> None:
    client = await make_client(doc(default_estimate_usd=0.07))
    resp = await client.get("/ext_authz/x", headers=IDENTITY)
    assert resp.status == 200
    assert await held(client) == 0.07


ROUTES = [
    {"prefix": "/v1", "defaults": {"user_id": "u-v1", "estimated_usd": 0.2}},
    {
        "prefix": "/v1/chat",
        "defaults": {"user_id": "u-chat", "provider": "openai", "model": "gpt-4o",
                     "estimated_usd": 0.3},
    },
]  # fmt: skip


NGINX = {"uri_header": "x-original-uri", "method_header": "x-original-method"}
FORWARD = {"uri_header": "x-forwarded-uri", "method_header": "x-forwarded-method"}


@pytest.mark.parametrize(
    ("trusted", "path", "headers", "user", "amount"),
    [
        # Envoy (no trusted headers): the original path follows /ext_authz.
        ({}, "/ext_authz/v1/chat/completions", {}, "u-chat", 0.3),
        ({}, "/ext_authz/v1/embeddings", {}, "u-v1", 0.2),
        # nginx: a GET to the check location with X-Original-URI.
        (NGINX, "/ext_authz", {"X-Original-URI": "/v1/chat/completions?a=b",
                               "X-Original-Method": "POST"}, "u-chat", 0.3),
        # Traefik / Caddy / HAProxy: X-Forwarded-Uri.
        (FORWARD, "/ext_authz", {"X-Forwarded-Uri": "/v1/models",
                                 "X-Forwarded-Method": "POST"}, "u-v1", 0.2),
        # A header wins over the route default.
        ({}, "/ext_authz/v1/chat/x", {"x-user-id": "u9", "x-budget-estimate-usd": "0.05"}, "u9",
         0.05),
    ],
)  # fmt: skip
async def test_route_defaults_by_original_path(
    make_client: ClientFactory,
    trusted: dict[str, str],
    path: str,
    headers: dict[str, str],
    user: str,
    amount: float,
) -> None:
    client = await make_client(doc(routes=ROUTES, trusted=trusted))
    resp = await client.get(path, headers=headers)
    assert resp.status == 200, await resp.text()
    assert await held(client, entity=user) == amount


BIG = [
    {"prefix": "/v1/big", "defaults": {"estimated_usd": 0.03}},
    {"prefix": "/v1/chat/completions", "defaults": {"estimated_usd": 0.01}},
    {"prefix": "/paid-by-acme", "defaults": {"org_id": "acme", "estimated_usd": 0.01}},
]


@pytest.mark.parametrize(
    ("trusted", "path", "owned"),
    [
        # Envoy: the path after /ext_authz is the proxy's; no URI header is read at all.
        ({}, "/ext_authz/v1/big", {}),
        # Traefik/Caddy set X-Forwarded-Uri and pass a client's X-Original-URI untouched.
        (FORWARD, "/ext_authz", {"X-Forwarded-Uri": "/v1/big", "X-Forwarded-Method": "POST"}),
        # nginx sets X-Original-URI; a client's X-Forwarded-Uri is not read.
        (NGINX, "/ext_authz", {"X-Original-URI": "/v1/big", "X-Original-Method": "POST"}),
    ],
)
async def test_a_client_sent_uri_header_cannot_choose_the_route(
    make_client: ClientFactory, trusted: dict[str, str], path: str, owned: dict[str, str]
) -> None:
    client = await make_client(doc(routes=BIG, trusted=trusted))
    spoof = {"X-Original-URI": "/paid-by-acme", "X-Forwarded-Uri": "/v1/chat/completions"}
    # The proxy's own header overwrites the client's copy of the same name.
    headers = {**IDENTITY, **spoof, **owned}
    resp = await client.post(path, headers=headers)
    assert resp.status == 200, await resp.text()
    assert await held(client) == 0.03  # /v1/big's hold, not the spoofed route's 0.01
    resp = await client.get("/v1/budgets/org-monthly/status", params={"scope_id": "acme"})
    assert resp.status == 404 or (await resp.json())["held_usd"] == 0.0


@pytest.mark.parametrize("missing", ["x-forwarded-uri", "x-forwarded-method"])
async def test_a_trusted_header_the_proxy_did_not_send_is_a_400(
    make_client: ClientFactory, redis_client: Any, missing: str
) -> None:
    client = await make_client(doc(trusted=FORWARD))
    headers = {**IDENTITY, "x-forwarded-uri": "/v1/chat", "x-forwarded-method": "POST"}
    del headers[missing]
    resp = await client.get("/ext_authz", headers=headers)
    assert resp.status == 400
    assert resp.content_type == "application/problem+json"
    assert (await resp.json())["field"] == missing
    assert data_keys(redis_client) == []


async def test_a_method_header_that_is_no_method_is_a_400(
    make_client: ClientFactory, redis_client: Any
) -> None:
    client = await make_client(doc(trusted=FORWARD))
    headers = {**IDENTITY, "x-forwarded-uri": "/v1/chat", "x-forwarded-method": "post x"}
    resp = await client.get("/ext_authz", headers=headers)
    assert resp.status == 400
    assert (await resp.json())["field"] == "x-forwarded-method"
    assert data_keys(redis_client) == []


@pytest.mark.parametrize(
    ("trusted", "method", "headers"),
    [
        ({}, "OPTIONS", {}),  # Envoy sends the client's method
        (FORWARD, "GET", {"x-forwarded-method": "OPTIONS", "x-forwarded-uri": "/v1/chat"}),
        (NGINX, "GET", {"x-original-method": "OPTIONS", "x-original-uri": "/v1/chat"}),
    ],
)
async def test_options_passes_and_holds_nothing_by_default(
    make_client: ClientFactory,
    redis_client: Any,
    trusted: dict[str, str],
    method: str,
    headers: dict[str, str],
) -> None:
    client = await make_client(doc(trusted=trusted))
    resp = await client.request(method, "/ext_authz/v1/chat", headers={**IDENTITY, **headers})
    assert resp.status == 200
    assert resp.headers["x-budget-action"] == "pass"
    assert "x-budget-reservation-id" not in resp.headers
    assert data_keys(redis_client) == []


METHOD_ROUTES = [
    {"prefix": "/v1/chat", "defaults": {"estimated_usd": 0.2}},
    # Reads on the same prefix: their own, smaller estimate.
    {"prefix": "/v1/chat", "methods": ["GET", "HEAD"], "defaults": {"estimated_usd": 0.01}},
    # A listing endpoint: nothing held for any method.
    {"prefix": "/v1/models", "hold": False},
    # A route where OPTIONS is a real (held) call and HEAD passes instead.
    {"prefix": "/v1/odd", "pass_methods": ["HEAD"]},
]


@pytest.mark.parametrize(
    ("method", "path", "held_usd"),
    [
        ("POST", "/v1/chat/completions", 0.2),
        ("GET", "/v1/chat/completions", 0.01),
        ("HEAD", "/v1/chat", 0.01),
        ("OPTIONS", "/v1/chat", 0.0),
        ("POST", "/v1/models", 0.0),
        ("GET", "/v1/models/gpt-4o", 0.0),
        ("OPTIONS", "/v1/odd", 0.05),
        ("HEAD", "/v1/odd", 0.0),
        ("POST", "/elsewhere", 0.05),
        ("OPTIONS", "/elsewhere", 0.0),
    ],
)
async def test_methods_and_prefixes_pass_or_hold_as_their_route_says(
    make_client: ClientFactory, method: str, path: str, held_usd: float
) -> None:
    client = await make_client(
        doc(routes=METHOD_ROUTES, trusted=FORWARD, default_estimate_usd=0.05)
    )
    headers = {**IDENTITY, "x-forwarded-method": method, "x-forwarded-uri": path}
    resp = await client.get("/ext_authz", headers=headers)
    assert resp.status == 200
    assert (resp.headers["x-budget-action"] == "pass") == (held_usd == 0.0)
    assert await held(client) == held_usd


async def test_pass_methods_can_be_emptied(make_client: ClientFactory) -> None:
    client = await make_client(doc(pass_methods=[], default_estimate_usd=0.05))
    resp = await client.options("/ext_authz/v1/chat", headers=IDENTITY)
    assert resp.status == 200
    assert resp.headers["x-budget-action"] == "allow"
    assert await held(client) == 0.05


async def test_no_request_id_header_ignores_a_client_copy(make_client: ClientFactory) -> None:
    # Traefik cannot generate an id: its deployment sets headers.request_id to null.
    client = await make_client(doc(headers={"request_id": None}))
    headers = {**IDENTITY, "x-budget-estimate-usd": "0.3", "x-request-id": "same-1"}
    first = await client.post("/ext_authz/v1/chat", headers=headers)
    second = await client.post("/ext_authz/v1/chat", headers=headers)
    assert (first.status, second.status) == (200, 200)
    assert first.headers["x-budget-reservation-id"] != second.headers["x-budget-reservation-id"]
    assert await held(client) == 0.6


async def test_a_path_no_route_matches_uses_the_headers_only(make_client: ClientFactory) -> None:
    client = await make_client(doc(routes=ROUTES, default_estimate_usd=0.04))
    resp = await client.get("/ext_authz/health", headers={"x-user-id": "u2"})
    assert resp.status == 200
    assert await held(client, entity="u2") == 0.04


async def test_header_names_are_configurable(make_client: ClientFactory) -> None:
    headers = {"user_id": "x-tenant-user", "estimate_usd": "x-cost-hint", "request_id": "x-trace"}
    client = await make_client(doc(headers=headers))
    sent = {"X-Tenant-User": "u1", "x-cost-hint": "0.5", "x-trace": "t-1", "x-user-id": "other"}
    for _ in range(2):
        resp = await client.get("/ext_authz/", headers=sent)
        assert resp.status == 200
    assert await held(client) == 0.5  # one hold: the configured request-id header
    assert await held(client, entity="other") == 0.0


async def test_a_repeated_request_id_holds_once_and_returns_the_same_reservation(
    make_client: ClientFactory,
) -> None:
    client = await make_client(doc())
    headers = {**IDENTITY, "x-budget-estimate-usd": "0.4", "x-request-id": "9b2f-11"}
    first = await client.post("/ext_authz/v1/chat", headers=headers)
    second = await client.post("/ext_authz/v1/chat", headers=headers)
    assert (first.status, second.status) == (200, 200)
    rid = first.headers["x-budget-reservation-id"]
    assert second.headers["x-budget-reservation-id"] == rid
    assert await held(client) == 0.4


async def test_denial_headers_and_body(make_client: ClientFactory) -> None:
    client = await make_client(doc(budgets=[USER_DAILY, ORG_MONTHLY]))
    resp = await client.get("/ext_authz/", headers={**IDENTITY, "x-budget-estimate-usd": "3"})
    assert resp.status == 429
    assert resp.content_type == "application/json"
    assert resp.headers["Retry-After"] == "43200"  # 12:00Z to the end of the UTC day
    assert resp.headers["RateLimit-Policy"] == '"user-daily";q=1000000'
    assert resp.headers["RateLimit"] == '"user-daily";r=1000000;t=43200'
    body = await resp.json()
    assert (body["allowed"], body["action"], body["reservation_id"]) == (False, "block", None)
    assert [b["budget_id"] for b in body["budgets"]] == ["org-monthly", "user-daily"]
    denial = json.loads(resp.headers["x-budget-denial"])
    assert denial == {
        "allowed": False,
        "action": "block",
        "message": body["message"],
        "budget_info": body["budget_info"],
    }
    assert await held(client) == 0.0


async def test_retry_after_follows_the_binding_budgets_window(make_client: ClientFactory) -> None:
    client = await make_client(doc(budgets=[ORG_MONTHLY]))
    resp = await client.get("/ext_authz/", headers={**IDENTITY, "x-budget-estimate-usd": "11"})
    assert resp.status == 429
    # 2026-03-10T12:00Z to 2026-04-01T00:00Z.
    assert resp.headers["Retry-After"] == str(21 * 86400 + 43200)
    assert resp.headers["RateLimit-Policy"] == '"org-monthly";q=10000000'


async def test_the_denial_header_is_ascii_whatever_the_budget_name(
    make_client: ClientFactory,
) -> None:
    budget = {**USER_DAILY, "name": 'Équipe "ops"\u2014daily'}
    client = await make_client(doc(budgets=[budget]))
    resp = await client.get("/ext_authz/", headers={**IDENTITY, "x-budget-estimate-usd": "2"})
    assert resp.status == 429
    raw = resp.raw_headers
    value = next(v for k, v in raw if k.lower() == b"x-budget-denial")
    assert value.isascii()
    assert json.loads(value)["message"] == (
        "Estimate $2.00 exceeds the $1.00 left on 'Équipe \"ops\"\u2014daily' - requests blocked"
    )


async def test_deny_status_403(make_client: ClientFactory) -> None:
    client = await make_client(doc(deny_status=403))
    resp = await client.get("/ext_authz/", headers={**IDENTITY, "x-budget-estimate-usd": "2"})
    assert resp.status == 403
    assert (await resp.json())["action"] == "block"


async def test_warn_and_downgrade_are_allowed_with_their_action(
    make_client: ClientFactory,
) -> None:
    warn = {**USER_DAILY, "id": "warn", "scope": "team", "on_exceed": "warn"}
    down = {
        **USER_DAILY,
        "on_exceed": "downgrade",
        "downgrade_to": {"gpt-4o": "gpt-4o-mini"},
    }
    client = await make_client(doc(budgets=[warn, down]))

    async def check(team: str, user: str, usd: str) -> Any:
        headers = {**IDENTITY, "x-team-id": team, "x-user-id": user}
        resp = await client.get("/ext_authz/", headers={**headers, "x-budget-estimate-usd": usd})
        assert resp.status == 200
        assert len(resp.headers["x-budget-reservation-id"]) == RID_LEN
        return resp.headers

    first = await check("t1", "u1", "0.5")
    assert first["x-budget-action"] == "allow"
    assert "x-budget-downgrade-model" not in first
    # u1's downgrade budget would pass its limit:
    second = await check("t2", "u1", "0.6")
    assert second["x-budget-action"] == "downgrade"
    assert second["x-budget-downgrade-model"] == "gpt-4o-mini"
    # t1's warn budget would pass its limit:
    third = await check("t1", "u3", "0.6")
    assert third["x-budget-action"] == "warn"
    assert "x-budget-downgrade-model" not in third


RID_LEN = 32


async def test_no_applicable_budget_allows_without_remaining(make_client: ClientFactory) -> None:
    client = await make_client(doc(budgets=[]))
    resp = await client.get("/ext_authz/", headers=IDENTITY)
    assert resp.status == 200
    assert "x-budget-remaining-usd" not in resp.headers
    assert len(resp.headers["x-budget-reservation-id"]) == RID_LEN


@pytest.mark.parametrize(
    ("headers", "field"),
    [
        ({"x-user-id": "a{b}"}, "x-user-id"),
        ({"x-org-id": "x" * 129}, "x-org-id"),
        ({"x-model": "gpt 4"}, "x-model"),
        # (An unpriced x-model is no longer one: the proxy's dollar estimate needs no
        # price; tests/test_pricing.py holds it.)
        ({"x-budget-estimate-usd": "lots"}, "x-budget-estimate-usd"),
        ({"x-budget-estimate-usd": "-1"}, "x-budget-estimate-usd"),
        ({"x-budget-estimate-usd": "nan"}, "x-budget-estimate-usd"),
        *(
            ({"x-budget-estimate-usd": v}, "x-budget-estimate-usd")
            for v in (
                "0_5",
                "-0",
                "-0.0",
                "+1",
                "1e3",
                "1E-3",
                "inf",
                "Infinity",
                "1.",
                ".5",
                "0x1",
                "1 0",
                "1,5",
                "\u0661",
                "2000000",
            )
        ),
        ({"x-request-id": "has space"}, "x-request-id"),
    ],
)
async def test_a_bad_header_is_a_400_naming_it_and_holds_nothing(
    make_client: ClientFactory, redis_client: Any, headers: dict[str, str], field: str
) -> None:
    client = await make_client(doc())
    resp = await client.get("/ext_authz/", headers={**IDENTITY, **headers})
    assert resp.status == 400
    assert resp.content_type == "application/problem+json"
    body = await resp.json()
    assert body["field"] == field
    assert body["detail"].startswith(f"{field}: ")
    assert json.loads(resp.headers["x-budget-denial"]) == body
    assert data_keys(redis_client) == []


@pytest.mark.parametrize(("fail_mode", "status"), [("closed", 503), ("open", 200)])
async def test_redis_down_follows_the_fail_mode(fail_mode: str, status: int) -> None:
    cfg = make_config({**doc(), "settings": {"fail_mode": fail_mode}})
    # Nothing listens there: every call fails at once.
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout_ms=500)
    client = TestClient(TestServer(create_app(cfg, store, clock=FakeClock(T0_MS))))
    await client.start_server()
    try:
        resp = await client.get("/ext_authz/", headers=IDENTITY)
        assert resp.status == status
        if status == 503:
            assert resp.content_type == "application/problem+json"
            assert resp.headers["Retry-After"] == "1"
            assert (await resp.json())["degraded"] is True
            assert json.loads(resp.headers["x-budget-denial"])["status"] == 503
        else:
            assert resp.headers["x-budget-degraded"] == "true"
            # Nothing held: a fail-open grant id (sidecar.fail_open).
            assert resp.headers["x-budget-reservation-id"].startswith("fa11")
    finally:
        await client.close()


async def used(client: TestClient[Any, Any]) -> Any:
    resp = await client.get("/v1/budgets/user-daily/status", params={"scope_id": "u1"})
    assert resp.status == 200
    return (await resp.json())["used_usd"]


async def test_an_unsettled_hold_is_charged_at_its_lease_end_by_default(
    make_client: ClientFactory, clock: FakeClock
) -> None:
    client = await make_client(doc(lease_ms=2000))
    headers = {**IDENTITY, "x-budget-estimate-usd": "0.7"}
    assert (await client.get("/ext_authz/", headers=headers)).status == 200
    clock.advance(2001)
    # Nobody settled: the call went through, so its estimate is spent, not returned.
    assert (await held(client), await used(client)) == (0.0, 0.7)
    assert (await client.get("/ext_authz/", headers=headers)).status == 429


@pytest.mark.parametrize(
    ("proxy", "path", "charged"),
    [
        ({"unsettled": "release"}, "/v1/chat", 0.0),
        ({"unsettled": "release", "routes": [{"prefix": "/v1", "unsettled": "charge"}]},
         "/v1/chat", 0.7),
        ({"routes": [{"prefix": "/v1", "unsettled": "release"}]}, "/v1/chat", 0.0),
        ({"routes": [{"prefix": "/v1", "unsettled": "release"}]}, "/other", 0.7),
    ],
)  # fmt: skip
async def test_unsettled_release_returns_the_hold_where_configured(
    make_client: ClientFactory, clock: FakeClock, proxy: dict[str, Any], path: str, charged: float
) -> None:
    client = await make_client(doc(lease_ms=2000, **proxy))
    headers = {**IDENTITY, "x-budget-estimate-usd": "0.7"}
    assert (await client.get(f"/ext_authz{path}", headers=headers)).status == 200
    assert (await client.get(f"/ext_authz{path}", headers=headers)).status == 429
    clock.advance(2001)
    assert (await held(client), await used(client)) == (0.0, charged)
