"""The store: the only module that talks to Redis.

Every hot-path operation is one EVALSHA (invariant 5). Concurrent calls are coalesced: all
the script calls made during one event-loop tick go to Redis as one pipelined write (each
still its own atomic EVALSHA), with a few pipelines in flight at most. Under load this
replaces one round trip and one pool checkout per call by one per batch, which is what
keeps the latency of a decision inside the Redis timeout when hundreds of agents burst.

Scripts are not loaded ahead of time: a NOSCRIPT reply (a fresh server, a SCRIPT FLUSH, a
failover to a replica that never saw them) loads the script and repeats that call once, so
the store heals by itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from sidecar.scripts import Script


class StoreError(Exception):
    """A store call failed. `transient` errors (timeouts, lost connections) trigger the
    fail mode; the others are bugs (a script error) and surface as 500."""

    transient = False


class StoreUnavailable(StoreError):
    transient = True


class Store(Protocol):
    """Runs one script atomically and returns its reply; raises StoreError.

    A call that times out may still be applied by Redis later: every script is safe under
    that (a hold nobody learns of is returned when its lease ends; settle and release are
    idempotent)."""

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[str | int]) -> Any: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


_Call = tuple[Script, Sequence[str], Sequence[str | int], "asyncio.Future[Any]"]


class RedisStore:
    """A Store over redis-py's asyncio client (standalone Redis, unix or TCP)."""

    def __init__(self, client: aioredis.Redis, *, timeout_ms: int, max_in_flight: int = 4) -> None:
        self._client = client
        self._timeout_s = timeout_ms / 1000
        self._max_in_flight = max_in_flight
        self._pending: list[_Call] = []
        self._in_flight = 0
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def from_url(cls, url: str, *, timeout_ms: int) -> RedisStore:
        client = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=max(timeout_ms / 1000, 0.05),
            # A pipeline stuck on a frozen server must end some time, or it would hold
            # its in-flight slot forever; decisions give up much earlier (timeout_ms).
            socket_timeout=max(10 * timeout_ms / 1000, 2.0),
            retry_on_timeout=False,
        )
        return cls(client, timeout_ms=timeout_ms)

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((script, keys, args, future))
        if not self._flush_scheduled and self._in_flight < self._max_in_flight:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        try:
            async with asyncio.timeout(self._timeout_s):
                return await future
        except TimeoutError:
            raise StoreUnavailable(
                f"redis did not answer within {self._timeout_s * 1000:.0f} ms"
            ) from None

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._pending or self._in_flight >= self._max_in_flight:
            return
        batch, self._pending = self._pending, []
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._execute(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, batch: list[_Call]) -> None:
        try:
            replies = await self._evalsha_all(batch)
            retry = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
            if retry:
                for script in {batch[i][0] for i in retry}:
                    await self._client.script_load(script.source)
                again = await self._evalsha_all([batch[i] for i in retry])
                for i, reply in zip(retry, again, strict=True):
                    replies[i] = reply
            for (script, _, _, future), reply in zip(batch, replies, strict=True):
                if future.done():  # its caller gave up (timeout)
                    continue
                if isinstance(reply, ResponseError):
                    future.set_exception(StoreError(f"{script.name}.lua failed: {reply}"))
                else:
                    future.set_result(reply)
        except (RedisError, OSError) as exc:
            error = StoreUnavailable(f"redis unavailable: {exc.__class__.__name__}: {exc}")
            for *_, future in batch:
                if not future.done():
                    future.set_exception(error)
        finally:
            self._in_flight -= 1
            if self._pending and not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)

    async def _evalsha_all(self, batch: Sequence[_Call]) -> list[Any]:
        if len(batch) == 1:
            script, keys, args, _ = batch[0]
            try:
                return [await self._client.evalsha(script.sha, len(keys), *keys, *args)]
            except ResponseError as exc:
                return [exc]
        pipe = self._client.pipeline(transaction=False)
        for script, keys, args, _ in batch:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(max(self._timeout_s, 0.2)):
                return bool(await self._client.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()
