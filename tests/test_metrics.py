"""Prometheus metrics: exact figures after known operations, bounded labels, the metered
store, and multiprocess mode adding up across two real sidecar processes."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
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
from tests.harness import RedisServer, SidecarProcess, free_port

DOC: dict[str, Any] = {
    "budgets": [
        {"id": "org-cap", "name": "Org", "scope": "organization", "limit_usd": 4.0,
         "period": "monthly"},
        {"id": "each-user", "name": "Each user", "scope": "user", "limit_usd": 1.0,
         "period": "daily"},
    ],
    "pricing": [
        {"provider": "openai", "model": "gpt-4o", "input_per_1k": 0.0025,
         "output_per_1k": 0.01},
    ],
}  # fmt: skip

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """{(sample name, sorted labels): value} of the budget_sidecar_ series."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("budget_sidecar_"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


MakeApp = Callable[..., Any]


@pytest.fixture
async def metered(
    redis_server: RedisServer, redis_client: redis.Redis, clock: FakeClock
) -> AsyncIterator[MakeApp]:
    """metered(doc, url=None) -> (TestClient, Metrics) of the app with metrics on."""
    clients: list[TestClient[Any, Any]] = []

    async def make(doc: dict[str, Any], url: str | None = None) -> tuple[Any, Metrics]:
        metrics = Metrics(clock=clock)
        store = metrics.wrap(RedisStore.from_url(url or redis_server.url, timeout_ms=2000))
        app = create_app(make_config(doc), store, clock=clock, events=metrics)
        client = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return client, metrics

    yield make
    for c in clients:
        await c.close()


async def scrape(client: Any, path: str = "/metrics") -> Samples:
    r = await client.get(path)
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return samples(await r.text())


async def post(client: Any, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = await client.post(path, json=body)
    assert r.status == 200, await r.text()
    result: dict[str, Any] = await r.json()
    return result


async def test_figures_after_known_operations(metered: MakeApp) -> None:
    client, _ = await metered(DOC)
    # alice: hold 0.25, settle 1000 in + 500 out tokens of gpt-4o = 0.0025 + 0.005 = 0.0075
    a = await post(client, "/v1/authorize", {"user_id": "alice", "provider": "openai",
                                             "model": "gpt-4o", "estimated_usd": 0.25})  # fmt: skip
    await post(client, "/v1/settle", {"reservation_id": a["reservation_id"], "tokens_in": 1000,
                                      "tokens_out": 500})  # fmt: skip
    # a replayed settle changes no figure
    await post(client, "/v1/settle", {"reservation_id": a["reservation_id"], "tokens_in": 1000,
                                      "tokens_out": 500})  # fmt: skip
    # bob: hold 0.5, release it
    b = await post(client, "/v1/authorize", {"user_id": "bob", "estimated_usd": 0.5})
    await post(client, "/v1/release", {"reservation_id": b["reservation_id"]})
    # bob asks for more than his $1 a day: denied by each-user
    denied = await post(client, "/v1/authorize", {"user_id": "bob", "estimated_usd": 1.5})
    assert denied["allowed"] is False
    # record: a cost for an unpriced model is labelled other, not by its name
    await post(client, "/v1/record", {"user_id": "carol", "provider": "acme",
                                      "model": "secret-model", "cost_usd": 0.5})  # fmt: skip
    await post(client, "/v1/check", {"user_id": "carol", "estimated_usd": 0.1})

    found = await scrape(client)
    decisions = "budget_sidecar_decisions_total"
    assert value(found, decisions, operation="authorize", action="allow", outcome="allowed") == 2
    assert value(found, decisions, operation="authorize", action="block", outcome="denied") == 1
    assert value(found, decisions, operation="check", action="allow", outcome="allowed") == 1
    assert value(found, decisions, operation="authorize", action="allow", outcome="degraded") == 0
    events = "budget_sidecar_reservations_total"
    assert value(found, events, event="held") == 2
    assert value(found, events, event="settled") == 1
    assert value(found, events, event="released") == 1
    assert value(found, events, event="expired") == 0
    cost = "budget_sidecar_llm_cost_usd_total"
    assert value(found, cost, provider="openai", model="gpt-4o") == pytest.approx(0.0075, abs=1e-12)
    assert value(found, cost, provider="other", model="other") == 0.5
    tokens = "budget_sidecar_llm_tokens_total"
    assert value(found, tokens, provider="openai", model="gpt-4o", type="input") == 1000
    assert value(found, tokens, provider="openai", model="gpt-4o", type="output") == 500
    # org-cap (4 USD): 0.25 held (0.0625); settled at 0.0075; then 0.5 held by bob
    # (0.5075 committed: 0.126875); released; carol's 0.5 recorded (0.126875 again).
    ratio = "budget_sidecar_budget_used_ratio"
    assert value(found, ratio, budget_id="org-cap") == 0.126875
    # each-user: bob's 0.5 held of 1 is the highest of any user.
    assert value(found, ratio, budget_id="each-user") == 0.5
    durations = "budget_sidecar_decision_duration_seconds_count"
    assert value(found, durations, operation="authorize") == 3
    assert value(found, durations, operation="settle") == 2
    assert value(found, durations, operation="release") == 1
    assert value(found, durations, operation="record") == 1
    assert value(found, durations, operation="check") == 1
    redis_calls = "budget_sidecar_redis_duration_seconds_count"
    assert value(found, redis_calls, script="authorize") == 3
    assert value(found, redis_calls, script="settle") == 2
    # Defined before alerts and reloads exist, so dashboards and rules see a 0.
    assert value(found, "budget_sidecar_alerts_total", result="delivered") == 0
    assert value(found, "budget_sidecar_alerts_total", result="failed") == 0
    assert value(found, "budget_sidecar_config_reloads_total", result="success") == 0
    assert value(found, "budget_sidecar_config_reloads_total", result="failure") == 0

    # /prometheus is the same page: the same series, the same figures, but for the Redis
    # timings of the sidecar's own background work (state checks, sweeps), which may run
    # between the two scrapes.
    def ours(page: Samples) -> Samples:
        driven = {"authorize", "settle", "release", "record", "check"}
        return {k: v for k, v in page.items()
                if not (k[0].startswith("budget_sidecar_redis_duration_seconds")
                        and dict(k[1]).get("script") not in driven)}  # fmt: skip

    again = await scrape(client, "/prometheus")
    assert again.keys() >= found.keys()
    assert ours(again) == ours(found)


async def test_labels_never_name_entities(metered: MakeApp) -> None:
    client, _ = await metered(DOC)
    users = [f"user-{i}" for i in range(40)]
    for user in users:
        await post(client, "/v1/authorize", {"user_id": user, "estimated_usd": 0.01})
    r = await client.get("/metrics")
    text = await r.text()
    assert not any(user in text for user in users)
    found = samples(text)
    ratio_series = [k for k in found if k[0] == "budget_sidecar_budget_used_ratio"]
    assert sorted(ratio_series) == [
        ("budget_sidecar_budget_used_ratio", (("budget_id", "each-user"),)),
        ("budget_sidecar_budget_used_ratio", (("budget_id", "org-cap"),)),
    ]
    assert value(found, "budget_sidecar_reservations_total", event="held") == 40


async def test_used_ratio_starts_over_with_the_period(metered: MakeApp, clock: FakeClock) -> None:
    client, _ = await metered(DOC)
    await post(client, "/v1/record", {"user_id": "dan", "cost_usd": 0.75})
    assert value(await scrape(client), "budget_sidecar_budget_used_ratio", budget_id="each-user") \
        == 0.75  # fmt: skip
    clock.advance(86_400_000)  # each-user is daily: a new day, nothing spent in it yet
    assert value(await scrape(client), "budget_sidecar_budget_used_ratio", budget_id="each-user") \
        == 0  # fmt: skip
    await post(client, "/v1/record", {"user_id": "dan", "cost_usd": 0.25})
    assert value(await scrape(client), "budget_sidecar_budget_used_ratio", budget_id="each-user") \
        == 0.25  # fmt: skip


async def test_redis_down_counts_errors_and_fail_open(metered: MakeApp) -> None:
    doc = {**DOC, "settings": {"fail_mode": "open", "redis_timeout_ms": 200}}
    # Nothing listens on this port: every call fails as unavailable.
    client, _ = await metered(doc, url=f"redis://127.0.0.1:{free_port()}/0")
    decision = await post(client, "/v1/authorize", {"user_id": "erin", "estimated_usd": 0.1})
    assert decision["degraded"] is True
    r = await client.post("/v1/release", json={"reservation_id": "0" * 32})
    assert r.status == 503
    found = await scrape(client)
    assert value(found, "budget_sidecar_fail_open_total", operation="authorize") == 1
    assert value(found, "budget_sidecar_store_unavailable_total", operation="authorize") == 1
    assert value(found, "budget_sidecar_store_unavailable_total", operation="release") == 1
    errors = "budget_sidecar_redis_errors_total"
    assert value(found, errors, script="authorize", kind="unavailable") == 1
    assert value(
        found, "budget_sidecar_decisions_total",
        operation="authorize", action="allow", outcome="degraded",
    ) == 1  # fmt: skip
    assert value(found, "budget_sidecar_reservations_total", event="held") == 0


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        body: bytes = r.read()
        return body.decode()


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as r:
        result: dict[str, Any] = json.load(r)
        return result


@pytest.mark.slow
def test_two_processes_add_up(
    tmp_path: Path,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    write_config: Callable[[dict[str, Any]], Path],
) -> None:
    """Two sidecar processes sharing one PROMETHEUS_MULTIPROC_DIR: either one's /metrics
    shows the sum of both."""
    mp_dir = tmp_path / "prom"
    mp_dir.mkdir()
    cfg = str(write_config(DOC))
    env = {"PROMETHEUS_MULTIPROC_DIR": str(mp_dir)}
    procs = [SidecarProcess(redis_server.url, cfg, extra_env=env) for _ in range(2)]
    try:
        for p in procs:
            p.start()
        charges = [(procs[0], 1.25), (procs[1], 0.5), (procs[1], 0.25)]
        for proc, usd in charges:
            _post(proc.url + "/v1/record", {"user_id": "fay", "provider": "openai",
                                            "model": "gpt-4o", "cost_usd": usd})  # fmt: skip
        _post(procs[0].url + "/v1/authorize", {"user_id": "gus", "estimated_usd": 0.125})
        for p in procs:
            found = samples(_get(p.url + "/metrics"))
            cost = "budget_sidecar_llm_cost_usd_total"
            assert value(found, cost, provider="openai", model="gpt-4o") == 2.0
            assert value(found, "budget_sidecar_decision_duration_seconds_count",
                         operation="record") == 3  # fmt: skip
            assert value(found, "budget_sidecar_reservations_total", event="held") == 1
            # The ratio is a max over live processes: 2.0 + 0.125 of 4 held by process 0.
            assert value(found, "budget_sidecar_budget_used_ratio", budget_id="org-cap") \
                == 0.53125  # fmt: skip
    finally:
        for p in procs:
            p.cleanup()


async def test_rate_limit_denials_and_shadow_would_denies_are_counted(metered: MakeApp) -> None:
    doc = {
        "rate_limits": [
            {"id": "hard", "scope": "user", "metric": "requests", "limit": 1, "window": "10s"},
            {"id": "trial", "scope": "team", "metric": "requests", "limit": 1, "window": "10s",
             "mode": "shadow"},
        ]
    }  # fmt: skip
    client, _ = await metered(doc)
    for user in ("u1", "u1", "u2"):  # u1's second is denied by "hard"
        await post(client, "/v1/authorize", {"user_id": user, "team_id": "t", "estimated_usd": 0.1})
    found = await scrape(client)
    total = "budget_sidecar_rate_limit_decisions_total"
    assert value(found, total, rate_limit_id="hard", mode="enforce") == 1
    # "trial" would have denied u1's second (not charged) and u2's call (team t used up).
    assert value(found, total, rate_limit_id="trial", mode="shadow") == 2


async def test_every_expired_hold_is_counted_once(metered: MakeApp, clock: FakeClock) -> None:
    client, _ = await metered(DOC)
    call = {"user_id": "dave", "estimated_usd": 0.01, "lease_ms": 1000}
    untouched = [await post(client, "/v1/authorize", call) for _ in range(3)]
    settled_late = await post(client, "/v1/authorize", call)
    assert all(d["allowed"] for d in [*untouched, settled_late])
    clock.advance(1000)
    # The settle finds its own lease ended (counted there); the next check's reclaim
    # returns the three untouched holds (counted there); nothing counts twice.
    s = await post(
        client, "/v1/settle", {"reservation_id": settled_late["reservation_id"], "cost_usd": 0.01}
    )
    assert s["lease_expired"] is True
    await post(client, "/v1/check", {"user_id": "dave"})
    await post(client, "/v1/check", {"user_id": "dave"})
    found = await scrape(client)
    assert value(found, "budget_sidecar_reservations_total", event="expired") == 4


# ---- the AxonFlow platform's names (settings.axonflow_metrics) -----------------------------

AXONFLOW_DOC: dict[str, Any] = {
    **DOC,
    "pricing": [
        *DOC["pricing"],
        {"provider": "anthropic", "model": "claude-3-haiku", "input_per_1k": 0.00025,
         "output_per_1k": 0.00125},
    ],
    "settings": {"axonflow_metrics": True},
}  # fmt: skip


def axonflow_samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("axonflow_") and not s.name.endswith("_created"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_axonflow_names_are_off_by_default(metered: MakeApp) -> None:
    client, _ = await metered(DOC)
    a = await post(client, "/v1/authorize", {"provider": "openai", "model": "gpt-4o",
                                             "estimated_usd": 0.25})  # fmt: skip
    await post(client, "/v1/settle", {"reservation_id": a["reservation_id"], "tokens_in": 10})
    text = await (await client.get("/metrics")).text()
    assert "axonflow_" not in text
    assert value(samples(text), "budget_sidecar_llm_tokens_total", provider="openai",
                 model="gpt-4o", type="input") == 10  # fmt: skip


async def test_axonflow_names_count_what_the_native_ones_count(metered: MakeApp) -> None:
    client, _ = await metered(AXONFLOW_DOC)
    # Two settles of gpt-4o (one by tokens, one by a cost), an AxonFlow-SDK audit of
    # claude-3-haiku, a record of an unpriced model (labelled other) and a replayed settle.
    a = await post(client, "/v1/authorize", {"user_id": "u1", "provider": "openai",
                                             "model": "gpt-4o", "estimated_usd": 0.25})  # fmt: skip
    await post(client, "/v1/settle", {"reservation_id": a["reservation_id"], "tokens_in": 1000,
                                      "tokens_out": 500})  # fmt: skip
    await post(client, "/v1/settle", {"reservation_id": a["reservation_id"], "tokens_in": 1000,
                                      "tokens_out": 500})  # fmt: skip
    b = await post(client, "/v1/authorize", {"user_id": "u2", "provider": "openai",
                                             "model": "gpt-4o", "estimated_usd": 0.25})  # fmt: skip
    await post(client, "/v1/settle", {"reservation_id": b["reservation_id"], "cost_usd": 0.125})
    pre = await post(
        client,
        "/api/policy/pre-check",
        {
            "user_token": "",
            "client_id": "c",
            "query": "q",
            "data_sources": [],
            "context": {"user_id": "u3", "provider": "anthropic", "model": "claude-3-haiku"},
        },
    )
    await post(client, "/api/audit/llm-call", {
        "context_id": pre["context_id"], "client_id": "c", "response_summary": "",
        "provider": "anthropic", "model": "claude-3-haiku",
        "token_usage": {"prompt_tokens": 2000, "completion_tokens": 400, "total_tokens": 2400},
        "latency_ms": 5, "metadata": {}})  # fmt: skip
    await post(
        client,
        "/v1/record",
        {
            "user_id": "u4",
            "provider": "acme",
            "model": "secret",
            "cost_usd": 0.5,
        },
    )
    # A released hold charges nothing and is no call.
    c = await post(client, "/v1/authorize", {"user_id": "u5", "estimated_usd": 0.1})
    await post(client, "/v1/release", {"reservation_id": c["reservation_id"]})

    text = await (await client.get("/metrics")).text()
    assert "secret" not in text and "acme" not in text  # labels stay bounded by the pricing
    ax = axonflow_samples(text)
    native = samples(text)
    tokens, cost = "axonflow_gateway_llm_tokens_total", "axonflow_gateway_llm_cost_usd_total"
    calls = "axonflow_orchestrator_llm_calls_total"
    assert ax == {
        (tokens, (("model", "gpt-4o"), ("provider", "openai"), ("type", "prompt"))): 1000,
        (tokens, (("model", "gpt-4o"), ("provider", "openai"), ("type", "completion"))): 500,
        (tokens, (("model", "claude-3-haiku"), ("provider", "anthropic"),
                  ("type", "prompt"))): 2000,
        (tokens, (("model", "claude-3-haiku"), ("provider", "anthropic"),
                  ("type", "completion"))): 400,
        (tokens, (("model", "other"), ("provider", "other"), ("type", "prompt"))): 0,
        (tokens, (("model", "other"), ("provider", "other"), ("type", "completion"))): 0,
        (cost, (("model", "gpt-4o"), ("provider", "openai"))): pytest.approx(0.1325),
        (cost, (("model", "claude-3-haiku"), ("provider", "anthropic"))): pytest.approx(0.001),
        (cost, (("model", "other"), ("provider", "other"))): 0.5,
        (calls, (("model", "gpt-4o"), ("provider", "openai"), ("status", "success"))): 2,
        (calls, (("model", "claude-3-haiku"), ("provider", "anthropic"),
                 ("status", "success"))): 1,
        (calls, (("model", "other"), ("provider", "other"), ("status", "success"))): 1,
    }  # fmt: skip
    # The same facts as the native names, which are unchanged.
    for provider, model in (("openai", "gpt-4o"), ("anthropic", "claude-3-haiku"),
                            ("other", "other")):  # fmt: skip
        key = (("model", model), ("provider", provider))
        assert native[("budget_sidecar_llm_cost_usd_total", key)] == ax[(cost, key)]
        for ours, theirs in (("input", "prompt"), ("output", "completion")):
            assert (
                native[("budget_sidecar_llm_tokens_total", (*key, ("type", ours)))]
                == ax[(tokens, (*key, ("type", theirs)))]
            )
    assert value(native, "budget_sidecar_reservations_total", event="settled") == 3
