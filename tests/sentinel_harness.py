"""A real Redis Sentinel setup on loopback, beside tests/cluster_harness.py's Cluster: a
primary, its replica and one Sentinel monitoring them as `main` (quorum 1, down after 1 s),
from redis-server binaries, each stopped by its process id. The `sentinel` fixture
(tests/conftest.py) gives a test one of its own: tests kill its primary."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import redis

from tests.harness import RedisServer, free_port, redis_binary, stop_process, wait_until


class RedisSentinel:
    def __init__(self) -> None:
        self.primary = RedisServer().start()
        self.replica = RedisServer()
        self.dir = Path(tempfile.mkdtemp(prefix="bs-sentinel-"))
        self.sentinel_port = free_port()
        self.sentinel: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisSentinel:
        """The replica in sync with the primary, and the Sentinel seeing both."""
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
            stop_process(self.sentinel)
            self.sentinel = None
        self.primary.cleanup()
        self.replica.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)
