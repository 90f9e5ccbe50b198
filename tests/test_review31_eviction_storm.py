"""Review of the eviction watch (sidecar.state_loss, kind `evicted`) against a Redis that
KEEPS evicting: maxmemory with an evicting policy and a store that stays at that limit
(another app's cache sharing the Redis, or the sidecar's own growth). Its evicted_keys
rises between every two state checks (every 5 s), so each check is "an eviction".

Each test runs two apps in-process over a redis-server of its own (real eviction, real
INFO). Eviction is deterministic: policy volatile-ttl, and the ballast written between
checks has the shortest expiry of every key, so Redis evicts ballast only (the tenants'
keys and the markers stay: their expiries are days).
"""

from __future__ import annotations

from typing import Any

import pytest
import redis

from sidecar.api.app import STATE_WATCH
from sidecar.clock import FakeClock
from sidecar.metrics import Metrics
from sidecar.state_loss import EVICTED, StateWatch
from tests.conftest import T0_MS
from tests.harness import RedisServer
from tests.inprocess import app_over, call
from tests.test_attack28_eviction import DOC, eviction_errors, metric, metrics_text

CHECKS = 12  # one minute of state checks (every 5 s)
HOUR_MS = 3_600_000
BALLAST = "b" * 1024
BALLAST_MAX = 2_000  # 1 KiB each, per eviction: a 2 MiB bound on what one step writes


def evicted_keys(rc: redis.Redis) -> int:
    return int(rc.info("stats")["evicted_keys"])  # type: ignore[index]


def evict_some(rc: redis.Redis, step: int) -> int:
    """Ballast (expiring in 60 s: the shortest TTL) until Redis has evicted at least one
    key more; the ballast written."""
    before = evicted_keys(rc)
    written = 0
    while evicted_keys(rc) == before and written < BALLAST_MAX:
        rc.set(f"ballast:{step}:{written}", BALLAST, ex=60)
        written += 1
    assert evicted_keys(rc) > before, f"nothing evicted by {written} ballast keys"
    return written


def fill_to_limit(rc: redis.Redis) -> None:
    """maxmemory just above what the store holds now, policy volatile-ttl."""
    used = int(rc.info("memory")["used_memory"])  # type: ignore[index]
    rc.config_set("maxmemory-samples", 64)
    rc.config_set("maxmemory-policy", "volatile-ttl")
    rc.config_set("maxmemory", used + 200_000)


def loss_alerts(alerts: dict[str, Any]) -> list[dict[str, Any]]:
    return [x for x in alerts["alerts"] if x["alert_type"] == "store_state_lost"]


async def test_a_redis_that_keeps_evicting_alerts_each_tenant_once_an_hour(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis that keeps evicting: every check of every replica found "an eviction", and
    each wrote one loss alert per tenant with an id of its own (the node's evicted_keys at
    that read): 12 checks of 2 replicas, 24 alerts per tenant a minute, 1,440 an hour, all
    different ids (receivers cannot deduplicate them), 1,440 error lines an hour, and the
    alerts stream (capped at 10,000 entries) pushes the tenant's threshold alerts out in
    under 7 hours (in 42 minutes with 10 replicas). The first eviction is what an operator
    needs to act on; while it goes on, the gauge store_evicting, the counter
    state_lost_total{kind="evicted"} (every check) and /readyz say so. Bound: one eviction
    alert per tenant per UTC hour, one id for every replica in that hour (a replica finds
    another's entry and writes none), and one error line per replica per hour."""
    rc = server.client()
    clock = FakeClock(T0_MS)  # on an hour boundary
    clients = [await app_over(server.url, DOC, clock=clock, events=Metrics()) for _ in range(2)]
    a = clients[0]
    watches: list[StateWatch] = [c.app[STATE_WATCH] for c in clients]  # type: ignore[index]
    try:
        status, got = await call(a, "POST", "/v1/authorize", {"org_id": "o1",
                                                              "estimated_usd": 0.01})  # fmt: skip
        assert status == 200 and got["allowed"] is True, got
        for w in watches:
            assert await w.check() is False
        fill_to_limit(rc)
        caplog.clear()
        found = 0
        for step in range(CHECKS):
            evict_some(rc, step)
            clock.advance(5_000)
            for w in watches:
                found += await w.check()
        assert found == 2 * CHECKS  # every check of both replicas found one
        for c, w in zip(clients, watches, strict=True):
            # Counted at every check (rate() rules see it go on). The definitions watcher
            # may run one check more in the background (its version moved): counted too.
            assert w.losses >= CHECKS, w.losses
            text = await metrics_text(c)
            assert metric(text, 'budget_sidecar_store_state_lost_total{kind="evicted"}') == w.losses
            assert w.last_loss is not None and w.last_loss.kind == EVICTED
            assert w.last_loss.count == w.losses
        status, alerts = await call(a, "GET", "/v1/alerts")
        assert status == 200, alerts
        lost = loss_alerts(alerts)
        assert len(lost) == 1, [x["id"] for x in lost]
        said = [r for r in eviction_errors(caplog) if "evicted keys" in r.getMessage()]
        assert len(said) == 2, [r.getMessage()[:80] for r in said]  # one per replica

        # The next hour: one more alert (another id), one more line per replica.
        clock.advance(HOUR_MS)
        evict_some(rc, CHECKS)
        for w in watches:
            assert await w.check() is True
        status, alerts = await call(a, "GET", "/v1/alerts")
        lost = loss_alerts(alerts)
        assert len(lost) == 2 and len({x["id"] for x in lost}) == 2, [x["id"] for x in lost]
        said = [r for r in eviction_errors(caplog) if "evicted keys" in r.getMessage()]
        assert len(said) == 4, [r.getMessage()[:80] for r in said]
    finally:
        rc.close()
        for c in clients:
            await c.close()
