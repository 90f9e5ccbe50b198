"""The aiohttp application: lifecycle, error middleware, health, and route wiring."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
from aiohttp import web
from redis.exceptions import RedisError

from sidecar import logs
from sidecar.api import admin, native, proxy
from sidecar.api.problems import ProblemError, from_decode_error, response
from sidecar.clock import Clock, SystemClock
from sidecar.definitions import DefinitionStore, DefinitionWatcher
from sidecar.engine import Engine, RequestError, Unavailable
from sidecar.events import EngineEvents
from sidecar.metrics import Metrics
from sidecar.model import Config
from sidecar.scripts import Scripts
from sidecar.store import Store, StoreError

log = logging.getLogger("sidecar.http")

ENGINE = web.AppKey("engine", Engine)
STORE = web.AppKey("store", Store)
MAX_BODY = web.AppKey("max_body_bytes", int)
WATCHER = web.AppKey("definitions", DefinitionWatcher)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map every failure to problem+json; log the unexpected ones with a request id."""
    try:
        return await handler(request)
    except ProblemError as err:
        return response(err)
    except msgspec.DecodeError as exc:
        return response(from_decode_error(exc))
    except UnicodeDecodeError:  # msgspec: a JSON string that is not UTF-8
        return response(ProblemError(400, "body: not valid UTF-8", field="body"))
    except web.RequestPayloadError as exc:  # e.g. Content-Encoding: gzip that is not
        return response(ProblemError(400, f"body: cannot be read ({exc})", field="body"))
    except RequestError as err:
        return response(ProblemError(err.status, err.message, field=err.field))
    except Unavailable as err:
        return response(
            ProblemError(503, f"budget store unavailable: {err}", degraded=True),
        )
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[MAX_BODY]
        return response(ProblemError(413, f"body: larger than {limit} bytes", field="body"))
    except web.HTTPException as exc:
        if exc.status >= 400:
            return response(ProblemError(exc.status, exc.reason))
        raise
    except StoreError:
        request_id = logs.request_id_of(request)
        log.exception(
            "store error on %s %s (request %s)",
            request.method,
            request.path,
            request_id,
            extra={"request_id": request_id},
        )
        return response(ProblemError(500, "internal error in the budget store"), request_id)
    except Exception:
        request_id = logs.request_id_of(request)
        log.exception(
            "unexpected error on %s %s (request %s)",
            request.method,
            request.path,
            request_id,
            extra={"request_id": request_id},
        )
        return response(ProblemError(500, "internal error"), request_id)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    ok = await request.app[STORE].ping()
    status = 200 if ok else 503
    return web.json_response({"ready": ok, "redis": "ok" if ok else "unreachable"}, status=status)


def create_app(
    config: Config,
    store: Store,
    *,
    clock: Clock | None = None,
    scripts: Scripts | None = None,
    events: EngineEvents | None = None,
) -> web.Application:
    """The application over a store. The store is closed with the app. With `events` a
    Metrics, /metrics and /prometheus serve it."""
    app = web.Application(
        # Request ids bind to logs only when per-decision debug lines are on.
        middlewares=[logs.request_ids, problems] if logs.debug_enabled() else [problems],
        client_max_size=config.settings.max_body_bytes,
        # Long query strings reach the handlers (and their problem+json answers).
        handler_args={"max_line_size": 65_536},
    )
    engine = Engine(
        config, store, clock or SystemClock(), scripts or Scripts.load_all(), events=events
    )
    app[ENGINE] = engine
    app[STORE] = store
    app[MAX_BODY] = config.settings.max_body_bytes

    async def store_lifecycle(app: web.Application) -> AsyncIterator[None]:
        yield
        await engine.close()
        await store.close()

    app.cleanup_ctx.append(store_lifecycle)
    watcher = DefinitionWatcher(DefinitionStore(store.client), engine)
    app[WATCHER] = watcher

    async def definitions_lifecycle(app: web.Application) -> AsyncIterator[None]:
        # Start enforcing what the admin API stored before serving, if Redis answers.
        with contextlib.suppress(RedisError, OSError):
            await watcher.refresh()
        async for _ in watcher.lifecycle():
            yield

    app.cleanup_ctx.append(definitions_lifecycle)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    native.add_routes(app, ENGINE)
    proxy.add_routes(app, ENGINE)
    admin.add_routes(app, ENGINE, WATCHER)
    if isinstance(events, Metrics):
        events.add_routes(app, engine)
    return app
