"""Attacks on the HTTP surface's promises as a flaky network and a hostile client make them:
a client gone before its answer is written is charged nothing (the hold is taken back, on
aiohttp's path and the fast path alike); a read that mixes hot requests with one aiohttp
refuses is answered as aiohttp alone answers it; pipelined requests split at any byte are
answered as if unsplit; idle connections by the thousand neither block callers nor leak
descriptors; hostile heads and bodies are bounded and charge nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import resource
import socket
import struct
from collections.abc import Callable
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestServer
from aiohttp.web_protocol import RequestHandler

from sidecar.api.fast import FastProtocol
from sidecar.keys import tenant_keys
from tests import test_fast_path, test_hot_path_attacks, test_proxy_servers
from tests.harness import flush_data, wait_until
from tests.test_fast_path import AUTHORIZE, Serve, exchange, fast_server, get, post, status
from tests.test_hot_path_attacks import comparable, redis_state
from tests.test_proxy_servers import DOWN_STATUS, IDENTITY, doc

serve = test_fast_path.serve  # the fast / plain server fixture, reused
make_stack, proxy_kind = test_proxy_servers.make_stack, test_proxy_servers.proxy_kind

TENANT = tenant_keys("default")
EXT = ("x-org-id: org-1", "x-provider: openai", "x-model: gpt-4o")
# The three routes that hold, each asking for $0.5.
HOLDING: dict[str, bytes] = {
    "authorize": post("/v1/authorize", b'{"org_id":"org-1","estimated_usd":0.5}'),
    "pre-check": post(
        "/api/policy/pre-check", b'{"context":{"org_id":"org-1","estimated_usd":0.5}}'
    ),
    "ext_authz": get("/ext_authz/v1/chat", *EXT, "x-budget-estimate-usd: 0.5"),
}
HALF_MICRO = 500_000


def held_micro(rc: redis.Redis) -> int:
    """Every hold in the tenant's counters, in micro-USD (h:<cid> fields)."""
    raw: dict[str, str] = rc.hgetall(TENANT.counters)  # type: ignore[assignment]
    return sum(int(v) for k, v in raw.items() if k.startswith("h:"))


def used_micro(rc: redis.Redis) -> int:
    raw: dict[str, str] = rc.hgetall(TENANT.counters)  # type: ignore[assignment]
    return sum(int(v) for k, v in raw.items() if k.startswith("u:"))


def records(rc: redis.Redis) -> dict[str, str]:
    """reservation id -> its record (not the idempotency keys' "k:" fields)."""
    raw: dict[str, str] = rc.hgetall(TENANT.reservations)  # type: ignore[assignment]
    return {k: v for k, v in raw.items() if not k.startswith("k:")}


def as_deployed(srv: TestServer) -> TestServer:
    """aiohttp's test server cancels a handler whose connection is lost; the sidecar's
    AppRunner (sidecar.cli) does not, so the decision runs to its end as deployed."""
    assert srv.runner is not None and srv.runner.server is not None
    srv.runner.server.handler_cancellation = False
    return srv


def connections(srv: TestServer) -> list[Any]:
    assert srv.runner is not None and srv.runner.server is not None
    return list(srv.runner.server._connections)


def transport_of(protocol: Any) -> Any:
    if isinstance(protocol, FastProtocol):
        return protocol._transport
    assert isinstance(protocol, RequestHandler)
    return protocol.transport


def end(sock: socket.socket, how: str) -> None:
    """The client goes away: half-closes, closes, or resets."""
    if how == "half-close":
        sock.shutdown(socket.SHUT_WR)
    elif how == "close":
        sock.close()
    else:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


def read_answer(sock: socket.socket) -> bytes:
    """One answer framed by its Content-Length (blocking; the socket has a timeout)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?i)\r\ncontent-length: (\d+)", head)
    want = int(length.group(1)) if length else 0
    while len(body) < want:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return head + b"\r\n\r\n" + body


def gone(protocol: Any) -> bool:
    """The server saw the connection gone: its transport let go."""
    return transport_of(protocol) is None


async def ends_while_deciding(
    srv: TestServer,
    rc: redis.Redis,
    raw: bytes,
    how: str,
    *,
    handed: bool,
    seen: Callable[[Any], bool] = gone,
) -> tuple[socket.socket, Any]:
    """Send `raw` while Redis holds its script (CLIENT PAUSE WRITE), end the connection
    `how` once the script waits in Redis, wait until the server has `seen` the end (by
    default: the connection gone), then let Redis run the script. `handed`: a request for
    another route first, so the connection is aiohttp's when `raw` comes (on the fast
    path). (the socket, for the caller to read and close; the server's protocol)"""
    sock = socket.create_connection(("127.0.0.1", srv.port))
    sock.settimeout(10)
    try:
        if handed:
            sock.sendall(get("/healthz"))
            assert status(await asyncio.to_thread(read_answer, sock)) == 200
        rc.execute_command("CLIENT", "PAUSE", 20_000, "WRITE")
        try:
            sock.sendall(raw)

            def blocked() -> bool:
                return int(rc.info("clients")["blocked_clients"]) >= 1

            await asyncio.to_thread(wait_until, blocked, 10, "the script paused in Redis")
            (protocol,) = connections(srv)
            end(sock, how)
            await asyncio.to_thread(wait_until, lambda: seen(protocol), 10, "the end seen")
        finally:
            rc.execute_command("CLIENT", "UNPAUSE")
    except BaseException:
        sock.close()
        raise
    return sock, protocol


async def gone_while_deciding(
    srv: TestServer, rc: redis.Redis, raw: bytes, how: str, *, handed: bool
) -> None:
    """ends_while_deciding, the client not reading its answer."""
    sock, _ = await ends_while_deciding(srv, rc, raw, how, handed=handed)
    sock.close()


# (fast_http, the connection handed to aiohttp first, how the client goes): a reset.
# Both paths answer a client that half-closes, and tell a close for good from it by the
# reset its kernel sends for the answer (test_http_edge_attacks).
WAYS = [
    (False, False, "reset"),
    (True, True, "reset"),
    (True, False, "reset"),
]


@pytest.mark.parametrize("route", list(HOLDING))
@pytest.mark.parametrize(("fast", "handed", "how"), WAYS)
async def test_a_hold_whose_answer_cannot_be_written_is_taken_back(
    serve: Serve, redis_client: redis.Redis, route: str, fast: bool, handed: bool, how: str
) -> None:
    """The client is gone before its answer is written: the authorize ran (its record is
    in Redis) and its hold is released, the counters and the lease index back to nothing.
    (It held $0.5 until the lease ended, nobody told of it.)"""
    srv = as_deployed(await serve(fast=fast))
    await gone_while_deciding(srv, redis_client, HOLDING[route], how, handed=handed)

    await asyncio.to_thread(wait_until, lambda: taken_back(redis_client), 10, "taken back")
    (record,) = records(redis_client).values()
    assert record.startswith("R|")  # released, not charged
    assert used_micro(redis_client) == 0


def taken_back(rc: redis.Redis) -> bool:
    """The authorize ran (its record is there: the counters are empty before it runs too)
    and its hold was released: nothing held, the lease index empty."""
    done = records(rc)
    return (
        bool(done)
        and all(r.startswith("R|") for r in done.values())
        and held_micro(rc) == 0
        and rc.zcard(TENANT.leases) == 0
    )


@pytest.mark.parametrize("route", list(HOLDING))
@pytest.mark.parametrize("fast", [True, False])
async def test_a_hold_whose_answer_is_read_stays(
    serve: Serve, redis_client: redis.Redis, route: str, fast: bool
) -> None:
    """The same calls, answered and read: exactly one hold of $0.5 stays, for the caller
    to settle."""
    srv = await serve(fast=fast)
    sock = socket.create_connection(("127.0.0.1", srv.port))
    sock.settimeout(10)
    try:
        sock.sendall(HOLDING[route])
        answer = await asyncio.to_thread(read_answer, sock)
    finally:
        sock.close()
    assert status(answer) == 200
    await asyncio.sleep(0.2)  # (not an assertion on time: a wrong take-back had its chance)
    assert held_micro(redis_client) == HALF_MICRO
    assert redis_client.zcard(TENANT.leases) == 1


@pytest.mark.parametrize("fast", [True, False])
async def test_the_retry_of_a_hold_taken_back_holds_once(
    serve: Serve, redis_client: redis.Redis, fast: bool
) -> None:
    """Reset while deciding, the hold taken back; the retry with the same idempotency key
    gets a reservation of its own, the only hold in Redis, and it settles."""
    srv = as_deployed(await serve(fast=fast))
    raw = post("/v1/authorize", b'{"org_id":"org-1","estimated_usd":0.5,"idempotency_key":"k"}')
    await gone_while_deciding(srv, redis_client, raw, "reset", handed=False)
    await asyncio.to_thread(
        wait_until, lambda: held_micro(redis_client) == 0, 10, "the hold taken back"
    )
    (first,) = records(redis_client)
    (answer,) = await exchange(srv, raw, 1)
    decision = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert (status(answer), decision["replayed"]) == (200, False)
    assert decision["reservation_id"] != first
    assert held_micro(redis_client) == HALF_MICRO
    settle = json.dumps({"reservation_id": decision["reservation_id"], "cost_usd": 0.25})
    (settled,) = await exchange(srv, post("/v1/settle", settle.encode()), 1)
    assert status(settled) == 200
    assert (held_micro(redis_client), used_micro(redis_client)) == (0, 250_000)


# ---- one read, a hot request then one the fast path hands to aiohttp --------------------

A = post("/v1/authorize", AUTHORIZE)
HEALTH = get("/healthz")
TOO_LONG = post("/v1/authorize", AUTHORIZE).replace(b"Length: 107", b"Length: 70000")
# (the read's bytes, the later read's bytes or b"", answers both servers give)
MIXED: dict[str, tuple[bytes, bytes, int]] = {
    # These broke: the fast path served (and charged) the authorize, aiohttp alone
    # answered the read with one 400 and charged nothing.
    "authorize, healthz, garbage": (A + HEALTH + b"GARBAGE\r\n\r\n", b"", 1),
    "authorize, healthz, a short Content-Length": (
        A + HEALTH + A.replace(b"Content-Length: 107", b"Content-Length: 14"),
        b"",
        1,
    ),
    "authorize, healthz, data after Connection: close": (
        A + get("/healthz", "Connection: close") + A,
        b"",
        1,
    ),
    "authorize, two Hosts, authorize": (
        A + A.replace(b"Host: x", b"Host: x\r\nHost: y") + A,
        b"",
        1,
    ),
    "authorize, 129 headers": (
        A + A.replace(b"Host: x", b"Host: x" + b"".join(b"\r\nX-%d: 1" % i for i in range(128))),
        b"",
        1,
    ),
    "authorize, healthz, a header over the limit": (
        A + HEALTH + post("/v1/authorize", AUTHORIZE, "X-Big: " + "q" * 9000),
        b"",
        1,
    ),
    # These held: a read that parses is answered whole, in order, on both.
    "authorize, healthz, authorize": (A + HEALTH + A, b"", 3),
    "authorize, a body over the limit": (A + TOO_LONG, b"", 2),
    "authorize, healthz; garbage in a later read": (A + HEALTH, b"GARBAGE\r\n\r\n", 3),
    "authorize, the head of one; a bad body later": (
        A + A[: A.index(b"\r\n\r\n") + 4],
        b"{not json" + b" " * 98,
        2,
    ),
}


@pytest.mark.parametrize("name", list(MIXED))
async def test_a_read_mixing_hot_and_other_requests_is_answered_as_aiohttp_alone(
    serve: Serve, redis_client: redis.Redis, name: str
) -> None:
    """The fast path never serves (or charges) a request of a read that aiohttp, given the
    read alone, answers otherwise: the answers, byte for byte, and Redis are the same."""
    raw, later, count = MIXED[name]
    fast_srv, plain_srv = await serve(fast=True), await serve(fast=False)
    seen = []
    for srv in (fast_srv, plain_srv):
        flush_data(redis_client)
        answers = await exchange(srv, raw, count, *([later] if later else []))
        seen.append(([comparable(a) for a in answers], redis_state(redis_client)))
    assert seen[0] == seen[1], name
    if count == 1:
        assert status(seen[0][0][0]) >= 400 and seen[0][1] == []  # nothing charged


# ---- pipelined requests split at every byte ------------------------------------------------


def steady(answer: bytes) -> bytes:
    """comparable(), and the forecast, which the clock moves between two exchanges (and
    with it the length of the body)."""
    answer = re.sub(rb'"forecast_usd":[-0-9.e+]+', b'"forecast_usd":-', comparable(answer))
    return re.sub(rb"\r\nContent-Length: [0-9]+", b"\r\nContent-Length: -", answer)


async def split_exchange(srv: TestServer, rc: redis.Redis, at: int | None) -> list[bytes]:
    """From an empty Redis: hold R0, then on one connection authorize, settle R0, check,
    pipelined, the bytes split in two writes at `at` (None: one write)."""
    flush_data(rc)
    (held,) = await exchange(srv, A, 1)
    rid = json.loads(held.split(b"\r\n\r\n", 1)[1])["reservation_id"]
    settle = json.dumps({"reservation_id": rid, "cost_usd": 0.25}).encode()
    raw = A + post("/v1/settle", settle) + post("/v1/check", AUTHORIZE)
    if at is None:
        return await exchange(srv, raw, 3)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(raw[:at])
        await writer.drain()
        await asyncio.sleep(0.002)  # its own read on the server, most of the time
        writer.write(raw[at:])
        out = []
        for _ in range(3):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = re.search(rb"(?i)\r\ncontent-length: (\d+)", head)
            assert length is not None
            out.append(head + await reader.readexactly(int(length.group(1))))
        return out
    finally:
        writer.close()


@pytest.mark.parametrize("fast", [True, False])
async def test_a_pipeline_split_at_any_byte_is_answered_as_unsplit(
    serve: Serve, redis_client: redis.Redis, fast: bool
) -> None:
    """authorize + settle + check in one connection, split in two reads at every byte:
    the same answers as unsplit, byte for byte, and the counters exact each time (one
    hold of the new authorize, R0's $0.25 charged)."""
    srv = await serve(fast=fast)
    unsplit = await split_exchange(srv, redis_client, None)
    whole = [steady(a) for a in unsplit]
    assert [status(a) for a in whole] == [200, 200, 200]
    estimate = json.loads(unsplit[0].split(b"\r\n\r\n", 1)[1])["estimated_usd"]
    exact = (round(estimate * 1_000_000), 250_000)
    assert (held_micro(redis_client), used_micro(redis_client)) == exact
    length = len(A) * 2 + 150  # at least the three requests' bytes
    sizes = set()
    for at in range(1, length):
        answers = await split_exchange(srv, redis_client, at)
        assert [steady(a) for a in answers] == whole, at
        counters = (held_micro(redis_client), used_micro(redis_client))
        assert counters == exact, at
        sizes.add(len(records(redis_client)))
    assert sizes == {2}
    if fast:  # the pieces that are whole requests were the fast path's own
        assert fast_server(srv).served >= length


# ---- many idle connections, hostile heads and bodies ---------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("fast", [True, False])
async def test_a_thousand_idle_connections_neither_block_callers_nor_leak(
    serve: Serve, redis_client: redis.Redis, fast: bool
) -> None:
    """1,000 kept-alive connections sit idle (half never sent a byte, half after one
    answer) while 50 callers authorize at once: each is answered 200 and holds exactly
    once; once every connection closes, the server holds none and the process's open
    descriptors are back to what they were."""
    srv = await serve(fast=fast)
    (warm,) = await exchange(srv, A, 1)  # Redis connections of the store opened
    flush_data(redis_client)
    before = open_fds()
    idle = []
    for i in range(1000):
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        if i % 2:
            writer.write(HEALTH)
            await reader.readuntil(b"\r\n\r\n")
        idle.append(writer)
    answers = await asyncio.gather(*(exchange(srv, A, 1) for _ in range(50)))
    assert [status(a) for (a,) in answers] == [200] * 50
    ids = {json.loads(a.split(b"\r\n\r\n", 1)[1])["reservation_id"] for (a,) in answers}
    assert len(ids) == 50 and set(records(redis_client)) == ids
    estimate = json.loads(warm.split(b"\r\n\r\n", 1)[1])["estimated_usd"]
    assert held_micro(redis_client) == 50 * round(estimate * 1_000_000)
    await asyncio.to_thread(
        wait_until, lambda: len(connections(srv)) == 1000, 20, "the callers' connections closed"
    )
    for writer in idle:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for w in idle), return_exceptions=True)

    def released() -> bool:
        return not connections(srv) and open_fds() <= before

    await asyncio.to_thread(wait_until, released, 20, "every connection closed")


@pytest.mark.parametrize("fast", [True, False])
async def test_an_endless_chunked_body_is_cut_off_and_charges_nothing(
    serve: Serve, redis_client: redis.Redis, fast: bool
) -> None:
    """A chunked authorize whose body never ends: answered 413 problem+json naming the
    body, then, lingering done, the connection is closed while the client still sends (at
    most 64 MiB are offered, 64 KiB at a time with a pause between); the process grew by
    less than the body it was sent; nothing is charged."""
    srv = await serve(fast=fast)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    head = (
        b"POST /v1/authorize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"%x\r\n%b\r\n" % (65536, b" " * 65536)
    sent, cut = 0, False
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB

    async def send() -> None:
        nonlocal sent, cut
        writer.write(head + b"1\r\n{\r\n")
        try:
            while sent < 64 * 1024 * 1024:
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
                await asyncio.sleep(0.01)
        except (ConnectionError, OSError):
            cut = True

    sender = asyncio.create_task(send())
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    await asyncio.wait_for(sender, 120)
    writer.close()
    assert status(answer) == 413 and b"application/problem+json" in answer
    assert cut, f"the server read {sent} bytes and kept the connection"
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
    assert grown * 1024 < sent, (grown, sent)
    assert redis_state(redis_client) == []


async def test_too_many_headers_are_one_400_on_both_paths(
    serve: Serve, redis_client: redis.Redis
) -> None:
    """An authorize with 200 headers (aiohttp's limit is 128), in one write: one 400 and a
    closed connection, the same bytes on both paths; nothing charged."""
    pad = "".join(f"\r\nX-Pad-{i}: {'p' * 90}" for i in range(200))
    raw = A.replace(b"Host: x", ("Host: x" + pad).encode())
    answers = []
    for srv in (await serve(fast=True), await serve(fast=False)):
        flush_data(redis_client)
        (answer,) = await exchange(srv, raw, 1)
        answers.append(steady(answer))
        assert redis_state(redis_client) == []
    assert answers[0] == answers[1] and status(answers[0]) == 400


@pytest.mark.parametrize("fast", [True, False])
async def test_an_endless_header_block_is_cut_off_and_charges_nothing(
    serve: Serve, redis_client: redis.Redis, fast: bool
) -> None:
    """An authorize whose head goes on for 8 MB (1,000 headers of 8,000 bytes, one write
    each): the server refuses it and closes before all of it is sent (it does not buffer a
    head without end); nothing is charged."""
    srv = await serve(fast=fast)
    _, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    field = b"X-Pad-%d: " + b"p" * 8000 + b"\r\n"
    sent, cut = 0, False
    writer.write(b"POST /v1/authorize HTTP/1.1\r\nHost: x\r\n")
    try:
        for i in range(1000):
            writer.write(field % i)
            await writer.drain()
            sent += 1
            await asyncio.sleep(0.001)
    except (ConnectionError, OSError):
        cut = True
    writer.close()
    assert cut, f"the server took {sent} headers of 8,000 bytes"
    assert redis_state(redis_client) == []


# ---- a proxy in front of a sidecar that stops or dies mid-call ----------------------------


# What a proxy answers when the sidecar accepts and never answers, where that is not its
# answer to a sidecar down: Caddy's transport timeout (deploy/caddy/Caddyfile) is a 504.
HUNG_STATUS = {"caddy": 504, "caddy-2.6": 504}


class DeadSidecar:
    """A listener on 127.0.0.1 standing for the sidecar's port after SIGSTOP (the kernel
    completes handshakes, nobody reads or answers) or kill -9 mid-call (the request is
    read, then the kernel closes the socket: FIN, or RST where data was left unread)."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port: int = self.sock.getsockname()[1]
        self.server: asyncio.Server | None = None
        self.calls = 0

    async def start(self) -> DeadSidecar:
        if self.how != "stopped":
            self.server = await asyncio.start_server(self._call, sock=self.sock)
        return self

    async def _call(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.calls += 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
        if self.how == "killed-rst":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        self.sock.close()


@pytest.mark.parametrize("how", ["stopped", "killed-fin", "killed-rst"])
async def test_a_proxy_before_a_stopped_or_killed_sidecar_answers_its_fail_mode(
    make_stack: Any, proxy_kind: str, how: str
) -> None:
    """Envoy, nginx, Traefik, Caddy and HAProxy from the shipped files, the sidecar's port
    answered by a stopped or killed process: the client gets the example's documented
    answer when the sidecar cannot answer (fail closed), never the upstream, and not a
    wait without end."""
    dead = await DeadSidecar(how).start()
    try:
        stack = await make_stack(doc(), proxy_kind, sidecar_port=dead.port)
        code, _, _ = await asyncio.wait_for(stack.send(headers=IDENTITY), 45)
        want = HUNG_STATUS.get(proxy_kind, DOWN_STATUS[proxy_kind]) if how == "stopped" else None
        assert code == (want or DOWN_STATUS[proxy_kind]), stack.proxy.output()[-2000:]
        assert stack.seen == []
    finally:
        await dead.close()


# ---- request ids and problem+json on both paths, for each hostile input -----------------


@pytest.mark.parametrize("name", list(test_hot_path_attacks.CASES))
async def test_with_request_ids_each_hostile_input_is_answered_alike(
    serve: Serve, redis_client: redis.Redis, name: str
) -> None:
    """Debug logs on (the request-id middleware in front, so the fast path runs the
    middleware chain): every hostile input of test_hot_path_attacks, carrying an
    X-Request-ID, gets the same answers on both paths, ids echoed alike, and the same
    Redis; a problem names its field."""
    from sidecar.logs import decision_log

    raw, count = test_hot_path_attacks.CASES[name]
    raw = raw.replace(b"\r\n", b"\r\nX-Request-ID: rid-7\r\n", 1)
    level = decision_log.level
    decision_log.setLevel(logging.DEBUG)
    try:
        fast_srv, plain_srv = await serve(fast=True), await serve(fast=False)
    finally:
        decision_log.setLevel(level)
    seen = []
    for srv in (fast_srv, plain_srv):
        flush_data(redis_client)
        answers = await exchange(srv, raw, count)
        seen.append(([comparable(a) for a in answers], redis_state(redis_client)))
    assert seen[0] == seen[1], name
    for answer in seen[0][0]:
        assert b"application/problem+json" in answer or status(answer) < 400, answer
        if b"application/problem+json" in answer:
            assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["field"], answer
    # The first request carries the id; aiohttp's own 400 for a head it refuses (it does
    # not pass the middleware) carries one it made (sidecar.api.connection), on both paths.
    first = seen[0][0][0]
    assert re.search(rb"\r\nX-Request-ID: (rid-7|<id>)\r\n", first), first  # (<id>: made)


# ---- a decision cancelled after its script was sent ---------------------------------------

BUSY = """local t0 = redis.call('TIME')
repeat local t = redis.call('TIME')
until (t[1] - t0[1]) * 1000000 + (t[2] - t0[2]) > tonumber(ARGV[1])
return 1"""


async def test_an_authorize_cancelled_after_its_script_was_sent_holds_nothing(
    serve: Serve, redis_server: Any, redis_client: redis.Redis
) -> None:
    """aiohttp cancels a handler (its test server on a lost connection; every server past
    its shutdown timeout) while Redis, busy with another script, has not yet run the
    authorize it was sent: Redis runs it afterwards, and its hold, which nobody was told
    of, is taken back (it held until its lease ended)."""
    srv = await serve(fast=False)  # aiohttp's test server: handler_cancellation on
    await exchange(srv, A, 1)  # the store's connections open
    flush_data(redis_client)
    busy_for = threading_eval(redis_server, BUSY, 1_500_000)

    def busy() -> bool:  # a PING unanswered (raw: redis-py would retry until it is)
        with socket.create_connection(("127.0.0.1", redis_server.port)) as probe:
            probe.settimeout(0.1)
            probe.sendall(b"PING\r\n")
            try:
                return not probe.recv(16)
            except TimeoutError:
                return True

    await asyncio.to_thread(wait_until, busy, 10, "Redis busy with a script")
    sock = socket.create_connection(("127.0.0.1", srv.port))
    sock.sendall(HOLDING["authorize"])
    await asyncio.to_thread(wait_until, lambda: connections(srv), 10, "the connection made")
    (protocol,) = connections(srv)
    await asyncio.sleep(0.05)  # (the request read; not an assertion on time)
    end(sock, "reset")
    await asyncio.to_thread(wait_until, lambda: transport_of(protocol) is None, 10, "reset seen")
    await busy_for
    await asyncio.to_thread(
        wait_until, lambda: len(records(redis_client)) == 1, 10, "the authorize run"
    )

    def taken_back() -> bool:
        return held_micro(redis_client) == 0 and redis_client.zcard(TENANT.leases) == 0

    await asyncio.to_thread(wait_until, taken_back, 10, "the hold taken back")


def threading_eval(redis_server: Any, script: str, *args: Any) -> asyncio.Future[Any]:
    """Run a script on its own connection in a thread (it blocks Redis while it runs)."""

    def run() -> Any:
        client = redis.Redis(port=redis_server.port)
        try:
            return client.eval(script, 0, *args)
        finally:
            client.close()

    return asyncio.ensure_future(asyncio.to_thread(run))
