"""The stop switch's API (/v1/stops: make, list, read, lift) and the tenant's alerts of
every kind (/v1/alerts).

Writes need an admin client once clients are configured (401 without credentials, 403 for
another role), as the other definition writes do; reads any client. A stop takes effect
at the very next decision on every replica: the decision scripts read it from Redis.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable
from typing import Annotated, TypeVar

import msgspec
from aiohttp import web
from msgspec import Meta

from sidecar import alerts, keys
from sidecar.api.auth import require, tenant_of
from sidecar.api.axonflow import int_query, json_response, raw_query
from sidecar.api.problems import ProblemError
from sidecar.auth import Role
from sidecar.engine import Engine
from sidecar.model import Scope
from sidecar.schemas import Id
from sidecar.stops import MAX_REASON, MAX_TTL_S, Stop, Stops, StopsFull
from sidecar.store import StoreUnavailable

T = TypeVar("T")

# Free text, shown in decisions, logs and alerts: no control characters (a reason may end
# up in a header or a log line, where a newline would forge another).
Reason = Annotated[str, Meta(min_length=1, max_length=MAX_REASON, pattern=r"^[^\x00-\x1f\x7f]+\Z")]
TtlS = Annotated[int, Meta(ge=1, le=MAX_TTL_S)]


class StopRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """POST /v1/stops: stop every decision of one entity (and what lies below it)."""

    scope: Scope
    scope_id: Id
    reason: Reason
    # Seconds until the stop ends by itself (none: until it is lifted).
    ttl_s: TtlS | None = None

    def __post_init__(self) -> None:
        if not self.reason.strip():
            raise ValueError("reason: must not be blank")


class StopView(msgspec.Struct, kw_only=True):
    id: str
    scope: str
    scope_id: str
    reason: str
    created_at: str
    expires_at: str | None  # null: until lifted


class StopList(msgspec.Struct, kw_only=True, omit_defaults=True):
    stops: list[StopView]
    # Present when more stops follow: pass it as `cursor` for the next page.
    next_cursor: str | None = None


# A page of GET /v1/stops: at most this many (the default: every stop of a tenant at the
# default settings.max_stops comes in one answer).
PAGE_MAX = 1_000
# A cursor names the last stop of a page by its place in the list's order (created, scope,
# entity): "<created ms>.<scope>:<escaped entity>". The next page is what comes after that
# place, so stops made or lifted between pages neither repeat nor push others out.
_CURSOR = re.compile(r"^([0-9]{1,16})\.([a-z]{1,32}):([A-Za-z0-9._~@+%\-]{1,1024})\Z")
SortKey = tuple[int, str, str]


def sort_key(stop: Stop) -> SortKey:
    return (stop.created_ms, stop.scope, stop.scope_id)


def cursor_of(stop: Stop) -> str:
    return f"{stop.created_ms}.{keys.stop_field(stop.scope, stop.scope_id)}"


def parse_cursor(raw: str) -> SortKey:
    """The place a cursor names; 400 naming `cursor` for anything this sidecar did not
    make (a cursor is opaque to clients)."""
    match = _CURSOR.match(raw)
    scopes = {s.value for s in Scope}
    if match is None or match.group(2) not in scopes:
        raise ProblemError(400, "cursor: not a cursor this API gave", field="cursor")
    try:
        entity = keys.unescape(match.group(3))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProblemError(400, "cursor: not a cursor this API gave", field="cursor") from exc
    return int(match.group(1)), match.group(2), entity


class AlertList(msgspec.Struct, kw_only=True):
    """The tenant's alerts still in its stream, newest first: threshold alerts and guard
    trips (a stop made, a loop guard, a call cap, a velocity limit)."""

    alerts: list[alerts.Alert]
    count: int


_decode = msgspec.json.Decoder(StopRequest).decode


def view(stop: Stop) -> StopView:
    return StopView(
        id=stop.id,
        scope=stop.scope,
        scope_id=stop.scope_id,
        reason=stop.reason,
        created_at=stop.created_at,
        expires_at=stop.expires_at,
    )


async def _stored(call: Awaitable[T]) -> T:
    """A stops call; Redis away (or too slow) is 503, as on every route that needs it."""
    try:
        return await call
    except StoreUnavailable as exc:
        raise ProblemError(503, f"budget store unavailable: {exc}", degraded=True) from exc


def add_routes(app: web.Application, engine_key: web.AppKey[Engine], stops: Stops) -> None:
    def not_found(stop_id: str) -> ProblemError:
        return ProblemError(404, f"no stop {stop_id!r} in force", field="id")

    async def create(request: web.Request) -> web.Response:
        require(request, Role.ADMIN)
        body = _decode(await request.read())
        engine = request.app[engine_key]
        most = engine.config.settings.max_stops
        try:
            stop, _replaced = await _stored(
                stops.create(
                    tenant_of(request), body.scope, body.scope_id, body.reason, body.ttl_s, most
                )
            )  # fmt: skip
        except StopsFull as exc:
            raise ProblemError(
                409,
                f"the tenant has {most} stops in force, the most settings.max_stops allows; "
                "lift one first",
                field="scope_id",
            ) from exc
        return json_response(view(stop), status=201)

    async def list_stops(request: web.Request) -> web.Response:
        require(request, Role.READ)
        limit = int_query(request, "limit", PAGE_MAX, 1, PAGE_MAX)
        raw = raw_query(request).get("cursor")
        after = parse_cursor(raw) if raw is not None else None
        found = await _stored(stops.list(tenant_of(request)))
        if after is not None:
            found = [s for s in found if sort_key(s) > after]
        page = found[:limit]
        more = cursor_of(page[-1]) if len(found) > limit else None
        return json_response(StopList(stops=[view(s) for s in page], next_cursor=more))

    async def read(request: web.Request) -> web.Response:
        require(request, Role.READ)
        stop_id = request.match_info["stop_id"]
        found = await _stored(stops.get(tenant_of(request), stop_id))
        if found is None:
            raise not_found(stop_id)
        return json_response(view(found))

    async def delete(request: web.Request) -> web.Response:
        require(request, Role.ADMIN)
        stop_id = request.match_info["stop_id"]
        if not await _stored(stops.delete(tenant_of(request), stop_id)):
            raise not_found(stop_id)
        return web.Response(status=204)

    async def list_alerts(request: web.Request) -> web.Response:
        require(request, Role.READ)
        limit = int_query(request, "limit", 100, 1, 1000)
        engine = request.app[engine_key]
        tenant = tenant_of(request)
        found = await alerts.recent_alerts(
            engine.store_client, tenant, limit, lambda b: engine.budget_name(tenant, b)
        )
        return json_response(AlertList(alerts=found, count=len(found)))

    app.router.add_get("/v1/stops", list_stops)
    app.router.add_post("/v1/stops", create)
    app.router.add_get("/v1/stops/{stop_id}", read)
    app.router.add_delete("/v1/stops/{stop_id}", delete)
    app.router.add_get("/v1/alerts", list_alerts)
