"""The OpenAPI 3.1 document of every route, served at `GET /openapi.json`.

Request and response bodies come from the msgspec types the handlers decode and encode
(`msgspec.json.schema_components`), so a field added to a Struct is documented by itself;
the path items (methods, parameters, status codes) are written here. tests/test_openapi.py
keeps the two honest: every route the router serves is documented and nothing else is,
and real answers validate against the documented schemas.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import msgspec
from aiohttp import web

from sidecar import __version__
from sidecar.api import ui
from sidecar.api.admin import RateLimitView
from sidecar.api.auth import OPEN_PATHS
from sidecar.api.axonflow import (
    AxAlertList,
    AxBudget,
    AxBudgetList,
    AxCheck,
    AxCheckRequest,
    AxCreateBudget,
    AxPricingEntry,
    AxPricingInfo,
    AxPricingList,
    AxStatus,
    AxUpdateBudget,
)
from sidecar.api.gateway import (
    _CONTEXT_IDS,
    AuditRequest,
    AuditResult,
    PreCheckRequest,
    PreCheckResult,
)
from sidecar.api.problems import CONTENT_TYPE as PROBLEM_TYPE
from sidecar.api.problems import Problem
from sidecar.api.stops import AlertList, StopList, StopRequest, StopView
from sidecar.api.usage import UsageBreakdown, UsageRecords, UsageSummary
from sidecar.config import RateLimitSpec
from sidecar.ledger import GROUP_BY
from sidecar.model import Config, Period, Scope
from sidecar.proxy_config import ProxySpec
from sidecar.schemas import (
    AuthorizeRequest,
    BudgetInfo,
    BudgetStatus,
    CheckRequest,
    Decision,
    Id,
    ModelName,
    RecordRequest,
    RecordResult,
    ReleaseRequest,
    SettleRequest,
    SettleResult,
    Token,
)

PATH = "/openapi.json"
# aiohttp's `{name:regex}` path variable; OpenAPI's is `{name}`.
_DYN_RE = re.compile(r"\{([_a-zA-Z][_a-zA-Z0-9]*):[^/]*?\}(?=/|$)")
REF = "#/components/schemas/{name}"
# Every method an OpenAPI path item can name; /ext_authz answers all of them.
ALL_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


class Health(msgspec.Struct):
    status: str


class ServiceHealth(msgspec.Struct):
    """GET /health, what the AxonFlow SDK's health_check() reads."""

    status: str  # healthy
    version: str


class BudgetExceeded(msgspec.Struct):
    """The 402 body of POST /api/policy/pre-check: the AxonFlow SDK raises
    BudgetExceededError from it (wire contract §5.3)."""

    error: str  # budget_exceeded
    message: str
    budget_info: BudgetInfo


class Readiness(msgspec.Struct):
    ready: bool
    redis: str | None = None  # ok | unreachable
    draining: bool = False  # shutting down: in-flight requests finish, new work goes elsewhere


class RateLimitList(msgspec.Struct):
    rate_limits: list[RateLimitView]


_TYPES: tuple[type, ...] = (
    AuthorizeRequest,
    CheckRequest,
    SettleRequest,
    ReleaseRequest,
    RecordRequest,
    Decision,
    SettleResult,
    RecordResult,
    BudgetStatus,
    RateLimitSpec,
    RateLimitView,
    RateLimitList,
    Problem,
    Health,
    Readiness,
    AxBudget,
    AxBudgetList,
    AxStatus,
    AxCheck,
    AxCheckRequest,
    AxPricingInfo,
    AxPricingEntry,
    AxPricingList,
    AxCreateBudget,
    AxUpdateBudget,
    AxAlertList,
    UsageSummary,
    UsageBreakdown,
    UsageRecords,
    PreCheckRequest,
    PreCheckResult,
    AuditRequest,
    AuditResult,
    BudgetExceeded,
    ServiceHealth,
    StopRequest,
    StopView,
    StopList,
    AlertList,
)


def _ecma_patterns(node: Any) -> Any:
    """msgspec patterns end in Python's `\\Z`; JSON Schema patterns are ECMA-262, where `$`
    (no multiline flag) is the same end-of-input anchor."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "pattern" and isinstance(value, str) and value.endswith("\\Z"):
                value = value[:-2] + "$"
            out[key] = _ecma_patterns(value)
        return out
    if isinstance(node, list):
        return [_ecma_patterns(v) for v in node]
    return node


def _components() -> dict[str, Any]:
    _, schemas = msgspec.json.schema_components(_TYPES, ref_template=REF)
    out: dict[str, Any] = _ecma_patterns(schemas)
    # Free-form objects in the types whose known keys the handlers check themselves.
    out["PreCheckRequest"]["properties"]["context"] = _pre_check_context()
    out["AuditRequest"]["properties"]["metadata"] = {
        "type": "object",
        "description": "Free-form; `cost_usd` is the cost of a call to an unpriced model.",
        "properties": {
            "cost_usd": {"anyOf": [{"type": "number", "minimum": 0, "maximum": 1_000_000},
                                   {"type": "null"}]},
        },
    }  # fmt: skip
    return out


def _pre_check_context() -> dict[str, Any]:
    """The pre-check `context`: the identity and estimate of the call (an empty string or
    null is the same as absent; other keys are ignored)."""
    unset: list[dict[str, Any]] = [{"const": ""}, {"type": "null"}]
    usd = {"type": "number", "minimum": 0, "maximum": 1_000_000}
    props: dict[str, Any] = {key: {"anyOf": [_string_schema(Id), *unset]} for key in _CONTEXT_IDS}
    props["model"] = {"anyOf": [_string_schema(ModelName), *unset]}
    props["estimated_usd"] = {
        "anyOf": [usd, *unset],
        "description": "USD to hold (default: settings.pre_check_estimate_usd; under "
        "estimate: learned, the learned estimate where larger)",
    }
    return {
        "type": "object",
        "description": "The call's identity and estimate; other keys are ignored.",
        "properties": props,
        "default": {},
    }


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(name=name)}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {PROBLEM_TYPE: {"schema": _ref("Problem")}}}


BAD_INPUT = _problem("Bad input: the body or a parameter, named in `field`. Nothing written.")
TOO_SLOW = _problem("The body did not arrive in time; the connection is closed. Nothing written.")
TOO_LARGE = _problem("The body is larger than settings.max_body_bytes. Nothing written.")
BROWSER = _problem(
    "A browser's own request: Origin or Sec-Fetch-* without a header a proxy adds "
    "(X-Forwarded-*, X-Original-*, x-envoy-*, Via, Forwarded, a proxy.headers name). "
    "Nothing held."
)
NOT_JSON = _problem("A Content-Type other than JSON (none is read as JSON). Nothing written.")
UNAVAILABLE = _problem("Redis is away and the fail mode is closed (`degraded: true`).")
REDIS_AWAY = _problem("Redis does not answer (`degraded: true`). Nothing written.")
RETRY_AFTER = {"description": "Seconds until a retry may pass.", "schema": {"type": "string"}}
RATE_LIMIT_HEADERS = {
    "Retry-After": RETRY_AFTER,
    "RateLimit-Policy": {"description": "draft-ietf-httpapi-ratelimit-headers", "schema": {}},
    "RateLimit": {"description": "draft-ietf-httpapi-ratelimit-headers", "schema": {}},
}


def _body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(name)}}}


def _decision_op(summary: str, body: str) -> dict[str, Any]:
    ok = _json("Decision", "The decision; a denial is 200 with `allowed: false`.")
    ok["headers"] = RATE_LIMIT_HEADERS
    return {
        "summary": summary,
        "requestBody": _body(body),
        "responses": {
            "200": ok,
            "400": BAD_INPUT,
            "408": TOO_SLOW,
            "413": TOO_LARGE,
            "503": UNAVAILABLE,
        },
    }


def _end_op(summary: str, body: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "requestBody": _body(body),
        "responses": {
            "200": _json("SettleResult", "The outcome; a repeat returns the first one."),
            "400": BAD_INPUT,
            "404": _problem("No such reservation (never made, or ended long ago)."),
            "408": TOO_SLOW,
            "413": TOO_LARGE,
            "503": UNAVAILABLE,
        },
    }


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }


def _header_param(name: str, description: str, schema: Any = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "description": description,
        "schema": schema or {"type": "string"},
    }


def _string_schema(annotated: Any) -> dict[str, Any]:
    """The JSON Schema of an Annotated str type of sidecar.schemas (pattern, lengths)."""
    out: dict[str, Any] = _ecma_patterns(msgspec.json.schema(annotated))
    return out


def _ext_authz_op(proxy: ProxySpec, tail: bool) -> dict[str, Any]:
    h = proxy.headers
    ident, model, token = _string_schema(Id), _string_schema(ModelName), _string_schema(Token)
    usd = {"type": "string", "pattern": r"^[0-9]{1,7}(\.[0-9]{1,9})?$"}
    params = [
        _header_param(h.org_id, "org_id", ident),
        _header_param(h.team_id, "team_id", ident),
        _header_param(h.agent_id, "agent_id", ident),
        _header_param(h.workflow_id, "workflow_id", ident),
        _header_param(h.user_id, "user_id", ident),
        _header_param(h.provider, "provider", ident),
        _header_param(h.model, "model", model),
        _header_param(h.estimate_usd, "USD to hold (a decimal number, at most 1e6)", usd),
    ]
    if h.request_id is not None:
        params.append(_header_param(h.request_id, "becomes the idempotency key", token))
    t = proxy.trusted
    if t.uri_header is not None:
        params.append(_header_param(t.uri_header, "the client's original URI (set by the proxy)"))
    if t.method_header is not None:
        params.append(_header_param(t.method_header, "the client's method (set by the proxy)"))
    if tail:
        params.insert(0, _path_param("tail", "Envoy appends the client's path"))
    deny = _json("Decision", "Denied by a budget or rate limit.")
    deny["headers"] = RATE_LIMIT_HEADERS
    responses = {
        "200": {"description": "Allowed; empty body, `x-budget-*` headers for upstream."},
        str(proxy.deny_status): deny,
        "400": _problem("A header's value is unusable; `field` names the header."),
        "503": UNAVAILABLE,
    }
    responses.setdefault("403", BROWSER)
    return {
        "summary": "Proxy hook (Envoy ext_authz HTTP, nginx auth_request, forward auth)",
        "parameters": params,
        "responses": responses,
    }


def _pass_op(tail: bool) -> dict[str, Any]:
    """A method that passes with nothing held (proxy.pass_methods): no header is read."""
    return {
        "summary": "Proxy hook: passes with nothing held (proxy.pass_methods)",
        "parameters": [_path_param("tail", "Envoy appends the client's path")] if tail else [],
        "responses": {
            "200": {"description": "Passes; `x-budget-action: pass`, nothing held."},
            "403": BROWSER,
        },
    }


def _ext_authz_item(proxy: ProxySpec, tail: bool) -> dict[str, Any]:
    # With forward auth every check is a GET that says its method in a header; only Envoy's
    # check method is the client's, and only when no route overrides pass_methods.
    overridden = proxy.trusted.method_header is not None or any(
        r.pass_methods is not None or r.methods is not None for r in proxy.routes
    )

    def op(method: str) -> dict[str, Any]:
        if method.upper() in proxy.pass_methods and not overridden:
            return _pass_op(tail)
        return _ext_authz_op(proxy, tail)

    return {
        method: {**op(method), "operationId": f"ext_authz_{method}{'_tail' * tail}"}
        for method in ALL_METHODS
    }


def _paths(config: Config) -> dict[str, dict[str, Any]]:
    text = {"text/plain": {"schema": {"type": "string"}}}
    html = {"text/html": {"schema": {"type": "string"}}}
    rate_limit_id = _path_param("limit_id", "the rate limit's id")
    read_only = _problem("The rate limit comes from the config file: change it there.")
    not_found = _problem("No rate limit with this id.")
    return {
        **{
            path: {
                "get": {
                    "summary": "The status page (static HTML; its data needs credentials)",
                    "responses": {"200": {"description": "The page.", "content": html}},
                }
            }
            for path in ui.PATHS
        },
        "/healthz": {
            "get": {
                "summary": "Liveness",
                "responses": {"200": _json("Health", "The process answers.")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: Redis answers",
                "responses": {
                    "200": _json("Readiness", "Ready."),
                    "503": _json("Readiness", "Redis does not answer."),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus exposition",
                "responses": {"200": {"description": "Metrics.", "content": text}},
            }
        },
        "/prometheus": {
            "get": {
                "summary": "Prometheus exposition (same as /metrics)",
                "responses": {"200": {"description": "Metrics.", "content": text}},
            }
        },
        PATH: {
            "get": {
                "summary": "This document",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
        "/v1/authorize": {
            "post": _decision_op("Hold an estimate on every limit", "AuthorizeRequest")
        },
        "/v1/check": {"post": _decision_op("Decide without holding anything", "CheckRequest")},
        "/v1/settle": {"post": _end_op("Charge the actual cost of a reservation", "SettleRequest")},
        "/v1/release": {"post": _end_op("Return a reservation's hold", "ReleaseRequest")},
        "/v1/record": {
            "post": {
                "summary": "Charge a call that had no reservation",
                "requestBody": _body("RecordRequest"),
                "responses": {
                    "200": _json("RecordResult", "Charged (or replayed)."),
                    "400": BAD_INPUT,
                    "408": TOO_SLOW,
                    "413": TOO_LARGE,
                    "503": UNAVAILABLE,
                },
            }
        },
        "/v1/budgets/{budget_id}/status": {
            "get": {
                "summary": "Usage of one budget in its current period",
                "parameters": [
                    _path_param("budget_id", "the budget's id"),
                    {
                        "name": "scope_id",
                        "in": "query",
                        "description": "the entity, for a budget that is per entity",
                        "schema": {"type": "string"},
                    },
                ],
                "responses": {
                    "200": _json("BudgetStatus", "Usage."),
                    "400": BAD_INPUT,
                    "404": _problem("No such budget."),
                    "503": UNAVAILABLE,
                },
            }
        },
        "/v1/rate-limits": {
            "get": {
                "summary": "Every rate limit: the config file's and the API's",
                "responses": {"200": _json("RateLimitList", "The rate limits.")},
            },
            "post": {
                "summary": "Create a rate limit",
                "requestBody": _body("RateLimitSpec"),
                "responses": {
                    "201": _json("RateLimitView", "Created; enforced within a second."),
                    "400": BAD_INPUT,
                    "409": _problem(
                        "The id exists (PUT replaces it), or is the config file's, or the "
                        "tenant has settings.max_api_definitions rate limits."
                    ),
                    "408": TOO_SLOW,
                    "413": TOO_LARGE,
                    "503": UNAVAILABLE,
                },
            },
        },
        "/v1/rate-limits/{limit_id}": {
            "parameters": [rate_limit_id],
            "get": {
                "summary": "One rate limit",
                "responses": {"200": _json("RateLimitView", "The rate limit."), "404": not_found},
            },
            "put": {
                "summary": "Replace a rate limit",
                "requestBody": _body("RateLimitSpec"),
                "responses": {
                    "200": _json("RateLimitView", "Replaced."),
                    "400": BAD_INPUT,
                    "404": not_found,
                    "409": read_only,
                    "408": TOO_SLOW,
                    "413": TOO_LARGE,
                    "503": UNAVAILABLE,
                },
            },
            "delete": {
                "summary": "Delete a rate limit",
                "responses": {
                    "204": {"description": "Deleted."},
                    "404": not_found,
                    "409": read_only,
                    "503": UNAVAILABLE,
                },
            },
        },
        **_stop_paths(),
        "/ext_authz": _ext_authz_item(config.proxy, tail=False),
        "/ext_authz/{tail}": _ext_authz_item(config.proxy, tail=True),
    }


def _stop_paths() -> dict[str, dict[str, Any]]:
    """The stop switch (sidecar.api.stops) and the tenant's alerts of every kind."""
    stop_id = _path_param("stop_id", "the stop's id (stop_ and 16 hex digits)")
    not_found = _problem("No stop in force with this id (never made, lifted, replaced or ended).")
    limit = _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "default 100")
    return {
        "/v1/stops": {
            "get": {
                "summary": "The stops in force, oldest first, a page at a time",
                "parameters": [
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000},
                           "stops per page, default 1000"),
                    _query("cursor", {"type": "string"},
                           "next_cursor of the page before (absent: the first page)"),
                ],
                "responses": {
                    "200": _json("StopList", "A page of stops; next_cursor when more follow."),
                    "400": BAD_INPUT,
                    "503": REDIS_AWAY,
                },
            },
            "post": {
                "summary": "Stop every decision of an entity and what lies below it",
                "requestBody": _body("StopRequest"),
                "responses": {
                    "201": _json("StopView", "Made (replacing the entity's stop in force); "
                                 "every replica denies from the next decision on."),
                    "400": BAD_INPUT,
                    "409": _problem("The tenant has settings.max_stops stops in force and "
                                    "the entity none to replace: nothing written."),
                    "408": TOO_SLOW,
                    "413": TOO_LARGE,
                    "503": REDIS_AWAY,
                },
            },
        },
        "/v1/stops/{stop_id}": {
            "parameters": [stop_id],
            "get": {
                "summary": "One stop in force",
                "responses": {
                    "200": _json("StopView", "The stop."),
                    "404": not_found,
                    "503": REDIS_AWAY,
                },
            },
            "delete": {
                "summary": "Lift a stop",
                "responses": {
                    "204": {"description": "Lifted: decisions pass again from the next on."},
                    "404": not_found,
                    "503": REDIS_AWAY,
                },
            },
        },
        "/v1/alerts": {
            "get": {
                "summary": "The tenant's alerts of every kind (thresholds, guard trips)",
                "parameters": [limit],
                "responses": {
                    "200": _json("AlertList", "The alerts still in the stream."),
                    "400": BAD_INPUT,
                    "503": REDIS_AWAY,
                },
            },
        },
    }  # fmt: skip


def _query(
    name: str, schema: dict[str, Any], description: str = "", required: bool = False
) -> dict[str, Any]:
    out = {"name": name, "in": "query", "required": required, "schema": schema}
    if description:
        out["description"] = description
    return out


def _axonflow_paths() -> dict[str, dict[str, Any]]:
    """The AxonFlow SDK's routes (budgets, usage, pricing, gateway mode), in its shapes."""
    budget_id = _path_param("budget_id", "the budget's id")
    not_found = _problem("No budget with this id (in the caller's tenant or the config file).")
    from_file = _problem("The budget comes from the config file: change it there.")
    string = {"type": "string"}
    scope_id = _query("scope_id", string, "the entity, for a budget that is per entity")
    # Empty is the same as absent (the SDK leaves out a falsy period).
    period = _query(
        "period",
        {"enum": [*(p.value for p in Period if p is not Period.TOTAL), ""]},
        "UTC calendar window; default monthly",
    )
    limit = _query("limit", {"type": "integer", "minimum": 1, "maximum": 100}, "default 50")

    def offset(most: int) -> dict[str, Any]:
        return _query("offset", {"type": "integer", "minimum": 0, "maximum": most})

    deleted = {"description": "Deleted."}
    decides = {"400": BAD_INPUT, "408": TOO_SLOW, "413": TOO_LARGE, "503": UNAVAILABLE}
    writes = {**decides, "503": REDIS_AWAY}
    return {
        "/health": {
            "get": {
                "summary": "Health (AxonFlow SDK health_check and heartbeat)",
                "responses": {"200": _json("ServiceHealth", "The process answers.")},
            }
        },
        "/api/v1/budgets": {
            "get": {
                "summary": "Budgets (AxonFlow SDK list_budgets)",
                "parameters": [_query("scope", {"enum": [s.value for s in Scope]}), limit,
                               offset(1_000_000)],
                "responses": {"200": _json("AxBudgetList", "A page of budgets."),
                              "400": BAD_INPUT},
            },
            "post": {
                "summary": "Create a budget (AxonFlow SDK create_budget)",
                "requestBody": _body("AxCreateBudget"),
                "responses": {
                    "201": _json("AxBudget", "Created; enforced within a second."),
                    "409": _problem(
                        "The id exists (in this tenant or the config file), or the tenant "
                        "has settings.max_api_definitions budgets."
                    ),
                    **writes,
                },
            },
        },
        "/api/v1/budgets/{budget_id}": {
            "parameters": [budget_id],
            "get": {
                "summary": "One budget (AxonFlow SDK get_budget)",
                "responses": {"200": _json("AxBudget", "The budget."), "404": not_found},
            },
            "put": {
                "summary": "Change a budget; only the fields given (AxonFlow SDK update_budget)",
                "requestBody": _body("AxUpdateBudget"),
                "responses": {
                    "200": _json("AxBudget", "Changed."),
                    "404": not_found,
                    "409": _problem(
                        "The budget comes from the config file (change it there), or kept "
                        "changing under this update through other replicas (retry)."
                    ),
                    **writes,
                },
            },
            "delete": {
                "summary": "Delete a budget (AxonFlow SDK delete_budget)",
                "responses": {"204": deleted, "404": not_found, "409": from_file,
                              "503": REDIS_AWAY},
            },
        },
        "/api/v1/budgets/{budget_id}/status": {
            "parameters": [budget_id],
            "get": {
                "summary": "A budget's current period (AxonFlow SDK get_budget_status)",
                "parameters": [scope_id],
                "responses": {"200": _json("AxStatus", "Used and remaining."),
                              "400": BAD_INPUT, "404": not_found, "503": UNAVAILABLE},
            },
        },
        "/api/v1/budgets/{budget_id}/{entity}/status": {
            "parameters": [budget_id,
                           _path_param("entity", "The entity of a per-entity budget (the SDK: "
                                       "get_budget_status('<budget id>/<entity>')).")],
            "get": {
                "summary": "One entity's current period of a per-entity budget",
                "responses": {"200": _json("AxStatus", "Used and remaining."),
                              "400": BAD_INPUT, "404": not_found, "503": UNAVAILABLE},
            },
        },
        "/api/v1/budgets/{budget_id}/alerts": {
            "parameters": [budget_id],
            "get": {
                "summary": "Thresholds crossed, newest first (AxonFlow SDK get_budget_alerts)",
                "responses": {"200": _json("AxAlertList", "The budget's alerts."),
                              "404": not_found, "503": REDIS_AWAY},
            },
        },
        "/api/v1/budgets/check": {
            "post": {
                "summary": "Pre-flight budget check (AxonFlow SDK check_budget)",
                "requestBody": _body("AxCheckRequest"),
                "responses": {
                    "200": _json("AxCheck", "Allowed or not; a denial is 200."),
                    **decides,
                },
            }
        },
        "/api/v1/usage": {
            "get": {
                "summary": "Usage totals of a period (AxonFlow SDK get_usage_summary)",
                "parameters": [period],
                "responses": {"200": _json("UsageSummary", "The tenant's totals."),
                              "400": BAD_INPUT, "503": REDIS_AWAY},
            }
        },
        "/api/v1/usage/breakdown": {
            "get": {
                "summary": "Usage of a period by one dimension (AxonFlow SDK "
                           "get_usage_breakdown)",
                "parameters": [
                    _query("group_by", {"enum": list(GROUP_BY)}, required=True),
                    period,
                ],
                "responses": {"200": _json("UsageBreakdown", "Cost per group, largest first."),
                              "400": BAD_INPUT, "503": REDIS_AWAY},
            }
        },
        "/api/v1/usage/records": {
            "get": {
                "summary": "Charges, newest first (AxonFlow SDK list_usage_records)",
                "parameters": [limit, offset(100_000_000), _query("provider", string),
                               _query("model", string)],
                "responses": {"200": _json("UsageRecords", "A page of records."),
                              "400": BAD_INPUT, "503": REDIS_AWAY},
            }
        },
        "/api/v1/pricing": {
            "get": {
                "summary": "Prices (AxonFlow SDK get_pricing)",
                "parameters": [_query("provider", string), _query("model", string),
                               _query("source", string)],
                "responses": {
                    "200": {
                        "description": "All prices in effect (each with its source), or the "
                        "one a provider and model resolve to.",
                        "content": {"application/json": {"schema": {
                            "oneOf": [_ref("AxPricingList"), _ref("AxPricingEntry")]}}},
                    },
                    "404": _problem("No price for that provider and model."),
                },
            },
            "put": {
                "summary": "Set a model's price for the tenant (over the config file's)",
                "requestBody": _body("AxPricingInfo"),
                "responses": {
                    "200": _json("AxPricingInfo", "Set; applies within a second."),
                    "409": _problem(
                        "A new price, and the tenant has settings.max_api_definitions prices "
                        "set through the API."
                    ),
                    **writes,
                },
            },
            "delete": {
                "summary": "Drop a price set through the API (the config file's applies again)",
                "parameters": [
                    _query("provider", {"type": "string", "minLength": 1}, required=True),
                    _query("model", {"type": "string", "minLength": 1}, required=True),
                ],
                "responses": {
                    "204": deleted,
                    "400": BAD_INPUT,
                    "404": _problem("No price for that provider and model set through the API."),
                    "503": REDIS_AWAY,
                },
            },
        },
        "/api/policy/pre-check": {
            "post": {
                "summary": "Hold an estimate before an LLM call (AxonFlow SDK pre_check)",
                "requestBody": _body("PreCheckRequest"),
                "responses": {
                    "200": _json(
                        "PreCheckResult",
                        "Approved (`context_id` is the hold), or denied by a rate or "
                        "concurrency limit: `approved: false` with a `block_reason`.",
                    ),
                    "402": _json("BudgetExceeded",
                                 "A block budget denies (the SDK raises BudgetExceededError)."),
                    **decides,
                },
            }
        },
        "/api/audit/llm-call": {
            "post": {
                "summary": "Charge a pre-checked call's tokens (AxonFlow SDK audit_llm_call); "
                           "a repeat returns the first result",
                "requestBody": _body("AuditRequest"),
                "responses": {
                    "200": _json("AuditResult", "Charged (or replayed)."),
                    "404": _problem("No pre-check with this `context_id` (or ended long ago)."),
                    **decides,
                },
            }
        },
    }  # fmt: skip


def _with_auth(paths: dict[str, dict[str, Any]], config: Config) -> dict[str, dict[str, Any]]:
    """Once clients are configured, every operation but the open paths needs credentials
    (401 without valid ones, 403 when the client's role does not allow it)."""
    if not config.clients:
        return paths
    for path, item in paths.items():
        if path in OPEN_PATHS:
            continue
        for operation in item.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            operation["security"] = [{"basic": []}, {"clientId": []}]
            operation["responses"].setdefault(
                "401", _problem("No valid credentials (WWW-Authenticate: Basic).")
            )
            operation["responses"].setdefault(
                "403", _problem("The client's role does not allow this operation.")
            )
    return paths


def _with_media_type(paths: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every operation that takes a JSON body answers 415 to another declared type
    (sidecar.api.bodies)."""
    for item in paths.values():
        for operation in item.values():
            if isinstance(operation, dict) and "requestBody" in operation:
                operation["responses"].setdefault("415", NOT_JSON)
    return paths


MISDIRECTED = _problem(
    "A Host the sidecar does not answer to (a page whose name was pointed at it: DNS "
    "rebinding); name it in settings.allowed_hosts. Nothing read or written."
)


def _with_host(paths: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every operation answers 421 to a Host it does not answer to (sidecar.api.origin)."""
    for item in paths.values():
        for operation in item.values():
            if isinstance(operation, dict) and "responses" in operation:
                operation["responses"].setdefault("421", MISDIRECTED)
    return paths


def document(config: Config) -> dict[str, Any]:
    """The whole document for this config (proxy header names, deny status and whether
    credentials are required are its)."""
    mode = (
        "HTTP Basic client_id:secret (or X-Client-ID for a client without a secret) is "
        "required on every route but health, readiness, metrics and this document."
        if config.clients
        else "Open mode: no credentials are configured."
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "budget-sidecar",
            "version": __version__,
            "description": (
                "Atomic spend and rate limits for AI agents. Errors are RFC 9457 "
                f"application/problem+json. {mode}"
            ),
        },
        "paths": _with_auth(
            _with_host(_with_media_type({**_paths(config), **_axonflow_paths()})), config
        ),
        "components": {
            "schemas": _components(),
            "securitySchemes": {
                "basic": {"type": "http", "scheme": "basic"},
                "clientId": {"type": "apiKey", "in": "header", "name": "X-Client-ID"},
            },
        },
    }


def routes_of(app: web.Application) -> set[tuple[str, str]]:
    """(method, path template) of every route the router serves, `*` routes as every
    method and without the HEAD that aiohttp adds to each GET."""
    out: set[tuple[str, str]] = set()
    gets = {r.resource.canonical for r in app.router.routes() if r.method == "GET" and r.resource}
    for route in app.router.routes():
        if route.resource is None:
            continue
        path = _DYN_RE.sub(r"{\1}", route.resource.canonical)
        if route.method == "*":
            out.update((m, path) for m in ALL_METHODS)
        elif route.method == "HEAD" and route.resource.canonical in gets:
            continue
        else:
            out.add((route.method.lower(), path))
    return out


def documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method, path)
        for path, item in doc["paths"].items()
        for method in item
        if method in ALL_METHODS
    }


def served(doc: dict[str, Any], app: web.Application) -> dict[str, Any]:
    """The document without the paths this app does not serve (e.g. /metrics without a
    Metrics)."""
    live = {path for _, path in routes_of(app)}
    out = copy.deepcopy(doc)
    out["paths"] = {p: item for p, item in doc["paths"].items() if p in live}
    return out


def add_route(app: web.Application, config: Config) -> None:
    """GET /openapi.json; the body is built once, at start-up, from the routes then served."""
    body: list[bytes] = []

    async def build(app: web.Application) -> None:
        body.append(msgspec.json.encode(served(document(config), app)))

    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=body[0], content_type="application/json")

    app.on_startup.append(build)
    app.router.add_get(PATH, handle)
