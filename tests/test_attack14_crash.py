"""Attacks on the hard cap when a replica crashes (kill -9) holding leases, when one
idempotency key reaches several replicas, and when thousands of leases end at one moment
while three replicas keep deciding. Counted exactly, from Redis, the usage ledger and
the replicas' own metrics; see tests/test_attack14_replicas.py for the stopped replica."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import redis

from tests.harness import RedisServer, request_json, wait_until
from tests.test_attack14_replicas import (
    CENT,
    TENANT,
    cap_doc,
    pid_of,
    replicas,
    stopped,
    used_held,
    wait_past,
    wall_ms,
)


def records(rc: redis.Redis) -> dict[str, list[str]]:
    """Reservation id -> its record's fields (lua/_lib.lua), the keys' entries left out."""
    raw: dict[str, str] = rc.hgetall(TENANT.reservations)  # type: ignore[assignment]
    return {k: v.split("|") for k, v in raw.items() if not k.startswith(("k:", "q:"))}


def reservations_metric(url: str, event: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    line = f'budget_sidecar_reservations_total{{event="{event}"}} '
    found = [float(x[len(line) :]) for x in text.splitlines() if x.startswith(line)]
    return found[0] if found else 0.0


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    async with session.post(url, json=body) as resp:
        text = await resp.text()
        assert resp.status == 200, (resp.status, text)
        return await resp.json(content_type=None)


async def authorize_many(urls: list[str], count: int, **body: Any) -> list[dict[str, Any]]:
    """`count` concurrent authorizes of $0.01 spread over `urls`; every one answered 200."""
    async with aiohttp.ClientSession() as session:
        calls = [
            post(session, urls[i % len(urls)] + "/v1/authorize", {"estimated_usd": 0.01, **body})
            for i in range(count)
        ]
        return list(await asyncio.gather(*calls))


async def test_a_replica_killed_with_leases_in_place_gives_back_exactly_what_it_held(
    server: RedisServer, write_config: Callable[[dict[str, Any]], Path]
) -> None:
    """Three replicas on a $1.00 cap. A holds 40 $0.01 leases of 1.5 s (half
    `on_expiry: charge`) and has 20 more authorizes in flight when it is killed with -9.
    B and C keep deciding: the cap is filled exactly, never passed. Once A's leases end,
    exactly the released holds come back and exactly the charged ones are spend (ledger,
    metrics of the survivors: each once), and B and C then grant exactly what came back."""
    rc = server.client()
    with replicas(server.url, write_config(cap_doc(1.0)), 3) as (a, b, c):
        held = await authorize_many([a.url], 20, lease_ms=1500, on_expiry="charge")
        held += await authorize_many([a.url], 20, lease_ms=1500)
        assert all(d["allowed"] for d in held)
        calls = (authorize_many([a.url], 1, lease_ms=1500, on_expiry="charge") for _ in range(20))
        in_flight = asyncio.gather(*calls, return_exceptions=True)  # running from here
        await asyncio.sleep(0.05)
        os.kill(pid_of(a), signal.SIGKILL)
        await in_flight
        assert a.process is not None
        a.process.wait(timeout=10)
        # What A had Redis hold: its records (no other replica has decided yet).
        mine = records(rc)
        charge = {rid for rid, r in mine.items() if r[0] == "H" and r[21] == "c"}
        release = {rid for rid, r in mine.items() if r[0] == "H" and r[21] == ""}
        assert len(charge) >= 20 and len(release) == 20 and len(mine) == len(charge) + 20
        ends = max(int(r[1]) for r in mine.values())

        first = await authorize_many([b.url, c.url], 120, lease_ms=600_000)
        allowed = sum(d["allowed"] for d in first)
        used, hold = used_held(rc)
        assert used + hold == 100 * CENT  # filled to the cent, never past it
        now = records(rc)
        still = sum(1 for rid in mine if now[rid][0] == "H")
        charged = sum(1 for rid in mine if now[rid][0] == "S")
        assert (used, hold) == (charged * CENT, (allowed + still) * CENT)

        wait_past(ends)
        assert request_json(b.url + "/v1/check", {"estimated_usd": 0.01})[0] == 200
        assert used_held(rc) == (len(charge) * CENT, allowed * CENT)
        after = records(rc)
        assert {rid for rid in mine if after[rid][0] == "S"} == charge
        assert {rid for rid in mine if after[rid][0] == "E"} == release
        assert rc.xlen(TENANT.usage) == len(charge)  # one expiry record each
        survivors = [b.url, c.url]
        expired = sum(reservations_metric(u, "expired") for u in survivors)
        at_end = sum(reservations_metric(u, "charged_at_lease_end") for u in survivors)
        assert (expired, at_end) == (len(release), len(charge))

        second = await authorize_many([b.url, c.url], 120, lease_ms=600_000)
        assert sum(d["allowed"] for d in second) == 100 - len(charge) - allowed
        assert sum(used_held(rc)) == 100 * CENT
        rc.close()


async def test_one_idempotency_key_through_three_replicas_holds_once_and_charges_once(
    server: RedisServer, write_config: Callable[[dict[str, Any]], Path]
) -> None:
    """The same key and request through three replicas at once: one hold (29 replays of
    it), and 30 concurrent settles of it through the three: one charge. Then a key whose
    authorize Redis ran for a replica killed (-9) before it answered: the retry through
    another replica gets that reservation back, and it is charged once."""
    rc = server.client()
    with replicas(server.url, write_config(cap_doc(1.0)), 3) as (a, b, c):
        urls = [a.url, b.url, c.url]
        answers = await authorize_many(urls, 30, idempotency_key="same", lease_ms=600_000)
        assert len({d["reservation_id"] for d in answers}) == 1
        assert sorted(d["replayed"] for d in answers) == [False] + [True] * 29
        assert used_held(rc) == (0, CENT)
        rid = answers[0]["reservation_id"]
        async with aiohttp.ClientSession() as session:
            settles = await asyncio.gather(
                *(
                    post(session, urls[i % 3] + "/v1/settle", {"reservation_id": rid,
                                                                "cost_usd": 0.02})
                    for i in range(30)
                )
            )  # fmt: skip
        assert sorted(s["replayed"] for s in settles) == [False] + [True] * 29
        assert {s["cost_usd"] for s in settles} == {0.02}
        assert used_held(rc) == (2 * CENT, 0) and rc.xlen(TENANT.usage) == 1

        # Killed mid-call: Redis (stopped) has A's script in its socket when A dies.
        loop = asyncio.get_running_loop()
        with stopped(pid_of(server)):
            lost = loop.run_in_executor(
                None, lambda: request_json(a.url + "/v1/authorize", {
                    "estimated_usd": 0.01, "idempotency_key": "k2", "lease_ms": 600_000},
                    timeout_s=30)
            )  # fmt: skip
            await asyncio.sleep(0.5)
            os.kill(pid_of(a), signal.SIGKILL)
        wait_until(lambda: rc.hexists(TENANT.reservations, "k:k2"), what="A's authorize run")
        with contextlib.suppress(OSError):
            await lost  # A died without answering, as meant
        body = {"estimated_usd": 0.01, "idempotency_key": "k2", "lease_ms": 600_000}
        status, retry = request_json(b.url + "/v1/authorize", body)
        assert status == 200 and retry["allowed"] and retry["replayed"], retry
        assert retry["reservation_id"] == rc.hget(TENANT.reservations, "k:k2")
        assert used_held(rc) == (2 * CENT, CENT)
        for url in (b.url, c.url):
            status, s = request_json(
                url + "/v1/settle", {"reservation_id": retry["reservation_id"], "cost_usd": 0.01}
            )
            assert status == 200 and s["cost_usd"] == 0.01, s
        assert used_held(rc) == (3 * CENT, 0) and rc.xlen(TENANT.usage) == 2
        rc.close()


# Every lease's end moved to one moment (test setup; what a crashed fleet leaves behind),
# in the lease index and in the record (field 2), as authorize would have written them.
_END_ALL_AT = """
local at = ARGV[1]
for _, rid in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  redis.call('ZADD', KEYS[1], 'XX', at, rid)
  local rec = redis.call('HGET', KEYS[2], rid)
  redis.call('HSET', KEYS[2], rid, (string.gsub(rec, '^([^|]*)|[^|]*|', '%1|' .. at .. '|', 1)))
end
return redis.call('ZCARD', KEYS[1])
"""


async def test_two_thousand_leases_ending_at_once_while_three_replicas_decide(
    server: RedisServer, write_config: Callable[[dict[str, Any]], Path]
) -> None:
    """2,000 $0.01 holds (1,000 charged at their end) whose leases all end at one moment,
    on a $21.00 cap, while 30 callers authorize and settle $0.01 calls through three
    replicas across that moment: every answer 200 (no 500, no 503), the cap never passed,
    and afterwards exactly 1,000 expiries charged, 1,000 returned, each once (ledger,
    counters, the replicas' metrics)."""
    rc = server.client()
    with replicas(server.url, write_config(cap_doc(21.0)), 3) as procs:
        urls = [p.url for p in procs]
        half = await authorize_many(urls, 1000, lease_ms=600_000, on_expiry="charge")
        half += await authorize_many(urls, 1000, lease_ms=600_000)
        assert all(d["allowed"] for d in half)
        assert used_held(rc) == (0, 2000 * CENT)
        at = wall_ms() + 400
        assert rc.eval(_END_ALL_AT, 2, TENANT.leases, TENANT.reservations, at) == 2000

        tally = {"allowed": 0, "denied": 0, "after": 0}

        async def caller(n: int, session: aiohttp.ClientSession) -> None:
            url = urls[n % 3]
            for _ in range(40):  # bounded; stops once past the moment for a few calls
                d = await post(session, url + "/v1/authorize", {"estimated_usd": 0.01})
                if d["allowed"]:
                    tally["allowed"] += 1
                    s = await post(session, url + "/v1/settle", {
                        "reservation_id": d["reservation_id"], "cost_usd": 0.01})  # fmt: skip
                    assert s["state"] == "settled" and not s["replayed"]
                else:
                    tally["denied"] += 1
                if wall_ms() > at:
                    tally["after"] += 1
                    if tally["after"] >= 90:
                        return

        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(caller(n, session) for n in range(30)))
        assert tally["after"] >= 90, tally  # the load ran past the moment
        assert request_json(urls[0] + "/v1/check", {"estimated_usd": 0.01})[0] == 200
        used, hold = used_held(rc)
        assert (used, hold) == ((1000 + tally["allowed"]) * CENT, 0)
        assert used <= 2100 * CENT
        assert rc.zcard(TENANT.leases) == 0
        assert rc.xlen(TENANT.usage) == 1000 + tally["allowed"]
        expired = sum(reservations_metric(u, "expired") for u in urls)
        at_end = sum(reservations_metric(u, "charged_at_lease_end") for u in urls)
        assert (expired, at_end) == (1000, 1000)
        rc.close()
