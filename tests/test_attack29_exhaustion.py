"""Resource exhaustion on the sidecar's own host: connections by the thousand and a file
descriptor limit too low for them.

- An idle keep-alive connection is closed by the keep-alive timer (75 s in production,
  1 s here), on both HTTP paths.
- At most `settings.max_connections` are open at once: past it a new connection closes
  the idle one open longest; when every one is in a request, the new one is closed
  unanswered, and the requests in flight are answered and hold exactly once.
- A flood of malformed requests is one log line (no traceback), not 1.5 KB each.
- A real sidecar under RLIMIT_NOFILE 128 flooded with 300 connections keeps descriptors
  for Redis: its Redis connections killed mid-flood are made again and decisions are
  allowed (before the bound, every one answered the fail mode: no descriptor was free),
  and it serves new connections once the flood ends. Its CPU time over the flood is
  printed (`-s`), not asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from aiohttp.test_utils import TestServer

from sidecar.api import connection
from sidecar.api.app import create_app
from sidecar.api.connection import SidecarServer
from sidecar.keys import tenant_keys
from sidecar.store import RedisStore
from tests.conftest import make_config
from tests.harness import REPO, RedisServer, SidecarProcess, flush_data, wait_until
from tests.test_fast_path import get, post, status
from tests.test_transport_attacks import records

GUARD_S = 10.0  # not a timing assertion: only keeps a hang from hanging the suite
BOUND = 16
DOC: dict[str, Any] = {
    "budgets": [{"id": "org", "name": "Org", "scope": "organization", "limit_usd": 100,
                 "period": "daily"}]
}  # fmt: skip
AUTH_BODY = b'{"org_id":"org-1","estimated_usd":0.5}'
HEALTH = get("/healthz")

Serve = Callable[..., Any]


@pytest.fixture
async def serve(redis_server: RedisServer, redis_client: redis.Redis) -> AsyncIterator[Serve]:
    servers: list[TestServer] = []
    flush_data(redis_client)

    async def start(fast: bool, **kwargs: Any) -> TestServer:
        cfg = make_config({**DOC, "settings": {"fast_http": fast, "max_connections": BOUND}})
        store = RedisStore.from_url(redis_server.url, timeout_ms=2000)
        srv = TestServer(create_app(cfg, store, **kwargs), host="127.0.0.1")
        await srv.start_server()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        await srv.close()


async def until(predicate: Callable[[], bool], what: str) -> None:
    """wait_until for a test whose server runs in its own event loop."""
    deadline = time.monotonic() + GUARD_S
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached within {GUARD_S}s"
        await asyncio.sleep(0.02)


def server_of(srv: TestServer) -> SidecarServer:
    assert srv.runner is not None and isinstance(srv.runner.server, SidecarServer)
    return srv.runner.server


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def connect(srv: TestServer) -> Conn:
    return await asyncio.open_connection("127.0.0.1", srv.port)


async def answer(conn: Conn, data: bytes = b"") -> bytes | None:
    """Write `data`, read one answer; None if the server closed the connection instead."""
    reader, writer = conn
    try:
        if data:
            writer.write(data)
            await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), GUARD_S)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
    return head + await asyncio.wait_for(reader.readexactly(length), GUARD_S)


async def closed(conn: Conn) -> bool:
    """Whether the server closed `conn` (EOF or reset) without sending anything."""
    reader, _ = conn
    try:
        return await asyncio.wait_for(reader.read(1), GUARD_S) == b""
    except ConnectionError:
        return True


async def close_all(conns: list[Conn]) -> None:
    for _, writer in conns:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)


@pytest.mark.parametrize("fast", [True, False])
async def test_an_idle_keep_alive_connection_is_closed_by_the_keep_alive_timer(
    serve: Serve, fast: bool
) -> None:
    """Three connections, each idle after one answer: each is closed by the server (the
    client never closes), with nothing more sent."""
    srv = await serve(fast, header_timeout_s=1.0)
    conns = [await connect(srv) for _ in range(3)]
    assert [status(a) if (a := await answer(c, HEALTH)) else None for c in conns] == [200] * 3
    assert [await closed(c) for c in conns] == [True] * 3
    await close_all(conns)


@pytest.mark.parametrize("fast", [True, False])
async def test_past_max_connections_the_idle_one_open_longest_is_closed(
    serve: Serve, redis_client: redis.Redis, fast: bool
) -> None:
    """BOUND connections open (half never sent a byte, half idle after an answer), then 4
    more, each authorizing: the 4 open longest are closed, the 4 new ones answered 200
    and held once each, the other BOUND - 4 still served."""
    srv = await serve(fast)
    old = []
    for i in range(BOUND):
        conn = await connect(srv)
        if i % 2:
            assert (a := await answer(conn, HEALTH)) is not None and status(a) == 200
        old.append(conn)
    await until(lambda: len(server_of(srv).open) == BOUND, "all open")
    new = [await connect(srv) for _ in range(4)]
    answers = [await answer(c, post("/v1/authorize", AUTH_BODY)) for c in new]
    assert [status(a) if a else None for a in answers] == [200] * 4
    assert [await closed(c) for c in old[:4]] == [True] * 4
    kept = [await answer(c, HEALTH) for c in old[4:]]
    assert [status(a) if a else None for a in kept] == [200] * (BOUND - 4)
    server = server_of(srv)
    assert (server.evicted, server.refused, len(server.open)) == (4, 0, BOUND)
    assert len(records(redis_client)) == 4
    await close_all(old + new)


@pytest.mark.parametrize("fast", [True, False])
async def test_when_every_connection_is_in_a_request_a_new_one_is_refused(
    serve: Serve, redis_client: redis.Redis, fast: bool
) -> None:
    """BOUND authorizes each stopped halfway through its body: a new connection is closed
    unanswered and nothing is evicted. The bodies then complete: BOUND answers 200,
    BOUND holds; one more connection is then served (it closes an idle one)."""
    srv = await serve(fast)
    whole = post("/v1/authorize", AUTH_BODY)
    half = len(whole) - len(AUTH_BODY) // 2
    busy = []
    for _ in range(BOUND):
        conn = await connect(srv)
        conn[1].write(whole[:half])
        await conn[1].drain()
        busy.append(conn)
    await until(
        lambda: (
            len(server_of(srv).open) == BOUND
            and not any(h.idle() for h in server_of(srv).open.values())
        ),
        "every connection in a request",
    )
    extra = await connect(srv)
    assert await closed(extra)
    server = server_of(srv)
    assert (server.evicted, server.refused) == (0, 1)
    answers = [await answer(c, whole[half:]) for c in busy]
    assert [status(a) if a else None for a in answers] == [200] * BOUND
    ids = {json.loads(a.split(b"\r\n\r\n", 1)[1])["reservation_id"] for a in answers if a}
    assert len(ids) == BOUND and set(records(redis_client)) == ids
    late = await connect(srv)
    assert (a := await answer(late, HEALTH)) is not None and status(a) == 200
    assert (server.evicted, server.refused) == (1, 1)
    await close_all([*busy, extra, late])


# ---- the log under a flood of malformed requests ----------------------------------------


MALFORMED = {
    "bad chunk size": (
        b"POST /v1/authorize HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    ),
    "header too long": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 20_000 + b"\r\n\r\n",
}


@pytest.mark.parametrize("fast", [True, False])
async def test_a_flood_of_malformed_requests_is_one_log_line_not_one_each(
    serve: Serve,
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    fast: bool,
) -> None:
    """100 of each malformed request, each on its own connection: 200 answers 400
    problem+json, nothing written, and one warning line without a traceback (the period
    is set past the test's length, so the count holds however slow the machine). aiohttp
    alone logs each one at ERROR with a traceback of about 1.5 KB."""
    monkeypatch.setattr(connection, "_MALFORMED", connection._Malformed())
    monkeypatch.setattr(connection, "MALFORMED_LOG_EVERY_S", 3600.0)
    srv = await serve(fast)
    caplog.set_level(logging.DEBUG)
    answers = []
    for _ in range(100):
        for data in MALFORMED.values():
            conn = await connect(srv)
            answers.append(await answer(conn, data))
            await close_all([conn])
    assert [status(a) if a else None for a in answers] == [400] * 200
    assert all(b"application/problem+json" in a for a in answers if a)
    logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.name, r.exc_info) for r in logged] == [("sidecar.http", None)]
    assert "refused a malformed request" in logged[0].getMessage()
    assert records(redis_client) == {}


# ---- a real sidecar under a low descriptor limit ----------------------------------------


LIMIT = 128


class LimitedSidecar(SidecarProcess):
    """`python -m sidecar serve` with RLIMIT_NOFILE (soft and hard) at LIMIT."""

    def start(self, wait: bool = True) -> LimitedSidecar:
        assert self.redis_url and self.config_path
        cmd = [sys.executable, "-m", "sidecar", "serve", "--port", str(self.port),
               "--redis-url", self.redis_url, "--config", self.config_path]  # fmt: skip

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))

        self.process = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO, preexec_fn=limit
        )
        wait_until(self.ready, what=f"sidecar on port {self.port}", timeout_s=20)
        return self


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def authorize_on(sock: socket.socket) -> str:
    """One authorize on `sock`: its status, or "closed" if the server closed it."""
    try:
        sock.sendall(post("/v1/authorize", AUTH_BODY))
        sock.settimeout(GUARD_S)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return "closed"
            data += chunk
    except OSError:
        return "closed"
    return data.split(b" ", 2)[1].decode()


def test_a_connection_flood_on_a_low_descriptor_limit_leaves_room_for_redis(
    tmp_path: Path,
) -> None:
    server = RedisServer().start()
    cfg = tmp_path / "budgets.yaml"
    cfg.write_text(yaml.safe_dump({**DOC, "settings": {"redis_timeout_ms": 2000}}))
    sidecar = LimitedSidecar(server.url, str(cfg))
    flood: list[socket.socket] = []
    try:
        sidecar.start()
        assert sidecar.process is not None
        pid = sidecar.process.pid
        with socket.create_connection(("127.0.0.1", sidecar.port), GUARD_S) as warm:
            assert authorize_on(warm) == "200"
        assert f"at most {LIMIT - 64} client connections" in sidecar.output()
        cpu_before, started = cpu_s(pid), time.monotonic()
        for _ in range(300):
            flood.append(socket.create_connection(("127.0.0.1", sidecar.port), GUARD_S))
        time.sleep(1.0)  # (let it accept what it will: the counts below are exact anyway)
        flood_cpu, flood_wall = cpu_s(pid) - cpu_before, time.monotonic() - started
        print(f"\nflood of 300 on RLIMIT_NOFILE {LIMIT}: {flood_cpu:.2f} s CPU over "
              f"{flood_wall:.2f} s, {open_fds(pid)} descriptors open")  # fmt: skip
        with server.client() as client:
            assert client.client_kill_filter(_type="normal", skipme=True) >= 1
        time.sleep(0.5)
        refill = [socket.create_connection(("127.0.0.1", sidecar.port), GUARD_S) for _ in range(50)]
        flood += refill
        time.sleep(0.5)
        assert open_fds(pid) < LIMIT
        results: dict[str, int] = {}
        for sock in refill[-40:]:
            outcome = authorize_on(sock)
            results[outcome] = results.get(outcome, 0) + 1
        assert results == {"200": 40}
        with server.client() as client:
            held = client.hgetall(tenant_keys("default").reservations)
        assert len([k for k in held if not k.startswith("k:")]) == 41
        for sock in flood:
            sock.close()
        flood = []
        with socket.create_connection(("127.0.0.1", sidecar.port), GUARD_S) as after:
            assert authorize_on(after) == "200"
        assert sidecar.process.poll() is None
    finally:
        for sock in flood:
            with contextlib.suppress(OSError):
                sock.close()
        sidecar.cleanup()
        server.cleanup()
