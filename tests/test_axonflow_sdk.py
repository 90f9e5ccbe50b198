"""The real AxonFlow SDK (axonflow 9.5.0, pinned) against a real sidecar: the read-only
cost-control calls work unchanged, with the async client and with AxonFlow.sync.
Telemetry is off (AXONFLOW_TELEMETRY=off): the SDK talks to nothing but the sidecar."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import RedisServer, SidecarProcess, missing

os.environ["AXONFLOW_TELEMETRY"] = "off"
os.environ.pop("AXONFLOW_TRY", None)
os.environ["NO_PROXY"] = "127.0.0.1,localhost"

try:
    import axonflow
    from axonflow import AxonFlow
    from axonflow.exceptions import AxonFlowError
    from axonflow.types import BudgetCheckRequest, BudgetScope, ListBudgetsOptions
except ImportError:  # pragma: no cover - the dev extra installs it
    axonflow = None

DOC: dict[str, Any] = {
    "budgets": [
        {"id": "org-monthly", "name": "Monthly Budget", "scope": "organization",
         "limit_usd": 100, "period": "monthly", "alert_thresholds": [50, 80, 100]},
        {"id": "team-a", "name": "Team A", "scope": "team", "scope_id": "team-a",
         "limit_usd": 0.5, "period": "daily", "on_exceed": "block"},
        {"id": "team-b", "name": "Team B", "scope": "team", "scope_id": "team-b",
         "limit_usd": 5, "period": "weekly", "on_exceed": "warn"},
    ],
    "pricing": [
        {"provider": "openai", "model": "gpt-4o", "input_per_1k": 0.0025, "output_per_1k": 0.01},
        {"provider": "anthropic", "model": "anthropic.claude-3-sonnet-20240229-v1:0",
         "input_per_1k": 0.003, "output_per_1k": 0.015},
    ],
}  # fmt: skip


@pytest.fixture
def sidecar(
    redis_server: RedisServer, redis_client: Any, write_config: Callable[[dict[str, Any]], Path]
) -> Iterator[SidecarProcess]:
    if axonflow is None:
        missing("the axonflow SDK (pip install -e '.[dev]')")
    proc = SidecarProcess(redis_server.url, str(write_config(DOC))).start()
    try:
        yield proc
    finally:
        proc.cleanup()


def _exhaust_team_a(sidecar: SidecarProcess) -> None:
    import json
    import urllib.request

    request = urllib.request.Request(
        sidecar.url + "/v1/record",
        data=json.dumps({"team_id": "team-a", "cost_usd": 0.5}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as r:
        assert r.status == 200


async def test_async_client_reads_budgets_status_check_and_pricing(
    sidecar: SidecarProcess,
) -> None:
    async with AxonFlow(endpoint=sidecar.url) as client:
        listed = await client.list_budgets()
        assert listed.total == 3 and [b.id for b in listed.budgets] == [
            "org-monthly", "team-a", "team-b"
        ]  # fmt: skip
        page = await client.list_budgets(
            ListBudgetsOptions(scope=BudgetScope.TEAM, limit=1, offset=1)
        )
        assert page.total == 2 and [b.id for b in page.budgets] == ["team-b"]

        budget = await client.get_budget("org-monthly")
        assert (budget.name, budget.limit_usd, budget.period, budget.on_exceed) == (
            "Monthly Budget", 100.0, "monthly", "block"
        )  # fmt: skip
        assert budget.alert_thresholds == [50, 80, 100] and budget.enabled is True
        with pytest.raises(AxonFlowError) as err:
            await client.get_budget("nope")
        assert "404" in str(err.value)

        _exhaust_team_a(sidecar)
        status = await client.get_budget_status("team-a")
        assert (status.used_usd, status.remaining_usd, status.percentage) == (0.5, 0.0, 100.0)
        assert status.is_exceeded and status.is_blocked
        assert status.period_start.endswith("Z") and status.period_end.endswith("Z")

        allowed = await client.check_budget(BudgetCheckRequest(team_id="team-b"))
        assert allowed.allowed is True
        denied = await client.check_budget(BudgetCheckRequest(team_id="team-a"))
        assert denied.allowed is False and denied.action == "block"
        assert denied.message == "Budget 'Team A' exceeded - requests blocked"
        assert {b.id for b in denied.budgets or []} == {"org-monthly", "team-a"}

        everything = await client.get_pricing()
        assert {(p.provider, p.model) for p in everything.pricing} == {
            ("openai", "gpt-4o"), ("anthropic", "anthropic.claude-3-sonnet-20240229-v1:0"),
        }  # fmt: skip
        one = await client.get_pricing(provider="openai", model="gpt-4o")
        assert [(p.pricing.input_per_1k, p.pricing.output_per_1k) for p in one.pricing] == [
            (0.0025, 0.01)
        ]
        colon = await client.get_pricing(
            provider="anthropic", model="anthropic.claude-3-sonnet-20240229-v1:0"
        )
        assert colon.pricing[0].pricing.output_per_1k == 0.015
        by_provider = await client.get_pricing(provider="openai")
        assert [p.model for p in by_provider.pricing] == ["gpt-4o"]


def test_sync_client_does_the_same(sidecar: SidecarProcess) -> None:
    with AxonFlow.sync(sidecar.url) as client:
        assert client.list_budgets().total == 3
        assert client.get_budget("team-b").on_exceed == "warn"
        assert client.get_budget_status("team-b").used_usd == 0.0
        assert client.check_budget(BudgetCheckRequest()).allowed is True
        assert len(client.get_pricing().pricing) == 2
