"""Request smuggling and odd request heads against the hot routes, fast path on and off:
each case is one write on a fresh connection; both paths give the same answers (byte for
byte, clocks and ids aside) and leave Redis the same, and each asserts what that answer is:
the statuses, the field a 400's problem+json names, and the reservations held.

Not repeated here (tests/test_hot_path_attacks.py, tests/test_http_edge_attacks.py have
them): a Content-Length with `+`, `-1` or 30 digits, chunked then gzip, a chunk size that
is not hex, NUL in a value, a folded line, no Host, two Hosts, 200 headers, HTTP/0.9.

The header-size limits broke: aiohttp (3.14, its C parser) measures a header name together
with the name before it, and the first header's value together with its name, against
max_field_size (8190); the fast path measured each alone, so it served (and held) heads
aiohttp refuses with a 400."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

import pytest
import redis

from sidecar.keys import tenant_keys
from tests import test_fast_path
from tests.harness import flush_data
from tests.test_fast_path import AGENT, AUTH_DOC, DOC, Serve, fast_server, status
from tests.test_hot_path_attacks import comparable, redis_state
from tests.test_transport_attacks import TENANT, held_micro, records

serve = test_fast_path.serve  # the fast / plain server fixture, reused

BODY = b'{"org_id":"org-1","estimated_usd":0.5}'
HEAD = b"POST /v1/authorize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
CL = b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY
CHUNKS = b"%x\r\n%b\r\n0\r\n\r\n" % (len(BODY), BODY)
EXT = b"GET /ext_authz/v1/chat HTTP/1.1\r\nHost: x\r\nx-org-id: org-1\r\n"
LIMIT = 8190  # aiohttp's max_field_size, which the sidecar keeps


def te(value: bytes, chunks: bytes = CHUNKS) -> bytes:
    return HEAD + b"Transfer-Encoding: " + value + b"\r\n\r\n" + chunks


def chunk_size(size: bytes) -> bytes:
    return te(b"chunked", size + b"\r\n" + BODY + b"\r\n0\r\n\r\n")


def trailer(*lines: bytes) -> bytes:
    return b"%x\r\n%b\r\n0\r\n%b\r\n" % (len(BODY), BODY, b"".join(x + b"\r\n" for x in lines))


def named(name_len: int) -> bytes:
    """An authorize whose last header has a `name_len`-byte name, after Content-Length."""
    return HEAD + CL.replace(b"\r\n\r\n", b"\r\n" + b"N" * name_len + b": v\r\n\r\n")


def first_valued(value_len: int) -> bytes:
    """An authorize whose first header is X-Pad with a value of `value_len` bytes."""
    rest = HEAD.split(b"\r\n", 1)[1]
    return b"POST /v1/authorize HTTP/1.1\r\nX-Pad: " + b"v" * value_len + b"\r\n" + rest + CL


# name -> (config, raw, answers: [(status, field of a 400 or None)], reservations held)
Case = tuple[dict[str, Any], bytes, list[tuple[int, str | None]], int]
OK: list[tuple[int, str | None]] = [(200, None)]
CASES: dict[str, Case] = {
    # Framing: Content-Length and Transfer-Encoding.
    "Content-Length, then Transfer-Encoding": (
        DOC, HEAD + b"Content-Length: 38\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKS,
        [(400, "Transfer-Encoding")], 0,
    ),
    "Transfer-Encoding, then Content-Length": (
        DOC, HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 38\r\n\r\n" + CHUNKS,
        [(400, "Transfer-Encoding")], 0,
    ),
    "two equal Content-Lengths": (
        DOC, HEAD + b"Content-Length: 38\r\n" + CL, [(400, "Content-Length")], 0,
    ),
    "two unequal Content-Lengths": (
        DOC, HEAD + b"Content-Length: 39\r\n" + CL, [(400, "Content-Length")], 0,
    ),
    "a Content-Length list": (
        DOC, HEAD + CL.replace(b": 38", b": 38, 38"), [(400, "Content-Length")], 0,
    ),
    "chunked, identity": (DOC, te(b"chunked, identity"), [(400, "Transfer-Encoding")], 0),
    "xchunked": (DOC, te(b"xchunked"), [(400, "Transfer-Encoding")], 0),
    "chunkedx": (DOC, te(b"chunkedx"), [(400, "Transfer-Encoding")], 0),
    "chunked, chunked": (DOC, te(b"chunked, chunked"), [(400, "Transfer-Encoding")], 0),
    "Transfer-Encoding twice": (
        DOC, HEAD + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKS,
        [(400, "Transfer-Encoding")], 0,
    ),
    "Chunked, any case": (DOC, te(b"Chunked"), OK, 1),
    "identity, chunked (chunked last)": (DOC, te(b"identity, chunked"), OK, 1),
    # Chunk sizes and extensions.
    "a chunk size with +": (DOC, chunk_size(b"+26"), [(400, "body")], 0),
    "a chunk size with 0x": (DOC, chunk_size(b"0x26"), [(400, "body")], 0),
    "a chunk size after a blank": (DOC, chunk_size(b" 26"), [(400, "body")], 0),
    "a chunk size before a blank": (DOC, chunk_size(b"26 "), [(400, "body")], 0),
    "a chunk size of 21 hex digits": (DOC, chunk_size(b"f" * 21), [(400, "body")], 0),
    "a chunk size with 24 leading zeros": (DOC, chunk_size(b"0" * 24 + b"26"), OK, 1),
    "a chunk extension": (DOC, chunk_size(b"26;a=b"), OK, 1),
    "a quoted chunk extension": (DOC, chunk_size(b'26;a="b;c"'), OK, 1),
    "an empty chunk extension": (DOC, chunk_size(b"26;"), [(400, "body")], 0),
    "chunks ended by bare LFs": (
        DOC, te(b"chunked", b"26\n" + BODY + b"\n0\n\n"), [(400, "body")], 0,
    ),
    # Trailers: never read as the request's headers.
    "a trailer Content-Length": (
        DOC, te(b"chunked", trailer(b"Content-Length: 5")), [(400, "Transfer-Encoding")], 0,
    ),
    "a trailer Authorization without a header one": (
        AUTH_DOC, te(b"chunked", trailer(AGENT.encode())), [(401, None)], 0,
    ),
    "a trailer Authorization on /ext_authz": (
        AUTH_DOC, EXT + b"Transfer-Encoding: chunked\r\n\r\n0\r\n" + AGENT.encode() + b"\r\n\r\n",
        [(401, None)], 0,
    ),
    "the same Authorization as a header": (
        AUTH_DOC, HEAD + AGENT.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKS,
        OK, 1,
    ),
    # Line ends and control characters.
    "a bare LF after Host": (DOC, HEAD.replace(b"Host: x\r\n", b"Host: x\n") + CL,
                             [(400, "Host")], 0),
    "bare LFs throughout": (
        DOC, (HEAD + CL).replace(b"\r\n", b"\n"), [(400, "http_version")], 0,
    ),
    "a bare LF ending the head": (
        DOC, HEAD + CL.replace(b"\r\n\r\n", b"\r\n\n"), [(400, "headers")], 0,
    ),
    "a CR inside a value": (DOC, HEAD + b"X-Note: a\rb\r\n" + CL, [(400, "X-Note")], 0),
    "a CR inside an /ext_authz identity": (
        DOC, EXT + b"x-user-id: a\rb\r\n\r\n", [(400, "x-user-id")], 0,
    ),
    "a NUL inside an /ext_authz identity": (
        DOC, EXT + b"x-user-id: a\x00b\r\n\r\n", [(400, "x-user-id")], 0,
    ),
    "a DEL inside a value": (DOC, HEAD + b"X-Note: a\x7fb\r\n" + CL, [(400, "X-Note")], 0),
    "a tab inside a value": (DOC, HEAD + b"X-Note: a\tb\r\n" + CL, OK, 1),
    "a blank line before the request": (DOC, b"\r\n\r\n" + HEAD + CL, OK, 1),
    # Methods and request targets.
    "GET on /v1/authorize": (DOC, HEAD.replace(b"POST", b"GET") + CL, [(405, None)], 0),
    "OPTIONS *": (DOC, b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", [(404, None)], 0),
    "post in lower case": (DOC, HEAD.replace(b"POST", b"post") + CL, [(400, "method")], 0),
    "an absolute-form target": (
        DOC, HEAD.replace(b"/v1/authorize", b"http://x/v1/authorize") + CL, OK, 1,
    ),
    "a fragment": (DOC, HEAD.replace(b"/v1/authorize", b"/v1/authorize#f") + CL, OK, 1),
    "a query and a fragment": (
        DOC, HEAD.replace(b"/v1/authorize", b"/v1/authorize?a=1#f") + CL, OK, 1,
    ),
    "a trailing slash": (DOC, HEAD.replace(b"/v1/authorize", b"/v1/authorize/") + CL,
                         [(404, None)], 0),
    # HTTP/1.0: a second request in the read is data after the (implied) close: the read
    # is refused whole, as aiohttp refuses it; kept alive: both served.
    "HTTP/1.0, two requests": (
        DOC, ((HEAD + CL) * 2).replace(b"HTTP/1.1", b"HTTP/1.0"), [(400, "request")], 0,
    ),
    "HTTP/1.0 kept alive, two requests": (
        DOC,
        ((HEAD + b"Connection: keep-alive\r\n" + CL) * 2).replace(b"HTTP/1.1", b"HTTP/1.0"),
        OK * 2, 2,
    ),
    # Header sizes at aiohttp's limits (these broke: the fast path served the refused).
    "a name at the limit with Content-Length's before it": (DOC, named(LIMIT - 14), OK, 1),
    "a name a byte longer": (DOC, named(LIMIT - 13), [(400, "headers")], 0),
    "a name of the limit": (DOC, named(LIMIT), [(400, "headers")], 0),
    "a name over the limit": (DOC, named(LIMIT + 1), [(400, "headers")], 0),
    "a first value at the limit with its name": (DOC, first_valued(LIMIT - 5), OK, 1),
    "a first value a byte longer": (DOC, first_valued(LIMIT - 4), [(400, "headers")], 0),
    "a later value of the limit": (DOC, HEAD + b"X-Pad: " + b"v" * LIMIT + b"\r\n" + CL, OK, 1),
    "a later value over the limit": (
        DOC, HEAD + b"X-Pad: " + b"v" * (LIMIT + 1) + b"\r\n" + CL, [(400, "headers")], 0,
    ),
    "128 headers": (
        DOC, HEAD + b"".join(b"X-%d: 1\r\n" % i for i in range(125)) + CL, OK, 1,
    ),
    "129 headers": (
        DOC, HEAD + b"".join(b"X-%d: 1\r\n" % i for i in range(126)) + CL, [(400, "headers")], 0,
    ),
}  # fmt: skip


def reservations(rc: redis.Redis, tenant: str) -> list[str]:
    raw: dict[str, str] = rc.hgetall(tenant_keys(tenant).reservations)  # type: ignore[assignment]
    return [k for k in raw if not k.startswith("k:")]


def held(rc: redis.Redis, tenant: str) -> int:
    raw: dict[str, str] = rc.hgetall(tenant_keys(tenant).counters)  # type: ignore[assignment]
    return sum(int(v) for k, v in raw.items() if k.startswith("h:"))


@pytest.mark.parametrize("name", list(CASES))
async def test_both_paths_answer_alike_and_hold_exactly(
    serve: Serve, redis_client: redis.Redis, name: str
) -> None:
    doc, raw, expected, holds = CASES[name]
    seen = []
    for fast in (True, False):
        srv = await serve(fast=fast, doc=doc)
        flush_data(redis_client)
        answers = await test_fast_path.exchange(srv, raw, len(expected))
        seen.append(([comparable(a) for a in answers], redis_state(redis_client)))
        got = []
        for answer in answers:
            field = None
            if status(answer) == 400:
                head, _, body = answer.partition(b"\r\n\r\n")
                assert b"\r\nContent-Type: application/problem+json\r\n" in head, answer
                field = json.loads(body)["field"]
            got.append((status(answer), field))
        assert got == expected, (fast, answers)
        told = [json.loads(a.partition(b"\r\n\r\n")[2]).get("reservation_id") for a in answers]
        tenant = "team-a" if doc is AUTH_DOC else "default"
        assert sorted(reservations(redis_client, tenant)) == sorted(r for r in told if r), fast
        assert len(reservations(redis_client, tenant)) == holds
        assert held(redis_client, tenant) == holds * 500_000
        if fast and name.startswith("a name") and holds == 0:
            assert fast_server(srv).served == 0  # aiohttp's to refuse
    assert seen[0] == seen[1], name


@pytest.mark.parametrize("fast", [True, False])
async def test_an_ext_authz_trailer_sets_no_estimate_or_identity(
    serve: Serve, redis_client: redis.Redis, fast: bool
) -> None:
    """/ext_authz with a chunked body whose trailer names an estimate and a user: the hold
    is the one the same call without the trailer holds (not the trailer's $0.5), and no
    user's counter exists."""
    srv = await serve(fast=fast)
    plain = EXT + b"\r\n"
    chunked = EXT + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n"
    chunked += b"x-budget-estimate-usd: 0.5\r\nx-user-id: u-smuggled\r\n\r\n"
    held = []
    for raw in (plain, chunked):
        flush_data(redis_client)
        (answer,) = await test_fast_path.exchange(srv, raw, 1)
        assert status(answer) == 200, answer
        held.append(held_micro(redis_client))
        assert len(records(redis_client)) == 1
        assert not any("u-smuggled" in key for key in redis_client.keys("*"))
        assert not any("u-smuggled" in f for f in redis_client.hkeys(TENANT.counters))
    assert held[0] == held[1] != 500_000


@pytest.mark.parametrize("fast", [True, False])
async def test_head_on_a_hot_route_is_a_405_without_a_body(
    serve: Serve, redis_client: redis.Redis, fast: bool
) -> None:
    """HEAD /v1/authorize: aiohttp's 405 (Allow: POST), its head only, the connection
    kept; the authorize after it on the same connection holds once."""
    srv = await serve(fast=fast)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(HEAD.replace(b"POST", b"HEAD") + CL + HEAD + CL)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        after = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 405 ") and b"\r\nAllow: POST\r\n" in head, head
    assert status(after) == 200, after
    assert len(records(redis_client)) == 1 and held_micro(redis_client) == 500_000


# Cases that reach the app's middlewares on one path or both, and ones aiohttp refuses.
WITH_IDS = [
    "two unequal Content-Lengths",
    "xchunked",
    "a chunk extension",
    "a trailer Authorization without a header one",
    "the same Authorization as a header",
    "a CR inside an /ext_authz identity",
    "GET on /v1/authorize",
    "a fragment",
    "a name a byte longer",
    "a later value of the limit",
    "HTTP/1.0 kept alive, two requests",
]


@pytest.mark.parametrize("name", WITH_IDS)
async def test_with_request_ids_both_paths_answer_alike(
    serve: Serve, redis_client: redis.Redis, name: str
) -> None:
    """Debug logs on (the request-id middleware in front): the same case with an
    X-Request-ID gets the same answers on both paths; each carries an X-Request-ID, the
    client's where the request reached the middlewares (401 and 405 included), one made
    by the sidecar for a head aiohttp refused (every 400 here) and for a request that
    carried none."""
    from sidecar.logs import decision_log

    doc, raw, expected, holds = CASES[name]
    raw = raw.replace(b"\r\n", b"\r\nX-Request-ID: rid-22\r\n", 1)
    level = decision_log.level
    decision_log.setLevel(logging.DEBUG)
    try:
        servers = [await serve(fast=True, doc=doc), await serve(fast=False, doc=doc)]
    finally:
        decision_log.setLevel(level)
    seen = []
    for srv in servers:
        flush_data(redis_client)
        answers = await test_fast_path.exchange(srv, raw, len(expected))
        assert [status(a) for a in answers] == [s for s, _ in expected]
        for i, (answer, (code, _)) in enumerate(zip(answers, expected, strict=True)):
            ids = re.findall(rb"\r\nX-Request-ID: ([^\r]*)\r\n", answer.partition(b"\r\n\r\n")[0])
            # (Only the first request carries the client's id.)
            made = code == 400 or i > 0
            assert len(ids) == 1 and (ids[0] != b"rid-22") == made, answer[:400]
        tenant = "team-a" if doc is AUTH_DOC else "default"
        assert len(reservations(redis_client, tenant)) == holds
        seen.append(([comparable(a) for a in answers], redis_state(redis_client)))
    assert seen[0] == seen[1]
