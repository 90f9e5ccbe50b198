"""Background tasks stop for certain (sidecar.tasks).

CI once hung for its whole 90 minutes in an app's cleanup, which cancelled the
definitions watcher once and awaited it. Reproduced here: the redis-py command the
watcher is in returns normally instead of raising CancelledError (Python 3.11's
asyncio.wait_for, which redis-py wraps around commands), its loop polls on, and the
cleanup awaits it forever."""

from __future__ import annotations

import asyncio
import logging

import pytest

from sidecar import definitions, tasks
from sidecar.definitions import DefinitionStore, DefinitionWatcher
from sidecar.model import TenantDefinitions
from sidecar.store import RedisStore
from tests.harness import RedisServer


async def swallowing(limit: list[int], swallowed: list[int]) -> None:
    """Loops until cancelled, swallowing the first `limit[0]` cancellations the way a
    redis-py command that completes in the cancelling tick does."""
    while True:
        try:
            await asyncio.sleep(0.001)
        except asyncio.CancelledError:
            if len(swallowed) >= limit[0]:
                raise
            swallowed.append(1)
            asyncio.current_task().uncancel()  # type: ignore[union-attr]


async def test_a_task_that_swallows_a_cancel_outlives_one_cancel_but_not_stop() -> None:
    swallowed: list[int] = []
    task = asyncio.create_task(swallowing([2], swallowed))
    await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.wait([task], timeout=0.2)
    assert not task.done() and swallowed == [1]  # one cancel() was not enough

    await tasks.stop([task], what="test loop")
    assert task.cancelled() and swallowed == [1, 1]


async def test_stop_gives_up_after_its_bound_and_says_what(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limit, swallowed = [10**9], []
    stubborn = asyncio.create_task(swallowing(limit, swallowed))
    quick = asyncio.create_task(asyncio.sleep(3600))
    await asyncio.sleep(0.01)  # both inside their try blocks
    with caplog.at_level(logging.ERROR, logger="budget_sidecar.tasks"):
        await tasks.stop([stubborn, quick], what="stubborn loops", bound_s=0.3)
    assert quick.cancelled() and not stubborn.done()
    assert len(swallowed) >= 2  # cancelled again after the first was swallowed
    assert [r.getMessage() for r in caplog.records] == [
        "1 stubborn loops did not stop within 0.3 s"
    ]
    limit[0] = 0  # let it end, so the test leaves nothing running
    stubborn.cancel()
    await asyncio.wait([stubborn])
    assert stubborn.cancelled()


async def test_stop_retrieves_exceptions_and_accepts_finished_tasks() -> None:
    async def fail() -> None:
        raise RuntimeError("boom")

    failed = asyncio.create_task(fail())
    done = asyncio.create_task(asyncio.sleep(0))
    await asyncio.sleep(0.01)
    await tasks.stop([failed, done], what="finished tasks")
    assert isinstance(failed.exception(), RuntimeError) and done.result() is None


class _Engine:
    def set_definitions(self, defs: dict[str, TenantDefinitions]) -> None:
        pass


class _CountingStore(DefinitionStore):
    reads = 0

    async def version(self) -> int:
        _CountingStore.reads += 1
        return await super().version()


async def test_definitions_watcher_always_stops_when_polling_real_redis(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Polling every 0.5 ms keeps a redis-py command in flight at almost every cancel;
    # with a single cancel() this hung within the first few of these stops.
    monkeypatch.setattr(definitions, "POLL_S", 0.0005)
    store = RedisStore.from_url(redis_server.url, timeout_ms=2000)
    try:
        for _ in range(60):
            watcher = DefinitionWatcher(_CountingStore(store.client), _Engine())  # type: ignore[arg-type]
            running = watcher.lifecycle()
            await anext(running)
            await asyncio.sleep(0.002)
            async with asyncio.timeout(10):  # a hang detector, not a speed assertion
                async for _ in running:
                    pass
        assert _CountingStore.reads >= 60  # the watchers did poll Redis
        assert asyncio.all_tasks() == {asyncio.current_task()}  # and none is left running
    finally:
        await store.close()
