"""Messages a newcomer meets (issue #17): a denial says what binds ("exceeded" only when
the budget is spent), ids and enums are described in words, a contradictory setting is an
error naming its field."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from sidecar import config as config_mod
from sidecar.config import ConfigError
from tests.conftest import ClientFactory

EACH_USER = {"id": "each-user", "name": "Each user, $5 a day", "scope": "user",
             "limit_usd": 5, "period": "daily"}  # fmt: skip


def _doc(**budget: Any) -> dict[str, Any]:
    return {"budgets": [{**EACH_USER, **budget}]}


async def _authorize(client: Any, usd: float, user: str = "u1") -> dict[str, Any]:
    r = await client.post("/v1/authorize", json={"user_id": user, "estimated_usd": usd})
    assert r.status == 200, await r.text()
    body: dict[str, Any] = await r.json()
    return body


async def test_a_denial_says_the_estimate_and_what_is_left(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(_doc())
    denied = await _authorize(client, 9)
    assert denied["allowed"] is False
    assert denied["message"] == (
        "Estimate $9.00 exceeds the $5.00 left on 'Each user, $5 a day' - requests blocked"
    )
    # Part spent: what is left, to the micro-dollar.
    await client.post("/v1/record", json={"user_id": "u1", "cost_usd": 4.9975})
    denied = await _authorize(client, 0.01)
    assert denied["message"] == (
        "Estimate $0.01 exceeds the $0.0025 left on 'Each user, $5 a day' - requests blocked"
    )
    # Truly spent: then, and only then, "exceeded".
    await client.post("/v1/record", json={"user_id": "u1", "cost_usd": 0.0025})
    denied = await _authorize(client, 0.01)
    assert denied["message"] == "Budget 'Each user, $5 a day' exceeded - requests blocked"


async def test_warn_and_downgrade_say_the_same(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client({"budgets": [{**EACH_USER, "on_exceed": "warn"}]})
    warned = await _authorize(client, 6)
    assert warned["allowed"] is True and warned["action"] == "warn"
    assert warned["message"] == (
        "Estimate $6.00 exceeds the $5.00 left on 'Each user, $5 a day' - warning"
    )


async def test_a_malformed_reservation_id_is_described_in_words(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(_doc())
    r = await client.post("/v1/settle", json={"reservation_id": "not-an-id", "cost_usd": 1})
    assert r.status == 400
    problem = await r.json()
    assert problem["field"] == "reservation_id"
    assert problem["detail"] == (
        "reservation_id: expected a reservation id: the 32 lowercase hex characters "
        "authorize returned"
    )
    assert "[0-9a-f]" not in problem["detail"] and "\\Z" not in problem["detail"]


async def test_a_bad_enum_lists_the_allowed_values(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(_doc())
    body = {"id": "t", "scope": "galaxy", "metric": "requests", "limit": 1, "window": "1m"}
    r = await client.post("/v1/rate-limits", json=body)
    assert r.status == 400
    problem = await r.json()
    assert problem["field"] == "scope"
    assert problem["detail"] == (
        "scope: 'galaxy' is not one of: organization, team, agent, workflow, user, run"
    )


@pytest.mark.parametrize(
    ("budget", "path", "words"),
    [
        ({"period": "hourly"}, "$.budgets[0].period",
         "'hourly' is not one of: daily, weekly, monthly, quarterly, yearly, total"),
        ({"on_exceed": "explode"}, "$.budgets[0].on_exceed",
         "'explode' is not one of: warn, block, downgrade"),
        ({"id": "has space"}, "$.budgets[0].id", "expected letters, digits and . _ ~ - only"),
        # A downgrade map on a budget that never downgrades: a mistake, named.
        ({"downgrade_to": {"gpt-4o": "gpt-4o-mini"}}, "$.budgets[0].downgrade_to",
         "applies only with on_exceed: downgrade (this budget's on_exceed is block): set "
         "on_exceed: downgrade, or remove it"),
        ({"on_exceed": "warn", "downgrade_to": {"gpt-4o": "gpt-4o-mini"}},
         "$.budgets[0].downgrade_to",
         "applies only with on_exceed: downgrade (this budget's on_exceed is warn): set "
         "on_exceed: downgrade, or remove it"),
    ],
)  # fmt: skip
def test_config_errors_name_the_field_in_words(
    budget: dict[str, Any], path: str, words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        config_mod.parse(_doc(**budget), "<doc>")
    assert (caught.value.path, caught.value.message) == (path, words)


def test_a_bad_role_and_secret_hash_are_described() -> None:
    doc = {"auth": {"clients": [{"client_id": "a", "role": "root"}]}}
    with pytest.raises(ConfigError) as caught:
        config_mod.parse(doc, "<doc>")
    assert caught.value.message == "'root' is not one of: admin, agent, read"
    doc = {"auth": {"clients": [{"client_id": "a", "secret_sha256": "abc"}]}}
    with pytest.raises(ConfigError) as caught:
        config_mod.parse(doc, "<doc>")
    assert "budget-sidecar hash-secret" in caught.value.message
