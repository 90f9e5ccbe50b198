"""Attacks on the edges of HTTP where aiohttp answers before the sidecar's handlers, and
on the end of a connection:

- every request line or head aiohttp's parser refuses (and a body whose framing breaks)
  is answered 400 application/problem+json naming what was wrong, on both paths (fast
  path on and off), with an X-Request-ID when request ids are on, and charges nothing;
- an HTTP/0.9 request (a bare "GET /path", which aiohttp serves) is refused the same way,
  and holds nothing (its /ext_authz held);
- a client that half-closes after its request gets its answer and keeps its hold on
  both paths; one that closed for good (the same FIN) has the hold taken back, once its
  kernel resets the answer (sidecar.api.undelivered.confirm)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
import redis

from sidecar.api.connection import SidecarRequestHandler
from sidecar.api.fast import FastProtocol
from tests import test_fast_path
from tests.harness import flush_data, wait_until
from tests.test_fast_path import Serve, exchange, post, status
from tests.test_hot_path_attacks import redis_state
from tests.test_transport_attacks import (
    HALF_MICRO,
    HOLDING,
    TENANT,
    as_deployed,
    connections,
    ends_while_deciding,
    held_micro,
    read_answer,
    records,
    taken_back,
    transport_of,
    used_micro,
)

serve = test_fast_path.serve  # the fast / plain server fixture, reused

A = post("/v1/authorize", b'{"org_id":"org-1","estimated_usd":0.5}')
HEAD = b"POST /v1/authorize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
BODY = b'{"org_id":"org-1","estimated_usd":0.5}'
CL = b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY


def chunked(chunks: bytes) -> bytes:
    return HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunks


EXT = b"GET /ext_authz/v1/chat HTTP/1.1\r\nHost: x\r\nx-org-id: org-1\r\n"
# name -> (raw request, the field its problem names). Every one is a hot route's request
# (it would hold, were it served), so "nothing charged" means something.
REFUSED: dict[str, tuple[bytes, str]] = {
    "garbage request line": (b"GARBAGE\r\n\r\n", "method"),
    "a method with a bad character": (b"G@T /ext_authz HTTP/1.1\r\nHost: x\r\n\r\n", "method"),
    "a lowercase method": (HEAD.replace(b"POST", b"post") + CL, "method"),
    "TLS on the HTTP port": (b"\x16\x03\x01\x00\xa5\x01\x00\x00\x00", "method"),
    "an unknown HTTP version": (HEAD.replace(b"HTTP/1.1", b"HTTP/9.9") + CL, "http_version"),
    "a version that is not a number": (
        HEAD.replace(b"HTTP/1.1", b"HTTP/1.x") + CL,
        "http_version",
    ),
    "the HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "http_version"),
    "a space in the target": (
        HEAD.replace(b"/v1/authorize", b"/v1/auth orize") + CL,
        "request_line",
    ),
    "a control character in the target": (
        HEAD.replace(b"/v1/authorize", b"/v1/auth\x01orize") + CL,
        "request_target",
    ),
    "a request line over the limit": (
        HEAD.replace(b"/v1/authorize", b"/v1/authorize?" + b"a" * 70_000) + CL,
        "request_target",
    ),
    "a header name with a space": (HEAD + b"Bad Header: 1\r\n" + CL, "headers"),
    "a header line without a colon": (HEAD + b"NoColon\r\n" + CL, "headers"),
    "a space before the colon": (HEAD + b"Content-Length : 2\r\n\r\n{}", "headers"),
    "a control character in a value": (HEAD + b"X-Note: a\x01b\r\n" + CL, "X-Note"),
    "a folded header line": (HEAD + b"X-Note: a\r\n b\r\n" + CL, "headers"),
    "a header over the limit": (HEAD + b"X-Big: " + b"q" * 9000 + b"\r\n" + CL, "headers"),
    "200 headers": (
        HEAD + b"".join(b"X-Pad-%d: 1\r\n" % i for i in range(200)) + CL,
        "headers",
    ),
    "no Host": (HEAD.replace(b"Host: x\r\n", b"") + CL, "Host"),
    "two Hosts": (HEAD.replace(b"Host: x\r\n", b"Host: x\r\nHost: y\r\n") + CL, "Host"),
    "a Content-Length that is not a number": (
        HEAD + b"Content-Length: 4x\r\n\r\n{}",
        "Content-Length",
    ),
    "a negative Content-Length": (HEAD + b"Content-Length: -1\r\n\r\n{}", "Content-Length"),
    "two Content-Lengths": (
        HEAD + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        "Content-Length",
    ),
    "Content-Length and Transfer-Encoding": (
        HEAD + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        "Transfer-Encoding",
    ),
    "a Transfer-Encoding other than chunked": (
        HEAD + b"Transfer-Encoding: gzip\r\n\r\n{}",
        "Transfer-Encoding",
    ),
    "chunked, then gzip": (
        HEAD + b"Transfer-Encoding: chunked, gzip\r\n\r\n{}",
        "Transfer-Encoding",
    ),
    "a chunk size that is not hex": (chunked(b"zz\r\n{}\r\n0\r\n\r\n"), "body"),
    "a chunk without its CRLF": (chunked(b"2\r\n{}XX0\r\n\r\n"), "body"),
    "an old websocket key": (EXT + b"Sec-WebSocket-Key1: a\r\n\r\n", "Sec-WebSocket-Key1"),
    "HTTP/0.9 ext_authz": (b"GET /ext_authz/v1/chat\r\n\r\n", "http_version"),
    "HTTP/0.9 ext_authz with headers": (
        b"GET /ext_authz/v1/chat\r\nx-org-id: org-1\r\nx-budget-estimate-usd: 0.5\r\n\r\n",
        "http_version",
    ),
    "HTTP/0.9 authorize": (
        b"POST /v1/authorize\r\n" + HEAD.split(b"\r\n", 1)[1] + CL,
        "http_version",
    ),
}


def problem_of(answer: bytes) -> dict[str, Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"\r\nContent-Type: application/problem+json\r\n" in head, answer
    problem: dict[str, Any] = json.loads(body)
    return problem


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("name", list(REFUSED))
async def test_a_head_aiohttp_refuses_is_a_problem_naming_what_was_wrong(
    serve: Serve, redis_client: redis.Redis, name: str, fast: bool
) -> None:
    """One write, one answer: 400 application/problem+json of the sidecar's own shape
    (type, title, status, detail, field), its field naming the part of the request line or
    head that was bad, no stack trace; nothing in Redis."""
    raw, field = REFUSED[name]
    srv = await serve(fast=fast)
    flush_data(redis_client)
    (answer,) = await exchange(srv, raw, 1)
    assert status(answer) == 400, answer
    problem = problem_of(answer)
    assert set(problem) == {"type", "title", "status", "detail", "field"}, problem
    assert problem["type"] == "https://budget-sidecar.dev/problems/bad-request"
    assert (problem["title"], problem["status"], problem["field"]) == ("Bad Request", 400, field)
    assert problem["detail"].startswith(f"{field}: ") and "Traceback" not in problem["detail"]
    assert redis_state(redis_client) == []


@pytest.mark.parametrize("fast", [True, False])
async def test_with_request_ids_aiohttps_own_problem_carries_one(
    serve: Serve, redis_client: redis.Redis, fast: bool
) -> None:
    """Debug logs on (our answers carry X-Request-ID): aiohttp's own 400 carries one too
    (a fresh one: a head that did not parse has no id to echo), as a served 400 does."""
    from sidecar.logs import decision_log

    level = decision_log.level
    decision_log.setLevel(logging.DEBUG)
    try:
        srv = await serve(fast=fast)
    finally:
        decision_log.setLevel(level)
    (refused,) = await exchange(srv, REFUSED["two Hosts"][0], 1)
    (served,) = await exchange(srv, post("/v1/authorize", b"{not json"), 1)
    for answer in (refused, served):
        assert status(answer) == 400 and problem_of(answer)["field"]
        head = answer.partition(b"\r\n\r\n")[0].decode()
        (rid,) = [line for line in head.split("\r\n") if line.startswith("X-Request-ID: ")]
        assert len(rid) > len("X-Request-ID: ")
    assert redis_state(redis_client) == []


# ---- the end of a connection: half-closed or closed for good -------------------------------


def end_seen(protocol: Any) -> bool:
    """The server saw the client's end of file (and kept the connection to answer), or
    the connection is gone."""
    if transport_of(protocol) is None:
        return True
    if isinstance(protocol, FastProtocol):
        return protocol._eof
    assert isinstance(protocol, SidecarRequestHandler)
    return protocol._half_closed


# (fast_http, the connection handed to aiohttp first)
PATHS = [(False, False), (True, True), (True, False)]


@pytest.mark.parametrize("route", list(HOLDING))
@pytest.mark.parametrize(("fast", "handed"), PATHS)
async def test_a_client_that_half_closes_gets_its_answer_and_keeps_its_hold(
    serve: Serve, redis_client: redis.Redis, route: str, fast: bool, handed: bool
) -> None:
    """shutdown(SHUT_WR) while its call is decided: the answer comes (aiohttp's path gave
    none: it closed at the end of file and took the hold back), then the server closes;
    the hold stays, for the caller to settle."""
    srv = as_deployed(await serve(fast=fast))
    sock, _ = await ends_while_deciding(
        srv, redis_client, HOLDING[route], "half-close", handed=handed, seen=end_seen
    )
    try:
        answer = await asyncio.to_thread(read_answer, sock)
        assert status(answer) == 200, answer
        assert await asyncio.to_thread(sock.recv, 1) == b""  # then closed
    finally:
        sock.close()
    await asyncio.to_thread(wait_until, lambda: not connections(srv), 10, "closed")
    assert held_micro(redis_client) == HALF_MICRO
    assert redis_client.zcard(TENANT.leases) == 1
    (record,) = records(redis_client).values()
    assert not record.startswith("R|")


@pytest.mark.parametrize("fast", [True, False])
async def test_pipelined_requests_then_a_half_close_are_all_answered(
    serve: Serve, redis_client: redis.Redis, fast: bool
) -> None:
    """Three authorizes in one write, then the half-close (on aiohttp's path: the
    connection handed over by a /healthz first): three answers, three holds."""
    srv = as_deployed(await serve(fast=fast))
    raw = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + A * 3
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(raw)
    await writer.drain()
    writer.write_eof()
    answers = []
    for _ in range(4):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        answers.append(head + await reader.readexactly(length))
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    assert [status(a) for a in answers] == [200] * 4
    assert held_micro(redis_client) == 3 * HALF_MICRO


@pytest.mark.parametrize("route", list(HOLDING))
@pytest.mark.parametrize(("fast", "handed"), PATHS)
async def test_a_client_that_closed_for_good_has_its_hold_taken_back(
    serve: Serve, redis_client: redis.Redis, route: str, fast: bool, handed: bool
) -> None:
    """close() while its call is decided sends the same FIN as a half-close; the answer
    is written, the client's kernel resets it (nobody reads it), and the hold is taken
    back: released, not charged, the lease index empty."""
    srv = as_deployed(await serve(fast=fast))
    sock, _ = await ends_while_deciding(
        srv, redis_client, HOLDING[route], "close", handed=handed, seen=end_seen
    )
    sock.close()
    await asyncio.to_thread(wait_until, lambda: taken_back(redis_client), 10, "taken back")
    (record,) = records(redis_client).values()
    assert record.startswith("R|")
    assert used_micro(redis_client) == 0
