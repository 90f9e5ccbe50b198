"""Attacks on the fast path's end of life on a connection (sidecar.api.fast): the bytes of
a request it leaves to aiohttp arrive while a hot request of the same connection is still
in Redis. They wait for aiohttp (`FastProtocol._pending`), which takes the connection once
that answer is written. A hostile client streams without end into that wait; an ordinary
one half-closes after its last request.

- The wait holds a bounded number of bytes, then stops reading (TCP pushes back on the
  client), as aiohttp does with what it has not parsed yet (it broke: the fast path read
  and buffered 128 MiB while one authorize was in Redis).
- A client that half-closes after such a request gets every answer, its hold kept, as it
  does behind `fast_http: false` (it broke: the connection closed at the FIN, the
  authorize's answer was never written and its hold taken back; the other request was
  never answered)."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
import redis
from aiohttp.test_utils import TestServer

from sidecar.api.connection import SidecarRequestHandler
from sidecar.api.fast import FastProtocol
from tests import test_fast_path
from tests.harness import flush_data, wait_until
from tests.test_fast_path import Serve, get, post, status
from tests.test_http_edge_attacks import problem_of
from tests.test_transport_attacks import (
    HALF_MICRO,
    TENANT,
    as_deployed,
    connections,
    held_micro,
    records,
    used_micro,
)

serve = test_fast_path.serve  # the fast / plain server fixture, reused

A = post("/v1/authorize", b'{"org_id":"org-1","estimated_usd":0.5}')
# What the fast path can buffer for aiohttp at most: its bound, plus the one read in which
# it is crossed (the event loops read at most 256 KiB at a time).
BOUND = 64 * 1024 + 256 * 1024


def paused_in_redis(rc: redis.Redis) -> bool:
    return int(rc.info("clients")["blocked_clients"]) >= 1


async def authorize_in_redis(srv: TestServer, rc: redis.Redis) -> tuple[socket.socket, object]:
    """A connection whose authorize ($0.5) waits in Redis (CLIENT PAUSE WRITE, lifted by
    the caller): (the client's socket, the server's protocol)."""
    sock = socket.create_connection(("127.0.0.1", srv.port))
    sock.settimeout(10)
    sock.sendall(A)
    await asyncio.to_thread(wait_until, lambda: paused_in_redis(rc), 10, "the script paused")
    (protocol,) = connections(srv)
    return sock, protocol


async def warm(srv: TestServer, rc: redis.Redis) -> None:
    """One authorize, so the store's connections are open; then Redis emptied."""
    await test_fast_path.exchange(srv, A, 1)
    flush_data(rc)


def read_answers(sock: socket.socket, count: int) -> tuple[list[bytes], bytes]:
    """`count` answers, each framed by its Content-Length, then whatever else comes until
    the server closes (blocking; the socket has a timeout)."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    answers = []
    for _ in range(count):
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, head
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        answers.append(head + sep + data[:length])
        data = data[length:]
    return answers, data


def pending_bytes(protocol: object) -> int:
    if not isinstance(protocol, FastProtocol) or protocol._pending is None:
        return 0
    return sum(len(piece) for piece in protocol._pending)


async def test_a_stream_behind_a_decision_in_redis_is_not_buffered_without_end(
    serve: Serve, redis_client: redis.Redis
) -> None:
    """An authorize waits in Redis; on the same connection the client streams one header
    line without end (up to 64 MiB, 64 KiB a write). The fast path buffers at most BOUND
    bytes of it, then stops reading: the client's writes stall before it has sent it all.
    Once Redis runs the script: the authorize's 200, then aiohttp's 400 naming the headers
    (the line is over its limit) and the connection closed (with the client's bytes
    unread: a reset, which may overtake the 400); exactly the one hold."""
    srv = as_deployed(await serve())
    await warm(srv, redis_client)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    redis_client.execute_command("CLIENT", "PAUSE", 20_000, "WRITE")
    sent, peak, stalled = 0, 0, False
    try:
        writer.write(A)
        await writer.drain()
        await asyncio.to_thread(wait_until, lambda: paused_in_redis(redis_client), 10, "paused")
        (protocol,) = connections(srv)
        writer.write(b"POST /v1/authorize HTTP/1.1\r\nHost: x\r\nX-Pad: ")
        piece = b"p" * 65536
        while sent < 64 * 1024 * 1024:
            writer.write(piece)
            try:
                await asyncio.wait_for(writer.drain(), 0.5)
            except TimeoutError:
                stalled = True  # the server stopped reading
                break
            sent += len(piece)
            peak = max(peak, pending_bytes(protocol))
        peak = max(peak, pending_bytes(protocol))
    finally:
        redis_client.execute_command("CLIENT", "UNPAUSE")
    try:
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(first.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        first += await reader.readexactly(length)
        rest, ended = b"", False
        while not ended:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), 10)
            except ConnectionResetError:
                chunk = b""  # aiohttp closed with the client's bytes unread: a reset
            rest += chunk
            ended = not chunk
    finally:
        writer.close()
    assert (stalled, peak <= BOUND) == (True, True), (sent, peak)
    assert status(first) == 200 and b'"reservation_id"' in first
    if rest:  # (unless the reset overtook it)
        assert status(rest) == 400 and problem_of(rest)["field"] == "headers", rest[:300]
    assert held_micro(redis_client) == HALF_MICRO
    assert len(records(redis_client)) == 1 and redis_client.zcard(TENANT.leases) == 1


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("then", ["healthz", "authorize"])
async def test_a_half_close_after_a_request_in_a_later_read_gets_every_answer(
    serve: Serve, redis_client: redis.Redis, fast: bool, then: str
) -> None:
    """The authorize waits in Redis; the client sends its next request (another route's,
    or an authorize aiohttp serves) in a read of its own, then shuts
    down its sending side. Both are answered, in order, then the server closes; the holds
    are exactly the reservations the client was told of."""
    srv = as_deployed(await serve(fast=fast))
    await warm(srv, redis_client)
    # Another route's request, or an authorize aiohttp serves (HTTP/1.0 kept alive).
    later = get("/healthz")
    if then == "authorize":
        later = (
            post("/v1/authorize", b'{"org_id":"org-1","estimated_usd":0.25}')
            .replace(b"HTTP/1.1", b"HTTP/1.0")
            .replace(b"Host: x", b"Host: x\r\nConnection: keep-alive")
        )
    redis_client.execute_command("CLIENT", "PAUSE", 20_000, "WRITE")
    try:
        sock, protocol = await authorize_in_redis(srv, redis_client)
        sock.sendall(later)
        if isinstance(protocol, FastProtocol):
            await asyncio.to_thread(
                wait_until, lambda: protocol._pending is not None, 10, "left for aiohttp"
            )
        await asyncio.sleep(0.05)  # (its own read on the server; not an assertion on time)
        sock.shutdown(socket.SHUT_WR)

        def end_seen() -> bool:
            if isinstance(protocol, FastProtocol):
                t = protocol._transport
                return t is None or t.is_closing() or protocol._eof
            assert isinstance(protocol, SidecarRequestHandler)
            return protocol.transport is None or protocol._half_closed

        await asyncio.to_thread(wait_until, end_seen, 10, "the end of file seen")
    finally:
        redis_client.execute_command("CLIENT", "UNPAUSE")
    try:
        answers, rest = await asyncio.to_thread(read_answers, sock, 2)
        assert rest == b""  # then closed
    finally:
        sock.close()
    assert [status(a) for a in answers] == [200, 200], answers
    told = [json.loads(a.split(b"\r\n\r\n", 1)[1]).get("reservation_id") for a in answers]
    told = [rid for rid in told if rid]
    assert sorted(records(redis_client)) == sorted(told)
    assert len(told) == (1 if then == "healthz" else 2)
    assert held_micro(redis_client) == (HALF_MICRO if then == "healthz" else 750_000)
    assert used_micro(redis_client) == 0


async def test_a_client_that_does_not_read_its_answers_is_not_read_from(
    serve: Serve, redis_client: redis.Redis
) -> None:
    """40 authorizes pipelined in one read fill the queue (reading stops at 32), the first
    of them held in Redis; the transport then reports the client's window full
    (pause_writing: the client does not read its answers) and 20 more arrive. Once the
    queue drains the fast path reads on only when the client reads again (resume_writing):
    it resumed at a short queue whatever the writes did (the 20 were read and answered
    into a buffer nobody drained). Every answer comes; 60 holds, exactly."""
    srv = as_deployed(await serve())
    await warm(srv, redis_client)
    small = post("/v1/authorize", b'{"org_id":"org-1","estimated_usd":0.01}')
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    redis_client.execute_command("CLIENT", "PAUSE", 20_000, "WRITE")
    try:
        writer.write(small * 40)
        await writer.drain()
        await asyncio.to_thread(wait_until, lambda: paused_in_redis(redis_client), 10, "paused")
        (protocol,) = connections(srv)
        assert isinstance(protocol, FastProtocol)
        server = test_fast_path.fast_server(srv)
        await asyncio.to_thread(wait_until, lambda: server.served == 41, 10, "40 read")
        protocol.pause_writing()  # as the transport does past its high-water mark
        writer.write(small * 20)
        await writer.drain()
    finally:
        redis_client.execute_command("CLIENT", "UNPAUSE")
    await asyncio.to_thread(wait_until, lambda: protocol._task is None, 10, "the queue drained")
    await asyncio.sleep(0.05)  # (a read had its chance; not an assertion on time)
    assert server.served == 41  # the warm-up's and the 40: the 20 wait in the kernel
    protocol.resume_writing()
    try:
        bodies = []
        for _ in range(60):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            assert head.startswith(b"HTTP/1.1 200 "), head
            bodies.append(json.loads(await reader.readexactly(length)))
    finally:
        writer.close()
    assert server.served == 61 and server.handed_off == 0
    assert sorted(records(redis_client)) == sorted(b["reservation_id"] for b in bodies)
    assert held_micro(redis_client) == 60 * 10_000
