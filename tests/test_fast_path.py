"""The fast path (sidecar.api.fast): the hot routes are served by its protocol, byte for
byte as aiohttp serves them, and every other request on the same connection still goes to
aiohttp, in order, pipelined or not."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestServer

from sidecar.api.app import create_app
from sidecar.api.fast import FastServer
from sidecar.store import RedisStore
from tests.conftest import make_config
from tests.harness import RedisServer

DOC: dict[str, Any] = {
    "budgets": [
        {"id": "org", "name": "Org", "scope": "organization", "limit_usd": 1000, "period": "monthly"},
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
async def serve(
    redis_server: RedisServer, redis_client: redis.Redis
) -> AsyncIterator[Serve]:
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
