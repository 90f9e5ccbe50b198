"""Who is calling: credentials to a Client (tenant and role), checked once per request.

`Authorization: Basic base64(client_id:secret)` and/or `X-Client-ID: client_id`, the way
the AxonFlow SDK sends them. Open mode (no client configured): every caller is the
default tenant's admin. Health, readiness, metrics and the OpenAPI document need no
credentials: probes and scrapers carry none.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable

from aiohttp import web

from sidecar.api import ui
from sidecar.api.problems import ProblemError
from sidecar.auth import OPEN, Client, Role
from sidecar.engine import Engine

OPEN_PATHS = frozenset(
    {"/healthz", "/health", "/readyz", "/metrics", "/prometheus", "/openapi.json", *ui.PATHS}
)
PRINCIPAL = web.RequestKey("principal", Client)
_CHALLENGE = {"WWW-Authenticate": 'Basic realm="budget-sidecar", charset="UTF-8"'}


def tenant_of(request: web.Request) -> str:
    """The tenant that owns this request's budgets, limits and counters."""
    principal: Client = request.get(PRINCIPAL, OPEN)
    return principal.tenant


def require(request: web.Request, role: Role) -> None:
    """403 unless the caller's role allows `role`'s operations."""
    principal: Client = request.get(PRINCIPAL, OPEN)
    if not principal.may(role):
        raise ProblemError(
            403, f"client {principal.client_id!r} ({principal.role}) may not do this"
        )


def _unauthorized(detail: str) -> ProblemError:
    return ProblemError(401, detail, headers=dict(_CHALLENGE))


def _single(request: web.Request, name: str) -> str | None:
    """The header's one value; 401 when it is given twice. Which of two credentials counts
    is not ours to pick: a proxy or log in front may take the other (the last, where this
    would take the first), so a request would be checked as one client and acted on, or
    recorded, as another."""
    values = request.headers.getall(name, ())
    if len(values) > 1:
        raise _unauthorized(f"{name}: given {len(values)} times; send one")
    return values[0] if values else None


def _presented(request: web.Request) -> tuple[str | None, str | None]:
    """(client id, secret) from the request; raises 401 when they contradict or are garbled."""
    header_id = _single(request, "X-Client-ID")
    auth = _single(request, "Authorization")
    if auth is None:
        return header_id, None
    scheme, _, value = auth.partition(" ")
    if scheme.lower() != "basic":
        raise _unauthorized("Authorization: only Basic client_id:secret is accepted")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise _unauthorized("Authorization: not base64 of client_id:secret") from None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise _unauthorized("Authorization: not base64 of client_id:secret")
    if header_id is not None and header_id != client_id:
        raise _unauthorized("X-Client-ID and Authorization name different clients")
    return client_id, secret


def authenticator(engine_key: web.AppKey[Engine]) -> Callable[[web.Request], None]:
    """The check every request passes before its handler: sets the request's PRINCIPAL,
    or raises 401. A plain function, called by the app's one middleware (api.app.guard):
    a middleware layer of its own costs more than the check itself."""
    # (the config the map was built from, its clients by id). The config itself, not its
    # id(): a freed config's id() is reused by the next object allocated in its memory,
    # which may be a later config, so a reload that removed a client could go unseen.
    cache: list[tuple[object, dict[str, Client]]] = []

    def clients_of(engine: Engine) -> dict[str, Client]:
        # Rebuilt when a reload swaps the config.
        config = engine.config
        if not cache or cache[0][0] is not config:
            cache[:] = [(config, {c.client_id: c for c in config.clients})]
        return cache[0][1]

    def authenticate(request: web.Request) -> None:
        clients = clients_of(request.app[engine_key])
        if not clients or request.path in OPEN_PATHS:
            return
        client_id, secret = _presented(request)
        if client_id is None:
            raise _unauthorized("credentials required: HTTP Basic client_id:secret")
        client = clients.get(client_id)
        # The same answer for an unknown id and a wrong secret: nothing to probe ids with.
        if client is None or not client.accepts(secret):
            raise _unauthorized("invalid credentials")
        request[PRINCIPAL] = client

    return authenticate
