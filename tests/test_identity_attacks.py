"""Attacks on identities, tenants and unbounded input: another tenant's reservation ids and
idempotency keys change and reveal nothing; an idempotency key reused by another request
does not hand that request's reservation id out; identity values at their boundaries are a
400 naming the field or counted on exactly their own counter; attacker-chosen strings in
their thousands grow neither the /metrics series nor the bounded Redis hashes."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest
import redis

from sidecar import keys
from tests.conftest import ClientFactory
from tests.harness import data_keys
from tests.test_metrics import MakeApp, metered  # noqa: F401 (the fixture, reused)


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


# ---- 3. identity values at their boundaries ----------------------------------------------

PER_AGENT_DOC: dict[str, Any] = {
    "budgets": [{"id": "each", "name": "Each agent", "scope": "agent", "limit_usd": 1.0,
                 "period": "monthly"}],
}  # fmt: skip
ID_FIELDS = ("org_id", "team_id", "agent_id", "workflow_id", "user_id", "run_id", "step_id",
             "provider")  # fmt: skip
BAD_IDS = ["a/b", "a%b", "a%2Fb", "a:b", "a|b", "a,b", "{a}", "a}", "a b", "a\x1fb", "a\nb",
           "é", "\U0001f600", "", "x" * 129]  # fmt: skip
BAD_MODELS = ["a|b", "a,b", "{m}", "m%2F", "m\x1fx", "é", "", "m" * 201, "m b"]


def everything(client: redis.Redis) -> dict[str, Any]:
    return {k: client.dump(k) for k in data_keys(client)}


@pytest.mark.parametrize("field", ID_FIELDS)
async def test_every_bad_identity_is_a_400_naming_its_field_and_writes_nothing(
    make_client: ClientFactory, redis_client: redis.Redis, field: str
) -> None:
    client = await make_client(PER_AGENT_DOC)
    base = {"agent_id": "z", "estimated_usd": 0.01}
    first = await client.post("/v1/authorize", json=base)
    assert first.status == 200
    before = everything(redis_client)
    for value in BAD_IDS:
        for path in ("/v1/authorize", "/v1/check", "/v1/record"):
            body: dict[str, Any] = {**base, field: value}
            if path == "/v1/record":
                body = {**base, field: value, "cost_usd": 0.01}
                del body["estimated_usd"]
            if path == "/v1/check" and field == "step_id":
                continue  # check takes no step
            resp = await client.post(path, json=body)
            problem = await resp.json(content_type=None)
            assert resp.status == 400, (path, field, value, problem)
            assert resp.content_type == "application/problem+json"
            assert field in problem["detail"], (path, value, problem)
    assert everything(redis_client) == before
    # The longest allowed value is served.
    resp = await client.post("/v1/authorize", json={**base, field: "x" * 128})
    assert resp.status == 200, await resp.text()


async def test_bad_model_names_are_400_and_near_identical_ids_count_on_their_own_counters(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(PER_AGENT_DOC)
    for value in BAD_MODELS:
        resp = await client.post("/v1/authorize", json={"estimated_usd": 0.1, "model": value})
        assert resp.status == 400, (value, await resp.text())
        assert "model" in (await resp.json())["detail"]
    assert everything(redis_client) == {}
    # Ids that an escaping or a case fold could confuse: each its own $1 cap, so 0.6 each
    # passes once per id (two sharing a counter would see the second denied).
    near = ["a.b", "a-b", "a_b" if False else "a~b", "A.B", "a@b", "a+b", "a..b", "a.b.",
            ".a.b", "a2Fb", "a%2Fb".replace("%", "."), "x" * 128, "x" * 127]  # fmt: skip
    assert len(set(near)) == len(near)
    models = ["m/x", "m:x", "m.x", "m%x".replace("%", "-"), "m//x", "m/:x"]
    for i, agent in enumerate(near):
        model = models[i % len(models)]
        d = await (
            await client.post(
                "/v1/authorize", json={"agent_id": agent, "estimated_usd": 0.6, "model": model}
            )
        ).json()
        assert d["allowed"] and d["budgets"][0]["entity"] == agent, (agent, d)
    held = {
        keys.parse_counter_id(f[2:])[1]: int(v)
        for f, v in redis_client.hgetall(keys.tenant_keys("default").counters).items()
        if f.startswith("h:")
    }
    assert held == {agent: 600_000 for agent in near}
    for agent in near:
        body = {"agent_id": agent, "estimated_usd": 0.6}
        d = await (await client.post("/v1/authorize", json=body)).json()
        assert not d["allowed"], agent


# ---- 4. attacker-chosen strings in their thousands ---------------------------------------

DISTINCT = 1_500  # 30 times each cap below (50, 64): what a cap is for
CARD_DOC: dict[str, Any] = {
    "budgets": [
        {"id": "each-user", "name": "Each user", "scope": "user", "limit_usd": 5,
         "period": "daily"},
        {"id": "each-run", "name": "Each run", "scope": "run", "period": "total",
         "limit_usd": 5, "limit_calls": 100},
    ],
    "rate_limits": [{"id": "rpm", "scope": "agent", "metric": "requests", "limit": 10_000,
                     "burst": 9_999, "window": "1m"}],
    "loop_guards": [{"id": "same", "scope": "agent", "repeats": 2, "window": "10m",
                     "mode": "shadow"}],
    "settings": {"estimate": "learned", "estimate_max_series": 50, "estimate_min_count": 1},
}  # fmt: skip


def series_count(text: str) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


async def test_thousands_of_distinct_identities_grow_no_metric_series_nor_bounded_hashes(
    metered: MakeApp,  # noqa: F811 (the fixture of tests.test_metrics)
    redis_client: redis.Redis,
) -> None:
    client, _ = await metered(CARD_DOC)
    tenant = keys.tenant_keys("default")

    def call(i: int) -> dict[str, Any]:
        return {"agent_id": f"agent-{i}", "user_id": f"user-{i}", "run_id": f"run-{i}",
                "model": f"model/{i}:v", "provider": f"prov-{i}", "step_id": f"s-{i}",
                "fingerprint": f"fp {i} \u00e9 | , {{x}}", "estimated_usd": 0.001}  # fmt: skip

    async def one(i: int, body: dict[str, Any]) -> None:
        d = await (await client.post("/v1/authorize", json=body)).json()
        assert d["allowed"], (d["estimated_usd"], d["reason"], d["message"], d["budgets"])
        s = await client.post(
            "/v1/settle", json={"reservation_id": d["reservation_id"], "cost_usd": 0.002}
        )
        assert s.status == 200, await s.text()
        r = await client.post("/v1/record", json={**{k: v for k, v in body.items()
                                                      if k not in ("fingerprint",
                                                                   "estimated_usd")},
                                                   "cost_usd": 0.001})  # fmt: skip
        assert r.status == 200, await r.text()

    # Every kind of call once, so each label a call can make exists before the count.
    await one(0, call(0))
    for path in ("/v1/check", "/v1/release"):
        await client.post(path, json={"reservation_id": "0" * 32} if "release" in path else {})
    before = series_count(await (await client.get("/metrics")).text())
    for start in range(1, DISTINCT, 100):
        await asyncio.gather(*(one(i, call(i)) for i in range(start, min(start + 100, DISTINCT))))
    # One agent, thousands of fingerprints: the loop guard's hash keeps at most 64.
    for start in range(0, 1000, 100):
        await asyncio.gather(
            *(
                one(
                    0,
                    {**call(0), "fingerprint": f"other {i}", "run_id": f"r{i}", "user_id": f"u{i}"},
                )
                for i in range(start, start + 100)
            )
        )
    after = series_count(await (await client.get("/metrics")).text())
    print("\nseries", before, after, "est", redis_client.hlen(tenant.estimates),
          "loop", redis_client.hlen(tenant.loop("same", "agent-0")))  # fmt: skip
    assert after == before, (before, after)
    assert redis_client.hlen(tenant.estimates) <= 50
    loop = redis_client.hgetall(tenant.loop("same", "agent-0"))
    assert 0 < len([f for f in loop if f != "~"]) <= 64, len(loop)
