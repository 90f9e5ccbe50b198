"""Holds whose answer never reached the caller are taken back.

A route that holds (POST /v1/authorize, the AxonFlow pre-check, /ext_authz) notes the
decision on its request. Whoever writes the answer (aiohttp's path: the guard middleware in
sidecar.api.app; the fast path: sidecar.api.fast) looks at the connection just before the
write: when it is gone (the client reset it, or closed or half-closed it and aiohttp closed
it on that end of file), nobody will learn of the reservation, so nobody will settle or
release it, and it would hold its estimate until the lease ends. The engine cancels it then
(`Engine.take_back`: release.lua's cancel, which also frees the idempotency key for the
retry). An answer written to a peer that has closed without telling (no FIN or RST yet)
cannot be told apart from one delivered: that hold stays until its lease ends, as before.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from sidecar.engine import Engine
from sidecar.schemas import Decision

# The request-mapping key under which a holding route notes (engine, tenant, decision).
HELD: web.RequestKey[tuple[Engine, str, Decision]] = web.RequestKey("held", tuple)


def note(request: Any, engine: Engine, tenant: str, decision: Decision) -> None:
    """Remember a decision that holds: its answer is about to be written."""
    if decision.reservation_id is not None and not decision.replayed:
        request[HELD] = (engine, tenant, decision)


def gone(transport: asyncio.BaseTransport | None) -> bool:
    """The answer cannot be written: the connection is closed or closing."""
    return transport is None or transport.is_closing()


def take_back(request: Any) -> None:
    """Cancel the hold noted on `request`, if any (its answer is not going to be read)."""
    noted = request.pop(HELD, None)
    if noted is not None:
        engine, tenant, decision = noted
        engine.take_back(tenant, decision)
