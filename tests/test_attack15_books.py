"""The books agree: after a seeded random mix of authorize, settle (below, at and above the
estimate, by tokens: zero and huge, by cost), release, replayed settles, settles of unknown
ids, records, and leases ending with on_expiry charge or release, every budget's settled
counter equals the sum of the usage records it covers, the daily aggregates (usage API
summary and breakdown) say the same, and the Prometheus spend and token counters agree with
the ledger per provider and model, to the micro-USD.

The app runs in-process over the session's real redis-server with a FakeClock and its
Metrics (as tests/test_metrics.py does)."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from sidecar.api.app import create_app
from sidecar.clock import FakeClock
from sidecar.metrics import Metrics
from sidecar.store import RedisStore
from tests.conftest import make_config
from tests.harness import RedisServer

CTR = "bs:{default}:ctr"
USAGE = "bs:{default}:usage"
SEED = 15_150_015
N_OPS = 400

PRICES = [
    ("openai", "gpt-4o", 0.0025, 0.01),
    ("anthropic", "claude-x", 0.000137, 0.0033333),
]
DOC: dict[str, Any] = {
    "budgets": [
        # Every charge lands on this one (one org, a warn budget that never denies): its
        # counter is the whole of the books.
        {"id": "all", "name": "All", "scope": "organization", "limit_usd": 1_000_000.0,
         "period": "monthly", "on_exceed": "warn"},
        {"id": "team", "name": "Team", "scope": "team", "limit_usd": 3.0, "period": "monthly"},
        {"id": "user", "name": "User", "scope": "user", "limit_usd": 0.8, "period": "daily"},
    ],
    "pricing": [
        {"provider": p, "model": m, "input_per_1k": i, "output_per_1k": o}
        for p, m, i, o in PRICES
    ],
    "settings": {"min_estimate_usd": 0.000001, "keep_finished_ms": 86_400_000},
}  # fmt: skip

MakeApp = Callable[..., Any]


@pytest.fixture
async def metered(
    redis_server: RedisServer, redis_client: redis.Redis, clock: FakeClock
) -> AsyncIterator[MakeApp]:
    clients: list[TestClient[Any, Any]] = []

    async def make(doc: dict[str, Any]) -> tuple[TestClient[Any, Any], Metrics]:
        metrics = Metrics(clock=clock)
        store = metrics.wrap(RedisStore.from_url(redis_server.url, timeout_ms=60_000))
        app = create_app(make_config(doc), store, clock=clock, events=metrics)
        client = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return client, metrics

    yield make
    for c in clients:
        await c.close()


def micro(usd: float) -> int:
    return round(usd * 1_000_000)


async def scrape_spend(
    client: Any,
) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str, str], float]]:
    r = await client.get("/metrics")
    assert r.status == 200
    cost: dict[tuple[str, str], float] = {}
    tokens: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(await r.text()):
        for s in family.samples:
            if s.name == "budget_sidecar_llm_cost_usd_total":
                cost[(s.labels["provider"], s.labels["model"])] = s.value
            elif s.name == "budget_sidecar_llm_tokens_total":
                key = (s.labels["provider"], s.labels["model"], s.labels["type"])
                tokens[key] = s.value
    return cost, tokens


async def all_records(client: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while True:
        r = await client.get(f"/api/v1/usage/records?limit=100&offset={len(out)}")
        assert r.status == 200
        body = await r.json()
        out.extend(body["records"])
        if len(out) >= body["total"]:
            assert len(out) == body["total"]
            return out


def ledger_label(provider: str, model: str) -> tuple[str, str]:
    """The metrics' label pair of a record's provider and model (unpriced: other)."""
    priced = {(p, m) for p, m, _i, _o in PRICES}
    by_model = {m: p for p, m, _i, _o in PRICES}
    if (provider, model) in priced:
        return provider, model
    if not provider and model in by_model:
        return by_model[model], model
    return "other", "other"


class Books:
    """What the test itself knows was charged: the sum of the cost of every charge whose
    answer said so, per (provider, model)."""

    def __init__(self) -> None:
        self.cost: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.count = 0


async def check_books(client: Any, rc: redis.Redis, expected_total: int | None) -> None:
    records = await all_records(client)
    ledger_total = sum(micro(r["cost_usd"]) for r in records)
    raw: dict[str, str] = rc.hgetall(CTR)  # type: ignore[assignment]
    counters = {k: int(v) for k, v in raw.items() if k.startswith("u:")}
    all_used = sum(v for k, v in counters.items() if k.startswith("u:all/"))
    held = {k: int(v) for k, v in raw.items() if k.startswith("h:") and int(v)}
    assert held == {}, f"holds left after every lease ended: {held}"
    # 1. The budget that covers every call spent exactly what the records say.
    assert all_used == ledger_total, (all_used, ledger_total)
    if expected_total is not None:
        assert ledger_total == expected_total
    # Each team and user counter: the records naming that entity (same day/month here).
    per_team: defaultdict[str, int] = defaultdict(int)
    per_user: defaultdict[str, int] = defaultdict(int)
    for r in records:
        if r["team_id"]:
            per_team[r["team_id"]] += micro(r["cost_usd"])
        if r["user_id"]:
            per_user[r["user_id"]] += micro(r["cost_usd"])
    teams = {k.split("/")[1]: v for k, v in counters.items() if k.startswith("u:team/") and v}
    users = {k.split("/")[1]: v for k, v in counters.items() if k.startswith("u:user/") and v}
    assert teams == {k: v for k, v in per_team.items() if v}
    assert users == {k: v for k, v in per_user.items() if v}
    # 2. The usage API's summary and breakdowns (daily aggregates) say the same.
    r = await client.get("/api/v1/usage?period=monthly")
    summary = await r.json()
    assert micro(summary["total_cost_usd"]) == ledger_total
    assert summary["total_requests"] == len(records)
    assert summary["total_tokens_in"] == sum(x["tokens_in"] for x in records)
    assert summary["total_tokens_out"] == sum(x["tokens_out"] for x in records)
    for group in ("model", "user", "team"):
        r = await client.get(f"/api/v1/usage/breakdown?group_by={group}&period=monthly")
        items = (await r.json())["items"]
        got = {i["group_value"]: (micro(i["cost_usd"]), i["request_count"]) for i in items}
        want: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0])
        for x in records:
            value = x[f"{group}_id"] if group != "model" else x["model"]
            want[value or ""][0] += micro(x["cost_usd"])
            want[value or ""][1] += 1
        assert got == {k: tuple(v) for k, v in want.items()}, group
    # 3. Prometheus: cost and tokens per label pair equal the records'.
    cost, tokens = await scrape_spend(client)
    want_cost: defaultdict[tuple[str, str], int] = defaultdict(int)
    want_tokens: defaultdict[tuple[str, str, str], int] = defaultdict(int)
    for x in records:
        label = ledger_label(x["provider"], x["model"])
        want_cost[label] += micro(x["cost_usd"])
        want_tokens[(*label, "input")] += x["tokens_in"]
        want_tokens[(*label, "output")] += x["tokens_out"]
    assert {k: micro(v) for k, v in cost.items() if v} == {k: v for k, v in want_cost.items() if v}
    assert {k: int(v) for k, v in tokens.items() if v} == {
        k: v for k, v in want_tokens.items() if v
    }


async def test_random_mix_keeps_counters_ledger_aggregates_and_metrics_equal(
    metered: MakeApp, redis_client: redis.Redis, clock: FakeClock
) -> None:
    client, _ = await metered(DOC)
    rng = random.Random(SEED)
    held: list[dict[str, Any]] = []  # authorize answers not settled or released yet
    finished: list[str] = []
    seen: dict[str, str] = {}
    charged = 0  # micro-USD the answers said were charged
    for n in range(N_OPS):
        roll = rng.random()
        if roll < 0.4 or not held:
            ident: dict[str, Any] = {"org_id": "acme"}
            if rng.random() < 0.7:
                ident["team_id"] = f"t{rng.randrange(3)}"
            if rng.random() < 0.8:
                ident["user_id"] = f"u{n // 100}{rng.randrange(4)}"
            body: dict[str, Any] = dict(ident)
            pick = rng.random()
            if pick < 0.6:
                p, m, _i, _o = rng.choice(PRICES)
                body["model"] = m
                if rng.random() < 0.5:
                    body["provider"] = p
            elif pick < 0.8:
                body["model"] = "unpriced-model"
                body["provider"] = "someone"
            if "model" in body and body["model"] != "unpriced-model" and rng.random() < 0.5:
                body["estimated_tokens_in"] = rng.randrange(0, 5000)
                body["estimated_tokens_out"] = rng.randrange(0, 2000)
            else:
                body["estimated_usd"] = rng.choice([0.000001, 0.001, 0.01, 0.05, 0.2])
            body["lease_ms"] = rng.choice([1000, 5000, 60_000])
            body["on_expiry"] = rng.choice(["charge", "release"])
            r = await client.post("/v1/authorize", json=body)
            assert r.status == 200, await r.text()
            d = await r.json()
            if d["allowed"]:
                d["_body"] = body
                held.append(d)
        elif roll < 0.75:
            d = held.pop(rng.randrange(len(held)))
            est = micro(d["estimated_usd"])
            how = rng.random()
            settle: dict[str, Any] = {"reservation_id": d["reservation_id"]}
            if how < 0.5:
                settle["cost_usd"] = rng.choice([0, max(est - 1, 0), est, est + 1, est * 7]) / 1e6
            else:
                settle["tokens_in"] = rng.choice([0, 1, 500, 100_000_000])
                settle["tokens_out"] = rng.choice([0, 1, 300, 99_999_999])
            r = await client.post("/v1/settle", json=settle)
            assert r.status == 200, await r.text()
            s = await r.json()
            if s["state"] == "settled" and not s["replayed"]:
                charged += micro(s["cost_usd"])
            seen[d["reservation_id"]] = s["state"]
            finished.append(d["reservation_id"])
        elif roll < 0.85:
            d = held.pop(rng.randrange(len(held)))
            r = await client.post("/v1/release", json={"reservation_id": d["reservation_id"]})
            assert r.status == 200, await r.text()
            s = await r.json()
            seen[d["reservation_id"]] = s["state"]
            finished.append(d["reservation_id"])
        elif roll < 0.9 and finished:
            # A replayed settle or release changes nothing.
            rid = rng.choice(finished)
            path = rng.choice(["/v1/settle", "/v1/release"])
            body = {"reservation_id": rid}
            if path == "/v1/settle":
                body["cost_usd"] = 0.5
            r = await client.post(path, json=body)
            assert r.status == 200, await r.text()
            s = await r.json()
            assert s["replayed"] is True and s["state"] == seen[rid], (s, seen[rid])
        elif roll < 0.93:
            # An id nobody made.
            r = await client.post(
                "/v1/settle", json={"reservation_id": f"{rng.getrandbits(128):032x}", "cost_usd": 1}
            )
            assert r.status == 404, await r.text()
        elif roll < 0.97:
            body = {"org_id": "acme", "cost_usd": rng.choice([0, 0.000001, 0.01, 0.3])}
            if rng.random() < 0.5:
                body["user_id"] = f"u{n // 100}{rng.randrange(4)}"
            key = f"rec-{rng.randrange(20)}"
            if rng.random() < 0.5:
                body["idempotency_key"] = key
            r = await client.post("/v1/record", json=body)
            assert r.status == 200, await r.text()
            rr = await r.json()
            if not rr["replayed"]:
                charged += micro(rr["cost_usd"])
        else:
            # Time passes: some leases end (charged or returned by the next script call).
            clock.advance(rng.choice([500, 2000, 10_000]))
    # Every lease ends; a check returns (or charges) every hold left.
    clock.advance(120_000)
    r = await client.post("/v1/check", json={"org_id": "acme", "estimated_usd": 0.01})
    assert r.status == 200
    expired_charges = [x for x in await all_records(client) if x["kind"] == "expiry"]
    assert expired_charges, "the mix should end some leases with a charge"
    charged += sum(micro(x["cost_usd"]) for x in expired_charges)
    await check_books(client, redis_client, charged)


async def test_a_charge_at_lease_end_is_counted_as_spend(
    metered: MakeApp, redis_client: redis.Redis, clock: FakeClock
) -> None:
    """A hold charged its estimate when its lease ends unsettled (on_expiry charge, what
    proxy routes do) is spend: the cost counters count it, under its model's labels and
    the AxonFlow names too, as the ledger's kind "expiry" record does."""
    client, _ = await metered({**DOC, "settings": {**DOC["settings"], "axonflow_metrics": True}})
    body = {"org_id": "acme", "provider": "openai", "model": "gpt-4o", "estimated_usd": 0.25,
            "lease_ms": 1000, "on_expiry": "charge"}  # fmt: skip
    r = await client.post("/v1/authorize", json=body)
    assert (await r.json())["allowed"] is True
    clock.advance(1000)
    await client.post("/v1/check", json={"org_id": "acme", "estimated_usd": 0.01})
    (rec,) = await all_records(client)
    assert (rec["kind"], micro(rec["cost_usd"])) == ("expiry", 250_000)
    cost, _ = await scrape_spend(client)
    assert micro(cost[("openai", "gpt-4o")]) == 250_000
    text = await (await client.get("/metrics")).text()
    ax = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    key = (("model", "gpt-4o"), ("provider", "openai"))
    assert micro(ax[("axonflow_gateway_llm_cost_usd_total", key)]) == 250_000
    await check_books(client, redis_client, 250_000)


async def test_a_hold_settled_after_its_period_ended_lands_where_readme_says(
    metered: MakeApp, redis_client: redis.Redis, clock: FakeClock
) -> None:
    """Authorized at 23:59:59 on the month's last day, settled after midnight: the budget
    charges the window the hold was taken in (README, Configuration), the usage record is
    created at the settle and counts in the UTC period of its creation (sidecar/ledger.py:
    usage periods are UTC windows of the charge), and the metrics count it once."""
    client, _ = await metered(DOC)
    april_ms = 1_775_001_600_000  # 2026-04-01T00:00:00Z
    clock.advance(april_ms - 1000 - clock.now_ms())
    r = await client.post("/v1/authorize", json={"org_id": "acme", "estimated_usd": 0.5,
                                                 "lease_ms": 60_000})  # fmt: skip
    d = await r.json()
    assert d["allowed"] is True
    clock.advance(2000)
    r = await client.post(
        "/v1/settle", json={"reservation_id": d["reservation_id"], "cost_usd": 0.3}
    )
    assert (await r.json())["state"] == "settled"
    raw: dict[str, str] = redis_client.hgetall(CTR)  # type: ignore[assignment]
    assert int(raw["u:all/acme/m20260301"]) == 300_000
    assert "u:all/acme/m20260401" not in raw and "h:all/acme/m20260301" not in raw
    (rec,) = await all_records(client)
    assert rec["created_at"].startswith("2026-04-01T00:00:01")
    summary = await (await client.get("/api/v1/usage?period=monthly")).json()
    assert summary["period_start"].startswith("2026-04-01")
    assert micro(summary["total_cost_usd"]) == 300_000
    cost, _ = await scrape_spend(client)
    assert sum(micro(v) for v in cost.values()) == 300_000
