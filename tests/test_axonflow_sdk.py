"""The real AxonFlow SDK (axonflow 9.5.0, pinned) against a real sidecar process over a
real Redis: every cost-control call (budgets CRUD, status, alerts, check, usage, pricing)
and the gateway pair (pre-check, audit), with the async client and with AxonFlow.sync.
Telemetry is off (AXONFLOW_TELEMETRY=off): the SDK talks to nothing but the sidecar.

What the SDK cannot send (usage with a step, a price write, the status code of a create)
goes over plain HTTP to the same sidecar."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.harness import RedisServer, SidecarProcess, missing, sidecars

os.environ["AXONFLOW_TELEMETRY"] = "off"
os.environ.pop("AXONFLOW_TRY", None)
os.environ["NO_PROXY"] = "127.0.0.1,localhost"

try:
    from axonflow import AxonFlow
    from axonflow.exceptions import AxonFlowError, BudgetExceededError
    from axonflow.types import (
        BudgetCheckRequest,
        BudgetOnExceed,
        BudgetPeriod,
        BudgetScope,
        CreateBudgetRequest,
        ListBudgetsOptions,
        ListUsageRecordsOptions,
        TokenUsage,
        UpdateBudgetRequest,
    )

    HAVE_SDK = True
except ImportError:  # pragma: no cover - the dev extra installs it
    HAVE_SDK = False

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
CLAUDE = "anthropic.claude-3-sonnet-20240229-v1:0"
HEX32 = "0123456789abcdef"


def _require_sdk() -> None:
    if not HAVE_SDK:
        missing("the axonflow SDK (pip install -e '.[dev]')")


@pytest.fixture
def sidecar(
    redis_server: RedisServer, redis_client: Any, write_config: Callable[[dict[str, Any]], Path]
) -> Iterator[SidecarProcess]:
    _require_sdk()
    proc = SidecarProcess(redis_server.url, str(write_config(DOC))).start()
    try:
        yield proc
    finally:
        proc.cleanup()


# ---- plain HTTP, for what the SDK has no call for ----------------------------------------


def _http(sidecar: SidecarProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """(status, parsed JSON body or None) of one request; error statuses are returned."""
    request = urllib.request.Request(
        sidecar.url + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as err:
        with err:
            raw = err.read()
            return err.code, json.loads(raw) if raw else None


def _post_ok(sidecar: SidecarProcess, path: str, body: dict[str, Any]) -> Any:
    status, answer = _http(sidecar, "POST", path, body)
    assert status == 200, answer
    return answer


def _spend(sidecar: SidecarProcess, **fields: Any) -> None:
    """Charge spend after the fact (POST /v1/record)."""
    _post_ok(sidecar, "/v1/record", fields)


def _exhaust_team_a(sidecar: SidecarProcess) -> None:
    _spend(sidecar, team_id="team-a", cost_usd=0.5)


def _put_price(sidecar: SidecarProcess, provider: str, model: str, inp: float, out: float) -> None:
    body = {"provider": provider, "model": model,
            "pricing": {"input_per_1k": inp, "output_per_1k": out}}  # fmt: skip
    status, answer = _http(sidecar, "PUT", "/api/v1/pricing", body)
    assert (status, answer) == (200, body)


def _create_body(**overrides: Any) -> dict[str, Any]:
    """A create body as the SDK sends it (wire contract §2.1)."""
    body = {"id": "team-c", "name": "Team C", "scope": "team", "limit_usd": 2.0,
            "period": "monthly", "on_exceed": "block", "alert_thresholds": [],
            "scope_id": "team-c"}  # fmt: skip
    return {**body, **overrides}


def _team_c_request(**overrides: Any) -> CreateBudgetRequest:
    return CreateBudgetRequest(**{**_create_body(), **overrides})


def _gpt4o_usage(prompt: int = 1000, completion: int = 500) -> TokenUsage:
    return TokenUsage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _poll(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    """True once `predicate()` is; False if it never was within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


# ---- the existing read calls ---------------------------------------------------------------


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
        # The config file's two, then the bundled catalogue's (parsed by the SDK's models).
        assert {(p.provider, p.model) for p in everything.pricing[:2]} == {
            ("openai", "gpt-4o"), ("anthropic", CLAUDE),
        }  # fmt: skip
        assert len(everything.pricing) > 1000
        one = await client.get_pricing(provider="openai", model="gpt-4o")
        assert [(p.pricing.input_per_1k, p.pricing.output_per_1k) for p in one.pricing] == [
            (0.0025, 0.01)
        ]
        colon = await client.get_pricing(provider="anthropic", model=CLAUDE)
        assert colon.pricing[0].pricing.output_per_1k == 0.015
        by_provider = await client.get_pricing(provider="openai")
        assert by_provider.pricing[0].model == "gpt-4o"
        assert "gpt-4o-mini" in {p.model for p in by_provider.pricing}
        assert {p.provider for p in by_provider.pricing} == {"openai"}


# ---- budgets: create, list, get, update, delete ---------------------------------------------


def test_create_answers_201_with_the_default_thresholds(sidecar: SidecarProcess) -> None:
    status, body = _http(sidecar, "POST", "/api/v1/budgets", _create_body())
    assert status == 201
    assert body["alert_thresholds"] == [50, 80, 100] and body["source"] == "api"
    status, _ = _http(sidecar, "POST", "/api/v1/budgets", _create_body())
    assert status == 409


async def test_async_create_list_get_update_delete(sidecar: SidecarProcess) -> None:
    async with AxonFlow(endpoint=sidecar.url) as client:
        created = await client.create_budget(_team_c_request())
        assert (created.id, created.name, created.scope, created.scope_id) == (
            "team-c", "Team C", "team", "team-c"
        )  # fmt: skip
        assert (created.limit_usd, created.period, created.on_exceed) == (2.0, "monthly", "block")
        assert created.alert_thresholds == [50, 80, 100] and created.enabled is True
        assert created.created_at is not None and created.created_at == created.updated_at
        assert created.created_at.endswith("Z")

        assert await client.get_budget("team-c") == created

        listed = await client.list_budgets()
        assert listed.total == 4
        assert [b.id for b in listed.budgets] == ["org-monthly", "team-a", "team-b", "team-c"]
        teams = await client.list_budgets(ListBudgetsOptions(scope=BudgetScope.TEAM))
        assert teams.total == 3 and [b.id for b in teams.budgets] == ["team-a", "team-b", "team-c"]
        page = await client.list_budgets(
            ListBudgetsOptions(scope=BudgetScope.TEAM, limit=2, offset=1)
        )
        assert page.total == 3 and [b.id for b in page.budgets] == ["team-b", "team-c"]
        orgs = await client.list_budgets(ListBudgetsOptions(scope=BudgetScope.ORGANIZATION))
        assert orgs.total == 1 and [b.id for b in orgs.budgets] == ["org-monthly"]
        none = await client.list_budgets(ListBudgetsOptions(scope=BudgetScope.USER))
        assert (none.total, none.budgets) == (0, [])

        # Only the fields given change; an empty alert_thresholds means unchanged.
        raised = await client.update_budget("team-c", UpdateBudgetRequest(limit_usd=3.5))
        assert (raised.name, raised.limit_usd, raised.on_exceed) == ("Team C", 3.5, "block")
        assert raised.alert_thresholds == [50, 80, 100]
        assert raised.created_at == created.created_at
        renamed = await client.update_budget(
            "team-c",
            UpdateBudgetRequest(name="Team C2", on_exceed=BudgetOnExceed.WARN, alert_thresholds=[]),
        )
        assert (renamed.name, renamed.limit_usd, renamed.on_exceed) == ("Team C2", 3.5, "warn")
        assert renamed.alert_thresholds == [50, 80, 100]
        unchanged = await client.update_budget("team-c", UpdateBudgetRequest())
        assert (unchanged.name, unchanged.limit_usd, unchanged.on_exceed) == (
            "Team C2", 3.5, "warn"
        )  # fmt: skip
        rethreshold = await client.update_budget(
            "team-c", UpdateBudgetRequest(alert_thresholds=[90, 75])
        )
        assert rethreshold.alert_thresholds == [75, 90] and rethreshold.name == "Team C2"
        fetched = await client.get_budget("team-c")
        assert (fetched.name, fetched.limit_usd, fetched.on_exceed, fetched.alert_thresholds) == (
            "Team C2", 3.5, "warn", [75, 90]
        )  # fmt: skip
        assert (fetched.scope, fetched.scope_id, fetched.period) == ("team", "team-c", "monthly")

        await client.delete_budget("team-c")  # 204
        for call in (
            client.get_budget("team-c"),
            client.delete_budget("team-c"),
            client.update_budget("team-c", UpdateBudgetRequest(limit_usd=1.0)),
            client.get_budget_status("team-c"),
            client.get_budget_alerts("team-c"),
        ):
            with pytest.raises(AxonFlowError) as err:
                await call
            assert str(err.value).startswith("HTTP 404: ")
        assert (await client.list_budgets()).total == 3


async def test_async_config_budgets_are_read_only_and_ids_unique(sidecar: SidecarProcess) -> None:
    async with AxonFlow(endpoint=sidecar.url) as client:
        with pytest.raises(AxonFlowError) as err:
            await client.update_budget("team-b", UpdateBudgetRequest(limit_usd=50.0))
        assert str(err.value).startswith("HTTP 409: ")
        with pytest.raises(AxonFlowError) as err:
            await client.delete_budget("org-monthly")
        assert str(err.value).startswith("HTTP 409: ")
        with pytest.raises(AxonFlowError) as err:
            await client.create_budget(_team_c_request(id="team-a"))
        assert str(err.value).startswith("HTTP 409: ")

        await client.create_budget(_team_c_request())
        with pytest.raises(AxonFlowError) as err:
            await client.create_budget(_team_c_request(name="Other", limit_usd=9.0))
        assert str(err.value).startswith("HTTP 409: ")

        # None of the refused writes changed anything.
        assert (await client.get_budget("team-b")).limit_usd == 5.0
        assert (await client.get_budget("team-a")).name == "Team A"
        assert (await client.get_budget("team-c")).limit_usd == 2.0
        assert (await client.list_budgets()).total == 4


async def test_async_created_budget_is_enforced(sidecar: SidecarProcess) -> None:
    async with AxonFlow(endpoint=sidecar.url) as client:
        await client.create_budget(_team_c_request(limit_usd=0.05, period=BudgetPeriod.DAILY))
        team_c = BudgetCheckRequest(team_id="team-c")
        assert (await client.check_budget(team_c)).allowed is True
        approved = await client.pre_check("", "hello", context={"team_id": "team-c"})
        assert approved.approved is True
        # Release that hold: only the recorded spend counts below.
        _post_ok(sidecar, "/v1/release", {"reservation_id": approved.context_id})

        _spend(sidecar, team_id="team-c", cost_usd=0.05)
        status = await client.get_budget_status("team-c")
        assert (status.used_usd, status.remaining_usd, status.percentage) == (0.05, 0.0, 100.0)
        assert status.is_exceeded is True and status.is_blocked is True

        denied = await client.check_budget(team_c)
        assert (denied.allowed, denied.action) == (False, "block")
        assert denied.message == "Budget 'Team C' exceeded - requests blocked"
        assert [b.id for b in denied.budgets or []] == ["org-monthly", "team-c"]
        with pytest.raises(BudgetExceededError) as err:
            await client.pre_check("", "hello", context={"team_id": "team-c"})
        assert (err.value.budget_id, err.value.used_usd, err.value.limit_usd) == (
            "team-c", 0.05, 0.05
        )  # fmt: skip
        authorize = _post_ok(sidecar, "/v1/authorize", {"team_id": "team-c", "estimated_usd": 0.01})
        assert (authorize["allowed"], authorize["budget_info"]["budget_id"]) == (False, "team-c")

        # Another team is not covered by it; raising the limit lets team-c through again.
        assert (await client.check_budget(BudgetCheckRequest(team_id="team-d"))).allowed is True
        await client.update_budget("team-c", UpdateBudgetRequest(limit_usd=1.0))
        assert (await client.check_budget(team_c)).allowed is True


# ---- status and alerts ------------------------------------------------------------------------


async def test_async_alerts_after_crossing_50_and_80_percent(sidecar: SidecarProcess) -> None:
    async with AxonFlow(endpoint=sidecar.url) as client:
        await client.create_budget(_team_c_request())  # 2.00 USD, thresholds 50/80/100
        assert (await client.get_budget_alerts("team-c")).count == 0

        _spend(sidecar, team_id="team-c", cost_usd=0.9)  # 45%: no threshold yet
        none_yet = await client.get_budget_alerts("team-c")
        assert (none_yet.count, none_yet.alerts) == (0, [])
        _spend(sidecar, team_id="team-c", cost_usd=0.3)  # 60%: crosses 50
        _spend(sidecar, team_id="team-c", cost_usd=0.5)  # 85%: crosses 80
        _spend(sidecar, team_id="team-c", cost_usd=0.1)  # 90%: crosses nothing new

        status = await client.get_budget_status("team-c")
        assert (status.used_usd, status.remaining_usd, status.percentage) == (1.8, 0.2, 90.0)
        assert status.is_exceeded is False and status.is_blocked is False

        answer = await client.get_budget_alerts("team-c")
        assert answer.count == 2
        alerts = answer.alerts or []
        assert [a.threshold for a in alerts] == [80, 50]  # newest first
        assert [(a.percentage_reached, a.amount_usd) for a in alerts] == [(85.0, 1.7), (60.0, 1.2)]
        assert {a.budget_id for a in alerts} == {"team-c"}
        assert {a.alert_type for a in alerts} == {"threshold_reached"}
        assert [a.message for a in alerts] == [
            "Budget 'Team C' 80% reached (team-c)", "Budget 'Team C' 50% reached (team-c)"
        ]  # fmt: skip
        assert len({a.id for a in alerts}) == 2
        assert all(isinstance(a.id, str) and a.id.endswith(f"/{a.threshold}") for a in alerts)
        assert all(a.created_at.endswith("Z") and a.acknowledged is False for a in alerts)

        # The org budget the same spend counted towards (1.80 of 100) crossed nothing.
        assert (await client.get_budget_alerts("org-monthly")).count == 0
        assert (await client.get_budget_status("org-monthly")).used_usd == 1.8


# ---- usage: summary, breakdown, records -------------------------------------------------------

# Three calls, each through a different path to the ledger:
#   plan   /v1/record            openai gpt-4o  1000 in  500 out  0.0075
#   draft  /v1/authorize+settle  anthropic      2000 in 1000 out  0.021
#   review SDK pre-check+audit   openai gpt-4o  4000 in 1000 out  0.02
USAGE_TOTAL = 0.0485


async def _make_usage(sidecar: SidecarProcess, client: AxonFlow) -> None:
    _spend(
        sidecar, provider="openai", model="gpt-4o", tokens_in=1000, tokens_out=500,
        team_id="t1", agent_id="a1", user_id="u2", workflow_id="wf1", step_id="plan",
        run_id="run-1", latency_ms=120,
    )  # fmt: skip
    held = _post_ok(sidecar, "/v1/authorize", {
        "provider": "anthropic", "model": CLAUDE, "estimated_tokens_in": 2000,
        "estimated_tokens_out": 1000, "team_id": "t1", "agent_id": "a2", "user_id": "u1",
        "workflow_id": "wf2", "step_id": "draft", "run_id": "run-1",
    })  # fmt: skip
    assert held["allowed"] is True
    settled = _post_ok(sidecar, "/v1/settle", {
        "reservation_id": held["reservation_id"], "tokens_in": 2000, "tokens_out": 1000,
        "latency_ms": 900,
    })  # fmt: skip
    assert settled["cost_usd"] == 0.021
    ctx = await client.pre_check("", "review it", context={
        "team_id": "t2", "agent_id": "a2", "user_id": "u1", "workflow_id": "wf1",
        "step_id": "review", "run_id": "run-1", "provider": "openai", "model": "gpt-4o",
    })  # fmt: skip
    audit = await client.audit_llm_call(
        ctx.context_id, "ok", "openai", "gpt-4o", _gpt4o_usage(4000, 1000), 300
    )
    assert audit.success is True


def _groups(breakdown: Any) -> dict[str, tuple[float, int, int, int]]:
    return {
        i.group_value: (i.cost_usd, i.request_count, i.tokens_in, i.tokens_out)
        for i in breakdown.items or []
    }


async def test_async_usage_summary_and_breakdown(sidecar: SidecarProcess) -> None:
    async with AxonFlow(endpoint=sidecar.url) as client:
        empty = await client.get_usage_summary()
        assert (empty.total_cost_usd, empty.total_requests, empty.period) == (0.0, 0, "monthly")

        await _make_usage(sidecar, client)

        for period in (None, "daily", "monthly", "yearly"):
            summary = await client.get_usage_summary(period)
            assert (summary.total_cost_usd, summary.total_requests) == (USAGE_TOTAL, 3)
            assert (summary.total_tokens_in, summary.total_tokens_out) == (7000, 2500)
            assert summary.average_cost_per_request == 0.016166  # 48500 µUSD // 3
            assert summary.period == (period or "monthly")
            assert summary.period_start < summary.period_end

        expected: dict[str, dict[str, tuple[float, int, int, int]]] = {
            "provider": {"openai": (0.0275, 2, 5000, 1500), "anthropic": (0.021, 1, 2000, 1000)},
            "model": {"gpt-4o": (0.0275, 2, 5000, 1500), CLAUDE: (0.021, 1, 2000, 1000)},
            "team": {"t1": (0.0285, 2, 3000, 1500), "t2": (0.02, 1, 4000, 1000)},
            "agent": {"a2": (0.041, 2, 6000, 2000), "a1": (0.0075, 1, 1000, 500)},
            "user": {"u1": (0.041, 2, 6000, 2000), "u2": (0.0075, 1, 1000, 500)},
            "workflow": {"wf1": (0.0275, 2, 5000, 1500), "wf2": (0.021, 1, 2000, 1000)},
            "step": {
                "draft": (0.021, 1, 2000, 1000),
                "review": (0.02, 1, 4000, 1000),
                "plan": (0.0075, 1, 1000, 500),
            },
        }
        for group_by, groups in expected.items():
            breakdown = await client.get_usage_breakdown(group_by)
            assert (breakdown.group_by, breakdown.total_cost_usd) == (group_by, USAGE_TOTAL)
            assert breakdown.period == "monthly"
            assert _groups(breakdown) == groups, group_by
            # Most expensive first.
            assert [i.group_value for i in breakdown.items or []] == list(groups), group_by
            assert {i.group_by for i in breakdown.items or []} == {group_by}

        by_provider = await client.get_usage_breakdown("provider", "daily")
        assert [i.percentage for i in by_provider.items or []] == [56.701, 43.299]
        assert by_provider.period == "daily"

        with pytest.raises(AxonFlowError) as err:
            await client.get_usage_breakdown("colour")
        assert str(err.value).startswith("HTTP 400: ")


async def test_async_usage_records_filtered_and_paged(sidecar: SidecarProcess) -> None:
    async with AxonFlow(endpoint=sidecar.url) as client:
        await _make_usage(sidecar, client)

        everything = await client.list_usage_records()
        assert everything.total == 3
        records = everything.records or []
        # Newest first: review, draft, plan.
        assert [(r.provider, r.model, r.tokens_in, r.tokens_out, r.cost_usd, r.latency_ms)
                for r in records] == [
            ("openai", "gpt-4o", 4000, 1000, 0.02, 300),
            ("anthropic", CLAUDE, 2000, 1000, 0.021, 900),
            ("openai", "gpt-4o", 1000, 500, 0.0075, 120),
        ]  # fmt: skip
        assert [(r.team_id, r.agent_id, r.user_id, r.workflow_id) for r in records] == [
            ("t2", "a2", "u1", "wf1"), ("t1", "a2", "u1", "wf2"), ("t1", "a1", "u2", "wf1")
        ]  # fmt: skip
        assert all(r.success is True and r.org_id == "default" for r in records)
        assert all(r.created_at is not None and r.created_at.endswith("Z") for r in records)
        assert len({r.id for r in records}) == 3

        openai = await client.list_usage_records(ListUsageRecordsOptions(provider="openai"))
        assert openai.total == 2 and [r.tokens_in for r in openai.records or []] == [4000, 1000]
        claude = await client.list_usage_records(ListUsageRecordsOptions(model=CLAUDE))
        assert claude.total == 1 and [r.cost_usd for r in claude.records or []] == [0.021]
        both = await client.list_usage_records(
            ListUsageRecordsOptions(provider="anthropic", model=CLAUDE)
        )
        assert both.total == 1 and [r.latency_ms for r in both.records or []] == [900]
        mismatch = await client.list_usage_records(
            ListUsageRecordsOptions(provider="openai", model=CLAUDE)
        )
        assert (mismatch.total, mismatch.records) == (0, [])

        page = await client.list_usage_records(ListUsageRecordsOptions(limit=1, offset=1))
        assert page.total == 3 and [r.id for r in page.records or []] == [records[1].id]
        tail = await client.list_usage_records(ListUsageRecordsOptions(limit=2, offset=2))
        assert tail.total == 3 and [r.id for r in tail.records or []] == [records[2].id]
        past = await client.list_usage_records(ListUsageRecordsOptions(limit=5, offset=3))
        assert (past.total, past.records) == (3, [])
        filtered_page = await client.list_usage_records(
            ListUsageRecordsOptions(provider="openai", limit=1, offset=1)
        )
        assert filtered_page.total == 2
        assert [r.id for r in filtered_page.records or []] == [records[2].id]


# ---- pricing ----------------------------------------------------------------------------------


async def test_async_pricing_written_over_http_is_read_and_charged(
    sidecar: SidecarProcess,
) -> None:
    async with AxonFlow(endpoint=sidecar.url) as client:
        with pytest.raises(AxonFlowError) as err:
            await client.get_pricing(provider="openai", model="gpt-9-unknown")
        assert str(err.value).startswith("HTTP 404: ")

        _put_price(sidecar, "openai", "gpt-4o-mini", 0.00015, 0.0006)
        _put_price(sidecar, "openai", "gpt-4o", 0.005, 0.02)  # replaces the file's price

        everything = await client.get_pricing()
        assert {(p.provider, p.model, p.pricing.input_per_1k, p.pricing.output_per_1k)
                for p in everything.pricing[:3]} == {
            ("openai", "gpt-4o", 0.005, 0.02),
            ("openai", "gpt-4o-mini", 0.00015, 0.0006),
            ("anthropic", CLAUDE, 0.003, 0.015),
        }  # fmt: skip
        # Each price once: the API's override the catalogue's for the same model.
        pairs = [(p.provider, p.model) for p in everything.pricing]
        assert len(pairs) == len(set(pairs))
        openai = await client.get_pricing(provider="openai")
        assert [p.model for p in openai.pricing[:2]] == ["gpt-4o", "gpt-4o-mini"]
        mini = await client.get_pricing(provider="openai", model="gpt-4o-mini")
        assert [(p.pricing.input_per_1k, p.pricing.output_per_1k) for p in mini.pricing] == [
            (0.00015, 0.0006)
        ]

        ctx = await client.pre_check("", "q", context={"team_id": "team-b"})
        await client.audit_llm_call(ctx.context_id, "ok", "openai", "gpt-4o", _gpt4o_usage(), 10)
        ctx = await client.pre_check("", "q", context={"team_id": "team-b"})
        await client.audit_llm_call(
            ctx.context_id, "ok", "openai", "gpt-4o-mini", _gpt4o_usage(), 10
        )
        records = (await client.list_usage_records()).records or []
        # 1000 in + 500 out at the new prices: 0.005 + 0.01, and 0.00015 + 0.0003.
        assert [(r.model, r.cost_usd) for r in records] == [
            ("gpt-4o-mini", 0.00045), ("gpt-4o", 0.015)
        ]  # fmt: skip
        assert (await client.get_budget_status("team-b")).used_usd == 0.01545

        # Dropping the written gpt-4o price brings the file's back.
        assert _http(sidecar, "DELETE", "/api/v1/pricing?provider=openai&model=gpt-4o") == (
            204, None
        )  # fmt: skip
        back = await client.get_pricing(provider="openai", model="gpt-4o")
        assert back.pricing[0].pricing.input_per_1k == 0.0025


# ---- gateway mode: pre-check and audit --------------------------------------------------------


async def test_async_pre_check_approves_with_identity_and_raises_budget_exceeded(
    sidecar: SidecarProcess,
) -> None:
    context = {"org_id": "org-1", "team_id": "team-a", "agent_id": "agent-1", "user_id": "u1",
               "workflow_id": "wf-1", "provider": "openai", "model": "gpt-4o"}  # fmt: skip
    async with AxonFlow(endpoint=sidecar.url) as client:
        approved = await client.pre_check("", "hello", context=context)
        assert approved.approved is True and approved.block_reason is None
        assert len(approved.context_id) == 32 and set(approved.context_id) <= set(HEX32)
        assert approved.expires_at > datetime.now(UTC)
        await client.audit_llm_call(
            approved.context_id, "ok", "openai", "gpt-4o", _gpt4o_usage(), 42
        )
        (record,) = (await client.list_usage_records()).records or []
        assert (record.org_id, record.team_id, record.agent_id, record.workflow_id) == (
            "org-1", "team-a", "agent-1", "wf-1"
        )  # fmt: skip
        assert (record.user_id, record.provider, record.model) == ("u1", "openai", "gpt-4o")
        assert (record.cost_usd, record.latency_ms) == (0.0075, 42)

        _spend(sidecar, team_id="team-a", cost_usd=0.4925)  # team-a now at its 0.50 limit
        with pytest.raises(BudgetExceededError) as err:
            await client.pre_check("", "hello", context=context)
        e = err.value
        assert (e.budget_id, e.budget_name, e.used_usd, e.limit_usd, e.action) == (
            "team-a", "Team A", 0.5, 0.5, "block"
        )  # fmt: skip
        assert e.message == "Budget 'Team A' exceeded - requests blocked"
        # A warn budget that is exceeded does not deny.
        _spend(sidecar, team_id="team-b", cost_usd=6.0)
        warned = await client.pre_check("", "hello", context={"team_id": "team-b"})
        assert warned.approved is True


async def test_async_audit_sent_twice_charges_once(sidecar: SidecarProcess) -> None:
    async with AxonFlow(endpoint=sidecar.url) as client:
        ctx = await client.pre_check("", "q", context={"team_id": "team-b"})
        held = await client.get_budget_status("team-b")
        # The pre-check holds settings.pre_check_estimate_usd (0.01): not spent yet, but
        # committed, so it counts in the percentage.
        assert (held.used_usd, held.percentage) == (0.0, 0.2)

        first = await client.audit_llm_call(
            ctx.context_id, "ok", "openai", "gpt-4o", _gpt4o_usage(), 250
        )
        again = await client.audit_llm_call(
            ctx.context_id, "ok", "openai", "gpt-4o", _gpt4o_usage(), 250
        )
        assert (first.success, first.audit_id) == (True, ctx.context_id)
        assert (again.success, again.audit_id) == (True, ctx.context_id)

        # 1000 prompt + 500 completion tokens of gpt-4o at 0.0025/0.01 per 1k = 0.0075.
        assert (await client.get_budget_status("team-b")).used_usd == 0.0075
        assert (await client.get_budget_status("org-monthly")).used_usd == 0.0075
        usage = await client.list_usage_records()
        assert usage.total == 1
        assert [(r.tokens_in, r.tokens_out, r.cost_usd, r.latency_ms)
                for r in usage.records or []] == [(1000, 500, 0.0075, 250)]  # fmt: skip
        summary = await client.get_usage_summary()
        assert (summary.total_requests, summary.total_cost_usd) == (1, 0.0075)

        with pytest.raises(AxonFlowError) as err:
            await client.audit_llm_call("f" * 32, "ok", "openai", "gpt-4o", _gpt4o_usage(), 1)
        assert str(err.value).startswith("HTTP 404: ")


# ---- the sync wrapper -------------------------------------------------------------------------


def test_sync_client_every_call(sidecar: SidecarProcess) -> None:
    """AxonFlow.sync outside any event loop: every call the async tests make."""
    with AxonFlow.sync(sidecar.url) as client:
        created = client.create_budget(_team_c_request(limit_usd=0.02, period=BudgetPeriod.DAILY))
        assert created.alert_thresholds == [50, 80, 100]
        assert client.list_budgets().total == 4
        page = client.list_budgets(ListBudgetsOptions(scope=BudgetScope.TEAM, limit=1, offset=2))
        assert page.total == 3 and [b.id for b in page.budgets] == ["team-c"]
        assert client.get_budget("team-c") == created
        updated = client.update_budget("team-c", UpdateBudgetRequest(name="C", alert_thresholds=[]))
        assert (updated.name, updated.limit_usd, updated.alert_thresholds) == (
            "C", 0.02, [50, 80, 100]
        )  # fmt: skip
        with pytest.raises(AxonFlowError) as err:
            client.delete_budget("team-a")
        assert str(err.value).startswith("HTTP 409: ")

        assert client.check_budget(BudgetCheckRequest(team_id="team-c")).allowed is True
        ctx = client.pre_check("", "q", context={"team_id": "team-c", "agent_id": "ag"})
        assert ctx.approved is True
        for _ in range(2):
            audit = client.audit_llm_call(
                ctx.context_id, "ok", "openai", "gpt-4o", _gpt4o_usage(2000, 1000), 5
            )
            assert (audit.success, audit.audit_id) == (True, ctx.context_id)
        # 2000 in + 1000 out of gpt-4o = 0.005 + 0.01 = 0.015: 75% of 0.02.
        status = client.get_budget_status("team-c")
        assert (status.used_usd, status.percentage, status.is_exceeded) == (0.015, 75.0, False)
        assert [a.threshold for a in client.get_budget_alerts("team-c").alerts or []] == [50]

        _spend(sidecar, team_id="team-c", cost_usd=0.005)
        denied = client.check_budget(BudgetCheckRequest(team_id="team-c"))
        assert (denied.allowed, denied.action) == (False, "block")
        assert [a.threshold for a in client.get_budget_alerts("team-c").alerts or []] == [
            100, 80, 50
        ]  # fmt: skip
        with pytest.raises(BudgetExceededError) as exceeded:
            client.pre_check("", "q", context={"team_id": "team-c"})
        assert (exceeded.value.budget_id, exceeded.value.budget_name) == ("team-c", "C")
        assert (exceeded.value.used_usd, exceeded.value.limit_usd) == (0.02, 0.02)
        assert exceeded.value.action == "block"

        summary = client.get_usage_summary("daily")
        assert (summary.total_requests, summary.total_cost_usd) == (2, 0.02)
        by_team = client.get_usage_breakdown("team", "monthly")
        assert _groups(by_team) == {"team-c": (0.02, 2, 2000, 1000)}
        records = client.list_usage_records(ListUsageRecordsOptions(provider="openai"))
        assert records.total == 1
        assert [(r.model, r.cost_usd) for r in records.records or []] == [("gpt-4o", 0.015)]
        assert client.list_usage_records(ListUsageRecordsOptions(limit=1)).total == 2

        assert len(client.get_pricing().pricing) > 1000  # the file's two and the catalogue
        colon = client.get_pricing(provider="anthropic", model=CLAUDE)
        assert [p.pricing.input_per_1k for p in colon.pricing] == [0.003]

        client.delete_budget("team-c")
        assert client.list_budgets().total == 3


# ---- replicas ---------------------------------------------------------------------------------


def test_second_replica_enforces_a_budget_created_through_the_first(
    redis_server: RedisServer, redis_client: Any, write_config: Callable[[dict[str, Any]], Path]
) -> None:
    _require_sdk()
    with (
        sidecars(redis_server.url, str(write_config(DOC)), 2) as (first, second),
        AxonFlow.sync(first.url) as one,
        AxonFlow.sync(second.url) as two,
    ):
        context = {"team_id": "team-r"}
        ctx = two.pre_check("", "q", context=context)  # no budget for team-r yet
        _post_ok(second, "/v1/release", {"reservation_id": ctx.context_id})

        one.create_budget(_team_c_request(id="team-r", name="Team R", scope_id="team-r",
                                          limit_usd=0.1))  # fmt: skip
        _spend(first, team_id="team-r", cost_usd=0.1)

        def second_denies() -> bool:
            try:
                approved = two.pre_check("", "q", context=context)
            except BudgetExceededError:
                return True
            _post_ok(second, "/v1/release", {"reservation_id": approved.context_id})
            return False

        assert _poll(second_denies), "the second replica never enforced the new budget"
        assert two.get_budget("team-r").name == "Team R"
        with pytest.raises(BudgetExceededError) as err:
            two.pre_check("", "q", context=context)
        assert (err.value.budget_id, err.value.used_usd, err.value.limit_usd) == (
            "team-r", 0.1, 0.1
        )  # fmt: skip
        assert two.check_budget(BudgetCheckRequest(team_id="team-r")).allowed is False

        # A delete through the first replica lifts it on the second the same way.
        one.delete_budget("team-r")
        assert _poll(lambda: two.check_budget(BudgetCheckRequest(team_id="team-r")).allowed)
        with pytest.raises(AxonFlowError) as gone:
            two.get_budget("team-r")
        assert str(gone.value).startswith("HTTP 404: ")
