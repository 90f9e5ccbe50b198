"""The AxonFlow SDK's budget and pricing routes (wire contract observed from axonflow 9.5.0,
../shared/reference/axonflow-sdk-wire-contract.md): budgets (create, list, get, update,
delete, status, alerts), the pre-flight budget check, and pricing (read and write).

Shapes follow the contract field by field: bare Budget objects, lists inside an object,
RFC 3339 strings for timestamps, never null where the SDK types a list or a number, and a
denial from /budgets/check as 200 with `allowed: false`. Errors are problem+json (the SDK
surfaces any non-2xx as `AxonFlowError("HTTP <code>: <body>")` whatever the body).

Budgets made here belong to the caller's tenant, live in Redis and are enforced by every
replica within a second (sidecar.definitions). The config file's budgets are listed to
every tenant and are read-only here (409): the file is their source of truth.
"""

from __future__ import annotations

import re
from typing import Annotated
from urllib.parse import unquote

import msgspec
from aiohttp import web
from msgspec import Meta

from sidecar.alerts import Alert, read_alerts
from sidecar.api.admin import full
from sidecar.api.auth import require, tenant_of
from sidecar.api.problems import ProblemError
from sidecar.auth import Role
from sidecar.config import BudgetId, PricePer1k, PriceSpec, check_price
from sidecar.definitions import DefinitionWatcher, MergeConflict, StoredBudget
from sidecar.engine import Engine, RequestError
from sidecar.learned import EstimateHint
from sidecar.model import Budget, OnExceed, Period, Price, Scope
from sidecar.money import micro_to_usd, pico_to_price
from sidecar.periods import TOTAL_END_MS, iso
from sidecar.pricing import Source
from sidecar.schemas import ID_PATTERN, CheckRequest, Id, IdentityFields, ModelName

_encode = msgspec.json.Encoder().encode
_ID = re.compile(ID_PATTERN)

# What the real platform fills in when a create sends no thresholds (wire contract §2.1).
DEFAULT_THRESHOLDS = [50, 80, 100]
Threshold = Annotated[int, Meta(ge=1, le=1000)]
Thresholds = Annotated[list[Threshold], Meta(max_length=20)]
BudgetName = Annotated[str, Meta(min_length=1, max_length=200)]
# At least one micro-USD: a smaller limit would be stored as $0 and deny everything.
LimitUsd = Annotated[float, Meta(ge=0.000001, le=1_000_000_000)]


class AxBudget(msgspec.Struct, kw_only=True):
    id: str
    name: str
    scope: str
    limit_usd: float
    period: str
    on_exceed: str
    alert_thresholds: list[int]
    forecast_alert: bool
    enabled: bool
    scope_id: str | None
    tenant_id: str
    source: str  # config | api
    created_at: str | None
    updated_at: str | None


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
    # Ours, beyond the SDK's BudgetStatus (its pydantic model ignores them): see forecast.py.
    forecast_usd: float
    exhausted_at: str | None


class AxCheck(msgspec.Struct, kw_only=True):
    allowed: bool
    action: str
    message: str | None
    budgets: list[AxBudget]


class AxAlertList(msgspec.Struct, kw_only=True):
    alerts: list[Alert]
    count: int


class AxPrice(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    input_per_1k: PricePer1k
    output_per_1k: PricePer1k

    def __post_init__(self) -> None:
        check_price(self.input_per_1k, self.output_per_1k)


class AxPricingInfo(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One model's price; also the body of PUT /api/v1/pricing."""

    provider: Id
    model: ModelName
    pricing: AxPrice


class AxPricingEntry(AxPricingInfo, kw_only=True):
    """A price as read: the SDK's PricingInfo plus where it came from (the SDK's pydantic
    model ignores fields it does not know): `config`, `api`, or `genai-prices` with that
    package's version and the newest date its data says a price was checked."""

    source: str
    source_version: str | None = None
    source_date: str | None = None


class AxPricingList(msgspec.Struct, kw_only=True):
    pricing: list[AxPricingEntry]


class AxCheckRequest(IdentityFields, kw_only=True):
    """The SDK's BudgetCheckRequest: identity only, no estimate."""


class AxCreateBudget(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The SDK's CreateBudgetRequest."""

    id: BudgetId
    name: BudgetName
    scope: Scope
    limit_usd: LimitUsd
    period: Period
    on_exceed: OnExceed = OnExceed.BLOCK
    alert_thresholds: Thresholds = msgspec.field(default_factory=list)
    scope_id: Id | None = None
    # Not in the SDK's request (it sends none): ours, for the forecast alert.
    forecast_alert: bool = False


class AxUpdateBudget(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The SDK's UpdateBudgetRequest: only the fields given change. An empty
    `alert_thresholds` means unchanged, as on the real platform (wire contract §2.4)."""

    name: BudgetName | None = None
    limit_usd: LimitUsd | None = None
    on_exceed: OnExceed | None = None
    alert_thresholds: Thresholds | None = None
    forecast_alert: bool | None = None


_check_body = msgspec.json.Decoder(AxCheckRequest).decode
_create_body = msgspec.json.Decoder(AxCreateBudget).decode
_update_body = msgspec.json.Decoder(AxUpdateBudget).decode
_price_body = msgspec.json.Decoder(AxPricingInfo).decode


def ax_budget(budget: Budget, tenant: str) -> AxBudget:
    return AxBudget(
        id=budget.id,
        name=budget.name,
        scope=budget.scope,
        limit_usd=micro_to_usd(budget.limit_micro),
        period=budget.period,
        on_exceed=budget.on_exceed,
        alert_thresholds=list(budget.alert_thresholds),
        forecast_alert=budget.forecast_alert,
        enabled=budget.enabled,
        scope_id=budget.scope_id,
        tenant_id=tenant,
        source=budget.source,
        created_at=budget.created_at,
        updated_at=budget.updated_at,
    )


def _price_entry(p: Price, source: Source) -> AxPricingEntry:
    return AxPricingEntry(
        provider=p.provider,
        model=p.model,
        pricing=AxPrice(
            input_per_1k=pico_to_price(p.input_pico), output_per_1k=pico_to_price(p.output_pico)
        ),
        source=source.name,
        source_version=source.version,
        source_date=source.date,
    )


def json_response(body: object, status: int = 200) -> web.Response:
    return web.Response(body=_encode(body), status=status, content_type="application/json")


def int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = raw_query(request).get(name)
    if raw is None:
        return default
    # ASCII digits only: int() would also take "1_0" and other scripts' digits.
    if not (raw.isascii() and raw.isdigit()):
        raise ProblemError(400, f"{name}: not an integer", field=name)
    value = int(raw)
    if not low <= value <= high:
        raise ProblemError(400, f"{name}: between {low} and {high}", field=name)
    return value


def raw_query(request: web.Request) -> dict[str, str]:
    """The query, percent-decoded but with '+' kept: the SDK does not encode query values,
    and model names carry '+' (wire contract §7.4). The first of a repeated name wins."""
    out: dict[str, str] = {}
    for part in request.rel_url.raw_query_string.split("&"):
        if not part:
            continue
        raw_name, _, raw_value = part.partition("=")
        try:
            name = unquote(raw_name, errors="strict")
            value = unquote(raw_value, errors="strict")
        except UnicodeDecodeError:
            field = unquote(raw_name, errors="replace")
            raise ProblemError(400, f"{field}: not valid UTF-8", field=field) from None
        out.setdefault(name, value)
    return out


def add_routes(
    app: web.Application,
    engine_key: web.AppKey[Engine],
    watcher_key: web.AppKey[DefinitionWatcher],
) -> None:
    def find(request: web.Request) -> Budget:
        budget_id = request.match_info["budget_id"]
        found = request.app[engine_key].budget(tenant_of(request), budget_id)
        if found is None:
            raise ProblemError(404, f"Budget not found: {budget_id!r}", field="id")
        return found

    def writable(request: web.Request) -> Budget:
        budget = find(request)
        if budget.source != "api":
            raise ProblemError(
                409,
                f"budget {budget.id!r} is defined in the config file ({budget.source}); "
                "change it there",
                field="id",
            )
        return budget

    async def list_budgets(request: web.Request) -> web.Response:
        require(request, Role.READ)
        scope = raw_query(request).get("scope")
        if scope is not None and scope not in {s.value for s in Scope}:
            raise ProblemError(400, f"scope: one of {', '.join(Scope)}", field="scope")
        limit = int_query(request, "limit", 50, 1, 100)
        offset = int_query(request, "offset", 0, 0, 1_000_000)
        tenant = tenant_of(request)
        budgets = [
            ax_budget(b, tenant)
            for b in request.app[engine_key].budgets(tenant)
            if scope is None or b.scope == scope
        ]
        return json_response(
            AxBudgetList(budgets=budgets[offset : offset + limit], total=len(budgets))
        )

    async def create_budget(request: web.Request) -> web.Response:
        require(request, Role.ADMIN)
        body = _create_body(await request.read())
        engine = request.app[engine_key]
        tenant = tenant_of(request)
        existing = engine.budget(tenant, body.id)
        if existing is not None:
            where = "in the config file" if existing.source != "api" else "already"
            raise ProblemError(409, f"budget {body.id!r} exists {where}", field="id")
        now = iso(engine.now_ms())
        stored = StoredBudget(
            id=body.id,
            name=body.name,
            scope=body.scope,
            scope_id=body.scope_id,
            limit_usd=body.limit_usd,
            period=body.period,
            on_exceed=body.on_exceed,
            alert_thresholds=sorted(set(body.alert_thresholds or DEFAULT_THRESHOLDS)),
            forecast_alert=body.forecast_alert,
            created_at=now,
            updated_at=now,
        )
        watcher = request.app[watcher_key]
        most = engine.config.settings.max_api_definitions
        done = await watcher.store.create_budget(tenant, stored, most)
        if done == "full":
            raise ProblemError(409, full("budgets", most), field="id")
        if done == "exists":
            raise ProblemError(409, f"budget {body.id!r} exists already", field="id")
        await watcher.refresh()
        return json_response(ax_budget(stored.to_budget(), tenant), status=201)

    async def get_budget(request: web.Request) -> web.Response:
        require(request, Role.READ)
        return json_response(ax_budget(find(request), tenant_of(request)))

    async def update_budget(request: web.Request) -> web.Response:
        require(request, Role.ADMIN)
        budget = writable(request)
        body = _update_body(await request.read())
        engine = request.app[engine_key]
        tenant = tenant_of(request)

        def change(old: StoredBudget) -> StoredBudget:
            # Merged into the budget as stored, not this replica's copy (which may not yet
            # show another replica's update or re-create): see DefinitionStore.merge_budget.
            return msgspec.structs.replace(
                old,
                name=body.name if body.name is not None else old.name,
                limit_usd=body.limit_usd if body.limit_usd is not None else old.limit_usd,
                on_exceed=body.on_exceed if body.on_exceed is not None else old.on_exceed,
                alert_thresholds=sorted(set(body.alert_thresholds or old.alert_thresholds)),
                forecast_alert=(
                    body.forecast_alert if body.forecast_alert is not None else old.forecast_alert
                ),
                updated_at=iso(engine.now_ms()),
            )

        watcher = request.app[watcher_key]
        try:
            stored = await watcher.store.merge_budget(tenant, budget.id, change)
        except MergeConflict:
            raise ProblemError(
                409, f"budget {budget.id!r} kept changing under this update; retry", field="id"
            ) from None
        if stored is None:
            raise ProblemError(404, f"Budget not found: {budget.id!r}", field="id")
        await watcher.refresh()
        return json_response(ax_budget(stored.to_budget(), tenant))

    async def delete_budget(request: web.Request) -> web.Response:
        require(request, Role.ADMIN)
        budget = writable(request)
        watcher = request.app[watcher_key]
        await watcher.store.delete_budget(tenant_of(request), budget.id)
        await watcher.refresh()
        return web.Response(status=204)

    async def status_of(request: web.Request, entity: str | None, field: str) -> web.Response:
        require(request, Role.READ)
        budget = find(request)
        if entity is not None and (len(entity) > 128 or not _ID.match(entity)):
            raise ProblemError(400, f"{field}: not a valid identifier", field=field)
        engine = request.app[engine_key]
        tenant = tenant_of(request)
        try:
            status = await engine.status(tenant, budget.id, entity)
        except RequestError as err:
            if err.field != "scope_id" or entity is not None:
                raise
            # A per-entity budget and no entity: say how the SDK can name one.
            raise ProblemError(
                400,
                f"budget {budget.id!r} is per {budget.scope}: name the entity, as "
                f"get_budget_status('{budget.id}/<{budget.scope} id>') or ?scope_id=",
                field="scope_id",
            ) from None
        return json_response(
            AxStatus(
                budget=ax_budget(budget, tenant),
                used_usd=status.used_usd,
                remaining_usd=status.remaining_usd or 0.0,
                percentage=status.percentage,
                is_exceeded=status.exceeded,
                is_blocked=status.exceeded and budget.on_exceed == "block",
                # The SDK wants times: a period-total budget's window is all of time.
                period_start=status.period_start or iso(0),
                period_end=status.period_end or iso(TOTAL_END_MS),
                forecast_usd=status.forecast_usd or 0.0,
                exhausted_at=status.exhausted_at,
            )
        )

    async def budget_status(request: web.Request) -> web.Response:
        return await status_of(request, raw_query(request).get("scope_id"), "scope_id")

    async def entity_status(request: web.Request) -> web.Response:
        """One entity of a per-entity budget, named in the path: the SDK inserts the id it
        is given into the path unencoded, so get_budget_status("each-user/alice") asks for
        /api/v1/budgets/each-user/alice/status. Budget ids hold no "/" (BudgetId), so the
        split is unambiguous."""
        return await status_of(request, request.match_info["entity"], "entity")

    async def budget_alerts(request: web.Request) -> web.Response:
        require(request, Role.READ)
        budget = find(request)
        engine = request.app[engine_key]
        tenant = tenant_of(request)
        alerts = await read_alerts(
            engine.store_client, tenant, budget.id, lambda b: engine.budget_name(tenant, b)
        )
        return json_response(AxAlertList(alerts=alerts, count=len(alerts)))

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
                # What the SDK's pre-check would hold: check_budget answers what pre_check
                # would decide, not "is anything left".
                estimated_usd=engine.config.settings.pre_check_estimate_usd,
            ),
            EstimateHint(default=True),
        )
        evaluated = []
        for state in decision.budgets:
            budget = engine.budget(tenant, state.budget_id)
            if budget is not None:
                evaluated.append(ax_budget(budget, tenant))
        return json_response(
            AxCheck(
                allowed=decision.allowed,
                action=decision.action,
                message=decision.message,
                budgets=evaluated,
            )
        )

    async def pricing(request: web.Request) -> web.Response:
        """Every price in effect (config file and API prices, then the bundled catalogue's
        that they do not override), or the one a provider/model pair resolves to."""
        require(request, Role.READ)
        query = raw_query(request)
        provider = query.get("provider") or None
        model = query.get("model") or None
        source = query.get("source") or None
        prices = request.app[engine_key].snapshot(tenant_of(request)).prices
        if provider is not None and model is not None:
            # One model asked for, resolved as a decision would (prefixes, dated names,
            # case): the SDK reads a single PricingInfo object.
            found = prices.find(provider, model)
            if found is None:
                raise ProblemError(404, f"no price for {provider}/{model}", field="model")
            return json_response(_price_entry(*found))
        wanted = None if provider is None else prices.catalogue.provider(provider.lower())
        listed = [
            _price_entry(p, s)
            for p, s in prices.entries()
            if (provider is None or p.provider in (provider, wanted))
            and (model is None or p.model == model)
            and (source is None or s.name == source)
        ]
        return json_response(AxPricingList(pricing=listed))

    async def put_price(request: web.Request) -> web.Response:
        """Set a model's price for the caller's tenant (replacing the config file's)."""
        require(request, Role.ADMIN)
        body = _price_body(await request.read())
        spec = PriceSpec(
            provider=body.provider,
            model=body.model,
            input_per_1k=body.pricing.input_per_1k,
            output_per_1k=body.pricing.output_per_1k,
        )
        watcher = request.app[watcher_key]
        most = request.app[engine_key].config.settings.max_api_definitions
        if await watcher.store.put_price(tenant_of(request), spec, most) == "full":
            raise ProblemError(409, full("prices", most), field="model")
        await watcher.refresh()
        return json_response(body)

    async def delete_price(request: web.Request) -> web.Response:
        """Drop a price set through the API (the config file's, if any, applies again)."""
        require(request, Role.ADMIN)
        query = raw_query(request)
        for name in ("provider", "model"):
            if not query.get(name):
                raise ProblemError(400, f"{name}: required", field=name)
        watcher = request.app[watcher_key]
        deleted = await watcher.store.delete_price(
            tenant_of(request), query["provider"], query["model"]
        )
        if not deleted:
            raise ProblemError(
                404,
                f"no price for {query['provider']}/{query['model']} set through the API",
                field="model",
            )
        await watcher.refresh()
        return web.Response(status=204)

    app.router.add_post("/api/v1/budgets/check", check)
    app.router.add_get("/api/v1/budgets", list_budgets)
    app.router.add_post("/api/v1/budgets", create_budget)
    app.router.add_get("/api/v1/budgets/{budget_id}", get_budget)
    app.router.add_put("/api/v1/budgets/{budget_id}", update_budget)
    app.router.add_delete("/api/v1/budgets/{budget_id}", delete_budget)
    app.router.add_get("/api/v1/budgets/{budget_id}/status", budget_status)
    app.router.add_get("/api/v1/budgets/{budget_id}/{entity}/status", entity_status)
    app.router.add_get("/api/v1/budgets/{budget_id}/alerts", budget_alerts)
    app.router.add_get("/api/v1/pricing", pricing)
    app.router.add_put("/api/v1/pricing", put_price)
    app.router.add_delete("/api/v1/pricing", delete_price)
