"""The aiohttp application: lifecycle, error middleware, health, and route wiring."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import cast

import msgspec
from aiohttp import web
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.typedefs import Middleware
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sidecar import __version__, logs
from sidecar.api import (
    admin,
    axonflow,
    bodies,
    connection,
    fast,
    gateway,
    native,
    openapi,
    origin,
    proxy,
    ui,
    undelivered,
    usage,
)
from sidecar.api import auth as api_auth
from sidecar.api import stops as stops_api
from sidecar.api.problems import ProblemError, from_decode_error, response
from sidecar.clock import Clock, SystemClock
from sidecar.definitions import DefinitionStore, DefinitionWatcher
from sidecar.engine import Engine, RequestError, Unavailable
from sidecar.events import EngineEvents
from sidecar.metrics import Metrics
from sidecar.model import Config
from sidecar.scripts import Scripts
from sidecar.state_loss import StateWatch
from sidecar.stops import Stops
from sidecar.store import Store, StoreError, transient_reply
from sidecar.sweep import Sweeper
from sidecar.webhooks import WebhookDeliverer

log = logging.getLogger("sidecar.http")

ENGINE = web.AppKey("engine", Engine)
STORE = web.AppKey("store", Store)
MAX_BODY = web.AppKey("max_body_bytes", int)
WATCHER = web.AppKey("definitions", DefinitionWatcher)
SWEEPER = web.AppKey("sweeper", Sweeper)
STATE_WATCH = web.AppKey("state_watch", StateWatch)


class Lifecycle:
    """Mutable serving state (app state itself is frozen once the app starts)."""

    def __init__(self) -> None:
        # Set when shutdown begins: /readyz answers 503 so load balancers stop sending
        # new work while requests in flight still finish.
        self.draining = False
        # Set when the sidecar cannot go on (its embedded Redis cannot be restarted):
        # /healthz answers 503 so a liveness probe restarts it; the process exits too.
        self.broken: str | None = None


LIFECYCLE = web.AppKey("lifecycle", Lifecycle)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def problem_of(request: web.Request, exc: Exception) -> web.Response | None:
    """The problem+json answer to an exception a handler raised (None: not ours to map).
    The unexpected ones are logged with a request id."""
    if isinstance(exc, ProblemError):
        return response(exc)
    if isinstance(exc, msgspec.DecodeError):
        return response(from_decode_error(exc))
    if isinstance(exc, UnicodeDecodeError):  # msgspec: a JSON string that is not UTF-8
        return response(ProblemError(400, "body: not valid UTF-8", field="body"))
    if isinstance(exc, web.RequestPayloadError):  # e.g. Content-Encoding: gzip that is not
        return response(ProblemError(400, f"body: cannot be read ({exc})", field="body"))
    if isinstance(exc, RequestError):
        return response(ProblemError(exc.status, exc.message, field=exc.field))
    if isinstance(exc, Unavailable):
        return response(ProblemError(503, f"budget store unavailable: {exc}", degraded=True))
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = request.app[MAX_BODY]
        return response(ProblemError(413, f"body: larger than {limit} bytes", field="body"))
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            return None  # a redirect: aiohttp sends it as it is
        # A 405 keeps its Allow header (RFC 9110 requires it).
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return response(ProblemError(exc.status, exc.reason, headers=allow))
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
        # Reads and writes off the decision path (definitions, usage, alerts) use redis-py
        # directly: Redis away is a 503 there too, not an internal error.
        return response(ProblemError(503, f"budget store unavailable: {exc}", degraded=True))
    if isinstance(exc, ResponseError) and transient_reply(str(exc)):
        # Redis refusing writes it cannot persist (MISCONF: its disk), or for want of
        # replicas (NOREPLICAS), or still loading: "not now", as for a Redis away.
        return response(ProblemError(503, f"budget store unavailable: {exc}", degraded=True))
    request_id = logs.request_id_of(request)
    store = isinstance(exc, StoreError)
    what = "store error" if store else "unexpected error"
    log.error(
        "%s on %s %s (request %s)",
        what,
        request.method,
        request.path,
        request_id,
        exc_info=exc,
        extra={"request_id": request_id},
    )
    detail = "internal error in the budget store" if store else "internal error"
    return response(ProblemError(500, detail), request_id)


# Slow clients (limits nginx also applies by default: client_header_timeout 60s,
# keepalive_timeout 75s). 75 s of idle keep-alive outlasts the idle timeouts of common
# clients (nginx upstream 60 s, aiohttp 15 s), so they close first and never reuse a
# connection the sidecar is closing.
HEADER_TIMEOUT_S = 75.0
BODY_TIMEOUT_S = 10.0  # a body is at most settings.max_body_bytes (64 KiB by default)
LINGER_S = 2.0


def guard(
    authenticate: Callable[[web.Request], None],
    body_timeout_s: float,
    max_body: int,
    screen: Callable[[web.Request], None],
) -> tuple[Middleware, fast.Whole]:
    """The one middleware every request passes (one layer, not three: each layer is a
    coroutine frame on every request and every resumption of it):

    - what a browser was tricked into sending (api.origin: a Host the sidecar does not
      answer to, a page's own call to /ext_authz), then credentials (api.auth), before
      anything is read;
    - the body rules of sidecar.api.bodies: a declared length over `max_body` is 413 at
      once; on a route's POST/PUT/PATCH a Content-Type other than JSON is 415 and an object
      with a key given twice is 400;
    - the whole body of a JSON route read before its handler, within `body_timeout_s`: a
      client trickling its body gets 408 and a closed connection (/ext_authz reads no
      body). A body already received whole, the usual case, costs no timer;
    - every failure mapped to problem+json (problem_of);
    - `Connection: close` on every answer to the AxonFlow Python SDK (see
      `closes_connection`).

    Returned with `whole`: the same checks and a hot route's body handler in one call,
    which the fast path (sidecar.api.fast) makes instead of the middleware chain.
    """

    def admit(request: web.Request) -> web.StreamResponse | None:
        """Credentials and the rules on what the head declares: an answer to give at
        once (the request goes no further), else None."""
        version = request.version
        if version < HttpVersion10 or version > HttpVersion11:
            # aiohttp serves "GET /path" with no version as HTTP/0.9, headers and all
            # (an /ext_authz hold nobody can read), and a request line that says HTTP/2.0
            # as if it were 1.1: refused as its parser refuses HTTP/1.2 or 3.0 (the fast
            # path hands every version but 1.1 to aiohttp), and nothing is charged.
            raise ProblemError(
                400,
                f"http_version: HTTP/{version.major}.{version.minor} is not served; use HTTP/1.1",
                field="http_version",
            )
        screen(request)
        authenticate(request)
        if request.can_read_body and not request.path.startswith(proxy.PREFIX):
            too_large = bodies.declared_too_large(request, max_body)
            if too_large is not None:
                # Nothing of the body is read: close rather than drain it.
                resp = response(too_large)
                resp.force_close()
                return resp
            if _json_route(request):
                unsupported = bodies.unsupported_type(request)
                if unsupported is not None:
                    return _sdk_close(request, response(unsupported))
        return None

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        resp: web.StreamResponse
        try:
            early = admit(request)
            if early is not None:
                return early
            if request.can_read_body and not request.path.startswith(proxy.PREFIX):
                if not request.content.is_eof():
                    try:
                        async with asyncio.timeout(body_timeout_s):
                            await request.read()  # cached: the handler's read() returns it
                    except TimeoutError:
                        resp = response(
                            ProblemError(
                                408, f"body: not received within {body_timeout_s:g}s", field="body"
                            )
                        )
                        resp.force_close()
                        return resp
                if _json_route(request):
                    bodies.check_duplicate_keys(await request.read())
            resp = await handler(request)
        except Exception as exc:
            answer = problem_of(request, exc)
            if answer is None:
                raise
            resp = answer
        # aiohttp writes the answer right after this, with no wait in between: a connection
        # gone now (reset, or closed at the client's end of file) means nobody learns of
        # the hold (sidecar.api.undelivered; the fast path checks in its own writer).
        if (
            undelivered.HELD in request
            and isinstance(request, web.BaseRequest)
            and undelivered.gone(request.transport)
        ):
            undelivered.take_back(request)
        return _sdk_close(request, resp)

    async def whole(
        request: web.Request, handler: native.BodyHandler
    ) -> web.Response | bytes | native.Headed:
        """This middleware and a hot route's body handler in one frame, for the fast path
        (sidecar.api.fast): its requests' bodies have arrived whole, and a 200 JSON answer
        stays bytes. The same rules, in the same order, as `guard`."""
        try:
            early = admit(request)
            if early is not None:
                return cast(web.Response, early)
            if request.can_read_body and _json_route(request):  # never /ext_authz here
                bodies.check_duplicate_keys(await request.read())
            answer = await handler(request)
        except Exception as exc:
            problem = problem_of(request, exc)
            if problem is None:
                raise
            answer = problem
        if isinstance(answer, (bytes, native.Headed)):
            return answer  # a /v1 route's 200: its connection stays open (closes_connection)
        return cast(web.Response, _sdk_close(request, answer))

    return guard, whole


def _json_route(request: web.Request) -> bool:
    # 404 and 405 answer as such, whatever the body.
    return request.method in bodies.JSON_METHODS and request.match_info.http_exception is None


def closes_connection(request: web.Request) -> bool:
    """Whether the answer closes the connection: it does for the AxonFlow Python SDK.
    Its `AxonFlow.sync()` client, used inside a running event loop, runs each call in a
    fresh loop; a kept-alive connection belongs to the loop that made it, so the second call
    fails with "Event loop is closed" unless the server closed the connection
    (../shared/reference/gotchas.md). The SDK names itself in `X-Axonflow-Client`
    (`sdk-python/<version>`, sent on every request); other clients, and the native /v1
    routes (not looked at: no header lookup on the hot path), keep their connections."""
    if request.path.startswith("/v1/"):
        return False
    client = request.headers.get(AXONFLOW_CLIENT)
    return client is not None and client.startswith("sdk-python/")


AXONFLOW_CLIENT = "X-Axonflow-Client"


def _sdk_close(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
    if closes_connection(request):
        resp.force_close()
    return resp


async def healthz(request: web.Request) -> web.Response:
    broken = request.app[LIFECYCLE].broken
    if broken is not None:
        return web.json_response({"status": "broken", "reason": broken}, status=503)
    return web.json_response({"status": "alive"})


async def health(request: web.Request) -> web.Response:
    """The AxonFlow SDK's health_check() (and its heartbeat) expect this shape."""
    return web.json_response({"status": "healthy", "version": __version__})


async def readyz(request: web.Request) -> web.Response:
    if request.app[LIFECYCLE].draining:
        return web.json_response({"ready": False, "draining": True}, status=503)
    ok = await request.app[STORE].ping()
    status = 200 if ok else 503
    body: dict[str, object] = {"ready": ok, "redis": "ok" if ok else "unreachable"}
    watch = request.app[STATE_WATCH]
    loss = watch.last_loss
    if loss is not None:
        # Still ready (every replica shares the store): the detail an operator needs.
        body["state_lost"] = msgspec.to_builtins(loss)
    if watch.eviction:
        # Still ready too: a Redis that may delete counters at its maxmemory (state_loss).
        body["redis_eviction"] = msgspec.to_builtins(watch.eviction)
    return web.json_response(body, status=status)


def create_app(
    config: Config,
    store: Store,
    *,
    clock: Clock | None = None,
    scripts: Scripts | None = None,
    events: EngineEvents | None = None,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    body_timeout_s: float = BODY_TIMEOUT_S,
    listen_host: str | None = None,
) -> web.Application:
    """The application over a store. The store is closed with the app. With `events` a
    Metrics, /metrics and /prometheus serve it. A connection that has not sent a whole
    request head within `header_timeout_s` (or stays idle that long) is closed; a body not
    received within `body_timeout_s` is answered 408. `listen_host` (serve --host) is a Host
    name it answers to (api.origin)."""
    checks, whole = guard(
        api_auth.authenticator(ENGINE),
        body_timeout_s,
        config.settings.max_body_bytes,
        origin.screener(ENGINE, listen_host),
    )
    # settings.fast_http: the hot routes on sidecar.api.fast's protocol, the rest on aiohttp.
    # Both answer what aiohttp refuses before any handler as problem+json, and a client
    # that half-closes (sidecar.api.connection).
    app_class = fast.FastApplication if config.settings.fast_http else connection.SidecarApplication
    app = app_class(
        # Request ids bind to logs only when per-decision debug lines are on.
        middlewares=[logs.request_ids, checks] if logs.debug_enabled() else [checks],
        client_max_size=config.settings.max_body_bytes,
        handler_args={
            # Long query strings reach the handlers (and their problem+json answers).
            "max_line_size": 65_536,
            # aiohttp starts this timer when a connection opens and restarts it only after
            # a response: a client trickling its request head is cut off when it fires.
            "keepalive_timeout": header_timeout_s,
            # After an early answer (408, 413) the rest of a body is read and dropped for
            # at most this long, so the client sees the answer, not a reset; then close.
            "lingering_time": LINGER_S,
        },
    )
    engine = Engine(
        config, store, clock or SystemClock(), scripts or Scripts.load_all(), events=events
    )
    app[ENGINE] = engine
    app[connection.MAX_CONNECTIONS] = lambda: engine.config.settings.max_connections
    if list(app.middlewares) == [checks]:
        # The fast path may run the guard and a hot handler in one frame (with the
        # request-id middleware of debug logging in front, it runs the chain instead).
        app[fast.WHOLE] = whole
    app[STORE] = store
    app[MAX_BODY] = config.settings.max_body_bytes
    app[LIFECYCLE] = Lifecycle()

    async def store_lifecycle(app: web.Application) -> AsyncIterator[None]:
        yield
        await engine.close()
        await store.close()

    app.cleanup_ctx.append(store_lifecycle)
    watcher = DefinitionWatcher(DefinitionStore(store.client), engine)
    app[WATCHER] = watcher

    async def definitions_lifecycle(app: web.Application) -> AsyncIterator[None]:
        # Start enforcing what the admin API stored before serving, if Redis answers
        # (StoreError: the state check the reload asks first runs a script).
        with contextlib.suppress(RedisError, OSError, StoreError):
            await watcher.refresh()
        async for _ in watcher.lifecycle():
            yield

    app.cleanup_ctx.append(definitions_lifecycle)
    deliverer = WebhookDeliverer(
        store.client,
        lambda: engine.config.webhooks,
        engine.tenants,
        engine.budget_name,
        on_attempt=events.alert_attempt if isinstance(events, Metrics) else None,
        on_dropped=events.alerts_trimmed if isinstance(events, Metrics) else None,
    )

    async def webhooks_lifecycle(app: web.Application) -> AsyncIterator[None]:
        async for _ in deliverer.lifecycle():
            yield

    app.cleanup_ctx.append(webhooks_lifecycle)
    # Collects what tenants wrote after its retention, idle tenants too (issue 16).
    sweeper = Sweeper(
        engine, store, on_dropped=events.alerts_trimmed if isinstance(events, Metrics) else None
    )
    app[SWEEPER] = sweeper

    async def sweep_lifecycle(app: web.Application) -> AsyncIterator[None]:
        async for _ in sweeper.lifecycle():
            yield

    app.cleanup_ctx.append(sweep_lifecycle)
    stops = Stops(store, engine.scripts.stops, engine.limiter_ms)
    # Notices Redis losing its state and puts back the stops and definitions it can.
    state_watch = StateWatch(
        store.client,
        engine,
        stops,
        watcher,
        on_loss=events.state_lost if isinstance(events, Metrics) else None,
        on_evicting=events.evicting if isinstance(events, Metrics) else None,
    )
    app[STATE_WATCH] = state_watch
    watcher.suspect = state_watch.check
    engine.after_loss = state_watch.after_loss
    stops.on_change = state_watch.stop_changed
    inner = getattr(store, "inner", store)  # under metrics.MeteredStore
    if hasattr(inner, "on_noscript"):
        inner.on_noscript = state_watch.check_soon

    async def state_lifecycle(app: web.Application) -> AsyncIterator[None]:
        async for _ in state_watch.lifecycle():
            yield

    app.cleanup_ctx.append(state_lifecycle)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/health", health)
    app.router.add_get("/readyz", readyz)
    native.add_routes(app, ENGINE)
    proxy.add_routes(app, ENGINE)
    admin.add_routes(app, ENGINE, WATCHER)
    stops_api.add_routes(app, ENGINE, stops)
    axonflow.add_routes(app, ENGINE, WATCHER)
    usage.add_routes(app, ENGINE)
    gateway.add_routes(app, ENGINE)
    openapi.add_route(app, config)
    ui.add_routes(app)
    if isinstance(events, Metrics):
        events.add_routes(app, engine)
    return app
