"""The runaway guard (issue 18): per-run and call caps, spend velocity, loop guards and the
stop switch, each evaluated in the decision's one script, all or nothing. Counts are
asserted exactly on the raw Redis fields; the windows move with an injected clock."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from sidecar import keys
from sidecar.api.app import ENGINE, SWEEPER, create_app
from sidecar.clock import FakeClock
from sidecar.config import ConfigError
from sidecar.config import parse as parse_config
from sidecar.metrics import Metrics
from sidecar.store import RedisStore
from tests.conftest import ClientFactory, make_config
from tests.harness import RedisServer, request_json, sidecars, wait_until

TENANT = keys.tenant_keys("default")
PATIENT_MS = 60_000


def guard_doc(**sections: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"budgets": [], "settings": {"redis_timeout_ms": PATIENT_MS}}
    doc.update(sections)
    return doc


PER_RUN = {
    "id": "per-run",
    "name": "Each run",
    "scope": "run",
    "period": "total",
    "limit_usd": 2,
    "limit_calls": 5,
    "on_exceed": "block",
}


async def post(client: Any, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    r = await client.post(path, json=body)
    return r.status, await r.json()


def ctr(rc: redis.Redis) -> dict[str, str]:
    """The tenant's counters and limiters, without alert marks (not amounts)."""
    raw: dict[str, str] = rc.hgetall(TENANT.counters)  # type: ignore[assignment]
    return {k: v for k, v in raw.items() if not k.startswith(("a:", "x:"))}


def loop_keys(rc: redis.Redis) -> dict[str, dict[str, str]]:
    """Each loop key (one per guard and entity) -> its fingerprints' fields."""
    found = rc.keys("bs:{default}:loop:*")
    return {k: rc.hgetall(k) for k in found}  # type: ignore[misc, union-attr]


# ---- per-run caps ------------------------------------------------------------------------


async def test_a_run_makes_exactly_its_calls_and_a_fresh_run_starts_over(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(guard_doc(budgets=[PER_RUN]))
    answers = []
    for _ in range(8):
        body = {"run_id": "r1", "agent_id": "a1", "estimated_usd": 0.01}
        answers.append(await post(client, "/v1/authorize", body))
    assert [s for s, _ in answers] == [200] * 8
    assert [d["allowed"] for _, d in answers] == [True] * 5 + [False] * 3
    denied = answers[5][1]
    assert denied["reason"] == "calls"
    assert denied["message"] == "Budget 'Each run' reached its 5 calls - requests blocked"
    assert denied["retry_after_ms"] is None  # a run's cap never rolls over
    state = denied["budgets"][0]
    assert (state["calls"], state["limit_calls"], state["period"]) == (5, 5, "total")
    assert answers[4][1]["budgets"][0]["calls"] == 5  # this call included
    cid = "per-run/r1/t"
    assert redis_client.hget(TENANT.counters, f"c:{cid}") == "5"
    assert redis_client.hget(TENANT.counters, f"h:{cid}") == "50000"  # 5 x $0.01, not 8
    # Another run of the same agent has its own counter.
    status, fresh = await post(client, "/v1/authorize", {"run_id": "r2", "estimated_usd": 0.01})
    assert status == 200 and fresh["allowed"] is True, fresh
    # The status route reads the run's counter, calls included; no calendar window.
    r = await client.get("/v1/budgets/per-run/status?scope_id=r1")
    s = await r.json()
    assert (s["calls"], s["limit_calls"], s["period_start"], s["period_end"]) == (5, 5, None, None)


async def test_a_released_call_gives_its_call_back(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(guard_doc(budgets=[{**PER_RUN, "limit_calls": 1}]))
    _, first = await post(client, "/v1/authorize", {"run_id": "r1", "estimated_usd": 0.01})
    _, second = await post(client, "/v1/authorize", {"run_id": "r1", "estimated_usd": 0.01})
    assert (first["allowed"], second["allowed"]) == (True, False)
    status, _ = await post(client, "/v1/release", {"reservation_id": first["reservation_id"]})
    assert status == 200
    assert redis_client.hget(TENANT.counters, "c:per-run/r1/t") is None  # back to 0
    _, third = await post(client, "/v1/authorize", {"run_id": "r1", "estimated_usd": 0.01})
    assert third["allowed"] is True, third


async def test_a_calls_only_budget_reports_no_dollar_limit(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    budget = {"id": "agent-calls", "name": "Agent calls", "scope": "agent",
              "period": "daily", "limit_calls": 2}  # fmt: skip
    client = await make_client(guard_doc(budgets=[budget]))
    body = {"agent_id": "a1", "estimated_usd": 500.0}
    results = [(await post(client, "/v1/authorize", body))[1] for _ in range(3)]
    assert [d["allowed"] for d in results] == [True, True, False]
    state = results[1]["budgets"][0]
    assert (state["limit_usd"], state["remaining_usd"], state["calls"]) == (None, None, 2)
    assert state["percentage"] == 100.0 and state["exceeded"] is True
    assert results[2]["reason"] == "calls"
    assert results[2]["retry_after_ms"] > 0  # a daily cap rolls over at midnight


def test_per_run_config_errors_name_the_field() -> None:
    cases = [
        ({**PER_RUN, "limit_usd": None, "limit_calls": None}, "$.budgets[0].limit_usd"),
        ({**PER_RUN, "period": "daily", "idle": "1h"}, "$.budgets[0].idle"),
        ({**PER_RUN, "idle": "5s"}, "$.budgets[0].idle"),
        ({**PER_RUN, "limit_calls": -1}, "$.budgets[0].limit_calls"),
    ]
    for budget, path in cases:
        budget = {k: v for k, v in budget.items() if v is not None}
        with pytest.raises(ConfigError) as caught:
            parse_config({"budgets": [budget]}, "budgets.yaml")
        assert caught.value.path == path, caught.value
        assert str(caught.value).startswith("budgets.yaml: ")


async def test_a_run_counter_goes_its_idle_time_after_its_last_call(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    client = await make_client(guard_doc(budgets=[{**PER_RUN, "idle": "1h"}]))
    body = {"run_id": "r1", "estimated_usd": 0.01}
    _, d = await post(client, "/v1/authorize", body)
    await post(client, "/v1/settle", {"reservation_id": d["reservation_id"], "cost_usd": 0.01})
    cid = "per-run/r1/t"
    assert redis_client.zscore(TENANT.gc, f"c:{cid}") == clock.now_ms() + 3_600_000
    # A period-total counter has no forecast, so it keeps no recent-spend window.
    assert redis_client.hget(TENANT.counters, f"w:{cid}") is None
    clock.advance(3_600_001)
    # Any decision of the tenant collects what is due (bounded per call), all of it.
    await post(client, "/v1/authorize", {"run_id": "r2", "estimated_usd": 0.01})
    assert redis_client.hget(TENANT.counters, f"u:{cid}") is None
    assert redis_client.hget(TENANT.counters, f"c:{cid}") is None
    assert [f for f in redis_client.hkeys(TENANT.counters) if cid in f] == []


def test_a_run_cap_holds_under_100_concurrent_calls_over_two_sidecars(
    redis_server: RedisServer, redis_client: redis.Redis, write_config: Callable[..., Path]
) -> None:
    """$0.50 per run, $0.01 a call, 100 concurrent calls of one run across two sidecar
    processes: exactly 50 pass and hold exactly $0.50 (the estimate rule: no overshoot)."""
    budget = {**PER_RUN, "limit_usd": 0.5, "limit_calls": 1000}
    path = write_config(guard_doc(budgets=[budget]))
    with sidecars(redis_server.url, str(path), 2) as procs:

        async def run() -> list[dict[str, Any]]:
            async with aiohttp.ClientSession() as session:

                async def one(i: int) -> dict[str, Any]:
                    body = {"run_id": "r1", "estimated_usd": 0.01, "lease_ms": PATIENT_MS}
                    url = procs[i % 2].url + "/v1/authorize"
                    async with session.post(url, json=body) as r:
                        assert r.status == 200
                        answer: dict[str, Any] = await r.json()
                        return answer

                return list(await asyncio.gather(*(one(i) for i in range(100))))

        answers = asyncio.run(run())
    assert sum(d["allowed"] for d in answers) == 50
    assert {d["reason"] for d in answers if not d["allowed"]} == {"budget"}
    assert redis_client.hget(TENANT.counters, "h:per-run/r1/t") == "500000"
    assert redis_client.hget(TENANT.counters, "c:per-run/r1/t") == "50"


# ---- spend velocity ----------------------------------------------------------------------


VELOCITY = {"id": "agent-burn", "scope": "agent", "metric": "usd", "limit": 0.2,
            "burst": 0.05, "window": "10s"}  # fmt: skip


async def test_dollars_admitted_in_any_window_stay_within_limit_plus_burst(
    redis_server: RedisServer, redis_client: redis.Redis, clock: FakeClock
) -> None:
    """Two engines (replicas, their own connections, one injected clock), 50 concurrent
    callers a tick, estimates of $0.01 to $0.04, for 40 s: in every interval of the 10 s
    window the admitted dollars are at most limit + burst ($0.25), and the limiter is not
    idle either (some window reaches within one call of the bound)."""
    doc = guard_doc(rate_limits=[VELOCITY])
    clients = []
    for _ in range(2):
        app = create_app(
            make_config(doc), RedisStore.from_url(redis_server.url, timeout_ms=PATIENT_MS),
            clock=clock,
        )  # fmt: skip
        c = TestClient(TestServer(app))
        await c.start_server()
        clients.append(c)
    rng = random.Random(18)
    admitted: list[tuple[int, int]] = []  # (ms, micro-USD)
    try:
        for _tick in range(80):
            costs = [rng.choice((10_000, 20_000, 30_000, 40_000)) for _ in range(50)]

            async def one(i: int, micro: int) -> tuple[int, dict[str, Any]]:
                body = {"agent_id": "a1", "estimated_usd": micro / 1e6}
                return await post(clients[i % 2], "/v1/authorize", body)

            results = await asyncio.gather(*(one(i, m) for i, m in enumerate(costs)))
            for (status, d), micro in zip(results, costs, strict=True):
                assert status == 200, d
                if d["allowed"]:
                    admitted.append((clock.now_ms(), micro))
                else:
                    assert d["reason"] == "velocity", d
            clock.advance(rng.choice((100, 250, 500, 1000)))
    finally:
        for c in clients:
            await c.close()
    bound = 250_000  # limit + burst, micro-USD
    worst = 0
    for start, _ in admitted:
        in_window = sum(m for t, m in admitted if start <= t < start + 10_000)
        worst = max(worst, in_window)
    assert worst <= bound, worst
    assert worst > bound - 40_000, worst  # within one call of the bound: it is the limit
    total = sum(m for _, m in admitted)
    assert total > 3 * 200_000  # about 40 s at $0.20 per 10 s


async def test_velocity_is_corrected_to_the_settled_cost(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    client = await make_client(guard_doc(rate_limits=[{**VELOCITY, "limit": 1, "burst": 0.1}]))
    rf = "agent-burn/a1/1000/10000"  # $1 in $0.001 units, per 10 s
    _, d = await post(client, "/v1/authorize", {"agent_id": "a1", "estimated_usd": 0.05})
    debt_held = int(redis_client.hget(TENANT.counters, f"d:{rf}") or 0)
    assert debt_held == 50 * 10_000  # 50 units of $0.001 x the 10 s window
    await post(client, "/v1/settle", {"reservation_id": d["reservation_id"], "cost_usd": 0.02})
    assert int(redis_client.hget(TENANT.counters, f"d:{rf}") or 0) == 20 * 10_000
    _, d = await post(client, "/v1/authorize", {"agent_id": "a1", "estimated_usd": 0.05})
    await post(client, "/v1/release", {"reservation_id": d["reservation_id"]})
    assert int(redis_client.hget(TENANT.counters, f"d:{rf}") or 0) == 20 * 10_000
    # A call larger than what the limiter admits at once is refused, never admitted later.
    _, big = await post(client, "/v1/authorize", {"agent_id": "a1", "estimated_usd": 0.2})
    assert (big["allowed"], big["reason"]) == (False, "velocity")
    assert big["rate_limit"]["retry_after_ms"] == -1
    assert (big["rate_limit"]["limit"], big["rate_limit"]["burst"]) == (1.0, 0.1)


async def test_a_velocity_limits_ratelimit_fields_are_integers_in_micro_usd(
    make_client: ClientFactory,
) -> None:
    """draft-ietf-httpapi-ratelimit-headers: q and r are Integers (a strict structured-field
    parser refuses "1.1"); a spend velocity's quota and remainder go out in micro-USD, as a
    budget's do. Allowed (the limit with the least left) and denied (what denied) alike."""
    client = await make_client(guard_doc(rate_limits=[{**VELOCITY, "limit": 1, "burst": 0.1}]))
    body = {"agent_id": "a1", "estimated_usd": 0.05}
    resp = await client.post("/v1/authorize", json=body)
    assert resp.status == 200 and (await resp.json())["allowed"] is True
    assert resp.headers["RateLimit-Policy"] == '"agent-burn";q=1100000;w=10'
    assert resp.headers["RateLimit"] == '"agent-burn";r=50000;t=10'  # the burst less this call
    resp = await client.post("/v1/authorize", json={**body, "estimated_usd": 2})
    denied = await resp.json()
    assert (resp.status, denied["allowed"], denied["reason"]) == (200, False, "velocity")
    assert resp.headers["RateLimit-Policy"] == '"agent-burn";q=1100000;w=10'
    assert re.fullmatch(r'"agent-burn";r=\d+;t=\d+', resp.headers["RateLimit"])


# ---- loop guards -------------------------------------------------------------------------


SAME_PROMPT = {"id": "same-prompt", "scope": "run", "repeats": 3, "window": "10m"}


async def test_the_fourth_identical_call_of_a_run_is_denied_until_the_window_ends(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    client = await make_client(guard_doc(loop_guards=[SAME_PROMPT]))
    same = {"run_id": "r1", "estimated_usd": 0.01, "fingerprint": "summarize the doc"}
    answers = [(await post(client, "/v1/authorize", same))[1] for _ in range(4)]
    assert [d["allowed"] for d in answers] == [True, True, True, False]
    denied = answers[3]
    assert denied["reason"] == "loop"
    assert denied["message"] == (
        "Loop guard 'same-prompt': the same call 3 times within 600000 ms for run r1 - "
        "requests blocked"
    )
    assert denied["loop_guards"][0]["calls"] == 3 and denied["loop_guards"][0]["would_deny"]
    # A different call of the same run goes on; the same call of another run too.
    other = {**same, "fingerprint": "write the summary"}
    assert (await post(client, "/v1/authorize", other))[1]["allowed"] is True
    assert (await post(client, "/v1/authorize", {**same, "run_id": "r2"}))[1]["allowed"] is True
    # A call without a fingerprint is no repeat of anything.
    plain = {"run_id": "r1", "estimated_usd": 0.01}
    assert (await post(client, "/v1/authorize", plain))[1]["allowed"] is True
    # The window slides: 1 ms before the three calls leave it the guard still denies; when
    # they have left, three more pass and the fourth is denied again.
    clock.advance(600_000 - 1)
    assert (await post(client, "/v1/authorize", same))[1]["allowed"] is False
    clock.advance(1)
    again = [(await post(client, "/v1/authorize", same))[1]["allowed"] for _ in range(4)]
    assert again == [True, True, True, False]
    # check answers what authorize would, and writes nothing.
    before = loop_keys(redis_client)
    status, checked = await post(client, "/v1/check", {k: v for k, v in same.items()})
    assert status == 200 and (checked["allowed"], checked["reason"]) == (False, "loop")
    assert loop_keys(redis_client) == before
    # Spread calls: the oldest leaving the window lets exactly one more through.
    spread = {**same, "fingerprint": "spread"}
    for _ in range(3):
        assert (await post(client, "/v1/authorize", spread))[1]["allowed"] is True
        clock.advance(1000)
    clock.advance(600_000 - 3000)  # the first of the three is now out of the window
    assert (await post(client, "/v1/authorize", spread))[1]["allowed"] is True
    assert (await post(client, "/v1/authorize", spread))[1]["allowed"] is False


async def test_a_shadow_loop_guard_reports_and_never_denies(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(guard_doc(loop_guards=[{**SAME_PROMPT, "mode": "shadow"}]))
    same = {"run_id": "r1", "estimated_usd": 0.01, "fingerprint": "again"}
    answers = [(await post(client, "/v1/authorize", same))[1] for _ in range(5)]
    assert [d["allowed"] for d in answers] == [True] * 5
    assert [d["would_deny"] for d in answers] == [False, False, False, True, True]


async def test_ext_authz_reads_run_and_fingerprint_headers(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    doc = guard_doc(loop_guards=[SAME_PROMPT], budgets=[PER_RUN])
    client = await make_client(doc)
    headers = {"x-run-id": "r9", "x-budget-fingerprint": "tool:search q=cats",
               "x-budget-estimate-usd": "0.01"}  # fmt: skip
    statuses = []
    for _ in range(4):
        r = await client.post("/ext_authz/v1/chat/completions", headers=headers)
        statuses.append(r.status)
    assert statuses == [200, 200, 200, 429]
    assert redis_client.hget(TENANT.counters, "c:per-run/r9/t") == "3"


# ---- all or nothing ----------------------------------------------------------------------


async def test_a_call_denied_by_any_guard_consumes_nothing_anywhere(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """A loop guard denies: no budget hold, no call count, no rate limiter debt, no loop
    entry moved. A budget denies: the call counts as no call and as no repeat."""
    doc = guard_doc(
        budgets=[PER_RUN, {"id": "team", "name": "Team", "scope": "team", "limit_usd": 1,
                           "period": "daily"}],
        rate_limits=[{**VELOCITY, "limit": 10, "burst": 10},
                     {"id": "rpm", "scope": "agent", "metric": "requests", "limit": 100,
                      "burst": 10, "window": "1m"}],
        loop_guards=[{**SAME_PROMPT, "repeats": 2}],
    )  # fmt: skip
    client = await make_client(doc)
    same = {"run_id": "r1", "team_id": "t1", "agent_id": "a1", "estimated_usd": 0.01,
            "fingerprint": "f"}  # fmt: skip
    for _ in range(2):
        assert (await post(client, "/v1/authorize", same))[1]["allowed"] is True
    counters, loops = ctr(redis_client), loop_keys(redis_client)
    _, denied = await post(client, "/v1/authorize", same)
    assert (denied["allowed"], denied["reason"]) == (False, "loop")
    assert ctr(redis_client) == counters

    # The entity's memory keeps its calls; only its "alerted" marks may change.
    def calls_of(found: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        return {k: {f: v[2:] for f, v in h.items()} for k, h in found.items()}

    assert calls_of(loop_keys(redis_client)) == calls_of(loops)

    # A budget denial (the team's $1 is spent) counts as no call and no repeat.
    big = {**same, "run_id": "r2", "fingerprint": "g", "estimated_usd": 5.0}
    _, by_budget = await post(client, "/v1/authorize", big)
    assert (by_budget["allowed"], by_budget["reason"]) == (False, "budget")
    assert ctr(redis_client) == counters
    assert redis_client.hget(TENANT.counters, "c:per-run/r2/t") is None
    assert TENANT.loop("same-prompt", "r2") not in loop_keys(redis_client)
    assert TENANT.loop("same-prompt", "r1") in loop_keys(redis_client)


# ---- alerts, metrics --------------------------------------------------------------------


GUARDS = "budget_sidecar_guard_decisions"


def _guard_alerts(rc: redis.Redis) -> list[dict[str, str]]:
    entries = rc.xrange(TENANT.alerts)
    return [f for _, f in entries if "k" in f]  # type: ignore[union-attr]


async def test_each_trip_is_alerted_once_per_entity(
    redis_server: RedisServer, redis_client: redis.Redis, clock: FakeClock
) -> None:
    doc = guard_doc(
        budgets=[{**PER_RUN, "limit_calls": 1}],
        rate_limits=[{**VELOCITY, "limit": 0.02, "burst": 0.02}],
        loop_guards=[{**SAME_PROMPT, "repeats": 1}],
    )
    metrics = Metrics(clock=clock)
    store = metrics.wrap(RedisStore.from_url(redis_server.url, timeout_ms=PATIENT_MS))
    client = TestClient(TestServer(create_app(make_config(doc), store, clock=clock,
                                              events=metrics)))  # fmt: skip
    await client.start_server()
    for fp in ("x", "x", "x"):  # 1 passes, then the loop guard trips twice: one alert
        await post(client, "/v1/authorize", {"run_id": "r1", "estimated_usd": 0.01,
                                             "fingerprint": fp})  # fmt: skip
    for _ in range(3):  # the run's one call is spent: one call-cap alert
        await post(client, "/v1/authorize", {"run_id": "r1", "estimated_usd": 0.01})
    for _ in range(4):  # $0.02 at once for agent a1: two pass, two trip, one alert
        await post(client, "/v1/authorize", {"agent_id": "a1", "estimated_usd": 0.01})
    kinds = sorted((a["k"], a["g"], a["s"], a["e"]) for a in _guard_alerts(redis_client))
    assert kinds == [
        ("calls", "per-run", "", "r1"),
        ("loop", "same-prompt", "run", "r1"),
        ("velocity", "agent-burn", "", "a1"),
    ], kinds
    # The alerts route shows them with the SDK's alert shape.
    r = await client.get("/v1/alerts")
    listed = sorted(
        (a["alert_type"], a["budget_id"], a["message"]) for a in (await r.json())["alerts"]
    )
    assert listed == [
        ("call_limit", "per-run", "Call limit of budget 'Each run' on r1: 1 calls"),
        (
            "loop_detected",
            "same-prompt",
            "Loop guard 'same-prompt' on run r1: 1 identical calls within 600000 ms",
        ),
        (
            "velocity",
            "agent-burn",
            "Velocity limit 'agent-burn' on a1: 20000 micro-USD per 10000 ms",
        ),
    ], listed
    r = await client.get("/metrics")
    text = await r.text()
    lines = sorted(x for x in text.splitlines() if x.startswith(f"{GUARDS}_total"))
    assert lines == [
        f'{GUARDS}_total{{guard_id="agent-burn",kind="velocity",mode="enforce"}} 2.0',
        # The two loop denials were past the run's one call too: the loop guard is named.
        f'{GUARDS}_total{{guard_id="per-run",kind="calls",mode="enforce"}} 3.0',
        f'{GUARDS}_total{{guard_id="same-prompt",kind="loop",mode="enforce"}} 2.0',
    ], lines
    await client.close()


# ---- the real AxonFlow SDK ----------------------------------------------------------------


def test_the_sdk_pre_check_of_the_same_query_is_denied_the_fourth_time(
    redis_server: RedisServer, redis_client: redis.Redis, write_config: Callable[..., Path]
) -> None:
    try:
        from axonflow import AxonFlow
    except ImportError:
        from tests.harness import missing

        missing("the axonflow SDK")
    path = write_config(guard_doc(loop_guards=[{**SAME_PROMPT, "scope": "agent"}]))
    with sidecars(redis_server.url, str(path), 1) as (proc,):

        async def run() -> list[Any]:
            async with AxonFlow(endpoint=proc.url) as client:
                out = []
                for query in ("plan the trip",) * 4 + ("book the hotel",):
                    out.append(await client.pre_check("", query, context={"agent_id": "planner"}))
                return out

        results = asyncio.run(run())
    assert [r.approved for r in results] == [True, True, True, False, True]
    assert results[3].block_reason.startswith("Loop guard 'same-prompt': the same call 3 times")


# ---- the stop switch: the decision's side (the API writes the same fields) ---------------


async def test_a_stop_denies_its_entity_and_what_lies_below_it_until_it_ends(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    client = await make_client(guard_doc(budgets=[PER_RUN]))
    now = clock.now_ms()
    redis_client.hset(
        TENANT.counters,
        mapping={
            "s:team:t1": f"stop_a|{now + 60_000}|{now}|runaway on t1",
        },
    )
    counters = ctr(redis_client)
    _, d = await post(client, "/v1/authorize", {"team_id": "t1", "agent_id": "a1",
                                               "run_id": "r1", "estimated_usd": 0.01})  # fmt: skip
    assert (d["allowed"], d["reason"]) == (False, "stop"), d
    assert d["message"] == "Stopped: runaway on t1 (stop stop_a on team t1)"
    assert d["stop"] == {
        "stop_id": "stop_a", "scope": "team", "entity": "t1", "reason": "runaway on t1",
        "expires_at": "2026-03-10T12:01:00Z",
    }  # fmt: skip
    assert d["retry_after_ms"] == 60_000
    assert ctr(redis_client) == counters  # a stopped call holds and counts nothing
    # Another team's agent passes; so does an agent that names no team.
    for body in ({"team_id": "t2", "agent_id": "a1"}, {"agent_id": "a1"}):
        _, other = await post(client, "/v1/authorize", {**body, "estimated_usd": 0.01})
        assert other["allowed"] is True, other
    # check answers the same.
    _, checked = await post(client, "/v1/check", {"team_id": "t1", "estimated_usd": 0.01})
    assert (checked["allowed"], checked["reason"]) == (False, "stop")
    # The ttl ends it by itself: at its expiry the team's calls pass again.
    clock.advance(60_000)
    _, after = await post(client, "/v1/authorize", {"team_id": "t1", "estimated_usd": 0.01})
    assert after["allowed"] is True, after


async def test_the_sweep_collects_a_stop_past_its_ttl(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    client = await make_client(guard_doc())
    now = clock.now_ms()
    redis_client.hset(
        TENANT.counters,
        mapping={
            "s:agent:a1": f"stop_b|{now + 1000}|{now}|r",
            "s:agent:a2": f"stop_c|0|{now}|forever",
        },
    )
    clock.advance(1000)
    await client.server.app[SWEEPER].sweep_until_done("default")
    left = {k for k in redis_client.hkeys(TENANT.counters) if k.startswith("s")}
    assert left == {"s:agent:a2"}, left


def test_a_stop_made_on_one_sidecar_denies_on_the_other_at_its_next_call(
    redis_server: RedisServer, redis_client: redis.Redis, write_config: Callable[..., Path]
) -> None:
    """Two sidecar processes: a stop made through A denies the agent on B at B's very next
    call (no sleep between); another agent passes; a team's stop denies its agents;
    DELETE lifts it; a ttl_s stop ends by itself."""
    path = write_config(guard_doc())
    with sidecars(redis_server.url, str(path), 2) as (a, b):

        def authorize(proc: Any, **who: str) -> dict[str, Any]:
            status, d = request_json(proc.url + "/v1/authorize", {**who, "estimated_usd": 0.01})
            assert status == 200, d
            return d

        assert authorize(b, agent_id="a1")["allowed"] is True
        status, made = request_json(
            a.url + "/v1/stops", {"scope": "agent", "scope_id": "a1", "reason": "looping"}
        )
        assert status == 201, made
        denied = authorize(b, agent_id="a1", team_id="t1")
        assert (denied["allowed"], denied["reason"]) == (False, "stop"), denied
        assert denied["stop"]["stop_id"] == made["id"]
        assert authorize(b, agent_id="a2", team_id="t1")["allowed"] is True

        status, team = request_json(
            b.url + "/v1/stops", {"scope": "team", "scope_id": "t1", "reason": "team halt"}
        )
        assert status == 201, team
        assert authorize(a, agent_id="a2", team_id="t1")["reason"] == "stop"
        assert authorize(a, agent_id="a2", team_id="t2")["allowed"] is True

        for stop_id in (made["id"], team["id"]):
            req = urllib.request.Request(f"{a.url}/v1/stops/{stop_id}", method="DELETE")
            with urllib.request.urlopen(req, timeout=10) as r:
                assert r.status == 204
        assert authorize(b, agent_id="a1", team_id="t1")["allowed"] is True
        status, listed = request_json(b.url + "/v1/stops")
        assert (status, listed["stops"]) == (200, [])

        status, brief = request_json(
            a.url + "/v1/stops",
            {"scope": "agent", "scope_id": "a3", "reason": "cool down", "ttl_s": 1},
        )
        assert status == 201, brief
        assert authorize(b, agent_id="a3")["reason"] == "stop"
        # Counting, not timing: poll until it has ended (bounded), then it stays ended.
        wait_until(lambda: authorize(b, agent_id="a3")["allowed"], what="the ttl", timeout_s=20)
        assert authorize(a, agent_id="a3")["allowed"] is True


def test_velocity_holds_across_two_sidecar_processes_under_50_concurrent_callers(
    redis_server: RedisServer, redis_client: redis.Redis, write_config: Callable[..., Path]
) -> None:
    """Real clocks (Redis TIME): $0.20 an hour with $0.05 at once; 50 concurrent $0.01
    callers across two processes admit exactly 5 (the burst: refilling one more call takes
    180 s), and the limiter's debt is exactly those 5 calls."""
    limit = {**VELOCITY, "limit": 0.2, "burst": 0.05, "window": "1h"}
    path = write_config(guard_doc(rate_limits=[limit]))
    with sidecars(redis_server.url, str(path), 2) as procs:

        async def run() -> list[dict[str, Any]]:
            async with aiohttp.ClientSession() as session:

                async def one(i: int) -> dict[str, Any]:
                    body = {"agent_id": "a1", "estimated_usd": 0.01, "lease_ms": PATIENT_MS}
                    async with session.post(procs[i % 2].url + "/v1/authorize", json=body) as r:
                        assert r.status == 200
                        answer: dict[str, Any] = await r.json()
                        return answer

                return list(await asyncio.gather(*(one(i) for i in range(50))))

        answers = asyncio.run(run())
    assert sum(d["allowed"] for d in answers) == 5
    assert {d["reason"] for d in answers if not d["allowed"]} == {"velocity"}
    debt = int(redis_client.hget(TENANT.counters, "d:agent-burn/a1/200/3600000") or 0)
    # 5 calls x 10 units x the 3,600,000 ms window, less what the debt paid back since.
    assert 5 * 10 * 3_600_000 - debt < 10 * 3_600_000, debt


async def test_a_retry_of_a_run_call_counts_once(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(guard_doc(budgets=[{**PER_RUN, "limit_calls": 2}]))
    body = {"run_id": "r1", "estimated_usd": 0.01, "idempotency_key": "run-1:step-1"}
    _, first = await post(client, "/v1/authorize", body)
    status, again = await post(client, "/v1/authorize", body)
    assert status == 200 and again["replayed"] is True, again
    assert again["reservation_id"] == first["reservation_id"]
    assert again["budgets"][0]["calls"] is None  # a retry's answer carries no count
    assert first["budgets"][0]["calls"] == 1
    assert redis_client.hget(TENANT.counters, "c:per-run/r1/t") == "1"
    # The second call of the run still passes; a third is over the cap.
    _, second = await post(client, "/v1/authorize", {"run_id": "r1", "estimated_usd": 0.01})
    _, third = await post(client, "/v1/authorize", {"run_id": "r1", "estimated_usd": 0.01})
    assert (second["allowed"], third["allowed"], third["reason"]) == (True, False, "calls")


async def test_a_loop_key_is_kept_two_windows_from_its_last_push_back(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    """A loop key's expiry is pushed back (two windows) only by a call that finds less than
    a window left, so it always outlives its newest call by at least a window."""
    client = await make_client(guard_doc(loop_guards=[SAME_PROMPT]))
    key, window_ms = TENANT.loop("same-prompt", "r1"), 600_000

    async def call(n: int) -> None:
        body = {"run_id": "r1", "estimated_usd": 0.01, "fingerprint": f"q-{n}"}
        assert (await post(client, "/v1/authorize", body))[1]["allowed"] is True

    first = clock.now_ms()
    await call(0)
    assert int(redis_client.hget(key, "~")) == first + 2 * window_ms  # type: ignore[arg-type]
    clock.advance(window_ms // 2)
    await call(1)  # 1.5 windows left: not pushed back
    assert int(redis_client.hget(key, "~")) == first + 2 * window_ms  # type: ignore[arg-type]
    clock.advance(window_ms // 2 + 1)
    await call(2)  # less than a window left: two windows from now
    assert int(redis_client.hget(key, "~")) == clock.now_ms() + 2 * window_ms  # type: ignore[arg-type]
    # Its TTL was set again: more than one window left (the test takes seconds, not minutes).
    assert window_ms < redis_client.pttl(key) <= 2 * window_ms


async def test_a_loop_guard_keeps_one_small_key_per_entity_whatever_the_traffic(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    """2,000 distinct calls of one run: one loop key for the run, holding at most 64
    fingerprints (full, a new one evicts 16 at random: lua/_lib.lua LOOP_EVICT), kept two
    windows from its last push back; a repeat is still found, and its trip is alerted
    once."""
    client = await make_client(guard_doc(loop_guards=[{**SAME_PROMPT, "repeats": 2}]))
    for n in range(2000):
        body = {"run_id": "r1", "estimated_usd": 0.01, "fingerprint": f"q-{n}"}
        assert (await post(client, "/v1/authorize", body))[1]["allowed"] is True
        clock.advance(1)
    found = loop_keys(redis_client)
    key = TENANT.loop("same-prompt", "r1")
    assert list(found) == [key]
    fields = dict(found[key])
    window_ms = 600_000
    kept_until = int(fields.pop("~"))
    # Pushed back at the first call (two windows), and not since: 2,000 ms < one window.
    assert kept_until == clock.now_ms() - 2000 + 2 * window_ms
    assert 0 < redis_client.pttl(key) <= 2 * window_ms
    assert 64 - 16 < len(fields) <= 64, len(fields)
    assert all(v.startswith("0|") and v.count(",") == 0 for v in fields.values()), fields
    again = {"run_id": "r1", "estimated_usd": 0.01, "fingerprint": "q-1999"}
    assert (await post(client, "/v1/authorize", again))[1]["allowed"] is True  # 2nd
    for _ in range(3):
        _, d = await post(client, "/v1/authorize", again)
        assert (d["allowed"], d["reason"]) == (False, "loop"), d
    loops = [a for _, a in redis_client.xrange(TENANT.alerts) if a.get("k") == "loop"]
    assert len(loops) == 1


# ---- faults: Redis frozen mid-decision with every guard in force -------------------------


async def test_redis_frozen_mid_decision_with_guards_in_force_holds_and_counts_nothing(
    clock: FakeClock,
) -> None:
    """Redis is paused (SIGSTOP) while an authorize under a per-run cap, a usd velocity
    limit and a loop guard waits for it: the sidecar answers 503 (fail closed) and cancels
    in the background. Once Redis runs again the call it never answered has given back its
    hold, its call of the run and its dollars of velocity (raw counters), and no reservation
    is left held; the loop guard keeps it as one repeat of the prompt, as a request limiter
    keeps the request (the agent did send it), so two more identical calls pass and the
    third is denied. A stop made afterwards still denies the run's next call."""
    server = RedisServer().start()
    try:
        doc = guard_doc(budgets=[PER_RUN], rate_limits=[VELOCITY], loop_guards=[SAME_PROMPT])
        app = create_app(make_config(doc), RedisStore.from_url(server.url, timeout_ms=50),
                         clock=clock)  # fmt: skip
        client = TestClient(TestServer(app))
        await client.start_server()
        rc = server.client()
        try:
            body = {"agent_id": "a1", "run_id": "r1", "estimated_usd": 0.01,
                    "fingerprint": "summarize the doc"}  # fmt: skip
            # The scripts loaded first (another agent and run), so the frozen call's EVALSHA is the
            # decision itself once Redis runs again.
            warm = {**body, "agent_id": "a0", "run_id": "r0"}
            assert (await post(client, "/v1/authorize", warm))[1]["allowed"] is True
            assert server.process is not None
            os.kill(server.process.pid, signal.SIGSTOP)
            try:
                status, _ = await post_raw(client, "/v1/authorize", body)
                await asyncio.sleep(0.3)
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
            assert status == 503
            engine = app[ENGINE]
            for _ in range(600):  # bounded: 60 s at most
                if engine.pending_cancels == 0:
                    break
                await asyncio.sleep(0.1)
            assert engine.pending_cancels == 0, "the cancel of the timed-out call never ended"
            counters = ctr(rc)
            assert int(counters.get("h:per-run/r1/t", 0)) == 0, counters
            assert int(counters.get("c:per-run/r1/t", 0)) == 0, counters
            assert int(counters.get("d:agent-burn/a1/200/10000", 0)) == 0, counters
            records = rc.hgetall(TENANT.reservations)
            held = [v for v in records.values() if v.startswith("H|")]
            assert len(held) == 1 and "per-run/r0/t" in held[0], records  # the warm call's
            memory = loop_keys(rc)
            assert sorted(memory) == sorted(
                TENANT.loop("same-prompt", run) for run in ("r0", "r1")
            ), memory
            fields = memory[TENANT.loop("same-prompt", "r1")]
            fields.pop("~")
            (field,) = fields.values()
            assert len(field.split("|")[1].split(",")) == 1, field
            # The timed-out call was one repeat: two more pass, the third is the fourth.
            allowed = [(await post(client, "/v1/authorize", body))[1]["allowed"] for _ in range(3)]
            assert allowed == [True, True, False]
            assert rc.hget(TENANT.counters, "c:per-run/r1/t") == "2"
            # The stop switch works on the recovered node: the run's next call is denied.
            status, made = await post(client, "/v1/stops", {"scope": "run", "scope_id": "r1",
                                                            "reason": "frozen"})  # fmt: skip
            assert status == 201, made
            other = {**body, "fingerprint": "another prompt"}
            status, d = await post(client, "/v1/authorize", other)
            assert (status, d["allowed"], d["reason"]) == (200, False, "stop"), d
        finally:
            rc.close()
            await client.close()
    finally:
        server.cleanup()


async def post_raw(client: Any, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    """POST that accepts any answer (a 503's problem+json included)."""
    r = await client.post(path, json=body)
    return r.status, await r.json(content_type=None)
