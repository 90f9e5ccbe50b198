"""Holds whose answer never reached the caller are taken back.

A route that holds (POST /v1/authorize, the AxonFlow pre-check, /ext_authz) notes the
decision on its request. Whoever writes the answer (aiohttp's path: the guard middleware in
sidecar.api.app; the fast path: sidecar.api.fast) looks at the connection just before the
write: when it is gone (the client reset it), nobody will learn of the reservation, so
nobody will settle or release it, and it would hold its estimate until the lease ends. The
engine cancels it then (`Engine.take_back`: release.lua's cancel, which also frees the
idempotency key for the retry).

A client that sent its end of file (a FIN) may have half-closed (it still reads: it gets
its answer, on both paths) or closed for good: TCP tells the two apart only when data
arrives, which a closed socket answers with a reset. So an answer written after the end of
file is `confirm`ed: the hold stays once the peer has acknowledged every byte, and is taken
back when it resets instead.

An answer written to a peer that vanished without a FIN or RST (a pulled cable, a host that
died) lands in the kernel's buffer and cannot be told apart from one delivered: that hold
ends with its lease (TCP keep-alive or TCP_USER_TIMEOUT would only tell the sidecar later,
when nobody is left to tell; the lease already bounds it).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

from aiohttp import web

from sidecar.engine import Engine
from sidecar.schemas import Decision

# The request-mapping key under which a holding route notes (engine, tenant, decision).
HELD: web.RequestKey[tuple[Engine, str, Decision]] = web.RequestKey("held", tuple)


def note(request: Any, engine: Engine, tenant: str, decision: Decision) -> None:
    """Remember a decision that holds: its answer is about to be written."""
    if decision.reservation_id is not None:  # a replay too: its handout is taken back
        request[HELD] = (engine, tenant, decision)


def holds(request: Any) -> bool:
    """A hold is noted on `request` (its answer is being written)."""
    return HELD in request


def gone(transport: asyncio.BaseTransport | None) -> bool:
    """The answer cannot be written: the connection is closed or closing."""
    return transport is None or transport.is_closing()


def take_back(request: Any) -> None:
    """Cancel the hold noted on `request`, if any (its answer is not going to be read)."""
    noted = request.pop(HELD, None)
    if noted is not None:
        engine, tenant, decision = noted
        engine.take_back(tenant, decision)


# How long an answer written after the client's end of file may wait for the peer's
# acknowledgement (or reset) before it counts as delivered. A reset comes one round trip
# after the answer; a peer that neither acknowledges nor resets is one that vanished.
CONFIRM_S = 1.0
_TCP_CLOSE = 7  # tcp_info.tcpi_state after a reset (linux/tcp_states.h)
# struct tcp_info (linux/tcp.h): tcpi_bytes_acked at 120; tcpi_bytes_sent and
# tcpi_bytes_retrans at 200 (Linux 4.19 and later).
_TCP_INFO_LEN = 216


def _outcome(transport: asyncio.Transport, sock: Any) -> bool | None:
    """True: the peer acknowledged every byte written; False: it reset the connection
    before acknowledging them (a socket closed for good discards data, then resets; one
    that read the answer and then reset had acknowledged it); None: not known yet. On a
    system without these counters: True (the hold ends with its lease if it was lost)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except (OSError, AttributeError):
        return True
    if len(info) < _TCP_INFO_LEN:
        return True
    (acked,) = struct.unpack_from("Q", info, 120)
    sent, retransmitted = struct.unpack_from("QQ", info, 200)
    if acked >= sent - retransmitted and not transport.get_write_buffer_size():
        return True
    return False if info[0] == _TCP_CLOSE else None


async def confirm(transport: asyncio.Transport, request: Any, within_s: float = CONFIRM_S) -> None:
    """The answer to `request`, which holds, was written after the client's end of file:
    take its hold back if the peer resets instead of acknowledging it (it had closed for
    good; its kernel discarded the answer). Waits at most `within_s` (a few milliseconds
    on a live peer); the connection closes after this, so nothing else waits on it."""
    if HELD not in request:
        return
    sock = transport.get_extra_info("socket")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    pause = 0.0005
    while True:
        # A transport closing now was closed by the loop on an error (the write failed).
        delivered = False if transport.is_closing() else _outcome(transport, sock)
        if delivered is False:
            take_back(request)
            return
        if delivered or loop.time() >= deadline:
            return
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.05)
