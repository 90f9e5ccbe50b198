"""Key names (sidecar/keys.py): one Redis Cluster hash tag per tenant whatever its name,
an injective escape, counter ids that round-trip and never collide, and, after real
authorize calls, nothing in Redis outside the tenant's slot (invariant 6)."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

import msgspec
import pytest
import redis
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from sidecar.clock import FakeClock
from sidecar.engine import Engine
from sidecar.keys import counter_id, escape, parse_counter_id, tenant_keys
from sidecar.schemas import AuthorizeRequest, SettleRequest
from sidecar.scripts import Scripts
from sidecar.store import RedisStore
from tests.conftest import ClientFactory, make_config
from tests.harness import RedisServer

HOSTILE_TENANTS = [
    "default",
    "",
    "{",
    "}",
    "{}",
    "}{",
    "a{b}c",
    "{tenant}",
    "bs:{x}:ctr",
    "a:b:c",
    ":",
    "line\nbreak",
    "cr\r\nlf",
    "tab\there",
    "  spaces  ",
    " ",
    "nul\x00byte",
    "ünïcødé 租户 🚀",
    "e\u0301",  # decomposed é
    "%",
    "%7B",
    "%25",
    "a|b,c/d",
    "x" * 10_240,
    "{" * 10_240,
    "{}" * 5_120,
    "é" * 5_120,
]

# Everything escape() may emit: the unreserved set plus '%' (of %XX).
ESCAPED_ALPHABET = re.compile(r"^[A-Za-z0-9._~@+%\-]+$")
FORBIDDEN = set("{}|,/") | {" ", "\t", "\n", "\r", "\x0b", "\x0c"}


def slot(key: str) -> int:
    return key_slot(key.encode("utf-8"))


def hash_tag(key: str) -> str:
    """What Redis Cluster hashes: the text between the first '{' and the next '}'."""
    start = key.index("{")
    end = key.index("}", start + 1)
    assert end > start + 1, f"empty hash tag in {key!r}"
    return key[start + 1 : end]


def assert_one_tag(tenant: str) -> None:
    tk = tenant_keys(tenant)
    tag = escape(tenant)
    assert tk.tenant == tenant
    assert tk.hot == (tk.counters, tk.leases, tk.reservations, tk.gc)
    assert len(set(tk.hot)) == 4
    for key in tk.hot:
        assert key.startswith(f"bs:{{{tag}}}:")
        assert hash_tag(key) == tag
    assert {slot(k) for k in tk.hot} == {slot(tag)}


# ---- tenant keys --------------------------------------------------------------------------


@pytest.mark.parametrize("tenant", HOSTILE_TENANTS, ids=lambda t: repr(t)[:40])
def test_every_tenant_key_carries_one_hash_tag(tenant: str) -> None:
    assert_one_tag(tenant)


def test_tenant_key_names_are_exact() -> None:
    tk = tenant_keys("acme")
    assert tk.hot == ("bs:{acme}:ctr", "bs:{acme}:lease", "bs:{acme}:res", "bs:{acme}:gc")
    assert tenant_keys("a{b}").counters == "bs:{a%7Bb%7D}:ctr"
    assert tenant_keys("").counters == "bs:{%}:ctr"


def test_hostile_tenants_never_share_keys() -> None:
    seen: dict[str, str] = {}
    for tenant in HOSTILE_TENANTS:
        for key in tenant_keys(tenant).hot:
            assert key not in seen, f"{tenant!r} and {seen[key]!r} share {key!r}"
            seen[key] = tenant


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_tenant_maps_all_keys_to_one_slot(tenant: str) -> None:
    assert_one_tag(tenant)


# ---- escape -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "component", ["b1", "team-1", "A.z_0~9", "user@example.com", "a+b", "-", "~", "."]
)
def test_escape_leaves_safe_identifiers_alone(component: str) -> None:
    assert escape(component) == component


@pytest.mark.parametrize(
    ("component", "escaped"),
    [
        ("", "%"),
        ("%", "%25"),
        ("{", "%7B"),
        ("}", "%7D"),
        ("a b", "a%20b"),
        ("a/b", "a%2Fb"),
        ("a|b", "a%7Cb"),
        ("a,b", "a%2Cb"),
        ("a:b", "a%3Ab"),
        ("\n", "%0A"),
        ("é", "%C3%A9"),
        # Once a component needs escaping, '@' and '+' are escaped too.
        ("a@b c", "a%40b%20c"),
    ],
)
def test_escape_exact(component: str, escaped: str) -> None:
    assert escape(component) == escaped


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("", "%"),
        ("%", "%25"),
        ("a b", "a+b"),
        ("a b", "a%20b"),
        ("@", "%40"),
        ("A", "%41"),
        ("é", "e\u0301"),
        ("{x}", "%7Bx%7D"),
        ("a/b", "a%2Fb"),
    ],
)
def test_escape_keeps_lookalikes_apart(a: str, b: str) -> None:
    assert escape(a) != escape(b)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=100))
def test_escape_output_is_safe_and_decodes_back(component: str) -> None:
    out = escape(component)
    assert out != ""
    assert ESCAPED_ALPHABET.fullmatch(out)
    assert not FORBIDDEN & set(out)
    assert not any(c.isspace() for c in out)
    if component:
        # A left inverse exists, so escape is injective on non-empty strings...
        assert unquote(out, errors="strict") == component
    else:
        assert out == "%"


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=100))
def test_only_the_empty_string_escapes_to_a_bare_percent(component: str) -> None:
    # ...and the empty string's "%" is not the escape of anything else.
    assert escape(component) != "%"


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=30), st.text(max_size=30))
def test_escape_is_injective(a: str, b: str) -> None:
    assume(a != b)
    assert escape(a) != escape(b)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet="{}%/ :@+aé\n", max_size=6), min_size=2, max_size=30))
def test_escape_is_injective_on_collision_prone_alphabet(components: list[str]) -> None:
    distinct = set(components)
    assert len({escape(c) for c in distinct}) == len(distinct)


# ---- counter ids --------------------------------------------------------------------------

WINDOW_KEYS = ["d20260310", "d20260311", "w20260309", "m20260301", "q20260101", "y20260101"]
component = st.text(min_size=1, max_size=40)


@pytest.mark.parametrize(
    ("budget_id", "entity", "window_key", "cid"),
    [
        ("b1", "team-1", "m20261101", "b1/team-1/m20261101"),
        ("org", "a/b", "d20260310", "org/a%2Fb/d20260310"),
        ("org", "x,y|z", "d20260310", "org/x%2Cy%7Cz/d20260310"),
    ],
)
def test_counter_id_exact(budget_id: str, entity: str, window_key: str, cid: str) -> None:
    assert counter_id(budget_id, entity, window_key) == cid
    assert parse_counter_id(cid) == (budget_id, entity, window_key)


@settings(max_examples=500, deadline=None)
@given(component, component, st.sampled_from(WINDOW_KEYS))
def test_counter_id_round_trips(budget_id: str, entity: str, window_key: str) -> None:
    cid = counter_id(budget_id, entity, window_key)
    assert cid.count("/") == 2
    # ',' and '|' separate cids and fields of a reservation record in Lua.
    assert not set(cid) & {",", "|", "{", "}", " ", "\n"}
    assert parse_counter_id(cid) == (budget_id, entity, window_key)


def test_counter_id_round_trips_the_empty_entity() -> None:
    # escape("") is "%" so that the empty string has a name of its own; parsing must map
    # it back to "" (today it returns "%", the name of the string "%" unescaped).
    assert parse_counter_id(counter_id("b1", "", "d20260310")) == ("b1", "", "d20260310")


@settings(max_examples=500, deadline=None)
@given(
    st.tuples(component, component, st.sampled_from(WINDOW_KEYS)),
    st.tuples(component, component, st.sampled_from(WINDOW_KEYS)),
)
def test_distinct_identities_never_share_a_counter(
    first: tuple[str, str, str], second: tuple[str, str, str]
) -> None:
    assume(first != second)
    assert counter_id(*first) != counter_id(*second)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("a/b", "c", "d20260310"), ("a", "b/c", "d20260310")),
        (("a", "b/d20260310", "d20260310"), ("a/b", "d20260310", "d20260310")),
        (("b1", "x", "d20260310"), ("b1", "x", "d20260311")),
        (("b1", "x", "d20260310"), ("b2", "x", "d20260310")),
        (("b1", "x", "d20260310"), ("b1", "y", "d20260310")),
        (("b1", "x y", "d20260310"), ("b1", "x+y", "d20260310")),
        (("b1", "x%2Fy", "d20260310"), ("b1", "x/y", "d20260310")),
        # A per-day and a per-month counter of the same budget and entity.
        (("b1", "x", "d20260301"), ("b1", "x", "m20260301")),
    ],
)
def test_lookalike_identities_get_distinct_counters(
    first: tuple[str, str, str], second: tuple[str, str, str]
) -> None:
    assert counter_id(*first) != counter_id(*second)


# ---- through Redis ------------------------------------------------------------------------

STACKED: dict[str, Any] = {
    "budgets": [
        {"id": "org", "name": "Org", "scope": "organization", "limit_usd": 100.0,
         "period": "monthly"},
        {"id": "team", "name": "Team", "scope": "team", "limit_usd": 50.0, "period": "weekly"},
        {"id": "agent", "name": "Agent", "scope": "agent", "limit_usd": 20.0,
         "period": "daily"},
        {"id": "flow", "name": "Workflow", "scope": "workflow", "limit_usd": 10.0,
         "period": "quarterly", "timezone": "Europe/Berlin"},
        {"id": "user", "name": "User", "scope": "user", "limit_usd": 5.0, "period": "yearly"},
        {"id": "one-team", "name": "Team t@1", "scope": "team", "scope_id": "t@1",
         "limit_usd": 7.0, "period": "daily"},
    ]
}  # fmt: skip

IDENTITY = {
    "org_id": "acme",
    "team_id": "t@1",
    "agent_id": "agent+7",
    "workflow_id": "wf.~x",
    "user_id": "u-1@example.com",
}

# The clock of the fixtures reads 2026-03-10T12:00:00Z, a Tuesday.
EXPECTED_CIDS = {
    "org/acme/m20260301",
    "one-team/t@1/d20260310",
    "team/t@1/w20260309",
    "agent/agent+7/d20260310",
    "flow/wf.~x/q20260101",
    "user/u-1@example.com/y20260101",
}


def all_keys(client: redis.Redis) -> list[str]:
    """Every key but the state marker (sidecar.state_loss): a background check writes it
    once the tenant holds something, at a moment these tests do not control."""
    return sorted(k for k in client.scan_iter(match="*", count=1000) if not k.endswith(":epoch"))


async def test_stacked_authorize_keeps_every_key_in_the_tenant_slot(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(STACKED)
    r = await client.post("/v1/authorize", json={**IDENTITY, "estimated_usd": 0.5})
    assert r.status == 200
    d = await r.json()
    assert d["allowed"] is True
    assert len(d["budgets"]) == 6

    found = all_keys(redis_client)
    tk0 = tenant_keys("default")
    # No gc key: counters have no index (the sweep walks ctr, issue 16).
    assert found == sorted([tk0.counters, tk0.leases, tk0.reservations])
    for key in found:
        assert hash_tag(key) == "default"
    assert {slot(k) for k in found} == {slot("default")}
    fields = redis_client.hgetall("bs:{default}:ctr")
    assert fields == {f"h:{cid}": "500000" for cid in EXPECTED_CIDS}

    assert redis_client.zcard("bs:{default}:gc") == 0

    # Settling touches nothing outside the tag either (and empties the lease set, which
    # Redis then deletes).
    s = await client.post(
        "/v1/settle", json={"reservation_id": d["reservation_id"], "cost_usd": 0.25}
    )
    assert s.status == 200
    found = all_keys(redis_client)
    tk = tenant_keys("default")
    # ... and the settle's usage record and the day's usage totals, in the tenant's slot.
    assert found == sorted(
        [
            tk.counters,
            tk.reservations,
            tk.gc,
            tk.usage,
            tk.usage_day("20260310"),
            tk.user_day("20260310"),
        ]
    )
    assert {slot(k) for k in found} == {slot("default")}
    fields = redis_client.hgetall("bs:{default}:ctr")
    assert {k: v for k, v in fields.items() if k.startswith("u:")} == {
        f"u:{cid}": "250000" for cid in EXPECTED_CIDS
    }


@pytest.mark.parametrize(
    "tenant",
    ["evil{tenant}", "}{", "a:b\nc d", "租户 🚀", "x" * 10_240],
    ids=lambda t: repr(t)[:20],
)
async def test_hostile_tenant_stays_in_its_own_slot(
    redis_server: RedisServer, redis_client: redis.Redis, clock: FakeClock, tenant: str
) -> None:
    store = RedisStore.from_url(redis_server.url, timeout_ms=2000)
    engine = Engine(make_config(STACKED), store, clock, Scripts.load_all())
    try:
        req = msgspec.convert({**IDENTITY, "estimated_usd": 0.5}, AuthorizeRequest)
        mine = await engine.authorize(tenant, req)
        theirs = await engine.authorize("default", req)
        assert mine.allowed and theirs.allowed
        # Separate tenants, separate counters: each saw nothing held before its own hold.
        assert [b.held_usd for b in mine.budgets] == [0.5] * 6
        assert [b.held_usd for b in theirs.budgets] == [0.5] * 6
        assert mine.reservation_id is not None
        settled = await engine.settle(
            tenant, SettleRequest(reservation_id=mine.reservation_id, cost_usd=0.125)
        )
        assert settled.state == "settled"
        assert [b.used_usd for b in settled.budgets] == [0.125] * 6
    finally:
        await store.close()

    found = all_keys(redis_client)
    # Mine was settled, so its lease set is empty and gone; theirs is still held.
    mine_keys = tenant_keys(tenant)
    expected_mine = {
        mine_keys.counters,
        mine_keys.reservations,
        mine_keys.gc,
        mine_keys.usage,
        mine_keys.usage_day("20260310"),
        mine_keys.user_day("20260310"),
    }
    theirs = tenant_keys("default")
    expected_theirs = {theirs.counters, theirs.leases, theirs.reservations}
    assert set(found) == expected_mine | expected_theirs
    tag = escape(tenant)
    for key in expected_mine:
        assert hash_tag(key) == tag
    assert {slot(k) for k in mine_keys.hot} == {slot(tag)}
    assert {slot(k) for k in expected_theirs} == {slot("default")}
    fields = redis_client.hgetall(tenant_keys(tenant).counters)
    assert {k for k in fields if k.startswith("u:")} == {f"u:{c}" for c in EXPECTED_CIDS}
