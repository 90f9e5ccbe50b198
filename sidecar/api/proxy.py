"""The proxy hook: `/ext_authz` and every path below it, any method.

Envoy's HTTP ext_authz sends the client's method and `/ext_authz` + the original path;
nginx auth_request, Traefik and Caddy forward auth (and the HAProxy example's Lua action)
send a GET with the original URI and method in headers the proxy sets itself. Which
headers those are is the deployment's `proxy.trusted` setting: no other header is read
for them, so a client's own `X-Original-URI` cannot pick the route. Identity, model and
estimate come from headers (config `proxy.headers`), filled in by the defaults of the
route the original path and method match (`proxy.routes`), then one authorize.

Answers:
- pass (OPTIONS by default, `proxy.pass_methods`, a route's `pass_methods` or
  `hold: false`): exactly 200, empty body, `x-budget-action: pass`, nothing held.
- allow (allow, warn, downgrade): exactly 200, empty body, with `x-budget-*` headers for
  the upstream. Envoy denies on any other status, 201 and 204 included.
- budget denial: `proxy.deny_status` (429, or 403) with a JSON decision body,
  `Retry-After` (seconds until the binding budget's window ends) and RateLimit headers.
- bad identity headers: 400 problem+json naming the header (the proxy passes it on).
- Redis away and fail mode closed: 503 problem+json with `Retry-After: 1`.
Every non-200 also carries `x-budget-denial`: the body as one ASCII line, because nginx's
auth_request drops the subrequest's body and can only pass headers on.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from typing import Any

import msgspec
from aiohttp import web

from sidecar.api import limit_headers, undelivered
from sidecar.api.auth import require, tenant_of
from sidecar.api.problems import ProblemError
from sidecar.api.problems import response as problem_response
from sidecar.auth import Role
from sidecar.config import split_validation_error
from sidecar.engine import Engine, IdempotencyConflict, RequestError, Unavailable
from sidecar.learned import EstimateHint
from sidecar.model import Action
from sidecar.proxy_config import ProxySpec
from sidecar.schemas import AuthorizeRequest, BudgetInfo, Decision

PREFIX = "/ext_authz"
DENIAL_HEADER = "x-budget-denial"

_encode = msgspec.json.Encoder().encode
PASS = "pass"
# A strict decimal: digits and an optional fraction. float() would also take "1e3", "-0",
# "0_5" (as 5), "inf" and "nan"; none of them is an amount a proxy sends.
_DECIMAL = re.compile(r"[0-9]{1,7}(?:\.[0-9]{1,12})?")
_METHOD = re.compile(r"[A-Z]{1,20}")
# The identity and model fields, in AuthorizeRequest's names (= ProxyHeaders' names).
_FIELDS = ("org_id", "team_id", "agent_id", "workflow_id", "user_id", "provider", "model")


def add_routes(app: web.Application, engine_key: web.AppKey[Engine]) -> None:
    async def ext_authz(request: web.Request) -> web.Response:
        require(request, Role.AGENT)
        engine = request.app[engine_key]
        spec = engine.config.proxy
        try:
            path, method = original_path(spec, request), original_method(spec, request)
            if spec.passes(path, method):
                return web.Response(status=200, headers={"x-budget-action": PASS})
            req = authorize_request(spec, request, path, method)
            hint = estimate_hint(spec, request, path, method)
            decision = await engine.authorize(tenant_of(request), req, hint)
        except ProblemError as err:
            return _problem(err)
        except IdempotencyConflict as err:
            # A request id whose hold is gone, or that another request made: the proxy
            # must not pass this call upstream.
            denied = Decision(allowed=False, action=Action.BLOCK, message=err.message)
            return deny(engine, spec, denied)
        except RequestError as err:
            name = _header_of(spec, err)
            return _problem(ProblemError(err.status, f"{name}: {err.message}", field=name))
        except Unavailable as err:
            return _problem(
                ProblemError(
                    503,
                    f"budget store unavailable: {err}",
                    degraded=True,
                    headers={"Retry-After": "1"},
                )
            )
        undelivered.note(request, engine, tenant_of(request), decision)
        if decision.allowed:
            return web.Response(status=200, headers=allow_headers(decision))
        return deny(engine, spec, decision)

    app.router.add_route("*", PREFIX, ext_authz)
    # [\s\S]: a percent-encoded newline in the original path is still the hook, not a 404.
    app.router.add_route("*", PREFIX + r"/{tail:[\s\S]*}", ext_authz)


def _one(request: web.Request, name: str) -> str | None:
    """The value of header `name`, or None when absent; 400 naming it when the check
    carries it more than once. nginx, Traefik, Caddy and HAProxy pass a client's
    duplicates on as they came, and which copy counts differs between hops (the sidecar
    would charge the first while an upstream reads the last): the identity is ambiguous,
    and no copy is chosen for the client."""
    values = request.headers.getall(name, ())
    if len(values) > 1:
        raise ProblemError(400, f"{name}: sent {len(values)} times; send it once", field=name)
    return values[0] if values else None


def _trusted(request: web.Request, name: str) -> str:
    """The value of a header the proxy must set; 400 naming it when it did not."""
    value = _one(request, name)
    if not value:
        raise ProblemError(
            400, f"{name}: missing: proxy.trusted says the proxy sets it", field=name
        )
    return value


def original_path(spec: ProxySpec, request: web.Request) -> str:
    """The client's path without its query, percent-decoded: from the header the proxy
    owns (`proxy.trusted.uri_header`), else what follows /ext_authz in Envoy's check path
    (which aiohttp has decoded already)."""
    name = spec.trusted.uri_header
    if name is not None:
        raw = _trusted(request, name).split("?", 1)[0]
        return _unambiguous(name, urllib.parse.unquote(raw))
    return _unambiguous("path", request.path[len(PREFIX) :] or "/")


def _unambiguous(name: str, path: str) -> str:
    """`path`, or 400 naming where it came from when routes could read it as another.
    Routes match the decoded path, as every upstream router reads it: nginx, Caddy and
    HAProxy pass `/%76%31/chat/completions` on as sent, and the upstream serves
    /v1/chat/completions. An empty, `.` or `..` segment is refused rather than resolved:
    upstreams differ on whether `/v1/models/../chat/completions` is /v1/chat/completions
    (a free call if read as the `hold: false` /v1/models) or a path of its own under
    /v1/models (a free call if resolved)."""
    segments = path.split("/")[1:]
    if any(seg in ("", ".", "..") for seg in segments[:-1]) or segments[-1:] in ([".."], ["."]):
        raise ProblemError(
            400, f"{name}: an empty, . or .. path segment: {path[:100]!r}", field=name
        )
    return path


def original_method(spec: ProxySpec, request: web.Request) -> str:
    """The client's method: from `proxy.trusted.method_header`, else the check's own."""
    name = spec.trusted.method_header
    if name is None:
        return request.method
    value = _trusted(request, name)
    if not _METHOD.fullmatch(value):
        raise ProblemError(400, f"{name}: not an HTTP method: {value[:20]!r}", field=name)
    return value


def parse_usd(name: str, raw: str) -> float:
    """A strict decimal USD amount from header `name`; 400 naming it otherwise."""
    if not _DECIMAL.fullmatch(raw):
        raise ProblemError(
            400,
            f"{name}: not a decimal number of USD such as 0.05: {raw[:50]!r}",
            field=name,
        )
    return float(raw)


def estimate_hint(spec: ProxySpec, request: web.Request, path: str, method: str) -> EstimateHint:
    """A request without an estimate header holds a configured default (its route's or
    proxy.default_estimate_usd), under its route's estimate mode (sidecar.learned)."""
    return EstimateHint(
        default=request.headers.get(spec.headers.estimate_usd) is None,
        mode=spec.estimate_of(path, method),
    )


def authorize_request(
    spec: ProxySpec, request: web.Request, path: str, method: str
) -> AuthorizeRequest:
    """The authorize this proxied request asks for; ProblemError(400) naming the header
    whose value is unusable."""
    h = spec.headers
    defaults = spec.route(path, method)
    fields: dict[str, Any] = {}
    for name in _FIELDS:
        value = _one(request, getattr(h, name))
        if value is None and defaults is not None:
            value = getattr(defaults, name)
        if value is not None:
            fields[name] = value
    for name in ("run_id", "fingerprint"):
        value = _one(request, getattr(h, name))
        if value is not None:
            fields[name] = value
    raw = _one(request, h.estimate_usd)
    if raw is not None:
        fields["estimated_usd"] = parse_usd(h.estimate_usd, raw)
    elif defaults is not None and defaults.estimated_usd is not None:
        fields["estimated_usd"] = defaults.estimated_usd
    else:
        fields["estimated_usd"] = spec.default_estimate_usd
    # No request-id header configured: a client's copy is not read at all.
    request_id = _one(request, h.request_id) if h.request_id is not None else None
    if request_id is not None:
        fields["idempotency_key"] = request_id
    if spec.lease_ms is not None:
        fields["lease_ms"] = spec.lease_ms
    fields["on_expiry"] = spec.unsettled_of(path, method)
    try:
        return msgspec.convert(fields, AuthorizeRequest)
    except msgspec.ValidationError as exc:
        path, message = split_validation_error(str(exc))
        header = _HEADER_OF_FIELD.get(path.removeprefix("$."), "")
        name = getattr(h, header, header) if header else "headers"
        raise ProblemError(400, f"{name}: {message}", field=name) from None


# AuthorizeRequest field -> the ProxyHeaders attribute that fills it.
_HEADER_OF_FIELD = {
    **{f: f for f in _FIELDS},
    "estimated_usd": "estimate_usd",
    "idempotency_key": "request_id",
    "run_id": "run_id",
    "fingerprint": "fingerprint",
}


def _header_of(spec: ProxySpec, err: RequestError) -> str:
    """The header behind an engine error's field (e.g. an unpriced x-model)."""
    attr = _HEADER_OF_FIELD.get(err.field)
    return str(getattr(spec.headers, attr)) if attr else err.field


def allow_headers(decision: Decision) -> dict[str, str]:
    headers = {"x-budget-action": str(decision.action)}
    if decision.reservation_id is not None:
        headers["x-budget-reservation-id"] = decision.reservation_id
    remaining = _remaining_usd(decision)
    if remaining is not None:
        headers["x-budget-remaining-usd"] = remaining
    if decision.action == Action.DOWNGRADE and decision.downgrade_model is not None:
        headers["x-budget-downgrade-model"] = decision.downgrade_model
    if decision.degraded:
        # Fail mode open: allowed without a reservation; nothing to settle.
        headers["x-budget-degraded"] = "true"
    return headers


def _remaining_usd(decision: Decision) -> str | None:
    """The least left on any budget that applies, in USD; None when no budget applies."""
    left = [b.remaining_usd for b in decision.budgets if b.remaining_usd is not None]
    if not left:
        return None
    least = min(left)
    return f"{max(least, 0.0):.6f}"


def deny(engine: Engine, spec: ProxySpec, decision: Decision) -> web.Response:
    body = _encode(decision)
    headers = {
        **limit_headers.headers(decision),
        "x-budget-action": str(decision.action),
        DENIAL_HEADER: _one_line(_encode(_Denial.of(decision))),
    }
    return web.Response(
        status=spec.deny_status, body=body, content_type="application/json", headers=headers
    )


class _Denial(msgspec.Struct, kw_only=True):
    """The denial as nginx passes it on: the decision without its per-budget list, so the
    header stays well inside nginx's proxy_buffer_size whatever the number of budgets."""

    allowed: bool
    action: str
    message: str | None
    budget_info: BudgetInfo | None

    @classmethod
    def of(cls, d: Decision) -> _Denial:
        return cls(allowed=d.allowed, action=d.action, message=d.message, budget_info=d.budget_info)


def _one_line(body: bytes) -> str:
    # ensure_ascii escapes every non-ASCII and control character: a safe header value.
    return json.dumps(json.loads(body), ensure_ascii=True, separators=(",", ":"))


def _problem(err: ProblemError) -> web.Response:
    resp = problem_response(err)
    assert isinstance(resp.body, bytes)
    resp.headers[DENIAL_HEADER] = _one_line(resp.body)
    return resp
