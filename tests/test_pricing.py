"""Prices out of the box (issue #17): the bundled genai-prices catalogue prices the major
providers' current models with no `pricing` in the config; config and API prices override
it; model names resolve through provider prefixes, dated snapshots and case; the pricing
route says where each price came from; a dollar estimate needs no price at all."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import genai_prices
import pytest
import redis

from sidecar.model import Price
from sidecar.pricing import CATALOGUE, Prices, catalogue, matches
from tests.conftest import ClientFactory
from tests.harness import RedisServer, SidecarProcess, missing

os.environ["AXONFLOW_TELEMETRY"] = "off"

BUDGET = {"id": "org", "name": "Org", "scope": "organization", "limit_usd": 10.0,
          "period": "monthly"}  # fmt: skip
# No pricing section; a floor of one micro-USD so that the estimates compared here are the
# catalogue's own, not raised to the default $0.01.
NO_PRICING: dict[str, Any] = {"budgets": [BUDGET], "settings": {"min_estimate_usd": 0.000001}}

# One current model per major provider, as a client names it.
MAJOR = [
    ("openai", "gpt-4o"),
    ("openai", "gpt-4o-mini"),
    ("openai", "gpt-4.1"),
    ("openai", "o3-mini"),
    ("anthropic", "claude-sonnet-4-5"),
    ("anthropic", "claude-3-5-haiku-latest"),
    ("google", "gemini-2.5-pro"),
    ("google", "gemini-2.5-flash"),
    ("mistral", "mistral-large-latest"),
    ("mistral", "mistral-small-latest"),
    ("deepseek", "deepseek-chat"),
    ("x-ai", "grok-4"),
    ("cohere", "command-r-plus"),
]


def _reference_usd(provider: str, model: str, tokens_in: int, tokens_out: int) -> Decimal:
    """What genai-prices itself says such a call costs (its own lookup, not ours), at noon
    UTC today: DeepSeek's peak hours, the price the catalogue keeps (it errs high)."""
    usage = genai_prices.Usage(input_tokens=tokens_in, output_tokens=tokens_out)
    noon = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    return genai_prices.calc_price(
        usage, model, provider_id=provider, genai_request_timestamp=noon
    ).total_price


def _micro_up(usd: Decimal) -> float:
    return math.ceil(usd * 1_000_000) / 1_000_000


# ---- the catalogue ------------------------------------------------------------------------


def test_the_catalogue_names_its_version_and_date() -> None:
    source = catalogue().source
    assert source.name == CATALOGUE
    assert source.version == genai_prices.__version__
    assert source.date is not None and len(source.date) == 10 and source.date[4] == "-"
    assert len(catalogue().prices) > 1000


@pytest.mark.parametrize(("provider", "model"), MAJOR)
def test_major_models_are_priced_as_genai_prices_prices_them(provider: str, model: str) -> None:
    prices = Prices.of([], (), catalogue())
    found = prices.find(provider, model)
    assert found is not None, (provider, model)
    price, source = found
    assert source.name == CATALOGUE
    assert price.input_pico > 0 and price.output_pico > 0
    # 10k tokens each way (under every long-prompt tier): our integer prices give
    # genai-prices' own figure exactly.
    ours = Decimal(price.input_pico + price.output_pico) * 10_000 / 10**12
    assert ours == _reference_usd(provider, model, 10_000, 10_000)


@pytest.mark.parametrize(
    ("provider", "model", "expect"),
    [
        (None, "openai/gpt-4o", ("openai", "gpt-4o")),
        ("openai", "openai/gpt-4o", ("openai", "gpt-4o")),  # LiteLLM's double naming
        (None, "anthropic/claude-sonnet-4-5", ("anthropic", "claude-sonnet-4-5")),
        (None, "GPT-4o", ("openai", "gpt-4o")),
        ("OpenAI", "GPT-4o-Mini", ("openai", "gpt-4o-mini")),
        (None, "gpt-4o-2024-08-06", ("openai", "gpt-4o")),
        ("openai", "gpt-4.1-2025-04-14", ("openai", "gpt-4.1")),
        ("anthropic", "claude-3-5-sonnet-20241022", ("anthropic", "claude-3-5-sonnet")),
        ("vertex_ai", "gemini-2.5-flash", ("google", "gemini-2.5-flash")),
        ("azure", "gpt-4o", ("openai", "gpt-4o")),  # Azure resells OpenAI's at its price
        (None, "gemini-2.5-pro", ("google", "gemini-2.5-pro")),
    ],
)
def test_names_resolve_to_the_catalogue_price(
    provider: str | None, model: str, expect: tuple[str, str]
) -> None:
    found = Prices.of([], (), catalogue()).find(provider, model)
    assert found is not None
    assert (found[0].provider, found[0].model) == expect


@pytest.mark.parametrize(
    ("provider", "model"),
    [
        ("acme", "gpt-4o"),  # a provider the catalogue does not know sells nothing
        (None, "mystery-1"),
        ("openai", "gpt-9-unknown"),
        (None, "openai/mystery-1"),
    ],
)
def test_unknown_names_stay_unpriced(provider: str | None, model: str) -> None:
    assert Prices.of([], (), catalogue()).find(provider, model) is None


def test_config_and_api_prices_override_the_catalogue_and_resolve_the_same_way() -> None:
    own = [
        Price("openai", "gpt-4o", 1_000, 2_000),  # the file's
        Price("acme", "acme-1", 3_000, 4_000),  # the API's
    ]
    prices = Prices.of(own, [own[1]], catalogue())
    for provider, model in [
        ("openai", "gpt-4o"),
        (None, "gpt-4o"),
        (None, "GPT-4o"),
        (None, "openai/gpt-4o"),
        ("openai", "gpt-4o-2024-08-06"),  # the catalogue prices this snapshot: config wins
    ]:
        found = prices.find(provider, model)
        assert found is not None and found[0] is own[0], (provider, model)
        assert found[1].name == "config"
    # A dated name finds its family only because the family alone is priced.
    for provider, model in [("acme", "acme-1-2026-01-31"), (None, "ACME-1"), (None, "acme/acme-1")]:
        found = prices.find(provider, model)
        assert found is not None and found[0] is own[1] and found[1].name == "api"
    # The listing has each price once: the file's gpt-4o, not also the catalogue's.
    listed = [(p.provider, p.model) for p, _ in prices.entries()]
    assert listed[:2] == [("openai", "gpt-4o"), ("acme", "acme-1")]
    assert len(listed) == len(set(listed))
    assert ("openai", "gpt-4o-mini") in listed


def test_decisions_never_call_into_the_library(monkeypatch: pytest.MonkeyPatch) -> None:
    """The catalogue is read once; a lookup (hit or miss, known or unknown provider) runs
    only our dict lookups and matches(), not genai-prices code."""
    cat = catalogue()
    from genai_prices import data_snapshot, types

    def boom(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("genai-prices called on the hot path")

    for name in dir(types):
        cls = getattr(types, name)
        if isinstance(cls, type) and hasattr(cls, "is_match"):
            monkeypatch.setattr(cls, "is_match", boom)
    monkeypatch.setattr(data_snapshot, "get_snapshot", boom)
    monkeypatch.setattr(types.Provider, "find_model", boom)
    prices = Prices.of([], (), cat)
    assert prices.find("vertex_ai_beta", "gemini-2.5-pro") is not None
    assert prices.find("my-gateway", "gpt-4o") is None
    assert prices.find(None, "claude-sonnet-4-5-20250929") is not None


def test_matches_reads_clauses_as_genai_prices_does() -> None:
    from genai_prices.data import providers

    names = ["vertex_ai", "google-vertex", "bedrock", "amazon", "xai", "together_ai",
             "huggingface-groq", "mistralai", "OpenAI", "azure", "random"]  # fmt: skip
    for p in providers:
        for rule in (p.provider_match, p.model_match):
            if rule is None:
                continue
            for name in [*names, "gpt-4o", "claude-x", "gemini-2", "grok-4", "o3", "command-r"]:
                assert matches(rule, name) == rule.is_match(name), (p.id, rule, name)


# ---- through the API ------------------------------------------------------------------------


async def test_a_bare_config_prices_a_known_model_by_tokens(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(NO_PRICING)
    body = {"model": "openai/gpt-4o-2024-08-06", "estimated_tokens_in": 1234,
            "estimated_tokens_out": 567}  # fmt: skip
    r = await client.post("/v1/authorize", json=body)
    assert r.status == 200, await r.text()
    decision = await r.json()
    assert decision["allowed"] is True
    expected = _micro_up(_reference_usd("openai", "gpt-4o", 1234, 567))
    assert decision["estimated_usd"] == expected
    # Settled by tokens at the same price, as genai-prices computes the call.
    r = await client.post(
        "/v1/settle",
        json={"reservation_id": decision["reservation_id"], "tokens_in": 2000, "tokens_out": 100},
    )
    assert r.status == 200, await r.text()
    settled = await r.json()
    assert settled["cost_usd"] == _micro_up(_reference_usd("openai", "gpt-4o", 2000, 100))


async def test_a_dollar_estimate_needs_no_price(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(NO_PRICING)
    body = {"provider": "acme", "model": "in-house-7b", "estimated_usd": 0.25}
    for path in ("/v1/check", "/v1/authorize"):
        r = await client.post(path, json=body)
        assert r.status == 200, (path, await r.text())
        assert (await r.json())["allowed"] is True
    rid = (await r.json())["reservation_id"]
    status = await (await client.get("/v1/budgets/org/status")).json()
    assert status["held_usd"] == 0.25
    # With no price, tokens cannot be priced: the hold is charged (never $0), and says so.
    r = await client.post("/v1/settle", json={"reservation_id": rid, "tokens_in": 10})
    settled = await r.json()
    assert r.status == 200 and (settled["cost_usd"], settled["priced_by"]) == (0.25, "estimate")
    # A cost on another hold of it is charged as given.
    r = await client.post("/v1/authorize", json=body)
    rid = (await r.json())["reservation_id"]
    r = await client.post("/v1/settle", json={"reservation_id": rid, "cost_usd": 0.2})
    assert r.status == 200 and (await r.json())["cost_usd"] == 0.2
    # Without any estimate in dollars the unpriced model is still refused.
    r = await client.post(
        "/v1/authorize", json={"provider": "acme", "model": "in-house-7b", "estimated_tokens_in": 9}
    )
    assert r.status == 400 and (await r.json())["field"] == "model"


async def test_ext_authz_holds_the_proxy_estimate_for_an_unpriced_model(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client({**NO_PRICING, "proxy": {"default_estimate_usd": 0.07}})
    headers = {"x-provider": "acme", "x-model": "in-house-7b"}
    r = await client.get("/ext_authz/", headers=headers)
    assert r.status == 200, await r.text()
    status = await (await client.get("/v1/budgets/org/status")).json()
    assert status["held_usd"] == 0.07


async def test_the_pricing_route_says_where_each_price_came_from(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    doc = {**NO_PRICING, "pricing": [
        {"provider": "openai", "model": "gpt-4o", "input_per_1k": 0.004, "output_per_1k": 0.02},
    ]}  # fmt: skip
    client = await make_client(doc)
    r = await client.get("/api/v1/pricing?provider=openai&model=gpt-4o-2024-08-06")
    assert await r.json() == {
        "provider": "openai", "model": "gpt-4o",
        "pricing": {"input_per_1k": 0.004, "output_per_1k": 0.02},
        "source": "config", "source_version": None, "source_date": None,
    }  # fmt: skip
    r = await client.get("/api/v1/pricing?provider=openai&model=openai/GPT-4o-mini")
    mini = await r.json()
    assert (mini["model"], mini["source"]) == ("gpt-4o-mini", "genai-prices")
    assert mini["source_version"] == genai_prices.__version__
    assert mini["source_date"] == catalogue().source.date
    listed = (await (await client.get("/api/v1/pricing?source=config")).json())["pricing"]
    assert [(p["provider"], p["model"]) for p in listed] == [("openai", "gpt-4o")]
    google = (await (await client.get("/api/v1/pricing?provider=gemini")).json())["pricing"]
    assert google and {p["provider"] for p in google} == {"google"}


# ---- with the real AxonFlow SDK --------------------------------------------------------------


@pytest.fixture
def bare_sidecar(
    redis_server: RedisServer, redis_client: Any, write_config: Callable[[dict[str, Any]], Path]
) -> Iterator[SidecarProcess]:
    proc = SidecarProcess(redis_server.url, str(write_config(NO_PRICING))).start()
    try:
        yield proc
    finally:
        proc.cleanup()


def test_the_sdk_reads_catalogue_prices_with_their_source(bare_sidecar: SidecarProcess) -> None:
    try:
        from axonflow import AxonFlow
    except ImportError:  # pragma: no cover - the dev extra installs it
        missing("the axonflow SDK (pip install -e '.[dev]')")
    with AxonFlow.sync(endpoint=bare_sidecar.url) as client:
        one = client.get_pricing(provider="anthropic", model="claude-sonnet-4-5")
        assert [(p.provider, p.model) for p in one.pricing] == [("anthropic", "claude-sonnet-4-5")]
        reference = _reference_usd("anthropic", "claude-sonnet-4-5", 1000, 1000)
        got = one.pricing[0].pricing
        assert Decimal(str(got.input_per_1k)) + Decimal(str(got.output_per_1k)) == reference
        everything = client.get_pricing()
        assert len(everything.pricing) == len(catalogue().prices)
