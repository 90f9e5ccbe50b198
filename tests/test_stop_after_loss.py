"""A stop holds through Redis losing its state, from the very next call.

Stops live in Redis (in the counters hash) and are read inside the decision's script. When
Redis restarts empty or is flushed, they are gone; the state check (sidecar.state_loss)
puts them back, but it runs every few seconds, and until then a stopped agent could spend.
So a decision names its tenant's state marker: a marker gone answers LOST, the decision
waits for a check begun after that (which puts the stops back), and only then is decided.

Two sidecars in-process over one real redis-server; no sleep between the loss and the calls.
"""

from __future__ import annotations

import asyncio

import pytest

from sidecar.api.app import STATE_WATCH
from sidecar.keys import state_marker, tenant_keys
from sidecar.state_loss import StateWatch
from tests.conftest import T0_MS
from tests.harness import RedisServer, until
from tests.inprocess import app_over, call

TENANT = tenant_keys("default")
DOC = {
    "budgets": [{"id": "org", "name": "Org", "scope": "organization", "period": "monthly",
                 "limit_usd": 100, "on_exceed": "block", "alert_thresholds": []}],
    "settings": {"fail_mode": "closed", "redis_timeout_ms": 2000},
}  # fmt: skip
CALLERS = 20


@pytest.mark.parametrize("how", ["restart", "flushall"])
async def test_a_stop_holds_through_a_loss_from_the_very_next_call(
    server: RedisServer, how: str
) -> None:
    clients = [await app_over(server.url, DOC) for _ in range(2)]
    a, b = clients
    watch: StateWatch = b.app[STATE_WATCH]  # type: ignore[index]
    checks = 0
    check = watch.check

    async def counted() -> bool:
        nonlocal checks
        checks += 1
        return await check()

    try:
        status, stop = await call(
            a, "POST", "/v1/stops", {"scope": "agent", "scope_id": "runaway", "reason": "loop"}
        )
        assert status == 201, stop
        await watch.check()  # b's check has seen the stop (its marker, since start-up)
        watch.check = counted  # type: ignore[method-assign]

        if how == "restart":
            server.stop()
            server.start()
        else:
            with server.client() as rc:
                rc.flushall()
        # At once, on the other sidecar: every call of the stopped agent is denied.
        answers = await asyncio.gather(*(
            call(b, "POST", "/v1/authorize", {"agent_id": "runaway", "estimated_usd": 0.01})
            for _ in range(CALLERS)
        ))  # fmt: skip
        for status, decision in answers:
            assert status == 200 and not decision["allowed"], decision
            assert "loop" in decision["message"], decision
        status, checked = await call(b, "POST", "/v1/check", {"agent_id": "runaway"})
        assert status == 200 and not checked["allowed"], checked
        # Another agent passes, held once: the decision was asked again, not twice.
        body = {"agent_id": "ok", "estimated_usd": 0.25}
        status, other = await call(b, "POST", "/v1/authorize", body)
        assert status == 200 and other["allowed"], other
        with server.client() as rc:
            counters = rc.hgetall(TENANT.counters)
        held = {f: v for f, v in counters.items() if f.startswith("h:")}
        assert list(held.values()) == ["250000"], counters
        assert any(f.startswith("s:agent:") for f in counters), counters  # the stop, back
        assert watch.engine.marked == {"default": "bs:{default}:epoch"}  # named from now on
        # Noticed by the decisions (the background check runs every 5 s), once.
        assert watch.losses == 1 and watch.last_loss is not None
        # Put back once, by whichever sidecar's check came first: a's own check may (its
        # definitions poll saw their version go and asked for one), and then b found the
        # stop there. Waited for: a's check may still be on its way to its last_loss.
        watches: list[StateWatch] = [c.app[STATE_WATCH] for c in clients]  # type: ignore[index]

        def restored() -> int:
            return sum(w.last_loss.restored_stops for w in watches if w.last_loss is not None)

        await until(
            lambda: restored() == 1 and not any(w._lock.locked() for w in watches),
            "the stop put back once, by one of the two sidecars",
        )
        # The callers share checks: one for those waiting when it began, the next for those
        # who came while it ran (4 measured for 20 callers; one each would be 20).
        assert 1 <= checks < CALLERS // 2, checks
    finally:
        for c in clients:
            await c.close()


def test_only_a_marker_is_taken_for_one(server: RedisServer) -> None:
    """A caller may pass the learned estimates' hash (KEYS[9]) to an authorize that does not
    learn (bench.run does): that key is no marker, and the call holds. A marker named after
    the keys the call uses, and gone, answers LOST and holds nothing."""
    from bench.run import BENCH_CIDS, budget_argv
    from sidecar.engine import LOST
    from sidecar.scripts import Scripts

    authorize = Scripts.load_all().authorize
    tk = tenant_keys("t")
    args = (
        T0_MS, "", 600_000, 10_000, "", 2_500_000, 10_000_000, 86_400_000,
        "openai\x1fgpt-4o\x1forg-1\x1fteam-1\x1fagent-1\x1f\x1fuser-1\x1f\x1f",
        30, 3, "", "", "", "", "", "", "", "1:1:1:1", "", "", "", 0, 0, 0,
        *budget_argv(BENCH_CIDS, []),
    )  # fmt: skip
    learning = tk.learning("20260101")  # 9 keys: the 8 an authorize that does not learn uses
    with server.client() as rc:
        sha = rc.script_load(authorize.source)
        held = rc.evalsha(sha, 9, *learning, *(f"{1:032x}" if i == 1 else a
                                               for i, a in enumerate(args)))  # fmt: skip
        assert int(held[0]) == 1, held
        gone = rc.evalsha(sha, 9, *learning[:8], state_marker("t"),
                          *(f"{2:032x}" if i == 1 else a for i, a in enumerate(args)))  # fmt: skip
        assert int(gone[0]) == LOST, gone
        assert rc.hget(tk.counters, f"h:{BENCH_CIDS[0]}") == "10000"  # the first hold only
