"""A Redis that answers but refuses writes it cannot persist, or refuses them for want of
replicas: its disk stopped taking writes (MISCONF after a failed BGSAVE, with `save` points
configured, Redis's default), or `min-replicas-to-write` is not met (NOREPLICAS). Every
route answers 503 problem+json flagged `degraded` (the fail mode: never a 500), writes
nothing, and all is served again once the disk takes writes.

The disk is made unwritable with `chattr +i` on the server's directory (the tests run as
root, whom a read-only mode does not stop): BGSAVE cannot create its temporary file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from sidecar.api.app import create_app
from sidecar.clock import FakeClock
from sidecar.store import RedisStore
from tests.conftest import T0_MS, make_config
from tests.harness import RedisServer, data_dump, missing, wait_until

GUARD_S = 10.0  # not a timing assertion: only keeps a hang from hanging the suite
CONFIG: dict[str, Any] = {
    "budgets": [{"id": "user", "name": "Each user", "scope": "user", "limit_usd": 1.0,
                 "period": "daily"}],
    "settings": {"redis_timeout_ms": 2000},
}  # fmt: skip
AUTH = {"user_id": "u1", "estimated_usd": 0.1}
MICRO = 1_000_000


def chattr(flag: str, *paths: Path) -> None:
    if shutil.which("chattr") is None:
        missing("chattr (e2fsprogs)")
    for path in paths:
        subprocess.run(["chattr", flag, str(path)], check=True, capture_output=True)


@contextlib.contextmanager
def immutable(*paths: Path) -> Iterator[None]:
    """`paths` immutable (no file created, renamed or written in them, root or not) for the
    block, mutable again after it whatever happens (the fixtures remove them)."""
    try:
        chattr("+i", *paths)
        yield
    finally:
        chattr("-i", *paths)


def persistence(client: redis.Redis) -> dict[str, Any]:
    return dict(client.info("persistence"))


def refuse_writes(client: redis.Redis, how: str) -> None:
    """Make the server refuse every write as it would in production: MISCONF (a save point, a
    BGSAVE that failed: the caller made the dir unwritable) or NOREPLICAS."""
    if how == "misconf":
        client.config_set("save", "3600 1")  # snapshots on, as in Redis's default config
        client.bgsave()
        wait_until(
            lambda: persistence(client)["rdb_last_bgsave_status"] == "err",
            GUARD_S,
            "the BGSAVE failed",
        )
    else:
        client.config_set("min-replicas-to-write", "1")
    with pytest.raises(redis.ResponseError, match=r"MISCONF|NOREPLICAS"):
        client.set("probe", "1")


def accept_writes(client: redis.Redis, how: str) -> None:
    if how == "misconf":
        client.bgsave()
        wait_until(
            lambda: persistence(client)["rdb_last_bgsave_status"] == "ok",
            GUARD_S,
            "a BGSAVE succeeded",
        )
    else:
        client.config_set("min-replicas-to-write", "0")
    client.set("probe", "1")
    client.delete("probe")


AppFactory = Callable[[], Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def make_app(server: RedisServer) -> AsyncIterator[AppFactory]:
    clients: list[TestClient[Any, Any]] = []

    async def make() -> TestClient[Any, Any]:
        cfg = make_config(CONFIG)
        store = RedisStore.from_url(server.url, timeout_ms=cfg.settings.redis_timeout_ms)
        client = TestClient(TestServer(create_app(cfg, store, clock=FakeClock(T0_MS))))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for c in clients:
        await c.close()


async def call(
    client: TestClient[Any, Any], method: str, path: str, body: Any = None
) -> tuple[int, dict[str, Any]]:
    async def go() -> tuple[int, dict[str, Any]]:
        resp = await client.request(method, path, json=body)
        text = await resp.text()
        return resp.status, json.loads(text)

    return await asyncio.wait_for(go(), GUARD_S)


# (method, path, body): every kind of write the API makes, and the decisions.
WRITES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/v1/authorize", AUTH),
    ("POST", "/v1/record", {"user_id": "u1", "cost_usd": 0.05}),
    ("POST", "/api/v1/budgets",
     {"id": "b2", "name": "B2", "scope": "team", "limit_usd": 1, "period": "daily"}),
    ("PUT", "/api/v1/pricing",
     {"provider": "p", "model": "m",
      "pricing": {"input_per_1k": 0.001, "output_per_1k": 0.002}}),
    ("POST", "/v1/rate-limits",
     {"id": "rl", "scope": "user", "metric": "requests", "limit": 5, "window": "1m"}),
    ("POST", "/v1/stops", {"scope": "user", "scope_id": "u9", "reason": "disk test"}),
]  # fmt: skip


@pytest.mark.parametrize("how", ["misconf", "noreplicas"])
async def test_a_redis_refusing_writes_is_503_everywhere_and_recovers(
    make_app: AppFactory, server: RedisServer, how: str
) -> None:
    """Each write route and a settle, three times each while Redis refuses writes: every
    answer 503 problem+json `degraded` (fail mode closed), nothing in Redis changed. Then
    Redis takes writes again: the hold of before settles once, and every route works."""
    app = await make_app()
    status, held = await call(app, "POST", "/v1/authorize", AUTH)
    assert status == 200 and held["allowed"], held
    rid = held["reservation_id"]
    settle = ("POST", "/v1/settle", {"reservation_id": rid, "cost_usd": 0.05})
    answers: dict[str, list[int]] = {}
    bodies = []
    with server.client() as client:
        with immutable(Path(server.dir)):
            refuse_writes(client, how)
            before = data_dump(client)
            for method, path, body in [*WRITES, settle] * 3:
                status, answer = await call(app, method, path, body)
                answers.setdefault(f"{method} {path}", []).append(status)
                bodies.append(answer)
            after = data_dump(client)
        accept_writes(client, how)
    assert answers == {f"{m} {p}": [503, 503, 503] for m, p, _ in [*WRITES, settle]}
    assert all(b["degraded"] is True and b["status"] == 503 for b in bodies), bodies
    assert after == before
    # The circuit breaker answers by the fail mode for its cool-down, then probes.
    deadline = time.monotonic() + GUARD_S
    while (status := (await call(app, *settle))[0]) == 503 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert status == 200
    status, settled = await call(app, *settle)  # the repeat answers the first result
    assert (status, settled["state"], settled["replayed"]) == (200, "settled", True)
    results = [(await call(app, method, path, body))[0] for method, path, body in WRITES]
    assert results == [200, 200, 201, 200, 201, 201]
    status, usage = await call(app, "GET", "/v1/budgets/user/status?scope_id=u1")
    # 0.05 settled + 0.05 recorded; the authorize after recovery holds 0.1.
    assert (round(usage["used_usd"] * MICRO), round(usage["held_usd"] * MICRO)) == (
        100_000,
        100_000,
    )
