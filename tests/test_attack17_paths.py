"""The original path a route is matched on, spelled so that routes could read it as
another: in-process over the real Redis, both the trusted-header style (nginx, Caddy,
HAProxy, Traefik) and Envoy's /ext_authz + path.

Before: behind nginx, Caddy and HAProxy the route was matched on the path as the client
spelled it, and the upstream's router decodes it: `/%76%31/chat/completions` held the
default estimate (no route) for a call the upstream served as /v1/chat/completions (a
route's org_id and estimate escaped), and `/v1/models/../chat/completions` passed with
nothing held as the `hold: false` /v1/models, whatever the upstream made of it.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis

from tests.conftest import ClientFactory
from tests.harness import data_keys
from tests.test_attack17_identity import IDENTITY, doc, raw

ROUTES = [
    {"prefix": "/v1/chat/completions", "defaults": {"estimated_usd": 0.05, "org_id": "acme"}},
    {"prefix": "/v1/models", "hold": False},
]
TRUSTED = {"uri_header": "x-original-uri", "method_header": "x-original-method"}
AMBIGUOUS = [
    "/v1/models/../chat/completions",
    "/v1/models/%2E%2E/chat/completions",
    "/v1/models/%2e%2e/chat/completions",
    "/v1/./chat/completions",
    "//v1/chat/completions",
    "/v1//chat/completions",
    "/v1/models/..",
]
ENCODED = ["/%76%31/chat/completions", "/v1/chat%2Fcompletions", "/v1/chat/completion%73?x=1"]


async def held(client: Any, budget: str, entity: str) -> Any:
    resp = await client.get(f"/v1/budgets/{budget}/status", params={"scope_id": entity})
    return (await resp.json())["held_usd"]


@pytest.mark.parametrize("fast_http", [True, False])
@pytest.mark.parametrize("path", AMBIGUOUS)
@pytest.mark.parametrize("style", ["trusted", "envoy"])
async def test_a_path_with_an_empty_or_dot_segment_is_a_400_and_holds_nothing(
    make_client: ClientFactory, redis_client: redis.Redis, fast_http: bool, path: str, style: str
) -> None:
    if style == "trusted":
        client = await make_client(doc(fast_http, routes=ROUTES, trusted=TRUSTED))
        headers = {**IDENTITY, "x-original-uri": path, "x-original-method": "POST"}
        resp = await client.get("/ext_authz", headers=headers)
    else:
        # Sent as is: aiohttp's client would resolve the dot segments itself.
        client = await make_client(doc(fast_http, routes=ROUTES))
        status, body = await raw(client, "POST", "/ext_authz" + path, [*IDENTITY.items()])
        assert (status, body["field"]) == (400, "path"), body
        assert data_keys(redis_client) == []
        return
    assert resp.status == 400, await resp.text()
    assert resp.content_type == "application/problem+json"
    assert (await resp.json())["field"] == "x-original-uri"
    assert data_keys(redis_client) == []


@pytest.mark.parametrize("fast_http", [True, False])
@pytest.mark.parametrize("path", ENCODED)
async def test_a_percent_encoded_path_takes_the_route_it_decodes_to(
    make_client: ClientFactory, fast_http: bool, path: str
) -> None:
    client = await make_client(
        {**doc(fast_http, routes=ROUTES, trusted=TRUSTED), "budgets": [ORG_DAILY]}
    )
    headers = {**IDENTITY, "x-original-uri": path, "x-original-method": "POST"}
    resp = await client.get("/ext_authz", headers=headers)
    assert resp.status == 200, await resp.text()
    assert await held(client, "org-daily", "acme") == 0.05


ORG_DAILY: dict[str, Any] = {
    "id": "org-daily",
    "name": "Each org daily",
    "scope": "organization",
    "limit_usd": 5.0,
    "period": "daily",
}


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/", "/v1/models/gpt-4o", "/"])
async def test_ordinary_paths_still_pass_or_hold(make_client: ClientFactory, path: str) -> None:
    client = await make_client(doc(False, routes=ROUTES, trusted=TRUSTED))
    headers = {**IDENTITY, "x-original-uri": path, "x-original-method": "POST"}
    resp = await client.get("/ext_authz", headers=headers)
    assert resp.status == 200
    want = "pass" if path.startswith("/v1/models") else "allow"
    assert resp.headers["x-budget-action"] == want
