"""sidecar/client.py against a real sidecar process over the session's real Redis."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from sidecar.client import BudgetDenied, SidecarClient, SidecarError, SyncSidecarClient
from tests.harness import RedisServer, SidecarProcess, free_port

RES = "bs:{default}:res"

# Yearly windows: a test never straddles a window edge in practice.
DOC: dict[str, Any] = {
    "budgets": [
        {"id": "team", "name": "Each team", "scope": "team", "limit_usd": 1.0, "period": "yearly"},
        {"id": "user", "name": "Each user", "scope": "user", "limit_usd": 0.05, "period": "yearly"},
    ],
    "pricing": [
        {"provider": "openai", "model": "gpt-4o", "input_per_1k": 0.0025, "output_per_1k": 0.01}
    ],
}
# 1000 in at $0.0025/1k + 1000 out at $0.01/1k
TOKENS: dict[str, Any] = {
    "provider": "openai",
    "model": "gpt-4o",
    "estimated_tokens_in": 1000,
    "estimated_tokens_out": 1000,
}
EST = 0.0125

WriteConfig = Callable[..., Path]


def start_sidecar(redis_url: str, config: Path) -> SidecarProcess:
    proc = SidecarProcess(redis_url, str(config))
    try:
        proc.start()
    except BaseException:
        proc.cleanup()
        raise
    return proc


@pytest.fixture
def sidecar(
    redis_server: RedisServer, redis_client: redis.Redis, write_config: WriteConfig
) -> Iterator[SidecarProcess]:
    proc = start_sidecar(redis_server.url, write_config(DOC))
    try:
        yield proc
    finally:
        proc.cleanup()


async def counters(sc: SidecarClient, budget: str, entity: str) -> tuple[float, float]:
    s = await sc.status(budget, scope_id=entity)
    return s["used_usd"], s["held_usd"]


def record_state(r: redis.Redis, rid: str) -> str:
    rec = r.hget(RES, rid)
    assert isinstance(rec, str), rec
    return rec.split("|")[0]


# ---- the async client: plain calls ---------------------------------------------------------


async def test_authorize_then_settle(sidecar: SidecarProcess) -> None:
    async with SidecarClient(sidecar.url) as sc:
        d = await sc.authorize(team_id="t1", user_id="u1", **TOKENS)
        assert d["allowed"] is True and d["action"] == "allow" and d["degraded"] is False
        assert d["estimated_usd"] == EST
        assert await counters(sc, "user", "u1") == (0.0, EST)
        s = await sc.settle(d["reservation_id"], tokens_in=500, tokens_out=100)
        assert (s["state"], s["cost_usd"], s["replayed"]) == ("settled", 0.00225, False)
        assert await counters(sc, "user", "u1") == (0.00225, 0.0)
        assert await counters(sc, "team", "t1") == (0.00225, 0.0)
        again = await sc.settle(d["reservation_id"], cost_usd=0.04)
        assert (again["state"], again["cost_usd"], again["replayed"]) == ("settled", 0.00225, True)
        assert await counters(sc, "user", "u1") == (0.00225, 0.0)


async def test_authorize_then_release(sidecar: SidecarProcess) -> None:
    async with SidecarClient(sidecar.url) as sc:
        d = await sc.authorize(user_id="u1", estimated_usd=0.03)
        assert await counters(sc, "user", "u1") == (0.0, 0.03)
        r = await sc.release(d["reservation_id"])
        assert (r["state"], r["cost_usd"], r["estimated_usd"]) == ("released", 0.0, 0.03)
        assert await counters(sc, "user", "u1") == (0.0, 0.0)
        assert (await sc.release(d["reservation_id"]))["replayed"] is True


async def test_check_holds_nothing(sidecar: SidecarProcess) -> None:
    async with SidecarClient(sidecar.url) as sc:
        ok = await sc.check(user_id="u1", estimated_usd=0.05)
        assert ok["allowed"] is True and ok["reservation_id"] is None
        over = await sc.check(user_id="u1", estimated_usd=0.050001)
        assert over["allowed"] is False and over["budget_info"]["budget_id"] == "user"
        assert await counters(sc, "user", "u1") == (0.0, 0.0)


async def test_record_charges_once_per_key(sidecar: SidecarProcess) -> None:
    async with SidecarClient(sidecar.url) as sc:
        first = await sc.record(user_id="u1", cost_usd=0.02, idempotency_key="call-1")
        assert (first["cost_usd"], first["replayed"]) == (0.02, False)
        second = await sc.record(user_id="u1", cost_usd=0.02, idempotency_key="call-1")
        assert second["replayed"] is True
        tokens = await sc.record(
            user_id="u1", provider="openai", model="gpt-4o", tokens_in=1000, tokens_out=0
        )
        assert tokens["cost_usd"] == 0.0025
        assert await counters(sc, "user", "u1") == (0.0225, 0.0)


async def test_status_quotes_the_entity(sidecar: SidecarProcess) -> None:
    """'+' and '@' are valid in an entity and must survive the query string."""
    async with SidecarClient(sidecar.url) as sc:
        await sc.authorize(user_id="a+b@c", estimated_usd=0.01)
        s = await sc.status("user", scope_id="a+b@c")
        assert (s["entity"], s["held_usd"]) == ("a+b@c", 0.01)
        assert (await sc.status("user", scope_id="a@c"))["held_usd"] == 0.0
        with pytest.raises(SidecarError) as space:
            await sc.status("user", scope_id="a b")
        assert (space.value.status, space.value.body["field"]) == (400, "scope_id")


async def test_errors_raise_sidecar_error_with_the_problem(sidecar: SidecarProcess) -> None:
    async with SidecarClient(sidecar.url) as sc:
        with pytest.raises(SidecarError) as bad:
            await sc.authorize(user_id="u1")
        assert bad.value.status == 400
        assert (bad.value.body["status"], bad.value.body["field"]) == (400, "estimated_usd")
        with pytest.raises(SidecarError) as unknown:
            await sc.settle("0" * 32, cost_usd=0.01)
        assert (unknown.value.status, unknown.value.body["field"]) == (404, "reservation_id")
        with pytest.raises(SidecarError) as no_budget:
            await sc.status("nope", scope_id="u1")
        assert (no_budget.value.status, no_budget.value.body["field"]) == (404, "budget_id")
        with pytest.raises(SidecarError) as no_entity:
            await sc.status("user")
        assert (no_entity.value.status, no_entity.value.body["field"]) == (400, "scope_id")
        # The client is still usable after errors.
        assert (await sc.check(user_id="u1"))["allowed"] is True


async def test_a_non_json_error_answer_is_still_a_sidecar_error(sidecar: SidecarProcess) -> None:
    """A 10 kB query line is refused by the HTTP layer; whatever the body, the client
    raises SidecarError carrying the status, not a JSON decoding error."""
    async with SidecarClient(sidecar.url) as sc:
        with pytest.raises(SidecarError) as err:
            await sc.status("user", scope_id="x" * 10_240)
        assert err.value.status == 400


# ---- the async client: reserve ---------------------------------------------------------


async def test_reserve_settles_with_the_recorded_usage(
    sidecar: SidecarProcess, redis_client: redis.Redis
) -> None:
    async with SidecarClient(sidecar.url) as sc:
        async with sc.reserve(team_id="t1", user_id="u1", **TOKENS) as r:
            assert r.decision["allowed"] is True and r.id == r.decision["reservation_id"]
            assert await counters(sc, "user", "u1") == (0.0, EST)
            assert r.settlement is None
            r.usage(tokens_in=2000, tokens_out=500)
        assert r.settlement is not None
        assert (r.settlement["state"], r.settlement["cost_usd"]) == ("settled", 0.01)
        assert r.settlement["estimated_usd"] == EST
        assert await counters(sc, "user", "u1") == (0.01, 0.0)
        assert await counters(sc, "team", "t1") == (0.01, 0.0)
        assert record_state(redis_client, r.id) == "S"


async def test_reserve_settles_with_a_recorded_cost(sidecar: SidecarProcess) -> None:
    async with SidecarClient(sidecar.url) as sc:
        async with sc.reserve(user_id="u1", estimated_usd=0.02) as r:
            r.usage(cost_usd=0.015)
        assert r.settlement is not None and r.settlement["cost_usd"] == 0.015
        assert await counters(sc, "user", "u1") == (0.015, 0.0)


async def test_reserve_without_usage_settles_at_the_estimate(
    sidecar: SidecarProcess, redis_client: redis.Redis
) -> None:
    async with SidecarClient(sidecar.url) as sc:
        async with sc.reserve(user_id="u1", **TOKENS) as r:
            pass
        assert r.settlement is not None
        assert (r.settlement["state"], r.settlement["cost_usd"]) == ("settled", EST)
        assert r.settlement["overshoot_usd"] == 0.0
        assert await counters(sc, "user", "u1") == (EST, 0.0)
        assert record_state(redis_client, r.id) == "S"


class Boom(Exception):
    pass


class Stop(BaseException):
    """Not an Exception (like CancelledError or KeyboardInterrupt)."""


@pytest.mark.parametrize("exc_type", [Boom, Stop])
async def test_reserve_releases_when_the_block_raises(
    sidecar: SidecarProcess, redis_client: redis.Redis, exc_type: type[BaseException]
) -> None:
    raised = exc_type("model call failed")
    rid = None
    async with SidecarClient(sidecar.url) as sc:
        with pytest.raises(exc_type) as caught:
            async with sc.reserve(team_id="t1", user_id="u1", estimated_usd=0.04) as r:
                rid = r.id
                assert await counters(sc, "user", "u1") == (0.0, 0.04)
                r.usage(cost_usd=0.01)  # recorded, but the block fails: nothing is charged
                raise raised
        assert caught.value is raised
        assert r.settlement is None
        assert await counters(sc, "user", "u1") == (0.0, 0.0)
        assert await counters(sc, "team", "t1") == (0.0, 0.0)
        assert rid is not None and record_state(redis_client, rid) == "R"


async def test_reserve_raises_budget_denied_with_the_decision(
    sidecar: SidecarProcess, redis_client: redis.Redis
) -> None:
    ran = False
    async with SidecarClient(sidecar.url) as sc:
        with pytest.raises(BudgetDenied) as denied:
            async with sc.reserve(team_id="t1", user_id="u1", estimated_usd=0.06):
                ran = True
        assert ran is False
        d = denied.value.decision
        assert (d["allowed"], d["action"], d["reservation_id"]) == (False, "block", None)
        assert d["budget_info"]["budget_id"] == "user"
        assert str(denied.value) == d["message"]
        assert await counters(sc, "user", "u1") == (0.0, 0.0)
        assert await counters(sc, "team", "t1") == (0.0, 0.0)
    assert redis_client.hlen(RES) == 0


async def test_reserve_in_fail_open_settles_a_grant(
    write_config: WriteConfig,
) -> None:
    """Redis unreachable, fail mode open: the block runs on a fail-open grant, whose settle
    is queued (202) until Redis answers (sidecar.fail_open); an error releases it."""
    doc = {**DOC, "settings": {"fail_mode": "open"}}
    proc = start_sidecar(f"redis://127.0.0.1:{free_port()}/0", write_config(doc))
    try:
        async with SidecarClient(proc.url) as sc:
            async with sc.reserve(user_id="u1", estimated_usd=0.01) as r:
                assert (r.decision["degraded"], r.decision["allowed"]) == (True, True)
                assert r.id.startswith("fa11")
                r.usage(cost_usd=0.01)
            assert r.settlement is not None
            assert (r.settlement["state"], r.settlement["cost_usd"]) == ("queued", 0.01)
            with pytest.raises(Boom):
                async with sc.reserve(user_id="u1", estimated_usd=0.01):
                    raise Boom
    finally:
        proc.cleanup()


async def test_reserve_in_fail_closed_raises_503(write_config: WriteConfig) -> None:
    proc = start_sidecar(f"redis://127.0.0.1:{free_port()}/0", write_config(DOC))
    ran = False
    try:
        async with SidecarClient(proc.url) as sc:
            with pytest.raises(SidecarError) as err:
                async with sc.reserve(user_id="u1", estimated_usd=0.01):
                    ran = True
            assert (err.value.status, err.value.body["degraded"]) == (503, True)
            assert ran is False
    finally:
        proc.cleanup()


# ---- the sync client -------------------------------------------------------------------


def test_sync_client_calls_over_one_kept_alive_connection(sidecar: SidecarProcess) -> None:
    with SyncSidecarClient(sidecar.url) as sc:
        d = sc.authorize(user_id="u1", **TOKENS)
        conn = sc._conn
        assert conn is not None and conn.sock is not None
        sock = conn.sock
        local = sock.getsockname()

        def same_connection() -> None:
            assert sc._conn is conn
            assert conn.sock is sock and sock.getsockname() == local

        assert d["allowed"] is True and d["estimated_usd"] == EST
        assert sc.status("user", scope_id="u1")["held_usd"] == EST
        same_connection()
        s = sc.settle(d["reservation_id"], tokens_in=500, tokens_out=100)
        assert (s["state"], s["cost_usd"]) == ("settled", 0.00225)
        same_connection()
        d2 = sc.authorize(user_id="u1", estimated_usd=0.01)
        r = sc.release(d2["reservation_id"])
        assert (r["state"], r["estimated_usd"]) == ("released", 0.01)
        same_connection()
        c = sc.check(user_id="u1", estimated_usd=0.05)
        assert c["allowed"] is False and c["budget_info"]["budget_id"] == "user"
        rec = sc.record(user_id="u1", cost_usd=0.001)
        assert rec["cost_usd"] == 0.001
        status = sc.status("user", scope_id="u1")
        assert (status["used_usd"], status["held_usd"]) == (0.00325, 0.0)
        same_connection()
    assert sc._conn is None


def test_sync_client_raises_sidecar_error_and_keeps_the_connection(
    sidecar: SidecarProcess,
) -> None:
    with SyncSidecarClient(sidecar.url) as sc:
        sc.check(user_id="u1")
        conn = sc._conn
        assert conn is not None
        sock = conn.sock
        with pytest.raises(SidecarError) as bad:
            sc.authorize(user_id="u1", estimated_usd=-1)
        assert bad.value.status == 400
        assert bad.value.body["status"] == 400
        assert bad.value.body["field"] == "estimated_usd"
        assert bad.value.body["title"] == "Bad Request"
        with pytest.raises(SidecarError) as unknown:
            sc.release("0" * 32)
        assert (unknown.value.status, unknown.value.body["field"]) == (404, "reservation_id")
        with pytest.raises(SidecarError) as no_entity:
            sc.status("user")
        assert (no_entity.value.status, no_entity.value.body["field"]) == (400, "scope_id")
        assert sc.check(user_id="u1")["allowed"] is True
        assert sc._conn is conn and conn.sock is sock


def test_sync_client_reconnects_after_the_server_restarts(sidecar: SidecarProcess) -> None:
    """A kept-alive connection the server closed is replaced once, transparently."""
    with SyncSidecarClient(sidecar.url) as sc:
        d = sc.authorize(user_id="u1", estimated_usd=0.01)
        assert sc._conn is not None
        old_sock = sc._conn.sock
        sidecar.stop()
        sidecar.start()
        r = sc.release(d["reservation_id"])
        assert (r["state"], r["replayed"]) == ("released", False)
        assert sc._conn is not None and sc._conn.sock is not old_sock


def test_sync_client_non_json_error_answer_is_a_sidecar_error(sidecar: SidecarProcess) -> None:
    with SyncSidecarClient(sidecar.url) as sc, pytest.raises(SidecarError) as err:
        sc.status("user", scope_id="x" * 10_240)
    assert err.value.status == 400
