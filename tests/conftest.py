"""Fixtures: one real redis-server per test session (flushed before each test), the app
in-process over it with a fake clock, and helpers to write config files."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from aiohttp.test_utils import TestClient, TestServer

from sidecar import config as config_mod
from sidecar.api.app import create_app
from sidecar.clock import FakeClock
from sidecar.model import Config
from sidecar.store import RedisStore
from tests.cluster_harness import RedisCluster
from tests.harness import RedisServer, collect_dead_sockets
from tests.sentinel_harness import RedisSentinel

# 2026-03-10T12:00:00Z: a fixed, unremarkable instant for tests with a fake clock.
T0_MS = 1_773_144_000_000


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A redis-server of the test's own, for tests that stop, kill or reconfigure it
    (the session's `redis_server` is shared and must stay up)."""
    srv = RedisServer().start()
    try:
        yield srv
    finally:
        srv.cleanup()


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    """A Redis Cluster (tests/cluster_harness.py) per test module that asks for one: its
    tests share it (building one takes seconds) and may kill or flush its nodes."""
    c = RedisCluster().start()
    yield c
    c.stop()
    collect_dead_sockets()


@pytest.fixture
def sentinel() -> Iterator[RedisSentinel]:
    """A primary, its replica and a Sentinel of the test's own (tests/sentinel_harness.py):
    tests kill the primary and let Sentinel fail over."""
    s = RedisSentinel()
    try:
        yield s.start()
    finally:
        s.stop()
        collect_dead_sockets()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0_MS)


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[dict[str, Any]], Path]:
    def write(doc: dict[str, Any], name: str = "budgets.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(doc))
        return path

    return write


def make_config(doc: dict[str, Any]) -> Config:
    return config_mod.parse(doc, "<test>")


ClientFactory = Callable[..., Any]


@pytest.fixture
async def make_client(
    redis_server: RedisServer, redis_client: redis.Redis, clock: FakeClock
) -> AsyncIterator[ClientFactory]:
    """make_client(doc) -> an aiohttp TestClient of the app over the real Redis."""
    clients: list[TestClient[Any, Any]] = []

    async def make(doc: dict[str, Any], **kw: Any) -> TestClient[Any, Any]:
        cfg = make_config(doc)
        store = RedisStore.from_url(redis_server.url, timeout_ms=kw.pop("timeout_ms", 2000))
        app = create_app(cfg, store, clock=kw.pop("clock", clock))
        client = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for c in clients:
        await c.close()
