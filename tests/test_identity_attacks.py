"""Attacks on identities, tenants and unbounded input: another tenant's reservation ids and
idempotency keys change and reveal nothing; an idempotency key reused by another request
does not hand that request's reservation id out; identity values at their boundaries are a
400 naming the field or counted on exactly their own counter; attacker-chosen strings in
their thousands grow neither the /metrics series nor the bounded Redis hashes."""

from __future__ import annotations

import base64
from typing import Any

import redis

from sidecar import keys
from tests.conftest import ClientFactory


def basic(client_id: str, secret: str) -> dict[str, str]:
    token = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


AGENT_A = basic("agent-a", "a-pass")
AGENT_A2 = basic("agent-a2", "a2-pass")
AGENT_B = basic("agent-b", "b-pass")
TENANTS_DOC: dict[str, Any] = {
    "budgets": [{"id": "cap", "name": "Cap", "scope": "organization", "limit_usd": 1.0,
                 "period": "monthly"}],
    "auth": {"clients": [
        {"client_id": "agent-a", "tenant": "team-a", "role": "agent", "secret": "a-pass"},
        {"client_id": "agent-a2", "tenant": "team-a", "role": "agent", "secret": "a2-pass"},
        {"client_id": "agent-b", "tenant": "team-b", "role": "agent", "secret": "b-pass"},
    ]},
}  # fmt: skip


def tenant_dump(client: redis.Redis, tenant: str) -> dict[str, Any]:
    """Every key of one tenant, with its value (DUMP) and its TTL."""
    tag = keys.tenant_keys(tenant).counters[: -len("ctr")]
    return {
        k: (client.dump(k), client.pttl(k) > 0)
        for k in sorted(client.scan_iter(match=tag.replace("{", "[{]").replace("}", "[}]") + "*"))
    }


def without(text: str, *secrets: str) -> str:
    for s in secrets:
        text = text.replace(s, "<id>")
    return text


# ---- 1. another tenant's reservation ids and idempotency keys ---------------------------


async def test_another_tenants_reservation_and_key_change_and_reveal_nothing(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(TENANTS_DOC)
    call = {"agent_id": "x", "estimated_usd": 0.6, "idempotency_key": "call-1"}
    a = await (await client.post("/v1/authorize", json=call, headers=AGENT_A)).json()
    assert a["allowed"] and not a["replayed"]
    rid = a["reservation_id"]
    before = tenant_dump(redis_client, "team-a")
    unknown = "f" * 32

    async def answer(path: str, body: dict[str, Any]) -> tuple[int, str, str | None]:
        resp = await client.post(path, json=body, headers=AGENT_B)
        return resp.status, without(await resp.text(), rid, unknown), resp.content_type

    for path, body in (
        ("/v1/settle", {"cost_usd": 0.01}),
        ("/v1/settle", {"tokens_in": 10, "tokens_out": 10}),
        ("/v1/release", {}),
    ):
        theirs = await answer(path, {**body, "reservation_id": rid})
        none = await answer(path, {**body, "reservation_id": unknown})
        assert theirs[0] == 404, theirs
        assert theirs == none  # word for word what an id nobody made answers
    audit = {"context_id": rid, "provider": "acme", "model": "m", "metadata": {"cost_usd": 0.1}}
    resp = await client.post("/api/audit/llm-call", json=audit, headers=AGENT_B)
    assert resp.status == 404, await resp.text()
    # B's own call with A's key is B's own: a new hold in B, nothing of A's handed back.
    b = await (await client.post("/v1/authorize", json=call, headers=AGENT_B)).json()
    assert b["allowed"] and not b["replayed"] and b["reservation_id"] != rid
    # Twice the same replayed from B: B's own reservation, not A's.
    again = await (await client.post("/v1/authorize", json=call, headers=AGENT_B)).json()
    assert again["replayed"] and again["reservation_id"] == b["reservation_id"]
    other = {**call, "estimated_usd": 0.1}
    resp = await client.post("/v1/authorize", json=other, headers=AGENT_B)
    assert resp.status == 409 and rid not in await resp.text()
    assert tenant_dump(redis_client, "team-a") == before
    # A's reservation is intact: its settle charges it once.
    settled = await client.post(
        "/v1/settle", json={"reservation_id": rid, "cost_usd": 0.5}, headers=AGENT_A
    )
    assert settled.status == 200 and (await settled.json())["replayed"] is False


# ---- 2. a reused idempotency key does not hand out the other request's reservation ------


async def test_a_key_reused_by_another_request_is_409_without_the_reservation_id(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """Keys are often guessable ("run-7:step-3"); the reservation id is what settles and
    releases a hold. Agent a2 of the same tenant sends a1's key with its own request: the
    409 must not tell it a1's reservation id, else a2 could release a1's hold (a1's call
    then runs unheld) or settle it at $0 (a1's real cost is then never charged)."""
    client = await make_client(TENANTS_DOC)
    mine = {"agent_id": "a1", "estimated_usd": 0.5, "idempotency_key": "run-7:step-3"}
    first = await (await client.post("/v1/authorize", json=mine, headers=AGENT_A)).json()
    rid = first["reservation_id"]
    before = tenant_dump(redis_client, "team-a")
    for change in ({"agent_id": "a2"}, {"estimated_usd": 0.01}, {"user_id": "u"},
                   {"model": "m-2"}, {"run_id": "r"}, {"lease_ms": 1000}):  # fmt: skip
        resp = await client.post("/v1/authorize", json={**mine, **change}, headers=AGENT_A2)
        text = await resp.text()
        assert resp.status == 409, text
        assert resp.content_type == "application/problem+json"
        body = await resp.json()
        assert body["field"] == "idempotency_key"
        assert rid not in text, (change, text)
    assert tenant_dump(redis_client, "team-a") == before
    # The caller's own retry still gets its reservation back.
    again = await (await client.post("/v1/authorize", json=mine, headers=AGENT_A)).json()
    assert again["replayed"] and again["reservation_id"] == rid
