"""Pipelined and interrupted requests on the hot routes, fast path on and off: answers in
order, exactly the good ones held; a request split into one-byte writes is answered as
whole; `Expect: 100-continue` with its body at once or after the 100; a client that resets
or half-closes mid-body holds nothing; a pipeline whose client goes while the first of it
is in Redis leaves nothing held."""

from __future__ import annotations

import asyncio
import json
import socket
import struct

import pytest
import redis
from aiohttp.test_utils import TestServer

from tests import test_fast_path
from tests.harness import flush_data, wait_until
from tests.test_fast_path import Serve, fast_server, post, status
from tests.test_hot_path_attacks import comparable
from tests.test_http_edge_attacks import problem_of
from tests.test_transport_attacks import (
    HALF_MICRO,
    TENANT,
    as_deployed,
    connections,
    held_micro,
    records,
    transport_of,
    used_micro,
)

serve = test_fast_path.serve  # the fast / plain server fixture, reused

GOOD = b'{"org_id":"org-1","estimated_usd":0.5}'
A = post("/v1/authorize", GOOD)
# (body, status, the field a 400 names)
PIPELINE: list[tuple[bytes, int, str | None]] = [
    (GOOD, 200, None),
    (GOOD, 200, None),
    (b"{not json", 400, "body"),
    (b'{"org_id":7,"estimated_usd":0.5}', 400, "org_id"),
    (b'{"org_id":"org-1","estimated_usd":-1}', 400, "estimated_usd"),
    (GOOD, 200, None),
]
RAW = b"".join(post("/v1/authorize", body) for body, _, _ in PIPELINE)


def outcome(answers: list[bytes]) -> list[tuple[int, str | None]]:
    return [(status(a), problem_of(a)["field"] if status(a) == 400 else None) for a in answers]


def told(answers: list[bytes]) -> list[str]:
    ids = [json.loads(a.partition(b"\r\n\r\n")[2]).get("reservation_id") for a in answers]
    return [i for i in ids if i]


async def byte_by_byte(srv: TestServer, raw: bytes, count: int) -> list[bytes]:
    """`raw` written one byte a write (no Nagle delay: each its own segment), then
    `count` answers read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for i in range(len(raw)):
            writer.write(raw[i : i + 1])
            await writer.drain()
        out = []
        for _ in range(count):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            out.append(head + await reader.readexactly(length))
        return out
    finally:
        writer.close()


@pytest.mark.parametrize("how", ["one write", "a byte a write"])
async def test_a_pipeline_with_bad_requests_inside_holds_exactly_the_good_ones(
    serve: Serve, redis_client: redis.Redis, how: str
) -> None:
    """Six authorizes on one connection, three of them bad (JSON that does not parse, a
    number for an id, a negative estimate): six answers in order, each 400 a problem
    naming its field, and exactly the three good ones held (the ids they were told of),
    the same on both paths."""
    seen = []
    for fast in (True, False):
        srv = await serve(fast=fast)
        flush_data(redis_client)
        if how == "one write":
            answers = await test_fast_path.exchange(srv, RAW, len(PIPELINE))
        else:
            answers = await byte_by_byte(srv, RAW, len(PIPELINE))
        assert outcome(answers) == [(s, f) for _, s, f in PIPELINE], fast
        assert sorted(records(redis_client)) == sorted(told(answers)) and len(told(answers)) == 3
        assert (held_micro(redis_client), used_micro(redis_client)) == (3 * HALF_MICRO, 0)
        seen.append([comparable(a) for a in answers])
        if fast and how == "one write":
            assert (fast_server(srv).served, fast_server(srv).handed_off) == (6, 0)
    assert seen[0] == seen[1]


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("body_at_once", [True, False])
async def test_expect_100_continue_is_answered_and_holds_once(
    serve: Serve, redis_client: redis.Redis, fast: bool, body_at_once: bool
) -> None:
    """`Expect: 100-continue`: a 100 Continue, then the 200 of the authorize, one hold,
    whether the body follows the head at once or only after the 100."""
    srv = await serve(fast=fast)
    raw = post("/v1/authorize", GOOD, "Expect: 100-continue")
    head, body = raw[: raw.index(b"\r\n\r\n") + 4], raw[raw.index(b"\r\n\r\n") + 4 :]
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(raw if body_at_once else head)
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        if not body_at_once:
            writer.write(body)
        final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(final.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        final += await reader.readexactly(length)
    finally:
        writer.close()
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert status(final) == 200 and told([final]) == sorted(records(redis_client))
    assert held_micro(redis_client) == HALF_MICRO


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("how", ["reset", "half-close", "expect, then gone"])
async def test_a_client_gone_mid_body_holds_nothing(
    serve: Serve, redis_client: redis.Redis, fast: bool, how: str
) -> None:
    """The head and half the body of an authorize (or, with Expect, the head only, the
    100 read), then the client resets or half-closes: no answer (there was no whole
    request), the connection closed, and nothing in Redis."""
    srv = await serve(fast=fast)
    await test_fast_path.exchange(srv, A, 1)  # the store's connections open
    flush_data(redis_client)
    if how == "expect, then gone":
        raw = post("/v1/authorize", GOOD, "Expect: 100-continue")
        sent = raw[: raw.index(b"\r\n\r\n") + 4]
    else:
        sent = A[: A.index(b"\r\n\r\n") + 4 + len(GOOD) // 2]
    sock = socket.create_connection(("127.0.0.1", srv.port))
    sock.settimeout(10)
    try:
        sock.sendall(sent)
        if how == "expect, then gone":
            interim = await asyncio.to_thread(sock.recv, 100)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        await asyncio.to_thread(wait_until, lambda: connections(srv), 10, "connected")
        (protocol,) = connections(srv)
        await asyncio.sleep(0.05)  # (the bytes read; not an assertion on time)
        if how == "half-close":
            sock.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := await asyncio.to_thread(sock.recv, 65536):
                got += chunk
            assert got == b""  # closed without an answer: there was no whole request
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        await asyncio.to_thread(wait_until, lambda: not connections(srv), 10, "closed")
    finally:
        sock.close()
    assert transport_of(protocol) is None
    assert records(redis_client) == {} and held_micro(redis_client) == 0
    assert redis_client.zcard(TENANT.leases) == 0


def paused_in_redis(rc: redis.Redis) -> bool:
    return int(rc.info("clients")["blocked_clients"]) >= 1


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("how", ["reset", "close"])
async def test_a_pipeline_whose_client_goes_while_its_first_is_in_redis_holds_nothing(
    serve: Serve, redis_client: redis.Redis, fast: bool, how: str
) -> None:
    """Three authorizes in one write; the first waits in Redis (CLIENT PAUSE WRITE) when
    the client resets, or closes for good (a FIN, then a reset for the answer it does not
    read). Whatever ran of the three, nothing stays held: every reservation released,
    none charged, the lease index empty."""
    srv = as_deployed(await serve(fast=fast))
    await test_fast_path.exchange(srv, A, 1)  # the store's connections open
    flush_data(redis_client)
    sock = socket.create_connection(("127.0.0.1", srv.port))
    redis_client.execute_command("CLIENT", "PAUSE", 20_000, "WRITE")
    try:
        sock.sendall(A * 3)
        await asyncio.to_thread(wait_until, lambda: paused_in_redis(redis_client), 10, "paused")
        if how == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        await asyncio.sleep(0.05)  # (the end seen by the server; not an assertion on time)
    finally:
        redis_client.execute_command("CLIENT", "UNPAUSE")
    await asyncio.to_thread(wait_until, lambda: not connections(srv), 10, "closed")

    def settled_down() -> bool:
        done = records(redis_client)
        return bool(done) and all(r.startswith("R|") for r in done.values())

    await asyncio.to_thread(wait_until, settled_down, 10, "every hold taken back")
    assert 1 <= len(records(redis_client)) <= 3
    assert (held_micro(redis_client), used_micro(redis_client)) == (0, 0)
    assert redis_client.zcard(TENANT.leases) == 0
