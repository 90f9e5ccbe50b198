"""The native JSON API under /v1: authorize, settle, release, check, record, status.

Over the limit is not an error: a denial is HTTP 200 with `allowed: false`.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import msgspec
from aiohttp import web

from sidecar.api import limit_headers, undelivered
from sidecar.api.auth import require, tenant_of
from sidecar.api.problems import ProblemError
from sidecar.auth import Role
from sidecar.engine import Engine
from sidecar.schemas import (
    ID_PATTERN,
    AuthorizeRequest,
    CheckRequest,
    Decision,
    RecordRequest,
    ReleaseRequest,
    SettleRequest,
    SettleResult,
)

_encode = msgspec.json.Encoder().encode
_authorize = msgspec.json.Decoder(AuthorizeRequest)
_check = msgspec.json.Decoder(CheckRequest)
_settle = msgspec.json.Decoder(SettleRequest)
_release = msgspec.json.Decoder(ReleaseRequest)
_record = msgspec.json.Decoder(RecordRequest)
_VALID_ID = re.compile(ID_PATTERN)
_AGENT = Role.AGENT  # a module constant: an enum member lookup costs ~900 instructions on 3.11


class Headed(NamedTuple):
    """A 200 `application/json` answer with header fields of its own: a decision's
    Retry-After and RateLimit fields, in the order aiohttp writes them after
    Content-Type."""

    body: bytes
    headers: dict[str, str]


# A hot route's handler as the fast path calls it (sidecar.api.fast): the body of a 200
# `application/json` answer as bytes (or, with header fields of its own, as Headed),
# which the fast path sends with a head it builds itself, or any other answer as a
# web.Response. aiohttp's handler of the route is the same function with the answer
# wrapped (`_as_handler`).
BodyHandler = Callable[[web.Request], Awaitable["bytes | Headed | web.Response"]]
HOT = web.AppKey("hot_body_handlers", dict[str, BodyHandler])


def _json(body: Any) -> web.Response:
    return web.Response(body=_encode(body), content_type="application/json")


def _decision_body(decision: Decision) -> bytes | Headed:
    """A decision is always 200 (a denial included), with Retry-After and RateLimit fields
    where it has them."""
    if not decision.allowed or decision.rate_limit is not None:
        return Headed(_encode(decision), limit_headers.headers(decision))
    return _encode(decision)


def _settled(result: SettleResult) -> bytes | web.Response:
    """200, or 202 Accepted for the settle of a fail-open grant that waits for Redis
    (state "queued": charged once Redis answers; sidecar.fail_open)."""
    if result.state == "queued":
        return web.Response(status=202, body=_encode(result), content_type="application/json")
    return _encode(result)


def _as_handler(body_handler: BodyHandler) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        answer = await body_handler(request)
        if isinstance(answer, bytes):
            return web.Response(body=answer, content_type="application/json")
        if isinstance(answer, Headed):
            response = web.Response(body=answer.body, content_type="application/json")
            response.headers.update(answer.headers)
            return response
        return answer

    return handler


def add_routes(app: web.Application, engine_key: web.AppKey[Engine]) -> None:
    async def authorize(request: web.Request) -> bytes | Headed:
        require(request, _AGENT)
        req = _authorize.decode(await request.read())
        engine, tenant = request.app[engine_key], tenant_of(request)
        decision = await engine.authorize(tenant, req)
        if decision.reservation_id is not None:
            undelivered.note(request, engine, tenant, decision)
        return _decision_body(decision)

    async def check(request: web.Request) -> bytes | Headed:
        require(request, _AGENT)
        req = _check.decode(await request.read())
        return _decision_body(await request.app[engine_key].check(tenant_of(request), req))

    async def settle(request: web.Request) -> bytes | web.Response:
        require(request, _AGENT)
        req = _settle.decode(await request.read())
        return _settled(await request.app[engine_key].settle(tenant_of(request), req))

    async def release(request: web.Request) -> bytes | web.Response:
        require(request, _AGENT)
        req = _release.decode(await request.read())
        engine = request.app[engine_key]
        return _settled(await engine.release(tenant_of(request), req.reservation_id))

    async def record(request: web.Request) -> web.Response:
        require(request, _AGENT)
        req = _record.decode(await request.read())
        return _json(await request.app[engine_key].record(tenant_of(request), req))

    async def status(request: web.Request) -> web.Response:
        budget_id = request.match_info["budget_id"]
        scope_id = request.query.get("scope_id")
        if scope_id is not None and not _valid_id(scope_id):
            raise ProblemError(400, "scope_id: not a valid identifier", field="scope_id")
        engine = request.app[engine_key]
        return _json(await engine.status(tenant_of(request), budget_id, scope_id))

    hot: dict[str, BodyHandler] = {
        "/v1/authorize": authorize,
        "/v1/check": check,
        "/v1/settle": settle,
        "/v1/release": release,
    }
    app[HOT] = hot
    for path, body_handler in hot.items():
        app.router.add_post(path, _as_handler(body_handler))
    app.router.add_post("/v1/record", record)
    app.router.add_get("/v1/budgets/{budget_id}/status", status)


def _valid_id(value: str) -> bool:
    return len(value) <= 128 and _VALID_ID.fullmatch(value) is not None
