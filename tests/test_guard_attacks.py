"""Attacks on the runaway guard's promises (issue 18): replays, two sidecars racing,
boundary values, thousands of entries ending together and faults. Every count is asserted
exactly on the raw Redis fields; nothing waits on a clock it does not drive."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import redis
from aiohttp.test_utils import TestClient, TestServer

from sidecar import keys
from sidecar.api.app import SWEEPER, create_app
from sidecar.clock import FakeClock
from sidecar.resolution import Resolver, Snapshot, read_with_run
from sidecar.schemas import IdentityFields
from sidecar.store import RedisStore
from tests.conftest import ClientFactory, make_config
from tests.harness import RedisServer, data_dump, sidecars, wait_until

TENANT = keys.tenant_keys("default")


def guard_doc(**sections: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"budgets": [], "settings": {"redis_timeout_ms": 60_000}}
    doc.update(sections)
    return doc


async def post(client: Any, path: str, body: Any) -> tuple[int, Any]:
    r = await client.post(path, json=body)
    return r.status, await r.json(content_type=None)


PER_RUN = {"id": "per-run", "name": "Each run", "scope": "run", "period": "total",
           "limit_usd": 100, "limit_calls": 3, "on_exceed": "block"}  # fmt: skip
SAME_PROMPT = {"id": "same-prompt", "scope": "run", "repeats": 2, "window": "10m"}
CID = "per-run/r1/t"
LOOP_KEY = TENANT.loop("same-prompt", "r1")


def ctr(rc: redis.Redis) -> dict[str, str]:
    """The tenant's counters and limiters, without alert marks (not amounts)."""
    raw: dict[str, str] = rc.hgetall(TENANT.counters)  # type: ignore[assignment]
    return {k: v for k, v in raw.items() if not k.startswith(("a:", "x:"))}


def repeats_of(rc: redis.Redis, key: str = LOOP_KEY) -> dict[str, int]:
    """Each fingerprint hash of one loop key -> how many of its calls the guard counts
    (the "~" field says to when the key is kept: lua/_lib.lua loop_write)."""
    found: dict[str, str] = rc.hgetall(key)  # type: ignore[assignment]
    return {f: len(v[2:].split(",")) for f, v in found.items() if f != "~"}


def replay_state(rc: redis.Redis) -> tuple[dict[str, str], dict[str, int]]:
    return ctr(rc), repeats_of(rc)


async def fan_out(
    urls: list[str], path: str, bodies: list[dict[str, Any]]
) -> list[tuple[int, dict[str, Any]]]:
    """POST every body at once, the i-th to urls[i % len(urls)]."""
    async with aiohttp.ClientSession() as session:

        async def one(i: int, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            async with session.post(urls[i % len(urls)] + path, json=body) as r:
                answer: dict[str, Any] = await r.json(content_type=None)
                return r.status, answer

        return list(await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies))))


# ---- the stop switch where nothing applies per run ----------------------------------------


async def test_a_run_stop_binds_its_own_run_when_no_guard_is_per_run(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """A call's resolution is memoized without its run id when nothing in the config is per
    run; the run's stop field must still be this call's run, not the run of the call that
    filled the memo: a stop of r2 denies r2, and a stop of r1 denies neither r2 nor a call
    that names no run."""
    budget = {"id": "agent-day", "name": "Agent day", "scope": "agent", "period": "daily",
              "limit_usd": 100}  # fmt: skip
    client = await make_client(guard_doc(budgets=[budget]))
    call = {"agent_id": "a1", "estimated_usd": 0.01}
    _, first = await post(client, "/v1/authorize", {**call, "run_id": "r1"})
    assert first["allowed"] is True, first
    status, made = await post(
        client, "/v1/stops", {"scope": "run", "scope_id": "r2", "reason": "runaway r2"}
    )
    assert status == 201, made
    for path in ("/v1/authorize", "/v1/check"):
        _, d = await post(client, path, {**call, "run_id": "r2"})
        assert (d["allowed"], d["reason"]) == (False, "stop"), (path, d)
        assert d["stop"]["stop_id"] == made["id"]
    status, made = await post(
        client, "/v1/stops", {"scope": "run", "scope_id": "r1", "reason": "runaway r1"}
    )
    assert status == 201, made
    for body in ({**call, "run_id": "r3"}, call):
        _, d = await post(client, "/v1/authorize", body)
        assert d["allowed"] is True, (body, d)
    _, d = await post(client, "/v1/authorize", {**call, "run_id": "r1"})
    assert (d["allowed"], d["reason"]) == (False, "stop"), d
    # Only the calls that passed hold anything: 3 x $0.01 on the agent's day.
    held = [int(v) for k, v in redis_client.hgetall(TENANT.counters).items() if k.startswith("h:")]
    assert held == [30_000], held


def test_runs_share_one_resolution_unless_something_applies_per_run() -> None:
    """Runs are many and short: with nothing per run, every run of an identity is one memo
    entry, and each call reads its own run's stop field (last among the stop fields); with
    a per-run budget, each run resolves to its own."""
    budget = {"id": "agent-day", "name": "Agent day", "scope": "agent", "period": "daily",
              "limit_usd": 100}  # fmt: skip
    per_run = {"id": "per-run", "name": "Each run", "scope": "run", "period": "total",
               "limit_calls": 5}  # fmt: skip
    now = 1_800_000_000_000
    for budgets, shared in (([budget], True), ([budget, per_run], False)):
        snap, resolver = Snapshot.of(make_config(guard_doc(budgets=budgets))), Resolver()
        r1, r2 = (
            resolver.resolve(snap, "default", IdentityFields(agent_id="a1", run_id=run),
                             None, None, now, "default")
            for run in ("r1", "r2")
        )  # fmt: skip
        assert (r1 is r2) is shared
        count, fields = read_with_run(r2, "r2")
        stops = [f for f in fields if f.startswith("s:")]
        assert stops == ["s:organization:default", "s:agent:a1", "s:run:r2"], fields
        assert count == 3
        assert fields[-len(r2.budgets) :] == tuple(f"w:{a.cid}" for a in r2.budgets)
        # A call naming no run reads no run's stop.
        none = resolver.resolve(snap, "default", IdentityFields(agent_id="a1"), None, None,
                                now, "default")  # fmt: skip
        assert [f for f in read_with_run(none, None)[1] if f.startswith("s:run:")] == []


async def test_a_warn_call_cap_past_its_calls_warns_as_a_spent_warn_budget_does(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """A warn budget's call cap lets every call through and, from the first call past it,
    says so: action warn, the budget in budget_info and a message, as a warn budget whose
    dollars are spent does."""
    warn = {**PER_RUN, "limit_calls": 2, "on_exceed": "warn"}
    client = await make_client(guard_doc(budgets=[warn]))
    call = {"run_id": "r1", "estimated_usd": 0.01}
    answers = [(await post(client, "/v1/authorize", call))[1] for _ in range(4)]
    assert [d["allowed"] for d in answers] == [True] * 4
    assert [d["action"] for d in answers] == ["allow", "allow", "warn", "warn"]
    assert [d["message"] for d in answers[:2]] == [None, None]
    for d in answers[2:]:
        assert d["message"] == "Budget 'Each run' reached its 2 calls - warning", d
        assert (d["budget_info"]["budget_id"], d["budget_info"]["exceeded"]) == ("per-run", True)
    assert redis_client.hget(TENANT.counters, f"c:{CID}") == "4"
    # check answers what the next authorize would.
    _, checked = await post(client, "/v1/check", call)
    assert (checked["allowed"], checked["action"]) == (True, "warn"), checked


# ---- replays -------------------------------------------------------------------------------


def test_a_replay_is_one_call_and_one_repeat_on_either_sidecar_at_any_time(
    redis_server: RedisServer, redis_client: redis.Redis, write_config: Callable[..., Path]
) -> None:
    """Ten copies of one idempotent call (same key, same body) at once across two sidecar
    processes: one call of the run and one repeat of its prompt, every answer the same
    reservation. After it is settled, a retry is a 409 that changes nothing; the same key
    with another run or fingerprint is a 409 that changes nothing; after a release too."""
    path = write_config(guard_doc(budgets=[PER_RUN], loop_guards=[SAME_PROMPT]))
    call = {"run_id": "r1", "estimated_usd": 0.01, "fingerprint": "q", "lease_ms": 60_000,
            "idempotency_key": "r1:step-1"}  # fmt: skip
    with sidecars(redis_server.url, str(path), 2) as procs:
        urls = [p.url for p in procs]
        answers = asyncio.run(fan_out(urls, "/v1/authorize", [call] * 10))
        assert [s for s, _ in answers] == [200] * 10, answers
        assert sorted(d["replayed"] for _, d in answers) == [False] + [True] * 9
        rid = answers[0][1]["reservation_id"]
        assert {d["reservation_id"] for _, d in answers} == {rid}
        assert redis_client.hget(TENANT.counters, f"c:{CID}") == "1"
        assert redis_client.hget(TENANT.counters, f"h:{CID}") == "10000"
        assert list(repeats_of(redis_client).values()) == [1]

        def problem(i: int, body: dict[str, Any]) -> None:
            before = replay_state(redis_client)
            ((status, p),) = asyncio.run(fan_out([urls[i]], "/v1/authorize", [body]))
            assert (status, p["field"]) == (409, "idempotency_key"), (body, p)
            assert replay_state(redis_client) == before, body

        # Another run or another prompt under the same key: a conflict, nothing counted.
        problem(0, {**call, "run_id": "r2"})
        problem(1, {**call, "fingerprint": "q2"})
        ((status, settled),) = asyncio.run(
            fan_out([urls[1]], "/v1/settle", [{"reservation_id": rid, "cost_usd": 0.01}])
        )
        assert status == 200, settled
        assert redis_client.hget(TENANT.counters, f"u:{CID}") == "10000"
        # The retry after the settle, on either sidecar, concurrently: nothing counted.
        before = replay_state(redis_client)
        late = asyncio.run(fan_out(urls, "/v1/authorize", [call] * 6))
        assert [s for s, _ in late] == [409] * 6, late
        assert replay_state(redis_client) == before
        # The run's second call of the same prompt (a new key) is its second repeat and
        # passes; the third is denied: the ten copies were one repeat.
        second = {**call, "idempotency_key": "r1:step-2"}
        ((_, d2),) = asyncio.run(fan_out([urls[0]], "/v1/authorize", [second]))
        assert d2["allowed"] is True, d2
        ((_, d3),) = asyncio.run(
            fan_out([urls[1]], "/v1/authorize", [{**call, "idempotency_key": "r1:step-3"}])
        )
        assert (d3["allowed"], d3["reason"]) == (False, "loop"), d3
        assert redis_client.hget(TENANT.counters, f"c:{CID}") == "2"
        # A released call gives its call back; its retries afterwards count nothing.
        other = {**call, "fingerprint": "other", "idempotency_key": "r1:step-4"}
        ((_, d4),) = asyncio.run(fan_out([urls[0]], "/v1/authorize", [other]))
        assert d4["allowed"] is True and redis_client.hget(TENANT.counters, f"c:{CID}") == "3"
        ((status, _),) = asyncio.run(
            fan_out([urls[1]], "/v1/release", [{"reservation_id": d4["reservation_id"]}])
        )
        assert status == 200
        assert redis_client.hget(TENANT.counters, f"c:{CID}") == "2"
        before = replay_state(redis_client)
        late = asyncio.run(fan_out(urls, "/v1/authorize", [other] * 4))
        assert [s for s, _ in late] == [409] * 4, late
        assert replay_state(redis_client) == before
        assert sorted(repeats_of(redis_client).values()) == [1, 2]


# ---- two sidecars racing --------------------------------------------------------------------


def test_exact_repeats_and_calls_under_concurrent_calls_over_two_sidecars(
    redis_server: RedisServer, redis_client: redis.Redis, write_config: Callable[..., Path]
) -> None:
    """60 concurrent identical calls of one run with repeats 3: exactly 3 pass; 100
    concurrent calls of another run with limit_calls 5: exactly 5 pass; the raw counters
    hold exactly those calls."""
    budget = {**PER_RUN, "limit_calls": 5}
    loop = {**SAME_PROMPT, "repeats": 3}
    path = write_config(guard_doc(budgets=[budget], loop_guards=[loop]))
    with sidecars(redis_server.url, str(path), 2) as procs:
        urls = [p.url for p in procs]
        same = {"run_id": "r1", "estimated_usd": 0.01, "fingerprint": "q", "lease_ms": 60_000}
        looped = asyncio.run(fan_out(urls, "/v1/authorize", [same] * 60))
        many = {"run_id": "r2", "estimated_usd": 0.01, "lease_ms": 60_000}
        capped = asyncio.run(fan_out(urls, "/v1/authorize", [many] * 100))
    assert [s for s, _ in looped + capped] == [200] * 160
    assert sum(d["allowed"] for _, d in looped) == 3
    assert {d["reason"] for _, d in looped if not d["allowed"]} == {"loop"}
    assert list(repeats_of(redis_client).values()) == [3]
    assert redis_client.hget(TENANT.counters, f"c:{CID}") == "3"
    assert redis_client.hget(TENANT.counters, f"h:{CID}") == "30000"
    assert sum(d["allowed"] for _, d in capped) == 5
    assert {d["reason"] for _, d in capped if not d["allowed"]} == {"calls"}
    assert redis_client.hget(TENANT.counters, "c:per-run/r2/t") == "5"
    assert redis_client.hget(TENANT.counters, "h:per-run/r2/t") == "50000"
    held = [v for v in redis_client.hvals(TENANT.reservations) if v.startswith("H|")]
    assert len(held) == 8


def test_every_call_sent_after_a_stop_is_made_is_denied_on_both_sidecars(
    redis_server: RedisServer, redis_client: redis.Redis, write_config: Callable[..., Path]
) -> None:
    """50 callers keep calling for one agent across two sidecars while the stop is made on
    one of them: every call sent after the 201 came back is denied, and exactly the calls
    that passed hold their dollars."""
    path = write_config(guard_doc())
    with sidecars(redis_server.url, str(path), 2) as procs:
        urls = [p.url for p in procs]

        async def run() -> list[tuple[bool, dict[str, Any]]]:
            made = asyncio.Event()
            out: list[tuple[bool, dict[str, Any]]] = []
            body = {"agent_id": "a1", "estimated_usd": 0.01, "lease_ms": 60_000}
            async with aiohttp.ClientSession() as session:

                async def caller(i: int) -> None:
                    for _ in range(12):
                        after = made.is_set()  # read before the call is sent
                        async with session.post(urls[i % 2] + "/v1/authorize", json=body) as r:
                            assert r.status == 200
                            out.append((after, await r.json()))

                async def stopper() -> None:
                    while len(out) < 100:  # the stop lands mid-load
                        await asyncio.sleep(0.005)
                    stop = {"scope": "agent", "scope_id": "a1", "reason": "halt"}
                    async with session.post(urls[0] + "/v1/stops", json=stop) as r:
                        assert r.status == 201, await r.text()
                    made.set()

                await asyncio.gather(stopper(), *(caller(i) for i in range(50)))
            return out

        results = asyncio.run(run())
    assert len(results) == 600
    late = [d for after, d in results if after]
    assert late, "no call was sent after the stop"
    assert all((d["allowed"], d["reason"]) == (False, "stop") for d in late), late
    allowed = sum(d["allowed"] for _, d in results)
    assert allowed >= 100
    held = [v for v in redis_client.hvals(TENANT.reservations) if v.startswith("H|")]
    assert len(held) == allowed


# ---- separators and odd bytes in what a call names ------------------------------------------


async def raw_ext_authz(port: int, headers: list[tuple[bytes, bytes]]) -> int:
    """The status of one /ext_authz request written byte for byte (a header value that is
    not UTF-8 cannot be sent through an HTTP client library)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        writer.write(b"POST /ext_authz/v1/chat HTTP/1.1\r\nHost: t\r\n" + lines
                     + b"Content-Length: 0\r\nConnection: close\r\n\r\n")  # fmt: skip
        await writer.drain()
        status_line = await reader.readline()
        return int(status_line.split()[1])
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_fingerprint_header_that_is_not_utf8_is_a_fingerprint_like_any_other(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """aiohttp hands a header's invalid UTF-8 bytes over as lone surrogates; hashing them
    must neither fail (it was a 500) nor merge two different byte strings: the same bytes
    are a loop, other bytes another call, and the run's counters count exactly the calls
    that passed."""
    client = await make_client(guard_doc(budgets=[PER_RUN], loop_guards=[SAME_PROMPT]))
    port = client.server.port
    assert port is not None

    def call(fp: bytes) -> list[tuple[bytes, bytes]]:
        return [(b"x-run-id", b"r1"), (b"x-budget-estimate-usd", b"0.01"),
                (b"x-budget-fingerprint", fp)]  # fmt: skip

    statuses = [await raw_ext_authz(port, call(b"q\xff\xfe")) for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert await raw_ext_authz(port, call(b"q\xff\xfd")) == 200
    assert redis_client.hget(TENANT.counters, f"c:{CID}") == "3"
    assert redis_client.hget(TENANT.counters, f"h:{CID}") == "30000"
    assert sorted(repeats_of(redis_client).values()) == [1, 2]


# ---- thousands ending together ----------------------------------------------------------------


async def test_a_run_counter_charged_only_by_record_goes_its_idle_time_after(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    """A run whose spend is only reported after the fact (/v1/record, no authorize) has a
    period-total counter too; it must go its idle time after its last charge like one an
    authorize made, not stay in Redis for ever."""
    client = await make_client(guard_doc(budgets=[{**PER_RUN, "idle": "1h"}]))
    status, recorded = await post(client, "/v1/record", {"run_id": "r1", "cost_usd": 0.01})
    assert status == 200, recorded
    assert redis_client.hget(TENANT.counters, f"u:{CID}") == "10000"
    clock.advance(3_599_999)  # a second charge pushes the idle time on
    await post(client, "/v1/record", {"run_id": "r1", "cost_usd": 0.01})
    clock.advance(3_599_999)
    await client.server.app[SWEEPER].sweep_until_done("default")
    assert redis_client.hget(TENANT.counters, f"u:{CID}") == "20000"
    clock.advance(1)
    await client.server.app[SWEEPER].sweep_until_done("default")
    assert [f for f in redis_client.hkeys(TENANT.counters) if CID in f] == []
    assert redis_client.zcard(TENANT.gc) == 0


async def test_3000_run_counters_idle_at_once_are_collected_and_runs_start_fresh(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    """3,000 runs make their one call (limit_calls 1) at the same instant, so their
    counters all reach their idle time together. Then every decision still answers (no
    error, no backlog answer), a run that calls again after its idle time starts from zero
    whether or not the bounded collection has reached its counter yet, and the sweep
    collects every one of them in bounded batches."""
    client = await make_client(guard_doc(budgets=[{**PER_RUN, "limit_calls": 1, "idle": "1h"}]))
    runs = [f"r{i}" for i in range(3000)]
    for at in range(0, len(runs), 100):
        batch = runs[at : at + 100]
        made = await asyncio.gather(*(
            post(client, "/v1/authorize", {"run_id": r, "estimated_usd": 0.01}) for r in batch
        ))  # fmt: skip
        assert all(s == 200 and d["allowed"] for s, d in made), made
        settled = await asyncio.gather(*(
            post(client, "/v1/settle", {"reservation_id": d["reservation_id"], "cost_usd": 0.01})
            for _, d in made
        ))  # fmt: skip
        assert all(s == 200 for s, _ in settled), settled
    assert redis_client.zcount(TENANT.gc, "-inf", "+inf") == 3000 + 3000  # counters + records
    clock.advance(3_600_000)
    # The runs the bounded collection would reach last (gc members in order) call again.
    late = sorted(runs, key=lambda r: f"c:per-run/{r}/t")[-20:]
    # Before any decision collects anything: check and the status route read it as none.
    _, checked = await post(client, "/v1/check", {"run_id": late[-1], "estimated_usd": 0.01})
    assert (checked["allowed"], checked["budgets"][0]["calls"]) == (True, 0), checked
    r = await client.get(f"/v1/budgets/per-run/status?scope_id={late[-1]}")
    status_of = await r.json()
    assert (status_of["calls"], status_of["used_usd"]) == (0, 0.0), status_of
    for r in late:
        status, d = await post(client, "/v1/authorize", {"run_id": r, "estimated_usd": 0.01})
        assert (status, d["allowed"]) == (200, True), (r, d)
        assert d["budgets"][0]["calls"] == 1, (r, d)  # its old call no longer counts
        assert redis_client.hget(TENANT.counters, f"c:per-run/{r}/t") == "1"
        assert redis_client.hget(TENANT.counters, f"u:per-run/{r}/t") is None
    sweeper = client.server.app[SWEEPER]
    calls = await sweeper.sweep_until_done("default")
    assert calls > 1  # bounded batches, not one call over everything
    left = {f.split("/")[1] for f in redis_client.hkeys(TENANT.counters)}
    assert left == set(late), left
    assert sorted(redis_client.zrange(TENANT.gc, 0, -1)) == sorted(
        f"c:per-run/{r}/t" for r in late
    )  # only the new counters wait, their calls still held
    assert redis_client.zcard(TENANT.leases) == len(late)


async def test_2000_stops_ending_together_let_their_entities_pass_and_are_listed_no_more(
    make_client: ClientFactory, redis_client: redis.Redis, clock: FakeClock
) -> None:
    """2,000 stops with the same ttl: when it ends every entity passes again at once, no
    list shows any of them, and the bounded collections (the lists' and the sweep's)
    remove both their records and their mirrors in the counters."""
    budget = {"id": "agent-day", "name": "Agent day", "scope": "agent", "period": "daily",
              "limit_usd": 1}  # fmt: skip
    # 2,000 stops in force at once: past the default cap (settings.max_stops, 1,000).
    doc = guard_doc(budgets=[budget])
    doc["settings"]["max_stops"] = 2000
    client = await make_client(doc)
    agents = [f"a{i}" for i in range(2000)]

    async def each(path: str, body: Callable[[str], dict[str, Any]]) -> list[tuple[int, Any]]:
        out: list[tuple[int, Any]] = []
        for at in range(0, len(agents), 100):
            out += await asyncio.gather(
                *(post(client, path, body(a)) for a in agents[at : at + 100])
            )
        return out

    stop = {"scope": "agent", "reason": "cool down", "ttl_s": 60}
    made = await each("/v1/stops", lambda a: {**stop, "scope_id": a})
    assert all(status == 201 for status, _ in made), made
    call = {"estimated_usd": 0.01}
    denied = await each("/v1/authorize", lambda a: {**call, "agent_id": a})
    assert {(d["allowed"], d["reason"]) for _, d in denied} == {(False, "stop")}
    # Listed in pages (at most 1,000 a page): two, and the second says none follows.
    first = await (await client.get("/v1/stops")).json()
    second = await (await client.get("/v1/stops", params={"cursor": first["next_cursor"]})).json()
    assert len(first["stops"]) == len(second["stops"]) == 1000 and "next_cursor" not in second
    assert {s["scope_id"] for s in first["stops"] + second["stops"]} == set(agents)
    clock.advance(60_000)
    assert await (await client.get("/v1/stops")).json() == {"stops": []}
    passed = await each("/v1/authorize", lambda a: {**call, "agent_id": a})
    assert all(status == 200 and d["allowed"] for status, d in passed), passed
    held = [k for k, v in redis_client.hgetall(TENANT.counters).items() if k.startswith("h:")]
    assert len(held) == 2000  # each agent's one call, none of the stopped ones
    # Twice: the first may finish a walk begun before the stops were made (HSCAN promises
    # only what existed for a whole walk); the second walks them all.
    for _ in range(2):
        await client.server.app[SWEEPER].sweep_until_done("default")
    assert [f for f in redis_client.hkeys(TENANT.counters) if f.startswith("s:")] == []
    # The sweep took their records too (the one list above collected 100 of them): no list
    # need come for an ended stop to go.
    assert redis_client.hlen(TENANT.stops) == 0


# ---- faults ------------------------------------------------------------------------------


def quiet(rc: redis.Redis) -> bool:
    """Every client's input is read and run: nothing sent before is still waiting."""
    clients: list[dict[str, Any]] = rc.client_list()  # type: ignore[assignment]
    return all(int(c.get("qbuf", 0)) == 0 for c in clients if c.get("cmd") != "client|list")


async def test_redis_frozen_while_a_stop_is_made_never_leaves_a_stop_that_denies_unlisted(
    clock: FakeClock,
) -> None:
    """Redis is paused (SIGSTOP) while POST /v1/stops waits for it: the caller gets a 503.
    Redis then runs and may still make the stop it had received. Whichever happened, the
    stop denies exactly when it is listed (never a stop in force that no list shows), and
    a stop made after recovery is made, listed and denies."""
    server = RedisServer().start()
    client = None
    rc = server.client()
    try:
        store = RedisStore.from_url(server.url, timeout_ms=50)
        client = TestClient(TestServer(create_app(make_config(guard_doc()), store, clock=clock)))
        await client.start_server()
        call = {"agent_id": "a1", "estimated_usd": 0.01}
        assert (await post(client, "/v1/authorize", call))[1]["allowed"] is True  # scripts loaded
        assert (await post(client, "/v1/stops", {"scope": "agent", "scope_id": "a0",
                                                 "reason": "warm"}))[0] == 201  # fmt: skip
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            status, problem = await post(
                client, "/v1/stops", {"scope": "agent", "scope_id": "a1", "reason": "frozen"}
            )
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        assert status == 503, problem
        wait_until(lambda: quiet(rc), what="Redis to run what it had received")
        listed = await (await client.get("/v1/stops")).json()
        listed_a1 = [s for s in listed["stops"] if s["scope_id"] == "a1"]
        _, d = await post(client, "/v1/authorize", call)
        assert (d["reason"] == "stop") == bool(listed_a1), (d, listed)
        assert d["allowed"] is (not listed_a1)
        # Recovered: a new stop is made, listed and denies.
        status, made = await post(
            client, "/v1/stops", {"scope": "agent", "scope_id": "a1", "reason": "again"}
        )
        assert status == 201, made
        listed = await (await client.get("/v1/stops")).json()
        assert [s["id"] for s in listed["stops"] if s["scope_id"] == "a1"] == [made["id"]]
        _, d = await post(client, "/v1/authorize", call)
        assert (d["allowed"], d["stop"]["stop_id"]) == (False, made["id"]), d
    finally:
        rc.close()
        if client is not None:
            await client.close()
        server.cleanup()


def test_a_sidecar_killed_mid_load_leaves_exact_counters_for_the_other(
    redis_server: RedisServer, redis_client: redis.Redis, write_config: Callable[..., Path]
) -> None:
    """Two sidecars take 200 concurrent calls of one run (limit_calls 40, a loop guard on
    each call's prompt); one is killed with SIGKILL with calls in flight. Whatever it had
    sent Redis ran whole or not at all: the run's call count and held dollars equal exactly
    the holds recorded, never more than the cap; the survivor releases every one of them
    and the counters are back to nothing."""
    budget = {**PER_RUN, "limit_calls": 40}
    path = write_config(guard_doc(budgets=[budget], loop_guards=[SAME_PROMPT]))
    with sidecars(redis_server.url, str(path), 2) as (victim, survivor):

        async def run() -> list[tuple[int, Any]]:
            answered: list[tuple[int, Any]] = []
            async with aiohttp.ClientSession() as session:

                async def one(i: int) -> None:
                    proc = victim if i % 2 else survivor
                    body = {"run_id": "r1", "estimated_usd": 0.01, "lease_ms": 600_000,
                            "fingerprint": f"q{i % 60}"}  # fmt: skip
                    try:
                        async with session.post(proc.url + "/v1/authorize", json=body) as r:
                            answered.append((r.status, await r.json()))
                    except aiohttp.ClientError:
                        answered.append((0, None))  # the killed one's: its answer is lost

                async def killer() -> None:
                    while len(answered) < 30:  # the kill lands with calls in flight
                        await asyncio.sleep(0.001)
                    assert victim.process is not None
                    victim.process.kill()  # SIGKILL, by its pid

                await asyncio.gather(killer(), *(one(i) for i in range(200)))
            return answered

        answers = asyncio.run(run())
        seen = [d for status, d in answers if status == 200]
        assert len(seen) >= 100  # the survivor answered all of its own
        assert len(seen) < 200, "the kill came after every call was answered"
        records = redis_client.hgetall(TENANT.reservations)
        holds = [rid for rid, v in records.items() if v.startswith("H|")]
        calls = int(redis_client.hget(TENANT.counters, f"c:{CID}") or 0)
        assert calls == len(holds) <= 40
        assert int(redis_client.hget(TENANT.counters, f"h:{CID}") or 0) == 10_000 * calls
        assert sum(d["allowed"] for d in seen) <= calls
        # Each fingerprint's repeats: exactly its holds (the 60 prompts, 2 repeats each).
        assert sum(repeats_of(redis_client).values()) == calls
        for rid in holds:
            status, _ = asyncio.run(fan_out([survivor.url], "/v1/release",
                                            [{"reservation_id": rid}]))[0]  # fmt: skip
            assert status == 200
    assert redis_client.hget(TENANT.counters, f"c:{CID}") is None
    assert redis_client.hget(TENANT.counters, f"h:{CID}") is None


async def test_a_retry_sent_after_a_stop_is_denied_and_counts_nothing(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """A retry of a held call (same key, same body) sent after its run was stopped is a call
    sent after the stop: denied with the stop, nothing counted; once the stop is lifted the
    same retry is the replay of the reservation still held."""
    client = await make_client(guard_doc(budgets=[PER_RUN], loop_guards=[SAME_PROMPT]))
    call = {"run_id": "r1", "estimated_usd": 0.01, "fingerprint": "q", "idempotency_key": "k1"}
    _, first = await post(client, "/v1/authorize", call)
    assert first["allowed"] is True, first
    status, made = await post(
        client, "/v1/stops", {"scope": "run", "scope_id": "r1", "reason": "halt"}
    )
    assert status == 201, made
    before = replay_state(redis_client)
    checked = {k: v for k, v in call.items() if k != "idempotency_key"}  # check takes none
    for path, body in (("/v1/authorize", call), ("/v1/check", checked)):
        status, d = await post(client, path, body)
        assert (status, d["allowed"], d["reason"]) == (200, False, "stop"), (path, d)
        assert d["stop"]["stop_id"] == made["id"]
    assert replay_state(redis_client) == before
    r = await client.delete(f"/v1/stops/{made['id']}")
    assert r.status == 204
    _, again = await post(client, "/v1/authorize", call)
    assert (again["replayed"], again["reservation_id"]) == (True, first["reservation_id"]), again
    counters, repeats = before
    assert replay_state(redis_client) == ({k: v for k, v in counters.items()
                                           if not k.startswith("s:")}, repeats)  # fmt: skip


# ---- boundary values on the stops API ---------------------------------------------------------


async def test_stops_edge_values_are_400_naming_the_field_and_unknown_ids_404(
    make_client: ClientFactory, redis_client: redis.Redis
) -> None:
    """What test_stops.py's table leaves out: ttl beyond int64 milliseconds, a bool, a
    float with no fraction; ids with separators or non-ASCII; a huge reason; and lifts of
    ids that are unknown or not ids at all. Each bad one is a 400 problem naming its field
    (or a 404 for a lift), and Redis is left exactly as it was."""
    client = await make_client(guard_doc(budgets=[PER_RUN]))
    status, kept = await post(client, "/v1/stops", {"scope": "run", "scope_id": "keep",
                                                    "reason": "kept"})  # fmt: skip
    assert status == 201, kept
    ok = {"scope": "run", "scope_id": "r1", "reason": "x"}
    bad: list[tuple[str, dict[str, Any]]] = [
        ("ttl_s", {**ok, "ttl_s": 10**20}),
        ("ttl_s", {**ok, "ttl_s": 2**63}),
        ("ttl_s", {**ok, "ttl_s": True}),
        ("ttl_s", {**ok, "ttl_s": 60.0}),
        ("ttl_s", {**ok, "ttl_s": "1e3"}),
        ("scope", {**ok, "scope": "run "}),
        ("scope", {**ok, "scope": "runs"}),
        *(("scope_id", {**ok, "scope_id": v}) for v in ("r/1", "r:1", "r|1", "r\x1f1", "rün",
                                                        "r 1", "", "r" * 129, "%", "#x")),
        ("reason", {**ok, "reason": "x" * 10_000}),
        ("reason", {**ok, "reason": "a\r\nX-Forged: 1"}),
        ("reason", {**ok, "reason": "tab\there"}),
    ]  # fmt: skip
    before = data_dump(redis_client)
    for field, body in bad:
        r = await client.post("/v1/stops", json=body)
        problem = await r.json(content_type=None)
        assert (r.status, r.content_type) == (400, "application/problem+json"), (body, problem)
        assert problem["field"] == field, (body, problem)
    r = await client.post("/v1/stops", json={**ok, "reason": "x" * 100_000})
    assert (r.status, (await r.json(content_type=None))["field"]) == (413, "body")
    for stop_id in ("stop_0000000000000000", "x" * 2000, "stop_%23" + kept["id"], "%23",
                    kept["id"] + "x", kept["id"].upper()):  # fmt: skip
        r = await client.delete(f"/v1/stops/{stop_id}")
        assert (r.status, r.content_type) == (404, "application/problem+json"), stop_id
        r = await client.get(f"/v1/stops/{stop_id}")
        assert r.status == 404, stop_id
    assert data_dump(redis_client) == before
    _, d = await post(client, "/v1/authorize", {"run_id": "keep", "estimated_usd": 0.01})
    assert d["reason"] == "stop"
