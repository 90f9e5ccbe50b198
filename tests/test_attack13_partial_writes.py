"""Partial writes on the definition and stop routes, on a real redis-server: a body with
one bad field among good ones, valid JSON of the wrong shape, a wrong type, a field the
route does not take, a number out of range, a duration in another script's digits: each
is 400 problem+json naming the field, and all of Redis (tests.harness.data_dump) is as it
was. The budget, limit and price as they were stay in force."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from tests.conftest import ClientFactory
from tests.harness import data_dump

BUDGET = {"id": "b1", "name": "B", "scope": "agent", "limit_usd": 1, "period": "monthly"}
LIMIT = {"id": "rpm", "scope": "organization", "metric": "requests", "limit": 5, "window": "1m"}
PRICE = {"provider": "acme", "model": "m", "pricing": {"input_per_1k": 1, "output_per_1k": 2}}
STOP = {"scope": "agent", "scope_id": "a1", "reason": "r"}

CASES: list[tuple[str, str, Any, str]] = [
    # One bad field among good ones.
    ("PUT", "/api/v1/budgets/b1", {"limit_usd": 5, "name": ""}, "name"),
    ("PUT", "/api/v1/budgets/b1", {"limit_usd": 5, "alert_thresholds": [50, 0]},
     "alert_thresholds[1]"),
    ("PUT", "/api/v1/budgets/b1", {"limit_usd": 5, "on_exceed": "explode"}, "on_exceed"),
    ("PUT", "/api/v1/budgets/b1", {"limit_usd": 5, "enabled": False}, "enabled"),
    ("PUT", "/api/v1/budgets/b1", {"name": "ok", "limit_usd": 1e-7}, "limit_usd"),
    ("PUT", "/api/v1/budgets/b1", {"limit_usd": True}, "limit_usd"),
    ("PUT", "/v1/rate-limits/rpm", {**LIMIT, "limit": 6, "burst": -1}, "burst"),
    ("PUT", "/v1/rate-limits/rpm", {**LIMIT, "limit": 6.5}, "limit"),
    ("PUT", "/v1/rate-limits/rpm", {**LIMIT, "limit": 6, "window": "1.5m"}, "window"),
    ("PUT", "/v1/rate-limits/rpm", {**LIMIT, "limit": 6, "id": "other"}, "id"),
    # Digits of other scripts: int() reads them, the documented grammar does not.
    ("PUT", "/v1/rate-limits/rpm", {**LIMIT, "limit": 6, "window": "\uff11m"}, "window"),
    ("PUT", "/v1/rate-limits/rpm", {**LIMIT, "limit": 6, "window": "\u0663s"}, "window"),
    ("POST", "/v1/rate-limits", {**LIMIT, "id": "rps", "window": "\u0661\u0660s"}, "window"),
    ("PUT", "/api/v1/pricing", {**PRICE, "pricing": {"input_per_1k": 3, "output_per_1k": -1}},
     "pricing.output_per_1k"),
    ("PUT", "/api/v1/pricing", {**PRICE, "pricing": {"input_per_1k": 3, "output_per_1k": 1,
                                                     "cached_per_1k": 1}}, "pricing.cached_per_1k"),
    ("POST", "/v1/stops", {**STOP, "ttl_s": True}, "ttl_s"),
    ("POST", "/v1/stops", {**STOP, "reason": "two\nlines"}, "reason"),
    ("POST", "/api/v1/budgets", {**BUDGET, "id": "b2", "period": "fortnightly"}, "period"),
    # Valid JSON, wrong shape.
    ("PUT", "/api/v1/budgets/b1", [{"limit_usd": 5}], "body"),
    ("PUT", "/v1/rate-limits/rpm", None, "body"),
    ("PUT", "/api/v1/pricing", "acme/m", "body"),
    ("POST", "/v1/stops", [STOP, STOP], "body"),
    ("PUT", "/api/v1/pricing", {**PRICE, "pricing": [1, 2]}, "pricing"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "body", "field"), CASES, ids=[f"{c[0]} {c[1]} {c[3]}" for c in CASES]
)
async def test_one_bad_field_is_400_naming_it_and_changes_nothing(
    make_client: ClientFactory, redis_client: redis.Redis, method: str, path: str, body: Any,
    field: str,
) -> None:  # fmt: skip
    client = await make_client({"budgets": []})
    for made_path, made in (("/api/v1/budgets", BUDGET), ("/v1/rate-limits", LIMIT)):
        assert (await client.post(made_path, json=made)).status == 201
    assert (await client.put("/api/v1/pricing", json=PRICE)).status == 200
    before = data_dump(redis_client)
    resp = await client.request(method, path, json=body)
    answer = await resp.json()
    assert (resp.status, answer.get("field")) == (400, field), answer
    assert resp.content_type == "application/problem+json"
    assert data_dump(redis_client) == before
    # What was in force still is, on this replica too.
    budget = await (await client.get("/api/v1/budgets/b1")).json()
    assert (budget["limit_usd"], budget["name"]) == (1.0, "B")
    limit = await (await client.get("/v1/rate-limits/rpm")).json()
    assert (limit["limit"], limit["window"]) == (5, "1m")
    price = await (await client.get("/api/v1/pricing?provider=acme&model=m")).json()
    assert price["pricing"] == PRICE["pricing"]
