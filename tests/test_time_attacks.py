"""The cap's promises across time, config change and persistence, attacked: settles after
their period window rolled over, a reload between authorize and settle (a lowered limit, a
deleted budget, a changed period, shorter leases), leases ending while their settles race
the sweep, alerts crossed by many calls at once on two sidecars, and Redis killed with
SIGKILL in the middle of settles. Every assertion reads the raw integer counters in Redis
(none may be negative, holds return to exactly 0) and counts exactly; no timing."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
import redis
import yaml

from sidecar import config as config_mod
from sidecar import keys
from sidecar.api.app import ENGINE, SWEEPER
from sidecar.clock import FakeClock
from sidecar.engine import Engine
from sidecar.reload import ConfigWatcher
from sidecar.scripts import Scripts
from sidecar.store import RedisStore
from tests.conftest import T0_MS, ClientFactory, make_config
from tests.harness import SidecarProcess, redis_binary, request_json, wait_until

TENANT = keys.tenant_keys("default")
PATIENT_MS = 60_000  # counting tests: a loaded machine must not turn slow into a 503


def ms(instant: str) -> int:
    """Unix ms of a UTC instant written "2026-03-10T23:59:59.999"."""
    return int(datetime.fromisoformat(instant).replace(tzinfo=UTC).timestamp() * 1000)


def counters(rc: redis.Redis) -> dict[str, int]:
    """Settled ("u:") and held ("h:") micro-USD and call counts ("c:") of the tenant, raw;
    none may ever be negative."""
    raw: dict[str, str] = rc.hgetall(TENANT.counters)  # type: ignore[assignment]
    values = {k: int(v) for k, v in raw.items() if k.startswith(("u:", "h:", "c:"))}
    assert all(v >= 0 for v in values.values()), values
    return values


def held_total(rc: redis.Redis) -> int:
    return sum(v for k, v in counters(rc).items() if k.startswith("h:"))


def alerts(rc: redis.Redis) -> list[tuple[str, str]]:
    """(counter id, threshold) of every threshold alert on the tenant's stream."""
    entries = rc.xrange(TENANT.alerts)
    return [(f["cid"], f["t"]) for _, f in entries if "k" not in f]  # type: ignore[index]


def budget(bid: str, limit_usd: float, **extra: Any) -> dict[str, Any]:
    return {"id": bid, "name": bid, "scope": "organization", "limit_usd": limit_usd,
            "period": "daily", "on_exceed": "block", **extra}  # fmt: skip


async def post(client: Any, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = await client.post(path, json=body)
    out: dict[str, Any] = await r.json(content_type=None)
    assert r.status == 200, (path, body, r.status, out)
    return out


async def hold(client: Any, usd: float, **extra: Any) -> dict[str, Any]:
    return await post(client, "/v1/authorize", {"org_id": "acme", "estimated_usd": usd, **extra})


async def settle(client: Any, rid: str, usd: float) -> dict[str, Any]:
    return await post(client, "/v1/settle", {"reservation_id": rid, "cost_usd": usd})


def reload(client: Any, doc: dict[str, Any]) -> None:
    """What the config watcher does once a changed file has loaded."""
    client.server.app[ENGINE].swap(make_config(doc))


# ---- 1. a reload that shortens leases must not let the sweep take holds still in flight ----


async def test_sweep_after_a_reload_to_short_leases_keeps_the_holds_in_flight(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    """A 20 h lease is held on the daily counter of 2026-03-10, just before midnight; then a
    reload cuts max_lease_ms and keep_finished_ms to their minimum. The sweep's grace is
    computed from the settings in force, so three hours into the next day it took the old
    day's hold field while that reservation still held it: its settle then drove the hold
    to minus the estimate, and a second in-flight one's lease end did the same."""
    long_leases = {"max_lease_ms": 86_400_000, "keep_finished_ms": 3_600_000}
    doc = {"budgets": [budget("day", 10.0)], "settings": long_leases}
    client = await make_client(doc)
    clock.set(ms("2026-03-10T23:00:00"))
    settled = await hold(client, 1.0, lease_ms=72_000_000)
    expiring = await hold(client, 2.0, lease_ms=20_000_000)
    old = "day/acme/d20260310"
    assert counters(redis_client) == {f"h:{old}": 3_000_000}

    short = {"default_lease_ms": 100, "max_lease_ms": 100, "keep_finished_ms": 60_000}
    reload(client, {"budgets": [budget("day", 10.0)], "settings": short})
    clock.set(ms("2026-03-11T03:00:00"))
    await client.server.app[SWEEPER].sweep_until_done("default")
    # Both holds are still in flight: their field stays.
    assert counters(redis_client) == {f"h:{old}": 3_000_000}

    done = await settle(client, settled["reservation_id"], 0.5)
    assert (done["state"], done["lease_expired"]) == ("settled", False)
    await client.server.app[SWEEPER].sweep_until_done("default")
    assert counters(redis_client) == {f"u:{old}": 500_000, f"h:{old}": 2_000_000}
    clock.set(ms("2026-03-11T05:00:00"))  # past the second lease's end (04:33:20)
    await client.server.app[SWEEPER].sweep_until_done("default")
    # That lease ended, its hold came back, and with no hold left the old day goes.
    record = redis_client.hget(TENANT.reservations, expiring["reservation_id"])
    assert isinstance(record, str) and record.startswith("E|")
    assert counters(redis_client) == {}


# ---- 2. a limit lowered under the spend still alerts its thresholds ---------------------


@pytest.mark.parametrize("on_exceed", ["warn", "block"])
async def test_a_limit_lowered_under_the_spend_alerts_the_thresholds_it_passed(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock, on_exceed: str
) -> None:
    """$6 of a $10 daily budget is spent (the 50% alert); a reload lowers the limit to $5
    (warn: calls go on) or $7 (block: $1 still fits). The spend now stands past 80% (and,
    at $5, 100%) of the limit in force, so no later charge crosses those thresholds: an
    alert that fires only on a crossing never came, and a budget past its limit stayed
    silent for the rest of the day. Every threshold alerts exactly once: at the next charge
    for what it already passed, and never again, nor on the second sidecar."""
    lowered = 5.0 if on_exceed == "warn" else 7.0
    first = await make_client({"budgets": [budget("day", 10.0, on_exceed=on_exceed)]})
    second = await make_client({"budgets": [budget("day", 10.0, on_exceed=on_exceed)]})
    cid = "day/acme/d20260310"
    spent = await hold(first, 6.0)
    await settle(first, spent["reservation_id"], 6.0)
    assert alerts(redis_client) == [(cid, "50")]

    for client in (first, second):
        reload(client, {"budgets": [budget("day", lowered, on_exceed=on_exceed)]})
    # Five charges of $0.10, alternating sidecars.
    for i in range(5):
        client = (first, second)[i % 2]
        r = await hold(client, 0.1)
        assert r["allowed"] is True, r
        await settle(client, r["reservation_id"], 0.1)
    expected = [(cid, "50"), (cid, "80")] + ([(cid, "100")] if on_exceed == "warn" else [])
    assert alerts(redis_client) == expected
    assert counters(redis_client) == {f"u:{cid}": 6_500_000}

    # The next window starts afresh: its own alerts, once each.
    clock.advance(86_400_000)
    nxt = "day/acme/d20260311"
    for _ in range(2):
        r = await hold(second, lowered)
        if r["allowed"]:
            await settle(second, r["reservation_id"], lowered)
    new = [a for a in alerts(redis_client) if a[0] == nxt]
    assert new == [(nxt, "50"), (nxt, "80"), (nxt, "100")]


# ---- 3. a period boundary crossed by 100 concurrent calls on two sidecars -----------------


def ledger_total(rc: redis.Redis) -> int:
    entries = rc.xrange(TENANT.usage)
    return sum(int(f["c"]) for _, f in entries)  # type: ignore[index]


@pytest.mark.parametrize(
    ("period", "timezone", "last", "old", "new"),
    [
        ("daily", "UTC", "2026-03-10T23:59:59.999", "d20260310", "d20260311"),
        ("monthly", "UTC", "2027-01-31T23:59:59.999", "m20270101", "m20270201"),
        ("daily", "UTC", "2028-02-28T23:59:59.999", "d20280228", "d20280229"),  # a leap day
        ("monthly", "UTC", "2028-02-29T23:59:59.999", "m20280201", "m20280301"),
        ("yearly", "UTC", "2026-12-31T23:59:59.999", "y20260101", "y20270101"),
        # Midnight in Berlin is 23:00 UTC the day before; the month and year roll there.
        ("monthly", "Europe/Berlin", "2026-12-31T22:59:59.999", "m20261201", "m20270101"),
        ("weekly", "America/New_York", "2026-03-09T03:59:59.999", "w20260302", "w20260309"),
    ],
)  # fmt: skip
async def test_calls_straddling_a_period_boundary_charge_the_window_they_held(
    make_client: ClientFactory,
    redis_client: redis.Redis,
    clock: FakeClock,
    period: str,
    timezone: str,
    last: str,
    old: str,
    new: str,
) -> None:
    """60 concurrent authorizes of $0.02 on a $1 budget at the last millisecond of a window
    and 60 at the first of the next, over two sidecars; all 100 allowed ones settle
    concurrently after the boundary at varied costs, with 20 settles repeated. Each window's
    cap holds (50 of 60 fit), every charge lands on the window that held it, holds return
    to exactly 0, the ledger sums to the counters to the micro-USD, and each window alerts
    50/80/100 exactly once (at its first denial, which sees it full of holds)."""
    doc = {"budgets": [budget("b", 1.0, period=period, timezone=timezone)]}
    sidecars = [await make_client(doc), await make_client(doc)]

    async def burst() -> list[dict[str, Any]]:
        return list(await asyncio.gather(
            *(hold(sidecars[i % 2], 0.02) for i in range(60))
        ))  # fmt: skip

    clock.set(ms(last))
    before = await burst()
    clock.advance(1)
    after = await burst()
    held = {old: [r for r in before if r["allowed"]], new: [r for r in after if r["allowed"]]}
    assert (len(held[old]), len(held[new])) == (50, 50)
    cids = {w: f"b/acme/{w}" for w in (old, new)}
    assert counters(redis_client) == {f"h:{c}": 1_000_000 for c in cids.values()}

    clock.advance(1000)  # every settle comes after the boundary
    rng = random.Random(7)
    costs = {r["reservation_id"]: rng.randint(1, 30_000) for w in held for r in held[w]}
    repeats = rng.sample(sorted(costs), 20)
    order = [*costs, *repeats]
    rng.shuffle(order)
    results = await asyncio.gather(*(
        settle(sidecars[i % 2], rid, costs[rid] / 1_000_000) for i, rid in enumerate(order)
    ))  # fmt: skip
    assert Counter(r["replayed"] for r in results) == Counter({False: 100, True: 20})
    expected = {f"u:{cids[w]}": sum(costs[r["reservation_id"]] for r in held[w]) for w in held}
    assert counters(redis_client) == expected
    assert ledger_total(redis_client) == sum(costs.values())
    for w in (old, new):
        # Each window's ten denied authorizes saw it full of holds ($1 of $1 committed):
        # the first of them alerted 50, 80 and 100 (lua/_lib.lua alert_at_denial), so
        # its settles, whatever they charge, alert nothing more.
        assert [t for c, t in alerts(redis_client) if c == cids[w]] == ["50", "80", "100"]


# ---- 4. a reload under load, two sidecars reloading at different moments -----------------

WINDOW_KEYS = {"daily": "d20260310", "monthly": "m20260301"}  # the fake clock's (T0_MS)
BEFORE_RELOAD = {"budgets": [
    budget("cap", 2.0),
    {**budget("t", 100.0), "scope": "team", "scope_id": "core"},
    budget("p", 100.0),
    budget("s", 100.0),
]}  # fmt: skip
# cap lowered, t deleted, p daily -> monthly, s organization -> team.
AFTER_RELOAD = {"budgets": [
    budget("cap", 1.8),
    budget("p", 100.0, period="monthly"),
    {**budget("s", 100.0), "scope": "team"},
]}  # fmt: skip


def held_cids(decision: dict[str, Any]) -> list[str]:
    """The counters an allowed decision held, from the budgets it reports."""
    return [f"{b['budget_id']}/{b['entity']}/{WINDOW_KEYS[b['period']]}"
            for b in decision["budgets"]]  # fmt: skip


def within_its_limit(decision: dict[str, Any]) -> bool:
    cap = next(b for b in decision["budgets"] if b["budget_id"] == "cap")
    total = round((cap["used_usd"] + cap["held_usd"]) * 1_000_000)
    return total <= round(cap["limit_usd"] * 1_000_000)


async def test_reload_between_authorize_and_settle_under_load(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """30 holds of $0.05 in flight on two sidecars; then 50 calls (new holds and the
    settles of the first 30, ten concurrent callers of five calls each) while sidecar A
    reloads at a random moment and B ten calls later: a $2 cap lowered to $1.8, a team
    budget deleted, a budget's period made monthly and another's scope made team. Every
    decision keeps the cap its sidecar had (the sum it reports is within the limit it
    reports), once both reloaded the new cap binds exactly, every settle of an old
    reservation succeeds and charges the counters it held (a deleted budget's too), and
    every raw hold returns to exactly 0."""
    a, b = await make_client(BEFORE_RELOAD), await make_client(BEFORE_RELOAD)
    ident = {"team_id": "core"}
    first = await asyncio.gather(*(hold((a, b)[i % 2], 0.05, **ident) for i in range(30)))
    assert all(r["allowed"] for r in first)
    rng = random.Random(11)
    costs: dict[str, int] = {}
    charged: Counter[str] = Counter()
    decisions: list[dict[str, Any]] = list(first)

    finished = 0
    reload_a = rng.randint(5, 25)  # A reloads once this many of the 50 calls answered,
    reload_b = reload_a + 10  # B ten calls later

    def answered() -> None:
        nonlocal finished
        finished += 1
        if finished == reload_a:
            reload(a, AFTER_RELOAD)
        if finished == reload_b:
            reload(b, AFTER_RELOAD)

    async def settle_one(client: Any, r: dict[str, Any], count: bool = True) -> None:
        cost = rng.randint(10_000, 50_000)
        done = await settle(client, r["reservation_id"], cost / 1_000_000)
        assert (done["state"], done["replayed"]) == ("settled", False)
        costs[r["reservation_id"]] = cost
        if count:
            answered()

    async def authorize_one(client: Any) -> None:
        decisions.append(await hold(client, 0.05, **ident))
        answered()

    work = [settle_one((b, a)[i % 2], r) for i, r in enumerate(first)]
    work += [authorize_one((a, b)[i % 2]) for i in range(20)]
    rng.shuffle(work)

    async def caller(calls: list[Any]) -> None:
        for call in calls:
            await call

    # Ten callers of five calls each, one after another: a call answered before a reload
    # and the caller's next one after it.
    await asyncio.gather(*(caller(work[i::10]) for i in range(10)))
    assert a.server.app[ENGINE].config.budgets[0].limit_micro == 1_800_000
    # The reloads landed inside the load: some of its holds were made under each config.
    under = Counter(any(x["budget_id"] == "t" for x in r["budgets"]) for r in decisions[30:])
    assert under[True] > 0 and under[False] > 0, under

    # Both reloaded: the lowered cap binds whatever was held before.
    cap = "cap/acme/d20260310"
    raw = counters(redis_client)
    standing = raw.get(f"u:{cap}", 0) + raw.get(f"h:{cap}", 0)
    last = await asyncio.gather(*(hold((a, b)[i % 2], 0.05, **ident) for i in range(50)))
    decisions += last
    admitted = sum(r["allowed"] for r in last)
    assert admitted == max(0, (1_800_000 - standing) // 50_000)
    assert all(within_its_limit(r) for r in decisions if r["allowed"])
    assert all(set(held_cids(r)) == {cap, "p/acme/m20260301", "s/core/d20260310"}
               for r in last if r["allowed"])  # fmt: skip

    # Settle every hold still open, then the counters are the costs, exactly.
    for i, r in enumerate(d for d in decisions if d["allowed"]):
        if r["reservation_id"] not in costs:
            await settle_one((a, b)[i % 2], r, count=False)
        for cid in held_cids(r):
            charged[cid] += costs[r["reservation_id"]]
    assert held_total(redis_client) == 0
    assert counters(redis_client) == {f"u:{cid}": v for cid, v in charged.items()}
    assert {"t/core/d20260310", "p/acme/d20260310", "s/acme/d20260310"} <= set(charged)


# ---- 5. thousands of leases ending at once, their settles racing the sweep ---------------

LEASES = 2000


@pytest.mark.parametrize("new_holds", [0, 50])
async def test_leases_ending_together_while_their_settles_race_the_sweep(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock, new_holds: int
) -> None:
    """2,000 holds of $0.0001 (half of them charged their estimate at the lease's end,
    issue 15's proxy calls) end in the same millisecond; then their settles, from two
    sidecars, race both sidecars' sweeps (and 50 new authorizes, or none), which all return
    ended leases 32, 100 or 500 at a time. Each reservation is charged exactly once: the
    settled spend is exactly the sum of the costs the 2,000 settles answered (a settle that
    lost the race to a lease-end charge answers that charge), the ledger agrees, and no
    hold is left."""
    doc = {"budgets": [budget("day", 10.0)], "settings": {"min_estimate_usd": 0.0001}}
    sidecars = [await make_client(doc), await make_client(doc)]
    sem = asyncio.Semaphore(100)

    async def bounded(call: Any) -> Any:
        async with sem:
            return await call

    made = await asyncio.gather(*(bounded(hold(
        sidecars[i % 2], 0.0001, lease_ms=1000, **({"on_expiry": "charge"} if i % 2 else {})
    )) for i in range(LEASES)))  # fmt: skip
    assert all(r["allowed"] for r in made)
    assert held_total(redis_client) == LEASES * 100
    clock.advance(1000)  # every lease ends now

    racing = True

    async def sweep(client: Any) -> int:
        calls = 0
        while racing:
            await client.server.app[SWEEPER].sweep_once("default")
            calls += 1
        return calls

    async def settles() -> list[dict[str, Any]]:
        nonlocal racing
        try:
            return list(await asyncio.gather(*(bounded(settle(
                sidecars[i % 2], r["reservation_id"], (50 + i % 100) / 1_000_000
            )) for i, r in enumerate(made))))  # fmt: skip
        finally:
            racing = False

    more = [bounded(hold(sidecars[i % 2], 0.0001)) for i in range(new_holds)]
    results, sweeps_a, sweeps_b, *_rest = await asyncio.gather(
        settles(), sweep(sidecars[0]), sweep(sidecars[1]), *more
    )
    assert all(r["state"] == "settled" and r["lease_expired"] for r in results)
    answered = sum(round(r["cost_usd"] * 1_000_000) for r in results)
    raw = counters(redis_client)
    assert raw["u:day/acme/d20260310"] == answered
    assert ledger_total(redis_client) == answered
    # Only the new holds are left.
    assert raw.get("h:day/acme/d20260310", 0) == new_holds * 100
    # A lease-end charge answered its estimate; every other settle its own cost.
    by_estimate = sum(round(r["cost_usd"] * 1_000_000) == 100 and r["replayed"] for r in results)
    assert by_estimate <= LEASES // 2
    assert sum(r["replayed"] for r in results) == by_estimate
    print(f"\n{LEASES} leases: {by_estimate} charged at their end before their settle, "
          f"{sweeps_a + sweeps_b} sweep calls raced the settles")  # fmt: skip


# ---- 6. kill -9 of the embedded Redis in the middle of concurrent settles ----------------

# appendfsync everysec's promise for answered writes, as tests/test_durability.py states it:
# Redis writes a command to the file before it answers, except while a background fsync
# runs, when it may answer first and write up to 2 s later.
LOSS_BOUND_S = 2.0
WORKERS = 20
PERSIST_CONFIG = {
    "budgets": [budget("org", 1000.0, period="monthly")],
    "settings": {"min_estimate_usd": 0.000001},
}


async def _ask(session: Any, url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    try:
        async with session.post(url, json=body) as r:
            return r.status, await r.json(content_type=None)
    except (TimeoutError, OSError):
        return 0, {}


def test_kill_9_of_the_embedded_redis_mid_settles_keeps_every_answer(tmp_path: Any) -> None:
    """20 concurrent callers authorize ($0.01, 4 s leases) and settle at distinct costs
    while the embedded redis-server is killed with SIGKILL and restarted by the sidecar.
    Then every allowed reservation is settled again: one whose settle was answered must
    replay that answer (a lost one may only be from the last LOSS_BOUND_S before the kill),
    one whose settle failed is charged now or replays what Redis did apply; once the
    leases are over, nothing is held, the settled spend is exactly the sum of every
    reservation's one cost, and no counter was ever negative."""
    redis_binary()
    data_dir = tmp_path / "data"
    config = tmp_path / "budgets.yaml"
    config.write_text(yaml.safe_dump(PERSIST_CONFIG))
    sidecar = SidecarProcess(None, str(config), extra_env={"SIDECAR_DATA_DIR": str(data_dir)})
    sidecar.start()
    try:
        wait_until(lambda: request_json(sidecar.url + "/readyz")[0] == 200, what="ready")
        killed_pid = embedded_pid(data_dir)
        outcome = asyncio.run(_settles_across_a_kill(sidecar.url, killed_pid))
        wait_until(lambda: embedded_pid(data_dir) not in (0, killed_pid), what="restarted")
        final = asyncio.run(_settle_again(sidecar.url, outcome))
        # The holds of authorizes whose answer was lost end with their lease.
        wait_until(lambda: _org_status(sidecar.url)[1] == 0, timeout_s=30, what="holds back")
        used, _held = _org_status(sidecar.url)
        raw = _raw_counters(data_dir)
    finally:
        sidecar.cleanup()
    assert used == final.expected_micro, (used, final)
    assert all(v >= 0 for v in raw.values()), raw
    assert sum(v for k, v in raw.items() if k.startswith("h:")) == 0, raw
    late = [at for at in final.lost_answered if at < outcome.killed_at - LOSS_BOUND_S]
    assert late == [], (late, outcome.killed_at)
    print(f"\n{outcome.answered} settles answered, {outcome.failed} failed across the kill "
          f"(authorizes refused: {dict(outcome.refused)}); "
          f"retried: {final.replayed} replayed, {final.charged_now} charged now, "
          f"{len(final.lost_answered)} answered and lost")  # fmt: skip


@dataclass
class Across:
    """What the callers saw across the kill."""

    # reservation id -> (its cost, micro-USD; when its settle was answered, None: it failed)
    reservations: dict[str, tuple[int, float | None]] = field(default_factory=dict)
    answered: int = 0
    failed: int = 0
    refused: Counter[int] = field(default_factory=Counter)  # authorizes not allowed, by status
    killed_at: float = 0.0


@dataclass
class Again:
    """What settling every reservation again found."""

    expected_micro: int = 0
    replayed: int = 0
    charged_now: int = 0
    lost_answered: list[float] = field(default_factory=list)


def embedded_pid(data_dir: Any) -> int:
    """The embedded redis-server's pid, 0 while it does not answer."""
    client = redis.Redis(unix_socket_path=str(data_dir / "redis.sock"), socket_timeout=2)
    try:
        return int(client.info("server")["process_id"])
    except (redis.RedisError, OSError):
        return 0
    finally:
        client.close()


def _raw_counters(data_dir: Any) -> dict[str, int]:
    client = redis.Redis(
        unix_socket_path=str(data_dir / "redis.sock"), socket_timeout=5, decode_responses=True
    )
    try:
        raw: dict[str, str] = client.hgetall(TENANT.counters)  # type: ignore[assignment]
    finally:
        client.close()
    return {k: int(v) for k, v in raw.items() if k.startswith(("u:", "h:", "c:"))}


def _org_status(url: str) -> tuple[int, int]:
    """The org's (used, held) micro-USD; (-1, -1) while decisions cannot reach Redis."""
    status, body = request_json(url + "/v1/budgets/org/status?scope_id=acme")
    if status != 200:
        return -1, -1
    return round(body["used_usd"] * 1_000_000), round(body["held_usd"] * 1_000_000)


async def _settles_across_a_kill(url: str, pid: int) -> Across:
    seen = Across()
    stop = False
    costs = iter(range(1000, 10**9))  # distinct costs: a charge names its reservation

    async def caller(session: Any) -> None:
        while not stop:
            status, held = await _ask(session, url + "/v1/authorize",
                                      {"org_id": "acme", "estimated_usd": 0.01,
                                       "lease_ms": 4000})  # fmt: skip
            if status != 200 or not held.get("allowed"):
                seen.refused[status] += 1
                await asyncio.sleep(0.01)  # Redis away: 503 at once; do not spin
                continue
            rid, cost = held["reservation_id"], next(costs)
            status, done = await _ask(
                session, url + "/v1/settle", {"reservation_id": rid, "cost_usd": cost / 1e6}
            )
            ok = status == 200 and done["state"] == "settled"
            seen.reservations[rid] = (cost, time.monotonic() if ok else None)
            seen.answered += ok
            seen.failed += not ok

    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        callers = [asyncio.create_task(caller(session)) for _ in range(WORKERS)]
        await asyncio.sleep(1.0)
        os.kill(pid, signal.SIGKILL)
        seen.killed_at = time.monotonic()
        await asyncio.sleep(2.0)  # callers go on: 503s, then the restarted Redis
        stop = True
        await asyncio.gather(*callers)
    return seen


async def _settle_again(url: str, seen: Across) -> Again:
    found = Again()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for rid, (cost, answered_at) in seen.reservations.items():
            for _ in range(200):  # until Redis answers: not a timing bound
                status, done = await _ask(
                    session, url + "/v1/settle", {"reservation_id": rid, "cost_usd": cost / 1e6}
                )
                if status in (200, 404):
                    break
                await asyncio.sleep(0.05)
            if status == 404:  # the authorize itself was answered, then lost
                if answered_at is not None:
                    found.lost_answered.append(answered_at)
                continue
            assert status == 200, (status, done)
            assert round(done["cost_usd"] * 1_000_000) == cost, (cost, done)
            found.expected_micro += cost
            if done["replayed"]:
                found.replayed += 1
            else:
                found.charged_now += 1
                if answered_at is not None:
                    found.lost_answered.append(answered_at)
    return found


# ---- 7. a budget's zone is a zone, the same on every host ---------------------------------


@pytest.mark.parametrize("zone", ["localtime", "posixrules"])
async def test_a_reload_naming_the_hosts_own_zone_keeps_the_last_good_config(
    tmp_path: Any, redis_server: Any, zone: str, caplog: pytest.LogCaptureFixture
) -> None:
    """ "localtime" (/etc/localtime) and "posixrules" load like any zone from the zoneinfo
    directory, but they are each host's own setting: two pods on hosts set to different
    zones would start the same daily budget's window at different instants, each holding
    the cap on a counter of its own around midnight. A config naming one is refused with
    the file and the field named, and a reload to it keeps the last good config."""
    path = tmp_path / "budgets.yaml"
    path.write_text(yaml.safe_dump({"budgets": [budget("day", 1.0, timezone="Europe/Berlin")]}))
    store = RedisStore.from_url(redis_server.url, timeout_ms=2000)
    engine = Engine(config_mod.load(path), store, FakeClock(T0_MS), Scripts.load_all())
    watcher = ConfigWatcher(path, engine)
    try:
        time.sleep(0.01)  # a distinct mtime even on coarse-timestamp filesystems
        path.write_text(yaml.safe_dump({"budgets": [budget("day", 2.0, timezone=zone)]}))
        with caplog.at_level(logging.ERROR, logger="sidecar.reload"):
            assert await watcher.check() is None  # changed: loaded once it holds still
            assert await watcher.check() is False
        [record] = caplog.records
        assert record.__dict__["file"] == str(path)
        assert record.__dict__["field"] == "$.budgets[0].timezone"
        assert "host's setting" in record.getMessage()
        [kept] = engine.config.budgets
        assert (kept.timezone, kept.limit_micro) == ("Europe/Berlin", 1_000_000)
    finally:
        await store.close()
