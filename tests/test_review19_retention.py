"""Review 19: what the sidecar leaves in Redis over time, on a real redis-server with the
app in-process (fake clock) and its own sweeper: every key and field a script writes goes
after its documented retention, with no traffic after it. Counts are exact."""

from __future__ import annotations

from typing import Any

import redis

from sidecar import keys
from sidecar.api.app import SWEEPER
from sidecar.clock import FakeClock
from tests.conftest import ClientFactory

T = keys.tenant_keys("default")
DAY_MS = 86_400_000
USERS = 20


async def post(client: Any, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = await client.post(path, json=body)
    assert r.status == 200, await r.text()
    data: dict[str, Any] = await r.json()
    return data


def fields_by_kind(rc: redis.Redis) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in rc.hkeys(T.counters):
        out[f[:2]] = out.get(f[:2], 0) + 1
    return out


async def test_a_calendar_budgets_call_counts_go_with_its_window(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    """A daily per-user budget that caps calls (limit_calls) writes "c:<cid>" per user per
    day beside "u:<cid>": both go once the day is past its retention. Before the fix the
    sweep walked past every "c:" field of a calendar window, so one field per entity per
    period stayed for ever (the header of lua/sweep.lua promised them collected)."""
    doc = {"budgets": [{"id": "calls", "name": "c", "scope": "user", "limit_usd": 10,
                        "period": "daily", "limit_calls": 5}]}  # fmt: skip
    client = await make_client(doc)
    for i in range(USERS):
        d = await post(client, "/v1/authorize", {"user_id": f"u{i}", "estimated_usd": 0.1})
        await post(client, "/v1/settle", {"reservation_id": d["reservation_id"],
                                          "cost_usd": 0.05})  # fmt: skip
    # The day's counters: spend, calls and the recent-spend window of each user.
    assert fields_by_kind(redis_client) == {"u:": USERS, "c:": USERS, "w:": USERS}
    sweeper = client.server.app[SWEEPER]
    # Later the same day: every counter stays (only the stale spend windows go).
    clock.advance(3 * 3_600_000)
    await sweeper.sweep_until_done("default")
    assert fields_by_kind(redis_client) == {"u:": USERS, "c:": USERS}
    # Two days on, with no call in between: nothing of the day is left.
    clock.advance(2 * DAY_MS)
    await sweeper.sweep_until_done("default")
    assert fields_by_kind(redis_client) == {}
    assert not redis_client.exists(T.counters)


def _entry() -> dict[str, str]:
    meta = "\x1f".join(["p", "m", "default", "", "", "", "", "", ""])
    return {"k": "r", "m": meta, "q": "", "i": "0", "o": "0", "c": "5", "l": "", "s": "1",
            "at": "0"}  # fmt: skip


async def test_an_idle_tenants_ledger_records_go_after_max_age(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """usage_max_age_days bounds the ledger's records by their stream ids (Redis time).
    The trim ran only when a new record came, so an idle tenant kept records past their
    age for ever (up to usage_max_records of them). The sweep, which runs with no
    traffic, now trims them too: with the tenant sending nothing, the records older than
    max age go and the younger stay, exactly."""
    client = await make_client({"budgets": [], "settings": {"usage_max_age_days": 1}})
    seconds, micros = redis_client.time()
    now_ms = seconds * 1000 + micros // 1000
    old = [f"{now_ms - 3 * DAY_MS}-0", f"{now_ms - DAY_MS - 60_000}-0"]
    young = [f"{now_ms - DAY_MS + 3_600_000}-0", f"{now_ms - 60_000}-0"]
    for entry_id in old + young:
        redis_client.xadd(T.usage, _entry(), id=entry_id)  # type: ignore[arg-type]
    assert redis_client.xlen(T.usage) == 4
    await client.server.app[SWEEPER].sweep_until_done("default")
    ids = [i for i, _ in redis_client.xrange(T.usage)]
    assert ids == young


EVERYTHING: dict[str, Any] = {
    "budgets": [
        {"id": "day", "name": "Each user a day", "scope": "user", "limit_usd": 1,
         "period": "daily", "limit_calls": 50, "alert_thresholds": [10, 100]},
        {"id": "run", "name": "Each run", "scope": "run", "period": "total",
         "limit_usd": 100, "limit_calls": 50, "idle": "1h"},
    ],
    "rate_limits": [
        {"id": "rpm", "scope": "user", "metric": "requests", "limit": 600, "window": "1m",
         "burst": 100},
        {"id": "tpm", "scope": "user", "metric": "tokens", "limit": 100000, "window": "1m",
         "burst": 100000},
        {"id": "conc", "scope": "user", "metric": "concurrent", "limit": 50},
        {"id": "vel", "scope": "user", "scope_id": "u0", "metric": "usd", "limit": 0.05,
         "window": "1m"},
    ],
    "loop_guards": [{"id": "same", "scope": "run", "repeats": 2, "window": "10m"}],
    "pricing": [{"provider": "openai", "model": "gpt-4o", "input_per_1k": 0.5,
                 "output_per_1k": 0.5}],
    "settings": {"estimate": "learned"},
}  # fmt: skip
# What may outlive every retention, each with its own bound: the alerts stream (MAXLEN
# ~10,000) and the usage ledger (usage_max_records, usage_max_age_days by Redis time:
# these records are minutes old in Redis time).
COUNT_BOUNDED = {T.alerts, T.usage}


async def test_every_key_a_busy_tenant_wrote_is_gone_or_expiring_after_its_retention(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    """Every kind of write at once (calendar and period-total budgets with call caps and
    alerts, request, token, concurrency and usd limiters, a usd trip, a loop trip, a stop
    with a ttl, idempotency keys of authorize and record, learned estimates, held leases
    that end unsettled), then three days with no traffic: the sweep leaves no counter,
    reservation, lease, gc member or stop, and every key still there either expires by
    itself (a TTL) or is one of the two count-bounded streams."""
    client = await make_client(EVERYTHING)
    model = {"provider": "openai", "model": "gpt-4o"}
    for i in range(USERS):
        user, run = f"u{i}", f"r{i}"
        call = {"user_id": user, "run_id": run, "agent_id": f"a{i}", **model,
                "estimated_usd": 0.01, "fingerprint": "same prompt"}  # fmt: skip
        d = await post(client, "/v1/authorize", {**call, "idempotency_key": f"k{i}"})
        assert d["allowed"], d
        if i % 3 == 0:
            await post(client, "/v1/settle", {"reservation_id": d["reservation_id"],
                                              "tokens_in": 10, "tokens_out": 10})  # fmt: skip
        elif i % 3 == 1:
            await post(client, "/v1/release", {"reservation_id": d["reservation_id"]})
        d2 = await post(client, "/v1/authorize", {**call, "estimated_usd": 0.02})
        assert d2["allowed"], d2
        await post(client, "/v1/settle", {"reservation_id": d2["reservation_id"],
                                          "cost_usd": 0.2})  # fmt: skip
        looped = await post(client, "/v1/authorize", call)  # the third identical call
        assert (looped["allowed"], looped.get("reason")) == (False, "loop"), looped
        await post(client, "/v1/record", {"user_id": user, "cost_usd": 0.01,
                                           "idempotency_key": f"q{i}"})  # fmt: skip
    trip = await post(client, "/v1/authorize", {"user_id": "u0", "estimated_usd": 0.5})
    assert not trip["allowed"], trip
    r = await client.post("/v1/stops", json={"scope": "agent", "scope_id": "a1",
                                             "reason": "x", "ttl_s": 60})  # fmt: skip
    assert r.status in (200, 201), await r.text()
    fields = fields_by_kind(redis_client)
    for kind in ("u:", "h:", "c:", "a:", "w:", "d:", "l:", "n:", "x:", "s:"):
        assert fields.get(kind, 0) > 0, (kind, fields)
    assert redis_client.hlen(T.estimates) > 0
    assert redis_client.hlen(T.reservations) > 2 * USERS

    sweeper = client.server.app[SWEEPER]
    clock.advance(3 * DAY_MS)
    await sweeper.sweep_until_done("default")
    # The leases left held ended unsettled and were returned by that sweep: their records
    # are kept keep_finished_ms (an hour) from then, as any finished reservation's.
    assert redis_client.zcard(T.gc) == USERS // 3
    clock.advance(3_600_000 + 1)
    await sweeper.sweep_until_done("default")
    kept = {k: redis_client.type(k) for k in (T.counters, T.leases, T.reservations, T.gc,
                                                T.sweep, T.stops)}  # fmt: skip
    assert {k: t for k, t in kept.items() if t != "none"} == {}, fields_by_kind(redis_client)
    left = sorted(redis_client.scan_iter("*"))
    unbounded = [k for k in left if k not in COUNT_BOUNDED and redis_client.pttl(k) <= 0]
    assert unbounded == [], left
    # The loop guard's keys (one per run) expire within two windows of their last call.
    loop_keys = [k for k in left if ":loop:" in k]
    assert len(loop_keys) == USERS
    assert all(0 < redis_client.pttl(k) <= 2 * 600_000 for k in loop_keys)
