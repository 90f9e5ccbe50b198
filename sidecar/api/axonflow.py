"""The AxonFlow SDK's cost-control routes (wire contract observed from axonflow 9.5.0,
../shared/reference/axonflow-sdk-wire-contract.md), read-only part: pricing, budget
list/get/status, and the pre-flight budget check.

Shapes follow the contract field by field: bare Budget objects, lists inside an object,
RFC 3339 strings for timestamps, never null where the SDK types a list or a number, and a
denial from /budgets/check as 200 with `allowed: false`. Budgets are the config file's
(read-only through this API). Errors are problem+json (the SDK surfaces any non-2xx as
`AxonFlowError("HTTP <code>: <body>")` whatever the body).
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from sidecar.api.auth import require, tenant_of
from sidecar.api.problems import ProblemError
from sidecar.auth import Role
from sidecar.engine import Engine
from sidecar.model import Budget, Scope
from sidecar.money import micro_to_usd, pico_to_price
from sidecar.schemas import CheckRequest, IdentityFields

_encode = msgspec.json.Encoder().encode


class AxBudget(msgspec.Struct, kw_only=True):
    id: str
    name: str
    scope: str
    limit_usd: float
    period: str
    on_exceed: str
    alert_thresholds: list[int]
    enabled: bool
    scope_id: str | None
    tenant_id: str


class AxBudgetList(msgspec.Struct, kw_only=True):
    budgets: list[AxBudget]
    total: int


class AxStatus(msgspec.Struct, kw_only=True):
    budget: AxBudget
    used_usd: float
    remaining_usd: float
    percentage: float
    is_exceeded: bool
    is_blocked: bool
    period_start: str
    period_end: str


class AxCheck(msgspec.Struct, kw_only=True):
    allowed: bool
    action: str
    message: str | None
    budgets: list[AxBudget]


class AxPrice(msgspec.Struct, kw_only=True):
    input_per_1k: float
    output_per_1k: float


class AxPricingInfo(msgspec.Struct, kw_only=True):
    provider: str
    model: str
    pricing: AxPrice


class AxPricingList(msgspec.Struct, kw_only=True):
    pricing: list[AxPricingInfo]


class AxCheckRequest(IdentityFields, kw_only=True):
    """The SDK's BudgetCheckRequest: identity only, no estimate."""


_check_body = msgspec.json.Decoder(AxCheckRequest).decode


def ax_budget(budget: Budget, tenant: str) -> AxBudget:
    return AxBudget(
        id=budget.id,
        name=budget.name,
        scope=budget.scope,
        limit_usd=micro_to_usd(budget.limit_micro),
        period=budget.period,
        on_exceed=budget.on_exceed,
        alert_thresholds=list(budget.alert_thresholds),
        enabled=budget.enabled,
        scope_id=budget.scope_id,
        tenant_id=tenant,
    )


def _json(body: object) -> web.Response:
    return web.Response(body=_encode(body), content_type="application/json")


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ProblemError(400, f"{name}: not an integer", field=name) from None
    if not low <= value <= high:
        raise ProblemError(400, f"{name}: between {low} and {high}", field=name)
    return value


def add_routes(app: web.Application, engine_key: web.AppKey[Engine]) -> None:
    def find(request: web.Request) -> Budget:
        budget_id = request.match_info["budget_id"]
        for budget in request.app[engine_key].config.budgets:
            if budget.id == budget_id:
                return budget
        raise ProblemError(404, "Budget not found", field="id")

    async def list_budgets(request: web.Request) -> web.Response:
        require(request, Role.READ)
        scope = request.query.get("scope")
        if scope is not None and scope not in {s.value for s in Scope}:
            raise ProblemError(400, f"scope: one of {', '.join(Scope)}", field="scope")
        limit = _int_query(request, "limit", 50, 1, 100)
        offset = _int_query(request, "offset", 0, 0, 1_000_000)
        tenant = tenant_of(request)
        budgets = [
            ax_budget(b, tenant)
            for b in request.app[engine_key].config.budgets
            if scope is None or b.scope == scope
        ]
        return _json(AxBudgetList(budgets=budgets[offset : offset + limit], total=len(budgets)))

    async def get_budget(request: web.Request) -> web.Response:
        require(request, Role.READ)
        return _json(ax_budget(find(request), tenant_of(request)))

    async def budget_status(request: web.Request) -> web.Response:
        require(request, Role.READ)
        budget = find(request)
        engine = request.app[engine_key]
        tenant = tenant_of(request)
        status = await engine.status(tenant, budget.id, request.query.get("scope_id"))
        return _json(
            AxStatus(
                budget=ax_budget(budget, tenant),
                used_usd=status.used_usd,
                remaining_usd=status.remaining_usd,
                percentage=status.percentage,
                is_exceeded=status.exceeded,
                is_blocked=status.exceeded and budget.on_exceed == "block",
                period_start=status.period_start,
                period_end=status.period_end,
            )
        )

    async def check(request: web.Request) -> web.Response:
        require(request, Role.AGENT)
        body = _check_body(await request.read())
        engine = request.app[engine_key]
        tenant = tenant_of(request)
        decision = await engine.check(
            tenant,
            CheckRequest(
                org_id=body.org_id,
                team_id=body.team_id,
                agent_id=body.agent_id,
                workflow_id=body.workflow_id,
                user_id=body.user_id,
            ),
        )
        by_id = {b.id: b for b in engine.config.budgets}
        evaluated = [ax_budget(by_id[s.budget_id], tenant) for s in decision.budgets]
        return _json(
            AxCheck(
                allowed=decision.allowed,
                action=decision.action,
                message=decision.message,
                budgets=evaluated,
            )
        )

    async def pricing(request: web.Request) -> web.Response:
        require(request, Role.READ)
        provider = request.query.get("provider")
        model = request.query.get("model")
        prices = [
            AxPricingInfo(
                provider=p.provider,
                model=p.model,
                pricing=AxPrice(
                    input_per_1k=pico_to_price(p.input_pico),
                    output_per_1k=pico_to_price(p.output_pico),
                ),
            )
            for p in request.app[engine_key].config.pricing
            if (provider is None or p.provider == provider) and (model is None or p.model == model)
        ]
        if provider is not None and model is not None:
            # One model asked for: the SDK reads a single PricingInfo object.
            if not prices:
                raise ProblemError(404, f"no price for {provider}/{model}", field="model")
            return _json(prices[0])
        return _json(AxPricingList(pricing=prices))

    app.router.add_post("/api/v1/budgets/check", check)
    app.router.add_get("/api/v1/budgets", list_budgets)
    app.router.add_get("/api/v1/budgets/{budget_id}", get_budget)
    app.router.add_get("/api/v1/budgets/{budget_id}/status", budget_status)
    app.router.add_get("/api/v1/pricing", pricing)
