"""The usage ledger, its daily aggregates and threshold alerts, against a real Redis.

- Every settle and every record writes exactly one ledger record (a repeat writes none,
  a release none), with the call's identity, run and step, tokens, cost and latency.
- The aggregates a summary or breakdown reads are exact (micro-USD) under concurrency and
  independent of the records' bounds (by count, and by age on the stream's ids).
- A threshold alerts exactly once per budget, entity, period window and threshold, and
  only when settled spend crosses it (a hold alone never alerts).

Counts are exact; nothing here is timed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from aiohttp.test_utils import TestClient

from sidecar import keys
from sidecar.clock import FakeClock
from sidecar.money import cost_micro, price_to_pico
from sidecar.periods import iso
from tests.conftest import T0_MS, ClientFactory
from tests.harness import RedisServer, sidecars

DAY_MS = 86_400_000
USAGE = keys.tenant_keys("default").usage
ALERTS = keys.tenant_keys("default").alerts
GPT = ("openai", "gpt-4o", 0.0025, 0.01)
# A model name with ':' (Bedrock ids carry one).
SONNET = ("bedrock", "anthropic.claude-3-sonnet-20240229-v1:0", 0.003, 0.015)
HAIKU = ("anthropic", "claude-3-5-haiku", 0.0008, 0.004)

PRICING = [
    {"provider": p, "model": m, "input_per_1k": i, "output_per_1k": o}
    for p, m, i, o in (GPT, SONNET, HAIKU)
]
# A roomy warn budget so that every charge also touches a counter.
ROOMY = {"id": "roomy", "name": "Roomy", "scope": "organization", "limit_usd": 100_000.0,
         "period": "monthly", "on_exceed": "warn"}  # fmt: skip


def doc(**settings: Any) -> dict[str, Any]:
    return {"budgets": [ROOMY], "pricing": PRICING, "settings": settings}


def token_cost(model: tuple[str, str, float, float], tokens_in: int, tokens_out: int) -> int:
    """Micro-USD, as the sidecar prices tokens (each side rounded up)."""
    return cost_micro(tokens_in, price_to_pico(model[2])) + cost_micro(
        tokens_out, price_to_pico(model[3])
    )


async def ok(client: TestClient[Any, Any], path: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = await client.post(path, json=body)
    assert resp.status == 200, await resp.text()
    data: dict[str, Any] = await resp.json()
    return data


async def get(client: TestClient[Any, Any], path: str) -> dict[str, Any]:
    resp = await client.get(path)
    assert resp.status == 200, await resp.text()
    data: dict[str, Any] = await resp.json()
    return data


async def all_records(client: TestClient[Any, Any], query: str = "") -> list[dict[str, Any]]:
    page = await get(client, f"/api/v1/usage/records?limit=100{query}")
    assert page["total"] == len(page["records"]) <= 100
    records: list[dict[str, Any]] = page["records"]
    return records


def agg_micro(r: redis.Redis) -> dict[str, int]:
    """Totals over every daily aggregate hash of the default tenant: c, n, i, o."""
    out = {"c": 0, "n": 0, "i": 0, "o": 0}
    for key in r.scan_iter(match="bs:{default}:agg:*"):
        for name, value in r.hgetall(key).items():
            out[str(name)[0]] += int(value)
    return out


def stream_ids(r: redis.Redis, key: str) -> list[str]:
    """The ids of a stream's entries, oldest first."""
    entries: list[tuple[str, Any]] = r.xrange(key)  # type: ignore[assignment]
    return [entry_id for entry_id, _ in entries]


# ---- 1. one record per charge ----------------------------------------------------------------


IDENTITY = {"org_id": "acme", "team_id": "t1", "agent_id": "a1", "workflow_id": "wf1",
            "user_id": "u1"}  # fmt: skip


async def test_each_charge_writes_exactly_one_record_with_its_fields(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    client = await make_client(doc())

    # A settle by tokens, priced as the reservation was.
    held = await ok(
        client,
        "/v1/authorize",
        {**IDENTITY, "provider": "openai", "model": "gpt-4o", "estimated_tokens_in": 2000,
         "estimated_tokens_out": 1000, "run_id": "run-7", "step_id": "plan"},
    )  # fmt: skip
    assert held["allowed"], held
    assert redis_client.xlen(USAGE) == 0  # a hold writes nothing
    clock.advance(1500)
    settle = {"reservation_id": held["reservation_id"], "tokens_in": 1234, "tokens_out": 567,
              "latency_ms": 842, "success": False}  # fmt: skip
    first = await ok(client, "/v1/settle", settle)
    assert not first["replayed"]
    assert redis_client.xlen(USAGE) == 1
    # The same settle again (and by cost): the first result, nothing written.
    again = await ok(client, "/v1/settle", settle)
    assert again["replayed"] and again["cost_usd"] == first["cost_usd"]
    by_cost = {"reservation_id": held["reservation_id"], "cost_usd": 9.0}
    assert (await ok(client, "/v1/settle", by_cost))["replayed"]
    assert redis_client.xlen(USAGE) == 1

    (rec,) = await all_records(client)
    cost = token_cost(GPT, 1234, 567)
    assert first["cost_usd"] == cost / 1e6
    assert rec == {
        "id": rec["id"],
        "request_id": held["reservation_id"],
        "tenant_id": "default",
        "org_id": "acme",
        "team_id": "t1",
        "agent_id": "a1",
        "workflow_id": "wf1",
        "user_id": "u1",
        "step_id": "plan",
        "run_id": "run-7",
        "provider": "openai",
        "model": "gpt-4o",
        "tokens_in": 1234,
        "tokens_out": 567,
        "cost_usd": cost / 1e6,
        "latency_ms": 842,
        "success": False,
        "kind": "settle",
        "priced_by": "tokens",
        "created_at": "2026-03-10T12:00:01Z",
    }
    assert [rec["id"]] == stream_ids(redis_client, USAGE)

    # A record with an idempotency key: once, however often it is sent.
    clock.advance(60_000)
    body = {**IDENTITY, "team_id": "t2", "provider": "bedrock", "model": SONNET[1],
            "tokens_in": 100, "tokens_out": 10, "idempotency_key": "call-1",
            "run_id": "run-8", "step_id": "act", "latency_ms": 12}  # fmt: skip
    assert not (await ok(client, "/v1/record", body))["replayed"]
    assert (await ok(client, "/v1/record", body))["replayed"]
    assert (await ok(client, "/v1/record", {**body, "tokens_in": 999}))["replayed"]
    assert redis_client.xlen(USAGE) == 2

    # A release writes nothing, nor does a second release, nor a settle after it.
    released = await ok(client, "/v1/authorize", {**IDENTITY, "estimated_usd": 0.5})
    rid = released["reservation_id"]
    assert (await ok(client, "/v1/release", {"reservation_id": rid}))["state"] == "released"
    assert (await ok(client, "/v1/release", {"reservation_id": rid}))["replayed"]
    assert (await ok(client, "/v1/settle", {"reservation_id": rid, "cost_usd": 0.1}))["replayed"]
    assert redis_client.xlen(USAGE) == 2

    # A settle by cost with no model, and two records without a key: each writes one.
    clock.advance(1000)
    by_usd = await ok(client, "/v1/authorize", {"user_id": "u9", "estimated_usd": 0.2})
    await ok(client, "/v1/settle", {"reservation_id": by_usd["reservation_id"], "cost_usd": 0.15})
    await ok(client, "/v1/record", {"agent_id": "a2", "cost_usd": 0.01})
    await ok(client, "/v1/record", {"agent_id": "a2", "cost_usd": 0.01})
    assert redis_client.xlen(USAGE) == 5

    newest, older, by_usd, _, _ = await all_records(client)
    assert newest["kind"] == older["kind"] == "record"
    assert newest["cost_usd"] == 0.01 and newest["request_id"] is None
    assert newest["org_id"] == "default"  # the default org of a request naming none
    assert newest["provider"] == "" and newest["model"] == ""
    assert newest["latency_ms"] is None and newest["success"] is True
    assert newest["step_id"] is None and newest["run_id"] is None
    assert newest["created_at"] == iso(clock.now_ms()) == "2026-03-10T12:01:02Z"
    assert by_usd["kind"] == "settle" and by_usd["cost_usd"] == 0.15
    assert by_usd["user_id"] == "u9" and by_usd["tokens_in"] == 0

    recorded = (await all_records(client, "&provider=bedrock"))[0]
    assert recorded == {
        **recorded,
        "kind": "record",
        "request_id": "call-1",
        "team_id": "t2",
        "model": SONNET[1],
        "tokens_in": 100,
        "tokens_out": 10,
        "cost_usd": token_cost(SONNET, 100, 10) / 1e6,
        "run_id": "run-8",
        "step_id": "act",
        "latency_ms": 12,
        "success": True,
        "created_at": "2026-03-10T12:01:01Z",
    }

    # The aggregates count the same five charges, and nothing for the hold or release.
    totals = agg_micro(redis_client)
    assert totals == {
        "c": cost + token_cost(SONNET, 100, 10) + 150_000 + 20_000,
        "n": 5,
        "i": 1234 + 100,
        "o": 567 + 10,
    }


async def test_late_settles_and_gateway_audits_write_one_record_each(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    client = await make_client(doc())
    # A settle after the lease ended still charges, and is still one record.
    late = await ok(client, "/v1/authorize", {"agent_id": "a1", "estimated_usd": 0.3,
                                              "lease_ms": 1000})  # fmt: skip
    clock.advance(5000)
    await ok(client, "/v1/authorize", {"agent_id": "a1", "estimated_usd": 0.01})  # reclaims it
    settled = await ok(client, "/v1/settle", {"reservation_id": late["reservation_id"],
                                              "cost_usd": 0.2})  # fmt: skip
    assert settled["lease_expired"] and settled["cost_usd"] == 0.2
    assert redis_client.xlen(USAGE) == 1

    # The gateway's pre-check + audit: the audit settles once, however often it is sent,
    # with the audit's provider and model and the pre-check's identity, run and step.
    context = {"team_id": "t1", "agent_id": "a9", "run_id": "r1", "step_id": "s1",
               "provider": "openai", "model": "gpt-4o"}  # fmt: skip
    pre = await ok(client, "/api/policy/pre-check", {"context": context})
    audit = {"context_id": pre["context_id"], "provider": "bedrock", "model": SONNET[1],
             "token_usage": {"prompt_tokens": 300, "completion_tokens": 40,
                             "total_tokens": 340}, "latency_ms": 77}  # fmt: skip
    for _ in range(3):
        assert (await ok(client, "/api/audit/llm-call", audit))["success"]
    assert redis_client.xlen(USAGE) == 2
    newest = (await all_records(client))[0]
    assert newest == {
        **newest,
        "kind": "settle",
        "request_id": pre["context_id"],
        "provider": "bedrock",
        "model": SONNET[1],
        "team_id": "t1",
        "agent_id": "a9",
        "run_id": "r1",
        "step_id": "s1",
        "tokens_in": 300,
        "tokens_out": 40,
        "cost_usd": token_cost(SONNET, 300, 40) / 1e6,
        "latency_ms": 77,
    }
    assert agg_micro(redis_client)["n"] == 2


# ---- 2. concurrency ------------------------------------------------------------------------


async def test_concurrent_charges_are_counted_exactly(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(doc())
    n = 200

    async def pair(i: int) -> tuple[int, int, int]:
        """One authorize + settle; every tenth settle is sent twice at once."""
        if i % 2:
            auth = {"agent_id": f"a{i % 7}", "estimated_usd": 0.01}
            micro = 1_000 + 37 * i
            settle: dict[str, Any] = {"cost_usd": micro / 1e6}
            tin = tout = 0
        else:
            tin, tout = 100 + i, 50 + 3 * i
            auth = {"agent_id": f"a{i % 7}", "provider": "openai", "model": "gpt-4o",
                    "estimated_tokens_in": 500, "estimated_tokens_out": 500}  # fmt: skip
            settle = {"tokens_in": tin, "tokens_out": tout}
            micro = token_cost(GPT, tin, tout)
        held = await ok(client, "/v1/authorize", auth)
        assert held["allowed"], held
        body = {"reservation_id": held["reservation_id"], **settle}
        if i % 10 == 0:
            results = await asyncio.gather(
                ok(client, "/v1/settle", body), ok(client, "/v1/settle", body)
            )
            assert sorted(r["replayed"] for r in results) == [False, True]
            assert {r["cost_usd"] for r in results} == {micro / 1e6}
        else:
            assert (await ok(client, "/v1/settle", body))["cost_usd"] == micro / 1e6
        return micro, tin, tout

    charges = await asyncio.gather(*(pair(i) for i in range(n)))
    cost = sum(c for c, _, _ in charges)
    tokens_in = sum(t for _, t, _ in charges)
    tokens_out = sum(t for _, _, t in charges)

    assert redis_client.xlen(USAGE) == n
    assert agg_micro(redis_client) == {"c": cost, "n": n, "i": tokens_in, "o": tokens_out}
    summary = await get(client, "/api/v1/usage?period=daily")
    assert summary == {
        "total_cost_usd": cost / 1e6,
        "total_requests": n,
        "total_tokens_in": tokens_in,
        "total_tokens_out": tokens_out,
        "average_cost_per_request": (cost // n) / 1e6,
        "period": "daily",
        "period_start": "2026-03-10T00:00:00Z",
        "period_end": "2026-03-11T00:00:00Z",
    }
    page = await get(client, "/api/v1/usage/records?limit=1")
    assert page["total"] == n
    # The budget counter charged the same exact sum.
    status = await get(client, "/v1/budgets/roomy/status")
    assert status["used_usd"] == cost / 1e6 and status["held_usd"] == 0


# ---- 3. breakdown ------------------------------------------------------------------------------


async def test_breakdown_by_every_dimension_matches_the_charges(
    make_client: ClientFactory,
) -> None:
    client = await make_client(doc())
    charges: list[dict[str, Any]] = [
        {"org_id": "o1", "team_id": "t1", "agent_id": "a1", "workflow_id": "w1",
         "user_id": "u1", "step_id": "plan", "provider": "openai", "model": "gpt-4o",
         "tokens_in": 1000, "tokens_out": 200},
        {"org_id": "o1", "team_id": "t1", "agent_id": "a2", "workflow_id": "w1",
         "user_id": "u2", "step_id": "act", "provider": "bedrock", "model": SONNET[1],
         "tokens_in": 3000, "tokens_out": 900},
        {"org_id": "o2", "team_id": "t2", "agent_id": "a2", "workflow_id": "w2",
         "user_id": "u1", "step_id": "act", "provider": "anthropic", "model": HAIKU[1],
         "tokens_in": 5000, "tokens_out": 100},
        {"org_id": "o2", "team_id": "t2", "agent_id": "a3", "workflow_id": "w2",
         "user_id": "u3", "step_id": "reflect", "cost_usd": 0.123457},
        {"org_id": "o1", "team_id": "t3", "agent_id": "a1", "workflow_id": "w3",
         "user_id": "u2", "step_id": "plan", "provider": "openai", "model": "gpt-4o",
         "tokens_in": 10, "tokens_out": 7777},
        {"org_id": "o1", "agent_id": "a1", "cost_usd": 0.05},  # no team, workflow, user, step
    ]  # fmt: skip
    models = {m[1]: m for m in (GPT, SONNET, HAIKU)}
    # The last two go through authorize + settle (with run and step on the authorize).
    for i, c in enumerate(charges):
        if "cost_usd" in c:
            c["micro"] = round(c["cost_usd"] * 1e6)
        else:
            c["micro"] = token_cost(models[c["model"]], c["tokens_in"], c["tokens_out"])
        body = {k: v for k, v in c.items() if k != "micro"}
        if i < 4:
            await ok(client, "/v1/record", body)
            continue
        amounts: dict[str, Any] = {
            k: body.pop(k) for k in ("tokens_in", "tokens_out", "cost_usd") if k in body
        }
        held = await ok(
            client,
            "/v1/authorize",
            {**body, "estimated_usd": 0.5}
            if "model" not in body
            else {**body, "estimated_tokens_in": 1},
        )
        await ok(client, "/v1/settle", {"reservation_id": held["reservation_id"], **amounts})
    total = sum(c["micro"] for c in charges)

    for group_by, field in [("step", "step_id"), ("workflow", "workflow_id"),
                            ("provider", "provider"), ("model", "model"), ("user", "user_id"),
                            ("team", "team_id"), ("agent", "agent_id"), ("org", "org_id"),
                            ("organization", "org_id")]:  # fmt: skip
        expected: dict[str, dict[str, int]] = {}
        for c in charges:
            g = expected.setdefault(c.get(field, ""), {"c": 0, "n": 0, "i": 0, "o": 0})
            g["c"] += c["micro"]
            g["n"] += 1
            g["i"] += c.get("tokens_in", 0)
            g["o"] += c.get("tokens_out", 0)
        body = await get(client, f"/api/v1/usage/breakdown?group_by={group_by}&period=daily")
        assert body["group_by"] == group_by and body["period"] == "daily"
        assert body["total_cost_usd"] == total / 1e6
        items = body["items"]
        got = {
            it["group_value"]: {
                "c": round(it["cost_usd"] * 1e6),
                "n": it["request_count"],
                "i": it["tokens_in"],
                "o": it["tokens_out"],
            }
            for it in items
        }
        assert got == expected, group_by
        assert [it["cost_usd"] for it in items] == sorted(
            (it["cost_usd"] for it in items), reverse=True
        )
        for it in items:
            assert it["cost_usd"] == expected[it["group_value"]]["c"] / 1e6
            assert it["percentage"] == round(100 * expected[it["group_value"]]["c"] / total, 4)
        assert sum(it["percentage"] for it in items) == pytest.approx(100, abs=0.01)


# ---- 4. and 5. bounds ------------------------------------------------------------------------


async def test_records_are_bounded_by_count_but_aggregates_count_everything(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(doc(usage_max_records=50))
    for i in range(1, 121):
        if i % 3:
            await ok(client, "/v1/record", {"agent_id": "a1", "cost_usd": i / 1e6})
        else:
            held = await ok(client, "/v1/authorize", {"agent_id": "a1", "estimated_usd": 0.001})
            await ok(client, "/v1/settle", {"reservation_id": held["reservation_id"],
                                            "cost_usd": i / 1e6})  # fmt: skip
    assert redis_client.xlen(USAGE) == 50
    page = await get(client, "/api/v1/usage/records?limit=100")
    assert page["total"] == 50
    assert [r["cost_usd"] for r in page["records"]] == [i / 1e6 for i in range(120, 70, -1)]
    assert [r["kind"] for r in page["records"][:3]] == ["settle", "record", "record"]
    tail = await get(client, "/api/v1/usage/records?limit=20&offset=40")
    assert tail["total"] == 50
    assert [r["cost_usd"] for r in tail["records"]] == [i / 1e6 for i in range(80, 70, -1)]

    summary = await get(client, "/api/v1/usage?period=daily")
    assert summary["total_requests"] == 120
    assert summary["total_cost_usd"] == sum(range(1, 121)) / 1e6


async def test_zero_max_records_keeps_aggregates_only(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(doc(usage_max_records=0))
    await ok(client, "/v1/record", {"agent_id": "a1", "cost_usd": 0.25})
    assert not redis_client.exists(USAGE)
    assert await get(client, "/api/v1/usage/records") == {"records": [], "total": 0}
    assert (await get(client, "/api/v1/usage?period=daily"))["total_cost_usd"] == 0.25


def _old_entry(at_ms: int) -> dict[Any, Any]:
    meta = "\x1f".join(["old", "m", "default", "", "", "", "", "", ""])
    return {"k": "r", "m": meta, "q": "", "i": "0", "o": "0", "c": "5", "l": "", "s": "1",
            "at": str(at_ms)}  # fmt: skip


async def test_records_older_than_max_age_are_trimmed_by_their_stream_ids(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(doc(usage_max_age_days=1))
    seconds, micros = redis_client.time()
    redis_ms = seconds * 1000 + micros // 1000
    kept_id = f"{redis_ms - DAY_MS + 3_600_000}-0"  # 23 hours old
    for entry_id in ["1000-0", f"{redis_ms - 2 * DAY_MS}-0", f"{redis_ms - DAY_MS - 60_000}-0",
                     kept_id]:  # fmt: skip
        redis_client.xadd(USAGE, _old_entry(T0_MS), id=entry_id)
    assert redis_client.xlen(USAGE) == 4

    await ok(client, "/v1/record", {"agent_id": "a1", "cost_usd": 0.25})

    ids = stream_ids(redis_client, USAGE)
    assert len(ids) == 2 and ids[0] == kept_id
    page = await get(client, "/api/v1/usage/records")
    assert page["total"] == 2
    assert [r["cost_usd"] for r in page["records"]] == [0.25, 5e-6]
    assert page["records"][1]["provider"] == "old"


# ---- 6. paging and filters -----------------------------------------------------------------


async def test_records_paging_and_filters(make_client: ClientFactory) -> None:
    client = await make_client(doc())
    sent: list[tuple[str, str, int]] = []  # oldest first
    for i in range(30):
        provider, model = [(GPT[0], GPT[1]), (SONNET[0], SONNET[1]), (HAIKU[0], HAIKU[1])][
            0 if i < 12 else (1 if i % 2 else 2)
        ]
        micro = 1000 + i
        await ok(client, "/v1/record", {"agent_id": "a1", "provider": provider, "model": model,
                                        "cost_usd": micro / 1e6})  # fmt: skip
        sent.append((provider, model, micro))
    newest_first = list(reversed(sent))

    async def page(query: str) -> tuple[list[int], int]:
        body = await get(client, f"/api/v1/usage/records?{query}")
        return [round(r["cost_usd"] * 1e6) for r in body["records"]], body["total"]

    # Unfiltered: pages of 7 cover everything once, in order.
    seen: list[int] = []
    for offset in range(0, 35, 7):
        costs, total = await page(f"limit=7&offset={offset}")
        assert total == 30
        assert len(costs) == min(7, max(0, 30 - offset))
        seen += costs
    assert seen == [m for _, _, m in newest_first]
    assert await page("limit=5&offset=30") == ([], 30)
    assert await page("limit=5&offset=1000") == ([], 30)
    assert len((await page(""))[0]) == 30  # default limit 50

    def expect(provider: str | None = None, model: str | None = None) -> list[int]:
        return [
            m
            for p, mod, m in newest_first
            if (provider is None or p == provider) and (model is None or mod == model)
        ]

    bedrock = expect("bedrock")
    assert len(bedrock) == 9 and len(expect("anthropic")) == 9 and len(expect("openai")) == 12
    assert await page("provider=bedrock") == (bedrock, 9)
    assert await page("provider=bedrock&limit=4&offset=4") == (bedrock[4:8], 9)
    assert await page("provider=bedrock&limit=4&offset=8") == (bedrock[8:], 9)
    assert await page("provider=bedrock&limit=4&offset=9") == ([], 9)
    # The model with ':' as sent by the SDK (unencoded) and percent-encoded.
    assert await page(f"model={SONNET[1]}") == (bedrock, 9)
    assert await page("model=" + SONNET[1].replace(":", "%3A")) == (bedrock, 9)
    assert await page(f"provider=bedrock&model={SONNET[1]}&limit=2") == (bedrock[:2], 9)
    assert await page("model=gpt-4o&limit=100") == (expect(model="gpt-4o"), 12)
    assert await page(f"provider=openai&model={SONNET[1]}") == ([], 0)
    assert await page("provider=nobody") == ([], 0)


# ---- 7. aggregates by day ----------------------------------------------------------------------


async def test_summaries_add_up_the_days_of_their_period(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    client = await make_client(doc())
    clock.set(T0_MS - 11 * DAY_MS)  # 2026-02-27T12:00Z: last month
    await ok(client, "/v1/record", {"agent_id": "a1", "cost_usd": 0.1})
    clock.set(T0_MS)  # 2026-03-10
    await ok(client, "/v1/record", {"agent_id": "a1", "cost_usd": 0.2, "provider": "openai",
                                    "model": "gpt-4o"})  # fmt: skip
    await ok(client, "/v1/record", {"agent_id": "a1", "cost_usd": 0.000001})
    clock.advance(DAY_MS)  # 2026-03-11
    await ok(client, "/v1/record", {"agent_id": "a1", "cost_usd": 0.3})
    clock.set(T0_MS + 2 * DAY_MS - 12 * 3_600_000 - 1)  # 2026-03-11T23:59:59.999Z
    await ok(client, "/v1/record", {"agent_id": "a1", "provider": "openai", "model": "gpt-4o",
                                    "tokens_in": 4000, "tokens_out": 1000})  # fmt: skip
    last_of_11th = token_cost(GPT, 4000, 1000)
    clock.advance(1)  # 2026-03-12T00:00:00Z
    await ok(client, "/v1/record", {"agent_id": "a1", "cost_usd": 0.4})

    assert sorted(redis_client.scan_iter(match="bs:{default}:agg:*")) == [
        f"bs:{{default}}:agg:{day}" for day in ("20260227", "20260310", "20260311", "20260312")
    ]
    daily = await get(client, "/api/v1/usage?period=daily")
    assert (daily["total_cost_usd"], daily["total_requests"]) == (0.4, 1)
    assert (daily["period_start"], daily["period_end"]) == (
        "2026-03-12T00:00:00Z",
        "2026-03-13T00:00:00Z",
    )
    march = 200_000 + 1 + 300_000 + last_of_11th + 400_000
    monthly = await get(client, "/api/v1/usage?period=monthly")
    assert monthly == {
        "total_cost_usd": march / 1e6,
        "total_requests": 5,
        "total_tokens_in": 4000,
        "total_tokens_out": 1000,
        "average_cost_per_request": (march // 5) / 1e6,
        "period": "monthly",
        "period_start": "2026-03-01T00:00:00Z",
        "period_end": "2026-04-01T00:00:00Z",
    }
    assert await get(client, "/api/v1/usage") == monthly  # monthly is the default
    yearly = await get(client, "/api/v1/usage?period=yearly")
    assert (yearly["total_cost_usd"], yearly["total_requests"]) == ((march + 100_000) / 1e6, 6)
    by_day = await get(client, "/api/v1/usage/breakdown?group_by=provider&period=monthly")
    assert {i["group_value"]: i["request_count"] for i in by_day["items"]} == {"": 3, "openai": 2}

    # One day later still: the daily summary is empty, the month unchanged.
    clock.advance(DAY_MS)
    empty = await get(client, "/api/v1/usage?period=daily")
    assert (
        empty["total_cost_usd"],
        empty["total_requests"],
        empty["average_cost_per_request"],
    ) == (
        0.0,
        0,
        0.0,
    )
    assert (await get(client, "/api/v1/usage?period=monthly"))["total_requests"] == 5
    assert (await get(client, "/api/v1/usage/breakdown?group_by=step&period=daily"))["items"] == []


# ---- 8. and 9. alerts ------------------------------------------------------------------------


CAP = {"id": "cap", "name": "Daily cap", "scope": "organization", "limit_usd": 1.0,
       "period": "daily", "on_exceed": "block", "alert_thresholds": [50, 80, 100]}  # fmt: skip


async def alerts_of(client: TestClient[Any, Any], budget_id: str) -> list[dict[str, Any]]:
    body = await get(client, f"/api/v1/budgets/{budget_id}/alerts")
    assert body["count"] == len(body["alerts"])
    alerts: list[dict[str, Any]] = body["alerts"]
    return alerts


def check_alert(alert: dict[str, Any], budget_id: str, cid: str, threshold: int,
                spent_micro: int, limit_micro: int) -> None:  # fmt: skip
    assert alert["id"] == f"default/{cid}/{threshold}"
    assert alert["budget_id"] == budget_id
    assert alert["alert_type"] == "threshold_reached"
    assert isinstance(alert["threshold"], int) and alert["threshold"] == threshold
    assert alert["percentage_reached"] == round(spent_micro * 100 / limit_micro, 2)
    assert alert["amount_usd"] == spent_micro / 1e6
    assert alert["limit_usd"] == limit_micro / 1e6
    assert alert["acknowledged"] is False


@pytest.mark.slow
async def test_alerts_once_each_under_concurrent_records_on_two_replicas(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    write_config: Callable[..., Path],
) -> None:
    # Monthly: these processes run on the system clock, and a window boundary during the
    # test is a month (not a day) away.
    budget = {**CAP, "period": "monthly"}
    path = write_config({"budgets": [budget]})
    with sidecars(redis_server.url, str(path), 2) as procs:
        async with aiohttp.ClientSession() as http:

            async def record(i: int) -> None:
                url = procs[i % 2].url + "/v1/record"
                async with http.post(url, json={"agent_id": f"a{i}", "cost_usd": 0.01}) as r:
                    assert r.status == 200, await r.text()

            async def alerts(i: int) -> list[dict[str, Any]]:
                async with http.get(procs[i].url + "/api/v1/budgets/cap/alerts") as r:
                    assert r.status == 200, await r.text()
                    body: dict[str, Any] = await r.json()
                    assert body["count"] == len(body["alerts"])
                    found: list[dict[str, Any]] = body["alerts"]
                    return found

            await asyncio.gather(*(record(i) for i in range(100)))
            assert redis_client.xlen(ALERTS) == 3
            first = await alerts(0)
            assert [a["threshold"] for a in first] == [100, 80, 50]  # newest first
            tenant, _, cid = first[0]["id"].rsplit("/", 1)[0].partition("/")
            assert tenant == "default" and cid.startswith("cap/default/m")
            for alert, t in zip(first, (100, 80, 50), strict=True):
                # Each $0.01 runs alone in Redis: the one that crosses lands on it exactly.
                check_alert(alert, "cap", cid, t, t * 10_000, 1_000_000)
                assert alert["entity"] == "default" and alert["tenant_id"] == "default"
                assert alert["message"] == f"Budget 'Daily cap' {t}% reached (default)"
            assert await alerts(1) == first  # the same ids from the other replica

            # More spend in the same window: no alert.
            await asyncio.gather(*(record(i) for i in range(20)))
            assert redis_client.xlen(ALERTS) == 3
            assert await alerts(1) == first


async def test_alerts_come_from_settled_spend_once_per_window(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    client = await make_client({"budgets": [CAP]})
    cid = keys.counter_id("cap", "default", "d20260310")

    # Holds alone never alert: one released, one left held, then a hold that expires.
    big = await ok(client, "/v1/authorize", {"estimated_usd": 0.95})
    await ok(client, "/v1/release", {"reservation_id": big["reservation_id"]})
    expiring = await ok(client, "/v1/authorize", {"estimated_usd": 0.9, "lease_ms": 1000})
    assert expiring["allowed"]
    assert (await ok(client, "/v1/check", {"estimated_usd": 0.01}))["budgets"][0][
        "percentage"
    ] == 90.0
    clock.advance(2000)
    assert await alerts_of(client, "cap") == []

    # A settle of $0.60 crosses 50%.
    held = await ok(client, "/v1/authorize", {"estimated_usd": 0.6})
    assert held["allowed"], held
    assert await alerts_of(client, "cap") == []
    await ok(client, "/v1/settle", {"reservation_id": held["reservation_id"], "cost_usd": 0.6})
    (fifty,) = await alerts_of(client, "cap")
    check_alert(fifty, "cap", cid, 50, 600_000, 1_000_000)
    assert fifty["created_at"] == "2026-03-10T12:00:02Z"
    # A replayed settle alerts nothing new.
    await ok(client, "/v1/settle", {"reservation_id": held["reservation_id"], "cost_usd": 0.6})
    assert len(await alerts_of(client, "cap")) == 1

    # A record crosses 80%, the next 100% (on a block budget a record still charges).
    await ok(client, "/v1/record", {"cost_usd": 0.25})
    await ok(client, "/v1/record", {"cost_usd": 0.2})
    await ok(client, "/v1/record", {"cost_usd": 0.5})
    hundred, eighty, again_fifty = await alerts_of(client, "cap")
    assert again_fifty == fifty
    check_alert(eighty, "cap", cid, 80, 850_000, 1_000_000)
    check_alert(hundred, "cap", cid, 100, 1_050_000, 1_000_000)
    assert redis_client.xlen(ALERTS) == 3

    # The next day's window alerts again; one settle crossing two thresholds alerts both.
    clock.advance(DAY_MS)
    next_cid = keys.counter_id("cap", "default", "d20260311")
    held = await ok(client, "/v1/authorize", {"estimated_usd": 0.1})
    await ok(client, "/v1/settle", {"reservation_id": held["reservation_id"], "cost_usd": 0.9})
    alerts = await alerts_of(client, "cap")
    assert len(alerts) == 5
    newest = {a["threshold"]: a for a in alerts[:2]}
    check_alert(newest[50], "cap", next_cid, 50, 900_000, 1_000_000)
    check_alert(newest[80], "cap", next_cid, 80, 900_000, 1_000_000)
    assert alerts[2:] == [hundred, eighty, fifty]
    assert len({a["id"] for a in alerts}) == 5


async def test_concurrent_records_in_process_alert_each_threshold_once(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    first = await make_client({"budgets": [CAP]})
    second = await make_client({"budgets": [CAP]})
    await asyncio.gather(
        *(ok((first, second)[i % 2], "/v1/record", {"cost_usd": 0.01}) for i in range(150))
    )
    alerts = await alerts_of(first, "cap")
    assert [a["threshold"] for a in alerts] == [100, 80, 50]
    assert redis_client.xlen(ALERTS) == 3
    assert await alerts_of(second, "cap") == alerts


async def test_per_entity_budgets_alert_per_entity(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    each_team = {"id": "each-team", "name": "Each team", "scope": "team", "limit_usd": 1.0,
                 "period": "daily", "alert_thresholds": [50, 80]}  # fmt: skip
    client = await make_client({"budgets": [each_team, CAP]})
    await ok(client, "/v1/record", {"team_id": "t1", "cost_usd": 0.5})
    await ok(client, "/v1/record", {"team_id": "t2", "cost_usd": 0.3})
    await ok(client, "/v1/record", {"team_id": "t2", "cost_usd": 0.3})
    await ok(client, "/v1/record", {"team_id": "t1", "cost_usd": 0.1})
    await ok(client, "/v1/record", {"team_id": "t3", "cost_usd": 0.49})

    alerts = await alerts_of(client, "each-team")
    assert [(a["entity"], a["threshold"]) for a in alerts] == [("t2", 50), ("t1", 50)]
    check_alert(alerts[0], "each-team", keys.counter_id("each-team", "t2", "d20260310"), 50,
                600_000, 1_000_000)  # fmt: skip
    check_alert(alerts[1], "each-team", keys.counter_id("each-team", "t1", "d20260310"), 50,
                500_000, 1_000_000)  # fmt: skip
    assert alerts[0]["message"] == "Budget 'Each team' 50% reached (t2)"
    # The org cap saw all of it: $1.69 in all crossed each of its thresholds once.
    assert [a["threshold"] for a in await alerts_of(client, "cap")] == [100, 80, 50]
    await ok(client, "/v1/record", {"team_id": "t1", "cost_usd": 0.3})
    assert [(a["entity"], a["threshold"]) for a in await alerts_of(client, "each-team")] == [
        ("t1", 80),
        ("t2", 50),
        ("t1", 50),
    ]
    assert redis_client.xlen(ALERTS) == 6
