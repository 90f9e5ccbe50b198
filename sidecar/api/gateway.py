"""The AxonFlow SDK's gateway mode: `pre_check()` before an LLM call, `audit_llm_call()`
after it (wire contract §5).

- `POST /api/policy/pre-check` authorizes the identity in the body's `context` (keys
  org_id, team_id, agent_id, workflow_id, user_id, provider, model; also run_id, step_id
  and a numeric estimated_usd) with `settings.pre_check_estimate_usd` as the estimate,
  and returns the reservation id as `context_id`. A block budget that denies answers 402
  with the body that makes the SDK raise `BudgetExceededError` with `budget_info`. Any
  other denial (a rate or concurrency limit) answers 200 with `approved: false` and a
  `block_reason`, the form the SDK and its LiteLLM wrapper honour: a 429 would reach them
  as a plain `AxonFlowError`, which axonflow-litellm reads as an outage and fails open on.
- `POST /api/audit/llm-call` settles that reservation from `token_usage` priced with the
  tenant's pricing (or `metadata.cost_usd` for an unpriced model; with neither, the held
  estimate is charged, never $0, and `priced_by: "estimate"` says so), exactly once: the
  SDK re-sends the same body after a timeout, and a second settle of a reservation returns
  the first result.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from aiohttp import web
from msgspec import Meta

from sidecar.api import limit_headers, undelivered
from sidecar.api.auth import require, tenant_of
from sidecar.api.axonflow import json_response
from sidecar.api.problems import ProblemError
from sidecar.auth import Role
from sidecar.config import split_validation_error
from sidecar.engine import Engine, RequestError, new_reservation_id
from sidecar.learned import EstimateHint
from sidecar.periods import iso
from sidecar.reservations import loop_fingerprint
from sidecar.schemas import ID_PATTERN, AuthorizeRequest, Decision, ReservationId, Tokens

# Ids and names the context may carry, and the pattern each must match.
_CONTEXT_IDS = ("org_id", "team_id", "agent_id", "workflow_id", "user_id", "provider",
                "run_id", "step_id")  # fmt: skip
_MODEL_PATTERN = r"^[A-Za-z0-9._~@+:/\-]+\Z"


class PreCheckRequest(msgspec.Struct, kw_only=True):
    """The SDK's pre-check body; only `context` matters here (unknown keys are ignored:
    a newer SDK may add some)."""

    user_token: str = ""
    client_id: str = ""
    query: str = ""
    data_sources: list[Any] = msgspec.field(default_factory=list)
    context: dict[str, Any] = msgspec.field(default_factory=dict)


class TokenUsage(msgspec.Struct, kw_only=True):
    prompt_tokens: Tokens = 0
    completion_tokens: Tokens = 0
    total_tokens: Annotated[int, Meta(ge=0)] = 0


class AuditRequest(msgspec.Struct, kw_only=True):
    context_id: ReservationId
    client_id: str = ""
    response_summary: str = ""
    provider: Annotated[str, Meta(pattern=ID_PATTERN, min_length=1, max_length=128)]
    model: Annotated[str, Meta(pattern=_MODEL_PATTERN, min_length=1, max_length=200)]
    token_usage: TokenUsage = msgspec.field(default_factory=TokenUsage)
    latency_ms: Annotated[int, Meta(ge=0, le=86_400_000)] | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class RateLimitInfo(msgspec.Struct, kw_only=True):
    limit: int
    remaining: int
    reset_at: str


class PreCheckResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    context_id: str
    approved: bool
    requires_redaction: bool
    # downgrade_model (a downgrade), degraded: true (allowed by fail mode open, Redis
    # away: nothing held). The SDK keeps approved_data and drops keys it does not know.
    approved_data: dict[str, str | bool]
    policies: list[str]
    rate_limit: RateLimitInfo | None
    expires_at: str
    block_reason: str | None
    # As the native decision's: only when true (the SDK ignores it; raw HTTP callers and
    # the X-Budget-Degraded header see it).
    degraded: bool = False


class AuditResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    success: bool
    audit_id: str
    # Beyond the SDK's fields (it ignores them): what was charged and how it was priced
    # ("estimate": the model has no price, so the held estimate was charged).
    cost_usd: float
    priced_by: str
    # Only when true: the audit of a fail-open pre-check, kept until Redis answers and
    # charged then (answered 202; the SDK reads any 2xx JSON body).
    queued: bool = False


_pre_check_body = msgspec.json.Decoder(PreCheckRequest).decode
_audit_body = msgspec.json.Decoder(AuditRequest).decode
_encode = msgspec.json.Encoder().encode


def _context(context: dict[str, Any], default_estimate: float, query: str = "") -> AuthorizeRequest:
    """The authorize request a pre-check context stands for; 400 naming `context.<key>`
    for a value that cannot be an identity.

    The call's fingerprint (loop guards) is the context's `fingerprint`, else a hash of
    the SDK's `query`: unchanged SDK users get loop detection, and the text is not kept."""
    fields: dict[str, Any] = {}
    for key in (*_CONTEXT_IDS, "model", "estimated_usd", "fingerprint"):
        value = context.get(key)
        if value is None or value == "":
            continue
        fields[key] = value
    fields.setdefault("estimated_usd", default_estimate)
    if query and "fingerprint" not in fields:
        fields["fingerprint"] = loop_fingerprint(query)
    try:
        return msgspec.convert(fields, AuthorizeRequest)
    except msgspec.ValidationError as exc:
        path, message = split_validation_error(str(exc))
        field = "context" + path.removeprefix("$")
        raise ProblemError(400, f"{field}: {message}", field=field) from None


def _rate_limit(engine: Engine, decision: Decision) -> RateLimitInfo | None:
    limit = decision.rate_limit
    if limit is None:
        return None
    return RateLimitInfo(
        # The SDK's field is an integer: a dollar limit below $1 shows as 1.
        limit=limit.limit if isinstance(limit.limit, int) else max(1, round(limit.limit)),
        remaining=int(limit.remaining),
        reset_at=iso(engine.now_ms() + max(limit.retry_after_ms, 0)),
    )


def add_routes(app: web.Application, engine_key: web.AppKey[Engine]) -> None:
    async def pre_check(request: web.Request) -> web.Response:
        require(request, Role.AGENT)
        body = _pre_check_body(await request.read())
        engine = request.app[engine_key]
        req = _context(body.context, engine.config.settings.pre_check_estimate_usd, body.query)
        # No estimate in the context: the configured default is held (or a learned one).
        default = body.context.get("estimated_usd") in (None, "")
        tenant = tenant_of(request)
        decision = await engine.authorize(tenant, req, EstimateHint(default=default))
        undelivered.note(request, engine, tenant, decision)
        if not decision.allowed:
            info = decision.budget_info
            if decision.reason in ("budget", "calls") and info is not None and info.exceeded:
                # The body the SDK turns into BudgetExceededError (wire contract §5.3).
                return web.Response(
                    status=402,
                    content_type="application/json",
                    body=_encode(
                        {
                            "error": "budget_exceeded",
                            "message": decision.message or "Budget exceeded",
                            "budget_info": info,
                        }
                    ),
                )
            # Rate, concurrency and other policy denials: 200 approved false (§5.4 b).
            denied = json_response(
                PreCheckResult(
                    context_id=new_reservation_id(),
                    approved=False,
                    requires_redaction=False,
                    approved_data={},
                    policies=[],
                    rate_limit=_rate_limit(engine, decision),
                    expires_at=iso(engine.now_ms()),
                    block_reason=decision.message or "denied by policy",
                )
            )
            denied.headers.update(limit_headers.headers(decision))
            return denied
        rate_limit = _rate_limit(engine, decision)
        approved_data: dict[str, str | bool] = {}
        if decision.downgrade_model:
            approved_data["downgrade_model"] = decision.downgrade_model
        if decision.degraded:
            # Allowed by fail mode open: said where the SDK's result keeps it.
            approved_data["degraded"] = True
        allowed = json_response(
            PreCheckResult(
                # Fail-open without Redis holds nothing, but its audit is charged once
                # Redis answers (sidecar.fail_open); with none (the book full) an id no
                # audit will find.
                context_id=decision.reservation_id or new_reservation_id(),
                approved=True,
                requires_redaction=False,
                approved_data=approved_data,
                policies=[],
                rate_limit=rate_limit,
                expires_at=decision.lease_expires_at or iso(engine.now_ms()),
                block_reason=None,
                degraded=decision.degraded,
            )
        )
        if decision.degraded:
            allowed.headers["X-Budget-Degraded"] = "true"
        return allowed

    async def audit(request: web.Request) -> web.Response:
        require(request, Role.AGENT)
        body = _audit_body(await request.read())
        fallback = body.metadata.get("cost_usd")
        if fallback is not None and (
            isinstance(fallback, bool)
            or not isinstance(fallback, int | float)
            or not 0 <= fallback <= 1_000_000
        ):
            raise ProblemError(
                400, "metadata.cost_usd: a number from 0 to 1000000", field="metadata.cost_usd"
            )
        engine = request.app[engine_key]
        try:
            result = await engine.settle_call(
                tenant_of(request),
                body.context_id,
                provider=body.provider,
                model=body.model,
                tokens_in=body.token_usage.prompt_tokens,
                tokens_out=body.token_usage.completion_tokens,
                latency_ms=body.latency_ms,
                fallback_cost_usd=fallback,
            )
        except RequestError as err:
            if err.field != "reservation_id":
                raise
            raise ProblemError(
                err.status, f"no pre-check {body.context_id!r}", field="context_id"
            ) from None
        queued = result.state == "queued"
        return json_response(
            AuditResult(
                success=result.state == "settled" or queued,
                audit_id=body.context_id,
                cost_usd=result.cost_usd,
                priced_by=result.priced_by,
                queued=queued,
            ),
            status=202 if queued else 200,
        )

    app.router.add_post("/api/policy/pre-check", pre_check)
    app.router.add_post("/api/audit/llm-call", audit)
