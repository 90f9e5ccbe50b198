"""Attacks on sidecar.state_loss where the store is more than one redis-server.

1. A Redis Cluster where ONE primary loses its state (a FLUSHALL on that node alone, which
   its replica copies; or the node restarted without its dump while its replica may not
   take over): only the tenants whose slots live there lost anything. Two sidecars must
   notice exactly those tenants (not the others), put back their stops and admin-API
   definitions, never answer 500, and leave every other tenant's counters as they were.
   A definition written for a surviving tenant between the loss and its noticing (every
   replica then reloads the definitions from Redis, the lost tenant's hash empty) must not
   make the lost tenant's definitions disappear for good.
2. Learned estimates after the loss: the series are gone with their slot; the sidecar
   holds the caller's figure (cold start) and learns again.
3. Sentinel failing over to a replica that is empty (see the test for how one is made).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from sidecar import keys
from sidecar.api.app import STATE_WATCH, WATCHER
from sidecar.state_loss import StateWatch
from tests import inprocess
from tests.cluster_harness import RedisCluster
from tests.harness import wait_until
from tests.sentinel_harness import RedisSentinel

pytestmark = pytest.mark.slow

GUARD_S = 15.0  # not a timing assertion: keeps a hang from hanging the suite
TENANTS_PER_SIDE = 2
API_BUDGET = {
    "id": "api-cap",
    "name": "API cap",
    "scope": "team",
    "scope_id": "t1",
    "limit_usd": 1.0,
    "period": "monthly",
    "on_exceed": "block",
    "alert_thresholds": [],
}
LATE_BUDGET = {**API_BUDGET, "id": "late", "name": "Written between loss and check"}


def auth(tenant: str) -> dict[str, str]:
    token = base64.b64encode(f"ops-{tenant}:pw-{tenant}".encode()).decode()
    return {"Authorization": f"Basic {token}", "X-Client-ID": f"ops-{tenant}"}


def doc(tenants: list[str]) -> dict[str, Any]:
    return {
        "budgets": [
            {
                "id": "org",
                "name": "Org",
                "scope": "organization",
                "limit_usd": 50.0,
                "period": "daily",
            }
        ],
        "settings": {
            "fail_mode": "closed",
            "estimate": "learned",
            "estimate_min_count": 2,
            "redis_timeout_ms": 2000,
        },
        "auth": {
            "clients": [
                {"client_id": f"ops-{t}", "tenant": t, "role": "admin", "secret": f"pw-{t}"}
                for t in tenants
            ]
        },
    }


class Sidecar:
    """One in-process app over the cluster (aiohttp TestClient)."""

    def __init__(self, client: TestClient[Any, Any]) -> None:
        self.client = client
        self.app = client.app

    @classmethod
    async def over(cls, url: str, tenants: list[str]) -> Sidecar:
        """Started; the test closes its client."""
        return cls(await inprocess.app_over(url, doc(tenants)))

    @property
    def watch(self) -> StateWatch:
        return self.app[STATE_WATCH]

    async def call(
        self, tenant: str, method: str, path: str, body: Any = None
    ) -> tuple[int, dict[str, Any]]:
        """(status, JSON body); a 500 or a stack trace fails the test wherever it appears."""
        return await inprocess.call(
            self.client, method, path, body, headers=auth(tenant), guard_s=GUARD_S
        )


def pick_tenants(cluster: RedisCluster) -> tuple[int, list[str], list[str]]:
    """(victim primary, its tenants, the other tenants): the victim is a primary that does
    not hold the definitions' own slot, so losing it loses only tenants' slots."""
    defs_node = cluster.primary_of(keys.DEFS_EPOCH)
    by_node: dict[int, list[str]] = {}
    n = 0
    while True:
        t = f"tenant-{n}"
        n += 1
        by_node.setdefault(cluster.primary_of(keys.state_marker(t)), []).append(t)
        victims = [p for p, ts in by_node.items() if p != defs_node and len(ts) >= TENANTS_PER_SIDE]
        others = [t for p, ts in by_node.items() for t in ts if victims and p != victims[0]]
        if victims and len(others) >= TENANTS_PER_SIDE:
            victim = victims[0]
            return victim, by_node[victim][:TENANTS_PER_SIDE], others[:TENANTS_PER_SIDE]


def tenant_data(cluster: RedisCluster, tenant: str) -> dict[str, Any]:
    tk = keys.tenant_keys(tenant)
    rc = cluster.client(cluster.primary_of(tk.counters))
    return {
        "ctr": rc.hgetall(tk.counters),
        "est": rc.hgetall(tk.estimates),
        "stops": rc.hgetall(tk.stops),
        "defs": rc.hgetall(keys.definitions(tenant)),
    }


def replica_of(cluster: RedisCluster, primary: int) -> int | None:
    for port in cluster.alive():
        info = cluster.client(port).info("replication")
        if info.get("role") == "slave" and int(info.get("master_port", 0)) == primary:
            return port
    return None


async def learned_source(side: Sidecar, tenant: str) -> tuple[str, float]:
    status, d = await side.call(
        tenant, "POST", "/v1/authorize", {"agent_id": "learner", "estimated_usd": 0.01}
    )
    assert status == 200 and d["allowed"], d
    status, _ = await side.call(
        tenant, "POST", "/v1/release", {"reservation_id": d["reservation_id"]}
    )
    assert status == 200
    return d["estimate_source"], d["estimated_usd"]


async def teach(side: Sidecar, tenant: str, times: int) -> None:
    for _ in range(times):
        status, d = await side.call(
            tenant, "POST", "/v1/authorize", {"agent_id": "learner", "estimated_usd": 0.01}
        )
        assert status == 200 and d["allowed"], d
        status, _ = await side.call(
            tenant, "POST", "/v1/settle", {"reservation_id": d["reservation_id"], "cost_usd": 0.05}
        )
        assert status == 200


@pytest.mark.parametrize("how", ["flushall", "restart"])
async def test_one_primary_losing_its_state_is_noticed_for_exactly_its_tenants(
    cluster: RedisCluster, how: str
) -> None:
    victim, lost, kept = pick_tenants(cluster)
    tenants = lost + kept
    # Each run starts from an empty cluster (the other parameter's keys gone).
    for port in cluster.alive():
        if cluster.client(port).info("replication")["role"] == "master":
            cluster.client(port).flushall()
    sides = [await Sidecar.over(cluster.url, tenants) for _ in range(2)]
    a, b = sides
    try:
        stop_ids: dict[str, str] = {}
        for t in tenants:
            status, _ = await a.call(t, "POST", "/api/v1/budgets", API_BUDGET)
            assert status == 201
            status, stop = await a.call(
                t, "POST", "/v1/stops", {"scope": "agent", "scope_id": "runaway", "reason": "loop"}
            )
            assert status == 201, stop
            stop_ids[t] = stop["id"]
            status, d = await a.call(
                t, "POST", "/v1/authorize", {"org_id": "o1", "estimated_usd": 0.25}
            )
            assert status == 200 and d["allowed"], d
            status, _ = await a.call(
                t, "POST", "/v1/settle", {"reservation_id": d["reservation_id"], "cost_usd": 0.2}
            )
            assert status == 200
            await teach(a, t, 2)
            assert await learned_source(a, t) == ("learned", 0.05)
        for s in sides:
            await s.watch.check()
            await s.app[WATCHER].refresh()
        assert all(s.watch.losses == 0 for s in sides)
        before = {t: tenant_data(cluster, t) for t in kept}

        if how == "flushall":
            cluster.client(victim).flushall()  # that node alone (its replica copies it)
        else:
            replica = replica_of(cluster, victim)
            if replica is not None:  # keep it from taking over with the data
                cluster.client(replica).config_set("cluster-replica-no-failover", "yes")
            cluster.restart_empty(victim)
            if replica is not None:
                wait_until(lambda: cluster._synced(replica), timeout_s=30, what="resync")
                cluster.client(replica).config_set("cluster-replica-no-failover", "no")
        assert all(tenant_data(cluster, t)["ctr"] == {} for t in lost)

        # A definition written for a surviving tenant before anyone noticed: both replicas
        # reload every tenant's definitions from Redis, the lost tenants' hashes empty.
        status, _ = await b.call(kept[0], "POST", "/api/v1/budgets", LATE_BUDGET)
        assert status == 201
        await a.app[WATCHER].poll_once()

        # Callers of every tenant at once, on both sidecars: never a 500 (call asserts it).
        await asyncio.gather(
            *(
                s.call(t, "POST", "/v1/check", {"org_id": f"o{i}", "estimated_usd": 0.01})
                for s in sides
                for t in tenants
                for i in range(5)
            )
        )
        for s in sides:
            for _ in range(3):  # a restart: the first check may meet a reconnecting client
                if s.watch.losses:
                    break
                await s.watch.check()
            assert s.watch.losses == 1, s.watch.last_loss
            assert s.watch.last_loss is not None and s.watch.last_loss.tenants == sorted(lost)
            status, ready = await s.call(lost[0], "GET", "/readyz")
            assert status == 200 and ready["state_lost"]["tenants"] == sorted(lost), ready

        # The others: not one counter, learned series or stop changed.
        for t in kept:
            assert tenant_data(cluster, t)["ctr"] == before[t]["ctr"], t
            assert tenant_data(cluster, t)["est"] == before[t]["est"], t
            assert tenant_data(cluster, t)["stops"] == before[t]["stops"], t
        # The lost: the stop back (same id) and enforced; the admin budget back, enforced.
        for t in lost:
            status, listed = await b.call(t, "GET", "/v1/stops")
            assert [x["id"] for x in listed["stops"]] == [stop_ids[t]], listed
            status, denied = await b.call(
                t, "POST", "/v1/authorize", {"agent_id": "runaway", "estimated_usd": 0.01}
            )
            assert status == 200 and not denied["allowed"], denied
            for s in sides:
                status, got = await s.call(t, "GET", "/api/v1/budgets/api-cap")
                assert status == 200 and got["limit_usd"] == 1.0, (t, got)
            status, over = await a.call(
                t, "POST", "/v1/authorize", {"team_id": "t1", "estimated_usd": 1.5}
            )
            assert status == 200 and not over["allowed"], over
            assert "api-cap" in tenant_data(cluster, t)["defs"].get("b:api-cap", "")
        # Learned estimates: the lost tenants start cold and learn again; the others kept.
        for t in lost:
            assert await learned_source(b, t) == ("caller", 0.01)
            await teach(b, t, 2)
            assert await learned_source(b, t) == ("learned", 0.05)
        for t in kept:
            assert await learned_source(b, t) == ("learned", 0.05)
    finally:
        for s in sides:
            await s.client.close()


# ---- Sentinel failing over to an empty replica ----------------------------------------------

SENTINEL_DOC: dict[str, Any] = {
    "budgets": [
        {"id": "org", "name": "Org", "scope": "organization", "limit_usd": 50.0, "period": "daily"}
    ],
    "settings": {"fail_mode": "closed", "redis_timeout_ms": 1000},
}


async def test_sentinel_failing_over_to_a_replica_that_never_synced(
    sentinel: RedisSentinel,
) -> None:
    """How an empty replica is made, honestly: the replica restarts without persistence
    (its data gone) and asks the primary for a full sync, which the primary delays
    (repl-diskless-sync-delay: it waits for more replicas before streaming one snapshot
    to all). The primary dies in that wait; Sentinel knows the replica (the primary listed
    it, state wait_bgsave) and its link was never up (master_link_down_since_seconds -1),
    so it may promote it: the sidecar's store is now a primary with nothing in it."""
    client = await inprocess.app_over(sentinel.url, SENTINEL_DOC)
    watch: StateWatch = client.app[STATE_WATCH]

    async def call(method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
        return await inprocess.call(client, method, path, body, guard_s=GUARD_S)

    try:
        status, _ = await call("POST", "/api/v1/budgets", API_BUDGET)
        assert status == 201
        status, stop = await call(
            "POST", "/v1/stops", {"scope": "agent", "scope_id": "runaway", "reason": "loop"}
        )
        assert status == 201
        await watch.check()
        primary = sentinel.primary.client()
        primary.config_set("repl-diskless-sync", "yes")
        primary.config_set("repl-diskless-sync-delay", "60")
        sentinel.replica.stop()
        sentinel.replica.start()  # same port, no data
        replica = sentinel.replica.client()
        replica.replicaof("127.0.0.1", sentinel.primary.port)
        wait_until(
            lambda: "wait_bgsave" in str(primary.info("replication").get("slave0", "")),
            what="the replica waits for its full sync",
        )
        assert replica.dbsize() == 0
        assert sentinel.primary.process is not None
        sentinel.primary.process.kill()
        sentinel.primary.process.wait()
        sentinel.primary.process = None
        wait_until(
            lambda: replica.info("replication")["role"] == "master",
            timeout_s=30,
            what="sentinel promotes the empty replica",
        )
        # Calls meet the failover (fail mode 503 while no primary answers), never a 500.
        for _ in range(200):
            status, _ = await call("POST", "/v1/check", {"org_id": "o1", "estimated_usd": 0.01})
            if status == 200:
                break
            await asyncio.sleep(0.1)
        assert status == 200
        for _ in range(3):
            if watch.losses:
                break
            with contextlib.suppress(Exception):
                await watch.check()
        assert watch.losses == 1 and watch.last_loss is not None
        assert watch.last_loss.tenants == ["default"]
        # What it could put back is back on the promoted replica, and enforced.
        assert replica.hget(keys.tenant_keys("default").stops, "#" + stop["id"])
        status, denied = await call(
            "POST", "/v1/authorize", {"agent_id": "runaway", "estimated_usd": 0.01}
        )
        assert status == 200 and not denied["allowed"], denied
        status, got = await call("GET", "/api/v1/budgets/api-cap")
        assert status == 200 and got["limit_usd"] == 1.0, got
    finally:
        await client.close()
