"""Invariant 3, exactly once: a reservation ends once (settle, release or expiry), a repeated
call returns the first result and changes nothing, and an expired hold returns its amount
once. Every assertion reads the raw integer counters in Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis

from sidecar.clock import FakeClock
from tests.conftest import ClientFactory

# These tests count, they never time: a generous store timeout so that a loaded machine
# cannot turn a slow answer into a 503 (after which the script may still have run).
STORE_TIMEOUT_MS = 60_000
CTR = "bs:{default}:ctr"
RES = "bs:{default}:res"
LEASE = "bs:{default}:lease"

DOC: dict[str, Any] = {
    "budgets": [
        {"id": "org", "name": "Org", "scope": "organization", "limit_usd": 10, "period": "monthly"},
        {"id": "user", "name": "Each user", "scope": "user", "limit_usd": 1, "period": "daily"},
    ],
    "pricing": [
        {"provider": "openai", "model": "gpt-4o", "input_per_1k": 0.0025, "output_per_1k": 0.01}
    ],
}
# The fake clock starts on 2026-03-10 (conftest.T0_MS): these are the counters' ids.
ORG = "org/default/m20260301"
U1 = "user/u1/d20260310"
U2 = "user/u2/d20260310"


def counters(rc: redis.Redis) -> dict[str, int]:
    """Every counter field as an integer; none may ever be negative."""
    raw: dict[str, str] = rc.hgetall(CTR)  # type: ignore[assignment]
    # Recent-spend windows ("w:", for forecasts) are not amounts.
    values = {k: int(v) for k, v in raw.items() if not k.startswith("w:")}
    assert all(v >= 0 for v in values.values()), values
    # A hold back at zero is deleted (absent reads as zero): show it as the zero it is.
    for name in list(values):
        if name.startswith("u:"):
            values.setdefault("h:" + name[2:], 0)
    return values


def used(rc: redis.Redis, cid: str) -> int:
    return counters(rc).get(f"u:{cid}", 0)


def held(rc: redis.Redis, cid: str) -> int:
    return counters(rc).get(f"h:{cid}", 0)


def state(rc: redis.Redis, rid: str) -> str:
    record = rc.hget(RES, rid)
    assert isinstance(record, str), rid
    return record.split("|")[0]


async def post(client: Any, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    r = await client.post(path, json=body)
    data: dict[str, Any] = await r.json(content_type=None)
    return r.status, data


async def hold(client: Any, usd: float, user: str = "u1", **extra: Any) -> str:
    status, d = await post(
        client, "/v1/authorize", {"user_id": user, "estimated_usd": usd, **extra}
    )
    assert status == 200 and d["allowed"] is True, d
    rid: str = d["reservation_id"]
    return rid


def amounts(body: dict[str, Any]) -> list[tuple[str, int, int]]:
    return [
        (b["budget_id"], round(b["used_usd"] * 1e6), round(b["held_usd"] * 1e6))
        for b in body["budgets"]
    ]


# ---- settle and release, repeated ---------------------------------------------------------


async def test_settle_twice_returns_the_first_result_and_charges_once(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(DOC, timeout_ms=STORE_TIMEOUT_MS)
    rid = await hold(client, 0.3)
    assert (held(redis_client, U1), held(redis_client, ORG)) == (300_000, 300_000)

    status, first = await post(client, "/v1/settle", {"reservation_id": rid, "cost_usd": 0.123456})
    assert status == 200
    assert (first["state"], first["cost_usd"], first["replayed"]) == ("settled", 0.123456, False)
    assert amounts(first) == [("org", 123_456, 0), ("user", 123_456, 0)]
    after_first = counters(redis_client)
    assert after_first == {f"u:{ORG}": 123_456, f"h:{ORG}": 0, f"u:{U1}": 123_456, f"h:{U1}": 0}

    for again in ({"cost_usd": 0.5}, {"cost_usd": 0.123456}, {"tokens_in": 10, "tokens_out": 1}):
        status, d = await post(client, "/v1/settle", {"reservation_id": rid, **again})
        assert status == 200
        assert d["replayed"] is True
        assert {k: v for k, v in d.items() if k != "replayed"} == {
            k: v for k, v in first.items() if k != "replayed"
        }
        assert counters(redis_client) == after_first
    assert state(redis_client, rid) == "S"


async def test_release_twice_returns_the_first_result_and_returns_the_hold_once(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(DOC, timeout_ms=STORE_TIMEOUT_MS)
    keep = await hold(client, 0.2)
    rid = await hold(client, 0.3)
    assert held(redis_client, U1) == 500_000

    status, first = await post(client, "/v1/release", {"reservation_id": rid})
    assert status == 200
    assert (first["state"], first["cost_usd"], first["replayed"]) == ("released", 0.0, False)
    assert amounts(first) == [("org", 0, 200_000), ("user", 0, 200_000)]
    after_first = counters(redis_client)
    assert (after_first[f"h:{U1}"], after_first[f"h:{ORG}"]) == (200_000, 200_000)

    for _ in range(3):
        status, d = await post(client, "/v1/release", {"reservation_id": rid})
        assert status == 200 and d["replayed"] is True
        assert amounts(d) == amounts(first) and d["state"] == "released"
        assert counters(redis_client) == after_first
    assert state(redis_client, rid) == "R" and state(redis_client, keep) == "H"


async def test_settle_after_release_returns_the_release_and_changes_nothing(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(DOC, timeout_ms=STORE_TIMEOUT_MS)
    rid = await hold(client, 0.4)
    _, released = await post(client, "/v1/release", {"reservation_id": rid})
    before = counters(redis_client)
    assert (before.get(f"h:{U1}", 0), before.get(f"u:{U1}", 0)) == (0, 0)

    status, d = await post(client, "/v1/settle", {"reservation_id": rid, "cost_usd": 0.25})
    assert status == 200
    assert (d["state"], d["cost_usd"], d["replayed"]) == ("released", 0.0, True)
    assert amounts(d) == amounts(released)
    assert counters(redis_client) == before
    assert state(redis_client, rid) == "R"


async def test_release_after_settle_returns_the_settle_and_changes_nothing(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(DOC, timeout_ms=STORE_TIMEOUT_MS)
    rid = await hold(client, 0.4)
    _, settled = await post(client, "/v1/settle", {"reservation_id": rid, "cost_usd": 0.45})
    before = counters(redis_client)
    assert (before[f"u:{U1}"], before.get(f"h:{U1}", 0)) == (450_000, 0)

    status, d = await post(client, "/v1/release", {"reservation_id": rid})
    assert status == 200
    assert (d["state"], d["cost_usd"], d["replayed"]) == ("settled", 0.45, True)
    # $0.45 on a $0.40 hold: the estimate was $0.05 short, and nothing passed a cap.
    assert d["estimate_error_usd"] == settled["estimate_error_usd"] == 0.05
    assert d["overshoot_usd"] == settled["overshoot_usd"] == 0.0
    assert amounts(d) == amounts(settled)
    assert counters(redis_client) == before
    assert state(redis_client, rid) == "S"


async def test_concurrent_settles_of_one_reservation_charge_once(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(DOC, timeout_ms=STORE_TIMEOUT_MS)
    rid = await hold(client, 0.3)
    bodies = [{"reservation_id": rid, "cost_usd": (i + 1) / 100} for i in range(12)]
    bodies += [{"reservation_id": rid}] * 6
    results = await asyncio.gather(
        *(post(client, "/v1/settle" if "cost_usd" in b else "/v1/release", b) for b in bodies)
    )
    assert all(status == 200 for status, _ in results)
    firsts = [d for _, d in results if not d["replayed"]]
    assert len(firsts) == 1
    first = firsts[0]
    for _, d in results:
        assert (d["state"], d["cost_usd"], amounts(d)) == (
            first["state"],
            first["cost_usd"],
            amounts(first),
        )
    charge = round(first["cost_usd"] * 1e6)
    assert (used(redis_client, U1), held(redis_client, U1)) == (charge, 0)
    assert (used(redis_client, ORG), held(redis_client, ORG)) == (charge, 0)


async def test_settle_by_tokens_of_an_unpriced_reservation_charges_its_hold_once(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """A reservation held with no price cannot price tokens: it charges the held estimate
    (never $0), says so, and a repeat changes nothing."""
    client = await make_client(DOC, timeout_ms=STORE_TIMEOUT_MS)
    rid = await hold(client, 0.3)
    body = {"reservation_id": rid, "tokens_in": 1000}
    for replayed in (False, True):
        status, d = await post(client, "/v1/settle", body)
        assert status == 200 and d["replayed"] is replayed
        assert (d["state"], d["cost_usd"], d["priced_by"]) == ("settled", 0.3, "estimate")
        assert (used(redis_client, U1), held(redis_client, U1)) == (300_000, 0)
    status, d = await post(client, "/v1/settle", {"reservation_id": rid, "cost_usd": 0.01})
    assert status == 200 and d["replayed"] is True and d["cost_usd"] == 0.3
    assert (used(redis_client, U1), held(redis_client, U1)) == (300_000, 0)


async def test_settle_by_tokens_twice_charges_the_priced_cost_once(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(DOC, timeout_ms=STORE_TIMEOUT_MS)
    status, d = await post(
        client,
        "/v1/authorize",
        {"user_id": "u1", "model": "gpt-4o", "estimated_tokens_in": 10_000},
    )
    assert d["allowed"] and held(redis_client, U1) == 25_000
    rid = d["reservation_id"]
    body = {"reservation_id": rid, "tokens_in": 333, "tokens_out": 77}
    # 333 * 2.5e6 pico = 832.5 micro -> 833; 77 * 1e7 pico = 770 micro.
    for replayed in (False, True, True):
        status, d = await post(client, "/v1/settle", body)
        assert status == 200 and d["replayed"] is replayed and d["cost_usd"] == 0.001603
        assert (used(redis_client, U1), held(redis_client, U1)) == (1_603, 0)
        assert (used(redis_client, ORG), held(redis_client, ORG)) == (1_603, 0)


# ---- authorize retried ---------------------------------------------------------------------


async def test_authorize_retried_with_the_same_key_holds_once(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(DOC, timeout_ms=STORE_TIMEOUT_MS)
    body = {"user_id": "u1", "estimated_usd": 0.2, "idempotency_key": "step-1"}
    status, first = await post(client, "/v1/authorize", body)
    assert status == 200 and first["allowed"] and first["replayed"] is False
    rid = first["reservation_id"]
    assert (held(redis_client, U1), held(redis_client, ORG)) == (200_000, 200_000)

    # The same request again is a retry: the same reservation, nothing held twice.
    status, d = await post(client, "/v1/authorize", body)
    assert status == 200
    assert (d["allowed"], d["reservation_id"], d["replayed"]) == (True, rid, True)
    # The same key on another request (estimate, payer) is refused and changes nothing.
    for other in ({**body, "estimated_usd": 0.9}, {**body, "user_id": "u2"}):
        before = counters(redis_client)
        status, d = await post(client, "/v1/authorize", other)
        assert status == 409 and d["field"] == "idempotency_key", d
        assert counters(redis_client) == before
    assert (held(redis_client, U1), held(redis_client, ORG), held(redis_client, U2)) == (
        200_000,
        200_000,
        0,
    )
    assert redis_client.zcard(LEASE) == 1

    # After the reservation finished, its key never allows a call again.
    await post(client, "/v1/settle", {"reservation_id": rid, "cost_usd": 0.1})
    before = counters(redis_client)
    status, d = await post(client, "/v1/authorize", body)
    assert status == 409 and d["field"] == "idempotency_key" and "settled" in d["detail"]
    assert counters(redis_client) == before
    assert (used(redis_client, U1), held(redis_client, U1)) == (100_000, 0)
    assert redis_client.zcard(LEASE) == 0

    # Another key is another reservation.
    status, d = await post(client, "/v1/authorize", {**body, "idempotency_key": "step-2"})
    assert d["allowed"] and d["replayed"] is False and d["reservation_id"] != rid
    assert held(redis_client, U1) == 200_000


async def test_concurrent_authorize_retries_hold_once(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(DOC, timeout_ms=STORE_TIMEOUT_MS)
    body = {"user_id": "u1", "estimated_usd": 0.15, "idempotency_key": "run-7:step-3"}
    results = await asyncio.gather(*(post(client, "/v1/authorize", body) for _ in range(20)))
    assert all(status == 200 and d["allowed"] for status, d in results)
    assert len({d["reservation_id"] for _, d in results}) == 1
    assert sum(not d["replayed"] for _, d in results) == 1
    assert (held(redis_client, U1), held(redis_client, ORG)) == (150_000, 150_000)
    assert redis_client.zcard(LEASE) == 1


async def test_authorize_replay_of_an_expired_reservation_holds_nothing_again(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    client = await make_client(DOC, timeout_ms=STORE_TIMEOUT_MS)
    body = {"user_id": "u1", "estimated_usd": 0.2, "idempotency_key": "k", "lease_ms": 500}
    _, first = await post(client, "/v1/authorize", body)
    clock.advance(500)
    status, d = await post(client, "/v1/authorize", body)
    assert status == 409 and d["field"] == "idempotency_key" and "expired" in d["detail"]
    assert (held(redis_client, U1), held(redis_client, ORG)) == (0, 0)
    assert state(redis_client, first["reservation_id"]) == "E"


# ---- expiry ----------------------------------------------------------------------------------


async def test_expired_hold_is_reclaimed_exactly_once(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    client = await make_client(DOC, timeout_ms=STORE_TIMEOUT_MS)
    expiring = await hold(client, 0.25, lease_ms=1000)
    staying = await hold(client, 0.1, lease_ms=60_000)
    clock.advance(999)
    r = await client.get("/v1/budgets/user/status?scope_id=u1")
    assert (await r.json())["held_usd"] == 0.35
    assert held(redis_client, U1) == 350_000 and state(redis_client, expiring) == "H"

    clock.advance(1)  # the lease ends at exactly this instant
    triggers: list[tuple[str, dict[str, Any] | None]] = [
        ("/v1/budgets/user/status?scope_id=u1", None),
        ("/v1/check", {"user_id": "u1", "estimated_usd": 0.01}),
        ("/v1/budgets/org/status?scope_id=default", None),
        ("/v1/authorize", {"user_id": "u2", "estimated_usd": 0.05}),
        ("/v1/record", {"user_id": "u2", "cost_usd": 0.02}),
        ("/v1/settle", {"reservation_id": "0" * 32, "cost_usd": 0.01}),
        ("/v1/release", {"reservation_id": "0" * 32}),
        ("/v1/authorize", {"user_id": "u1", "estimated_usd": 0.05, "lease_ms": 60_000}),
    ]
    extra_u1 = extra_org = 0
    for path, body in triggers:
        if body is None:
            r = await client.get(path)
        else:
            r = await client.post(path, json=body)
        assert r.status in (200, 404), (path, await r.text())
        if path == "/v1/authorize":
            extra_org += 50_000
            extra_u1 += 50_000 if body and body["user_id"] == "u1" else 0
        assert held(redis_client, U1) == 100_000 + extra_u1, path
        assert held(redis_client, ORG) == 100_000 + extra_org, path
        assert state(redis_client, expiring) == "E" and state(redis_client, staying) == "H"
    assert used(redis_client, ORG) == 20_000 and used(redis_client, U1) == 0
    assert redis_client.zscore(LEASE, expiring) is None

    # Releasing or settling it afterwards returns nothing a second time.
    status, d = await post(client, "/v1/release", {"reservation_id": expiring})
    assert status == 200 and d["lease_expired"] is True and d["replayed"] is False
    assert held(redis_client, U1) == 150_000 and held(redis_client, ORG) == 200_000
    status, d = await post(client, "/v1/settle", {"reservation_id": expiring, "cost_usd": 1})
    assert d["state"] == "released" and d["replayed"] is True
    assert held(redis_client, U1) == 150_000 and used(redis_client, U1) == 0


@pytest.mark.parametrize("reclaimed_first", [False, True], ids=["settle-reclaims", "status-first"])
async def test_settle_after_expiry_charges_the_cost_and_returns_the_hold_once(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock, reclaimed_first: bool
) -> None:
    client = await make_client(DOC, timeout_ms=STORE_TIMEOUT_MS)
    late = await hold(client, 0.25, lease_ms=1000)
    await hold(client, 0.1, lease_ms=60_000)
    clock.advance(1500)
    if reclaimed_first:
        await client.get("/v1/budgets/user/status?scope_id=u1")
        assert held(redis_client, U1) == 100_000

    status, d = await post(client, "/v1/settle", {"reservation_id": late, "cost_usd": 0.3})
    assert status == 200
    assert (d["state"], d["cost_usd"], d["lease_expired"], d["replayed"]) == (
        "settled",
        0.3,
        True,
        False,
    )
    assert (d["estimate_error_usd"], d["overshoot_usd"]) == (0.05, 0.0)
    assert amounts(d) == [("org", 300_000, 100_000), ("user", 300_000, 100_000)]
    snapshot = counters(redis_client)
    assert snapshot == {
        f"u:{ORG}": 300_000,
        f"h:{ORG}": 100_000,
        f"u:{U1}": 300_000,
        f"h:{U1}": 100_000,
    }
    for path, body in (
        ("/v1/settle", {"reservation_id": late, "cost_usd": 0.9}),
        ("/v1/release", {"reservation_id": late}),
    ):
        status, again = await post(client, path, body)
        assert status == 200 and again["replayed"] is True and again["lease_expired"] is True
        assert again["cost_usd"] == 0.3 and amounts(again) == amounts(d)
        assert counters(redis_client) == snapshot


async def test_settle_after_expiry_says_lease_expired_even_when_reclaim_lags(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    """More leases end at once than one script reclaims (32): a settle of one that was not
    reclaimed yet still returns its hold once, and still reports that its lease had ended
    (the record's field 9: '1' if the lease had ended before settle/release)."""
    client = await make_client(DOC, timeout_ms=STORE_TIMEOUT_MS)
    rids = [await hold(client, 0.01, lease_ms=100) for _ in range(40)]
    assert held(redis_client, U1) == 400_000
    clock.advance(100)
    last = max(rids)  # equal lease ends: reclaimed in reservation-id order, this one last
    status, d = await post(client, "/v1/settle", {"reservation_id": last, "cost_usd": 0.02})
    assert status == 200
    # 32 reclaimed by this call, and this one's hold returned by the settle itself.
    assert held(redis_client, U1) == 400_000 - 33 * 10_000
    assert used(redis_client, U1) == 20_000
    for _ in range(2):
        await client.get("/v1/budgets/user/status?scope_id=u1")
        assert held(redis_client, U1) == 0 and held(redis_client, ORG) == 0
    assert used(redis_client, U1) == 20_000
    assert d["lease_expired"] is True


# ---- zero estimates ------------------------------------------------------------------------


async def test_zero_estimate_reservation_releases_and_settles(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(DOC, timeout_ms=STORE_TIMEOUT_MS)
    released = await hold(client, 0)
    settled = await hold(client, 0)
    status, d = await post(client, "/v1/release", {"reservation_id": released})
    assert status == 200, d
    status, d = await post(client, "/v1/settle", {"reservation_id": settled, "cost_usd": 0.01})
    assert status == 200, d
    assert (used(redis_client, U1), held(redis_client, U1)) == (10_000, 0)


async def test_zero_estimate_lease_expiry_does_not_break_the_tenant(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    """Every script reclaims ended leases first: one ended zero hold must not make every
    later call of the tenant fail."""
    client = await make_client(DOC, timeout_ms=STORE_TIMEOUT_MS)
    rid = await hold(client, 0, lease_ms=1000)
    clock.advance(1000)
    status, d = await post(client, "/v1/authorize", {"user_id": "u2", "estimated_usd": 0.1})
    assert status == 200 and d["allowed"], d
    assert state(redis_client, rid) == "E"
    assert (held(redis_client, U1), held(redis_client, U2)) == (0, 100_000)


# ---- record ----------------------------------------------------------------------------------


async def test_record_with_the_same_key_charges_once(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(DOC, timeout_ms=STORE_TIMEOUT_MS)
    body = {"user_id": "u1", "cost_usd": 0.2, "idempotency_key": "usage-1"}
    for replayed, cost in ((False, 0.2), (True, 0.2), (True, 0.7)):
        status, d = await post(client, "/v1/record", {**body, "cost_usd": cost})
        assert status == 200 and d["replayed"] is replayed
        assert (used(redis_client, U1), used(redis_client, ORG)) == (200_000, 200_000)

    await post(client, "/v1/record", {**body, "idempotency_key": "usage-2"})
    assert used(redis_client, U1) == 400_000
    # Without a key every call counts.
    for n in (1, 2):
        await post(client, "/v1/record", {"user_id": "u1", "cost_usd": 0.000001})
        assert used(redis_client, U1) == 400_000 + n
    assert held(redis_client, U1) == 0


async def test_concurrent_records_with_the_same_key_charge_once(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(DOC, timeout_ms=STORE_TIMEOUT_MS)
    body = {"user_id": "u1", "model": "gpt-4o", "tokens_in": 1001, "idempotency_key": "r-9"}
    results = await asyncio.gather(*(post(client, "/v1/record", body) for _ in range(15)))
    assert sum(not d["replayed"] for _, d in results) == 1
    # 1001 tokens at 2.5e6 pico each = 2502.5 micro-USD, rounded up.
    assert (used(redis_client, U1), used(redis_client, ORG)) == (2_503, 2_503)


async def test_a_record_key_equal_to_an_authorize_key_still_charges(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """Idempotency keys of /v1/record and /v1/authorize are separate: a client that keys
    both by its step id must not have its usage report dropped."""
    client = await make_client(DOC, timeout_ms=STORE_TIMEOUT_MS)
    await hold(client, 0.1, idempotency_key="step-1")
    status, d = await post(
        client, "/v1/record", {"user_id": "u1", "cost_usd": 0.05, "idempotency_key": "step-1"}
    )
    assert status == 200 and d["replayed"] is False, d
    assert used(redis_client, U1) == 50_000


async def test_an_authorize_key_equal_to_a_record_key_still_holds(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(DOC, timeout_ms=STORE_TIMEOUT_MS)
    await post(
        client, "/v1/record", {"user_id": "u1", "cost_usd": 0.05, "idempotency_key": "step-2"}
    )
    status, d = await post(
        client,
        "/v1/authorize",
        {"user_id": "u1", "estimated_usd": 0.1, "idempotency_key": "step-2"},
    )
    assert status == 200 and d["allowed"] and d["replayed"] is False, d
    assert held(redis_client, U1) == 100_000
    assert state(redis_client, d["reservation_id"]) == "H"
