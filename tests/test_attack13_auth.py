"""Hostile callers on the credentials layer and the stops API, with two tenants configured
(tests.test_auth's clients): two credentials in one request are refused, not resolved to
the first; no spelling of a path (raw socket: doubled slashes, dot segments, percent
escapes, case, absolute form) reaches a data route without credentials; one tenant's admin
cannot read, lift or feel another tenant's stop; read and agent keys make no stop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
from multidict import CIMultiDict

from tests.conftest import ClientFactory
from tests.harness import data_dump
from tests.test_auth import ADMIN, ADMIN_B, AGENT_A, AGENT_B, DOC, READER

STOP = {"scope": "agent", "scope_id": "a1", "reason": "looping"}
CALL = {"agent_id": "a1", "estimated_usd": 0.01}


def two(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(pairs)


AUTH_A, AUTH_B = ADMIN["Authorization"], ADMIN_B["Authorization"]
DOUBLED = {
    # A proxy that keeps the last of two Authorization headers sees team-b's admin.
    "two-authorizations": two(("Authorization", AUTH_A), ("Authorization", AUTH_B)),
    "the-same-authorization-twice": two(("Authorization", AUTH_A), ("Authorization", AUTH_A)),
    "two-client-ids": two(
        ("Authorization", AGENT_A["Authorization"]), ("X-Client-ID", "agent-a"),
        ("X-Client-ID", "ops"),
    ),
    "two-client-ids-alone": two(("X-Client-ID", "community"), ("X-Client-ID", "ops")),
}  # fmt: skip


@pytest.mark.parametrize("fast_http", [True, False])
@pytest.mark.parametrize("case", sorted(DOUBLED))
async def test_two_credentials_in_one_request_are_401_and_change_nothing(
    make_client: ClientFactory, redis_client: redis.Redis, case: str, fast_http: bool
) -> None:
    client = await make_client({**DOC, "settings": {"fast_http": fast_http}})
    made = await client.post("/v1/stops", json=STOP, headers=ADMIN)
    assert made.status == 201
    before = data_dump(redis_client)
    headers = DOUBLED[case]
    for method, path, body in (
        ("GET", "/v1/stops", None),
        ("POST", "/v1/stops", {**STOP, "scope_id": "a2"}),
        ("DELETE", f"/v1/stops/{(await made.json())['id']}", None),
        ("POST", "/v1/authorize", {"agent_id": "a9", "estimated_usd": 0.01}),  # the fast path
        ("PUT", "/api/v1/pricing", {"provider": "acme", "model": "m",
                                    "pricing": {"input_per_1k": 1, "output_per_1k": 1}}),
    ):  # fmt: skip
        resp = await client.request(method, path, json=body, headers=headers)
        text = await resp.text()
        assert resp.status == 401, (case, method, path, resp.status, text)
        assert "stop_" not in text
        assert resp.content_type == "application/problem+json"
    assert data_dump(redis_client) == before


TARGETS = [
    "//v1/stops", "/V1/stops", "/v1/stops/", "/v1/%73tops", "/ui/../v1/stops",
    "/ui/..%2fv1/stops", "/%2e%2e/v1/stops", "/./v1/stops", "/v1//stops", "/v1/stops%20",
    "/healthz/../v1/stops", "/ui/%2e%2e/v1/stops", "/ui;/../api/v1/budgets",
    "/openapi.json/../api/v1/budgets", "/API/v1/usage", "/api/v1/usage/",
    "http://127.0.0.1/v1/stops", "/v1/stops?x=/ui",
]  # fmt: skip


@pytest.mark.parametrize("fast_http", [True, False])
async def test_no_spelling_of_a_path_reaches_data_without_credentials(
    make_client: ClientFactory, redis_client: redis.Redis, fast_http: bool
) -> None:
    client = await make_client({**DOC, "settings": {"fast_http": fast_http}})
    assert (await client.post("/v1/stops", json=STOP, headers=ADMIN)).status == 201
    before = data_dump(redis_client)
    statuses: dict[tuple[str, str], bytes] = {}
    for method in ("GET", "HEAD", "OPTIONS", "DELETE"):
        for target in TARGETS:
            reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
            head = f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            writer.write(head.encode())
            data = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert b"stop_" not in data and b"budgets" not in data.split(b"\r\n\r\n", 1)[-1]
            statuses[(method, target)] = data.split(b" ", 2)[1]
    assert set(statuses.values()) == {b"401"}, statuses
    assert data_dump(redis_client) == before


async def test_a_tenant_admin_cannot_see_lift_or_feel_another_tenants_stop(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(DOC)

    async def call(method: str, path: str, headers: dict[str, str], body: Any = None) -> Any:
        resp = await client.request(method, path, json=body, headers=headers)
        return resp.status, (await resp.json() if resp.status != 204 else None)

    status, stop = await call("POST", "/v1/stops", ADMIN, STOP)
    assert status == 201
    before = data_dump(redis_client)
    for path in (f"/v1/stops/{stop['id']}", f"/v1/stops/{stop['id'].upper()}",
                 f"/v1/stops/{stop['id']}%20", "/v1/stops/%73" + stop["id"][1:]):  # fmt: skip
        assert (await call("GET", path, ADMIN_B))[0] == 404, path
        assert (await call("DELETE", path, ADMIN_B))[0] == 404, path
    assert await call("GET", "/v1/stops", ADMIN_B) == (200, {"stops": []})
    alerts = await call("GET", "/v1/alerts", ADMIN_B)
    assert alerts == (200, {"alerts": [], "count": 0})
    # Read and agent keys of A's own tenant may look but not lift or make.
    assert (await call("DELETE", f"/v1/stops/{stop['id']}", READER))[0] == 403
    assert (await call("DELETE", f"/v1/stops/{stop['id']}", AGENT_A))[0] == 403
    assert (await call("POST", "/v1/stops", READER, {**STOP, "scope_id": "a2"}))[0] == 403
    assert (await call("POST", "/v1/stops", AGENT_B, {**STOP, "scope_id": "a2"}))[0] == 403
    assert data_dump(redis_client) == before  # none of that wrote anything
    # B's agent a1 is another entity: B's decisions are not stopped, A's are.
    b = await call("POST", "/v1/authorize", AGENT_B, CALL)
    a = await call("POST", "/v1/authorize", AGENT_A, CALL)
    assert b[1]["allowed"] is True
    assert a[1]["allowed"] is False and a[1]["reason"] == "stop"
    # B's own stop of "a1" neither replaces nor lifts A's.
    status, b_stop = await call("POST", "/v1/stops", ADMIN_B, STOP)
    assert status == 201
    assert (await call("DELETE", f"/v1/stops/{b_stop['id']}", ADMIN_B))[0] == 204
    assert [s["id"] for s in (await call("GET", "/v1/stops", READER))[1]["stops"]] == [stop["id"]]
    assert (await call("POST", "/v1/authorize", AGENT_A, CALL))[1]["allowed"] is False
