"""Review of attack9/10/11 (state loss, connection ends, alerts at denial)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis
import uvloop
from aiohttp.test_utils import TestServer

from sidecar.api.app import STATE_WATCH, create_app
from sidecar.clock import FakeClock
from sidecar.state_loss import StateWatch
from sidecar.store import RedisStore
from tests.conftest import T0_MS, make_config
from tests.harness import RedisServer
from tests.inprocess import app_over, call
from tests.test_fast_path import DOC
from tests.test_http_edge_attacks import PATHS
from tests.test_http_edge_attacks import (
    test_a_client_that_closed_for_good_has_its_hold_taken_back as closed_for_good,
)
from tests.test_http_edge_attacks import (
    test_a_client_that_half_closes_gets_its_answer_and_keeps_its_hold as half_close,
)
from tests.test_transport_attacks import HOLDING


def on_uvloop(redis_server: RedisServer, attack: Callable[..., Awaitable[None]], **kw: Any) -> None:
    """Run an in-process attack on uvloop, the loop `budget-sidecar serve` runs on."""

    async def main() -> None:
        servers: list[TestServer] = []

        async def start(fast: bool = True, doc: dict[str, Any] | None = None) -> TestServer:
            cfg = make_config({**(doc or DOC), "settings": {"fast_http": fast}})
            store = RedisStore.from_url(redis_server.url, timeout_ms=2000)
            srv = TestServer(create_app(cfg, store), host="127.0.0.1")
            await srv.start_server()
            servers.append(srv)
            return srv

        try:
            await attack(start, **kw)
        finally:
            for srv in servers:
                await srv.close()

    uvloop.run(main())


@pytest.mark.parametrize("route", list(HOLDING))
@pytest.mark.parametrize(("fast", "handed"), PATHS)
def test_uvloop_half_close_keeps_the_hold(
    redis_server: RedisServer, redis_client: redis.Redis, route: str, fast: bool, handed: bool
) -> None:
    on_uvloop(redis_server, half_close, redis_client=redis_client, route=route, fast=fast,
              handed=handed)  # fmt: skip


@pytest.mark.parametrize("route", list(HOLDING))
@pytest.mark.parametrize(("fast", "handed"), PATHS)
def test_uvloop_closed_for_good_takes_the_hold_back(
    redis_server: RedisServer, redis_client: redis.Redis, route: str, fast: bool, handed: bool
) -> None:
    on_uvloop(redis_server, closed_for_good, redis_client=redis_client, route=route, fast=fast,
              handed=handed)  # fmt: skip


# ---- state loss: what this sidecar itself changed before the loss ----------------------------

STOP_DOC = {"budgets": [], "settings": {"fail_mode": "closed", "redis_timeout_ms": 2000}}
X_BUDGET = {"id": "x-cap", "name": "X cap", "scope": "team", "scope_id": "tx",
            "limit_usd": 1.0, "period": "monthly", "alert_thresholds": []}  # fmt: skip
Y_BUDGET = {**X_BUDGET, "id": "y-cap", "name": "Y cap", "scope_id": "ty"}


async def test_a_stop_lifted_here_does_not_come_back_after_a_loss(server: RedisServer) -> None:
    """One sidecar (the single-node setup): an operator lifts a stop through it, then
    Redis restarts empty before its next check. The sidecar knows the stop was lifted:
    the restore must not bring it back (before: it put back the stop its last check saw)."""
    client = await app_over(server.url, STOP_DOC)
    watch: StateWatch = client.app[STATE_WATCH]  # type: ignore[index]
    try:
        status, stop = await call(
            client, "POST", "/v1/stops", {"scope": "agent", "scope_id": "a1", "reason": "loop"}
        )
        assert status == 201
        await watch.check()  # the check sees the stop in force
        status, _ = await call(client, "DELETE", f"/v1/stops/{stop['id']}")
        assert status in (200, 204)
        with server.client() as rc:
            rc.flushall()
        assert await watch.check()  # the loss, noticed
        status, listed = await call(client, "GET", "/v1/stops")
        assert listed["stops"] == [], listed
        status, got = await call(client, "POST", "/v1/authorize",
                                 {"agent_id": "a1", "estimated_usd": 0.01})  # fmt: skip
        assert status == 200 and got["allowed"], got
    finally:
        await client.close()


async def test_a_stop_made_here_is_put_back_after_a_loss(server: RedisServer) -> None:
    """The other way: a stop made through this sidecar just before the loss (its check has
    not run since) is one it knows of; a stop that silently disappears is the safety
    problem the restore exists for."""
    client = await app_over(server.url, STOP_DOC)
    watch: StateWatch = client.app[STATE_WATCH]  # type: ignore[index]
    try:
        await watch.check()
        status, stop = await call(
            client, "POST", "/v1/stops", {"scope": "agent", "scope_id": "a1", "reason": "loop"}
        )
        assert status == 201
        with server.client() as rc:
            rc.flushall()
        assert await watch.check()
        status, listed = await call(client, "GET", "/v1/stops")
        assert [s["id"] for s in listed["stops"]] == [stop["id"]], listed
    finally:
        await client.close()


async def test_an_admin_write_right_after_a_loss_does_not_drop_the_definitions(
    server: RedisServer,
) -> None:
    """Redis loses its state; the next admin write through this sidecar comes before its
    check (or its definitions poll). The write's own reload read what was left (only the
    new budget) as 'the definitions as last loaded', so the check that then noticed the
    loss put back nothing: the budget made before the loss was gone for good."""
    client = await app_over(server.url, STOP_DOC)
    watch: StateWatch = client.app[STATE_WATCH]  # type: ignore[index]
    try:
        status, _ = await call(client, "POST", "/api/v1/budgets", X_BUDGET)
        assert status == 201
        await watch.check()
        with server.client() as rc:
            rc.flushall()
        status, _ = await call(client, "POST", "/api/v1/budgets", Y_BUDGET)
        assert status == 201
        await watch.check()
        assert watch.losses == 1
        for budget in ("x-cap", "y-cap"):
            status, got = await call(client, "GET", f"/api/v1/budgets/{budget}")
            assert status == 200, (budget, got)
    finally:
        await client.close()


async def test_the_definitions_watcher_survives_a_store_timeout_in_its_loss_check(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The version goes back (a loss), and Redis stalls while the poll's loss check runs
    its first script: the store's timeout is a StoreUnavailable, which the watcher's loop
    (it kept only RedisError and OSError) did not catch: the task died, and this replica
    never learned of a definition change again."""
    client = await app_over(server.url, STOP_DOC)
    watch: StateWatch = client.app[STATE_WATCH]  # type: ignore[index]
    task: asyncio.Task[None] | None = None
    try:
        status, _ = await call(client, "POST", "/api/v1/budgets", X_BUDGET)
        assert status == 201
        await watch.check()
        with server.client() as rc:
            rc.flushall()
            # Scripts (which may write) wait; the version's GET (a read) is answered.
            rc.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")
        try:
            task = asyncio.get_running_loop().create_task(watch.definitions.run())

            def failed_once() -> bool:
                return any("cannot read definitions" in r.getMessage() for r in caplog.records)

            for _ in range(1500):  # bounded: two store timeouts at most (the lock)
                if task.done() or failed_once():
                    break
                await asyncio.sleep(0.01)
            assert not task.done(), task.exception()
        finally:
            with server.client() as rc:
                rc.execute_command("CLIENT", "UNPAUSE")
    finally:
        if task is not None:
            task.cancel()
        await client.close()


async def test_one_loss_noticed_by_two_replicas_is_one_alert_id(server: RedisServer) -> None:
    """Each replica that notices a loss appends its alert (both are in the stream); the
    webhooks contract is that receivers deduplicate on the alert id. Each entry's id ended
    in its own replica's clock reading, so a receiver paged once per replica: the ids of
    one loss must be one id (the marker both replicas found after it)."""
    # Two replicas whose clocks read apart by a millisecond, as two hosts' do.
    clients = [
        await app_over(server.url, STOP_DOC),
        await app_over(server.url, STOP_DOC, clock=FakeClock(T0_MS + 1)),
    ]
    watches: list[StateWatch] = [c.app[STATE_WATCH] for c in clients]  # type: ignore[index]
    try:
        for w in watches:
            await w.check()
        with server.client() as rc:
            rc.flushall()
        for w in watches:
            assert await w.check()
        status, alerts = await call(clients[0], "GET", "/v1/alerts")
        lost = [a for a in alerts["alerts"] if a["alert_type"] == "store_state_lost"]
        assert len(lost) == 2, alerts
        assert lost[0]["id"] == lost[1]["id"], lost
        # A second loss is another alert, with an id of its own.
        with server.client() as rc:
            rc.flushall()
        assert await watches[0].check()
        status, alerts = await call(clients[0], "GET", "/v1/alerts")
        assert status == 200
        again = [a["id"] for a in alerts["alerts"] if a["alert_type"] == "store_state_lost"]
        assert len(again) == 1 and again[0] != lost[0]["id"], (again, lost)
    finally:
        for c in clients:
            await c.close()
