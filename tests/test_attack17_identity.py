"""Identity smuggling on /ext_authz: a header the check reads, sent more than once.

nginx, Traefik, Caddy and HAProxy pass a client's duplicated headers on to the check as
they came (tests/test_attack17_proxies.py shows it with each real binary); which copy a
hop reads differs (aiohttp's `get` the first, many upstreams the last). The sidecar used to
charge the first copy: a client sending `X-User-ID: someone-else` then `X-User-ID: me`
charged someone else's budget while its upstream saw `me`. Now every header the check
reads answers 400 problem+json naming it when it comes twice, in any spelling of its name,
and holds nothing. In-process over the real Redis, on both HTTP paths.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient

from tests.conftest import ClientFactory
from tests.harness import data_keys

PRICING = [
    {"provider": "openai", "model": "gpt-4o", "input_per_1k": 0.0025, "output_per_1k": 0.01},
]
USER_DAILY: dict[str, Any] = {
    "id": "user-daily",
    "name": "Each user daily",
    "scope": "user",
    "limit_usd": 1.0,
    "period": "daily",
}
IDENTITY = {"x-user-id": "u1", "x-provider": "openai", "x-model": "gpt-4o"}

# Each header the check reads, two spellings of its name and two values.
DUPLICATES = [
    ("x-user-id", "X-User-ID", "u1", "u2"),
    ("x-org-id", "X-ORG-ID", "acme", "other"),
    ("x-team-id", "x-team-id", "t1", "t2"),
    ("x-agent-id", "X-Agent-Id", "a1", "a2"),
    ("x-workflow-id", "x-workflow-id", "w1", "w2"),
    ("x-model", "X-Model", "gpt-4o", "gpt-4o"),
    ("x-provider", "x-provider", "openai", "anthropic"),
    ("x-run-id", "X-Run-Id", "r1", "r2"),
    ("x-budget-fingerprint", "x-budget-fingerprint", "f1", "f1"),
    ("x-budget-estimate-usd", "X-Budget-Estimate-Usd", "0.000001", "0.5"),
    ("x-request-id", "X-Request-ID", "req-1", "req-2"),
]


async def raw(
    client: TestClient[Any, Any], method: str, path: str, headers: list[tuple[str, str]]
) -> tuple[int, dict[str, Any]]:
    """Send exactly these header lines (aiohttp's client folds names that differ in case)
    and return the status and JSON body."""
    port = client.server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8"))
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, (json.loads(body) if body else {})


def doc(fast_http: bool, **proxy: Any) -> dict[str, Any]:
    return {
        "budgets": [USER_DAILY],
        "pricing": PRICING,
        "proxy": proxy,
        "settings": {"fast_http": fast_http},
    }


@pytest.mark.parametrize("fast_http", [True, False])
@pytest.mark.parametrize(("name", "spelled", "first", "second"), DUPLICATES)
async def test_a_header_sent_twice_is_a_400_naming_it_and_holds_nothing(
    make_client: ClientFactory,
    redis_client: redis.Redis,
    fast_http: bool,
    name: str,
    spelled: str,
    first: str,
    second: str,
) -> None:
    client = await make_client(doc(fast_http))
    headers = [(k, v) for k, v in IDENTITY.items() if k != name]
    headers += [(name, first), (spelled, second)]
    status, body = await raw(client, "POST", "/ext_authz/v1/chat/completions", headers)
    assert status == 400, body
    assert body["status"] == 400
    assert body["field"] == name
    assert body["detail"] == f"{name}: sent 2 times; send it once"
    assert data_keys(redis_client) == []


@pytest.mark.parametrize("fast_http", [True, False])
@pytest.mark.parametrize("header", ["x-original-uri", "x-original-method"])
async def test_a_trusted_header_sent_twice_is_a_400(
    make_client: ClientFactory, redis_client: redis.Redis, fast_http: bool, header: str
) -> None:
    """A proxy that appends instead of overwriting (a misconfigured one) must not let the
    client's copy pick the route: two copies of a trusted header are refused."""
    trusted = {"uri_header": "x-original-uri", "method_header": "x-original-method"}
    client = await make_client(doc(fast_http, trusted=trusted))
    headers = [*IDENTITY.items()]
    headers += [("x-original-uri", "/v1/chat/completions"), ("x-original-method", "POST")]
    headers += [(header.upper(), "OPTIONS" if header.endswith("method") else "/v1/models")]
    status, body = await raw(client, "GET", "/ext_authz", headers)
    assert status == 400
    assert body["field"] == header
    assert data_keys(redis_client) == []


@pytest.mark.parametrize("fast_http", [True, False])
@pytest.mark.parametrize(
    "value", ["u1, u2", "u1,u2", "u1 u2", "u1;u2", "u1%2Cu2", "u\u00e9", "\uff55\uff11"]
)
async def test_a_merged_or_encoded_identity_is_a_400(
    make_client: ClientFactory, redis_client: redis.Redis, fast_http: bool, value: str
) -> None:
    """What a proxy makes of duplicates when it merges them ("u1, u2"), and spellings a
    client might hope are read as another id: refused, never split or decoded."""
    client = await make_client(doc(fast_http))
    raw = value.encode("utf-8").decode("latin-1")  # sent as UTF-8 bytes on the wire
    resp = await client.get("/ext_authz/", headers={**IDENTITY, "x-user-id": raw})
    assert resp.status == 400
    assert (await resp.json())["field"] == "x-user-id"
    assert data_keys(redis_client) == []


@pytest.mark.parametrize("fast_http", [True, False])
async def test_one_copy_of_each_is_still_allowed(
    make_client: ClientFactory, fast_http: bool
) -> None:
    """The refusal is for duplicates only: one copy of every header passes and holds."""
    client = await make_client(doc(fast_http))
    headers = {
        **IDENTITY,
        "x-org-id": "acme",
        "x-team-id": "t1",
        "x-agent-id": "a1",
        "x-workflow-id": "w1",
        "x-run-id": "r1",
        "x-budget-fingerprint": "f1",
        "x-budget-estimate-usd": "0.25",
        "x-request-id": "req-1",
    }
    resp = await client.post("/ext_authz/v1/chat/completions", headers=headers)
    assert resp.status == 200
    status = await client.get("/v1/budgets/user-daily/status", params={"scope_id": "u1"})
    assert (await status.json())["held_usd"] == 0.25
