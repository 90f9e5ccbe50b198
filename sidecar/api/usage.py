"""The AxonFlow SDK's usage routes: summary, breakdown and records of the usage ledger
(sidecar.ledger), for the caller's tenant only."""

from __future__ import annotations

import msgspec
from aiohttp import web

from sidecar import ledger
from sidecar.api.auth import require, tenant_of
from sidecar.api.axonflow import int_query, json_response, raw_query
from sidecar.api.problems import ProblemError
from sidecar.auth import Role
from sidecar.engine import Engine
from sidecar.model import Period
from sidecar.money import micro_to_usd
from sidecar.periods import iso


class UsageSummary(msgspec.Struct, kw_only=True):
    total_cost_usd: float
    total_requests: int
    total_tokens_in: int
    total_tokens_out: int
    average_cost_per_request: float
    period: str
    period_start: str
    period_end: str


class BreakdownItem(msgspec.Struct, kw_only=True):
    group_by: str
    group_value: str
    cost_usd: float
    percentage: float
    request_count: int
    tokens_in: int
    tokens_out: int


class UsageBreakdown(msgspec.Struct, kw_only=True):
    group_by: str
    total_cost_usd: float
    items: list[BreakdownItem]
    period: str
    period_start: str
    period_end: str


class UsageRecords(msgspec.Struct, kw_only=True):
    records: list[ledger.UsageRecord]
    total: int


# Usage summaries cover calendar windows; "total" is a budget's, not a ledger's, period.
_USAGE_PERIODS = tuple(p for p in Period if p is not Period.TOTAL)


def _period(request: web.Request) -> Period:
    raw = raw_query(request).get("period") or Period.MONTHLY.value
    if raw not in _USAGE_PERIODS:
        words = ", ".join(_USAGE_PERIODS)
        raise ProblemError(400, f"period: one of {words}", field="period")
    return Period(raw)


def add_routes(app: web.Application, engine_key: web.AppKey[Engine]) -> None:
    async def summary(request: web.Request) -> web.Response:
        require(request, Role.READ)
        period = _period(request)
        engine = request.app[engine_key]
        usage = await ledger.period_usage(
            engine.store_client, tenant_of(request), period, engine.now_ms()
        )
        t = usage.total
        return json_response(
            UsageSummary(
                total_cost_usd=micro_to_usd(t.cost_micro),
                total_requests=t.requests,
                total_tokens_in=t.tokens_in,
                total_tokens_out=t.tokens_out,
                average_cost_per_request=(
                    micro_to_usd(t.cost_micro // t.requests) if t.requests else 0.0
                ),
                period=period,
                period_start=iso(usage.window.start_ms),
                period_end=iso(usage.window.end_ms),
            )
        )

    async def breakdown(request: web.Request) -> web.Response:
        require(request, Role.READ)
        group_by = raw_query(request).get("group_by")
        if group_by not in ledger.GROUP_BY:
            raise ProblemError(
                400, f"group_by: one of {', '.join(ledger.GROUP_BY)}", field="group_by"
            )
        period = _period(request)
        engine = request.app[engine_key]
        usage = await ledger.period_usage(
            engine.store_client, tenant_of(request), period, engine.now_ms()
        )
        total = usage.total.cost_micro
        groups = sorted(
            usage.grouped(ledger.GROUP_BY[group_by]).items(),
            key=lambda kv: (-kv[1].cost_micro, kv[0]),
        )
        items = [
            BreakdownItem(
                group_by=group_by,
                group_value=value,
                cost_usd=micro_to_usd(t.cost_micro),
                percentage=round(100 * t.cost_micro / total, 4) if total else 0.0,
                request_count=t.requests,
                tokens_in=t.tokens_in,
                tokens_out=t.tokens_out,
            )
            for value, t in groups
        ]
        return json_response(
            UsageBreakdown(
                group_by=group_by,
                total_cost_usd=micro_to_usd(total),
                items=items,
                period=period,
                period_start=iso(usage.window.start_ms),
                period_end=iso(usage.window.end_ms),
            )
        )

    async def records(request: web.Request) -> web.Response:
        require(request, Role.READ)
        query = raw_query(request)
        limit = int_query(request, "limit", 50, 1, 100)
        offset = int_query(request, "offset", 0, 0, 100_000_000)
        engine = request.app[engine_key]
        page, total = await ledger.records(
            engine.store_client,
            tenant_of(request),
            limit=limit,
            offset=offset,
            provider=query.get("provider") or None,
            model=query.get("model") or None,
        )
        return json_response(UsageRecords(records=page, total=total))

    app.router.add_get("/api/v1/usage", summary)
    app.router.add_get("/api/v1/usage/breakdown", breakdown)
    app.router.add_get("/api/v1/usage/records", records)
