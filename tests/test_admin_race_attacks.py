"""Admin writes racing each other and the hot path, from two sidecars on one real Redis.

- A budget PUT merges the given fields into the budget as stored in Redis, not into the
  writing replica's (possibly stale) copy: a replica that has not yet seen a re-create or
  another replica's update must not bring back the old budget's fields.
- A rate-limit create of one id from two replicas makes exactly one; a rate-limit PUT on a
  replica that missed a delete does not bring the limit back (as for budgets).
- Under load (50 callers authorizing while two replicas PUT the limit back and forth,
  delete and re-create the budget, and send a bad PUT): every decision reports a written
  limit and fits within it, a GET never shows a mix of two writes, both replicas end on
  the last write, and the bad PUT changes nothing.
- The same idempotency key sent to two sidecars at once (20 copies on each) holds once;
  every answer names the one reservation; another body gets 409 without it.

Waits poll with a deadline, then assert exact outcomes: nothing here is timed.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import redis

from sidecar import keys
from sidecar.clock import FakeClock
from tests.conftest import ClientFactory
from tests.test_api_budgets import DOC, answer, eventually, new_budget, problem

DEFS = keys.definitions("default")
STORE_TIMEOUT_MS = 60_000  # counts, not times: a loaded machine must not turn into a 503


def stored_budget(rc: redis.Redis, budget_id: str = "api-cap") -> dict[str, Any] | None:
    raw = rc.hget(DEFS, f"b:{budget_id}")
    return None if raw is None else dict(json.loads(str(raw)))


# ---- 1. a PUT merges into the stored budget, not a stale copy ------------------------------


async def test_update_on_a_replica_that_missed_a_recreate_keeps_the_new_budget(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    a = await make_client(DOC)
    b = await make_client(DOC)
    await answer(await a.post("/api/v1/budgets", json=new_budget(name="First")), 201)

    async def b_knows() -> bool:
        return bool((await b.get("/api/v1/budgets/api-cap")).status == 200)

    await eventually(b_knows, "replica B loads the budget")
    # Deleted and re-created through another replica, before B's next poll (the version
    # is left alone so that the poll never comes: deterministic, the same state).
    clock.advance(7000)
    second = {**new_budget(name="Second", on_exceed="warn", alert_thresholds=[20]),
              "created_at": "2026-03-10T12:00:07Z", "updated_at": "2026-03-10T12:00:07Z",
              "forecast_alert": False}  # fmt: skip
    redis_client.hset(DEFS, "b:api-cap", json.dumps(second))

    clock.advance(1000)
    updated = await answer(await b.put("/api/v1/budgets/api-cap", json={"limit_usd": 0.5}))
    expected = {**second, "limit_usd": 0.5, "updated_at": "2026-03-10T12:00:08Z"}
    assert stored_budget(redis_client) == expected
    assert {k: updated[k] for k in expected} == expected


async def test_concurrent_updates_of_different_fields_both_land(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    a = await make_client(DOC)
    b = await make_client(DOC)
    await answer(await a.post("/api/v1/budgets", json=new_budget()), 201)

    async def b_knows() -> bool:
        return bool((await b.get("/api/v1/budgets/api-cap")).status == 200)

    await eventually(b_knows, "replica B loads the budget")
    # A changes the limit; B, before its poll, renames: B must not put the old limit back.
    stored = stored_budget(redis_client)
    assert stored is not None
    redis_client.hset(DEFS, "b:api-cap", json.dumps({**stored, "limit_usd": 3.0}))
    renamed = await answer(await b.put("/api/v1/budgets/api-cap", json={"name": "Renamed"}))
    after = stored_budget(redis_client)
    assert after is not None and (after["name"], after["limit_usd"]) == ("Renamed", 3.0)
    assert (renamed["name"], renamed["limit_usd"]) == ("Renamed", 3.0)


# ---- 2. rate limits: one create wins, a stale PUT does not resurrect -------------------------

RATE_LIMIT = {"id": "per-user", "scope": "user", "metric": "requests", "limit": 5,
              "window": "10s"}  # fmt: skip


async def test_concurrent_rate_limit_creates_of_one_id_make_exactly_one(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    replicas = [await make_client({}) for _ in range(2)]
    ids = [f"race-{i}" for i in range(10)]

    async def create(i: int, limit_id: str) -> tuple[str, int, dict[str, Any]]:
        body = {**RATE_LIMIT, "id": limit_id, "limit": i + 1}
        resp = await replicas[i % 2].post("/v1/rate-limits", json=body)
        return limit_id, resp.status, await resp.json(content_type=None)

    results = await asyncio.gather(*(create(i, lid) for lid in ids for i in range(4)))
    for limit_id in ids:
        mine = [(status, body) for lid, status, body in results if lid == limit_id]
        assert sorted(status for status, _ in mine) == [201, 409, 409, 409], mine
        (winner,) = [body for status, body in mine if status == 201]
        for status, body in mine:
            if status == 409:
                assert body["field"] == "id", body
        stored = json.loads(str(redis_client.hget(DEFS, f"rl:{limit_id}")))
        assert stored["limit"] == winner["limit"]


async def test_rate_limit_put_on_a_replica_that_missed_a_delete_does_not_resurrect_it(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client({})
    assert (await client.post("/v1/rate-limits", json=RATE_LIMIT)).status == 201
    # Deleted through another replica, before this one's next poll.
    assert redis_client.hdel(DEFS, "rl:per-user") == 1
    resp = await client.put("/v1/rate-limits/per-user", json={**RATE_LIMIT, "limit": 9})
    await problem(resp, 404, "id")
    assert not redis_client.hexists(DEFS, "rl:per-user")


# ---- 3. limit changed back and forth, deleted and re-created, under 50 callers -----------

# Each written definition pairs a name with a limit: a budget showing one's name with the
# other's limit is a mix of two writes.
WRITTEN = {"L1": 1.0, "L2": 2.0}
EST_MICRO = 10_000  # $0.01 each: 100 calls fit the lower limit, 200 the higher
CALLERS, CALLS_EACH = 50, 20


def shown(budget: dict[str, Any]) -> tuple[str, float]:
    return budget["name"], budget["limit_usd"]


async def test_limit_flips_and_recreates_under_load_keep_every_decision_within_a_written_limit(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    a = await make_client(DOC, timeout_ms=STORE_TIMEOUT_MS)
    b = await make_client(DOC, timeout_ms=STORE_TIMEOUT_MS)
    replicas = (a, b)
    await answer(await a.post("/api/v1/budgets", json=new_budget(name="L1")), 201)

    async def b_knows() -> bool:
        return bool((await b.get("/api/v1/budgets/api-cap")).status == 200)

    await eventually(b_knows, "replica B loads the budget")

    stop = asyncio.Event()
    admitted: list[tuple[str, float, int]] = []  # (name, limit, used+held after this hold)
    statuses: dict[str, list[int]] = {"put": [], "delete": [], "create": []}
    seen: list[tuple[str, float]] = []

    async def caller(i: int) -> None:
        for n in range(CALLS_EACH):
            if stop.is_set():
                return
            client = replicas[(i + n) % 2]
            body = {"team_id": "t1", "estimated_usd": EST_MICRO / 1e6}
            d = await answer(await client.post("/v1/authorize", json=body))
            state = next((s for s in d["budgets"] if s["budget_id"] == "api-cap"), None)
            if state is not None:
                seen.append((state["budget_name"], state["limit_usd"]))
            if not d["allowed"]:
                continue
            if state is not None:
                committed = round(state["used_usd"] * 1e6) + round(state["held_usd"] * 1e6)
                admitted.append((state["budget_name"], state["limit_usd"], committed))
            else:
                admitted.append(("", 0.0, -1))  # no api-cap then: held on cfg-cap only
            # Settled at its estimate: used + held only ever grows, by EST_MICRO per hold.
            settle = {"reservation_id": d["reservation_id"], "cost_usd": EST_MICRO / 1e6}
            await answer(await client.post("/v1/settle", json=settle))

    async def flipper(client: Any, names: tuple[str, str], rounds: int) -> None:
        for _ in range(rounds):
            for name in names:
                body = {"name": name, "limit_usd": WRITTEN[name]}
                resp = await client.put("/api/v1/budgets/api-cap", json=body)
                statuses["put"].append(resp.status)
                if resp.status == 200:
                    assert shown(await resp.json()) == (name, WRITTEN[name])
                else:
                    await problem(resp, 404, "id")  # deleted by the other writer meanwhile

    async def recreator(client: Any, rounds: int) -> None:
        for r in range(rounds):
            resp = await client.delete("/api/v1/budgets/api-cap")
            statuses["delete"].append(resp.status)
            name = ("L1", "L2")[r % 2]
            body = new_budget(name=name, limit_usd=WRITTEN[name])
            resp = await client.post("/api/v1/budgets", json=body)
            statuses["create"].append(resp.status)
            await asyncio.sleep(0.05)

    async def reader() -> None:
        while not stop.is_set():
            for client in replicas:
                resp = await client.get("/api/v1/budgets/api-cap")
                if resp.status == 200:
                    seen.append(shown(await resp.json()))
                else:
                    await problem(resp, 404, "id")
            raw = stored_budget(redis_client)
            if raw is not None:
                seen.append(shown(raw))
            await asyncio.sleep(0.01)

    async def writers() -> None:
        await asyncio.gather(flipper(a, ("L2", "L1"), 8), flipper(b, ("L1", "L2"), 8),
                             recreator(b, 4))  # fmt: skip
        # A bad PUT in the middle: a 400 naming the field, and no definition changes (once
        # both replicas know the budget: else it is a 404, which changes nothing either).
        for client in replicas:

            async def knows(client: Any = client) -> bool:
                return bool((await client.get("/api/v1/budgets/api-cap")).status == 200)

            await eventually(knows, "every replica loads the re-created budget")
        before = (redis_client.hgetall(DEFS), redis_client.get(keys.DEFS_VERSION))
        for client, bad, field in [(a, {"limit_usd": -1}, "limit_usd"),
                                   (b, {"name": "L9", "scope": "user"}, "scope"),
                                   (a, {"limit_usd": "2"}, "limit_usd")]:  # fmt: skip
            await problem(await client.put("/api/v1/budgets/api-cap", json=bad), 400, field)
        assert (redis_client.hgetall(DEFS), redis_client.get(keys.DEFS_VERSION)) == before
        await asyncio.gather(flipper(b, ("L2", "L1"), 4), recreator(a, 2))
        # Some budget is there now (each re-create follows its delete): the last write.
        last = await a.put("/api/v1/budgets/api-cap", json={"name": "L2", "limit_usd": 2.0})
        if last.status == 404:  # the last re-create lost to a delete: make it again
            body = new_budget(name="L2", limit_usd=2.0)
            await answer(await a.post("/api/v1/budgets", json=body), 201)
        else:
            await answer(last)
        stop.set()

    await asyncio.gather(writers(), reader(), *(caller(i) for i in range(CALLERS)))

    # Every limit a decision or a GET showed is one of the written definitions, whole.
    assert set(seen) <= set(WRITTEN.items()), set(seen) - set(WRITTEN.items())
    # No call admitted over the limit it reports; and the amounts reported are Redis's:
    # used + held only grows, by one estimate per hold, so the totals the admitted calls
    # saw are exactly one estimate apart, ending at the counter's raw value.
    with_cap = [(name, limit, c) for name, limit, c in admitted if c >= 0]
    for name, limit, committed in with_cap:
        assert committed <= round(limit * 1e6), (name, limit, committed)
    ctr: dict[str, str] = redis_client.hgetall("bs:{default}:ctr")  # type: ignore[assignment]
    (cid,) = [k[2:] for k in ctr if k.startswith("u:api-cap/")]
    assert int(ctr.get(f"h:{cid}", 0)) == 0  # every hold settled
    total = int(ctr[f"u:{cid}"])
    assert total == EST_MICRO * len(with_cap)
    assert sorted(c for _, _, c in with_cap) == [EST_MICRO * k for k in range(1, len(with_cap) + 1)]
    assert total <= round(max(WRITTEN.values()) * 1e6)
    # Both replicas end on the last write, as stored.
    final = ("L2", 2.0)
    assert shown(stored_budget(redis_client) or {}) == final
    for client in replicas:

        async def on_last(client: Any = client) -> bool:
            resp = await client.get("/api/v1/budgets/api-cap")
            return bool(resp.status == 200 and shown(await resp.json()) == final)

        await eventually(on_last, "every replica shows the last write")
    per_limit = {n: sum(1 for x, _, _ in with_cap if x == n) for n in WRITTEN}
    print(
        f"\nadmitted {len(admitted)} ({len(with_cap)} on api-cap {per_limit}, total {total}); "
        f"seen {len(seen)}; statuses { {k: sorted(set(v)) for k, v in statuses.items()} }"
    )


# ---- 4. one idempotency key at the same instant on two sidecars ------------------------------

COPIES = 20  # on each sidecar


async def test_one_key_sent_to_two_sidecars_at_once_holds_once_and_names_one_reservation(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    replicas = [await make_client(DOC, timeout_ms=STORE_TIMEOUT_MS) for _ in range(2)]
    body = {"team_id": "t1", "estimated_usd": 0.25, "idempotency_key": "run-9:step-1"}
    other = {**body, "estimated_usd": 0.3}  # the same key on another request
    go = asyncio.Event()

    async def send(client: Any, payload: dict[str, Any]) -> tuple[int, str]:
        await go.wait()  # every copy leaves at once
        resp = await client.post("/v1/authorize", json=payload)
        return resp.status, await resp.text()

    sends = [send(c, body) for c in replicas for _ in range(COPIES)]
    # Sent after the copies: a 409 needs the first request's record to exist to conflict
    # with (before it, the other body would simply be the first).
    tasks = [asyncio.ensure_future(s) for s in sends]
    go.set()
    results = await asyncio.gather(*tasks)
    conflicts = await asyncio.gather(
        *(replicas[i % 2].post("/v1/authorize", json=other) for i in range(4))
    )

    decisions = [json.loads(text) for status, text in results]
    assert [status for status, _ in results] == [200] * (2 * COPIES), results
    assert all(d["allowed"] for d in decisions)
    rids = {d["reservation_id"] for d in decisions}
    assert len(rids) == 1
    (rid,) = rids
    assert sorted(d["replayed"] for d in decisions) == [False] + [True] * (2 * COPIES - 1)
    # Exactly one hold in Redis: one reservation record, one lease, $0.25 held.
    # (the record, and the key's pointer to it)
    assert sorted(redis_client.hkeys("bs:{default}:res")) == sorted([rid, "k:run-9:step-1"])
    assert redis_client.zcard("bs:{default}:lease") == 1
    ctr: dict[str, str] = redis_client.hgetall("bs:{default}:ctr")  # type: ignore[assignment]
    holds = {k: int(v) for k, v in ctr.items() if k.startswith("h:")}
    assert holds == {"h:cfg-cap/default/m20260301": 250_000}
    for resp in conflicts:
        text = await resp.text()
        await problem(resp, 409, "idempotency_key")
        assert rid not in text
    assert sorted(redis_client.hkeys("bs:{default}:res")) == sorted([rid, "k:run-9:step-1"])
    assert holds == {k: int(v) for k, v in redis_client.hgetall("bs:{default}:ctr").items()
                     if k.startswith("h:")}  # fmt: skip
