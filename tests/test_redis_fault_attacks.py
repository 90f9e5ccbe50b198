"""Attacks on the cap's promises under Redis faults: a Redis out of memory or busy with a
script, a breaker probe its caller gave up on, and a flaky link (a TCP proxy that delays
replies past the timeout, cuts a reply in the middle, or swallows everything) between one
of two sidecars and Redis while callers authorize and settle through both.

Every promise is counted exactly: nothing over the cap, each settle charged once (raw
counters = the usage ledger), the holds of timed-out authorizes taken back, and every
answer the configured fail mode or a real decision (never a 500).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from sidecar.api.app import ENGINE, create_app
from sidecar.clock import FakeClock
from sidecar.keys import tenant_keys
from sidecar.resp import ConnectionLost, PipelinedConnection
from sidecar.schemas import Decision
from sidecar.store import RedisStore
from tests.conftest import T0_MS, make_config
from tests.harness import RedisServer, wait_until

GUARD_S = 10.0  # not a timing assertion: only keeps a hang from hanging the suite
TENANT = tenant_keys("default")
ORG_CAP = {
    "id": "org",
    "name": "The org",
    "scope": "organization",
    "limit_usd": 5.0,
    "period": "daily",
}


def settings_doc(fail_mode: str, timeout_ms: int = 2000, cap: dict[str, Any] = ORG_CAP) -> Any:
    return {
        "budgets": [cap],
        "settings": {"fail_mode": fail_mode, "redis_timeout_ms": timeout_ms},
    }


@pytest.fixture
def rc(server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=server.port, decode_responses=True)
    try:
        yield client
    finally:
        client.close()


async def app_over(url: str, document: Any) -> TestClient[Any, Any]:
    cfg = make_config(document)
    store = RedisStore.from_url(url, timeout_ms=cfg.settings.redis_timeout_ms)
    client = TestClient(TestServer(create_app(cfg, store, clock=FakeClock(T0_MS))))
    await client.start_server()
    return client


async def call(client: TestClient[Any, Any], path: str, body: Any) -> tuple[int, dict[str, Any]]:
    """(status, JSON body); a 500 or a stack trace fails the test wherever it appears."""

    async def go() -> tuple[int, dict[str, Any]]:
        resp = await client.post(path, json=body)
        text = await resp.text()
        assert "Traceback" not in text, text
        assert resp.status != 500, text
        return resp.status, json.loads(text)

    return await asyncio.wait_for(go(), GUARD_S)


def raw(rc: redis.Redis) -> dict[str, str]:
    counters: dict[str, str] = rc.hgetall(TENANT.counters)  # type: ignore[assignment]
    return counters


def held_micro(rc: redis.Redis) -> int:
    return sum(int(v) for k, v in raw(rc).items() if k.startswith("h:"))


def used_micro(rc: redis.Redis) -> int:
    return sum(int(v) for k, v in raw(rc).items() if k.startswith("u:"))


def ledger_micro(rc: redis.Redis) -> tuple[int, int]:
    """(entries, their cost summed) of the usage ledger."""
    entries: list[Any] = rc.xrange(TENANT.usage)  # type: ignore[assignment]
    total = 0
    for _, fields in entries:
        cost = fields.get("c")
        assert cost is not None, fields
        total += int(cost)
    return len(entries), total


def assert_fail_mode(status: int, body: dict[str, Any], fail_mode: str) -> None:
    """The configured fail mode, exactly: closed a 503 flagged degraded; open an allow
    flagged degraded that holds nothing."""
    if fail_mode == "closed":
        assert status == 503 and body["degraded"] is True, (status, body)
    else:
        assert status == 200 and body["allowed"] is True and body["degraded"] is True, body
        # Nothing held; an authorize's fail-open grant id is charged at its settle.
        assert body["lease_expires_at"] is None, body
        rid = body["reservation_id"]
        assert rid is None or rid.startswith("fa11"), body


# ---- a Redis that refuses: out of memory, busy with a script ------------------------------


@pytest.mark.parametrize("fail_mode", ["closed", "open"])
async def test_a_redis_out_of_memory_answers_the_fail_mode_and_writes_nothing(
    server: RedisServer, rc: redis.Redis, fail_mode: str
) -> None:
    """maxmemory reached with noeviction: every script's first write is refused with OOM
    (Redis aborts the script before it writes anything). That is Redis unable to decide
    now, not a bug in the sidecar: the fail mode, not a 500, and nothing half-written."""
    client = await app_over(server.url, settings_doc(fail_mode))
    try:
        status, body = await call(client, "/v1/authorize", {"org_id": "o1", "estimated_usd": 0.5})
        assert status == 200 and body["reservation_id"], body
        rid = body["reservation_id"]
        before = (raw(rc), rc.hgetall(TENANT.reservations), rc.zcard(TENANT.leases))
        rc.config_set("maxmemory-policy", "noeviction")
        rc.config_set("maxmemory", 1)  # below what is used: every write is refused
        try:
            for _ in range(5):  # more than the breaker's threshold
                status, body = await call(
                    client, "/v1/authorize", {"org_id": "o1", "estimated_usd": 0.5}
                )
                assert_fail_mode(status, body, fail_mode)
            status, body = await call(
                client, "/v1/settle", {"reservation_id": rid, "cost_usd": 0.1}
            )
            assert status == 503 and body["degraded"] is True, body
            after = (raw(rc), rc.hgetall(TENANT.reservations), rc.zcard(TENANT.leases))
            assert after == before
        finally:
            rc.config_set("maxmemory", 0)
        # Memory back: the cancels of the refused authorizes find nothing to take back,
        # and decisions are real again.
        engine = client.app[ENGINE]  # type: ignore[union-attr]
        await asyncio.to_thread(wait_until, lambda: engine.pending_cancels == 0, 10, "cancels")
        await decisions_resume(client)
        assert held_micro(rc) == 500_000  # the one hold made before, nothing else
        assert used_micro(rc) == 0  # its settle refused, not half-applied
        status, body = await call(client, "/v1/settle", {"reservation_id": rid, "cost_usd": 0.1})
        assert status == 200, body
        assert (held_micro(rc), used_micro(rc)) == (0, 100_000)
    finally:
        await client.close()


BUSY = """local t0 = redis.call('TIME')
repeat local t = redis.call('TIME')
until (t[1] - t0[1]) * 1000000 + (t[2] - t0[2]) > tonumber(ARGV[1])
return 1"""


@pytest.mark.parametrize("fail_mode", ["closed", "open"])
async def test_a_redis_busy_with_a_long_script_answers_the_fail_mode(
    server: RedisServer, rc: redis.Redis, fail_mode: str
) -> None:
    """A script of another client past busy-reply-threshold: Redis answers every other
    command BUSY at once. The decision is not made (the script did not run): the fail mode,
    not a 500 'internal error'."""
    client = await app_over(server.url, settings_doc(fail_mode))
    try:
        await call(client, "/v1/check", {"org_id": "o1"})  # connected, scripts loaded
        rc.config_set("busy-reply-threshold", 50)
        busy = asyncio.ensure_future(asyncio.to_thread(run_script_elsewhere, server, 3_000_000))

        def answers_busy() -> bool:
            try:
                rc.ping()
            except redis.exceptions.BusyLoadingError:
                return True
            except redis.exceptions.ResponseError as exc:
                return str(exc).startswith("BUSY")
            return False

        await asyncio.to_thread(wait_until, answers_busy, 10, "Redis answering BUSY")
        for _ in range(3):
            status, body = await call(
                client, "/v1/authorize", {"org_id": "o1", "estimated_usd": 0.5}
            )
            assert_fail_mode(status, body, fail_mode)
        await busy
        await decisions_resume(client)
        engine = client.app[ENGINE]  # type: ignore[union-attr]
        await asyncio.to_thread(wait_until, lambda: engine.pending_cancels == 0, 10, "cancels")
        assert held_micro(rc) == 0 and rc.zcard(TENANT.leases) == 0
    finally:
        await client.close()


def run_script_elsewhere(server: RedisServer, micros: int) -> Any:
    client = redis.Redis(port=server.port)
    try:
        return client.eval(BUSY, 0, micros)
    finally:
        client.close()


async def decisions_resume(client: TestClient[Any, Any]) -> None:
    """Wait (bounded) until a check answers from Redis again (the breaker's cool-down)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        resp = await client.post("/v1/check", json={"org_id": "probe"})
        body = await resp.json()
        if resp.status == 200 and not body["degraded"]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("decisions did not resume within 5 s of Redis returning")


# ---- a TCP proxy with faults ---------------------------------------------------------------


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of one Redis, in the test's own event loop.

    mode "forward": bytes both ways; "delay": replies held `delay_s` before they go on
    (the commands reach Redis at once: it runs them, the sidecar gives up on the answer);
    "cut": the next reply chunk goes half-way, then the connection closes (a reply cut in
    the middle); "blackhole": accepts, reads, forwards nothing either way. `hold()` keeps
    the commands read from then on that contain its bytes (and everything after them on
    their connection) from Redis until `let_go()`: a command that reaches Redis only after
    its sidecar gave up on it and sent what follows on a new connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.mode = "forward"
        self.delay_s = 0.0
        self.port = 0
        self.bytes_in = 0  # bytes the sidecar sent, whatever the mode
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._let_go = asyncio.Event()
        self._let_go.set()
        self._holding: bytes | None = None
        self.held = 0  # commands' chunks held so far
        self.held_ports: list[int] = []  # the local ports, towards Redis, of the held ones

    def hold(self, containing: bytes) -> None:
        self._let_go.clear()
        self._holding = containing

    def let_go(self) -> None:
        self._holding = None
        self._let_go.set()

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]
        # A connection that swallowed anything swallows everything after: TCP loses no
        # bytes in the middle of a stream that goes on (a dead path stays dead, or the
        # connection breaks). Forwarding again after a gap would hand one caller's reply to
        # another (RESP replies carry no ids): a fault no network makes.
        dead = False

        async def upstream() -> None:
            nonlocal dead
            with contextlib.suppress(OSError):
                while data := await reader.read(65536):
                    self.bytes_in += len(data)
                    dead = dead or self.mode == "blackhole"
                    if self._holding is not None and self._holding in data:
                        self.held += 1
                        self.held_ports.append(up_writer.get_extra_info("sockname")[1])
                        await self._let_go.wait()
                    if not dead:
                        up_writer.write(data)
            up_writer.close()

        async def downstream() -> None:
            with contextlib.suppress(OSError):
                await forward_replies()
            writer.close()
            up_writer.close()

        async def forward_replies() -> None:
            nonlocal dead
            while data := await up_reader.read(65536):
                mode = self.mode
                dead = dead or mode == "blackhole"
                if dead:
                    continue
                if mode == "delay":
                    await asyncio.sleep(self.delay_s)
                if mode == "cut":
                    self.cuts += 1
                    writer.write(data[: max(len(data) // 2, 1)] if len(data) > 1 else b"")
                    return
                writer.write(data)

        for coro in (upstream(), downstream()):
            task = asyncio.ensure_future(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture
async def proxy(server: RedisServer) -> AsyncIterator[FaultProxy]:
    p = await FaultProxy(server.port).start()
    try:
        yield p
    finally:
        await p.close()


# ---- the breaker's probe ----------------------------------------------------------------


async def test_a_probe_its_caller_gave_up_on_does_not_keep_the_breaker_open(
    proxy: FaultProxy,
) -> None:
    """Redis stalls; the breaker opens; after the cool-down one call probes. Its caller
    gives up on it (a request timeout, a cancelled task: an embedding app's wait_for) before
    Redis answers. Then Redis is back: calls must reach it again. Before the fix the
    half-open breaker waited forever for the abandoned probe to report, and refused every
    call without touching Redis ("circuit open") until the process restarted."""
    conn = PipelinedConnection(proxy.url, timeout_s=0.05)
    try:
        assert await conn.execute("PING") == "PONG"
        proxy.mode = "blackhole"
        for _ in range(3):
            with pytest.raises(ConnectionLost):
                await asyncio.wait_for(conn.execute("PING"), GUARD_S)
        assert conn.breaker.is_open
        await asyncio.sleep(conn.breaker.cooldown_s * 1.5)  # the cool-down over (a wait)
        sent = proxy.bytes_in
        probe = asyncio.ensure_future(conn.execute("PING"))
        deadline = time.monotonic() + GUARD_S
        while proxy.bytes_in == sent and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        assert proxy.bytes_in > sent, "the probe was never sent"
        probe.cancel()  # its caller gave up before any answer
        with pytest.raises(asyncio.CancelledError):
            await probe
        proxy.mode = "forward"
        assert await answers_again(conn), "Redis is back, but the breaker refuses every call"
    finally:
        await conn.close()


async def answers_again(conn: PipelinedConnection) -> bool:
    """Redis reachable again: does a call get through within 5 s (a wait, not a timing)?"""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with contextlib.suppress(ConnectionLost):
            if await asyncio.wait_for(conn.execute("PING"), GUARD_S) == "PONG":
                return True
        await asyncio.sleep(0.05)
    return False


async def test_a_probe_cancelled_while_connecting_does_not_keep_the_breaker_open(
    proxy: FaultProxy,
) -> None:
    """As above, the probe abandoned while its connection is still being opened."""
    conn = PipelinedConnection(proxy.url, timeout_s=0.05)
    try:
        assert await conn.execute("PING") == "PONG"
        proxy.mode = "blackhole"
        for _ in range(3):
            with pytest.raises(ConnectionLost):
                await asyncio.wait_for(conn.execute("PING"), GUARD_S)
        await asyncio.sleep(conn.breaker.cooldown_s * 1.5)
        probe = asyncio.ensure_future(conn.execute("PING"))
        await asyncio.sleep(0)  # the probe started: allowed, its connect under way
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
        proxy.mode = "forward"
        assert await answers_again(conn), "Redis is back, but the breaker refuses every call"
    finally:
        await conn.close()


# ---- two sidecars, one behind a flaky link, callers authorizing and settling ---------------

EST = 0.1  # each call asks for, and costs, $0.1: the $5 cap takes 50 of them
COST_MICRO = 100_000
CAP_MICRO = 5_000_000
WORKERS = 50
ROUNDS = 4
MAX_ROUNDS = 400
FAULTS = ("cut", "forward", "delay", "forward", "blackhole", "forward")


class Load:
    """50 callers authorizing ($0.1 each under a $5 cap) and settling what they hold, each
    call through one of `sidecars` at random (a settle answered 503 is repeated, on either),
    with what they were answered counted."""

    def __init__(self, sidecars: tuple[TestClient[Any, Any], ...], fail_mode: str) -> None:
        self.sidecars = sidecars
        self.fail_mode = fail_mode
        self.rng = random.Random(7)
        self.answers: dict[tuple[str, int], int] = {}
        self.handed: list[str] = []
        self.settled: set[str] = set()
        self.faults_over = asyncio.Event()

    def count(self, route: str, status: int) -> None:
        self.answers[(route, status)] = self.answers.get((route, status), 0) + 1

    async def settle(self, rid: str) -> None:
        for _ in range(200):  # bounded: a 503 is repeated, on either sidecar
            status, body = await call(
                self.rng.choice(self.sidecars),
                "/v1/settle",
                {"reservation_id": rid, "cost_usd": EST},
            )
            self.count("settle", status)
            if status == 200:
                self.settled.add(rid)
                return
            assert status == 503 and body["degraded"] is True, body
            await asyncio.sleep(0.02)
        raise AssertionError(f"{rid} never settled")

    async def caller(self) -> None:
        # At least ROUNDS, and on until the faults are over (bounded either way), paced so
        # that the callers span the faults instead of finishing inside one of them.
        for n in range(MAX_ROUNDS):
            if n >= ROUNDS and self.faults_over.is_set():
                return
            await asyncio.sleep(self.rng.uniform(0, 0.04))
            status, body = await call(
                self.rng.choice(self.sidecars),
                "/v1/authorize",
                {"org_id": "o1", "estimated_usd": EST},
            )
            self.count("authorize", status)
            if status == 200 and body["degraded"] is False:
                if body["allowed"]:
                    self.handed.append(body["reservation_id"])
                    await self.settle(body["reservation_id"])
                else:
                    assert body["reservation_id"] is None, body
            else:
                assert_fail_mode(status, body, self.fail_mode)
                self.count("authorize by the fail mode", status)

    async def run(self) -> None:
        await asyncio.gather(*(self.caller() for _ in range(WORKERS)))

    async def check(self, rc: redis.Redis) -> None:
        """Once every cancel is done: the promises, counted."""
        engines = [s.app[ENGINE] for s in self.sidecars]  # type: ignore[index]

        def cancels_done() -> bool:
            return all(e.pending_cancels == 0 for e in engines)

        await asyncio.to_thread(wait_until, cancels_done, 30, "the cancels done")
        assert len(self.handed) == len(set(self.handed)), "one reservation to two callers"
        assert self.settled == set(self.handed)
        assert len(self.settled) <= CAP_MICRO // COST_MICRO
        assert held_micro(rc) == 0 and rc.zcard(TENANT.leases) == 0, raw(rc)
        assert used_micro(rc) == COST_MICRO * len(self.settled) <= CAP_MICRO
        assert ledger_micro(rc) == (len(self.settled), COST_MICRO * len(self.settled))
        # The faults bit (else the test proved nothing): some answers by the fail mode.
        degraded = self.answers.get(("settle", 503), 0)
        degraded += sum(n for (route, _), n in self.answers.items() if "fail mode" in route)
        assert degraded > 0, self.answers


@pytest.mark.parametrize("fail_mode", ["closed", "open"])
async def test_a_flaky_link_to_redis_keeps_the_cap_each_charge_once_and_the_answers_honest(
    server: RedisServer, rc: redis.Redis, proxy: FaultProxy, fail_mode: str
) -> None:
    """Two sidecars; one reaches Redis over a proxy that, in turn, delays replies past the
    100 ms timeout (Redis runs the command, the sidecar gives up), cuts a reply in the
    middle, and swallows everything. The clock stands still, so no lease ends: every hold
    must be settled or taken back by the cancel of its authorize.

    Held: nothing over the cap; every settled reservation charged exactly once (raw
    counters = the usage ledger = the settles answered); no hold left once the cancels are
    done; every reservation id handed to one caller only (a reply given to the wrong caller
    would repeat one); every answer a decision or the configured fail mode, never a 500."""
    document = settings_doc(fail_mode, timeout_ms=100)
    direct = await app_over(server.url, document)
    flaky = await app_over(proxy.url, document)
    load = Load((direct, flaky), fail_mode)
    faults_seen: list[str] = []

    async def chaos() -> None:
        try:
            for phase in range(2 * len(FAULTS)):  # each fault twice
                proxy.mode, proxy.delay_s = FAULTS[phase % len(FAULTS)], 0.3
                faults_seen.append(proxy.mode)
                cuts = proxy.cuts
                await asyncio.sleep(0.15)
                # On a loaded machine no reply may pass in 0.15 s: a cut phase lasts until
                # it has cut one (bounded), so the faults always bite.
                for _ in range(40):
                    if proxy.mode != "cut" or proxy.cuts > cuts:
                        break
                    await asyncio.sleep(0.05)
        finally:
            proxy.mode = "forward"
            load.faults_over.set()

    try:
        await asyncio.gather(load.run(), chaos())
        await load.check(rc)
        assert proxy.cuts > 0 and "blackhole" in faults_seen, (proxy.cuts, faults_seen)
    finally:
        proxy.mode = "forward"
        for s in (direct, flaky):
            await s.close()


@pytest.mark.parametrize("fail_mode", ["closed", "open"])
async def test_redis_stopped_past_the_timeout_again_and_again_under_load(
    server: RedisServer, rc: redis.Redis, fail_mode: str
) -> None:
    """Two sidecars straight to a redis-server that is SIGSTOPped for 300 ms (past the
    100 ms timeout) and resumed, over and over, while the callers run: the commands queued
    in its sockets run when it resumes, after or before the cancels sent on new
    connections. The same promises, counted the same way."""
    document = settings_doc(fail_mode, timeout_ms=100)
    sidecars = (await app_over(server.url, document), await app_over(server.url, document))
    load = Load(sidecars, fail_mode)
    assert server.process is not None
    pid = server.process.pid
    pauses = 0

    async def chaos() -> None:
        nonlocal pauses
        try:
            for _ in range(6):
                await asyncio.sleep(0.4)  # the breaker closes again, decisions resume
                os.kill(pid, signal.SIGSTOP)
                pauses += 1
                try:
                    await asyncio.sleep(0.3)
                finally:
                    os.kill(pid, signal.SIGCONT)
        finally:
            load.faults_over.set()

    try:
        await asyncio.gather(load.run(), chaos())
        await load.check(rc)
        assert pauses == 6
    finally:
        os.kill(pid, signal.SIGCONT)
        for s in sidecars:
            await s.close()


# ---- a cancel repeated ----------------------------------------------------------------


@pytest.mark.parametrize("route", ["/v1/release", "/v1/settle"])
async def test_a_cancel_applied_before_its_authorize_then_repeated_answers_cleanly(
    server: RedisServer, rc: redis.Redis, route: str
) -> None:
    """Redis paused: an authorize times out and its cancel is sent on a new connection;
    Redis resumes and runs the cancel first (it leaves a released record, so the authorize
    holds nothing when it runs), but the cancel's own answer was lost too, so the cancel is
    repeated, and meets that record. Found under SIGSTOP/SIGCONT load: the record rendered
    as a malformed reply ([2, 'R'], cut at a nil), the repeated cancel died with a
    ValueError ('Task exception was never retrieved') and a release or settle of the id a
    500. Now the record answers as any finished reservation: released, nothing charged."""
    client = await app_over(server.url, settings_doc("closed"))
    try:
        engine = client.app[ENGINE]  # type: ignore[union-attr]
        rid = "ab" * 16
        gave_up = Decision(allowed=True, action="allow", reservation_id=rid, lease_expires_at="x")
        for _ in range(2):  # the cancel, then its repeat
            engine.take_back("default", gave_up)
            await asyncio.to_thread(
                wait_until, lambda: engine.pending_cancels == 0, 10, "the cancel run"
            )
        assert str(rc.hget(TENANT.reservations, rid)).startswith("R|")
        body = {"reservation_id": rid} | ({"cost_usd": 0.1} if route == "/v1/settle" else {})
        status, answer = await call(client, route, body)
        assert status == 200, answer
        assert answer["state"] == "released" and answer["cost_usd"] == 0, answer
        assert answer["replayed"] is True, answer
        assert (held_micro(rc), used_micro(rc)) == (0, 0)
    finally:
        await client.close()


# ---- scripts flushed under load ---------------------------------------------------------


@pytest.mark.parametrize("flush", [("SCRIPT", "FLUSH"), ("FUNCTION", "FLUSH")])
async def test_scripts_flushed_again_and_again_under_load_never_answer_500(
    server: RedisServer, rc: redis.Redis, flush: tuple[str, str]
) -> None:
    """Another client flushes the script cache or the function libraries over and over (an
    operator's SCRIPT FLUSH or FUNCTION FLUSH, a failover to a replica that never saw them,
    repeated) while 50 callers authorize: a NOSCRIPT or a missing function loads what is
    missing and repeats the call once, and a flush that lands between the load and the
    repeat is Redis not ready now (the fail mode) or an EVAL, never a 500. Every call held
    its estimate once at most: the held total is the 200s' estimates, to the micro-USD."""
    client = await app_over(server.url, settings_doc("closed", cap={**ORG_CAP, "limit_usd": 1e6}))
    stop = asyncio.Event()
    flushes = 0

    def flush_storm() -> None:
        nonlocal flushes
        flusher = redis.Redis(port=server.port)
        try:
            while not stop.is_set() and flushes < 20_000:
                flusher.execute_command(*flush)
                flushes += 1
        finally:
            flusher.close()

    answers: dict[int, int] = {}

    async def caller() -> None:
        for _ in range(20):
            status, body = await call(
                client, "/v1/authorize", {"org_id": "o1", "estimated_usd": EST}
            )
            answers[status] = answers.get(status, 0) + 1
            if status != 200:
                assert status == 503 and body["degraded"] is True, body

    try:
        storm = asyncio.ensure_future(asyncio.to_thread(flush_storm))
        await asyncio.gather(*(caller() for _ in range(WORKERS)))
        stop.set()
        await storm
        assert answers.get(200, 0) > 0 and flushes > 0, (answers, flushes)
        # A 503's hold, if Redis ran it after all, is taken back by its cancel.
        engine = client.app[ENGINE]  # type: ignore[union-attr]
        await asyncio.to_thread(wait_until, lambda: engine.pending_cancels == 0, 10, "cancels")
        assert held_micro(rc) == answers[200] * 100_000, answers
    finally:
        stop.set()
        await client.close()
