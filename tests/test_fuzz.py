"""Hostile input, from schemathesis against a live `budget-sidecar serve` (subprocess).

schemathesis reads GET /openapi.json and generates requests for every operation (valid
ones, invalid ones, edge values: empty strings, control characters, huge numbers, odd
methods). Checks run on every answer:

- not_a_server_error: no 5xx, ever;
- status_code_conformance, content_type_conformance, response_schema_conformance,
  response_headers_conformance: every answer is what the document says it is;
- negative_data_rejection: a request the schema forbids gets a 4xx.

Left out on purpose: positive_data_acceptance (schema-valid requests are rightly refused
by rules a JSON Schema cannot state: an unpriced model, a config-file rate-limit id, "give
estimated_usd or tokens"); unsupported_method (/ext_authz answers every method by design,
QUERY included, which OpenAPI 3.1 cannot list); the stateful checks (no links yet, so an
audit never names a real pre-check and a budget update rarely names a real budget: those
answer 404) and ignored_auth (open mode: no credentials exist).

The fuzz writes definitions too (budgets, prices, rate limits: made, changed, deleted), and
pre-checks may then be denied (402) by a budget it made; what it leaves in Redis is checked.

The run is reproducible: SIDECAR_FUZZ_SEED (default 1) and SIDECAR_FUZZ_EXAMPLES (default
30 per operation) change it. Every request and answer is read back from schemathesis' HAR
report, so the counts below do not trust schemathesis' own summary.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis
import yaml

from sidecar import keys
from sidecar.config import PriceSpec, RateLimitSpec
from sidecar.definitions import StoredBudget
from tests.harness import RedisServer, SidecarProcess, data_keys, flush_data, missing

SEED = os.environ.get("SIDECAR_FUZZ_SEED", "1")
EXAMPLES = os.environ.get("SIDECAR_FUZZ_EXAMPLES", "15")
# Two workers: the time goes to generating cases in schemathesis, not to the sidecar.
WORKERS = os.environ.get("SIDECAR_FUZZ_WORKERS", "2")
CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_schema_conformance,response_headers_conformance,negative_data_rejection"
)
GUARD_S = 240  # only keeps a hang from hanging the suite

CONFIG: dict[str, Any] = {
    "budgets": [
        {"id": "org", "name": "Org", "scope": "organization", "limit_usd": 50,
         "period": "daily", "on_exceed": "block"},
        {"id": "each-user", "name": "Each user", "scope": "user", "limit_usd": 1,
         "period": "daily", "on_exceed": "downgrade", "downgrade_to": {"gpt-4o": "gpt-4o-mini"}},
        {"id": "team", "name": "Team", "scope": "team", "limit_usd": 2, "period": "monthly",
         "on_exceed": "warn"},
    ],
    "pricing": [
        {"provider": "openai", "model": "gpt-4o", "input_per_1k": 0.0025, "output_per_1k": 0.01},
        {"provider": "openai", "model": "gpt-4o-mini", "input_per_1k": 0.00015,
         "output_per_1k": 0.0006},
    ],
    "rate_limits": [
        {"id": "org-rpm", "scope": "organization", "metric": "requests", "limit": 100000,
         "window": "1m", "burst": 1000},
        {"id": "agent-inflight", "scope": "agent", "metric": "concurrent", "limit": 5},
        {"id": "trial", "scope": "user", "metric": "requests", "limit": 10, "window": "1m",
         "mode": "shadow"},
    ],
    # A busy CI host can take longer than the Redis timeout: that 503 (fail mode closed)
    # is tested in test_fail_mode; here only input handling may fail.
    "settings": {"redis_timeout_ms": 2000},
    "proxy": {"routes": [{"prefix": "/v1/chat", "defaults": {"provider": "openai",
                                                             "model": "gpt-4o"}}]},
}  # fmt: skip

# What a tenant's keys may be: the hash tag is always exactly {default} (or {defs} for
# the definitions bookkeeping), whatever identifiers the requests carried.
TENANT = keys.tenant_keys("default")
ALLOWED_KEYS = {
    *TENANT.hot,
    TENANT.sweep,
    TENANT.usage,
    TENANT.alerts,
    TENANT.stops,
    keys.definitions("default"),
    keys.DEFS_VERSION,
    keys.DEFS_TENANTS,
    keys.state_marker("default"),  # sidecar.state_loss
    keys.DEFS_EPOCH,
}
KEY_RE = re.compile(
    r"^bs:\{default\}:(ctr|lease|res|gc|defs|usage|alerts|sweep|stops|epoch|u?agg:\d{8})$"
    r"|^bs:\{defs\}:(version|tenants|epoch)$"
)
AGG_RE = re.compile(r"^bs:\{default\}:u?agg:\d{8}$")  # one per UTC day with usage
# Hash fields and zset members hold escaped components only: no brace, space or control.
MEMBER_RE = re.compile(r"^[A-Za-z0-9._~@+%\-/:=]+$")
# Definitions made through the API (rate limits, budgets, prices), by their validated ids
# or escaped provider/model, and what each field holds.
DEF_FIELD_RE = re.compile(
    r"^(rl|b):[A-Za-z0-9._~\-]{1,64}$|^p:[A-Za-z0-9._~@+%\-]+/[A-Za-z0-9._~@+%\-]+$"
)
DEF_TYPES: dict[str, type] = {"rl": RateLimitSpec, "b": StoredBudget, "p": PriceSpec}
# The usage ledger's tuple (provider, model, org, team, agent, workflow, user, step, run),
# validated identifiers joined by the unit separator; the daily aggregates leave out run.
PART = r"[A-Za-z0-9._~@+:/\-]*"
META_RE = re.compile(rf"^{PART}(\x1f{PART}){{8}}$")
# Since issue 16 the totals leave out user and step too (six parts); those two have their
# own hash ("uagg"), one field "user\x1fstep" -> "cost:requests:in:out".
AGG_FIELD_RE = re.compile(rf"^[cnio]\|{PART}(\x1f{PART}){{5}}$")
UAGG_FIELD_RE = re.compile(rf"^{PART}\x1f{PART}$")
UAGG_VALUE_RE = re.compile(r"^\d+:\d+:\d+:\d+$")
# The stop switch (sidecar.keys): "<scope>:<escaped entity>" -> "<id>|<ms>|<ms>|<reason>",
# "#<id>" -> that field.
STOP_ID = r"stop_[0-9a-f]{16}"
STOP_FIELD_RE = re.compile(r"^[a-z]+:[A-Za-z0-9._~@+%\-]+$")
STOP_VALUE_RE = re.compile(rf"^{STOP_ID}\|\d+\|\d+\|[^\x00-\x1f\x7f]+$")


def schemathesis_cli() -> str:
    cli = Path(sys.executable).parent / "schemathesis"
    if not cli.exists():
        missing("schemathesis (pip install -e '.[dev]')")
    return str(cli)


@pytest.fixture(scope="module")
def live() -> str:
    """The schemathesis command line."""
    return schemathesis_cli()


@pytest.fixture(scope="module")
def sidecar(
    live: str, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    path = tmp_path_factory.mktemp("fuzz") / "budgets.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    proc = SidecarProcess(redis_server.url, str(path)).start()
    try:
        yield proc
    finally:
        proc.cleanup()
        redis_server.client().flushall()


class Run:
    def __init__(self, junit: ET.Element, har: dict[str, Any], output: str) -> None:
        self.junit = junit
        self.entries: list[dict[str, Any]] = har["log"]["entries"]
        self.output = output

    @property
    def statuses(self) -> collections.Counter[int]:
        return collections.Counter(int(e["response"]["status"]) for e in self.entries)

    def operations(self) -> set[str]:
        return {case.attrib["name"] for case in self.junit.iter("testcase")}

    def failures(self) -> list[str]:
        out = []
        for case in self.junit.iter("testcase"):
            for bad in (*case.iter("failure"), *case.iter("error")):
                out.append(f"{case.attrib['name']}: {(bad.text or bad.attrib)!s:.2000}")
        return out


# A schemathesis hooks file: leave out the requests whose only fault is a declared
# Content-Type other than JSON (schemathesis' media-type probes send a schema-valid body as
# text/plain or multipart/form-data). The sidecar answers those 415 before reading the
# body (sidecar.api.bodies), which a negative-mode check of a write route cannot tell from
# a refusal of the content; test_fuzz_every_route keeps them (415 is documented).
JSON_ONLY_HOOKS = """
import schemathesis


@schemathesis.hook
def filter_case(ctx, case):
    declared = {k.lower(): v for k, v in (case.headers or {}).items()}.get("content-type")
    return declared is None or declared.startswith("application/json")
"""


def run(cli: str, url: str, tmp: Path, *args: str, hooks: str | None = None) -> Run:
    junit, har = tmp / "junit.xml", tmp / "run.har"
    cmd = [
        cli, "run", f"{url}/openapi.json",
        "--checks", CHECKS,
        "--max-examples", EXAMPLES,
        "--seed", SEED,
        "--workers", WORKERS,
        "--phases", "coverage,fuzzing",
        "--request-timeout", "10",
        "--report", "junit,har",
        "--report-junit-path", str(junit),
        "--report-har-path", str(har),
        *args,
    ]  # fmt: skip
    env = {**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_TELEMETRY": "false"}
    if hooks is not None:
        (tmp / "hooks.py").write_text(hooks)
        env["SCHEMATHESIS_HOOKS"] = str(tmp / "hooks.py")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=GUARD_S, env=env)
    output = done.stdout + done.stderr
    assert junit.exists() and har.exists(), output[-5000:]
    return Run(ET.parse(junit).getroot(), json.loads(har.read_text()), output)


def test_rejected_writes_write_nothing(
    live: str, redis_server: RedisServer, tmp_path: Path, sidecar: SidecarProcess
) -> None:
    """Only schema-invalid requests to the write routes (native, admin, and the AxonFlow
    SDK's: budgets, pricing, pre-check, audit): every one is refused (4xx) and Redis stays
    empty. (Without the media-type probes: see JSON_ONLY_HOOKS.)"""
    client = redis_server.client()
    flush_data(client)
    result = run(
        live, sidecar.url, tmp_path,
        "--mode", "negative", "--include-path-regex", "^/(v1|api)/", "--exclude-method", "GET",
        hooks=JSON_ONLY_HOOKS,
    )  # fmt: skip
    assert result.failures() == [], result.output[-5000:]
    statuses = result.statuses
    refused = sum(n for s, n in statuses.items() if 400 <= s < 500)
    # The checks are read-only and may pass an input schemathesis could not make invalid.
    passed = [e["request"]["url"] for e in result.entries if int(e["response"]["status"]) < 400]
    assert all(url.endswith(("/v1/check", "/v1/budgets/check")) for url in passed), passed
    hit = {e["request"]["url"].partition("?")[0].split("/", 3)[3] for e in result.entries}
    assert {"api/v1/budgets", "api/v1/pricing", "api/policy/pre-check"} <= hit, hit
    assert refused > 500, statuses
    assert data_keys(client) == [], "a refused request wrote to Redis"
    print(f"\nnegative requests: {len(result.entries)}, statuses {dict(statuses)}")


def test_fuzz_every_route(
    live: str, redis_server: RedisServer, tmp_path: Path, sidecar: SidecarProcess
) -> None:
    result = run(live, sidecar.url, tmp_path)
    assert result.failures() == [], result.output[-5000:]
    # Every documented operation was exercised.
    with urllib.request.urlopen(f"{sidecar.url}/openapi.json", timeout=10) as resp:
        documented = json.loads(resp.read())
    expected = {
        f"{method.upper()} {path}"
        for path, item in documented["paths"].items()
        for method in item
        if method != "parameters"
    }
    # schemathesis does not fuzz the document it was given.
    assert result.operations() == expected - {"GET /openapi.json"}
    statuses = result.statuses
    assert not [s for s in statuses if s >= 500], statuses
    assert len(result.entries) > 2000, statuses
    # Decisions really happened: allowed (200), denied by the proxy (429), refused (400).
    assert statuses[200] > 0 and statuses[400] > 0, statuses
    print(f"\nfuzzed requests: {len(result.entries)}, statuses {dict(sorted(statuses.items()))}")

    # No input broke a key's hash tag or slipped a raw identifier into a name.
    client = redis_server.client()
    found = set(client.scan_iter("*"))
    daily = {k for k in found if AGG_RE.match(k)}
    assert found - daily <= ALLOWED_KEYS, found - daily - ALLOWED_KEYS
    assert all(KEY_RE.match(k) for k in found), found
    assert TENANT.counters in found  # the fuzz did write counters
    for field in client.hkeys(TENANT.counters):
        assert MEMBER_RE.match(str(field)), field
    for member in (*client.zrange(TENANT.gc, 0, -1), *client.zrange(TENANT.leases, 0, -1)):
        assert MEMBER_RE.match(str(member)), member

    # The fuzz made budgets and prices through the API (and rate limits): whatever is left
    # of them is well-formed and reads back as what every replica's watcher loads.
    def answered(method: str, path: str, status: int) -> int:
        return sum(
            1
            for e in result.entries
            if e["request"]["method"] == method
            and e["request"]["url"].partition("?")[0].endswith(path)
            and int(e["response"]["status"]) == status
        )

    assert answered("POST", "/api/v1/budgets", 201) > 0, statuses
    assert answered("PUT", "/api/v1/pricing", 200) > 0, statuses
    assert answered("POST", "/api/policy/pre-check", 200) > 0, statuses
    for field, value in client.hgetall(keys.definitions("default")).items():
        assert DEF_FIELD_RE.match(str(field)), field
        msgspec.json.decode(str(value), type=DEF_TYPES[str(field).partition(":")[0]])
    # The usage ledger and the alerts hold validated or escaped identifiers only.
    entries = stream(client, TENANT.usage)
    assert entries, "the fuzz charged nothing"
    for fields in entries:
        assert META_RE.match(fields["m"]), fields
    for day in daily:
        per_user = ":uagg:" in day
        for field, value in client.hgetall(day).items():
            if per_user:
                assert UAGG_FIELD_RE.match(str(field)) and UAGG_VALUE_RE.match(value), field
            else:
                assert AGG_FIELD_RE.match(str(field)), field
    for fields in stream(client, TENANT.alerts):
        if fields.get("k") == "f":  # a forecast alert names its counter
            assert MEMBER_RE.match(fields["cid"]), fields
        elif "k" in fields:  # a guard trip: ids and entities escaped too ('' scope: a
            # budget's or rate limit's, whose id says what it covers)
            assert all(MEMBER_RE.match(fields[f]) for f in ("g", "e")), fields
            assert fields["s"] == "" or MEMBER_RE.match(fields["s"]), fields
        else:
            assert MEMBER_RE.match(fields["cid"]), fields
    # Stops the fuzz made: well-formed, each "#id" naming a field that holds that id.
    assert answered("POST", "/v1/stops", 201) > 0, statuses
    made = client.hgetall(TENANT.stops)
    for field, value in made.items():
        if str(field).startswith("#"):
            assert re.match(rf"^#{STOP_ID}$", str(field)), field
            assert str(made[value]).startswith(str(field)[1:] + "|"), (field, value)
        else:
            assert STOP_FIELD_RE.match(str(field)) and STOP_VALUE_RE.match(value), (field, value)


def stream(client: redis.Redis, key: str) -> list[dict[str, str]]:
    """The fields of every entry of a stream."""
    entries = client.xrange(key) or []
    return [{str(k): str(v) for k, v in (fields or {}).items()} for _, fields in entries]
