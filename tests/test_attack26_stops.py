"""Attacks on the stop switch, on real redis-servers: a tenant flooding it with stops (a
cap, 409 past it; pages of GET /v1/stops; the decision's Redis commands the same with 0 or
thousands of stops), stops across replicas whose Redis connection is cut mid-call,
entity ids at and past the edges of the alphabet and the length, the hierarchy below a
stopped org, a lift on one replica while another decides, and ttls at their boundaries.
Every count is exact."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
import redis

from sidecar import keys
from sidecar.api.app import ENGINE, STATE_WATCH, STORE
from sidecar.definitions import DefinitionWatcher
from sidecar.resp import ConnectionLost, PipelinedConnection
from sidecar.scripts import Scripts
from sidecar.state_loss import StateWatch
from sidecar.sweep import Sweeper
from tests.conftest import T0_MS, ClientFactory
from tests.harness import RedisServer
from tests.inprocess import app_over, call
from tests.test_redis_fault_attacks import FaultProxy, proxy

__all__ = ["proxy"]  # the fixture, used by name

TK = keys.tenant_keys("default")
STOP = {"scope": "agent", "scope_id": "a1", "reason": "runaway"}
BUDGET = {"id": "org", "name": "Org", "scope": "organization", "limit_usd": 1000,
          "period": "daily", "alert_thresholds": []}  # fmt: skip


def doc(**settings: Any) -> dict[str, Any]:
    return {"budgets": [BUDGET], "settings": settings}


def seed(r: redis.Redis, n: int, *, prefix: str = "seed", ttl_ms: int = 0) -> None:
    """`n` stops written by stops.lua itself (as a sidecar before the cap would have),
    one script call each, no cap."""
    script = Scripts.load_all().stops
    sha = r.script_load(script.source)
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        entity = f"{prefix}-{i:05d}"
        pipe.evalsha(sha, 3, TK.stops, TK.alerts, TK.counters, "create", T0_MS,
                     keys.stop_field("agent", entity), f"stop_{prefix}{i:011x}"[:21],
                     ttl_ms, "seeded", "agent", entity, 10**6)  # fmt: skip
    pipe.execute()


def commands(r: redis.Redis) -> dict[str, int]:
    """Calls per command since the last reset (scripts' own redis.call()s included)."""
    stats: dict[str, Any] = r.info("commandstats")  # type: ignore[assignment]
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


@pytest.fixture
def quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    """No background loop after start-up (the sweep, the state check, the definitions'
    poll): Redis's command counts are then the test's calls' alone."""

    async def idle(self: object) -> None:
        await asyncio.Event().wait()

    for loop in (Sweeper, StateWatch, DefinitionWatcher):
        monkeypatch.setattr(loop, "run", idle)


# ---- a flood of stops: the cap ----------------------------------------------------------------


async def test_a_tenant_has_at_most_max_stops_in_force(
    make_client: ClientFactory, redis_client: redis.Redis, clock: Any
) -> None:
    client = await make_client(doc(max_stops=5))
    made = []
    for i in range(5):
        resp = await client.post("/v1/stops", json={**STOP, "scope_id": f"a{i}", "ttl_s": 60})
        assert resp.status == 201, await resp.text()
        made.append(await resp.json())
    resp = await client.post("/v1/stops", json={**STOP, "scope_id": "one-too-many"})
    problem = await resp.json()
    assert resp.status == 409 and resp.content_type == "application/problem+json", problem
    assert problem["field"] == "scope_id" and "max_stops" in problem["detail"], problem
    # Nothing written: 5 stops (two fields each), 5 mirrors, 5 alerts.
    assert len(redis_client.hgetall(TK.stops)) == 10
    mirrors = [f for f in redis_client.hkeys(TK.counters) if f.startswith("s:")]
    assert len(mirrors) == 5
    assert redis_client.xlen(TK.alerts) == 5
    # A stopped entity stopped again replaces its own stop: allowed at the cap.
    resp = await client.post("/v1/stops", json={**STOP, "scope_id": "a0", "reason": "again"})
    assert resp.status == 201
    assert len(redis_client.hgetall(TK.stops)) == 10
    # A lift frees a place for exactly one.
    assert (await client.delete(f"/v1/stops/{made[1]['id']}")).status == 204
    statuses = [
        (await client.post("/v1/stops", json={**STOP, "scope_id": f"b{i}"})).status
        for i in range(3)
    ]
    assert statuses == [201, 409, 409]
    # Ended stops (the ttl of a2..a4) are no longer in force: their places are free at
    # once, without waiting for a list or the sweep to collect them.
    clock.advance(60_000)
    statuses = [
        (await client.post("/v1/stops", json={**STOP, "scope_id": f"c{i}"})).status
        for i in range(4)
    ]
    assert statuses == [201, 201, 201, 409]
    listed = (await (await client.get("/v1/stops")).json())["stops"]
    assert sorted(s["scope_id"] for s in listed) == ["a0", "b0", "c0", "c1", "c2"]
    # The three ended stops were collected by the creates that met them.
    assert len(redis_client.hgetall(TK.stops)) == 10


async def test_a_tenant_over_the_cap_is_refused_after_one_scan_step(
    quiet: None, make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """A tenant that had 300 stops before a cap of 5 (made by an older version): a create
    is refused after one HSCAN step (5 found in force), not a walk of all 600 fields."""
    seed(redis_client, 300)
    client = await make_client(doc(max_stops=5))
    redis_client.config_resetstat()
    resp = await client.post("/v1/stops", json={**STOP, "scope_id": "new"})
    assert resp.status == 409
    calls = commands(redis_client)
    assert calls.get("hscan") == 1, calls
    assert "hgetall" not in calls and "hkeys" not in calls, calls
    assert len(redis_client.hgetall(TK.stops)) == 600
    # Replacing one of those 300 is still allowed (the entity has its own to replace).
    resp = await client.post("/v1/stops", json={**STOP, "scope_id": "seed-00007"})
    assert resp.status == 201
    assert len(redis_client.hgetall(TK.stops)) == 600


def test_max_stops_is_validated_naming_the_field() -> None:
    from sidecar import config as config_mod
    from sidecar.config import ConfigError

    for bad in (0, -1, 10_001, "many", 1.5):
        with pytest.raises(ConfigError, match="max_stops"):
            config_mod.parse(doc(max_stops=bad), "<test>")
    assert config_mod.parse(doc(max_stops=1), "<t>").settings.max_stops == 1
    assert config_mod.parse(doc(), "<t>").settings.max_stops == 1_000


# ---- a flood of stops: pages ------------------------------------------------------------------


async def pages(client: Any, limit: int) -> list[list[dict[str, Any]]]:
    out: list[list[dict[str, Any]]] = []
    path = f"/v1/stops?limit={limit}"
    while True:
        resp = await client.get(path)
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        out.append(body["stops"])
        if "next_cursor" not in body:
            return out
        assert set(body) == {"stops", "next_cursor"}
        path = f"/v1/stops?limit={limit}&cursor={body['next_cursor']}"


async def test_stops_come_a_page_at_a_time_in_the_lists_order(
    make_client: ClientFactory, redis_client: redis.Redis, clock: Any
) -> None:
    client = await make_client(doc())
    for i in range(7):
        clock.advance(1)  # oldest first: a0 .. a6
        assert (await client.post("/v1/stops", json={**STOP, "scope_id": f"a{i}"})).status == 201
    whole = (await (await client.get("/v1/stops")).json())
    assert set(whole) == {"stops"} and len(whole["stops"]) == 7  # one page by default
    got = await pages(client, 3)
    assert [len(p) for p in got] == [3, 3, 1]
    assert [s for p in got for s in p] == whole["stops"]
    assert [len(p) for p in await pages(client, 7)] == [7]
    assert [len(p) for p in await pages(client, 1)] == [1] * 7

    # Between two pages one stop of the first page is lifted and a new one made: the
    # second page starts where the first ended (nothing repeated, nothing skipped), and
    # the new one comes last.
    first = await (await client.get("/v1/stops?limit=3")).json()
    assert (await client.delete(f"/v1/stops/{first['stops'][0]['id']}")).status == 204
    clock.advance(1)
    assert (await client.post("/v1/stops", json={**STOP, "scope_id": "late"})).status == 201
    rest = await (await client.get(f"/v1/stops?limit=3&cursor={first['next_cursor']}")).json()
    assert [s["scope_id"] for s in rest["stops"]] == ["a3", "a4", "a5"]
    last = await (await client.get(f"/v1/stops?limit=3&cursor={rest['next_cursor']}")).json()
    assert [s["scope_id"] for s in last["stops"]] == ["a6", "late"] and "next_cursor" not in last


async def test_bad_page_parameters_are_400_naming_the_field(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(doc())
    assert (await client.post("/v1/stops", json=STOP)).status == 201
    for query, field in (
        ("limit=0", "limit"), ("limit=1001", "limit"), ("limit=-1", "limit"),
        ("limit=x", "limit"), ("limit=1.5", "limit"), ("limit=", "limit"),
        ("cursor=", "cursor"), ("cursor=nope", "cursor"), ("cursor=12.galaxy:a1", "cursor"),
        ("cursor=12.agent:a%7Bb", "cursor"), ("cursor=x.agent:a1", "cursor"),
        ("cursor=1" + "0" * 16 + ".agent:a1", "cursor"), ("cursor=12.agent:", "cursor"),
        ("cursor=12.agent:a1%0A", "cursor"),
    ):  # fmt: skip
        resp = await client.get(f"/v1/stops?{query}")
        problem = await resp.json()
        assert resp.status == 400, (query, problem)
        assert resp.content_type == "application/problem+json"
        assert problem["field"] == field, (query, problem)
    # The edges: 1 and 1000; a well-formed cursor after everything is an empty last page.
    for query in ("limit=1", "limit=1000", f"cursor={T0_MS + 1}.agent:zzz"):
        resp = await client.get(f"/v1/stops?{query}")
        assert resp.status == 200, query
    assert await (await client.get(f"/v1/stops?cursor={T0_MS + 1}.agent:a1")).json() == {
        "stops": []
    }


# ---- the decision's cost does not grow with the stops ------------------------------------------


async def test_a_decision_and_a_lift_cost_the_same_redis_commands_with_thousands_of_stops(
    quiet: None, make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """authorize and check read the call's own stop fields (one per scope of its identity,
    in the one HMGET of its counters), never the stops hash: the same commands, call for
    call, with 0 stops and with 3,000."""
    client = await make_client(doc())
    call = {"agent_id": "free", "team_id": "t", "user_id": "u", "estimated_usd": 0.01}

    async def one_authorize() -> dict[str, int]:
        redis_client.config_resetstat()
        resp = await client.post("/v1/authorize", json=call)
        assert resp.status == 200 and (await resp.json())["allowed"]
        checked = await client.post("/v1/check", json=call)
        assert checked.status == 200 and (await checked.json())["allowed"]
        return commands(redis_client)

    # Warm: the scripts loaded, the tenant's state marker written (its first call asks the
    # state check for it), until two calls in a row cost the same.
    before, again = await one_authorize(), await one_authorize()
    for _ in range(5):
        if again == before:
            break
        before, again = again, await one_authorize()
    assert again == before, (before, again)
    seed(redis_client, 3000)
    after = await one_authorize()
    assert after == before, (before, after)
    for walk in ("hgetall", "hscan", "hkeys", "hvals", "hlen", "scan"):
        assert walk not in after, after
    # A lift by id: two HGETs and three HDELs whatever the number of stops.
    stop_id = redis_client.hget(TK.stops, keys.stop_field("agent", "seed-00042")).split("|")[0]
    redis_client.config_resetstat()
    assert (await client.delete(f"/v1/stops/{stop_id}")).status == 204
    lift = commands(redis_client)
    assert lift.get("hget") == 2 and lift.get("hdel") == 3, lift
    assert not {"hgetall", "hscan", "hkeys"} & lift.keys(), lift
    # A stopped one among the 3,000 is denied; its neighbours pass.
    for agent, allowed in (("seed-00043", False), ("seed-00042", True), ("seed-9", True)):
        resp = await client.post("/v1/authorize", json={"agent_id": agent, "estimated_usd": 0.01})
        assert (await resp.json())["allowed"] is allowed, agent


# ---- replicas: a connection cut mid-call ----------------------------------------------------

RDOC = {"budgets": [BUDGET], "settings": {"fail_mode": "closed", "redis_timeout_ms": 2000}}
ASK = {"agent_id": "runaway", "estimated_usd": 0.01}
OTHER = {"agent_id": "other", "estimated_usd": 0.01}


def held_micro(server: RedisServer) -> int:
    with server.client() as rc:
        counters: dict[str, str] = rc.hgetall(TK.counters)  # type: ignore[assignment]
    return sum(int(v) for f, v in counters.items() if f.startswith("h:"))


async def decide(client: Any, body: dict[str, Any], n: int) -> list[bool]:
    out = []
    for _ in range(n):
        status, decision = await call(client, "POST", "/v1/authorize", body)
        assert status == 200, decision
        out.append(decision["allowed"])
    return out


async def recovered(client: Any) -> None:
    """Until the replica answers again: its background calls (the sweep) may have failed
    through the cut too and opened its breaker for a moment."""
    for _ in range(500):
        status, _ = await call(client, "POST", "/v1/check", {"agent_id": "probe"})
        if status == 200:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the replica did not recover")


async def settled(engine: Any) -> None:
    """Until the background cancels of authorizes whose answer was lost have run."""
    for _ in range(500):
        if engine.pending_cancels == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{engine.pending_cancels} cancels still pending")


async def test_a_stop_made_while_another_replicas_reply_is_cut_holds_from_its_next_call(
    server: RedisServer, proxy: FaultProxy
) -> None:
    a = await app_over(server.url, RDOC)
    b = await app_over(proxy.url, RDOC)  # its Redis behind the fault proxy
    try:
        assert await decide(b, ASK, 1) == [True]
        proxy.mode = "cut"  # B's next reply goes half-way, then its connection closes
        status, cut = await call(b, "POST", "/v1/authorize", ASK)
        assert status == 503 and cut.get("degraded") is True, cut
        assert proxy.cuts >= 1  # (a background poll over the proxy may be cut too)
        status, stop = await call(a, "POST", "/v1/stops", {**STOP, "scope_id": "runaway"})
        assert status == 201, stop
        proxy.mode = "forward"  # B reconnects at its next call
        await recovered(b)
        assert await decide(b, ASK, 10) == [False] * 10
        status, checked = await call(b, "POST", "/v1/check", ASK)
        assert status == 200 and checked["allowed"] is False, checked
        assert await decide(b, OTHER, 1) == [True]
        await settled(b.app[ENGINE])
        # The cut call ran in Redis (its hold was made), its answer never arrived: the
        # background cancel took it back. Held: the first call and the other agent's.
        assert held_micro(server) == 2 * 10_000
    finally:
        for c in (a, b):
            await c.close()


async def test_a_stop_whose_reply_was_cut_is_in_force_and_a_retry_replaces_it(
    server: RedisServer, proxy: FaultProxy
) -> None:
    a = await app_over(proxy.url, RDOC)  # the operator's replica, behind the proxy
    b = await app_over(server.url, RDOC)
    try:
        assert await decide(b, ASK, 2) == [True, True]
        proxy.mode = "cut"
        status, problem = await call(a, "POST", "/v1/stops", {**STOP, "scope_id": "runaway"})
        assert status == 503, problem  # the operator was told it failed...
        proxy.mode = "forward"
        await recovered(a)
        # ...but Redis made it: B denies from its next call.
        assert await decide(b, ASK, 10) == [False] * 10
        status, listed = await call(b, "GET", "/v1/stops")
        assert [s["scope_id"] for s in listed["stops"]] == ["runaway"]
        first = listed["stops"][0]["id"]
        # The operator's retry: one stop per entity, the retry's replaces the first.
        status, again = await call(a, "POST", "/v1/stops", {**STOP, "scope_id": "runaway"})
        assert status == 201 and again["id"] != first, again
        status, listed = await call(b, "GET", "/v1/stops")
        assert [s["id"] for s in listed["stops"]] == [again["id"]]
        assert await decide(b, ASK, 5) == [False] * 5
        status, _ = await call(a, "DELETE", f"/v1/stops/{again['id']}")
        assert status == 204
        assert await decide(b, ASK, 3) == [True] * 3
        assert held_micro(server) == 5 * 10_000
        with server.client() as rc:
            alerts = [f for _i, f in rc.xrange(TK.alerts) if f.get("k") == "stop"]  # type: ignore[union-attr]
        assert len(alerts) == 2
    finally:
        for c in (a, b):
            await c.close()


# ---- a lift on one replica while another decides -------------------------------------------------


async def test_a_lift_on_one_replica_while_another_decides(server: RedisServer) -> None:
    """B sends 200 calls one after another while A lifts the stop: a run of denials, then
    only allowed calls (never a denial after an allowed one), and exactly the allowed ones
    held; every call after the lift answered is allowed."""
    a = await app_over(server.url, RDOC)
    b = await app_over(server.url, RDOC)
    try:
        status, stop = await call(a, "POST", "/v1/stops", {**STOP, "scope_id": "runaway"})
        assert status == 201
        lifted, started = asyncio.Event(), asyncio.Event()

        async def lift() -> None:
            await started.wait()  # B has sent 5 calls (answered) under the stop
            status, _ = await call(a, "DELETE", f"/v1/stops/{stop['id']}")
            assert status == 204
            lifted.set()

        async def calls() -> tuple[list[bool], list[bool]]:
            before, after = [], []
            for i in range(200):
                if i == 5:
                    started.set()
                was_lifted = lifted.is_set()
                (allowed,) = await decide(b, ASK, 1)
                (after if was_lifted else before).append(allowed)
            return before, after

        before, after = (await asyncio.gather(calls(), lift()))[0]
        seq = before + after
        flips = sum(1 for x, y in itertools.pairwise(seq) if x != y)
        assert seq[:5] == [False] * 5 and flips == 1, seq
        assert all(after) and len(after) >= 1, (len(before), len(after))
        assert held_micro(server) == seq.count(True) * 10_000
    finally:
        for c in (a, b):
            await c.close()


# ---- odd entity ids ---------------------------------------------------------------------------

ODD = ["a{b}", "{t}", "a}", "a:b", "a|b", "a,b", "a/b", "a b", "é", "a\u200bb", "\uff41",
       "a\x00", "a\n", "a%7B", "%", "x" * 129, ""]  # fmt: skip
EDGE = ["x" * 128, "a~b", "a@b.c", "a+b", "a-b_c", "A1", "-", ".", "~"]


async def test_odd_entity_ids_are_refused_alike_by_stops_and_decisions(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """An id a stop refuses is one no decision accepts either (the same alphabet and
    length): no entity can spend that cannot be stopped. The edges are stopped exactly."""
    client = await make_client(doc())
    for entity in ODD:
        for scope in ("organization", "team", "agent", "workflow", "user", "run"):
            resp = await client.post("/v1/stops", json={**STOP, "scope": scope,
                                                        "scope_id": entity})  # fmt: skip
            assert resp.status == 400, (scope, entity)
            assert (await resp.json())["field"] == "scope_id"
        for field in ("org_id", "team_id", "agent_id", "workflow_id", "user_id", "run_id"):
            resp = await client.post("/v1/authorize", json={field: entity, "estimated_usd": 0.01})
            assert resp.status == 400, (field, entity)
            assert (await resp.json())["field"] == field
    assert redis_client.hgetall(TK.stops) == {}
    for entity in EDGE:
        resp = await client.post("/v1/stops", json={**STOP, "scope_id": entity})
        assert resp.status == 201, entity
    assert len(redis_client.hgetall(TK.stops)) == 2 * len(EDGE)
    denied = 0
    for entity in EDGE:
        resp = await client.post("/v1/authorize", json={"agent_id": entity, "estimated_usd": 0.01})
        denied += not (await resp.json())["allowed"]
    assert denied == len(EDGE)
    # Neighbours of the edges pass: another case, one character fewer or more, the same
    # id in another scope.
    for body in ({"agent_id": "a1"}, {"agent_id": "x" * 127}, {"agent_id": "a~"},
                 {"user_id": "A1"}, {"team_id": "a+b"}):  # fmt: skip
        resp = await client.post("/v1/authorize", json={**body, "estimated_usd": 0.01})
        assert (await resp.json())["allowed"] is True, body
    listed = (await (await client.get("/v1/stops")).json())["stops"]
    assert sorted(s["scope_id"] for s in listed) == sorted(EDGE)


# ---- the hierarchy below a stop ----------------------------------------------------------------


async def test_a_stop_denies_what_lies_below_it_and_nothing_beside(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(doc())
    below = [
        {"org_id": "acme"},
        {"org_id": "acme", "team_id": "t1"},
        {"org_id": "acme", "team_id": "t1", "agent_id": "a1"},
        {"org_id": "acme", "agent_id": "a2", "user_id": "u1"},
        {"org_id": "acme", "workflow_id": "w1", "run_id": "r1"},
        {"org_id": "acme", "team_id": "t2", "agent_id": "a3", "workflow_id": "w2",
         "user_id": "u2", "run_id": "r2"},
    ]  # fmt: skip
    beside = [{**b, "org_id": "beta"} for b in below] + [{"team_id": "t1"}, {"agent_id": "a1"}]

    async def allowed(bodies: list[dict[str, Any]]) -> int:
        n = 0
        for body in bodies:
            resp = await client.post("/v1/authorize", json={**body, "estimated_usd": 0.01})
            assert resp.status == 200
            n += (await resp.json())["allowed"]
        return n

    org = {**STOP, "scope": "organization", "scope_id": "acme"}
    resp = await client.post("/v1/stops", json=org)
    assert resp.status == 201
    assert await allowed(below) == 0
    assert await allowed(beside) == len(beside)
    # Each lower scope's own stop: what names it is denied, its siblings pass.
    for scope, entity, names, siblings in (
        ("team", "t1", [{"team_id": "t1", "agent_id": "x"}, {"org_id": "beta", "team_id": "t1"}],
         [{"team_id": "t9", "agent_id": "x"}]),
        ("agent", "a1", [{"org_id": "beta", "team_id": "t7", "agent_id": "a1"}],
         [{"org_id": "beta", "agent_id": "a1x"}]),
        ("workflow", "w1", [{"org_id": "beta", "workflow_id": "w1", "run_id": "r5"}],
         [{"org_id": "beta", "workflow_id": "w2"}]),
        ("user", "u1", [{"org_id": "beta", "user_id": "u1"}], [{"org_id": "beta", "user_id": "u"}]),
        ("run", "r1", [{"org_id": "beta", "run_id": "r1"}], [{"org_id": "beta", "run_id": "r10"}]),
    ):  # fmt: skip
        resp = await client.post("/v1/stops", json={**STOP, "scope": scope, "scope_id": entity})
        assert resp.status == 201
        assert await allowed(names) == 0, scope
        assert await allowed(siblings) == len(siblings), scope
    # A call naming no org is the default org's: a stop on it stops them.
    assert await allowed([{"agent_id": "z"}]) == 1
    resp = await client.post("/v1/stops", json={**STOP, "scope": "organization",
                                                "scope_id": "default"})  # fmt: skip
    assert resp.status == 201
    assert await allowed([{"agent_id": "z"}, {"team_id": "q"}, {}]) == 0
    assert await allowed([{"org_id": "beta", "agent_id": "z"}]) == 1


# ---- ttls at their edges -------------------------------------------------------------------


async def test_a_ttl_ends_the_stop_at_exactly_its_expiry_in_decisions(
    make_client: ClientFactory, redis_client: redis.Redis, clock: Any
) -> None:
    client = await make_client(doc())

    async def allowed(agent: str) -> bool:
        resp = await client.post("/v1/authorize", json={"agent_id": agent, "estimated_usd": 0.01})
        return bool((await resp.json())["allowed"])

    for agent, ttl in (("one", 1), ("month", 2_592_000)):
        resp = await client.post("/v1/stops", json={**STOP, "scope_id": agent, "ttl_s": ttl})
        assert resp.status == 201
    for bad in (0, -1, 2_592_001, 10**30, True, None):
        if bad is None:
            continue  # null is "until lifted": accepted (below)
        resp = await client.post("/v1/stops", json={**STOP, "scope_id": "x", "ttl_s": bad})
        assert resp.status == 400 and (await resp.json())["field"] == "ttl_s", bad
    resp = await client.post("/v1/stops", json={**STOP, "scope_id": "ever", "ttl_s": None})
    assert resp.status == 201 and (await resp.json())["expires_at"] is None
    clock.advance(999)
    assert [await allowed(a) for a in ("one", "month", "ever")] == [False, False, False]
    clock.advance(1)  # expires_at: over, in the decision too
    assert [await allowed(a) for a in ("one", "month", "ever")] == [True, False, False]
    clock.set(T0_MS + 2_592_000_000 - 1)
    assert [await allowed(a) for a in ("one", "month", "ever")] == [True, False, False]
    clock.advance(1)
    assert [await allowed(a) for a in ("one", "month", "ever")] == [True, True, False]
    listed = (await (await client.get("/v1/stops")).json())["stops"]
    assert [s["scope_id"] for s in listed] == ["ever"]


def test_a_stop_put_back_after_a_loss_with_its_expiry_past_or_now_stays_ended(
    redis_client: redis.Redis,
) -> None:
    """restore (sidecar.state_loss) of a stop whose expiry is past, now, or 1 ms ahead."""
    script = Scripts.load_all().stops
    now = T0_MS
    got = []
    for name, expires in (("past", now - 1), ("now", now), ("ahead", now + 1), ("never", 0),
                          ("far", 2**53)):  # fmt: skip
        field = keys.stop_field("agent", name)
        value = f"stop_{name}|{expires}|1|r"
        got.append(redis_client.eval(script.source, 3, TK.stops, TK.alerts, TK.counters,
                                     "restore", now, field, value))  # fmt: skip
    assert got == [[0], [0], [1], [1], [1]]
    mirrors = sorted(f for f in redis_client.hkeys(TK.counters) if f.startswith("s:"))
    assert mirrors == ["s:agent:ahead", "s:agent:far", "s:agent:never"]


# ---- a connect in flight when the store closes ---------------------------------------------


def clients_of(server: RedisServer) -> int:
    """Connections redis-server has open, the asking one left out."""
    with server.client() as rc:
        return len(rc.client_list()) - 1


class GatedConnects:
    """loop.create_connection held at a gate: a connect "in flight" for as long as a test
    wants (the real connect runs once the gate opens)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        loop = asyncio.get_running_loop()
        real = loop.create_connection
        self.gate = asyncio.Event()
        self.reached = asyncio.Event()

        async def held(*args: Any, **kw: Any) -> Any:
            self.reached.set()
            await self.gate.wait()
            return await real(*args, **kw)

        monkeypatch.setattr(loop, "create_connection", held)


async def test_a_connect_whose_caller_was_cancelled_is_closed_with_the_connection(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hot connection's connect runs shielded (its callers share it): a caller cancelled
    meanwhile (a background check stopped at shutdown, a start-up check past its bound)
    left it running, and a close() before any other caller claimed it closed nothing, so
    the socket stayed open after the store closed, found by the garbage collector later as
    a ResourceWarning ("unclosed <socket.socket ...>") in whatever test ran then."""
    gated = GatedConnects(monkeypatch)
    for gate_first in (False, True):
        conn = PipelinedConnection(server.url, timeout_s=2.0)
        gated.gate.clear()
        gated.reached.clear()
        caller = asyncio.ensure_future(conn.call(("PING",)))
        await gated.reached.wait()
        caller.cancel()
        assert (await asyncio.gather(caller, return_exceptions=True))[0].__class__ is (
            asyncio.CancelledError
        )
        if gate_first:  # the connect done, unclaimed, when close() comes
            gated.gate.set()
            for _ in range(200):
                if clients_of(server) == 1:
                    break
                await asyncio.sleep(0.01)
            assert clients_of(server) == 1
        await conn.close()
        gated.gate.set()
        await asyncio.sleep(0.1)  # a connect close() left running would be done by now
        assert clients_of(server) == 0, gate_first
    # Used after a close, it connects again, as before.
    conn = PipelinedConnection(server.url, timeout_s=2.0)
    assert await conn.call(("PING",)) == "PONG"
    await conn.close()
    assert await conn.call(("PING",)) == "PONG"
    await conn.close()
    assert clients_of(server) == 0


async def test_an_app_closed_while_its_store_reconnects_leaves_no_connection(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tests/test_stop_after_loss.py's shape: a replica whose hot connection died (Redis
    restarted) reconnects from a background call (a sweep, a state check) and is closed
    meanwhile. Nothing of it may stay connected once it is closed."""
    client = await app_over(server.url, RDOC)
    store = client.app[STORE]
    hot = store._hot  # type: ignore[attr-defined]
    assert await decide(client, ASK, 1) == [True]
    hot._protocol.close()  # as a restart does (the next call reconnects)
    await hot._protocol.closed
    gated = GatedConnects(monkeypatch)
    background = asyncio.ensure_future(client.app[STATE_WATCH].check())
    await gated.reached.wait()
    background.cancel()
    await asyncio.gather(background, return_exceptions=True)
    await client.close()
    gated.gate.set()
    await asyncio.sleep(0.1)
    assert clients_of(server) == 0


async def test_a_caller_waiting_on_a_connect_that_close_ends_is_told_connection_lost(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a CancelledError it never asked for (a request handler would take it for its
    own cancellation): the store's ConnectionLost, which the fail mode answers."""
    gated = GatedConnects(monkeypatch)
    conn = PipelinedConnection(server.url, timeout_s=30.0)  # no connect timeout meanwhile
    caller = asyncio.ensure_future(conn.call(("PING",)))
    await gated.reached.wait()
    await conn.close()
    [outcome] = await asyncio.wait_for(asyncio.gather(caller, return_exceptions=True), 10)
    assert isinstance(outcome, ConnectionLost), repr(outcome)
    gated.gate.set()
    await asyncio.sleep(0.1)
    assert clients_of(server) == 0
