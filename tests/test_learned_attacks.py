"""Attacks on learned estimates (issue 19, sidecar/learned.py, lua/_lib.lua learned() and
learn()), on a real redis-server: absurd costs taught, one series settled from two sidecar
processes at once, a tenant's series past the maximum (also after the maximum was lowered),
the cold-start boundary, and an idempotent retry after the series' p95 moved. Each case
asserts the raw Redis values exactly."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis

from sidecar import keys
from sidecar.learned import LEARN_RING, p95
from tests.conftest import ClientFactory
from tests.harness import RedisServer, request_json, sidecars
from tests.test_learned import CALL, PRICING, SERIES, TENANT, call, doc, post, stats

# The schema's most expensive price (config.py PricePer1k le=1000: $1 a token) and its
# largest token counts (schemas.py Tokens le=1e8), and a price low enough that one token
# costs less than a micro-USD.
DEAR = {"provider": "openai", "model": "dear", "input_per_1k": 1000, "output_per_1k": 1000}
CHEAP = {"provider": "openai", "model": "cheap", "input_per_1k": 0.001, "output_per_1k": 0.001}
MAX_TOKENS = 100_000_000


def held_of(rc: redis.Redis, rid: str) -> int:
    """The estimate a reservation holds, as its record stores it (field 3)."""
    return int(str(rc.hget(TENANT.reservations, rid)).split("|")[2])


def holds(rc: redis.Redis) -> dict[str, str]:
    """The raw held figures ("h:<cid>") of the tenant's counters."""
    fields: dict[str, str] = rc.hgetall(TENANT.counters)  # type: ignore[assignment]
    return {k: v for k, v in fields.items() if k.startswith("h:")}


# ---- 1. absurd costs -----------------------------------------------------------------------


async def test_absurd_costs_keep_the_hold_between_the_floor_and_the_ceiling(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    data = doc(estimate_min_count=1, estimate_ceiling_usd=0.5)
    data["pricing"] = [*PRICING, DEAR, CHEAP]
    client = await make_client(data)

    async def authorize(agent: str, model: str, usd: float) -> dict[str, Any]:
        body = {**CALL, "agent_id": agent, "model": model, "estimated_usd": usd}
        return await post(client, "/v1/authorize", body)

    # Cost 0 taught: the p95 is 0; a hold is still at least the floor ($0.01), never 0.
    zero = keys.estimate_series("openai", "gpt-4o", "zero")
    d = await authorize("zero", "gpt-4o", 0)
    assert (d["estimated_usd"], d["estimate_source"]) == (0.01, "floor")
    await post(client, "/v1/settle", {"reservation_id": d["reservation_id"], "cost_usd": 0})
    assert redis_client.hget(TENANT.estimates, zero) == "1:0:0:0"
    d = await authorize("zero", "gpt-4o", 0)
    assert (d["estimated_usd"], d["estimate_source"]) == (0.01, "floor")
    assert held_of(redis_client, d["reservation_id"]) == 10_000
    d = await authorize("zero", "gpt-4o", 0.02)  # a caller's figure above the learned 0
    assert (d["estimated_usd"], d["estimate_source"]) == (0.02, "caller")
    assert held_of(redis_client, d["reservation_id"]) == 20_000

    # The largest cost the schema lets through: 1e8 + 1e8 tokens at $1 a token, $2e8.
    huge = keys.estimate_series("openai", "dear", "huge")
    d = await authorize("huge", "dear", 0.01)
    settle = {"reservation_id": d["reservation_id"], "tokens_in": MAX_TOKENS,
              "tokens_out": MAX_TOKENS}  # fmt: skip
    s = await post(client, "/v1/settle", settle)
    assert s["cost_usd"] == 200_000_000
    big = 200_000_000_000_000  # micro-USD: still exact in a double, printed whole
    assert redis_client.hget(TENANT.estimates, huge) == f"1:{big}:{big}:{big}"
    # And the largest given cost ($1e6) on top of it.
    d = await authorize("huge", "dear", 0.01)
    assert (d["estimated_usd"], d["estimate_source"]) == (0.5, "learned")  # the ceiling
    assert held_of(redis_client, d["reservation_id"]) == 500_000
    await post(client, "/v1/settle", {"reservation_id": d["reservation_id"],
                                      "cost_usd": 1_000_000})  # fmt: skip
    m = 1_000_000_000_000
    assert redis_client.hget(TENANT.estimates, huge) == f"2:{big}:{big},{m}:{big}.{m}"
    c = await post(client, "/v1/check", {**CALL, "agent_id": "huge", "model": "dear",
                                         "estimated_usd": 0.01})  # fmt: skip
    assert (c["estimated_usd"], c["estimate_source"]) == (0.5, "learned")

    # Tokens far below the estimate: one token at a thousandth of a micro-USD is charged
    # (and taught) 1 micro-USD; the hold stays at the floor, not 1 micro-USD.
    tiny = keys.estimate_series("openai", "cheap", "tiny")
    d = await authorize("tiny", "cheap", 0.05)
    s = await post(client, "/v1/settle", {"reservation_id": d["reservation_id"],
                                          "tokens_in": 1, "tokens_out": 0})  # fmt: skip
    assert s["cost_usd"] == 0.000001
    assert redis_client.hget(TENANT.estimates, tiny) == "1:1:1:1"
    d = await authorize("tiny", "cheap", 0)
    assert (d["estimated_usd"], d["estimate_source"]) == (0.01, "floor")
    assert held_of(redis_client, d["reservation_id"]) == 10_000


# ---- 2. one series settled from two sidecar processes --------------------------------------


def test_one_series_settled_from_two_sidecars_counts_every_cost(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    import yaml

    path = tmp_path / "budgets.yaml"
    path.write_text(yaml.safe_dump(doc(estimate_min_count=1)))
    pairs = 200
    costs = [1_000 + (i * 7_919) % 50_000 for i in range(pairs)]  # micro-USD, all distinct
    with sidecars(redis_server.url, str(path), 2) as procs:

        def pair(i: int) -> None:
            # Authorize on one process, settle on the other: both write the one series.
            a, b = procs[i % 2].url, procs[(i + 1) % 2].url
            status, d = request_json(f"{a}/v1/authorize", {**CALL, "estimated_usd": 0.01})
            assert status == 200 and d["allowed"], d
            settle = {"reservation_id": d["reservation_id"], "cost_usd": costs[i] / 1e6}
            status, s = request_json(f"{b}/v1/settle", settle)
            assert status == 200, s

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(pair, range(pairs)))
    raw = str(redis_client.hget(TENANT.estimates, SERIES))
    s = stats(redis_client)
    assert s.count == pairs
    assert len(s.ring) == LEARN_RING
    assert set(s.ring) <= set(costs)  # each a cost taught, none twice (costs are distinct)
    assert len(set(s.ring)) == LEARN_RING
    assert s.p95 == p95(list(s.ring)), raw
    top = sorted(s.ring, reverse=True)
    assert raw.endswith(f":{top[0]}.{top[1]}"), raw
    assert redis_client.hlen(TENANT.estimates) == 1


# ---- 3. series past the maximum ------------------------------------------------------------


async def _teach(client: Any, agent: str, cost: float = 0.02) -> None:
    d = await post(client, "/v1/authorize", {**CALL, "agent_id": agent, "estimated_usd": 0.01})
    await post(client, "/v1/settle", {"reservation_id": d["reservation_id"], "cost_usd": cost})


def _series(agent: str) -> str:
    return keys.estimate_series("openai", "gpt-4o", agent)


async def test_a_new_series_at_the_maximum_evicts_exactly_one(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(doc(estimate_max_series=3))
    for agent in ("a0", "a1", "a2"):
        await _teach(client, agent)
    before = set(redis_client.hkeys(TENANT.estimates))
    assert before == {_series("a0"), _series("a1"), _series("a2")}
    await _teach(client, "a3")
    after = set(redis_client.hkeys(TENANT.estimates))
    assert len(after) == 3
    assert len(before - after) == 1 and after - before == {_series("a3")}
    assert redis_client.hget(TENANT.estimates, _series("a3")) == "1:20000:20000:20000"
    # A known series at the maximum evicts nothing.
    await _teach(client, "a3")
    assert set(redis_client.hkeys(TENANT.estimates)) == after


async def test_a_lowered_maximum_is_kept_at_the_next_new_series(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """A config reload (or a rollout) lowers estimate_max_series below what a tenant has:
    its next new series brings the hash down to the maximum, not one past the old size."""
    wide = await make_client(doc(estimate_max_series=6))
    for agent in range(6):
        await _teach(wide, f"a{agent}")
    assert redis_client.hlen(TENANT.estimates) == 6
    narrow = await make_client(doc(estimate_max_series=2))
    await _teach(narrow, "new")
    assert redis_client.hlen(TENANT.estimates) == 2
    assert redis_client.hexists(TENANT.estimates, _series("new"))


# ---- 4. the cold-start boundary ------------------------------------------------------------


async def test_the_nth_taught_cost_switches_the_hold_to_the_p95(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    n = 4
    client = await make_client(doc(estimate_min_count=n))
    for taught in range(n + 2):
        d = await post(client, "/v1/authorize", {**CALL, "estimated_usd": 0.01})
        # `taught` costs were taught before this authorize.
        warm = taught >= n
        expected = (0.015, "learned") if warm else (0.01, "caller")
        assert (d["estimated_usd"], d["estimate_source"]) == expected, (taught, d)
        assert held_of(redis_client, d["reservation_id"]) == (15_000 if warm else 10_000)
        await post(client, "/v1/settle", {"reservation_id": d["reservation_id"],
                                          "cost_usd": 0.015})  # fmt: skip
        ring = ",".join(["15000"] * (taught + 1))
        top = "15000" if taught == 0 else "15000.15000"
        assert redis_client.hget(TENANT.estimates, SERIES) == f"{taught + 1}:15000:{ring}:{top}"


# ---- 5. an idempotent retry after the p95 moved --------------------------------------------


async def test_a_retry_after_the_p95_moved_returns_the_same_hold(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(doc(budget_usd=10, estimate_min_count=2))
    for _ in range(2):
        await call(client, 0.015)
    body = {**CALL, "estimated_usd": 0.01, "idempotency_key": "retry-1"}
    first = await post(client, "/v1/authorize", body)
    assert (first["estimated_usd"], first["estimate_source"]) == (0.015, "learned")
    (cid,) = holds(redis_client)
    assert holds(redis_client) == {cid: "15000"}
    # The p95 moves up: two costs of $0.03 (others' calls, settled meanwhile).
    for _ in range(2):
        await call(client, 0.03)
    assert stats(redis_client).p95 == 30_000
    assert holds(redis_client) == {cid: "15000"}  # only the first call's hold is left
    again = await post(client, "/v1/authorize", body)
    assert again["replayed"] is True
    assert again["reservation_id"] == first["reservation_id"]
    assert again["estimated_usd"] == 0.015
    assert holds(redis_client) == {cid: "15000"}  # no second hold
    assert held_of(redis_client, first["reservation_id"]) == 15_000
    records: dict[str, str] = redis_client.hgetall(TENANT.reservations)  # type: ignore[assignment]
    held = [k for k, v in records.items()
            if not k.startswith("k:") and v.startswith("H|")]  # fmt: skip
    assert held == [first["reservation_id"]]
