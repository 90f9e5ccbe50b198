"""The stop switch's API (/v1/stops) and guard alerts, on a real redis-server: make, list,
read and lift a stop; one stop per entity (a new one replaces the old); a ttl ends it (the
app's fake clock moves past it); every field's bad input is a 400 naming it with nothing
written; roles; the alert written once per stop and delivered to a webhook; /v1/alerts
lists every kind; and the exact Redis format that the decision scripts read."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from sidecar import alerts, keys
from sidecar.api.app import create_app
from sidecar.clock import FakeClock
from sidecar.model import Scope
from sidecar.store import RedisStore
from tests.conftest import T0_MS, ClientFactory, make_config
from tests.harness import REPO, RedisServer, SidecarProcess, data_keys, free_port
from tests.test_auth import ADMIN, AGENT_A, READER, basic
from tests.test_auth import DOC as AUTH_DOC
from tests.test_openapi import Checker, served_doc
from tests.test_webhooks import Receiver, verify

TK = keys.tenant_keys("default")
ID_RE = re.compile(r"^stop_[0-9a-f]{16}$")
STOP = {"scope": "agent", "scope_id": "a1", "reason": "runaway: 300 calls in a minute"}
DOC: dict[str, Any] = {
    "budgets": [{"id": "org", "name": "Org", "scope": "organization", "limit_usd": 10,
                 "period": "daily"}],
}  # fmt: skip


async def post(client: TestClient[Any, Any], body: Any, **kw: Any) -> tuple[int, Any]:
    resp = await client.post("/v1/stops", json=body, **kw)
    return resp.status, await resp.json()


def raw(r: redis.Redis) -> dict[str, str]:
    return r.hgetall(TK.stops)  # type: ignore[return-value]


def stop_entries(r: redis.Redis, tenant: str = "default") -> list[dict[str, str]]:
    stream = keys.tenant_keys(tenant).alerts
    return [f for _id, f in r.xrange(stream) if "k" in f]  # type: ignore[union-attr]


# ---- make, list, read, lift ------------------------------------------------------------------


async def test_make_list_read_and_lift_a_stop(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(DOC)
    status, made = await post(client, {**STOP, "ttl_s": 600})
    assert status == 201, made
    assert ID_RE.match(made["id"]), made
    assert made == {
        "id": made["id"], "scope": "agent", "scope_id": "a1", "reason": STOP["reason"],
        "created_at": "2026-03-10T12:00:00Z", "expires_at": "2026-03-10T12:10:00Z",
    }  # fmt: skip
    status, forever = await post(client, {"scope": "team", "scope_id": "t1", "reason": "audit"})
    assert status == 201 and forever["expires_at"] is None, forever

    listed = await (await client.get("/v1/stops")).json()
    assert listed == {"stops": [made, forever]}
    one = await client.get(f"/v1/stops/{made['id']}")
    assert one.status == 200 and await one.json() == made

    lifted = await client.delete(f"/v1/stops/{made['id']}")
    assert lifted.status == 204 and await lifted.read() == b""
    again = await client.delete(f"/v1/stops/{made['id']}")
    assert again.status == 404 and again.content_type == "application/problem+json"
    assert (await again.json())["field"] == "id"
    gone = await client.get(f"/v1/stops/{made['id']}")
    assert gone.status == 404 and gone.content_type == "application/problem+json"
    assert (await (await client.get("/v1/stops")).json()) == {"stops": [forever]}
    # Lifting removed both fields of that stop and nothing of the other.
    assert raw(redis_client) == {
        "team:t1": f"{forever['id']}|0|{T0_MS}|audit",
        f"#{forever['id']}": "team:t1",
    }
    for bogus in ("nope", "stop_0000000000000000", "%7B"):
        assert (await client.delete(f"/v1/stops/{bogus}")).status == 404
    assert len(raw(redis_client)) == 2


async def test_a_new_stop_of_an_entity_replaces_the_old(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(DOC)
    _, first = await post(client, {**STOP, "ttl_s": 60})
    _, second = await post(client, {**STOP, "reason": "still looping"})
    assert first["id"] != second["id"]
    # Another scope with the same id is another entity: it stays.
    _, other = await post(client, {**STOP, "scope": "user"})
    assert raw(redis_client) == {
        "agent:a1": f"{second['id']}|0|{T0_MS}|still looping",
        f"#{second['id']}": "agent:a1",
        "user:a1": f"{other['id']}|0|{T0_MS}|{STOP['reason']}",
        f"#{other['id']}": "user:a1",
    }
    assert (await client.get(f"/v1/stops/{first['id']}")).status == 404
    assert (await client.delete(f"/v1/stops/{first['id']}")).status == 404
    listed = (await (await client.get("/v1/stops")).json())["stops"]
    assert [s["id"] for s in listed] == [second["id"], other["id"]]


async def test_a_ttl_ends_the_stop_by_itself(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    client = await make_client(DOC)
    _, short = await post(client, {**STOP, "ttl_s": 1})
    _, long = await post(client, {**STOP, "scope_id": "a2", "ttl_s": 2})
    clock.advance(999)
    assert (await client.get(f"/v1/stops/{short['id']}")).status == 200
    clock.advance(1)  # expires_at <= now: over
    assert (await client.get(f"/v1/stops/{short['id']}")).status == 404
    assert (await client.delete(f"/v1/stops/{short['id']}")).status == 404
    listed = (await (await client.get("/v1/stops")).json())["stops"]
    assert [s["id"] for s in listed] == [long["id"]]
    clock.advance(1000)
    assert (await (await client.get("/v1/stops")).json()) == {"stops": []}
    # The lists that met them collected them: nothing is left behind.
    assert raw(redis_client) == {}


async def test_a_list_collects_a_bounded_number_of_ended_stops(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    client = await make_client(DOC)
    for i in range(150):
        status, _ = await post(client, {**STOP, "scope_id": f"a{i}", "ttl_s": 1})
        assert status == 201
    _, kept = await post(client, {**STOP, "scope_id": "keep"})
    clock.advance(1000)
    first = await (await client.get("/v1/stops")).json()
    assert [s["id"] for s in first["stops"]] == [kept["id"]]
    assert len(raw(redis_client)) == 2 * (150 - 100 + 1)  # 100 collected by that list
    await client.get("/v1/stops")
    assert len(raw(redis_client)) == 2


# ---- the Redis format the decision scripts read ------------------------------------------------


async def test_the_raw_redis_format(make_client: ClientFactory, redis_client: redis.Redis) -> None:
    """authorize.lua and check.lua read this exact layout (sidecar.keys): a change here is
    a change there."""
    client = await make_client(DOC)
    reason = "a|b: pipes stay in the reason"
    _, made = await post(
        client, {"scope": "workflow", "scope_id": "wf~1.x@y+z", "reason": reason, "ttl_s": 30}
    )
    assert TK.stops == "bs:{default}:stops"
    assert keys.stop_field("workflow", "wf~1.x@y+z") == "workflow:wf~1.x@y+z"
    assert raw(redis_client) == {
        "workflow:wf~1.x@y+z": f"{made['id']}|{T0_MS + 30_000}|{T0_MS}|{reason}",
        f"#{made['id']}": "workflow:wf~1.x@y+z",
    }
    # What a reader splitting on the first three '|' gets back.
    stop_id, expires, created, back = raw(redis_client)["workflow:wf~1.x@y+z"].split("|", 3)
    assert (stop_id, int(expires), int(created), back) == (made["id"], T0_MS + 30_000, T0_MS,
                                                             reason)  # fmt: skip
    # An entity outside the safe alphabet is escaped in the field (keys.escape); the API
    # refuses such ids, so that is the second line of defence, checked on the key helper.
    assert keys.stop_field("agent", "a:b|c") == "agent:a%3Ab%7Cc"
    assert keys.parse_stop_field("agent:a%3Ab%7Cc") == ("agent", "a:b|c")
    # Every scope of the enum is accepted (the lead's `run` included once it lands).
    for scope in Scope:
        status, body = await post(client, {**STOP, "scope": scope.value})
        assert status == 201, body
        assert raw(redis_client)[f"{scope.value}:a1"].startswith(body["id"] + "|0|")


# ---- bad input -----------------------------------------------------------------------------------


BAD: list[tuple[str, Any]] = [
    ("scope", {**STOP, "scope": "galaxy"}),
    ("scope", {**STOP, "scope": "Agent"}),
    ("scope", {**STOP, "scope": None}),
    ("scope", {k: v for k, v in STOP.items() if k != "scope"}),
    ("scope_id", {**STOP, "scope_id": "a 1"}),
    ("scope_id", {**STOP, "scope_id": "a{1}"}),
    ("scope_id", {**STOP, "scope_id": ""}),
    ("scope_id", {**STOP, "scope_id": "x" * 129}),
    ("scope_id", {**STOP, "scope_id": 7}),
    ("scope_id", {k: v for k, v in STOP.items() if k != "scope_id"}),
    ("reason", {**STOP, "reason": ""}),
    ("reason", {**STOP, "reason": "   "}),
    ("reason", {**STOP, "reason": "x" * 501}),
    ("reason", {**STOP, "reason": "two\nlines"}),
    ("reason", {**STOP, "reason": 5}),
    ("reason", {k: v for k, v in STOP.items() if k != "reason"}),
    ("ttl_s", {**STOP, "ttl_s": 0}),
    ("ttl_s", {**STOP, "ttl_s": -5}),
    ("ttl_s", {**STOP, "ttl_s": 2_592_001}),
    ("ttl_s", {**STOP, "ttl_s": 1.5}),
    ("ttl_s", {**STOP, "ttl_s": "60"}),
    ("colour", {**STOP, "colour": "red"}),
    ("body", [STOP]),
]


async def test_bad_input_is_400_naming_the_field_and_writes_nothing(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(DOC)
    for field, body in BAD:
        resp = await client.post("/v1/stops", json=body)
        problem = await resp.json()
        assert resp.status == 400, (field, body, problem)
        assert resp.content_type == "application/problem+json"
        assert problem["field"] == field, (field, body, problem)
    resp = await client.post(
        "/v1/stops", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert resp.status == 400 and (await resp.json())["field"] == "body"
    twice = b'{"scope":"agent","scope_id":"a1","reason":"x","reason":"y"}'
    resp = await client.post("/v1/stops", data=twice, headers={"Content-Type": "application/json"})
    assert resp.status == 400 and (await resp.json())["field"] == "reason"
    assert data_keys(redis_client) == []
    # The edges are accepted: 500 characters, '|' inside, ttl 1 and 30 days.
    for body in ({**STOP, "reason": "r|" * 250, "ttl_s": 1}, {**STOP, "ttl_s": 2_592_000}):
        status, made = await post(client, body)
        assert status == 201, made


# ---- roles ---------------------------------------------------------------------------------------


async def test_writes_need_the_admin_role_reads_any_client(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(AUTH_DOC)
    for headers in ({}, basic("ops", "wrong")):
        assert (await client.post("/v1/stops", json=STOP, headers=headers)).status == 401
        assert (await client.get("/v1/stops", headers=headers)).status == 401
        assert (await client.get("/v1/alerts", headers=headers)).status == 401
        assert (await client.delete("/v1/stops/stop_0", headers=headers)).status == 401
    for other in (AGENT_A, READER):
        resp = await client.post("/v1/stops", json=STOP, headers=other)
        assert resp.status == 403 and resp.content_type == "application/problem+json"
    assert data_keys(redis_client) == []
    status, made = await post(client, STOP, headers=ADMIN)
    assert status == 201, made
    # The stop is the admin's tenant's (team-a).
    assert redis_client.hget(keys.tenant_keys("team-a").stops, "agent:a1") is not None
    for reader in (AGENT_A, READER):
        listed = await (await client.get("/v1/stops", headers=reader)).json()
        assert [s["id"] for s in listed["stops"]] == [made["id"]]
        assert (await client.get(f"/v1/stops/{made['id']}", headers=reader)).status == 200
        assert (await client.get("/v1/alerts", headers=reader)).status == 200
        denied = await client.delete(f"/v1/stops/{made['id']}", headers=reader)
        assert denied.status == 403
    # Another tenant's admin neither sees nor lifts it.
    other_admin = basic("ops-b", "b-admin")
    assert (await (await client.get("/v1/stops", headers=other_admin)).json()) == {"stops": []}
    assert (await client.delete(f"/v1/stops/{made['id']}", headers=other_admin)).status == 404
    assert (await client.delete(f"/v1/stops/{made['id']}", headers=ADMIN)).status == 204


# ---- guard alerts --------------------------------------------------------------------------------


async def test_one_alert_per_stop_made_listed_with_every_kind(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(DOC)
    _, made = await post(client, {**STOP, "ttl_s": 600})
    assert stop_entries(redis_client) == [
        {"k": "stop", "g": made["id"], "s": "agent", "e": "a1", "r": STOP["reason"],
         "x": str(T0_MS + 600_000), "at": str(T0_MS)},
    ]  # fmt: skip
    await client.delete(f"/v1/stops/{made['id']}")  # a lift is no trip: no alert
    await client.get("/v1/stops")
    assert len(stop_entries(redis_client)) == 1
    # A threshold alert (80% of the org's $10) and guard trips as the scripts write them.
    assert (await client.post("/v1/record", json={"cost_usd": 8.0})).status == 200
    for k, g in (("loop", "same-prompt"), ("calls", "org"), ("velocity", "agent-burn")):
        redis_client.xadd(TK.alerts, {"k": k, "g": g, "s": "run", "e": "r%201", "r": "3 repeats",
                                      "at": str(T0_MS + 1)})  # fmt: skip
    redis_client.xadd(TK.alerts, {"k": "martian", "g": "x", "s": "run", "e": "r", "at": "1"})
    resp = await client.get("/v1/alerts")
    listed = await resp.json()
    assert resp.status == 200
    got = [(a["alert_type"], a["budget_id"], a["entity"]) for a in listed["alerts"]]
    assert got == [
        ("velocity", "agent-burn", "r 1"), ("call_limit", "org", "r 1"),
        ("loop_detected", "same-prompt", "r 1"), ("threshold_reached", "org", "default"),
        ("threshold_reached", "org", "default"), ("stop", made["id"], "a1"),
    ], got  # fmt: skip
    assert listed["count"] == 6
    stop = listed["alerts"][-1]
    assert stop == {
        "id": f"default/stop/{made['id']}/a1/{T0_MS}", "budget_id": made["id"],
        "alert_type": "stop", "threshold": 0, "percentage_reached": 0.0, "amount_usd": 0.0,
        "limit_usd": 0.0, "message": f"Stop '{made['id']}' on agent a1: {STOP['reason']}",
        "created_at": "2026-03-10T12:00:00Z", "acknowledged": False, "entity": "a1",
        "tenant_id": "default", "scope": "agent", "reason": STOP["reason"],
        "expires_at": "2026-03-10T12:10:00Z",
    }  # fmt: skip
    assert listed["alerts"][1]["message"] == "Call limit of budget 'Org' on run r 1: 3 repeats"
    assert listed["alerts"][0]["id"] == f"default/velocity/agent-burn/r%201/{T0_MS + 1}"
    # Threshold alerts keep their exact shape (no guard fields).
    assert set(listed["alerts"][3]) == {
        "id", "budget_id", "alert_type", "threshold", "percentage_reached", "amount_usd",
        "limit_usd", "message", "created_at", "acknowledged", "entity", "tenant_id",
    }  # fmt: skip
    newest = await (await client.get("/v1/alerts?limit=2")).json()
    assert [a["alert_type"] for a in newest["alerts"]] == ["velocity", "call_limit"]
    assert (await client.get("/v1/alerts?limit=0")).status == 400
    # The budget's own alert route: its thresholds and its call-cap trips, no other guard.
    org = await (await client.get("/api/v1/budgets/org/alerts")).json()
    assert [a["alert_type"] for a in org["alerts"]] == [
        "call_limit",
        "threshold_reached",
        "threshold_reached",
    ]


def test_parse_entry_refuses_guard_entries_it_cannot_read() -> None:
    good = {"k": "stop", "g": "stop_1", "s": "agent", "e": "a1", "r": "x", "at": "5"}
    assert alerts.parse_entry("t", good, lambda _b: None) is not None
    for broken in (
        {**good, "k": "unknown"},
        {**good, "at": "soon"},
        {**good, "x": "never"},
        {k: v for k, v in good.items() if k != "g"},
        {k: v for k, v in good.items() if k != "e"},
    ):
        assert alerts.parse_entry("t", broken, lambda _b: None) is None, broken


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    yield r
    await r.stop()


async def test_a_made_stop_is_delivered_to_the_webhooks_once(
    make_client: ClientFactory, redis_client: redis.Redis, receiver: Receiver
) -> None:
    await receiver.start()
    secret = "whsec-0123456789abcdef0123456789"
    client = await make_client(
        {**DOC, "webhooks": [{"name": "ops", "url": receiver.url(), "secret": secret}]}
    )
    _, made = await post(client, {**STOP, "ttl_s": 60})
    deadline = time.monotonic() + 30
    while not receiver.deliveries:
        assert time.monotonic() < deadline, "no delivery within 30 s"
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # nothing more arrives
    [d] = receiver.deliveries
    verify(d, secret)
    assert d.alert_id == f"default/stop/{made['id']}/a1/{T0_MS}"
    assert d.alert["alert_type"] == "stop" and d.alert["budget_id"] == made["id"]
    assert d.alert["reason"] == STOP["reason"] and d.alert["expires_at"] is not None
    summary: dict[str, Any] = redis_client.xpending(TK.alerts, "webhook:ops")  # type: ignore[assignment]
    assert summary["pending"] == 0


# ---- the documented shapes and Redis away ------------------------------------------------


async def test_answers_match_the_openapi_document(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    client = await make_client(DOC)
    check = Checker(await served_doc(client))
    one = "/v1/stops/{stop_id}"

    async def call(method: str, path: str, template: str | None = None, **kw: Any) -> Any:
        resp = await client.request(method.upper(), path, **kw)
        return await check(resp, method, template or path.partition("?")[0])

    made = await call("post", "/v1/stops", json={**STOP, "ttl_s": 5})
    await call("post", "/v1/stops", json={**STOP, "reason": ""})
    await call("get", "/v1/stops")
    await call("get", f"/v1/stops/{made['id']}", one)
    await call("get", "/v1/stops/nope", one)
    await call("get", "/v1/alerts")
    await call("get", "/v1/alerts?limit=x")
    await call("delete", f"/v1/stops/{made['id']}", one)
    await call("delete", f"/v1/stops/{made['id']}", one)
    expected = {
        ("post", "/v1/stops", "201"), ("post", "/v1/stops", "400"), ("get", "/v1/stops", "200"),
        ("get", one, "200"), ("get", one, "404"), ("delete", one, "204"),
        ("delete", one, "404"), ("get", "/v1/alerts", "200"), ("get", "/v1/alerts", "400"),
    }  # fmt: skip
    assert expected <= check.seen, expected - check.seen


@pytest.fixture
async def away(clock: FakeClock) -> AsyncIterator[TestClient[Any, Any]]:
    """The app over a Redis that is not there."""
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout_ms=300)
    client = TestClient(TestServer(create_app(make_config(DOC), store, clock=clock)))
    await client.start_server()
    yield client
    await client.close()


async def test_redis_away_is_503(make_client: ClientFactory, away: TestClient[Any, Any]) -> None:
    client = await make_client(DOC)
    check = Checker(await served_doc(client))
    for method, path, template, body in (
        ("post", "/v1/stops", None, STOP),
        ("get", "/v1/stops", None, None),
        ("get", "/v1/stops/stop_0123456789abcdef", "/v1/stops/{stop_id}", None),
        ("delete", "/v1/stops/stop_0123456789abcdef", "/v1/stops/{stop_id}", None),
        ("get", "/v1/alerts", None, None),
    ):
        resp = await away.request(method.upper(), path, json=body)
        assert resp.status == 503, (path, resp.status, await resp.text())
        await check(resp, method, template or path)


# ---- the CLI -------------------------------------------------------------------------------------


def cli(url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args, "--url", url],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **env},
    )


def test_the_cli_makes_lists_and_lifts_stops_on_a_running_sidecar(
    redis_server: RedisServer, redis_client: redis.Redis, write_config: Callable[..., Path]
) -> None:
    path = write_config({**DOC, "auth": AUTH_DOC["auth"]})
    sidecar = SidecarProcess(redis_server.url, str(path)).start()
    admin = {"SIDECAR_CLIENT_ID": "ops", "SIDECAR_CLIENT_SECRET": "s3cret"}
    try:
        made = cli(sidecar.url, "stop", "--scope", "agent", "--id", "a1", "--reason",
                   "looping since 09:14", "--ttl", "600", **admin)  # fmt: skip
        assert made.returncode == 0, made.stderr
        stop = json.loads(made.stdout)
        assert (stop["scope"], stop["scope_id"], stop["reason"]) == (
            "agent",
            "a1",
            "looping since 09:14",
        )
        assert stop["expires_at"] is not None and ID_RE.match(stop["id"])
        tk = keys.tenant_keys("team-a")
        assert redis_client.hget(tk.stops, f"#{stop['id']}") == "agent:a1"

        listed = cli(sidecar.url, "stops", "--client-id", "dash", "--secret", "r-pass")
        assert listed.returncode == 0, listed.stderr
        assert [json.loads(line) for line in listed.stdout.splitlines()] == [stop]

        # Refusals: exit 1 with the API's detail, nothing changed.
        agent = cli(sidecar.url, "unstop", stop["id"], SIDECAR_CLIENT_ID="agent-a",
                    SIDECAR_CLIENT_SECRET="a-pass")  # fmt: skip
        assert agent.returncode == 1 and "HTTP 403" in agent.stderr, agent
        bad = cli(sidecar.url, "stop", "--scope", "agent", "--id", "a 1", "--reason", "x",
                  **admin)  # fmt: skip
        assert bad.returncode == 1 and "HTTP 400" in bad.stderr and "scope_id" in bad.stderr
        nobody = cli(sidecar.url, "stops")
        assert nobody.returncode == 1 and "HTTP 401" in nobody.stderr, nobody
        assert len(redis_client.hgetall(tk.stops)) == 2

        lifted = cli(sidecar.url, "unstop", stop["id"], **admin)
        assert lifted.returncode == 0 and stop["id"] in lifted.stdout, lifted.stderr
        again = cli(sidecar.url, "unstop", stop["id"], **admin)
        assert again.returncode == 1 and "HTTP 404" in again.stderr, again
        assert redis_client.hgetall(tk.stops) == {}
    finally:
        sidecar.cleanup()
    away = cli(f"http://127.0.0.1:{free_port()}", "stops")
    assert away.returncode == 3 and "cannot reach" in away.stderr, away
