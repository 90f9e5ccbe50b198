"""The Lua scripts themselves, on a real redis-server: documented headers, the SHA1 the
sidecar computes, recovery from an empty script cache, and the Lua helpers agreeing with
their Python twins (sidecar.money.cost_micro, sidecar.decision.over)."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence
from fractions import Fraction
from math import ceil
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.decision import over
from sidecar.money import cost_micro
from sidecar.scripts import _HELPER, OPERATIONS, STANDALONE, Scripts, library_for
from tests.conftest import ClientFactory
from tests.harness import REPO, RedisServer

# These tests count, they never time: a generous store timeout so that a loaded machine
# cannot turn a slow answer into a 503 (after which the script may still have run).
STORE_TIMEOUT_MS = 60_000
LUA = REPO / "lua"
LUA_FILES = sorted(LUA.glob("*.lua"))
LIB = (LUA / "_lib.lua").read_text()

MAX_TOKENS = 100_000_000  # schemas.Tokens
MAX_PICO = 1_000_000_000_000  # config.PricePer1k (1000 USD per 1k) in pico-USD per token

# Helpers of _lib.lua called on their own. The result goes back as a %.17g string: a Lua
# number returned as is would be truncated to an integer reply, hiding a fraction.
COST_SNIPPET = "\nreturn string.format('%.17g', cost_micro(tonumber(ARGV[1]), tonumber(ARGV[2])))"
OVER_SNIPPET = (
    "\nreturn over(tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]))"
    " and 1 or 0"
)


# ---- headers -------------------------------------------------------------------------------


def test_the_lua_folder_holds_the_library_and_every_operation() -> None:
    names = {p.stem for p in LUA_FILES}
    assert names == {"_lib", *OPERATIONS, *STANDALONE}


@pytest.mark.parametrize("path", LUA_FILES, ids=[p.name for p in LUA_FILES])
def test_every_script_documents_keys_argv_and_returns(path: Path) -> None:
    head = path.read_text().splitlines()[:15]
    comments = [line for line in head if line.startswith("--")]
    text = "\n".join(comments)
    for word in ("KEYS", "ARGV", "Returns"):
        assert re.search(rf"\b{word}\b", text), f"{path.name}: no {word} in its header"
    # The header comes first: the file opens with a comment naming itself.
    assert head[0].startswith(f"-- {path.name}"), head[0]


# ---- SHA1 and the script cache ---------------------------------------------------------------


def test_computed_sha_is_what_script_load_returns(redis_client: redis.Redis) -> None:
    redis_client.script_flush()
    scripts = list(Scripts.load_all())
    assert [s.name for s in scripts] == list(OPERATIONS)
    for s in scripts:
        operation = (LUA / f"{s.name}.lua").read_text()
        assert s.source == library_for(LIB, operation) + "\n" + operation
        assert redis_client.script_exists(s.sha) == [False]
        assert redis_client.script_load(s.source) == s.sha, s.name
    assert redis_client.script_exists(*(s.sha for s in scripts)) == [True] * len(scripts)
    assert len({s.sha for s in scripts}) == len(scripts)


def _helpers(text: str) -> set[str]:
    return {m.group(1) or m.group(2) for m in _HELPER.finditer(text)}


def test_each_script_keeps_every_helper_it_names_and_only_those() -> None:
    """A script carries the helpers of _lib.lua it calls (sidecar.scripts.library_for): none
    it names is left out (Redis would fail the call that reaches it), and the lines that
    are not helpers (the constants) are all kept."""
    every = _helpers(LIB)
    assert len(every) >= 40  # the pattern finds the helpers at all
    kept_by = {}
    for s in Scripts.load_all():
        kept = _helpers(s.source)
        # every helper name in the script's code (its comments and the bare declaration
        # "local charge_at_end" left out) is defined in it
        code = re.sub(r"(?m)^local [A-Za-z_]\w*$", "", re.sub(r"[ \t]*--[^\n]*", "", s.source))
        named = set(re.findall(r"[A-Za-z_]\w*", code))
        assert (named & every) <= kept, (s.name, sorted((named & every) - kept))
        for line in LIB.splitlines():
            if line.startswith(("local ", "charge_at_end")) and "function" not in line:
                assert line in s.source, (s.name, line)
        kept_by[s.name] = kept
    # What a settle does not call is not made at every settle: the guards' helpers.
    assert {"loop_read", "loop_write", "rate_eval", "active_stop"} <= every - kept_by["settle"]
    assert kept_by["settle"] >= {"charge", "ledger", "learn", "reclaim", "collect", "check_alerts"}


DOC: dict[str, Any] = {
    "budgets": [
        {"id": "user", "name": "Each user", "scope": "user", "limit_usd": 1, "period": "daily"},
    ],
}
U1 = "user/u1/d20260310"  # the fake clock's day, conftest.T0_MS


def _flush(client: redis.Redis) -> None:
    """Both caches gone: the scripts' (SCRIPT FLUSH) and the function library's."""
    client.script_flush()
    client.execute_command("FUNCTION", "FLUSH")


async def test_every_operation_recovers_after_script_flush(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(DOC, timeout_ms=STORE_TIMEOUT_MS)
    ctr = "bs:{default}:ctr"
    calls: list[tuple[str, str, dict[str, Any] | None]] = [
        ("POST", "/v1/authorize", {"user_id": "u1", "estimated_usd": 0.5}),
        ("POST", "/v1/check", {"user_id": "u1", "estimated_usd": 0.1}),
        ("POST", "/v1/record", {"user_id": "u1", "cost_usd": 0.01}),
        ("GET", "/v1/budgets/user/status?scope_id=u1", None),
        ("POST", "/v1/authorize", {"user_id": "u1", "estimated_usd": 0.2}),
    ]
    rids = []
    for method, path, body in calls:
        _flush(redis_client)
        r = await (client.get(path) if method == "GET" else client.post(path, json=body))
        assert r.status == 200, (path, await r.text())
        d = await r.json()
        if path == "/v1/authorize":
            assert d["allowed"] is True
            rids.append(d["reservation_id"])
    assert redis_client.hget(ctr, f"h:{U1}") == "700000"

    _flush(redis_client)
    r = await client.post("/v1/settle", json={"reservation_id": rids[0], "cost_usd": 0.3})
    assert r.status == 200 and (await r.json())["replayed"] is False
    _flush(redis_client)
    r = await client.post("/v1/release", json={"reservation_id": rids[1]})
    assert r.status == 200 and (await r.json())["replayed"] is False
    # Each call ran once: nothing was charged or returned twice by a retried script.
    assert redis_client.hget(ctr, f"u:{U1}") == "310000"
    assert redis_client.hget(ctr, f"h:{U1}") is None  # a hold back at zero is deleted
    # Every call loaded the library again (Redis 7), none went by EVAL: no script cached.
    every = Scripts.load_all()
    assert redis_client.script_exists(*(s.sha for s in every)) == [False] * len(OPERATIONS)
    assert [lib[1] for lib in redis_client.function_list()] == [every.settle.library.name]


# ---- cost_micro -------------------------------------------------------------------------------


def exact_cost(tokens: int, pico: int) -> int:
    """The definition: tokens * pico-USD, rounded up to a whole micro-USD."""
    return ceil(Fraction(tokens * pico, 1_000_000))


def lua_eval(
    client: redis.Redis, snippet: str, rows: Sequence[Sequence[int]], batch: int = 2000
) -> list[Any]:
    sha = client.script_load(LIB + snippet)
    out: list[Any] = []
    for start in range(0, len(rows), batch):
        pipe = client.pipeline(transaction=False)
        for row in rows[start : start + batch]:
            pipe.evalsha(sha, 0, *row)
        out += pipe.execute()
    return out


def edge_pairs() -> Iterator[tuple[int, int]]:
    tokens = [0, 1, 2, 3, 7, 999, 1000, 1001, 999_999, 1_000_000, 1_000_001, 99_999_999]
    tokens += [MAX_TOKENS]
    prices = [0, 1, 2, 37_500, 999_999, 1_000_000, 1_000_001, 2_500_000, 10_000_000]
    prices += [123_456_789, 999_999_999_999, MAX_PICO - 1_000_000, MAX_PICO - 1, MAX_PICO]
    for t in tokens:
        for p in prices:
            yield t, p


def random_pairs(rng: random.Random, n: int) -> Iterator[tuple[int, int]]:
    for _ in range(n):
        shape = rng.random()
        if shape < 0.3:
            yield rng.randint(0, MAX_TOKENS), rng.randint(0, MAX_PICO)
        elif shape < 0.7:  # log-uniform: small values as often as large ones
            yield int(10 ** rng.uniform(0, 8)), int(10 ** rng.uniform(0, 12))
        else:  # prices one off a whole micro-USD, where the split in the Lua code matters
            q = rng.randint(0, MAX_PICO // 1_000_000 - 1)
            yield rng.randint(0, MAX_TOKENS), q * 1_000_000 + rng.choice([0, 1, 999_999])


def lua_costs(client: redis.Redis, pairs: Sequence[tuple[int, int]]) -> list[int]:
    return [int(v) for v in lua_eval(client, COST_SNIPPET, pairs)]


def test_cost_micro_lua_equals_python(redis_client: redis.Redis) -> None:
    pairs = [*edge_pairs(), *random_pairs(random.Random(1_000_003), 20_000)]
    got = lua_costs(redis_client, pairs)
    mismatches = [
        (t, p, lua, cost_micro(t, p), exact_cost(t, p))
        for (t, p), lua in zip(pairs, got, strict=True)
        if not lua == cost_micro(t, p) == exact_cost(t, p)
    ]
    assert not mismatches, mismatches[:10]
    assert max(got) == MAX_TOKENS * MAX_PICO // 1_000_000  # the largest case was reached


@settings(max_examples=150, deadline=None, database=None)
@given(
    st.lists(
        st.tuples(st.integers(0, MAX_TOKENS), st.integers(0, MAX_PICO)), min_size=1, max_size=40
    )
)
def test_cost_micro_lua_equals_python_hypothesis(
    redis_server: RedisServer, pairs: list[tuple[int, int]]
) -> None:
    with redis_server.client() as client:
        got = lua_costs(client, pairs)
    assert got == [cost_micro(t, p) for t, p in pairs]
    assert got == [exact_cost(t, p) for t, p in pairs]


# ---- over -----------------------------------------------------------------------------------


def over_rows(rng: random.Random, n: int) -> Iterator[tuple[int, int, int, int]]:
    for _ in range(n):
        top = rng.choice([10, 1_000, 10**6, 10**12, 10**15])
        used, held = rng.randint(0, top), rng.randint(0, top)
        est = 0 if rng.random() < 0.3 else rng.randint(1, top)
        roll = rng.random()
        if roll < 0.6:  # at, just under, and just over the limit
            limit = max(0, used + held + est + rng.choice([-2, -1, 0, 1, 2]))
        elif roll < 0.7:
            limit = 0
        else:
            limit = rng.randint(0, 3 * top)
        yield used, held, est, limit


def test_over_lua_equals_python(redis_client: redis.Redis) -> None:
    rows = [
        (0, 0, 0, 0),
        (0, 0, 0, 1),
        (0, 0, 1, 0),
        (0, 0, 1, 1),
        (1, 0, 0, 1),
        (0, 1, 0, 1),
        (5, 5, 0, 10),
        (5, 5, 1, 10),
        (5, 4, 1, 10),
        (10**15, 10**15, 10**15, 3 * 10**15),
        (10**15, 10**15, 10**15, 3 * 10**15 - 1),
        *over_rows(random.Random(424_242), 5_000),
    ]
    got = [bool(v) for v in lua_eval(redis_client, OVER_SNIPPET, rows)]
    want = [over(*row) for row in rows]
    mismatches = [(row, g, w) for row, g, w in zip(rows, got, want, strict=True) if g != w]
    assert not mismatches, mismatches[:10]
    assert any(want) and not all(want)
