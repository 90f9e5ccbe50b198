"""Attack on "a Redis that lost its state is noticed": Redis restored from an OLDER dump.

An operator restores last night's RDB backup, a failover promotes a replica that lagged far
behind, redis-server restarts on a stale dump.rdb after a persistence failure: the markers
in the old dump hold the same id as before (they were written before the dump), so a check
that only compares ids sees nothing, yet counters, holds, idempotency keys, the ledger,
stops and admin definitions all jump back in time and the caps allow the forgotten spend
again. sidecar.state_loss counts a generation per marker: a generation lower than one this
sidecar saw itself means the store went back in time.

The test runs two sidecars (in-process apps) over a real redis-server that persists only
when told (SAVE writes dump.rdb in its directory, which it loads when it starts again):
spend, SAVE, keep a copy of the dump, spend more, make a stop and lift one, change an admin
budget and make another; then stop Redis, put the older dump back and start it on the
same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.exceptions import RedisError

from sidecar.api.app import STATE_WATCH
from sidecar.clock import FakeClock
from sidecar.keys import state_marker, tenant_keys
from sidecar.metrics import Metrics
from sidecar.state_loss import StateWatch
from sidecar.store import StoreError
from tests.conftest import T0_MS
from tests.harness import RedisServer
from tests.inprocess import app_over, call

TENANT = tenant_keys("default")
ORG_CAP = {"id": "org", "name": "The org", "scope": "organization", "limit_usd": 5.0,
           "period": "daily"}  # fmt: skip
API_BUDGET = {"id": "api-cap", "name": "API cap", "scope": "team", "scope_id": "t1",
              "limit_usd": 1.0, "period": "monthly", "on_exceed": "block",
              "alert_thresholds": []}  # fmt: skip
LATE_BUDGET = {**API_BUDGET, "id": "late-cap", "name": "Made after the dump", "scope_id": "t2"}
DOC = {"budgets": [ORG_CAP], "settings": {"fail_mode": "closed", "redis_timeout_ms": 2000}}


async def spend(client: TestClient[Any, Any], usd: float) -> None:
    body = {"org_id": "o1", "estimated_usd": usd}
    status, held = await call(client, "POST", "/v1/authorize", body)
    assert status == 200 and held["allowed"], held
    status, settled = await call(
        client, "POST", "/v1/settle", {"reservation_id": held["reservation_id"], "cost_usd": usd}
    )
    assert status == 200 and settled["state"] == "settled", settled


async def org_used(client: TestClient[Any, Any]) -> float:
    status, got = await call(client, "GET", "/v1/budgets/org/status?scope_id=o1")
    assert status == 200, got
    return float(got["used_usd"])


async def check_after_restart(watch: StateWatch) -> None:
    """One check that reached Redis: the first after a restart may meet a pooled connection
    the restart closed (bounded, not timed)."""
    for _ in range(5):
        with contextlib.suppress(RedisError, OSError, StoreError):
            await watch.check()
            return
    raise AssertionError("no check reached the restarted Redis")


def restore_old_dump(server: RedisServer, old: Path) -> None:
    """Stop redis-server (no save at shutdown: --save ''), put the older dump back, start it
    on the same port: it loads the dump."""
    server.stop()
    shutil.copyfile(old, Path(server.dir) / "dump.rdb")
    server.start()


async def test_redis_restored_from_an_older_dump_is_noticed_as_a_rollback(
    server: RedisServer, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    metrics = [Metrics(), Metrics()]
    clock = FakeClock(T0_MS)
    clients = [await app_over(server.url, DOC, clock=clock, events=m) for m in metrics]
    a, b = clients
    watches: list[StateWatch] = [c.app[STATE_WATCH] for c in clients]  # type: ignore[index]
    try:
        # ---- before the dump: $1 spent, an admin budget, a stop (lifted after the dump).
        status, _ = await call(a, "POST", "/api/v1/budgets", API_BUDGET)
        assert status == 201
        status, lifted = await call(
            a, "POST", "/v1/stops", {"scope": "agent", "scope_id": "old", "reason": "old loop"}
        )
        assert status == 201
        await spend(a, 1.0)
        for w in watches:
            await w.check()
            await w.definitions.refresh()
        with server.client() as rc:
            assert rc.save()
        old = tmp_path / "old.rdb"
        shutil.copyfile(Path(server.dir) / "dump.rdb", old)

        # ---- after the dump: $2 more, a new stop, the old one lifted, the admin budget
        # lowered (a later second: its updated_at says it is the newer) and another made.
        clock.advance(2_000)
        await spend(a, 1.0)
        await spend(b, 1.0)
        status, made = await call(
            b, "POST", "/v1/stops", {"scope": "agent", "scope_id": "runaway", "reason": "loop"}
        )
        assert status == 201
        status, _ = await call(a, "DELETE", f"/v1/stops/{lifted['id']}")
        assert status in (200, 204)
        status, lowered = await call(a, "PUT", "/api/v1/budgets/api-cap", {"limit_usd": 0.5})
        assert status == 200 and lowered["limit_usd"] == 0.5, lowered
        status, _ = await call(b, "POST", "/api/v1/budgets", LATE_BUDGET)
        assert status == 201
        for w in watches:  # each sidecar's checks ran after the dump was taken
            await w.check()
            await w.definitions.refresh()
        assert await org_used(a) == 3.0
        assert all(w.losses == 0 for w in watches)

        restore_old_dump(server, old)
        with server.client() as rc:  # the old dump is what Redis holds now
            assert rc.hexists(TENANT.stops, "#" + lifted["id"])
            assert not rc.hexists(TENANT.stops, "#" + made["id"])
        for w in watches:
            await check_after_restart(w)
            # A second check finds nothing new: one rollback is one report per sidecar.
            await w.check()

        # Said: each sidecar counts one rollback (and no loss), /readyz says so.
        for c, w in zip(clients, watches, strict=True):
            assert w.losses == 1, w.last_loss
            assert w.last_loss is not None and w.last_loss.kind == "rolled_back"
            assert w.last_loss.tenants == ["default"]
            resp = await c.get("/metrics")
            text = await resp.text()
            assert 'budget_sidecar_store_state_lost_total{kind="rolled_back"} 1.0' in text
            assert 'budget_sidecar_store_state_lost_total{kind="lost"} 0.0' in text
            status, ready = await call(c, "GET", "/readyz")
            assert status == 200 and ready["ready"] is True, ready
            lost = ready["state_lost"]
            assert lost["kind"] == "rolled_back" and lost["tenants"] == ["default"], ready
            assert lost["count"] == 1, ready
        errors = [r.getMessage() for r in caplog.records
                  if r.name == "sidecar.state_loss" and r.levelname == "ERROR"]  # fmt: skip
        assert len(errors) == 2 and all("rolled back" in e for e in errors), errors
        # One alert per noticing sidecar, one alert id (receivers deduplicate on it).
        status, alerts = await call(a, "GET", "/v1/alerts")
        rolled = [x for x in alerts["alerts"] if x["alert_type"] == "store_state_lost"]
        assert len(rolled) == 2, alerts
        assert rolled[0]["id"] == rolled[1]["id"], rolled
        assert all("rolled back" in x["message"] for x in rolled), rolled

        # Put back: the stop made after the dump (same id), enforced by both. The stop
        # lifted after the dump was lifted through a, which knows it: lifted again.
        status, listed = await call(b, "GET", "/v1/stops")
        assert [s["id"] for s in listed["stops"]] == [made["id"]], listed
        for c in clients:
            status, denied = await call(
                c, "POST", "/v1/authorize", {"agent_id": "runaway", "estimated_usd": 0.01}
            )
            assert status == 200 and not denied["allowed"], denied
            status, allowed = await call(
                c, "POST", "/v1/check", {"agent_id": "old", "estimated_usd": 0.01}
            )
            assert status == 200 and allowed["allowed"], allowed
        # The admin budgets: the lowered one at its newer limit (the dump held the older,
        # higher one: present, just old), the one made after the dump back; both enforced.
        for c in clients:
            status, got = await call(c, "GET", "/api/v1/budgets/api-cap")
            assert status == 200 and got["limit_usd"] == 0.5, got
            status, got = await call(c, "GET", "/api/v1/budgets/late-cap")
            assert status == 200 and got["limit_usd"] == 1.0, got
        status, over = await call(b, "POST", "/v1/check", {"team_id": "t1", "estimated_usd": 0.75})
        assert status == 200 and not over["allowed"], over
        # What cannot be put back: the spend after the dump is forgotten (the report is
        # what an operator gets), and the marker now holds the rollback's shared id.
        assert await org_used(a) == 1.0
        with server.client() as rc:
            assert str(rc.hget(state_marker("default"), "id")).startswith("rb_")
    finally:
        for c in clients:
            await c.close()


async def test_replicas_checking_at_once_never_take_each_other_for_a_rollback(
    server: RedisServer,
) -> None:
    """Every replica advances the same generation; each compares only with what it saw
    itself, so three replicas checking one after the other and all at once find nothing,
    and each sees its generation only grow. A marker an older sidecar wrote (the id alone,
    a string) is taken over keeping its id: no loss either."""
    with server.client() as rc:
        rc.set(state_marker("default"), "ep_older_sidecar")
    clients = [await app_over(server.url, DOC) for _ in range(3)]
    watches: list[StateWatch] = [c.app[STATE_WATCH] for c in clients]  # type: ignore[index]
    marker = state_marker("default")
    try:
        last = [w._gens[marker] for w in watches]
        for round_ in range(10):
            if round_ % 2:
                found = await asyncio.gather(*(w.check() for w in watches))
            else:
                found = [await w.check() for w in watches[:: 1 if round_ % 4 else -1]]
            assert found == [False, False, False], round_
            now = [w._gens[marker] for w in watches]
            assert all(n > b for n, b in zip(now, last, strict=True)), (now, last)
            last = now
        assert [w.losses for w in watches] == [0, 0, 0]
        with server.client() as rc:
            assert rc.hget(marker, "id") == "ep_older_sidecar"
            assert int(str(rc.hget(marker, "gen"))) >= 3 + 30  # start-up checks, 30 here
    finally:
        for c in clients:
            await c.close()


async def test_a_dump_younger_than_the_last_check_is_not_seen(
    server: RedisServer, tmp_path: Path
) -> None:
    """The limit, stated in README: the generation tells a store older than this
    sidecar's last check. A dump taken after that check (and restored before the next)
    looks like no rollback; what it forgets is the spend between the dump and the moment
    Redis stopped, less than one check interval (state_loss.CHECK_S) of spend."""
    client = await app_over(server.url, DOC)
    watch: StateWatch = client.app[STATE_WATCH]  # type: ignore[index]
    try:
        await spend(client, 1.0)
        await watch.check()
        with server.client() as rc:
            assert rc.save()
        old = tmp_path / "old.rdb"
        shutil.copyfile(Path(server.dir) / "dump.rdb", old)
        await spend(client, 1.0)  # after the dump, before any check
        restore_old_dump(server, old)
        await check_after_restart(watch)
        await watch.check()
        assert watch.losses == 0 and watch.last_loss is None
        assert await org_used(client) == 1.0  # the $1 after the dump, forgotten unseen
        # The boundary: a store one generation behind what this sidecar saw (a dump taken
        # just before its last check) is older than that check: seen. (The sync client
        # blocks the loop: no background check runs between the write and the check.)
        marker = state_marker("default")
        with server.client() as rc:
            rc.hset(marker, "gen", watch._gens[marker] - 1)
        await watch.check()
        assert watch.losses == 1 and watch.last_loss is not None
        assert watch.last_loss.kind == "rolled_back"
    finally:
        await client.close()
