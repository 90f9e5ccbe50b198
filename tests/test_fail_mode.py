"""Invariant 8: Redis trouble is explicit.

A bounded wait, then the fail mode (closed: 503 problem+json flagged `degraded`; open:
allowed, flagged `degraded`, nothing held), and recovery by itself when Redis is back.
Each test runs the app in-process over its own redis-server, which it stops, restarts or
pauses (SIGSTOP) as it likes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from sidecar.api.app import create_app
from sidecar.clock import FakeClock
from sidecar.fail_open import MARK
from sidecar.store import RedisStore
from tests.conftest import T0_MS, make_config
from tests.harness import RedisServer

GUARD_S = 10.0  # not a timing assertion: only keeps a hang from hanging the suite
PAUSED_TIMEOUT_MS = 100  # settings.redis_timeout_ms where Redis gets paused

BUDGETS: list[dict[str, Any]] = [
    {"id": "user", "name": "Each user", "scope": "user", "limit_usd": 1.0, "period": "daily"},
]


def doc(
    fail_mode: str | None = None,
    budgets: list[dict[str, Any]] | None = None,
    *,
    timeout_ms: int = 2000,
) -> Any:
    """A config; a stopped Redis refuses at once, so only a pause needs a short timeout."""
    settings: dict[str, Any] = {"redis_timeout_ms": timeout_ms}
    if fail_mode is not None:
        settings["fail_mode"] = fail_mode
    return {"budgets": BUDGETS if budgets is None else budgets, "settings": settings}


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock(T0_MS)


AppFactory = Callable[[dict[str, Any]], Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def make_app(server: RedisServer, fake_clock: FakeClock) -> AsyncIterator[AppFactory]:
    """The app over `server`, with the store timeout of settings.redis_timeout_ms (as
    `budget-sidecar serve` builds it)."""
    clients: list[TestClient[Any, Any]] = []

    async def make(document: dict[str, Any]) -> TestClient[Any, Any]:
        cfg = make_config(document)
        store = RedisStore.from_url(server.url, timeout_ms=cfg.settings.redis_timeout_ms)
        client = TestClient(TestServer(create_app(cfg, store, clock=fake_clock)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for c in clients:
        await c.close()


async def call(
    client: TestClient[Any, Any], method: str, path: str, body: Any = None
) -> tuple[int, str, dict[str, Any]]:
    """(status, content type, JSON body), under a generous guard against hangs."""

    async def go() -> tuple[int, str, dict[str, Any]]:
        resp = await client.request(method, path, json=body)
        text = await resp.text()
        assert "Traceback" not in text
        return resp.status, resp.content_type, json.loads(text)

    return await asyncio.wait_for(go(), GUARD_S)


def assert_unavailable(status: int, ctype: str, body: dict[str, Any]) -> None:
    assert (status, ctype) == (503, "application/problem+json"), body
    assert body["status"] == 503
    assert body["title"] == "Service Unavailable"
    assert body["degraded"] is True
    assert "field" not in body


def assert_degraded_allow(
    status: int, body: dict[str, Any], estimated_usd: float, *, grant: bool = True
) -> None:
    """`grant`: an authorize's, which gets a fail-open grant id to settle (sidecar.fail_open;
    tests/test_fail_open_accounting.py); a check's has none."""
    assert status == 200, body
    assert body["allowed"] is True and body["action"] == "allow"
    assert body["degraded"] is True
    if grant:
        assert body["reservation_id"].startswith(MARK), body
    else:
        assert body["reservation_id"] is None
    assert body["lease_expires_at"] is None
    assert body["estimated_usd"] == estimated_usd
    assert body["budget_info"] is None and body["budgets"] == []


async def good_authorize(client: TestClient[Any, Any], user: str = "u1") -> dict[str, Any]:
    status, _, body = await call(
        client, "POST", "/v1/authorize", {"user_id": user, "estimated_usd": 0.1}
    )
    assert status == 200 and body["allowed"] is True and body["degraded"] is False, body
    assert body["reservation_id"]
    return body


AUTH = {"user_id": "u1", "estimated_usd": 0.1}


async def decisions_resume(client: TestClient[Any, Any]) -> None:
    """Wait (bounded) until a check answers from Redis again: after an outage the circuit
    breaker keeps answering by the fail mode for its cool-down (0.25 s), then probes."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        status, _, body = await call(client, "POST", "/v1/check", {"user_id": "probe"})
        if status == 200 and not body["degraded"]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("decisions did not resume within 5 s of Redis returning")


# ---- health --------------------------------------------------------------------------------


async def test_readyz_follows_redis_and_healthz_does_not(
    make_app: AppFactory, server: RedisServer
) -> None:
    client = await make_app(doc())
    assert await call(client, "GET", "/readyz") == (
        200,
        "application/json",
        {"ready": True, "redis": "ok"},
    )
    server.stop()
    assert await call(client, "GET", "/readyz") == (
        503,
        "application/json",
        {"ready": False, "redis": "unreachable"},
    )
    assert await call(client, "GET", "/healthz") == (
        200,
        "application/json",
        {"status": "alive"},
    )
    server.start()
    assert (await call(client, "GET", "/readyz"))[0] == 200


# ---- the fail mode of decisions ------------------------------------------------------------


@pytest.mark.parametrize("warm", [True, False], ids=["pooled-connection", "never-connected"])
@pytest.mark.parametrize("path", ["/v1/authorize", "/v1/check"])
async def test_fail_closed_by_default(
    make_app: AppFactory, server: RedisServer, path: str, warm: bool
) -> None:
    client = await make_app(doc())
    if warm:
        await good_authorize(client)
    server.stop()
    assert_unavailable(*await call(client, "POST", path, AUTH))


@pytest.mark.parametrize("warm", [True, False], ids=["pooled-connection", "never-connected"])
@pytest.mark.parametrize("path", ["/v1/authorize", "/v1/check"])
async def test_fail_open_allows_and_flags_degraded(
    make_app: AppFactory, server: RedisServer, path: str, warm: bool
) -> None:
    client = await make_app(doc("open"))
    if warm:
        await good_authorize(client)
    server.stop()
    status, ctype, body = await call(client, "POST", path, AUTH)
    assert ctype == "application/json"
    assert_degraded_allow(status, body, 0.1, grant=path == "/v1/authorize")


async def test_fail_open_with_no_applicable_budget(
    make_app: AppFactory, server: RedisServer
) -> None:
    client = await make_app(doc("open"))
    server.stop()
    status, _, body = await call(
        client, "POST", "/v1/authorize", {"agent_id": "a1", "estimated_usd": 0.25}
    )
    assert_degraded_allow(status, body, 0.25)


async def test_a_closed_budget_overrides_settings_open(
    make_app: AppFactory, server: RedisServer
) -> None:
    budgets = [
        {**BUDGETS[0], "fail_mode": "closed"},
        {"id": "team", "name": "Each team", "scope": "team", "limit_usd": 5, "period": "daily"},
    ]
    client = await make_app(doc("open", budgets))
    server.stop()
    # The user budget applies and says closed.
    assert_unavailable(
        *await call(
            client,
            "POST",
            "/v1/authorize",
            {"user_id": "u1", "team_id": "t1", "estimated_usd": 0.1},
        )
    )
    assert_unavailable(*await call(client, "POST", "/v1/check", AUTH))
    # Only the team budget (no fail mode of its own: settings open) applies.
    status, _, body = await call(
        client, "POST", "/v1/authorize", {"team_id": "t1", "estimated_usd": 0.1}
    )
    assert_degraded_allow(status, body, 0.1)


async def test_an_open_budget_allows_only_when_every_applicable_budget_is_open(
    make_app: AppFactory, server: RedisServer
) -> None:
    budgets = [
        {**BUDGETS[0], "fail_mode": "open"},
        {"id": "team", "name": "Each team", "scope": "team", "limit_usd": 5, "period": "daily"},
    ]
    client = await make_app(doc(None, budgets))  # settings: closed (the default)
    server.stop()
    status, _, body = await call(client, "POST", "/v1/authorize", AUTH)
    assert_degraded_allow(status, body, 0.1)
    # The team budget follows the settings (closed): one closed budget denies.
    assert_unavailable(
        *await call(
            client,
            "POST",
            "/v1/authorize",
            {"user_id": "u1", "team_id": "t1", "estimated_usd": 0.1},
        )
    )


# ---- operations that cannot be faked -------------------------------------------------------


@pytest.mark.parametrize("fail_mode", ["closed", "open"])
async def test_settle_release_record_status_answer_503(
    make_app: AppFactory, server: RedisServer, fail_mode: str
) -> None:
    client = await make_app(doc(fail_mode))
    rid = (await good_authorize(client))["reservation_id"]
    server.stop()
    assert_unavailable(
        *await call(client, "POST", "/v1/settle", {"reservation_id": rid, "cost_usd": 0.05})
    )
    assert_unavailable(*await call(client, "POST", "/v1/release", {"reservation_id": rid}))
    assert_unavailable(
        *await call(client, "POST", "/v1/record", {"user_id": "u1", "cost_usd": 0.05})
    )
    assert_unavailable(*await call(client, "GET", "/v1/budgets/user/status?scope_id=u1"))


async def test_bad_input_is_still_400_while_redis_is_down(
    make_app: AppFactory, server: RedisServer
) -> None:
    """Validation needs no Redis: an outage does not turn a 400 into a 503."""
    client = await make_app(doc())
    server.stop()
    status, ctype, body = await call(client, "POST", "/v1/authorize", {"user_id": "u1"})
    assert (status, ctype, body["field"]) == (400, "application/problem+json", "estimated_usd")


# ---- a paused Redis (accepts connections, never answers) ----------------------------------


def pause(server: RedisServer) -> int:
    assert server.process is not None
    pid = server.process.pid
    os.kill(pid, signal.SIGSTOP)
    return pid


@pytest.mark.parametrize(
    ("fail_mode", "expect"), [("closed", 503), ("open", 200)], ids=["closed", "open"]
)
async def test_a_paused_redis_is_bounded_by_the_timeout(
    make_app: AppFactory, server: RedisServer, fail_mode: str, expect: int
) -> None:
    client = await make_app(doc(fail_mode, timeout_ms=PAUSED_TIMEOUT_MS))
    await good_authorize(client)  # a pooled connection, so the pause hits a live socket
    pid = pause(server)
    try:
        status, ctype, body = await call(client, "POST", "/v1/authorize", AUTH)
        if expect == 503:
            assert_unavailable(status, ctype, body)
        else:
            assert_degraded_allow(status, body, 0.1)
        # A second decision while paused (a fresh connection, or another pooled one).
        status2, _, body2 = await call(client, "POST", "/v1/check", AUTH)
        assert status2 == expect and body2["degraded"] is True
        assert (await call(client, "GET", "/readyz"))[0] == 503
    finally:
        os.kill(pid, signal.SIGCONT)


async def test_after_a_pause_each_reply_belongs_to_its_own_request(
    make_app: AppFactory, server: RedisServer, fake_clock: FakeClock
) -> None:
    """A call abandoned on timeout must not leave its late reply on a pooled connection
    for the next call to read; and whatever the abandoned script held when Redis resumed
    goes back when its lease ends."""
    client = await make_app(doc(timeout_ms=PAUSED_TIMEOUT_MS))
    await good_authorize(client, user="u0")
    pid = pause(server)
    try:
        for _ in range(3):
            assert_unavailable(
                *await call(
                    client,
                    "POST",
                    "/v1/authorize",
                    {"user_id": "u1", "estimated_usd": 0.1, "lease_ms": 1000},
                )
            )
    finally:
        os.kill(pid, signal.SIGCONT)
    await decisions_resume(client)
    decisions = []
    for _ in range(4):
        status, _, body = await call(
            client, "POST", "/v1/authorize", {"user_id": "u2", "estimated_usd": 0.3}
        )
        assert status == 200 and body["degraded"] is False, body
        decisions.append(body)
    # Each decision saw the one before it: held 0.3, 0.6, 0.9 before this one.
    assert [d["budgets"][0]["held_usd"] for d in decisions[:3]] == [0.3, 0.6, 0.9]
    assert decisions[3]["allowed"] is False
    for d in decisions[:3]:
        status, _, settled = await call(
            client, "POST", "/v1/settle", {"reservation_id": d["reservation_id"], "cost_usd": 0}
        )
        assert status == 200 and settled["estimated_usd"] == 0.3, settled
    fake_clock.advance(1000)
    status, _, u1 = await call(client, "GET", "/v1/budgets/user/status?scope_id=u1")
    assert status == 200 and (u1["used_usd"], u1["held_usd"]) == (0.0, 0.0), u1


@pytest.mark.parametrize(
    ("fail_mode", "expect"), [("closed", 503), ("open", 200)], ids=["closed", "open"]
)
async def test_a_timed_out_authorize_holds_nothing_once_redis_resumes(
    make_app: AppFactory, server: RedisServer, fail_mode: str, expect: int
) -> None:
    """The caller was told 503 (closed) or "allowed, nothing held" (open). The script it
    sent still runs when the paused Redis resumes; its hold must not stay on the budget for
    the rest of its lease. The sidecar knows the reservation id it sent, so it can give the
    hold back once Redis answers. Waits (up to a guard) for that; the clock never moves, so
    lease expiry cannot be what returns it."""
    client = await make_app(doc(fail_mode, timeout_ms=PAUSED_TIMEOUT_MS))
    await good_authorize(client, user="u0")
    pid = pause(server)
    try:
        status, _, body = await call(client, "POST", "/v1/authorize", AUTH)
        assert status == expect and body["degraded"] is True, body
    finally:
        os.kill(pid, signal.SIGCONT)
    await good_authorize(client, user="u2")  # Redis answers again

    async def held() -> float:
        status, _, s = await call(client, "GET", "/v1/budgets/user/status?scope_id=u1")
        assert status == 200, s
        value: float = s["held_usd"]
        return value

    async def settled() -> None:
        while await held() != 0.0:
            await asyncio.sleep(0.05)

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(settled(), GUARD_S)
    assert await held() == 0.0


# ---- recovery --------------------------------------------------------------------------------


@pytest.mark.parametrize("fail_mode", ["closed", "open"])
async def test_recovers_when_redis_restarts_on_the_same_port(
    make_app: AppFactory, server: RedisServer, fail_mode: str
) -> None:
    client = await make_app(doc(fail_mode))
    await good_authorize(client)
    server.stop()
    status, _, body = await call(client, "POST", "/v1/authorize", AUTH)
    assert status == (503 if fail_mode == "closed" else 200) and body["degraded"] is True
    server.start()  # same port, empty (no persistence): the scripts load again by themselves
    # The first call may still meet the connection the old server closed, or the breaker's
    # cool-down, and answer by the fail mode (about 1 run in 6 did): decisions resume.
    await decisions_resume(client)
    d = await good_authorize(client)
    assert d["budgets"][0]["held_usd"] == 0.1
    status, _, settled = await call(
        client, "POST", "/v1/settle", {"reservation_id": d["reservation_id"], "cost_usd": 0.05}
    )
    assert (status, settled["state"], settled["cost_usd"]) == (200, "settled", 0.05)
    # A Redis restarted empty lost the state: the check its first NOSCRIPT started (in the
    # background, sidecar.state_loss) says so in /readyz, which stays ready.
    for _ in range(200):  # a hang guard, not a timing assertion
        status, kind, ready = await call(client, "GET", "/readyz")
        if "state_lost" in ready:
            break
        await asyncio.sleep(0.05)
    assert (status, kind, ready["ready"], ready["redis"]) == (200, "application/json", True, "ok")
    assert ready["state_lost"]["tenants"] == ["default"] and ready["state_lost"]["count"] == 1
    status, _, s = await call(client, "GET", "/v1/budgets/user/status?scope_id=u1")
    assert (status, s["used_usd"], s["held_usd"]) == (200, 0.05, 0.0)


async def test_recovers_after_a_pause(make_app: AppFactory, server: RedisServer) -> None:
    client = await make_app(doc(timeout_ms=PAUSED_TIMEOUT_MS))
    await good_authorize(client)
    pid = pause(server)
    try:
        assert_unavailable(*await call(client, "POST", "/v1/authorize", AUTH))
    finally:
        os.kill(pid, signal.SIGCONT)
    await good_authorize(client, user="u2")
    assert (await call(client, "GET", "/readyz"))[0] == 200


async def test_recovers_after_several_outages(make_app: AppFactory, server: RedisServer) -> None:
    client = await make_app(doc())
    for round_ in range(3):
        await good_authorize(client, user=f"u{round_}")
        server.stop()
        assert_unavailable(*await call(client, "POST", "/v1/authorize", AUTH))
        assert_unavailable(*await call(client, "POST", "/v1/check", AUTH))
        server.start()
        await decisions_resume(client)
    await good_authorize(client, user="last")
