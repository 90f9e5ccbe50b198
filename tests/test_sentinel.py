"""redis+sentinel://: decisions go to the primary the sentinels name, and follow it when
the sentinels promote the replica after the primary dies."""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from sidecar import config as config_mod
from sidecar import keys
from sidecar.clock import SystemClock
from sidecar.engine import Engine, Unavailable
from sidecar.schemas import AuthorizeRequest, SettleRequest
from sidecar.scripts import Scripts
from sidecar.store import SentinelStore, open_store
from tests.harness import RedisServer, collect_dead_sockets, free_port, redis_binary, wait_until

pytestmark = pytest.mark.slow

CONFIG = config_mod.parse(
    {"budgets": [{"id": "cap", "name": "Cap", "scope": "organization", "limit_usd": 100,
                  "period": "monthly"}],
     "settings": {"redis_timeout_ms": 1000}},
    "<sentinel>",
)  # fmt: skip


class Setup:
    def __init__(self) -> None:
        self.primary = RedisServer().start()
        self.replica = RedisServer()
        self.dir = Path(tempfile.mkdtemp(prefix="bs-sentinel-"))
        self.sentinel_port = free_port()
        self.sentinel: subprocess.Popen[bytes] | None = None

    def start(self) -> Setup:
        self.replica.start()
        self.replica.client().replicaof("127.0.0.1", self.primary.port)
        wait_until(
            lambda: self.replica.client().info("replication").get("master_link_status") == "up",
            what="replica in sync",
        )
        conf = self.dir / "sentinel.conf"
        conf.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor main 127.0.0.1 {self.primary.port} 1\n"
            "sentinel down-after-milliseconds main 1000\n"
            "sentinel failover-timeout main 10000\n"
        )
        self.sentinel = subprocess.Popen(
            [redis_binary(), str(conf), "--sentinel"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        sentinel = redis.Redis(port=self.sentinel_port, decode_responses=True)
        try:
            wait_until(
                lambda: sentinel.execute_command("SENTINEL", "REPLICAS", "main") != [],
                what="sentinel sees the replica",
            )
        finally:
            sentinel.close()
        return self

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/main"

    def stop(self) -> None:
        if self.sentinel is not None:
            self.sentinel.terminate()
            self.sentinel.wait(timeout=10)
        self.primary.cleanup()
        self.replica.cleanup()


@pytest.fixture
def setup() -> Iterator[Setup]:
    s = Setup()
    try:
        yield s.start()
    finally:
        s.stop()
        collect_dead_sockets()


async def test_decisions_follow_the_primary_through_a_failover(setup: Setup) -> None:
    store = open_store(setup.url, timeout_ms=1000)
    assert isinstance(store, SentinelStore)
    engine = Engine(CONFIG, store, SystemClock(), Scripts.load_all())
    settled = 0
    try:
        for _ in range(20):
            d = await engine.authorize("t", AuthorizeRequest(estimated_usd=0.01))
            await engine.settle("t", SettleRequest(reservation_id=d.reservation_id or "",
                                                   cost_usd=0.01))  # fmt: skip
            settled += 1
        wait_until(
            lambda: (
                setup.replica.client().info("replication")["master_repl_offset"]
                >= setup.primary.client().info("replication")["master_repl_offset"]
            ),
            what="replica caught up",
        )
        assert setup.primary.process is not None
        setup.primary.process.kill()  # kill -9: the sentinels promote the replica
        setup.primary.process.wait()
        setup.primary.process = None
        deadline = time.monotonic() + 30
        resumed = False
        while time.monotonic() < deadline and not resumed:
            try:
                d = await engine.authorize("t", AuthorizeRequest(estimated_usd=0.01))
                await engine.settle("t", SettleRequest(reservation_id=d.reservation_id or "",
                                                       cost_usd=0.01))  # fmt: skip
                settled += 1
                resumed = True
            except Unavailable:
                await asyncio.sleep(0.2)
        assert resumed, "decisions never reached the promoted replica"
    finally:
        await store.close()
    raw = setup.replica.client().hgetall(keys.tenant_keys("t").counters)
    used = sum(int(v) for k, v in raw.items() if k.startswith("u:"))
    assert used == settled * 10_000  # nothing lost (synced before the kill), nothing doubled
