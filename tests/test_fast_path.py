"""The fast path (sidecar.api.fast): the hot routes are served by its protocol, byte for
byte as aiohttp serves them, and every other request on the same connection still goes to
aiohttp, in order, pipelined or not."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestServer

from sidecar.api import fast
from sidecar.api.app import create_app
from sidecar.api.fast import FastServer
from sidecar.store import RedisStore
from tests.conftest import make_config
from tests.harness import RedisServer, flush_data

DOC: dict[str, Any] = {
    "budgets": [
        {
            "id": "org",
            "name": "Org",
            "scope": "organization",
            "limit_usd": 1000,
            "period": "monthly",
        },
        {"id": "tiny", "name": "Tiny", "scope": "team", "limit_usd": 0.01, "period": "daily"},
    ],
    "pricing": [
        {"provider": "openai", "model": "gpt-4o", "input_per_1k": 0.0025, "output_per_1k": 0.01}
    ],
    "proxy": {"deny_status": 429},
}
AUTHORIZE = (
    b'{"org_id":"org-1","provider":"openai","model":"gpt-4o",'
    b'"estimated_tokens_in":100,"estimated_tokens_out":10}'
)


def post(path: str, body: bytes, *extra: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json",
            f"Content-Length: {len(body)}", *extra]  # fmt: skip
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def get(path: str, *extra: str) -> bytes:
    return ("\r\n".join([f"GET {path} HTTP/1.1", "Host: x", *extra]) + "\r\n\r\n").encode()


Serve = Callable[..., Any]


@pytest.fixture
async def serve(redis_server: RedisServer, redis_client: redis.Redis) -> AsyncIterator[Serve]:
    servers: list[TestServer] = []

    async def start(fast: bool = True, doc: dict[str, Any] | None = None) -> TestServer:
        settings = {"fast_http": fast}
        cfg = make_config({**(doc or DOC), "settings": settings})
        store = RedisStore.from_url(redis_server.url, timeout_ms=2000)
        srv = TestServer(create_app(cfg, store), host="127.0.0.1")
        await srv.start_server()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        await srv.close()


def fast_server(srv: TestServer) -> FastServer:
    assert srv.runner is not None
    server = srv.runner.server
    assert isinstance(server, FastServer)
    return server


async def exchange(srv: TestServer, data: bytes, answers: int, *pieces: bytes) -> list[bytes]:
    """Write `data` (then each of `pieces`, one write each) on one connection; read
    `answers` responses (each framed by its Content-Length)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(data)
        for piece in pieces:
            await writer.drain()
            await asyncio.sleep(0.05)  # its own read on the server
            writer.write(piece)
        out = []
        for _ in range(answers):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = re.search(rb"(?i)\r\ncontent-length: (\d+)", head)
            body = await reader.readexactly(int(length.group(1))) if length else b""
            out.append(head + body)
        return out
    finally:
        writer.close()


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


async def test_hot_routes_are_served_by_the_fast_path(serve: Serve) -> None:
    srv = await serve()
    answers = await exchange(srv, post("/v1/authorize", AUTHORIZE) * 3, 3)
    assert [status(a) for a in answers] == [200, 200, 200]
    assert fast_server(srv).served == 3
    assert fast_server(srv).handed_off == 0


async def test_off_means_aiohttp_serves_everything(serve: Serve) -> None:
    srv = await serve(fast=False)
    assert srv.runner is not None
    assert not isinstance(srv.runner.server, FastServer)
    answers = await exchange(srv, post("/v1/authorize", AUTHORIZE), 1)
    assert status(answers[0]) == 200


async def test_the_aiohttp_test_client_reaches_the_fast_path(serve: Serve) -> None:
    """The tests that use aiohttp's client (test_bad_input, test_auth, ...) exercise the
    fast path, not aiohttp: its requests arrive whole in one read."""
    from aiohttp import ClientSession

    srv = await serve()
    async with ClientSession() as session:
        for _ in range(3):
            async with session.post(
                f"http://127.0.0.1:{srv.port}/v1/authorize", data=AUTHORIZE,
                headers={"Content-Type": "application/json"},
            ) as r:  # fmt: skip
                assert r.status == 200
        async with session.get(f"http://127.0.0.1:{srv.port}/healthz") as r:
            assert r.status == 200
    assert fast_server(srv).served == 3
    assert fast_server(srv).handed_off == 1


AUTH_DOC: dict[str, Any] = {
    **DOC,
    "auth": {
        "clients": [
            {"client_id": "agent-a", "tenant": "team-a", "role": "agent", "secret": "a-pass"},
            {"client_id": "dash", "tenant": "team-a", "role": "read", "secret": "r-pass"},
        ]
    },
}
# Rate limits: an allowed decision carries RateLimit fields, a denied one Retry-After too.
RATE_DOC: dict[str, Any] = {
    **DOC,
    "rate_limits": [
        {"id": "rpm", "scope": "organization", "metric": "requests", "limit": 100,
         "window": "1m", "burst": 100},
        {"id": "burn", "scope": "organization", "metric": "usd", "limit": 50, "window": "1h"},
        {"id": "tpm", "scope": "user", "metric": "tokens", "limit": 10, "window": "1m"},
    ],
}  # fmt: skip
AGENT = "Authorization: Basic YWdlbnQtYTphLXBhc3M="  # agent-a:a-pass
READER = "Authorization: Basic ZGFzaDpyLXBhc3M="  # dash:r-pass
EXT = ("x-org-id: org-1", "x-provider: openai", "x-model: gpt-4o")
# (config, raw request): every answer the fast path gives, next to aiohttp's.
CASES: list[tuple[dict[str, Any], bytes]] = [
    (DOC, post("/v1/authorize", AUTHORIZE)),
    (DOC, post("/v1/authorize?debug=1", AUTHORIZE)),
    (DOC, post("/v1/authorize", AUTHORIZE, "Connection: close")),
    (DOC, post("/v1/authorize", AUTHORIZE, "X-Request-ID: abc-123")),
    (DOC, post("/v1/authorize", b'{"org_id": "org-1", "estimated_usd": 5000}')),  # denied
    (DOC, post("/v1/authorize", b"{not json")),
    (DOC, post("/v1/authorize", b'{"org_id": 7}')),
    (DOC, post("/v1/authorize", b'{"org_id":"a","estimated_usd":0.1,"estimated_usd":9}')),
    (
        DOC,
        post(
            "/v1/authorize",
            b"",
        ),
    ),
    (DOC, post("/v1/authorize", b'{"org_id":"o","provider":"x","model":"nope"}')),
    (DOC, post("/v1/authorize", AUTHORIZE).replace(b"application/json", b"text/plain")),
    (DOC, post("/v1/authorize", AUTHORIZE).replace(b"Content-Type: application/json\r\n", b"")),
    (DOC, post("/v1/check", AUTHORIZE)),
    (DOC, post("/v1/settle", b'{"reservation_id":"nope","actual_usd":0.1}')),
    (DOC, post("/v1/settle", b'{"reservation_id":5}')),
    (DOC, post("/v1/release", b'{"reservation_id":"nope"}')),
    (DOC, post("/v1/release", b"[]")),
    (DOC, get("/ext_authz/v1/chat", *EXT)),
    (DOC, get("/ext_authz/v1/chat", *EXT, "x-budget-estimate-usd: 5000")),  # denied
    (DOC, get("/ext_authz/v1/chat", *EXT, "x-budget-estimate-usd: 1e3")),  # bad header
    (DOC, get("/ext_authz", *EXT, "X-Axonflow-Client: sdk-python/1.0")),
    (DOC, get("/ext_authz/v1/chat", *EXT).replace(b"GET", b"OPTIONS", 1)),  # passes
    (DOC, get("/ext_authz/v1/chat", *EXT).replace(b"GET", b"HEAD", 1)),
    (DOC, post("/ext_authz/v1/chat", b'{"ignored": true}', *EXT)),
    (AUTH_DOC, post("/v1/authorize", AUTHORIZE)),  # no credentials: 401
    (AUTH_DOC, post("/v1/authorize", AUTHORIZE, "Authorization: Basic !!!")),
    (AUTH_DOC, post("/v1/authorize", AUTHORIZE, READER)),  # 403
    (AUTH_DOC, post("/v1/authorize", AUTHORIZE, AGENT)),
    (AUTH_DOC, get("/ext_authz/v1/chat", *EXT)),
    (AUTH_DOC, get("/ext_authz/v1/chat", *EXT, AGENT)),
    (RATE_DOC, post("/v1/authorize", AUTHORIZE)),
    (RATE_DOC, post("/v1/check", AUTHORIZE)),
    (RATE_DOC, post("/v1/authorize", AUTHORIZE.replace(b"{", b'{"user_id":"u1",'))),  # tpm
    (RATE_DOC, post("/v1/check", AUTHORIZE.replace(b"{", b'{"user_id":"u1",'))),
    (RATE_DOC, post("/v1/authorize", b'{"org_id": "org-1", "estimated_usd": 5000}')),
    (RATE_DOC, post("/v1/authorize", AUTHORIZE, "Connection: close")),
]
_VARYING = [
    (re.compile(rb"(?m)^Date: .*\r$"), b"Date: -\r"),
    # Reservation ids, clocks and what they derive (ends of periods, retry times).
    (re.compile(rb"[0-9a-f]{32}"), b"<id>"),
    (re.compile(rb"\b1[0-9]{12}\b"), b"<ms>"),
    (re.compile(rb"(?i)(retry-after: |t=|retry_after_ms\":)[0-9]+"), rb"\1<n>"),
    # The lease end is to the second: the two answers may straddle one.
    (re.compile(rb'"lease_expires_at":"[0-9T:-]+Z"'), b'"lease_expires_at":"<t>"'),
]


def normalized(answer: bytes) -> bytes:
    for pattern, replacement in _VARYING:
        answer = pattern.sub(replacement, answer)
    return answer


async def test_answers_are_byte_for_byte_aiohttps(serve: Serve, redis_client: redis.Redis) -> None:
    """Status line, headers (names, order, values) and body of every kind of answer on
    the hot routes, fast path against aiohttp, each from the same Redis state."""
    servers = {}
    for doc in (DOC, AUTH_DOC, RATE_DOC):
        servers[id(doc)] = (await serve(fast=True, doc=doc), await serve(fast=False, doc=doc))
    for doc, raw in CASES:
        fast_srv, plain_srv = servers[id(doc)]
        answers = []
        for srv in (fast_srv, plain_srv):
            flush_data(redis_client)
            (answer,) = await exchange(srv, raw, 1)
            answers.append(normalized(answer))
        assert answers[0] == answers[1], raw
        if doc is RATE_DOC:  # every one of these answers has its RateLimit fields
            assert b"\r\nRateLimit: " in answers[0], raw
    for doc in (DOC, RATE_DOC):
        assert fast_server(servers[id(doc)][0]).served == len([c for c in CASES if c[0] is doc])
        assert fast_server(servers[id(doc)][0]).handed_off == 0


async def test_one_connection_mixes_hot_and_other_routes_in_order(serve: Serve) -> None:
    """Keep-alive: hot requests, then another route (the connection goes to aiohttp),
    then hot requests again; each on its own write, and all pipelined in one write."""
    srv = await serve()
    mixed = [
        post("/v1/authorize", AUTHORIZE),
        post("/v1/check", AUTHORIZE),
        get("/healthz"),
        post("/v1/authorize", AUTHORIZE),
        get("/v1/budgets/org/status?scope_id=org-1"),
    ]
    one_by_one = await exchange(srv, mixed[0], 5, *mixed[1:])
    pipelined = await exchange(srv, b"".join(mixed), 5)
    for answers in (one_by_one, pipelined):
        assert [status(a) for a in answers] == [200] * 5
        assert b'"action":"allow"' in answers[0] and b'"action":"allow"' in answers[1]
        assert b'"status": "alive"' in answers[2]
        assert b'"reservation_id"' in answers[3]
        assert b'"budget_id":"org"' in answers[4]
    # The first two of the one-by-one connection; the pipelined read, which holds another
    # route's request, is aiohttp's whole (tests/test_transport_attacks.py).
    assert fast_server(srv).served == 2
    assert fast_server(srv).handed_off == 2


async def test_pipelined_hot_requests_answer_in_order(serve: Serve) -> None:
    srv = await serve()
    # Each asks for more tokens than the one before: its answer's estimate says which it is.
    bodies = [AUTHORIZE.replace(b":100,", f":{10_000 * (i + 1)},".encode()) for i in range(20)]
    answers = await exchange(srv, b"".join(post("/v1/check", b) for b in bodies), 20)
    assert [status(a) for a in answers] == [200] * 20
    found = [re.search(rb'"estimated_usd":([0-9.]+)', a) for a in answers]
    estimates = [float(m.group(1)) for m in found if m is not None]
    assert estimates == sorted(set(estimates)) and len(estimates) == 20
    assert fast_server(srv).served == 20


async def test_pipelined_decisions_with_rate_limit_fields_answer_in_order(serve: Serve) -> None:
    """Allowed and denied decisions with RateLimit fields (and plain ones), pipelined on
    one connection: each answer framed by its own Content-Length, in order."""
    srv = await serve(doc=RATE_DOC)
    user = AUTHORIZE.replace(b"{", b'{"user_id":"u1",')  # its token limit denies
    bodies = [AUTHORIZE if i % 3 else user for i in range(24)]
    answers = await exchange(srv, b"".join(post("/v1/authorize", b) for b in bodies), 24)
    assert [status(a) for a in answers] == [200] * 24
    allowed = [b'"allowed":true' in a for a in answers]
    assert allowed == [i % 3 != 0 for i in range(24)]
    for a in answers:
        head = a.split(b"\r\n\r\n", 1)[0]
        assert b"\r\nRateLimit-Policy: " in head
        # The user's calls are larger than its token limit ever admits: no Retry-After,
        # nothing to wait for (a limit that admits later has one: tests/test_rate_limits).
        assert b"\r\nRetry-After: " not in head
        assert b'"retry_after_ms":null' in a
    assert fast_server(srv).served == 24 and fast_server(srv).handed_off == 0


async def test_a_body_in_a_later_read_goes_to_aiohttp(serve: Serve) -> None:
    """A request not whole in one read is aiohttp's (its body timer and limits apply)."""
    srv = await serve()
    raw = post("/v1/authorize", AUTHORIZE)
    head, body = raw[: raw.index(b"\r\n\r\n") + 4], raw[raw.index(b"\r\n\r\n") + 4 :]
    answers = await exchange(srv, post("/v1/authorize", AUTHORIZE) + head, 2, body)
    assert [status(a) for a in answers] == [200, 200]
    assert b'"reservation_id"' in answers[1]
    assert (fast_server(srv).served, fast_server(srv).handed_off) == (1, 1)


@pytest.mark.parametrize(
    "raw",
    [
        post("/v1/authorize", AUTHORIZE).replace(b"HTTP/1.1", b"HTTP/1.0"),
        post("/v1/authorize", AUTHORIZE, "Expect: 100-continue"),
        post("/v1/%61uthorize", AUTHORIZE),
        get("/ext_authz/a/../v1/chat", *EXT),
        post("/v1/authorize", b"x" * 70_000),
        b"POST /v1/authorize HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"GARBAGE\r\n\r\n",
    ],
)
async def test_what_the_fast_path_does_not_serve_aiohttp_answers(
    serve: Serve, redis_client: redis.Redis, raw: bytes
) -> None:
    """The same answer as aiohttp's own, because aiohttp gives it."""
    fast_srv, plain_srv = await serve(fast=True), await serve(fast=False)
    answers = []
    for srv in (fast_srv, plain_srv):
        flush_data(redis_client)
        answers.append(normalized((await exchange(srv, raw, 1))[0]))
    assert answers[0] == answers[1]
    assert (fast_server(fast_srv).served, fast_server(fast_srv).handed_off) == (0, 1)


async def test_with_request_ids_on_the_chain_serves_the_hot_routes(
    serve: Serve, redis_client: redis.Redis
) -> None:
    """Debug logs put the request-id middleware in front of the guard: the fast path then
    runs the app's middleware chain (not its fused guard), and the answers, ids echoed,
    are still aiohttp's byte for byte."""
    from sidecar.logs import decision_log

    level = decision_log.level
    decision_log.setLevel(logging.DEBUG)
    try:
        fast_srv, plain_srv = await serve(fast=True), await serve(fast=False)
    finally:
        decision_log.setLevel(level)
    assert fast.WHOLE not in fast_srv.app
    for raw in (
        post("/v1/authorize", AUTHORIZE, "X-Request-ID: abc-123"),
        post("/v1/settle", b'{"reservation_id":"nope","actual_usd":0.1}', "X-Request-ID: s-1"),
    ):
        answers = []
        for srv in (fast_srv, plain_srv):
            flush_data(redis_client)
            answers.append(normalized((await exchange(srv, raw, 1))[0]))
        assert answers[0] == answers[1]
        assert b"\r\nX-Request-ID: " in answers[0]
    assert fast_server(fast_srv).served == 2


async def test_without_debug_logs_the_guard_is_fused(serve: Serve) -> None:
    srv = await serve()
    assert fast.WHOLE in srv.app
    answers = await exchange(srv, post("/v1/authorize", AUTHORIZE, "X-Request-ID: abc-123"), 1)
    assert b"X-Request-ID" not in answers[0]  # ids are echoed with debug logs only
