"""Slow clients are cut off: a request head trickled byte by byte loses its connection
when the header deadline passes, a body trickled byte by byte gets 408 problem+json and a
closed connection, and neither writes anything. The app runs with 1 s deadlines (the
production defaults are app.HEADER_TIMEOUT_S and app.BODY_TIMEOUT_S); the client trickles
for at most GUARD_S, so the outcome, not a timing, is asserted."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestServer

from sidecar.api import app as app_mod
from sidecar.api.app import create_app
from sidecar.clock import FakeClock
from sidecar.store import RedisStore
from tests.conftest import make_config
from tests.harness import RedisServer, data_keys

DEADLINE_S = 1.0
GUARD_S = 8.0  # the client gives up trickling after this: the server must close first
TRICKLE_S = 0.1
CONFIG: dict[str, Any] = {
    "budgets": [{"id": "org", "name": "Org", "scope": "organization", "limit_usd": 10,
                 "period": "daily"}]
}  # fmt: skip
BODY = json.dumps({"org_id": "acme", "estimated_usd": 0.5}).encode()


@pytest.fixture
async def server(
    redis_server: RedisServer, redis_client: redis.Redis, clock: FakeClock
) -> AsyncIterator[TestServer]:
    store = RedisStore.from_url(redis_server.url, timeout_ms=2000)
    app = create_app(
        make_config(CONFIG),
        store,
        clock=clock,
        header_timeout_s=DEADLINE_S,
        body_timeout_s=DEADLINE_S,
    )
    srv = TestServer(app, host="127.0.0.1")
    await srv.start_server()
    yield srv
    await srv.close()


async def trickle(server: TestServer, head: bytes, body: bytes) -> tuple[bytes, bool]:
    """Send `head` then `body` a byte every TRICKLE_S (only the part after the first byte
    of `head` is trickled when `body` is empty). Returns (what the server sent, whether it
    closed the connection before GUARD_S)."""
    assert server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    slow = body or head[1:]
    writer.write(head if body else head[:1])
    received = b""
    closed = False

    async def read_all() -> None:
        nonlocal received, closed
        while chunk := await reader.read(65536):
            received += chunk
        closed = True

    reading = asyncio.create_task(read_all())
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(GUARD_S):
                for i in range(len(slow)):
                    if reading.done():
                        break
                    writer.write(slow[i : i + 1])
                    with contextlib.suppress(ConnectionError):
                        await writer.drain()
                    await asyncio.sleep(TRICKLE_S)
                await asyncio.wait_for(asyncio.shield(reading), GUARD_S)
    except ConnectionError:
        closed = True
    finally:
        reading.cancel()
        with contextlib.suppress(BaseException):
            await reading
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return received, closed


def head(content_length: int, padding: int = 0) -> bytes:
    pad = f"X-Pad: {'a' * padding}\r\n" if padding else ""
    return (
        "POST /v1/authorize HTTP/1.1\r\nHost: sidecar\r\nContent-Type: application/json\r\n"
        f"{pad}Content-Length: {content_length}\r\n\r\n"
    ).encode()


async def test_a_trickled_request_head_is_cut_off(
    server: TestServer, redis_client: redis.Redis
) -> None:
    # 200 bytes at one per 0.1 s would take 20 s: longer than GUARD_S, far longer than 1 s.
    received, closed = await trickle(server, head(len(BODY), padding=120), b"")
    assert closed, "the server kept a trickling client"
    assert received == b""  # closed without an answer: there was no request yet
    assert data_keys(redis_client) == []


async def test_a_trickled_body_gets_408_and_a_closed_connection(
    server: TestServer, redis_client: redis.Redis
) -> None:
    body = BODY + b" " * 100  # ~150 bytes at one per 0.1 s: 15 s, longer than GUARD_S
    received, closed = await trickle(server, head(len(body)), body)
    assert closed, f"the server kept a trickling client: {received!r}"
    status_line, _, rest = received.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 408 Request Timeout", received
    headers, _, payload = rest.partition(b"\r\n\r\n")
    assert b"Content-Type: application/problem+json" in headers
    assert b"Connection: close" in headers
    problem = json.loads(payload)
    assert problem["status"] == 408 and problem["field"] == "body"
    assert data_keys(redis_client) == []


async def test_a_prompt_client_is_served_under_the_same_deadlines(
    server: TestServer, redis_client: redis.Redis
) -> None:
    assert server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(head(len(BODY)) + BODY)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), GUARD_S)
    finally:
        writer.close()
        await writer.wait_closed()
    assert status_line == b"HTTP/1.1 200 OK\r\n"
    assert redis_client.keys("*") != []


def test_production_deadlines() -> None:
    assert (app_mod.HEADER_TIMEOUT_S, app_mod.BODY_TIMEOUT_S, app_mod.LINGER_S) == (75.0, 10.0, 2.0)
