"""Attacks on the hot routes' promises (issues 19 and 20): the fast path answers every
request as aiohttp answers it (the head aiohttp refuses, the read that does not parse, the
hostile body) with Redis changed exactly as aiohttp's answer changes it; a client that
half-closes gets its answers; a client that resets while its authorize is in Redis has the
hold taken back, its retry holds once, and no error; a learned series holding text settle
cannot read starts afresh instead of failing every settle of the series."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import struct
from typing import Any

import pytest
import redis

from tests import test_fast_path
from tests.conftest import ClientFactory
from tests.harness import data_keys, flush_data, wait_until
from tests.test_fast_path import (
    AUTHORIZE,
    Serve,
    exchange,
    fast_server,
    get,
    normalized,
    post,
    status,
)
from tests.test_learned import CALL, SERIES, TENANT, doc
from tests.test_learned import call as learned_call

serve = test_fast_path.serve  # the fast / plain server fixture, reused

RESERVATIONS = "bs:{default}:res"
A = post("/v1/authorize", AUTHORIZE)
EXT = ("x-org-id: org-1", "x-provider: openai", "x-model: gpt-4o")


def redis_state(rc: redis.Redis) -> list[tuple[str, str, int]]:
    """Every key, its type and size: what a request changed (the values hold ids/clocks)."""
    out = []
    for key in data_keys(rc):
        kind = rc.type(key)
        size = {"hash": rc.hlen, "zset": rc.zcard, "list": rc.llen, "set": rc.scard}
        out.append((key, kind, size[kind](key) if kind in size else 0))
    return out


def reservations(rc: redis.Redis) -> list[str]:
    """The reservation ids in Redis (not the idempotency keys' "k:" fields beside them)."""
    return sorted(k for k in rc.hkeys(RESERVATIONS) if not k.startswith("k:"))


def comparable(answer: bytes) -> bytes:
    # A lease's end is the real clock's: a second apart on the two servers.
    return re.sub(rb'"lease_expires_at":"[^"]*"', b'"lease_expires_at":-', normalized(answer))


# (raw bytes on one connection, answers both servers give): each case broke, or might.
CASES: dict[str, tuple[bytes, int]] = {
    # Heads llhttp takes and aiohttp refuses with its own 400 (these broke: served here).
    "no Host": (A.replace(b"Host: x\r\n", b""), 1),
    "two Hosts": (A.replace(b"Host: x", b"Host: x\r\nHost: y"), 1),
    "two Content-Types": (A.replace(b"Host: x", b"Host: x\r\nContent-Type: text/plain"), 1),
    "two User-Agents": (A.replace(b"Host: x", b"Host: x\r\nUser-Agent: a\r\nUser-Agent: b"), 1),
    "Sec-WebSocket-Key1": (A.replace(b"Host: x", b"Host: x\r\nSec-WebSocket-Key1: 1"), 1),
    # aiohttp strips the blanks after a header value (this broke: a 400 here, 200 there).
    "blanks after a value": (get("/ext_authz/v1/chat", *EXT, "x-budget-estimate-usd: 0.5 \t"), 1),
    # A read that does not parse: aiohttp answers the whole read with one 400 and runs
    # none of it (these broke: the requests before the error were charged here).
    "data after Connection: close": (
        A + post("/v1/authorize", AUTHORIZE, "Connection: close") + A + A,
        1,
    ),
    "Content-Length shorter than the body": (
        A.replace(b"Content-Length: 107", b"Content-Length: 14").replace(
            AUTHORIZE, b'{"org_id":"o"}' + AUTHORIZE[14:]
        ),
        1,
    ),
    "a bad request after good ones": (A + A + b"GARBAGE\r\n\r\n", 1),
    # These held.
    "Content-Length +5": (A.replace(b"Content-Length: ", b"Content-Length: +"), 1),
    "Content-Length -1": (A.replace(b"Content-Length: 107", b"Content-Length: -1"), 1),
    "Content-Length huge": (A.replace(b"Length: 107", b"Length: " + b"9" * 30), 1),
    "Content-Length twice, same": (A.replace(b"Host: x", b"Host: x\r\nContent-Length: 107"), 1),
    "Content-Length with blanks": (A.replace(b"Content-Length: ", b"Content-Length:   "), 1),
    "absolute URI": (A.replace(b"POST /v1/", b"POST http://x/v1/"), 1),
    "HTTP/1.0 keep-alive": (
        A.replace(b"HTTP/1.1", b"HTTP/1.0").replace(
            b"Host: x", b"Host: x\r\nConnection: keep-alive"
        )
        + A,
        2,
    ),
    "HTTP/1.0 then more": (A.replace(b"HTTP/1.1", b"HTTP/1.0") + A, 1),
    "Transfer-Encoding and Content-Length": (
        A.replace(b"Host: x", b"Host: x\r\nTransfer-Encoding: chunked"),
        1,
    ),
    "NUL in a header": (A.replace(b"Host: x", b"Host: x\r\nX-Foo: a\x00b"), 1),
    "a folded header": (A.replace(b"Host: x", b"Host: x\r\nX-Foo: a\r\n b"), 1),
    "fragment on ext_authz": (get("/ext_authz/v1/chat#frag", *EXT), 1),
    # Hostile bodies: a 400 naming the field, nothing in Redis.
    "BOM": (post("/v1/authorize", b"\xef\xbb\xbf" + AUTHORIZE), 1),
    "UTF-16": (post("/v1/authorize", AUTHORIZE.decode().encode("utf-16")), 1),
    "depth 10,000": (post("/v1/authorize", b"[" * 10_000 + b"]" * 10_000), 1),
    "depth 10,000 in a field": (
        post("/v1/authorize", b'{"org_id":"o","metadata":' + b"[" * 10_000 + b"]" * 10_000 + b"}"),
        1,
    ),
    "1e400 tokens": (post("/v1/authorize", b'{"org_id":"o","estimated_tokens_in":1e400}'), 1),
    "1e400 USD": (post("/v1/authorize", b'{"org_id":"o","estimated_usd":1e400}'), 1),
    "-0 tokens": (post("/v1/authorize", b'{"org_id":"o","estimated_tokens_in":-0}'), 1),
    "1.0 tokens": (post("/v1/authorize", b'{"org_id":"o","estimated_tokens_in":1.0}'), 1),
    "NUL escaped in an id": (post("/v1/authorize", b'{"org_id":"o\\u0000x"}'), 1),
    "NUL raw in an id": (post("/v1/authorize", b'{"org_id":"o\x00x"}'), 1),
    "a lone surrogate": (post("/v1/authorize", b'{"org_id":"o\\ud800"}'), 1),
    "NUL in a reservation id": (
        post("/v1/settle", b'{"reservation_id":"a\\u0000","cost_usd":1}'),
        1,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_the_fast_path_answers_as_aiohttp_does(
    serve: Serve, redis_client: redis.Redis, name: str
) -> None:
    raw, count = CASES[name]
    fast_srv, plain_srv = await serve(fast=True), await serve(fast=False)
    seen = []
    for srv in (fast_srv, plain_srv):
        flush_data(redis_client)
        answers = await exchange(srv, raw, count)
        seen.append(([comparable(a) for a in answers], redis_state(redis_client)))
    assert seen[0] == seen[1], name
    for answer in seen[0][0]:  # never a 500, and a problem names its field
        assert status(answer) != 500
        if b"application/problem+json" in answer:
            problem = json.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert problem["field"], answer
    if any(status(a) != 200 for a in seen[0][0]):
        assert seen[0][1] == [], name  # nothing charged for a request not answered 200


async def test_data_after_connection_close_in_a_later_read_is_not_served(
    serve: Serve, redis_client: redis.Redis
) -> None:
    """Requests after a `Connection: close` one, in a read of their own, are nobody's: the
    connection closes after its answer and none of them is charged."""
    srv = await serve()
    last = post("/v1/authorize", AUTHORIZE, "Connection: close")
    answers = await exchange(srv, last, 1, A + A)
    assert [status(a) for a in answers] == [200]
    await asyncio.sleep(0.2)  # (not an assertion on time: the later read had its chance)
    assert redis_client.hlen(RESERVATIONS) == 1
    assert fast_server(srv).handed_off == 0


@pytest.mark.parametrize("count", [1, 3])
async def test_a_client_that_half_closes_gets_every_answer(
    serve: Serve, redis_client: redis.Redis, count: int
) -> None:
    """Requests, then the client shuts down its sending side: each is answered, and the
    holds in Redis are exactly the reservations the client was told of (it closed at once
    and left a hold nobody was told of)."""
    srv = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(A * count)
    await writer.drain()
    writer.write_eof()
    ids = []
    for _ in range(count):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = re.search(rb"(?i)\r\ncontent-length: (\d+)", head)
        assert length is not None and head.startswith(b"HTTP/1.1 200 ")
        ids.append(json.loads(await reader.readexactly(int(length.group(1))))["reservation_id"])
    assert await asyncio.wait_for(reader.read(), 10) == b""  # then closed
    writer.close()
    assert sorted(redis_client.hkeys(RESERVATIONS)) == sorted(ids)


async def test_a_reset_while_the_authorize_is_in_redis_is_taken_back_and_its_retry_holds(
    serve: Serve, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis holds the authorize (CLIENT PAUSE WRITE) while the client resets: the decision
    completes, and its hold, which nobody was told of, is taken back (sidecar.api
    .undelivered; it was left to its lease); a retry with the idempotency key gets a
    reservation of its own (no second hold), it settles, and nothing is logged as an error."""
    srv = await serve()
    body = AUTHORIZE.replace(b"{", b'{"idempotency_key":"k-1",')
    redis_client.execute_command("CLIENT", "PAUSE", 20_000, "WRITE")
    try:
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.sendall(post("/v1/authorize", body))
        await asyncio.to_thread(
            wait_until, lambda: fast_server(srv)._connections, 10, "the connection made"
        )
        (protocol,) = fast_server(srv)._connections

        def blocked() -> bool:
            return int(redis_client.info("clients")["blocked_clients"]) >= 1

        await asyncio.to_thread(wait_until, blocked, 10, "the authorize paused in Redis")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset, not a FIN
        # (aiohttp's registry keeps a connection until its request is done: not that.)
        await asyncio.to_thread(
            wait_until, lambda: protocol._transport is None, 10, "the reset seen"
        )
    finally:
        redis_client.execute_command("CLIENT", "UNPAUSE")

    def taken_back() -> bool:
        ids = reservations(redis_client)
        return len(ids) == 1 and redis_client.hget(RESERVATIONS, ids[0]).startswith("R|")

    await asyncio.to_thread(wait_until, taken_back, 10, "the hold written, then taken back")
    (first,) = reservations(redis_client)
    (retry,) = await exchange(srv, post("/v1/authorize", body), 1)
    decision = json.loads(retry.split(b"\r\n\r\n", 1)[1])
    held = decision["reservation_id"]
    assert (status(retry), decision["replayed"]) == (200, False) and held != first
    assert reservations(redis_client) == sorted([first, held])
    settle = json.dumps({"reservation_id": held, "cost_usd": 0.005}).encode()
    (settled,) = await exchange(srv, post("/v1/settle", settle), 1)
    assert status(settled) == 200 and b'"state":"settled"' in settled
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


# ---- learned estimates: a series whose text settle cannot read -------------------------


@pytest.mark.parametrize(
    "garbage",
    ["garbage", "", "7:abc", "-5:3:1,2:2.1", "5:7:abc,1:x", "1" * 30 + ":5:1:1.1"],
)
async def test_a_series_settle_cannot_read_starts_afresh(
    make_client: ClientFactory, redis_client: redis.Redis, garbage: str
) -> None:
    """A learned series overwritten with text (by hand, a bad restore): authorize holds the
    caller's figure, settle answers 200 and teaches the series afresh. (It answered 500 for
    every settle of the series, after settle.lua had written the charge.)"""
    client = await make_client(doc(10))
    for _ in range(6):
        await learned_call(client, 0.02)
    redis_client.hset(TENANT.estimates, SERIES, garbage)
    r = await client.post("/v1/authorize", json={**CALL, "estimated_usd": 0.01})
    decision: dict[str, Any] = await r.json()
    assert (r.status, decision["estimate_source"]) == (200, "caller")
    rid = decision["reservation_id"]
    r = await client.post("/v1/settle", json={"reservation_id": rid, "cost_usd": 0.02})
    assert r.status == 200, await r.text()
    assert redis_client.hget(TENANT.estimates, SERIES) == "1:20000:20000:20000"
    r = await client.get("/v1/budgets/cap/status?scope_id=agent-1")
    assert (await r.json())["used_usd"] == pytest.approx(0.14)  # 7 calls of $0.02
