"""Review of the state check's INFO read (sidecar.state_loss._read_eviction): INFO that
times out or whose connection drops (a primary slow to answer it, one Cluster primary
out of reach) while the scripts answer. The check reads INFO before the markers and
before it puts the stops back: an INFO that fails must not take the whole check with it.

Over a redis-server of its own (real markers, real stops, a real FLUSHALL); the INFO
failure is injected on the watch's own client (the rest of that client is untouched).
"""

from __future__ import annotations

from typing import Any

import pytest
import redis
from redis.exceptions import TimeoutError as RedisTimeout

from sidecar.api.app import STATE_WATCH
from sidecar.state_loss import EVICTED, LOST, StateWatch
from tests.cluster_harness import RedisCluster
from tests.harness import RedisServer
from tests.inprocess import app_over, call
from tests.test_attack28_eviction import DOC
from tests.test_cluster_state_loss import Sidecar, pick_tenants
from tests.test_review31_eviction_storm import evict_some, evicted_keys, fill_to_limit

BODY = {"agent_id": "runaway", "estimated_usd": 0.01}


async def test_an_info_that_times_out_does_not_hold_up_the_stops_put_back(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A stop in force, Redis flushed, and INFO timing out at every check: the check
    raised at INFO, so the loss was never said (0 losses, 0 stops put back after 3 checks)
    and the stopped agent kept passing. INFO is only the eviction watch's: a failed read
    is said (one warning until it answers again), the eviction counts stay as last read
    (an eviction meanwhile is seen at the next read), and the markers and stops go on."""
    rc = server.client()
    client = await app_over(server.url, DOC)
    watch: StateWatch = client.app[STATE_WATCH]  # type: ignore[index]
    real_info = watch.client.info
    calls = 0

    async def slow_info(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        raise RedisTimeout("Timeout reading from socket")

    try:
        made = {"scope": "agent", "scope_id": "runaway", "reason": "loop"}
        status, stop = await call(client, "POST", "/v1/stops", made)
        assert status == 201, stop
        assert await watch.check() is False
        watch.client.info = slow_info  # type: ignore[method-assign]
        rc.flushall()
        results = []
        for _ in range(3):
            try:
                results.append(await watch.check())
            except redis.RedisError as exc:
                results.append(type(exc).__name__)
        # Each check asked INFO (the definitions watcher may run one more in the background,
        # its version gone with the flush: that one may be the check that finds the loss).
        assert calls >= 3
        assert all(isinstance(r, bool) for r in results) and sum(results) <= 1, results
        assert watch.losses == 1
        assert watch.last_loss is not None and watch.last_loss.kind == LOST
        assert watch.last_loss.restored_stops == 1, watch.last_loss
        status, after = await call(client, "POST", "/v1/check", BODY)
        assert status == 200 and after["allowed"] is False, after
        said = [r for r in caplog.records if "cannot read INFO" in r.getMessage()]
        assert len(said) == 1, [r.getMessage() for r in said]

        # Redis evicts while its INFO fails: not seen yet (nothing read).
        fill_to_limit(rc)
        evict_some(rc, 0)
        rc.config_set("maxmemory", 500_000_000)  # nothing more goes
        assert evicted_keys(rc) >= 1
        assert await watch.check() is False, watch.last_loss
        assert calls >= 4 and watch.losses == 1

        # INFO answers again: read as before, said once; the eviction meanwhile is seen.
        watch.client.info = real_info  # type: ignore[method-assign]
        assert await watch.check() is True
        assert watch.losses == 2
        assert watch.last_loss is not None and watch.last_loss.kind == EVICTED
        assert await watch.check() is False
        back = [r for r in caplog.records if "INFO answers again" in r.getMessage()]
        assert len(back) == 1, [r.getMessage() for r in caplog.records]
    finally:
        rc.close()
        await client.close()


@pytest.mark.slow
async def test_one_cluster_primarys_info_timing_out_does_not_hide_a_loss_on_another(
    cluster: RedisCluster,
) -> None:
    """A Redis Cluster: one primary's INFO times out (the rest answer), and another primary
    is flushed. The INFO of every primary was gathered as one: one failing raised out of
    the check, so the flush went unsaid on every check (0 losses). Now the flushed
    primary's tenants are a loss of kind lost, exactly them, said once."""
    victim, lost, kept = pick_tenants(cluster)
    for port in cluster.alive():
        if cluster.client(port).info("replication")["role"] == "master":
            cluster.client(port).flushall()
    side = await Sidecar.over(cluster.url, lost + kept)
    watch = side.watch
    try:
        for t in lost + kept:  # every tenant known to the engine, its marker written
            status, got = await side.call(t, "POST", "/v1/check", {"org_id": "o1"})
            assert status == 200, got
        assert await watch.check() is False
        slow = next(
            p for p in cluster.alive()
            if p != victim and cluster.client(p).info("replication")["role"] == "master"
        )  # fmt: skip
        real = watch.client.execute_command
        refused: list[str] = []

        async def execute(*args: Any, **kwargs: Any) -> Any:
            node = kwargs.get("target_nodes")
            if args and args[0] == "INFO" and getattr(node, "port", None) == slow:
                refused.append(str(node.name))
                raise RedisTimeout("Timeout reading from socket")
            return await real(*args, **kwargs)

        watch.client.execute_command = execute  # type: ignore[method-assign]
        cluster.client(victim).flushall()
        results = [await watch.check() for _ in range(2)]
        assert results == [True, False], results
        assert refused == [f"127.0.0.1:{slow}"] * 2
        assert watch.losses == 1
        assert watch.last_loss is not None and watch.last_loss.kind == LOST
        assert watch.last_loss.tenants == sorted(lost), watch.last_loss
    finally:
        await side.client.close()
