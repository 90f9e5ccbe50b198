"""Invariant 7: bad input gets a clear error and changes nothing.

Every route answers a malformed, mistyped, incomplete or oversized request with a
problem+json body naming the field (400, or 413 for a body over settings.max_body_bytes,
404 for what does not exist), never a 500 and never a traceback, and the COMPLETE content
of Redis (every key, its type and every member) is the same after the request as before.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import quote

import pytest
import redis
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.api.app import SWEEPER
from tests.conftest import T0_MS, ClientFactory

MAX_BODY = 16_384

DOC: dict[str, Any] = {
    "budgets": [
        {
            "id": "org",
            "name": "Org",
            "scope": "organization",
            "limit_usd": 100.0,
            "period": "monthly",
        },
        {
            "id": "team-a",
            "name": "Team A",
            "scope": "team",
            "scope_id": "team-a",
            "limit_usd": 10.0,
            "period": "daily",
        },
        {"id": "user", "name": "Each user", "scope": "user", "limit_usd": 5.0, "period": "daily"},
    ],
    "pricing": [
        {"provider": "openai", "model": "gpt-4o", "input_per_1k": 0.0025, "output_per_1k": 0.01}
    ],
    # A floor of one micro-USD: the seeded holds stay as small as they are drawn.
    "settings": {"max_body_bytes": MAX_BODY, "min_estimate_usd": 0.000001},
}

POST_ROUTES = ["/v1/authorize", "/v1/check", "/v1/settle", "/v1/release", "/v1/record"]


# ---- the complete content of Redis ---------------------------------------------------------


def snapshot(r: redis.Redis) -> dict[str, Any]:
    """Every key of every database with its type, its full contents and whether it expires."""
    state: dict[str, Any] = {}
    for db, info in sorted(r.info("keyspace").items()):
        state[f"#{db}"] = (info["keys"], info["expires"])
    for key in sorted(r.scan_iter(count=1000)):
        kind = r.type(key)
        value: Any
        if kind == "string":
            value = r.get(key)
        elif kind == "hash":
            value = r.hgetall(key)
            if key.endswith(":epoch"):  # a state marker: every check advances its gen
                value.pop("gen", None)
        elif kind == "zset":
            value = r.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            value = sorted(r.smembers(key))
        elif kind == "list":
            value = r.lrange(key, 0, -1)
        elif kind == "stream":
            value = r.xrange(key)
        else:
            raise AssertionError(f"unexpected type {kind} of {key}")
        state[key] = (kind, value, r.pttl(key) >= 0)
    return state


# ---- the app, with some state in Redis -----------------------------------------------------


@dataclass
class Seeded:
    client: TestClient[Any, Any]
    redis: redis.Redis
    held_rid: str  # a reservation still held (priced by a USD estimate: unpriced)
    priced_rid: str  # a reservation held with a token estimate on gpt-4o
    before: dict[str, Any]


async def _ok(client: TestClient[Any, Any], path: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = await client.post(path, json=body)
    assert resp.status == 200, await resp.text()
    data: dict[str, Any] = await resp.json()
    return data


@pytest.fixture
async def app(make_client: ClientFactory, redis_client: redis.Redis) -> AsyncIterator[Seeded]:
    client = await make_client(DOC)
    held = await _ok(
        client,
        "/v1/authorize",
        {"user_id": "u1", "team_id": "team-a", "estimated_usd": 0.5, "idempotency_key": "seed-1"},
    )
    priced = await _ok(
        client,
        "/v1/authorize",
        {
            "user_id": "u1",
            "provider": "openai",
            "model": "gpt-4o",
            "estimated_tokens_in": 1000,
            "estimated_tokens_out": 500,
        },
    )
    settled = await _ok(client, "/v1/authorize", {"user_id": "u2", "estimated_usd": 0.2})
    await _ok(client, "/v1/settle", {"reservation_id": settled["reservation_id"], "cost_usd": 0.1})
    released = await _ok(client, "/v1/authorize", {"agent_id": "a1", "estimated_usd": 0.3})
    await _ok(client, "/v1/release", {"reservation_id": released["reservation_id"]})
    await _ok(client, "/v1/record", {"user_id": "u3", "cost_usd": 0.05, "idempotency_key": "rec-1"})
    assert held["allowed"] and priced["allowed"]
    # One sweep first, as the background one would do during the test: it gives the usage
    # stream its time to live (lua/sweep.lua), which no bad request may be blamed for.
    await client.app[SWEEPER].sweep_once("default")
    before = snapshot(redis_client)
    assert before["bs:{default}:usage"][2], "the sweep gave the usage stream no time to live"
    # The seed touched every kind of key: counters, leases, reservations, collection, the
    # usage ledger and the day's usage aggregates (and the state markers the sidecar wrote
    # before serving: sidecar.state_loss).
    assert sorted(k for k in before if not k.startswith("#")) == [
        f"bs:{{default}}:agg:{time.strftime('%Y%m%d', time.gmtime(T0_MS / 1000))}",
        "bs:{default}:ctr",
        "bs:{default}:epoch",
        "bs:{default}:gc",
        "bs:{default}:lease",
        "bs:{default}:res",
        f"bs:{{default}}:uagg:{time.strftime('%Y%m%d', time.gmtime(T0_MS / 1000))}",
        "bs:{default}:usage",
        "bs:{defs}:epoch",
    ]
    assert len(before["bs:{default}:lease"][1]) == 2
    yield Seeded(client, redis_client, held["reservation_id"], priced["reservation_id"], before)


async def assert_problem(resp: Any, status: int, field: str) -> dict[str, Any]:
    text = await resp.text()
    assert resp.status == status, text
    assert resp.content_type == "application/problem+json", text
    assert "Traceback" not in text and 'File "' not in text
    body: dict[str, Any] = json.loads(text)
    assert body["status"] == status
    assert body["title"] == HTTPStatus(status).phrase
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["field"] == field, body
    return body


class RawNumber(str):
    """A JSON number written as is (json.dumps would write 1e400 as `Infinity`)."""


def _raw(body: Any) -> bytes:
    if isinstance(body, bytes):
        return body
    literals: dict[str, str] = {}

    def mark(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        if isinstance(value, RawNumber):
            literals[f"<literal-{len(literals)}>"] = str(value)
            return f"<literal-{len(literals) - 1}>"
        return value

    text = json.dumps(mark(body))
    for marker, literal in literals.items():
        text = text.replace(json.dumps(marker), literal)
    return text.encode()


async def post(app: Seeded, path: str, body: Any, **kw: Any) -> Any:
    headers = {"Content-Type": "application/json", **kw.pop("headers", {})}
    return await app.client.post(path, data=_raw(body), headers=headers, **kw)


async def rejected(app: Seeded, path: str, body: Any, field: str, status: int = 400) -> None:
    resp = await post(app, path, body)
    await assert_problem(resp, status, field)
    assert snapshot(app.redis) == app.before


# ---- the bodies ------------------------------------------------------------------------------

# Identifiers that must never reach a key name: each breaks a hash tag, a record separator,
# the escaping, or a length bound.
BAD_IDS: dict[str, str] = {
    "brace-open": "a{b",
    "brace-close": "a}b",
    "hash-tag": "{default}",
    "colon": "a:b",
    "pipe": "a|b",
    "comma": "a,b",
    "newline": "a\nb",
    "trailing-newline": "ab\n",
    "carriage-return": "ab\r",
    "space": "a b",
    "tab": "a\tb",
    "nul": "a\x00b",
    "slash": "a/b",
    "percent": "a%7Bb",
    "non-ascii": "caf\u00e9",
    "empty": "",
    "129-chars": "x" * 129,
    "10kB": "x" * 10_240,
}
# Model names may carry ':' and '/'; idempotency keys and reservation ids may carry ':'.
BAD_MODELS = {k: v for k, v in BAD_IDS.items() if k not in ("colon", "slash", "129-chars")}
BAD_MODELS["201-chars"] = "m" * 201
BAD_TOKENS = {k: v for k, v in BAD_IDS.items() if k != "colon"}

ID_FIELDS = ["org_id", "team_id", "agent_id", "workflow_id", "user_id", "provider"]
WRONG_STR_TYPES: dict[str, Any] = {"int": 123, "float": 1.5, "bool": True, "list": ["a"], "obj": {}}
WRONG_NUM_TYPES: dict[str, Any] = {"str": "1", "bool": True, "list": [1], "obj": {"v": 1}}

NOT_OBJECTS: dict[str, Any] = {
    "array": [],
    "array-of-object": [{"estimated_usd": 0.1}],
    "string": "estimated_usd",
    "number": 42,
    "null": None,
    "true": True,
}
# Not JSON. Each body is malformed before the struct it would fill is complete, so the
# decoder meets the syntax error first: `{str}` is a string field the route knows, `{num}`
# a number field (the string value is valid for every string field, so the syntax error is
# what the decoder meets), `{valid}` a whole valid body of the route (a syntax error after it must
# not let it through).
MALFORMED: dict[str, str] = {
    "empty": "",
    "whitespace": "  \n",
    "open-brace": "{",
    "text": "not json",
    "single-quotes": "{'{str}': 'a'}",
    "trailing-garbage": "{valid} x",
    "two-objects": "{valid}{valid}",
    "nan": '{"{num}": NaN}',
    "infinity": '{"{num}": Infinity}',
    "hex-number": '{"{num}": 0x10}',
    "invalid-utf8": '{"{str}": "\udcff\udcfe"}',
    "invalid-utf8-key": '{"\udcff": 1}',
    "missing-value": '{"{str}": }',
    "trailing-comma": '{"{str}": "0123456789abcdef0123456789abcdef",}',
    "unterminated-string": '{"{str}": "a}',
    "comment": '{"{str}": "0123456789abcdef0123456789abcdef" /* x */}',
}

AUTH_BASE: dict[str, Any] = {"user_id": "u9", "team_id": "team-a", "estimated_usd": 0.01}
TOKENS_BASE: dict[str, Any] = {
    "user_id": "u9",
    "provider": "openai",
    "model": "gpt-4o",
    "estimated_tokens_in": 10,
    "estimated_tokens_out": 10,
}
RECORD_BASE: dict[str, Any] = {"user_id": "u9", "team_id": "team-a", "cost_usd": 0.01}
RECORD_TOKENS: dict[str, Any] = {
    "user_id": "u9",
    "provider": "openai",
    "model": "gpt-4o",
    "tokens_in": 10,
    "tokens_out": 10,
}
HELD = "<held>"  # replaced by the held reservation id of the seed
PRICED = "<priced>"  # replaced by the priced reservation id of the seed


@dataclass(frozen=True)
class Case:
    path: str
    body: Any
    field: str
    status: int = 400


def _cases() -> dict[str, Case]:
    cases: dict[str, Case] = {}

    def add(name: str, path: str, body: Any, field: str, status: int = 400) -> None:
        key = f"{path.rsplit('/', 1)[1]}:{name}"
        assert key not in cases, key
        cases[key] = Case(path, body, field, status)

    amounts_usd: dict[str, Any] = {
        "-1": -1,
        "-1e-6": -0.000001,
        "1e12": 1e12,
        "1000000.01": 1_000_000.01,
        "1e400": RawNumber("1e400"),
        "-1e400": RawNumber("-1e400"),
        **WRONG_NUM_TYPES,
    }
    amounts_tokens: dict[str, Any] = {
        "-5": -5,
        "1e12": 1e12,
        "int-1e12": 10**12,
        "100000001": 100_000_001,
        "huge-int": 10**30,
        "1.5": 1.5,
        **WRONG_NUM_TYPES,
    }
    latencies: dict[str, Any] = {"-1": -1, "86400001": 86_400_001, "1.5": 1.5, "str": "5"}
    successes: dict[str, Any] = {"str": "yes", "int": 1, "null": None, "list": [True]}

    # -- /v1/authorize and /v1/check share the identity and the estimate
    for path, base in (("/v1/authorize", AUTH_BASE), ("/v1/check", AUTH_BASE)):
        for f in [*ID_FIELDS, "run_id", "step_id"] if path == "/v1/authorize" else ID_FIELDS:
            for name, bad in BAD_IDS.items():
                add(f"{f}={name}", path, {**base, f: bad}, f)
            for name, bad in WRONG_STR_TYPES.items():
                add(f"{f}:{name}", path, {**base, f: bad}, f)
        for name, bad in BAD_MODELS.items():
            add(f"model={name}", path, {**TOKENS_BASE, "model": bad}, "model")
        for name, bad in WRONG_STR_TYPES.items():
            add(f"model:{name}", path, {**TOKENS_BASE, "model": bad}, "model")
        for name, bad in amounts_usd.items():
            add(f"estimated_usd={name}", path, {**base, "estimated_usd": bad}, "estimated_usd")
        for f in ("estimated_tokens_in", "estimated_tokens_out"):
            for name, bad in amounts_tokens.items():
                add(f"{f}={name}", path, {**TOKENS_BASE, f: bad}, f)
        add(
            "usd-and-tokens",
            path,
            {**TOKENS_BASE, "estimated_usd": 0.01},
            "estimated_usd",
        )
        add(
            "usd-and-tokens-in",
            path,
            {"user_id": "u9", "estimated_usd": 0.01, "estimated_tokens_in": 5, "model": "gpt-4o"},
            "estimated_usd",
        )
        add("tokens-without-model", path, {"user_id": "u9", "estimated_tokens_in": 5}, "model")
        add(
            "unpriced-model",
            path,
            {**TOKENS_BASE, "provider": "openai", "model": "gpt-9"},
            "model",
        )
        add(
            "unpriced-provider",
            path,
            {**TOKENS_BASE, "provider": "anthropic"},
            "model",
        )
        add("unknown-field", path, {**base, "bogus": 1}, "bogus")
        add("unknown-field-case", path, {**base, "Org_id": "acme"}, "Org_id")
        add("unknown-field-null", path, {**base, "extra": None}, "extra")
        add("unknown-field-backtick", path, {**base, "x`y": 1}, "x`y")
        add("unknown-field-empty-name", path, {**base, "": 1}, "")
        add("unknown-settle-field", path, {**base, "cost_usd": 0.01}, "cost_usd")
        add("nested-identity", path, {**base, "identity": {"org_id": "acme"}}, "identity")

    # -- /v1/authorize only: the estimate is required, the lease and the idempotency key
    auth = "/v1/authorize"
    add("empty-object", auth, {}, "estimated_usd")
    add("identity-only", auth, {"org_id": "acme", "user_id": "u9"}, "estimated_usd")
    add("null-estimate", auth, {"user_id": "u9", "estimated_usd": None}, "estimated_usd")
    add("model-without-estimate", auth, {"user_id": "u9", "model": "gpt-4o"}, "estimated_usd")
    leases: dict[str, Any] = {
        "0": 0,
        "-1": -1,
        "99": 99,
        "86400001": 86_400_001,
        "over-max_lease_ms": 3_600_001,
        "1.5": 1.5,
        **WRONG_NUM_TYPES,
    }
    for name, bad in leases.items():
        add(f"lease_ms={name}", auth, {**AUTH_BASE, "lease_ms": bad}, "lease_ms")
    for name, bad in BAD_TOKENS.items():
        add(
            f"idempotency_key={name}",
            auth,
            {**AUTH_BASE, "idempotency_key": bad},
            "idempotency_key",
        )
    for name, bad in WRONG_STR_TYPES.items():
        add(
            f"idempotency_key:{name}",
            auth,
            {**AUTH_BASE, "idempotency_key": bad},
            "idempotency_key",
        )

    # -- /v1/check has no lease and no idempotency key
    check = "/v1/check"
    add("lease_ms-unknown", check, {**AUTH_BASE, "lease_ms": 1000}, "lease_ms")
    add("idempotency-unknown", check, {**AUTH_BASE, "idempotency_key": "k1"}, "idempotency_key")

    # -- /v1/settle (HELD is replaced by a real, held reservation: a wrong accept would show)
    settle = "/v1/settle"
    sbase: dict[str, Any] = {"reservation_id": HELD, "cost_usd": 0.01}
    add("empty-object", settle, {}, "reservation_id")
    add("no-reservation_id", settle, {"cost_usd": 0.01}, "reservation_id")
    add("null-reservation_id", settle, {"reservation_id": None, "cost_usd": 0.01}, "reservation_id")
    add("no-cost", settle, {"reservation_id": HELD}, "cost_usd")
    add("null-cost", settle, {"reservation_id": HELD, "cost_usd": None}, "cost_usd")
    add("cost-and-tokens", settle, {**sbase, "tokens_in": 5}, "cost_usd")
    add("cost-and-tokens-out", settle, {**sbase, "tokens_out": 5}, "cost_usd")
    for name, bad in BAD_TOKENS.items():
        add(f"reservation_id={name}", settle, {**sbase, "reservation_id": bad}, "reservation_id")
    for name, bad in WRONG_STR_TYPES.items():
        add(f"reservation_id:{name}", settle, {**sbase, "reservation_id": bad}, "reservation_id")
    for name, bad in amounts_usd.items():
        add(f"cost_usd={name}", settle, {**sbase, "cost_usd": bad}, "cost_usd")
    for f in ("tokens_in", "tokens_out"):
        for name, bad in amounts_tokens.items():
            add(f"{f}={name}", settle, {"reservation_id": PRICED, f: bad}, f)
    for name, bad in latencies.items():
        add(f"latency_ms={name}", settle, {**sbase, "latency_ms": bad}, "latency_ms")
    for name, bad in successes.items():
        add(f"success={name}", settle, {**sbase, "success": bad}, "success")
    add("unknown-field", settle, {**sbase, "bogus": 1}, "bogus")
    add("identity-field", settle, {**sbase, "user_id": "u1"}, "user_id")
    add("estimate-field", settle, {**sbase, "estimated_usd": 0.01}, "estimated_usd")
    # Reservation ids are 32 hex characters: anything else is malformed (400), a
    # well-formed id nobody issued is unknown (404).
    add("malformed-reservation", settle, {**sbase, "reservation_id": "nope-1"}, "reservation_id")
    add(
        "unknown-reservation-uuid",
        settle,
        {**sbase, "reservation_id": "0" * 32},
        "reservation_id",
        404,
    )
    add(
        "idempotency-key-as-reservation",
        settle,
        {**sbase, "reservation_id": "k:seed-1"},
        "reservation_id",
    )

    # -- /v1/release
    release = "/v1/release"
    add("empty-object", release, {}, "reservation_id")
    add("null-reservation_id", release, {"reservation_id": None}, "reservation_id")
    for name, bad in BAD_TOKENS.items():
        add(f"reservation_id={name}", release, {"reservation_id": bad}, "reservation_id")
    for name, bad in WRONG_STR_TYPES.items():
        add(f"reservation_id:{name}", release, {"reservation_id": bad}, "reservation_id")
    add("cost-field", release, {"reservation_id": HELD, "cost_usd": 0.1}, "cost_usd")
    add("unknown-field", release, {"reservation_id": HELD, "bogus": 1}, "bogus")
    add("malformed-reservation", release, {"reservation_id": "nope-1"}, "reservation_id")
    add("unknown-reservation", release, {"reservation_id": "f" * 32}, "reservation_id", 404)
    add(
        "idempotency-key-as-reservation",
        release,
        {"reservation_id": "k:seed-1"},
        "reservation_id",
    )

    # -- /v1/record
    record = "/v1/record"
    add("empty-object", record, {}, "cost_usd")
    add("identity-only", record, {"user_id": "u9"}, "cost_usd")
    add("cost-and-tokens", record, {**RECORD_TOKENS, "cost_usd": 0.01}, "cost_usd")
    add("tokens-without-model", record, {"user_id": "u9", "tokens_in": 5}, "model")
    add("unpriced-model", record, {**RECORD_TOKENS, "model": "gpt-9"}, "model")
    for f in [*ID_FIELDS, "run_id", "step_id"]:
        for name, bad in BAD_IDS.items():
            add(f"{f}={name}", record, {**RECORD_BASE, f: bad}, f)
        for name, bad in WRONG_STR_TYPES.items():
            add(f"{f}:{name}", record, {**RECORD_BASE, f: bad}, f)
    for name, bad in BAD_MODELS.items():
        add(f"model={name}", record, {**RECORD_TOKENS, "model": bad}, "model")
    for name, bad in BAD_TOKENS.items():
        add(
            f"idempotency_key={name}",
            record,
            {**RECORD_BASE, "idempotency_key": bad},
            "idempotency_key",
        )
    for name, bad in amounts_usd.items():
        add(f"cost_usd={name}", record, {**RECORD_BASE, "cost_usd": bad}, "cost_usd")
    for f in ("tokens_in", "tokens_out"):
        for name, bad in amounts_tokens.items():
            add(f"{f}={name}", record, {**RECORD_TOKENS, f: bad}, f)
    for name, bad in latencies.items():
        add(f"latency_ms={name}", record, {**RECORD_BASE, "latency_ms": bad}, "latency_ms")
    for name, bad in successes.items():
        add(f"success={name}", record, {**RECORD_BASE, "success": bad}, "success")
    add("unknown-field", record, {**RECORD_BASE, "bogus": 1}, "bogus")
    add("estimate-field", record, {**RECORD_BASE, "estimated_usd": 0.01}, "estimated_usd")
    add("lease-field", record, {**RECORD_BASE, "lease_ms": 1000}, "lease_ms")

    # -- every POST route: not an object, not JSON
    valid = {
        auth: (AUTH_BASE, "org_id", "estimated_usd"),  # route: (valid body, str, number)
        check: (AUTH_BASE, "org_id", "estimated_usd"),
        settle: (sbase, "reservation_id", "cost_usd"),
        release: ({"reservation_id": HELD}, "reservation_id", None),
        record: (RECORD_BASE, "org_id", "cost_usd"),
    }
    for path in POST_ROUTES:
        for name, value in NOT_OBJECTS.items():
            add(f"not-an-object={name}", path, value, "body")
        base, str_field, num_field = valid[path]
        for name, template in MALFORMED.items():
            if num_field is None and "{num}" in template:
                continue  # release has no number field
            text = template.replace("{valid}", json.dumps(base))
            text = text.replace("{str}", str_field).replace("{num}", num_field or "")
            add(f"malformed={name}", path, text.encode("utf-8", "surrogateescape"), "body")
    return cases


CASES = _cases()


def _resolve(body: Any, app: Seeded) -> Any:
    if isinstance(body, bytes):
        return body.replace(HELD.encode(), app.held_rid.encode())
    if isinstance(body, dict):
        return {k: _resolve(v, app) for k, v in body.items()}
    if body == HELD:
        return app.held_rid
    if body == PRICED:
        return app.priced_rid
    return body


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
async def test_rejected_and_nothing_changed(app: Seeded, case: Case) -> None:
    await rejected(app, case.path, _resolve(case.body, app), case.field, case.status)


def test_every_route_and_kind_is_covered() -> None:
    """The table above reaches each route with each kind of bad input (guards edits)."""
    for path in POST_ROUTES:
        kinds = {k.split(":", 1)[1].split("=")[0] for k, c in CASES.items() if c.path == path}
        assert {"not-an-object", "malformed", "unknown-field"} <= kinds, path
    assert len(CASES) > 500


# ---- body size ---------------------------------------------------------------------------------


def _big_object(size: int) -> bytes:
    body = json.dumps({"org_id": "x" * size}).encode()
    assert len(body) > MAX_BODY
    return body


@pytest.mark.parametrize("path", POST_ROUTES)
async def test_body_over_max_body_bytes_is_413(app: Seeded, path: str) -> None:
    await rejected(app, path, _big_object(MAX_BODY), "body", 413)


@pytest.mark.parametrize("path", POST_ROUTES)
async def test_body_one_byte_over_max_body_bytes_is_413(app: Seeded, path: str) -> None:
    body = b"{" + b" " * (MAX_BODY - 1) + b"}"
    assert len(body) == MAX_BODY + 1
    await rejected(app, path, body, "body", 413)


@pytest.mark.parametrize("path", POST_ROUTES)
async def test_chunked_body_over_max_body_bytes_is_413(app: Seeded, path: str) -> None:
    payload = _big_object(MAX_BODY)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 1000):
            yield payload[i : i + 1000]

    resp = await app.client.post(path, data=chunks(), headers={"Content-Type": "application/json"})
    await assert_problem(resp, 413, "body")
    assert snapshot(app.redis) == app.before


async def test_body_at_max_body_bytes_is_read(app: Seeded) -> None:
    """The limit is the configured one: a body of exactly max_body_bytes is decoded (and
    refused for its content, not its size)."""
    prefix = b'{"estimated_usd": -1'
    body = prefix + b" " * (MAX_BODY - len(prefix) - 1) + b"}"
    assert len(body) == MAX_BODY
    await rejected(app, "/v1/authorize", body, "estimated_usd")


# ---- identifiers at their bounds are accepted (so the rejections above are about content) --


async def test_longest_valid_identifiers_are_accepted(app: Seeded) -> None:
    body = {
        "org_id": "o" * 128,
        "team_id": "A-z0.9_~@+",
        "user_id": "u" * 128,
        "estimated_usd": 0.01,
        "idempotency_key": "k:=" + "k" * 125,
    }
    resp = await post(app, "/v1/authorize", body)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["allowed"] is True


# ---- status --------------------------------------------------------------------------------


STATUS_CASES: dict[str, tuple[str, int, str]] = {
    "unknown-budget": ("/v1/budgets/nope/status?scope_id=u1", 404, "budget_id"),
    "unknown-budget-no-scope": ("/v1/budgets/nope/status", 404, "budget_id"),
    "budget-id-pipe": ("/v1/budgets/org%7Cx/status?scope_id=default", 404, "budget_id"),
    "budget-id-newline": ("/v1/budgets/org%0A/status?scope_id=default", 404, "budget_id"),
    "budget-id-space": ("/v1/budgets/org%20/status?scope_id=default", 404, "budget_id"),
    "per-entity-without-scope_id": ("/v1/budgets/user/status", 400, "scope_id"),
    "pinned-budget-other-entity": ("/v1/budgets/team-a/status?scope_id=team-b", 400, "scope_id"),
    **{
        f"scope_id={name}": (
            f"/v1/budgets/user/status?scope_id={quote(bad[:8000], safe='')}",
            400,
            "scope_id",
        )
        for name, bad in BAD_IDS.items()
        if name != "10kB"
    },
    "scope_id=8000-chars": (f"/v1/budgets/user/status?scope_id={'x' * 8000}", 400, "scope_id"),
}


@pytest.mark.parametrize(
    "path",
    [
        "/v1/budgets/%7Bdefault%7D/status",
        "/v1/budgets/a%2Fb/status",
        "/v1/budgets/org/status/extra",
    ],
)
async def test_status_of_an_unroutable_budget_id_is_404(app: Seeded, path: str) -> None:
    """Budget ids the router cannot match (braces, slashes) are unknown budgets too: a 404
    problem+json (from the router, so without a field), and nothing read or written."""
    resp = await app.client.get(path)
    text = await resp.text()
    assert resp.status == 404, text
    assert resp.content_type == "application/problem+json"
    assert json.loads(text)["status"] == 404
    assert snapshot(app.redis) == app.before


@pytest.mark.parametrize("case", list(STATUS_CASES.values()), ids=list(STATUS_CASES))
async def test_status_rejected_and_nothing_changed(app: Seeded, case: tuple[str, int, str]) -> None:
    url, status, field = case
    resp = await app.client.get(url)
    await assert_problem(resp, status, field)
    assert snapshot(app.redis) == app.before


async def test_status_scope_id_of_10kb_is_a_problem(app: Seeded) -> None:
    """A 10 kB identifier in the query is still bad input: 400 problem+json, not a bare
    text answer of the HTTP parser."""
    resp = await app.client.get(f"/v1/budgets/user/status?scope_id={'x' * 10_240}")
    await assert_problem(resp, 400, "scope_id")
    assert snapshot(app.redis) == app.before


async def test_status_of_a_known_budget_reads_nothing_new(app: Seeded) -> None:
    """The good path of status (the control of the cases above) is a read: state unchanged."""
    resp = await app.client.get("/v1/budgets/user/status?scope_id=u1")
    assert resp.status == 200
    body = await resp.json()
    assert (body["budget_id"], body["entity"], body["held_usd"]) == ("user", "u1", 0.5075)
    assert snapshot(app.redis) == app.before


# ---- methods and paths ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/authorize", 405),
        ("PUT", "/v1/settle", 405),
        ("DELETE", "/v1/release", 405),
        ("POST", "/v1/budgets/user/status", 405),
        ("POST", "/v1/nope", 404),
        ("GET", "/v1/budgets//status", 404),
    ],
)
async def test_wrong_method_or_path_is_a_problem(
    app: Seeded, method: str, path: str, status: int
) -> None:
    resp = await app.client.request(method, path, data=b"{}")
    text = await resp.text()
    assert resp.status == status, text
    assert resp.content_type == "application/problem+json"
    assert json.loads(text)["status"] == status
    assert snapshot(app.redis) == app.before


# ---- stricter bodies (sidecar.api.bodies): types, declared lengths, duplicate keys ---------

# Every route that decodes a JSON body, with a body it would accept.
JSON_BODIES: dict[str, dict[str, Any]] = {
    "/v1/authorize": {"user_id": "u9", "estimated_usd": 0.01},
    "/v1/check": {"user_id": "u9", "estimated_usd": 0.01},
    "/v1/settle": {"reservation_id": HELD, "cost_usd": 0.01},
    "/v1/release": {"reservation_id": HELD},
    "/v1/record": {"user_id": "u9", "cost_usd": 0.01},
    "/api/policy/pre-check": {"client_id": "c", "query": "q", "context": {"user_id": "u9"}},
    "/api/v1/budgets/check": {"user_id": "u9"},
    "/api/v1/budgets": {"id": "new-b", "name": "N", "scope": "user", "limit_usd": 1.0,
                        "period": "daily"},
}  # fmt: skip


@pytest.mark.parametrize("media", ["text/plain", "application/x-www-form-urlencoded",
                                   "application/octet-stream", "multipart/form-data; boundary=x",
                                   "application/xml", "text/json"])  # fmt: skip
@pytest.mark.parametrize("path", list(JSON_BODIES))
async def test_a_body_that_is_not_declared_json_is_415(app: Seeded, path: str, media: str) -> None:
    """Even a body that would be accepted as JSON: the declared type is what is refused."""
    body = _resolve(JSON_BODIES[path], app)
    resp = await app.client.post(path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": media})  # fmt: skip
    problem = await assert_problem(resp, 415, "Content-Type")
    assert "application/json" in problem["detail"]
    assert snapshot(app.redis) == app.before


async def test_a_form_body_is_415_not_read(app: Seeded) -> None:
    resp = await app.client.post(
        "/v1/authorize",
        data=b"estimated_usd=0.1",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    await assert_problem(resp, 415, "Content-Type")
    assert snapshot(app.redis) == app.before


@pytest.mark.parametrize("media", [None, "application/json", "application/json; charset=utf-8",
                                   "Application/JSON", "application/problem+json"])  # fmt: skip
async def test_json_or_no_content_type_is_read_as_json(app: Seeded, media: str | None) -> None:
    """No Content-Type at all is read as JSON (minimal clients send none)."""
    headers = {} if media is None else {"Content-Type": media}
    resp = await app.client.post(
        "/v1/check", data=b'{"user_id":"u9","estimated_usd":0.01}', headers=headers,
        skip_auto_headers=["Content-Type"],
    )  # fmt: skip
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["allowed"] is True


async def _raw_exchange(app: Seeded, head: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `head` on a fresh connection and read one answer (the connection is closed
    after it, or the read stops at Content-Length)."""
    import asyncio

    server = app.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(head)
        await writer.drain()
        async with asyncio.timeout(60):  # only keeps a hang from hanging the suite
            status_line = await reader.readline()
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
    finally:
        writer.close()
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize("path", [*POST_ROUTES, "/api/policy/pre-check", "/api/v1/budgets"])
async def test_declared_length_over_the_limit_is_413_at_once(app: Seeded, path: str) -> None:
    """Content-Length 99999999999 and no body: answered 413 without waiting for the body
    (before, the 10 s body timer ran out first and answered 408)."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Length: 99999999999\r\n\r\n"
    ).encode()
    status, headers, body = await _raw_exchange(app, head)
    assert status == 413, body
    assert headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"  # the unread body is not drained
    assert json.loads(body)["field"] == "body"
    assert snapshot(app.redis) == app.before


async def test_declared_length_at_the_limit_is_read(app: Seeded) -> None:
    """The early 413 is for a length over the limit only: exactly the limit is read."""
    prefix = b'{"estimated_usd": -1'
    body = prefix + b" " * (MAX_BODY - len(prefix) - 1) + b"}"
    head = (
        f"POST /v1/check HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    status, _headers, answer = await _raw_exchange(app, head + body)
    assert status == 400 and json.loads(answer)["field"] == "estimated_usd", answer


DUPLICATES: dict[str, tuple[str, bytes, str]] = {
    # The issue's own case: judged at 999,999 before.
    "authorize-estimate": ("/v1/authorize",
                           b'{"estimated_usd":0.1,"estimated_usd":999999}', "estimated_usd"),
    "authorize-identity": ("/v1/authorize",
                           b'{"user_id":"u1","estimated_usd":0.1,"user_id":"u2"}', "user_id"),
    "check": ("/v1/check", b'{"org_id":"a","org_id":"b"}', "org_id"),
    "settle": ("/v1/settle",
               b'{"reservation_id":"<held>","cost_usd":0.01,"cost_usd":0.02}', "cost_usd"),
    "release": ("/v1/release", b'{"reservation_id":"<held>","reservation_id":"<held>"}',
                "reservation_id"),
    "record": ("/v1/record", b'{"cost_usd":0.01,"user_id":"u","cost_usd":5}', "cost_usd"),
    # Nested, in the free-form context a pre-check is judged by.
    "pre-check-context": ("/api/policy/pre-check",
                          b'{"query":"q","context":{"estimated_usd":0.01,"estimated_usd":50}}',
                          "estimated_usd"),
    "budgets-check": ("/api/v1/budgets/check", b'{"user_id":"a","user_id":"b"}', "user_id"),
    "create-budget": ("/api/v1/budgets",
                      b'{"id":"x","name":"N","scope":"user","limit_usd":1,"limit_usd":1e9,'
                      b'"period":"daily"}', "limit_usd"),
    # The same key written two ways (an escape) is the same key.
    "escaped": ("/v1/authorize", b'{"estimated_usd":0.1,"estimated_\\u0075sd":9}',
                "estimated_usd"),
    # Whitespace between key and colon.
    "spaced": ("/v1/check", b'{"team_id" :"a", "team_id"\n:"b"}', "team_id"),
    "empty-key": ("/v1/check", b'{"":1,"":2}', ""),
}  # fmt: skip


@pytest.mark.parametrize("case", list(DUPLICATES))
async def test_a_key_given_twice_is_400_naming_it(app: Seeded, case: str) -> None:
    path, body, key = DUPLICATES[case]
    body = body.replace(b"<held>", app.held_rid.encode())
    resp = await app.client.post(path, data=body, headers={"Content-Type": "application/json"})
    problem = await assert_problem(resp, 400, key)
    assert "twice" in problem["detail"]
    assert snapshot(app.redis) == app.before


async def test_the_same_key_in_two_objects_is_not_a_duplicate(app: Seeded) -> None:
    """`query` at the top and in the context: two objects, each with its own keys (the
    scan sees the same key string twice and the exact pass clears it)."""
    resp = await app.client.post(
        "/api/policy/pre-check",
        data=b'{"query":"q","client_id":"c","context":{"query":"x","client_id":"c",'
        b'"user_id":"u9"}}',
        headers={"Content-Type": "application/json"},
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["approved"] is True


async def test_a_duplicate_inside_a_string_value_is_not_a_key(app: Seeded) -> None:
    """Key-like text inside a string is a value: `"a\\":1,\\"a\\":` holds no key."""
    body = b'{"query":"q\\"client_id\\":","client_id":"c","context":{"user_id":"u9"}}'
    resp = await app.client.post("/api/policy/pre-check", data=body,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    assert resp.status == 200, await resp.text()


async def test_corrupt_gzip_body_is_400(app: Seeded) -> None:
    """A body that claims gzip but is not: bad input (400 naming the body), not a 500."""
    resp = await app.client.post(
        "/v1/authorize",
        data=b"definitely not gzip",
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    await assert_problem(resp, 400, "body")
    assert snapshot(app.redis) == app.before


# ---- random objects ------------------------------------------------------------------------

AUTH_FIELDS = [
    "org_id",
    "team_id",
    "agent_id",
    "workflow_id",
    "user_id",
    "provider",
    "model",
    "estimated_usd",
    "estimated_tokens_in",
    "estimated_tokens_out",
    "lease_ms",
    "idempotency_key",
    "run_id",
    "step_id",
]
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(["u1", "team-a", "openai", "gpt-4o", "gpt-9", "a{b", "a|b", "x"]),
    st.integers(min_value=0, max_value=200_000),
    st.floats(min_value=0, max_value=2),
)
_values = st.one_of(
    _scalars,
    st.lists(_scalars, max_size=3),
    st.dictionaries(st.text(max_size=5), _scalars, max_size=2),
)
# Unknown keys that are empty or hold a backtick are misnamed today; the explicit cases
# unknown-field-empty-name and unknown-field-backtick pin that, so they are left out here.
_keys = st.text(min_size=1, max_size=10).filter(lambda k: "`" not in k)
_objects = st.dictionaries(st.one_of(st.sampled_from(AUTH_FIELDS), _keys), _values, max_size=6)


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=_objects)
async def test_random_objects_on_authorize(app: Seeded, body: dict[str, Any]) -> None:
    before = snapshot(app.redis)
    resp = await post(app, "/v1/authorize", body)
    text = await resp.text()
    assert resp.status in (200, 400), text
    if resp.status == 200:
        decision = json.loads(text)
        assert isinstance(decision["allowed"], bool) and decision["degraded"] is False
        return
    field = json.loads(text).get("field")
    # The field named is one the body has, or the estimate / model it lacks.
    assert field in {*body, "estimated_usd", "model", "body"}, (text, body)
    await assert_problem(resp, 400, field)
    assert snapshot(app.redis) == before
