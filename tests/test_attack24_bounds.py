"""Attack 24: amounts at the edges of what Redis and Lua can count, on a real redis-server.

Redis's HINCRBY counts in signed 64 bits and answers an error past 2^63 - 1; a Lua script
that has written something before such an error is not rolled back (a partial write,
against invariant 7). Lua's numbers are doubles, exact to 2^53 only. A spend counter of a
budget that never blocks (warn), a /v1/record, a usage aggregate, can grow without any
cap, so every counter that sums spend or tokens saturates at lua/_lib.lua COUNTER_MAX
(8 x 10^15 micro-USD, $8,000,000,000; README "Limits of the numbers"): a charge that
would carry one past it leaves it at the maximum, and applies everything else whole.
"""

from __future__ import annotations

from typing import Any

import redis

from sidecar import keys
from sidecar.api.app import SWEEPER
from sidecar.clock import FakeClock
from tests.conftest import ClientFactory

T = keys.tenant_keys("default")
COUNTER_MAX = 8 * 10**15
NEAR_2_63 = 2**63 - 1000  # 1,000 micro-USD from HINCRBY's overflow
WARN2 = {
    "budgets": [
        {"id": "org", "name": "Org", "scope": "organization", "limit_usd": 1000,
         "period": "yearly", "on_exceed": "warn", "alert_thresholds": [50, 100]},
        {"id": "team", "name": "Team", "scope": "team", "limit_usd": 1000,
         "period": "yearly", "on_exceed": "warn", "alert_thresholds": [50, 100]},
    ],
}  # fmt: skip
WHO = {"team_id": "t1"}


async def post(
    client: Any, path: str, body: dict[str, Any], **kw: Any
) -> tuple[int, dict[str, Any]]:
    r = await client.post(path, json=body, **kw)
    data: dict[str, Any] = await r.json(content_type=None)
    return r.status, data


def spend_fields(rc: redis.Redis) -> dict[str, int]:
    return {f: int(v) for f, v in rc.hgetall(T.counters).items() if f[:2] in ("u:", "h:")}


def cids_of(rc: redis.Redis, rid: str) -> list[str]:
    return str(rc.hget(T.reservations, rid)).split("|")[6].split(",")


def usage_day_key(rc: redis.Redis, prefix: str) -> str:
    found = [k for k in rc.scan_iter(f"{prefix}*")]
    assert len(found) == 1, found
    return str(found[0])


async def test_a_settle_onto_a_counter_near_2_63_applies_whole(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    """Two warn budgets; the second's counter is 1,000 micro-USD from 2^63 and a settle
    charges 10,000. Before: HINCRBY overflowed on the second counter after the first was
    charged and both holds dropped: 500, the reservation still held, and its lease's end
    later returned the holds a second time (negative holds). Now: 200, the first counter
    charged exactly, the second at COUNTER_MAX, no hold left, the reservation settled,
    and nothing more happens at its lease's end."""
    c = await make_client(WARN2)
    st, d = await post(c, "/v1/authorize", {**WHO, "estimated_usd": 0.01})
    assert st == 200 and d["allowed"], d
    rid = d["reservation_id"]
    org, team = cids_of(redis_client, rid)
    assert team.startswith("team/")
    redis_client.hset(T.counters, f"u:{team}", NEAR_2_63)
    st, s = await post(c, "/v1/settle", {"reservation_id": rid, "cost_usd": 0.01})
    assert st == 200, s
    assert s["state"] == "settled" and s["cost_usd"] == 0.01
    assert spend_fields(redis_client) == {f"u:{org}": 10_000, f"u:{team}": COUNTER_MAX}
    assert str(redis_client.hget(T.reservations, rid)).startswith("S|")
    # Its threshold alerts: the team's two (its counter is past both), none for the org.
    alerted = sorted(f["cid"] + ":" + f["t"] for _, f in redis_client.xrange(T.alerts))
    assert alerted == [f"{team}:100", f"{team}:50"]
    # The lease's end (and a decision that reclaims) changes no hold: none is left.
    clock.advance(120_000)
    st, d2 = await post(c, "/v1/authorize", {**WHO, "estimated_usd": 0.01})
    assert st == 200 and d2["allowed"], d2
    assert spend_fields(redis_client) == {f"u:{org}": 10_000, f"u:{team}": COUNTER_MAX,
                                          f"h:{org}": 10_000, f"h:{team}": 10_000}  # fmt: skip


async def test_a_record_onto_a_counter_near_2_63_applies_whole(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """/v1/record charges every budget of the call: before, the overflow on the team's
    counter came after the org's was charged: 500, the org charged with no ledger entry,
    no aggregate and the idempotency key taken (its retry then charged nothing). Now: 200,
    both charged (the team's at COUNTER_MAX), one ledger entry, the day's total exact."""
    c = await make_client(WARN2)
    st, r = await post(c, "/v1/record", {**WHO, "cost_usd": 0.01})
    assert st == 200, r
    org, team = sorted(f[2:] for f in spend_fields(redis_client))
    redis_client.hset(T.counters, f"u:{team}", NEAR_2_63)
    st, r = await post(c, "/v1/record", {**WHO, "cost_usd": 0.01, "idempotency_key": "k1"})
    assert st == 200, r
    assert spend_fields(redis_client) == {f"u:{org}": 20_000, f"u:{team}": COUNTER_MAX}
    assert redis_client.xlen(T.usage) == 2
    agg = usage_day_key(redis_client, T.usage_day(""))
    costs = {f: int(v) for f, v in redis_client.hgetall(agg).items() if f.startswith("c|")}
    assert list(costs.values()) == [20_000]
    # The key was taken with the charge: its retry charges nothing.
    st, r = await post(c, "/v1/record", {**WHO, "cost_usd": 0.01, "idempotency_key": "k1"})
    assert st == 200, r
    assert spend_fields(redis_client) == {f"u:{org}": 20_000, f"u:{team}": COUNTER_MAX}


async def test_the_days_aggregates_near_2_63_saturate_instead_of_failing_the_settle(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """The day's usage totals are written after the counters and the ledger entry: an
    aggregate 1,000 micro-USD from 2^63 made the settle fail after those (500, the spend
    charged, the reservation still held: charged again... and its hold returned twice).
    A per-user total that far made Lua's '%d' of a double past 2^63 write garbage. Now
    both saturate at COUNTER_MAX and the settle is whole."""
    c = await make_client(WARN2)
    who = {**WHO, "user_id": "u1", "provider": "p", "model": "m"}
    st, d = await post(c, "/v1/authorize", {**who, "estimated_usd": 0.01})
    st, s = await post(c, "/v1/settle", {"reservation_id": d["reservation_id"],
                                         "cost_usd": 0.01})  # fmt: skip
    assert st == 200, s
    agg = usage_day_key(redis_client, T.usage_day(""))
    uagg = usage_day_key(redis_client, T.user_day(""))
    (cfield,) = [f for f in redis_client.hkeys(agg) if f.startswith("c|")]
    (ufield,) = redis_client.hkeys(uagg)
    redis_client.hset(agg, cfield, NEAR_2_63)
    redis_client.hset(uagg, ufield, f"{NEAR_2_63}:1:0:0")
    st, d = await post(c, "/v1/authorize", {**who, "estimated_usd": 0.01})
    rid = d["reservation_id"]
    st, s = await post(c, "/v1/settle", {"reservation_id": rid, "cost_usd": 0.01})
    assert st == 200, s
    assert str(redis_client.hget(T.reservations, rid)).startswith("S|")
    assert int(redis_client.hget(agg, cfield)) == COUNTER_MAX  # type: ignore[arg-type]
    assert redis_client.hget(uagg, ufield) == f"{COUNTER_MAX}:2:0:0"
    assert sorted(spend_fields(redis_client).values()) == [20_000, 20_000]
    assert redis_client.xlen(T.usage) == 2


async def test_a_lease_charged_at_its_end_near_2_63_does_not_stop_the_tenant(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    """A hold that asks to be charged at its lease's end (on_expiry: charge) is charged by
    whichever script of the tenant reclaims it. Before, on a counter near 2^63 the charge
    failed every time, and so did every decision of the tenant after it (each one
    reclaims the same lease first): 500 for all. Now the charge saturates once."""
    c = await make_client(WARN2)
    body = {**WHO, "estimated_usd": 0.01, "lease_ms": 500, "on_expiry": "charge"}
    st, d = await post(c, "/v1/authorize", body)
    assert st == 200 and d["allowed"], d
    org, team = cids_of(redis_client, d["reservation_id"])
    redis_client.hset(T.counters, f"u:{team}", NEAR_2_63)
    clock.advance(1000)
    statuses = []
    for _ in range(3):
        st, d2 = await post(c, "/v1/authorize", {**WHO, "estimated_usd": 0.01})
        statuses.append(st)
        if st == 200:
            await post(c, "/v1/release", {"reservation_id": d2["reservation_id"]})
    assert statuses == [200, 200, 200]
    assert spend_fields(redis_client) == {f"u:{org}": 10_000, f"u:{team}": COUNTER_MAX}
    assert str(redis_client.hget(T.reservations, d["reservation_id"])).startswith("S|")


MAX_PRICE = {"provider": "p", "model": "max", "input_per_1k": 1000, "output_per_1k": 1000}
BIGGEST = 2 * 10**14  # the most one settle can cost: 2 x 10^8 tokens at $1 a token


async def test_the_largest_charges_saturate_a_warn_counter_exactly_at_its_maximum(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """With no preset past the maximum: a warn budget 1.5 of the largest charges under
    COUNTER_MAX, then three settles of the largest charge (10^8 tokens in and out at $1 a
    token). The counter reads 7.7e15, then COUNTER_MAX twice: never past it, so Lua reads
    every figure exactly (the settle's answer says $8,000,000,000.000000 to the micro-USD)
    and every charge is whole in the ledger (the ledger keeps each call's full cost)."""
    doc = {"budgets": [WARN2["budgets"][0]], "pricing": [MAX_PRICE]}
    c = await make_client(doc)
    big = {"provider": "p", "model": "max"}
    st, d = await post(c, "/v1/authorize", {**big, "estimated_usd": 1})
    (org,) = cids_of(redis_client, d["reservation_id"])
    start = COUNTER_MAX - BIGGEST - BIGGEST // 2
    redis_client.hset(T.counters, f"u:{org}", start)
    used = []
    for i in range(3):
        if i:
            st, d = await post(c, "/v1/authorize", {**big, "estimated_usd": 1})
        st, s = await post(c, "/v1/settle", {"reservation_id": d["reservation_id"],
                                             "tokens_in": 10**8, "tokens_out": 10**8})  # fmt: skip
        assert st == 200 and s["cost_usd"] == BIGGEST / 10**6, s
        used.append(int(redis_client.hget(T.counters, f"u:{org}")))  # type: ignore[arg-type]
        assert s["budgets"][0]["used_usd"] == used[-1] / 10**6
    assert used == [start + BIGGEST, COUNTER_MAX, COUNTER_MAX]
    assert [int(f["c"]) for _, f in redis_client.xrange(T.usage)] == [BIGGEST] * 3


# ---- prices made through the admin API: at most settings.max_api_definitions ----------


def price(i: int, input_per_1k: float = 0.5) -> dict[str, Any]:
    return {"provider": "acme", "model": f"m{i}",
            "pricing": {"input_per_1k": input_per_1k, "output_per_1k": 1.0}}  # fmt: skip


async def test_prices_made_through_the_api_are_capped_per_tenant_like_budgets(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """PUT /api/v1/pricing made a price per (provider, model) without end: every one is
    loaded into each replica's memory and its snapshot (one tenant's admin could fill the
    sidecar). Before: all 12 of 12 concurrent PUTs 200. Now, like budgets and rate limits:
    at most settings.max_api_definitions per tenant, 409 naming the setting past it with
    nothing written, the other tenant and the other kinds unaffected; a PUT of a price the
    tenant has already set replaces it even at the most; a delete makes room."""
    from tests.harness import data_dump
    from tests.test_auth import ADMIN, ADMIN_B, DOC

    client = await make_client({**DOC, "settings": {"max_api_definitions": 5}})

    async def put(body: dict[str, Any], headers: dict[str, str]) -> int:
        return (await client.put("/api/v1/pricing", json=body, headers=headers)).status

    import asyncio

    statuses = await asyncio.gather(
        *(put(price(i), ADMIN) for i in range(12)),
        *(put(price(100 + i), ADMIN_B) for i in range(3)),
    )
    assert sorted(statuses[:12]) == [200] * 5 + [409] * 7, statuses
    assert statuses[12:] == [200] * 3
    listed = await (await client.get("/api/v1/pricing?source=api", headers=ADMIN)).json()
    made = sorted(p["model"] for p in listed["pricing"])
    assert len(made) == 5
    # Full: a new one refused naming the setting, nothing written.
    before = data_dump(redis_client)
    r = await client.put("/api/v1/pricing", json=price(50), headers=ADMIN)
    answer = await r.json(content_type=None)
    assert (r.status, answer["field"]) == (409, "model"), answer
    assert "settings.max_api_definitions" in answer["detail"]
    assert r.content_type == "application/problem+json"
    assert data_dump(redis_client) == before
    # One already set is replaced at the most.
    n = int(made[0][1:])
    assert await put(price(n, input_per_1k=0.25), ADMIN) == 200
    got = await (await client.get(f"/api/v1/pricing?provider=acme&model={made[0]}",
                                  headers=ADMIN)).json()  # fmt: skip
    assert got["pricing"]["input_per_1k"] == 0.25
    # The other kinds have their own count: 5 budgets still fit beside 5 prices.
    for i in range(5):
        body = {"id": f"b{i}", "name": "B", "scope": "organization", "limit_usd": 10,
                "period": "monthly"}  # fmt: skip
        r = await client.post("/api/v1/budgets", json=body, headers=ADMIN)
        assert r.status == 201, await r.text()
    # A delete makes room for one.
    r = await client.delete(f"/api/v1/pricing?provider=acme&model={made[0]}", headers=ADMIN)
    assert r.status == 204
    assert await put(price(50), ADMIN) == 200
    assert await put(price(51), ADMIN) == 409


# ---- the usage and alerts streams of a tenant gone idle or out of the config ----------

DAY_MS = 86_400_000


def redis_ms(rc: redis.Redis) -> int:
    seconds, micros = rc.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def rounds_with_a_search(sweeper: Any) -> None:
    """Sweep rounds enough that one of them searches for tenants out of the config (every
    sweep.ORPHAN_EVERY rounds; the app's own loop runs rounds too), and two more."""
    from sidecar.sweep import ORPHAN_EVERY

    for _ in range(ORPHAN_EVERY + 2):
        await sweeper.sweep_round()


def add_entries(rc: redis.Redis, stream: str, ages_ms: list[int]) -> list[str]:
    """Entries `ages_ms` old in Redis time (the streams' ids are Redis time), oldest first."""
    now = redis_ms(rc)
    ids = [f"{now - age}-0" for age in sorted(ages_ms, reverse=True)]
    for entry_id in ids:
        rc.xadd(stream, {"k": "x", "at": "0"}, id=entry_id)
    return ids


async def test_a_tenant_out_of_the_config_leaves_no_usage_or_alerts_stream_for_ever(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    """Open mode's tenant spends and alerts, then the deployment gets credentials: the
    sweep collected its counters and forgot it, but its usage ledger and alerts streams
    (no TTL, capped by count only) stayed for ever (before: both pttl -1 after the sweep,
    the tenant forgotten). Now each expires when its newest entry passes its age (30 days
    by default), and only then is the tenant forgotten."""
    from tests.test_auth import AGENT_A
    from tests.test_auth import DOC as AUTH_DOC

    doc = {"budgets": [{"id": "user", "name": "U", "scope": "user", "limit_usd": 1,
                        "period": "daily", "alert_thresholds": [50]}]}  # fmt: skip
    first = await make_client(doc)
    for i in range(3):
        st, d = await post(first, "/v1/authorize", {"user_id": f"u{i}", "estimated_usd": 0.6})
        st, s = await post(first, "/v1/settle", {"reservation_id": d["reservation_id"],
                                                 "cost_usd": 0.6})  # fmt: skip
        assert st == 200, s
    assert (redis_client.xlen(T.usage), redis_client.xlen(T.alerts)) == (3, 3)
    await first.close()
    second = await make_client(AUTH_DOC)
    st, _ = await post(second, "/v1/authorize", {"estimated_usd": 0.01}, headers=AGENT_A)
    sweeper = second.server.app[SWEEPER]
    clock.advance(2 * DAY_MS)
    for _ in range(3):
        await sweeper.sweep_round()
    assert not redis_client.exists(T.counters, T.leases)
    clock.advance(3_600_000 + 1)
    for _ in range(3):
        await sweeper.sweep_round()
    assert redis_client.exists(T.counters, T.leases, T.reservations, T.gc) == 0
    assert sweeper.orphans == set()
    month = 30 * DAY_MS
    for stream in (T.usage, T.alerts):
        assert redis_client.xlen(stream) == 3  # younger than their age: all kept
        assert month - 600_000 < redis_client.pttl(stream) <= month, stream


async def test_a_tenant_found_by_its_streams_alone_has_them_trimmed_and_expiring(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """A tenant out of the config whose only keys left are its streams was never found by
    the sweep's search (it looked for counters, leases, reservations, gc): its entries past
    their age stayed, for ever. Now: the old ones trimmed, the stream expiring when the
    newest is past its age, a stream of old entries only deleted at once."""
    client = await make_client({"budgets": [], "settings": {"usage_max_age_days": 1,
                                                          "alerts_max_age_days": 2}})  # fmt: skip
    gone = keys.tenant_keys("gone")
    old_too = keys.tenant_keys("old")
    kept = add_entries(redis_client, gone.usage, [3 * DAY_MS, DAY_MS + 60_000, DAY_MS // 2])
    add_entries(redis_client, gone.alerts, [3 * DAY_MS, DAY_MS])
    add_entries(redis_client, old_too.usage, [2 * DAY_MS, 3 * DAY_MS])
    sweeper = client.server.app[SWEEPER]
    await rounds_with_a_search(sweeper)
    assert [i for i, _ in redis_client.xrange(gone.usage)] == kept[2:]
    assert redis_client.xlen(gone.alerts) == 1
    assert DAY_MS // 2 - 600_000 < redis_client.pttl(gone.usage) <= DAY_MS // 2
    assert DAY_MS - 600_000 < redis_client.pttl(gone.alerts) <= DAY_MS
    assert not redis_client.exists(old_too.usage)
    assert sweeper.orphans == set()


async def test_a_webhooks_alerts_past_their_age_are_trimmed_and_counted_as_dropped(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """A configured tenant's alerts stream read by a webhook's group: entries past
    alerts_max_age_days are trimmed (before: kept, up to the cap of ~10,000, for ever),
    the stream and its group stay (no TTL: expiring it would delete the group with what
    it has not read), and alert_drops.lua counts the trimmed unread exactly: the group
    had read 1 of the 3 old ones, so 2 dropped; the young one still to be read."""
    from sidecar import scripts

    client = await make_client({"budgets": [], "settings": {"alerts_max_age_days": 1}})
    ids = add_entries(redis_client, T.alerts, [3 * DAY_MS, 2 * DAY_MS, DAY_MS + 60_000, 60_000])
    group = "webhook:w"
    redis_client.xgroup_create(T.alerts, group, id="0")
    read = redis_client.xreadgroup(group, "c1", {T.alerts: ">"}, count=1)
    redis_client.xack(T.alerts, group, read[0][1][0][0])
    await client.server.app[SWEEPER].sweep_until_done("default")
    assert [i for i, _ in redis_client.xrange(T.alerts)] == ids[3:]
    assert redis_client.pttl(T.alerts) == -1
    drops = redis_client.eval(scripts.standalone("alert_drops"), 1, T.alerts, group)
    assert drops == 2
    assert redis_client.xinfo_groups(T.alerts)[0]["lag"] == 1


async def test_an_orphans_unread_alerts_go_with_their_stream_and_are_counted(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """A tenant out of the config with a webhook's group on its alerts: nobody reads them
    any more. Once every alert is past its age the stream goes with its groups, and what
    they had not read is counted (the dropped metric) and logged: 3 alerts, one group had
    read 1, another none: 2 + 3 dropped. Before: the stream stayed, for ever."""
    client = await make_client({"budgets": [], "settings": {"alerts_max_age_days": 1}})
    gone = keys.tenant_keys("gone")
    add_entries(redis_client, gone.alerts, [3 * DAY_MS, 2 * DAY_MS, DAY_MS + 60_000])
    redis_client.xgroup_create(gone.alerts, "webhook:a", id="0")
    redis_client.xgroup_create(gone.alerts, "webhook:b", id="0")
    read = redis_client.xreadgroup("webhook:a", "c1", {gone.alerts: ">"}, count=1)
    redis_client.xack(gone.alerts, "webhook:a", read[0][1][0][0])
    sweeper = client.server.app[SWEEPER]
    await rounds_with_a_search(sweeper)
    assert not redis_client.exists(gone.alerts)
    assert sweeper.alerts_dropped == 5
    assert sweeper.orphans == set()
