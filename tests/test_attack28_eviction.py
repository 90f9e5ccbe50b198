"""Attacks on the cap with a Redis that EVICTS: `maxmemory` set with a `maxmemory-policy`
other than `noeviction` (allkeys-*, volatile-*; volatile-lru is ElastiCache's default).
At its memory limit Redis deletes keys without telling anyone: a tenant's counters hash
(bs:{T}:ctr, no expiry: allkeys-* only), holds, idempotency records, the stops' mirror,
learned estimates and loop guards' memory (which carry expiries: volatile-* too), and the
state markers themselves (30-day expiry).

Each test runs the app in-process over a redis-server of its own (real eviction, real
INFO), filled with ballast keys. Eviction is made deterministic, not timed: every key is
aged with RESTORE ... IDLETIME (a tenant idle for an hour), the sidecar's own state check
then runs once, as it does every 5 s (it touches the markers and the stops' hash), and
maxmemory-samples 64 over a few dozen keys makes Redis's LRU exact: the ballast evicts
exactly the keys nobody touched since, the marker stays.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis

from sidecar.api.app import STATE_WATCH
from sidecar.keys import DEFS_EPOCH, escape, state_marker, tenant_keys
from sidecar.metrics import Metrics
from sidecar.state_loss import StateWatch
from tests.cluster_harness import RedisCluster
from tests.harness import RedisServer
from tests.inprocess import app_over, call
from tests.test_cluster_state_loss import Sidecar, pick_tenants

EVICTED = "evicted"  # state_loss.EVICTED, the kind an eviction is said as
TENANT = tenant_keys("default")
LIMIT_MICRO = 5_000_000
ORG_CAP = {"id": "org", "name": "The org", "scope": "organization", "limit_usd": 5.0,
           "period": "daily"}  # fmt: skip
DOC = {"budgets": [ORG_CAP], "settings": {"fail_mode": "closed", "redis_timeout_ms": 2000}}
# Small ballast keys: each write passes maxmemory by at most about 1 KiB, so Redis evicts
# the idle keys one by one and never reaches a young one (the marker) while one idle key
# (the counters) is left.
BALLAST_MAX = 4_000  # 1 KiB each: a 4 MiB bound on what a test writes
BALLAST = "b" * 1024
HEADROOM = 200_000  # maxmemory this far above what the store holds when filling starts


def age_every_key(rc: redis.Redis, idle_s: int = 3600) -> int:
    """Every key as if nobody had touched it for `idle_s` (RESTORE keeps value and expiry,
    IDLETIME sets what allkeys-lru / volatile-lru rank by); the number of keys."""
    names = list(rc.scan_iter(count=1000))
    for name in names:
        ttl = int(rc.pttl(name))  # type: ignore[arg-type]
        dump = rc.dump(name)
        rc.restore(name, max(ttl, 0), dump, replace=True, idletime=idle_s)  # type: ignore[arg-type]
    return len(names)


def evict_until_gone(rc: redis.Redis, key: str, policy: str, *, ttl_s: int | None = None) -> int:
    """maxmemory just above what the store holds, `policy`, then 1 KiB ballast keys (with
    an expiry `ttl_s` if given) until Redis has evicted `key`; then maxmemory raised far
    above use (the policy kept) so nothing more goes. The ballast written."""
    used = int(rc.info("memory")["used_memory"])  # type: ignore[index]
    rc.config_set("maxmemory-samples", 64)
    rc.config_set("maxmemory-policy", policy)
    rc.config_set("maxmemory", used + HEADROOM)
    written = 0
    while rc.exists(key) and written < BALLAST_MAX:
        rc.set(f"ballast:{written}", BALLAST, ex=ttl_s)
        written += 1
    assert not rc.exists(key), f"{key} not evicted by {written} ballast keys"
    rc.config_set("maxmemory", used + 500 * HEADROOM)
    return written


def evicted_keys(rc: redis.Redis) -> int:
    return int(rc.info("stats")["evicted_keys"])  # type: ignore[index]


def spent(rc: redis.Redis) -> int:
    fields: dict[str, str] = rc.hgetall(TENANT.counters)  # type: ignore[assignment]
    return sum(int(v) for k, v in fields.items() if k.startswith("u:"))


async def spend(client: Any, times: int, usd: float = 1.0) -> int:
    """`times` authorize + settle of `usd` each; how many were allowed (and settled)."""
    allowed = 0
    for _ in range(times):
        status, got = await call(client, "POST", "/v1/authorize",
                                 {"org_id": "o1", "estimated_usd": usd})  # fmt: skip
        assert status == 200, got
        if got["allowed"]:
            status, settled = await call(client, "POST", "/v1/settle",
                                         {"reservation_id": got["reservation_id"],
                                          "cost_usd": usd})  # fmt: skip
            assert status == 200, settled
            allowed += 1
    return allowed


async def metrics_text(client: Any) -> str:
    return str(await (await client.get("/metrics")).text())


def metric(text: str, line: str) -> float:
    """The value of the one sample `line` (name{labels}) in an exposition."""
    found = [row for row in text.splitlines() if row.startswith(line + " ")]
    assert len(found) == 1, (line, [r for r in text.splitlines() if line.split("{")[0] in r])
    return float(found[0].rsplit(" ", 1)[1])


def eviction_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelname == "ERROR"
            and "maxmemory-policy noeviction" in r.getMessage()]  # fmt: skip


# ---- 1. allkeys-lru evicts a tenant's counters: spend passes the cap -----------------------


async def test_an_allkeys_eviction_of_the_counters_passes_the_cap_and_is_said(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A tenant spends up to its cap and goes quiet; ballast (another app's cache, or the
    sidecar's own growth) pushes Redis past maxmemory and allkeys-lru takes the idle
    counters hash. The cap opens again: the whole limit is spent a second time. Nobody can
    bring that back, but both replicas must say it, once each, however many keys went."""
    rc = server.client()
    clients = [await app_over(server.url, DOC, events=Metrics()) for _ in range(2)]
    a, b = clients
    watches: list[StateWatch] = [c.app[STATE_WATCH] for c in clients]  # type: ignore[index]
    try:
        assert await spend(a, 6) == 5  # the cap: 5 of 1.0, the sixth denied
        assert spent(rc) == LIMIT_MICRO
        for w in watches:
            assert await w.check() is False
        aged = age_every_key(rc)
        for w in watches:  # the sidecars' own check, every 5 s: it touches the markers
            await w.check()
        ballast = evict_until_gone(rc, TENANT.counters, "allkeys-lru")
        assert rc.exists(state_marker("default")) == 1  # the marker outlived the counters
        gone = evicted_keys(rc)
        assert gone >= 1 and aged >= 3 and ballast >= 1, (gone, aged, ballast)

        # The cap is open again: 5 more of 1.0 allowed and settled, the sixth denied.
        assert await spend(b, 6) == 5
        assert spent(rc) == LIMIT_MICRO  # what Redis holds: the second 5.0 alone
        settled_total = 2 * LIMIT_MICRO  # 10.0 settled against a limit of 5.0

        for w in watches:
            assert await w.check() is True
            assert w.losses == 1
            assert w.last_loss is not None and w.last_loss.kind == EVICTED
            assert w.last_loss.tenants == ["default"]
        for w in watches:  # no new eviction: nothing more to say
            assert await w.check() is False
            assert w.losses == 1
        for c in clients:
            text = await metrics_text(c)
            assert metric(text, 'budget_sidecar_store_state_lost_total{kind="evicted"}') == 1.0
            assert metric(text, 'budget_sidecar_store_state_lost_total{kind="lost"}') == 0.0
            assert metric(text, "budget_sidecar_store_evicting") == 1.0
            status, ready = await call(c, "GET", "/readyz")
            assert status == 200 and ready["ready"] is True, ready
            assert ready["state_lost"]["kind"] == EVICTED, ready
            assert ready["state_lost"]["count"] == 1, ready
            [node] = ready["redis_eviction"]
            assert node["policy"] == "allkeys-lru" and node["evicted_keys"] == gone, ready
            assert node["maxmemory"] == int(rc.config_get("maxmemory")["maxmemory"]), ready
        status, alerts = await call(a, "GET", "/v1/alerts")
        lost = [x for x in alerts["alerts"] if x["alert_type"] == "store_state_lost"]
        # One entry: the second replica to notice found the first's (the same id in the
        # same hour) and wrote none (test_review31_eviction_storm).
        assert len(lost) == 1, alerts
        assert "evicted" in lost[0]["message"] and "noeviction" in lost[0]["message"], lost
        # The startup error (policy) and the eviction error, each replica.
        errors = eviction_errors(caplog)
        assert len(errors) == 2 * 2, [r.getMessage() for r in errors]
        assert settled_total - LIMIT_MICRO == LIMIT_MICRO  # the overshoot eviction allowed
    finally:
        rc.close()
        for c in clients:
            await c.close()


# ---- 2. the stops' mirror evicted with the counters ----------------------------------------


async def test_a_stop_whose_mirror_was_evicted_with_the_counters_is_enforced_again(
    server: RedisServer,
) -> None:
    """A stop lives twice: its record (bs:{T}:stops, read by the state check every 5 s)
    and its mirror in the counters hash (what decisions read). Evict the counters alone
    and the stopped agent spends again while the stop still lists as in force."""
    rc = server.client()
    client = await app_over(server.url, DOC, events=Metrics())
    watch: StateWatch = client.app[STATE_WATCH]  # type: ignore[index]
    body = {"agent_id": "runaway", "estimated_usd": 0.01}
    try:
        made = {"scope": "agent", "scope_id": "runaway", "reason": "loop"}
        status, stop = await call(client, "POST", "/v1/stops", made)
        assert status == 201, stop
        status, denied = await call(client, "POST", "/v1/check", body)
        assert status == 200 and denied["allowed"] is False, denied
        await watch.check()
        age_every_key(rc)
        await watch.check()  # reads the stops: their record stays young
        evict_until_gone(rc, TENANT.counters, "allkeys-lru")
        assert rc.exists(TENANT.stops) == 1  # the record is there, its mirror is not
        status, listed = await call(client, "GET", "/v1/stops")
        assert [s["id"] for s in listed["stops"]] == [stop["id"]], listed
        # Until the next check the stopped agent passes: nothing can know sooner.
        status, passed = await call(client, "POST", "/v1/check", body)
        assert status == 200 and passed["allowed"] is True, passed

        assert await watch.check() is True
        assert watch.last_loss is not None and watch.last_loss.kind == EVICTED
        assert watch.last_loss.restored_stops == 1, watch.last_loss
        status, after = await call(client, "POST", "/v1/check", body)
        assert status == 200 and after["allowed"] is False, after
        assert rc.hget(TENANT.counters, "s:agent:runaway") == rc.hget(TENANT.stops,
                                                                      "agent:runaway")  # fmt: skip
    finally:
        rc.close()
        await client.close()


# ---- 3. the policy itself: said at start-up, cleared when fixed -----------------------------


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru", "allkeys-random",
                                    "volatile-ttl"])  # fmt: skip
async def test_an_evicting_policy_is_said_at_start_up_and_cleared_once_fixed(
    server: RedisServer, policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    rc = server.client()
    rc.config_set("maxmemory-policy", policy)
    rc.config_set("maxmemory", 100_000_000)
    client = await app_over(server.url, DOC, events=Metrics())
    watch: StateWatch = client.app[STATE_WATCH]  # type: ignore[index]
    try:
        [error] = eviction_errors(caplog)
        assert f"maxmemory-policy {policy}" in error.getMessage(), error.getMessage()
        assert metric(await metrics_text(client), "budget_sidecar_store_evicting") == 1.0
        status, ready = await call(client, "GET", "/readyz")
        assert status == 200 and ready["redis_eviction"] == [
            {"node": f"127.0.0.1:{server.port}", "policy": policy, "maxmemory": 100_000_000,
             "evicted_keys": 0}
        ], ready  # fmt: skip
        assert "state_lost" not in ready and watch.losses == 0
        await watch.check()  # said once, not at every check
        assert len(eviction_errors(caplog)) == 1

        rc.config_set("maxmemory-policy", "noeviction")
        await watch.check()
        assert metric(await metrics_text(client), "budget_sidecar_store_evicting") == 0.0
        status, ready = await call(client, "GET", "/readyz")
        assert status == 200 and "redis_eviction" not in ready, ready
        assert watch.losses == 0 and len(eviction_errors(caplog)) == 1
    finally:
        rc.close()
        await client.close()


@pytest.mark.parametrize(("policy", "maxmemory"), [("noeviction", 100_000_000),
                                                    ("allkeys-lru", 0)])  # fmt: skip
async def test_a_redis_that_cannot_evict_is_not_flagged(
    server: RedisServer, policy: str, maxmemory: int, caplog: pytest.LogCaptureFixture
) -> None:
    """noeviction (OOM instead), or no maxmemory (an evicting policy never acts)."""
    rc = server.client()
    rc.config_set("maxmemory-policy", policy)
    rc.config_set("maxmemory", maxmemory)
    client = await app_over(server.url, DOC, events=Metrics())
    try:
        assert eviction_errors(caplog) == []
        assert metric(await metrics_text(client), "budget_sidecar_store_evicting") == 0.0
        status, ready = await call(client, "GET", "/readyz")
        assert status == 200 and "redis_eviction" not in ready, ready
    finally:
        rc.close()
        await client.close()


# ---- 4. volatile-lru: the counters carry no expiry and stay ---------------------------------


async def test_volatile_lru_cannot_take_the_counters_but_its_evictions_are_said(
    server: RedisServer,
) -> None:
    """Under volatile-* only keys with an expiry go. The counters hash, holds and
    reservations have none (the sweep collects them): the cap holds to the micro-USD.
    What can go is what carries one: the state markers, learned estimates, loop guards'
    memory, usage aggregates; so a rise of evicted_keys is said all the same."""
    rc = server.client()
    client = await app_over(server.url, DOC, events=Metrics())
    watch: StateWatch = client.app[STATE_WATCH]  # type: ignore[index]
    try:
        assert await spend(client, 6) == 5
        for key in (TENANT.counters, TENANT.reservations):
            assert rc.ttl(key) == -1, key  # no expiry: volatile-* never evicts it
        await watch.check()
        age_every_key(rc)
        # An expiring key nobody touched: another app's cache entry, aged like the rest.
        rc.set("other-app:cache", BALLAST, ex=86_400)
        age_every_key(rc)
        await watch.check()
        evict_until_gone(rc, "other-app:cache", "volatile-lru", ttl_s=86_400)
        gone = evicted_keys(rc)
        assert gone >= 1
        assert rc.exists(TENANT.counters, TENANT.reservations, state_marker("default"),
                         DEFS_EPOCH) == 4  # fmt: skip
        assert spent(rc) == LIMIT_MICRO
        assert await spend(client, 1) == 0  # the cap holds

        assert await watch.check() is True  # what went is unknown: said as an eviction
        assert watch.losses == 1 and watch.last_loss is not None
        assert watch.last_loss.kind == EVICTED
        text = await metrics_text(client)
        assert metric(text, 'budget_sidecar_store_state_lost_total{kind="evicted"}') == 1.0
    finally:
        rc.close()
        await client.close()


async def test_an_eviction_that_took_the_marker_is_said_as_an_eviction_once(
    server: RedisServer,
) -> None:
    """The marker evicted too (every key aged, none touched since): the marker check and
    the eviction check see the same event; it is counted once, as an eviction."""
    rc = server.client()
    client = await app_over(server.url, DOC, events=Metrics())
    watch: StateWatch = client.app[STATE_WATCH]  # type: ignore[index]
    try:
        assert await spend(client, 6) == 5
        await watch.check()
        age_every_key(rc)
        evict_until_gone(rc, state_marker("default"), "allkeys-lru")
        assert await watch.check() is True
        assert watch.losses == 1 and watch.last_loss is not None
        assert watch.last_loss.kind == EVICTED
        text = await metrics_text(client)
        assert metric(text, 'budget_sidecar_store_state_lost_total{kind="evicted"}') == 1.0
        assert metric(text, 'budget_sidecar_store_state_lost_total{kind="lost"}') == 0.0
        assert rc.exists(state_marker("default")) == 1  # written again
        assert await watch.check() is False and watch.losses == 1
    finally:
        rc.close()
        await client.close()


# ---- 5. a Redis Cluster: one primary evicts ----------------------------------------------


@pytest.mark.slow
async def test_one_cluster_primary_evicting_is_a_loss_of_exactly_its_tenants(
    cluster: RedisCluster,
) -> None:
    """Each primary's INFO is read: an eviction on one (its policy, its evicted_keys) is
    a possible loss of the tenants whose slots it serves, not of the others'."""
    victim, lost, kept = pick_tenants(cluster)
    for port in cluster.alive():
        if cluster.client(port).info("replication")["role"] == "master":
            cluster.client(port).flushall()
    side = await Sidecar.over(cluster.url, lost + kept)
    rc = cluster.client(victim)
    try:
        for t in lost + kept:  # every tenant known to the engine, its marker written
            status, got = await side.call(t, "POST", "/v1/check", {"org_id": "o1"})
            assert status == 200, got
        assert await side.watch.check() is False
        assert side.watch.eviction == []
        before = evicted_keys(rc)
        used = int(rc.info("memory")["used_memory"])  # type: ignore[index]
        rc.config_set("maxmemory-samples", 64)
        rc.config_set("maxmemory-policy", "allkeys-lru")
        rc.config_set("maxmemory", used + HEADROOM)
        tag = escape(lost[0])  # the slot of one of the victim's tenants
        written = 0
        while evicted_keys(rc) == before and written < BALLAST_MAX:
            rc.set(f"ballast:{{{tag}}}:{written}", BALLAST)
            written += 1
        assert evicted_keys(rc) > before, written
        rc.config_set("maxmemory", used + 500 * HEADROOM)

        assert await side.watch.check() is True
        loss = side.watch.last_loss
        assert loss is not None and loss.kind == EVICTED and loss.count == 1, loss
        assert loss.tenants == sorted(lost), (loss, kept)
        assert side.watch.losses == 1
        status, ready = await side.call(lost[0], "GET", "/readyz")
        assert status == 200, ready
        assert [(n["node"], n["policy"]) for n in ready["redis_eviction"]] == [
            (f"127.0.0.1:{victim}", "allkeys-lru")
        ], ready
        assert ready["redis_eviction"][0]["evicted_keys"] == evicted_keys(rc)
        for t in kept:  # no alert where nothing was evicted
            status, alerts = await side.call(t, "GET", "/v1/alerts")
            assert [a for a in alerts["alerts"] if a["alert_type"] == "store_state_lost"] == []
        status, alerts = await side.call(lost[0], "GET", "/v1/alerts")
        assert len([a for a in alerts["alerts"] if a["alert_type"] == "store_state_lost"]) == 1

        rc.config_set("maxmemory-policy", "noeviction")
        rc.config_set("maxmemory", 0)
        assert await side.watch.check() is False
        assert side.watch.eviction == [] and side.watch.losses == 1
    finally:
        rc.config_set("maxmemory-policy", "noeviction")
        rc.config_set("maxmemory", 0)
        await side.client.close()
