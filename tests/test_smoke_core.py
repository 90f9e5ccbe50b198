"""The core flow over real Redis: authorize, settle, release, check, record, status."""

from __future__ import annotations

from typing import Any

from sidecar.clock import FakeClock
from tests.conftest import ClientFactory

DOC: dict[str, Any] = {
    "budgets": [
        {
            "id": "org",
            "name": "Org",
            "scope": "organization",
            "limit_usd": 1.0,
            "period": "monthly",
        },
        {"id": "user", "name": "Each user", "scope": "user", "limit_usd": 0.25, "period": "daily"},
    ],
    "pricing": [
        {"provider": "openai", "model": "gpt-4o", "input_per_1k": 0.0025, "output_per_1k": 0.01}
    ],
}


async def test_authorize_settle_charges_actual_cost(make_client: ClientFactory) -> None:
    client = await make_client(DOC)
    r = await client.post(
        "/v1/authorize",
        json={
            "user_id": "u1",
            "provider": "openai",
            "model": "gpt-4o",
            "estimated_tokens_in": 1000,
            "estimated_tokens_out": 1000,
        },
    )
    assert r.status == 200
    d = await r.json()
    assert d["allowed"] is True and d["action"] == "allow"
    assert d["estimated_usd"] == 0.0125
    assert [b["held_usd"] for b in d["budgets"]] == [0.0125, 0.0125]

    s = await client.post(
        "/v1/settle",
        json={
            "reservation_id": d["reservation_id"],
            "tokens_in": 500,
            "tokens_out": 100,
        },
    )
    body = await s.json()
    assert body["state"] == "settled" and body["cost_usd"] == 0.00225
    assert [(b["used_usd"], b["held_usd"]) for b in body["budgets"]] == [(0.00225, 0.0)] * 2


async def test_lease_expiry_returns_hold_once(make_client: ClientFactory, clock: FakeClock) -> None:
    client = await make_client(DOC)
    d = await (
        await client.post(
            "/v1/authorize",
            json={
                "user_id": "u1",
                "estimated_usd": 0.2,
                "lease_ms": 1000,
            },
        )
    ).json()
    assert d["allowed"]
    denied = await (
        await client.post("/v1/authorize", json={"user_id": "u1", "estimated_usd": 0.1})
    ).json()
    assert denied["allowed"] is False and denied["budget_info"]["budget_id"] == "user"
    clock.advance(1000)
    status = await (await client.get("/v1/budgets/user/status?scope_id=u1")).json()
    assert status["held_usd"] == 0.0 and status["used_usd"] == 0.0
    again = await (
        await client.post("/v1/authorize", json={"user_id": "u1", "estimated_usd": 0.25})
    ).json()
    assert again["allowed"] is True
