"""The config file (sidecar/config.py) and the CLI around it: a good file loads exactly, a bad
one is refused with an error naming the file and the JSON path of the field, by the loader,
by `check-config` and by `serve`; and what an unpriced model does through the API."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from sidecar import config as config_mod
from sidecar.config import ConfigError
from sidecar.model import FailMode, OnExceed, Period, Price, Scope, UnpricedModel
from tests.conftest import ClientFactory
from tests.harness import REPO, RedisServer, data_keys, free_port

WriteConfig = Callable[..., Path]

GOOD: dict[str, Any] = {
    "budgets": [
        {
            "id": "org-monthly",
            "name": "Org monthly",
            "scope": "organization",
            "limit_usd": 1000,
            "period": "monthly",
        },
        {
            "id": "team.daily",
            "name": "Team daily",
            "scope": "team",
            "scope_id": "t1",
            "limit_usd": 12.345678,
            "period": "daily",
            "on_exceed": "downgrade",
            "downgrade_to": {"gpt-4o": "gpt-4o-mini", "anthropic.claude-v1:0": "meta/llama-3"},
            "alert_thresholds": [100, 50, 80, 50],
            "timezone": "Europe/Berlin",
            "fail_mode": "open",
        },
        {
            "id": "user_w",
            "name": "Each user",
            "scope": "user",
            "limit_usd": 0,
            "period": "weekly",
            "on_exceed": "warn",
            "enabled": False,
        },
    ],
    "pricing": [
        {"provider": "openai", "model": "gpt-4o", "input_per_1k": 0.0025, "output_per_1k": 0.01},
        {
            "provider": "openai",
            "model": "gpt-4o-mini",
            "input_per_1k": 0.00015,
            "output_per_1k": 0.0006,
        },
    ],
    "settings": {
        "unpriced_model": "fallback",
        "fallback_price": {"input_per_1k": 0.003, "output_per_1k": 0.015},
        "default_org_id": "acme",
        "default_lease_ms": 30_000,
        "fail_mode": "closed",
    },
}

BUDGET: dict[str, Any] = {
    "id": "b1",
    "name": "B1",
    "scope": "team",
    "limit_usd": 10.0,
    "period": "daily",
}
PRICE: dict[str, Any] = {
    "provider": "openai",
    "model": "gpt-4o",
    "input_per_1k": 0.0025,
    "output_per_1k": 0.01,
}


def with_budget(**changes: Any) -> dict[str, Any]:
    return {"budgets": [{**BUDGET, **changes}]}


def without(key: str) -> dict[str, Any]:
    return {"budgets": [{k: v for k, v in BUDGET.items() if k != key}]}


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# ---- a good file --------------------------------------------------------------------------


def test_good_file_loads_exactly(write_config: WriteConfig) -> None:
    path = write_config(GOOD)
    cfg = config_mod.load(path)
    assert cfg.source == str(path)
    org, team, user = cfg.budgets
    assert (org.id, org.scope, org.limit_micro, org.period, org.on_exceed) == (
        "org-monthly",
        Scope.ORGANIZATION,
        1_000_000_000,
        Period.MONTHLY,
        OnExceed.BLOCK,
    )
    assert (org.scope_id, org.timezone, org.alert_thresholds, org.enabled) == (
        None,
        "UTC",
        (50, 80, 100),
        True,
    )
    assert team.limit_micro == 12_345_678
    assert team.scope_id == "t1"
    assert team.on_exceed is OnExceed.DOWNGRADE
    assert team.downgrade_to == {"gpt-4o": "gpt-4o-mini", "anthropic.claude-v1:0": "meta/llama-3"}
    assert team.alert_thresholds == (50, 80, 100)
    assert team.timezone == "Europe/Berlin"
    assert team.fail_mode is FailMode.OPEN
    assert (user.limit_micro, user.period, user.on_exceed, user.enabled) == (
        0,
        Period.WEEKLY,
        OnExceed.WARN,
        False,
    )
    assert cfg.pricing == (
        Price("openai", "gpt-4o", 2_500_000, 10_000_000),
        Price("openai", "gpt-4o-mini", 150_000, 600_000),
    )
    s = cfg.settings
    assert s.unpriced_model is UnpricedModel.FALLBACK
    assert s.fallback_price == Price("*", "*", 3_000_000, 15_000_000)
    assert (s.default_org_id, s.default_lease_ms, s.max_lease_ms, s.fail_mode) == (
        "acme",
        30_000,
        3_600_000,
        FailMode.CLOSED,
    )


def test_empty_file_is_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    cfg = config_mod.load(path)
    assert (cfg.budgets, cfg.pricing) == ((), ())
    assert cfg.settings.unpriced_model is UnpricedModel.REFUSE
    assert cfg.settings.fallback_price is None


# ---- bad files ----------------------------------------------------------------------------

BAD_DOCS: list[tuple[str, Any, str]] = [
    ("limit-string", with_budget(limit_usd="ten"), "$.budgets[0].limit_usd"),
    # A quoted number is a string in YAML; a strict loader does not guess.
    ("limit-quoted-number", with_budget(limit_usd="10"), "$.budgets[0].limit_usd"),
    ("limit-bool", with_budget(limit_usd=True), "$.budgets[0].limit_usd"),
    ("limit-list", with_budget(limit_usd=[10]), "$.budgets[0].limit_usd"),
    ("limit-null", with_budget(limit_usd=None), "$.budgets[0].limit_usd"),
    ("limit-negative", with_budget(limit_usd=-0.01), "$.budgets[0].limit_usd"),
    ("limit-missing", without("limit_usd"), "$.budgets[0].limit_usd"),
    ("unknown-top", {"budgets": [], "budgetz": []}, "$.budgetz"),
    ("unknown-in-budget", with_budget(limit=5), "$.budgets[0].limit"),
    ("unknown-in-price", {"pricing": [{**PRICE, "currency": "EUR"}]}, "$.pricing[0].currency"),
    ("unknown-in-settings", {"settings": {"fail_open": True}}, "$.settings.fail_open"),
    ("bad-scope", with_budget(scope="galaxy"), "$.budgets[0].scope"),
    ("bad-period", with_budget(period="hourly"), "$.budgets[0].period"),
    ("bad-on-exceed", with_budget(on_exceed="explode"), "$.budgets[0].on_exceed"),
    ("downgrade-without-map", with_budget(on_exceed="downgrade"), "$.budgets[0].downgrade_to"),
    (
        "downgrade-empty-map",
        with_budget(on_exceed="downgrade", downgrade_to={}),
        "$.budgets[0].downgrade_to",
    ),
    ("unknown-timezone", with_budget(timezone="Mars/Olympus_Mons"), "$.budgets[0].timezone"),
    ("timezone-path", with_budget(timezone="../../etc/passwd"), "$.budgets[0].timezone"),
    ("timezone-wrong-case", with_budget(timezone="europe/berlin"), "$.budgets[0].timezone"),
    ("budget-id-slash", with_budget(id="a/b"), "$.budgets[0].id"),
    ("duplicate-budget-id", {"budgets": [BUDGET, {**BUDGET, "name": "Again"}]}, "$.budgets[1].id"),
    (
        "duplicate-budget-id-third",
        {"budgets": [BUDGET, {**BUDGET, "id": "b2"}, {**BUDGET, "name": "x"}]},
        "$.budgets[2].id",
    ),
    (
        "duplicate-price",
        {"pricing": [PRICE, {**PRICE, "input_per_1k": 1.0}]},
        "$.pricing[1]",
    ),
    ("negative-price", {"pricing": [{**PRICE, "output_per_1k": -1}]}, "$.pricing[0].output_per_1k"),
    ("top-level-list", [BUDGET], "$"),
    ("top-level-string", "budgets", "$"),
    ("budgets-not-list", {"budgets": BUDGET}, "$.budgets"),
    ("rate-limits-unknown-field",
     {"rate_limits": [{"scope": "agent", "requests_per_minute": 60}]},
     "$.rate_limits[0].requests_per_minute"),
    (
        "fallback-without-price",
        {"settings": {"unpriced_model": "fallback"}},
        "$.settings.fallback_price",
    ),
    ("bad-unpriced-mode", {"settings": {"unpriced_model": "free"}}, "$.settings.unpriced_model"),
]  # fmt: skip


@pytest.mark.parametrize(("doc", "field"), [c[1:] for c in BAD_DOCS], ids=[c[0] for c in BAD_DOCS])
def test_bad_document_names_file_and_field(write_config: WriteConfig, doc: Any, field: str) -> None:
    path = write_config(doc)
    with pytest.raises(ConfigError) as caught:
        config_mod.load(path)
    err = caught.value
    assert err.source == str(path)
    assert err.path == field
    assert str(err).startswith(f"{path}: {field}: ")
    assert err.message != ""


def test_empty_rate_limits_is_accepted(write_config: WriteConfig) -> None:
    cfg = config_mod.load(write_config({"rate_limits": [], "budgets": [BUDGET]}))
    assert [b.id for b in cfg.budgets] == ["b1"]


def test_error_messages_say_what_is_wrong(write_config: WriteConfig) -> None:
    cases: list[tuple[Any, str]] = [
        (with_budget(limit=5), "unknown field `limit`"),
        (with_budget(scope="galaxy"), "'galaxy'"),
        (with_budget(timezone="Mars/Olympus_Mons"), "'Mars/Olympus_Mons'"),
        ({"budgets": [BUDGET, BUDGET]}, "duplicate budget id 'b1'"),
        ({"pricing": [PRICE, PRICE]}, "openai/gpt-4o"),
        ({"settings": {"unpriced_model": "fallback"}}, "fallback_price"),
    ]
    for doc, needle in cases:
        with pytest.raises(ConfigError) as caught:
            config_mod.load(write_config(doc))
        assert needle in caught.value.message


NOT_YAML: list[tuple[str, bytes]] = [
    ("unclosed.yaml", b"budgets: [\n"),
    ("tabs.yaml", b"budgets:\n\t- id: b1\n"),
    ("mapping-in-scalar.yaml", b"a: b: c\n"),
    ("python-tag.yaml", b"budgets: !!python/object:os.system ls\n"),
    # Not text at all: a UTF-16 file with a BOM, as some Windows editors save it.
    ("utf16.yaml", "budgets: []\n".encode("utf-16")),
    ("binary.yaml", bytes(range(256))),
]


@pytest.mark.parametrize(("name", "content"), NOT_YAML, ids=[n for n, _ in NOT_YAML])
def test_not_yaml_names_the_file(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        config_mod.load(path)
    assert caught.value.source == str(path)
    assert caught.value.path == "$"
    assert str(caught.value).startswith(f"{path}: $: ")


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ('budgets:\n  - {id: b, name: "Cap \\ud800 end", scope: team, limit_usd: 1, '
         "period: monthly}\n", "$.budgets[0].name"),
        ('webhooks:\n  - {name: "ops\\udfff", url: "http://127.0.0.1:9/"}\n',
         "$.webhooks[0].name"),
    ],
)  # fmt: skip
def test_a_lone_surrogate_is_refused_naming_its_field(
    tmp_path: Path, yaml_text: str, field: str
) -> None:
    """YAML's \\ud800 escape makes text no UTF-8 can carry: before, a budget so named
    loaded, and every JSON answer and alert naming it failed to encode (attack16)."""
    path = tmp_path / "surrogate.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as caught:
        config_mod.load(path)
    assert (caught.value.source, caught.value.path) == (str(path), field)
    assert "lone surrogate" in str(caught.value)


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        config_mod.load(path)
    assert (caught.value.source, caught.value.path) == (str(path), "$")


def test_loading_does_not_change_the_document() -> None:
    doc = copy.deepcopy(GOOD)
    config_mod.parse(doc, "<doc>")
    assert doc == GOOD


# ---- the CLI ------------------------------------------------------------------------------


def test_check_config_good_file(write_config: WriteConfig) -> None:
    path = write_config(GOOD)
    done = run_cli("check-config", str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok")
    assert str(path) in done.stdout
    assert "3 budgets, 0 rate limits, 2 prices" in done.stdout
    assert done.stderr == ""


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        (with_budget(limit_usd=-1), "$.budgets[0].limit_usd"),
        (with_budget(scope="galaxy"), "$.budgets[0].scope"),
        ({"settings": {"unpriced_model": "fallback"}}, "$.settings.fallback_price"),
        ([1, 2], "$"),
    ],
)
def test_check_config_bad_file(write_config: WriteConfig, doc: Any, field: str) -> None:
    path = write_config(doc)
    done = run_cli("check-config", str(path))
    # The verdict on stdout, like "ok"; exit 1 (2 is argparse's, for a bad command line).
    assert done.returncode == 1
    assert done.stdout.startswith(f"invalid: {path}: {field}: "), done.stdout
    assert "Traceback" not in done.stderr
    assert done.stderr == ""


def test_check_config_not_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("budgets:\n- id: b1\n  name: Caf\u00e9\n".encode("latin-1"))
    done = run_cli("check-config", str(path))
    assert "Traceback" not in done.stderr
    assert done.returncode == 1
    assert f"{path}: $: " in done.stdout


def test_check_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    done = run_cli("check-config", str(path))
    assert done.returncode == 1
    assert done.stdout.startswith(f"invalid: {path}: $: ")


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        (with_budget(limit_usd="ten"), "$.budgets[0].limit_usd"),
        ({"settings": {"unpriced_model": "fallback"}}, "$.settings.fallback_price"),
        ({"budgets": [BUDGET], "rate_limits": [{"rpm": 1}]}, "$.rate_limits"),
        # A Host name, not host:port (the port is never part of the rule).
        (
            {"settings": {"allowed_hosts": ["ok.example", "x.example:8787"]}},
            "$.settings.allowed_hosts[1]",
        ),
    ],
)
def test_serve_refuses_a_bad_config(
    redis_server: RedisServer, redis_client: redis.Redis, write_config: WriteConfig,
    doc: Any, field: str,
) -> None:  # fmt: skip
    path = write_config(doc)
    port = free_port()
    done = run_cli(
        "serve",
        "--config",
        str(path),
        "--redis-url",
        f"redis://127.0.0.1:{redis_server.port}",
        "--port",
        str(port),
        timeout=30,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert str(path) in output
    assert field in output
    assert "Traceback" not in output
    # It refused before touching Redis.
    assert data_keys(redis_client) == []


def test_serve_refuses_a_non_utf8_config(redis_server: RedisServer, tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("budgets: []\n# caf\u00e9\n".encode("latin-1"))
    done = run_cli(
        "serve",
        "--config",
        str(path),
        "--redis-url",
        f"redis://127.0.0.1:{redis_server.port}",
        "--port",
        str(free_port()),
        timeout=30,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "Traceback" not in output
    assert f"{path}: $: " in output


# ---- unpriced models through the API -------------------------------------------------------

PRICED: dict[str, Any] = {
    "budgets": [
        {"id": "org", "name": "Org", "scope": "organization", "limit_usd": 10.0,
         "period": "monthly"},
    ],
    "pricing": [PRICE],
}  # fmt: skip


@pytest.mark.parametrize(
    "body",
    [
        {"model": "mystery-1", "estimated_tokens_in": 1000, "estimated_tokens_out": 10},
        {"provider": "openai", "model": "gpt-5-unknown", "estimated_tokens_in": 1},
        # Priced under another provider only: still unpriced for this one.
        {"provider": "acme", "model": "gpt-4o", "estimated_tokens_out": 1},
    ],
)
async def test_unpriced_model_is_refused_by_default(
    make_client: ClientFactory, redis_client: redis.Redis, body: dict[str, Any]
) -> None:
    client = await make_client(PRICED)
    for path in ("/v1/authorize", "/v1/check"):
        r = await client.post(path, json=body)
        assert r.status == 400, path
        assert r.headers["Content-Type"].startswith("application/problem+json")
        problem = await r.json()
        assert problem["status"] == 400
        assert problem["field"] == "model"
        assert body["model"] in problem["detail"]
    # Refused before any script ran: nothing held, nothing written.
    assert data_keys(redis_client) == []


FALLBACK: dict[str, Any] = {
    **PRICED,
    "settings": {
        "unpriced_model": "fallback",
        "fallback_price": {"input_per_1k": 0.0025, "output_per_1k": 0.015},
        "min_estimate_usd": 0.000001,
    },
}


async def test_fallback_price_costs_an_unknown_model(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(FALLBACK)
    # $0.0025 per 1k in is 2.5 micro-USD per token: 333 in = 832.5, rounded up to 833;
    # $0.015 per 1k out is 15 micro-USD per token: 77 out = 1155. Total 1988 micro-USD.
    r = await client.post(
        "/v1/authorize",
        json={"model": "mystery-1", "estimated_tokens_in": 333, "estimated_tokens_out": 77},
    )
    assert r.status == 200
    d = await r.json()
    assert d["allowed"] is True
    assert d["estimated_usd"] == 0.001988
    assert [b["held_usd"] for b in d["budgets"]] == [0.001988]
    assert redis_client.hget("bs:{default}:ctr", "h:org/default/m20260301") == "1988"

    # Settling in tokens charges the fallback price too: 1000 in + 2000 out
    # = 2500 + 30000 micro-USD.
    s = await client.post(
        "/v1/settle",
        json={"reservation_id": d["reservation_id"], "tokens_in": 1000, "tokens_out": 2000},
    )
    assert s.status == 200
    settled = await s.json()
    assert settled["cost_usd"] == 0.0325
    assert [(b["used_usd"], b["held_usd"]) for b in settled["budgets"]] == [(0.0325, 0.0)]


async def test_fallback_price_does_not_replace_a_known_price(make_client: ClientFactory) -> None:
    client = await make_client(FALLBACK)
    r = await client.post(
        "/v1/check",
        json={
            "provider": "openai",
            "model": "gpt-4o",
            "estimated_tokens_in": 1000,
            "estimated_tokens_out": 1000,
        },
    )
    assert r.status == 200
    d = await r.json()
    # gpt-4o's own price: 2500 + 10000 micro-USD; the fallback would give 2500 + 15000.
    assert d["estimated_usd"] == 0.0125
