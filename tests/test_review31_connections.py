"""Review of settings.max_connections (sidecar.api.connection): which connections count as
idle (what the bound may close to make room) on both HTTP paths, and a reload that lowers
the bound below the number open.

Over the session's redis-server, apps in-process on a free port (tests/test_attack29_
exhaustion's `serve`, BOUND = 16), raw sockets.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from sidecar.api.app import ENGINE
from tests.conftest import make_config
from tests.test_attack29_exhaustion import (
    AUTH_BODY,
    BOUND,
    DOC,
    HEALTH,
    Serve,
    answer,
    close_all,
    closed,
    connect,
    serve,  # noqa: F401 (the fixture)
    server_of,
    until,
)
from tests.test_fast_path import post, status
from tests.test_transport_attacks import records


@pytest.mark.parametrize("fast", [True, False])
async def test_a_request_whose_head_came_and_body_not_yet_is_not_idle(
    serve: Serve,  # noqa: F811
    redis_client: redis.Redis,
    fast: bool,
) -> None:
    """BOUND authorizes each sent up to the end of its head, the body not begun (a client
    that writes the head and the body in two writes, a proxy streaming it): every one is
    in a request, as aiohttp's path has it (its handler runs from the head on). The fast
    path hands a request whose read ends before its body to aiohttp, so it holds there
    too. Held on both: the new connection is refused (evicted 0, refused 1), all 16
    answered 200 and held once each."""
    srv = await serve(fast)
    whole = post("/v1/authorize", AUTH_BODY)
    head = len(whole) - len(AUTH_BODY)
    assert whole[:head].endswith(b"\r\n\r\n")
    busy = []
    for _ in range(BOUND):
        conn = await connect(srv)
        conn[1].write(whole[:head])
        await conn[1].drain()
        busy.append(conn)
    server = server_of(srv)
    await until(lambda: len(server.open) == BOUND, "all open")
    if not fast:  # aiohttp's handler has each head (its body is read by the handler)
        await until(lambda: not any(h.idle() for h in server.open.values()), "in requests")
    extra = await connect(srv)
    assert await closed(extra)
    assert (server.evicted, server.refused) == (0, 1)
    answers = [await answer(c, whole[head:]) for c in busy]
    assert [status(a) if a else None for a in answers] == [200] * BOUND
    ids = {json.loads(a.split(b"\r\n\r\n", 1)[1])["reservation_id"] for a in answers if a}
    assert len(ids) == BOUND and set(records(redis_client)) == ids
    await close_all([*busy, extra])


def bound_to(srv: Any, fast: bool, most: int) -> None:
    """A reload to max_connections `most` (the engine's config swapped, as reload does)."""
    settings = {"fast_http": fast, "max_connections": most}
    srv.app[ENGINE].swap(make_config({**DOC, "settings": settings}))


@pytest.mark.parametrize("fast", [True, False])
async def test_a_reload_lowering_max_connections_below_those_open_is_enforced(
    serve: Serve,  # noqa: F811
    fast: bool,
) -> None:
    """32 connections idle after an answer (max_connections 32); a reload lowers it to 16.
    The next connection closed one idle connection, so 32 stayed open (33 - 1) and every
    later one kept it at 32: a lowered bound was never reached while clients reconnect
    (evicted 1, 32 open). Now the next connection closes the idle ones open longest until
    the bound holds: 17 closed, 16 open (the 15 newest old ones and the new one), each
    still served."""
    srv = await serve(fast)
    server = server_of(srv)
    first, lowered = 2 * BOUND, BOUND
    bound_to(srv, fast, first)
    old = [await connect(srv) for _ in range(first)]
    assert [status(a) if (a := await answer(c, HEALTH)) else None for c in old] == [200] * first
    await until(lambda: len(server.open) == first, "all open")
    assert (server.evicted, server.refused) == (0, 0)
    bound_to(srv, fast, lowered)
    new = await connect(srv)
    assert (a := await answer(new, HEALTH)) is not None and status(a) == 200
    gone = first + 1 - lowered
    assert [await closed(c) for c in old[:gone]] == [True] * gone
    kept = [await answer(c, HEALTH) for c in old[gone:]]
    assert [status(a) if a else None for a in kept] == [200] * (lowered - 1)
    await until(lambda: len(server.open) == lowered, "the lowered bound")
    assert (server.evicted, server.refused) == (gone, 0)
    await close_all([*old, new])
