"""The admin API for rate limits: /v1/rate-limits (list, create, read, replace, delete).

Definitions from the config file are listed with `source: config` and are read-only here
(409); the file is their source of truth. API definitions are the tenant's own, stored in
Redis and enforced by every replica within about a second (sidecar.definitions).

Writes need an admin client once clients are configured (401 without credentials, 403
for a client of another role); in open mode (no clients) any local caller may write.
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from sidecar.api.auth import require, tenant_of
from sidecar.api.problems import ProblemError
from sidecar.auth import Role
from sidecar.config import RateLimitSpec
from sidecar.definitions import DefinitionWatcher
from sidecar.engine import Engine
from sidecar.model import USD_UNIT_MICRO, Metric, RateLimit
from sidecar.money import MICRO

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(RateLimitSpec).decode


class RateLimitView(msgspec.Struct, kw_only=True):
    id: str
    scope: str
    metric: str
    limit: int | float  # dollars for metric usd
    window: str | None
    burst: int | float
    scope_id: str | None
    model: str | None
    provider: str | None
    mode: str
    source: str  # config | api


def format_duration(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def view(limit: RateLimit) -> RateLimitView:
    shown: tuple[int | float, int | float] = (limit.limit, limit.burst)
    if limit.metric is Metric.USD:
        shown = (limit.limit * USD_UNIT_MICRO / MICRO, limit.burst * USD_UNIT_MICRO / MICRO)
    return RateLimitView(
        id=limit.id,
        scope=limit.scope,
        metric=limit.metric,
        limit=shown[0],
        window=format_duration(limit.window_ms) if limit.window_ms else None,
        burst=shown[1],
        scope_id=limit.scope_id,
        model=limit.model,
        provider=limit.provider,
        mode=limit.mode,
        source=limit.source,
    )


def full(kind: str, most: int) -> str:
    return (
        f"the tenant has {most} {kind} made through the API, the most "
        "settings.max_api_definitions allows; delete one first"
    )


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(body=_encode(body), status=status, content_type="application/json")


def add_routes(
    app: web.Application,
    engine_key: web.AppKey[Engine],
    watcher_key: web.AppKey[DefinitionWatcher],
) -> None:
    def find(request: web.Request, limit_id: str) -> RateLimit | None:
        engine = request.app[engine_key]
        for limit in (*engine.config.rate_limits, *engine.api_limits(tenant_of(request))):
            if limit.id == limit_id:
                return limit
        return None

    def writable(request: web.Request, limit_id: str) -> RateLimit | None:
        found = find(request, limit_id)
        if found is not None and found.source == "config":
            raise ProblemError(
                409,
                f"rate limit {limit_id!r} is defined in the config file; change it there",
                field="id",
            )
        return found

    async def list_limits(request: web.Request) -> web.Response:
        engine = request.app[engine_key]
        limits = (*engine.config.rate_limits, *engine.api_limits(tenant_of(request)))
        return _json({"rate_limits": [view(limit) for limit in limits]})

    async def create(request: web.Request) -> web.Response:
        require(request, Role.ADMIN)
        spec = _decode(await request.read())
        if find(request, spec.id) is not None:
            writable(request, spec.id)  # 409 for a config-file id
            raise ProblemError(409, f"rate limit {spec.id!r} exists; PUT replaces it", field="id")
        watcher = request.app[watcher_key]
        # Another replica may have made this id since this one last loaded: one wins.
        most = request.app[engine_key].config.settings.max_api_definitions
        done = await watcher.store.create_rate_limit(tenant_of(request), spec, most)
        if done == "full":
            raise ProblemError(409, full("rate limits", most), field="id")
        if done == "exists":
            raise ProblemError(409, f"rate limit {spec.id!r} exists; PUT replaces it", field="id")
        await watcher.refresh()
        return _json(view(spec.to_rate_limit("api")), status=201)

    async def read(request: web.Request) -> web.Response:
        limit_id = request.match_info["limit_id"]
        found = find(request, limit_id)
        if found is None:
            raise ProblemError(404, f"no rate limit {limit_id!r}", field="id")
        return _json(view(found))

    async def replace(request: web.Request) -> web.Response:
        require(request, Role.ADMIN)
        limit_id = request.match_info["limit_id"]
        spec = _decode(await request.read())
        if spec.id != limit_id:
            raise ProblemError(400, "id: the body's id must be the path's id", field="id")
        if writable(request, limit_id) is None:
            raise ProblemError(404, f"no rate limit {limit_id!r}", field="id")
        watcher = request.app[watcher_key]
        # Deleted through another replica since this one last loaded: not brought back.
        if not await watcher.store.replace_rate_limit(tenant_of(request), spec):
            raise ProblemError(404, f"no rate limit {limit_id!r}", field="id")
        await watcher.refresh()
        return _json(view(spec.to_rate_limit("api")))

    async def delete(request: web.Request) -> web.Response:
        require(request, Role.ADMIN)
        limit_id = request.match_info["limit_id"]
        if writable(request, limit_id) is None:
            raise ProblemError(404, f"no rate limit {limit_id!r}", field="id")
        watcher = request.app[watcher_key]
        await watcher.store.delete_rate_limit(tenant_of(request), limit_id)
        await watcher.refresh()
        return web.Response(status=204)

    app.router.add_get("/v1/rate-limits", list_limits)
    app.router.add_post("/v1/rate-limits", create)
    app.router.add_get("/v1/rate-limits/{limit_id}", read)
    app.router.add_put("/v1/rate-limits/{limit_id}", replace)
    app.router.add_delete("/v1/rate-limits/{limit_id}", delete)
